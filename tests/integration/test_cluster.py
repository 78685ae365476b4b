"""The mail path through a cluster, with real processes on loopback: HAProxy -> 2 gateways
(PROXY v2) -> LMTP -> 2 backends; nginx's mail proxy -> auth_http -> the user's backend."""

from __future__ import annotations

import email
import imaplib
import poplib
import smtplib
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.integration.cluster_fixture import DOMAIN, Cluster, have_peers, start_cluster
from tests.integration.helpers import wait_until

pytestmark = pytest.mark.skipif(not have_peers(), reason="haproxy/nginx mail module missing")

CLIENT_IP = "127.0.0.9"


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    c = start_cluster(tmp_path_factory.mktemp("cluster"))
    try:
        yield c
    finally:
        c.stop()


def message(subject: str, to: str = f"alice@{DOMAIN}", sender: str = "sender@remote.test") -> bytes:
    return (
        f"From: {sender}\r\nTo: {to}\r\nSubject: {subject}\r\n"
        f"Message-ID: <{subject}@remote.test>\r\n\r\nbody of {subject}\r\n"
    ).encode()


def send_via_haproxy(cluster: Cluster, subject: str, to: str) -> None:
    with smtplib.SMTP(
        "127.0.0.1", cluster.ports["haproxy"], timeout=15, source_address=(CLIENT_IP, 0)
    ) as s:
        s.sendmail("sender@remote.test", [to], message(subject, to))


def imap_subjects(cluster: Cluster, backend: str, user: str, port: int | None = None) -> list[str]:
    """Subjects in the user's INBOX, read with imaplib on the backend (or through ``port``)."""
    with imaplib.IMAP4("127.0.0.1", port or cluster.backends[backend].ports["imap"]) as m:
        m.login(f"{user}@{DOMAIN}", f"{user} password")
        m.select("INBOX")
        _, data = m.search(None, "ALL")
        subjects = []
        for num in data[0].split():
            _, parts = m.fetch(num, "(BODY.PEEK[HEADER.FIELDS (SUBJECT)])")
            raw = parts[0][1]  # type: ignore[index]
            subjects.append(str(email.message_from_bytes(raw)["Subject"]))
        return subjects


def maildir_subjects(cluster: Cluster, backend: str, user: str) -> list[str]:
    root = cluster.backends[backend].data_dir / "mail" / DOMAIN / user
    out = []
    for sub in ("new", "cur"):
        folder = root / sub
        if folder.is_dir():
            for f in folder.iterdir():
                out.append(str(email.message_from_bytes(f.read_bytes())["Subject"]))
    return out


def test_mail_through_haproxy_reaches_the_users_backend(cluster: Cluster) -> None:
    send_via_haproxy(cluster, "for-alice-1", f"alice@{DOMAIN}")
    send_via_haproxy(cluster, "for-bob-1", f"bob@{DOMAIN}")
    wait_until(lambda: "for-alice-1" in maildir_subjects(cluster, "be1", "alice"), what="alice")
    wait_until(lambda: "for-bob-1" in maildir_subjects(cluster, "be2", "bob"), what="bob")
    assert "for-alice-1" in imap_subjects(cluster, "be1", "alice")
    assert "for-bob-1" in imap_subjects(cluster, "be2", "bob")
    # Each mailbox is on its own node only.
    assert "for-alice-1" not in maildir_subjects(cluster, "be2", "alice")
    assert "for-bob-1" not in maildir_subjects(cluster, "be1", "bob")


def test_the_gateway_sees_the_real_client_address(cluster: Cluster) -> None:
    send_via_haproxy(cluster, "who-sent-it", f"alice@{DOMAIN}")
    path = wait_until(
        lambda: [
            f
            for sub in ("new", "cur")
            for f in (cluster.backends["be1"].data_dir / "mail" / DOMAIN / "alice" / sub).glob("*")
            if b"Subject: who-sent-it" in f.read_bytes()
        ],
        what="message stored",
    )[0]
    msg = email.message_from_bytes(path.read_bytes())
    received = " ".join(msg.get_all("Received") or [])
    assert f"[{CLIENT_IP}]" in received, received
    # ... and the gateway's log names it as the peer, not HAProxy's 127.0.0.1.
    logs = cluster.gateways["gw1"].log() + cluster.gateways["gw2"].log()
    assert f"peer={CLIENT_IP}" in logs


def test_imap_and_pop3_through_nginx_reach_the_users_backend(cluster: Cluster) -> None:
    send_via_haproxy(cluster, "nginx-bob", f"bob@{DOMAIN}")
    wait_until(lambda: "nginx-bob" in maildir_subjects(cluster, "be2", "bob"), what="bob")
    # imaplib LOGIN to nginx; nginx replays it to be2 with literals.
    via_nginx = imap_subjects(cluster, "be2", "bob", port=cluster.ports["nginx-imap"])
    assert "nginx-bob" in via_nginx
    assert sorted(via_nginx) == sorted(imap_subjects(cluster, "be2", "bob"))
    alice = imap_subjects(cluster, "be1", "alice", port=cluster.ports["nginx-imap"])
    assert sorted(alice) == sorted(imap_subjects(cluster, "be1", "alice"))
    assert "nginx-bob" not in alice
    be2_log = cluster.backends["be2"].log()
    assert "bob@example.test" in be2_log

    pop = poplib.POP3("127.0.0.1", cluster.ports["nginx-pop3"], timeout=15)
    try:
        pop.user(f"bob@{DOMAIN}")
        pop.pass_("bob password")
        count, _ = pop.stat()
        assert count == len(maildir_subjects(cluster, "be2", "bob"))
        tops = [b"\n".join(pop.top(i, 0)[1]) for i in range(1, count + 1)]
        assert any(b"Subject: nginx-bob" in t for t in tops)
    finally:
        pop.quit()

    # A wrong password: nginx relays the refusal (auth_http said Invalid login).
    with (
        imaplib.IMAP4("127.0.0.1", cluster.ports["nginx-imap"]) as m,
        pytest.raises(imaplib.IMAP4.error),
    ):
        m.login(f"bob@{DOMAIN}", "wrong password")


def test_smtp_submission_through_nginx_uses_xclient(cluster: Cluster) -> None:
    with smtplib.SMTP("127.0.0.1", cluster.ports["nginx-smtp"], timeout=15) as s:
        s.ehlo("client.test")
        s.login(f"carol@{DOMAIN}", "carol password")
        s.sendmail(
            f"carol@{DOMAIN}", [f"alice@{DOMAIN}"], message("from-carol", sender=f"carol@{DOMAIN}")
        )
    wait_until(lambda: "from-carol" in maildir_subjects(cluster, "be1", "alice"), what="carol")
    logs = cluster.gateways["gw1"].log() + cluster.gateways["gw2"].log()
    assert "XCLIENT from 127.0.0.1" in logs and "login=carol@example.test" in logs


def test_a_backend_outage_defers_and_delivers_after_it_returns(cluster: Cluster) -> None:
    be2 = cluster.backends["be2"]
    be2.stop()
    try:
        send_via_haproxy(cluster, "while-be2-down", f"bob@{DOMAIN}")

        def deferred() -> bool:
            logs = cluster.gateways["gw1"].log() + cluster.gateways["gw2"].log()
            return "via LMTP to be2" in logs and "deferred" in logs

        wait_until(deferred, what="deferral on a gateway")
        assert "while-be2-down" not in maildir_subjects(cluster, "be2", "bob")
    finally:
        be2.start()
    wait_until(
        lambda: "while-be2-down" in maildir_subjects(cluster, "be2", "bob"),
        timeout=30,
        what="delivery after be2 returned",
    )


def _send_with_retries(cluster: Cluster, subject: str, to: str) -> bool:
    """Like a client: retry a message whose transaction failed (True once acknowledged)."""
    for _ in range(20):
        try:
            send_via_haproxy(cluster, subject, to)
            return True
        except (smtplib.SMTPException, OSError):
            time.sleep(0.1)
    return False


def test_kill_9_of_a_gateway_during_a_stream_loses_no_acknowledged_message(
    cluster: Cluster,
) -> None:
    """500 messages (as the issue says); gw1 is killed with SIGKILL after 150 of them,
    restarted after the stream (its spool holds what it acknowledged but had not forwarded
    yet)."""
    acked = []
    gw1 = cluster.gateways["gw1"]
    try:
        for i in range(500):
            if i == 150:
                gw1.kill9()
            subject = f"stream-{i:03d}"
            if _send_with_retries(cluster, subject, f"carol@{DOMAIN}"):
                acked.append(subject)
    finally:
        if gw1.proc is None:
            gw1.start()
    assert len(acked) == 500
    wait_until(
        lambda: set(acked) <= set(maildir_subjects(cluster, "be1", "carol")),
        timeout=60,
        what="every acknowledged message delivered",
    )
    assert "gw2" in {g for g, s in cluster.gateways.items() if "stream-1" in s.log()}


def test_user_move_keeps_all_mail(cluster: Cluster) -> None:
    user = f"alice@{DOMAIN}"
    for i in range(5):
        send_via_haproxy(cluster, f"before-move-{i}", user)
    wait_until(
        lambda: (
            {f"before-move-{i}" for i in range(5)} <= set(maildir_subjects(cluster, "be1", "alice"))
        ),
        what="mail before the move",
    )
    before = set(imap_subjects(cluster, "be1", "alice"))
    # Flag one message on be1: the flags travel with it.
    with imaplib.IMAP4("127.0.0.1", cluster.backends["be1"].ports["imap"]) as m:
        m.login(user, "alice password")
        m.select("INBOX")
        m.store("1", "+FLAGS", "(\\Flagged)")
    be1, be2 = cluster.backends["be1"], cluster.backends["be2"]
    mover = subprocess.Popen(
        [
            *be1.cli_command,
            "--config",
            str(be1.config_path),
            "user",
            "move",
            user,
            "be2",
            "--target-config",
            str(be2.config_path),
            "--settle",
            "1",
        ],
        env=be1.env(),
        cwd=be1.cwd,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    during = []
    for i in range(10):  # mail arriving during the move is held, then goes to be2
        subject = f"during-move-{i}"
        send_via_haproxy(cluster, subject, user)
        during.append(subject)
        time.sleep(0.1)
    out, _ = mover.communicate(timeout=60)
    assert mover.returncode == 0, out
    assert "moved alice@example.test from be1 to be2" in out
    assert cluster.cli("user", "node", user).stdout.split() == [user, "be2"]
    expected = before | set(during)
    wait_until(
        lambda: expected <= set(imap_subjects(cluster, "be2", "alice")),
        timeout=30,
        what="all mail on be2",
    )
    assert not maildir_subjects(cluster, "be1", "alice")  # the source copy was expunged
    with imaplib.IMAP4("127.0.0.1", cluster.backends["be2"].ports["imap"]) as m:
        m.login(user, "alice password")
        m.select("INBOX")
        _, data = m.search(None, "FLAGGED")
        assert len(data[0].split()) == 1
    # nginx now sends alice to be2.
    assert expected <= set(imap_subjects(cluster, "be2", "alice", port=cluster.ports["nginx-imap"]))
    # New mail goes to be2 directly.
    send_via_haproxy(cluster, "after-move", user)
    wait_until(lambda: "after-move" in maildir_subjects(cluster, "be2", "alice"), what="after")
    assert Path(be1.data_dir).exists()
