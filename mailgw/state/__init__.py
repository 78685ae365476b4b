"""The gateway state (``IGatewayState``): what the gateways of a cluster share, embedded on
one node or in Redis; ``build_state`` makes a node's from ``[state]``.

- ``mailgw.state.embedded``: ``EmbeddedState`` (memory + SQLite under ``data_dir``).
- ``mailgw.state.redis``: ``RedisState`` (txredisapi; a Redis server or Sentinels).
- ``mailgw.state.failover``: ``FailoverState``, Redis with the embedded state behind it.
- ``mailgw.state.unified``: the unified configuration (versions, the node that follows them).

The small API other parts use (every call a Deferred): ``hit(key, window)`` (sliding-window
count, atomic across gateways), ``incr(key, amount, ttl)``, ``get``/``set(key, value, ttl)``/
``delete``, hashes ``hincr``/``hset``/``hgetall``/``hdel``, and ``nodes`` (``IMailboxNodes``:
``get(user)`` -> backend node name or None, ``set(user, node)``). Key names are free text;
use a prefix per user of the state (``rate:``, ``auth:``, ``rep:`` for reputation...).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from twisted.application import service

from mailgw.state.embedded import EmbeddedState


@dataclass
class StateSetup:
    """A node's gateway state and what runs it."""

    state: Any
    local: EmbeddedState
    redis: bool = False
    closers: list[Any] = field(default_factory=list)


class StateService(service.Service):
    """Stops the Redis connections and the failover probe with the node."""

    def __init__(self, setup: StateSetup) -> None:
        self.setup = setup

    def stopService(self) -> Any:
        from twisted.internet import defer

        super().stopService()  # type: ignore[no-untyped-call]
        stop = getattr(self.setup.state, "stop", None)
        if callable(stop):
            stop()
        ds = [defer.maybeDeferred(close) for close in self.setup.closers]
        return defer.DeferredList(ds, consumeErrors=True)


def build_state(config: Any, reactor: Any) -> StateSetup:
    """The gateway state of ``[state]`` (``config``: a ``Config``): embedded, or Redis (a
    server or Sentinels) with the embedded one behind it."""
    local = EmbeddedState(config.server.data_dir, reactor)
    sc = config.state
    if sc.backend != "redis":
        return StateSetup(local, local)
    from mailgw.state.failover import FailoverState
    from mailgw.state.redis import RedisState, connect_redis

    handler, close = connect_redis(sc, sc.timeout)
    where = (
        f"Redis master {sc.master_name} (Sentinels {' '.join(sc.sentinels)})"
        if sc.sentinels
        else f"Redis {sc.redis}"
    )
    state = FailoverState(RedisState(handler), local, reactor, sc.timeout, where=where)
    return StateSetup(state, local, redis=True, closers=[close])
