"""``FailoverState``: Redis calls under a timeout, the local state while Redis is away (logged
once), a probe that notices Redis again; and the adapters on the state (shared rate counter,
shared auth penalty)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import txredisapi
from twisted.internet import defer
from twisted.internet.task import Clock
from twisted.logger import LogLevel, globalLogPublisher
from twisted.python.failure import Failure

from mailgw.directory.penalty import PenaltyPolicy, StateAuthPenalty
from mailgw.policy.ratelimit import StateRateCounter
from mailgw.state.embedded import EmbeddedState
from mailgw.state.failover import FailoverState, StateTimeout, with_timeout


class FakeRemote:
    """A remote state whose calls hang (``mode = "hang"``), fail, or answer from an
    embedded state of its own."""

    def __init__(self, tmp: Path, clock: Clock) -> None:
        self.inner = EmbeddedState(str(tmp / "remote"), clock)
        self.nodes = self.inner.nodes
        self.mode = "up"
        self.calls = 0
        self.pending: list[defer.Deferred[Any]] = []

    def _answer(self, name: str, *args: Any) -> defer.Deferred[Any]:
        self.calls += 1
        if self.mode == "hang":
            d: defer.Deferred[Any] = defer.Deferred()
            self.pending.append(d)
            return d
        if self.mode == "refused":
            return defer.fail(txredisapi.ConnectionError("connection refused"))
        if self.mode == "wrongtype":
            return defer.fail(txredisapi.ResponseError("WRONGTYPE Operation against a key"))
        if self.mode == "loading":
            return defer.fail(txredisapi.ResponseError(b"LOADING Redis is loading"))
        result: defer.Deferred[Any] = getattr(self.inner, name)(*args)
        return result

    def ping(self) -> defer.Deferred[Any]:
        return self._answer("ping_")

    def __getattr__(self, name: str) -> Any:
        return lambda *args: self._answer(name, *args)


@pytest.fixture
def setup(tmp_path: Path) -> tuple[FailoverState, FakeRemote, Clock, list[str]]:
    clock = Clock()
    remote = FakeRemote(tmp_path, clock)
    remote.inner.ping_ = lambda: defer.succeed(b"PONG")  # type: ignore[attr-defined]
    state = FailoverState(remote, EmbeddedState(str(tmp_path / "local"), clock), clock, 0.5)
    logged: list[str] = []

    def observe(event: dict[str, Any]) -> None:
        if event.get("log_namespace") == "mailgw.state" and "log_format" in event:
            text = event["log_format"].format(**event)
            logged.append(f"{event['log_level'].name}: {text}")

    globalLogPublisher.addObserver(observe)
    yield state, remote, clock, logged  # type: ignore[misc]
    globalLogPublisher.removeObserver(observe)
    state.stop()


def result(d: defer.Deferred[Any]) -> Any:
    out: list[Any] = []
    d.addBoth(out.append)
    assert out, "the Deferred has not fired"
    if isinstance(out[0], Failure):
        out[0].raiseException()
    return out[0]


def test_with_timeout_fails_after_the_delay_and_ignores_a_late_answer() -> None:
    clock = Clock()
    inner: defer.Deferred[int] = defer.Deferred()
    d = with_timeout(inner, 0.5, clock)
    clock.advance(0.4)
    assert not d.called
    clock.advance(0.2)
    with pytest.raises(StateTimeout):
        result(d)
    inner.callback(1)  # too late: ignored, no error
    quick: defer.Deferred[int] = defer.Deferred()
    d2 = with_timeout(quick, 0.5, clock)
    quick.callback(7)
    assert result(d2) == 7
    assert not clock.getDelayedCalls()


def test_redis_answers_while_up(setup: Any) -> None:
    state, remote, clock, logged = setup
    assert result(state.incr("c")) == 1
    assert result(remote.inner.get("c")) == b"1"  # counted remotely, not locally
    assert result(state.local.get("c")) is None
    assert logged == []


def test_a_hanging_redis_times_out_once_then_calls_are_local_until_it_answers(
    setup: Any,
) -> None:
    state, remote, clock, logged = setup
    remote.mode = "hang"
    d = state.hit("rate:x", 60)
    clock.advance(0.6)
    assert result(d) == 1  # answered locally after the timeout
    calls = remote.calls
    assert result(state.hit("rate:x", 60)) == 2  # no wait: straight to the local state
    assert remote.calls == calls
    assert len([m for m in logged if "unreachable" in m]) == 1
    assert logged[0].startswith("error: gateway state: Redis unreachable")
    recovered: list[bool] = []
    state.on_recover.append(lambda: recovered.append(True))
    clock.advance(1.0)  # the probe hangs too: still down
    clock.advance(1.0)
    assert not state.up and not recovered
    remote.mode = "up"
    for d in remote.pending:
        d.errback(txredisapi.ConnectionError("lost"))
    clock.advance(1.0)
    clock.advance(1.0)
    assert state.up and recovered == [True]
    assert any("answers again" in m for m in logged)
    assert result(state.hit("rate:x", 60)) == 1  # the shared counter resumes in Redis
    assert not state._probe or not state._probe.running


def test_connection_errors_and_not_now_replies_fall_back_but_a_wrong_command_does_not(
    setup: Any,
) -> None:
    state, remote, clock, logged = setup
    remote.mode = "wrongtype"
    with pytest.raises(txredisapi.ResponseError):
        result(state.get("k"))
    assert state.up
    remote.mode = "loading"
    assert result(state.get("k")) is None
    assert not state.up
    state.up = True
    remote.mode = "refused"
    assert result(state.incr("k")) == 1
    assert not state.up


def test_config_calls_fail_while_redis_is_down(setup: Any) -> None:
    state, remote, clock, logged = setup
    remote.mode = "refused"
    with pytest.raises(StateTimeout):
        result(state.config_current())
    with pytest.raises(StateTimeout):
        result(state.config_publish(b"x"))


def test_mailbox_nodes_known_before_an_outage_are_found_during_it(setup: Any) -> None:
    state, remote, clock, logged = setup
    result(remote.inner.nodes.set("alice@example.test", "be2"))
    assert result(state.nodes.get("Alice@example.test")) == "be2"
    remote.mode = "refused"
    assert result(state.nodes.get("alice@example.test")) == "be2"
    assert result(state.nodes.get("bob@example.test")) is None
    result(state.nodes.set("carol@example.test", "be1"))  # recorded locally meanwhile
    assert result(state.nodes.get("carol@example.test")) == "be1"


def test_state_rate_counter_counts_in_the_state(tmp_path: Path) -> None:
    clock = Clock()
    state = EmbeddedState(str(tmp_path), clock)
    counter = StateRateCounter(state)
    assert result(counter.hit("r|ip|1.2.3.4", 10)) == 1
    assert result(counter.hit("r|ip|1.2.3.4", 10)) == 2
    clock.advance(11)
    assert result(counter.hit("r|ip|1.2.3.4", 10)) == 1
    assert result(state.hit("rate:r|ip|1.2.3.4", 10)) == 2


def test_state_auth_penalty_locks_out_and_a_success_forgets_the_account(tmp_path: Path) -> None:
    clock = Clock()
    state = EmbeddedState(str(tmp_path), clock)
    policy = PenaltyPolicy(
        base_delay=1, max_delay=4, window=60, account_failures=3, address_failures=5, lockout=30
    )
    penalty = StateAuthPenalty(state, policy)
    assert result(penalty.failed("alice", "192.0.2.1")) == 1
    assert result(penalty.failed("alice", "192.0.2.2")) == 2
    assert not result(penalty.locked("alice", "192.0.2.9"))
    result(penalty.succeeded("alice", "192.0.2.2"))  # forgets the account's failures
    assert result(penalty.failed("alice", "192.0.2.3")) == 1
    assert result(penalty.failed("alice", "192.0.2.3")) == 2
    assert result(penalty.failed("alice", "192.0.2.3")) == 4  # third: locked, delay capped
    assert result(penalty.locked("alice", "198.51.100.1"))
    assert result(penalty.locked("bob", "192.0.2.3")) is False  # address: 3 of 5
    for _ in range(2):
        result(penalty.failed("", "192.0.2.3"))
    assert result(penalty.locked("bob", "192.0.2.3"))  # address locked too
    clock.advance(31)
    assert not result(penalty.locked("alice", "192.0.2.3"))
    penalty.set_policy(PenaltyPolicy(account_failures=0, address_failures=0))
    for _ in range(5):
        result(penalty.failed("alice", "192.0.2.4"))
    assert not result(penalty.locked("alice", "192.0.2.4"))


def test_state_auth_penalty_passes_state_errors_through(tmp_path: Path) -> None:
    class Broken(EmbeddedState):
        def get(self, key: str) -> defer.Deferred[bytes | None]:
            return defer.fail(RuntimeError("state broken"))

    penalty = StateAuthPenalty(Broken(str(tmp_path)), PenaltyPolicy())
    with pytest.raises(RuntimeError, match="state broken"):
        result(penalty.locked("alice", "192.0.2.1"))


def test_log_levels_are_error_then_info(setup: Any) -> None:
    state, remote, clock, logged = setup
    state.mark_down("test")
    state.mark_down("again")
    assert [m.split(":")[0] for m in logged] == [LogLevel.error.name]
