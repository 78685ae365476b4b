"""The ``http`` role of the real ``twistd mailgw``: /metrics scraped and parsed with
prometheus_client's parser while mail flows (SMTP, POP3, IMAP in two worker processes, one of
them killed), /healthz, /readyz going 503 when the spool is read-only and back, access by
network and admin token, HTTPS with curl and with Python's ssl offering ALPN h2/http1.1."""

from __future__ import annotations

import contextlib
import imaplib
import os
import poplib
import re
import signal
import smtplib
import ssl
import subprocess
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from email.message import EmailMessage
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from mailgw.testing.server import MailgwServer, free_port, wait_for_port
from tests.integration.conftest import make_server
from tests.integration.helpers import PASSWORD, mailbox_files, wait_until

TOKEN = "t0ken-for-the-admin-api-0123456789"

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def http_overrides(port: int, tls_port: int, **keys: str) -> dict[str, str]:
    return {
        "enabled": "yes",
        "listen": f"tcp:{port}:interface=127.0.0.1",
        "listen_tls": f"tcp:{tls_port}:interface=127.0.0.1",
        "store_stats_interval": "0s",
        **keys,
    }


def get(url: str, headers: dict[str, str] | None = None, **kw: object) -> tuple[int, dict, str]:
    """(status, headers, body) of a GET with urllib; HTTP errors are answers too."""
    request = urllib.request.Request(url, headers=headers or {})
    try:
        with urllib.request.urlopen(request, timeout=15, **kw) as r:  # type: ignore[arg-type]
            return r.status, dict(r.headers), r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, dict(e.headers), e.read().decode()


def scrape(port: int) -> tuple[Samples, dict[str, str]]:
    """Every sample of /metrics by (name, labels), and each family's HELP text by name."""
    status, headers, body = get(f"http://127.0.0.1:{port}/metrics")
    assert status == 200, body
    assert headers["Content-Type"].startswith("text/plain; version=")
    samples: Samples = {}
    helps: dict[str, str] = {}
    for family in text_string_to_metric_families(body):
        helps[family.name] = family.documentation
        for s in family.samples:
            key = (s.name, tuple(sorted(s.labels.items())))
            assert key not in samples, f"duplicate series {key}"
            samples[key] = s.value
    return samples, helps


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


@pytest.fixture(scope="module")
def node(
    tmp_path_factory: pytest.TempPathFactory, selfsigned: tuple[Path, Path]
) -> Iterator[MailgwServer]:
    """TLS, two IMAP worker processes, /metrics from loopback (the default allow)."""
    cert, key = selfsigned
    port, tls_port, sub, subs = free_port(), free_port(), free_port(), free_port()
    server = make_server(
        tmp_path_factory.mktemp("http-node"),
        {
            "tls": {"certificate": str(cert), "private_key": str(key)},
            "imap": {"workers": "2"},
            "submission": {
                "enabled": "yes",
                "listen": f"tcp:{sub}:interface=127.0.0.1",
                "listen_tls": f"tcp:{subs}:interface=127.0.0.1",
            },
            "http": http_overrides(port, tls_port),
        },
    )
    server.ports.update(http=port, https=tls_port, submission=sub)
    try:
        wait_for_port("127.0.0.1", port, proc=server.proc)
        server.wait_for_log("imap worker 1 (pid")
        wait_until(lambda: server.log().count(") ready") >= 2, what="two IMAP workers ready")
        yield server
    finally:
        server.stop()


def send(server: MailgwServer, n: int) -> None:
    for i in range(n):
        msg = EmailMessage()
        msg["From"] = "sender@outside.test"
        msg["To"] = "alice@example.test"
        msg["Subject"] = f"metrics {i}"
        msg.set_content("counted\n" * 50)
        with smtplib.SMTP("127.0.0.1", server.ports["mx"], timeout=15) as smtp:
            smtp.send_message(msg)


def test_metrics_move_as_mail_flows(node: MailgwServer) -> None:
    before, helps = scrape(node.ports["http"])
    for name in (
        "mailgw_connections",
        "mailgw_connections_refused",
        "mailgw_auth_failures",
        "mailgw_imap_commands",
        "mailgw_imap_command_duration_seconds",
        "mailgw_spool_commit_duration_seconds",
        "mailgw_queue_messages",
        "mailgw_connections_open",
        "mailgw_store_bytes",
        "mailgw_store_messages",
        "mailgw_relay_channel_up",
    ):
        assert helps.get(name), f"{name} missing or without HELP"
    assert value(before, "mailgw_queue_messages", state="incoming") == 0
    assert ("mailgw_queue_messages", (("state", "deferred"),)) in before

    send(node, 3)
    wait_until(lambda: len(mailbox_files(node)) == 3, what="three messages delivered")
    after, _ = scrape(node.ports["http"])
    commits = "mailgw_spool_commit_duration_seconds_count"
    assert value(after, commits) == value(before, commits) + 3
    assert value(after, "mailgw_spool_commit_duration_seconds_sum") > 0
    smtp_connections = "mailgw_connections_total"
    assert value(after, smtp_connections, protocol="smtp") >= (
        value(before, smtp_connections, protocol="smtp") + 3
    )
    assert value(after, "mailgw_store_messages", tier="tier1") == 3
    stored = sum(f.stat().st_size for f in mailbox_files(node))
    assert value(after, "mailgw_store_bytes", tier="tier1") == stored
    # The relay is off: no channel series. An HTTP connection is open: this scrape's.
    assert not [k for k in after if k[0] == "mailgw_relay_channel_up"]
    assert value(after, "mailgw_connections_open", protocol="http") >= 1

    # POP3: one failed login.
    pop = poplib.POP3("127.0.0.1", node.ports["pop3"], timeout=15)
    pop.user("alice@example.test")
    with pytest.raises(poplib.error_proto):
        pop.pass_("wrong")
    pop.quit()
    # Submission: one failed AUTH after STARTTLS.
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    with smtplib.SMTP("127.0.0.1", node.ports["submission"], timeout=15) as smtp:
        smtp.starttls(context=context)
        smtp.ehlo()
        smtp.user, smtp.password = "alice@example.test", "wrong"
        with pytest.raises(smtplib.SMTPAuthenticationError):
            smtp.auth("PLAIN", smtp.auth_plain)  # one attempt (login() tries each mechanism)
    failures, _ = scrape(node.ports["http"])
    assert value(failures, "mailgw_auth_failures_total", protocol="pop3") == 1
    assert value(failures, "mailgw_auth_failures_total", protocol="submission") == 1
    assert value(failures, "mailgw_connections_total", protocol="submission") >= 1


def imap_session(node: MailgwServer) -> imaplib.IMAP4:
    imap = imaplib.IMAP4("127.0.0.1", node.ports["imap"], timeout=15)
    imap.login("alice@example.test", PASSWORD)
    return imap


def worker_pids(server: MailgwServer) -> dict[int, int]:
    """The live pid of each IMAP worker, from the log (the last one started)."""
    pids: dict[int, int] = {}
    for index, pid in re.findall(r"imap worker (\d+) \(pid (\d+)\) ready", server.log()):
        pids[int(index)] = int(pid)
    return pids


def test_imap_figures_of_two_worker_processes_are_merged(node: MailgwServer) -> None:
    start, _ = scrape(node.ports["http"])
    base_noop = value(start, "mailgw_imap_commands_total", command="NOOP")
    base_fail = value(start, "mailgw_auth_failures_total", protocol="imap")
    # Six sessions open at once: the least-connections balance spreads them over both workers.
    sessions = [imap_session(node) for _ in range(6)]
    for imap in sessions:
        assert imap.noop()[0] == "OK"
        assert imap.select("INBOX")[0] == "OK"
        assert imap.fetch("1:*", "(FLAGS)")[0] == "OK"
    bad = imaplib.IMAP4("127.0.0.1", node.ports["imap"], timeout=15)
    with pytest.raises(imaplib.IMAP4.error):
        bad.login("alice@example.test", "wrong password")
    bad.logout()
    during, _ = scrape(node.ports["http"])
    assert value(during, "mailgw_connections_open", protocol="imap") >= 6
    held = [value(during, "mailgw_imap_worker_connections", worker=str(i)) for i in (0, 1)]
    assert sum(held) >= 6 and min(held) >= 1, held  # both workers serve some of them
    for imap in sessions:
        imap.logout()
    counted, _ = scrape(node.ports["http"])  # asks both workers for their figures now
    assert value(counted, "mailgw_imap_commands_total", command="NOOP") == base_noop + 6
    assert value(counted, "mailgw_imap_commands_total", command="SELECT") >= 6
    assert value(counted, "mailgw_imap_commands_total", command="FETCH") >= 6
    assert value(counted, "mailgw_imap_command_duration_seconds_count", command="NOOP") == (
        base_noop + 6
    )
    assert value(
        counted, "mailgw_imap_command_duration_seconds_bucket", command="NOOP", le="+Inf"
    ) == (base_noop + 6)
    assert value(counted, "mailgw_auth_failures_total", protocol="imap") == base_fail + 1

    # A worker killed: its figures stay in the sums, and its replacement adds to them.
    pids = worker_pids(node)
    assert len(pids) == 2 and len(set(pids.values())) == 2
    os.kill(pids[0], signal.SIGKILL)
    wait_until(lambda: worker_pids(node).get(0) not in (None, pids[0]), what="worker 0 restarted")
    after_kill, _ = scrape(node.ports["http"])
    assert value(after_kill, "mailgw_imap_commands_total", command="NOOP") == base_noop + 6
    imap = imap_session(node)
    imap.noop()
    imap.logout()
    final, _ = scrape(node.ports["http"])
    assert value(final, "mailgw_imap_commands_total", command="NOOP") == base_noop + 7


def test_healthz_and_readyz(node: MailgwServer) -> None:
    status, headers, body = get(f"http://127.0.0.1:{node.ports['http']}/healthz")
    assert (status, body) == (200, "ok\n")
    assert headers["Content-Type"].startswith("text/plain")
    status, _, body = get(f"http://127.0.0.1:{node.ports['http']}/readyz")
    assert (status, body) == (200, "ready\n")


@contextlib.contextmanager
def read_only(folder: Path) -> Iterator[None]:
    """``folder`` read-only for everyone, root included: a read-only bind mount over it
    (else the immutable attribute, which stops root from creating files in it too)."""
    mounted = subprocess.run(["mount", "--bind", str(folder), str(folder)], capture_output=True)
    if mounted.returncode == 0:
        try:
            subprocess.run(
                ["mount", "-o", "remount,bind,ro", str(folder)], check=True, capture_output=True
            )
            yield
        finally:
            subprocess.run(["umount", str(folder)], check=True)
        return
    attr = subprocess.run(["chattr", "+i", str(folder)], capture_output=True)
    if attr.returncode != 0:
        pytest.skip("cannot make a folder read-only for root here (no mount, no chattr)")
    try:
        yield
    finally:
        subprocess.run(["chattr", "-i", str(folder)], check=True)


def test_readyz_fails_while_the_spool_is_read_only(node: MailgwServer) -> None:
    url = f"http://127.0.0.1:{node.ports['http']}/readyz"
    spool = node.data_dir / "spool"
    with read_only(spool):
        # Real: root cannot write there now (the probe is no chmod check).
        with pytest.raises(OSError):
            (spool / "tmp" / "x").write_text("x")
        status, _, body = get(url)
        assert status == 503
        assert body.startswith("not ready:\n")
        assert re.search(r"^- spool: not writable: Read-only file system", body, re.M) or (
            "spool: not writable" in body
        )
        assert "store" not in body  # the store is fine
    status, _, body = get(url)
    assert (status, body) == (200, "ready\n")


@pytest.fixture(scope="module")
def guarded(
    tmp_path_factory: pytest.TempPathFactory, selfsigned: tuple[Path, Path]
) -> Iterator[MailgwServer]:
    """/metrics allowed only from 10.0.0.0/8 (not loopback), or with the admin token; [api]
    is off (message tracking is served alone)."""
    cert, key = selfsigned
    work = tmp_path_factory.mktemp("http-guarded")
    token_file = work / "admin.token"
    token_file.write_text(TOKEN + "\n")
    port, tls_port = free_port(), free_port()
    server = make_server(
        work / "node",
        {
            "tls": {"certificate": str(cert), "private_key": str(key)},
            "imap": {"workers": "0"},
            "http": http_overrides(
                port, tls_port, allow="10.0.0.0/8", admin_token_file=str(token_file)
            ),
            "api": {"enabled": "no"},
        },
    )
    server.ports.update(http=port, https=tls_port)
    try:
        wait_for_port("127.0.0.1", tls_port, proc=server.proc)
        yield server
    finally:
        server.stop()


def test_tracking_alone_with_the_admin_token_when_the_api_is_off(guarded: MailgwServer) -> None:
    """[api] enabled = no: /api/v1/tracking is still there for the [http] admin token (and
    the allowed networks), not for stored API tokens; the other routes and the OpenAPI
    document are not served."""
    import json

    base = f"http://127.0.0.1:{guarded.ports['http']}"
    url = base + "/api/v1/tracking?q=nobody%40example.test"
    status, headers, body = get(url, {"Authorization": f"Bearer {TOKEN}"})
    assert status == 200 and headers["Content-Type"].startswith("application/json"), body
    assert json.loads(body) == {
        "query": "nobody@example.test",
        "since": None,
        "until": None,
        "messages": [],
    }
    status, headers, body = get(url)
    assert status == 401 and headers["WWW-Authenticate"].startswith("Bearer"), body
    assert json.loads(body)["error"]["code"] == "unauthorized"
    read = guarded.cli("token", "create", "--scope", "read").stdout.splitlines()[0]
    assert get(url, {"Authorization": f"Bearer {read}"})[0] == 401
    auth = {"Authorization": f"Bearer {TOKEN}"}
    assert get(base + "/api/v1/domains", auth)[0] == 404
    assert get(base + "/api/openapi.json", auth)[0] == 404


def test_access_needs_an_allowed_network_or_the_token(guarded: MailgwServer) -> None:
    base = f"http://127.0.0.1:{guarded.ports['http']}"
    for path in ("/metrics", "/readyz"):
        status, headers, body = get(base + path)
        assert status == 401, body
        assert headers["WWW-Authenticate"] == 'Bearer realm="mailgw"'
        status, headers, _ = get(base + path, {"Authorization": "Bearer not-the-token"})
        assert status == 401
        assert 'error="invalid_token"' in headers["WWW-Authenticate"]
        status, _, body = get(base + path, {"Authorization": f"Bearer {TOKEN}"})
        assert status == 200, body
    assert get(base + "/healthz")[0] == 200  # liveness is open to all
    # Refusals are in the log, successful probes and scrapes are not.
    wait_until(lambda: '"GET /metrics HTTP/1.1" 401' in guarded.log(), what="refusal logged")
    assert '"GET /metrics HTTP/1.1" 200' not in guarded.log()
    assert '"GET /healthz HTTP/1.1" 200' not in guarded.log()
    assert get(base + "/nowhere", {"Authorization": f"Bearer {TOKEN}"})[0] == 404
    # curl, with the token and without it.
    out = subprocess.run(
        ["curl", "-sS", "-o", "/dev/null", "-w", "%{http_code}", base + "/metrics"],
        capture_output=True,
        text=True,
        check=True,
    )
    assert out.stdout == "401"
    out = subprocess.run(
        ["curl", "-sS", "-H", f"Authorization: Bearer {TOKEN}", base + "/metrics"],
        capture_output=True,
        text=True,
        check=True,
    )
    families = {f.name for f in text_string_to_metric_families(out.stdout)}
    assert "mailgw_spool_commit_duration_seconds" in families


def test_https_with_curl_and_with_alpn(guarded: MailgwServer) -> None:
    port = guarded.ports["https"]
    out = subprocess.run(
        ["curl", "-sS", "-k", "--http1.1", f"https://127.0.0.1:{port}/healthz"],
        capture_output=True,
        text=True,
        check=True,
    )
    assert out.stdout == "ok\n"
    # curl offers ALPN h2 and http/1.1 by default (when built with HTTP/2).
    out = subprocess.run(
        [
            "curl",
            "-sS",
            "-k",
            "-H",
            f"Authorization: Bearer {TOKEN}",
            "-w",
            "%{http_version}",
            "-o",
            "/dev/null",
            f"https://127.0.0.1:{port}/readyz",
        ],
        capture_output=True,
        text=True,
        check=True,
    )
    assert out.stdout == "1.1"
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    context.set_alpn_protocols(["h2", "http/1.1"])
    status, _, body = get(f"https://127.0.0.1:{port}/healthz", context=context)
    assert (status, body) == (200, "ok\n")
    import socket

    with (
        socket.create_connection(("127.0.0.1", port), timeout=15) as raw,
        context.wrap_socket(raw) as tls,
    ):
        assert tls.selected_alpn_protocol() == "http/1.1"
        tls.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        answer = b""
        while chunk := tls.recv(4096):
            answer += chunk
    assert answer.startswith(b"HTTP/1.1 200 ")
    assert answer.endswith(b"\r\n\r\nok\n")


def test_too_many_connections_from_one_address_get_503(
    server_factory: Callable[..., MailgwServer],
) -> None:
    port, tls_port = free_port(), free_port()
    server = server_factory(
        {
            "imap": {"workers": "0"},
            "http": http_overrides(port, tls_port, max_connections_per_ip="1"),
        }
    )
    wait_for_port("127.0.0.1", port, proc=server.proc)
    import socket

    def hold() -> socket.socket | None:
        """A kept-alive connection that got its answer (None while an earlier connection,
        closed by its client, is still counted)."""
        sock = socket.create_connection(("127.0.0.1", port), timeout=15)
        sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        if sock.recv(4096).startswith(b"HTTP/1.1 200 "):
            return sock
        sock.close()
        return None

    with wait_until(hold, what="a connection admitted"):
        status, _, body = get(f"http://127.0.0.1:{port}/healthz")
        assert (status, body) == (503, "too many connections from your address\n")
    wait_until(lambda: get(f"http://127.0.0.1:{port}/healthz")[0] == 200, what="slot freed")
    samples, _ = scrape(port)
    refused = value(samples, "mailgw_connections_refused_total", protocol="http", reason="per_ip")
    assert refused >= 1


def test_without_a_token_other_networks_get_403(
    server_factory: Callable[..., MailgwServer],
) -> None:
    port, tls_port = free_port(), free_port()
    server = server_factory(
        {"imap": {"workers": "0"}, "http": http_overrides(port, tls_port, allow="10.0.0.0/8")}
    )
    wait_for_port("127.0.0.1", port, proc=server.proc)
    for path in ("/metrics", "/readyz"):
        out = subprocess.run(
            [
                "curl",
                "-sS",
                "-i",
                "-H",
                f"Authorization: Bearer {TOKEN}",
                f"http://127.0.0.1:{port}{path}",
            ],
            capture_output=True,
            text=True,
            check=True,
        )
        assert out.stdout.startswith("HTTP/1.1 403 "), out.stdout
        assert "www-authenticate" not in out.stdout.lower()  # no token can help
        status, _, body = get(f"http://127.0.0.1:{port}{path}")
        assert status == 403 and body == "403 Forbidden: not allowed from this address\n"
    assert get(f"http://127.0.0.1:{port}/healthz")[:3:2] == (200, "ok\n")


def test_message_flow_counters_and_the_tracking_api(node: MailgwServer) -> None:
    """The tracking counters (``mailgw.tracking``) are in the same /metrics, and the tracking
    timeline is served at /api/v1/tracking (behind the admin guard: loopback is allowed)."""
    import json
    import urllib.parse

    port = node.ports["http"]
    before, _ = scrape(port)
    msg = EmailMessage()
    msg["From"] = "sender@outside.test"
    msg["To"] = "alice@example.test"
    msg["Subject"] = "tracked over http"
    msg["Message-ID"] = "<http-track-1@outside.test>"
    msg.set_content("follow me\n")
    with smtplib.SMTP("127.0.0.1", node.ports["mx"], timeout=15) as smtp:
        smtp.send_message(msg)

    def delivered() -> dict | None:
        q = urllib.parse.quote("<http-track-1@outside.test>")
        status, headers, body = get(f"http://127.0.0.1:{port}/api/v1/tracking?q={q}")
        assert status == 200, body
        assert headers["Content-Type"].startswith("application/json")
        messages = json.loads(body)["messages"]
        if messages and "delivered" in [e["kind"] for e in messages[0]["events"]]:
            return messages[0]  # type: ignore[no-any-return]
        return None

    message = wait_until(delivered, what="the delivered event over HTTP")
    assert message["message_id"] == "<http-track-1@outside.test>"
    kinds = [e["kind"] for e in message["events"]]
    assert kinds[0] == "received" and "delivered" in kinds
    after, _ = scrape(port)
    received = "mailgw_messages_received_total"
    assert value(after, received, role="mx") == value(before, received, role="mx") + 1
    status, _, body = get(f"http://127.0.0.1:{port}/api/v1/tracking")
    assert status == 400 and "error" in json.loads(body)
