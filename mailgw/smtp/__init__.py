"""SMTP server: the wire protocol (protocol.py) and the roles that give it policy (roles/)."""
