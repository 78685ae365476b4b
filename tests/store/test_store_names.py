"""Tests for mailgw.store.names and the file-level helpers of mailgw.store.maildir (the
modified UTF-7 codec: tests/imap/test_names.py)."""

from __future__ import annotations

import io
import os

import pytest

from mailgw.store import maildir
from mailgw.store.names import (
    folder_dirname,
    folder_from_dirname,
    normalize_folder,
    user_dir,
)


@pytest.mark.parametrize(
    "bad",
    [
        "",
        "/Sent",
        "Sent/",
        "a//b",
        "..",
        "a/../b",
        "a.b",
        "x\x00y",
        "tab\there",
        "wild*",
        "per%cent",
        "x" * 256,
        "\u00e9" * 128,  # 256 bytes of UTF-8
        "\u00e9" * 100,  # fits in UTF-8 but not as modified UTF-7 on disk
        "\ud800",
    ],
)
def test_invalid_folder_names(bad: str) -> None:
    with pytest.raises(ValueError):
        normalize_folder(bad)


def test_inbox_is_case_insensitive_and_names_map_to_maildirpp() -> None:
    assert normalize_folder("inbox") == "INBOX"
    assert normalize_folder("Inbox/Sub") == "INBOX/Sub"
    assert folder_dirname("INBOX") == ""
    assert folder_dirname("Archive/2024") == ".Archive.2024"
    assert folder_dirname("Entwürfe") == ".Entw&APw-rfe"
    assert folder_from_dirname(".Archive.2024") == "Archive/2024"
    assert folder_from_dirname(".Entw&APw-rfe") == "Entwürfe"
    for not_a_folder in (".", "..", "cur", ".a..b", ".&bad", ".INBOX", ".A&AEE-"):
        assert folder_from_dirname(not_a_folder) is None


def test_user_dir(tmp_path: object) -> None:
    assert user_dir("/r", "Alice@Example.TEST") == os.path.join("/r", "example.test", "alice")
    for bad in ("alice", "@example.test", "alice@", "../x@d", "a/b@d", "a@.d", "a\x00@d"):
        with pytest.raises(ValueError):
            user_dir("/r", bad)
    with pytest.raises(ValueError):
        user_dir("/r", "x" * 256 + "@d")


def test_normalize_flags() -> None:
    assert maildir.normalize_flags(["\\seen", "\\FLAGGED", "$Label1", "\\Recent"]) == {
        "\\Seen",
        "\\Flagged",
        "$Label1",
    }
    for bad in (["\\Bogus"], ["two words"], ["a(b"], [""], ["ctl\x01"]):
        with pytest.raises(ValueError):
            maildir.normalize_flags(bad)


def test_filename_helpers() -> None:
    base = "1700000000.M1P2Q3.host,S=10,W=11"
    assert maildir.split_filename(base) == (base, None)
    assert maildir.split_filename(base + ":2,FS") == (base, "FS")
    assert maildir.split_filename(base + ":1,xyz") == (base, None)
    flags = frozenset({"\\Seen", "\\Answered", "\\Flagged", "\\Draft", "\\Deleted", "$k"})
    assert maildir.rel_name(base, flags) == f"cur/{base}:2,DFRST"
    assert maildir.rel_name(base, frozenset()) == f"new/{base}"
    assert maildir.rel_name(base, frozenset(), "") == f"cur/{base}:2,"
    assert maildir.rel_name(base, frozenset({"$k"})) == f"cur/{base}:2,"
    # Dovecot keyword letters (a-z) we do not own are kept across renames.
    assert maildir.rel_name(base, frozenset({"\\Seen"}), "Sab") == f"cur/{base}:2,Sab"
    assert maildir.system_flags_from_info("DFRSTab") == flags - {"$k"}
    assert maildir.escape_hostname("a/b:c,d") == "a\\057b\\072c\\054d"
    assert maildir.escape_hostname("") == "localhost"
    assert maildir.sort_key("12.M1") == (12, "12.M1")
    assert maildir.sort_key("junk") == (0, "junk")


def test_unique_names_differ() -> None:
    names = maildir.UniqueNames("mx.example")
    first, second = names.next(), names.next()
    assert first != second
    assert f"P{os.getpid()}Q1.mx.example" in first


def test_write_file_counts_virtual_size_across_chunks(
    tmp_path: object, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(maildir, "COPY_CHUNK", 3)
    path = os.path.join(str(tmp_path), "m")
    data = b"ab\r\ncd\nef\r\n\n"  # "\r\n" split across the 3-byte chunks; 2 bare LFs
    size, vsize, _mtime = maildir.write_file(path, b"P\n", io.BytesIO(data))
    assert size == len(data) + 2
    assert vsize == size + 3
    with open(path, "rb") as fh:
        assert fh.read() == b"P\n" + data


def test_write_file_removes_partial_file_on_error(tmp_path: object) -> None:
    class Broken(io.BytesIO):
        def read(self, n: int | None = -1) -> bytes:
            raise OSError("disk on fire")

    path = os.path.join(str(tmp_path), "m")
    with pytest.raises(OSError):
        maildir.write_file(path, b"x", Broken())
    assert not os.path.exists(path)
