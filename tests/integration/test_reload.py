"""Reloading a real `twistd -n mailgw`: SIGHUP and `mailgw reload` renew the TLS certificate
for new connections (main process and IMAP workers) while a logged-in IMAP session over TLS
goes on; an invalid file or a certificate that does not load is refused and nothing changes;
a lowered connection limit and a changed route apply at once; keys that need a restart are
named."""

from __future__ import annotations

import datetime
import imaplib
import os
import signal
import smtplib
import socket
import ssl
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from mailgw.testing.server import MailgwServer, free_port, render_config
from tests.integration.conftest import make_server
from tests.integration.helpers import PASSWORD, Session, provision, wait_until
from tests.integration.relay_world import Peers, relay_overrides, send, start_node, with_subject


def write_certificate(cert_path: Path, key_path: Path, common_name: str) -> None:
    """A self-signed certificate for ``common_name`` and its key, each file replaced at once
    (as a renewal tool does: write aside, rename into place)."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=30))
        .sign(key, hashes.SHA256())
    )
    key_pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    for path, data in (
        (key_path, key_pem),
        (cert_path, cert.public_bytes(serialization.Encoding.PEM)),
    ):
        aside = path.with_suffix(".new")
        aside.write_bytes(data)
        os.replace(aside, path)


def client_context() -> ssl.SSLContext:
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    context.set_alpn_protocols(["imap", "h2"])
    return context


def common_name(der: bytes | None) -> str:
    assert der is not None
    cert = x509.load_der_x509_certificate(der)
    return str(cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value)


def served_name(port: int) -> str:
    """The common name of the certificate a new TLS connection to ``port`` gets."""
    with (
        socket.create_connection(("127.0.0.1", port), timeout=10) as raw,
        client_context().wrap_socket(raw) as tls,
    ):
        return common_name(tls.getpeercert(binary_form=True))


def openssl_name(port: int, starttls: str | None = None) -> str:
    """The subject ``openssl s_client -alpn imap`` sees on ``port`` (``-starttls`` given)."""
    args = ["openssl", "s_client", "-connect", f"127.0.0.1:{port}", "-alpn", "imap"]
    if starttls:
        args += ["-starttls", starttls]
    done = subprocess.run(args, input="", capture_output=True, text=True, timeout=30)
    for line in done.stdout.splitlines():
        if line.startswith("subject="):
            return line.partition("CN")[2].lstrip(" =").strip()
    raise AssertionError(f"no certificate from openssl: {done.stdout[-800:]} {done.stderr[-800:]}")


def rewrite(server: MailgwServer) -> None:
    server.config_path.write_text(render_config(server.sections))


def hup(server: MailgwServer) -> None:
    assert server.proc is not None
    os.kill(server.proc.pid, signal.SIGHUP)


@pytest.fixture(params=["workers", "in-process"])
def tls_node(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[MailgwServer]:
    """TLS with a certificate for old.example.test in files the test may replace; IMAP in a
    worker process or in the main one."""
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    write_certificate(cert, key, "old.example.test")
    overrides = {
        "tls": {"certificate": str(cert), "private_key": str(key)},
        "imap": {"workers": "1" if request.param == "workers" else "0"},
    }
    server = make_server(tmp_path / "node", overrides)
    if request.param == "workers":
        server.wait_for_log("imap worker 0 (pid")
        server.wait_for_log(") ready")
    yield server
    server.stop()


def test_sighup_renews_certificate_and_keeps_sessions(tls_node: MailgwServer) -> None:
    server = tls_node
    imaps, pop3s = server.ports["imaps"], server.ports["pop3s"]
    old = imaplib.IMAP4_SSL("127.0.0.1", imaps, ssl_context=client_context(), timeout=10)
    old.login("alice@example.test", PASSWORD)
    assert old.select("INBOX")[0] == "OK"
    assert common_name(old.sock.getpeercert(binary_form=True)) == "old.example.test"
    assert served_name(pop3s) == "old.example.test"

    write_certificate(
        Path(server.sections["tls"]["certificate"]),
        Path(server.sections["tls"]["private_key"]),
        "new.example.test",
    )
    hup(server)
    server.wait_for_log("reloaded ")
    if server.sections["imap"]["workers"] != "0":
        wait_until(
            lambda: server.log().count("#info] reloaded ") >= 2,
            what="the IMAP worker's reload in the log",
        )
        assert "): [mailgw.runtime.process#info] TLS: new connections get" in server.log()

    # New connections: the new certificate (implicit TLS, STARTTLS, POP3S; Python and openssl).
    assert served_name(imaps) == "new.example.test"
    assert served_name(pop3s) == "new.example.test"
    assert openssl_name(imaps) == "new.example.test"
    assert openssl_name(server.ports["imap"], "imap") == "new.example.test"
    with smtplib.SMTP("127.0.0.1", server.ports["mx"], timeout=10) as smtp:
        smtp.starttls(context=client_context())
        assert common_name(smtp.sock.getpeercert(binary_form=True)) == "new.example.test"
    # The session opened before goes on, over the TLS it started with.
    assert old.noop()[0] == "OK"
    assert old.select("INBOX")[0] == "OK"
    assert old.list()[0] == "OK"
    assert common_name(old.sock.getpeercert(binary_form=True)) == "old.example.test"
    old.logout()
    log = server.log()
    assert "restart needed" not in log
    assert "reload refused" not in log


def test_invalid_config_is_refused_and_nothing_changes(tmp_path: Path) -> None:
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    write_certificate(cert, key, "old.example.test")
    overrides = {"tls": {"certificate": str(cert), "private_key": str(key)}}
    server = make_server(tmp_path / "node", {**overrides, "imap": {"workers": "0"}})
    try:
        imaps = server.ports["imaps"]
        # A new certificate elsewhere, and a file that names it but has a bad value.
        new_cert, new_key = tmp_path / "new-cert.pem", tmp_path / "new-key.pem"
        write_certificate(new_cert, new_key, "new.example.test")
        server.sections["tls"] = {"certificate": str(new_cert), "private_key": str(new_key)}
        server.sections["mx"]["max_connections_per_ip"] = "zero"
        rewrite(server)
        hup(server)
        server.wait_for_log("reload refused, the running configuration stays")
        assert "max_connections_per_ip: expected a whole number" in server.log()
        assert served_name(imaps) == "old.example.test"

        # `mailgw reload` says so too, exit 1.
        done = server.cli("reload", check=False)
        assert done.returncode == 1
        assert "reload refused" in done.stderr and "max_connections_per_ip" in done.stderr

        # A valid file whose key does not belong to its certificate: refused as a whole.
        other_cert, other_key = tmp_path / "other-cert.pem", tmp_path / "other-key.pem"
        write_certificate(other_cert, other_key, "other.example.test")
        server.sections["mx"]["max_connections_per_ip"] = "1"
        server.sections["tls"] = {"certificate": str(new_cert), "private_key": str(other_key)}
        rewrite(server)
        done = server.cli("reload", check=False)
        assert done.returncode == 1 and "does not match" in done.stderr, done.stderr
        assert served_name(imaps) == "old.example.test"
        # ... and so the per-address limit lowered in that file did not apply either.
        first, second = Session(server.ports["mx"]), Session(server.ports["mx"])
        assert first.greeting.startswith(b"220") and second.greeting.startswith(b"220")
        first.sock.close()
        second.sock.close()
    finally:
        server.stop()


def test_reload_command_applies_limits_and_names_restart_keys(tmp_path: Path) -> None:
    server = make_server(
        tmp_path / "node", {"mx": {"max_connections_per_ip": "5"}, "imap": {"workers": "0"}}
    )
    try:
        sessions = [Session(server.ports["mx"]) for _ in range(2)]
        assert all(s.greeting.startswith(b"220") for s in sessions)
        pid_file = server.data_dir / "mailgw.pid"
        assert pid_file.read_text().strip() == str(server.proc.pid if server.proc else 0)

        server.sections["mx"]["max_connections_per_ip"] = "2"
        new_imap = f"tcp:{free_port()}:interface=127.0.0.1"
        server.sections["imap"]["listen"] = new_imap
        rewrite(server)
        # The real command checks and shows the new file first.
        assert server.cli("config", "check").stdout == ""
        shown = server.cli("config", "show", "--non-default").stdout
        assert "max_connections_per_ip = 2" in shown and f"listen = {new_imap}" in shown
        done = server.cli("reload")
        assert "1 change(s) applied, 1 need a restart" in done.stdout, done.stdout
        assert "applied: [mx] max_connections_per_ip: 5 -> 2" in done.stdout
        assert "restart needed for [imap] listen" in done.stdout
        # The log line may land a reactor turn after the status file the command reads.
        server.wait_for_log("restart needed for [imap] listen")

        # The third connection from this address is refused now; the two open ones go on.
        third = Session(server.ports["mx"])
        assert third.greeting.startswith(b"421"), third.greeting
        third.sock.close()
        for s in sessions:
            assert s.command(b"EHLO client.example.test").startswith(b"250")
            assert s.command(b"QUIT").startswith(b"221")
            s.sock.close()
        # The IMAP listener did not move (restart needed), and is still served.
        with imaplib.IMAP4("127.0.0.1", server.ports["imap"], timeout=10) as imap:
            assert imap.noop()[0] == "OK"
        # Reloading again names it again until the node restarts.
        again = server.cli("reload")
        assert "0 change(s) applied, 1 need a restart" in again.stdout
    finally:
        server.stop()
    assert not (server.data_dir / "mailgw.pid").exists()


def test_reload_without_a_running_server_fails(tmp_path: Path) -> None:
    server = MailgwServer(tmp_path / "node")
    provision(server)
    done = server.cli("reload", check=False)
    assert done.returncode == 1 and "is the server running?" in done.stderr
    server.sections["mx"]["max_errors"] = "0"
    rewrite(server)
    bad = server.cli("config", "check", check=False)
    assert bad.returncode == 1
    assert bad.stdout == (
        f"{server.config_path}: [mx] max_errors: expected a number above 0, got 0\n"
    )


@pytest.fixture
def peers(tmp_path: Path) -> Iterator[Peers]:
    p = Peers(tmp_path / "peers")
    p.start()
    yield p
    p.stop()


def test_route_and_channel_change_applies_without_restart(peers: Peers, tmp_path: Path) -> None:
    overrides = relay_overrides(peers)
    overrides["imap"] = {"workers": "0"}
    server = start_node(tmp_path / "node", overrides)
    try:
        with smtplib.SMTP("127.0.0.1", server.ports["mx"], timeout=10) as client:
            assert client.noop()[0] == 250
            # Held open across the reload: it stays usable.
            send(server, "to-far@example.test", "before-reload")
            [m] = wait_until(lambda: with_subject(peers, "before-reload"), what="first delivery")
            assert m["peer"] == "127.0.0.4"  # the domestic channel, by [route:domestic]

            # The domestic route goes; a new channel "backup" (sending from 127.0.0.5) is the
            # only default route.
            del server.sections["route:domestic"]
            server.sections["channel:backup"] = {
                "source_addresses": "127.0.0.5",
                "helo": "backup.example.test",
            }
            server.sections["relay"]["default_route"] = "backup"
            rewrite(server)
            done = server.cli("reload")
            assert "[route:domestic] removed" in done.stdout
            assert "[channel:backup] added" in done.stdout
            assert "restart needed" not in done.stdout

            send(server, "to-far@example.test", "after-reload")
            [m] = wait_until(lambda: with_subject(peers, "after-reload"), what="second delivery")
            assert m["peer"] == "127.0.0.5"
            assert client.noop()[0] == 250
        # The status file (written every second) lists the new channel with its delivery.
        wait_until(
            lambda: "backup" in server.cli("channel", "status").stdout, what="backup in status"
        )
    finally:
        server.stop()
