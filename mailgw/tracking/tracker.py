"""``Tracker``: the one call that records a message event, and its batching writer thread.

``record`` never blocks and never does I/O: it counts the event (``metrics``) and appends it
to an in-memory queue; one writer thread per process writes the queue to the database every
``flush_interval`` seconds, or at once when ``flush_events`` are waiting, in one transaction
(``store.write``). Past ``max_pending`` waiting events new ones are dropped and counted
(``mailgw_tracking_events_dropped_total``): tracking never slows mail down. The same thread
prunes (``store.prune``) every ``prune_interval`` when ``prune`` is set (the server's main
process). Thread-safe: the reactor thread and the I/O pool's threads record.

A tracker that is never started (the ``mailgw`` command) writes what it recorded in
``close()``. ``Tracker(None)`` (``NO_TRACKING``, and ``[tracking] record = no``) only counts.
"""

from __future__ import annotations

import os
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable
from typing import Any

from twisted.logger import Logger

from mailgw.tracking import metrics, store
from mailgw.tracking.events import Kind
from mailgw.tracking.store import Event

log = Logger(namespace="mailgw.tracking")

DB_NAME = "tracking.sqlite"


class Tracker:
    """Records message events (see the module docstring)."""

    def __init__(
        self,
        path: str | None,
        *,
        clock: Callable[[], float] = time.time,
        flush_interval: float = 0.2,
        flush_events: int = 500,
        max_pending: int = 100_000,
        retention: float = 30 * 86400.0,
        max_size: int = 1 << 30,
        prune_interval: float = 600.0,
        prune: bool = False,
    ) -> None:
        self.path = path
        self.clock = clock
        self.flush_interval = flush_interval
        self.flush_events = flush_events
        self.max_pending = max_pending
        self.retention = retention
        self.max_size = max_size
        self.prune_interval = prune_interval
        self.prune = prune
        self.dropped = 0
        self.written = 0
        self._handled = 0  # events taken by the writer (written or failed)
        self._pending: deque[Event] = deque()
        self._wake = threading.Event()
        self._idle = threading.Condition()
        self._thread: threading.Thread | None = None
        self._stopping = False
        self._last_prune = 0.0
        self.listeners: list[Callable[[str, str, float, dict[str, Any]], None]] = []
        """Called by ``record`` (in the recording thread, so they must not block) with
        (kind, queue ID, time, detail): the webhooks' way in."""

    # -- recording (any thread) --------------------------------------------------------------

    def record(
        self,
        kind: str,
        queue_id: str,
        *,
        message_id: str = "",
        addresses: Iterable[str] = (),
        when: float | None = None,
        **detail: Any,
    ) -> None:
        """Record that ``queue_id`` went through step ``kind`` (``events.Kind``) now (or at
        ``when``); ``message_id`` (kept in the detail too) and ``addresses`` make it findable
        by them; ``detail``: JSON-able facts (see ``Kind``)."""
        if message_id:
            detail["message_id"] = message_id
        metrics.count(kind, detail)
        if self.listeners:
            t = self.clock() if when is None else when
            for listener in self.listeners:
                try:
                    listener(str(kind), queue_id, t, detail)
                except Exception:
                    log.failure("tracking: an event listener failed")
        if self.path is None:
            return
        if len(self._pending) >= self.max_pending:
            self.dropped += 1
            metrics.EVENTS_DROPPED.inc()
            return
        t = self.clock() if when is None else when
        self._pending.append(Event(t, str(kind), queue_id, detail, message_id, tuple(addresses)))
        if len(self._pending) >= self.flush_events:
            self._wake.set()

    def bounced(
        self,
        queue_id: str,
        recipients: list[str],
        reason: str,
        dsn_id: str = "",
        to: str = "",
        dsn_size: int = 0,
    ) -> None:
        """Record ``queue_id``'s ``bounced`` event and, when a DSN was queued (``dsn_id``), the
        DSN's own ``received`` event (role ``dsn``), so each timeline names the other."""
        self.record(
            Kind.BOUNCED, queue_id, recipients=list(recipients), reason=reason, dsn=dsn_id, to=to
        )
        if dsn_id:
            self.record(
                Kind.RECEIVED,
                dsn_id,
                addresses=(to,),
                role="dsn",
                sender="",
                recipients=[to],
                size=dsn_size,
                bounce_of=queue_id,
            )

    # -- the writer --------------------------------------------------------------------------

    @property
    def running(self) -> bool:
        return self._thread is not None

    def start(self) -> None:
        """Start the writer thread (once)."""
        if self.path is None or self._thread is not None:
            return
        self._stopping = False
        self._thread = threading.Thread(target=self._run, name="mailgw-tracking", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        """Write what is waiting and end the writer thread."""
        thread = self._thread
        if thread is None:
            return
        self._stopping = True
        self._wake.set()
        thread.join(timeout)
        self._thread = None

    def flush(self, timeout: float = 10.0) -> bool:
        """Wait until every event recorded before the call is written (tests, the command);
        False on timeout. Without a writer thread, writes them in this thread."""
        if self.path is None:
            return True
        if self._thread is None:
            self._write_pending(None)
            return True
        target = self._handled + len(self._pending)
        deadline = time.monotonic() + timeout
        with self._idle:
            self._wake.set()
            while self._handled < target and self._thread is not None:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._idle.wait(min(left, 0.05))
                self._wake.set()
        return True

    def close(self) -> None:
        """Stop the writer, or write the pending events here when it never ran."""
        if self._thread is not None:
            self.stop()
        else:
            self.flush()

    def _run(self) -> None:
        conn = self._open()
        while True:
            self._wake.wait(self.flush_interval)
            self._wake.clear()
            stopping = self._stopping
            if conn is None:  # tried again at each batch: one failure does not drop all
                conn = self._open()
            self._write_pending(conn)
            if conn is not None and self.prune:
                self._maybe_prune(conn)
            if stopping:
                break
        if conn is not None:
            conn.close()

    def _open(self) -> Any:
        """The writer's connection, or None (logged: the next batch's events are dropped,
        and the opening is tried again before the one after)."""
        assert self.path is not None
        try:
            return store.connect(self.path)
        except Exception:
            log.failure("tracking: cannot open {path}; events are dropped", path=self.path)
            return None

    def _write_pending(self, conn: Any) -> None:
        batch: list[Event] = []
        pending = self._pending
        for _ in range(len(pending)):
            batch.append(pending.popleft())
        if not batch:
            return
        own = conn is None and self._thread is None
        try:
            if own:
                assert self.path is not None
                conn = store.connect(self.path)
            if conn is None:
                raise OSError("no database")
            store.write(conn, batch)
            written = True
        except Exception as e:
            written = False
            log.error(
                "tracking: {n} event(s) not written to {path}: {error}",
                n=len(batch),
                path=self.path,
                error=e,
            )
        finally:
            if own and conn is not None:
                conn.close()
        with self._idle:
            self._handled += len(batch)
            if written:
                self.written += len(batch)
            else:
                self.dropped += len(batch)
                metrics.EVENTS_DROPPED.inc(len(batch))
            self._idle.notify_all()

    def _maybe_prune(self, conn: Any) -> None:
        now = self.clock()
        if now - self._last_prune < self.prune_interval:
            return
        self._last_prune = now
        try:
            removed = store.prune(conn, now, self.retention, self.max_size)
        except Exception as e:
            log.error("tracking: pruning {path} failed: {error}", path=self.path, error=e)
            return
        if removed:
            log.info("tracking: pruned {n} old event(s)", n=removed)


NO_TRACKING = Tracker(None)
"""Counts events in the metrics, stores nothing (the default of every component)."""


def tracker_from_config(config: Any, prune: bool = False) -> Tracker:
    """The tracker of a process running ``config`` (``[tracking]``; the database in
    ``data_dir``); ``prune``: this process prunes (the server's main process)."""
    t = config.tracking
    path = os.path.join(config.server.data_dir, DB_NAME) if t.record else None
    return Tracker(
        path,
        flush_interval=t.flush_interval,
        flush_events=t.flush_events,
        max_pending=t.max_pending,
        retention=t.retention,
        max_size=t.max_size,
        prune_interval=t.prune_interval,
        prune=prune,
    )
