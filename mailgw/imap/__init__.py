"""IMAP4rev1/rev2 access role: wire format (parser, wire), sequence sets, and the session."""
