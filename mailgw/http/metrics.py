"""``/metrics``: prometheus_client's default registry in Prometheus text format, with the node's
collector (queue sizes, open connections, store bytes per tier, relay channel health, and the
processes' own counters merged across the IMAP workers).

A scrape first refreshes what is read off the reactor thread (the spool's state folders, the
store's index totals at most every ``[http] store_stats_interval``) and asks the IMAP workers
for their figures (waiting at most ``WORKER_WAIT``), then renders the registry.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST, REGISTRY, generate_latest
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import CollectorRegistry
from twisted.internet import defer
from twisted.logger import Logger
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET

from mailgw.runtime import metrics
from mailgw.runtime.threads import Runner

log = Logger()

WORKER_WAIT = 1.0
"""Seconds a scrape waits for the IMAP workers' figures before using the last ones."""

CHANNEL_STATES = ("active", "probing", "suspended")


def queue_family(counts: Mapping[str, int] | None) -> Metric:
    """``mailgw_queue_messages{state}`` from the spool's counts (None: not read yet)."""
    family = GaugeMetricFamily(
        "mailgw_queue_messages",
        "Messages in the spool by state (incoming, active, deferred, hold, corrupt, outbound,"
        " retry), counted at scrape time.",
        labels=["state"],
    )
    for state, n in (counts or {}).items():
        family.add_metric([state], n)
    return family


def connection_family(counters: Mapping[str, Any]) -> Metric:
    """``mailgw_connections_open{protocol}`` from the node's connection counters (by the
    role's section: ``mx`` is protocol ``smtp``)."""
    family = GaugeMetricFamily(
        "mailgw_connections_open",
        "Client connections open now, by protocol (IMAP: over all worker processes).",
        labels=["protocol"],
    )
    for section, counter in counters.items():
        family.add_metric([metrics.PROTOCOLS.get(section, section)], counter.total)
    return family


def store_families(stats: Mapping[str, tuple[int, int]] | None) -> Iterator[Metric]:
    """``mailgw_store_bytes{tier}`` and ``mailgw_store_messages{tier}`` from ``{tier:
    (messages, bytes)}`` (None: not counted yet, no samples)."""
    size = GaugeMetricFamily(
        "mailgw_store_bytes",
        "Bytes of the stored messages by tier (tier1: Maildir, tier2: blobs), as indexed.",
        labels=["tier"],
    )
    count = GaugeMetricFamily(
        "mailgw_store_messages", "Stored messages by tier, as indexed.", labels=["tier"]
    )
    for tier, (messages, nbytes) in sorted((stats or {}).items()):
        size.add_metric([tier], nbytes)
        count.add_metric([tier], messages)
    yield size
    yield count


def channel_families(rows: Iterable[Mapping[str, Any]]) -> Iterator[Metric]:
    """``mailgw_relay_channel_up{channel}`` (1 unless suspended: the relay's failover may
    choose it) and ``mailgw_relay_channel_state{channel,state}`` (1 for the current state)
    from the relay's channel status rows."""
    up = GaugeMetricFamily(
        "mailgw_relay_channel_up",
        "1 when the relay may send through the channel (active or probing), 0 when suspended.",
        labels=["channel"],
    )
    state = GaugeMetricFamily(
        "mailgw_relay_channel_state",
        "The channel's health state as the relay's failover sees it (1 for the current one).",
        labels=["channel", "state"],
    )
    in_flight = GaugeMetricFamily(
        "mailgw_relay_channel_in_flight",
        "Deliveries under way through the channel.",
        labels=["channel"],
    )
    for row in rows:
        name, current = str(row["name"]), str(row["state"])
        up.add_metric([name], 0 if current == "suspended" else 1)
        for s in CHANNEL_STATES:
            state.add_metric([name, s], 1 if s == current else 0)
        in_flight.add_metric([name], int(row.get("in_flight", 0)))
    yield up
    yield state
    yield in_flight


def worker_family(pool: Any) -> Metric:
    """``mailgw_imap_worker_connections{worker}``: connections each live IMAP worker process
    holds (the least-connections balance at work); no samples without workers."""
    family = GaugeMetricFamily(
        "mailgw_imap_worker_connections",
        "IMAP connections held by each worker process (by its index), as the main process counts.",
        labels=["worker"],
    )
    if pool is not None:
        for index, worker in sorted(pool.workers.items()):
            if worker.alive:
                family.add_metric([str(index)], pool.limits.connections_held(worker))
    return family


def count_queue(spool: Any) -> dict[str, int]:
    """Messages per spool state (blocking: lists the state folders)."""
    return {state: len(spool.list(state)) for state in spool.STATES}


def count_store(store: Any) -> dict[str, tuple[int, int]]:
    """``{tier: (messages, bytes)}`` over every user's index (blocking)."""
    out = {"tier1": (0, 0), "tier2": (0, 0)}
    for user in store.users():
        for tier, (n, size) in store.tier_totals(user).items():
            old = out.get(tier, (0, 0))
            out[tier] = (old[0] + n, old[1] + size)
    return out


@dataclass
class NodeFigures:
    """What the collector reads, refreshed by ``refresh`` before each scrape."""

    queue: dict[str, int] | None = None
    store: dict[str, tuple[int, int]] | None = None
    store_counted_at: float | None = None
    errors: list[str] = field(default_factory=list)


class NodeCollector:
    """A prometheus_client collector of one node's figures (see the module docstring).

    ``counters``: the node's connection counters by section; ``channels()``: the relay's
    status rows (empty without a relay); ``workers``: the IMAP worker pool or None."""

    def __init__(
        self,
        reactor: Any,
        run: Runner,
        spool: Any,
        store: Any,
        counters: Mapping[str, Any],
        channels: Callable[[], Iterable[Mapping[str, Any]]],
        workers: Any = None,
        store_interval: float = 60.0,
    ) -> None:
        self.reactor = reactor
        self.run = run
        self.spool = spool
        self.store = store
        self.counters = counters
        self.channels = channels
        self.workers = workers
        self.store_interval = store_interval
        self.figures = NodeFigures()

    def describe(self) -> list[Metric]:
        return []  # no collision check at registration (it would run a collection)

    def collect(self) -> Iterator[Metric]:
        workers = [self.workers.metrics.total()] if self.workers is not None else []
        yield from metrics.merged(workers)
        yield queue_family(self.figures.queue)
        yield connection_family(self.counters)
        yield from store_families(self.figures.store)
        yield from channel_families(self.channels())
        yield worker_family(self.workers)

    def refresh(self) -> defer.Deferred[None]:
        """Read the queue (and the store when its count is older than ``store_interval``)
        in the I/O pool, and ask the workers for their figures; never fails (a failed read
        keeps the last figures and is logged)."""
        waits: list[defer.Deferred[Any]] = []
        queue: defer.Deferred[Any] = self.run(count_queue, self.spool)
        queue.addCallbacks(self._queue_counted, self._failed, errbackArgs=("spool",))
        waits.append(queue)
        now = self.reactor.seconds()
        last = self.figures.store_counted_at
        if last is None or now - last >= self.store_interval:
            self.figures.store_counted_at = now
            counted: defer.Deferred[Any] = self.run(count_store, self.store)
            counted.addCallbacks(self._store_counted, self._failed, errbackArgs=("store",))
            waits.append(counted)
        if self.workers is not None:
            waits.append(self.workers.refresh_metrics(WORKER_WAIT))
        d: defer.Deferred[Any] = defer.DeferredList(waits, consumeErrors=True)
        return d.addCallback(lambda _: None)

    def _queue_counted(self, counts: dict[str, int]) -> None:
        self.figures.queue = counts

    def _store_counted(self, stats: dict[str, tuple[int, int]]) -> None:
        self.figures.store = stats

    def _failed(self, failure: Any, what: str) -> None:
        log.warn("metrics: cannot count the {what}: {error}", what=what, error=failure.value)


class MetricsResource(Resource):
    """``/metrics``: refresh ``collector``, then render ``registry`` (the default one)."""

    isLeaf = True

    def __init__(self, collector: NodeCollector, registry: CollectorRegistry = REGISTRY) -> None:
        super().__init__()  # type: ignore[no-untyped-call]
        self.collector = collector
        self.registry = registry

    def render_GET(self, request: Any) -> Any:  # noqa: N802 (twisted.web)
        gone: list[bool] = []
        request.notifyFinish().addErrback(lambda _: gone.append(True))

        def answer(_: object) -> None:
            if gone:
                return
            try:
                body = generate_latest(self.registry)
            except Exception:
                log.failure("metrics: a collector failed")
                request.setResponseCode(500)
                request.setHeader(b"content-type", b"text/plain; charset=utf-8")
                body = b"500 Internal Server Error: a metrics collector failed\n"
            else:
                request.setHeader(b"content-type", CONTENT_TYPE_LATEST.encode("ascii"))
            request.setHeader(b"cache-control", b"no-store")
            if request.method != b"HEAD":
                request.write(body)
            request.finish()

        self.collector.refresh().addCallback(answer)
        return NOT_DONE_YET
