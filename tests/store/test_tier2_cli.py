"""Tests for the tier-2 admin commands in-process: ``store gc`` and ``tier2_dir`` not set."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import pytest

from mailgw.cli.main import main
from mailgw.directory import Directory
from mailgw.store import MessageStore
from mailgw.store.blobs import FileBlobStore, split_ref

CONFIG = """\
[server]
data_dir = data
hostname = mx.example.test

[directory]
argon2_time_cost = 1
argon2_memory_kib = 8

[store]
migrate_folders = INBOX
"""
USER = "alice@example.test"
HEAD = b"From: news@example.org\r\nSubject: news\r\n"
Run = Callable[..., tuple[int, str, str]]


def make_run(path: Path, capsys: pytest.CaptureFixture[str]) -> Run:
    def run(*args: str) -> tuple[int, str, str]:
        code = main(["--config", str(path), *args])
        out, err = capsys.readouterr()
        return code, out, err

    return run


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
def run(tmp_path: Path, data: Path, capsys: pytest.CaptureFixture[str]) -> Run:
    path = tmp_path / "mailgw.ini"
    path.write_text(CONFIG + "tier2_dir = tier2\n")
    return make_run(path, capsys)


@pytest.mark.parametrize("command", [["migrate"], ["migrate", "--dry-run"], ["gc"]])
def test_tier2_dir_not_set(
    tmp_path: Path, data: Path, capsys: pytest.CaptureFixture[str], command: list[str]
) -> None:
    path = tmp_path / "mailgw.ini"
    path.write_text(CONFIG)
    code, out, err = make_run(path, capsys)("store", *command)
    assert code == 1 and out == ""
    assert err == f"mailgw: error: {path}: [store] tier2_dir is not set\n"
    assert not (data / "tier2").exists()


def test_tier2_dir_not_set_for_stats(
    tmp_path: Path, data: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Without tier 2, ``store stats`` shows the tier-1 figures (and says tier 2 is off)."""
    path = tmp_path / "mailgw.ini"
    path.write_text(CONFIG + "tier2_dir =\n")
    code, out, err = make_run(path, capsys)("store", "stats")
    assert code == 0 and err == ""
    assert out.splitlines()[0] == f"# tier 2 is off ({path}: [store] tier2_dir is not set)"
    assert [line.split("\t")[0] for line in out.splitlines()[1:]] == ["tier", "tier1"]


def age_blobs(blobs: FileBlobStore) -> None:
    """Make every blob older than any gc grace period."""
    for digest in blobs.iter_refs():
        blobs.touch(digest, 1000.0)


def test_store_gc_from_the_cli(run: Run, data: Path) -> None:
    store = MessageStore(str(data / "mail"), lambda user: None, hostname="mx.example.test")
    box = store.open_mailbox(USER)
    announcement = b"Hello everyone\r\n" * 100
    uids = [
        box.append(HEAD + f"Delivered-To: {USER} copy {i}\r\n\r\n".encode() + announcement)
        for i in range(3)
    ]
    private = box.append(HEAD + b"\r\nfor alice only\r\n" * 20)
    code, out, _ = run("store", "migrate")
    assert code == 0 and out.startswith("migrated 4 message(s)")
    blobs = FileBlobStore(str(data / "tier2"))
    assert len(list(blobs.iter_refs())) == 4 + 2  # 4 headers, 2 bodies
    code, out, _ = run("store", "gc", "--grace", "0")
    assert (code, out) == (0, "removed 0 orphan blob(s)\n")  # everything is referenced
    # Another process migrated them: the index has their blobs (a snapshot's entries are
    # looked up again when read).
    refs = {uid: str(blob) for _f, uid, _s, _m, blob, _d in store.tier_rows(USER)}
    box.expunge([uids[0], private])
    store.close()
    gone = set(split_ref(refs[private])) | {split_ref(refs[uids[0]])[0]}
    code, out, _ = run("store", "gc")
    assert (code, out) == (0, "removed 0 orphan blob(s)\n")  # young blobs are spared
    age_blobs(blobs)
    code, out, _ = run("store", "gc", "--dry-run")
    assert (code, out) == (0, "would remove 3 orphan blob(s)\n")
    assert len(list(blobs.iter_refs())) == 6
    code, out, _ = run("store", "verify")
    assert code == 0 and out.count("orphan\t") == 3
    code, out, _ = run("store", "gc")
    assert (code, out) == (0, "removed 3 orphan blob(s)\n")
    assert set(blobs.iter_refs()) == {d for uid in uids[1:] for d in split_ref(refs[uid])}
    assert not gone & set(blobs.iter_refs())
    code, out, _ = run("store", "verify")
    assert code == 0 and out.endswith("0 corrupt, 0 missing reference(s), 0 orphan(s)\n")
    store = MessageStore(
        str(data / "mail"), lambda user: None, hostname="mx.example.test", tier2=blobs
    )
    box = store.open_mailbox(USER)
    for uid, i in zip(uids[1:], (1, 2), strict=True):
        expected = HEAD + f"Delivered-To: {USER} copy {i}\r\n\r\n".encode() + announcement
        assert box.read_message(uid) == expected
    store.close()
    code, out, _ = run("store", "stats")
    rows = {line.split("\t")[0]: line.split("\t") for line in out.splitlines()}
    assert rows["tier2"][1] == "2" and rows["tier2"][4] == "3"
    assert rows["tier2-bodies"][4] == "1" and float(rows["tier2-bodies"][5]) == 2.0
    assert rows["tier2-whole"][1:5] == ["0", "0", "0", "0"]


def test_store_pack_moves_loose_blobs_from_the_cli(run: Run, data: Path) -> None:
    old = FileBlobStore(str(data / "tier2"), pack_max=0)  # a store from before packs
    small = [old.put(HEAD + b"\r\n" + bytes([n]) * 500) for n in range(3)]
    large = old.put(bytes(range(256)) * 200)  # 51,200 bytes: stays loose
    old.close()
    code, out, _ = run("store", "pack")
    assert code == 0 and out.splitlines()[0].startswith("packed 3 loose blob(s)")
    blobs = FileBlobStore(str(data / "tier2"))
    assert [r for r in small if os.path.exists(blobs.path(r))] == []
    assert os.path.exists(blobs.path(large))
    assert all(blobs.get(r) == HEAD + b"\r\n" + bytes([n]) * 500 for n, r in enumerate(small))
    blobs.close()
    code, out, _ = run("store", "pack")
    assert code == 0 and out.startswith("packed 0 loose blob(s)")
