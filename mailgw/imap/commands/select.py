"""SELECT, EXAMINE, CLOSE, UNSELECT, CHECK, NOOP, IDLE: entering, keeping and leaving the
selected state (RFC 3501 6.1.2, 6.3.1-2, 6.4.1-2, RFC 3691, RFC 2177)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

from mailgw.imap import parser as p
from mailgw.imap import wire
from mailgw.imap.commands.registry import Command
from mailgw.imap.fetch import Fetcher
from mailgw.imap.mailboxes import select_list_line
from mailgw.imap.selected import SelectedMailbox
from mailgw.imap.states import ANY, AUTH, SELECTED_ONLY
from mailgw.interfaces import MailboxNotFound

if TYPE_CHECKING:
    from mailgw.imap.session import IMAPServer


def noop(session: IMAPServer, tag: str, command: p.Simple) -> None:
    if session.selected is not None:
        session.selected.dirty = True
    session.ok(tag, "NOOP completed")


def select(session: IMAPServer, tag: str, command: p.Select) -> None:
    """SELECT and EXAMINE (``command.readonly``), with CONDSTORE / QRESYNC (RFC 7162)."""
    if session.selected is not None:
        session.unselect()
        session.write(wire.untagged_status("OK", "Previous mailbox closed", wire.CLOSED))
    if command.qresync is not None and not session.qresync:
        session.bad(tag, "QRESYNC is not enabled")
        return
    user = session.username()
    store = session.factory.store
    try:
        mailbox = store.open_mailbox(user, command.mailbox)
    except (MailboxNotFound, ValueError):
        session.tagged(tag, "NO", "No such mailbox", wire.NONEXISTENT)
        return
    if command.condstore:
        session.condstore = True
    # A read-only node (a DR replica) opens every mailbox as EXAMINE would.
    readonly = command.readonly or session.factory.store.write_refusal() is not None

    def claim(uids: Sequence[int]) -> set[int]:
        # \Recent lives in the store (shared by every process); EXAMINE claims nothing.
        # SelectedMailbox gives the UIDs in ascending order.
        if readonly:
            return mailbox.unclaimed_recent(uids, ascending=True)
        return mailbox.claim_recent(uids, ascending=True)

    sel = SelectedMailbox(mailbox, readonly, claim, session.condstore, session.qresync)
    sel.rev2 = session.rev2
    fetcher = Fetcher(user, sel, session.factory.cache)
    sel.on_gone = fetcher.forget  # expunged: its cached structure goes too
    session.select(sel, fetcher)
    for line in sel.select_responses():
        session.write(line)
    if session.rev2:
        # RFC 9051 6.3.2: a LIST response with the mailbox's name and attributes.
        names = store.list_mailboxes(user)
        session.write(select_list_line(str(mailbox.name), names, session.utf8_names))
    if command.qresync is not None:
        for line in sel.resync(command.qresync):
            session.write(line)
    code = wire.READ_ONLY if readonly else wire.READ_WRITE
    session.write(wire.tagged(tag, "OK", f"{'EXAMINE' if readonly else 'SELECT'} completed", code))


def select_rejected(session: IMAPServer, raw: p.Command, error: p.CommandError) -> None:
    """A SELECT that fails (a name that cannot exist) leaves no mailbox selected (RFC 3501
    6.3.1), as Dovecot: the previous one is closed."""
    if error.status == "NO" and session.selected is not None:
        session.unselect()
        session.write(wire.untagged_status("OK", "Previous mailbox closed", wire.CLOSED))


def expunge_deleted(session: IMAPServer, only: set[int] | None = None) -> list[int]:
    """Expunge the selected mailbox's ``\\Deleted`` messages (of ``only``, when given)."""
    sel = session.sel()
    sel.mailbox.refresh()
    doomed = [
        m.uid
        for m in sel.mailbox.messages()
        if "\\Deleted" in m.flags and (only is None or m.uid in only)
    ]
    return sel.mailbox.expunge(doomed) if doomed else []


def close(session: IMAPServer, tag: str, command: p.Simple) -> None:
    if not session.sel().readonly:
        expunge_deleted(session)
    session.unselect()
    session.ok(tag, "CLOSE completed")


def unselect(session: IMAPServer, tag: str, command: p.Simple) -> None:
    session.unselect()
    session.ok(tag, "UNSELECT completed")


def idle(session: IMAPServer, tag: str, command: p.Simple) -> None:
    session.idle_tag = tag
    session.write(wire.continuation("idling"))
    session.current = ("IDLE", False)
    session.updates()
    session.touch()

    def done(line: bytes) -> None:
        session.idle_tag = None
        session.touch()
        if line.strip().upper() != b"DONE":
            session.bad(tag, "Expected DONE")
            return
        session.current = ("IDLE", False)
        session.ok(tag, "IDLE terminated")

    session.expect_line(done)


COMMANDS = (
    Command("NOOP", noop, ANY),
    Command("CHECK", noop, SELECTED_ONLY),
    Command("SELECT", select, AUTH, rejected=select_rejected),
    Command("EXAMINE", select, AUTH, rejected=select_rejected),
    Command("CLOSE", close, SELECTED_ONLY),
    Command("UNSELECT", unselect, SELECTED_ONLY),
    Command("IDLE", idle, AUTH),
)
