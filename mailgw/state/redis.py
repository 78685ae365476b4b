"""The gateway state in Redis through txredisapi, shared by every gateway: ``RedisState``;
the connections to a Redis server or to the master named by Redis Sentinels
(``connect_redis``), and the pub/sub subscription of the unified config (``subscribe``).

Every key starts with ``mailgw:``. Connections use ``convertNumbers=False, charset=None``
(values are bytes, counters int), and reconnect on their own. A command waits while Redis is
unreachable: ``FailoverState`` (``mailgw.state.failover``) puts a timeout around each call.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

import txredisapi
from twisted.internet import defer
from twisted.internet.endpoints import HostnameEndpoint
from twisted.logger import Logger
from zope.interface import implementer

from mailgw.config.values import parse_host_port
from mailgw.interfaces import IGatewayState, IMailboxNodes

log = Logger(namespace="mailgw.state")

PREFIX = "mailgw:"
CONFIG_CHANNEL = PREFIX + "config:changed"
"""Pub/sub channel: the version number made current (a push or a rollback)."""
HIT_CAP = 100_000
"""Events kept per ``hit`` window (the count saturates there)."""

# Sliding window on the server's clock (microseconds): one atomic script per event.
_HIT = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local window = tonumber(ARGV[1])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now - window)
redis.call('ZADD', KEYS[1], now, now .. ':' .. ARGV[2])
local n = redis.call('ZCARD', KEYS[1])
local cap = tonumber(ARGV[3])
if n > cap then
  redis.call('ZPOPMIN', KEYS[1], n - cap)
  n = cap
end
redis.call('PEXPIRE', KEYS[1], math.ceil(window / 1000))
return n
"""
_INCR = """
local v = redis.call('INCRBY', KEYS[1], ARGV[1])
if tonumber(ARGV[2]) > 0 and redis.call('PTTL', KEYS[1]) == -1 then
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
end
return v
"""
# KEYS: seq, version key prefix, history; ARGV: blob, channel
_PUBLISH = """
local v = redis.call('INCR', KEYS[1])
redis.call('SET', KEYS[2] .. v, ARGV[1])
redis.call('RPUSH', KEYS[3], v)
redis.call('PUBLISH', ARGV[2], v)
return v
"""
# KEYS: history; ARGV: channel
_ROLLBACK = """
if redis.call('LLEN', KEYS[1]) < 2 then return -1 end
redis.call('RPOP', KEYS[1])
local v = redis.call('LINDEX', KEYS[1], -1)
redis.call('PUBLISH', ARGV[1], v)
return tonumber(v)
"""
# KEYS: history, version key prefix
_CURRENT = """
local v = redis.call('LINDEX', KEYS[1], -1)
if not v then return nil end
return {v, redis.call('GET', KEYS[2] .. v)}
"""


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _bytes(value: Any) -> bytes:
    return value if isinstance(value, bytes) else str(value).encode()


@implementer(IMailboxNodes)
class RedisMailboxNodes:
    """``IMailboxNodes`` in the Redis hash ``mailgw:mailbox-nodes``."""

    KEY = PREFIX + "mailbox-nodes"

    def __init__(self, redis: Any) -> None:
        self.redis = redis

    def get(self, user: str) -> defer.Deferred[str | None]:
        d: defer.Deferred[Any] = self.redis.execute_command("HGET", self.KEY, user.lower())
        return d.addCallback(lambda v: None if v is None else _text(v))

    def set(self, user: str, node: str | None) -> defer.Deferred[None]:
        if node is None:
            d: defer.Deferred[Any] = self.redis.execute_command("HDEL", self.KEY, user.lower())
        else:
            d = self.redis.execute_command("HSET", self.KEY, user.lower(), node)
        return d.addCallback(lambda _: None)


@implementer(IGatewayState)
class RedisState:
    """``IGatewayState`` on the txredisapi connection ``redis`` (see the module docstring)."""

    def __init__(self, redis: Any) -> None:
        self.redis = redis
        self.nodes = RedisMailboxNodes(redis)
        self._token = f"{os.getpid()}-{os.urandom(4).hex()}"
        self._seq = 0

    def _cmd(self, *args: Any) -> defer.Deferred[Any]:
        d: defer.Deferred[Any] = self.redis.execute_command(*args)
        return d

    def _eval(self, script: str, keys: list[str], args: list[Any]) -> defer.Deferred[Any]:
        return self._cmd("EVAL", script, len(keys), *keys, *args)

    def ping(self) -> defer.Deferred[Any]:
        return self._cmd("PING")

    # -- counters and values -------------------------------------------------------------------

    def hit(self, key: str, window: float) -> defer.Deferred[int]:
        self._seq += 1
        micros = max(1, int(window * 1_000_000))
        d = self._eval(_HIT, [PREFIX + key], [micros, f"{self._token}-{self._seq}", HIT_CAP])
        return d.addCallback(int)

    def incr(self, key: str, amount: int = 1, ttl: float = 0) -> defer.Deferred[int]:
        ms = int(ttl * 1000) if ttl > 0 else 0
        return self._eval(_INCR, [PREFIX + key], [amount, ms]).addCallback(int)

    def get(self, key: str) -> defer.Deferred[bytes | None]:
        return self._cmd("GET", PREFIX + key).addCallback(
            lambda v: None if v is None else _bytes(v)
        )

    def set(self, key: str, value: bytes, ttl: float = 0) -> defer.Deferred[None]:
        if ttl > 0:
            d = self._cmd("SET", PREFIX + key, value, "PX", max(1, int(ttl * 1000)))
        else:
            d = self._cmd("SET", PREFIX + key, value)
        return d.addCallback(lambda _: None)

    def delete(self, key: str) -> defer.Deferred[None]:
        return self._cmd("DEL", PREFIX + key).addCallback(lambda _: None)

    # -- hashes ----------------------------------------------------------------------------------

    def hincr(self, name: str, field: str, amount: int = 1) -> defer.Deferred[int]:
        return self._cmd("HINCRBY", PREFIX + name, field, amount).addCallback(int)

    def hset(self, name: str, field: str, value: bytes) -> defer.Deferred[None]:
        return self._cmd("HSET", PREFIX + name, field, value).addCallback(lambda _: None)

    def hgetall(self, name: str) -> defer.Deferred[dict[str, bytes]]:
        def pairs(flat: Any) -> dict[str, bytes]:
            if isinstance(flat, dict):
                return {_text(k): _bytes(v) for k, v in flat.items()}
            items = list(flat or [])
            return {_text(items[i]): _bytes(items[i + 1]) for i in range(0, len(items) - 1, 2)}

        return self._cmd("HGETALL", PREFIX + name).addCallback(pairs)

    def hdel(self, name: str, field: str) -> defer.Deferred[None]:
        return self._cmd("HDEL", PREFIX + name, field).addCallback(lambda _: None)

    # -- the unified configuration -------------------------------------------------------------

    _SEQ = PREFIX + "config:seq"
    _VERSION = PREFIX + "config:version:"
    _HISTORY = PREFIX + "config:history"
    _NODES = PREFIX + "config:nodes"

    def config_publish(self, blob: bytes) -> defer.Deferred[int]:
        keys = [self._SEQ, self._VERSION, self._HISTORY]
        return self._eval(_PUBLISH, keys, [blob, CONFIG_CHANNEL]).addCallback(int)

    def config_current(self) -> defer.Deferred[tuple[int, bytes] | None]:
        def current(reply: Any) -> tuple[int, bytes] | None:
            if not reply or reply[1] is None:
                return None
            return int(reply[0]), _bytes(reply[1])

        return self._eval(_CURRENT, [self._HISTORY, self._VERSION], []).addCallback(current)

    def config_rollback(self) -> defer.Deferred[int]:
        def done(version: Any) -> int:
            if int(version) < 0:
                raise LookupError("no previous version to return to")
            return int(version)

        return self._eval(_ROLLBACK, [self._HISTORY], [CONFIG_CHANNEL]).addCallback(done)

    def config_report(self, node: str, info: bytes) -> defer.Deferred[None]:
        return self._cmd("HSET", self._NODES, node, info).addCallback(lambda _: None)

    def config_nodes(self) -> defer.Deferred[dict[str, bytes]]:
        return self.hgetall(self._NODES[len(PREFIX) :])


# -- connections ---------------------------------------------------------------------------------


class _TunedSentinelProtocol(txredisapi.SentinelRedisProtocol):  # type: ignore[misc]
    """Checks the master's role with bytes replies too (``charset=None``)."""

    def connectionMade(self) -> Any:
        def check_role(role: Any) -> Any:
            if self.factory.is_master and _text(role[0]) != "master":
                self.transport.loseConnection()
                return None
            return txredisapi.RedisProtocol.connectionMade(self)

        if self.password is not None:
            self.auth(self.password, self.username)
        return self.role().addCallback(check_role)


class _TunedSentinelFactory(txredisapi.SentinelConnectionFactory):  # type: ignore[misc]
    """Reconnects quickly after a failover (``docs/operations.md``: ~2-3.5 s)."""

    protocol = _TunedSentinelProtocol
    initialDelay = 0.2
    maxDelay = 1.0


def _addresses(items: tuple[str, ...]) -> list[tuple[str, int]]:
    return [parse_host_port(item) for item in items]


def connect_redis(config: Any, timeout: float) -> tuple[Any, Callable[[], Any]]:
    """A lazy txredisapi connection for ``[state]`` (``config``: a ``StateConfig``), and
    the function that closes it. ``timeout``: connect timeout in seconds."""
    kwargs: dict[str, Any] = {"charset": None, "convertNumbers": False}
    if config.sentinels:
        sentinel = txredisapi.Sentinel(_addresses(config.sentinels))
        sentinel.discovery_timeout = 0.5
        handler = sentinel.master_for(
            config.master_name, factory_class=_TunedSentinelFactory, poolsize=2, **kwargs
        )

        def close() -> Any:
            d = handler.disconnect()
            sentinel.disconnect()
            return d

        return handler, close
    from twisted.internet import reactor

    host, port = _addresses((config.redis,))[0]
    factory = _TunedFactory(
        f"{host}:{port}", None, 2, True, txredisapi.ConnectionHandler, None, None, None, False
    )
    factory.startConnecting(HostnameEndpoint(reactor, host, port, timeout=max(1, int(timeout))))
    handler = factory.handler
    return handler, handler.disconnect


class _TunedFactory(txredisapi.RedisFactory):  # type: ignore[misc]
    """Reconnects within a second once Redis is back (defaults: up to 10 s)."""

    initialDelay = 0.2
    maxDelay = 1.0


class _Subscriber(txredisapi.SubscriberProtocol):  # type: ignore[misc]
    """Subscribes to ``CONFIG_CHANNEL`` on every (re)connection and hands each message (and
    each connection, which may follow missed messages) to the factory's ``on_message``."""

    def connectionMade(self) -> Any:
        d = defer.maybeDeferred(super().connectionMade)

        def subscribed(_: object) -> None:
            self.factory.on_message(None)

        def ready(_: object) -> Any:
            return self.subscribe(CONFIG_CHANNEL).addCallback(subscribed)

        self.whenConnected().addCallback(ready).addErrback(
            lambda f: log.warn("config subscription failed: {e}", e=f.getErrorMessage())
        )
        return d

    def messageReceived(self, pattern: Any, channel: Any, message: Any) -> None:
        try:
            version = int(_text(message))
        except ValueError:
            return
        self.factory.on_message(version)


class _SentinelSubscriber(_Subscriber, _TunedSentinelProtocol):
    pass


class _SubscriberFactory(txredisapi.SubscriberFactory):  # type: ignore[misc]
    protocol = _Subscriber
    initialDelay = 0.2
    maxDelay = 1.0


class _SentinelSubscriberFactory(_TunedSentinelFactory):
    protocol = _SentinelSubscriber


def subscribe(
    config: Any, reactor: Any, timeout: float, on_message: Callable[[int | None], None]
) -> Callable[[], Any]:
    """Follow the unified config's channel: ``on_message(version)`` for each message,
    ``on_message(None)`` after each (re)connection; returns the function that stops it."""
    if config.sentinels:
        sentinel = txredisapi.Sentinel(_addresses(config.sentinels))
        sentinel.discovery_timeout = 0.5
        handler = sentinel.master_for(config.master_name, factory_class=_SentinelSubscriberFactory)
        handler._factory.on_message = on_message

        def close() -> Any:
            d = handler.disconnect()
            sentinel.disconnect()
            return d

        return close
    host, port = _addresses((config.redis,))[0]
    factory = _SubscriberFactory()
    factory.on_message = on_message
    factory.startConnecting(HostnameEndpoint(reactor, host, port, timeout=max(1, int(timeout))))
    stop: Callable[[], Any] = factory.disconnect
    return stop
