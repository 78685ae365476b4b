"""SMTP roles: policy objects the SMTP protocol calls (mx: inbound for local domains)."""
