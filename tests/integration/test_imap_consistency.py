"""IMAP multi-session consistency under a seeded random command mix (imaptest's stress mode).

Five raw-socket clients share one user's INBOX on the real twistd, with ``[imap] workers = 2``
(sessions spread over two processes sharing the user's SQLite index) and with ``workers = 0``.
They issue a seeded random mix of APPEND, STORE/UID STORE (±FLAGS, FLAGS, .SILENT, keywords),
FETCH/UID FETCH, SEARCH/UID SEARCH, EXPUNGE/UID EXPUNGE, COPY, MOVE, NOOP, CHECK, IDLE,
CLOSE + SELECT and EXAMINE: in most rounds every client sends its command (sometimes two,
pipelined) before any answer is read, so the server interleaves them; some rounds run one
client at a time. Each client keeps a model of the mailbox built only from what the server told
*it* (sequence number -> UID, flags per UID, its own \\Recent), and every response is checked
against it (RFC 3501 2.3.1, 7.4.1, RFC 6851, RFC 4315):

- ``* n EXPUNGE`` names an existing sequence number and never arrives during a non-UID FETCH,
  STORE or SEARCH; ``* n EXISTS`` never goes down; UIDs ascend with sequence numbers and an
  expunged UID never comes back; UIDVALIDITY is constant; ``* n FETCH (UID u)`` matches the
  model; RFC822.SIZE and the Subject header of a UID never change (and match what was
  appended); a UID is \\Recent to at most one read-write session over the whole run, and
  \\Recent for a UID never changes within a session; an EXAMINE session never sees \\Recent a
  message a read-write session was told of before it looked; the RECENT count matches.
- A STORE's own FETCH shows the flags it set; an APPEND's message is announced (EXISTS) before
  its tagged OK, with the flags it was appended with; MOVE's moved messages are expunged before
  its tagged OK.
- Every few rounds, after a NOOP by each client in turn, all models agree with each other and
  with a fresh ``UID SEARCH ALL`` + ``FETCH 1:* (UID FLAGS)`` + flag searches; then a
  ``STORE .SILENT`` is not echoed to its own session and every other session learns it on its
  next NOOP, and an EXPUNGE removes exactly the \\Deleted messages everyone agrees on.

Decided tolerances (RFC 3501 7.4.1 leaves them to the server): a command naming a message that
another session expunged but this one has not been told of yet may skip it (FETCH: no data or
``NO [EXPUNGEISSUED]``; STORE: no FETCH echo; COPY/MOVE: ``OK`` whose COPYUID leaves it out;
UID commands: silently ignored). Each such message must then be gone at the next check, so a
server that merely drops work is still caught.

A failure prints the seed, the tail of the operation log and every client's model. The seed is
fixed; ``IMAP_CONSISTENCY_SEED`` overrides it (to run many seeds locally),
``IMAP_CONSISTENCY_ROUNDS`` the number of rounds and ``IMAP_CONSISTENCY_LOG`` the number of log
lines kept. Which session answers first is up to the server, so a run is repeatable in its
commands, not in its interleaving: loop over seeds, e.g.
``for s in $(seq 20); do IMAP_CONSISTENCY_SEED=$s pytest tests/integration/test_imap_consistency.py
|| break; done``.
"""

from __future__ import annotations

import collections
import os
import random
import re
import select
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import pytest

from mailgw.testing.server import MailgwServer
from tests.integration.helpers import PASSWORD
from tests.integration.test_imap_workers import LOGIN_LINE, match_after, wait_ready

USER = "alice@example.test"
SEED = int(os.environ.get("IMAP_CONSISTENCY_SEED", "20260517"))
ROUNDS = int(os.environ.get("IMAP_CONSISTENCY_ROUNDS", "0"))
CLIENTS = 5
CHECK_EVERY = 8
FLAG_POOL = ["\\Seen", "\\Flagged", "\\Answered", "\\Deleted", "\\Draft", "$Work", "$Todo"]
RECENT = "\\Recent"
NO_EXPUNGE = {"FETCH", "STORE", "SEARCH"}


class Inconsistent(AssertionError):
    """The server contradicted itself (or the RFC)."""


class Literal(bytes):
    """A literal string of a response."""


# -- response parsing -------------------------------------------------------------------------


def tokens(data: bytes, pos: int = 0, end: bytes = b"") -> tuple[list[Any], int]:
    """Parse IMAP response tokens from ``data[pos:]`` up to ``end`` (``)``) or the end of the
    line: atoms (``BODY[...]`` brackets kept whole) as str, quoted strings as str, literals as
    :class:`Literal`, NIL as None, parenthesised lists as lists."""
    out: list[Any] = []
    n = len(data)
    while pos < n:
        c = data[pos : pos + 1]
        if c == b" ":
            pos += 1
        elif c == b"\r":
            if end:
                raise ValueError(f"unterminated list in {data!r}")
            return out, n
        elif c == end:
            return out, pos + 1
        elif c == b"(":
            inner, pos = tokens(data, pos + 1, b")")
            out.append(inner)
        elif c == b'"':
            buf = bytearray()
            pos += 1
            while data[pos : pos + 1] != b'"':
                if data[pos : pos + 1] == b"\\":
                    pos += 1
                buf += data[pos : pos + 1]
                pos += 1
                if pos >= n:
                    raise ValueError(f"unterminated string in {data!r}")
            out.append(buf.decode("utf-8", "replace"))
            pos += 1
        elif c == b"{" or data[pos : pos + 2] == b"~{":
            m = re.compile(rb"~?\{(\d+)\+?\}\r\n").match(data, pos)
            if m is None:
                raise ValueError(f"bad literal in {data!r}")
            size = int(m.group(1))
            out.append(Literal(data[m.end() : m.end() + size]))
            pos = m.end() + size
        else:
            start = pos
            depth = 0
            while pos < n:
                ch = data[pos : pos + 1]
                if ch == b"[":
                    depth += 1
                elif ch == b"]":
                    depth -= 1
                elif depth == 0 and ch in (b" ", b"(", b")", b"\r"):
                    break
                pos += 1
            atom = data[start:pos].decode("utf-8", "replace")
            out.append(None if atom.upper() == "NIL" else atom)
    if end:
        raise ValueError(f"unterminated list in {data!r}")
    return out, pos


def seqset(numbers: list[int]) -> str:
    """``1:3,7`` for [1, 2, 3, 7]."""
    numbers = sorted(set(numbers))
    parts = []
    i = 0
    while i < len(numbers):
        j = i
        while j + 1 < len(numbers) and numbers[j + 1] == numbers[j] + 1:
            j += 1
        parts.append(str(numbers[i]) if i == j else f"{numbers[i]}:{numbers[j]}")
        i = j + 1
    return ",".join(parts)


def parse_uidset(text: str) -> list[int]:
    out: list[int] = []
    for part in text.split(","):
        a, _, b = part.partition(":")
        lo, hi = int(a), int(b or a)
        if lo > hi:
            lo, hi = hi, lo
        out.extend(range(lo, hi + 1))
    return out


# -- the model --------------------------------------------------------------------------------


@dataclass
class Slot:
    """One message as a client knows it: UID (None until fetched), flags as last reported
    (without \\Recent), whether this session holds \\Recent for it (None: not told yet)."""

    uid: int | None
    intro_step: int
    flags: frozenset[str] | None = None
    recent: bool | None = None


@dataclass
class Op:
    """One command in flight: its tag, wire bytes and how to judge its responses."""

    client: Client
    tag: str
    kind: str  # the command name for 7.4.1 (FETCH, STORE, SEARCH, ...)
    uid: bool
    text: str
    data: bytes
    sent_step: int = 0
    expect: Callable[[Op, str, str], None] | None = None
    after: Callable[[Op], None] | None = None
    meta: dict[str, Any] = field(default_factory=dict)
    fetched: dict[int, frozenset[str]] = field(default_factory=dict)  # first report per UID
    fetch_uids: list[int] = field(default_factory=list)
    searched: list[int] | None = None
    copyuid: list[tuple[int, int]] | None = None
    untagged: list[bytes] = field(default_factory=list)
    status: str = ""
    code: str = ""


class Run:
    """State shared by the clients: the seed, the log, what every session has been told."""

    def __init__(self, seed: int, port: int) -> None:
        self.seed = seed
        self.rng = random.Random(seed)
        self.port = port
        self.log: collections.deque[str] = collections.deque(
            maxlen=int(os.environ.get("IMAP_CONSISTENCY_LOG", "80"))
        )
        self.step = 0
        self.uidvalidity: int | None = None
        # UIDs some session was told were expunged, with the step it was told at
        self.expunged: dict[int, int] = {}
        self.content: dict[int, dict[str, Any]] = {}  # UID -> {"size": n, "subject": bytes}
        self.appended: dict[int, frozenset[str]] = {}  # UID -> flags it was appended with
        self.recent_owner: dict[int, str] = {}
        self.claimed_step: dict[int, int] = {}
        self.must_go: list[tuple[str, set[int]]] = []  # (why, UIDs that must be expunged)
        self.archive_uids: set[int] = set()
        self.subjects = 0
        self.clients: list[Client] = []
        self.stats: collections.Counter[str] = collections.Counter()

    def tick(self) -> int:
        self.step += 1
        return self.step

    def note(self, text: str) -> None:
        self.log.append(text if len(text) < 300 else text[:300] + "...")

    def fail(self, message: str) -> None:
        lines = [
            f"IMAP consistency violated (seed {self.seed}; rerun with "
            f"IMAP_CONSISTENCY_SEED={self.seed}): {message}",
            "-- operation log (tail) --",
            *self.log,
            "-- models (seq:uid flags) --",
        ]
        for c in self.clients:
            lines.append(f"{c.name} {c.session} {'RO' if c.readonly else 'RW'}: {c.describe()}")
        raise Inconsistent("\n".join(lines))

    def check_content(self, uid: int, key: str, value: Any) -> None:
        known = self.content.setdefault(uid, {})
        if key in known and known[key] != value:
            self.fail(f"UID {uid}: {key} was {known[key]!r}, now {value!r}")
        known[key] = value


class Client:
    """A raw IMAP client with a model of the selected mailbox made from its responses."""

    def __init__(self, run: Run, name: str) -> None:
        self.run = run
        self.name = name
        self.sock = socket.create_connection(("127.0.0.1", run.port), timeout=15)
        self.buf = b""
        self.tags = 0
        self.slots: list[Slot] = []
        self.selected = False
        self.readonly = False
        self.generation = 0
        self.session = f"{name}.0"
        self.recent_count: int | None = None
        self.idle: Op | None = None
        self.pending: list[Op] = []
        self.worker: int | None = None
        self.appended: list[int] = []  # UIDs it appended, flags not checked yet
        greeting = self.read_response()
        assert greeting.startswith(b"* OK"), greeting

    # -- wire ---------------------------------------------------------------------------------

    def _fill(self) -> None:
        chunk = self.sock.recv(65536)
        if not chunk:
            self.run.fail(f"{self.name}: connection closed by the server")
        self.buf += chunk

    def read_response(self) -> bytes:
        """One response line with its literals."""
        out = b""
        while True:
            while b"\r\n" not in self.buf:
                self._fill()
            line, self.buf = self.buf.split(b"\r\n", 1)
            out += line + b"\r\n"
            m = re.search(rb"~?\{(\d+)\+?\}$", line)
            if not m:
                return out
            size = int(m.group(1))
            while len(self.buf) < size:
                self._fill()
            out += self.buf[:size]
            self.buf = self.buf[size:]

    def readable(self, timeout: float) -> bool:
        if self.buf:
            return True
        return bool(select.select([self.sock], [], [], timeout)[0])

    def op(self, kind: str, text: str, uid: bool = False, data: bytes | None = None) -> Op:
        self.tags += 1
        tag = f"{self.name}x{self.tags}"
        wire = data if data is not None else (tag + " " + text + "\r\n").encode()
        if data is not None:
            wire = (tag + " ").encode() + data
        return Op(self, tag, kind, uid, text, wire)

    def send(self, op: Op) -> None:
        op.sent_step = self.run.tick()
        self.run.note(f"{self.name}> {op.tag} {op.text}")
        self.sock.sendall(op.data)
        self.pending.append(op)
        if op.kind == "IDLE":
            while True:
                raw = self.read_response()
                if raw.startswith(b"+"):
                    break
                self.handle(op, raw)
            self.idle = op

    def collect(self) -> None:
        """Read the responses of every command in flight, in order."""
        while self.pending:
            op = self.pending[0]
            if op is self.idle:
                deadline = time.monotonic() + 0.3
                while time.monotonic() < deadline and self.readable(0.05):
                    self.handle(op, self.read_response())
                self.sock.sendall(b"DONE\r\n")
                self.idle = None
            if "begin" in op.meta:
                op.meta.pop("begin")(op)
            while True:
                raw = self.read_response()
                if raw.startswith(op.tag.encode() + b" "):
                    self.finish(op, raw)
                    break
                self.handle(op, raw)
            self.pending.pop(0)

    def run_op(self, op: Op) -> Op:
        self.send(op)
        self.collect()
        return op

    # -- model --------------------------------------------------------------------------------

    @property
    def count(self) -> int:
        return len(self.slots)

    def uids(self) -> list[int]:
        return [s.uid for s in self.slots if s.uid is not None]

    def slot_of(self, uid: int) -> Slot | None:
        for s in self.slots:
            if s.uid == uid:
                return s
        return None

    def describe(self) -> str:
        return " ".join(
            f"{i}:{s.uid}{'*' if s.recent else ''}({' '.join(sorted(s.flags or ()))})"
            for i, s in enumerate(self.slots, 1)
        )

    def agreed(self) -> list[tuple[int | None, frozenset[str] | None]]:
        return [(s.uid, s.flags) for s in self.slots]

    def reset(self, readonly: bool) -> None:
        self.slots = []
        self.selected = True
        self.readonly = readonly
        self.generation += 1
        self.session = f"{self.name}.{self.generation}"
        self.recent_count = None

    def handle(self, op: Op, raw: bytes) -> None:
        """Apply one untagged response to the model, checking it."""
        run = self.run
        run.note(f"{self.name}< {raw[:200]!r}")
        op.untagged.append(raw)
        if not raw.startswith(b"* "):
            run.fail(f"{self.name}: unexpected response {raw!r} to {op.text}")
        try:
            items, _ = tokens(raw, 2)
        except (ValueError, IndexError) as e:
            run.fail(f"{self.name}: unparsable response {raw!r}: {e}")
        if not items:
            run.fail(f"{self.name}: empty response {raw!r}")
        head = str(items[0]).upper()
        if head in ("OK", "NO", "BAD", "BYE", "PREAUTH"):
            self.status_response(op, head, raw)
        elif head == "FLAGS":
            pass
        elif head == "SEARCH":
            self.search_response(op, [int(x) for x in items[1:]])
        elif head.isdigit() and len(items) >= 2:
            n = int(head)
            what = str(items[1]).upper()
            if what == "EXISTS":
                self.exists(op, n)
            elif what == "RECENT":
                self.recent_count = n
            elif what == "EXPUNGE":
                self.expunge(op, n)
            elif what == "FETCH" and len(items) == 3 and isinstance(items[2], list):
                self.fetch(op, n, items[2])
            else:
                run.fail(f"{self.name}: unexpected response {raw!r}")
        else:
            run.fail(f"{self.name}: unexpected response {raw!r} to {op.text}")

    def status_response(self, op: Op, status: str, raw: bytes) -> None:
        text = raw.decode("utf-8", "replace")
        if status != "OK":
            self.run.fail(f"{self.name}: untagged {status} {raw!r}")
        m = re.search(r"\[UIDVALIDITY (\d+)\]", text)
        if m:
            value = int(m.group(1))
            if self.run.uidvalidity is None:
                self.run.uidvalidity = value
            elif value != self.run.uidvalidity:
                self.run.fail(f"UIDVALIDITY changed from {self.run.uidvalidity} to {value}")
        m = re.search(r"\[COPYUID (\d+) ([\d:,]+) ([\d:,]+)\]", text)
        if m:
            if op.kind != "MOVE":
                self.run.fail(f"untagged COPYUID outside MOVE: {raw!r}")
            op.copyuid = list(zip(parse_uidset(m.group(2)), parse_uidset(m.group(3)), strict=True))

    def exists(self, op: Op, n: int) -> None:
        if n < self.count:
            self.run.fail(f"{self.name}: EXISTS went down from {self.count} to {n}")
        for _ in range(n - self.count):
            self.slots.append(Slot(None, op.sent_step))

    def expunge(self, op: Op, n: int) -> None:
        if op.kind in NO_EXPUNGE and not op.uid:
            self.run.fail(f"{self.name}: EXPUNGE during {op.kind} (RFC 3501 7.4.1)")
        if op.kind == "CLOSE":
            self.run.fail(f"{self.name}: EXPUNGE sent for CLOSE")
        if not 1 <= n <= self.count:
            self.run.fail(f"{self.name}: * {n} EXPUNGE beyond the {self.count} messages")
        slot = self.slots.pop(n - 1)
        self.run.note(f"{self.name}: UID {slot.uid} expunged")
        if slot.uid is not None:
            self.run.expunged.setdefault(slot.uid, self.run.step)
        if slot.recent is None:
            self.recent_count = None
        elif slot.recent and self.recent_count is not None:
            self.recent_count -= 1

    def search_response(self, op: Op, numbers: list[int]) -> None:
        if op.kind != "SEARCH":
            self.run.fail(f"{self.name}: SEARCH response to {op.text}")
        known = set(self.uids())
        for x in numbers:
            # (a UID the client was told of by EXISTS but has not fetched yet is fine)
            fresh = any(s.uid is None for s in self.slots) and x > max(known, default=0)
            gone = self.run.expunged.get(x, op.sent_step) < op.sent_step
            if op.uid and x not in known and (not fresh or gone):
                self.run.fail(f"{self.name}: UID SEARCH returned unknown UID {x}")
            if not op.uid and not 1 <= x <= self.count:
                self.run.fail(f"{self.name}: SEARCH returned {x} beyond {self.count}")
        op.searched = numbers

    def fetch(self, op: Op, n: int, items: list[Any]) -> None:
        run = self.run
        if not 1 <= n <= self.count:
            run.fail(f"{self.name}: * {n} FETCH beyond the {self.count} messages")
        if len(items) % 2:
            run.fail(f"{self.name}: odd FETCH item list {items!r}")
        data = {str(items[i]).upper(): items[i + 1] for i in range(0, len(items), 2)}
        slot = self.slots[n - 1]
        uid = int(data["UID"]) if "UID" in data else None
        if op.uid and uid is None:
            run.fail(f"{self.name}: {op.text}: FETCH response without UID")
        if uid is not None:
            if slot.uid is None:
                before = [s.uid for s in self.slots[: n - 1] if s.uid is not None]
                after = [s.uid for s in self.slots[n:] if s.uid is not None]
                if (before and before[-1] >= uid) or (after and after[0] <= uid):
                    run.fail(f"{self.name}: UID {uid} at {n} is out of order")
                # (a session may still show a message expunged after it last looked)
                if run.expunged.get(uid, slot.intro_step) < slot.intro_step:
                    run.fail(f"{self.name}: expunged UID {uid} reappeared at {n}")
                slot.uid = uid
            elif slot.uid != uid:
                run.fail(f"{self.name}: * {n} FETCH says UID {uid}, model has {slot.uid}")
        uid = slot.uid
        if "FLAGS" in data:
            flags = frozenset(str(f) for f in data["FLAGS"])
            recent = RECENT in flags
            flags -= {RECENT}
            slot.flags = flags
            if uid is not None:
                self.recent_seen(slot, uid, recent)
                if uid not in op.fetched:
                    op.fetched[uid] = flags
        if uid is not None:
            op.fetch_uids.append(uid)
            if "RFC822.SIZE" in data:
                run.check_content(uid, "size", int(data["RFC822.SIZE"]))
            for key, value in data.items():
                if key.startswith("BODY[HEADER.FIELDS"):
                    run.check_content(uid, "subject", bytes(value or b""))

    def recent_seen(self, slot: Slot, uid: int, recent: bool) -> None:
        run = self.run
        if slot.recent is not None and slot.recent != recent:
            run.fail(f"{self.name}: \\Recent of UID {uid} changed within session {self.session}")
        slot.recent = recent
        if not recent:
            return
        if self.readonly:
            claimed = run.claimed_step.get(uid)
            if claimed is not None and claimed < slot.intro_step:
                run.fail(
                    f"{self.name}: EXAMINE session {self.session} sees UID {uid} as \\Recent "
                    f"after {run.recent_owner[uid]} was told it was \\Recent"
                )
            return
        owner = run.recent_owner.setdefault(uid, self.session)
        run.claimed_step.setdefault(uid, run.step)
        if owner != self.session:
            run.fail(f"UID {uid} is \\Recent in {owner} and in {self.session}")

    def finish(self, op: Op, raw: bytes) -> None:
        run = self.run
        run.note(f"{self.name}< {raw[:200]!r}")
        m = re.match(rb"\S+ (OK|NO|BAD)(?: \[([^\]]*)\])?", raw)
        if m is None:
            run.fail(f"{self.name}: bad tagged response {raw!r}")
        op.status = m.group(1).decode()
        op.code = (m.group(2) or b"").decode()
        if op.status == "BAD":
            run.fail(f"{self.name}: {op.text} -> {raw!r}")
        if op.expect is not None:
            op.expect(op, op.status, op.code)
        elif op.status != "OK":
            run.fail(f"{self.name}: {op.text} -> {raw!r}")
        if op.after is not None:
            op.after(op)

    def resolve(self) -> None:
        """Fetch UID and FLAGS of the messages announced by EXISTS but not yet known."""
        while any(s.uid is None or s.flags is None for s in self.slots):
            first = next(i for i, s in enumerate(self.slots, 1) if s.uid is None or s.flags is None)
            self.run_op(self.op("FETCH", f"FETCH {first}:{self.count} (UID FLAGS)"))
        if self.recent_count is not None and self.selected:
            mine = sum(1 for s in self.slots if s.recent)
            if mine != self.recent_count:
                self.run.fail(
                    f"{self.name}: RECENT said {self.recent_count}, {mine} messages are \\Recent"
                )


# -- operations -------------------------------------------------------------------------------


def expect_ok_or_expunged(op: Op, status: str, code: str) -> None:
    if status == "NO" and code != "EXPUNGEISSUED":
        op.client.run.fail(f"{op.client.name}: {op.text} -> NO [{code}]")


def require_gone(run: Run, why: str, uids: set[int]) -> None:
    if uids:
        run.must_go.append((why, set(uids)))


class Generator:
    """Random commands for a client, chosen from its model."""

    def __init__(self, run: Run) -> None:
        self.run = run
        self.rng = run.rng

    def pick_positions(self, c: Client, most: int = 4) -> list[int]:
        rng = self.rng
        if rng.random() < 0.3:
            a = rng.randint(1, c.count)
            b = min(c.count, a + rng.randint(0, 5))
            return list(range(a, b + 1))
        return sorted(rng.sample(range(1, c.count + 1), min(c.count, rng.randint(1, most))))

    def flags(self) -> list[str]:
        return self.rng.sample(FLAG_POOL, self.rng.randint(0, 3))

    def choose(self, c: Client, safe: bool = False) -> list[Op]:
        """One operation (a list: CLOSE + SELECT are a pipelined pair); ``safe`` picks
        one that may follow another command in a pipeline (no sequence numbers)."""
        rng = self.rng
        if not c.selected:
            return [self.select(c, False)]
        if safe:
            kinds = {"append": 3, "noop": 2, "check": 1, "uid_fetch": 3, "uid_search": 2}
            if not c.readonly:
                kinds["uid_store"] = 3
        elif c.readonly:
            kinds = {"fetch": 4, "uid_fetch": 3, "search": 2, "uid_search": 2, "noop": 2}
            kinds.update(idle=1, select=3, ro_write=1, append=1)
        else:
            kinds = {
                "append": 4, "store": 5, "uid_store": 4, "fetch": 4, "uid_fetch": 3,
                "search": 2, "uid_search": 2, "expunge": 1.5, "uid_expunge": 1, "copy": 1,
                "move": 1.2, "noop": 2, "check": 1, "idle": 1, "reselect": 0.6, "examine": 0.6,
            }  # fmt: skip
        if c.count == 0:
            for k in ("store", "uid_store", "fetch", "uid_fetch", "copy", "move", "ro_write"):
                kinds.pop(k, None)
        if c.count > 60:
            kinds["append"] = 0.5
        names = list(kinds)
        kind = rng.choices(names, [kinds[k] for k in names])[0]
        run = self.run
        run.stats[kind] += 1
        if kind == "reselect":
            close = c.op("CLOSE", "CLOSE")
            close.after = lambda op: setattr(op.client, "selected", False)
            return [close, self.select(c, False)]
        if kind in ("examine", "select"):
            return [self.select(c, kind == "examine")]
        return [getattr(self, kind)(c)]

    def select(self, c: Client, readonly: bool) -> Op:
        op = c.op("SELECT", "EXAMINE INBOX" if readonly else "SELECT INBOX")
        op.meta["begin"] = lambda op: op.client.reset(readonly)

        def check(op: Op, status: str, code: str) -> None:
            if status != "OK" or code != ("READ-ONLY" if readonly else "READ-WRITE"):
                op.client.run.fail(f"{op.client.name}: {op.text} -> {status} [{code}]")

        op.expect = check
        return op

    def noop(self, c: Client) -> Op:
        return c.op("NOOP", "NOOP")

    def check(self, c: Client) -> Op:
        return c.op("CHECK", "CHECK")

    def idle(self, c: Client) -> Op:
        return c.op("IDLE", "IDLE")

    def append(self, c: Client) -> Op:
        run, rng = self.run, self.rng
        run.subjects += 1
        subject = f"m{run.subjects} seed {run.seed} {rng.randrange(10**6)}"
        body = "".join(rng.choice("abcdefghij \r\n") for _ in range(rng.randint(20, 3000)))
        body = body.replace("\r", "").replace("\n", "\r\n")
        message = (
            f"From: s@example.test\r\nTo: {USER}\r\nSubject: {subject}\r\n\r\n{body}\r\n"
        ).encode()
        flags = self.flags() if rng.random() < 0.6 else []
        flags = [f for f in flags if f != "\\Deleted" or rng.random() < 0.3]
        flag_text = f"({' '.join(flags)}) " if flags or rng.random() < 0.2 else ""
        text = f"APPEND INBOX {flag_text}{{{len(message)}+}}"
        op = c.op("APPEND", text, data=f"{text}\r\n".encode() + message + b"\r\n")
        op.meta.update(flags=frozenset(flags), size=len(message), subject=subject)

        def after(op: Op) -> None:
            m = re.fullmatch(r"APPENDUID (\d+) (\d+)", op.code)
            if m is None:
                run.fail(f"{op.client.name}: APPEND without APPENDUID: {op.code!r}")
            uid = int(m.group(2))
            if run.uidvalidity is not None and int(m.group(1)) != run.uidvalidity:
                run.fail(f"APPENDUID names UIDVALIDITY {m.group(1)}")
            # Other sessions may see the new message (and even its expunge) before this
            # session's tagged OK is read: that is fine as long as it is this message (the
            # content checks below). A UID given twice, or known expunged before the APPEND
            # was sent, is reuse.
            if uid in run.appended or run.expunged.get(uid, op.sent_step) < op.sent_step:
                run.fail(f"APPENDUID {uid} was used before")
            run.check_content(uid, "size", op.meta["size"])
            run.check_content(uid, "subject", f"Subject: {subject}\r\n\r\n".encode())
            run.appended[uid] = op.meta["flags"]
            # Selected INBOX: the new message is announced before the tagged OK (unless
            # someone expunged it at once: then it must be gone at the next check).
            c = op.client
            if c.selected and c.slot_of(uid) is None and all(s.uid for s in c.slots):
                require_gone(run, f"APPEND {uid} not announced to its session", {uid})
            op.client.appended.append(uid)

        op.after = after
        return op

    def store(self, c: Client, uid_form: bool = False, silent: bool | None = None) -> Op:
        rng = self.rng
        positions = self.pick_positions(c)
        uids = [c.slots[p - 1].uid for p in positions]
        mode = rng.choice(["+", "-", ""])
        flags = self.flags()
        if mode == "" and rng.random() < 0.5:
            flags = [f for f in flags if f != "\\Deleted"]
        silent = rng.random() < 0.3 if silent is None else silent
        target = seqset([u for u in uids if u is not None]) if uid_form else seqset(positions)
        item = f"{mode}FLAGS{'.SILENT' if silent else ''}"
        flag_text = f"({' '.join(flags)})" if flags or rng.random() < 0.5 else " ".join(flags)
        if not flag_text:
            flag_text = "()"
        prefix = "UID " if uid_form else ""
        op = c.op("STORE", f"{prefix}STORE {target} {item} {flag_text}", uid=uid_form)
        op.meta.update(uids=[u for u in uids if u is not None], mode=mode, flags=set(flags))
        op.meta["silent"] = silent

        def after(op: Op) -> None:
            run = op.client.run
            wanted = op.meta["flags"]
            for uid in op.meta["uids"]:
                echo = op.fetched.get(uid)
                slot = op.client.slot_of(uid)
                if echo is None and op.meta["silent"] and slot is not None and op.status == "OK":
                    # Not echoed: the client takes its own change as done (a change by
                    # someone else meanwhile must come as a FETCH, now or later).
                    slot.flags = apply_store(slot.flags or frozenset(), mode, wanted)
                if echo is None:
                    if not op.meta["silent"]:
                        require_gone(run, f"{op.text}: no FETCH for UID {uid}", {uid})
                    continue
                if op.meta["silent"]:
                    continue
                if (
                    (mode == "+" and not wanted <= echo)
                    or (mode == "-" and wanted & echo)
                    or (mode == "" and wanted != echo)
                ):
                    run.fail(f"{op.client.name}: {op.text}: UID {uid} echoed {sorted(echo)}")

        op.after = after
        return op

    def uid_store(self, c: Client) -> Op:
        return self.store(c, uid_form=True)

    def fetch(self, c: Client, uid_form: bool = False) -> Op:
        rng = self.rng
        items = [i for i in ("FLAGS", "UID", "RFC822.SIZE") if rng.random() < 0.6]
        if rng.random() < 0.5:
            items.append("BODY.PEEK[HEADER.FIELDS (Subject)]")
        if not items:
            items = ["FLAGS"]
        wanted: list[int] = []
        if not uid_form:
            if rng.random() < 0.15:
                target, positions = "1:*", list(range(1, c.count + 1))
            else:
                positions = self.pick_positions(c, 6)
                target = seqset(positions)
            wanted = [u for u in (c.slots[p - 1].uid for p in positions) if u is not None]
        else:
            wanted = [c.slots[p - 1].uid or 0 for p in self.pick_positions(c, 6)]
            extra = []
            if self.run.expunged and rng.random() < 0.3:
                extra.append(rng.choice(sorted(self.run.expunged)))
            if rng.random() < 0.1:
                target = f"{min(wanted)}:*"
                wanted = [u for u in c.uids() if u >= min(wanted)]
            else:
                target = seqset(wanted + extra)
        prefix = "UID " if uid_form else ""
        op = c.op("FETCH", f"{prefix}FETCH {target} ({' '.join(items)})", uid=uid_form)
        op.expect = expect_ok_or_expunged

        def after(op: Op) -> None:
            missing = set(wanted) - set(op.fetch_uids)
            if op.status == "OK" and not uid_form and missing:
                op.client.run.fail(f"{op.client.name}: {op.text}: no data for UIDs {missing}")
            require_gone(op.client.run, f"{op.text}: no data", missing)

        op.after = after
        return op

    def uid_fetch(self, c: Client) -> Op:
        if c.count == 0:
            return self.noop(c)
        return self.fetch(c, uid_form=True)

    def search(self, c: Client, uid_form: bool = False) -> Op:
        key = self.rng.choice(
            ["ALL", "FLAGGED", "UNSEEN", "DELETED", "KEYWORD $Work", "NOT KEYWORD $Todo"]
        )
        prefix = "UID " if uid_form else ""
        return c.op("SEARCH", f"{prefix}SEARCH {key}", uid=uid_form)

    def uid_search(self, c: Client) -> Op:
        return self.search(c, uid_form=True)

    def expunge(self, c: Client) -> Op:
        return c.op("EXPUNGE", "EXPUNGE")

    def uid_expunge(self, c: Client) -> Op:
        uids = c.uids()
        if not uids:
            return self.expunge(c)
        chosen = self.rng.sample(uids, min(len(uids), self.rng.randint(1, 6)))
        return c.op("EXPUNGE", f"UID EXPUNGE {seqset(chosen)}", uid=True)

    def copy(self, c: Client, move: bool = False) -> Op:
        rng = self.rng
        uid_form = rng.random() < 0.5
        positions = self.pick_positions(c)
        uids = [u for u in (c.slots[p - 1].uid for p in positions) if u is not None]
        dest = "INBOX" if rng.random() < 0.15 else "Archive"
        target = seqset(uids) if uid_form else seqset(positions)
        name = "MOVE" if move else "COPY"
        prefix = "UID " if uid_form else ""
        op = c.op(name, f"{prefix}{name} {target} {dest}", uid=uid_form)

        def code(op: Op, status: str, text: str) -> None:
            expect_ok_or_expunged(op, status, text)
            m = re.match(r"COPYUID (\d+) ([\d:,]+) ([\d:,]+)", text)
            if m:
                op.copyuid = list(
                    zip(parse_uidset(m.group(2)), parse_uidset(m.group(3)), strict=True)
                )

        def after(op: Op) -> None:
            run = op.client.run
            pairs = op.copyuid or []
            if status_ok(op) and set(uids) - {s for s, _ in pairs}:
                require_gone(run, f"{op.text}: not copied", set(uids) - {s for s, _ in pairs})
            for src, new in pairs:
                if src not in uids:
                    run.fail(f"{op.text}: COPYUID names UID {src} that was not asked for")
                if dest == "Archive":
                    if new in run.archive_uids:
                        run.fail(f"{op.text}: Archive UID {new} given twice")
                    run.archive_uids.add(new)
                else:
                    if new in run.content and "from" not in run.content[new]:
                        run.fail(f"{op.text}: INBOX UID {new} given twice")
                    for key in ("size", "subject"):
                        if key in run.content.get(src, {}):
                            run.check_content(new, key, run.content[src][key])
                    run.content.setdefault(new, {})["from"] = src
                if move and op.client.slot_of(src) is not None:
                    run.fail(f"{op.text}: moved UID {src} not expunged before the tagged OK")

        op.expect = code
        op.after = after
        return op

    def move(self, c: Client) -> Op:
        return self.copy(c, move=True)

    def ro_write(self, c: Client) -> Op:
        choice = self.rng.choice(["store", "expunge", "move"])
        if choice == "store":
            op = c.op("STORE", "STORE 1 +FLAGS (\\Seen)")
        elif choice == "expunge":
            op = c.op("EXPUNGE", "EXPUNGE")
        else:
            op = c.op("MOVE", "MOVE 1 Archive")

        def expect(op: Op, status: str, code: str) -> None:
            if status != "NO" or code != "READ-ONLY":
                op.client.run.fail(f"{op.client.name}: read-only {op.text} -> {status} [{code}]")

        op.expect = expect
        return op


def apply_store(flags: frozenset[str], mode: str, change: set[str]) -> frozenset[str]:
    if mode == "+":
        return flags | change
    if mode == "-":
        return flags - change
    return frozenset(change)


def status_ok(op: Op) -> bool:
    return op.status == "OK"


# -- the run ----------------------------------------------------------------------------------


class Stress:
    """Clients, rounds and the checks between them."""

    def __init__(self, server: MailgwServer, seed: int, workers: int) -> None:
        self.server = server
        self.run = Run(seed, server.ports["imap"])
        self.gen = Generator(self.run)
        self.workers = workers

    def connect(self, name: str) -> Client:
        """A logged-in client; with workers, ``worker`` says which process serves it (from
        the main log: one login at a time, so the k-th login line is the k-th login)."""
        before = len(LOGIN_LINE.findall(self.server.log())) if self.workers else 0
        c = Client(self.run, name)
        c.run_op(c.op("LOGIN", f'LOGIN {USER} "{PASSWORD}"'))
        if self.workers:
            index, _pid, who = match_after(self.server, LOGIN_LINE, before)
            assert who == USER
            c.worker = int(index)
        return c

    def setup(self) -> None:
        run = self.run
        # Some messages before anyone selects: the first SELECT claims them as \Recent.
        loader = self.connect("c0")
        for _ in range(12):
            loader.run_op(self.gen.append(loader))
        run.clients = [loader] + [self.connect(f"c{i}") for i in range(1, CLIENTS)]
        for _ in range(20):
            if len({c.worker for c in run.clients}) > 1 or not self.workers:
                break
            run.clients.pop().sock.close()
            run.clients.append(self.connect(f"c{CLIENTS - 1}"))
        assert not self.workers or len({c.worker for c in run.clients}) > 1, "one process"
        loader.appended = []
        for c in run.clients:
            c.run_op(self.gen.select(c, False))
            c.resolve()

    def turn_ops(self, c: Client) -> list[Op]:
        ops = self.gen.choose(c)
        if len(ops) == 1 and ops[0].kind not in ("IDLE", "SELECT") and self.run.rng.random() < 0.15:
            ops.append(self.gen.choose(c, safe=True)[0])
        return ops

    def round(self) -> None:
        run = self.run
        clients = list(run.clients)
        run.rng.shuffle(clients)
        if run.rng.random() < 0.25:
            for c in clients:
                for op in self.turn_ops(c):
                    c.send(op)
                c.collect()
                self.settle(c)
            return
        for c in clients:
            for op in self.turn_ops(c):
                c.send(op)
        for c in clients:
            c.collect()
            self.settle(c)

    def settle(self, c: Client) -> None:
        """Resolve new messages, then check the flags of the ones this client appended."""
        c.resolve()
        for uid in c.appended:
            slot = c.slot_of(uid)
            if slot is not None and slot.flags != self.run.appended[uid]:
                self.run.fail(
                    f"{c.name}: appended UID {uid} with {sorted(self.run.appended[uid])}, "
                    f"first reported with {sorted(slot.flags or ())}"
                )
        c.appended = []

    def quiesce(self) -> None:
        """NOOP by every client in turn, then all models must agree with a fresh look."""
        run = self.run
        run.note("-- check --")
        for c in run.clients:
            c.run_op(c.op("NOOP", "NOOP"))
            c.resolve()
        self.compare("after NOOP by every client")
        for why, uids in run.must_go:
            alive = uids & set(run.clients[0].uids())
            if alive:
                run.fail(f"{why}: UIDs {sorted(alive)} still exist")
        run.must_go = []
        self.fresh_look(run.clients[0])
        writers = [c for c in run.clients if not c.readonly]
        if writers:
            self.silent_probe(run.rng.choice(writers))
            if run.rng.random() < 0.5:
                self.expunge_probe(run.rng.choice(writers))

    def compare(self, when: str) -> None:
        run = self.run
        first = run.clients[0]
        for c in run.clients[1:]:
            if c.agreed() != first.agreed():
                run.fail(f"{when}: {c.name} and {first.name} disagree")

    def fresh_look(self, c: Client) -> None:
        run = self.run
        op = c.run_op(c.op("SEARCH", "UID SEARCH ALL", uid=True))
        if sorted(op.searched or []) != c.uids():
            run.fail(f"UID SEARCH ALL gave {op.searched}, model {c.uids()}")
        before = c.agreed()
        if c.count:
            c.run_op(c.op("FETCH", "FETCH 1:* (UID FLAGS RFC822.SIZE)"))
            if c.agreed() != before:
                run.fail("FETCH 1:* (UID FLAGS) disagrees with the model after NOOP")
        for key, flag in (
            ("FLAGGED", "\\Flagged"),
            ("DELETED", "\\Deleted"),
            ("KEYWORD $Work", "$Work"),
        ):
            op = c.run_op(c.op("SEARCH", f"UID SEARCH {key}", uid=True))
            expected = [s.uid for s in c.slots if flag in (s.flags or ())]
            if sorted(op.searched or []) != expected:
                run.fail(f"UID SEARCH {key} gave {op.searched}, model {expected}")

    def silent_probe(self, writer: Client) -> None:
        """STORE .SILENT: no echo to its own session; every other session learns it next."""
        run = self.run
        if not writer.count:
            return
        before = {s.uid: s.flags for s in writer.slots}
        op = self.gen.store(writer, uid_form=run.rng.random() < 0.5, silent=True)
        writer.run_op(op)
        if any(b"FETCH" in line for line in op.untagged):
            run.fail(f"{writer.name}: {op.text} echoed FETCH to its own session")
        changed = {}
        for uid in op.meta["uids"]:
            old = before[uid] or frozenset()
            new = apply_store(old, op.meta["mode"], op.meta["flags"])
            if new != old:
                changed[uid] = new
        for c in run.clients:
            if c is writer:
                continue
            noop = c.run_op(c.op("NOOP", "NOOP"))
            for uid, flags in changed.items():
                if noop.fetched.get(uid) != flags:
                    run.fail(
                        f"{c.name}: after {writer.name}'s {op.text}, NOOP reported UID {uid} "
                        f"as {noop.fetched.get(uid)}, expected {sorted(flags)}"
                    )
        self.compare(f"after {op.text}")

    def expunge_probe(self, writer: Client) -> None:
        """EXPUNGE in a quiet moment removes exactly the agreed \\Deleted messages."""
        run = self.run
        doomed = [s.uid for s in writer.slots if "\\Deleted" in (s.flags or ())]
        writer.run_op(writer.op("EXPUNGE", "EXPUNGE"))
        left = [s.uid for s in writer.slots if s.uid in doomed]
        if left:
            run.fail(f"{writer.name}: EXPUNGE left \\Deleted UIDs {left}")
        for c in run.clients:
            c.run_op(c.op("NOOP", "NOOP"))
            c.resolve()
        self.compare("after EXPUNGE in a quiet moment")
        if any(u not in run.expunged for u in doomed):
            run.fail(f"EXPUNGE did not report all of {doomed}")

    def final_check(self) -> None:
        """A new connection EXAMINEs INBOX and sees what the others agree on."""
        run = self.run
        c = self.connect("cz")
        c.run_op(self.gen.select(c, True))
        c.resolve()
        if c.count:
            c.run_op(c.op("FETCH", "FETCH 1:* (UID FLAGS RFC822.SIZE)"))
        if c.agreed() != run.clients[0].agreed():
            run.clients.append(c)
            run.fail("a new EXAMINE session disagrees with the others")
        c.sock.close()

    def go(self, rounds: int) -> None:
        self.setup()
        for r in range(rounds):
            self.round()
            if (r + 1) % CHECK_EVERY == 0:
                self.quiesce()
        self.quiesce()
        self.final_check()
        for c in self.run.clients:
            c.sock.close()


@pytest.mark.parametrize(("workers", "rounds"), [(2, 150), (0, 80)])
def test_sessions_never_contradict_each_other(
    server_factory: Callable[..., MailgwServer], workers: int, rounds: int
) -> None:
    server = server_factory({"imap": {"workers": str(workers)}})
    if workers:
        wait_ready(server, workers)
    stress = Stress(server, SEED, workers)
    stress.go(ROUNDS or rounds)
    run = stress.run
    # The mix really exercised the interesting paths.
    assert run.expunged, run.stats
    assert run.recent_owner, run.stats
    assert len(run.clients[0].uids()) > 0 or run.subjects > 20
