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
from collections.abc import Callable, Iterable
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
    ``claim_recent(uids)`` returns the subset of the new ``uids`` that are \\Recent for this
    session (the factory makes sure at most one session claims each); ``readonly`` for
    EXAMINE; ``condstore`` when CONDSTORE is enabled (untagged FETCH then carry MODSEQ);
    ``qresync`` when QRESYNC is enabled (VANISHED instead of EXPUNGE).
    """

    def __init__(
        self,
        mailbox: Any,
        readonly: bool,
        claim_recent: Callable[[list[int]], set[int]],
        condstore: bool = False,
        qresync: bool = False,
    ) -> None:
        self.mailbox = mailbox
        self.readonly = readonly
        self.condstore = condstore or qresync
        self.qresync = qresync
        self.saved: list[int] = []  # SEARCHRES: UIDs of the saved search result
        self._claim = claim_recent
        self.infos: dict[int, Any] = {m.uid: m for m in mailbox.messages()}
        self.uids: list[int] = sorted(self.infos)
        self.recent: set[int] = claim_recent(list(self.uids))
        self.keywords: set[str] = self._keywords(self.infos.values())
        self.highest_uid = self.uids[-1] if self.uids else 0
        self.gone: set[int] = set()  # expunged in the store, EXPUNGE not sent yet
        self._state = (mailbox.uidnext, mailbox.highestmodseq)
        self.dirty = False

    @property
    def name(self) -> str:
        return str(self.mailbox.name)

    @property
    def exists(self) -> int:
        return len(self.uids)

    @staticmethod
    def _keywords(infos: Iterable[Any]) -> set[str]:
        out: set[str] = set()
        for info in infos:
            out.update(f for f in info.flags if not f.startswith("\\"))
        return out

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
        info = self.infos.get(uid)
        flags = sorted(info.flags, key=_flag_order) if info is not None else []
        if uid in self.recent:
            flags.append(RECENT)
        return flags

    def all_flags(self) -> list[str]:
        return list(SYSTEM_FLAGS) + sorted(self.keywords)

    def update_info(self, info: Any) -> None:
        """Record flags the session itself changed (and reported)."""
        if info.uid in self.infos:
            self.infos[info.uid] = info
            self.keywords.update(f for f in info.flags if not f.startswith("\\"))

    # -- updates -------------------------------------------------------------------------------

    def sync(self, allow_expunge: bool, uid_fetch: bool = False) -> list[bytes]:
        """Refresh from the store and return the untagged responses telling the client what
        changed. ``allow_expunge`` false keeps expunged messages numbered (and remembered)."""
        self.mailbox.refresh()
        state = (self.mailbox.uidnext, self.mailbox.highestmodseq)
        if state == self._state and not self.dirty and not (allow_expunge and self.gone):
            return []
        gone, new, current = self._differences(state)
        self.dirty = False
        out: list[bytes] = []
        self.gone |= gone
        if allow_expunge and self.gone:
            if self.qresync:
                out.append(wire.untagged(b"VANISHED", format_uid_set(sorted(self.gone))))
            else:
                for seq in range(len(self.uids), 0, -1):
                    uid = self.uids[seq - 1]
                    if uid in self.gone:
                        out.append(wire.untagged(b"%d EXPUNGE" % seq))
            self.uids = [u for u in self.uids if u not in self.gone]
            for uid in self.gone:
                self.infos.pop(uid, None)
                self.recent.discard(uid)
            self.gone = set()
        new_keywords = self._keywords(current.values()) - self.keywords
        if new_keywords:
            self.keywords |= new_keywords
            out.append(wire.untagged(b"FLAGS", wire.flag_list(self.all_flags())))
        if new:
            self.uids.extend(new)
            for uid in new:
                self.infos[uid] = current[uid]
            self.highest_uid = new[-1]
            claimed = self._claim(new)
            self.recent |= claimed
            out.append(wire.untagged(b"%d EXISTS" % len(self.uids)))
            out.append(wire.untagged(b"%d RECENT" % len(self.recent)))
        fresh = set(new)
        for uid, now in current.items():
            before = self.infos.get(uid)
            if before is None or uid in fresh:
                continue
            if now.flags != before.flags or (self.condstore and now.modseq != before.modseq):
                seq = self.seq_of(uid)
                if seq:
                    self.infos[uid] = now
                    out.append(self.flags_response(seq, uid, uid_fetch or self.condstore))
        self._state = state
        return out

    def _differences(self, state: tuple[int, int]) -> tuple[set[int], list[int], dict[int, Any]]:
        """(UIDs newly gone from the store, new UIDs ascending, the store's current info
        of every UID that may have changed, in UID order) between what the client was told
        and the mailbox's snapshot."""
        fast = None if self.dirty else self._changed_only()
        if fast is not None:
            return fast
        current = {m.uid: m for m in self.mailbox.messages()}
        gone = {u for u in self.uids if u not in current}
        new = [u for u in sorted(current) if u > self.highest_uid]
        return gone, new, current

    def _changed_only(self) -> tuple[set[int], list[int], dict[int, Any]] | None:
        """``_differences`` from the index's changes since the last sync (rows with a
        higher modseq, tombstones) looked up in the snapshot, so the work follows the size
        of the change, not of the mailbox; None when the mailbox cannot tell (a store
        without ``snapshot_info``) or the result does not add up to the snapshot's size."""
        lookup = getattr(self.mailbox, "snapshot_info", None)
        if lookup is None:
            return None
        changed, vanished = self.mailbox.changes_since(self._state[1])
        gone: set[int] = set()
        new: list[int] = []
        current: dict[int, Any] = {}
        for uid in sorted({info.uid for info in changed}.union(vanished)):
            info = lookup(uid)
            if info is None:
                if uid in self.infos:
                    gone.add(uid)
                continue
            current[uid] = info
            if uid > self.highest_uid:
                new.append(uid)
        if len(self.uids) - len(self.gone | gone) + len(new) != self.mailbox.snapshot_count():
            return None
        return gone, new, current

    def flags_response(self, seq: int, uid: int, with_uid: bool) -> bytes:
        """``* seq FETCH (FLAGS (...) [UID n] [MODSEQ (m)])``."""
        items = [b"FLAGS " + wire.flag_list(self.flags_of(uid))]
        if with_uid:
            items.append(b"UID %d" % uid)
        info = self.infos.get(uid)
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
            u for u in vanished if u not in self.infos and (known is None or contains(known, u))
        ]
        out = []
        if gone:
            out.append(wire.untagged(b"VANISHED (EARLIER)", format_uid_set(gone)))
        for seq, uid in enumerate(self.uids, 1):
            if self.infos[uid].modseq > qresync.modseq and (known is None or contains(known, uid)):
                out.append(self.flags_response(seq, uid, True))
        return out

    def vanished_earlier(self, seqset: SequenceSet, modseq: int) -> bytes | None:
        """``* VANISHED (EARLIER)`` of the UIDs in ``seqset`` expunged since ``modseq``
        (UID FETCH ... (CHANGEDSINCE n VANISHED)), None when there are none."""
        top = max(int(self.mailbox.uidnext) - 1, 1)
        ranges = resolve(seqset, top, self.saved_ranges(True) if seqset.saved else None)
        _changed, vanished = self.mailbox.changes_since(modseq)
        gone = [u for u in vanished if u not in self.infos and contains(ranges, u)]
        if not gone:
            return None
        return wire.untagged(b"VANISHED (EARLIER)", format_uid_set(gone))

    def select_responses(self) -> list[bytes]:
        """The untagged responses of SELECT/EXAMINE (before the tagged OK)."""
        out = [
            wire.untagged(b"FLAGS", wire.flag_list(self.all_flags())),
            wire.untagged_status(
                "OK",
                "Flags permitted" if not self.readonly else "Read-only mailbox",
                wire.code_permanentflags(self.all_flags() if not self.readonly else [], True)
                if not self.readonly
                else b"PERMANENTFLAGS ()",
            ),
            wire.untagged(b"%d EXISTS" % len(self.uids)),
            wire.untagged(b"%d RECENT" % len(self.recent)),
        ]
        for seq, uid in enumerate(self.uids, 1):
            if "\\Seen" not in self.infos[uid].flags:
                out.append(wire.untagged_status("OK", "First unseen", wire.code_unseen(seq)))
                break
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


def _flag_order(flag: str) -> tuple[int, str]:
    try:
        return (SYSTEM_FLAGS.index(flag), "")
    except ValueError:
        return (len(SYSTEM_FLAGS), flag)
