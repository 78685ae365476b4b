"""The node's journal sequencer: ``data_dir/journal/seq`` hands out sequence numbers to the
writers of every process, and ``data_dir/journal/routes/`` says which database holds each.

A writer takes the exclusive lock (``flock`` on ``seq``; a thread lock first, since flock
locks belong to an open file) just before its SQLite COMMIT, allocates its numbers, appends one
route line ``FIRST COUNT PID DB`` (DB relative to the data directory), inserts its journal
rows, commits, and only then releases the lock: commit order is sequence order on the node.
A reader takes the shared lock for a moment to read the counter and the route log's length:
no writer is then between allocation and COMMIT, so every route line up to that length
belongs to a transaction that committed (its rows are there) or rolled back (they are not:
a gap), never to one still in flight.

The counter is written to ``seq`` at each allocation (no fsync: a killed process loses nothing
the kernel holds); a reservation mark ``RESERVE`` numbers ahead is fsynced before any number
past the previous mark is handed out, and the boot ID is recorded with it. After a reboot
(a power failure may have lost the unsynced counter) the counter restarts at the mark, so no
number is ever handed out twice.

Route lines are not fsynced either (no extra fsync per message): after a power failure the
last route lines may be lost while their rows survived in WAL; on the first allocation after
a reboot the sequencer finds such rows again (``recover``) by looking in every database of the
data directory for numbers above the last route line.
"""

from __future__ import annotations

import fcntl
import os
import sqlite3
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass

SEQ_NAME = "seq"
ROUTES_DIR = "routes"
PRUNED_NAME = "pruned"
"""The highest number a writer's retention prune deleted from a database (text)."""
RESERVE = 4096
"""How far ahead of the counter the fsynced reservation mark runs."""
SEGMENT_BYTES = 4 << 20
"""A route segment past this size is closed and a new one started."""
DEFAULT_RETENTION = 7 * 86400.0
_STATE_BYTES = 256


def boot_id() -> str:
    """This boot's ID (Linux), or "" where there is none (then every mark is fsynced)."""
    try:
        with open("/proc/sys/kernel/random/boot_id") as fh:
            return fh.read().strip()
    except OSError:
        return ""


BOOT_ID = boot_id()


@dataclass
class State:
    """The contents of ``seq``: the next number, the fsynced mark, the boot it was written
    in, the first number of the current route segment, the retention (seconds)."""

    next: int = 1
    mark: int = 0
    boot: str = ""
    segment: int = 1
    retention: float = DEFAULT_RETENTION

    def encode(self) -> bytes:
        text = f"mailgw-journal 1 {self.next} {self.mark} {self.boot or '-'} {self.segment} {self.retention}\n"
        return text.encode("ascii").ljust(_STATE_BYTES, b" ")

    @classmethod
    def decode(cls, data: bytes) -> State:
        words = data.decode("ascii", "replace").split()
        if not words:
            return cls()
        if len(words) != 7 or words[:2] != ["mailgw-journal", "1"]:
            raise ValueError(f"journal sequencer state unreadable: {data[:80]!r}")
        boot = "" if words[4] == "-" else words[4]
        return cls(int(words[2]), int(words[3]), boot, int(words[5]), float(words[6]))


@dataclass(frozen=True)
class Route:
    """One route line: numbers ``first`` .. ``first + count - 1`` went to database ``db``
    (relative to the data directory), written by process ``pid``."""

    first: int
    count: int
    pid: int
    db: str

    @property
    def last(self) -> int:
        return self.first + self.count - 1


def segment_name(first: int) -> str:
    return f"{first:020d}.log"


def parse_route(line: bytes) -> Route | None:
    """A route line, or None for a torn or damaged one."""
    parts = line.rstrip(b"\n").split(b"\t")
    if len(parts) != 4 or not line.endswith(b"\n"):
        return None
    try:
        return Route(int(parts[0]), int(parts[1]), int(parts[2]), parts[3].decode("utf-8"))
    except (ValueError, UnicodeDecodeError):
        return None


class Sequencer:
    """The sequencer of one journal directory, shared by the writers of this process
    (``for_dir``, ``release``); see the module text."""

    _instances: dict[tuple[int, str], Sequencer] = {}
    _users: dict[tuple[int, str], int] = {}
    _instances_lock = threading.Lock()

    @classmethod
    def for_dir(cls, path: str) -> Sequencer:
        """The one sequencer of ``path`` in this process (one more user of it)."""
        os.makedirs(os.path.join(path, ROUTES_DIR), mode=0o750, exist_ok=True)
        key = (os.getpid(), os.path.realpath(path))
        with cls._instances_lock:
            found = cls._instances.get(key)
            if found is None:
                found = cls._instances[key] = cls(path)
            cls._users[key] = cls._users.get(key, 0) + 1
            return found

    @classmethod
    def release(cls, sequencer: Sequencer) -> None:
        """One user of ``sequencer`` (from ``for_dir``) is done with it; the last one closes
        its files. A process that opens many data directories (the admin command's entry
        point called in a test process, a tool) keeps no descriptors of closed ones."""
        key = sequencer._key
        with cls._instances_lock:
            left = cls._users.get(key, 0) - 1
            if left > 0:
                cls._users[key] = left
                return
            cls._users.pop(key, None)
            if cls._instances.get(key) is sequencer:
                del cls._instances[key]
        sequencer.close()

    def __init__(self, path: str) -> None:
        self.path = os.path.abspath(path)
        self.data_dir = os.path.dirname(self.path)
        self.routes = os.path.join(self.path, ROUTES_DIR)
        os.makedirs(self.routes, mode=0o750, exist_ok=True)
        seq_path = os.path.join(self.path, SEQ_NAME)
        # Two descriptors: flock locks belong to the open file, so the writer's exclusive lock
        # and a reader's shared one (maybe in another thread of this process) must not share
        # one or the second would convert the first.
        self._fd = os.open(seq_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o640)
        self._read_fd = os.open(seq_path, os.O_RDONLY | os.O_CLOEXEC)
        self._lock = threading.Lock()
        self._read_lock = threading.Lock()
        self._route_fd = -1
        self._route_segment = 0
        self._key = (os.getpid(), os.path.realpath(path))

    def close(self) -> None:
        """Close the sequence file and the open route segment (``release`` calls it)."""
        with self._lock, self._read_lock:
            for fd in (self._fd, self._read_fd, self._route_fd):
                if fd >= 0:
                    os.close(fd)
            self._fd = self._read_fd = self._route_fd = -1

    @property
    def pid(self) -> int:
        """This process (read each time: twistd may fork after the sequencer was opened)."""
        return os.getpid()

    # -- writers ------------------------------------------------------------------------------

    def begin(self) -> None:
        """Take the exclusive lock (blocks while another writer holds it)."""
        self._lock.acquire()
        try:
            fcntl.flock(self._fd, fcntl.LOCK_EX)
        except BaseException:
            self._lock.release()
            raise

    def end(self) -> None:
        """Release the lock taken by ``begin`` (after the COMMIT or ROLLBACK)."""
        try:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
        finally:
            self._lock.release()

    def _read_state(self, fd: int) -> State:
        return State.decode(os.pread(fd, _STATE_BYTES, 0))

    def _write_state(self, state: State, sync: bool) -> None:
        os.pwrite(self._fd, state.encode(), 0)
        if sync:
            os.fsync(self._fd)

    def allocate(self, count: int, db: str, above: int = 0) -> int:
        """Under the lock: reserve ``count`` numbers for database ``db`` (relative to the data
        directory) and route them; returns the first, which is greater than ``above`` (the
        highest number already in ``db``)."""
        state = self._read_state(self._fd)
        sync = False
        if state.boot != BOOT_ID or not BOOT_ID:
            if state.boot != BOOT_ID and state.mark:
                # A new boot: the unsynced counter may be behind what was handed out.
                self._recover(state)
            state.next = max(state.next, state.mark, 1)
            state.boot = BOOT_ID
            sync = True
        first = state.next = max(state.next, above + 1)
        state.next += count
        if state.next > state.mark or sync:
            state.mark = state.next + RESERVE
            sync = True
        fd = self._route(state, first)
        self._write_state(state, sync)
        os.write(fd, f"{first}\t{count}\t{self.pid}\t{db}\n".encode())
        return first

    def set_retention(self, seconds: float) -> None:
        """Record how long entries are kept (the node's ``[store] journal_retention``); every
        writer of the node prunes by it."""
        self.begin()
        try:
            state = self._read_state(self._fd)
            if state.retention != seconds:
                state.retention = seconds
                self._write_state(state, False)
        finally:
            self.end()

    def record_pruned(self, seq: int) -> None:
        """Under the lock (after the pruning transaction committed): numbers up to ``seq``
        may be gone from the databases."""
        if seq <= self.pruned():
            return
        path = os.path.join(self.path, PRUNED_NAME)
        tmp = f"{path}.{self.pid}.tmp"
        with open(tmp, "w") as fh:
            fh.write(f"{seq}\n")
        os.replace(tmp, path)

    def pruned(self) -> int:
        """The highest number retention pruning may have deleted (0: none)."""
        try:
            with open(os.path.join(self.path, PRUNED_NAME)) as fh:
                return int(fh.read().strip() or 0)
        except (FileNotFoundError, ValueError):
            return 0

    def retention(self) -> float:
        """The retention recorded in the state (read without the lock)."""
        try:
            return self._read_state(self._read_fd).retention
        except ValueError:
            return DEFAULT_RETENTION

    def _route(self, state: State, first: int) -> int:
        """The descriptor of the current route segment (a new one past ``SEGMENT_BYTES``, then
        segments idle longer than the retention are removed)."""
        if self._route_fd >= 0 and self._route_segment != state.segment:
            os.close(self._route_fd)
            self._route_fd = -1
        if self._route_fd < 0:
            self._route_fd = os.open(
                os.path.join(self.routes, segment_name(state.segment)),
                os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC,
                0o640,
            )
            self._route_segment = state.segment
        if os.fstat(self._route_fd).st_size < SEGMENT_BYTES:
            return self._route_fd
        os.close(self._route_fd)
        state.segment = first
        self._route_fd = os.open(
            os.path.join(self.routes, segment_name(first)),
            os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC,
            0o640,
        )
        self._route_segment = first
        self._prune_segments(state)
        return self._route_fd

    def _prune_segments(self, state: State) -> None:
        limit = time.time() - state.retention
        for name in self.segments()[:-1]:
            path = os.path.join(self.routes, name)
            with suppress(FileNotFoundError):
                if os.stat(path).st_mtime < limit:
                    os.unlink(path)

    def _recover(self, state: State) -> None:
        """After a reboot: route lines for rows above the last route line (lost with the page
        cache while their rows survived) are found in the databases and appended."""
        last = 0
        names = self.segments()
        if names:
            with open(os.path.join(self.routes, names[-1]), "rb") as fh:
                for line in fh:
                    route = parse_route(line)
                    if route is not None:
                        last = max(last, route.last)
        found: list[tuple[int, str]] = []
        for db in self._databases():
            try:
                conn = sqlite3.connect(f"file:{os.path.join(self.data_dir, db)}?mode=rw", uri=True)
            except sqlite3.Error:
                continue
            try:
                rows = conn.execute("SELECT seq FROM journal WHERE seq > ?", (last,)).fetchall()
            except sqlite3.Error:
                rows = []
            finally:
                conn.close()
            found += [(int(r[0]), db) for r in rows]
        if not found:
            return
        fd = self._route(state, min(s for s, _ in found))
        os.write(fd, b"".join(f"{s}\t1\t0\t{db}\n".encode() for s, db in sorted(found)))
        os.fsync(fd)

    def _databases(self) -> list[str]:
        """Every journaled database of the data directory (relative names): the directory's
        and each user's index."""
        found = []
        for name in ("directory.sqlite",):
            if os.path.isfile(os.path.join(self.data_dir, name)):
                found.append(name)
        mail = os.path.join(self.data_dir, "mail")
        for domain in sorted(os.listdir(mail)) if os.path.isdir(mail) else []:
            ddir = os.path.join(mail, domain)
            if domain.startswith(".") or not os.path.isdir(ddir):
                continue
            for local in sorted(os.listdir(ddir)):
                rel = os.path.join("mail", domain, local, "mailgw-index.sqlite")
                if os.path.isfile(os.path.join(self.data_dir, rel)):
                    found.append(rel)
        return found

    # -- readers ------------------------------------------------------------------------------

    def segments(self) -> list[str]:
        """The route segments' names, oldest first."""
        return sorted(n for n in os.listdir(self.routes) if n.endswith(".log"))

    @contextmanager
    def shared(self, blocking: bool = True) -> Iterator[State]:
        """Hold the shared lock (no writer between allocation and COMMIT meanwhile) and yield
        the state. BlockingIOError when not ``blocking`` and a writer holds the lock."""
        with self._read_lock:
            fcntl.flock(self._read_fd, fcntl.LOCK_SH | (0 if blocking else fcntl.LOCK_NB))
            try:
                yield self._read_state(self._read_fd)
            finally:
                fcntl.flock(self._read_fd, fcntl.LOCK_UN)
