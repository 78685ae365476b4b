"""``etc/cluster/`` runs: its start script brings up Redis, HAProxy, nginx, two gateways and
two backends on 127.0.0.10-22 (a copy of the folder, so its state stays in the test's
temporary folder), mail flows through HAProxy to the users' backends, IMAP through nginx
reads it, and ``stop`` ends every process."""

from __future__ import annotations

import email
import imaplib
import os
import poplib
import shutil
import smtplib
import socket
import ssl
import subprocess
import sys
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from mailgw.testing.server import REPO, TWISTD
from tests.integration.cluster_fixture import have_peers
from tests.integration.helpers import wait_until

PORTS = [("127.0.0.10", p) for p in (8025, 8587, 8465, 8081, 8143, 8110, 8588, 8880, 16379)]
PORTS += [(h, p) for h in ("127.0.0.11", "127.0.0.12") for p in (8025, 8587, 8465, 10587, 8080)]
PORTS += [(h, p) for h in ("127.0.0.21", "127.0.0.22") for p in (8024, 8143, 8110)]


def ports_free() -> bool:
    for host, port in PORTS:
        with socket.socket() as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the servers do
            try:
                s.bind((host, port))
            except OSError:
                return False
    return True


pytestmark = pytest.mark.skipif(
    not (have_peers() and shutil.which("redis-server")), reason="haproxy/nginx/redis missing"
)


@pytest.fixture
def example(tmp_path: Path) -> Iterator[tuple[Path, dict[str, str]]]:
    if not ports_free():
        pytest.skip("the example's fixed ports on 127.0.0.10-22 are in use")
    folder = tmp_path / "cluster"
    shutil.copytree(REPO / "etc" / "cluster", folder, ignore=shutil.ignore_patterns("run"))
    env = dict(os.environ)
    env.update(
        PYTHON=sys.executable,
        TWISTD=TWISTD,
        MAILGW=f"{sys.executable} -m mailgw.cli",
        MAILGW_REPO=str(REPO),
    )
    script = str(folder / "start.sh")
    try:
        subprocess.run([script, "start"], env=env, check=True, timeout=120, capture_output=True)
        yield folder, env
    finally:
        subprocess.run([script, "stop"], env=env, timeout=120, capture_output=True)


def mail(sender: str, subject: str) -> bytes:
    return f"From: {sender}@example.test\r\nSubject: {subject}\r\n\r\nhi\r\n".encode()


def subjects_via_nginx(user: str) -> list[str]:
    with imaplib.IMAP4("127.0.0.10", 8143) as m:
        m.login(f"{user}@example.test", f"{user} password")
        m.select("INBOX")
        _, data = m.search(None, "ALL")
        out = []
        for n in data[0].split():
            _, parts = m.fetch(n, "(BODY.PEEK[HEADER.FIELDS (SUBJECT)])")
            out.append(str(email.message_from_bytes(parts[0][1])["Subject"]))  # type: ignore[index]
        return out


def test_the_example_cluster_runs(example: tuple[Path, dict[str, str]]) -> None:
    folder, env = example
    with smtplib.SMTP("127.0.0.10", 8025, timeout=15, source_address=("127.0.0.99", 0)) as s:
        s.sendmail(
            "x@remote.test",
            ["alice@example.test", "bob@example.test"],
            b"Subject: example cluster\r\n\r\nhello\r\n",
        )
    wait_until(lambda: "example cluster" in subjects_via_nginx("alice"), what="alice's mail")
    wait_until(lambda: "example cluster" in subjects_via_nginx("bob"), what="bob's mail")
    # Each on its own backend, with the real client address in the gateway's Received.
    alice = list((folder / "run" / "be1" / "mail" / "example.test" / "alice").glob("new/*"))
    assert alice and b"[127.0.0.99]" in alice[0].read_bytes()
    assert list((folder / "run" / "be2" / "mail" / "example.test" / "bob").glob("new/*"))
    # Submission: through HAProxy (STARTTLS on 8587, TLS on 8465) and through nginx (8588).
    insecure = ssl._create_unverified_context()
    with smtplib.SMTP("127.0.0.10", 8587, timeout=15) as s:
        s.starttls(context=insecure)
        s.login("bob@example.test", "bob password")
        s.sendmail("bob@example.test", ["alice@example.test"], mail("bob", "via 587"))
    with smtplib.SMTP_SSL("127.0.0.10", 8465, timeout=15, context=insecure) as s:
        s.login("bob@example.test", "bob password")
        s.sendmail("bob@example.test", ["alice@example.test"], mail("bob", "via 465"))
    with smtplib.SMTP("127.0.0.10", 8588, timeout=15) as s:
        s.login("alice@example.test", "alice password")
        s.sendmail("alice@example.test", ["bob@example.test"], mail("alice", "via nginx"))
    wait_until(
        lambda: {"via 587", "via 465"} <= set(subjects_via_nginx("alice")), what="submissions"
    )
    wait_until(lambda: "via nginx" in subjects_via_nginx("bob"), what="nginx submission")
    pop = poplib.POP3("127.0.0.10", 8110, timeout=15)
    try:
        pop.user("bob@example.test")
        pop.pass_("bob password")
        assert pop.stat()[0] == 2
    finally:
        pop.quit()
    # The webmail's HTTP proxy reaches a gateway's http role.
    with urllib.request.urlopen("http://127.0.0.10:8880/healthz", timeout=15) as r:
        assert r.status == 200
    status = subprocess.run(
        [str(folder / "start.sh"), "status"], env=env, capture_output=True, text=True, check=True
    ).stdout
    assert status.count("running") == 7, status
    subprocess.run([str(folder / "start.sh"), "stop"], env=env, check=True, capture_output=True)
    status = subprocess.run(
        [str(folder / "start.sh"), "status"], env=env, capture_output=True, text=True, check=True
    ).stdout
    assert "running" not in status, status
