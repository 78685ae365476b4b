"""IMAP command reader and grammar: bytes in, typed commands out (RFC 3501 9, RFC 9051 9).

No I/O: the session hands received bytes to :class:`CommandReader` and pulls events
(:class:`Command`, :class:`NeedContinuation`, :class:`BadCommand`, :class:`Line`) out of it;
:func:`parse_command` then turns a generic :class:`Command` into one typed object per command.
"""

from __future__ import annotations

import datetime
import re
from collections.abc import Callable
from dataclasses import dataclass, field

from mailgw.imap import names
from mailgw.imap.literal import SpooledLiteral
from mailgw.imap.sequence import SequenceError, SequenceSet, parse_sequence_set

# ---------------------------------------------------------------------------------------------
# Generic argument tree


@dataclass(frozen=True, slots=True)
class Atom:
    """An atom (also flags such as ``\\Seen``, sequence sets, ``*`` and ``%`` patterns)."""

    text: str


@dataclass(frozen=True, slots=True)
class Number:
    """An atom made only of digits; ``text`` keeps the spelling (``007``)."""

    value: int
    text: str


@dataclass(frozen=True, slots=True)
class Nil:
    """The atom ``NIL`` (any case)."""

    text: str = "NIL"


@dataclass(frozen=True, slots=True)
class String:
    """A quoted string or a literal; ``binary`` for a literal8 ``~{n}`` (RFC 3516)."""

    value: bytes
    literal: bool = False
    binary: bool = False


@dataclass(frozen=True, slots=True)
class LiteralFile:
    """An APPEND message literal spooled to a temporary file (see ``CommandReader``)."""

    file: SpooledLiteral
    binary: bool = False


def discard_literals(items: list[Node] | tuple[Node, ...]) -> None:
    """Delete the spooled literals among ``items`` (nested lists included): a command that
    will not run (refused, or its arguments invalid)."""
    stack = list(items)
    while stack:
        node = stack.pop()
        if isinstance(node, LiteralFile):
            node.file.close()
        elif isinstance(node, PList):
            stack.extend(node.items)


@dataclass(frozen=True, slots=True)
class PList:
    """A parenthesised list."""

    items: tuple[Node, ...]


@dataclass(frozen=True, slots=True)
class Section:
    """A FETCH item with a ``[...]`` section: ``BODY.PEEK[1.HEADER.FIELDS (To)]<0.100>``.

    ``name`` is the upper-cased part before ``[``, ``items`` the tokens inside the brackets,
    ``partial`` the ``<origin.length>`` suffix, ``raw`` the text as sent when it was on one line.
    """

    name: str
    items: tuple[Node, ...]
    partial: tuple[int, int | None] | None = None
    raw: str | None = None


Node = Atom | Number | Nil | String | LiteralFile | PList | Section


# ---------------------------------------------------------------------------------------------
# Reader events


@dataclass(frozen=True, slots=True)
class Command:
    """A complete command line: ``tag``, upper-cased ``name`` (``FETCH`` for ``UID FETCH``,
    with ``uid`` true) and the argument tree."""

    tag: str
    name: str
    args: tuple[Node, ...]
    uid: bool = False


@dataclass(frozen=True, slots=True)
class NeedContinuation:
    """A synchronising literal ``{size}`` ended a line: send ``+ ...`` (or refuse it with
    :meth:`CommandReader.cancel_literal` and a tagged NO/BAD)."""

    tag: str
    name: str
    size: int


@dataclass(frozen=True, slots=True)
class BadCommand:
    """Input that is not a valid command: answer ``tag BAD [code] text`` (``* BAD`` when the
    tag is None). ``code`` is ``TOOBIG`` for a refused literal, else None."""

    tag: str | None
    text: str
    code: str | None = None


@dataclass(frozen=True, slots=True)
class Line:
    """A raw line requested with :meth:`CommandReader.expect_line` (IDLE's ``DONE``, SASL
    responses), without its line ending."""

    data: bytes


Event = Command | NeedContinuation | BadCommand | Line

LITERAL_MINUS_MAX = 4096  # RFC 7888 5
MAX_NUMBER64 = 2**63 - 1

SECTION_NAMES = frozenset({"BODY", "BODY.PEEK", "BINARY", "BINARY.PEEK", "BINARY.SIZE"})

# tag = 1*<any ASTRING-CHAR except "+">; the command name is an atom of letters/digits.
_HEAD = re.compile(
    rb"([\x21\x23\x24\x26\x27\x2c-\x5b\x5d-\x7a\x7c-\x7e]+)(?: ([A-Za-z][A-Za-z0-9._-]*))?"
)
_UID_SUB = re.compile(rb" ([A-Za-z]+)")
# Words stop at specials; ``_WORD_LOOSE`` also takes ``[`` and ``]`` (astrings like ``[Gmail]``).
_WORD = re.compile(rb'[^\x00-\x20\x7f-\xff()"{\[\]]+')
_WORD_LOOSE = re.compile(rb'[^\x00-\x20\x7f-\xff()"{]+')
_QUOTED = re.compile(rb'"((?:[^"\\\r\n\x00]|\\["\\])*)"')
_LITERAL_HEAD = re.compile(rb"(~?)\{([^}]{0,40})\}$")
_NONSYNC_TAIL = re.compile(rb"~?\{([0-9]{1,20})\+\}$")
# <origin.count>; also <origin> alone (to the end), which Dovecot accepts beyond RFC 3501.
_PARTIAL = re.compile(rb"<([0-9]{1,10})(?:\.([0-9]{1,10}))?>")
_UNESCAPE = re.compile(rb"\\(.)")

_LINE, _LITERAL, _DISCARD, _SKIP = range(4)


class _Bad(Exception):
    def __init__(self, text: str, code: str | None = None) -> None:
        super().__init__(text)
        self.text = text
        self.code = code


@dataclass(slots=True)
class _Frame:
    kind: str  # "root", "list" or "section"
    items: list[Node] = field(default_factory=list)
    name: str = ""
    start: int = -1  # offset in the line where a section began, -1 if on an earlier line


@dataclass(slots=True)
class _Builder:
    tag: str
    name: str
    uid: bool
    stack: list[_Frame]
    count: int = 0
    literal_binary: bool = False
    literal_total: int = 0  # bytes of the literals announced so far


class CommandReader:
    """Incremental reader of IMAP command lines and literals.

    ``receive(data)`` buffers bytes; ``next_event()`` returns the next event or None when more
    input is needed; ``feed(data)`` does both and returns every event. The session uses the
    pull form when it must switch modes between commands (:meth:`expect_line` after IDLE or
    AUTHENTICATE, :meth:`discard_buffered` after STARTTLS).

    Limits: a line longer than ``max_line`` is refused and skipped without being buffered; a
    literal larger than ``max_literal`` (or, with ``literal_minus``, a non-synchronising one
    over 4096 bytes) is refused with code ``TOOBIG`` before any of it is read, and a
    non-synchronising one is then discarded as it arrives; lists deeper than ``max_depth`` and
    commands with more than ``max_args`` tokens are refused. After a BAD the reader resumes at
    the next command line. The limits are attributes a session may change (e.g. after login).

    Spooling: with ``spool`` set (a function of the size returning a ``SpooledLiteral``), an
    APPEND literal larger than ``spool_above`` is written to it as it arrives and becomes a
    :class:`LiteralFile` node instead of bytes held in memory. ``close()`` drops a literal
    being read (the connection is gone). ``max_command_literals`` (None: no bound) bounds
    the literal bytes of one command: a literal beyond it is refused like a too large one.
    """

    def __init__(
        self,
        max_line: int = 8192,
        max_literal: int = 64 * 1024 * 1024,
        max_depth: int = 20,
        max_args: int = 4096,
        literal_minus: bool = False,
    ) -> None:
        self.max_line = max_line
        self.max_literal = max_literal
        self.max_depth = max_depth
        self.max_args = max_args
        self.literal_minus = literal_minus
        self._buf = bytearray()
        self._scan = 0
        self._mode = _LINE
        self._remaining = 0  # literal bytes still to read or discard
        self._literal = bytearray()
        self._builder: _Builder | None = None
        self._discarding = False  # skipping the continuation lines of a refused command
        self._skip_tail = b""  # last bytes of an overlong line being skipped
        self._want_line = False
        self._after_literal = False  # the line being read continues after a literal
        self.spool: Callable[[int], SpooledLiteral] | None = None
        self.spool_above = 256 * 1024
        self.max_command_literals: int | None = None  # literal bytes in one command
        self._sink: SpooledLiteral | None = None  # the literal being spooled

    # -- input -----------------------------------------------------------------------------

    def receive(self, data: bytes) -> None:
        """Buffer received bytes (literal bytes being discarded are dropped at once)."""
        if self._mode == _DISCARD and not self._buf:
            take = min(len(data), self._remaining)
            self._remaining -= take
            data = data[take:]
            if self._remaining == 0:
                self._mode = _LINE
        self._buf += data

    def feed(self, data: bytes) -> list[Event]:
        """Buffer ``data`` and return every event it completes."""
        self.receive(data)
        events: list[Event] = []
        while (event := self.next_event()) is not None:
            events.append(event)
        return events

    def expect_line(self) -> None:
        """Return the next input line as a :class:`Line` event instead of parsing it."""
        self._want_line = True

    def cancel_literal(self) -> None:
        """Refuse the synchronising literal just announced by :class:`NeedContinuation`: the
        client will not send it, so the command is dropped and the next line is a new one."""
        if self._mode == _LITERAL:
            self._mode = _LINE
            self._abandon()
            self._literal = bytearray()
            self._drop_sink()

    def close(self) -> None:
        """Drop what a half-read command holds (a literal being spooled is deleted)."""
        self._drop_sink()
        self._abandon()

    def _abandon(self) -> None:
        """Drop the command being read, deleting the literals it spooled."""
        builder, self._builder = self._builder, None
        if builder is not None:
            for frame in builder.stack:
                discard_literals(frame.items)

    def _drop_sink(self) -> None:
        if self._sink is not None:
            self._sink.close()
            self._sink = None

    def discard_buffered(self) -> int:
        """Drop every buffered byte not yet parsed (pipelined input after STARTTLS); returns
        how many were dropped."""
        n = len(self._buf)
        self._buf.clear()
        self._scan = 0
        return n

    @property
    def buffered(self) -> int:
        """Bytes received and not consumed yet (literal bytes collected included)."""
        return len(self._buf) + len(self._literal)

    @property
    def in_command(self) -> bool:
        """True while a command is half read (between lines or inside a literal)."""
        return self._builder is not None or self._mode != _LINE

    # -- state machine ---------------------------------------------------------------------

    def next_event(self) -> Event | None:
        """The next complete event, or None when more input is needed."""
        while True:
            if self._mode == _LITERAL:
                if not self._read_literal():
                    return None
                continue
            if self._mode == _DISCARD:
                take = min(len(self._buf), self._remaining)
                del self._buf[:take]
                self._remaining -= take
                if self._remaining:
                    return None
                self._mode = _LINE
                continue
            if self._mode == _SKIP:
                if not self._skip_line():
                    return None
                continue
            nl = self._buf.find(b"\n", self._scan)
            if nl < 0:
                if len(self._buf) > self.max_line + 1:
                    return self._start_skipping()
                self._scan = len(self._buf)
                return None
            line = bytes(self._buf[:nl])
            del self._buf[: nl + 1]
            self._scan = 0
            if line.endswith(b"\r"):
                line = line[:-1]
            if len(line) > self.max_line:
                return self._refuse(self._tag_of(line), "Command line too long", line)
            if self._want_line:
                self._want_line = False
                return Line(line)
            if self._discarding:
                self._discard_tail(line)
                continue
            event = self._line(line)
            if event is not None:
                return event

    def _read_literal(self) -> bool:
        take = min(len(self._buf), self._remaining)
        if take:
            if self._sink is not None:
                self._sink.write(memoryview(self._buf)[:take])
            else:
                self._literal += self._buf[:take]
            del self._buf[:take]
            self._remaining -= take
        if self._remaining:
            return False
        builder = self._builder
        assert builder is not None
        self._mode = _LINE
        node: Node
        if self._sink is not None:
            self._sink.finish()
            node = LiteralFile(self._sink, builder.literal_binary)
            self._sink = None
        else:
            node = String(bytes(self._literal), literal=True, binary=builder.literal_binary)
            self._literal = bytearray()
        # cannot exceed max_args: the slot was reserved when the literal was announced
        self._push(builder, node)
        self._after_literal = True
        return True

    def _start_skipping(self) -> BadCommand:
        tag = self._tag_of(bytes(self._buf[:200]))
        self._skip_tail = bytes(self._buf[-40:])
        self._buf.clear()
        self._scan = 0
        self._mode = _SKIP
        self._abandon()
        return BadCommand(tag, "Command line too long")

    def _skip_line(self) -> bool:
        nl = self._buf.find(b"\n")
        if nl < 0:
            self._skip_tail = (self._skip_tail + bytes(self._buf[-40:]))[-40:]
            self._buf.clear()
            return False
        tail = (self._skip_tail + bytes(self._buf[:nl]))[-40:]
        del self._buf[: nl + 1]
        self._skip_tail = b""
        self._mode = _LINE
        self._discard_tail(tail.rstrip(b"\r"))
        return True

    def _discard_tail(self, line: bytes) -> None:
        """End of a refused line: a non-synchronising literal announced at its end will be
        sent anyway, so discard it and the command's following lines."""
        m = _NONSYNC_TAIL.search(line)
        if m and int(m.group(1)) <= MAX_NUMBER64:  # an impossible size: resume at next line
            self._mode = _DISCARD
            self._remaining = int(m.group(1))
            self._discarding = True
        else:
            self._discarding = False

    def _tag_of(self, line: bytes) -> str | None:
        if self._want_line:  # a raw line (SASL response, DONE) has no tag
            self._want_line = False
            return None
        if self._builder is not None:
            return self._builder.tag
        m = _HEAD.match(line)
        if m and (m.end() == len(line) or line[m.end(1) : m.end(1) + 1] == b" "):
            return m.group(1).decode("ascii")
        return None

    def _refuse(
        self, tag: str | None, text: str, line: bytes, code: str | None = None
    ) -> BadCommand:
        self._abandon()
        self._discard_tail(line)
        return BadCommand(tag, text, code)

    def _line(self, line: bytes) -> Event | None:
        builder = self._builder
        pos = 0
        if builder is None:
            if not line:
                return BadCommand(None, "Empty command line")
            m = _HEAD.match(line)
            if m is None or (m.end(1) < len(line) and line[m.end(1)] != 0x20):
                return self._refuse(None, "Invalid tag", line)
            tag = m.group(1).decode("ascii")
            if m.group(2) is None:
                return self._refuse(tag, "Missing command name", line)
            name = m.group(2).decode("ascii").upper()
            pos = m.end()
            uid = False
            if name == "UID":
                sub = _UID_SUB.match(line, pos)
                if sub is None:
                    return self._refuse(tag, "UID needs a command", line)
                name = sub.group(1).decode("ascii").upper()
                pos = sub.end()
                uid = True
            if pos < len(line):
                if line[pos] != 0x20:
                    return self._refuse(tag, "Invalid command name", line)
                pos += 1
                if pos == len(line):
                    return self._refuse(tag, "Trailing space", line)
            builder = _Builder(tag, name, uid, [_Frame("root")])
        else:
            after = self._after_literal
            self._after_literal = False
            if after and line and line[0] not in b" )]":
                return self._refuse(builder.tag, "Missing space after literal", line)
        self._builder = builder
        try:
            literal = self._tokenize(builder, line, pos)
        except _Bad as bad:
            return self._refuse(builder.tag, bad.text, line, bad.code)
        if literal is None:
            if len(builder.stack) != 1:
                self._abandon()
                return BadCommand(builder.tag, "Unbalanced parentheses or brackets")
            self._builder = None
            return Command(builder.tag, builder.name, tuple(builder.stack[0].items), builder.uid)
        size, sync, binary = literal
        limit = self.max_literal
        if not sync and self.literal_minus:
            limit = min(limit, LITERAL_MINUS_MAX)
        if self.max_command_literals is not None:
            limit = min(limit, self.max_command_literals - builder.literal_total)
        builder.literal_total += size
        if size > limit:
            self._abandon()
            if not sync:
                self._mode = _DISCARD
                self._remaining = size
                self._discarding = True
            return BadCommand(builder.tag, f"Literal of {size} octets is too large", "TOOBIG")
        try:
            self._count(builder)
        except _Bad as bad:
            return self._refuse(builder.tag, bad.text, line, bad.code)
        builder.count -= 1  # counted again by _push once read
        builder.literal_binary = binary
        self._mode = _LITERAL
        self._remaining = size
        self._literal = bytearray()
        self._drop_sink()
        if self.spool is not None and size > self.spool_above and builder.name == "APPEND":
            self._sink = self.spool(size)
        if sync:
            return NeedContinuation(builder.tag, builder.name, size)
        return None

    # -- tokenizer -------------------------------------------------------------------------

    def _count(self, builder: _Builder) -> None:
        builder.count += 1
        if builder.count > self.max_args:
            raise _Bad("Too many arguments")

    def _push(self, builder: _Builder, node: Node) -> None:
        self._count(builder)
        builder.stack[-1].items.append(node)

    def _tokenize(self, b: _Builder, line: bytes, pos: int) -> tuple[int, bool, bool] | None:
        """Add the tokens of ``line[pos:]`` to the builder; returns ``(size, sync, binary)``
        when the line ends with a literal announcement."""
        n = len(line)
        stack = b.stack
        while pos < n:
            c = line[pos]
            if c == 0x20:
                pos += 1
                continue
            if c == 0x28:  # (
                if len(stack) > self.max_depth:
                    raise _Bad("Too deeply nested")
                self._count(b)
                stack.append(_Frame("list"))
                pos += 1
                continue
            if c == 0x29:  # )
                if stack[-1].kind != "list":
                    raise _Bad("Unexpected )")
                frame = stack.pop()
                stack[-1].items.append(PList(tuple(frame.items)))
                pos = self._boundary(line, pos + 1, stack)
                continue
            if c == 0x5D and stack[-1].kind == "section":  # ]
                frame = stack.pop()
                pos += 1
                partial = None
                if pos < n and line[pos] == 0x3C:  # <
                    m = _PARTIAL.match(line, pos)
                    if m is None or (m.group(2) is not None and int(m.group(2)) == 0):
                        raise _Bad("Invalid <partial> specification")
                    count = None if m.group(2) is None else int(m.group(2))
                    partial = (int(m.group(1)), count)
                    pos = m.end()
                raw = line[frame.start : pos].decode("ascii") if frame.start >= 0 else None
                stack[-1].items.append(Section(frame.name, tuple(frame.items), partial, raw))
                pos = self._boundary(line, pos, stack)
                continue
            if c == 0x22:  # "
                m = _QUOTED.match(line, pos)
                if m is None:
                    raise _Bad(self._quoted_error(line, pos))
                self._push(b, String(_UNESCAPE.sub(rb"\1", m.group(1))))
                pos = self._boundary(line, m.end(), stack)
                continue
            if c == 0x7B or (c == 0x7E and line[pos + 1 : pos + 2] == b"{"):  # { or ~{
                m = _LITERAL_HEAD.match(line, pos)
                if m is None:
                    raise _Bad("Literal announcement must end the line")
                for frame in stack:  # sections continue on the next line: no raw text
                    frame.start = -1
                size = self._literal_size(m.group(2))
                return size, not m.group(2).endswith(b"+"), bool(m.group(1))
            error = _char_error(c)
            if error:
                raise _Bad(error)
            m = _WORD.match(line, pos)
            end = m.end() if m else pos
            nxt = line[end] if end < n else -1
            if nxt == 0x5B and m and m.group().decode("ascii").upper() in SECTION_NAMES:
                if len(stack) > self.max_depth:
                    raise _Bad("Too deeply nested")
                self._count(b)
                stack.append(_Frame("section", name=m.group().decode("ascii").upper(), start=pos))
                pos = end + 1
                continue
            if nxt in (0x5B, 0x5D) and not (nxt == 0x5D and stack[-1].kind == "section"):
                m2 = _WORD_LOOSE.match(line, pos)
                assert m2 is not None
                end = m2.end()
                if stack[-1].kind == "section" and b"]" in line[pos:end]:
                    end = line.index(b"]", pos)
            if end == pos:
                raise _Bad(f"Unexpected character {chr(c)!r}")
            self._push(b, _word(line[pos:end].decode("ascii")))
            pos = self._boundary(line, end, stack)
        return None

    @staticmethod
    def _boundary(line: bytes, pos: int, stack: list[_Frame]) -> int:
        if pos < len(line):
            c = line[pos]
            if c != 0x20 and c != 0x29 and not (c == 0x5D and stack[-1].kind == "section"):
                raise _Bad(_char_error(c) or "Missing space between arguments")
        return pos

    @staticmethod
    def _quoted_error(line: bytes, pos: int) -> str:
        i = pos + 1
        while i < len(line):
            c = line[i]
            if c == 0x22:
                break
            if c == 0:
                return "NUL in command line"
            if c in (0x0A, 0x0D):
                return "CR or LF in a quoted string"
            if c == 0x5C:
                if line[i + 1 : i + 2] not in (b'"', b"\\"):
                    return "Invalid escape in quoted string"
                i += 1
            i += 1
        return "Unterminated quoted string"

    @staticmethod
    def _literal_size(text: bytes) -> int:
        digits = text[:-1] if text.endswith(b"+") else text
        if not digits or not digits.isdigit() or len(digits) > 19:
            raise _Bad("Invalid literal size")
        size = int(digits)
        if size > MAX_NUMBER64:
            raise _Bad("Invalid literal size")
        return size


def _char_error(c: int) -> str | None:
    if c == 0:
        return "NUL in command line"
    if c < 0x20 or c == 0x7F:
        return "Control character in command line"
    if c >= 0x80:
        return "8-bit data outside a quoted string"
    return None


def _word(text: str) -> Node:
    if text.isdigit():
        return Number(int(text), text)
    if text.upper() == "NIL":
        return Nil(text)
    return Atom(text)


# ---------------------------------------------------------------------------------------------
# Grammar: typed commands


class CommandError(Exception):
    """A command that cannot be executed as written: answer ``tag STATUS [code] text``.
    ``status`` is ``BAD`` for syntax errors, ``NO`` for well-formed but refused arguments
    (unknown charset: code ``BADCHARSET (US-ASCII UTF-8)``; unknown special use: ``USEATTR``)."""

    def __init__(self, text: str, status: str = "BAD", code: str | None = None) -> None:
        super().__init__(text)
        self.text = text
        self.status = status
        self.code = code


@dataclass(frozen=True, slots=True)
class Simple:
    """A command without arguments: CAPABILITY NOOP LOGOUT STARTTLS CHECK CLOSE UNSELECT IDLE
    NAMESPACE."""

    name: str


@dataclass(frozen=True, slots=True)
class Login:
    username: bytes
    password: bytes


@dataclass(frozen=True, slots=True)
class Authenticate:
    """``initial_response`` is the SASL-IR argument as sent (base64 text, ``=`` for empty)."""

    mechanism: str
    initial_response: bytes | None = None


@dataclass(frozen=True, slots=True)
class Qresync:
    uidvalidity: int
    modseq: int
    known_uids: SequenceSet | None = None
    seq_match: tuple[SequenceSet, SequenceSet] | None = None


@dataclass(frozen=True, slots=True)
class Select:
    """SELECT, or EXAMINE when ``readonly``."""

    mailbox: str
    readonly: bool = False
    condstore: bool = False
    qresync: Qresync | None = None


@dataclass(frozen=True, slots=True)
class Create:
    mailbox: str
    special_use: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class Delete:
    mailbox: str


@dataclass(frozen=True, slots=True)
class Rename:
    source: str
    target: str


@dataclass(frozen=True, slots=True)
class Subscribe:
    mailbox: str


@dataclass(frozen=True, slots=True)
class Unsubscribe:
    mailbox: str


@dataclass(frozen=True, slots=True)
class ListMailboxes:
    """LIST, basic or extended (RFC 5258): ``selection`` options (SUBSCRIBED, REMOTE,
    RECURSIVEMATCH, SPECIAL-USE), ``returns`` options (SUBSCRIBED, CHILDREN, SPECIAL-USE,
    STATUS) and the STATUS items requested with RETURN (STATUS (...)). ``patterns`` is
    empty when the reference or a pattern is not a valid mailbox name (nothing matches)."""

    reference: str
    patterns: tuple[str, ...]
    selection: frozenset[str] = frozenset()
    returns: frozenset[str] = frozenset()
    status_items: tuple[str, ...] = ()
    extended: bool = False


@dataclass(frozen=True, slots=True)
class Lsub:
    """LSUB; ``pattern`` None when the reference or pattern is not a valid mailbox name
    (nothing matches: an empty OK, as Dovecot answers)."""

    reference: str
    pattern: str | None


@dataclass(frozen=True, slots=True)
class Status:
    mailbox: str
    items: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class AppendMessage:
    """One message of an APPEND: ``data`` is bytes, or a ``SpooledLiteral`` for a large one
    (it reads like a file and has a ``len``)."""

    flags: tuple[str, ...]
    date: datetime.datetime | None
    data: bytes | SpooledLiteral
    binary: bool = False


@dataclass(frozen=True, slots=True)
class Append:
    """APPEND; several messages with MULTIAPPEND (RFC 3502)."""

    mailbox: str
    messages: tuple[AppendMessage, ...]


@dataclass(frozen=True, slots=True)
class Expunge:
    """EXPUNGE, or UID EXPUNGE of ``uids``."""

    uids: SequenceSet | None = None


# -- search keys ------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class All:
    pass


@dataclass(frozen=True, slots=True)
class FlagKey:
    """Messages with (``present``) or without ``flag`` (system flag or keyword)."""

    flag: str
    present: bool = True


@dataclass(frozen=True, slots=True)
class DateKey:
    """``field`` INTERNAL (BEFORE/ON/SINCE) or SENT (SENTBEFORE/...); ``relation`` BEFORE,
    ON or SINCE; dates compare without time and time zone (RFC 3501 6.4.4)."""

    field: str
    relation: str
    date: datetime.date


@dataclass(frozen=True, slots=True)
class HeaderKey:
    """A header field containing ``value`` (case-insensitive substring; "" = field present).
    ``addresses`` marks FROM/TO/CC/BCC, which RFC 3501 defines on the envelope structure:
    they also match the parsed addresses (``local@domain``, display names), so comments
    and obsolete syntax inside the raw header do not hide a match."""

    name: str
    value: str
    addresses: bool = field(default=False, compare=False)


@dataclass(frozen=True, slots=True)
class TextKey:
    """``scope`` BODY (body only) or TEXT (header and body)."""

    scope: str
    value: str


@dataclass(frozen=True, slots=True)
class SizeKey:
    larger: bool
    size: int


@dataclass(frozen=True, slots=True)
class SeqKey:
    """A sequence set (``uid`` false) or ``UID`` set."""

    sequence: SequenceSet
    uid: bool = False


@dataclass(frozen=True, slots=True)
class ModSeqKey:
    """MODSEQ (RFC 7162): messages with a mod-sequence >= ``modseq``."""

    modseq: int
    entry: str | None = None
    entry_type: str | None = None


@dataclass(frozen=True, slots=True)
class AgeKey:
    """OLDER / YOUNGER (RFC 5032 WITHIN), in seconds."""

    older: bool
    seconds: int


@dataclass(frozen=True, slots=True)
class Not:
    key: SearchKey


@dataclass(frozen=True, slots=True)
class Or:
    left: SearchKey
    right: SearchKey


@dataclass(frozen=True, slots=True)
class And:
    keys: tuple[SearchKey, ...]


SearchKey = (
    All
    | FlagKey
    | DateKey
    | HeaderKey
    | TextKey
    | SizeKey
    | SeqKey
    | ModSeqKey
    | AgeKey
    | Not
    | Or
    | And
)


@dataclass(frozen=True, slots=True)
class Search:
    """SEARCH; ``returns`` is None for a plain SEARCH, the ESEARCH RETURN options otherwise
    (RFC 4731, RFC 5182, RFC 5267: MIN MAX ALL COUNT SAVE PARTIAL CONTEXT UPDATE; ``RETURN
    ()`` means ``("ALL",)``); ``partial`` the ``PARTIAL lo:hi`` range (1-based positions)."""

    key: SearchKey
    charset: str | None = None
    returns: tuple[str, ...] | None = None
    uid: bool = False
    partial: tuple[int, int] | None = None


@dataclass(frozen=True, slots=True)
class Sort:
    """SORT (RFC 5256): ``criteria`` as ``(name, reverse)`` pairs; ``returns`` and
    ``partial`` as for :class:`Search` (ESORT, RFC 5267), None for a plain SORT."""

    criteria: tuple[tuple[str, bool], ...]
    charset: str
    key: SearchKey
    uid: bool = False
    returns: tuple[str, ...] | None = None
    partial: tuple[int, int] | None = None


@dataclass(frozen=True, slots=True)
class Thread:
    algorithm: str
    charset: str
    key: SearchKey
    uid: bool = False


# -- fetch ------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class SectionSpec:
    """``[1.2.HEADER.FIELDS (To)]``: ``part`` numbers, ``text`` one of HEADER,
    HEADER.FIELDS, HEADER.FIELDS.NOT, TEXT, MIME or None, and the header ``fields``."""

    part: tuple[int, ...] = ()
    text: str | None = None
    fields: tuple[str, ...] = ()

    def __str__(self) -> str:
        pieces = [str(p) for p in self.part]
        if self.text:
            pieces.append(self.text)
        out = ".".join(pieces)
        if self.text and self.text.startswith("HEADER.FIELDS"):
            out += " (" + " ".join(_header_name_text(f) for f in self.fields) + ")"
        return out


def _header_name_text(name: str) -> str:
    # field names are atoms in every sane case; quote anything else
    if name and all(0x21 <= ord(c) <= 0x7E and c not in '(){%*"\\]' for c in name):
        return name
    return '"' + name.replace("\\", "\\\\").replace('"', '\\"') + '"'


@dataclass(frozen=True, slots=True)
class FetchAtt:
    """One FETCH item. ``name`` is ENVELOPE, FLAGS, INTERNALDATE, RFC822, RFC822.HEADER,
    RFC822.SIZE, RFC822.TEXT, BODY, BODYSTRUCTURE, UID, MODSEQ, BINARY or BINARY.SIZE;
    ``section`` is set for ``BODY[...]``/``BINARY[...]`` (None for plain BODY);
    ``partial`` is ``(origin, length)``; ``peek`` for BODY.PEEK / BINARY.PEEK."""

    name: str
    section: SectionSpec | None = None
    partial: tuple[int, int | None] | None = None
    peek: bool = False

    def response_label(self) -> str:
        """The item name a FETCH response uses: ``BODY[1.TEXT]<0>`` for
        ``BODY.PEEK[1.TEXT]<0.100>``."""
        if self.section is None:
            return self.name
        label = f"{self.name}[{self.section}]"
        if self.partial is not None:
            label += f"<{self.partial[0]}>"
        return label


@dataclass(frozen=True, slots=True)
class Fetch:
    sequence: SequenceSet
    items: tuple[FetchAtt, ...]
    changed_since: int | None = None
    vanished: bool = False
    uid: bool = False


@dataclass(frozen=True, slots=True)
class Store:
    """STORE: ``mode`` ``""`` (replace), ``"+"`` or ``"-"``; ``silent`` for ``.SILENT``."""

    sequence: SequenceSet
    mode: str
    silent: bool
    flags: tuple[str, ...]
    unchanged_since: int | None = None
    uid: bool = False


@dataclass(frozen=True, slots=True)
class Copy:
    sequence: SequenceSet
    mailbox: str
    uid: bool = False


@dataclass(frozen=True, slots=True)
class Move:
    sequence: SequenceSet
    mailbox: str
    uid: bool = False


@dataclass(frozen=True, slots=True)
class Enable:
    capabilities: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class Id:
    """ID (RFC 2971): field/value pairs, or None for ``ID NIL``."""

    params: tuple[tuple[str, str | None], ...] | None


@dataclass(frozen=True, slots=True)
class CancelUpdate:
    """CANCELUPDATE (RFC 5267 4.3): the tags of the searches whose updates stop."""

    tags: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class GetQuota:
    root: str


@dataclass(frozen=True, slots=True)
class GetQuotaRoot:
    mailbox: str


TypedCommand = (
    Simple
    | Login
    | Authenticate
    | Select
    | Create
    | Delete
    | Rename
    | Subscribe
    | Unsubscribe
    | ListMailboxes
    | Lsub
    | Status
    | Append
    | Expunge
    | Search
    | Sort
    | Thread
    | Fetch
    | Store
    | Copy
    | Move
    | Enable
    | Id
    | GetQuota
    | GetQuotaRoot
    | CancelUpdate
)

SYSTEM_FLAGS = {f.upper(): f for f in ("\\Answered", "\\Flagged", "\\Deleted", "\\Seen", "\\Draft")}
SPECIAL_USES = {
    f.upper(): f
    for f in ("\\All", "\\Archive", "\\Drafts", "\\Flagged", "\\Junk", "\\Sent", "\\Trash")
}
STATUS_ITEMS = frozenset(
    {"MESSAGES", "RECENT", "UIDNEXT", "UIDVALIDITY", "UNSEEN", "HIGHESTMODSEQ", "SIZE", "DELETED"}
)
SEARCH_CHARSETS = ("US-ASCII", "UTF-8")
SORT_CRITERIA = frozenset(
    {"ARRIVAL", "CC", "DATE", "FROM", "SIZE", "SUBJECT", "TO", "DISPLAYFROM", "DISPLAYTO"}
)
THREAD_ALGORITHMS = frozenset({"ORDEREDSUBJECT", "REFERENCES"})
ESEARCH_RETURNS = frozenset({"MIN", "MAX", "ALL", "COUNT", "SAVE", "PARTIAL", "CONTEXT", "UPDATE"})
# RETURN options that ask for result data (or SAVE); without any, RETURN means ALL unless
# UPDATE asks only for the notifications of later changes (RFC 5267 4.2).
_RESULT_RETURNS = frozenset({"MIN", "MAX", "ALL", "COUNT", "SAVE", "PARTIAL"})
MONTHS = ("JAN", "FEB", "MAR", "APR", "MAY", "JUN", "JUL", "AUG", "SEP", "OCT", "NOV", "DEC")
_MAX_SEARCH_DEPTH = 64
_ATOM_CHARS = re.compile(r'[^\x00-\x20\x7f-\U0010ffff(){%*"\\\]]+\Z')


class _Args:
    """A cursor over a list of argument nodes."""

    def __init__(self, items: tuple[Node, ...]) -> None:
        self.items = items
        self.i = 0

    def more(self) -> bool:
        return self.i < len(self.items)

    def peek(self) -> Node | None:
        return self.items[self.i] if self.i < len(self.items) else None

    def take(self, what: str) -> Node:
        if self.i >= len(self.items):
            raise CommandError(f"Missing {what}")
        node = self.items[self.i]
        self.i += 1
        return node

    def end(self) -> None:
        if self.i < len(self.items):
            raise CommandError("Too many arguments")

    def peek_atom(self) -> str | None:
        node = self.peek()
        return node.text.upper() if isinstance(node, Atom) else None


def astring(node: Node, what: str = "string") -> bytes:
    """The bytes of an astring argument (atom, quoted string or literal)."""
    if isinstance(node, String):
        return node.value
    if isinstance(node, (Atom, Number, Nil)):
        return node.text.encode("ascii")
    if isinstance(node, Section) and node.raw is not None and node.partial is None:
        return node.raw.encode("ascii")
    raise CommandError(f"Expected {what}")


def _text(node: Node, what: str, ascii_only: bool = False) -> str:
    raw = astring(node, what)
    try:
        return raw.decode("ascii" if ascii_only else "utf-8")
    except UnicodeDecodeError as e:
        raise CommandError(f"Invalid {'ASCII' if ascii_only else 'UTF-8'} in {what}") from e


def decode_mailbox(raw: bytes, utf8: bool = False) -> str:
    """A mailbox name as sent: modified UTF-7 (RFC 3501 5.1.3), or UTF-8 once UTF8=ACCEPT or
    IMAP4rev2 is enabled; ``INBOX`` in any case becomes ``INBOX``. CommandError with status
    NO when undecodable."""
    try:
        return names.from_wire(raw, utf8)
    except names.InvalidName as e:
        # A well-formed argument naming no possible mailbox: NO, as Dovecot answers.
        raise CommandError(str(e), "NO") from e


def _number(node: Node, what: str, nz: bool = False, bits: int = 32) -> int:
    if not isinstance(node, Number):
        raise CommandError(f"Expected a number for {what}")
    limit = 2**bits - 1 if bits == 32 else 2**63 - 1
    if node.value > limit or (nz and node.value == 0):
        raise CommandError(f"Number out of range for {what}")
    return node.value


def _seqset(node: Node, allow_saved: bool = True) -> SequenceSet:
    if not isinstance(node, (Atom, Number)):
        raise CommandError("Expected a sequence set")
    try:
        return parse_sequence_set(node.text, allow_saved)
    except SequenceError as e:
        raise CommandError(f"Invalid sequence set: {e}") from e


def _plist(node: Node | None, what: str) -> tuple[Node, ...]:
    if not isinstance(node, PList):
        raise CommandError(f"Expected a parenthesised list for {what}")
    return node.items


def _atoms_upper(items: tuple[Node, ...], what: str) -> list[str]:
    out = []
    for node in items:
        if not isinstance(node, (Atom, Number)):
            raise CommandError(f"Expected an atom in {what}")
        out.append(node.text.upper())
    return out


def _flag(node: Node) -> str:
    """A flag: system flags in canonical case, keywords as sent (atoms without ``\\``).
    ``NIL`` is an atom here (the keyword ``NIL``, as in Dovecot)."""
    if isinstance(node, Nil):
        return node.text
    if not isinstance(node, Atom):
        raise CommandError("Invalid flag")
    text = node.text
    if text.startswith("\\"):
        canonical = SYSTEM_FLAGS.get(text.upper())
        if canonical is None:
            raise CommandError(f"Invalid system flag {text}")
        return canonical
    if not _ATOM_CHARS.match(text) or "[" in text:
        raise CommandError(f"Invalid keyword {text}")
    return text


def _flag_list(node: Node | None) -> tuple[str, ...]:
    flags: list[str] = []
    for item in _plist(node, "flags"):
        flag = _flag(item)
        if flag not in flags:
            flags.append(flag)
    return tuple(flags)


def parse_date(text: str) -> datetime.date:
    """``dd-Mon-yyyy`` (1 or 2 day digits, month name in any case); ValueError otherwise."""
    day, sep1, rest = text.partition("-")
    month, sep2, year = rest.partition("-")
    if not (sep1 and sep2) or not (1 <= len(day) <= 2 and day.isdigit() and day.isascii()):
        raise ValueError(f"invalid date {text!r}")
    if len(year) != 4 or not year.isdigit() or not year.isascii():
        raise ValueError(f"invalid date {text!r}")
    if month.upper() not in MONTHS:
        raise ValueError(f"invalid month in {text!r}")
    return datetime.date(int(year), MONTHS.index(month.upper()) + 1, int(day))


_DATE_TIME = re.compile(
    r"([ 0-9]?[0-9])-([A-Za-z]{3})-([0-9]{4}) ([0-9]{2}):([0-9]{2}):([0-9]{2}) ([+-])([0-9]{2})([0-9]{2})\Z"
)


def parse_date_time(text: str) -> datetime.datetime:
    """``dd-Mon-yyyy hh:mm:ss +zzzz`` as an aware datetime; ValueError when not valid."""
    m = _DATE_TIME.match(text)
    if m is None:
        raise ValueError(f"invalid date-time {text!r}")
    day, month, year, hh, mm, ss, sign, zh, zm = m.groups()
    if month.upper() not in MONTHS or not day.strip():
        raise ValueError(f"invalid date-time {text!r}")
    if int(zh) > 23 or int(zm) > 59:
        raise ValueError(f"invalid time zone in {text!r}")
    offset = datetime.timedelta(hours=int(zh), minutes=int(zm))
    zone = datetime.timezone(-offset if sign == "-" else offset)
    return datetime.datetime(
        int(year), MONTHS.index(month.upper()) + 1, int(day.strip()),
        int(hh), int(mm), int(ss), tzinfo=zone,
    )  # fmt: skip


def _date(node: Node) -> datetime.date:
    try:
        return parse_date(_text(node, "date", ascii_only=True))
    except ValueError as e:
        raise CommandError(f"Invalid date: {e}") from e


# -- per-command parsers ----------------------------------------------------------------------


def _mailbox(args: _Args, utf8: bool, what: str = "mailbox name") -> str:
    return decode_mailbox(astring(args.take(what), what), utf8)


def _p_login(args: _Args, utf8: bool) -> Login:
    user = astring(args.take("user name"), "user name")
    password = astring(args.take("password"), "password")
    args.end()
    return Login(user, password)


def _p_authenticate(args: _Args, utf8: bool) -> Authenticate:
    node = args.take("mechanism")
    if not isinstance(node, Atom):
        raise CommandError("Invalid mechanism")
    initial = None
    if args.more():
        initial = astring(args.take("initial response"))
    args.end()
    return Authenticate(node.text.upper(), initial)


def _p_select(args: _Args, utf8: bool, readonly: bool = False) -> Select:
    mailbox = _mailbox(args, utf8)
    condstore = False
    qresync = None
    if args.more():
        params = _Args(_plist(args.take("parameters"), "SELECT parameters"))
        while params.more():
            name = params.peek_atom()
            params.take("parameter")
            if name == "CONDSTORE":
                condstore = True
            elif name == "QRESYNC" and qresync is None:
                qresync = _qresync(_Args(_plist(params.take("QRESYNC"), "QRESYNC")))
            else:
                raise CommandError("Unknown SELECT parameter")
    args.end()
    return Select(mailbox, readonly, condstore, qresync)


def _qresync(q: _Args) -> Qresync:
    uidvalidity = _number(q.take("UIDVALIDITY"), "UIDVALIDITY", nz=True)
    modseq = _number(q.take("mod-sequence"), "mod-sequence", nz=True, bits=63)
    known = None
    match = None
    if isinstance(q.peek(), (Atom, Number)):
        known = _seqset(q.take("known UIDs"), allow_saved=False)
    if q.more():
        pair = _Args(_plist(q.take("sequence match data"), "sequence match data"))
        match = (_seqset(pair.take("sequence set"), False), _seqset(pair.take("UIDs"), False))
        pair.end()
    q.end()
    return Qresync(uidvalidity, modseq, known, match)


def _p_create(args: _Args, utf8: bool) -> Create:
    mailbox = _mailbox(args, utf8)
    uses: list[str] = []
    if args.more():
        params = _Args(_plist(args.take("parameters"), "CREATE parameters"))
        while params.more():
            if params.peek_atom() != "USE":
                raise CommandError("Unknown CREATE parameter")
            params.take("USE")
            for node in _plist(params.take("USE list"), "USE"):
                text = node.text.upper() if isinstance(node, Atom) else ""
                if text not in SPECIAL_USES:
                    raise CommandError("Unknown special-use attribute", "NO", "USEATTR")
                uses.append(SPECIAL_USES[text])
    args.end()
    return Create(mailbox, tuple(uses))


def _p_one_mailbox(cls: Callable[[str], TypedCommand]) -> Callable[[_Args, bool], TypedCommand]:
    def parse(args: _Args, utf8: bool) -> TypedCommand:
        mailbox = _mailbox(args, utf8)
        args.end()
        return cls(mailbox)

    return parse


def _p_rename(args: _Args, utf8: bool) -> Rename:
    source = _mailbox(args, utf8)
    target = _mailbox(args, utf8)
    args.end()
    return Rename(source, target)


def _pattern(node: Node, utf8: bool) -> str:
    return decode_mailbox(astring(node, "mailbox pattern"), utf8)


def _p_list(args: _Args, utf8: bool) -> ListMailboxes:
    selection: set[str] = set()
    returns: set[str] = set()
    status_items: tuple[str, ...] = ()
    extended = False
    if isinstance(args.peek(), PList):
        extended = True
        for opt in _atoms_upper(_plist(args.take("options"), "selection options"), "options"):
            if opt not in ("SUBSCRIBED", "REMOTE", "RECURSIVEMATCH", "SPECIAL-USE"):
                raise CommandError(f"Unknown LIST selection option {opt}")
            selection.add(opt)
        if selection == {"RECURSIVEMATCH"} or selection == {"RECURSIVEMATCH", "REMOTE"}:
            raise CommandError("RECURSIVEMATCH needs another selection option")
    reference_node = args.take("reference")
    node = args.take("mailbox pattern")
    if isinstance(node, PList):
        extended = True
        if not node.items:
            raise CommandError("Empty pattern list")
        pattern_nodes = node.items
    else:
        pattern_nodes = (node,)
    # A reference or pattern that is not a valid name matches nothing (as Dovecot): an
    # invalid pattern drops out of the list, an invalid reference empties it.
    reference = _valid_name(astring(reference_node, "reference"), utf8)
    valid = (_valid_name(astring(n, "mailbox pattern"), utf8) for n in pattern_nodes)
    patterns = tuple(p for p in valid if p is not None) if reference is not None else ()
    if args.more():
        if args.peek_atom() != "RETURN":
            raise CommandError("Expected RETURN")
        args.take("RETURN")
        extended = True
        ret = _Args(_plist(args.take("return options"), "return options"))
        while ret.more():
            opt = ret.peek_atom() or ""
            ret.take("return option")
            if opt in ("SUBSCRIBED", "CHILDREN", "SPECIAL-USE"):
                returns.add(opt)
            elif opt == "STATUS" and "STATUS" not in returns:
                returns.add(opt)
                status_items = _status_items(ret.take("STATUS items"))
            else:
                raise CommandError("Unknown LIST return option")
    args.end()
    return ListMailboxes(
        reference or "", patterns, frozenset(selection), frozenset(returns), status_items, extended
    )


def _p_lsub(args: _Args, utf8: bool) -> Lsub:
    reference = _valid_name(astring(args.take("reference"), "reference"), utf8)
    pattern = _valid_name(astring(args.take("mailbox pattern"), "mailbox pattern"), utf8)
    args.end()
    if reference is None or pattern is None:
        return Lsub("", None)  # not a valid name: nothing matches (as Dovecot)
    return Lsub(reference, pattern)


def _valid_name(raw: bytes, utf8: bool) -> str | None:
    """A LIST/LSUB reference or pattern, None when it is not a valid mailbox name."""
    try:
        return decode_mailbox(raw, utf8)
    except CommandError:
        return None


def _status_items(node: Node) -> tuple[str, ...]:
    items = _atoms_upper(_plist(node, "status items"), "status items")
    if not items:
        raise CommandError("Empty status item list")
    for item in items:
        if item not in STATUS_ITEMS:
            raise CommandError(f"Unknown status item {item}")
    return tuple(dict.fromkeys(items))


def _p_status(args: _Args, utf8: bool) -> Status:
    mailbox = _mailbox(args, utf8)
    items = _status_items(args.take("status items"))
    args.end()
    return Status(mailbox, items)


def _p_append(args: _Args, utf8: bool) -> Append:
    mailbox = _mailbox(args, utf8)
    messages: list[AppendMessage] = []
    while True:
        flags: tuple[str, ...] = ()
        date = None
        if isinstance(args.peek(), PList):
            flags = _flag_list(args.take("flags"))
        node = args.peek()
        if isinstance(node, String) and not node.literal:
            args.take("date-time")
            try:
                date = parse_date_time(node.value.decode("ascii"))
            except (ValueError, UnicodeDecodeError) as e:
                raise CommandError(f"Invalid date-time: {e}") from e
        if args.peek_atom() == "UTF8":
            # RFC 6855 4: APPEND ... UTF8 (~{n}...), only once UTF8=ACCEPT is enabled.
            if not utf8:
                raise CommandError("APPEND UTF8 needs ENABLE UTF8=ACCEPT")
            args.take("UTF8")
            inner = _Args(_plist(args.take("UTF8 message"), "UTF8"))
            data = inner.take("message literal8")
            inner.end()
            if not isinstance(data, String | LiteralFile) or not data.binary:
                raise CommandError("APPEND UTF8 takes a literal8 (~{n})")
        else:
            data = args.take("message literal")
        if isinstance(data, LiteralFile):
            messages.append(AppendMessage(flags, date, data.file, data.binary))
        elif not isinstance(data, String) or not data.literal:
            raise CommandError("The message must be sent as a literal")
        else:
            messages.append(AppendMessage(flags, date, data.value, data.binary))
        if not args.more():
            return Append(mailbox, tuple(messages))


def _p_expunge(args: _Args, utf8: bool, uid: bool = False) -> Expunge:
    uids = _seqset(args.take("UID set")) if uid else None
    args.end()
    return Expunge(uids)


# -- SEARCH -----------------------------------------------------------------------------------

_FLAG_KEYS = {
    "ANSWERED": ("\\Answered", True), "DELETED": ("\\Deleted", True),
    "DRAFT": ("\\Draft", True), "FLAGGED": ("\\Flagged", True),
    "SEEN": ("\\Seen", True), "RECENT": ("\\Recent", True), "OLD": ("\\Recent", False),
    "UNANSWERED": ("\\Answered", False), "UNDELETED": ("\\Deleted", False),
    "UNDRAFT": ("\\Draft", False), "UNFLAGGED": ("\\Flagged", False),
    "UNSEEN": ("\\Seen", False),
}  # fmt: skip
_HEADER_KEYS = {"BCC": "Bcc", "CC": "Cc", "FROM": "From", "SUBJECT": "Subject", "TO": "To"}
_DATE_KEYS = {
    "BEFORE": ("INTERNAL", "BEFORE"), "ON": ("INTERNAL", "ON"), "SINCE": ("INTERNAL", "SINCE"),
    "SENTBEFORE": ("SENT", "BEFORE"), "SENTON": ("SENT", "ON"), "SENTSINCE": ("SENT", "SINCE"),
}  # fmt: skip


class _SearchParser:
    def __init__(self, charset: str | None) -> None:
        self.encoding = "ascii" if charset == "US-ASCII" else "utf-8"

    def string(self, args: _Args, what: str) -> str:
        raw = astring(args.take(what), what)
        try:
            return raw.decode(self.encoding)
        except UnicodeDecodeError as e:
            raise CommandError(f"Search string is not valid {self.encoding}") from e

    def keys(self, items: tuple[Node, ...], depth: int) -> SearchKey:
        args = _Args(items)
        keys = []
        while args.more():
            keys.append(self.key(args, depth))
        if not keys:
            raise CommandError("Missing search criteria")
        return keys[0] if len(keys) == 1 else And(tuple(keys))

    def key(self, args: _Args, depth: int) -> SearchKey:
        if depth > _MAX_SEARCH_DEPTH:
            raise CommandError("Search criteria nested too deeply")
        node = args.take("search key")
        if isinstance(node, PList):
            return self.keys(node.items, depth + 1)
        if isinstance(node, Number) or (isinstance(node, Atom) and node.text[:1] in "*$"):
            return SeqKey(_seqset(node))
        if not isinstance(node, Atom):
            raise CommandError("Invalid search key")
        name = node.text.upper()
        if name == "ALL":
            return All()
        if name in _FLAG_KEYS:
            flag, present = _FLAG_KEYS[name]
            return FlagKey(flag, present)
        if name == "NEW":
            return And((FlagKey("\\Recent"), FlagKey("\\Seen", False)))
        if name in ("KEYWORD", "UNKEYWORD"):
            return FlagKey(_flag(args.take("keyword")), name == "KEYWORD")
        if name in _HEADER_KEYS:
            return HeaderKey(_HEADER_KEYS[name], self.string(args, name), name not in ("SUBJECT",))
        if name == "HEADER":
            field_name = _text(args.take("header field name"), "header field name", True)
            if not field_name or any(c in field_name for c in " :\t"):
                raise CommandError("Invalid header field name")
            return HeaderKey(field_name, self.string(args, "header value"))
        if name in ("BODY", "TEXT"):
            return TextKey(name, self.string(args, name))
        if name in _DATE_KEYS:
            field_, relation = _DATE_KEYS[name]
            return DateKey(field_, relation, _date(args.take("date")))
        if name in ("LARGER", "SMALLER"):
            return SizeKey(name == "LARGER", _number(args.take("size"), name, bits=63))
        if name in ("OLDER", "YOUNGER"):
            return AgeKey(name == "OLDER", _number(args.take("interval"), name, nz=True))
        if name == "UID":
            return SeqKey(_seqset(args.take("UID set")), uid=True)
        if name == "NOT":
            return Not(self.key(args, depth + 1))
        if name == "OR":
            left = self.key(args, depth + 1)
            return Or(left, self.key(args, depth + 1))
        if name == "MODSEQ":
            entry = entry_type = None
            if isinstance(args.peek(), String):
                entry = _text(args.take("entry name"), "entry name", True)
                entry_type = args.peek_atom()
                if entry_type not in ("PRIV", "SHARED", "ALL"):
                    raise CommandError("Invalid MODSEQ entry type")
                args.take("entry type")
            return ModSeqKey(
                _number(args.take("mod-sequence"), "MODSEQ", bits=63), entry, entry_type
            )
        if name[:1].isdigit():
            return SeqKey(_seqset(node))
        raise CommandError(f"Unknown search key {node.text}")


def _charset(args: _Args) -> str:
    charset = _text(args.take("charset"), "charset", ascii_only=True).upper()
    if charset not in SEARCH_CHARSETS:
        raise CommandError("Unsupported charset", "NO", "BADCHARSET (US-ASCII UTF-8)")
    return charset


def _return_options(args: _Args) -> tuple[tuple[str, ...] | None, tuple[int, int] | None]:
    """The ``RETURN (...)`` options of SEARCH / SORT, if any, and the PARTIAL range."""
    if args.peek_atom() != "RETURN" or not isinstance(
        args.items[args.i + 1] if args.i + 1 < len(args.items) else None, PList
    ):
        return None, None
    args.take("RETURN")
    opts = _Args(_plist(args.take("return options"), "RETURN"))
    names: list[str] = []
    partial = None
    while opts.more():
        node = opts.take("return option")
        name = node.text.upper() if isinstance(node, Atom) else ""
        if name not in ESEARCH_RETURNS:
            raise CommandError(f"Unknown SEARCH return option {getattr(node, 'text', '')}")
        if name == "PARTIAL":
            if partial is not None:
                raise CommandError("PARTIAL given twice")
            partial = _partial_range(opts.take("PARTIAL range"))
        names.append(name)
    if "PARTIAL" in names and "ALL" in names:
        raise CommandError("PARTIAL conflicts with ALL")  # RFC 5267 4.4, as Dovecot
    returns = tuple(dict.fromkeys(names))
    if not _RESULT_RETURNS.intersection(returns) and "UPDATE" not in returns:
        returns += ("ALL",)  # RETURN () and RETURN (CONTEXT): ALL (RFC 4731 3.1)
    return returns, partial


def _partial_range(node: Node) -> tuple[int, int]:
    """RFC 5267 4.4 ``partial-range = nz-number ":" nz-number`` (either order)."""
    text = node.text if isinstance(node, Atom) else ""
    lo, sep, hi = text.partition(":")
    if not (sep and lo.isdigit() and hi.isdigit() and lo.isascii() and hi.isascii()):
        raise CommandError("PARTIAL range broken")
    a, b = int(lo), int(hi)
    if not (0 < a < 2**32 and 0 < b < 2**32):
        raise CommandError("PARTIAL range broken")
    return (min(a, b), max(a, b))


def _p_search(args: _Args, utf8: bool, uid: bool = False) -> Search:
    charset = None
    returns, partial = _return_options(args)
    if args.peek_atom() == "CHARSET":
        args.take("CHARSET")
        charset = _charset(args)
    key = _SearchParser(charset).keys(args.items[args.i :], 0)
    return Search(key, charset, returns, uid, partial)


def _p_sort(args: _Args, utf8: bool, uid: bool = False) -> Sort:
    returns, partial = _return_options(args)  # ESORT (RFC 5267 3)
    criteria: list[tuple[str, bool]] = []
    reverse = False
    for name in _atoms_upper(_plist(args.take("sort criteria"), "sort criteria"), "criteria"):
        if name == "REVERSE" and not reverse:
            reverse = True
            continue
        if name not in SORT_CRITERIA:
            raise CommandError(f"Unknown sort criterion {name}")
        criteria.append((name, reverse))
        reverse = False
    if not criteria or reverse:
        raise CommandError("Invalid sort criteria")
    charset = _charset(args)
    key = _SearchParser(charset).keys(args.items[args.i :], 0)
    return Sort(tuple(criteria), charset, key, uid, returns, partial)


def _p_thread(args: _Args, utf8: bool, uid: bool = False) -> Thread:
    node = args.take("threading algorithm")
    algorithm = node.text.upper() if isinstance(node, Atom) else ""
    if algorithm not in THREAD_ALGORITHMS:
        raise CommandError("Unknown threading algorithm")
    charset = _charset(args)
    key = _SearchParser(charset).keys(args.items[args.i :], 0)
    return Thread(algorithm, charset, key, uid)


# -- FETCH ------------------------------------------------------------------------------------

_FETCH_MACROS = {
    "ALL": ("FLAGS", "INTERNALDATE", "RFC822.SIZE", "ENVELOPE"),
    "FAST": ("FLAGS", "INTERNALDATE", "RFC822.SIZE"),
    "FULL": ("FLAGS", "INTERNALDATE", "RFC822.SIZE", "ENVELOPE", "BODY"),
}
_FETCH_SIMPLE = frozenset(
    {"ENVELOPE", "FLAGS", "INTERNALDATE", "RFC822", "RFC822.HEADER", "RFC822.SIZE",
     "RFC822.TEXT", "BODY", "BODYSTRUCTURE", "UID", "MODSEQ"}
)  # fmt: skip
_SECTION_TEXTS = frozenset({"HEADER", "HEADER.FIELDS", "HEADER.FIELDS.NOT", "TEXT", "MIME"})


def _section_spec(items: tuple[Node, ...], binary: bool) -> SectionSpec:
    if not items:
        return SectionSpec()
    first = items[0]
    if not isinstance(first, (Atom, Number)):
        raise CommandError("Invalid section")
    parts = first.text.split(".")
    numbers: list[int] = []
    while parts and parts[0].isdigit() and parts[0].isascii():
        if parts[0].startswith("0") or len(parts[0]) > 10:
            raise CommandError("Invalid section part number")
        numbers.append(int(parts.pop(0)))
    text = ".".join(parts).upper() or None
    # RFC 3516's grammar has part numbers only for BINARY; like Dovecot (and imaptest) we
    # also take TEXT, MIME and the header sections there (see fetch.py).
    if text is not None and (text not in _SECTION_TEXTS or (text == "MIME" and not numbers)):
        raise CommandError("Invalid section")
    fields: tuple[str, ...] = ()
    if text in ("HEADER.FIELDS", "HEADER.FIELDS.NOT"):
        if len(items) != 2:
            raise CommandError("HEADER.FIELDS needs a list of field names")
        names = [_text(n, "header field name", True) for n in _plist(items[1], "field names")]
        if not names or any(not n or any(c in n for c in " :\t") for n in names):
            raise CommandError("Invalid header field names")
        fields = tuple(names)
    elif len(items) != 1:
        raise CommandError("Invalid section")
    return SectionSpec(tuple(numbers), text, fields)


def _fetch_att(node: Node) -> FetchAtt:
    if isinstance(node, Atom):
        name = node.text.upper()
        if name in _FETCH_SIMPLE:
            return FetchAtt(name)
        raise CommandError(f"Unknown FETCH item {node.text}")
    if isinstance(node, Section):
        base, _, suffix = node.name.partition(".")
        binary = base == "BINARY"
        section = _section_spec(node.items, binary)
        if node.name == "BINARY.SIZE":
            if node.partial is not None:
                raise CommandError("BINARY.SIZE takes no partial")
            return FetchAtt("BINARY.SIZE", section)
        return FetchAtt(base, section, node.partial, peek=suffix == "PEEK")
    raise CommandError("Invalid FETCH item")


def _p_fetch(args: _Args, utf8: bool, uid: bool = False) -> Fetch:
    sequence = _seqset(args.take("sequence set"))
    node = args.take("FETCH items")
    items: list[FetchAtt] = []
    if isinstance(node, Atom) and node.text.upper() in _FETCH_MACROS:
        items = [FetchAtt(n) for n in _FETCH_MACROS[node.text.upper()]]
    elif isinstance(node, PList):
        if not node.items:
            raise CommandError("Empty FETCH item list")
        items = [_fetch_att(n) for n in node.items]
    else:
        items = [_fetch_att(node)]
    changed_since = None
    vanished = False
    if args.more():
        mods = _Args(_plist(args.take("FETCH modifiers"), "FETCH modifiers"))
        while mods.more():
            name = mods.peek_atom()
            mods.take("modifier")
            if name == "CHANGEDSINCE" and changed_since is None:
                changed_since = _number(mods.take("mod-sequence"), "CHANGEDSINCE", bits=63)
            elif name == "VANISHED" and not vanished:
                vanished = True
            else:
                raise CommandError("Unknown FETCH modifier")
        if vanished and (not uid or changed_since is None):
            raise CommandError("VANISHED needs UID FETCH with CHANGEDSINCE")
    args.end()
    return Fetch(sequence, tuple(dict.fromkeys(items)), changed_since, vanished, uid)


def _p_store(args: _Args, utf8: bool, uid: bool = False) -> Store:
    sequence = _seqset(args.take("sequence set"))
    unchanged_since = None
    if isinstance(args.peek(), PList):
        mods = _Args(_plist(args.take("STORE modifiers"), "STORE modifiers"))
        if mods.peek_atom() != "UNCHANGEDSINCE":
            raise CommandError("Unknown STORE modifier")
        mods.take("UNCHANGEDSINCE")
        unchanged_since = _number(mods.take("mod-sequence"), "UNCHANGEDSINCE", bits=63)
        mods.end()
    item = args.take("STORE item")
    name = item.text.upper() if isinstance(item, Atom) else ""
    mode = name[:1] if name[:1] in ("+", "-") else ""
    base = name[len(mode) :]
    silent = base.endswith(".SILENT")
    if base.removesuffix(".SILENT") != "FLAGS":
        raise CommandError("Expected FLAGS, +FLAGS or -FLAGS")
    if isinstance(args.peek(), PList):
        flags = _flag_list(args.take("flags"))
        args.end()
    else:
        flags = tuple(dict.fromkeys(_flag(n) for n in args.items[args.i :]))
        if not flags:
            raise CommandError("Missing flags")
    return Store(sequence, mode, silent, flags, unchanged_since, uid)


def _p_copy_move(
    cls: type[Copy] | type[Move],
) -> Callable[[_Args, bool, bool], TypedCommand]:
    def parse(args: _Args, utf8: bool, uid: bool = False) -> TypedCommand:
        sequence = _seqset(args.take("sequence set"))
        mailbox = _mailbox(args, utf8)
        args.end()
        return cls(sequence, mailbox, uid)

    return parse


def _p_enable(args: _Args, utf8: bool) -> Enable:
    if not args.more():
        raise CommandError("Missing capabilities")
    return Enable(tuple(_atoms_upper(args.items, "ENABLE")))


def _p_id(args: _Args, utf8: bool) -> Id:
    node = args.take("ID parameters")
    args.end()
    if isinstance(node, Nil):
        return Id(None)
    items = _plist(node, "ID parameters")
    if len(items) % 2 or len(items) > 60:
        raise CommandError("ID needs up to 30 field/value pairs")
    params: list[tuple[str, str | None]] = []
    for i in range(0, len(items), 2):
        key, value = items[i], items[i + 1]
        if not isinstance(key, String) or len(key.value) > 30:
            raise CommandError("Invalid ID field")
        if isinstance(value, Nil):
            params.append((_text(key, "ID field"), None))
            continue
        if not isinstance(value, String) or len(value.value) > 1024:
            raise CommandError("Invalid ID value")
        params.append((_text(key, "ID field"), _text(value, "ID value")))
    return Id(tuple(params))


def _p_cancelupdate(args: _Args, utf8: bool) -> CancelUpdate:
    tags = []
    while args.more():
        node = args.take("tag")
        if not isinstance(node, String) or node.literal:
            raise CommandError("CANCELUPDATE takes quoted tags")
        tags.append(_text(node, "tag", ascii_only=True))
    if not tags:
        raise CommandError("Missing tag")
    return CancelUpdate(tuple(tags))


def _p_getquota(args: _Args, utf8: bool) -> GetQuota:
    root = _text(args.take("quota root"), "quota root")
    args.end()
    return GetQuota(root)


def _p_getquotaroot(args: _Args, utf8: bool) -> GetQuotaRoot:
    mailbox = _mailbox(args, utf8)
    args.end()
    return GetQuotaRoot(mailbox)


_NO_ARGS = frozenset(
    {"CAPABILITY", "NOOP", "LOGOUT", "STARTTLS", "CHECK", "CLOSE", "UNSELECT", "IDLE", "NAMESPACE",
     "UNAUTHENTICATE"}
)  # fmt: skip
_PARSERS: dict[str, Callable[[_Args, bool], TypedCommand]] = {
    "LOGIN": _p_login,
    "AUTHENTICATE": _p_authenticate,
    "SELECT": _p_select,
    "EXAMINE": lambda a, u: _p_select(a, u, readonly=True),
    "CREATE": _p_create,
    "DELETE": _p_one_mailbox(Delete),
    "RENAME": _p_rename,
    "SUBSCRIBE": _p_one_mailbox(Subscribe),
    "UNSUBSCRIBE": _p_one_mailbox(Unsubscribe),
    "LIST": _p_list,
    "LSUB": _p_lsub,
    "STATUS": _p_status,
    "APPEND": _p_append,
    "ENABLE": _p_enable,
    "ID": _p_id,
    "GETQUOTA": _p_getquota,
    "GETQUOTAROOT": _p_getquotaroot,
    "CANCELUPDATE": _p_cancelupdate,
}
_UID_PARSERS: dict[str, Callable[[_Args, bool, bool], TypedCommand]] = {
    "FETCH": _p_fetch,
    "SEARCH": _p_search,
    "STORE": _p_store,
    "COPY": _p_copy_move(Copy),
    "MOVE": _p_copy_move(Move),
    "EXPUNGE": _p_expunge,
    "SORT": _p_sort,
    "THREAD": _p_thread,
}
COMMAND_NAMES = _NO_ARGS | _PARSERS.keys() | _UID_PARSERS.keys()


def _check_literals(args: tuple[Node, ...], append: bool, utf8_data: bool = False) -> None:
    """NUL octets travel only in a literal8, and a literal8 only as APPEND's message data
    (RFC 3516 4.4, RFC 3501 CHAR8; inside ``UTF8 (...)``, RFC 6855 4): anything else is
    BAD."""
    for n, node in enumerate(args):
        if isinstance(node, String):
            if node.binary and not (utf8_data or (append and n > 0)):
                raise CommandError("A literal8 is allowed only for APPEND message data")
            if not node.binary and b"\0" in node.value:
                raise CommandError("NUL octets need a literal8 (~{n})")
        elif isinstance(node, PList | Section):
            inner = append and n > 0 and _is_atom(args[n - 1], "UTF8")
            _check_literals(node.items, False, inner)


def _is_atom(node: Node, text: str) -> bool:
    return isinstance(node, Atom) and node.text.upper() == text


def parse_command(command: Command, utf8: bool = False) -> TypedCommand:
    """The typed form of ``command``; CommandError when its arguments are invalid or the
    command is unknown. ``utf8``: UTF8=ACCEPT is enabled (mailbox names are UTF-8, not
    modified UTF-7)."""
    args = _Args(command.args)
    name = command.name
    _check_literals(command.args, name == "APPEND")
    if name in _UID_PARSERS:
        if name == "EXPUNGE" and not command.uid:
            args.end()
            return Expunge()
        return _UID_PARSERS[name](args, utf8, command.uid)
    if command.uid:
        raise CommandError(f"UID {name} is not a command")
    if name in _NO_ARGS:
        args.end()
        return Simple(name)
    parser = _PARSERS.get(name)
    if parser is None:
        raise CommandError("Unknown command")
    return parser(args, utf8)
