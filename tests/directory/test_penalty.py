"""Auth penalty: the delay schedule, per-account and per-address lockouts that expire, and the
guard that answers a locked-out login exactly like a wrong password."""

from __future__ import annotations

import pytest
from twisted.cred.error import UnauthorizedLogin
from twisted.internet.task import Clock
from twisted.python.failure import Failure

from mailgw.directory import User
from mailgw.directory.penalty import (
    AuthGuard,
    MemoryAuthPenalty,
    PenalisedLogin,
    PenaltyPolicy,
    failure_delay,
)
from mailgw.testing.deferreds import fired
from mailgw.testing.fakes import FakeDirectory

POLICY = PenaltyPolicy(
    base_delay=2.0,
    max_delay=15.0,
    window=600.0,
    account_failures=5,
    address_failures=8,
    lockout=900.0,
)


def test_delay_doubles_up_to_the_cap() -> None:
    assert [POLICY.delay(n) for n in range(1, 7)] == [2.0, 4.0, 8.0, 15.0, 15.0, 15.0]
    assert PenaltyPolicy(base_delay=0.0).delay(10) == 0.0


def test_failures_counted_per_account_and_per_address() -> None:
    clock = Clock()
    penalty = MemoryAuthPenalty(clock, POLICY)
    assert penalty.record_failure("alice@x", "192.0.2.1") == 2.0
    assert penalty.record_failure("alice@x", "192.0.2.2") == 4.0  # the account's 2nd
    assert penalty.record_failure("bob@x", "192.0.2.1") == 4.0  # the address's 2nd
    assert penalty.record_failure("carol@x", "192.0.2.3") == 2.0
    assert penalty.failures(user="alice@x") == 2
    assert penalty.failures(ip="192.0.2.1") == 2


def test_account_lockout_after_n_failures_and_its_expiry() -> None:
    clock = Clock()
    penalty = MemoryAuthPenalty(clock, POLICY)
    for n in range(5):
        assert not penalty.is_locked("alice@x", "")
        penalty.record_failure("alice@x", f"192.0.2.{n}")  # from 5 addresses
        clock.advance(1.0)
    assert penalty.is_locked("alice@x", "198.51.100.1")  # any address
    assert not penalty.is_locked("bob@x", "198.51.100.1")
    clock.advance(898.0)  # locked at the 5th failure (t=4) for 900 s
    assert penalty.is_locked("alice@x", "")
    clock.advance(1.0)
    assert not penalty.is_locked("alice@x", "")


def test_address_lockout_covers_every_account() -> None:
    clock = Clock()
    penalty = MemoryAuthPenalty(clock, POLICY)
    for n in range(8):
        penalty.record_failure(f"user{n}@x", "192.0.2.9")  # one guess per account
    assert penalty.is_locked("someone-else@x", "192.0.2.9")
    assert not penalty.is_locked("someone-else@x", "192.0.2.10")


def test_failures_outside_the_window_are_forgotten() -> None:
    clock = Clock()
    penalty = MemoryAuthPenalty(clock, POLICY)
    for _ in range(4):
        penalty.record_failure("alice@x", "192.0.2.1")
        clock.advance(200.0)  # 4 failures over 800 s: never 5 within 600 s
    penalty.record_failure("alice@x", "192.0.2.1")
    assert not penalty.is_locked("alice@x", "")
    assert penalty.failures(user="alice@x") == 3


def test_success_forgets_the_account_not_the_address() -> None:
    clock = Clock()
    penalty = MemoryAuthPenalty(clock, POLICY)
    for _ in range(3):
        penalty.record_failure("alice@x", "192.0.2.1")
    penalty.record_success("alice@x", "192.0.2.1")
    assert penalty.failures(user="alice@x") == 0
    assert penalty.failures(ip="192.0.2.1") == 3


def test_sweep_drops_what_the_window_forgot() -> None:
    clock = Clock()
    penalty = MemoryAuthPenalty(clock, POLICY)
    for n in range(100):
        penalty.record_failure(f"u{n}@x", f"192.0.2.{n}")
    assert len(penalty) == 200
    clock.advance(601.0)
    penalty.sweep()
    assert len(penalty) == 0


def test_guard_locked_account_fails_like_a_wrong_password_even_with_the_right_one() -> None:
    clock = Clock()
    directory = FakeDirectory({"alice@x": "right"})
    guard = AuthGuard(directory, MemoryAuthPenalty(clock, POLICY), clock)
    delays = []
    for _ in range(5):
        failure = fired(guard.check_password("Alice@X", "wrong", "192.0.2.1"))
        assert isinstance(failure, Failure) and failure.check(UnauthorizedLogin)
        delays.append(failure_delay(failure, 0.0))
    assert delays == [2.0, 4.0, 8.0, 15.0, 15.0]
    checks = len(directory.calls)
    locked = fired(guard.check_password("alice@x", "right", "198.51.100.7"))
    assert isinstance(locked, Failure)
    assert type(locked.value) is PenalisedLogin  # the same error as a wrong password
    assert failure_delay(locked, 0.0) == 15.0
    assert len(directory.calls) == checks  # the password was not even checked
    clock.advance(900.0)
    account = fired(guard.check_password("alice@x", "right", "198.51.100.7"))
    assert account == User("alice@x", None, True)


def test_guard_passes_other_errors_through() -> None:
    clock = Clock()
    broken = FakeDirectory({"alice@x": "pw"})
    broken.error = RuntimeError("database is locked")
    penalty = MemoryAuthPenalty(clock, POLICY)
    guard = AuthGuard(broken, penalty, clock)
    failure = fired(guard.check_password("alice@x", "pw", "192.0.2.1"))
    assert isinstance(failure, Failure) and failure.check(RuntimeError)
    assert penalty.failures(user="alice@x") == 0


@pytest.mark.parametrize("ip", ["-", ""])
def test_guard_without_a_client_address_counts_the_account_only(ip: str) -> None:
    clock = Clock()
    penalty = MemoryAuthPenalty(clock, POLICY)
    guard = AuthGuard(FakeDirectory({"alice@x": "right"}), penalty, clock)
    fired(guard.check_password("bob@x", "pw", ip))
    assert penalty.failures(user="bob@x") == 1 and len(penalty) == 1
