"""Nginx ``auth_http``: OK with the user's backend server, failures with Auth-Wait, the
shared lockout, SMTP error codes, and servers from the config."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from twisted.internet.defer import Deferred, succeed
from twisted.internet.task import Clock
from twisted.web.server import NOT_DONE_YET
from twisted.web.test.requesthelper import DummyRequest

from mailgw.config import load
from mailgw.directory.penalty import AuthGuard, MemoryAuthPenalty, PenaltyPolicy
from mailgw.http.authhttp import AuthHTTP, Servers, servers_from_config
from mailgw.testing.fakes import FakeDirectory

SERVERS = Servers(
    imap={"be1": ("127.0.0.2", 143), "be2": ("127.0.0.3", 143)},
    pop3={"be1": ("127.0.0.2", 110), "be2": ("127.0.0.3", 110)},
    smtp=("127.0.0.10", 587),
)
NODES = {"alice@example.test": "be1", "bob@example.test": "be2"}


def run(f: Any, *args: Any) -> Deferred[Any]:
    return succeed(f(*args))


def resource(policy: PenaltyPolicy | None = None, servers: Servers = SERVERS) -> AuthHTTP:
    directory = FakeDirectory({"alice@example.test": "pass word%", "bob@example.test": "b"})
    clock = Clock()
    penalty = MemoryAuthPenalty(clock, policy or PenaltyPolicy(base_delay=2.0))
    return AuthHTTP(AuthGuard(directory, penalty, clock), servers, run, NODES.get)


def ask(
    r: AuthHTTP, user: str, password: str, protocol: str = "imap", **more: str
) -> dict[str, str]:
    request = DummyRequest([b""])
    headers = {
        "Auth-Method": "plain",
        "Auth-User": user,
        "Auth-Pass": password,
        "Auth-Protocol": protocol,
        "Auth-Login-Attempt": "1",
        "Client-IP": "198.51.100.7",
        **more,
    }
    for name, value in headers.items():
        request.requestHeaders.setRawHeaders(name, [value])
    if r.render_GET(request) != NOT_DONE_YET:  # answered at once: twisted.web finishes it
        request.finish()
    assert request.finished
    return {k.decode(): v[0].decode() for k, v in request.responseHeaders.getAllRawHeaders()}


def test_ok_names_the_users_backend_per_protocol() -> None:
    r = resource()
    # nginx URL-escapes the password (space and % here).
    answer = ask(r, "alice@example.test", "pass%20word%25")
    assert answer["Auth-Status"] == "OK"
    assert (answer["Auth-Server"], answer["Auth-Port"]) == ("127.0.0.2", "143")
    answer = ask(r, "bob@example.test", "b", "pop3")
    assert (answer["Auth-Server"], answer["Auth-Port"]) == ("127.0.0.3", "110")
    answer = ask(r, "bob@example.test", "b", "smtp")
    assert (answer["Auth-Server"], answer["Auth-Port"]) == ("127.0.0.10", "587")


def test_wrong_password_gets_auth_wait_and_smtp_an_error_code() -> None:
    r = resource()
    answer = ask(r, "alice@example.test", "wrong")
    assert answer["Auth-Status"] == "Invalid login or password"
    assert answer["Auth-Wait"] == "2"
    assert "Auth-Server" not in answer
    answer = ask(r, "alice@example.test", "wrong", "smtp")
    assert answer["Auth-Error-Code"] == "535 5.7.8"
    assert answer["Auth-Wait"] == "4"  # the penalty doubles


def test_the_shared_lockout_refuses_even_the_right_password() -> None:
    r = resource(PenaltyPolicy(base_delay=0.5, account_failures=2))
    for _ in range(2):
        assert ask(r, "alice@example.test", "wrong")["Auth-Status"] != "OK"
    answer = ask(r, "alice@example.test", "pass%20word%25")
    assert answer["Auth-Status"] == "Invalid login or password"


def test_bad_requests_are_refused() -> None:
    r = resource()
    assert ask(r, "alice@example.test", "x", "ftp")["Auth-Status"] == "Invalid login or password"
    answer = ask(r, "alice@example.test", "x", **{"Auth-Method": "cram-md5"})
    assert answer["Auth-Status"] == "Invalid login or password"
    assert ask(r, "", "x")["Auth-Wait"] == "2"


def test_no_server_for_the_node_is_a_temporary_problem() -> None:
    r = resource(servers=Servers(imap={}, pop3={}, smtp=None))
    answer = ask(r, "alice@example.test", "pass%20word%25")
    assert answer["Auth-Status"] == "Temporary server problem, try again later"
    answer = ask(r, "alice@example.test", "pass%20word%25", "smtp")
    assert answer["Auth-Error-Code"] == "451 4.3.0"


def test_servers_from_config(tmp_path: Path) -> None:
    path = tmp_path / "m.ini"
    path.write_text(
        "[imap]\nlisten = tcp:8143:interface=127.0.0.5\n[pop3]\nlisten = haproxy:tcp:8110\n"
        "[submission]\nenabled = yes\nlisten = tcp:8587:interface=127.0.0.6\n"
    )
    servers = servers_from_config(load(str(path)))
    assert servers == Servers(
        {None: ("127.0.0.5", 8143)}, {None: ("127.0.0.1", 8110)}, ("127.0.0.6", 8587)
    )
    path.write_text(
        "[cluster]\nmailbox_nodes = be1=127.0.0.2:8024\nimap_servers = be1=127.0.0.2:143\n"
        "pop3_servers = be1=127.0.0.2:110\nsmtp_server = 127.0.0.9:587\n"
    )
    servers = servers_from_config(load(str(path)))
    assert servers == Servers(
        {"be1": ("127.0.0.2", 143)}, {"be1": ("127.0.0.2", 110)}, ("127.0.0.9", 587)
    )
