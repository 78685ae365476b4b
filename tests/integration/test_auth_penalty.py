"""Brute-force defence end to end: failed logins over IMAP (in a worker process) lock the
account for POP3 and SMTP AUTH too; during the lockout even the right password fails with the
same answer as a wrong one; after it the right password works again."""

from __future__ import annotations

import re
import smtplib
import ssl
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from mailgw.testing.server import MailgwServer, free_port
from tests.integration.helpers import PASSWORD, imap_login, pop3_login, wait_until

ALICE = "alice@example.test"
READY_LINE = re.compile(r"imap worker (\d+) \(pid (\d+)\) ready")
LOCKOUT = 4.0


def smtp_login(server: MailgwServer, password: str) -> str:
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    with smtplib.SMTP_SSL(
        "127.0.0.1", server.ports["submissions"], timeout=30, context=context
    ) as smtp:
        try:
            smtp.login(ALICE, password)
            return "ok"
        except smtplib.SMTPAuthenticationError as e:
            return f"{e.smtp_code} {e.smtp_error.decode()}"


@pytest.fixture
def node(
    server_factory: Callable[..., MailgwServer], selfsigned: tuple[Path, Path]
) -> MailgwServer:
    cert, key = selfsigned
    submissions = free_port()
    server = server_factory(
        {
            "tls": {"certificate": str(cert), "private_key": str(key)},
            "directory": {
                "auth_failure_delay": "0.1s",
                "auth_max_delay": "0.2s",
                "auth_lockout_failures": "3",
                "auth_lockout_time": f"{LOCKOUT}s",
            },
            "imap": {"workers": "1"},
            "submission": {
                "enabled": "yes",
                "listen": f"tcp:{free_port()}:interface=127.0.0.1",
                "listen_tls": f"tcp:{submissions}:interface=127.0.0.1",
            },
        }
    )
    server.ports["submissions"] = submissions
    wait_until(lambda: READY_LINE.search(server.log()), what="IMAP worker ready")
    return server


def test_imap_failures_lock_the_account_for_every_role_until_the_lockout_ends(
    node: MailgwServer,
) -> None:
    wrong = [imap_login(node, "not the password") for _ in range(3)]
    assert all("AUTHENTICATIONFAILED" in w for w in wrong), wrong
    locked_at = time.monotonic()
    node.wait_for_log(f"auth lockout: account {ALICE} locked for {LOCKOUT}s after 3 failed logins")
    # The right password now fails on POP3, SMTP AUTH and IMAP, exactly as a wrong one does.
    assert pop3_login(node, PASSWORD) == "-ERR [AUTH] Authentication failed"
    assert pop3_login(node, "wrong again") == "-ERR [AUTH] Authentication failed"
    assert smtp_login(node, PASSWORD) == smtp_login(node, "wrong") != "ok"
    assert "AUTHENTICATIONFAILED" in imap_login(node, PASSWORD)
    assert time.monotonic() - locked_at < LOCKOUT, "too slow to observe the lockout"
    # After the lockout the right password works everywhere again.
    time.sleep(max(0.0, locked_at + LOCKOUT + 0.5 - time.monotonic()))
    assert pop3_login(node, PASSWORD) == "ok"
    assert imap_login(node, PASSWORD) == "ok"
    assert smtp_login(node, PASSWORD) == "ok"
