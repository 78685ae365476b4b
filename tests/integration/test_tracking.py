"""End to end: message tracking and JSON logs of the real `twistd mailgw`, relaying to the test
MX servers of ``relay_peers`` (see ``test_relay``).

One node, JSON logs on. Each test sends with smtplib and reads the story back with
``mailgw track`` (by queue ID, by Message-ID with and without brackets, by address, text and
``--json``): a message delivered locally, one relayed after a channel failover, one bounced
(with its DSN's own timeline), one deferred then delivered, one deleted by the admin. Finally
the whole log is parsed line by line with ``json.loads``.
"""

from __future__ import annotations

import imaplib
import json
import smtplib
import ssl
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from mailgw.testing.server import MailgwServer, free_port
from tests.integration.helpers import PASSWORD, wait_until
from tests.integration.relay_world import TARGETS, Peers, relay_overrides, start_node


@pytest.fixture(scope="module")
def node(
    peers: Peers, tmp_path_factory: pytest.TempPathFactory, selfsigned: tuple[Path, Path]
) -> Iterator[MailgwServer]:
    cert, key = selfsigned
    overrides = relay_overrides(peers)
    overrides["tls"] = {"certificate": str(cert), "private_key": str(key)}
    submission = free_port()
    overrides["submission"] = {
        "enabled": "yes",
        "listen": f"tcp:{submission}:interface=127.0.0.1",
        "listen_tls": f"tcp:{free_port()}:interface=127.0.0.1",
    }
    overrides["log"] = {"format": "json"}
    overrides["tracking"] = {"flush_interval": "50ms"}
    overrides["imap"] = {"workers": "1"}
    server = start_node(tmp_path_factory.mktemp("node"), overrides)
    server.ports["submission"] = submission
    yield server
    server.stop()


def send(server: MailgwServer, rcpt: str, message_id: str) -> str:
    """Send one message; the queue ID from the 250 reply."""
    sender = "carol@sender.test"
    body = f"From: {sender}\r\nSubject: track\r\nMessage-ID: {message_id}\r\n\r\nhello\r\n"
    with smtplib.SMTP("127.0.0.1", server.ports["mx"], timeout=10) as s:
        s.ehlo("client.sender.test")
        s.mail(sender)
        s.rcpt(rcpt)
        code, reply = s.data(body.encode())
    assert code == 250, reply
    return reply.decode().rsplit(" ", 1)[1]


def track(server: MailgwServer, *args: str) -> Any:
    return json.loads(server.cli("track", "--json", *args).stdout)


def kinds(message: dict[str, Any]) -> list[str]:
    return [e["kind"] for e in message["events"]]


def timeline_with(server: MailgwServer, query: str, kind: str, count: int = 1) -> Any:
    """The lookup of ``query`` once one of its messages has ``count`` events of ``kind``."""

    def ready() -> Any:
        body = track(server, query)
        if any(kinds(m).count(kind) >= count for m in body["messages"]):
            return body
        return None

    return wait_until(ready, timeout=30, what=f"{kind} for {query}")


def the(events: list[dict[str, Any]], kind: str) -> dict[str, Any]:
    [event] = [e for e in events if e["kind"] == kind]
    return event


def test_delivered_locally(node: MailgwServer) -> None:
    qid = send(node, "alice@example.test", "<local-1@sender.test>")
    body = timeline_with(node, qid, "delivered")
    [m] = body["messages"]
    assert m["queue_id"] == qid and m["message_id"] == "<local-1@sender.test>"
    assert m["status"] == "delivered" and kinds(m) == ["received", "policy", "delivered"]
    received = the(m["events"], "received")
    assert received["role"] == "mx" and received["client"] == "127.0.0.1"
    assert received["helo"] == "client.sender.test" and received["user"] == ""
    assert received["sender"] == "carol@sender.test"
    assert received["recipients"] == ["alice@example.test"] and received["size"] > 0
    verdicts = the(m["events"], "policy")["verdicts"]
    rcpt = [v for v in verdicts if v["stage"] == "rcpt"]
    assert rcpt and {"recipient": "alice@example.test"}.items() <= rcpt[-1].items()
    assert all(v["verdict"] == "accept" for v in verdicts)
    delivered = the(m["events"], "delivered")
    assert delivered["user"] == "alice@example.test" and delivered["folder"] == "INBOX"
    assert isinstance(delivered["uid"], int) and delivered["uid"] >= 1
    times = [e["time"] for e in m["events"]]
    assert times == sorted(times)
    # The same message by Message-ID (with and without brackets) and by address.
    for query in ("<local-1@sender.test>", "local-1@sender.test"):
        assert [x["queue_id"] for x in track(node, query)["messages"]] == [qid]
    recent = track(node, "alice@example.test", "--since", "1h")["messages"]
    assert qid in [x["queue_id"] for x in recent]
    assert track(node, "alice@example.test", "--until", "@1")["messages"] == []
    text = node.cli("track", qid).stdout
    lines = text.splitlines()
    assert lines[0].startswith(f"{qid}  delivered  message-id <local-1@sender.test>")
    assert "from <carol@sender.test> to <alice@example.test>" in lines[1]
    assert " received   via mx from 127.0.0.1 helo=client.sender.test" in lines[2]
    assert " policy     " in lines[3] and "=accept" in lines[3]
    assert " delivered  <alice@example.test> -> mailbox alice@example.test folder=INBOX" in lines[4]


def test_relayed_after_a_channel_failover(node: MailgwServer, peers: Peers) -> None:
    # far.cn goes through the domestic channel first (127.0.0.4): now it refuses it.
    peers.behaviour[TARGETS["far.cn"]] = {"refuse_from": ["127.0.0.4"]}
    peers.write_behaviour()
    try:
        qid = send(node, "to-far@example.test", "<relay-1@sender.test>")
        body = timeline_with(node, "relay-1@sender.test", "relayed")
    finally:
        del peers.behaviour[TARGETS["far.cn"]]
        peers.write_behaviour()
    [m] = body["messages"]
    assert m["queue_id"] == qid and m["status"] == "relayed"
    assert kinds(m) == ["received", "policy", "queued", "attempt", "relayed"]
    assert the(m["events"], "queued")["recipients"] == ["bob@far.cn"]
    attempt = the(m["events"], "attempt")
    assert attempt["channel"] == "domestic" and attempt["result"] == "channel_failure"
    assert "554" in attempt["reply"]
    relayed = the(m["events"], "relayed")
    assert relayed["channel"] in ("overseas", "sdn") and relayed["recipient"] == "bob@far.cn"
    assert relayed["mx"].startswith(f"mx.far.cn[{TARGETS['far.cn']}]")
    assert relayed["reply"].startswith("250") and relayed["tls"] is False
    # The external recipient finds it too (it is only known after alias expansion).
    assert qid in [x["queue_id"] for x in track(node, "bob@far.cn")["messages"]]
    text = node.cli("track", "<relay-1@sender.test>").stdout
    assert " attempt    <bob@far.cn> channel=domestic" in text
    assert f" relayed    <bob@far.cn> channel={relayed['channel']} mx=mx.far.cn" in text


def test_bounced_with_the_dsn_timeline(node: MailgwServer) -> None:
    qid = send(node, "to-nobody@example.test", "<bounce-1@sender.test>")
    body = timeline_with(node, qid, "bounced")
    [m] = body["messages"]
    assert kinds(m)[:4] == ["received", "policy", "queued", "attempt"]
    bounced = the(m["events"], "bounced")
    assert bounced["recipients"] == ["nobody@user.example"] and "5.1.1" in bounced["reason"]
    assert bounced["to"] == "carol@sender.test"
    dsn_id = bounced["dsn"]
    assert dsn_id and dsn_id != qid
    # The DSN has its own timeline (it goes to carol@sender.test: relayed or deferred).
    dsn = timeline_with(node, dsn_id, "received")["messages"][0]
    received = the(dsn["events"], "received")
    assert received["role"] == "dsn" and received["bounce_of"] == qid
    assert received["sender"] == "" and received["recipients"] == ["carol@sender.test"]
    text = node.cli("track", qid).stdout
    assert " bounced    <nobody@user.example>: " in text and f"DSN {dsn_id}" in text
    by_address = [x["queue_id"] for x in track(node, "nobody@user.example")["messages"]]
    assert qid in by_address


def test_deferred_then_delivered(node: MailgwServer, peers: Peers) -> None:
    ip = TARGETS["rr.example"]
    peers.behaviour[ip] = {"refuse_from": ["127.0.0.2", "127.0.0.3", "127.0.0.4"]}
    peers.write_behaviour()
    try:
        qid = send(node, "to-rr@example.test", "<defer-1@sender.test>")
        body = timeline_with(node, qid, "deferred")
    finally:
        del peers.behaviour[ip]
        peers.write_behaviour()
    # The first: on a busy machine the retry (1s) may be refused too before the peer is back.
    deferred = [e for e in body["messages"][0]["events"] if e["kind"] == "deferred"][0]
    assert deferred["recipients"] == ["bob@rr.example"] and deferred["attempts"] == 1
    assert deferred["channel"] in ("overseas", "sdn") and "554" in deferred["reason"]
    assert deferred["next_try"] > deferred["time"]
    body = timeline_with(node, "defer-1@sender.test", "relayed")  # the retry (1s) delivers
    [m] = body["messages"]
    assert m["status"] == "relayed"
    k = kinds(m)
    assert k.index("deferred") < k.index("relayed") and k.count("relayed") == 1
    text = node.cli("track", "bob@rr.example", "--since", "10m").stdout
    assert " deferred   <bob@rr.example> channel=" in text and " next try " in text


def test_deleted_by_the_admin(node: MailgwServer) -> None:
    qid = send(node, "to-down@example.test", "<delete-1@sender.test>")
    timeline_with(node, qid, "deferred")  # down.example: nothing listens
    wait_until(
        lambda: node.cli("queue", "delete", qid, check=False).returncode == 0,
        what="deleted (not active)",
    )
    [m] = track(node, qid)["messages"]
    deleted = the(m["events"], "deleted")
    assert m["status"] == "deleted" and deleted["state"] == "retry" and deleted["by"]


def test_submitted_with_tls_and_the_user(node: MailgwServer) -> None:
    body = "From: alice@example.test\r\nSubject: sub\r\n\r\nhi\r\n"
    with smtplib.SMTP("127.0.0.1", node.ports["submission"], timeout=10) as s:
        s.starttls(context=ssl._create_unverified_context())
        s.login("alice@example.test", PASSWORD)
        s.mail("alice@example.test")
        s.rcpt("bob@example.test")
        code, reply = s.data(body.encode())
    assert code == 250
    qid = reply.decode().rsplit(" ", 1)[1]
    [m] = timeline_with(node, qid, "delivered")["messages"]
    received = the(m["events"], "received")
    assert received["role"] == "submission" and received["user"] == "alice@example.test"
    assert received["tls"] is True and m["message_id"].startswith("<")  # added by submission
    stages = {v["stage"] for v in the(m["events"], "policy")["verdicts"]}
    assert {"mail", "rcpt", "data"} <= stages
    assert [x["queue_id"] for x in track(node, m["message_id"])["messages"]] == [qid]


def test_rejected_recipient(node: MailgwServer) -> None:
    with smtplib.SMTP("127.0.0.1", node.ports["mx"], timeout=10) as s:
        s.ehlo("client.sender.test")
        s.mail("carol@sender.test")
        code, reply = s.rcpt("no-such-user@example.test")
    assert code == 550
    body = timeline_with(node, "no-such-user@example.test", "rejected")
    [m] = body["messages"]
    [event] = m["events"]
    assert m["status"] == "rejected" and m["queue_id"].startswith("session:")
    assert event["stage"] == "rcpt" and event["check"] == "local-recipient"
    assert event["reply"].startswith("550 5.1.1") and event["client"] == "127.0.0.1"
    text = node.cli("track", "no-such-user@example.test").stdout
    assert " rejected   at rcpt by local-recipient: 550 5.1.1 " in text


def test_no_match_and_bad_window(node: MailgwServer) -> None:
    r = node.cli("track", "nothing-like-it@nowhere.test", check=False)
    assert r.returncode == 1 and "no message found" in r.stderr
    assert track(node, "nothing-like-it@nowhere.test")["messages"] == []
    r = node.cli("track", "x", "--since", "last tuesday", check=False)
    assert r.returncode == 1 and "expected a time" in r.stderr


def test_json_log_lines(node: MailgwServer) -> None:
    """Every line of the log is one JSON object; the SMTP and delivery lines carry their
    fields, and an IMAP worker's line (relayed by the main process) keeps its own."""
    imap = imaplib.IMAP4("127.0.0.1", node.ports["imap"])
    imap.login("alice@example.test", PASSWORD)
    imap.logout()
    node.wait_for_log("login alice@example.test")
    qid = send(node, "bob@example.test", "<json-1@sender.test>")
    timeline_with(node, qid, "delivered")
    objects = []
    for n, line in enumerate(node.log().splitlines(), 1):
        obj = json.loads(line)
        assert isinstance(obj, dict), (n, line)
        assert {"time", "level", "system", "text"} <= obj.keys(), (n, line)
        objects.append(obj)
    received = [o for o in objects if o.get("event") == "received" and o.get("queue_id") == qid]
    [r] = received
    assert r["message_id"] == "<json-1@sender.test>" and r["client"] == "127.0.0.1"
    assert r["session"] and r["level"] == "info" and "accepted from=" in r["text"]
    [d] = [o for o in objects if o.get("event") == "delivered" and o.get("queue_id") == qid]
    assert "delivered: from=<carol@sender.test>" in d["text"]
    worker = [o for o in objects if "imap worker 0" in o["text"] and "login" in o["text"]]
    assert worker and worker[0]["user"] == "alice@example.test" and worker[0]["session"]


def test_tracking_database_file(node: MailgwServer) -> None:
    path = Path(node.data_dir) / "tracking.sqlite"
    assert path.is_file()
