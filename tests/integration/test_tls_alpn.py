"""Every TLS listener of the real `twistd -n mailgw` (implicit TLS and STARTTLS/STLS; SMTP MX,
submission, POP3, IMAP in-process and in worker processes) with and without ALPN, from
Python's ssl and from `openssl s_client -alpn`: `imap`/`pop3` are selected when offered,
nothing otherwise, and never a fatal alert (RFC 7301 3.2)."""

from __future__ import annotations

import imaplib
import poplib
import smtplib
import socket
import ssl
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from mailgw.testing.server import MailgwServer, free_port
from tests.integration.conftest import make_server
from tests.integration.helpers import PASSWORD

# (port name, how TLS starts: implicit or the STARTTLS flavour, ALPN offer, selected)
CASES = [
    ("mx", "smtp", ["h2", "http/1.1"], None),
    ("mx", "smtp", None, None),
    ("submission", "smtp", ["h2", "http/1.1"], None),
    ("submission", "smtp", None, None),
    ("submissions", "implicit-smtp", ["h2", "http/1.1"], None),
    ("submissions", "implicit-smtp", None, None),
    ("pop3", "pop3", ["pop3", "h2"], "pop3"),
    ("pop3", "pop3", ["h2"], None),
    ("pop3", "pop3", None, None),
    ("pop3s", "implicit-pop3", ["h2", "pop3"], "pop3"),
    ("pop3s", "implicit-pop3", ["http/1.1"], None),
    ("pop3s", "implicit-pop3", None, None),
    ("imap", "imap", ["imap", "h2"], "imap"),
    ("imap", "imap", ["h2"], None),
    ("imap", "imap", None, None),
    ("imaps", "implicit-imap", ["imap", "h2"], "imap"),
    ("imaps", "implicit-imap", ["h2", "http/1.1"], None),
    ("imaps", "implicit-imap", None, None),
]


@pytest.fixture(scope="module", params=["workers", "in-process"])
def node(
    request: pytest.FixtureRequest,
    tmp_path_factory: pytest.TempPathFactory,
    selfsigned: tuple[Path, Path],
) -> Iterator[MailgwServer]:
    """TLS on, submission on; IMAP in worker processes (the default) or in the main one."""
    cert, key = selfsigned
    ports = (free_port(), free_port())
    overrides = {
        "tls": {"certificate": str(cert), "private_key": str(key)},
        "submission": {
            "enabled": "yes",
            "listen": f"tcp:{ports[0]}:interface=127.0.0.1",
            "listen_tls": f"tcp:{ports[1]}:interface=127.0.0.1",
        },
        "imap": {"workers": "2" if request.param == "workers" else "0"},
    }
    server = make_server(tmp_path_factory.mktemp(request.param), overrides)
    # The ports the server really listens on (start() moves them if one was taken meanwhile).
    server.ports["submission"] = server.listen_port("submission")
    server.ports["submissions"] = int(server.sections["submission"]["listen_tls"].split(":")[1])
    yield server
    server.stop()


def client_context(alpn: list[str] | None) -> ssl.SSLContext:
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    if alpn is not None:
        context.set_alpn_protocols(alpn)
    return context


def python_client(node: MailgwServer, port: str, how: str, context: ssl.SSLContext) -> str | None:
    """Connect, start TLS as a real client library does, do one command over TLS, return the
    ALPN protocol the server selected."""
    host, number = "127.0.0.1", node.ports[port]
    if how == "smtp":
        with smtplib.SMTP(host, number, timeout=15) as smtp:
            smtp.starttls(context=context)
            assert smtp.ehlo()[0] == 250
            return smtp.sock.selected_alpn_protocol()  # type: ignore[union-attr]
    if how == "implicit-smtp":
        with smtplib.SMTP_SSL(host, number, timeout=15, context=context) as smtp:
            assert smtp.ehlo()[0] == 250
            return smtp.sock.selected_alpn_protocol()  # type: ignore[union-attr]
    if how in ("pop3", "implicit-pop3"):
        if how == "pop3":
            pop = poplib.POP3(host, number, timeout=15)
            pop.stls(context=context)
        else:
            pop = poplib.POP3_SSL(host, number, timeout=15, context=context)
        pop.user("alice@example.test")
        pop.pass_(PASSWORD)
        assert pop.stat()[0] >= 0
        selected = pop.sock.selected_alpn_protocol()  # type: ignore[attr-defined]
        pop.quit()
        return selected
    if how == "imap":
        imap = imaplib.IMAP4(host, number, timeout=15)
        imap.starttls(ssl_context=context)
    else:
        imap = imaplib.IMAP4_SSL(host, number, ssl_context=context, timeout=15)
    imap.login("alice@example.test", PASSWORD)
    assert imap.select("INBOX")[0] == "OK"
    selected = imap.sock.selected_alpn_protocol()  # type: ignore[attr-defined]
    imap.logout()
    return selected


@pytest.mark.parametrize(("port", "how", "offered", "selected"), CASES)
def test_python_ssl_client(
    node: MailgwServer, port: str, how: str, offered: list[str] | None, selected: str | None
) -> None:
    assert python_client(node, port, how, client_context(offered)) == selected


def s_client(node: MailgwServer, port: str, how: str, alpn: str | None) -> str:
    """`openssl s_client` output for one connection (it quits at once)."""
    cmd = ["openssl", "s_client", "-connect", f"127.0.0.1:{node.ports[port]}"]
    if not how.startswith("implicit"):
        cmd += ["-starttls", how]
    if alpn is not None:
        cmd += ["-alpn", alpn]
    done = subprocess.run(cmd, input=b"Q\n", capture_output=True, timeout=30, check=False)
    return (done.stdout + done.stderr).decode("utf-8", "replace")


@pytest.mark.parametrize(("port", "how", "offered", "selected"), CASES)
def test_openssl_s_client(
    node: MailgwServer, port: str, how: str, offered: list[str] | None, selected: str | None
) -> None:
    out = s_client(node, port, how, ",".join(offered) if offered is not None else None)
    assert "alert" not in out.lower(), out
    assert "Verify return code" in out, out  # the handshake finished
    if selected is None:
        assert "No ALPN negotiated" in out, out
    else:
        assert f"ALPN protocol: {selected}\n" in out, out


def test_alpn_offer_does_not_disturb_the_session(node: MailgwServer) -> None:
    """A client that offered ALPN and got `imap` then reads over IMAPS as any other."""
    context = client_context(["imap"])
    with socket.create_connection(("127.0.0.1", node.ports["imaps"]), timeout=15) as raw:
        tls = context.wrap_socket(raw)
        assert tls.selected_alpn_protocol() == "imap"
        greeting = read_line(tls.recv)
        assert greeting.startswith(b"* OK"), greeting
        tls.sendall(b"a CAPABILITY\r\n")
        assert b"IMAP4rev1" in read_line(tls.recv)


def read_line(recv: Callable[[int], bytes]) -> bytes:
    data = b""
    while not data.endswith(b"\r\n"):
        chunk = recv(1)
        if not chunk:
            break
        data += chunk
    return data
