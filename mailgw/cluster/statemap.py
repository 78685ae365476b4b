"""The user -> backend node map kept in the gateway state (``IMailboxMap`` on ``IGatewayState``).

With ``[state] backend = redis`` the gateways share their map through Redis (the state's
``nodes``: the hash ``mailgw:mailbox-nodes``), not through a shared directory file. A user
without a recorded node gets the stable hash of ``mailgw.cluster.nodemap.hashed_node`` (the
same on every gateway), written down at first use; a hold (``mailgw user move``) is the state
key ``mailbox-held:USER``. While Redis is away ``FailoverState`` answers from what it last
read (and its embedded state), so mail keeps its route.

``IMailboxMap`` calls block: called from a thread (the relay, the local delivery and nginx's
``auth_http`` look up in the I/O pool), they run the state's Deferreds on the reactor and wait
for the outcome. A state that answers at once (the embedded one) also answers in the reactor
thread or with no reactor.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from typing import Any

from twisted.internet import defer
from twisted.python import threadable
from twisted.python.failure import Failure
from zope.interface import implementer

from mailgw.cluster.nodemap import hashed_node
from mailgw.interfaces import IMailboxMap

MAX_WAIT = 10.0
"""Seconds a blocking call waits for the state at most without a ``timeout`` (the failover
state answers within ``[state] timeout``: this only bounds a reactor that went away)."""
HELD_PREFIX = "mailbox-held:"
"""State key (``HELD_PREFIX + user``) present while the user's mailbox is being moved."""


@implementer(IMailboxMap)
class StateMailboxMap:
    """``IMailboxMap`` on the gateway state ``state`` (an ``IGatewayState``; see the module
    docstring); ``reactor`` runs its calls; ``close`` is called by ``close()``;
    ``timeout``: seconds a blocking call waits at most (None: ``MAX_WAIT``)."""

    def __init__(
        self,
        state: Any,
        nodes: Sequence[str],
        reactor: Any = None,
        close: Callable[[], Any] | None = None,
        timeout: float | None = None,
    ) -> None:
        if not nodes:
            raise ValueError("no mailbox nodes configured")
        self.state = state
        self.nodes = tuple(nodes)
        self.reactor = reactor
        self._close = close
        self.timeout = timeout

    # -- the Deferred API (reactor thread) ---------------------------------------------------------

    def get_d(self, user: str) -> defer.Deferred[str]:
        """The node of ``user``, assigned (stable hash) and recorded on first use."""

        def found(node: str | None) -> Any:
            if node is not None:
                return node
            node = hashed_node(user, self.nodes)
            return self.state.nodes.set(user, node).addCallback(lambda _: node)

        d: defer.Deferred[Any] = self.state.nodes.get(user)
        return d.addCallback(found)

    def held_d(self, user: str) -> defer.Deferred[bool]:
        d: defer.Deferred[Any] = self.state.get(HELD_PREFIX + user.lower())
        return d.addCallback(lambda value: bool(value))

    def set_node_d(self, user: str, node: str) -> defer.Deferred[None]:
        if node not in self.nodes:
            return defer.fail(
                ValueError(f"unknown node {node!r} (mailbox_nodes: {' '.join(self.nodes)})")
            )
        d: defer.Deferred[None] = self.state.nodes.set(user, node)
        return d

    def set_held_d(self, user: str, held: bool) -> defer.Deferred[None]:
        key = HELD_PREFIX + user.lower()

        def pinned(_: object) -> Any:  # a hold keeps the user where it is: record the node
            if held:
                return self.state.set(key, b"1")
            return self.state.delete(key)

        return self.get_d(user).addCallback(pinned).addCallback(lambda _: None)

    # -- IMailboxMap (blocking) ----------------------------------------------------------------

    def _wait(self, call: Callable[[], defer.Deferred[Any]]) -> Any:
        reactor = self.reactor
        if reactor is not None and reactor.running and not threadable.isInIOThread():  # type: ignore[no-untyped-call]
            return self._from_thread(reactor, call)
        out: list[Any] = []
        call().addBoth(out.append)
        if not out:
            raise RuntimeError("the gateway state answers later: call the mailbox map in a thread")
        if isinstance(out[0], Failure):
            out[0].raiseException()
        return out[0]

    def _from_thread(self, reactor: Any, call: Callable[[], defer.Deferred[Any]]) -> Any:
        """``call()`` run in the reactor thread, its outcome waited for here at most
        ``timeout`` (else ``MAX_WAIT``) seconds: a reactor that stops meanwhile (the node
        joins its I/O threads when it stops) does not leave this thread waiting forever."""
        done = threading.Event()
        out: list[Any] = []

        def finished(result: Any) -> None:
            out.append(result)
            done.set()

        reactor.callFromThread(lambda: defer.maybeDeferred(call).addBoth(finished))
        wait = self.timeout if self.timeout is not None else MAX_WAIT
        if not done.wait(wait):
            raise TimeoutError(f"no answer from the gateway state in {wait:g}s")
        if isinstance(out[0], Failure):
            out[0].raiseException()
        return out[0]

    def get(self, user: str) -> str:
        return str(self._wait(lambda: self.get_d(user)))

    def held(self, user: str) -> bool:
        return bool(self._wait(lambda: self.held_d(user)))

    def set_node(self, user: str, node: str) -> None:
        self._wait(lambda: self.set_node_d(user, node))

    def set_held(self, user: str, held: bool) -> None:
        self._wait(lambda: self.set_held_d(user, held))

    def close(self) -> None:
        if self._close is not None:
            self._close()
