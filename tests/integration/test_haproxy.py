"""A real HAProxy in front of the MX and POP3 roles, sending PROXY v2 (and checking health)."""

from __future__ import annotations

import poplib
import signal
import smtplib
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from mailgw.testing.server import MailgwServer, free_port, wait_for_port
from tests.integration.helpers import PASSWORD, mailbox_files, wait_until


@pytest.fixture
def haproxy(tmp_path: Path) -> Iterator[Callable[[str], subprocess.Popen[bytes]]]:
    procs: list[subprocess.Popen[bytes]] = []

    def start(config: str) -> subprocess.Popen[bytes]:
        path = tmp_path / "haproxy.cfg"
        path.write_text(config)
        check = subprocess.run(["haproxy", "-c", "-f", str(path)], capture_output=True, text=True)
        assert check.returncode == 0, check.stdout + check.stderr
        proc = subprocess.Popen(["haproxy", "-db", "-f", str(path)], stdout=subprocess.DEVNULL)
        procs.append(proc)
        return proc

    yield start
    for proc in procs:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def test_haproxy_proxy_v2_in_front_of_mx_and_pop3(
    server_factory: Callable[..., MailgwServer],
    haproxy: Callable[[str], subprocess.Popen[bytes]],
) -> None:
    mx_backend, pop3_backend = free_port(), free_port()
    server = server_factory(
        {
            "mx": {"listen": f"haproxy:tcp:{mx_backend}:interface=127.0.0.1"},
            "pop3": {"listen": f"haproxy:tcp:{pop3_backend}:interface=127.0.0.1"},
        }
    )
    mx_front, pop3_front = free_port(), free_port()
    haproxy(
        f"""
global
    maxconn 100
defaults
    mode tcp
    timeout connect 2s
    timeout client 30s
    timeout server 30s
frontend mx
    bind 127.0.0.1:{mx_front}
    default_backend mx
backend mx
    option smtpchk EHLO check.local
    server node1 127.0.0.1:{mx_backend} send-proxy-v2 check inter 500ms
frontend pop3
    bind 127.0.0.1:{pop3_front}
    default_backend pop3
backend pop3
    server node1 127.0.0.1:{pop3_backend} send-proxy-v2
"""
    )
    wait_for_port("127.0.0.1", mx_front)
    # The client connects from 127.0.0.2; mailgw's real peer is HAProxy on 127.0.0.1.
    smtp = smtplib.SMTP("127.0.0.1", mx_front, timeout=10, source_address=("127.0.0.2", 0))
    assert smtp.ehlo("client.test")[0] == 250
    smtp.sendmail(
        "bob@elsewhere.test", ["alice@example.test"], "Subject: via haproxy\r\n\r\nhi\r\n"
    )
    smtp.quit()
    files = wait_until(lambda: mailbox_files(server), what="delivery")
    received = files[0].read_bytes()
    # The Received header names the client HAProxy saw, taken from the PROXY v2 header.
    assert b"from client.test" in received and b"[127.0.0.2]" in received
    pop = poplib.POP3("127.0.0.1", pop3_front, timeout=10)
    pop.user("alice@example.test")
    pop.pass_(PASSWORD)  # plaintext allowed: the proxied client is on loopback
    assert pop.stat()[0] == 1
    pop.quit()
    # HAProxy's health checks (PROXY v2 LOCAL + EHLO) were answered, not refused.
    log = server.log()
    assert "invalid PROXY header" not in log
    assert "untrusted peer" not in log
