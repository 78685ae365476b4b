"""The IMAP commands, one module per family (as Dovecot's ``cmd-*.c``, Stalwart's ``op/``).

=========  ====================================================================
auth       CAPABILITY, ID, LOGOUT, STARTTLS, LOGIN, AUTHENTICATE, ENABLE,
           NAMESPACE, UNAUTHENTICATE
mailbox    CREATE, DELETE, RENAME, SUBSCRIBE, UNSUBSCRIBE, LIST, LSUB, STATUS
select     SELECT, EXAMINE, CLOSE, UNSELECT, CHECK, NOOP, IDLE
fetch      FETCH
store      STORE, EXPUNGE, COPY, MOVE
search     SEARCH, SORT, THREAD, CANCELUPDATE (and the live search contexts)
append     APPEND
quota      GETQUOTA, GETQUOTAROOT
=========  ====================================================================

A command module imports the session core only for its type; the core
(:mod:`mailgw.imap.session`) dispatches through :data:`COMMANDS`.
"""

from __future__ import annotations

from mailgw.imap.commands import append, auth, fetch, mailbox, quota, search, select, store
from mailgw.imap.commands.registry import Command, Handler, table

COMMANDS: dict[str, Command] = table(
    module.COMMANDS for module in (auth, mailbox, select, fetch, store, search, append, quota)
)
# The commands during which EXPUNGE responses must not be sent, unless UID (RFC 3501 7.4.1).
NO_EXPUNGE = frozenset(name for name, command in COMMANDS.items() if not command.expunge_ok)

__all__ = ["COMMANDS", "NO_EXPUNGE", "Command", "Handler"]
