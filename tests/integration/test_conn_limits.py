"""Connection hardening against the real ``twistd -n mailgw`` over real loopback sockets, with
small caps so that the bounded loops stay short: TLS handshake timeout and refusals on the
implicit-TLS ports (in-process and in IMAP workers), caps per role and in total, caps fitted
to the descriptor limit, command-progress timeouts (slowloris), and SMTP under stress."""

from __future__ import annotations

import contextlib
import re
import resource
import smtplib
import socket
import ssl
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from mailgw.testing.server import MailgwServer, free_port
from tests.integration.helpers import wait_until

READY_LINE = re.compile(r"imap worker (\d+) \(pid (\d+)\) ready")
EOF_WAIT = 30.0
"""How long a test waits for the server to close a socket (a bound, not a measured time)."""


def connect(port: int, source: str = "127.0.0.1", timeout: float = EOF_WAIT) -> socket.socket:
    sock = socket.create_connection(
        ("127.0.0.1", port), timeout=timeout, source_address=(source, 0)
    )
    return sock


def closed_by_server(sock: socket.socket) -> bytes:
    """Read until the server closes the connection (EOF or reset) and return what it sent;
    fails the test (socket timeout) if it stays open."""
    received = b""
    try:
        while True:
            data = sock.recv(4096)
            if not data:
                return received
            received += data
    except ConnectionResetError:
        return received
    finally:
        sock.close()


def tls_greeting(port: int, source: str = "127.0.0.1") -> bytes:
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    with (
        connect(port, source, timeout=10) as raw,
        context.wrap_socket(raw, server_hostname="localhost") as tls,
    ):
        return tls.recv(4096)


@pytest.fixture
def tls_node(
    server_factory: Callable[..., MailgwServer], selfsigned: tuple[Path, Path]
) -> Callable[..., MailgwServer]:
    """A node with TLS, submission on and the given overrides; ``workers`` for IMAP."""

    def start(workers: int, **overrides: dict[str, str]) -> MailgwServer:
        cert, key = selfsigned
        ports = {"submission": free_port(), "submissions": free_port()}
        sections: dict[str, dict[str, str]] = {
            "tls": {"certificate": str(cert), "private_key": str(key)},
            "imap": {"workers": str(workers)},
            "submission": {
                "enabled": "yes",
                "listen": f"tcp:{ports['submission']}:interface=127.0.0.1",
                "listen_tls": f"tcp:{ports['submissions']}:interface=127.0.0.1",
            },
        }
        for name, keys in overrides.items():
            sections.setdefault(name, {}).update(keys)
        server = server_factory(
            sections, name=f"node{workers}{len(overrides)}{time.monotonic_ns()}"
        )
        server.ports.update(ports)
        if workers:
            wait_until(lambda: len(READY_LINE.findall(server.log())) >= workers, what="workers")
        for role in ("pop3s", "imaps", "submissions"):
            wait_until(lambda r=role: _answers(server.ports[r]), what=f"{role} listening")
        return server

    return start


def _answers(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1):
            return True
    except OSError:
        return False


TLS_PORTS = ("pop3s", "imaps", "submissions")


@pytest.mark.parametrize("workers", [0, 1], ids=["imap-in-process", "imap-worker"])
def test_tls_connections_that_never_handshake_are_closed(
    tls_node: Callable[..., MailgwServer], workers: int
) -> None:
    server = tls_node(
        workers,
        tls={"handshake_timeout": "1s"},
        pop3={"max_connections_per_ip": "3"},
        imap={"max_connections_per_ip": "3"},
        submission={"max_connections_per_ip": "3"},
    )
    for role in TLS_PORTS:
        silent = [connect(server.ports[role], "127.0.0.2") for _ in range(3)]
        for sock in silent:  # closed by the handshake timeout, idle timeouts are minutes
            assert closed_by_server(sock) == b""
        # Their slots are free again: a real TLS client from the same address is served.
        greeting = wait_until(lambda r=role: _greeted(server.ports[r], "127.0.0.2"), what=role)
        assert greeting[:1] in (b"*", b"+", b"2")
    assert "no TLS handshake in 1.0s, closed" in server.log()


def _greeted(port: int, source: str) -> bytes | None:
    try:
        return tls_greeting(port, source)
    except (OSError, ssl.SSLError):
        return None


@pytest.mark.parametrize("workers", [0, 1], ids=["imap-in-process", "imap-worker"])
def test_tls_connection_over_the_limit_is_closed_at_once(
    tls_node: Callable[..., MailgwServer], workers: int
) -> None:
    server = tls_node(
        workers,
        tls={"handshake_timeout": "1h"},  # only the refusal can close the third one
        pop3={"max_connections_per_ip": "2"},
        imap={"max_connections_per_ip": "2"},
        submission={"max_connections_per_ip": "2"},
    )
    for role in TLS_PORTS:
        held = [connect(server.ports[role], "127.0.0.3") for _ in range(2)]
        # The third from that address is refused: closed without waiting for a handshake
        # (so fast that the reset may already reach the client's connect()).
        try:
            third = connect(server.ports[role], "127.0.0.3")
        except ConnectionResetError:
            answer = b""
        else:
            answer = closed_by_server(third)
        assert answer == b""
        # Another address is not affected.
        assert _greeted(server.ports[role], "127.0.0.4")
        for sock in held:
            sock.close()


def _smtp_greeted(port: int, source: str) -> socket.socket | None:
    """A connection from ``source`` that got the 220 greeting (kept open), else None."""
    sock = connect(port, source, timeout=10)
    if sock.recv(1024).startswith(b"220 "):
        return sock
    sock.close()
    return None


def test_pop3_total_cap_leaves_room_for_the_mx_and_the_process_total_holds(
    server_factory: Callable[..., MailgwServer],
) -> None:
    server = server_factory(
        {
            "server": {"max_connections": "24"},
            "pop3": {"max_connections": "20"},
            "imap": {"workers": "0"},
        }
    )
    held = []
    for n in range(20):  # 20 idle POP3 sessions from 4 addresses, under the per-address cap
        sock = connect(server.ports["pop3"], f"127.0.0.{2 + n % 4}", timeout=10)
        assert sock.recv(1024).startswith(b"+OK")
        held.append(sock)
    refused = connect(server.ports["pop3"], "127.0.0.9")
    assert closed_by_server(refused) == b"-ERR [SYS/TEMP] Too many connections, try again later\r\n"
    # The MX still has room: a message goes through.
    with smtplib.SMTP("127.0.0.1", server.ports["mx"], timeout=10) as smtp:
        smtp.sendmail("s@remote.test", ["alice@example.test"], b"Subject: hi\r\n\r\nhello\r\n")
    # The process total (24) counts every role: 20 POP3 + 4 SMTP, then SMTP is refused too.
    # (A closed session's slot comes back when the server has seen the close: a 421 before
    # that is tried again.)
    smtp_held = [
        wait_until(lambda: _smtp_greeted(server.ports["mx"], "127.0.0.10"), what="an MX slot")
        for _ in range(4)
    ]
    assert closed_by_server(connect(server.ports["mx"], "127.0.0.11")).startswith(b"421 4.7.0")
    for sock in held + smtp_held:
        sock.close()


def test_caps_are_fitted_to_the_descriptor_limit(
    server_factory: Callable[..., MailgwServer],
) -> None:
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or hard > 10_000_000:
        pytest.skip("no finite hard descriptor limit to fit the caps into")
    # Keep all but 40 descriptors out of the caps: mx, pop3 and imap (1000 each) get 13.
    server = server_factory(
        {"server": {"reserved_descriptors": str(hard - 40)}, "imap": {"workers": "0"}}
    )
    server.wait_for_log("connection caps lowered to fit")
    assert re.search(
        rf"descriptor limit {hard} \(hard {hard}\): at most 40 connections", server.log()
    )
    held = []
    for n in range(13):
        sock = connect(server.ports["pop3"], f"127.0.0.{2 + n % 4}", timeout=10)
        assert sock.recv(1024).startswith(b"+OK")
        held.append(sock)
    refused = connect(server.ports["pop3"], "127.0.0.9")
    assert closed_by_server(refused).startswith(b"-ERR [SYS/TEMP] Too many connections")
    with smtplib.SMTP("127.0.0.1", server.ports["mx"], timeout=10) as smtp:
        assert smtp.noop()[0] == 250
    for sock in held:
        sock.close()


def trickle(sock: socket.socket, first: bytes, byte: bytes, rounds: int = 40) -> bytes:
    """Send ``first``, then ``byte`` every 0.25 s (each resets any idle timer) until the
    server closes the connection or ``rounds`` run out; return what the server sent."""
    sock.settimeout(0.25)
    sock.sendall(first)
    received = b""
    for _ in range(rounds):
        try:
            data = sock.recv(4096)
            if not data:
                return received
            received += data
        except TimeoutError:
            pass
        except ConnectionResetError:
            return received
        try:
            sock.sendall(byte)
        except (BrokenPipeError, ConnectionResetError):
            return received + _rest(sock)
    raise AssertionError(f"still open after {rounds} rounds; got {received!r}")


def read_until(sock: socket.socket, marker: bytes) -> bytes:
    received = b""
    while marker not in received:
        data = sock.recv(4096)
        assert data, f"closed before {marker!r}: {received!r}"
        received += data
    return received


def _rest(sock: socket.socket) -> bytes:
    with contextlib.suppress(OSError):
        return sock.recv(4096)
    return b""


def test_slowloris_is_closed_on_every_role(server_factory: Callable[..., MailgwServer]) -> None:
    server = server_factory(
        {
            "mx": {"command_timeout": "2s", "min_data_rate": "1K"},
            "pop3": {"command_timeout": "2s", "login_timeout": "0"},
            "imap": {"command_timeout": "2s", "login_timeout": "0", "workers": "0"},
        }
    )
    pop3 = connect(server.ports["pop3"])
    assert pop3.recv(1024).startswith(b"+OK")
    assert b"-ERR Command not completed in time" in trickle(pop3, b"U", b"S")
    imap = connect(server.ports["imap"])
    assert imap.recv(1024).startswith(b"* OK")
    assert b"* BYE Command not completed in time" in trickle(imap, b"a1 NO", b"O")
    smtp = connect(server.ports["mx"])
    assert smtp.recv(1024).startswith(b"220 ")
    envelope = b"EHLO c\r\nMAIL FROM:<s@remote.test>\r\nRCPT TO:<alice@example.test>\r\nDATA\r\n"
    smtp.sendall(envelope)
    read_until(smtp, b"354 ")
    got = trickle(smtp, b"Subject: slow\r\n\r\n", b"xxxxxxxxxx")  # 40 B/s, minimum 1 KiB/s
    assert b"421 4.4.2 Message data arriving too slowly" in got
    # A client that completes its commands is left alone (CAPA every 0.25 s for 3 s).
    ok = connect(server.ports["pop3"])
    read_until(ok, b"\r\n")
    for _ in range(12):
        ok.sendall(b"CAPA\r\n")
        assert read_until(ok, b"\r\n.\r\n").startswith(b"+OK")
        time.sleep(0.25)
    ok.close()


def test_hoarded_mx_slots_do_not_lock_out_other_senders(
    server_factory: Callable[..., MailgwServer],
) -> None:
    server = server_factory(
        {
            "mx": {
                "max_connections": "20",
                "max_connections_per_ip": "5",
                "stress_idle_timeout": "2s",
            }
        }
    )
    hoarders: list[socket.socket] = []
    for n in range(20):  # 5 connections from each of 4 addresses fill the MX
        sock = connect(server.ports["mx"], f"127.0.0.{2 + n // 5}", timeout=10)
        assert sock.recv(1024).startswith(b"220 ")
        sock.sendall(b"EHLO hoarder\r\n")
        hoarders.append(sock)
    turned_away = 0
    for _ in range(60):  # the hoarders keep talking, a legitimate sender keeps trying
        for sock in list(hoarders):
            try:
                sock.sendall(b"NOOP\r\n")
                reply = sock.recv(4096)
            except OSError:
                reply = b""
            if not reply or b"421 " in reply:  # the server closed it
                hoarders.remove(sock)
                sock.close()
        try:
            with smtplib.SMTP("127.0.0.1", server.ports["mx"], timeout=10) as smtp:
                smtp.sendmail("s@remote.test", ["alice@example.test"], b"Subject: in\r\n\r\nok\r\n")
                break
        except smtplib.SMTPConnectError as e:
            assert e.smtp_code == 421
            turned_away += 1
        time.sleep(0.25)
    else:
        raise AssertionError("the legitimate sender never got in")
    assert turned_away >= 1  # it was full at first
    for sock in hoarders:
        sock.close()


@pytest.mark.parametrize("workers", [0, 1], ids=["imap-in-process", "imap-worker"])
def test_starttls_without_a_handshake_is_closed_by_the_idle_timeout(
    tls_node: Callable[..., MailgwServer], workers: int
) -> None:
    server = tls_node(
        workers,
        pop3={"idle_timeout": "2s"},
        imap={"idle_timeout": "2s"},
        submission={"idle_timeout": "2s"},
    )
    dialogues = {
        "pop3": (b"+OK", b"STLS\r\n", b"+OK"),
        "imap": (b"* OK", b"a STARTTLS\r\n", b"a OK"),
        "submission": (b"220 ", b"EHLO c\r\nSTARTTLS\r\n", b"220 2.0.0"),
    }
    for role, (greeting, command, ready) in dialogues.items():
        sock = connect(server.ports[role])
        assert read_until(sock, b"\r\n").startswith(greeting)
        sock.sendall(command)
        read_until(sock, ready)
        # Silence instead of a ClientHello: the idle timeout's goodbye cannot be sent before
        # a handshake; the connection is dropped all the same.
        closed_by_server(sock)
