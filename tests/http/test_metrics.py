"""The node's collector (each family's branches), the /metrics resource, the collector's
registration, and the HTTP connection limit."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families
from twisted.internet import defer
from twisted.internet.address import IPv4Address
from twisted.internet.protocol import Protocol
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.web.resource import Resource
from twisted.web.server import Site
from twisted.web.test.requesthelper import DummyRequest

from mailgw.http.metrics import (
    MetricsResource,
    NodeCollector,
    channel_families,
    connection_family,
    count_queue,
    count_store,
    queue_family,
    store_families,
    worker_family,
)
from mailgw.http.setup import CollectorService, CountedFactory
from mailgw.net.limits import ConnectionCounter
from mailgw.runtime.metrics import WorkerFigures
from mailgw.runtime.threads import run_inline
from mailgw.spool import Spool
from mailgw.store import MessageStore


def samples(*families: Any) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    return {(s.name, tuple(sorted(s.labels.items()))): s.value for f in families for s in f.samples}


def test_queue_family() -> None:
    assert samples(queue_family(None)) == {}
    got = samples(queue_family({"incoming": 2, "deferred": 0}))
    assert got == {
        ("mailgw_queue_messages", (("state", "incoming"),)): 2,
        ("mailgw_queue_messages", (("state", "deferred"),)): 0,
    }


def test_connection_family_names_protocols() -> None:
    counters = {"mx": ConnectionCounter(5), "http": ConnectionCounter(5)}
    counters["mx"].admit("192.0.2.1")
    got = samples(connection_family(counters))
    assert got == {
        ("mailgw_connections_open", (("protocol", "smtp"),)): 1,
        ("mailgw_connections_open", (("protocol", "http"),)): 0,
    }


def test_store_families() -> None:
    assert samples(*store_families(None)) == {}
    got = samples(*store_families({"tier1": (3, 300), "tier2": (1, 50)}))
    assert got[("mailgw_store_bytes", (("tier", "tier1"),))] == 300
    assert got[("mailgw_store_messages", (("tier", "tier2"),))] == 1


def test_channel_families_follow_the_failover_state() -> None:
    rows = [
        {"name": "domestic", "state": "active", "in_flight": 2},
        {"name": "overseas", "state": "suspended", "in_flight": 0},
        {"name": "sdn", "state": "probing"},
    ]
    got = samples(*channel_families(rows))
    up = {k[1][0][1]: v for k, v in got.items() if k[0] == "mailgw_relay_channel_up"}
    assert up == {"domestic": 1, "overseas": 0, "sdn": 1}
    states = {
        (dict(k[1])["channel"], dict(k[1])["state"])
        for k, v in got.items()
        if k[0] == "mailgw_relay_channel_state" and v == 1
    }
    assert states == {("domestic", "active"), ("overseas", "suspended"), ("sdn", "probing")}
    assert got[("mailgw_relay_channel_in_flight", (("channel", "domestic"),))] == 2
    assert samples(*channel_families([])) == {}


def test_worker_family() -> None:
    class Worker:
        def __init__(self, alive: bool) -> None:
            self.alive = alive

    class Limits:
        def connections_held(self, worker: Worker) -> int:
            return 4

    class Pool:
        workers = {1: Worker(True), 0: Worker(True), 2: Worker(False)}
        limits = Limits()

    assert samples(worker_family(None)) == {}
    assert samples(worker_family(Pool())) == {
        ("mailgw_imap_worker_connections", (("worker", "0"),)): 4,
        ("mailgw_imap_worker_connections", (("worker", "1"),)): 4,
    }


def test_count_queue_and_store(tmp_path: Path) -> None:
    spool = Spool(str(tmp_path / "spool"), hostname="mx.test")
    counts = count_queue(spool)
    assert set(counts) == set(Spool.STATES) and not any(counts.values())
    store = MessageStore(str(tmp_path / "mail"), quota_for=lambda user: None)
    assert count_store(store) == {"tier1": (0, 0), "tier2": (0, 0)}
    store.open_mailbox("alice@example.test", "INBOX").append(b"Subject: a\r\n\r\n12345\r\n", ())
    store.open_mailbox("bob@example.test", "INBOX").append(b"Subject: b\r\n\r\n1\r\n", ())
    got = count_store(store)
    assert got["tier1"] == (
        2,
        len(b"Subject: a\r\n\r\n12345\r\n") + len(b"Subject: b\r\n\r\n1\r\n"),
    )
    assert got["tier2"] == (0, 0)


class FakeSpool:
    STATES = ("incoming", "deferred")

    def __init__(self) -> None:
        self.fail = False

    def list(self, state: str) -> list[str]:
        if self.fail:
            raise OSError("gone")
        return ["Q1"] if state == "incoming" else []


class FakeStore:
    def __init__(self) -> None:
        self.counted = 0

    def users(self) -> list[str]:
        self.counted += 1
        return ["a@x.test"]

    def tier_totals(self, user: str) -> dict[str, tuple[int, int]]:
        return {"tier1": (1, 10), "tier2": (2, 20)}


class FakeWorkers:
    def __init__(self) -> None:
        self.metrics = WorkerFigures()
        self.asked = 0
        self.workers: dict[int, Any] = {}  # none alive: no connection figures

    def refresh_metrics(self, timeout: float) -> defer.Deferred[None]:
        self.asked += 1
        self.metrics.update("w", {"mailgw_imap_commands": [[{"command": "CAPABILITY"}, 7.0]]})
        return defer.succeed(None)


def collector(**kw: Any) -> tuple[NodeCollector, Clock, FakeSpool, FakeStore]:
    clock, spool, store = Clock(), FakeSpool(), FakeStore()
    c = NodeCollector(
        clock,
        run_inline,
        spool,
        store,
        {"mx": ConnectionCounter(5)},
        lambda: [{"name": "direct", "state": "active"}],
        store_interval=60.0,
        **kw,
    )
    return c, clock, spool, store


def scrape(c: NodeCollector) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    registry = CollectorRegistry()
    registry.register(c)
    text = generate_latest(registry).decode()
    return samples(*text_string_to_metric_families(text))


def test_refresh_reads_the_queue_each_time_and_the_store_at_most_each_interval() -> None:
    c, clock, spool, store = collector()
    assert c.describe() == []
    c.refresh()
    c.refresh()
    assert store.counted == 1
    clock.advance(60)
    c.refresh()
    assert store.counted == 2
    got = scrape(c)
    assert got[("mailgw_queue_messages", (("state", "incoming"),))] == 1
    assert got[("mailgw_store_bytes", (("tier", "tier2"),))] == 20
    assert got[("mailgw_relay_channel_up", (("channel", "direct"),))] == 1
    assert got[("mailgw_connections_open", (("protocol", "smtp"),))] == 0
    # A failed read keeps the last figures.
    spool.fail = True
    c.refresh()
    assert scrape(c)[("mailgw_queue_messages", (("state", "incoming"),))] == 1


def test_workers_figures_are_asked_for_and_merged() -> None:
    workers = FakeWorkers()
    c, _, _, _ = collector(workers=workers)
    c.refresh()
    assert workers.asked == 1
    got = scrape(c)
    assert got[("mailgw_imap_commands_total", (("command", "CAPABILITY"),))] >= 7


def render(resource: Resource) -> DummyRequest:
    request = DummyRequest([])
    resource.render(request)
    return request


def test_metrics_resource_renders_the_registry() -> None:
    c, _, _, _ = collector()
    registry = CollectorRegistry()
    registry.register(c)
    request = render(MetricsResource(c, registry))
    assert request.finished
    content_type = request.responseHeaders.getRawHeaders(b"content-type")[0]
    assert content_type.startswith(b"text/plain; version=")
    names = {f.name for f in text_string_to_metric_families(b"".join(request.written).decode())}
    assert {"mailgw_queue_messages", "mailgw_imap_commands"} <= names


def test_metrics_resource_answers_500_when_a_collector_fails() -> None:
    c, _, _, _ = collector()

    class Broken:
        def collect(self) -> Any:
            raise RuntimeError("boom")

    registry = CollectorRegistry(auto_describe=False)
    registry.register(Broken())  # type: ignore[arg-type]
    request = render(MetricsResource(c, registry))
    assert request.responseCode == 500
    assert b"".join(request.written).startswith(b"500 Internal Server Error")


def test_the_collector_is_registered_while_the_role_runs() -> None:
    c, _, _, _ = collector()
    registry = CollectorRegistry()
    svc = CollectorService(c, registry)
    svc.startService()
    assert "mailgw_queue_messages" in generate_latest(registry).decode()
    svc.stopService()
    assert "mailgw_queue_messages" not in generate_latest(registry).decode()
    svc.startService()  # and again (a restart of the service)
    svc.stopService()


class Echo(Protocol):
    def connectionMade(self) -> None:
        self.transport.write(b"hello")  # type: ignore[union-attr]


def test_http_connections_over_the_limit_get_503() -> None:
    counter = ConnectionCounter(1, 10, protocol="http")
    site = Site(Resource())
    site.protocol = Echo  # type: ignore[assignment]
    factory = CountedFactory(site, counter)
    first, second = StringTransport(), StringTransport()
    for t in (first, second):
        t.peerAddr = IPv4Address("TCP", "192.0.2.9", 5000)
    p1 = factory.buildProtocol(first.peerAddr)
    p1.makeConnection(first)
    assert first.value() == b"hello" and counter.total == 1
    p2 = factory.buildProtocol(second.peerAddr)
    p2.makeConnection(second)
    assert second.value().startswith(b"HTTP/1.1 503 Service Unavailable\r\n")
    assert second.value().endswith(b"\r\n\r\ntoo many connections from your address\n")
    assert second.disconnecting and counter.total == 1
    p2.connectionLost(None)  # type: ignore[arg-type]  # a refused one releases nothing
    assert counter.total == 1
    p1.connectionLost(None)  # type: ignore[arg-type]
    assert counter.total == 0
