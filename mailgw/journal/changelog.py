"""``ChangeLog``: the node's change journal as read by one process (``IChangeLog``).

Entries committed by this process's writers are published at once (``committed``: in the
committing thread, or through ``reactor.callFromThread`` in the reactor thread); with ``start``
the log also tails the journal for the entries of every other process (IMAP workers, the
``mailgw`` command), woken by ``wake`` (a worker's hint over its pipe) and by a poll.
"""

from __future__ import annotations

import os
import sqlite3
import threading
from collections import OrderedDict
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, cast

from twisted.application.service import Service
from twisted.logger import Logger
from zope.interface import implementer

from mailgw.interfaces import IChangeLog
from mailgw.journal.sequencer import Route, Sequencer, parse_route
from mailgw.journal.writer import decode_row
from mailgw.model.change import ChangeEntry

log = Logger()

MAX_OPEN_DBS = 32
RETRY_LOCKED = 0.002
"""Seconds before the tail tries again when a writer holds the sequencer lock."""

Subscriber = Callable[[list[ChangeEntry]], None]
Listener = Callable[[str, str], None]


@implementer(IChangeLog)
class ChangeLog:
    """The journal of the data directory whose ``journal/`` is ``path``, read in this
    process; ``reactor`` (None: none) is where subscribers run."""

    def __init__(self, path: str, reactor: Any = None) -> None:
        self.sequencer = Sequencer.for_dir(path)
        self.data_dir = self.sequencer.data_dir
        self._reactor = reactor
        self._home_thread = threading.get_ident()
        self._subscribers: list[Subscriber] = []
        self._listeners: list[Listener] = []
        self._dbs: OrderedDict[str, sqlite3.Connection] = OrderedDict()
        self._db_lock = threading.Lock()
        # Where the last read stopped: (segment, offset, last seq routed before the offset).
        self._position: tuple[str, int, int] | None = None
        self._batch = threading.local()
        # Databases whose entries this process's writers hand to ``committed``.
        self._local: set[str] = set()
        # The tail (``start``): entries up to ``_cursor`` were dispatched.
        self._cursor = 0
        self._poll: Any = None
        self._retry: Any = None
        self._tailing = False

    # -- IChangeLog: reading --------------------------------------------------------------------

    def last_seq(self) -> int:
        """The highest sequence number handed out on the node so far (its transaction has
        committed or rolled back)."""
        with self.sequencer.shared() as state:
            return state.next - 1

    def read(self, after_seq: int, limit: int = 1000) -> list[ChangeEntry]:
        """Up to ``limit`` committed entries with ``seq > after_seq``, in order. Entries
        older than the retention may be gone."""
        return self._read(after_seq, limit, blocking=True)[0]

    def read_upto(self, after_seq: int, limit: int = 1000) -> tuple[list[ChangeEntry], int]:
        """As ``read``, with the last sequence number the read covered: every number up to
        it is in the entries or a gap (a rolled-back transaction), so a reader that has
        handled the entries can go on after it (replication ships the gaps as covered)."""
        return self._read(after_seq, limit, blocking=True)

    def _read(
        self, after_seq: int, limit: int, blocking: bool, skip_pid: int = -1
    ) -> tuple[list[ChangeEntry], int]:
        """(entries, the last sequence number the routes covered): routes written by
        ``skip_pid`` to a database this log publishes itself (``publishes``) are passed over
        without reading their rows."""
        with self.sequencer.shared(blocking) as state:
            names = self.sequencer.segments()
            sizes = {}
            for name in names:
                try:
                    sizes[name] = os.path.getsize(os.path.join(self.sequencer.routes, name))
                except FileNotFoundError:
                    continue
            top = state.next - 1
        routes: list[Route] = []
        covered = after_seq
        wanted = 0
        for route in self._routes(after_seq, names, sizes):
            if wanted >= limit:
                break
            covered = max(covered, route.last)
            if route.last <= after_seq or (route.pid == skip_pid and route.db in self._local):
                continue
            routes.append(route)
            wanted += route.count
        if wanted < limit:
            covered = max(covered, top)
        by_db: dict[str, list[Route]] = {}
        for route in routes:
            by_db.setdefault(route.db, []).append(route)
        entries: list[ChangeEntry] = []
        for db, group in by_db.items():
            low = max(after_seq + 1, min(r.first for r in group))
            high = max(r.last for r in group)
            seqs = {s for r in group for s in range(max(r.first, after_seq + 1), r.last + 1)}
            for row in self._rows(db, low, high):
                if row[0] in seqs:
                    entries.append(decode_row(row))
        entries.sort(key=lambda e: e.seq)
        if len(entries) > limit:
            entries = entries[:limit]
            covered = entries[-1].seq
        return entries, covered

    def _routes(self, after: int, names: list[str], sizes: dict[str, int]) -> Iterator[Route]:
        """The route lines (up to the sizes seen under the lock) that may hold numbers above
        ``after``, in order."""
        start = 0
        for i, name in enumerate(names):
            if int(name.split(".")[0]) <= after + 1:
                start = i
        position = self._position
        for name in names[start:]:
            size = sizes.get(name)
            if size is None:
                continue
            offset = 0
            if position is not None and position[0] == name and position[2] <= after:
                offset = position[1]
            try:
                fh = open(os.path.join(self.sequencer.routes, name), "rb")  # noqa: SIM115
            except FileNotFoundError:
                continue
            with fh:
                fh.seek(offset)
                last = position[2] if position is not None and offset else 0
                while offset < size:
                    line = fh.readline(size - offset)
                    if not line:
                        break
                    route = parse_route(line)
                    if route is None:  # torn by a crash: skip it
                        offset += len(line)
                        continue
                    offset += len(line)
                    if route.last <= after:
                        last = max(last, route.last)
                        self._position = (name, offset, last)
                    yield route

    def _rows(self, db: str, low: int, high: int) -> list[tuple[Any, ...]]:
        with self._db_lock:
            conn = self._dbs.get(db)
            if conn is None:
                path = os.path.join(self.data_dir, db)
                try:
                    conn = sqlite3.connect(
                        f"file:{path}?mode=rw", uri=True, check_same_thread=False, timeout=30
                    )
                except sqlite3.Error:
                    return []  # the database is gone (a quarantined index): a gap
                self._dbs[db] = conn
                while len(self._dbs) > MAX_OPEN_DBS:
                    self._dbs.popitem(last=False)[1].close()
            else:
                self._dbs.move_to_end(db)
            try:
                return conn.execute(
                    "SELECT seq, time, kind, user, folder, payload, pid FROM journal"
                    " WHERE seq BETWEEN ? AND ? ORDER BY seq",
                    (low, high),
                ).fetchall()
            except sqlite3.Error:
                return []

    def close(self) -> None:
        """Stop the tail and close the read connections."""
        self.stop()
        with self._db_lock:
            for conn in self._dbs.values():
                conn.close()
            self._dbs.clear()

    # -- IChangeLog: being told -----------------------------------------------------------------

    def subscribe(self, callback: object) -> None:
        """``callback(entries)`` for each batch of committed entries: this process's at once,
        other processes' while the tail runs. Runs in the reactor thread (or the committing
        thread when there is no reactor); exceptions are logged."""
        if not callable(callback):
            raise TypeError(f"subscriber {callback!r} is not callable")
        self._subscribers.append(cast(Subscriber, callback))

    def add_listener(self, callback: object) -> None:
        """``callback(user, folder)`` for each folder a committed entry concerns
        (``ChangeEntry.folders``). TypeError if it is not callable."""
        if not callable(callback):
            raise TypeError(f"listener {callback!r} is not callable")
        self._listeners.append(cast(Listener, callback))

    @property
    def listeners(self) -> list[Listener]:
        return self._listeners

    def publishes(self, db: str) -> None:
        """This process's writer of ``db`` (relative to the data directory) hands its entries
        to ``committed``: the tail need not read them back."""
        self._local.add(db)

    def committed(self, entries: list[ChangeEntry]) -> None:
        """This process committed ``entries`` (``DBJournal.on_commit``)."""
        if not self._subscribers and not self._listeners:
            return
        pending = getattr(self._batch, "entries", None)
        if pending is not None:
            pending.extend(entries)
        elif self._reactor is not None and threading.get_ident() != self._home_thread:
            self._reactor.callFromThread(self._dispatch, entries)
        else:
            self._dispatch(entries)

    @contextmanager
    def batch(self) -> Iterator[None]:
        """Hold back this thread's committed entries until the block ends, then publish them
        at once (listeners hear of each folder once: a COPY of many messages)."""
        if getattr(self._batch, "entries", None) is not None:
            yield
            return
        self._batch.entries = []
        try:
            yield
        finally:
            entries, self._batch.entries = self._batch.entries, None
            if entries:
                self.committed(entries)

    def _dispatch(self, entries: list[ChangeEntry]) -> None:
        for subscriber in list(self._subscribers):
            try:
                subscriber(entries)
            except Exception:
                log.failure("journal: subscriber {callback!r} failed", callback=subscriber)
        if not self._listeners:
            return
        told: list[tuple[str, str]] = []
        for entry in entries:
            for folder in entry.folders():
                if (entry.user, folder) not in told:
                    told.append((entry.user, folder))
        for user, folder in told:
            for listener in list(self._listeners):
                try:
                    listener(user, folder)
                except Exception:
                    log.failure("store: listener {callback!r} failed", callback=listener)

    # -- the tail of other processes' entries ---------------------------------------------------

    def start(self, poll_interval: float = 1.0) -> None:
        """Tail the journal (needs the reactor): entries of other processes committed from
        now on go to the subscribers, checked on ``wake`` and every ``poll_interval``."""
        from twisted.internet.task import LoopingCall

        if self._tailing:
            return
        self._tailing = True
        self._cursor = self.last_seq()
        self._poll = LoopingCall(self.wake)
        self._poll.clock = self._reactor
        if poll_interval > 0:
            self._poll.start(poll_interval, now=False)

    def stop(self) -> None:
        self._tailing = False
        if self._poll is not None and self._poll.running:
            self._poll.stop()
        self._poll = None
        if self._retry is not None and self._retry.active():
            self._retry.cancel()
        self._retry = None

    def wake(self) -> None:
        """Read what other processes committed since the last look (reactor thread)."""
        if not self._tailing:
            return
        if self._retry is not None and self._retry.active():
            return
        self._retry = None
        try:
            while True:
                entries, covered = self._read(self._cursor, 1000, False, skip_pid=os.getpid())
                self._cursor = max(self._cursor, covered)
                if entries:
                    self._dispatch(entries)
                if len(entries) < 1000:
                    return
        except BlockingIOError:  # a writer is committing: look again in a moment
            self._retry = self._reactor.callLater(RETRY_LOCKED, self.wake)
        except Exception:
            log.failure("journal: reading the change journal failed")


class JournalTail(Service):
    """The main process's service that tails the journal (``ChangeLog.start``) while it runs
    and records the node's retention for every writer."""

    name = "journal"

    def __init__(self, changes: ChangeLog, poll_interval: float, retention: float) -> None:
        self.changes = changes
        self.poll_interval = poll_interval
        self.retention = retention

    def startService(self) -> None:
        super().startService()  # type: ignore[no-untyped-call]
        self.changes.sequencer.set_retention(self.retention)
        self.changes.start(self.poll_interval)

    def stopService(self) -> None:
        self.changes.stop()
        super().stopService()  # type: ignore[no-untyped-call]
