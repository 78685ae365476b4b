"""The durable queue on disk: one file per message, state names that are hard links to it.

Layout under ``root`` (``data_dir/spool``)::

    tmp/                 files being written: <qid>.content (a message too large to be
                         held in memory), <qid>.env, <qid>.<n>
    incoming/<qid>.msg   the queue file: a header line, the envelope (JSON of
                         ``Envelope.to_json()``) and the message bytes; immutable once
                         committed, it stays here whatever the message's state (``list``
                         ignores these names)
    incoming/<qid>       the message's state entry: its directory IS the message's state.
    active/<qid>         At commit it is a hard link to the queue file (whose envelope is
    deferred/<qid>       the message's); an envelope update replaces it by an envelope file
    hold/<qid>           (header line and envelope, no content) that says where the content
    corrupt/<qid>        starts in ``<qid>.msg``
    outbound/<qid>       handed to the relay (fresh), owned by ``mailgw.relay.scheduler``
    retry/<qid>          relay mail waiting for its next attempt (``envelope.next_attempt``)

The header line is ``MGWQ1 C <envelope length>`` in a queue file (the content follows the
envelope) and ``MGWQ1 E <envelope length> <content offset>`` in an envelope file. A state
entry of the previous layout (the envelope's JSON alone, content from offset 0 of
``<qid>.msg``) is still read as such: an old spool needs no conversion. The message bytes are
``QueuedMessage.content_path`` from ``QueuedMessage.content_offset`` to the end; readers use
``QueuedMessage.open_content`` (or seek to the offset), never the start of the file.

Local delivery owns ``incoming``/``deferred``; the relay owns ``outbound``/``retry``; both use
``active`` while working on a message (recovery sends ``active`` back to ``incoming``, whose
dispatcher hands external recipients to the relay again: nothing is lost or sent twice).

A state change is one ``rename`` of the state entry between state directories, followed by an
fsync of both directories. An envelope update writes ``tmp/<qid>.<n>``, fsyncs it and renames
it over the state entry. ``commit`` writes the queue file ``incoming/<qid>.msg`` and fsyncs it
(one flush for content and envelope), then ``GroupCommit`` links it as ``incoming/<qid>`` and
makes both names durable with ONE fsync of ``incoming/`` shared by every commit of the group:
two flushes per message, the second shared. Until that fsync has returned no 250 is sent. A
crash before it may leave a queue file without its state entry (``recover`` removes it: the
client was never told the message was accepted) or, in theory, the entry without the
``.msg`` name (``recover`` links the name again: the entry is the whole message). A message
too large to be kept in memory has been spilled into ``tmp/``: it is renamed as
``<qid>.msg`` (content only) and gets an envelope file, one flush more. ``tmp/`` is never
fsynced: whatever is left there after a crash is removed by ``recover``. A spool whose
content lived in ``content/<qid>`` is migrated by ``recover``.

Removals are grouped too (``RemovalCommit``): the state entries of concurrent removals are
unlinked, each directory concerned is fsynced once for the group, and only then are the
``.msg`` names unlinked (an orphan ``.msg`` left by a crash is removed by ``recover``); a
removal returns when its entry's unlink is durable, as before, so a removed message comes
back after a crash only if the crash came before ``remove`` returned.

A message being received stays in memory up to ``memory_limit`` bytes (then it spills into
``tmp/``). ``commit`` runs its file work through the spool's *runner* (``mailgw.runtime.threads``;
a thread pool in the server). The other operations are synchronous and thread-safe (local
delivery calls them from worker threads); the queue IDs of different threads' calls must
differ.

One process owns a spool root at a time: ``recover`` (run at start-up, before listening)
assumes nobody else is writing into the same root.
"""

from __future__ import annotations

import abc
import builtins
import contextlib
import io
import itertools
import json
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import IO, Any, Generic, TypeVar

from twisted.internet.defer import Deferred
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from mailgw.interfaces import IIncomingMessage, ISpool
from mailgw.model import Envelope, QueuedMessage
from mailgw.runtime.metrics import SPOOL_COMMIT_SECONDS
from mailgw.runtime.threads import Runner, run_inline
from mailgw.spool.queueid import QueueIdGenerator, is_queue_id

log = Logger(namespace="mailgw.spool")

_WRITE_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0)
_REPLACE_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_TRUNC | getattr(os, "O_CLOEXEC", 0)
_CONTENT_BUFFER = 64 * 1024
CONTENT_SUFFIX = ".msg"
"""Suffix of the content file ``incoming/<qid>.msg`` (not a queue ID: ``list`` skips it)."""
MEMORY_LIMIT = 256 * 1024
"""Bytes of a message being received that are kept in memory before spilling to ``tmp/``."""


class CorruptEnvelope(ValueError):
    """The envelope file of a queued message cannot be parsed."""


# json.dumps with these arguments, without building an encoder for every message
_ENVELOPE_JSON = json.JSONEncoder(ensure_ascii=False, separators=(",", ":"))


def encode_envelope(envelope: Envelope) -> bytes:
    """The envelope file's bytes (compact UTF-8 JSON)."""
    return _ENVELOPE_JSON.encode(envelope.to_json()).encode()


def decode_envelope(data: bytes, queue_id: str) -> Envelope:
    """Parse an envelope file; raise CorruptEnvelope when it is not a valid envelope."""
    try:
        raw = json.loads(data.decode("utf-8"))
        if not isinstance(raw, dict):
            raise TypeError("not a JSON object")
        envelope = Envelope.from_json(raw)
    except (ValueError, TypeError) as e:
        raise CorruptEnvelope(f"{queue_id}: unreadable envelope: {e}") from None
    if not isinstance(envelope.sender, str) or not isinstance(envelope.recipients, list):
        raise CorruptEnvelope(f"{queue_id}: envelope has a bad sender or recipient list")
    if not all(isinstance(r, str) for r in envelope.recipients + envelope.done):
        raise CorruptEnvelope(f"{queue_id}: envelope has a non-text recipient")
    envelope.queue_id = queue_id
    return envelope


def _write_file(path: str, data: bytes, flags: int = _WRITE_FLAGS) -> None:
    """Create ``path`` with ``data`` and fsync it (not its directory); on an error after
    the file was created it is removed again."""
    fd = os.open(path, flags, 0o600)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
        os.fsync(fd)
    except BaseException:
        os.close(fd)
        _unlink_quietly(path)
        raise
    os.close(fd)


def _unlink_quietly(path: str) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)


_MAGIC = b"MGWQ1 "
_HEAD_READ = 4096
"""Bytes read first from a state entry (the header line and, usually, the whole envelope)."""


def queue_file_header(envelope: bytes) -> bytes:
    """The start of a queue file (header line and envelope); the content follows."""
    return b"%sC %d\n%s" % (_MAGIC, len(envelope), envelope)


def envelope_file(envelope: bytes, content_offset: int) -> bytes:
    """An envelope file's bytes: its content is ``<qid>.msg`` from ``content_offset``."""
    return b"%sE %d %d\n%s" % (_MAGIC, len(envelope), content_offset, envelope)


def read_state_entry(path: str, queue_id: str) -> tuple[Envelope, bool, int]:
    """(envelope, whether the entry is the queue file itself, content offset in the queue
    file) of the state entry ``path``. FileNotFoundError when it is missing,
    CorruptEnvelope when it cannot be parsed."""
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
    try:
        data = os.read(fd, _HEAD_READ)
        if not data.startswith(_MAGIC):  # the previous layout: the envelope's JSON alone
            parts = [data]
            while block := os.read(fd, _CONTENT_BUFFER):
                parts.append(block)
            return decode_envelope(b"".join(parts), queue_id), False, 0
        eol = data.find(b"\n", 0, 64)
        fields = data[len(_MAGIC) : eol].split(b" ") if eol > 0 else []
        try:
            kind = fields[0]
            length = int(fields[1])
            offset = int(fields[2]) if kind == b"E" and len(fields) == 3 else -1
            if (kind == b"C") != (len(fields) == 2) or length < 0:
                raise ValueError
        except (IndexError, ValueError):
            raise CorruptEnvelope(f"{queue_id}: bad header line in the queue file") from None
        start, end = eol + 1, eol + 1 + length
        while len(data) < end:
            block = os.pread(fd, end - len(data), len(data))
            if not block:
                raise CorruptEnvelope(f"{queue_id}: truncated envelope")
            data += block
    finally:
        os.close(fd)
    envelope = decode_envelope(data[start:end], queue_id)
    if kind == b"C":
        return envelope, True, end
    if offset < 0:
        raise CorruptEnvelope(f"{queue_id}: bad content offset")
    return envelope, False, offset


@implementer(ISpool)
class Spool:
    """The durable queue rooted at ``root`` (see the module docstring for the layout)."""

    STATES = ("incoming", "active", "deferred", "hold", "corrupt", "outbound", "retry")

    def __init__(
        self,
        root: str,
        hostname: str = "localhost",
        run: Runner = run_inline,
        memory_limit: int = MEMORY_LIMIT,
    ) -> None:
        self.root = os.path.abspath(root)
        self.hostname = hostname
        self.run = run
        self.memory_limit = memory_limit
        self._ids = QueueIdGenerator()
        self._listeners: list[Callable[[str], object]] = []
        self._update_counter = itertools.count(1)
        self._dirfds: dict[str, int] = {}
        self._dirfds_lock = threading.Lock()
        self.group_commit = GroupCommit(self)
        self.removals = RemovalCommit(self)
        self.tmp_dir = os.path.join(self.root, "tmp")
        self.content_dir = os.path.join(self.root, "incoming")
        self.legacy_content_dir = os.path.join(self.root, "content")
        """Where an older layout kept the content; ``recover`` migrates it."""
        created = False
        for name in ("tmp", *self.STATES):
            path = os.path.join(self.root, name)
            if not os.path.isdir(path):
                os.makedirs(path, mode=0o700, exist_ok=True)
                created = True
        if created:
            self._fsync_path(self.root)
            self._fsync_path(os.path.dirname(self.root))

    # -- paths and fsync -------------------------------------------------------------------

    def envelope_path(self, state: str, queue_id: str) -> str:
        """The state entry of ``queue_id`` in ``state``."""
        return os.path.join(self.root, state, queue_id)

    def content_path(self, queue_id: str) -> str:
        """The queue file of ``queue_id`` (the same path in every state); the message bytes
        start at ``load(queue_id).content_offset``."""
        return os.path.join(self.content_dir, queue_id + CONTENT_SUFFIX)

    def fsync_dir(self, name: str) -> None:
        """fsync the directory ``root/name`` (its descriptor is kept open for reuse)."""
        fd = self._dirfds.get(name)
        if fd is None:
            with self._dirfds_lock:
                fd = self._dirfds.get(name)
                if fd is None:
                    fd = os.open(
                        os.path.join(self.root, name),
                        os.O_RDONLY | os.O_DIRECTORY | getattr(os, "O_CLOEXEC", 0),
                    )
                    self._dirfds[name] = fd
        os.fsync(fd)

    @staticmethod
    def _fsync_path(path: str) -> None:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

    def close(self) -> None:
        """Close the directory descriptors kept for fsync (the spool stays usable)."""
        with self._dirfds_lock:
            fds, self._dirfds = self._dirfds, {}
        for fd in fds.values():
            os.close(fd)

    def _check_state(self, state: str) -> None:
        if state not in self.STATES:
            raise ValueError(f"unknown spool state {state!r}")

    def _states(self, state: str | None) -> tuple[str, ...]:
        """The states to look in: ``state`` (where the caller last saw the message) first,
        then the others (only when it is no longer there)."""
        if state is None:
            return self.STATES
        self._check_state(state)
        return (state, *(s for s in self.STATES if s != state))

    def _locate(self, queue_id: str, state: str | None = None) -> str:
        """The state holding ``queue_id``; KeyError when none does."""
        if is_queue_id(queue_id):
            for where in self._states(state):
                if os.path.exists(self.envelope_path(where, queue_id)):
                    return where
        raise KeyError(queue_id)

    # -- ISpool ----------------------------------------------------------------------------

    def begin(self) -> IncomingMessage:
        """A new message with a fresh queue ID; no file exists for it before it grows over
        ``memory_limit`` or is committed. Call from one thread (the reactor's)."""
        return IncomingMessage(self, self._ids.next())

    def _commit_files(
        self, queue_id: str, chunks: builtins.list[bytes], file: IO[bytes] | None, envelope: bytes
    ) -> None:
        """The file work of ``IncomingMessage.commit`` (runs through ``run``): the queue file
        written and fsynced, then linked into ``incoming/`` by the group commit (whose fsync
        of ``incoming/`` makes both names durable). A spilled message is renamed into place
        and gets an envelope file instead. On OSError every file of the message is removed
        and the error is raised."""
        content = self.content_path(queue_id)
        spill = os.path.join(self.tmp_dir, queue_id + ".content")
        env_tmp = os.path.join(self.tmp_dir, queue_id + ".env")
        env_final = self.envelope_path("incoming", queue_id)
        created: builtins.list[str] = [spill] if file is not None else []
        started = time.monotonic()
        try:
            if file is None:
                created.append(content)
                _write_file(content, b"".join([queue_file_header(envelope), *chunks]))
                created.append(env_final)
                self.group_commit.publish(content, env_final, link=True)
            else:
                try:
                    file.flush()
                    os.fsync(file.fileno())
                finally:
                    file.close()
                os.rename(spill, content)
                created.append(content)
                created.append(env_tmp)
                _write_file(env_tmp, envelope_file(envelope, 0), _REPLACE_FLAGS)
                created.append(env_final)
                self.group_commit.publish(env_tmp, env_final)
        except OSError:
            for path in reversed(created):
                _unlink_quietly(path)
            raise
        SPOOL_COMMIT_SECONDS.observe(time.monotonic() - started)

    def inject(self, queue_id: str, source_path: str, envelope: Envelope, state: str) -> None:
        """Queue a copy of the file ``source_path`` as ``queue_id`` directly in ``state``
        (e.g. ``deferred`` with ``next_attempt`` 0: local delivery's next scan takes it),
        from any process: queue file written and fsynced, linked into ``state``, both
        directories fsynced. FileExistsError when the spool holds ``queue_id`` already;
        ValueError for a bad ID or state."""
        self._check_state(state)
        if not is_queue_id(queue_id):
            raise ValueError(f"not a queue ID: {queue_id!r}")
        for other in self.STATES:
            if os.path.exists(self.envelope_path(other, queue_id)):
                raise FileExistsError(queue_id)
        content = self.content_path(queue_id)
        envelope.queue_id = queue_id
        with open(source_path, "rb") as src:
            data = src.read()
        _write_file(content, queue_file_header(encode_envelope(envelope)) + data)
        try:
            os.link(content, self.envelope_path(state, queue_id))
            self.fsync_dir("incoming")
            if state != "incoming":
                self.fsync_dir(state)
        except OSError:
            _unlink_quietly(self.envelope_path(state, queue_id))
            _unlink_quietly(content)
            raise

    def list(self, state: str) -> list[str]:
        self._check_state(state)
        return sorted(n for n in os.listdir(os.path.join(self.root, state)) if is_queue_id(n))

    def load(self, queue_id: str, state: str | None = None) -> QueuedMessage:
        """The message's state, envelope, content path and offset. ``state`` is where the
        caller expects it (one open when it is there; the other states are looked in only
        when it is not). KeyError if unknown; CorruptEnvelope (a ValueError) if its envelope
        cannot be parsed."""
        if is_queue_id(queue_id):
            for where in self._states(state):
                try:
                    envelope, _, offset = read_state_entry(
                        self.envelope_path(where, queue_id), queue_id
                    )
                except FileNotFoundError:
                    continue
                return QueuedMessage(queue_id, where, envelope, self.content_path(queue_id), offset)
        raise KeyError(queue_id)

    def move(
        self, queue_id: str, to_state: str, durable: bool = True, from_state: str | None = None
    ) -> None:
        """Rename the state entry into ``to_state`` and fsync both directories.
        ``durable=False`` skips the fsyncs, for moves that recovery undoes anyway (incoming ->
        active). ``from_state`` is where the caller last saw the message (saves looking for
        it; when it is no longer there, the message is looked for in every state)."""
        self._check_state(to_state)
        if from_state is not None and from_state != to_state and is_queue_id(queue_id):
            self._check_state(from_state)
            try:
                os.rename(
                    self.envelope_path(from_state, queue_id),
                    self.envelope_path(to_state, queue_id),
                )
            except FileNotFoundError:
                pass
            else:
                if durable:
                    self.fsync_dir(to_state)
                    self.fsync_dir(from_state)
                return
        from_state = self._locate(queue_id)
        if from_state == to_state:
            return
        os.rename(self.envelope_path(from_state, queue_id), self.envelope_path(to_state, queue_id))
        if durable:
            self.fsync_dir(to_state)
            self.fsync_dir(from_state)

    def update(self, queue_id: str, envelope: object, state: str | None = None) -> None:
        """See ``ISpool.update``: the state entry is replaced by an envelope file pointing at
        the same content. ``state`` is where the caller expects the message."""
        if not isinstance(envelope, Envelope):
            raise TypeError("update() needs an Envelope")
        if not is_queue_id(queue_id):
            raise KeyError(queue_id)
        for where in self._states(state):
            try:
                _, _, offset = read_state_entry(self.envelope_path(where, queue_id), queue_id)
            except FileNotFoundError:
                continue
            break
        else:
            raise KeyError(queue_id)
        envelope.queue_id = queue_id
        tmp = os.path.join(self.tmp_dir, f"{queue_id}.{next(self._update_counter)}")
        try:
            _write_file(tmp, envelope_file(encode_envelope(envelope), offset), _REPLACE_FLAGS)
            os.rename(tmp, self.envelope_path(where, queue_id))
        except OSError:
            _unlink_quietly(tmp)
            raise
        self.fsync_dir(where)

    def remove(self, queue_id: str, state: str | None = None) -> None:
        """See ``ISpool.remove``; ``state`` is where the caller last saw the message (it is
        tried first). Concurrent removals share their directory fsyncs (``RemovalCommit``);
        this returns once the state entry's unlink is durable."""
        if is_queue_id(queue_id):
            if state is not None:
                self._check_state(state)
            self.removals.remove(queue_id, state)

    def remove_many(
        self, queue_ids: builtins.list[str], state: str | None = None
    ) -> dict[str, BaseException]:
        """Remove several messages at once, sharing the directory fsyncs (a delivery job's
        finished messages); returns the errors by queue ID (empty when all are removed
        durably). Same guarantee per message as ``remove``."""
        if state is not None:
            self._check_state(state)
        ids = [queue_id for queue_id in queue_ids if is_queue_id(queue_id)]
        errors = self.removals.remove_all(ids, state)
        return {qid: error for qid, error in zip(ids, errors, strict=True) if error is not None}

    def _unlink_entry(self, queue_id: str, state: str | None) -> str | None:
        """Unlink the state entry of ``queue_id``; the state it was in, or None."""
        for where in self._states(state):
            try:
                os.unlink(self.envelope_path(where, queue_id))
            except FileNotFoundError:
                continue
            return where
        return None

    def recover(self) -> builtins.list[str]:
        for name in os.listdir(self.tmp_dir):
            _unlink_quietly(os.path.join(self.tmp_dir, name))
            log.info("spool recovery: removed temporary file tmp/{name}", name=name)
        self._migrate_legacy_content()
        known: set[str] = set()
        requeued: builtins.list[str] = []
        moved = False
        for state in self.STATES:
            for queue_id in self.list(state):
                known.add(queue_id)
                if state == "corrupt":
                    continue
                if self._recover_one(state, queue_id):
                    moved = True
                elif state == "active":
                    os.rename(
                        self.envelope_path("active", queue_id),
                        self.envelope_path("incoming", queue_id),
                    )
                    requeued.append(queue_id)
                    moved = True
                    log.info("{queue_id} requeued from active to incoming", queue_id=queue_id)
        if moved:
            for state in self.STATES:
                self.fsync_dir(state)
        for name in os.listdir(self.content_dir):
            queue_id = name.removesuffix(CONTENT_SUFFIX)
            if name != queue_id and queue_id not in known:
                _unlink_quietly(os.path.join(self.content_dir, name))
                log.info("{queue_id} removed orphan content (no envelope)", queue_id=queue_id)
        log.info(
            "spool {root} on {hostname} recovered: {n} requeued",
            root=self.root,
            hostname=self.hostname,
            n=len(requeued),
        )
        return requeued

    def _migrate_legacy_content(self) -> None:
        """Move content files of the older layout (``content/<qid>``) to ``content_path``
        (durably), then remove the empty ``content/`` directory."""
        try:
            names = os.listdir(self.legacy_content_dir)
        except FileNotFoundError:
            return
        for name in names:
            if is_queue_id(name):
                os.replace(os.path.join(self.legacy_content_dir, name), self.content_path(name))
            else:
                _unlink_quietly(os.path.join(self.legacy_content_dir, name))
        self.fsync_dir("incoming")
        os.rmdir(self.legacy_content_dir)
        self._fsync_path(self.root)
        log.info("spool {root}: migrated {n} content file(s)", root=self.root, n=len(names))

    def _recover_one(self, state: str, queue_id: str) -> bool:
        """Move the message to ``corrupt`` if its envelope is unreadable or its content is
        missing; return True when it was moved. A state entry that is the queue file itself
        gets its lost ``.msg`` name back."""
        path = self.envelope_path(state, queue_id)
        try:
            _, whole, _ = read_state_entry(path, queue_id)
        except CorruptEnvelope as e:
            reason = str(e)
        else:
            content = self.content_path(queue_id)
            if os.path.exists(content):
                return False
            if whole:
                os.link(path, content)
                self.fsync_dir("incoming")
                log.info("{queue_id} queue file name restored", queue_id=queue_id)
                return False
            reason = f"{queue_id}: content file missing"
        os.rename(path, self.envelope_path("corrupt", queue_id))
        log.error(
            "{queue_id} moved from {state} to corrupt: {reason}",
            queue_id=queue_id,
            state=state,
            reason=reason,
        )
        return True

    def add_listener(self, callback: object) -> None:
        if not callable(callback):
            raise TypeError("listener must be callable")
        self._listeners.append(callback)

    def _committed(self, queue_id: str) -> None:
        for callback in list(self._listeners):
            try:
                callback(queue_id)
            except Exception:
                log.failure(
                    "{queue_id} spool listener {callback!r} failed",
                    queue_id=queue_id,
                    callback=callback,
                )


T = TypeVar("T")


@dataclass
class _Member:
    """One caller waiting in a group (``_Groups``)."""

    work: Any
    done: bool = False
    error: OSError | None = None


class _Groups(abc.ABC, Generic[T]):
    """Leader/follower batching: a caller joins the pending group; the first caller that
    finds no group in progress becomes the leader, takes every pending member, does the
    group's work (``_run_group``, which sets each member's ``error``) and wakes them. Members
    arriving meanwhile form the next group. ``_join`` returns when its own member is done."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._pending: builtins.list[_Member] = []
        self._leading = False
        self.groups = 0
        """Number of groups done so far (for tests and statistics)."""

    def _join(self, work: T) -> None:
        error = self._join_all([work])[0]
        if error is not None:
            raise error

    def _join_all(self, works: builtins.list[T]) -> builtins.list[BaseException | None]:
        """Join ``works`` as members of one group (they are taken together); each one's
        error or None, in order, once all are done."""
        items = [_Member(work) for work in works]
        if not items:
            return []
        first = items[0]
        with self._cond:
            for item in items:
                self._pending.append(item)
            while not first.done and self._leading:
                self._cond.wait()
            if not first.done:
                self._leading = True
                batch, self._pending = self._pending, []
            else:
                batch = []
        if batch:
            try:
                self._run_group(batch)
            except BaseException as e:  # pragma: no cover - not an OSError: fail the group
                for other in batch:
                    other.error = other.error or OSError(f"group commit failed: {e!r}")
                raise
            finally:
                with self._cond:
                    for other in batch:
                        other.done = True
                    self._leading = False
                    self.groups += 1
                    self._cond.notify_all()
        return [item.error for item in items]

    @abc.abstractmethod
    def _run_group(self, batch: builtins.list[_Member]) -> None:
        """The group's work (``GroupCommit``: publish; ``RemovalCommit``: remove); sets each
        member's ``error``."""


class GroupCommit(_Groups[tuple[str, str, bool]]):
    """Publishes state entries into ``incoming/`` in groups that share the directory fsync.

    A thread calling ``publish`` has already written and fsynced its queue file (or, for a
    spilled message, its content file and its envelope file in ``tmp/``). The group's leader
    links (or renames) each entry into ``incoming/`` and fsyncs ``incoming/`` once, which
    makes the names of the group's queue files and entries durable together.
    """

    def __init__(self, spool: Spool) -> None:
        super().__init__()
        self._spool = spool

    def publish(self, source: str, entry: str, link: bool = False) -> None:
        """Link (``link``) or rename ``source`` as ``entry`` durably; OSError when it failed
        (the link or rename may have happened: the caller cleans up)."""
        self._join((source, entry, link))

    def _run_group(self, batch: builtins.list[_Member]) -> None:
        done = []
        for item in batch:
            source, entry, link = item.work
            try:
                if link:
                    os.link(source, entry)
                else:
                    os.rename(source, entry)
            except OSError as e:
                item.error = e
            else:
                done.append(item)
        if done:
            try:
                self._spool.fsync_dir("incoming")
            except OSError as e:
                for item in done:
                    item.error = e


class RemovalCommit(_Groups[tuple[str, "str | None"]]):
    """Removes messages in groups: the leader unlinks each member's state entry, fsyncs each
    state directory concerned once, then unlinks the queue files (see the module
    docstring). A failed fsync fails the members of that directory (their queue files
    stay: after a crash the message is either fully queued or gone)."""

    def __init__(self, spool: Spool) -> None:
        super().__init__()
        self._spool = spool

    def remove(self, queue_id: str, state: str | None) -> None:
        """Remove ``queue_id`` (its entry found in ``state`` first); OSError on failure."""
        self._join((queue_id, state))

    def remove_all(
        self, queue_ids: builtins.list[str], state: str | None
    ) -> builtins.list[BaseException | None]:
        """Remove ``queue_ids`` in one group (one fsync per state directory for all of
        them); each one's error or None, in order."""
        return self._join_all([(queue_id, state) for queue_id in queue_ids])

    def _run_group(self, batch: builtins.list[_Member]) -> None:
        spool = self._spool
        where: dict[str, builtins.list[_Member]] = {}
        gone = []
        for item in batch:
            queue_id, state = item.work
            try:
                found = spool._unlink_entry(queue_id, state)
            except OSError as e:
                item.error = e
                continue
            if found is None:
                gone.append(item)
            else:
                where.setdefault(found, []).append(item)
        for state, items in where.items():
            try:
                spool.fsync_dir(state)
            except OSError as e:
                for item in items:
                    item.error = e
            else:
                gone.extend(items)
        for item in gone:
            _unlink_quietly(spool.content_path(item.work[0]))


HEADER_SCAN = 1024 * 1024
"""Bytes of a spilled message searched for the end of its header section (``rewrite_header``)."""


def _header_end(data: bytes) -> int:
    """Where the header section of ``data`` ends (after the CRLF before the empty line; at
    the start when ``data`` begins with the empty line); ``len(data)`` when there is none."""
    if data.startswith(b"\r\n"):
        return 0
    end = data.find(b"\r\n\r\n")
    return len(data) if end < 0 else end + 2


class HeaderSniffer:
    """Keeps the start of a message being written, up to the end of its header section (at
    most ``limit`` bytes), to read a header field from (the Message-ID for the log)."""

    def __init__(self, limit: int = 64 * 1024) -> None:
        self.limit = limit
        self._head = bytearray()
        self._complete = False
        self._fields: dict[bytes, str] = {}  # answers of ``field`` since the last ``feed``

    def feed(self, data: bytes) -> None:
        if self._complete:
            return
        self._fields.clear()
        start = max(0, len(self._head) - 3)
        self._head += data[: self.limit - len(self._head) + 4]
        end = self._head.find(b"\r\n\r\n", start)
        if end >= 0:
            del self._head[end + 2 :]
            self._complete = True
        elif len(self._head) >= self.limit:
            self._complete = True

    def field(self, name: bytes) -> str:
        """The first ``name`` field (lower-case), unfolded; '' when absent. Kept until
        more data comes: the policy and the log both ask for the Message-ID."""
        value = self._fields.get(name)
        if value is None:
            value = self._fields[name] = self._find(name)
        return value

    def _find(self, name: bytes) -> str:
        from mailgw.mime.headers import parse_header_block

        head = bytes(self._head)
        block = parse_header_block(head, 0, len(head), max_fields=1000)
        for f in block.fields:
            if f.key == name:
                return f.unfolded().decode("utf-8", "replace")
        return ""


class _Prefix(io.RawIOBase):
    """The first ``length`` bytes of a raw file (``IncomingMessage.open_content``)."""

    def __init__(self, raw: io.FileIO, length: int) -> None:
        self._raw = raw
        self._left = length

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        view = memoryview(buffer).cast("B")[: self._left]
        if not len(view):
            return 0
        n = self._raw.readinto(view) or 0
        self._left -= n
        return n

    def close(self) -> None:
        if not self.closed:
            self._raw.close()
        super().close()


@implementer(IIncomingMessage)
class IncomingMessage:
    """A message being received. Up to ``spool.memory_limit`` bytes stay in memory; a larger
    message spills into ``tmp/<qid>.content``. ``commit`` does the file work through the
    spool's runner (a thread pool in the server)."""

    def __init__(self, spool: Spool, queue_id: str) -> None:
        self.queue_id = queue_id
        self.size = 0
        self._spool = spool
        self._chunks: builtins.list[bytes] = []
        self._file: IO[bytes] | None = None
        self._state = "open"  # -> "committing" -> "done", or "open" -> "done" (abort)
        self._head = HeaderSniffer()

    @property
    def message_id(self) -> str:
        """See ``IIncomingMessage.message_id``."""
        return self._head.field(b"message-id")

    @property
    def _spill_path(self) -> str:
        return os.path.join(self._spool.tmp_dir, self.queue_id + ".content")

    def write(self, data: bytes) -> None:
        """Append bytes; OSError when the spill file cannot be created or written."""
        if self._state != "open":
            raise ValueError(f"{self.queue_id}: message already committed or aborted")
        self.size += len(data)
        self._head.feed(data)
        if self._file is not None:
            self._file.write(data)
            return
        self._chunks.append(data)
        if self.size > self._spool.memory_limit:
            fd = os.open(self._spill_path, _WRITE_FLAGS, 0o600)
            self._file = open(fd, "wb", buffering=_CONTENT_BUFFER)  # noqa: SIM115
            chunks, self._chunks = self._chunks, []
            for chunk in chunks:
                self._file.write(chunk)

    def open_content(self) -> IO[bytes]:
        """See ``IIncomingMessage.open_content``: the bytes in memory, or the spill file
        (flushed, opened again read-only) limited to the ``size`` written so far."""
        if self._state != "open":
            raise ValueError(f"{self.queue_id}: message already committed or aborted")
        if self._file is None:
            if len(self._chunks) > 1:
                self._chunks = [b"".join(self._chunks)]
            return io.BytesIO(self._chunks[0] if self._chunks else b"")
        self._file.flush()
        return io.BufferedReader(_Prefix(open(self._spill_path, "rb", buffering=0), self.size))

    def rewrite_header(self, edit: Callable[[bytes], bytes]) -> None:
        """See ``IIncomingMessage.rewrite_header``. In memory: the chunks are joined and
        edited; spilled: the header section (looked for in the first ``HEADER_SCAN`` bytes;
        nothing is taken as header beyond) is edited and the rest copied into a new spill
        file, which replaces the old one."""
        if self._state != "open":
            raise ValueError(f"{self.queue_id}: message already committed or aborted")
        if self._file is None:
            data = b"".join(self._chunks)
            end = _header_end(data)
            new = edit(data[:end]) + data[end:]
            self._chunks = [new]
            self.size = len(new)
            return
        self._file.flush()
        path, new_path = self._spill_path, self._spill_path + ".new"
        with open(path, "rb") as old:
            start = old.read(HEADER_SCAN)
            end = _header_end(start) if len(start) < HEADER_SCAN or b"\r\n\r\n" in start else 0
            head = edit(start[:end])
            fd = os.open(new_path, _WRITE_FLAGS, 0o600)
            out = open(fd, "wb", buffering=_CONTENT_BUFFER)  # noqa: SIM115
            try:
                out.write(head)
                out.write(start[end:])
                while block := old.read(_CONTENT_BUFFER):
                    out.write(block)
                out.flush()
            except BaseException:
                out.close()
                _unlink_quietly(new_path)
                raise
        os.replace(new_path, path)
        self._file.close()
        self._file = out
        self.size = out.tell()

    def commit(self, envelope: object) -> Deferred[str]:
        """See ``IIncomingMessage.commit``. TypeError/ValueError (raised at once) for a
        wrong argument or a message already committed or aborted."""
        if not isinstance(envelope, Envelope):
            raise TypeError("commit() needs an Envelope")
        if self._state != "open":
            raise ValueError(f"{self.queue_id}: message already committed or aborted")
        self._state = "committing"
        envelope.queue_id = self.queue_id
        if not envelope.size:
            envelope.size = self.size
        data = encode_envelope(envelope)
        chunks, self._chunks = self._chunks, []
        file, self._file = self._file, None
        spool = self._spool
        d: Deferred[None] = spool.run(spool._commit_files, self.queue_id, chunks, file, data)
        return d.addCallbacks(self._committed, self._failed)

    def _committed(self, _: None) -> str:
        self._state = "done"
        self._spool._committed(self.queue_id)
        return self.queue_id

    def _failed(self, failure: Failure) -> Failure:
        self._state = "done"
        log.error("{queue_id} commit failed: {error}", queue_id=self.queue_id, error=failure.value)
        return failure

    def abort(self) -> None:
        """Discard the message; does nothing once ``commit`` has started (the commit then
        either queues the message or removes its files itself)."""
        if self._state != "open":
            return
        self._state = "done"
        self._chunks = []
        file, self._file = self._file, None
        if file is not None:
            with contextlib.suppress(OSError):
                file.close()
            _unlink_quietly(self._spill_path)
