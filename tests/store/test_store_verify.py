"""``mailgw store verify``: the index against the Maildir files and the tier-2 manifests."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from mailgw.cli.main import main
from mailgw.directory import Directory
from mailgw.store import MessageStore
from mailgw.store import manifest as mf
from mailgw.store.blobs import FileBlobStore
from mailgw.store.migration import MigrationPolicy, Migrator

USER = "alice@example.test"
CONFIG = """\
[server]
data_dir = data
hostname = mx.example.test

[directory]
argon2_time_cost = 1
argon2_memory_kib = 8
"""


def message(i: int) -> bytes:
    return f"Subject: n{i}\r\n\r\n".encode() + b"text\r\n" * (10 + i)


@pytest.fixture
def data(tmp_path: Path) -> Path:
    directory = Directory(
        str(tmp_path / "data" / "directory.sqlite"), argon2_time_cost=1, argon2_memory_kib=8
    )
    directory.add_domain("example.test")
    directory.add_user(USER, "secret")
    directory.close()
    return tmp_path / "data"


@pytest.fixture
def store(data: Path) -> Iterator[MessageStore]:
    s = MessageStore(str(data / "mail"), lambda user: None, hostname="mx")
    yield s
    s.close()


def maildir(data: Path) -> Path:
    return data / "mail" / "example.test" / "alice"


def damage(data: Path, store: MessageStore) -> dict[str, int]:
    """One missing file, one unknown file, one size mismatch in INBOX; Sent is fine."""
    box = store.open_mailbox(USER)
    uids = [box.append(message(i), ["\\Seen"] if i else []) for i in range(4)]
    store.open_mailbox(USER, "Sent").append(message(9))
    by_uid = {m.uid: m for m in box.messages()}
    os.unlink(maildir(data) / by_uid[uids[0]].filename)
    with open(maildir(data) / by_uid[uids[1]].filename, "ab") as fh:
        fh.write(b"more\r\n")
    (maildir(data) / "new" / "1700000000.M1P1Q1.elsewhere,S=10").write_bytes(b"Subject: x\r\n\r\n")
    return {"missing": uids[0], "size": uids[1]}


def test_check_finds_missing_unknown_and_size_then_repairs(data: Path, store: MessageStore) -> None:
    where = damage(data, store)
    report = store.check(USER)
    assert not report.ok and report.repaired == 0
    assert [(f, uid) for _u, f, uid, _n in report.missing] == [("INBOX", where["missing"])]
    assert [(f, rel.split("/")[0]) for _u, f, rel in report.unknown] == [("INBOX", "new")]
    assert [(f, uid, b - a) for _u, f, uid, a, b in report.size] == [
        ("INBOX", where["size"], len(b"more\r\n"))
    ]
    assert report.messages == 5 and report.folders == 6  # INBOX + 5 default folders
    assert store.check(USER).missing == report.missing  # a check alone changes nothing
    repaired = store.check(USER, repair=True)
    assert repaired.repaired == 1
    again = store.check(USER)
    assert again.ok, again
    box = store.open_mailbox(USER)
    sizes = {m.uid: m.size for m in box.messages()}
    assert where["missing"] not in sizes
    assert sizes[where["size"]] == len(message(1)) + len(b"more\r\n")
    assert b"Subject: x\r\n\r\n" in {box.read_message(uid) for uid in sizes}


def test_check_finds_a_manifest_out_of_step(data: Path, store: MessageStore) -> None:
    store.tier2 = FileBlobStore(str(data / "tier2"))
    box = store.open_mailbox(USER)
    uids = [box.append(message(i)) for i in range(3)]
    Migrator(store, MigrationPolicy(after=1.0), clock=lambda: 4e9).run(USER)
    assert store.check(USER).ok
    log = maildir(data) / mf.LOG_NAME
    text = log.read_bytes()
    log.write_bytes(text + mf.encode(mf.delete(uids[0])))  # an uncommitted tail is fine
    assert store.check(USER).ok
    log.write_bytes(text.replace(b'"flags":""', b'"flags":"\\\\Seen"', 1))  # damaged
    report = store.check(USER)
    assert report.manifests == [(USER, "INBOX")]
    assert store.check(USER, repair=True).repaired == 1
    assert store.check(USER).ok
    found = mf.read(str(log))
    assert found is not None and sorted(found.messages) == uids


def test_cli_verify_reports_counts_and_repairs(
    tmp_path: Path, data: Path, store: MessageStore, capsys: pytest.CaptureFixture[str]
) -> None:
    damage(data, store)
    store.close()
    config = tmp_path / "mailgw.ini"
    config.write_text(CONFIG)

    def run(*args: str) -> tuple[int, str, str]:
        code = main(["--config", str(config), "store", "verify", *args])
        out, err = capsys.readouterr()
        return code, out, err

    code, out, err = run()
    assert code == 1, err
    lines = out.splitlines()
    assert sorted(line.split("\t")[0] for line in lines[:-1]) == ["missing", "size", "unknown"]
    assert lines[-1] == (
        "checked 5 message(s) in 6 folder(s) of 1 user(s): 1 missing file(s),"
        " 1 unknown file(s), 1 size mismatch(es), 0 tier-2 manifest(s) out of step"
    )
    assert "store verify --repair" in err
    code, out, err = run(USER, "--repair")
    assert code == 0 and out.splitlines()[-1].endswith("; repaired 1 folder(s)"), (out, err)
    code, out, _ = run()
    assert code == 0 and out == (
        "checked 5 message(s) in 6 folder(s) of 1 user(s): 0 missing file(s),"
        " 0 unknown file(s), 0 size mismatch(es), 0 tier-2 manifest(s) out of step\n"
    )
    code, _out, err = run("nobody@example.test")
    assert code == 1 and "no such user" in err
