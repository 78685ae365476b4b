"""neomutt against the real twistd, driven by keys in a private tmux: copy, flag, read, delete."""

from __future__ import annotations

import shlex
import shutil
import subprocess
import time
from pathlib import Path

import pytest

from mailgw.testing.server import MailgwServer
from tests.integration.helpers import PASSWORD
from tests.integration.test_imap_mbsync import ALICE, bulk_append, remote_state, sample

COUNT = 30


def muttrc(path: Path, port: int) -> None:
    path.write_text(
        f'set imap_user = "{ALICE}"\n'
        f'set imap_pass = "{PASSWORD}"\n'
        f'set folder = "imap://127.0.0.1:{port}/"\n'
        'set spoolfile = "+INBOX"\n'
        "set ssl_starttls = no\nset ssl_force_tls = no\n"
        'set header_cache = ""\nset message_cachedir = ""\n'
        "set confirmappend = no\nset confirmcreate = no\nset quit = yes\nset move = no\n"
        'set delete = yes\nset mark_old = no\nset record = ""\nset auto_tag = no\n'
        "set imap_check_subscribed = no\nset mail_check = 60\nset timeout = 5\n"
        "set imap_keepalive = 60\nset sort = date\nset wait_key = no\nset beep = no\n"
    )


def run_neomutt(tmp_path: Path, port: int, keys: str, timeout: float = 60.0) -> str:
    """Run neomutt on INBOX in a private tmux server, push ``keys`` and wait for it to quit.
    Returns the last screen; on timeout, kills the private tmux server and fails."""
    rc = tmp_path / "muttrc"
    muttrc(rc, port)
    sock = str(tmp_path / "tmux.sock")
    command = " ".join(
        [
            "env TERM=screen",
            "neomutt -n -F",
            shlex.quote(str(rc)),
            "-f",
            shlex.quote(f"imap://127.0.0.1:{port}/INBOX"),
            "-e",
            shlex.quote(f'push "{keys}"'),
            "2>" + shlex.quote(str(tmp_path / "neomutt.err")),
        ]
    )
    tmux = ["tmux", "-S", sock, "-f", "/dev/null"]
    subprocess.run(
        [*tmux, "new-session", "-d", "-s", "mutt", "-x", "160", "-y", "50", command],
        check=True,
        timeout=10,
    )
    screen = ""
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            alive = subprocess.run([*tmux, "has-session", "-t", "mutt"], capture_output=True)
            if alive.returncode != 0:
                return screen
            screen = subprocess.run(
                [*tmux, "capture-pane", "-p", "-t", "mutt"], capture_output=True, text=True
            ).stdout
            time.sleep(0.2)
        pytest.fail(f"neomutt did not finish in {timeout}s; screen:\n{screen}")
    finally:
        subprocess.run([*tmux, "kill-server"], capture_output=True, timeout=10)
    return screen


@pytest.mark.timeout(180)
def test_neomutt_copies_flags_reads_and_deletes(server: MailgwServer, tmp_path: Path) -> None:
    if shutil.which("neomutt") is None or shutil.which("tmux") is None:
        pytest.fail("neomutt or tmux not installed (.ci/run installs it)")
    originals = {f"s{i}@elsewhere.test": sample(i) for i in range(COUNT)}
    bulk_append(server, list(originals.values()))
    keys = (
        # copy s10..s19 to Archive (server-side UID COPY)
        "<tag-pattern>~i <s1[0-9]@<enter><tag-prefix><copy-message>=Archive<enter>"
        "<untag-pattern>.<enter>"
        # flag s3
        "<tag-pattern>~i <s3@<enter><tag-prefix><flag-message><untag-pattern>.<enter>"
        # open s5 (a multipart with an 8-bit attachment name): FETCH of the body sets \\Seen
        "<limit>~i <s5@<enter><display-message><exit><limit>~A<enter>"
        # delete s7 and expunge it on sync
        "<tag-pattern>~i <s7@<enter><tag-prefix><delete-message>"
        "<sync-mailbox><quit>"
    )
    run_neomutt(tmp_path, server.ports["imap"], keys)

    inbox = remote_state(server)
    assert set(inbox) == set(originals) - {"s7@elsewhere.test"}
    assert {m: v[1] for m, v in inbox.items() if v[1]} == {
        "s3@elsewhere.test": {"\\Flagged"},
        "s5@elsewhere.test": {"\\Seen"},
    }
    assert all(v[3] == originals[m] for m, v in inbox.items())
    archive = remote_state(server, "Archive")
    assert sorted(archive) == sorted(f"s{i}@elsewhere.test" for i in range(10, 20))
    assert all(v[3] == originals[m] for m, v in archive.items())
    assert all(v[1] == set() for v in archive.values())
    assert "Traceback" not in server.log() and "SERVERBUG" not in server.log()
