"""IMAP4rev1/rev2 access role: wire format (parser, wire, names), sequence sets, the session core
and its commands (``commands/``), one module per command family."""
