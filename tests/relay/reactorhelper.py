"""The real (global) reactor for the relay client tests, run by pytest-twisted.

The relay client's tests talk to real servers on loopback ports (SMTP with TLS, DNS over UDP
and TCP): pytest-twisted runs the reactor, the tests are ``async def`` functions marked
``@pytest_twisted.ensureDeferred`` that ``await`` what the code under test returns, and the
fixtures that stop listeners are ``pytest_twisted.async_yield_fixture``s.

``within(d)`` waits for a Deferred and ``until(predicate)`` for a condition, each with a
deadline, so that a test whose Deferred never fires fails with ``TimeoutError`` instead of
hanging the run (pytest-timeout cannot interrupt a reactor waiting in the other greenlet).
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

from twisted.internet import reactor as _reactor
from twisted.internet.defer import Deferred
from twisted.internet.task import deferLater

T = TypeVar("T")
reactor: Any = _reactor


async def within(d: Deferred[T], timeout: float = 10.0) -> T:
    """The result of ``d``; ``TimeoutError`` (and ``d`` cancelled) if it has not fired in
    ``timeout`` seconds."""
    return await d.addTimeout(timeout, reactor)


def sleep(seconds: float) -> Awaitable[None]:
    """Let the reactor run for ``seconds`` (0: one turn)."""
    return deferLater(reactor, seconds)


async def until(predicate: Callable[[], bool], timeout: float = 10.0) -> None:
    """Let the reactor run until ``predicate()`` is true."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError(f"condition not met within {timeout}s")
        await sleep(0.01)
