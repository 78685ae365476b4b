"""The durable queue on disk: content files, envelope files whose directory is the state.

Layout under ``root`` (``data_dir/spool``)::

    tmp/                 files being written: <qid>.content, <qid>.env, <qid>.<n>
    content/<qid>        the message bytes, immutable once committed
    incoming/<qid>       the envelope (JSON of ``Envelope.to_json()``); its directory
    active/<qid>         IS the message's state
    deferred/<qid>
    hold/<qid>
    corrupt/<qid>

A state change is one ``rename`` of the envelope file between state directories, followed by
an fsync of both directories. An envelope update writes ``tmp/<qid>.<n>``, fsyncs it and
renames it over the old one. ``commit`` makes the content durable (file and ``content/``
directory) *before* the envelope is renamed into ``incoming/``, so an envelope in a state
directory always has its content. ``tmp/`` is never fsynced: whatever is left there after a
crash is removed by ``recover``.

One process owns a spool root at a time: ``recover`` (run at start-up, before listening)
assumes nobody else is writing into the same root.
"""

from __future__ import annotations

import builtins
import contextlib
import json
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import IO

from twisted.logger import Logger
from zope.interface import implementer

from mailgw.interfaces import IIncomingMessage, ISpool
from mailgw.model import Envelope
from mailgw.spool.queueid import QueueIdGenerator, is_queue_id

log = Logger(namespace="mailgw.spool")

_WRITE_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0)
_CONTENT_BUFFER = 64 * 1024


class CorruptEnvelope(ValueError):
    """The envelope file of a queued message cannot be parsed."""


@dataclass(frozen=True)
class QueuedMessage:
    """A committed message as found in the spool."""

    queue_id: str
    state: str
    envelope: Envelope
    content_path: str


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
    """Create ``path`` with ``data`` and fsync it (not its directory)."""
    fd = os.open(path, flags, 0o600)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
        os.fsync(fd)
    finally:
        os.close(fd)


def _unlink_quietly(path: str) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)


@implementer(ISpool)
class Spool:
    """The durable queue rooted at ``root`` (see the module docstring for the layout)."""

    STATES = ("incoming", "active", "deferred", "hold", "corrupt")

    def __init__(self, root: str, hostname: str = "localhost") -> None:
        self.root = os.path.abspath(root)
        self.hostname = hostname
        self._ids = QueueIdGenerator()
        self._listeners: list[Callable[[str], object]] = []
        self._update_counter = 0
        self._dirfds: dict[str, int] = {}
        self.tmp_dir = os.path.join(self.root, "tmp")
        self.content_dir = os.path.join(self.root, "content")
        created = False
        for name in ("tmp", "content", *self.STATES):
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
        return os.path.join(self.content_dir, queue_id)

    def fsync_dir(self, name: str) -> None:
        """fsync the directory ``root/name`` (its descriptor is kept open for reuse)."""
        fd = self._dirfds.get(name)
        if fd is None:
            fd = os.open(os.path.join(self.root, name), os.O_RDONLY | os.O_DIRECTORY)
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
        while True:
            queue_id = self._ids.next()
            path = os.path.join(self.tmp_dir, queue_id + ".content")
            try:
                fd = os.open(path, _WRITE_FLAGS, 0o600)
            except FileExistsError:
                continue
            return IncomingMessage(self, queue_id, path, fd)

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

    def move(self, queue_id: str, to_state: str, durable: bool = True) -> None:
        """Rename the envelope into ``to_state`` and fsync both directories. ``durable=False``
        skips the fsyncs, for moves that recovery undoes anyway (incoming -> active)."""
        self._check_state(to_state)
        from_state = self._locate(queue_id)
        if from_state == to_state:
            return
        os.rename(self.envelope_path(from_state, queue_id), self.envelope_path(to_state, queue_id))
        if durable:
            self.fsync_dir(to_state)
            self.fsync_dir(from_state)
        log.debug(
            "{queue_id} moved {from_state} -> {to_state}",
            queue_id=queue_id,
            from_state=from_state,
            to_state=to_state,
        )

    def update(self, queue_id: str, envelope: object) -> None:
        if not isinstance(envelope, Envelope):
            raise TypeError("update() needs an Envelope")
        state = self._locate(queue_id)
        envelope.queue_id = queue_id
        self._update_counter += 1
        tmp = os.path.join(self.tmp_dir, f"{queue_id}.{self._update_counter}")
        flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC | getattr(os, "O_CLOEXEC", 0)
        try:
            _write_file(tmp, encode_envelope(envelope), flags)
            os.rename(tmp, self.envelope_path(state, queue_id))
        except OSError:
            _unlink_quietly(tmp)
            raise
        self.fsync_dir(state)

    def remove(self, queue_id: str) -> None:
        if not is_queue_id(queue_id):
            return
        for state in self.STATES:
            try:
                os.unlink(self.envelope_path(state, queue_id))
            except FileNotFoundError:
                continue
            # Durable before the content goes: after a crash the message is either still
            # fully queued or gone, never an envelope without content.
            self.fsync_dir(state)
            log.info("{queue_id} removed from {state}", queue_id=queue_id, state=state)
            break
        _unlink_quietly(self.content_path(queue_id))

    def recover(self) -> builtins.list[str]:
        for name in os.listdir(self.tmp_dir):
            _unlink_quietly(os.path.join(self.tmp_dir, name))
            log.info("spool recovery: removed temporary file tmp/{name}", name=name)
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
            if name not in known:
                _unlink_quietly(os.path.join(self.content_dir, name))
                log.info("{queue_id} removed orphan content (no envelope)", queue_id=name)
        log.info(
            "spool {root} on {hostname} recovered: {n} requeued",
            root=self.root,
            hostname=self.hostname,
            n=len(requeued),
        )
        return requeued

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


@implementer(IIncomingMessage)
class IncomingMessage:
    """A message being received: ``tmp/<qid>.content`` until ``commit`` makes it queued."""

    def __init__(self, spool: Spool, queue_id: str, tmp_path: str, fd: int) -> None:
        self.queue_id = queue_id
        self.size = 0
        self._spool = spool
        self._tmp_path = tmp_path
        self._file: IO[bytes] | None = open(fd, "wb", buffering=_CONTENT_BUFFER)  # noqa: SIM115
        self._finished = False

    def write(self, data: bytes) -> None:
        if self._file is None:
            raise ValueError(f"{self.queue_id}: message already committed or aborted")
        self._file.write(data)
        self.size += len(data)

    def commit(self, envelope: object) -> str:
        if not isinstance(envelope, Envelope):
            raise TypeError("commit() needs an Envelope")
        if self._file is None:
            raise ValueError(f"{self.queue_id}: message already committed or aborted")
        spool = self._spool
        queue_id = self.queue_id
        content = spool.content_path(queue_id)
        env_tmp = os.path.join(spool.tmp_dir, queue_id + ".env")
        env_final = spool.envelope_path("incoming", queue_id)
        envelope.queue_id = queue_id
        if not envelope.size:
            envelope.size = self.size
        file, self._file = self._file, None
        try:
            try:
                file.flush()
                os.fsync(file.fileno())
            finally:
                file.close()
            os.rename(self._tmp_path, content)
            _write_file(env_tmp, encode_envelope(envelope))
            spool.fsync_dir("content")
            os.rename(env_tmp, env_final)
            spool.fsync_dir("incoming")
        except OSError as e:
            for path in (env_final, env_tmp, content, self._tmp_path):
                _unlink_quietly(path)
            self._finished = True
            log.error("{queue_id} commit failed: {error}", queue_id=queue_id, error=e)
            raise
        self._finished = True
        log.info(
            "{queue_id} queued: from=<{sender}> nrcpt={nrcpt} size={size} client={client}",
            queue_id=queue_id,
            sender=envelope.sender,
            nrcpt=len(envelope.recipients),
            size=self.size,
            client=envelope.client_address,
        )
        spool._committed(queue_id)
        return queue_id

    def abort(self) -> None:
        if self._finished:
            return
        self._finished = True
        file, self._file = self._file, None
        if file is not None:
            with contextlib.suppress(OSError):
                file.close()
        _unlink_quietly(self._tmp_path)
        log.info("{queue_id} aborted", queue_id=self.queue_id)
