"""``StateMailboxMap``: the user -> node map on the gateway state (embedded, a real
redis-server, the failover state with Redis away), and a mailbox move through it."""

from __future__ import annotations

import threading
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from twisted.internet import defer, threads
from twisted.internet.task import Clock
from zope.interface.verify import verifyObject

from mailgw.cluster.move import move_mailbox
from mailgw.cluster.nodemap import hashed_node
from mailgw.cluster.statemap import StateMailboxMap
from mailgw.interfaces import IMailboxMap
from mailgw.state.embedded import EmbeddedState
from mailgw.state.failover import FailoverState
from mailgw.state.redis import RedisState, connect_redis
from mailgw.store import MessageStore
from mailgw.testing.redis import RedisServer, redis_path
from tests.relay.reactorhelper import reactor, within

NODES = ["be1", "be2"]
ALICE = "alice@example.test"


def test_on_the_embedded_state_first_use_pins_the_hash_and_set_node_moves(
    tmp_path: Path,
) -> None:
    state = EmbeddedState(str(tmp_path))
    m = StateMailboxMap(state, NODES)
    assert verifyObject(IMailboxMap, m)
    first = m.get("Alice@Example.test")
    assert first == hashed_node(ALICE, NODES)
    # Pinned: a map with more nodes (another gateway, a node added later) keeps the user.
    grown = StateMailboxMap(state, [*NODES, "be3", "be4", "be5"])
    assert grown.get(ALICE) == first
    other = "be2" if first == "be1" else "be1"
    grown.set_node(ALICE, other)
    assert m.get(ALICE) == other
    with pytest.raises(ValueError, match="unknown node"):
        m.set_node(ALICE, "be9")
    assert not m.held(ALICE)
    m.set_held("bob@example.test", True)  # not seen yet: assigned (pinned), then held
    assert grown.held("BOB@example.test")
    assert grown.get("bob@example.test") == hashed_node("bob@example.test", NODES)
    m.set_held("bob@example.test", False)
    assert not grown.held("bob@example.test")
    with pytest.raises(ValueError):
        StateMailboxMap(state, [])


def test_an_answer_not_ready_outside_a_reactor_thread_is_an_error(tmp_path: Path) -> None:
    class Later(EmbeddedState):
        def get(self, key: str) -> defer.Deferred[bytes | None]:
            return defer.Deferred()

    m = StateMailboxMap(Later(str(tmp_path)), NODES)
    with pytest.raises(RuntimeError, match="in a thread"):
        m.held(ALICE)


def test_a_reactor_that_no_longer_runs_calls_bounds_the_wait(tmp_path: Path) -> None:
    class Gone:  # stopped after the check: what it is given never runs
        running = True

        def callFromThread(self, f: Any) -> None:  # noqa: N802 (Twisted's name)
            pass

    m = StateMailboxMap(EmbeddedState(str(tmp_path)), NODES, Gone(), timeout=0.1)
    raised: list[BaseException] = []

    def worker() -> None:  # not the reactor thread
        try:
            m.get(ALICE)
        except BaseException as e:
            raised.append(e)

    thread = threading.Thread(target=worker)
    thread.start()
    thread.join(10)
    assert len(raised) == 1 and isinstance(raised[0], TimeoutError)
    assert "no answer from the gateway state" in str(raised[0])


def test_with_redis_away_the_failover_state_answers_what_it_last_read(tmp_path: Path) -> None:
    clock = Clock()
    remote = EmbeddedState(str(tmp_path / "remote"), clock)  # stands for Redis (answers)
    state = FailoverState(remote, EmbeddedState(str(tmp_path / "local"), clock), clock, 0.5)
    m = StateMailboxMap(state, NODES)
    other = "be2" if hashed_node(ALICE, NODES) == "be1" else "be1"
    m.set_node(ALICE, other)  # a move recorded in Redis earlier
    assert m.get(ALICE) == other
    state.mark_down("test: connection lost")
    try:
        assert m.get(ALICE) == other  # the route read before the outage
        assert m.get("new@example.test") == hashed_node("new@example.test", NODES)
        m.set_held(ALICE, True)  # held locally meanwhile
        assert m.held(ALICE)
    finally:
        state.stop()


def test_move_mailbox_holds_and_switches_in_the_state(tmp_path: Path) -> None:
    state = EmbeddedState(str(tmp_path / "state"))
    m = StateMailboxMap(state, NODES)
    source_name = m.get(ALICE)
    target_name = "be2" if source_name == "be1" else "be1"
    stores = [
        MessageStore(str(tmp_path / name), quota_for=lambda _: None, default_folders=())
        for name in ("src", "dst")
    ]
    source, target = stores
    source.append_messages(ALICE, "INBOX", [(b"Subject: one\r\n\r\nbody\r\n", ["\\Seen"], None)])
    seen_held: list[bool] = []

    def sleep(_: float) -> None:
        seen_held.append(m.held(ALICE))

    report = move_mailbox(ALICE, target_name, m, source, target, settle=0, sleep=sleep)
    assert report.total == 1 and seen_held == [True, True]
    assert m.get(ALICE) == target_name and not m.held(ALICE)
    for store in stores:
        store.close()


# -- a real redis-server ---------------------------------------------------------------------


class _StateConfig:
    def __init__(self, address: str) -> None:
        self.redis = address
        self.sentinels: tuple[str, ...] = ()
        self.master_name = "mailgw"


@pytest.fixture(scope="module")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    assert redis_path() is not None, "redis-server is needed (.ci/run installs it)"
    server = RedisServer(tmp_path_factory.mktemp("redis"))
    server.start()
    yield server
    server.stop()


@pytest_twisted.async_yield_fixture
async def redis_state(redis_server: RedisServer) -> AsyncIterator[RedisState]:
    redis_server.call("FLUSHALL")
    handler, close = connect_redis(_StateConfig(redis_server.address), 2.0)
    yield RedisState(handler)
    await close()


@pytest_twisted.ensureDeferred
async def test_on_redis_two_gateways_share_the_map(
    redis_state: RedisState, redis_server: RedisServer
) -> None:
    gw1 = StateMailboxMap(redis_state, NODES, reactor, timeout=5)
    gw2 = StateMailboxMap(redis_state, [*NODES, "be3"], reactor, timeout=5)
    first = hashed_node(ALICE, NODES)
    # The blocking calls, from threads (as the relay and the delivery make them).
    assert await within(threads.deferToThread(gw1.get, ALICE)) == first
    assert redis_server.call("HGET", "mailgw:mailbox-nodes", ALICE).endswith(
        f"\r\n{first}\r\n".encode()
    )
    assert await within(threads.deferToThread(gw2.get, ALICE)) == first
    other = "be2" if first == "be1" else "be1"
    await within(threads.deferToThread(gw2.set_node, ALICE, other))
    assert await within(gw1.get_d(ALICE)) == other
    assert not await within(threads.deferToThread(gw1.held, ALICE))
    await within(threads.deferToThread(gw1.set_held, ALICE, True))
    assert await within(threads.deferToThread(gw2.held, ALICE))
    await within(gw2.set_held_d(ALICE, False))
    assert not await within(gw1.held_d(ALICE))
    with pytest.raises(ValueError, match="unknown node"):
        await within(threads.deferToThread(gw1.set_node, ALICE, "be3"))
