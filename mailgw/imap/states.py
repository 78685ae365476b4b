"""The states of an IMAP session (RFC 3501 3, RFC 9051 3) and the sets of them a command is
allowed in. A leaf module: the session core and the command modules both use it."""

from __future__ import annotations

NOT_AUTHENTICATED = "not authenticated"
AUTHENTICATED = "authenticated"
SELECTED = "selected"
LOGOUT = "logout"

# Where a command may be given. A session in the LOGOUT state reads no more commands.
ANY = frozenset({NOT_AUTHENTICATED, AUTHENTICATED, SELECTED, LOGOUT})
NOT_AUTH = frozenset({NOT_AUTHENTICATED})
AUTH = frozenset({AUTHENTICATED, SELECTED})
SELECTED_ONLY = frozenset({SELECTED})
