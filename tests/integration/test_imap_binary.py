"""End to end BINARY (RFC 3516): Python imaplib against the real twistd appends a message
with a NUL octet as a literal8 and reads decoded parts back (literal8 and plain literals)."""

from __future__ import annotations

import base64
import imaplib

from mailgw.testing.server import MailgwServer
from tests.integration.helpers import PASSWORD

ALICE = "alice@example.test"

MESSAGE = (
    b'From: a@example.test\r\nMIME-Version: 1.0\r\nContent-Type: multipart/mixed; boundary="b"\r\n'
    b"\r\n--b\r\nContent-Type: application/octet-stream\r\nContent-Transfer-Encoding: base64\r\n"
    b"\r\n" + base64.encodebytes(bytes(range(256))) + b"\r\n--b\r\n"
    b"Content-Type: text/plain\r\nContent-Transfer-Encoding: binary\r\n\r\nnul\x00inside\r\n"
    b"--b--\r\n"
)


def _append_literal8(client: imaplib.IMAP4, data: bytes) -> bytes:
    """imaplib sends only ``{n}`` literals: write the APPEND with ``~{n+}`` by hand."""
    tag = client._new_tag()  # type: ignore[attr-defined]
    client.send(tag + b" APPEND INBOX ~{%d+}\r\n" % len(data) + data + b"\r\n")
    while True:
        line = client.readline()
        if line.startswith(tag + b" "):
            return line


def test_imaplib_binary_fetch_and_literal8_append(server: MailgwServer) -> None:
    client = imaplib.IMAP4("127.0.0.1", server.ports["imap"], timeout=10)
    try:
        client.login(ALICE, PASSWORD)
        assert b" BINARY" in client.capability()[1][0]
        assert _append_literal8(client, MESSAGE).split()[1] == b"OK"
        typ, data = client.select("INBOX")
        assert typ == "OK" and data == [b"1"]
        typ, data = client.fetch("1", "(BINARY.SIZE[1] BINARY.PEEK[1])")
        assert typ == "OK"
        head, body = data[0]
        assert b"BINARY.SIZE[1] 256" in head and head.endswith(b"~{256}")
        assert body == bytes(range(256))
        typ, data = client.fetch("1", "(BINARY[2])")
        assert data[0][1] == b"nul\x00inside"
        typ, data = client.fetch("1", "(FLAGS)")
        assert b"\\Seen" in data[0]
        typ, data = client.fetch("1", "(BODY.PEEK[])")
        # BODY[] is a plain literal: its NUL octets come as 0x80, one for one.
        assert data[0][1] == MESSAGE.replace(b"\0", b"\x80")
    finally:
        client.logout()
