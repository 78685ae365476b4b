"""Mirror sync between two real ``twistd mailgw`` nodes on loopback (TLS, shared secret):
mail delivered and changed on the primary arrives on the replica with the same UIDs, flags,
modseqs and bytes (``mailgw dr verify``); resume after the replica was down; a wrong secret
is refused; tier-2 messages travel as blobs; after a promote, an mbsync rerun against the
promoted node transfers nothing."""

from __future__ import annotations

import imaplib
import json
import poplib
import re
import shlex
import shutil
import smtplib
import socket
import sqlite3
import ssl
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from mailgw.testing.server import MailgwServer, free_port
from tests.integration.helpers import PASSWORD, provision, wait_until

SECRET = "correct horse battery staple 42"


class Pair:
    def __init__(self, root: Path, cert: tuple[Path, Path], extra: dict[str, dict[str, str]]):
        self.root = root
        secret = root / "replication.secret"
        root.mkdir(parents=True, exist_ok=True)
        secret.write_text(SECRET + "\n")
        self.port = free_port()
        self.primary_port = free_port()  # where the primary listens once demoted
        tls = {"certificate": str(cert[0]), "private_key": str(cert[1])}
        extra = dict(extra)
        more = extra.pop("replication", {})
        self.replica = MailgwServer(
            root / "replica",
            {
                "tls": tls,
                "replication": {
                    "enabled": "yes",
                    "role": "replica",
                    "listen": f"tcp:{self.port}:interface=127.0.0.1",
                    "peer": f"127.0.0.1:{self.primary_port}",
                    "secret_file": str(secret),
                    **more,
                },
                **extra,
            },
        )
        self.primary = MailgwServer(
            root / "primary",
            {
                "tls": tls,
                "replication": {
                    "enabled": "yes",
                    "role": "primary",
                    "peer": f"127.0.0.1:{self.port}",
                    "listen": f"tcp:{self.primary_port}:interface=127.0.0.1",
                    "secret_file": str(secret),
                    "window": "4",
                    **more,
                },
                **extra,
            },
        )

    def stop(self) -> None:
        self.primary.stop()
        self.replica.stop()


@pytest.fixture
def pair_factory(tmp_path: Path, selfsigned: tuple[Path, Path]) -> Iterator[Callable[..., Pair]]:
    made: list[Pair] = []

    def factory(extra: dict[str, dict[str, str]] | None = None) -> Pair:
        pair = Pair(tmp_path / f"pair{len(made)}", selfsigned, extra or {})
        made.append(pair)
        pair.replica.start()
        provision(pair.primary)
        pair.primary.start()
        return pair

    yield factory
    for pair in made:
        pair.stop()


def status(server: MailgwServer) -> dict[str, object]:
    return dict(json.loads(server.cli("dr", "status", "--json").stdout))


def caught_up(pair: Pair) -> bool:
    s = status(pair.primary)
    return bool(s["connected"]) and s["lag_entries"] == 0 and int(s["last_acked"]) > 0


def wait_caught_up(pair: Pair, timeout: float = 60.0) -> None:
    # The journal's last number, read now: every change made before is in it.
    wait_until(lambda: caught_up(pair), timeout, "replica caught up")


def deliver(
    server: MailgwServer, count: int, to: str = "alice@example.test", tag: str = ""
) -> None:
    with smtplib.SMTP("127.0.0.1", server.ports["mx"], timeout=30) as smtp:
        for n in range(count):
            body = (
                f"From: sender@remote.test\r\nTo: {to}\r\nSubject: message {tag}{n}\r\n\r\n"
                f"Body {n}\r\n"
            )
            smtp.sendmail("sender@remote.test", [to], body.encode())


def imap(
    server: MailgwServer, user: str = "alice@example.test", pw: str = PASSWORD
) -> imaplib.IMAP4:
    client = imaplib.IMAP4("127.0.0.1", server.ports["imap"], timeout=30)
    client.login(user, pw)
    return client


def verify(pair: Pair) -> None:
    result = pair.primary.cli("dr", "verify", check=False)
    assert result.returncode == 0, result.stdout + result.stderr


def test_mail_and_changes_replicate_identically(pair_factory: Callable[..., Pair]) -> None:
    pair = pair_factory()
    deliver(pair.primary, 1000)  # the figure
    c = imap(pair.primary)
    c.create("Projects")
    c.subscribe("Projects")
    c.append(
        "Projects",
        r"(\Seen $Important)",
        '"05-Dec-2026 10:00:00 +0530"',
        b"Subject: a\r\n\r\nx\r\n",
    )
    c.select("INBOX")
    c.uid("STORE", "1:5", "+FLAGS", r"(\Flagged)")
    c.uid("STORE", "3", "-FLAGS", r"(\Flagged)")
    c.uid("COPY", "6:8", "Projects")
    c.uid("MOVE", "9:12", "Archive")
    c.uid("STORE", "13:15", "+FLAGS", r"(\Deleted)")
    c.expunge()
    c.rename("Projects", "Work")
    c.logout()
    bob = imap(pair.primary, "bob@example.test", "bob password")
    bob.append("INBOX", None, None, b"Subject: b\r\n\r\nbob\r\n")
    bob.logout()
    pair.primary.cli("user", "quota", "bob@example.test", "5M")
    wait_caught_up(pair)
    verify(pair)
    # The replica serves the same UIDs and flags to a client.
    r = imap(pair.replica)
    r.select("Work", readonly=True)
    typ, data = r.uid("FETCH", "1:*", "(FLAGS INTERNALDATE)")
    assert typ == "OK" and len(data) == 4
    assert b"$Important" in data[0] and b"+0530" in data[0]
    r.select("Archive", readonly=True)
    assert r.uid("SEARCH", "ALL")[1][0].split() == [b"1", b"2", b"3", b"4"]
    r.logout()


def test_protocol_looking_bodies_arrive_intact(pair_factory: Callable[..., Pair]) -> None:
    pair = pair_factory()
    nasty = (
        b"Subject: amp\r\n\r\n\x01\x04_ask\x01\x011\x01\x08_command\x01\x05Apply\r\n"
        b"_command\r\nPut\r\nkey\r\nbatch:1\r\n_answer\r\n1\r\n"
        + bytes(range(1, 256))
        + b"\r\n"
        + b"A" * 70000
    )
    c = imap(pair.primary)
    c.append("INBOX", None, None, nasty)
    c.logout()
    wait_caught_up(pair)
    verify(pair)
    fetched = []
    for node in (pair.primary, pair.replica):
        r = imap(node)
        r.select("INBOX", readonly=True)
        typ, data = r.uid("FETCH", "1", "(BODY.PEEK[])")
        fetched.append(data[0][1])
        r.logout()
    assert fetched[0] == fetched[1]
    assert b"_command\r\nPut\r\nkey\r\nbatch:1" in fetched[1]
    assert fetched[1].endswith(b"A" * 70000)


def test_replica_down_then_catches_up(pair_factory: Callable[..., Pair]) -> None:
    pair = pair_factory()
    deliver(pair.primary, 5)
    wait_caught_up(pair)
    pair.replica.stop()
    deliver(pair.primary, 20, tag="while down ")  # the primary keeps serving
    c = imap(pair.primary)
    c.select("INBOX")
    c.uid("STORE", "1:10", "+FLAGS", r"(\Seen)")
    c.logout()
    index = pair.replica.data_dir / "mail" / "example.test" / "alice" / "mailgw-index.sqlite"
    with sqlite3.connect(index) as db:  # the replica (stopped) has only the first 5
        assert db.execute("SELECT count(*) FROM messages").fetchone()[0] == 5
    pair.replica.start()
    wait_caught_up(pair)
    verify(pair)


def test_wrong_secret_is_refused(pair_factory: Callable[..., Pair]) -> None:
    pair = pair_factory()
    wait_caught_up(pair)
    pair.primary.stop()
    (pair.root / "replication.secret").write_text("a different secret entirely\n")
    # The replica holds the right one (read at its start); the primary now has another.
    before = status(pair.replica)["last_applied"]
    pair.primary.start()
    deliver(pair.primary, 3)
    pair.primary.wait_for_log("handshake with the replica failed")
    assert "the replica's proof is wrong" in pair.primary.log()
    assert status(pair.replica)["last_applied"] == before
    assert not status(pair.primary)["connected"]


def _box(**values: bytes) -> bytes:
    out = b""
    for key, value in values.items():
        out += len(key).to_bytes(2, "big") + key.encode() + len(value).to_bytes(2, "big") + value
    return out + b"\0\0"


def _read_all(sock: ssl.SSLSocket) -> bytes:
    data = b""
    sock.settimeout(10)
    try:
        while chunk := sock.recv(65536):
            data += chunk
    except (TimeoutError, ssl.SSLError, ConnectionResetError):
        pass
    return data


def _stranger(port: int) -> ssl.SSLSocket:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    return context.wrap_socket(socket.create_connection(("127.0.0.1", port), timeout=10))


def test_a_stranger_gets_nothing(pair_factory: Callable[..., Pair]) -> None:
    pair = pair_factory()
    wait_caught_up(pair)
    before = status(pair.replica)["last_applied"]
    # A command before the handshake: the connection is closed, nothing applied.
    with _stranger(pair.port) as sock:
        sock.sendall(
            _box(_command=b"Put", _ask=b"1", key=b"batch:1", data=b"{}", last=b"True")
            + _box(_command=b"Apply", _ask=b"2", key=b"batch:1")
        )
        answer = _read_all(sock)
    assert b"applied" not in answer
    # A handshake with a made-up proof: refused, then closed.
    with _stranger(pair.port) as sock:
        sock.sendall(_box(_command=b"Challenge", _ask=b"1", nonce=b"n" * 32))
        sock.sendall(_box(_command=b"Authenticate", _ask=b"2", proof=b"p" * 32))
        answer = _read_all(sock)
    assert b"AUTH" in answer and b"applied" not in answer
    pair.replica.wait_for_log("failed to authenticate")
    assert status(pair.replica)["last_applied"] == before


def test_tier2_messages_replicate_as_blobs(pair_factory: Callable[..., Pair]) -> None:
    pair = pair_factory({"store": {"tier2_dir": "tier2", "migrate_folders": "INBOX"}})
    deliver(pair.primary, 6)
    pair.primary.cli("store", "migrate", "--limit", "4")
    c = imap(pair.primary)
    c.select("INBOX")
    c.uid("COPY", "1:2", "Archive")  # copies of tier-2 messages share their blobs
    c.uid("STORE", "1", "+FLAGS", r"(\Seen)")
    c.logout()
    wait_caught_up(pair)
    verify(pair)
    tier2 = pair.replica.data_dir / "tier2"
    blobs = [p for p in tier2.rglob("*") if p.is_file()]
    assert blobs, "the replica's tier 2 holds the blobs"
    stats = pair.replica.cli("store", "stats").stdout
    assert "tier2" in stats


def test_verify_reports_differences(pair_factory: Callable[..., Pair]) -> None:
    pair = pair_factory()
    deliver(pair.primary, 3)
    wait_caught_up(pair)
    verify(pair)
    # Diverge the replica behind replication's back: a quota and a message's flags.
    pair.replica.cli("user", "quota", "alice@example.test", "1M")
    index = pair.replica.data_dir / "mail" / "example.test" / "alice" / "mailgw-index.sqlite"
    with sqlite3.connect(index) as db:
        db.execute("UPDATE messages SET flags = 'S', modseq = modseq + 7 WHERE uid = 2")
    result = pair.primary.cli("dr", "verify", check=False)
    assert result.returncode == 1
    assert "directory/users" in result.stdout
    assert "alice@example.test/folders/INBOX/messages/2" in result.stdout


def test_the_replica_serves_read_only(pair_factory: Callable[..., Pair]) -> None:
    pair = pair_factory()
    deliver(pair.primary, 3)
    wait_caught_up(pair)
    r = imap(pair.replica)
    with pytest.raises(imaplib.IMAP4.readonly):  # SELECT answered OK [READ-ONLY]
        r.select("INBOX")
    for command in (
        lambda: r.uid("STORE", "1", "+FLAGS", r"(\Deleted)"),
        lambda: r.append("INBOX", None, None, b"Subject: no\r\n\r\nno\r\n"),
        lambda: r.create("New"),
        lambda: r.uid("MOVE", "1", "Trash"),
    ):
        r.untagged_responses.pop("READ-ONLY", None)  # imaplib would refuse to go on
        typ, data = command()
        assert typ == "NO" and r.untagged_responses.get("READ-ONLY"), data
    r.untagged_responses.pop("READ-ONLY", None)
    assert r.uid("FETCH", "1", "(BODY[])")[0] == "OK"
    r.logout()
    r = imap(pair.replica)
    r.select("INBOX", readonly=True)
    assert b"\\Seen" not in r.uid("FETCH", "1", "(FLAGS)")[1][0]  # FETCH BODY[] set nothing
    r.logout()
    pop = poplib.POP3("127.0.0.1", pair.replica.ports["pop3"], timeout=30)
    pop.user("alice@example.test")
    pop.pass_(PASSWORD)
    assert pop.stat()[0] == 3
    with pytest.raises(poplib.error_proto, match="SYS/TEMP"):
        pop.dele(1)
    pop.quit()
    with smtplib.SMTP("127.0.0.1", pair.replica.ports["mx"], timeout=30) as smtp:
        smtp.ehlo()
        smtp.mail("sender@remote.test")
        code, text = smtp.rcpt("alice@example.test")
        assert code == 451 and b"4.3.2" in text
    verify(pair)  # nothing changed on the replica


def test_promote_then_fail_back_with_resync(pair_factory: Callable[..., Pair]) -> None:
    pair = pair_factory()
    deliver(pair.primary, 5)
    wait_caught_up(pair)
    pair.primary.kill9()  # the primary is lost
    assert "promoted" in pair.replica.cli("dr", "promote").stdout
    # The promoted node takes mail and changes at once, UIDs continuing the primary's.
    deliver(pair.replica, 2, tag="after failover ")
    c = imap(pair.replica)
    c.select("INBOX")
    assert c.uid("SEARCH", "ALL")[1][0].split() == [b"1", b"2", b"3", b"4", b"5", b"6", b"7"]
    c.uid("STORE", "1", "+FLAGS", r"(\Seen)")
    c.logout()
    # The old primary comes back: it finds its replica promoted, ships nothing, takes nothing.
    pair.primary.start()
    pair.primary.wait_for_log("fenced")
    old = imap(pair.primary)
    typ, data = old.append("INBOX", None, None, b"Subject: lost\r\n\r\nx\r\n")
    assert typ == "NO" and b"demoted" in data[0]
    old.untagged_responses.pop("READ-ONLY", None)
    old.logout()
    assert pair.primary.cli("dr", "demote", check=False).returncode == 1  # needs --resync
    pair.primary.cli("dr", "demote", "--resync")
    pair.primary.stop()
    pair.primary.start()  # now a replica, listening
    pair.replica.stop()
    pair.replica.start()  # now a primary, shipping to the old primary
    pair.replica.wait_for_log("full resync complete")
    wait_until(
        lambda: status(pair.replica)["connected"] and status(pair.replica)["lag_entries"] == 0,
        60,
        "the old primary resynced",
    )
    result = pair.replica.cli("dr", "verify", check=False)
    assert result.returncode == 0, result.stdout + result.stderr
    r = imap(pair.primary)  # the old primary, a read-only replica now
    r.select("INBOX", readonly=True)
    assert r.uid("SEARCH", "ALL")[1][0].split() == [b"1", b"2", b"3", b"4", b"5", b"6", b"7"]
    r.logout()


SYNC = {"replication": {"mode": "sync", "sync_timeout": "1s"}}


def replica_subjects(pair: Pair, folder: str = "INBOX") -> set[bytes]:
    r = imap(pair.replica)
    r.select(folder, readonly=True)
    typ, data = r.uid("FETCH", "1:*", "(BODY.PEEK[HEADER.FIELDS (SUBJECT)])")
    r.logout()
    return {part[1].strip() for part in data if isinstance(part, tuple)}


def test_sync_mode_acknowledges_only_what_the_replica_has(
    pair_factory: Callable[..., Pair],
) -> None:
    pair = pair_factory(SYNC)
    wait_caught_up(pair)
    # No waiting below: in sync mode the 250 / APPEND OK come after the replica applied it.
    for n in range(5):
        deliver(pair.primary, 1, tag=f"sync {n} ")
        assert f"Subject: message sync {n} 0".encode() in replica_subjects(pair)
    c = imap(pair.primary)  # an IMAP worker process of the primary
    assert c.append("Drafts", None, None, b"Subject: draft\r\n\r\nx\r\n")[0] == "OK"
    c.logout()
    assert b"Subject: draft" in replica_subjects(pair, "Drafts")
    assert status(pair.primary)["mode"] == "sync"


def test_sync_mode_kill9_loses_no_acknowledged_mail(pair_factory: Callable[..., Pair]) -> None:
    pair = pair_factory(SYNC)
    wait_caught_up(pair)
    accepted: list[str] = []
    stop = threading.Event()

    def sender() -> None:
        try:
            with smtplib.SMTP("127.0.0.1", pair.primary.ports["mx"], timeout=30) as smtp:
                for n in range(1000):
                    if stop.is_set():
                        return
                    subject = f"stream {n}"
                    body = f"Subject: {subject}\r\n\r\nbody\r\n".encode()
                    smtp.sendmail("sender@remote.test", ["alice@example.test"], body)
                    accepted.append(subject)  # got its 250
        except (OSError, smtplib.SMTPException):
            return  # the primary died mid-stream

    thread = threading.Thread(target=sender)
    thread.start()
    wait_until(lambda: len(accepted) >= 15, 60, "15 messages accepted")
    pair.primary.kill9()
    stop.set()
    thread.join(30)
    have = replica_subjects(pair)
    missing = [s for s in accepted if f"Subject: {s}".encode() not in have]
    assert not missing, f"acknowledged but not on the replica: {missing}"


def test_sync_mode_falls_back_to_async_and_returns(pair_factory: Callable[..., Pair]) -> None:
    pair = pair_factory(SYNC)
    wait_caught_up(pair)
    pair.replica.stop()
    deliver(pair.primary, 2, tag="replica away ")  # 250 after sync_timeout, not never
    wait_until(lambda: status(pair.primary)["mode"] == "async", 20, "fallback")
    assert int(status(pair.primary)["sync_fallbacks"]) >= 1
    assert "falling back to async" in pair.primary.log()
    pair.replica.start()
    wait_until(lambda: status(pair.primary)["mode"] == "sync", 60, "back to sync")
    verify(pair)


def test_full_resync_repairs_a_diverged_replica(pair_factory: Callable[..., Pair]) -> None:
    pair = pair_factory()
    deliver(pair.primary, 12)
    wait_caught_up(pair)
    pair.replica.stop()
    # Diverge the replica behind replication's back: a message lost (row and file), other
    # flags on another; the primary goes on meanwhile.
    home = pair.replica.data_dir / "mail" / "example.test" / "alice"
    with sqlite3.connect(home / "mailgw-index.sqlite") as db:
        (filename,) = db.execute("SELECT filename FROM messages WHERE uid = 3").fetchone()
        db.execute("DELETE FROM messages WHERE uid = 3")
        db.execute("UPDATE messages SET flags = 'FS' WHERE uid = 4")
    (home / filename).unlink()
    deliver(pair.primary, 3, tag="meanwhile ")
    # The replica asks for a full resync (as after `dr demote --resync`; also what happens when
    # the primary's journal no longer holds the replica's position).
    (pair.replica.data_dir / "replication" / "resync").write_text("requested\n")
    pair.replica.start()
    pair.primary.wait_for_log("full resync complete")
    wait_caught_up(pair)
    verify(pair)
    assert not (pair.replica.data_dir / "replication" / "resync").exists()


def test_an_entry_that_cannot_be_applied_leads_to_a_full_resync(
    pair_factory: Callable[..., Pair],
) -> None:
    pair = pair_factory()
    c = imap(pair.primary)
    c.create("Box")
    c.logout()
    wait_caught_up(pair)
    pair.replica.stop()
    # The replica loses the folder behind replication's back (row and directory).
    home = pair.replica.data_dir / "mail" / "example.test" / "alice"
    with sqlite3.connect(home / "mailgw-index.sqlite") as db:
        db.execute("DELETE FROM mailboxes WHERE name = 'Box'")
    shutil.rmtree(home / ".Box")
    pair.replica.start()
    c = imap(pair.primary)
    c.append("Box", None, None, b"Subject: into the lost folder\r\n\r\nx\r\n")
    c.logout()
    pair.replica.wait_for_log("a full resync is requested")
    pair.primary.wait_for_log("full resync complete")
    wait_caught_up(pair)
    verify(pair)


_MBSYNC_COUNTERS = re.compile(
    rb"F: \+(\d+)/\d+ \*(\d+)/\d+ #(\d+)/\d+\s+N: \+(\d+)/\d+ \*(\d+)/\d+ #(\d+)/\d+"
)


def _mbsync(config: Path) -> tuple[int, ...]:
    """Run mbsync; its final counters as (far: new, flag changes, trashed; near: the same)
    of what it did. mbsync shows its counters on a terminal only: ``script`` gives it one."""
    command = shlex.join(["mbsync", "-c", str(config), "-a"])
    out = subprocess.run(
        ["script", "-qec", command, "/dev/null"],
        capture_output=True,
        timeout=120,
        stdin=subprocess.DEVNULL,
    )
    text = out.stdout + out.stderr
    assert out.returncode == 0, text.decode(errors="replace")
    found = _MBSYNC_COUNTERS.findall(text)
    assert found, text.decode(errors="replace")
    return tuple(int(n) for n in found[-1])


def _mbsync_config(path: Path, port: int, local: Path) -> None:
    path.write_text(
        f"IMAPAccount dr\nHost 127.0.0.1\nPort {port}\nUser alice@example.test\n"
        f'Pass "{PASSWORD}"\nSSLType None\nAuthMechs PLAIN\n\n'
        "IMAPStore remote\nAccount dr\n\n"
        f"MaildirStore local\nPath {local}/\nInbox {local}/INBOX\nSubFolders Verbatim\n\n"
        "Channel sync\nFar :remote:\nNear :local:\nPatterns *\nCreate Near\n"
        "Expunge Both\nSyncState *\nSync All\n"
    )


def _snapshot(local: Path) -> dict[str, bytes]:
    """Every file under the local Maildir tree (names carry mbsync's UIDs and flags)."""
    return {
        str(p.relative_to(local)): p.read_bytes() for p in sorted(local.rglob("*")) if p.is_file()
    }


def test_promoted_replica_needs_no_mbsync_transfer(
    pair_factory: Callable[..., Pair], tmp_path: Path
) -> None:
    """mbsync against the primary, fail over (promote), point mbsync at the promoted node:
    the rerun transfers nothing, as UIDVALIDITY, UIDs and flags are the primary's."""
    if shutil.which("mbsync") is None:
        pytest.fail("mbsync (isync) not installed (.ci/run installs it)")
    pair = pair_factory()
    deliver(pair.primary, 20)
    c = imap(pair.primary)
    c.select("INBOX")
    c.uid("STORE", "3,7", "+FLAGS", r"(\Seen \Flagged)")
    c.uid("STORE", "12", "+FLAGS", r"(\Deleted)")
    c.expunge()
    c.create("Archive")
    c.uid("MOVE", "15", "Archive")
    c.logout()
    local = tmp_path / "local"
    local.mkdir()
    config = tmp_path / "mbsyncrc"
    _mbsync_config(config, pair.primary.ports["imap"], local)
    first = _mbsync(config)
    assert first[3] == 19, first  # 18 in INBOX + 1 in Archive pulled to the near side
    assert first[:3] == (0, 0, 0), first
    assert len(list((local / "INBOX").glob("*/*"))) == 18
    before = _snapshot(local)
    assert _mbsync(config) == (0,) * 6  # a rerun against the primary: nothing to do
    assert _snapshot(local) == before
    wait_caught_up(pair)
    pair.primary.kill9()  # the primary is lost
    assert "promoted" in pair.replica.cli("dr", "promote").stdout
    _mbsync_config(config, pair.replica.ports["imap"], local)
    # A changed UIDVALIDITY makes mbsync fail; changed UIDs or flags would be transfers.
    assert _mbsync(config) == (0,) * 6
    assert _snapshot(local) == before
    # The counters do count: one new message on the promoted node is one near-side new.
    deliver(pair.replica, 1, tag="after failover ")
    assert _mbsync(config)[3] == 1


def _journal_seqs(index: Path) -> list[int]:
    with sqlite3.connect(index) as db:
        return [int(r[0]) for r in db.execute("SELECT seq FROM journal ORDER BY seq")]


def test_journal_pruned_past_the_replica_leads_to_a_full_resync(
    pair_factory: Callable[..., Pair],
) -> None:
    """The primary's journal no longer holds the replica's position (retention pruned the
    entries after it): the primary finds the gap on the replica's return and repairs it,
    divergence included, by a full resync instead of shipping around the hole."""
    pair = pair_factory({"store": {"journal_retention": "1s", "journal_poll_interval": "200ms"}})
    deliver(pair.primary, 6)
    wait_caught_up(pair)
    position = int(status(pair.replica)["last_applied"])
    pair.replica.stop()
    # Diverge the replica behind replication's back: a message lost (row and file), other
    # flags on another.
    home = pair.replica.data_dir / "mail" / "example.test" / "alice"
    with sqlite3.connect(home / "mailgw-index.sqlite") as db:
        (filename,) = db.execute("SELECT filename FROM messages WHERE uid = 3").fetchone()
        db.execute("DELETE FROM messages WHERE uid = 3")
        db.execute("UPDATE messages SET flags = 'FS' WHERE uid = 4")
    (home / filename).unlink()
    # The primary goes on: mail and a flag change the replica has not seen...
    deliver(pair.primary, 3, tag="meanwhile ")
    c = imap(pair.primary)
    c.select("INBOX")
    c.uid("STORE", "1:2", "+FLAGS", r"(\Seen)")
    c.logout()
    index = pair.primary.data_dir / "mail" / "example.test" / "alice" / "mailgw-index.sqlite"
    with sqlite3.connect(index) as db:
        rows = db.execute("SELECT seq, time FROM journal WHERE seq > ?", (position,)).fetchall()
    assert rows, "the primary journaled the changes the replica missed"
    missed = max(int(r[0]) for r in rows)
    newest = max(float(r[1]) for r in rows)
    # ... and its journal drops them: a writer prunes rows past the retention (1s) in its
    # first transaction (then every 10 minutes). Once those entries are older than the
    # retention by their own timestamps, restart the primary and change something.
    wait_until(lambda: time.time() > newest + 1.5, 10, "the missed entries expired")
    pair.primary.stop()
    pair.primary.start()
    deliver(pair.primary, 1, tag="after the restart ")  # stored after the 250: poll
    wait_until(lambda: min(_journal_seqs(index)) > missed, 20, "journal pruned past the replica")
    pruned_mark = pair.primary.data_dir / "journal" / "pruned"
    assert int(pruned_mark.read_text()) >= missed
    pair.replica.start()
    pair.primary.wait_for_log("full resync complete", timeout=60)
    log = pair.primary.log()
    assert f"the replica stands at {position}: full resync" in log
    wait_caught_up(pair)
    verify(pair)
    r = imap(pair.replica)
    r.select("INBOX", readonly=True)
    typ, data = r.uid("FETCH", "3:4", "(FLAGS)")
    r.logout()
    assert typ == "OK" and len(data) == 2 and b"\\Flagged" not in data[1]
