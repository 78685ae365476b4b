"""IMAP session with asynchronous admission (as in a worker, asking the main process): the
greeting waits for the answer, input meanwhile is buffered, late answers release."""

from __future__ import annotations

from pathlib import Path

from twisted.internet import defer

from mailgw.imap.session import MAX_PENDING_INPUT
from tests.imap.imap_env import Client, Env


class ManualAdmission:
    """Admission whose answers the test gives."""

    def __init__(self) -> None:
        self.opens: list[tuple[str, defer.Deferred[bool]]] = []
        self.logins: list[tuple[str, defer.Deferred[bool]]] = []
        self.closed: list[str] = []
        self.logged_out: list[str] = []

    def open(self, ip: str) -> defer.Deferred[bool]:
        d: defer.Deferred[bool] = defer.Deferred()
        self.opens.append((ip, d))
        return d

    def close(self, ip: str) -> None:
        self.closed.append(ip)

    def login(self, user: str) -> defer.Deferred[bool]:
        d: defer.Deferred[bool] = defer.Deferred()
        self.logins.append((user, d))
        return d

    def logout(self, user: str) -> None:
        self.logged_out.append(user)


def env_with(tmp_path: Path) -> tuple[Env, ManualAdmission]:
    env = Env(tmp_path)
    admission = ManualAdmission()
    env.factory.admission = admission
    return env, admission


def test_greeting_waits_for_admission_and_input_is_buffered(tmp_path: Path) -> None:
    env, admission = env_with(tmp_path)
    c = Client(env, "192.0.2.7")
    assert c.greeting == b""
    assert c.send(b"a1 NOOP\r\na2 CAPABILITY\r\n") == b""  # not processed yet
    ip, d = admission.opens[0]
    assert ip == "192.0.2.7"
    d.callback(True)
    out = c.take()
    assert out.startswith(b"* OK [CAPABILITY ") and b"a1 OK" in out and b"a2 OK" in out
    c.close()
    assert admission.closed == ["192.0.2.7"]


def test_too_much_input_before_admission_pauses_the_client(tmp_path: Path) -> None:
    env, admission = env_with(tmp_path)
    c = Client(env, "192.0.2.7")
    c.send(b"a1 NOOP\r\n" * (MAX_PENDING_INPUT // 9 + 1))
    assert c.transport.producerState == "paused"
    admission.opens[0][1].callback(True)
    assert c.transport.producerState == "producing"
    assert c.take().count(b" OK NOOP") == MAX_PENDING_INPUT // 9 + 1


def test_refused_connection_gets_bye(tmp_path: Path) -> None:
    env, admission = env_with(tmp_path)
    c = Client(env, "192.0.2.7")
    admission.opens[0][1].callback(False)
    assert c.take() == b"* BYE Too many connections from your address\r\n"
    assert c.transport.disconnecting
    c.close()
    assert admission.closed == []  # never counted: nothing to release


def test_connection_gone_before_the_answer_is_released(tmp_path: Path) -> None:
    env, admission = env_with(tmp_path)
    c = Client(env, "192.0.2.7")
    c.close()
    assert admission.closed == []
    admission.opens[0][1].callback(True)
    assert admission.closed == ["192.0.2.7"]
    d = Client(env, "192.0.2.8")
    d.close()
    admission.opens[1][1].callback(False)
    assert admission.closed == ["192.0.2.7"]
    assert c.take() == b"" and d.take() == b""


def test_admission_error_says_bye(tmp_path: Path) -> None:
    env, admission = env_with(tmp_path)
    c = Client(env, "192.0.2.7")
    admission.opens[0][1].errback(RuntimeError("main process gone"))
    assert c.take() == b"* BYE Service temporarily unavailable\r\n"
    e = Client(env, "192.0.2.8")
    e.close()
    admission.opens[1][1].errback(RuntimeError("main process gone"))
    assert e.take() == b""


def admitted(env: Env, admission: ManualAdmission) -> Client:
    c = Client(env, "127.0.0.1")
    admission.opens[-1][1].callback(True)
    c.take()
    return c


def test_login_waits_for_registration(tmp_path: Path) -> None:
    env, admission = env_with(tmp_path)
    c = admitted(env, admission)
    assert c.send(b"a1 LOGIN alice@example.test secret\r\na2 NOOP\r\n") == b""
    user, d = admission.logins[0]
    assert user == "alice@example.test"
    d.callback(True)
    out = c.take()
    assert b"a1 OK [CAPABILITY" in out and b"a2 OK" in out
    assert env.factory.sessions_of(user) == {c.server}
    c.close()
    assert admission.logged_out == [user] and env.factory.sessions_of(user) == set()


def test_login_refused_by_the_limit(tmp_path: Path) -> None:
    env, admission = env_with(tmp_path)
    c = admitted(env, admission)
    c.send(b"a1 LOGIN alice@example.test secret\r\n")
    admission.logins[0][1].callback(False)
    assert c.take() == b"a1 NO [LIMIT] Too many sessions for this user\r\n"
    assert env.factory.sessions_of("alice@example.test") == set()
    c.close()
    assert admission.logged_out == []


def test_session_gone_before_the_registration_is_released(tmp_path: Path) -> None:
    env, admission = env_with(tmp_path)
    c = admitted(env, admission)
    c.send(b"a1 LOGIN alice@example.test secret\r\n")
    c.close()
    admission.logins[0][1].callback(True)
    assert admission.logged_out == ["alice@example.test"]
    assert env.factory.sessions_of("alice@example.test") == set()
    d = admitted(env, admission)
    d.send(b"a1 LOGIN alice@example.test secret\r\n")
    d.close()
    admission.logins[1][1].callback(False)
    assert admission.logged_out == ["alice@example.test"]


def test_registration_error_answers_serverbug(tmp_path: Path) -> None:
    env, admission = env_with(tmp_path)
    c = admitted(env, admission)
    c.send(b"a1 LOGIN alice@example.test secret\r\n")
    admission.logins[0][1].errback(RuntimeError("main process gone"))
    out = c.take()
    assert out.startswith(b"a1 NO [SERVERBUG]"), out
    assert c.send(b"a2 NOOP\r\n").startswith(b"a2 OK")  # the session goes on, not logged in
    assert c.server.user is None and env.factory.sessions_of("alice@example.test") == set()
    assert c.send(b"a3 SELECT INBOX\r\n").startswith(b"a3 BAD")


def test_logout_of_an_unregistered_session_releases_nothing(tmp_path: Path) -> None:
    env, admission = env_with(tmp_path)
    c = admitted(env, admission)
    env.factory.logout("alice@example.test", c.server)
    assert admission.logged_out == []
