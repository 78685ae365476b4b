"""CREATE, DELETE, RENAME, SUBSCRIBE, UNSUBSCRIBE, LIST, LSUB, STATUS: the user's mailboxes
(RFC 3501 6.3.3-10, RFC 5258 LIST-EXTENDED, RFC 5819 LIST-STATUS)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from mailgw.imap import parser as p
from mailgw.imap import wire
from mailgw.imap.commands.registry import Command
from mailgw.imap.mailboxes import DELIMITER, list_lines, status_line, status_values
from mailgw.imap.states import AUTH
from mailgw.interfaces import MailboxNotFound

if TYPE_CHECKING:
    from mailgw.imap.session import IMAPServer


def create(session: IMAPServer, tag: str, command: p.Create) -> None:
    name = command.mailbox.rstrip(DELIMITER)
    if not name or name.upper() == "INBOX":
        session.no(tag, "Mailbox already exists", wire.ALREADYEXISTS)
        return
    store = session.factory.store
    if name in store.list_mailboxes(session.username()):
        session.no(tag, "Mailbox already exists", wire.ALREADYEXISTS)
        return
    try:
        store.create_mailbox(session.username(), name)
    except ValueError as e:
        session.no(tag, f"Cannot create mailbox: {e}", wire.CANNOT)
        return
    session.ok(tag, "CREATE completed")


def delete(session: IMAPServer, tag: str, command: p.Delete) -> None:
    user = session.username()
    if command.mailbox == "INBOX":
        session.no(tag, "INBOX cannot be deleted", wire.CANNOT)
        return
    store = session.factory.store
    names = store.list_mailboxes(user)
    if command.mailbox not in names:
        prefix = command.mailbox + DELIMITER
        if any(name.startswith(prefix) for name in names):
            # Only a level implied by its children (\Noselect): an error (RFC 3501
            # 6.3.4). IMAP4rev2 has a code for it (RFC 9051 7.1); IMAP4rev1 clients get
            # NONEXISTENT, as from Dovecot.
            code = wire.HASCHILDREN if session.rev2 else wire.NONEXISTENT
            session.no(tag, "Mailbox has children", code)
            return
        session.no(tag, "No such mailbox", wire.NONEXISTENT)
        return
    if session.selected is not None and session.selected.name == command.mailbox:
        session.unselect()
    try:
        store.delete_mailbox(user, command.mailbox)
    except MailboxNotFound:
        session.no(tag, "No such mailbox", wire.NONEXISTENT)
        return
    except ValueError as e:
        session.no(tag, f"Cannot delete mailbox: {e}", wire.CANNOT)
        return
    session.ok(tag, "DELETE completed")


def rename(session: IMAPServer, tag: str, command: p.Rename) -> None:
    user = session.username()
    store = session.factory.store
    names = store.list_mailboxes(user)
    target = command.target.rstrip(DELIMITER)
    if command.source not in names:
        session.no(tag, "No such mailbox", wire.NONEXISTENT)
        return
    if target in names or target.upper() == "INBOX":
        session.no(tag, "Target mailbox already exists", wire.ALREADYEXISTS)
        return
    try:
        store.rename_mailbox(user, command.source, target)
    except MailboxNotFound:
        session.no(tag, "No such mailbox", wire.NONEXISTENT)
        return
    except ValueError as e:
        session.no(tag, f"Cannot rename mailbox: {e}", wire.CANNOT)
        return
    session.ok(tag, "RENAME completed")


def _subscribed(session: IMAPServer) -> set[str]:
    return set(session.factory.store.list_subscribed(session.username()))


def _subscribe(session: IMAPServer, tag: str, mailbox: str, on: bool) -> None:
    store = session.factory.store
    if on and mailbox not in store.list_mailboxes(session.username()):
        session.no(tag, "No such mailbox", wire.NONEXISTENT)
        return
    store.set_subscribed(session.username(), mailbox, on)
    session.ok(tag, ("SUBSCRIBE" if on else "UNSUBSCRIBE") + " completed")


def subscribe(session: IMAPServer, tag: str, command: p.Subscribe) -> None:
    _subscribe(session, tag, command.mailbox, True)


def unsubscribe(session: IMAPServer, tag: str, command: p.Unsubscribe) -> None:
    _subscribe(session, tag, command.mailbox, False)


def list_(session: IMAPServer, tag: str, command: p.ListMailboxes) -> None:
    names = session.factory.store.list_mailboxes(session.username())
    need_subs = "SUBSCRIBED" in command.selection or "SUBSCRIBED" in command.returns
    subscribed = _subscribed(session) if need_subs else set()

    def status(name: str) -> bytes | None:
        return _status_line(session, name, command.status_items)

    for line in list_lines(command, names, subscribed, utf8=session.utf8_names, status=status):
        session.write(line)
    session.ok(tag, "LIST completed")


def lsub(session: IMAPServer, tag: str, command: p.Lsub) -> None:
    names = session.factory.store.list_mailboxes(session.username())
    patterns = (command.pattern,) if command.pattern is not None else ()
    listing = p.ListMailboxes(command.reference, patterns)
    subscribed = _subscribed(session)
    for line in list_lines(listing, names, subscribed, lsub=True, utf8=session.utf8_names):
        session.write(line)
    session.ok(tag, "LSUB completed")


def _status_line(session: IMAPServer, name: str, items: tuple[str, ...]) -> bytes | None:
    user = session.username()
    try:
        mailbox: Any = session.factory.store.open_mailbox(user, name)
    except (MailboxNotFound, ValueError):
        return None
    recent = mailbox.recent_count() if "RECENT" in items else 0
    return status_line(mailbox.name, status_values(mailbox, items, recent), session.utf8_names)


def status(session: IMAPServer, tag: str, command: p.Status) -> None:
    line = _status_line(session, command.mailbox, command.items)
    if line is None:
        session.no(tag, "No such mailbox", wire.NONEXISTENT)
        return
    if "HIGHESTMODSEQ" in command.items:
        session.enable_condstore()  # a CONDSTORE enabling command (RFC 7162 3.1)
    session.write(line)
    session.ok(tag, "STATUS completed")


COMMANDS = (
    Command("CREATE", create, AUTH),
    Command("DELETE", delete, AUTH),
    Command("RENAME", rename, AUTH),
    Command("SUBSCRIBE", subscribe, AUTH),
    Command("UNSUBSCRIBE", unsubscribe, AUTH),
    Command("LIST", list_, AUTH),
    Command("LSUB", lsub, AUTH),
    Command("STATUS", status, AUTH),
)
