"""Redis with a local fallback: ``FailoverState`` answers every call from Redis within
``[state] timeout``, else from the embedded state, until Redis answers again.

A call that fails (connection lost, timeout, Redis refusing writes while it loads or after a
failover) marks Redis down, logged once, and is answered locally; while down, every call is
local (no waiting) and a PING every ``probe_interval`` seconds looks for Redis. When it
answers, Redis is up again (logged) and ``on_recover`` callbacks run (the unified config
resynchronises). Counters counted locally meanwhile stay local: the shared ones resume from
what Redis holds. The mailbox nodes read from Redis are remembered, so that a node known
before the outage is still found during it.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from twisted.internet import defer, task
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from mailgw.interfaces import IGatewayState, IMailboxNodes

log = Logger(namespace="mailgw.state")

UNAVAILABLE = ("LOADING", "READONLY", "MASTERDOWN", "NOREPLICAS", "TRYAGAIN", "CLUSTERDOWN")
"""Redis error replies that mean "not now" (answered locally), not a wrong command."""
MAX_REMEMBERED = 100_000
"""Mailbox nodes remembered from Redis for an outage."""


class StateTimeout(Exception):
    """Redis did not answer within ``[state] timeout``."""


def with_timeout(d: defer.Deferred[Any], seconds: float, clock: Any) -> defer.Deferred[Any]:
    """A Deferred with ``d``'s outcome, or failing with ``StateTimeout`` after ``seconds``
    (``d`` is left to finish, its outcome then ignored)."""
    out: defer.Deferred[Any] = defer.Deferred()

    def expire() -> None:
        if not out.called:
            out.errback(StateTimeout(f"no answer from Redis in {seconds}s"))

    call = clock.callLater(seconds, expire)

    def done(result: Any) -> None:
        if call.active():
            call.cancel()
        if not out.called:
            if isinstance(result, Failure):
                out.errback(result)
            else:
                out.callback(result)

    d.addBoth(done)
    return out


def _unavailable(failure: Failure) -> bool:
    """Whether ``failure`` means Redis cannot answer now (rather than a bad command)."""
    import txredisapi

    if failure.check(txredisapi.ResponseError):
        args = getattr(failure.value, "args", ())
        text = args[0] if args else ""
        if isinstance(text, bytes):
            text = text.decode(errors="replace")
        return str(text).upper().startswith(UNAVAILABLE)
    return not failure.check(LookupError)  # an answer (no previous config version)


@implementer(IMailboxNodes)
class FailoverNodes:
    """``IMailboxNodes`` of a ``FailoverState``."""

    def __init__(self, state: FailoverState) -> None:
        self.state = state
        self.known: dict[str, str | None] = {}

    def get(self, user: str) -> defer.Deferred[str | None]:
        key = user.lower()

        def remember(node: str | None) -> str | None:
            if len(self.known) >= MAX_REMEMBERED:
                self.known.clear()
            self.known[key] = node
            return node

        def local() -> defer.Deferred[str | None]:
            if key in self.known:
                return defer.succeed(self.known[key])
            d: defer.Deferred[str | None] = self.state.local.nodes.get(user)
            return d

        return self.state.call(lambda s: s.nodes.get(user).addCallback(remember), local)

    def set(self, user: str, node: str | None) -> defer.Deferred[None]:
        self.known.pop(user.lower(), None)

        def both(s: Any) -> defer.Deferred[None]:
            d: defer.Deferred[None] = s.nodes.set(user, node)
            return d.addCallback(lambda _: self.state.local.nodes.set(user, node))

        return self.state.call(both, lambda: self.state.local.nodes.set(user, node))


@implementer(IGatewayState)
class FailoverState:
    """``remote`` (a ``RedisState``) with ``local`` (an ``EmbeddedState``) behind it (see the
    module docstring)."""

    def __init__(
        self,
        remote: Any,
        local: Any,
        clock: Any,
        timeout: float = 0.5,
        probe_interval: float = 1.0,
        where: str = "Redis",
    ) -> None:
        self.remote = remote
        self.local = local
        self.clock = clock
        self.timeout = timeout
        self.probe_interval = probe_interval
        self.where = where
        self.up = True
        self.nodes = FailoverNodes(self)
        self.on_recover: list[Callable[[], None]] = []
        self._probe: task.LoopingCall | None = None
        self._probing = False

    # -- the switch ------------------------------------------------------------------------------

    def call(
        self,
        remote: Callable[[Any], defer.Deferred[Any]],
        local: Callable[[], defer.Deferred[Any]],
    ) -> defer.Deferred[Any]:
        """``remote(self.remote)`` within the timeout while Redis is up, else ``local()``."""
        if not self.up:
            return local()
        try:
            d = with_timeout(remote(self.remote), self.timeout, self.clock)
        except Exception:
            d = defer.fail()

        def failed(failure: Failure) -> Any:
            if not _unavailable(failure):
                return failure
            self.mark_down(failure.getErrorMessage())
            return local()

        return d.addErrback(failed)

    def _both(self, name: str, *args: Any) -> defer.Deferred[Any]:
        return self.call(
            lambda s: getattr(s, name)(*args), lambda: getattr(self.local, name)(*args)
        )

    def mark_down(self, why: str) -> None:
        if not self.up:
            return
        self.up = False
        log.error(
            "gateway state: {where} unreachable ({why}): using local counters and the "
            "last-good configuration until it answers again",
            where=self.where,
            why=why,
        )
        self.start_probe()

    def start_probe(self) -> None:
        if self._probe is None or not self._probe.running:
            self._probe = task.LoopingCall(self._ping)
            self._probe.clock = self.clock
            self._probe.start(self.probe_interval, now=False)

    def stop(self) -> None:
        if self._probe is not None and self._probe.running:
            self._probe.stop()

    def _ping(self) -> None:
        if self._probing:
            return
        self._probing = True
        d = with_timeout(self.remote.ping(), max(self.timeout, self.probe_interval), self.clock)

        def back(_: object) -> None:
            self._probing = False
            if self.up:
                return
            self.up = True
            self.stop()
            log.info("gateway state: {where} answers again: shared state resumed", where=self.where)
            for callback in list(self.on_recover):
                try:
                    callback()
                except Exception:
                    log.failure("gateway state: resynchronising failed")

        def still_down(_: Failure) -> None:
            self._probing = False

        d.addCallbacks(back, still_down)

    # -- IGatewayState ---------------------------------------------------------------------------

    def hit(self, key: str, window: float) -> defer.Deferred[int]:
        return self._both("hit", key, window)

    def incr(self, key: str, amount: int = 1, ttl: float = 0) -> defer.Deferred[int]:
        return self._both("incr", key, amount, ttl)

    def get(self, key: str) -> defer.Deferred[bytes | None]:
        return self._both("get", key)

    def set(self, key: str, value: bytes, ttl: float = 0) -> defer.Deferred[None]:
        return self._both("set", key, value, ttl)

    def delete(self, key: str) -> defer.Deferred[None]:
        return self._both("delete", key)

    def hincr(self, name: str, field: str, amount: int = 1) -> defer.Deferred[int]:
        return self._both("hincr", name, field, amount)

    def hset(self, name: str, field: str, value: bytes) -> defer.Deferred[None]:
        return self._both("hset", name, field, value)

    def hgetall(self, name: str) -> defer.Deferred[dict[str, bytes]]:
        return self._both("hgetall", name)

    def hdel(self, name: str, field: str) -> defer.Deferred[None]:
        return self._both("hdel", name, field)

    # The unified configuration lives in Redis only: these fail while it is down (the node
    # then keeps its last-good version from disk).

    def _remote_only(self, name: str, *args: Any) -> defer.Deferred[Any]:
        def unavailable() -> defer.Deferred[Any]:
            return defer.fail(StateTimeout(f"{self.where} unreachable"))

        return self.call(lambda s: getattr(s, name)(*args), unavailable)

    def config_publish(self, blob: bytes) -> defer.Deferred[int]:
        return self._remote_only("config_publish", blob)

    def config_current(self) -> defer.Deferred[tuple[int, bytes] | None]:
        return self._remote_only("config_current")

    def config_rollback(self) -> defer.Deferred[int]:
        return self._remote_only("config_rollback")

    def config_report(self, node: str, info: bytes) -> defer.Deferred[None]:
        return self._remote_only("config_report", node, info)

    def config_nodes(self) -> defer.Deferred[dict[str, bytes]]:
        return self._remote_only("config_nodes")
