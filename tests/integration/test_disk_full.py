"""End to end: APPEND into a mailbox on a full filesystem (a tiny tmpfs, root only) answers
``NO [OVERQUOTA] Not enough disk space`` and the next APPEND that fits succeeds."""

from __future__ import annotations

import imaplib
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from mailgw.testing.server import MailgwServer
from tests.integration.helpers import PASSWORD, provision

USER = "alice@example.test"


@pytest.fixture
def small_server(tmp_path: Path) -> Iterator[MailgwServer]:
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    server = MailgwServer(tmp_path / "node")
    provision(server)
    mount = server.data_dir / "mail" / "example.test" / "alice"
    mount.mkdir(parents=True)
    result = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=512k,mode=0700", "tmpfs", str(mount)],
        capture_output=True,
        text=True,
    )
    if result.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs: {result.stderr.strip()}")
    try:
        server.start()
        try:
            yield server
        finally:
            server.stop()
    finally:
        subprocess.run(["umount", str(mount)], check=True)


def test_append_on_a_full_filesystem(small_server: MailgwServer) -> None:
    client = imaplib.IMAP4("127.0.0.1", small_server.ports["imap"], timeout=15)
    try:
        client.login(USER, PASSWORD)
        assert client.select("INBOX")[0] == "OK"
        big = b"Subject: big\r\n\r\n" + (b"y" * 78 + b"\r\n") * 12_000  # ~1 MB > 512 KiB
        typ, data = client.append("INBOX", None, None, big)
        assert (typ, data) == ("NO", [b"[OVERQUOTA] Not enough disk space"])
        typ, data = client.append("INBOX", None, None, b"Subject: small\r\n\r\nfits\r\n")
        assert typ == "OK" and data[0].startswith(b"[APPENDUID "), data
        typ, data = client.uid("FETCH", "1:*", "(BODY.PEEK[])")
        assert typ == "OK" and data[0][1] == b"Subject: small\r\n\r\nfits\r\n"
    finally:
        client.logout()
    assert "Traceback" not in small_server.log()
    assert "APPEND failed, disk full" in small_server.log()
