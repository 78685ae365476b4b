"""Fixtures for POP3 tests: a factory over in-memory fakes and a Clock (see pop3_fakes)."""

from __future__ import annotations

import pytest

from tests.pop3.pop3_fakes import Env


@pytest.fixture
def env() -> Env:
    return Env()
