"""FETCH and UID FETCH (RFC 3501 6.4.5, RFC 3516 BINARY, RFC 7162 CHANGEDSINCE / VANISHED):
the responses are written as the client reads them (``IMAPServer.stream``)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING

from twisted.python.failure import Failure

from mailgw.imap import parser as p
from mailgw.imap import wire
from mailgw.imap.commands.registry import Command
from mailgw.imap.fetch import fetch_responses, flag_responses, flags_only, sets_seen
from mailgw.imap.states import SELECTED_ONLY

if TYPE_CHECKING:
    from mailgw.imap.session import IMAPServer


def fetch(session: IMAPServer, tag: str, command: p.Fetch) -> None:
    sel = session.sel()
    fetcher = session.fetcher
    assert fetcher is not None
    if command.vanished and not session.qresync:
        session.bad(tag, "VANISHED needs ENABLE QRESYNC")
        return
    uids = session.resolve(tag, command.sequence, command.uid)
    if uids is None:
        return
    changed_since = command.changed_since
    if changed_since is not None or any(i.name == "MODSEQ" for i in command.items):
        session.enable_condstore()
    if changed_since is not None:
        _seqs, known, infos = sel.known(uids)
        uids = [u for u, i in zip(known, infos, strict=True) if i.modseq > changed_since]
    if command.vanished and changed_since is not None:
        line = sel.vanished_earlier(command.sequence, changed_since)
        if line is not None:
            session.write(line)
    flags_changed: set[int] = set()
    if sets_seen(command.items) and not sel.readonly:
        unseen = [u for u in uids if u in sel.infos and "\\Seen" not in sel.infos[u].flags]
        if unseen:
            for info in sel.mailbox.set_flags(unseen, ["\\Seen"], "add").values():
                sel.update_info(info)
                flags_changed.add(info.uid)
    gone: list[int] = []
    undecodable: list[int] = []
    with_modseq = session.condstore and (changed_since is not None or bool(flags_changed))
    chunks: Iterator[bytes]
    if flags_only(command.items) and not flags_changed:
        chunks = flag_responses(sel, uids, command.items, command.uid, with_modseq)
    else:
        chunks = fetch_responses(
            fetcher,
            uids,
            command.items,
            command.uid,
            flags_changed,
            with_modseq,
            gone,
            undecodable,
        )

    def finished(error: Failure | None) -> None:
        if error is not None:
            session.internal_error(error, tag)
        elif undecodable:
            session.no(tag, "Unknown Content-Transfer-Encoding", wire.UNKNOWN_CTE)
        elif gone:
            session.no(tag, "Some messages were expunged", wire.EXPUNGEISSUED)
        else:
            session.ok(tag, "FETCH completed")
        session.done()

    session.stream(chunks, finished)


COMMANDS = (Command("FETCH", fetch, SELECTED_ONLY, expunge_ok=False),)
