"""APPEND and MULTIAPPEND (RFC 3501 6.3.11, RFC 3502, RFC 4315 APPENDUID): the writes run in
the I/O pool while the session waits."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from twisted.logger import Logger
from twisted.python.failure import Failure

from mailgw.imap import parser as p
from mailgw.imap import wire
from mailgw.imap.commands.registry import Command
from mailgw.imap.states import AUTH
from mailgw.interfaces import MailboxNotFound, QuotaExceeded
from mailgw.store.rows import is_disk_full

if TYPE_CHECKING:
    from mailgw.imap.session import IMAPServer

log = Logger()


def append(session: IMAPServer, tag: str, command: p.Append) -> None:
    if any(not message.data for message in command.messages):
        _close_literals(command)
        session.no(tag, "Empty messages are not stored", wire.CANNOT)
        return
    # The date-time keeps its zone (FETCH INTERNALDATE, SEARCH BEFORE/ON/SINCE).
    messages = [(m.data, m.flags, m.date) for m in command.messages]
    # The writes and fsyncs run in the I/O pool (the factory's runner): other sessions
    # go on meanwhile; this one waits (commands run in order). All or none (RFC 3502).
    # Spooled literals are read from their files there, then deleted.
    session.suspend()
    factory = session.factory
    d = factory.run_blocking(
        factory.store.append_messages, session.username(), command.mailbox, messages
    )
    d.addBoth(_passing(_close_literals, command))
    d.addCallbacks(
        _appended, _append_failed, callbackArgs=(session, tag), errbackArgs=(session, tag)
    )


def _appended(result: tuple[int, list[int]], session: IMAPServer, tag: str) -> None:
    if session.lost:
        return
    uidvalidity, uids = result
    durable = session.factory.durable
    if durable is not None:  # synchronous replication: once the DR replica has it
        durable().addBoth(lambda _: _append_ok(session, tag, uidvalidity, uids))
        return
    _append_ok(session, tag, uidvalidity, uids)


def _append_ok(session: IMAPServer, tag: str, uidvalidity: int, uids: list[int]) -> None:
    if session.lost:
        return
    session.ok(tag, "APPEND completed", wire.code_appenduid(uidvalidity, uids))
    session.done()


def _append_failed(failure: Failure, session: IMAPServer, tag: str) -> None:
    if session.lost:
        return
    if failure.check(MailboxNotFound, ValueError):
        session.no(tag, "No such mailbox", wire.TRYCREATE)
    elif failure.check(QuotaExceeded):
        session.no(tag, "Quota exceeded", wire.OVERQUOTA)
    elif is_disk_full(failure.value):  # a temporary failure, as Dovecot answers ENOSPC
        log.warn(
            "imap {session} user {user}: APPEND failed, disk full: {error}",
            session=session.session_id,
            user=session.user,
            error=failure.value,
        )
        session.no(tag, "Not enough disk space", wire.OVERQUOTA)
    else:
        session.internal_error(failure, tag)
    session.done()


def _close_literals(command: p.Append) -> None:
    """Delete the temporary files of an APPEND's spooled literals."""
    for message in command.messages:
        if not isinstance(message.data, bytes):
            message.data.close()


def _passing(action: Callable[[p.Append], None], command: p.Append) -> Callable[[Any], Any]:
    """A Deferred callback running ``action(command)`` and passing the result on."""

    def run(result: Any) -> Any:
        action(command)
        return result

    return run


COMMANDS = (Command("APPEND", append, AUTH),)
