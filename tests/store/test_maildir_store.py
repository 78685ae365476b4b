"""Tests for the Maildir++ MessageStore: delivery, flags, expunge, UIDs, reindex, quota."""

from __future__ import annotations

import os
import re
import sqlite3
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from zope.interface.verify import verifyObject

from mailgw.interfaces import IMailbox, IMessageStore, MailboxNotFound, QuotaExceeded
from mailgw.store import MessageInfo, MessageStore, mailbox, maildir, tier1
from mailgw.store.index import INDEX_NAME
from mailgw.testing.fakes import CallsFromThreads, Quotas

USER = "alice@example.test"
MSG = b"From: bob@example.org\r\nSubject: hi\r\n\r\nHello \xc3\xa9\x00 world\r\n"
NAME_RE = re.compile(
    r"^(?P<sec>\d+)\.M(?P<usec>\d+)P(?P<pid>\d+)Q(?P<q>\d+)\.mx\.example,"
    r"S=(?P<size>\d+),W=(?P<vsize>\d+)(?::2,(?P<info>[A-Z]*))?$"
)


@pytest.fixture
def quotas() -> Quotas:
    return Quotas()


@pytest.fixture
def root(tmp_path: Path) -> Path:
    return tmp_path / "mail"


@pytest.fixture
def store(root: Path, quotas: Quotas) -> Iterator[MessageStore]:
    s = MessageStore(str(root), quotas, hostname="mx.example")
    yield s
    s.close()


@pytest.fixture
def spool(tmp_path: Path) -> Path:
    path = tmp_path / "spool-msg"
    path.write_bytes(MSG)
    return path


def maildir_of(root: Path, user: str = USER) -> Path:
    local, domain = user.split("@")
    return root / domain / local


def deliver(store: MessageStore, tmp_path: Path, data: bytes, folder: str = "INBOX") -> int:
    path = tmp_path / f"spool-{time.monotonic_ns()}"
    path.write_bytes(data)
    return store.deliver(USER, str(path), folder=folder)


def files_in(folder: Path) -> list[str]:
    return sorted(os.listdir(folder / "new")) + sorted(os.listdir(folder / "cur"))


# -- delivery and reading ---------------------------------------------------------------------


def test_interfaces_are_provided(store: MessageStore) -> None:
    assert verifyObject(IMessageStore, store)
    assert verifyObject(IMailbox, store.open_mailbox(USER))


def test_deliver_creates_maildir_and_default_folders(
    store: MessageStore, root: Path, spool: Path
) -> None:
    assert store.deliver(USER, str(spool)) == 1
    md = maildir_of(root)
    for sub in ("cur", "new", "tmp"):
        assert (md / sub).is_dir()
    for folder in ("Sent", "Drafts", "Trash", "Junk", "Archive"):
        assert (md / f".{folder}" / "cur").is_dir()
        assert (md / f".{folder}" / "maildirfolder").is_file()
    assert (md / INDEX_NAME).is_file()
    assert store.list_mailboxes(USER) == ["INBOX", "Archive", "Drafts", "Junk", "Sent", "Trash"]
    conn = sqlite3.connect(md / INDEX_NAME)
    assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    conn.close()


def test_delivered_bytes_are_served_byte_for_byte_with_prefix(
    store: MessageStore, root: Path, spool: Path
) -> None:
    prefix = b"Return-Path: <bob@example.org>\r\nDelivered-To: alice@example.test\r\n"
    uid = store.deliver(USER, str(spool), prefix=prefix)
    box = store.open_mailbox(USER)
    [info] = box.messages()
    assert isinstance(info, MessageInfo)
    assert info.uid == uid
    assert box.read_message(uid) == prefix + MSG
    with box.open_message(uid) as fh:
        assert fh.read() == prefix + MSG
    path = maildir_of(root) / info.filename
    assert info.size == path.stat().st_size == len(prefix) + len(MSG)
    assert info.flags == frozenset()
    assert abs(info.internaldate - path.stat().st_mtime) < 1e-3
    # Dovecot-style name in new/, unseen and without ":2,".
    assert info.filename.startswith("new/")
    m = NAME_RE.match(info.filename[4:])
    assert m, info.filename
    assert int(m["pid"]) == os.getpid()
    assert int(m["size"]) == info.size == int(m["vsize"])
    assert m["info"] is None
    assert os.listdir(maildir_of(root) / "tmp") == []
    with pytest.raises(AttributeError):
        info.uid = 5  # type: ignore[misc]


def test_vsize_counts_bare_lf(store: MessageStore, root: Path, tmp_path: Path) -> None:
    deliver(store, tmp_path, b"Subject: x\n\nline\r\nline\n")
    [info] = store.open_mailbox(USER).messages()
    m = NAME_RE.match(info.filename[4:])
    assert m
    assert int(m["size"]) == 23
    assert int(m["vsize"]) == 26


def test_uids_ascend_and_names_are_unique(store: MessageStore, tmp_path: Path) -> None:
    uids = [deliver(store, tmp_path, b"m%d\r\n" % i) for i in range(20)]
    assert uids == list(range(1, 21))
    box = store.open_mailbox(USER)
    assert [i.uid for i in box.messages()] == uids
    assert len({i.filename for i in box.messages()}) == 20
    assert box.uidnext == 21
    assert [box.read_message(u) for u in uids] == [b"m%d\r\n" % i for i in range(20)]


def test_deliver_to_folder_and_unknown_folder(store: MessageStore, spool: Path) -> None:
    uid = store.deliver(USER, str(spool), folder="Junk")
    assert store.open_mailbox(USER, "Junk").read_message(uid) == MSG
    assert store.open_mailbox(USER).messages() == []
    with pytest.raises(MailboxNotFound):
        store.deliver(USER, str(spool), folder="Nope")
    with pytest.raises(ValueError):
        store.deliver(USER, str(spool), folder="../evil")
    with pytest.raises(ValueError):
        store.deliver("no-domain", str(spool))


def test_failed_rename_leaves_nothing(
    store: MessageStore, root: Path, spool: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    store.deliver(USER, str(spool))

    def broken(path: str) -> None:
        raise OSError("fsync failed")

    monkeypatch.setattr(maildir, "fsync_dir", broken)
    with pytest.raises(OSError, match="fsync failed"):
        store.deliver(USER, str(spool))
    monkeypatch.undo()
    md = maildir_of(root)
    assert len(files_in(md)) == 1
    assert os.listdir(md / "tmp") == []
    box = store.open_mailbox(USER)
    assert [i.uid for i in box.messages()] == [1]
    assert store.quota_usage(USER)[0] == len(MSG)
    # UID 2 was visible to readers until the failed directory fsync took the message out
    # again, so it is never handed out a second time.
    assert store.deliver(USER, str(spool)) == 3


def test_missing_uid_raises_keyerror(store: MessageStore, spool: Path) -> None:
    store.deliver(USER, str(spool))
    box = store.open_mailbox(USER)
    with pytest.raises(KeyError):
        box.read_message(99)


# -- flags ------------------------------------------------------------------------------------


def test_flags_round_trip_and_filename_suffix(store: MessageStore, root: Path, spool: Path) -> None:
    uid = store.deliver(USER, str(spool))
    box = store.open_mailbox(USER)
    before = box.highestmodseq
    out = box.set_flags([uid], ["\\Seen", "\\Flagged", "\\Answered", "$Forwarded"], "add")
    info = out[uid]
    assert info.flags == {"\\Seen", "\\Flagged", "\\Answered", "$Forwarded"}
    assert info.filename.startswith("cur/") and info.filename.endswith(":2,FRS")
    assert info.modseq > before
    assert box.highestmodseq == info.modseq
    assert os.listdir(maildir_of(root) / "cur") == [info.filename[4:]]
    assert os.listdir(maildir_of(root) / "new") == []
    assert box.read_message(uid) == MSG  # renaming never touches the bytes
    assert box.messages()[0] == info

    info = box.set_flags([uid], ["\\Flagged", "$Forwarded"], "remove")[uid]
    assert info.flags == {"\\Seen", "\\Answered"}
    assert info.filename.endswith(":2,RS")
    info = box.set_flags([uid], ["\\Draft", "\\Deleted", "\\Recent"], "set")[uid]
    assert info.flags == {"\\Draft", "\\Deleted"}
    assert info.filename.endswith(":2,DT")
    info = box.set_flags([uid], [], "set")[uid]
    assert info.flags == frozenset()
    assert info.filename.startswith("cur/") and info.filename.endswith(":2,")

    # A fresh open (index) agrees; setting the same flags again does not bump modseq.
    again = store.open_mailbox(USER)
    assert again.messages()[0].flags == frozenset()
    same = again.set_flags([uid], [], "set")[uid]
    assert same.modseq == info.modseq
    assert again.set_flags([uid, 77], ["\\Seen"], "add").keys() == {uid}


def test_set_flags_rejects_bad_input(store: MessageStore, spool: Path) -> None:
    uid = store.deliver(USER, str(spool))
    box = store.open_mailbox(USER)
    with pytest.raises(ValueError):
        box.set_flags([uid], ["\\Seen"], "toggle")
    with pytest.raises(ValueError):
        box.set_flags([uid], ["\\Nonsense"], "add")


def test_keywords_live_only_in_index(store: MessageStore, root: Path, spool: Path) -> None:
    uid = store.deliver(USER, str(spool))
    box = store.open_mailbox(USER)
    info = box.set_flags([uid], ["$Label1"], "add")[uid]
    assert info.filename.endswith(":2,")
    assert store.reindex(USER) == 1
    assert store.open_mailbox(USER).messages()[0].flags == {"$Label1"}


def test_other_mailbox_objects_see_changes_after_refresh(
    store: MessageStore, tmp_path: Path
) -> None:
    uid = deliver(store, tmp_path, MSG)
    a = store.open_mailbox(USER)
    b = store.open_mailbox(USER)
    held = b.messages()
    a.set_flags([uid], ["\\Seen"], "add")
    assert held[0].flags == frozenset()  # a list once returned does not change
    # The objects of one folder share their snapshot: a's change shows in b at once.
    assert b.messages()[0].flags == {"\\Seen"}
    uid2 = deliver(store, tmp_path, b"second\r\n")
    assert [i.uid for i in a.messages()] == [uid]  # a delivery shows after a refresh
    a.refresh()
    assert [i.uid for i in a.messages()] == [uid, uid2]
    assert [i.uid for i in b.messages()] == [uid, uid2]
    assert a.uidnext == uid2 + 1
    b.expunge([uid])
    assert [i.uid for i in a.messages()] == [uid2]
    # b's stale file name still resolves after a rename by a.
    c = store.open_mailbox(USER)
    a.set_flags([uid2], ["\\Flagged"], "add")
    assert c.read_message(uid2) == b"second\r\n"


# -- expunge and UIDs -------------------------------------------------------------------------


def test_expunge(store: MessageStore, root: Path, tmp_path: Path) -> None:
    uids = [deliver(store, tmp_path, b"x" * n) for n in (10, 20, 30)]
    box = store.open_mailbox(USER)
    before = box.highestmodseq
    assert box.expunge([uids[1], 999, uids[1]]) == [uids[1]]
    assert box.highestmodseq > before
    assert [i.uid for i in box.messages()] == [uids[0], uids[2]]
    assert len(files_in(maildir_of(root))) == 2
    assert store.quota_usage(USER) == (40, None)
    with pytest.raises(KeyError):
        box.read_message(uids[1])
    assert box.expunge([uids[1]]) == []
    fresh = store.open_mailbox(USER)
    assert [i.uid for i in fresh.messages()] == [uids[0], uids[2]]


def test_uids_never_reused_after_expunge_and_reindex(store: MessageStore, tmp_path: Path) -> None:
    for _ in range(3):
        deliver(store, tmp_path, MSG)
    box = store.open_mailbox(USER)
    assert box.expunge([3]) == [3]
    assert deliver(store, tmp_path, MSG) == 4
    assert box.expunge([4]) == [4]
    assert store.reindex(USER) == 2
    box = store.open_mailbox(USER)
    assert [i.uid for i in box.messages()] == [1, 2]
    assert box.uidnext == 5
    assert deliver(store, tmp_path, MSG) == 5


def test_reindex_keeps_known_uids_adds_unknown_drops_gone(
    store: MessageStore, root: Path, tmp_path: Path
) -> None:
    uids = [deliver(store, tmp_path, b"msg %d\r\n" % i) for i in range(3)]
    box = store.open_mailbox(USER)
    validity = box.uidvalidity
    box.set_flags([uids[0]], ["\\Seen", "$Important"], "add")
    md = maildir_of(root)
    by_uid = {i.uid: i for i in store.open_mailbox(USER).messages()}
    os.unlink(md / by_uid[uids[1]].filename)
    foreign = "1600000000.M1P1.other,S=7:2,FS"
    (md / "cur" / foreign).write_bytes(b"foreign")
    assert store.reindex(USER) == 3
    box = store.open_mailbox(USER)
    assert box.uidvalidity == validity
    infos = {i.uid: i for i in box.messages()}
    assert set(infos) == {uids[0], uids[2], 4}
    assert infos[uids[0]].flags == {"\\Seen", "$Important"}
    assert infos[4].flags == {"\\Flagged", "\\Seen"}
    assert infos[4].size == 7
    assert box.read_message(4) == b"foreign"
    assert store.quota_usage(USER)[0] == sum(i.size for i in infos.values())


# -- reindex from a bare Maildir, crash repair -------------------------------------------------


def test_reindex_from_maildir_without_index(root: Path, quotas: Quotas) -> None:
    md = maildir_of(root)
    for sub in ("cur", "new", "tmp"):
        (md / sub).mkdir(parents=True)
        (md / ".Entw&APw-rfe" / sub).mkdir(parents=True)
    (md / "new" / "1700000002.M5P9.host,S=5").write_bytes(b"third")
    (md / "cur" / "1700000001.M5P9.host:2,RS").write_bytes(b"second")
    (md / "cur" / "1700000000.M5P9.host:2,T").write_bytes(b"first")
    (md / "cur" / ".hidden").write_bytes(b"not mail")
    (md / ".Entw&APw-rfe" / "cur" / "1700000000.M6P9.host:2,D").write_bytes(b"draft")
    os.utime(md / "cur" / "1700000000.M5P9.host:2,T", (1700000000, 1700000000))
    old_tmp = md / "tmp" / "stale"
    old_tmp.write_bytes(b"partial")
    os.utime(old_tmp, (1, 1))
    fresh_tmp = md / "tmp" / "fresh"
    fresh_tmp.write_bytes(b"being written")

    store = MessageStore(str(root), quotas, default_folders=())
    try:
        assert store.reindex(USER) == 4
        assert store.list_mailboxes(USER) == ["INBOX", "Entwürfe"]
        box = store.open_mailbox(USER)
        infos = box.messages()
        assert [box.read_message(i.uid) for i in infos] == [b"first", b"second", b"third"]
        assert [i.uid for i in infos] == [1, 2, 3]
        assert [i.flags for i in infos] == [{"\\Deleted"}, {"\\Answered", "\\Seen"}, set()]
        assert infos[0].internaldate == 1700000000
        drafts = store.open_mailbox(USER, "Entwürfe").messages()
        assert [i.flags for i in drafts] == [{"\\Draft"}]
        assert store.quota_usage(USER) == (5 + 6 + 5 + 5, None)
        assert not old_tmp.exists() and fresh_tmp.exists()
    finally:
        store.close()


def test_first_open_indexes_existing_maildir(root: Path, quotas: Quotas) -> None:
    md = maildir_of(root)
    for sub in ("cur", "new", "tmp"):
        (md / sub).mkdir(parents=True)
    (md / "cur" / "1700000000.M5P9.host:2,S").write_bytes(b"old mail")
    store = MessageStore(str(root), quotas)
    try:
        box = store.open_mailbox(USER)
        assert [(i.uid, i.flags) for i in box.messages()] == [(1, {"\\Seen"})]
    finally:
        store.close()


def test_crash_between_rename_and_index_insert_is_repaired(
    store: MessageStore, root: Path, tmp_path: Path
) -> None:
    deliver(store, tmp_path, MSG)
    box = store.open_mailbox(USER)
    md = maildir_of(root)
    # What a crash leaves: files renamed into place with no index row.
    (md / "new" / "1800000000.M1P1Q1.mx.example,S=5,W=5").write_bytes(b"crash")
    (md / "cur" / "1800000001.M1P1Q2.mx.example,S=4,W=4:2,S").write_bytes(b"seen")
    box.refresh()
    infos = box.messages()
    assert [i.uid for i in infos] == [1, 2, 3]
    assert box.read_message(2) == b"crash"
    assert infos[2].flags == {"\\Seen"}
    assert store.quota_usage(USER)[0] == len(MSG) + 9
    assert deliver(store, tmp_path, MSG) == 4
    # Opening from scratch (another process) agrees.
    other = MessageStore(str(root), lambda u: None)
    try:
        assert [i.uid for i in other.open_mailbox(USER).messages()] == [1, 2, 3, 4]
    finally:
        other.close()


def test_external_rename_and_unlink_are_picked_up(
    store: MessageStore, root: Path, tmp_path: Path
) -> None:
    uid = deliver(store, tmp_path, MSG)
    uid2 = deliver(store, tmp_path, b"gone\r\n")
    box = store.open_mailbox(USER)
    md = maildir_of(root)
    info = box.messages()[0]
    # Dovecot moving a read message to cur/ with \Seen, and expunging another.
    os.rename(md / info.filename, md / "cur" / (info.filename[4:] + ":2,S"))
    os.unlink(md / box.messages()[1].filename)
    assert box.read_message(uid) == MSG  # found through repair
    box.refresh()
    assert [(i.uid, i.flags) for i in box.messages()] == [(uid, {"\\Seen"})]
    with pytest.raises(KeyError):
        box.read_message(uid2)
    assert box.set_flags([uid], ["\\Flagged"], "add")[uid].filename.endswith(":2,FS")


def test_settled_folder_is_not_rescanned(
    store: MessageStore, root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    deliver(store, tmp_path, MSG)
    md = maildir_of(root)
    past = time.time() - 60
    for sub in ("new", "cur"):
        os.utime(md / sub, (past, past))
    store.open_mailbox(USER)  # scans once and records the settled mtimes

    def no_listing(path: str) -> dict[str, str]:
        raise AssertionError("directory scanned although nothing changed")

    monkeypatch.setattr(maildir, "list_files", no_listing)
    box = store.open_mailbox(USER)
    box.refresh()
    assert len(box.messages()) == 1


def test_flag_change_on_file_renamed_behind_our_back(
    store: MessageStore, root: Path, tmp_path: Path
) -> None:
    uid = deliver(store, tmp_path, MSG)
    box = store.open_mailbox(USER)
    md = maildir_of(root)
    name = box.messages()[0].filename
    os.rename(md / name, md / "cur" / (name[4:] + ":2,Sa"))
    info = box.set_flags([uid], ["\\Flagged"], "add")[uid]
    assert info.filename.endswith(":2,Fa")  # our letters from the index, Dovecot's kept
    assert box.read_message(uid) == MSG
    os.unlink(md / info.filename)
    assert box.set_flags([uid], ["\\Seen"], "add") == {}
    assert box.expunge([uid]) == []
    assert store.quota_usage(USER)[0] == 0


def test_expunge_of_file_renamed_behind_our_back(
    store: MessageStore, root: Path, tmp_path: Path
) -> None:
    uid = deliver(store, tmp_path, MSG)
    box = store.open_mailbox(USER)
    md = maildir_of(root)
    name = box.messages()[0].filename
    os.rename(md / name, md / "cur" / (name[4:] + ":2,S"))
    assert box.expunge([uid]) == [uid]
    assert files_in(md) == []


def test_reindex_moves_corrupt_index_aside(store: MessageStore, root: Path, tmp_path: Path) -> None:
    deliver(store, tmp_path, MSG)
    store.close()
    md = maildir_of(root)
    for suffix in ("-wal", "-shm"):
        if (md / (INDEX_NAME + suffix)).exists():
            os.unlink(md / (INDEX_NAME + suffix))
    (md / INDEX_NAME).write_bytes(b"this is not a database" * 100)
    with pytest.raises(sqlite3.DatabaseError):
        store.open_mailbox(USER)
    assert store.reindex(USER) == 1
    assert [p for p in os.listdir(md) if ".corrupt-" in p]
    assert store.open_mailbox(USER).read_message(1) == MSG


def test_vanished_folders(store: MessageStore, root: Path, tmp_path: Path) -> None:
    import shutil

    deliver(store, tmp_path, MSG, folder="Trash")
    trash = store.open_mailbox(USER, "Trash")
    md = maildir_of(root)
    shutil.rmtree(md / ".Trash")
    with pytest.raises(MailboxNotFound):
        trash.refresh()
    assert "Trash" not in store.list_mailboxes(USER)
    store.create_mailbox(USER, "Trash")
    assert store.open_mailbox(USER, "Trash").messages() == []
    assert store.quota_usage(USER)[0] == 0
    # INBOX directories are recreated.
    shutil.rmtree(md / "new")
    assert store.open_mailbox(USER).messages() == []
    assert (md / "new").is_dir()
    # reindex drops folders whose directory is gone.
    store.create_mailbox(USER, "Old")
    shutil.rmtree(md / ".Old")
    store.reindex(USER)
    with pytest.raises(MailboxNotFound):
        store.open_mailbox(USER, "Old")


# -- quota --------------------------------------------------------------------------------------


def test_quota_exceeded(store: MessageStore, root: Path, quotas: Quotas, tmp_path: Path) -> None:
    quotas.limits[USER] = 100
    deliver(store, tmp_path, b"x" * 60, folder="Sent")
    assert store.quota_usage(USER) == (60, 100)
    with pytest.raises(QuotaExceeded):
        deliver(store, tmp_path, b"y" * 41)
    box = store.open_mailbox(USER)
    with pytest.raises(QuotaExceeded):
        box.append(b"z" * 41)
    assert deliver(store, tmp_path, b"y" * 40) == 1
    assert store.quota_usage(USER) == (100, 100)
    md = maildir_of(root)
    assert os.listdir(md / "tmp") == [] and len(files_in(md)) == 1
    box.refresh()
    box.expunge([1])
    assert store.quota_usage(USER) == (60, 100)
    quotas.limits[USER] = None
    deliver(store, tmp_path, b"y" * 1000)
    assert store.quota_usage(USER) == (1060, None)


def test_quota_checked_again_under_lock(
    store: MessageStore, quotas: Quotas, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Simulates another process using up the quota between the pre-check and the commit.
    quotas.limits[USER] = 100
    deliver(store, tmp_path, b"x" * 50)
    monkeypatch.setattr(MessageStore, "_check_quota", lambda *a: None)
    with pytest.raises(QuotaExceeded):
        deliver(store, tmp_path, b"x" * 51)
    assert store.quota_usage(USER)[0] == 50


# -- folders ----------------------------------------------------------------------------------


def test_folders_create_list_invalid(store: MessageStore, root: Path) -> None:
    store.create_mailbox(USER, "Archive/2024")
    store.create_mailbox(USER, "Entwürfe")
    md = maildir_of(root)
    assert (md / ".Archive.2024" / "maildirfolder").is_file()
    assert (md / ".Entw&APw-rfe" / "new").is_dir()
    assert store.list_mailboxes(USER) == [
        "INBOX",
        "Archive",
        "Archive/2024",
        "Drafts",
        "Entwürfe",
        "Junk",
        "Sent",
        "Trash",
    ]
    for existing in ("INBOX", "inbox", "Sent", "Archive/2024"):
        with pytest.raises(ValueError):
            store.create_mailbox(USER, existing)
    for bad in ("", "..", "/x", "x/", "a.b", "a\x00", "x" * 256):
        with pytest.raises(ValueError):
            store.create_mailbox(USER, bad)
    with pytest.raises(MailboxNotFound):
        store.open_mailbox(USER, "Nope")
    assert store.open_mailbox(USER, "inbox").name == "INBOX"
    box = store.open_mailbox(USER, "Archive/2024")
    assert box.name == "Archive/2024" and box.uidvalidity > 0
    validities = {store.open_mailbox(USER, n).uidvalidity for n in store.list_mailboxes(USER)}
    assert len(validities) == 8


def test_folder_made_by_another_program_is_adopted(store: MessageStore, root: Path) -> None:
    store.list_mailboxes(USER)
    md = maildir_of(root)
    for sub in ("cur", "new", "tmp"):
        (md / ".Lists.python" / sub).mkdir(parents=True)
    (md / ".Lists.python" / "cur" / "1700000000.M1P1.h:2,S").write_bytes(b"list mail")
    (md / ".not..valid" / "cur").mkdir(parents=True)
    assert "Lists/python" in store.list_mailboxes(USER)
    assert store.open_mailbox(USER, "Lists/python").read_message(1) == b"list mail"
    for sub in ("cur", "new", "tmp"):
        (md / ".Other" / sub).mkdir(parents=True)
    assert store.open_mailbox(USER, "Other").messages() == []


# -- append -----------------------------------------------------------------------------------


def test_append_with_flags_and_internaldate(store: MessageStore, root: Path) -> None:
    box = store.open_mailbox(USER, "Sent")
    uid = box.append(b"Subject: sent\r\n\r\nbody\r\n", ["\\Seen", "$Sent"], 1_600_000_000.0)
    info = box.messages()[-1]
    assert info.uid == uid == 1
    assert info.flags == {"\\Seen", "$Sent"}
    assert info.internaldate == 1_600_000_000.0
    assert info.filename.startswith("cur/") and info.filename.endswith(":2,S")
    path = maildir_of(root) / ".Sent" / info.filename
    assert path.stat().st_mtime == 1_600_000_000.0
    assert box.read_message(uid) == b"Subject: sent\r\n\r\nbody\r\n"
    uid2 = box.append(b"plain\r\n")
    assert box.messages()[-1].filename.startswith("new/")
    assert box.uidnext == uid2 + 1
    with pytest.raises(ValueError):
        box.append(b"x", ["\\Bogus"])
    # internaldate survives a rebuild (it is the file's mtime).
    store.reindex(USER)
    assert store.open_mailbox(USER, "Sent").messages()[0].internaldate == 1_600_000_000.0


# -- listeners ----------------------------------------------------------------------------------


def test_listeners_called_after_each_change(
    store: MessageStore, root: Path, tmp_path: Path
) -> None:
    calls: list[tuple[str, str]] = []
    store.add_listener(lambda user, folder: calls.append((user, folder)))

    def broken(user: str, folder: str) -> None:
        raise RuntimeError("listener bug")

    store.add_listener(broken)
    with pytest.raises(TypeError):
        store.add_listener("not callable")
    uid = deliver(store, tmp_path, MSG)
    assert calls == [(USER, "INBOX")]
    box = store.open_mailbox(USER, "INBOX")
    box.set_flags([uid], ["\\Seen"], "add")
    box.set_flags([uid], ["\\Seen"], "add")  # no change, no call
    box.expunge([uid])
    box.expunge([uid])  # nothing removed, no call
    store.open_mailbox(USER, "Sent").append(b"x")
    store.create_mailbox(USER, "New")
    assert calls == [(USER, "INBOX")] * 3 + [(USER, "Sent"), (USER, "New")]
    # A repair that changes the index notifies too.
    (maildir_of(root) / "new" / "1800000000.M1P1Q1.h").write_bytes(b"x")
    box.refresh()
    assert calls[-1] == (USER, "INBOX")


# -- two processes, cache ---------------------------------------------------------------------


def test_two_stores_on_the_same_root(root: Path, tmp_path: Path) -> None:
    a = MessageStore(str(root), lambda u: 10_000, hostname="a")
    b = MessageStore(str(root), lambda u: 10_000, hostname="b")
    try:
        spool = tmp_path / "s"
        spool.write_bytes(MSG)
        uids = []
        for i in range(10):
            uids.append((a if i % 2 else b).deliver(USER, str(spool)))
        assert uids == list(range(1, 11))
        box_a = a.open_mailbox(USER)
        box_b = b.open_mailbox(USER)
        assert box_a.uidvalidity == box_b.uidvalidity
        assert [i.uid for i in box_a.messages()] == uids
        box_b.set_flags([3], ["\\Seen"], "add")
        box_b.expunge([4])
        box_a.refresh()
        infos = {i.uid: i for i in box_a.messages()}
        assert 4 not in infos and infos[3].flags == {"\\Seen"}
        assert box_a.read_message(3) == MSG
        assert a.quota_usage(USER) == b.quota_usage(USER) == (9 * len(MSG), 10_000)
        b.create_mailbox(USER, "FromB")
        assert "FromB" in a.list_mailboxes(USER)
        assert a.reindex(USER) == 9
        box_b.refresh()
        assert [i.uid for i in box_b.messages()] == [u for u in uids if u != 4]
        assert b.deliver(USER, str(spool)) == 11
    finally:
        a.close()
        b.close()


def test_connection_cache_is_bounded(root: Path, tmp_path: Path) -> None:
    store = MessageStore(str(root), lambda u: None, max_open_users=2)
    spool = tmp_path / "s"
    spool.write_bytes(MSG)
    users = [f"u{i}@example.test" for i in range(5)]
    try:
        for _ in range(2):
            for user in users:
                store.deliver(user, str(spool))
        assert len(store._users) == 2
        box = store.open_mailbox(users[0])
        for user in users[1:]:
            store.quota_usage(user)  # evicts users[0]'s connection
        assert [i.uid for i in box.messages()] == [1, 2]
        box.refresh()
        assert box.read_message(2) == MSG
    finally:
        store.close()
    store.close()  # idempotent


def test_store_reopens_after_close(store: MessageStore, spool: Path) -> None:
    store.deliver(USER, str(spool))
    box = store.open_mailbox(USER)
    store.close()
    assert box.read_message(1) == MSG
    assert store.deliver(USER, str(spool)) == 2


def test_racy_mtimes_are_not_trusted() -> None:
    now = time.time_ns()
    assert tier1.MaildirBackend.settled((now, now - 10 * tier1.RACY_NS)) == (
        -1,
        now - 10 * tier1.RACY_NS,
    )


def test_concurrent_processes_allocate_distinct_uids(root: Path, tmp_path: Path) -> None:
    import subprocess
    import sys

    spool = tmp_path / "s"
    spool.write_bytes(MSG)
    script = (
        "import sys\n"
        "from mailgw.store import MessageStore\n"
        "s = MessageStore(sys.argv[1], lambda u: None, hostname=sys.argv[3])\n"
        "print(' '.join(str(s.deliver(sys.argv[2], sys.argv[4])) for _ in range(40)))\n"
    )
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[2]))
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", script, str(root), USER, f"p{i}", str(spool)],
            stdout=subprocess.PIPE,
            env=env,
        )
        for i in range(3)
    ]
    outputs = [p.communicate(timeout=120)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0, 0]
    uids = sorted(int(x) for out in outputs for x in out.split())
    assert uids == list(range(1, 121))
    store = MessageStore(str(root), lambda u: None)
    try:
        box = store.open_mailbox(USER)
        assert [i.uid for i in box.messages()] == uids
        assert store.quota_usage(USER)[0] == 120 * len(MSG)
    finally:
        store.close()


# -- threads: a delivery thread next to the reactor thread ----------------------------------------


def test_delivery_thread_and_reader_thread_share_the_store(root: Path, tmp_path: Path) -> None:
    reactor = CallsFromThreads()
    store = MessageStore(str(root), lambda u: None, hostname="mx.example", reactor=reactor)
    seen: list[tuple[str, str, int]] = []
    store.add_listener(lambda user, folder: seen.append((user, folder, threading.get_ident())))
    spool = tmp_path / "s"
    spool.write_bytes(MSG)
    count = 60
    delivered: list[int] = []
    errors: list[BaseException] = []

    def deliver_all() -> None:
        try:
            for _ in range(count):
                delivered.append(store.deliver(USER, str(spool)))
        except BaseException as e:  # pragma: no cover - reported below
            errors.append(e)

    store.open_mailbox(USER)  # the index exists before the threads race
    worker = threading.Thread(target=deliver_all)
    worker.start()
    # Meanwhile this thread (the "reactor") reads, flags and expunges what has arrived.
    expunged: list[int] = []
    while worker.is_alive() or not expunged:
        box = store.open_mailbox(USER)
        infos = box.messages()
        if infos:
            first = infos[0].uid
            assert box.read_message(first).endswith(MSG)
            box.set_flags([first], ["\\Seen"], "add")
            expunged += box.expunge([first])
    worker.join(30)
    assert errors == []
    assert delivered == list(range(1, count + 1))
    box = store.open_mailbox(USER)
    assert sorted(expunged + [i.uid for i in box.messages()]) == delivered
    assert len(set(expunged)) == len(expunged)
    # Listeners of changes made in the worker ran only when the reactor ran its queue.
    here = threading.get_ident()
    assert all(thread == here for _, _, thread in seen)
    assert len(seen) == len(expunged) * 2  # this thread's flag and expunge changes
    reactor.run_pending()
    assert len(seen) == len(expunged) * 2 + count
    assert all(thread == here for _, _, thread in seen)
    store.close()


def test_own_writes_are_not_followed_by_a_directory_listing(
    store: MessageStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    box = store.open_mailbox(USER)
    uid = box.append(MSG)
    listed: list[str] = []
    real = maildir.list_files

    def counting(path: str) -> dict[str, str]:
        listed.append(path)
        return real(path)

    monkeypatch.setattr(maildir, "list_files", counting)
    monkeypatch.setattr(tier1, "SCAN_INTERVAL_NS", 10**15)  # no periodic check here
    uid2 = box.append(MSG + b"2")
    box.set_flags([uid], ["\\Seen"], "add")
    box.expunge([uid2])
    other = store.open_mailbox(USER)  # another session (or process) reading the index
    other.refresh()
    assert listed == []
    assert [(m.uid, m.flags) for m in other.messages()] == [(uid, {"\\Seen"})]


def test_foreign_file_hidden_by_an_unchanged_mtime_is_found(
    store: MessageStore, root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    box = store.open_mailbox(USER)
    box.append(MSG)
    md = maildir_of(root)
    recorded = [(md / sub).stat().st_mtime_ns for sub in ("new", "cur")]
    # Another Maildir program delivers in the same clock tick: the mtime does not change.
    (md / "new" / "1700000000.foreign.host").write_bytes(MSG + b"foreign")
    for sub, ns in zip(("new", "cur"), recorded, strict=True):
        os.utime(md / sub, ns=(ns, ns))
    monkeypatch.setattr(tier1, "SCAN_INTERVAL_NS", 10**15)
    box.refresh()
    assert len(box.messages()) == 1  # trusted for now: a mailgw writer recorded these mtimes
    monkeypatch.setattr(tier1, "SCAN_INTERVAL_NS", 0)  # the periodic check is due
    box.refresh()
    assert len(box.messages()) == 2


def test_recorded_mtimes_are_verified_once_settled(
    store: MessageStore, root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    box = store.open_mailbox(USER)
    box.append(MSG)
    md = maildir_of(root)
    (md / "new" / "1700000000.foreign.host").write_bytes(MSG + b"foreign")
    past = time.time_ns() - 10 * tier1.RACY_NS
    index = sqlite3.connect(md / INDEX_NAME)
    with index:  # as recorded by a writer, long ago: settled but not verified
        index.execute(
            "UPDATE mailboxes SET new_mtime = ?, cur_mtime = ?, mtimes_verified = 0"
            " WHERE name = 'INBOX'",
            (past, past),
        )
    index.close()
    for sub in ("new", "cur"):
        os.utime(md / sub, ns=(past, past))
    monkeypatch.setattr(tier1, "SCAN_INTERVAL_NS", 10**15)
    box.refresh()
    assert len(box.messages()) == 2
    verified = (
        sqlite3.connect(md / INDEX_NAME)
        .execute("SELECT mtimes_verified FROM mailboxes WHERE name = 'INBOX'")
        .fetchone()
    )
    assert verified == (1,)


def test_append_messages_is_all_or_nothing(
    store: MessageStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    uidvalidity, uids = store.append_messages(USER, "INBOX", [(MSG, ["\\Seen"], None)] * 2)
    assert uidvalidity == store.open_mailbox(USER).uidvalidity and len(uids) == 2
    real = mailbox.Mailbox.append
    calls: list[int] = []

    def failing_second(self: Any, data: bytes, flags: Any = (), when: Any = None) -> int:
        calls.append(1)
        if len(calls) == 2:
            raise OSError("disk full")
        return real(self, data, flags, when)

    monkeypatch.setattr(mailbox.Mailbox, "append", failing_second)
    with pytest.raises(OSError):
        store.append_messages(USER, "INBOX", [(MSG, [], None), (MSG, [], None)])
    assert [m.uid for m in store.open_mailbox(USER).messages()] == uids  # the first went again
    with pytest.raises(MailboxNotFound):
        store.append_messages(USER, "Nowhere", [(MSG, [], None)])


def test_deliver_from_an_offset(store: MessageStore, tmp_path: Path, quotas: Quotas) -> None:
    """A spool queue file holds its envelope first: only the bytes from ``offset`` are
    stored, and the quota counts only those."""
    path = tmp_path / "queue-file"
    path.write_bytes(b"MGWQ1 C 2\n{}" + MSG)
    uid = store.deliver(USER, str(path), b"Return-Path: <a@b>\r\n", offset=12)
    box = store.open_mailbox(USER)
    assert box.read_message(uid) == b"Return-Path: <a@b>\r\n" + MSG
    assert box.messages()[-1].size == len(MSG) + len(b"Return-Path: <a@b>\r\n")


# -- group commit of directory fsyncs -------------------------------------------------------------


def _wait_for(condition: Any, what: str) -> None:
    """Poll until ``condition()`` (no time limit of its own: the test runner's applies)."""
    while not condition():
        time.sleep(0.001)


def test_group_sync_alone_makes_one_fsync_per_call(tmp_path: Path) -> None:
    sync = maildir.GroupSync()
    for _ in range(3):
        sync.sync(str(tmp_path))
    assert (sync.calls, sync.fsyncs) == (3, 3)


def test_group_sync_callers_arriving_during_an_fsync_share_the_next_one(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Callers that arrive while an fsync runs wait for one that starts after them (their
    changes may have missed the running one), and that one fsync serves them all."""
    release = threading.Event()
    started: list[int] = []
    finished: list[int] = []

    def slow_fsync(path: str) -> None:
        started.append(sync.calls)
        if len(started) == 1:
            release.wait()
        finished.append(len(started))

    monkeypatch.setattr(maildir, "fsync_dir", slow_fsync)
    sync = maildir.GroupSync()
    returned: list[int] = []

    def caller() -> None:
        sync.sync(str(tmp_path))
        returned.append(len(finished))

    threads = [threading.Thread(target=caller) for _ in range(6)]
    threads[0].start()
    _wait_for(lambda: started, "the first fsync")
    for t in threads[1:]:
        t.start()
    _wait_for(lambda: sync.calls == 6, "every caller")
    release.set()
    for t in threads:
        t.join()
    # The first caller's own fsync, then one shared by the five that came meanwhile; the
    # second started only once all six had called.
    assert started == [1, 6]
    assert sync.fsyncs == 2
    assert sorted(returned) == [1, 2, 2, 2, 2, 2]


def test_group_sync_failure_reaches_every_caller_of_its_round(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    release = threading.Event()
    calls: list[int] = []

    def fsync(path: str) -> None:
        calls.append(1)
        if len(calls) == 1:
            release.wait()
        elif len(calls) == 2:
            raise OSError("fsync failed")

    monkeypatch.setattr(maildir, "fsync_dir", fsync)
    sync = maildir.GroupSync()
    errors: list[str] = []

    def caller() -> None:
        try:
            sync.sync(str(tmp_path))
        except OSError as e:
            errors.append(str(e))
        else:
            errors.append("")

    threads = [threading.Thread(target=caller) for _ in range(4)]
    threads[0].start()
    _wait_for(lambda: calls, "the first fsync")
    for t in threads[1:]:
        t.start()
    _wait_for(lambda: sync.calls == 4, "every caller")
    release.set()
    for t in threads:
        t.join()
    assert sorted(errors) == ["", "fsync failed", "fsync failed", "fsync failed"]
    sync.sync(str(tmp_path))  # the next round is a new fsync
    assert len(calls) == 3


def test_concurrent_deliveries_share_directory_fsyncs(
    store: MessageStore, root: Path, tmp_path: Path
) -> None:
    """Deliveries into one INBOX from several threads through the shared directory fsyncs:
    every message is delivered, indexed and its directory synced."""
    content = tmp_path / "content"
    content.write_bytes(b"Subject: x\r\n\r\nbody\r\n")
    store.deliver(USER, str(content))
    uids: list[int] = []

    def deliver_some() -> None:
        for _ in range(25):
            uids.append(store.deliver(USER, str(content)))

    threads = [threading.Thread(target=deliver_some) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(uids) == list(range(2, 102))
    assert len(os.listdir(maildir_of(root) / "new")) == 101
    box = store.open_mailbox(USER)
    assert [m.uid for m in box.messages()] == list(range(1, 102))
    assert store.tier1.dir_sync.calls == 101
    assert 1 <= store.tier1.dir_sync.fsyncs <= 101
