"""offlineimap3 against the real twistd: two syncs without duplicates, flags both ways."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from mailgw.testing.server import MailgwServer
from tests.integration.helpers import PASSWORD
from tests.integration.test_imap_mbsync import (
    ALICE,
    bulk_append,
    connect,
    local_files,
    local_state,
    remote_state,
    sample,
    with_flags,
)

COUNT = 150


def offlineimap(config: Path) -> subprocess.CompletedProcess[bytes]:
    out = subprocess.run(
        ["offlineimap", "-c", str(config), "-o", "-u", "quiet"],
        capture_output=True,
        timeout=300,
        stdin=subprocess.DEVNULL,
    )
    text = (out.stdout + out.stderr).decode(errors="replace")
    assert out.returncode == 0, text
    assert "ERROR" not in text, text
    return out


@pytest.mark.timeout(600)
def test_offlineimap_syncs_twice_without_duplicates(server: MailgwServer, tmp_path: Path) -> None:
    if shutil.which("offlineimap") is None:
        pytest.fail("offlineimap3 not installed (.ci/run installs it)")
    originals = {f"s{i}@elsewhere.test": sample(i) for i in range(COUNT)}
    bulk_append(server, list(originals.values()))
    local = tmp_path / "mail"
    config = tmp_path / "offlineimaprc"
    config.write_text(
        f"[general]\nmetadata = {tmp_path / 'meta'}\naccounts = test\nui = quiet\n\n"
        "[Account test]\nlocalrepository = local\nremoterepository = remote\n\n"
        f"[Repository local]\ntype = Maildir\nlocalfolders = {local}\n\n"
        f"[Repository remote]\ntype = IMAP\nremotehost = 127.0.0.1\n"
        f"remoteport = {server.ports['imap']}\nremoteuser = {ALICE}\n"
        f"remotepass = {PASSWORD}\nssl = no\nstarttls = no\n"
        "folderfilter = lambda name: name in ['INBOX', 'Archive']\n"
    )
    inbox = local / "INBOX"

    offlineimap(config)
    near = local_state(inbox)
    assert set(near) == set(originals)
    for mid, (_, flags, data) in near.items():
        # offlineimap keeps the stored bytes except for the X-OfflineIMAP header it adds
        kept = b"".join(
            line for line in data.splitlines(True) if not line.startswith(b"X-OfflineIMAP:")
        )
        assert kept.replace(b"\r\n", b"\n") == originals[mid].replace(b"\r\n", b"\n"), mid
        assert flags == set()
    far = remote_state(server)
    assert set(far) == set(originals)

    # the second run changes nothing and duplicates nothing
    names = [p.name for p in local_files(inbox)]
    offlineimap(config)
    assert [p.name for p in local_files(inbox)] == names
    again = remote_state(server)
    assert {m: v[:2] for m, v in again.items()} == {m: v[:2] for m, v in far.items()}

    # a local flag change goes up; a remote one comes down; each exactly once
    with_flags(near["s3@elsewhere.test"][0], "FS")
    client = connect(server)
    try:
        client.select("INBOX")
        client.uid("STORE", str(far["s4@elsewhere.test"][0]), "+FLAGS", "(\\Answered)")
    finally:
        client.logout()
    offlineimap(config)
    far2 = remote_state(server)
    near2 = local_state(inbox)
    assert set(far2) == set(near2) == set(originals)
    assert far2["s3@elsewhere.test"][1] == {"\\Flagged", "\\Seen"}
    assert near2["s4@elsewhere.test"][1] == {"\\Answered"}
    assert {m for m in far2 if far2[m][:2] != far[m][:2]} == {
        "s3@elsewhere.test",
        "s4@elsewhere.test",
    }
    assert {m for m in near2 if near2[m][1] != near[m][1]} == {
        "s3@elsewhere.test",
        "s4@elsewhere.test",
    }
    # a new local message is uploaded once (APPEND with flags, found again by its UID)
    extra = sample(COUNT)
    (inbox / "new" / "1700000000.local.test").write_bytes(extra)
    offlineimap(config)
    offlineimap(config)
    far3 = remote_state(server)
    assert set(far3) == set(originals) | {f"s{COUNT}@elsewhere.test"}
    assert far3[f"s{COUNT}@elsewhere.test"][3].replace(b"\r\n", b"\n") == extra.replace(
        b"\r\n", b"\n"
    )
    assert len(local_files(inbox)) == COUNT + 1
    del far3[f"s{COUNT}@elsewhere.test"]
    assert {m: v[:2] for m, v in far3.items()} == {m: v[:2] for m, v in far2.items()}
    assert "Traceback" not in server.log() and "SERVERBUG" not in server.log()
