"""End to end: the reputation service in a real `twistd mailgw` with a real rspamd
(tests/integration/rspamd_peer.py), authenticated submission (smtplib), the relay to test MX
servers (tests/integration/relay_peers.py) and the `mailgw report` / `mailgw reputation`
commands: a spam burst from one user goes only through the spam route, then the user is rate
limited, blocked, and allowed again; GTUBE inbound goes to Junk; forged Authentication-Results
are stripped (read back over IMAP); rspamd down leaves the heuristics."""

from __future__ import annotations

import email.utils
import imaplib
import json
import smtplib
import ssl
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from mailgw.policy.reputation.service import queue_ids_in
from mailgw.testing.server import MailgwServer, free_port, render_config
from tests.integration.helpers import PASSWORD, provision, wait_until
from tests.integration.relay_world import TARGETS, Peers, relay_overrides
from tests.integration.rspamd_peer import RSPAMD, Rspamd

pytestmark = pytest.mark.skipif(RSPAMD is None, reason="rspamd (Debian package) not installed")

RR = TARGETS["rr.example"]
DOMESTIC = "127.0.0.4"
GTUBE = "XJS*C4JDBQADN1.NSBN3*2IDNEN*GTUBE-STANDARD-ANTI-UBE-TEST-EMAIL*C.34X"


@pytest.fixture(scope="module")
def rspamd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Rspamd]:
    r = Rspamd(tmp_path_factory.mktemp("rspamd"))
    r.start()
    yield r
    r.stop()


@pytest.fixture(scope="module")
def node(
    peers: Peers,
    rspamd: Rspamd,
    tmp_path_factory: pytest.TempPathFactory,
    selfsigned: tuple[Path, Path],
) -> Iterator[MailgwServer]:
    cert, key = selfsigned
    folder = tmp_path_factory.mktemp("rep-node")
    port = free_port()
    overrides = relay_overrides(peers)
    overrides["route:spam"] = {"message_class": "spam", "channels": "domestic"}
    overrides["tls"] = {"certificate": str(cert), "private_key": str(key)}
    overrides["submission"] = {"enabled": "yes", "listen": f"tcp:{port}:interface=127.0.0.1"}
    overrides["reputation"] = {
        "enabled": "yes",
        "rspamd": rspamd.address,
        "rspamd_timeout": "5s",
        "spam_threshold": "6",
        "url_blocklist": "bad-links.example",
        "spam_points": "2",
        "limit_score": "3",
        "block_score": "9",
        "limited_rate": "1/1h",
        "report_points": "5",
        "min_volume": "5",  # from the 6th message in an hour a fresh user's mail is a burst
        "spike_factor": "5",
    }
    # inbound auth off: the content score picks the bands itself (Junk from 3, never reject)
    overrides["inbound_auth"] = {"junk_score": "3", "quarantine_score": "0", "reject_score": "0"}
    server = MailgwServer(folder, overrides)
    users = ("spammer", "heur", "burster", "bouncer")
    provision(
        server, *(("user", "add", f"{u}@example.test", "--password", f"{u} pw") for u in users)
    )
    server.start()
    server.ports["submission"] = port
    yield server
    server.stop()


def message(subject: str, body: str, sender: str, to: str = "bob@rr.example") -> bytes:
    return (
        f"From: {sender}\r\nTo: {to}\r\nSubject: {subject}\r\n"
        f"Date: {email.utils.formatdate()}\r\nMessage-ID: {email.utils.make_msgid()}\r\n"
        f"\r\n{body}\r\n"
    ).encode()


def submit(
    node: MailgwServer, user: str, password: str, data: bytes, to: str = "bob@rr.example"
) -> dict[str, Any]:
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    with smtplib.SMTP("127.0.0.1", node.ports["submission"], timeout=30) as s:
        s.starttls(context=context)
        s.login(f"{user}@example.test", password)
        return s.sendmail(f"{user}@example.test", [to], data)


def at_peer(peers: Peers, marker: str) -> list[dict[str, Any]]:
    return [m for m in peers.messages(RR) if marker in m["data"]]


def show(node: MailgwServer, subject: str) -> dict[str, Any]:
    [row] = json.loads(node.cli("reputation", "show", subject, "--json").stdout)
    return dict(row)


def test_spam_burst_spam_route_then_limited_then_blocked_then_allowed(
    node: MailgwServer, peers: Peers
) -> None:
    pw = "spammer pw"
    sender = "spammer@example.test"
    submit(node, "spammer", pw, message("burst 1", GTUBE, sender))
    submit(node, "spammer", pw, message("burst 2", GTUBE, sender))  # 4 points: limited
    submit(node, "spammer", pw, message("burst 3", GTUBE, sender))  # 1 per hour allowed
    sent = wait_until(
        lambda: len(at_peer(peers, "Subject: burst")) >= 3 and at_peer(peers, "Subject: burst"),
        what="3 spam messages at the peer",
    )
    assert {m["peer"] for m in sent} == {DOMESTIC}  # the spam route's channel only
    assert all("X-Spam-Status: Yes" in m["data"] for m in sent)
    row = show(node, "user:spammer@example.test")
    assert row["spam"] == 3 and row["points"] == pytest.approx(6, abs=0.01)
    assert row["standing"] == "limited"
    with pytest.raises(smtplib.SMTPSenderRefused) as e:
        submit(node, "spammer", pw, message("burst 4", GTUBE, sender))
    assert e.value.smtp_code == 451 and b"4.7.1 Sender rate limited" in e.value.smtp_error

    # A spam report of one of the burst's queue IDs moves the sender over block_score.
    [first] = at_peer(peers, "Subject: burst 1")
    [qid] = queue_ids_in(first["data"].encode())
    out = node.cli("report", "spam", qid).stdout
    assert "user:spammer@example.test: points 11.0" in out
    with pytest.raises(smtplib.SMTPSenderRefused) as e:
        submit(node, "spammer", pw, message("burst 5", "hello", sender))
    assert e.value.smtp_code == 550 and b"5.7.1 Sender blocked" in e.value.smtp_error
    assert show(node, "user:spammer@example.test")["standing"] == "blocked"

    node.cli("reputation", "allow", "user:spammer@example.test")
    submit(node, "spammer", pw, message("clean again", "a normal message", sender))
    [clean] = wait_until(lambda: at_peer(peers, "Subject: clean again"), what="clean message")
    assert "X-Spam-Status: No" in clean["data"]
    node.cli("reputation", "reset", "user:spammer@example.test")
    assert show(node, "user:spammer@example.test")["points"] == 0


SENDER = "burster@example.test"


def test_a_volume_burst_leaves_only_through_the_spam_channel(
    node: MailgwServer, peers: Peers
) -> None:
    if 3600 - time.time() % 3600 < 60:  # all seven in one hour of the volume count
        time.sleep(3600 - time.time() % 3600 + 1)
    for i in range(1, 8):
        submit(node, "burster", "burster pw", message(f"newsletter {i}", "hello", SENDER))
    sent = wait_until(
        lambda: (
            len(at_peer(peers, "Subject: newsletter")) >= 7
            and at_peer(peers, "Subject: newsletter")
        ),
        what="7 messages at the peer",
    )
    by_subject = {m["data"].split("Subject: ")[1].split("\r\n")[0]: m for m in sent}
    for i in range(1, 6):
        assert "X-Spam-Status: No" in by_subject[f"newsletter {i}"]["data"]
    for i in (6, 7):
        m = by_subject[f"newsletter {i}"]
        assert m["peer"] == DOMESTIC and "VOLUME_SPIKE" in m["data"]
    row = show(node, "user:burster@example.test")
    assert row["hour_count"] == 7 and row["points"] == pytest.approx(2, abs=0.01)


def test_deliveries_and_unknown_recipient_bounces_are_counted(node: MailgwServer) -> None:
    sender = "bouncer@example.test"
    submit(node, "bouncer", "bouncer pw", message("to-known", "hello", sender))
    unknown = "nobody@user.example"  # the peer answers 550 5.1.1
    submit(node, "bouncer", "bouncer pw", message("to-unknown", "hi", sender, unknown), unknown)

    def counted() -> dict[str, Any] | None:
        row = show(node, "user:bouncer@example.test")
        return row if row["delivered"] == 1 and row["bounced"] == 1 else None

    row = wait_until(counted, what="a delivery and a bounce counted")
    assert row["sent"] == 2 and row["unknown"] == 1 and row["bounce_rate"] == 0.5
    assert row["points"] == pytest.approx(1.5, abs=0.01)  # bounce 0.5 + unknown 1


def test_unknown_recipients_at_the_mx_count_for_the_client_and_domain(node: MailgwServer) -> None:
    with smtplib.SMTP(
        "127.0.0.1", node.ports["mx"], timeout=30, source_address=("127.0.0.7", 0)
    ) as s:
        s.ehlo("probe.example")
        assert s.mail("x@probe.example")[0] == 250
        code, reply = s.rcpt("no-such-user@example.test")
        assert code == 550 and b"5.1.1" in reply
    ip = wait_until(
        lambda: (row := show(node, "ip:127.0.0.7"))["unknown"] == 1 and row, what="ip counted"
    )
    assert ip["points"] == pytest.approx(1, abs=0.01)
    assert show(node, "domain:probe.example")["unknown"] == 1


def imap_fetch(node: MailgwServer, marker: str, folder: str = "INBOX") -> bytes:
    def find() -> bytes | None:
        with imaplib.IMAP4("127.0.0.1", node.ports["imap"]) as m:
            m.login("alice@example.test", PASSWORD)
            typ, _ = m.select(folder, readonly=True)
            if typ != "OK":
                return None
            _, data = m.search(None, "SUBJECT", marker)
            for num in data[0].split():
                _, parts = m.fetch(num, "(BODY.PEEK[])")
                body = parts[0][1]
                assert isinstance(body, bytes)
                return body
        return None

    found: bytes = wait_until(find, what=f"{marker} in {folder}")
    return found


def mx_send(node: MailgwServer, data: bytes) -> None:
    with smtplib.SMTP("127.0.0.1", node.ports["mx"], timeout=30) as s:
        s.sendmail("someone@far.example", ["alice@example.test"], data)


def test_forged_authentication_results_and_virus_header_are_stripped(node: MailgwServer) -> None:
    data = message("forged-ar", "hello", "someone@far.example", "alice@example.test")
    forged = (
        b"Authentication-Results: mx.example.test; spf=pass smtp.mailfrom=far.example\r\n"
        b"Authentication-Results: MX.EXAMPLE.TEST;\r\n dkim=pass header.d=far.example\r\n"
        b"Authentication-Results: other.example; spf=fail\r\n"
        b"X-Virus-Scanned: clamav (forged)\r\n"
    )
    mx_send(node, forged + data)
    got = imap_fetch(node, "forged-ar")
    assert b"mx.example.test; spf=pass" not in got
    assert b"MX.EXAMPLE.TEST" not in got and b"dkim=pass header.d=far.example" not in got
    assert b"Authentication-Results: other.example; spf=fail" in got  # not ours: kept
    assert b"X-Virus-Scanned" not in got
    assert b"X-Spam-Status: No" in got


def test_gtube_inbound_goes_to_junk(node: MailgwServer) -> None:
    mx_send(node, message("gtube-in", GTUBE, "someone@far.example", "alice@example.test"))
    got = imap_fetch(node, "gtube-in", "Junk")
    assert b"X-Spam-Status: Yes, score=15.0" in got


def test_rspamd_down_heuristics_only(node: MailgwServer, peers: Peers, rspamd: Rspamd) -> None:
    rspamd.stop()
    body = "see http://bad-links.example/offer and https://bit.ly/x"
    submit(node, "heur", "heur pw", message("heuristic-spam", body, "heur@example.test"))
    [m] = wait_until(lambda: at_peer(peers, "Subject: heuristic-spam"), what="heuristic spam")
    assert m["peer"] == DOMESTIC
    assert "BLOCKLISTED:bad-links.example(6)" in m["data"] and "URL_SHORTENER(2)" in m["data"]
    node.wait_for_log("failed, heuristics only")

    # A ham report of that message, as a file: its Received field names the queue ID.
    saved = node.workdir / "reported.eml"
    saved.write_bytes(m["data"].encode())
    assert show(node, "user:heur@example.test")["points"] == pytest.approx(2, abs=0.01)
    out = node.cli("report", "ham", str(saved)).stdout
    assert "ham report" in out and "user:heur@example.test: points 0.0" in out

    # [reputation] spam_threshold applies on reload: the same message is not spam any more.
    node.sections["reputation"]["spam_threshold"] = "100"
    node.config_path.write_text(render_config(node.sections))
    node.cli("reload")
    submit(node, "heur", "heur pw", message("after-reload", body, "heur@example.test"))
    [after] = wait_until(lambda: at_peer(peers, "Subject: after-reload"), what="after reload")
    assert after["peer"] != DOMESTIC and "X-Spam-Status: No, score=8.0" in after["data"]

    # spam_action = hold (reloaded too): the spam is quarantined, not sent.
    node.sections["reputation"].update(spam_threshold="6", spam_action="hold")
    node.config_path.write_text(render_config(node.sections))
    node.cli("reload")
    submit(node, "heur", "heur pw", message("held-spam", body, "heur@example.test"))
    rows = json.loads(node.cli("quarantine", "list", "--json").stdout)
    [held] = [r for r in rows if r["envelope"]["sender"] == "heur@example.test"]
    assert held["rule"] == "reputation" and "score 8" in held["reason"]
    assert held["direction"] == "outbound"
    assert not at_peer(peers, "Subject: held-spam")
