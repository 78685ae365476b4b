"""A session's view of its selected mailbox: sequence numbers, flags, \\Recent, untagged updates.

The store's ``Mailbox`` is a snapshot refreshed on demand; :class:`SelectedMailbox` keeps the
state the *client* has been told (which UIDs hold which sequence numbers, which flags it saw)
and turns a refresh into the untagged EXPUNGE / EXISTS / RECENT / FETCH responses that bring
the client up to date. EXPUNGE responses are held back while they are not allowed (RFC 3501
7.4.1: during FETCH, STORE and SEARCH): the expunged messages then keep their numbers. Once
QRESYNC is enabled, expunges are reported as ``VANISHED`` UID sets instead (RFC 7162 3.2.10).
It also keeps the SEARCHRES saved result (``$``, RFC 5182) as UIDs.
"""

from __future__ import annotations

import bisect
import dataclasses
from array import array
from collections.abc import Callable, Iterable, Sequence
from typing import Any

from mailgw.imap import wire
from mailgw.imap.sequence import (
    Ranges,
    SequenceSet,
    contains,
    format_uid_set,
    iter_ranges,
    merge_ranges,
    resolve,
    select_uids,
)

SYSTEM_FLAGS = ("\\Answered", "\\Flagged", "\\Deleted", "\\Seen", "\\Draft")
RECENT = "\\Recent"


class SequenceRangeError(ValueError):
    """A message sequence number beyond the mailbox's size."""


class SelectedMailbox:
    """The selected mailbox of one session.

    ``mailbox`` is a store ``Mailbox`` (``refresh``/``messages``/``uidvalidity``...);
    ``claim_recent(uids)`` returns the subset of the new ``uids`` (ascending) that are \\Recent for this
    session (the store makes sure at most one session claims each); ``readonly`` for
    EXAMINE; ``condstore`` when CONDSTORE is enabled (untagged FETCH then carry MODSEQ);
    ``qresync`` when QRESYNC is enabled (VANISHED instead of EXPUNGE).

    Memory does not follow the mailbox's size much: the session keeps the UIDs its client
    knows (an ``array('I')``) and looks messages up in the store's snapshot of the folder,
    which the sessions of a process share (``mailbox.watch``/``snapshot_info``). The
    snapshot tells this object of each change with the message's previous info, so
    ``_told`` holds what the client was told only of the messages changed since the last
    ``sync`` (None: a new message the client has not been told of). A mailbox without a
    shared snapshot gets a private copy (``_PrivateSnapshot``).
    """

    def __init__(
        self,
        mailbox: Any,
        readonly: bool,
        claim_recent: Callable[[Sequence[int]], set[int]],
        condstore: bool = False,
        qresync: bool = False,
    ) -> None:
        self.mailbox = mailbox
        self.readonly = readonly
        self.condstore = condstore or qresync
        self.qresync = qresync
        # IMAP4rev2 (RFC 9051): no \\Recent flag, no RECENT response, no [UNSEEN] on SELECT.
        self.rev2 = False
        self.saved: list[int] = []  # SEARCHRES: UIDs of the saved search result
        self._claim = claim_recent
        shared = hasattr(mailbox, "watch") and hasattr(mailbox, "snapshot")
        source = mailbox if shared else _PrivateSnapshot(mailbox)
        self._source: Any = source
        self._lookup: Callable[[int], Any] = source.snapshot_info
        snapshot = source.snapshot()
        self.uids: array[int] = snapshot.uids()[:]
        self.keywords: set[str] = set(snapshot.keywords())
        self._announce = False  # keywords added by update_info, FLAGS not sent yet
        self._told: dict[int, Any] = {}
        source.watch(self)
        self.recent: set[int] = claim_recent(self.uids)
        self._recent_told = len(self.recent)  # the last RECENT count sent
        self.highest_uid = self.uids[-1] if self.uids else 0
        self.gone: set[int] = set()  # expunged in the store, EXPUNGE not sent yet
        self._held: dict[int, Any] = {}  # their infos, as the client knows them
        # Set by the session when the store reported a change; ``sync`` always refreshes
        # (an unchanged index costs one query), so it is only cleared there.
        self.dirty = False
        # Called with each UID found expunged in the store (the session drops its cached
        # structure: ``Fetcher.forget``).
        self.on_gone: Callable[[int], None] | None = None

    @property
    def name(self) -> str:
        return str(self.mailbox.name)

    @property
    def exists(self) -> int:
        return len(self.uids)

    @property
    def infos(self) -> _InfoView:
        """The messages as the client knows them, by UID (``get``, ``in``, ``[]``)."""
        return _InfoView(self)

    def info(self, uid: int) -> Any | None:
        """``uid``'s MessageInfo as the client was last told (its flags, modseq), None when
        the client does not know the UID."""
        told = self._told
        if uid in told:
            return told[uid]
        if uid > self.highest_uid:
            return None
        held = self._held.get(uid)
        return held if held is not None else self._lookup(uid)

    def known(self, uids: list[int]) -> tuple[Sequence[int], list[int], list[Any]]:
        """The sequence numbers, UIDs and infos (as the client knows them) of those of
        ``uids`` (as ``resolve`` gives them) the client knows, as ``seq_of`` and ``info``
        give them now, in three parallel sequences (no object per message): a run of
        consecutive messages the client was told all of costs no call per message."""
        if not uids:
            return [], [], []
        told = self._told
        held = self._held
        infos = self._source.snapshot().infos
        numbers = self.uids
        lo = bisect.bisect_left(numbers, uids[0])
        hi = lo + len(uids)
        if hi <= len(numbers) and numbers[hi - 1] == uids[-1] and numbers[lo:hi].tolist() == uids:
            if not told and not held:
                found = list(map(infos.get, uids))
                if all(found):
                    return range(lo + 1, hi + 1), uids, found
            seqs: Iterable[int] = range(lo + 1, hi + 1)
        else:
            seqs = map(self.seq_of, uids)
        out_seqs: list[int] = []
        out_uids: list[int] = []
        out_infos: list[Any] = []
        for seq, uid in zip(seqs, uids, strict=True):
            if not seq:
                continue
            if uid in told:
                info = told[uid]
            else:
                info = held.get(uid) if held else None
                if info is None:
                    info = infos.get(uid)
            if info is not None:
                out_seqs.append(seq)
                out_uids.append(uid)
                out_infos.append(info)
        return out_seqs, out_uids, out_infos

    @staticmethod
    def _keywords(infos: Iterable[Any]) -> set[str]:
        out: set[str] = set()
        for info in infos:
            out.update(f for f in info.flags if not f.startswith("\\"))
        return out

    # -- the shared snapshot's reports (under the store's lock: no store calls here) -------

    def snapshot_changed(self, uid: int, old: Any | None) -> None:
        """The snapshot added (``old`` None), changed or removed message ``uid``."""
        if uid not in self._told and (old is None or uid <= self.highest_uid):
            self._told[uid] = old

    def snapshot_reloaded(self, old: dict[int, Any]) -> None:
        """The snapshot was reloaded whole: remember what changed for the client."""
        known = set(self.uids)
        for uid in self.uids:
            before = old.get(uid)
            if uid not in self._told and before is not None and before != self._lookup(uid):
                self._told[uid] = before
        for info in self._source.messages():
            if info.uid not in known:
                self._told.setdefault(info.uid, None)

    # -- numbers -------------------------------------------------------------------------------

    def seq_of(self, uid: int) -> int:
        """The sequence number of ``uid`` (0 when not in the mailbox)."""
        i = bisect.bisect_left(self.uids, uid)
        return i + 1 if i < len(self.uids) and self.uids[i] == uid else 0

    def saved_ranges(self, uid: bool) -> Ranges:
        """The saved search result (``$``) as UID ranges, or sequence-number ranges; its
        expunged messages are no longer part of it."""
        if uid:
            return merge_ranges((u, u) for u in self.saved if self.seq_of(u))
        return merge_ranges((n, n) for n in map(self.seq_of, self.saved) if n)

    def resolve(self, seqset: SequenceSet, uid: bool) -> list[int]:
        """The UIDs a sequence set (or, with ``uid``, a UID set) names, ascending.
        SequenceRangeError when a message sequence number is beyond EXISTS."""
        saved = self.saved_ranges(uid) if seqset.saved else None
        if uid:
            return select_uids(seqset, self.uids, saved)
        if seqset.largest_number() > len(self.uids):
            raise SequenceRangeError("Message sequence number out of range")
        return [self.uids[n - 1] for n in iter_ranges(resolve(seqset, len(self.uids), saved))]

    def flags_of(self, uid: int) -> list[str]:
        info = self.info(uid)
        flags = sorted(info.flags, key=flag_order) if info is not None else []
        if uid in self.recent and not self.rev2:
            flags.append(RECENT)
        return flags

    def all_flags(self) -> list[str]:
        return list(SYSTEM_FLAGS) + sorted(self.keywords)

    def update_info(self, info: Any, told: frozenset[str] | None = None) -> None:
        """Record flags the session itself changed (and reported). ``told``: the flags the
        client was left believing instead (STORE .SILENT: its change applied to the flags it
        knew); when another session changed others meanwhile, the next ``sync`` reports
        them."""
        uid = info.uid
        if uid in self._held or not self.seq_of(uid):
            return  # (the store changes no message it no longer has)
        if told is not None and told != info.flags:
            info = dataclasses.replace(info, flags=told)
        self._told[uid] = info
        new = {f for f in info.flags if not f.startswith("\\")} - self.keywords
        if new:
            self.keywords |= new
            self._announce = True

    def keyword_announcement(self) -> list[bytes]:
        """``* FLAGS`` and ``* OK [PERMANENTFLAGS]`` when :meth:`update_info` added keywords
        the client was not told of: send them before the FETCH that shows them (RFC 3501
        7.2.6, as Dovecot)."""
        if not self._announce:
            return []
        self._announce = False
        return self.flags_responses()

    def flags_responses(self) -> list[bytes]:
        """The mailbox's ``* FLAGS`` and ``* OK [PERMANENTFLAGS ...]`` responses."""
        if self.readonly:
            permanent = wire.untagged_status("OK", "Read-only mailbox", b"PERMANENTFLAGS ()")
        else:
            code = wire.code_permanentflags(self.all_flags(), True)
            permanent = wire.untagged_status("OK", "Flags permitted", code)
        return [wire.untagged(b"FLAGS", wire.flag_list(self.all_flags())), permanent]

    # -- updates -------------------------------------------------------------------------------

    def sync(self, allow_expunge: bool, uid_fetch: bool = False) -> list[bytes]:
        """Refresh from the store and return the untagged responses telling the client what
        changed. ``allow_expunge`` false keeps expunged messages numbered (and remembered);
        ``uid_fetch`` (a UID command) puts the UID in the flag updates."""
        self._source.refresh()
        self.dirty = False
        if not self._told and not (allow_expunge and self.gone):
            return []
        new: list[int] = []
        changed: list[tuple[int, Any, Any]] = []
        told = self._told
        for uid in sorted(told):
            before = told[uid]
            now = self._lookup(uid)
            if before is None:
                if now is None:
                    del told[uid]  # came and went unseen
                elif uid > self.highest_uid:
                    new.append(uid)
                    del told[uid]
                continue  # (an older UID turning up late stays unknown to the client)
            del told[uid]
            if now is None:
                if self.on_gone is not None:
                    self.on_gone(uid)
                if self.seq_of(uid):
                    self.gone.add(uid)
                    self._held[uid] = before
            else:
                changed.append((uid, before, now))
        out: list[bytes] = []
        recent_gone = False
        if allow_expunge and self.gone:
            if self.qresync:
                out.append(wire.untagged(b"VANISHED", format_uid_set(sorted(self.gone))))
            else:
                for seq in range(len(self.uids), 0, -1):
                    if self.uids[seq - 1] in self.gone:
                        out.append(wire.untagged(b"%d EXPUNGE" % seq))
            self.uids = array("I", (u for u in self.uids if u not in self.gone))
            for uid in self.gone:
                if uid in self.recent:
                    self.recent.discard(uid)
                    recent_gone = True
            self.gone = set()
            self._held = {}
        current = [now for _uid, _before, now in changed]
        current.extend(self._lookup(uid) for uid in new)
        new_keywords = self._keywords(current) - self.keywords
        if new_keywords or self._announce:
            self.keywords |= new_keywords
            self._announce = False
            out.extend(self.flags_responses())
        if new:
            self.uids.extend(new)
            self.highest_uid = new[-1]
            self.recent |= self._claim(new)
            out.append(wire.untagged(b"%d EXISTS" % len(self.uids)))
        if not self.rev2 and (recent_gone or len(self.recent) != self._recent_told):
            # Only when the count changed (new messages another session claimed change
            # nothing), as Dovecot; always after a recent message was expunged, so a client
            # that counts it out itself and one that does not both end up right.
            self._recent_told = len(self.recent)
            out.append(wire.untagged(b"%d RECENT" % len(self.recent)))
        for uid, before, now in changed:
            if now.flags != before.flags or (self.condstore and now.modseq != before.modseq):
                seq = self.seq_of(uid)
                if seq:
                    out.append(self.flags_response(seq, uid, uid_fetch or self.condstore))
        return out

    def flags_response(self, seq: int, uid: int, with_uid: bool) -> bytes:
        """``* seq FETCH (FLAGS (...) [UID n] [MODSEQ (m)])``."""
        items = [b"FLAGS " + wire.flag_list(self.flags_of(uid))]
        if with_uid:
            items.append(b"UID %d" % uid)
        info = self.info(uid)
        if self.condstore and info is not None:
            items.append(b"MODSEQ (%d)" % info.modseq)
        return wire.untagged(b"%d FETCH" % seq, wire.plist(items))

    def resync(self, qresync: Any) -> list[bytes]:
        """QRESYNC SELECT (RFC 7162 3.2.5): when the client's UIDVALIDITY is current,
        ``VANISHED (EARLIER)`` for messages expunged since its mod-sequence and a FETCH of
        the flags of those changed since, limited to its known UIDs when it sent them."""
        if qresync.uidvalidity != int(self.mailbox.uidvalidity):
            return []
        top = max(int(self.mailbox.uidnext) - 1, 1)
        known = resolve(qresync.known_uids, top) if qresync.known_uids is not None else None
        _changed, vanished = self.mailbox.changes_since(qresync.modseq)
        gone = [
            u for u in vanished if self.info(u) is None and (known is None or contains(known, u))
        ]
        out = []
        if gone:
            out.append(wire.untagged(b"VANISHED (EARLIER)", format_uid_set(gone)))
        for seq, uid in enumerate(self.uids, 1):
            info = self.info(uid)
            if (
                info is not None
                and info.modseq > qresync.modseq
                and (known is None or contains(known, uid))
            ):
                out.append(self.flags_response(seq, uid, True))
        return out

    def vanished_earlier(self, seqset: SequenceSet, modseq: int) -> bytes | None:
        """``* VANISHED (EARLIER)`` of the UIDs in ``seqset`` expunged since ``modseq``
        (UID FETCH ... (CHANGEDSINCE n VANISHED)), None when there are none."""
        top = max(int(self.mailbox.uidnext) - 1, 1)
        ranges = resolve(seqset, top, self.saved_ranges(True) if seqset.saved else None)
        _changed, vanished = self.mailbox.changes_since(modseq)
        gone = [u for u in vanished if self.info(u) is None and contains(ranges, u)]
        if not gone:
            return None
        return wire.untagged(b"VANISHED (EARLIER)", format_uid_set(gone))

    def select_responses(self) -> list[bytes]:
        """The untagged responses of SELECT/EXAMINE (before the tagged OK)."""
        out = self.flags_responses()
        out.append(wire.untagged(b"%d EXISTS" % len(self.uids)))
        if not self.rev2:
            out.append(wire.untagged(b"%d RECENT" % len(self.recent)))
        seq = 0 if self.rev2 else self._first_unseen()
        if seq:
            out.append(wire.untagged_status("OK", "First unseen", wire.code_unseen(seq)))
        out.append(
            wire.untagged_status(
                "OK", "UIDs valid", wire.code_uidvalidity(self.mailbox.uidvalidity)
            )
        )
        out.append(
            wire.untagged_status(
                "OK", "Predicted next UID", wire.code_uidnext(self.mailbox.uidnext)
            )
        )
        out.append(
            wire.untagged_status(
                "OK", "Highest", wire.code_highestmodseq(self.mailbox.highestmodseq)
            )
        )
        return out

    def _first_unseen(self) -> int:
        """The sequence number of the first message without \\Seen the client knows, 0
        when there is none."""
        if not self._told and not self._held:
            # The client knows the snapshot as it is: ask it (computed once per change).
            uid = self._source.snapshot().first_unseen()
            return self.seq_of(uid) if uid else 0
        for seq, uid in enumerate(self.uids, 1):
            info = self.info(uid)
            if info is not None and "\\Seen" not in info.flags:
                return seq
        return 0


class _InfoView:
    """``SelectedMailbox.infos``: a read-only mapping UID -> MessageInfo as the client knows
    the message (the fetch, search and sort code read it)."""

    __slots__ = ("_sel",)

    def __init__(self, selected: SelectedMailbox) -> None:
        self._sel = selected

    def get(self, uid: int, default: Any = None) -> Any:
        info = self._sel.info(uid)
        return default if info is None else info

    def __contains__(self, uid: object) -> bool:
        return isinstance(uid, int) and self._sel.info(uid) is not None

    def __getitem__(self, uid: int) -> Any:
        info = self._sel.info(uid)
        if info is None:
            raise KeyError(uid)
        return info


class _PrivateSnapshot:
    """The shared-snapshot protocol (``watch``, ``snapshot_info``, ``messages``, ``refresh``)
    for a mailbox without it: a private copy of its messages, compared on each refresh."""

    def __init__(self, mailbox: Any) -> None:
        self.mailbox = mailbox
        self.infos: dict[int, Any] = {m.uid: m for m in sorted(mailbox.messages(), key=_uid)}
        self.watchers: list[SelectedMailbox] = []

    def snapshot(self) -> _PrivateSnapshot:
        """Itself: ``infos`` (by UID, ascending), ``uids()``, ``keywords()``,
        ``first_unseen()`` as the store's shared snapshot has them."""
        return self

    def uids(self) -> array[int]:
        return array("I", self.infos)

    def keywords(self) -> frozenset[str]:
        return frozenset(SelectedMailbox._keywords(self.infos.values()))

    def first_unseen(self) -> int:
        return next((u for u, i in self.infos.items() if "\\Seen" not in i.flags), 0)

    def watch(self, watcher: SelectedMailbox) -> None:
        self.watchers.append(watcher)

    def snapshot_info(self, uid: int) -> Any | None:
        return self.infos.get(uid)

    def messages(self) -> list[Any]:
        return list(self.infos.values())

    def refresh(self) -> None:
        self.mailbox.refresh()
        old = self.infos
        self.infos = {m.uid: m for m in sorted(self.mailbox.messages(), key=_uid)}
        for watcher in self.watchers:
            for uid, before in old.items():
                if self.infos.get(uid) != before:
                    watcher.snapshot_changed(uid, before)
            for uid in self.infos.keys() - old.keys():
                watcher.snapshot_changed(uid, None)


def _uid(info: Any) -> int:
    return int(info.uid)


def flag_order(flag: str) -> tuple[int, str]:
    """The sort key of the flags in a FLAGS list: the system flags in their order, then the
    keywords by name."""
    try:
        return (SYSTEM_FLAGS.index(flag), "")
    except ValueError:
        return (len(SYSTEM_FLAGS), flag)
