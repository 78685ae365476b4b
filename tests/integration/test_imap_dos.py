"""IMAP resource exhaustion end to end (issue 10): the real ``twistd mailgw`` with one IMAP
worker process, real clients on loopback, bounded waits.

- A message anyone can send through the MX, with 100,000 IDs in References, made THREAD run
  for over a minute while every other session of the worker waited.
- MULTIAPPEND held every literal in memory until the command ended.
"""

from __future__ import annotations

import imaplib
import re
import smtplib
import socket
from pathlib import Path

from mailgw.testing.server import MailgwServer
from tests.integration.helpers import PASSWORD, wait_until

ALICE = "alice@example.test"
READY_LINE = re.compile(r"imap worker (\d+) \(pid (\d+)\) ready")


def one_worker(server_factory) -> tuple[MailgwServer, int]:  # type: ignore[no-untyped-def]
    """A server with a single IMAP worker (every session lands on it) and that worker's PID."""
    server = server_factory({"imap": {"workers": "1"}})
    found = wait_until(lambda: READY_LINE.findall(server.log()), what="IMAP worker ready")
    return server, int(found[0][1])


def login(server: MailgwServer, timeout: float = 30) -> imaplib.IMAP4:
    client = imaplib.IMAP4("127.0.0.1", server.ports["imap"], timeout=timeout)
    client.login(ALICE, PASSWORD)
    return client


def test_thread_on_a_huge_references_field_does_not_freeze_other_sessions(
    server_factory,  # type: ignore[no-untyped-def]
) -> None:
    server, _pid = one_worker(server_factory)
    parent = b"From: a@elsewhere.test\r\nTo: alice@example.test\r\nSubject: parent\r\n"
    parent += b"Message-ID: <parent@elsewhere.test>\r\n\r\nhello\r\n"
    # 100,000 IDs, one per folded line, the parent last: the nearest ancestor
    ids = b"".join(b" <r%d@elsewhere.test>\r\n" % i for i in range(100_000))
    attack = b"From: x@elsewhere.test\r\nTo: alice@example.test\r\nSubject: reply\r\n"
    attack += b"Message-ID: <attack@elsewhere.test>\r\nReferences:\r\n" + ids
    attack += b" <parent@elsewhere.test>\r\n\r\nbody\r\n"
    with smtplib.SMTP("127.0.0.1", server.ports["mx"], timeout=60) as smtp:
        for data in (parent, attack):
            smtp.sendmail("x@elsewhere.test", [ALICE], data)

    other = login(server)
    wait_until(lambda: other.select("INBOX")[1] == [b"2"], what="both messages delivered")
    busy = socket.create_connection(("127.0.0.1", server.ports["imap"]), timeout=30)
    reader = busy.makefile("rb")
    reader.readline()
    busy.sendall(b'a1 LOGIN alice@example.test "%s"\r\na2 SELECT INBOX\r\n' % PASSWORD.encode())
    while not reader.readline().startswith(b"a2 OK"):
        pass
    # NOOP and THREAD in one write: the worker reads both at once and starts THREAD right
    # after answering NOOP, before its answer has even left. The old, quadratic THREAD then
    # kept the worker for 60-90 s, so the NOOP answer (and every other session) waited past
    # these 30 s socket timeouts; now the worker gives the reactor back after each slice.
    busy.sendall(b"a3 NOOP\r\na4 THREAD REFERENCES UTF-8 ALL\r\n")
    assert reader.readline().startswith(b"a3 OK")
    for _ in range(3):
        typ, _ = other.noop()  # another session of the same worker is answered
        assert typ == "OK"
    busy.settimeout(120)
    lines = [reader.readline(), reader.readline()]
    # the reply is threaded under the parent it names last in References
    assert lines == [b"* THREAD (1 2)\r\n", b"a4 OK THREAD completed\r\n"]
    busy.sendall(b"a5 LOGOUT\r\n")
    busy.close()
    other.logout()


def vm(pid: int, field: str) -> int:
    """A /proc/PID/status memory figure in bytes (VmRSS, VmHWM)."""
    text = Path(f"/proc/{pid}/status").read_text()
    match = re.search(rf"^{field}:\s+(\d+) kB", text, re.M)
    assert match, text
    return int(match.group(1)) * 1024


def test_multiappend_of_large_literals_is_spooled_to_disk(server_factory) -> None:  # type: ignore[no-untyped-def]
    server, pid = one_worker(server_factory)
    size = 20 * 1024 * 1024
    bodies = []
    for n in range(3):
        head = f"From: a@x.test\r\nSubject: big {n}\r\n\r\n".encode()
        line = bytes([65 + n]) * 998 + b"\r\n"
        bodies.append(head + line * ((size - len(head)) // len(line)))
    total = sum(len(b) for b in bodies)

    sock = socket.create_connection(("127.0.0.1", server.ports["imap"]), timeout=60)
    reader = sock.makefile("rb")
    assert reader.readline().startswith(b"* OK")
    sock.sendall(b'a1 LOGIN alice@example.test "%s"\r\n' % PASSWORD.encode())
    while not (line := reader.readline()).startswith(b"a1 "):
        pass
    assert line.startswith(b"a1 OK"), line
    # The peak RSS of the worker is reset now (Linux: clear_refs 5) and read after the APPEND.
    Path(f"/proc/{pid}/clear_refs").write_text("5")
    before = vm(pid, "VmRSS")
    command = b"a2 APPEND INBOX"
    for body in bodies:
        command += b" (\\Seen) {%d+}\r\n" % len(body)
        sock.sendall(command)
        view = memoryview(body)
        for i in range(0, len(body), 1 << 20):
            sock.sendall(view[i : i + (1 << 20)])
        command = b""
    sock.sendall(b"\r\n")
    while not (line := reader.readline()).startswith(b"a2 "):
        pass
    assert line.startswith(b"a2 OK [APPENDUID"), line
    growth = vm(pid, "VmHWM") - before
    # Held in memory, the three literals alone are 60 MB, and the old reader grew the worker
    # by 84 MB here. Spooled, the worker holds one input chunk (64 KiB) and the store one
    # 1 MiB copy buffer at a time: it grew by about 4.5 MB (thread pool, index, allocator).
    # A fifth of the total (12 MB) is below even one literal held with its copy (40 MB).
    assert growth < total // 5, f"worker peak RSS grew by {growth} bytes for {total}"
    sock.sendall(b"a3 LOGOUT\r\n")
    sock.close()

    client = login(server, timeout=120)
    client.select("INBOX", readonly=True)
    for seq, body in enumerate(bodies, 1):
        typ, data = client.fetch(str(seq), "(BODY.PEEK[])")
        assert typ == "OK"
        assert data[0][1] == body  # type: ignore[index]
    client.logout()
    # and no temporary file is left behind
    tmp = server.data_dir / "tmp"
    assert not tmp.exists() or list(tmp.iterdir()) == []
