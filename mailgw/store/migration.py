"""Tier-1 -> tier-2 migration: policy, a bounded-rate background service, verify/gc/stats.

The policy picks tier-1 messages older than ``migrate_after``, or in one of
``migrate_folders``, of at least ``migrate_min_size`` bytes; when tier 1 is above its high
watermark it also takes the oldest messages until it is back under the low watermark. Each
move is ``MessageStore.migrate_message`` (blob fsynced, index switched, file unlinked), so a
crash at any point is finished by the next run with no loss and no duplicate.
"""

from __future__ import annotations

import heapq
import os
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

from twisted.application import service
from twisted.internet.defer import Deferred
from twisted.logger import Logger

from mailgw.interfaces import MailboxNotFound
from mailgw.store.blobs import BlobError, FileBlobStore, ref_parts, split_ref
from mailgw.store.facade import MessageStore

log = Logger()

# Blobs younger than this are never collected: a migration may have stored one and not yet
# switched its index row (put() refreshes the mtime of a blob it reuses).
GC_GRACE = 3600.0


def parse_watermark(text: str) -> tuple[str, float] | None:
    """``""`` -> None (off); ``80%`` -> ("percent", 0.8) of the tier-1 filesystem used;
    ``500G`` -> ("bytes", 536870912000.0) of tier-1 messages. ValueError otherwise."""
    from mailgw.config.values import parse_size

    text = text.strip()
    if not text:
        return None
    if text.endswith("%"):
        value = float(text[:-1])
        if not 0 < value <= 100:
            raise ValueError(f"watermark {text!r} is not between 0% and 100%")
        return ("percent", value / 100)
    return ("bytes", float(parse_size(text)))


@dataclass(frozen=True)
class MigrationPolicy:
    """Which tier-1 messages go to tier 2 (see ``etc/mailgw.ini`` [store])."""

    after: float = 0.0
    folders: tuple[str, ...] = ()
    min_size: int = 0
    high_watermark: tuple[str, float] | None = None
    low_watermark: tuple[str, float] | None = None

    @classmethod
    def from_config(cls, store_config: Any) -> MigrationPolicy:
        return cls(
            after=float(store_config.migrate_after),
            folders=tuple(store_config.migrate_folders),
            min_size=int(store_config.migrate_min_size),
            high_watermark=parse_watermark(store_config.tier1_high_watermark),
            low_watermark=parse_watermark(store_config.tier1_low_watermark),
        )


@dataclass(frozen=True)
class Candidate:
    """A tier-1 message chosen for migration."""

    user: str
    folder: str
    uid: int
    size: int
    internaldate: float


@dataclass
class MigrationReport:
    """What one run did (or would do, in a dry run)."""

    moved: int = 0
    bytes: int = 0
    skipped: int = 0
    failed: int = 0
    candidates: list[Candidate] = field(default_factory=list)


class Migrator:
    """Finds candidates and moves them; blocking file work, run it off the reactor thread."""

    def __init__(
        self,
        store: MessageStore,
        policy: MigrationPolicy,
        clock: Callable[[], float] = time.time,
        disk_usage: Callable[[str], tuple[int, int]] | None = None,
    ) -> None:
        self.store = store
        self.policy = policy
        self._clock = clock
        self._disk_usage = disk_usage or _disk_usage

    def _by_rule(self, user: str) -> Iterator[Candidate]:
        policy = self.policy
        now = self._clock()
        for folder, uid, size, _modseq, blob, date in self.store.tier_rows(user):
            if blob is not None or size < policy.min_size:
                continue
            old = policy.after > 0 and date <= now - policy.after
            if old or folder in policy.folders:
                yield Candidate(user, folder, uid, size, date)

    def _bytes_to_free(self, users: list[str]) -> int:
        high, low = self.policy.high_watermark, self.policy.low_watermark
        if high is None:
            return 0
        low = low or high
        if high[0] == "percent":
            total, used = self._disk_usage(self.store.root)
            if total <= 0 or used <= high[1] * total:
                return 0
            return int(used - low[1] * total)
        tier1 = sum(
            size
            for user in users
            for _f, _u, size, _m, blob, _d in self.store.tier_rows(user)
            if blob is None
        )
        return int(tier1 - low[1]) if tier1 > high[1] else 0

    def candidates(self, user: str | None = None) -> list[Candidate]:
        """Candidates in migration order: by rule (oldest first), then, when tier 1 is over
        its high watermark, the oldest remaining messages until the low watermark."""
        users = [user] if user else self.store.users()
        chosen = sorted((c for u in users for c in self._by_rule(u)), key=lambda c: c.internaldate)
        to_free = self._bytes_to_free(users) - sum(c.size for c in chosen)
        if to_free > 0:
            taken = {(c.user, c.folder, c.uid) for c in chosen}
            rest = heapq.merge(
                *(
                    sorted(
                        (
                            Candidate(u, f, uid, size, date)
                            for f, uid, size, _m, blob, date in self.store.tier_rows(u)
                            if blob is None
                            and size >= self.policy.min_size
                            and (u, f, uid) not in taken
                        ),
                        key=lambda c: c.internaldate,
                    )
                    for u in users
                ),
                key=lambda c: c.internaldate,
            )
            for c in rest:
                if to_free <= 0:
                    break
                chosen.append(c)
                to_free -= c.size
        return chosen

    def migrate(self, candidates: Iterable[Candidate], report: MigrationReport) -> None:
        """Move the candidates, counting into ``report``; errors are logged and counted."""
        for c in candidates:
            try:
                moved = self.store.migrate_message(c.user, c.folder, c.uid)
            except MailboxNotFound:
                moved = False
            except (OSError, BlobError):
                log.failure(
                    "store: migrating {user} {folder} UID {uid} failed",
                    user=c.user,
                    folder=c.folder,
                    uid=c.uid,
                )
                report.failed += 1
                continue
            if moved:
                report.moved += 1
                report.bytes += c.size
            else:
                report.skipped += 1

    def run(
        self,
        user: str | None = None,
        dry_run: bool = False,
        limit: int | None = None,
    ) -> MigrationReport:
        """One full pass (the CLI): every candidate now, or only list them with ``dry_run``."""
        report = MigrationReport()
        found = self.candidates(user)
        if limit is not None:
            found = found[:limit]
        report.candidates = found
        if not dry_run:
            self.migrate(found, report)
        return report


def _disk_usage(path: str) -> tuple[int, int]:
    st = os.statvfs(path)
    total = st.f_blocks * st.f_frsize
    return total, total - st.f_bavail * st.f_frsize


class MigrationService(service.Service):
    """Runs migration passes every ``interval`` seconds, at most ``rate`` messages a second.

    Candidates are found and moved in ``run_in_thread`` (the node's I/O pool), one batch of
    ``rate`` messages a second; the reactor only schedules. ``stopService`` waits for the
    batch in progress."""

    name = "store-migration"

    def __init__(
        self,
        migrator: Migrator,
        reactor: Any,
        run_in_thread: Callable[..., Deferred[Any]],
        rate: float,
        interval: float,
    ) -> None:
        self.migrator = migrator
        self._reactor = reactor
        self._run = run_in_thread
        self.rate = max(rate, 0.001)
        self.interval = interval
        self._pending: list[Candidate] = []
        self._call: Any = None
        self._busy: Deferred[Any] | None = None
        self.total = MigrationReport()

    def startService(self) -> None:
        super().startService()
        self._schedule(self.interval)

    def stopService(self) -> Any:
        super().stopService()
        if self._call is not None and self._call.active():
            self._call.cancel()
        self._call = None
        self._pending = []
        if self._busy is not None:
            done: Deferred[None] = Deferred()
            self._busy.addBoth(lambda _: done.callback(None))
            return done
        return None

    def _schedule(self, delay: float) -> None:
        if self.running:
            self._call = self._reactor.callLater(delay, self._tick)

    def _tick(self) -> None:
        self._call = None
        started = self._reactor.seconds()
        batch_time = 0.0
        if self._pending:
            batch_time = max(1, int(self.rate)) / self.rate
            batch_size = max(1, int(self.rate))
            batch, self._pending = self._pending[:batch_size], self._pending[batch_size:]
            self._busy = self._run(self._batch, batch)
        else:
            self._busy = self._run(self.migrator.candidates)
            self._busy.addCallback(self._found)

        def done(result: object) -> None:
            self._busy = None
            if self._pending:  # the first batch at once, the next when its time is up
                self._schedule(max(0.0, batch_time - (self._reactor.seconds() - started)))
            else:
                self._schedule(self.interval)

        def failed(failure: Any) -> None:
            log.failure("store: migration pass failed", failure)
            self._pending = []

        self._busy.addErrback(failed)
        self._busy.addCallback(done)

    def _found(self, candidates: list[Candidate]) -> None:
        self._pending = list(candidates)
        if candidates:
            log.info("store: {n} message(s) to migrate to tier 2", n=len(candidates))

    def _batch(self, batch: list[Candidate]) -> None:
        self.migrator.migrate(batch, self.total)


# -- integrity and statistics ----------------------------------------------------------------


@dataclass
class VerifyReport:
    """``store verify``: blobs whose bytes do not match, referenced but missing, unreferenced."""

    checked: int = 0
    corrupt: list[str] = field(default_factory=list)
    missing: list[tuple[str, str, int, str]] = field(default_factory=list)
    orphans: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.corrupt and not self.missing


def references(store: MessageStore) -> dict[str, list[tuple[str, str, int]]]:
    """Digest -> the (user, folder, uid) rows that refer to it (as a message's header, body
    or whole blob), over every user."""
    refs: dict[str, list[tuple[str, str, int]]] = {}
    for user in store.users():
        for folder, uid, _size, _m, blob, _d in store.tier_rows(user):
            if blob is not None:
                for digest in split_ref(str(blob)):
                    refs.setdefault(digest, []).append((user, folder, uid))
    return refs


def verify(store: MessageStore, blobs: FileBlobStore) -> VerifyReport:
    """Read every blob back (hash check), and match blobs against index references."""
    report = VerifyReport()
    refs = references(store)
    stored = set()
    for digest in blobs.iter_refs():
        stored.add(digest)
        report.checked += 1
        try:
            blobs.get(digest)
        except BlobError:
            report.corrupt.append(digest)
        if digest not in refs:
            report.orphans.append(digest)
    for digest, rows in sorted(refs.items()):
        if digest not in stored:
            report.missing.extend((digest, user, uid, folder) for user, folder, uid in rows)
    return report


def gc(
    store: MessageStore,
    blobs: FileBlobStore,
    grace: float = GC_GRACE,
    dry_run: bool = False,
    clock: Callable[[], float] = time.time,
) -> list[str]:
    """Delete blobs no index refers to and older than ``grace`` seconds (a young one may
    belong to a migration that has not switched its row yet), then repack the pack files
    that became mostly dead (``FileBlobStore.repack``). Returns their digests."""
    refs = references(store)
    limit = clock() - grace
    removed = []
    for digest in list(blobs.iter_refs()):
        if digest in refs:
            continue
        try:
            _size, mtime = blobs.stat(digest)
        except BlobError:
            continue
        if mtime > limit:
            continue
        if not dry_run and not blobs.delete(digest, older_than=limit):
            continue  # put again meanwhile (its mtime refreshed)
        removed.append(digest)
    if not dry_run:
        blobs.clean_tmp(grace)
        blobs.repack()
    return removed


@dataclass
class TierStats:
    """Counts of one tier (or of one kind of tier-2 blob): ``messages`` (messages counted),
    ``logical`` (their bytes), ``unique_logical`` (bytes of the distinct blobs they refer
    to), ``blobs`` and ``stored`` (distinct blobs and their bytes on disk)."""

    messages: int = 0
    logical: int = 0
    stored: int = 0
    blobs: int = 0
    unique_logical: int = 0

    @property
    def dedup_ratio(self) -> float:
        """Logical bytes of the messages per logical byte of distinct blobs."""
        return self.logical / self.unique_logical if self.unique_logical else 1.0

    @property
    def space_ratio(self) -> float:
        """Logical bytes per byte stored (dedup and compression together)."""
        return self.logical / self.stored if self.stored else 1.0


# Kinds of tier-2 blobs, reported on their own lines by ``stats``: a message is a header
# blob and a body blob, or one whole blob (no body, or migrated before the split).
PART_KINDS = ("headers", "bodies", "whole")


def stats(store: MessageStore, blobs: FileBlobStore | None) -> dict[str, TierStats]:
    """``tier1``, ``tier2`` and, per kind of tier-2 blob, ``tier2-headers``,
    ``tier2-bodies``, ``tier2-whole``: messages, logical bytes, distinct logical bytes,
    blobs and bytes stored on disk. The ``tier2`` line counts every blob on disk (orphans
    included); the kind lines count the referenced blobs that exist."""
    tier1, tier2 = TierStats(), TierStats()
    kinds = {kind: TierStats() for kind in PART_KINDS}
    distinct: dict[str, dict[str, int]] = {kind: {} for kind in PART_KINDS}
    seen: dict[str, int] = {}
    for user in store.users():
        for _f, _uid, size, _m, blob, _d in store.tier_rows(user):
            tier = tier1 if blob is None else tier2
            tier.messages += 1
            tier.logical += size
            if blob is None:
                tier1.stored += size
                continue
            parts = ref_parts(str(blob), size)
            names = PART_KINDS[:2] if len(parts) == 2 else PART_KINDS[2:]
            for kind, (digest, part_size) in zip(names, parts, strict=True):
                kinds[kind].messages += 1
                kinds[kind].logical += part_size
                distinct[kind][digest] = part_size
                seen[digest] = part_size
    tier2.unique_logical = sum(seen.values())
    tier1.unique_logical = tier1.logical
    tier1.blobs = tier1.messages
    on_disk: dict[str, int] = {}
    if blobs is not None:
        for digest in blobs.iter_refs():
            try:
                on_disk[digest], _mtime = blobs.stat(digest)
            except BlobError:
                continue
        tier2.blobs = len(on_disk)
        tier2.stored = sum(on_disk.values())
    for kind, digests in distinct.items():
        kinds[kind].unique_logical = sum(digests.values())
        present = [d for d in digests if d in on_disk]
        kinds[kind].blobs = len(present)
        kinds[kind].stored = sum(on_disk[d] for d in present)
    return {"tier1": tier1, "tier2": tier2, **{f"tier2-{k}": t for k, t in kinds.items()}}


def tier2_from_config(data_dir: str, store_config: Any) -> FileBlobStore | None:
    """The tier-2 blob store of ``[store] tier2_dir`` (relative to ``data_dir``), or None when
    tier 2 is off."""
    if not store_config.tier2_dir:
        return None
    return FileBlobStore(
        os.path.join(data_dir, store_config.tier2_dir), pack_max=store_config.tier2_pack_max
    )
