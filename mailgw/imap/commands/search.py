"""SEARCH, SORT, THREAD, CANCELUPDATE (RFC 3501 6.4.4, RFC 5256, RFC 4731 ESEARCH, RFC 5267
ESORT / CONTEXT, RFC 5182 SEARCHRES, RFC 9394 PARTIAL), and the live search contexts the
session core re-evaluates when the mailbox changes (:func:`context_updates`).

SEARCH, SORT and THREAD are generators: the core runs them in slices (``_run_in_slices``).
"""

from __future__ import annotations

from collections.abc import Callable, Generator
from typing import TYPE_CHECKING

from mailgw.imap import parser as p
from mailgw.imap import wire
from mailgw.imap.commands.registry import Command
from mailgw.imap.contexts import MAX_CONTEXTS, SearchContext, esearch_line, update_lines
from mailgw.imap.fetch import MessageGone
from mailgw.imap.search import Searcher
from mailgw.imap.sortthread import (
    SortMessage,
    Steps,
    format_threads,
    run_steps,
    sort_messages,
    sort_messages_steps,
    thread_orderedsubject_steps,
    thread_references_steps,
)
from mailgw.imap.states import SELECTED_ONLY

if TYPE_CHECKING:
    from mailgw.imap.session import IMAPServer

Criteria = tuple[tuple[str, bool], ...]


def _search(session: IMAPServer, key: p.SearchKey) -> list[int]:
    fetcher = session.fetcher
    assert fetcher is not None
    return Searcher(fetcher, session.factory.reactor.seconds).search(key)


def _search_steps(session: IMAPServer, key: p.SearchKey) -> Generator[None, None, list[int]]:
    """:func:`_search` yielding after each message read."""
    fetcher = session.fetcher
    assert fetcher is not None
    return (yield from Searcher(fetcher, session.factory.reactor.seconds).search_steps(key))


def _uses_modseq(key: p.SearchKey) -> bool:
    if isinstance(key, p.ModSeqKey):
        return True
    if isinstance(key, p.And):
        return any(_uses_modseq(k) for k in key.keys)
    if isinstance(key, p.Or):
        return _uses_modseq(key.left) or _uses_modseq(key.right)
    if isinstance(key, p.Not):
        return _uses_modseq(key.key)
    return False


def _modseq_of(session: IMAPServer, key: p.SearchKey, found: list[int]) -> int | None:
    """The highest MODSEQ of the result when the criteria use MODSEQ (RFC 7162 3.1.5)."""
    if not found or not _uses_modseq(key):
        return None
    infos = session.sel().infos
    return int(max(infos[u].modseq for u in found))


def search(session: IMAPServer, tag: str, command: p.Search) -> Generator[None, None, None]:
    if _uses_modseq(command.key):
        session.enable_condstore()
    found = yield from _search_steps(session, command.key)
    returns = command.returns
    if returns is None and session.rev2:
        returns = ("ALL",)  # IMAP4rev2 answers with ESEARCH only (RFC 9051 6.4.4)
    _results(session, tag, command.key, command.uid, returns, command.partial, found, None)
    session.ok(tag, "SEARCH completed")


def _saves(raw: p.Command) -> bool:
    """Whether a (malformed) SEARCH command asked for RETURN (SAVE)."""
    args = raw.args
    if len(args) < 2 or not isinstance(args[0], p.Atom) or args[0].text.upper() != "RETURN":
        return False
    options = args[1]
    return isinstance(options, p.PList) and any(
        isinstance(o, p.Atom) and o.text.upper() == "SAVE" for o in options.items
    )


def search_rejected(session: IMAPServer, raw: p.Command, error: p.CommandError) -> None:
    """A failed SEARCH RETURN (SAVE) empties ``$`` (RFC 5182)."""
    if session.selected is not None and _saves(raw):
        session.selected.saved = []


def _numbers_line(name: bytes, numbers: list[int], modseq: int | None) -> bytes:
    """``* SEARCH 1 2 3 (MODSEQ n)`` / ``* SORT ...``."""
    line = b"* " + name
    if numbers:
        line += b" " + " ".join(map(str, numbers)).encode("ascii")
    if modseq is not None:
        line += b" (MODSEQ %d)" % modseq
    return line + b"\r\n"


def _results(
    session: IMAPServer,
    tag: str,
    key: p.SearchKey,
    uid: bool,
    returns: tuple[str, ...] | None,
    partial: tuple[int, int] | None,
    found: list[int],
    criteria: Criteria | None,
) -> None:
    """Send the result of a SEARCH (``criteria`` None; ``found`` ascending) or SORT
    (``found`` in sorted order): ``* SEARCH`` / ``* SORT``, or with RETURN options an
    ``* ESEARCH`` (RFC 4731, RFC 5267); SAVE (RFC 5182) and UPDATE (a live context)."""
    sel = session.sel()
    numbers = found if uid else [sel.seq_of(u) for u in found]
    modseq = _modseq_of(session, key, found)
    if returns is None:
        session.write(_numbers_line(b"SEARCH" if criteria is None else b"SORT", numbers, modseq))
        return
    if "SAVE" in returns:
        # RFC 5182 2.4: with MIN and/or MAX but neither ALL nor COUNT, save only those.
        saved = found
        if not ("ALL" in returns or "COUNT" in returns) and ("MIN" in returns or "MAX" in returns):
            picks = set()
            if found and "MIN" in returns:
                picks.add(found[0])
            if found and "MAX" in returns:
                picks.add(found[-1])
            saved = list(picks)
        sel.saved = sorted(saved)
        returns = tuple(r for r in returns if r != "SAVE")
    if "UPDATE" in returns:
        _add_context(session, SearchContext(tag, key, uid, criteria, list(found)))
    if not returns:
        return  # only SAVE: no ESEARCH response (RFC 5182 2.1)
    if modseq is not None and not ("ALL" in returns or "COUNT" in returns):
        # RFC 7162 3.1.5: the highest MODSEQ of the messages returned, here MIN/MAX.
        picked = [found[0]] if "MIN" in returns else []
        picked += [found[-1]] if "MAX" in returns else []
        modseq = max((sel.infos[u].modseq for u in picked), default=modseq)
    session.write(esearch_line(tag, uid, returns, numbers, modseq, partial))


def _add_context(session: IMAPServer, context: SearchContext) -> None:
    if context.tag not in session.contexts and len(session.contexts) >= MAX_CONTEXTS:
        code = b"NOUPDATE " + wire.quote(context.tag)
        session.write(wire.untagged_status("NO", "Too many search contexts", code))
        return
    context.mark = _context_mark(session)
    session.contexts[context.tag] = context


def cancelupdate(session: IMAPServer, tag: str, command: p.CancelUpdate) -> None:
    unknown = [t for t in command.tags if t not in session.contexts]
    for t in command.tags:
        session.contexts.pop(t, None)
    if unknown:
        session.no(tag, "Unknown tag")
        return
    session.ok(tag, "Updates cancelled")


def _sort_messages(
    session: IMAPServer, uids: list[int], need_headers: bool, uid: bool
) -> Generator[None, None, list[SortMessage]]:
    """The messages SORT and THREAD order, yielding after each one whose headers were
    read."""
    sel = session.sel()
    fetcher = session.fetcher
    assert fetcher is not None
    out = []
    for u in uids:
        info = sel.infos.get(u)
        seq = sel.seq_of(u)
        if info is None or not seq:
            continue
        structure = None
        if need_headers:
            try:
                structure = fetcher.load(u, False, True)[1]
            except MessageGone:
                continue
            yield
        out.append(SortMessage(seq, u if uid else seq, info.size, info.internaldate, structure))
    return out


def sort(session: IMAPServer, tag: str, command: p.Sort) -> Generator[None, None, None]:
    if _uses_modseq(command.key):
        session.enable_condstore()
    found = yield from _search_steps(session, command.key)
    need = any(name not in ("ARRIVAL", "SIZE") for name, _rev in command.criteria)
    messages = yield from _sort_messages(session, found, need, True)
    ordered = yield from sort_messages_steps(messages, command.criteria, Steps())
    _results(
        session,
        tag,
        command.key,
        command.uid,
        command.returns,
        command.partial,
        [m.number for m in ordered],
        command.criteria,
    )
    session.ok(tag, "SORT completed")


def thread(session: IMAPServer, tag: str, command: p.Thread) -> Generator[None, None, None]:
    found = yield from _search_steps(session, command.key)
    messages = yield from _sort_messages(session, found, True, command.uid)
    if command.algorithm == "REFERENCES":
        roots = yield from thread_references_steps(messages, steps=Steps())
    else:
        roots = yield from thread_orderedsubject_steps(messages, Steps())
    threads = format_threads(roots)
    session.write(b"* THREAD " + threads + b"\r\n" if threads else b"* THREAD\r\n")
    session.ok(tag, "THREAD completed")


# -- live contexts (RFC 5267 4) --------------------------------------------------------------


def context_updates(
    session: IMAPServer, numbering: list[int] | None
) -> tuple[list[bytes], list[bytes]]:
    """The updates of the live search contexts whose mailbox state changed since they were
    last evaluated: the REMOVEFROM lines of expunged messages (numbered as before this
    update, ``numbering`` the UIDs then: they go before its EXPUNGE responses) and the
    lines of the other changes (numbered as after it)."""
    sel = session.sel()
    mark = _context_mark(session)
    old_seq: Callable[[int], int] = sel.seq_of
    if numbering is not None:
        positions = {u: n for n, u in enumerate(numbering, 1)}
        old_seq = positions.__getitem__
    before: list[bytes] = []
    after: list[bytes] = []

    def exists(uid: int) -> bool:
        return bool(sel.seq_of(uid))

    for context in session.contexts.values():
        if context.mark == mark:
            continue
        context.mark = mark
        now = _evaluate(session, context)
        if context.uid:
            first, then = update_lines(context, now, exists, _identity, _identity)
        else:
            first, then = update_lines(context, now, exists, old_seq, sel.seq_of)
        before += [first] if first is not None else []
        after += [then] if then is not None else []
    return before, after


def _context_mark(session: IMAPServer) -> tuple[int, int, int]:
    """What a context's result can depend on, cheaply: flag changes and expunges raise the
    mailbox's HIGHESTMODSEQ, new messages the count and the last UID."""
    sel = session.sel()
    return (int(sel.mailbox.highestmodseq), len(sel.uids), sel.uids[-1] if sel.uids else 0)


def _evaluate(session: IMAPServer, context: SearchContext) -> list[int]:
    """The current result of a live context, as UIDs in result order."""
    found = _search(session, context.key)
    if context.criteria is None:
        return found
    need = any(name not in ("ARRIVAL", "SIZE") for name, _rev in context.criteria)
    messages = run_steps(_sort_messages(session, found, need, True))
    return [m.number for m in sort_messages(messages, context.criteria)]


def _identity(n: int) -> int:
    return n


COMMANDS = (
    Command("SEARCH", search, SELECTED_ONLY, expunge_ok=False, rejected=search_rejected),
    Command("SORT", sort, SELECTED_ONLY, expunge_ok=False),
    Command("THREAD", thread, SELECTED_ONLY, expunge_ok=False),
    Command("CANCELUPDATE", cancelupdate, SELECTED_ONLY),
)
