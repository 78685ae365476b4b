"""Issue 9's IMAP items end to end against the real `twistd mailgw`: keyword announcements and
search-context updates reaching a session in another worker process, ESORT, IMAP4rev2 and
UTF8=ACCEPT with Python's imaplib and raw sockets, MULTIAPPEND as advertised."""

from __future__ import annotations

import imaplib
import re
import socket
from collections.abc import Callable

from mailgw.testing.server import MailgwServer
from tests.integration.helpers import PASSWORD
from tests.integration.test_imap_workers import Client, login, other_worker, start

ALICE = "alice@example.test"


def message(subject: str) -> bytes:
    return f"From: bob@example.test\r\nSubject: {subject}\r\n\r\nhello\r\n".encode()


def append(client: Client, subject: str, flags: str = "") -> list[bytes]:
    data = message(subject).decode()
    head = f"APPEND INBOX ({flags})" if flags else "APPEND INBOX"
    return client.ok(f"{head} {{{len(data)}+}}\r\n{data}")


def test_keywords_and_contexts_reach_another_worker(
    server_factory: Callable[..., MailgwServer],
) -> None:
    server = start(server_factory)
    idler = login(server)
    other = other_worker(server, idler)
    try:
        append(other, "one")
        idler.ok("SELECT INBOX")
        other.ok("SELECT INBOX")
        lines = idler.ok("SEARCH RETURN (UPDATE) KEYWORD newkw")
        assert lines[0] == b'* ESEARCH (TAG "t3")\r\n', lines
        idler.sock.sendall(b"i1 IDLE\r\n")
        assert idler.readline(5).startswith(b"+")
        # STORE of a new keyword in the other worker: FLAGS and PERMANENTFLAGS before FETCH
        stored = other.ok("STORE 1 +FLAGS (newkw)")
        assert stored[0].startswith(b"* FLAGS (") and b"newkw" in stored[0], stored
        assert stored[1].startswith(b"* OK [PERMANENTFLAGS (") and b"newkw" in stored[1]
        assert stored[2] == b"* 1 FETCH (FLAGS (newkw))\r\n", stored
        seen = [idler.untagged(10) for _ in range(4)]
        assert seen[0] == b"* FLAGS (\\Answered \\Flagged \\Deleted \\Seen \\Draft newkw)\r\n"
        assert seen[1].startswith(b"* OK [PERMANENTFLAGS (\\Answered") and b"newkw" in seen[1]
        assert seen[2] == b"* 1 FETCH (FLAGS (newkw \\Recent))\r\n", seen
        assert seen[3] == b'* ESEARCH (TAG "t3") ADDTO (0 1)\r\n', seen
        # APPEND of a message with another new keyword
        append(other, "two", "otherkw")
        seen = [idler.untagged(10) for _ in range(3)]
        assert seen[0].startswith(b"* FLAGS (") and b"otherkw" in seen[0], seen
        assert seen[1].startswith(b"* OK [PERMANENTFLAGS (") and b"otherkw" in seen[1], seen
        assert seen[2] == b"* 2 EXISTS\r\n", seen
        # the new message is not in the result (KEYWORD newkw): no ESEARCH update
        idler.sock.sendall(b"DONE\r\n")
        line = idler.untagged(10)  # (RECENT skipped: either session may claim the message)
        assert line.startswith(b"i1 OK"), line
    finally:
        idler.close()
        other.close()


def test_imaplib_with_utf8_accept(server: MailgwServer) -> None:
    client = imaplib.IMAP4("127.0.0.1", server.ports["imap"], timeout=10)
    try:
        client.login(ALICE, PASSWORD)
        caps = client.capability()[1][0].split()
        for cap in (b"MULTIAPPEND", b"UTF8=ACCEPT", b"IMAP4rev2", b"ESORT", b"CONTEXT=SEARCH"):
            assert cap in caps, cap
        typ, data = client.enable("UTF8=ACCEPT")
        assert typ == "OK" and client.utf8_enabled, data
        assert client.create('"Entwürfe"')[0] == "OK"
        typ, names = client.list('""', '"Entw*"')
        assert typ == "OK" and names == ['(\\HasNoChildren) "/" "Entwürfe"'.encode()], names
        typ, data = client.select('"Entwürfe"')
        assert typ == "OK" and data == [b"0"], data
    finally:
        client.logout()
    # imaplib without UTF8=ACCEPT sees the modified UTF-7 name
    client = imaplib.IMAP4("127.0.0.1", server.ports["imap"], timeout=10)
    try:
        client.login(ALICE, PASSWORD)
        assert client.list('""', "Entw*")[1] == [b'(\\HasNoChildren) "/" Entw&APw-rfe']
        typ, data = client.select("&Jjo")
        assert typ == "NO" and b"mUTF-7" in data[0], data
        assert client.list('""', "&Jjo*") == ("OK", [None])
    finally:
        client.logout()


class Raw:
    """A raw IMAP connection for what imaplib cannot send (APPEND UTF8 (~{n}), RETURN)."""

    def __init__(self, port: int) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=10)
        self.file = self.sock.makefile("rb")
        self.file.readline()
        self.n = 0
        assert self.command(f'LOGIN {ALICE} "{PASSWORD}"'.encode())[-1].split()[1] == b"OK"

    def command(self, line: bytes) -> list[bytes]:
        self.n += 1
        tag = b"r%d" % self.n
        self.sock.sendall(tag + b" " + line + b"\r\n")
        out = []
        while True:
            response = self.file.readline()
            assert response, out
            m = re.search(rb"\{(\d+)\}\r\n$", response)
            if m:
                response += self.file.read(int(m.group(1))) + self.file.readline()
            out.append(response)
            if response.startswith(tag + b" "):
                return out


def test_rev2_and_utf8_append_over_sockets(server: MailgwServer) -> None:
    raw = Raw(server.ports["imap"])
    try:
        assert raw.command(b"ENABLE IMAP4rev2 UTF8=ACCEPT")[0] == (
            b"* ENABLED IMAP4rev2 UTF8=ACCEPT\r\n"
        )
        data = "Subject: Grüße\r\n\r\nhallo\r\n".encode()
        literal = b"UTF8 (~{%d+}\r\n" % len(data) + data + b")"
        out = raw.command(b"APPEND INBOX " + literal + b" (\\Flagged) " + literal)
        assert re.match(rb"r3 OK \[APPENDUID \d+ 1:2\]", out[-1]), out
        out = raw.command(b"SELECT INBOX")
        assert not any(b"RECENT" in line for line in out), out
        assert b'* LIST (\\HasNoChildren) "/" INBOX\r\n' in out, out
        assert raw.command(b"SEARCH FLAGGED")[0] == b'* ESEARCH (TAG "r5") ALL 2\r\n'
        out = raw.command(b"UID SORT RETURN (MIN MAX COUNT) (REVERSE ARRIVAL) UTF-8 ALL")
        assert out[0] == b'* ESEARCH (TAG "r6") UID MIN 2 MAX 1 COUNT 2\r\n', out
        out = raw.command(b"FETCH 1 (FLAGS BODY.PEEK[])")
        assert data in out[0] and b"\\Recent" not in out[0], out
        assert raw.command(b"SEARCH RETURN (PARTIAL 2:9) ALL")[0] == (
            b'* ESEARCH (TAG "r8") PARTIAL (2:9 2)\r\n'
        )
    finally:
        raw.sock.close()
