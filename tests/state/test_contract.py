"""The ``IGatewayState`` contract, run against every implementation: embedded (memory +
SQLite), Redis (a real redis-server) and the failover state (Redis with the embedded one
behind it)."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from twisted.internet.task import deferLater
from zope.interface.verify import verifyObject

from mailgw.interfaces import IGatewayState, IMailboxNodes
from mailgw.state.embedded import EmbeddedState
from mailgw.state.failover import FailoverState
from mailgw.state.redis import RedisState, connect_redis
from mailgw.testing.redis import RedisServer, redis_path
from tests.relay.reactorhelper import reactor, within

pytestmark = pytest.mark.skipif(redis_path() is None, reason="redis-server not installed")


@pytest.fixture(scope="module")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    server = RedisServer(tmp_path_factory.mktemp("redis"))
    server.start()
    yield server
    server.stop()


class _StateConfig:
    def __init__(self, address: str) -> None:
        self.redis = address
        self.sentinels: tuple[str, ...] = ()
        self.master_name = "mailgw"


@pytest_twisted.async_yield_fixture(params=["embedded", "redis", "failover"])
async def state(
    request: pytest.FixtureRequest, tmp_path: Path, redis_server: RedisServer
) -> AsyncIterator[Any]:
    if request.param == "embedded":
        yield EmbeddedState(str(tmp_path), reactor)
        return
    redis_server.call("FLUSHALL")
    handler, close = connect_redis(_StateConfig(redis_server.address), 2.0)
    remote = RedisState(handler)
    if request.param == "redis":
        yield remote
    else:
        yield FailoverState(remote, EmbeddedState(str(tmp_path), reactor), reactor, 2.0)
    await close()


def test_provides_the_interfaces(tmp_path: Path) -> None:
    state = EmbeddedState(str(tmp_path))
    assert verifyObject(IGatewayState, state)
    assert verifyObject(IMailboxNodes, state.nodes)


@pytest_twisted.ensureDeferred
async def test_hit_counts_in_a_sliding_window(state: Any) -> None:
    assert await within(state.hit("w", 0.5)) == 1
    assert await within(state.hit("w", 0.5)) == 2
    assert await within(state.hit("other", 0.5)) == 1
    await deferLater(reactor, 0.7, lambda: None)
    assert await within(state.hit("w", 0.5)) == 1


@pytest_twisted.ensureDeferred
async def test_incr_get_set_delete(state: Any) -> None:
    assert await within(state.get("missing")) is None
    assert await within(state.incr("c")) == 1
    assert await within(state.incr("c", 5)) == 6
    assert await within(state.get("c")) == b"6"
    await within(state.set("k", b"\xffbinary\x00"))
    assert await within(state.get("k")) == b"\xffbinary\x00"
    await within(state.delete("k"))
    assert await within(state.get("k")) is None
    await within(state.hit("h", 10))
    await within(state.delete("h"))
    assert await within(state.hit("h", 10)) == 1


@pytest_twisted.ensureDeferred
async def test_values_and_counters_expire(state: Any) -> None:
    await within(state.set("t", b"x", 0.3))
    assert await within(state.incr("tc", 1, 0.3)) == 1
    assert await within(state.incr("tc", 1, 0.3)) == 2
    assert await within(state.get("t")) == b"x"
    await deferLater(reactor, 0.5, lambda: None)
    assert await within(state.get("t")) is None
    assert await within(state.incr("tc", 1, 0.3)) == 1


@pytest_twisted.ensureDeferred
async def test_hashes(state: Any) -> None:
    assert await within(state.hgetall("rep")) == {}
    assert await within(state.hincr("rep", "spam")) == 1
    assert await within(state.hincr("rep", "spam", 2)) == 3
    await within(state.hset("rep", "note", b"v"))
    assert await within(state.hgetall("rep")) == {"spam": b"3", "note": b"v"}
    await within(state.hdel("rep", "note"))
    assert await within(state.hgetall("rep")) == {"spam": b"3"}


@pytest_twisted.ensureDeferred
async def test_mailbox_nodes(state: Any) -> None:
    assert await within(state.nodes.get("alice@example.test")) is None
    await within(state.nodes.set("Alice@Example.test", "be2"))
    assert await within(state.nodes.get("alice@example.test")) == "be2"
    await within(state.nodes.set("alice@example.test", None))
    assert await within(state.nodes.get("alice@example.test")) is None


@pytest_twisted.ensureDeferred
async def test_config_versions_and_rollback(state: Any) -> None:
    assert await within(state.config_current()) is None
    with pytest.raises(LookupError):
        await within(state.config_rollback())
    assert await within(state.config_publish(b"one")) == 1
    assert await within(state.config_publish(b"two")) == 2
    assert await within(state.config_current()) == (2, b"two")
    assert await within(state.config_rollback()) == 1
    assert await within(state.config_current()) == (1, b"one")
    with pytest.raises(LookupError):
        await within(state.config_rollback())
    assert await within(state.config_publish(b"three")) == 3  # numbers are never reused
    await within(state.config_report("gw1", b'{"applied": 3}'))
    assert await within(state.config_nodes()) == {"gw1": b'{"applied": 3}'}
