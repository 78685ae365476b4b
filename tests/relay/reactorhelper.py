"""Drive the real (global) reactor from plain pytest tests, without trial or pytest-twisted.

``spin(d)`` iterates the reactor until the Deferred fires (or a deadline passes) and returns
its result or raises its failure. The reactor is never ``run()``, so tests stay independent:
each one starts its listeners, spins, and stops them by ``spin(port.stopListening())``.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any, TypeVar

from twisted.internet import reactor as _reactor
from twisted.internet.defer import Deferred
from twisted.python.failure import Failure

T = TypeVar("T")
reactor: Any = _reactor


def spin(d: Deferred[T] | Any, timeout: float = 10.0) -> T:
    """Iterate the reactor until ``d`` fires; return its result or raise its exception."""
    box: list[Any] = []
    d.addBoth(box.append)
    deadline = time.monotonic() + timeout
    while not box:
        if time.monotonic() > deadline:
            raise TimeoutError(f"Deferred did not fire within {timeout}s")
        reactor.iterate(0.01)
    result = box[0]
    if isinstance(result, Failure):
        result.raiseException()
    return result  # type: ignore[no-any-return]


def spin_until(predicate: Callable[[], bool], timeout: float = 10.0) -> None:
    """Iterate the reactor until ``predicate()`` is true."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError(f"condition not met within {timeout}s")
        reactor.iterate(0.01)
