"""End to end: the real `twistd mailgw` relays over domestic / overseas / SDN channels to test MX
servers on 127.0.0.x (a separate process, with its own DNS server), and submission with swaks.
The targets and channels are described in ``tests.integration.relay_world``.
"""

from __future__ import annotations

import email
import json
import smtplib
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import dkim
import dns.resolver
import pytest

from mailgw.testing.server import MailgwServer, free_port
from tests.integration.helpers import PASSWORD, mailbox_files, wait_until
from tests.integration.relay_world import (
    TARGETS,
    Peers,
    relay_overrides,
    send,
    start_node,
    with_subject,
)


@pytest.fixture(scope="module")
def node(
    peers: Peers, tmp_path_factory: pytest.TempPathFactory, selfsigned: tuple[Path, Path]
) -> Iterator[MailgwServer]:
    cert, key = selfsigned
    ports = (free_port(), free_port())
    overrides = relay_overrides(peers)
    overrides["tls"] = {"certificate": str(cert), "private_key": str(key)}
    overrides["submission"] = {
        "enabled": "yes",
        "listen": f"tcp:{ports[0]}:interface=127.0.0.1",
        "listen_tls": f"tcp:{ports[1]}:interface=127.0.0.1",
        "max_messages_per_hour": "50",
    }
    server = start_node(tmp_path_factory.mktemp("node"), overrides)
    server.ports["submission"], server.ports["submissions"] = ports
    yield server
    server.stop()


def queue_empty(server: MailgwServer) -> bool:
    rows = json.loads(server.cli("queue", "list", "--json").stdout)
    return not rows


def test_domestic_first_routing(node: MailgwServer, peers: Peers) -> None:
    send(node, "to-far@example.test", "domestic-1")
    [m] = wait_until(lambda: with_subject(peers, "domestic-1"), what="delivery to far.cn")
    assert m["server"] == TARGETS["far.cn"] and m["peer"] == "127.0.0.4"
    assert m["rcpts"] == ["bob@far.cn"] and m["mail_from"] == "alice@example.test"
    assert "Received: from" in m["data"]
    node.wait_for_log("channel=domestic source=127.0.0.4")
    node.wait_for_log(f"mx=mx.far.cn[{TARGETS['far.cn']}]")


def test_round_robin_spreads_100_messages_over_overseas_and_sdn(
    node: MailgwServer, peers: Peers
) -> None:
    with smtplib.SMTP("127.0.0.1", node.ports["mx"], timeout=10) as s:
        for i in range(100):
            s.sendmail(
                "alice@example.test",
                ["to-rr@example.test"],
                f"From: alice@example.test\r\nSubject: rr-{i}\r\n\r\nbody {i}\r\n",
            )
    wait_until(
        lambda: len([m for m in peers.messages(TARGETS["rr.example"])]) >= 100,
        timeout=60,
        what="100 deliveries",
    )
    msgs = peers.messages(TARGETS["rr.example"])
    assert len(msgs) == 100
    assert len({m["data"] for m in msgs}) == 100  # each message exactly once
    peers_used = [m["peer"] for m in msgs]
    assert set(peers_used) == {"127.0.0.2", "127.0.0.3"}
    assert 45 <= peers_used.count("127.0.0.2") <= 55
    # Sessions are reused: far fewer connections than messages.
    assert len(peers.connections(TARGETS["rr.example"])) < 100


def test_refused_source_address_leaves_via_sdn(node: MailgwServer, peers: Peers) -> None:
    for i in range(4):
        send(node, "to-block@example.test", f"block-{i}")
    wait_until(
        lambda: len(peers.messages(TARGETS["block.example"])) >= 4, what="4 deliveries via sdn"
    )
    assert {m["peer"] for m in peers.messages(TARGETS["block.example"])} == {"127.0.0.3"}
    assert "127.0.0.2" in peers.connections(TARGETS["block.example"])  # tried, refused
    node.wait_for_log("channel=overseas source=127.0.0.2")


@pytest.mark.parametrize(("domain", "good_peer"), [("busy", "127.0.0.3"), ("busy2", "127.0.0.2")])
def test_421_and_451_go_to_the_next_channel(
    node: MailgwServer, peers: Peers, domain: str, good_peer: str
) -> None:
    for i in range(2):
        send(node, f"to-{domain}@example.test", f"{domain}-{i}")
    ip = TARGETS[f"{domain}.example"]
    wait_until(lambda: len(peers.messages(ip)) >= 2, what=f"{domain} deliveries")
    assert {m["peer"] for m in peers.messages(ip)} == {good_peer}
    assert queue_empty(node)


def new_message_with(node: MailgwServer, before: set[str], marker: bytes) -> bytes | None:
    """A message in alice's mailbox not in ``before`` that contains ``marker`` (other tests'
    mail may still be arriving, in any order)."""
    for f in mailbox_files(node):
        if f.name not in before:
            data = f.read_bytes()
            if marker in data:
                return data
    return None


def test_550_5_1_1_bounces_at_once(node: MailgwServer, peers: Peers) -> None:
    before = {f.name for f in mailbox_files(node)}
    send(node, "to-nobody@example.test", "nobody-1")
    data = wait_until(lambda: new_message_with(node, before, b"nobody@user.example"), what="a DSN")
    dsn = email.message_from_bytes(data)
    assert dsn["Subject"] == "Undelivered Mail Returned to Sender"
    assert dsn["Return-Path"] == "<>"
    status = dsn.get_payload()[1].as_string()
    assert "Final-Recipient: rfc822; nobody@user.example" in status
    assert "Status: 5.1.1" in status and "Action: failed" in status
    assert "Subject: nobody-1" in dsn.get_payload()[2].as_string()
    wait_until(lambda: queue_empty(node), what="empty queue")


def test_null_mx_bounces_at_once(node: MailgwServer) -> None:
    before = {f.name for f in mailbox_files(node)}
    send(node, "to-null@example.test", "null-1")
    data = wait_until(lambda: new_message_with(node, before, b"bob@null.example"), what="a DSN")
    status = email.message_from_bytes(data).get_payload()[1].as_string()
    assert "bob@null.example" in status and "Status: 5.1.10" in status


def test_channel_status_command(node: MailgwServer) -> None:
    def ready() -> Any:
        status = json.loads(node.cli("channel", "status", "--json").stdout)
        names = {c["name"]: c for c in status["channels"]}
        return names if names["overseas"]["failures"] and names["sdn"]["successes"] else None

    names = wait_until(ready, what="counters in channels.json")
    assert set(names) == {"domestic", "overseas", "sdn"}
    out = node.cli("channel", "status").stdout
    assert "overseas" in out and "active" in out


def swaks(
    node: MailgwServer, *args: str, port: str = "submission"
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["swaks", "--server", f"127.0.0.1:{node.ports[port]}", "--timeout", "15", *args],
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_submission_needs_tls_and_auth(node: MailgwServer) -> None:
    r = swaks(node, "--to", "bob@rr.example", "--from", "alice@example.test")
    assert "530 5.7.0 Must issue a STARTTLS command first" in r.stdout
    r = swaks(
        node,
        "--to",
        "bob@rr.example",
        "--from",
        "alice@example.test",
        "--auth",
        "PLAIN",
        "--auth-user",
        "alice@example.test",
        "--auth-password",
        PASSWORD,
    )
    assert r.returncode != 0 and "AUTH PLAIN" not in r.stdout  # not offered before TLS
    r = swaks(node, "--to", "bob@rr.example", "--from", "alice@example.test", "--tls")
    assert "530 5.7.0 Authentication required" in r.stdout
    r = swaks(
        node,
        "--to",
        "bob@rr.example",
        "--from",
        "alice@example.test",
        "--tls",
        "--auth",
        "PLAIN",
        "--auth-user",
        "alice@example.test",
        "--auth-password",
        "wrong",
    )
    assert "535 5.7.8" in r.stdout


def test_submission_sends_signed_mail_and_local_copy(node: MailgwServer, peers: Peers) -> None:
    out = node.cli("dkim", "keygen", "example.test", "--selector", "s1", "--bits", "1024").stdout
    record = "".join(p.strip('"') for p in out.split("( ", 1)[1].rsplit(" )", 1)[0].split('" "'))
    extra = {"s1._domainkey.example.test TXT": [f'"{record}"']}
    (peers.dir / "zone-extra.json").write_text(json.dumps(extra))
    before = len(mailbox_files(node, "bob"))
    r = swaks(
        node,
        "--to",
        "carol@rr.example,bob@example.test",
        "--from",
        "alice@example.test",
        "--tls",
        "--auth",
        "LOGIN",
        "--auth-user",
        "alice@example.test",
        "--auth-password",
        PASSWORD,
        "--header",
        "Subject: submitted-1",
    )
    assert r.returncode == 0, r.stdout + r.stderr
    [m] = wait_until(lambda: with_subject(peers, "submitted-1"), what="relayed submission")
    data = m["data"].encode()
    assert data.startswith(b"DKIM-Signature: ")
    assert b"message-id: " in data.lower() and b"with ESMTPSA" in data

    def dnsfunc(name: bytes, timeout: int = 5) -> bytes:
        # The published record, as the test DNS server serves it.
        resolver = dns.resolver.Resolver(configure=False)
        resolver.nameservers = ["127.0.0.1"]
        resolver.port = peers.dns_port
        answer = resolver.resolve(name.decode(), "TXT")
        return b"".join(b"".join(r.strings) for r in answer)

    assert dkim.verify(data, dnsfunc=dnsfunc)
    wait_until(lambda: mailbox_files(node, "bob")[before:], what="the local copy for bob")


def test_submission_implicit_tls_and_spoofing(node: MailgwServer) -> None:
    auth = ["--auth", "PLAIN", "--auth-user", "alice@example.test", "--auth-password", PASSWORD]
    r = swaks(
        node,
        "--to",
        "x@rr.example",
        "--from",
        "bob@example.test",
        "--tlsc",
        *auth,
        port="submissions",
    )
    assert "553 5.7.1 Sender address not owned" in r.stdout
    r = swaks(
        node,
        "--to",
        "x@rr.example",
        "--from",
        "alice@example.test",
        "--tlsc",
        *auth,
        "--header",
        "From: Bob <bob@example.test>",
        port="submissions",
    )
    assert "553 5.7.1 From header address not owned" in r.stdout
    r = swaks(
        node,
        "--to",
        "x@rr.example",
        "--from",
        "postmaster@example.test",
        "--tlsc",
        *auth,
        "--header",
        "From: postmaster@example.test",
        port="submissions",
    )
    assert r.returncode == 0, r.stdout  # an alias of alice


def test_all_channels_down_defer_retry_bounce_after_max_age(peers: Peers, tmp_path: Path) -> None:
    node = start_node(tmp_path / "expiring", relay_overrides(peers, max_age="4s"))
    try:
        send(node, "to-down@example.test", "down-1")
        node.wait_for_log("deferred (attempt 1")
        node.wait_for_log("deferred (attempt 2", timeout=10)
        rows = json.loads(node.cli("queue", "list", "--json").stdout)
        assert rows and rows[0]["state"] in ("retry", "active")
        files = wait_until(lambda: mailbox_files(node), timeout=20, what="the expiry DSN")
        dsn = email.message_from_bytes(files[0].read_bytes())
        status = dsn.get_payload()[1].as_string()
        assert "Final-Recipient: rfc822; bob@down.example" in status
        assert "delivery time expired" in status and "Action: failed" in status
        wait_until(lambda: queue_empty(node), what="empty queue")
    finally:
        node.stop()


def test_kill_9_during_delivery_never_loses_the_message(peers: Peers, tmp_path: Path) -> None:
    node = start_node(tmp_path / "killed", relay_overrides(peers))
    try:
        send(node, "to-slow@example.test", "slow-1")
        wait_until(
            lambda: TARGETS["slow.example"] and peers.connections(TARGETS["slow.example"]),
            what="a connection to the slow target",
        )
        time.sleep(0.5)  # inside the target's data delay
        node.kill9()
        node.start()
        got = wait_until(lambda: with_subject(peers, "slow-1"), timeout=30, what="delivery")
        wait_until(lambda: queue_empty(node), timeout=30, what="empty queue")
        assert 1 <= len(with_subject(peers, "slow-1")) <= 2 and got
    finally:
        node.stop()


def test_dns_server_serves_the_zone(peers: Peers) -> None:
    resolver = dns.resolver.Resolver(configure=False)
    resolver.nameservers = ["127.0.0.1"]
    resolver.port = peers.dns_port
    answer = resolver.resolve("rr.example", "MX")
    assert str(answer[0].exchange) == "mx.rr.example."
