"""Mailbox names on the IMAP wire (``mailgw.imap.names``) and the modified UTF-7 codec it
shares with the store's on-disk names (``mailgw.model.mutf7``)."""

from __future__ import annotations

import ast
import pathlib

import pytest

import mailgw
from mailgw.imap import wire
from mailgw.imap.names import InvalidName, from_wire, to_wire
from mailgw.model.mutf7 import mutf7_decode, mutf7_encode
from mailgw.store.names import folder_dirname


@pytest.mark.parametrize(
    "text, encoded",
    [
        ("Sent", "Sent"),
        ("Entwürfe", "Entw&APw-rfe"),
        ("A&B", "A&-B"),
        ("台北", "&U,BTFw-"),
        ("~peter/mail/日本語", "~peter/mail/&ZeVnLIqe-"),
    ],
)
def test_mutf7_round_trip(text: str, encoded: str) -> None:
    assert mutf7_encode(text) == encoded
    assert mutf7_decode(encoded) == text


@pytest.mark.parametrize("bad", ["&ZeVnLIqe", "&!!-", "caf\xe9", "&AA-"])
def test_mutf7_decode_rejects_garbage(bad: str) -> None:
    with pytest.raises(ValueError):
        mutf7_decode(bad)


@pytest.mark.parametrize(
    "name, utf8, octets",
    [
        ("Entwürfe", False, b"Entw&APw-rfe"),
        ("Entwürfe", True, "Entwürfe".encode()),
        ("inbox", False, b"INBOX"),
        ("Inbox", True, b"INBOX"),
        ("A&B/台北", False, b"A&-B/&U,BTFw-"),
    ],
)
def test_to_wire_and_back(name: str, utf8: bool, octets: bytes) -> None:
    assert to_wire(name, utf8) == octets
    back = from_wire(octets, utf8)
    assert back == ("INBOX" if name.upper() == "INBOX" else name)


def test_from_wire_canonicalises_inbox_and_normalises_utf8() -> None:
    assert from_wire(b"iNbOx") == "INBOX"
    assert from_wire(b"inbox/Sub") == "INBOX/Sub"
    assert from_wire(b"InBoxen") == "InBoxen"
    decomposed = "Entwu\u0308rfe".encode()
    assert from_wire(decomposed, utf8=True) == "Entw\u00fcrfe"  # NFC


@pytest.mark.parametrize(
    "raw, utf8, text",
    [
        (b"\xff", True, "not valid UTF-8"),
        ("Entwürfe".encode(), False, "8-bit data sent"),
        (b"&ZeVnLIqe", False, "not valid mUTF-7"),
    ],
)
def test_from_wire_rejects_what_names_no_mailbox(raw: bytes, utf8: bool, text: str) -> None:
    with pytest.raises(InvalidName, match=text):
        from_wire(raw, utf8)


def test_wire_quotes_what_names_encodes() -> None:
    assert wire.mailbox_name("Entwürfe") == b"Entw&APw-rfe"
    assert wire.mailbox_name("My Box") == b'"My Box"'
    assert wire.mailbox_name("Entwürfe", utf8=True) == '"Entwürfe"'.encode()


def test_the_store_names_its_folders_on_disk_with_the_same_codec() -> None:
    assert folder_dirname("Entwürfe/台北") == "." + mutf7_encode("Entwürfe") + "." + mutf7_encode(
        "台北"
    )


def test_the_store_does_not_import_imap() -> None:
    root = pathlib.Path(mailgw.__file__).parent
    for path in (root / "store").glob("*.py"):
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.module:
                assert not node.module.startswith("mailgw.imap"), path
            elif isinstance(node, ast.Import):
                assert not any(a.name.startswith("mailgw.imap") for a in node.names), path
