"""Where blocking file work runs: inline (tests, tools) or in a thread pool (the server).

A *runner* is ``run(function, *args) -> Deferred`` firing (in the reactor thread) with the
function's result or failing with its exception. The spool and local delivery take one, so
their ``open``/``fsync``/``rename`` calls leave the reactor thread in the server while unit
tests stay synchronous and deterministic.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

from twisted.internet.defer import Deferred, maybeDeferred
from twisted.internet.threads import deferToThreadPool
from twisted.python.threadpool import ThreadPool

T = TypeVar("T")

Runner = Callable[..., "Deferred[Any]"]


def run_inline(function: Callable[..., T], *args: Any) -> Deferred[T]:
    """Run ``function(*args)`` now, in the calling thread; an already fired Deferred."""
    return maybeDeferred(function, *args)


def pool_runner(reactor: Any, pool: ThreadPool) -> Runner:
    """A runner doing the work in ``pool`` and firing the Deferred in the reactor thread."""

    def run(function: Callable[..., T], *args: Any) -> Deferred[T]:
        return deferToThreadPool(reactor, pool, function, *args)

    return run
