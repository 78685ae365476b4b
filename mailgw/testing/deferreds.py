"""What a Deferred that has already fired holds, for tests of code that answers at once (a
fake directory, a ``Clock``, an inline runner): no reactor needs to run.

- ``fired(d)``: its result, or its ``Failure`` (which is then handled);
- ``result_of(d)``: its result, its failure raised.

Both fail the test with ``AssertionError`` when ``d`` has not fired yet.
"""

from __future__ import annotations

from typing import Any, TypeVar

from twisted.internet.defer import Deferred
from twisted.python.failure import Failure

T = TypeVar("T")


def fired(d: Deferred[Any]) -> Any:
    """The result of ``d``, or the ``Failure`` it failed with (handled: no "Unhandled error
    in Deferred" later)."""
    box: list[Any] = []
    d.addBoth(box.append)
    assert box, f"the Deferred has not fired: {d!r}"
    return box[0]


def result_of(d: Deferred[T]) -> T:
    """The result of ``d``; its failure is raised."""
    result = fired(d)
    if isinstance(result, Failure):
        result.raiseException()
    return result  # type: ignore[no-any-return]
