"""The durable queue on disk: content files, envelope files whose directory is the state.

Layout under ``root`` (``data_dir/spool``)::

    tmp/                 files being written: <qid>.content (a message too large to be
                         held in memory), <qid>.env, <qid>.<n>
    incoming/<qid>.msg   the message bytes, immutable once committed; the file stays here
                         whatever the message's state (``list`` ignores these names)
    incoming/<qid>       the envelope (JSON of ``Envelope.to_json()``); its directory
    active/<qid>         IS the message's state
    deferred/<qid>
    hold/<qid>
    corrupt/<qid>
    outbound/<qid>       handed to the relay (fresh), owned by ``mailgw.relay.scheduler``
    retry/<qid>          relay mail waiting for its next attempt (``envelope.next_attempt``)

Local delivery owns ``incoming``/``deferred``; the relay owns ``outbound``/``retry``; both use
``active`` while working on a message (recovery sends ``active`` back to ``incoming``, whose
dispatcher hands external recipients to the relay again: nothing is lost or sent twice).

A state change is one ``rename`` of the envelope file between state directories, followed by
an fsync of both directories. An envelope update writes ``tmp/<qid>.<n>``, fsyncs it and
renames it over the old one. ``commit`` fsyncs the content file and the envelope file, then
the names of both (content and envelope) are made durable by ONE fsync of ``incoming/``:
a commit waits for three flushes (content, envelope, ``incoming/``), the last one shared by
the group. Until that fsync has returned no 250 is sent, so a crash before it may leave an
envelope whose content name was lost (``recover`` moves it to ``corrupt``: the client was
never told the message was accepted). ``tmp/`` is never fsynced: whatever is left there after
a crash is removed by ``recover``, and so is a content file without an envelope. A spool of an
older layout (content in ``content/<qid>``) is migrated by ``recover``.

The message bytes live in a file of their own (``QueuedMessage.content_path``, stable across
state changes) because every reader (``IMessageStore.deliver``, the relay client, DKIM, the
queue tools) opens that path and reads the whole file; an envelope embedded in the same file
would need a content offset in the API.

A message being received stays in memory up to ``memory_limit`` bytes (then it spills into
``tmp/``). ``commit`` runs its file work through the spool's *runner* (``mailgw.runtime.threads``;
a thread pool in the server): it writes and fsyncs ``incoming/<qid>.msg`` and
``tmp/<qid>.env``, then hands the envelope to ``GroupCommit``, which publishes the envelopes of
concurrent commits into ``incoming/`` with one fsync of ``incoming/`` for the whole group. The
other operations are synchronous and thread-safe (local delivery calls them from worker
threads); the queue IDs of different threads' calls must differ.

One process owns a spool root at a time: ``recover`` (run at start-up, before listening)
assumes nobody else is writing into the same root.
"""

from __future__ import annotations

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
from typing import IO, Any

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


def encode_envelope(envelope: Envelope) -> bytes:
    """The envelope file's bytes (compact UTF-8 JSON)."""
    return json.dumps(envelope.to_json(), ensure_ascii=False, separators=(",", ":")).encode()


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
        return os.path.join(self.root, state, queue_id)

    def content_path(self, queue_id: str) -> str:
        """The message bytes of ``queue_id`` (the same path in every state)."""
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

    def _locate(self, queue_id: str) -> str:
        """The state holding ``queue_id``; KeyError when none does."""
        if is_queue_id(queue_id):
            for state in self.STATES:
                if os.path.exists(self.envelope_path(state, queue_id)):
                    return state
        raise KeyError(queue_id)

    # -- ISpool ----------------------------------------------------------------------------

    def begin(self) -> IncomingMessage:
        """A new message with a fresh queue ID; no file exists for it before it grows over
        ``memory_limit`` or is committed. Call from one thread (the reactor's)."""
        return IncomingMessage(self, self._ids.next())

    def _commit_files(
        self, queue_id: str, chunks: builtins.list[bytes], file: IO[bytes] | None, envelope: bytes
    ) -> None:
        """The file work of ``IncomingMessage.commit`` (runs through ``run``): content and
        envelope written and fsynced, then published by the group commit (whose fsync of
        ``incoming/`` also makes the content's name durable). On OSError every file of the
        message is removed and the error is raised."""
        content = self.content_path(queue_id)
        spill = os.path.join(self.tmp_dir, queue_id + ".content")
        env_tmp = os.path.join(self.tmp_dir, queue_id + ".env")
        env_final = self.envelope_path("incoming", queue_id)
        created: builtins.list[str] = [spill] if file is not None else []
        started = time.monotonic()
        try:
            if file is None:
                _write_file(content, b"".join(chunks))
                created.append(content)
            else:
                try:
                    file.flush()
                    os.fsync(file.fileno())
                finally:
                    file.close()
                os.rename(spill, content)
                created.append(content)
            created.append(env_tmp)
            _write_file(env_tmp, envelope, _REPLACE_FLAGS)
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
        from any process: content written and fsynced, envelope written, fsynced and renamed
        into ``state``, both directories fsynced. FileExistsError when the spool holds
        ``queue_id`` already; ValueError for a bad ID or state."""
        self._check_state(state)
        if not is_queue_id(queue_id):
            raise ValueError(f"not a queue ID: {queue_id!r}")
        for other in self.STATES:
            if os.path.exists(self.envelope_path(other, queue_id)):
                raise FileExistsError(queue_id)
        content = self.content_path(queue_id)
        env_tmp = os.path.join(self.tmp_dir, f"{queue_id}.inject")
        envelope.queue_id = queue_id
        with open(source_path, "rb") as src:
            _write_file(content, src.read())
        try:
            _write_file(env_tmp, encode_envelope(envelope), _REPLACE_FLAGS)
            os.rename(env_tmp, self.envelope_path(state, queue_id))
            self.fsync_dir("incoming")
            self.fsync_dir(state)
        except OSError:
            _unlink_quietly(env_tmp)
            _unlink_quietly(self.envelope_path(state, queue_id))
            _unlink_quietly(content)
            raise

    def list(self, state: str) -> list[str]:
        self._check_state(state)
        return sorted(n for n in os.listdir(os.path.join(self.root, state)) if is_queue_id(n))

    def load(self, queue_id: str) -> QueuedMessage:
        """The message's state, envelope and content path. KeyError if unknown;
        CorruptEnvelope (a ValueError) if its envelope cannot be parsed."""
        if is_queue_id(queue_id):
            for state in self.STATES:
                try:
                    with open(self.envelope_path(state, queue_id), "rb") as f:
                        data = f.read()
                except FileNotFoundError:
                    continue
                envelope = decode_envelope(data, queue_id)
                return QueuedMessage(queue_id, state, envelope, self.content_path(queue_id))
        raise KeyError(queue_id)

    def move(
        self, queue_id: str, to_state: str, durable: bool = True, from_state: str | None = None
    ) -> None:
        """Rename the envelope into ``to_state`` and fsync both directories. ``durable=False``
        skips the fsyncs, for moves that recovery undoes anyway (incoming -> active).
        ``from_state`` is where the caller last saw the message (saves looking for it; when
        it is no longer there, the message is looked for in every state)."""
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

    def update(self, queue_id: str, envelope: object) -> None:
        if not isinstance(envelope, Envelope):
            raise TypeError("update() needs an Envelope")
        state = self._locate(queue_id)
        envelope.queue_id = queue_id
        tmp = os.path.join(self.tmp_dir, f"{queue_id}.{next(self._update_counter)}")
        try:
            _write_file(tmp, encode_envelope(envelope), _REPLACE_FLAGS)
            os.rename(tmp, self.envelope_path(state, queue_id))
        except OSError:
            _unlink_quietly(tmp)
            raise
        self.fsync_dir(state)

    def remove(self, queue_id: str, state: str | None = None) -> None:
        """See ``ISpool.remove``; ``state`` is where the caller last saw the message (it is
        tried first)."""
        if not is_queue_id(queue_id):
            return
        states = self.STATES if state is None else (state, *self.STATES)
        for state in states:
            try:
                os.unlink(self.envelope_path(state, queue_id))
            except FileNotFoundError:
                continue
            # Durable before the content goes: after a crash the message is either still
            # fully queued or gone, never an envelope without content.
            self.fsync_dir(state)
            break
        _unlink_quietly(self.content_path(queue_id))

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
        missing; return True when it was moved."""
        path = self.envelope_path(state, queue_id)
        try:
            with open(path, "rb") as f:
                decode_envelope(f.read(), queue_id)
        except CorruptEnvelope as e:
            reason = str(e)
        else:
            if os.path.exists(self.content_path(queue_id)):
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


@dataclass
class _Publication:
    """One committed message waiting for its envelope to be published into ``incoming``."""

    env_tmp: str
    env_final: str
    done: bool = False
    error: OSError | None = None


class GroupCommit:
    """Publishes envelopes into ``incoming/`` in groups that share the directory fsyncs.

    A thread calling ``publish`` has already written and fsynced its content file
    (``incoming/<qid>.msg``) and its envelope (in ``tmp/``). It joins the pending group; the
    first thread to find no group being published becomes the leader, takes every pending
    publication, renames each envelope into ``incoming/``, fsyncs ``incoming/`` once (which
    makes the names of the group's content files and envelopes durable together), and wakes
    the group. Publications arriving meanwhile form the next group. ``publish`` returns only when its own envelope is durable in ``incoming/``.
    """

    def __init__(self, spool: Spool) -> None:
        self._spool = spool
        self._cond = threading.Condition()
        self._pending: builtins.list[_Publication] = []
        self._leading = False
        self.groups = 0
        """Number of groups published so far (for tests and statistics)."""

    def publish(self, env_tmp: str, env_final: str) -> None:
        """Rename ``env_tmp`` to ``env_final`` durably (see the class docstring); OSError
        when it failed (the rename may have happened: the caller cleans up)."""
        item = _Publication(env_tmp, env_final)
        with self._cond:
            self._pending.append(item)
            while not item.done and self._leading:
                self._cond.wait()
            if not item.done:
                self._leading = True
                batch, self._pending = self._pending, []
            else:
                batch = []
        if batch:
            try:
                self._publish_group(batch)
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
        if item.error is not None:
            raise item.error

    def _publish_group(self, batch: builtins.list[_Publication]) -> None:
        spool = self._spool
        renamed = []
        for item in batch:
            try:
                os.rename(item.env_tmp, item.env_final)
            except OSError as e:
                item.error = e
            else:
                renamed.append(item)
        if renamed:
            try:
                spool.fsync_dir("incoming")
            except OSError as e:
                for item in renamed:
                    item.error = e


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

    def feed(self, data: bytes) -> None:
        if self._complete:
            return
        start = max(0, len(self._head) - 3)
        self._head += data[: self.limit - len(self._head) + 4]
        end = self._head.find(b"\r\n\r\n", start)
        if end >= 0:
            del self._head[end + 2 :]
            self._complete = True
        elif len(self._head) >= self.limit:
            self._complete = True

    def field(self, name: bytes) -> str:
        """The first ``name`` field (lower-case), unfolded; '' when absent."""
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
