"""Fixtures for the directory tests: a reactor whose thread pool runs jobs when told."""

from __future__ import annotations

import pytest
from twisted.python.failure import Failure


class QueuedThreadPool:
    """Runs jobs only when asked, so tests see what happens before and after the thread."""

    def __init__(self) -> None:
        self.jobs: list[tuple] = []

    def callInThreadWithCallback(self, on_result, func, *args, **kwargs) -> None:
        self.jobs.append((on_result, func, args, kwargs))

    def run_all(self) -> None:
        while self.jobs:
            on_result, func, args, kwargs = self.jobs.pop(0)
            try:
                result = func(*args, **kwargs)
            except BaseException:
                on_result(False, Failure())
            else:
                on_result(True, result)


class FakeReactor:
    def __init__(self) -> None:
        self.pool = QueuedThreadPool()

    def getThreadPool(self) -> QueuedThreadPool:
        return self.pool

    def callFromThread(self, f, *args, **kwargs) -> None:
        f(*args, **kwargs)


@pytest.fixture
def reactor() -> FakeReactor:
    return FakeReactor()
