"""Maildir file level: Dovecot-style unique names, ``:2,`` flag suffixes, durable writes."""

from __future__ import annotations

import contextlib
import itertools
import os
import threading
import time
from collections.abc import Iterable
from typing import BinaryIO

# IMAP system flags stored as Maildir info letters (sorted by letter in file names).
FLAG_LETTERS = {
    "\\Draft": "D",
    "\\Flagged": "F",
    "\\Answered": "R",
    "\\Seen": "S",
    "\\Deleted": "T",
}
LETTER_FLAGS = {v: k for k, v in FLAG_LETTERS.items()}
_SYSTEM_BY_LOWER = {f.lower(): f for f in FLAG_LETTERS}
RECENT = "\\Recent"

# Characters an IMAP flag-keyword (atom) may not contain.
_ATOM_SPECIALS = frozenset('(){ %*"\\]')

COPY_CHUNK = 1 << 20
SUBDIRS = ("cur", "new", "tmp")
INFO_SEP = ":"


def normalize_flags(flags: Iterable[str]) -> frozenset[str]:
    """Canonical flag set: system flags in their canonical case, keywords as given.

    ``\\Recent`` is per-session and silently dropped. ValueError for unknown ``\\`` flags
    and keywords that are not IMAP atoms.
    """
    out: set[str] = set()
    for flag in flags:
        if not isinstance(flag, str) or not flag:
            raise ValueError(f"invalid flag {flag!r}")
        if flag.startswith("\\"):
            lower = flag.lower()
            if lower == RECENT.lower():
                continue
            canonical = _SYSTEM_BY_LOWER.get(lower)
            if canonical is None:
                raise ValueError(f"unknown system flag {flag!r}")
            out.add(canonical)
            continue
        for ch in flag:
            if ord(ch) <= 0x20 or ord(ch) >= 0x7F or ch in _ATOM_SPECIALS:
                raise ValueError(f"invalid keyword {flag!r}")
        out.add(flag)
    return frozenset(out)


def flags_to_text(flags: frozenset[str]) -> str:
    """Index representation: space-separated, sorted."""
    return " ".join(sorted(flags))


def flags_from_text(text: str) -> frozenset[str]:
    return frozenset(text.split()) if text else frozenset()


def split_filename(name: str) -> tuple[str, str | None]:
    """``base,S=..:2,FS`` -> (``base,S=..``, ``FS``); info is None when there is no ``:2,``."""
    base, sep, info = name.partition(INFO_SEP)
    if not sep or not info.startswith("2,"):
        return base, None
    return base, info[2:]


def system_flags_from_info(info: str | None) -> frozenset[str]:
    """System flags named by the letters of a ``:2,`` suffix (other letters are ignored)."""
    if not info:
        return frozenset()
    return frozenset(LETTER_FLAGS[ch] for ch in info if ch in LETTER_FLAGS)


def info_for(flags: frozenset[str], old_info: str | None = None) -> str:
    """Sorted info letters for ``flags``, keeping letters we do not own (Dovecot keywords
    ``a``-``z``) from ``old_info``."""
    letters = {FLAG_LETTERS[f] for f in flags if f in FLAG_LETTERS}
    if old_info:
        letters.update(ch for ch in old_info if ch not in LETTER_FLAGS and ch.isalpha())
    return "".join(sorted(letters))


def rel_name(base: str, flags: frozenset[str], old_info: str | None = None) -> str:
    """Path relative to the folder: ``new/base`` for a new message without flags, else
    ``cur/base:2,LETTERS``."""
    if not flags and old_info is None:
        return f"new/{base}"
    info = info_for(flags, old_info)
    return f"cur/{base}{INFO_SEP}2,{info}"


def escape_hostname(hostname: str) -> str:
    """Host part of a Maildir name with ``/``, ``:`` and ``,`` escaped as Dovecot does."""
    return hostname.replace("/", "\\057").replace(":", "\\072").replace(",", "\\054") or "localhost"


class UniqueNames:
    """Unique name heads ``<time>.M<usec>P<pid>Q<counter>.<host>`` for this process."""

    def __init__(self, hostname: str) -> None:
        self._host = escape_hostname(hostname)
        self._counter = itertools.count(1)

    def next(self) -> str:
        now = time.time()
        sec = int(now)
        usec = int((now - sec) * 1_000_000)
        return f"{sec}.M{usec}P{os.getpid()}Q{next(self._counter)}.{self._host}"


def full_base(head: str, size: int, vsize: int) -> str:
    return f"{head},S={size},W={vsize}"


class _VirtualSize:
    """Counts what the size would be with every bare LF turned into CRLF (Dovecot's W=)."""

    def __init__(self) -> None:
        self.size = 0
        self.lf = 0
        self.crlf = 0
        self._last_cr = False

    def feed(self, chunk: bytes) -> None:
        if not chunk:
            return
        self.size += len(chunk)
        self.lf += chunk.count(b"\n")
        self.crlf += chunk.count(b"\r\n")
        if self._last_cr and chunk[0] == 0x0A:
            self.crlf += 1
        self._last_cr = chunk[-1] == 0x0D

    @property
    def vsize(self) -> int:
        return self.size + self.lf - self.crlf


def write_file(
    path: str, prefix: bytes, src: BinaryIO | None, data: bytes | None = None
) -> tuple[int, int, float]:
    """Create ``path`` exclusively with ``prefix`` + ``src``'s bytes (or ``data``), flush and
    fsync it. Returns (size, virtual size, mtime). On error the file is removed."""
    counter = _VirtualSize()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    try:
        with os.fdopen(fd, "wb", buffering=0, closefd=True) as out:
            for chunk in (prefix, data):
                if chunk:
                    counter.feed(chunk)
                    _write_all(out, chunk)
            if src is not None:
                while True:
                    chunk = src.read(COPY_CHUNK)
                    if not chunk:
                        break
                    counter.feed(chunk)
                    _write_all(out, chunk)
            os.fsync(out.fileno())
            mtime = os.fstat(out.fileno()).st_mtime
    except BaseException:
        unlink_quiet(path)
        raise
    return counter.size, counter.vsize, mtime


def _write_all(out: BinaryIO, chunk: bytes) -> None:
    view = memoryview(chunk)
    while view:
        written = out.write(view)
        if written is None:  # pragma: no cover - only for non-blocking files
            continue
        view = view[written:]


def fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class _Round:
    """One fsync of a directory and the callers it serves."""

    __slots__ = ("done", "error")

    def __init__(self) -> None:
        self.done = False
        self.error: OSError | None = None


class _DirState:
    __slots__ = ("running", "next")

    def __init__(self) -> None:
        self.running: _Round | None = None
        self.next: _Round | None = None


class GroupSync:
    """Directory fsyncs shared by concurrent callers (group commit), for any thread.

    ``sync(path)`` returns once an fsync of ``path`` that *started after the call* has
    finished, so every change made to the directory before the call is durable, as with
    ``fsync_dir``. While one fsync of a directory runs, the callers arriving meanwhile join
    the next round, and one of them makes that round's single fsync for all of them: with
    N deliveries into one ``new/`` at once, about two fsyncs of it are made instead of N.
    A failed fsync raises its OSError in every caller of its round.
    """

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._dirs: dict[str, _DirState] = {}
        self.fsyncs = 0
        """Directory fsyncs made so far (for tests and statistics)."""
        self.calls = 0
        """``sync`` calls so far."""

    def sync(self, path: str) -> None:
        """fsync ``path``, or wait for a shared fsync of it that started after this call."""
        with self._cond:
            self.calls += 1
            state = self._dirs.get(path)
            if state is None:
                state = self._dirs[path] = _DirState()
            if state.running is None and state.next is None:
                mine = _Round()
            else:
                if state.next is None:
                    state.next = _Round()
                mine = state.next
            while not mine.done:
                if state.running is None:
                    # Nobody is flushing the directory: make this round's fsync.
                    if state.next is mine:
                        state.next = None
                    state.running = mine
                    break
                self._cond.wait()
            else:
                if mine.error is not None:
                    raise mine.error
                return
        error: OSError | None = None
        try:
            fsync_dir(path)
        except BaseException as e:
            error = e if isinstance(e, OSError) else OSError(f"fsync of {path} failed: {e!r}")
            raise
        finally:
            with self._cond:
                self.fsyncs += 1
                mine.error = error
                mine.done = True
                state.running = None
                if state.next is None:
                    del self._dirs[path]
                self._cond.notify_all()


def unlink_quiet(path: str) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)


def make_maildir(path: str, subfolder: bool) -> None:
    """Create ``cur/ new/ tmp/`` (and the ``maildirfolder`` marker for Maildir++ folders)."""
    for sub in SUBDIRS:
        os.makedirs(os.path.join(path, sub), mode=0o700, exist_ok=True)
    if subfolder:
        marker = os.path.join(path, "maildirfolder")
        if not os.path.exists(marker):
            with open(marker, "ab"):
                pass


def list_files(path: str) -> dict[str, str]:
    """Base name -> path relative to the folder (``new/..`` or ``cur/..``) of every message
    file. Hidden entries are skipped; when a base appears twice the ``cur/`` one wins."""
    files: dict[str, str] = {}
    for sub in ("new", "cur"):
        for name in os.listdir(os.path.join(path, sub)):
            if name.startswith("."):
                continue
            base, _info = split_filename(name)
            files[base] = f"{sub}/{name}"
    return files


def sort_key(base: str) -> tuple[int, str]:
    """Delivery order of a Maildir name: its leading timestamp, then the name."""
    head = base.split(".", 1)[0]
    return (int(head) if head.isdigit() else 0, base)
