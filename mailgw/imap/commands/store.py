"""STORE, EXPUNGE, COPY, MOVE: changing the selected mailbox's messages (RFC 3501 6.4.3-7,
RFC 4315 UIDPLUS, RFC 6851 MOVE, RFC 7162 UNCHANGEDSINCE)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from mailgw.imap import parser as p
from mailgw.imap import wire
from mailgw.imap.commands.registry import Command
from mailgw.imap.commands.select import expunge_deleted
from mailgw.imap.states import SELECTED_ONLY
from mailgw.interfaces import IMailbox, IMessageStore, MailboxNotFound, QuotaExceeded
from mailgw.store.maildir import normalize_flags

if TYPE_CHECKING:
    from mailgw.imap.selected import SelectedMailbox
    from mailgw.imap.session import IMAPServer

_STORE_MODES = {"": "set", "+": "add", "-": "remove"}


def _modseq_code(session: IMAPServer) -> bytes | None:
    """``[HIGHESTMODSEQ n]`` for the tagged OK of EXPUNGE and MOVE once CONDSTORE is on
    (RFC 7162 3.1.8, 3.2.10)."""
    sel = session.selected
    if sel is None or not session.condstore:
        return None
    return wire.code_highestmodseq(sel.mailbox.highestmodseq)


def _writable(session: IMAPServer, tag: str) -> SelectedMailbox | None:
    """The selected mailbox when it may be changed; else answer ``NO [READ-ONLY]``."""
    sel = session.sel()
    if sel.readonly:
        session.no(tag, "Mailbox is read-only", wire.READ_ONLY)
        return None
    return sel


def expunge(session: IMAPServer, tag: str, command: p.Expunge) -> None:
    sel = _writable(session, tag)
    if sel is None:
        return
    only = None
    if command.uids is not None:
        only = set(sel.resolve(command.uids, True))
    expunge_deleted(session, only)
    session.ok(tag, "EXPUNGE completed", _modseq_code(session))


def store(session: IMAPServer, tag: str, command: p.Store) -> None:
    sel = _writable(session, tag)
    if sel is None:
        return
    uids = session.resolve(tag, command.sequence, command.uid)
    if uids is None:
        return
    uids = [u for u in uids if u not in sel.gone]
    modified: list[int] = []
    if command.unchanged_since is not None:
        session.enable_condstore()
        sel.mailbox.refresh()
        current = {m.uid: m for m in sel.mailbox.messages()}
        keep = []
        for u in uids:
            info = current.get(u)
            if info is not None and info.modseq > command.unchanged_since:
                modified.append(u)
            else:
                keep.append(u)
        uids = keep
    echo = not command.silent or command.unchanged_since is not None
    mode = _STORE_MODES[command.mode]
    # Without an echo the client takes its change as applied to the flags it knew: a
    # change another session made meanwhile must still reach it (a FETCH below).
    known = {} if echo or mode == "set" else {u: sel.info(u) for u in uids}
    try:
        result = sel.mailbox.set_flags(uids, command.flags, mode)
        change = normalize_flags(command.flags) if known else frozenset()
    except ValueError as e:
        session.bad(tag, str(e))
        return
    changed = []
    for uid in uids:
        info = result.get(uid)
        if info is None:
            continue
        before = known.get(uid)
        if before is not None:
            told = before.flags | change if mode == "add" else before.flags - change
            sel.update_info(info, told)
        else:
            sel.update_info(info)
        changed.append(uid)
    # A new keyword: FLAGS and PERMANENTFLAGS first (RFC 3501 7.2.6, as Dovecot).
    for line in sel.keyword_announcement():
        session.write(line)
    if echo:
        for uid in changed:
            seq = sel.seq_of(uid)
            if seq:
                session.write(sel.flags_response(seq, uid, command.uid or session.condstore))
    if modified:
        code = wire.code_modified(sel.seq_of(u) if not command.uid else u for u in modified)
        session.ok(tag, "Conditional STORE failed", code)
        return
    session.ok(tag, "STORE completed")


def open_target(store: IMessageStore, user: str, name: str) -> IMailbox:
    """Open an APPEND/COPY/MOVE target folder without loading its messages (only its
    UIDVALIDITY and the new UIDs are needed)."""
    return store.open_mailbox(user, name, snapshot=False)


def _destination(session: IMAPServer, tag: str, name: str) -> tuple[str, int] | None:
    """The store name and UIDVALIDITY of a COPY/MOVE target (``NO [TRYCREATE]`` if none)."""
    try:
        dest = open_target(session.factory.store, session.username(), name)
    except (MailboxNotFound, ValueError):
        session.no(tag, "No such mailbox", wire.TRYCREATE)
        return None
    return str(dest.name), int(dest.uidvalidity)


def _copyuid(uidvalidity: int, pairs: list[tuple[int, int]]) -> bytes | None:
    if not pairs:
        return None
    return wire.code_copyuid(uidvalidity, [a for a, _b in pairs], [b for _a, b in pairs])


def copy(session: IMAPServer, tag: str, command: p.Copy) -> None:
    sel = session.sel()
    uids = session.resolve(tag, command.sequence, command.uid)
    if uids is None:
        return
    dest = _destination(session, tag, command.mailbox)
    if dest is None:
        return
    try:
        pairs = sel.mailbox.copy_to([u for u in uids if u not in sel.gone], dest[0])
    except QuotaExceeded:
        session.no(tag, "Quota exceeded", wire.OVERQUOTA)
        return
    except MailboxNotFound:
        session.no(tag, "No such mailbox", wire.TRYCREATE)
        return
    session.ok(tag, "COPY completed", _copyuid(dest[1], pairs))


def move(session: IMAPServer, tag: str, command: p.Move) -> None:
    sel = _writable(session, tag)
    if sel is None:
        return
    uids = session.resolve(tag, command.sequence, command.uid)
    if uids is None:
        return
    dest = _destination(session, tag, command.mailbox)
    if dest is None:
        return
    uids = [u for u in uids if u not in sel.gone]
    try:
        if dest[0] == sel.name:  # into itself: copy, then expunge the originals
            pairs = sel.mailbox.copy_to(uids, dest[0])
            sel.mailbox.expunge([src for src, _new in pairs])
        else:
            pairs = sel.mailbox.move_to(uids, dest[0])
    except QuotaExceeded:
        session.no(tag, "Quota exceeded", wire.OVERQUOTA)
        return
    except MailboxNotFound:
        session.no(tag, "No such mailbox", wire.TRYCREATE)
        return
    if pairs:
        session.write(wire.untagged_status("OK", "Moved", _copyuid(dest[1], pairs)))
    session.ok(tag, "MOVE completed", _modseq_code(session))


COMMANDS = (
    Command("STORE", store, SELECTED_ONLY, expunge_ok=False),
    Command("EXPUNGE", expunge, SELECTED_ONLY),
    Command("COPY", copy, SELECTED_ONLY),
    Command("MOVE", move, SELECTED_ONLY),
)
