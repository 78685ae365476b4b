"""SORT (TO), (CC) and (DISPLAYTO) on group addresses, mailgw and Dovecot side by side (issue 9).

The same messages are APPENDed to the real ``twistd mailgw`` and to a private Dovecot (the one
``bench/peers.py`` runs); both must answer the same order, and that order is also written out
(``tests/imap/test_sortthread_cost.py``) so the rule is checked without Dovecot too.
"""

from __future__ import annotations

import imaplib
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from mailgw.testing.server import MailgwServer, free_port
from tests.imap.test_sortthread_cost import (
    EXPECTED_DISPLAYTO,
    EXPECTED_TO,
    GROUP_FIELDS,
    group_message,
)
from tests.integration.helpers import PASSWORD

DOVECOT = "/usr/sbin/dovecot"
SORTS = (
    ("To", "TO", EXPECTED_TO),
    ("Cc", "CC", EXPECTED_TO),
    ("To", "DISPLAYTO", EXPECTED_DISPLAYTO),
)


def sort_orders(client: imaplib.IMAP4) -> dict[str, list[int]]:
    """Create one folder per header, APPEND the messages, return every SORT's order."""
    out: dict[str, list[int]] = {}
    for header, criterion, _expected in SORTS:
        folder = f"groups-{criterion}"
        typ, _ = client.create(folder)
        assert typ == "OK"
        for seq, field in enumerate(GROUP_FIELDS, 1):
            typ, _ = client.append(folder, None, None, group_message(seq, field, header))
            assert typ == "OK"
        typ, _ = client.select(folder)
        assert typ == "OK"
        for reverse in ("", "REVERSE "):
            typ, data = client.sort(f"({reverse}{criterion})", "UTF-8", "ALL")
            assert typ == "OK", data
            out[reverse + criterion] = [int(n) for n in data[0].split()]
    return out


@pytest.fixture
def dovecot() -> Iterator[int]:
    if not (os.path.exists(DOVECOT) and shutil.which("doveconf")):
        pytest.skip("dovecot-imapd is not installed (apt-get install dovecot-imapd)")
    from bench.peers import DovecotPeer

    # Dovecot's auth and mail processes run as other users: pytest's private (0700) tmp_path
    # is not reachable for them, so the instance gets its own world-traversable folder.
    workdir = Path(tempfile.mkdtemp(prefix="mailgw-dovecot-"))
    workdir.chmod(0o755)
    peer = DovecotPeer(workdir / "dovecot", free_port(), {"alice": "{PLAIN}secret"})
    try:
        peer.start()
        yield peer.port
    finally:
        peer.stop()
        shutil.rmtree(workdir, ignore_errors=True)


def test_sort_on_group_addresses_matches_dovecot(server: MailgwServer, dovecot: int) -> None:
    theirs = imaplib.IMAP4("127.0.0.1", dovecot, timeout=30)
    theirs.login("alice", "secret")
    dovecot_orders = sort_orders(theirs)
    theirs.logout()

    ours = imaplib.IMAP4("127.0.0.1", server.ports["imap"], timeout=30)
    ours.login("alice@example.test", PASSWORD)
    mailgw_orders = sort_orders(ours)
    ours.logout()

    assert mailgw_orders == dovecot_orders
    for _header, criterion, expected in SORTS:
        assert mailgw_orders[criterion] == expected
        assert mailgw_orders["REVERSE " + criterion] == list(reversed(expected))
