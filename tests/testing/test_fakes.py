"""The shared fakes of ``mailgw.testing.fakes`` keep the contracts they stand in for: the
interfaces (zope.interface verification) and, for the directory, the answers of the real
SQLite ``Directory`` on the same users and aliases."""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from twisted.cred.error import UnauthorizedLogin
from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.interfaces import IReactorFromThreads
from twisted.python.failure import Failure
from zope.interface.verify import verifyClass, verifyObject

from mailgw.directory import Directory, User
from mailgw.interfaces import IDirectory
from mailgw.testing.deferreds import fired, result_of
from mailgw.testing.fakes import (
    CallsFromThreads,
    FakeDirectory,
    HeldRunner,
    Quotas,
    TLSStringTransport,
    peer_address,
)

ALICE, BOB = "alice@example.test", "bob@example.test"
ALIASES = {
    "team@example.test": [ALICE, BOB],
    "fwd@example.test": [ALICE, "someone@elsewhere.org"],
}


def outcome(d: Any) -> Any:
    """What a Deferred that has fired holds (a Failure's exception type for a failure)."""
    result = fired(d)
    return result.type if isinstance(result, Failure) else result


@pytest.fixture
def fake() -> FakeDirectory:
    return FakeDirectory({ALICE: "alice pw", BOB: "bob pw"}, ALIASES, quotas={BOB: 1000})


@pytest.fixture
def real(tmp_path: Path) -> Any:
    d = Directory(str(tmp_path / "directory.sqlite"), argon2_time_cost=1, argon2_memory_kib=8)
    d.add_domain("example.test")
    d.add_user(ALICE, "alice pw")
    d.add_user(BOB, "bob pw", quota=1000)
    for source, targets in ALIASES.items():
        for target in targets:
            d.add_alias(source, target)
    yield d
    d.close()


def test_fake_directory_provides_the_interface(fake: FakeDirectory) -> None:
    assert verifyClass(IDirectory, FakeDirectory)
    assert verifyObject(IDirectory, fake)
    assert verifyObject(IDirectory, FakeDirectory())


@pytest.mark.parametrize(
    "address",
    [
        ALICE,
        "Alice@Example.TEST",
        "team@example.test",
        "fwd@example.test",
        "nobody@example.test",
        "alice@elsewhere.org",
    ],
)
def test_fake_directory_resolves_as_the_real_one(fake: FakeDirectory, real: Any, address: str):
    assert fake.resolve(address) == real.resolve(address)


def test_fake_directory_answers_lookups_as_the_real_one(fake: FakeDirectory, real: Any) -> None:
    for domain in ("example.test", "EXAMPLE.test", "elsewhere.org"):
        assert fake.is_local_domain(domain) == real.is_local_domain(domain), domain
    assert fake.list_domains() == real.list_domains() == ["example.test"]
    for name in (ALICE, BOB, "nobody@example.test"):
        assert fake.get_user(name) == real.get_user(name), name
        assert fake.quota_for(name) == real.quota_for(name), name
    assert fake.get_user(BOB) == User(BOB, 1000, True)


@pytest_twisted.ensureDeferred
async def test_fake_directory_checks_passwords_as_the_real_one(
    fake: FakeDirectory, real: Any
) -> None:
    """The real directory hashes in the reactor's thread pool: the reactor runs (pytest-twisted)
    while the test waits."""
    for name, password in [
        (ALICE, "alice pw"),
        ("ALICE@example.test", "alice pw"),
        (BOB, "bob pw"),
        (ALICE, "bob pw"),
        ("nobody@example.test", "alice pw"),
    ]:
        expected: Any
        try:
            expected = await real.check_password(name, password)
        except UnauthorizedLogin:
            expected = UnauthorizedLogin
        assert outcome(fake.check_password(name, password)) == expected, (name, password)
    assert outcome(fake.check_password(ALICE, b"alice pw")) == User(ALICE, None, True)


def test_fake_directory_records_and_fails_on_request() -> None:
    directory = FakeDirectory(["carol@example.test"], {"list@example.test": ["carol@example.test"]})
    assert directory.domains == {"example.test"}
    assert outcome(directory.check_password("carol@example.test", "")) is UnauthorizedLogin
    assert directory.resolve("Carol@example.test") == ["carol@example.test"]
    directory.resolve_errors["list@example.test"] = RuntimeError("database is locked")
    with pytest.raises(RuntimeError, match="locked"):
        directory.resolve("list@example.test")
    assert directory.lookups == ["Carol@example.test", "list@example.test"]

    directory.add_user("dave@other.test", "pw", quota=5)
    assert directory.is_local_domain("other.test") and directory.quota_for("dave@other.test") == 5
    directory.error = RuntimeError("directory down")
    assert outcome(directory.check_password("dave@other.test", "pw")) is RuntimeError
    directory.error = None
    directory.hold = True
    held = directory.check_password("dave@other.test", "pw")
    assert not held.called and directory.pending == [held]
    held.callback(directory.get_user("dave@other.test"))
    assert outcome(held) == User("dave@other.test", 5, True)
    assert directory.calls == [
        ("carol@example.test", ""),
        ("dave@other.test", "pw"),
        ("dave@other.test", "pw"),
    ]


def test_quotas_is_a_quota_lookup() -> None:
    quotas = Quotas()
    assert quotas(ALICE) is None
    quotas.limits[ALICE] = 10
    assert quotas(ALICE) == 10 and quotas(BOB) is None


def test_calls_from_threads_run_in_the_thread_that_runs_the_queue() -> None:
    reactor = CallsFromThreads()
    assert verifyObject(IReactorFromThreads, reactor)
    ran: list[tuple[int, int]] = []

    def work(n: int) -> None:
        reactor.callFromThread(lambda: ran.append((n, threading.get_ident())))

    threads = [threading.Thread(target=work, args=(n,)) for n in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert ran == []  # nothing runs in the threads themselves
    assert reactor.run_pending() == 3
    assert sorted(n for n, _ in ran) == [0, 1, 2]
    assert {thread for _, thread in ran} == {threading.get_ident()}
    assert reactor.run_pending() == 0

    later = threading.Timer(0.05, work, args=(3,))
    later.start()
    reactor.run_until(lambda: len(ran) == 4)
    later.join()
    assert ran[-1] == (3, threading.get_ident())


def test_tls_string_transport_records_start_tls() -> None:
    transport = TLSStringTransport(peerAddress=peer_address("2001:db8::7", 4000))
    assert transport.getPeer().host == "2001:db8::7" and transport.getPeer().port == 4000
    assert peer_address("192.0.2.7").port == 40000
    transport.write(b"220 go ahead\r\n")
    options = object()
    transport.startTLS(options)
    transport.write(b"after")
    assert transport.tls_started == [options]
    assert transport.before_tls == b"220 go ahead\r\n"
    assert not transport.aborted
    transport.abortConnection()
    assert transport.aborted and transport.disconnecting


def test_fired_and_result_of_read_a_fired_deferred() -> None:
    assert fired(succeed(3)) == 3 and result_of(succeed(3)) == 3
    failure = fired(fail(ValueError("no")))
    assert isinstance(failure, Failure) and failure.check(ValueError)
    with pytest.raises(ValueError, match="no"):
        result_of(fail(ValueError("no")))
    with pytest.raises(AssertionError, match="has not fired"):
        fired(Deferred())


def test_held_runner_runs_work_only_when_told() -> None:
    runner = HeldRunner()
    ran: list[int] = []

    def work(n: int) -> int:
        if n < 0:
            raise ValueError("bad")
        ran.append(n)
        return n * 10

    first, second, bad = runner(work, 1), runner(work, 2), runner(work, -1)
    assert ran == [] and len(runner.held) == 3 and not first.called
    runner.run_one()
    assert ran == [1] and result_of(first) == 10 and not second.called
    runner.release()
    assert ran == [1, 2] and result_of(second) == 20 and runner.held == []
    failure = fired(bad)
    assert isinstance(failure, Failure) and failure.check(ValueError)
