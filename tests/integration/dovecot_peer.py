"""Dovecot beside mailgw: run the same raw IMAP script against both and compare the responses.

Where an RFC leaves a choice, mailgw does what Dovecot does; these helpers check it against
the real one. :func:`dovecot` starts a private Dovecot (``bench/peers.py``) on a free port
with one test user and a Maildir, with ``/`` as the hierarchy separator like mailgw.
:class:`RawSession` sends command lines exactly as written (non-synchronising literals
``{n+}``, which both servers take) and returns the response lines of each;
:func:`normalise` takes away what legitimately differs (human-readable texts, UIDVALIDITY
and mod-sequence values, the order of flags in a list). :func:`run_script` plays a script of
``(session, command)`` steps over several sessions on both servers, step by step.

Tests using Dovecot are marked :data:`requires_dovecot`: they are skipped only when the
``dovecot`` program is not installed (``apt-get install dovecot-imapd``).
"""

from __future__ import annotations

import re
import shutil
import socket
import tempfile
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager, suppress
from pathlib import Path

import pytest

from bench.peers import DOVECOT, DovecotPeer
from mailgw.testing.server import free_port

DOVECOT_USER = "alice"
DOVECOT_PASSWORD = "dovecot pw"

requires_dovecot = pytest.mark.skipif(
    shutil.which("dovecot") is None and not Path(DOVECOT).exists(),
    reason="dovecot is not installed (apt-get install dovecot-imapd)",
)

# mailgw's hierarchy separator is "/"; Dovecot's Maildir++ default namespace uses ".".
_NAMESPACE = """\
namespace inbox {
  inbox = yes
  separator = /
}
"""


@contextmanager
def dovecot() -> Iterator[DovecotPeer]:
    """A running private Dovecot with the user :data:`DOVECOT_USER`; stopped by PID and its
    directory removed after. The directory is made under the system's temporary directory,
    not pytest's (that one is mode 0700: Dovecot's auth process, which runs as the
    ``dovecot`` user, could not read its password file)."""
    workdir = Path(tempfile.mkdtemp(prefix="mailgw-dovecot-"))
    peer = DovecotPeer(
        workdir, free_port(), {DOVECOT_USER: "{PLAIN}" + DOVECOT_PASSWORD}, extra=_NAMESPACE
    )
    try:
        peer.start()
        yield peer
    finally:
        peer.stop()
        peer.cleanup()


class RawSession:
    """One IMAP connection, logged in; ``command(b"SELECT INBOX")`` sends ``Tn SELECT INBOX``
    and returns every response line up to the tagged one (a line announcing a literal
    ``{n}`` comes back joined with the literal's data and the rest of the line)."""

    def __init__(self, port: int, user: str, password: str, timeout: float = 10.0) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)
        self.buffer = b""
        self.greeting = self._line()
        self._n = 0
        self.login = self.command(b"LOGIN " + _quote(user) + b" " + _quote(password))
        if not self.login[-1].split(b" ", 2)[1] == b"OK":
            raise RuntimeError(f"login failed: {self.login!r}")

    def _line(self) -> bytes:
        while b"\r\n" not in self.buffer:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise ConnectionError(f"connection closed; pending {self.buffer!r}")
            self.buffer += chunk
        line, self.buffer = self.buffer.split(b"\r\n", 1)
        m = re.search(rb"~?\{(\d+)\}$", line)
        if m is None:
            return line
        size = int(m.group(1))
        while len(self.buffer) < size:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise ConnectionError("connection closed inside a literal")
            self.buffer += chunk
        data, self.buffer = self.buffer[:size], self.buffer[size:]
        return line + b"\r\n" + data + self._line()

    def command(self, line: bytes, tag: bytes | None = None) -> list[bytes]:
        if tag is None:
            self._n += 1
            tag = b"T%d" % self._n
        self.sock.sendall(tag + b" " + line + b"\r\n")
        out = []
        while True:
            response = self._line()
            out.append(response)
            if response.startswith(tag + b" "):
                return out

    def close(self) -> None:
        with suppress(OSError):
            self.sock.sendall(b"Z LOGOUT\r\n")
        self.sock.close()


def _quote(text: str) -> bytes:
    return b'"' + text.encode().replace(b"\\", b"\\\\").replace(b'"', b'\\"') + b'"'


_STATUS = re.compile(rb"^(\S+) (OK|NO|BAD|BYE|PREAUTH)(?: (\[[^\]]*\]))?")
# FETCH items come in any order: UID goes first (Dovecot's order).
_UID_FIRST = re.compile(rb"^(\* \d+ FETCH \()([^{]*?) (UID \d+)(?=[ )])")
_FLAG_LIST = re.compile(rb"(FLAGS|PERMANENTFLAGS) \(([^()]*)\)")
_NUMBERS = [
    (re.compile(rb"UIDVALIDITY \d+"), b"UIDVALIDITY #"),
    (re.compile(rb"APPENDUID \d+"), b"APPENDUID #"),
    (re.compile(rb"COPYUID \d+"), b"COPYUID #"),
    (re.compile(rb"MODSEQ \(?\d+\)?"), b"MODSEQ #"),
]
# Sent by mailgw on every SELECT, by Dovecot only once CONDSTORE is on (both allowed).
DEFAULT_IGNORE = (re.compile(rb"^\* OK \[HIGHESTMODSEQ \d+\]"),)


def normalise(
    lines: Iterable[bytes], ignore: Sequence[re.Pattern[bytes]] = DEFAULT_IGNORE
) -> list[str]:
    """Responses made comparable: status responses keep their tag, status and response code
    but not their text; UIDVALIDITY / APPENDUID / COPYUID / MODSEQ values become ``#``; flag
    lists are sorted and a FETCH's UID item comes first; lines matching an ``ignore`` pattern
    are left out."""
    out = []
    for line in lines:
        if any(p.search(line) for p in ignore):
            continue
        m = _STATUS.match(line)
        if m is not None:
            line = b" ".join(g for g in m.groups() if g is not None)
        line = _UID_FIRST.sub(rb"\1\3 \2", line)
        line = _FLAG_LIST.sub(lambda f: f[1] + b" (" + b" ".join(sorted(f[2].split())) + b")", line)
        for pattern, replacement in _NUMBERS:
            line = pattern.sub(replacement, line)
        out.append(line.decode("utf-8", "replace"))
    return out


Step = tuple[str, bytes]


def run_script(
    steps: Sequence[Step],
    ours: dict[str, RawSession],
    theirs: dict[str, RawSession],
    ignore: Sequence[re.Pattern[bytes]] = DEFAULT_IGNORE,
) -> tuple[list[list[str]], list[list[str]]]:
    """Play ``steps`` (session name, command line) on both servers, one step at a time and
    with the same tags, and return the normalised responses of each step: mailgw's, then
    Dovecot's."""
    mine: list[list[str]] = []
    peer: list[list[str]] = []
    for n, (name, line) in enumerate(steps, 1):
        tag = b"%s%d" % (name.encode(), n)
        mine.append(normalise(ours[name].command(line, tag), ignore))
        peer.append(normalise(theirs[name].command(line, tag), ignore))
    return mine, peer


def report(steps: Sequence[Step], mine: list[list[str]], peer: list[list[str]]) -> str:
    """The steps whose responses differ, for an assertion message."""
    out = []
    for (name, line), a, b in zip(steps, mine, peer, strict=True):
        if a != b:
            out.append(f"{name}: {line!r}\n  mailgw:  {a}\n  dovecot: {b}")
    return "\n".join(out)
