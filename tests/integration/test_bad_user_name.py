"""End to end: mail for a user whose name cannot name a mailbox (made before names were
checked) is bounced at once, not deferred forever; the CLI refuses such names now."""

from __future__ import annotations

import smtplib
import sqlite3
from collections.abc import Callable

from mailgw.testing.server import MailgwServer
from tests.integration.helpers import mailbox_files, wait_until


def test_legacy_bad_user_name_bounces(server_factory: Callable[..., MailgwServer]) -> None:
    server = server_factory()
    result = server.cli("user", "add", "a/b@example.test", "--password", "pw", check=False)
    assert result.returncode == 1 and "'/' is not allowed" in result.stderr
    db = sqlite3.connect(server.data_dir / "directory.sqlite")
    with db:  # what an older version let through
        db.execute(
            "INSERT INTO users(name, domain, password, quota, enabled)"
            " VALUES ('a/b@example.test', 'example.test', 'x', NULL, 1)"
        )
    db.close()
    with smtplib.SMTP("127.0.0.1", server.ports["mx"], timeout=10) as smtp:
        smtp.sendmail(
            "bob@example.test",
            ["a/b@example.test", "alice@example.test"],
            b"Subject: to a slash\r\nMessage-ID: <slash@test>\r\n\r\nhi\r\n",
        )
    wait_until(lambda: mailbox_files(server, "bob"), what="the bounce")
    [bounce] = mailbox_files(server, "bob")
    text = bounce.read_bytes()
    assert b"Final-Recipient: rfc822; a/b@example.test" in text and b"Status: 5.1.3" in text
    assert b"Message-ID: <slash@test>" in text
    assert len(mailbox_files(server, "alice")) == 1
    spool = server.data_dir / "spool"
    assert [p for state in ("deferred", "active") for p in (spool / state).iterdir()] == []
    assert not (server.data_dir / "mail" / "example.test" / "a").exists()
    assert "failed permanently" in server.log() and "Traceback" not in server.log()
