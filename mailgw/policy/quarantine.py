"""The quarantine store: messages the policy keeps apart, accepted but not delivered.

Layout under ``root`` (``data_dir/quarantine``)::

    <id>.msg     the message as it would have been queued (header fields added by the policy
                 included), written and fsynced first
    <id>.json    what is known about it (below), written to ``tmp/``, fsynced, renamed in
    tmp/         files being written; removed when the store is opened

``<id>`` is the queue ID the spool gave the message when it arrived. A message is in the
quarantine once its ``.json`` name is durable (the directory fsynced): only then does SMTP
answer 250. The record: ``id``, ``quarantined_at``, ``reason``, ``rule`` (what decided),
``direction`` (``inbound``: arrived by MX; ``outbound``: sent by a user), ``size`` and the
``envelope`` (``Envelope.to_json()``, the policy's class, channel and folder included).

``release`` puts the message back into the normal queue with the same queue ID: its content
and envelope are written into the spool's ``deferred`` state, due at once, so local delivery
picks it up at its next scan, stores the local copies and hands the rest to the relay
(``inbound`` mail is delivered, ``outbound`` mail relayed). Then the quarantined copy is
removed. A crash between the two can leave the message in both (a second release is refused
while the spool holds it). ``delete`` removes the record first (durably), then the content.

The methods are synchronous and thread-safe except ``put``, which runs its file work through
the store's runner and fires in the reactor thread.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import time
from dataclasses import dataclass
from typing import IO, Any

from twisted.internet.defer import Deferred
from twisted.logger import Logger
from twisted.python.failure import Failure

from mailgw.interfaces import IIncomingMessage
from mailgw.model import Envelope
from mailgw.runtime.threads import Runner, run_inline
from mailgw.spool.queueid import is_queue_id

log = Logger(namespace="mailgw.quarantine")

_BUFFER = 64 * 1024


class QuarantineError(Exception):
    """The quarantine operation cannot be done (unknown ID, already queued...)."""


@dataclass(frozen=True)
class QuarantinedMessage:
    """One quarantined message: its record and where its bytes are."""

    id: str
    quarantined_at: float
    reason: str
    rule: str
    direction: str
    size: int
    envelope: Envelope
    content_path: str

    def to_json(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "quarantined_at": self.quarantined_at,
            "reason": self.reason,
            "rule": self.rule,
            "direction": self.direction,
            "size": self.size,
            "envelope": self.envelope.to_json(),
        }


def _fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_durably(path: str, source: IO[bytes] | bytes) -> int:
    """Create ``path`` (exclusively) with ``source``'s bytes, fsync it; the bytes written."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0), 0o600)
    try:
        with open(fd, "wb", closefd=False) as out:
            if isinstance(source, bytes):
                out.write(source)
            else:
                shutil.copyfileobj(source, out, _BUFFER)
            out.flush()
            size = out.tell()
        os.fsync(fd)
    except BaseException:
        os.close(fd)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
        raise
    os.close(fd)
    return size


class QuarantineStore:
    """Quarantined messages under ``root`` (see the module docstring)."""

    def __init__(self, root: str, run: Runner = run_inline, clock: Any = None) -> None:
        self.root = os.path.abspath(root)
        self.run = run
        self.clock = clock
        self.tmp = os.path.join(self.root, "tmp")
        created = not os.path.isdir(self.tmp)
        os.makedirs(self.tmp, mode=0o700, exist_ok=True)
        if created:
            _fsync_dir(self.root)
            _fsync_dir(os.path.dirname(self.root))
        for name in os.listdir(self.tmp):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(os.path.join(self.tmp, name))

    def _now(self) -> float:
        return float(self.clock.seconds()) if self.clock is not None else time.time()

    def content_path(self, qid: str) -> str:
        return os.path.join(self.root, qid + ".msg")

    def record_path(self, qid: str) -> str:
        return os.path.join(self.root, qid + ".json")

    # -- putting a message in --------------------------------------------------------------

    def put(
        self,
        incoming: IIncomingMessage,
        envelope: Envelope,
        reason: str,
        rule: str,
        direction: str,
    ) -> Deferred[str]:
        """Keep ``incoming`` (not committed: it is aborted once kept) with its record; fires
        with its ID when both are durable, fails with OSError (nothing kept) otherwise."""
        qid = str(incoming.queue_id)
        envelope.queue_id = qid
        content = incoming.open_content()
        record = {
            "id": qid,
            "quarantined_at": self._now(),
            "reason": reason,
            "rule": rule,
            "direction": direction,
            "size": 0,
            "envelope": envelope.to_json(),
        }

        def done(_: object) -> str:
            incoming.abort()
            log.info(
                "{qid}: quarantined ({direction}) by {rule}: {reason} from=<{sender}> to={rcpts}",
                qid=qid,
                direction=direction,
                rule=rule or "-",
                reason=reason,
                sender=envelope.sender,
                rcpts=",".join(f"<{r}>" for r in envelope.recipients),
            )
            return qid

        def failed(failure: Failure) -> Failure:
            incoming.abort()
            log.error("{qid}: cannot quarantine: {e}", qid=qid, e=failure.value)
            return failure

        d: Deferred[Any] = self.run(self._write, qid, content, record)
        return d.addCallbacks(done, failed)

    def _write(self, qid: str, content: IO[bytes], record: dict[str, Any]) -> None:
        if not is_queue_id(qid):
            raise ValueError(f"not a queue ID: {qid!r}")
        path = self.content_path(qid)
        tmp = os.path.join(self.tmp, qid + ".json")
        try:
            with content:
                record["size"] = _write_durably(path, content)
            _write_durably(tmp, json.dumps(record, ensure_ascii=False).encode())
            os.rename(tmp, self.record_path(qid))
            _fsync_dir(self.root)
        except BaseException:
            for p in (tmp, self.record_path(qid), path):
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(p)
            raise

    # -- reading ---------------------------------------------------------------------------

    def ids(self) -> list[str]:
        """Every quarantined message's ID, oldest first."""
        names = os.listdir(self.root)
        return sorted(n[:-5] for n in names if n.endswith(".json") and is_queue_id(n[:-5]))

    def get(self, qid: str) -> QuarantinedMessage:
        """The message ``qid``; QuarantineError when there is none (or it is unreadable)."""
        if not is_queue_id(qid):
            raise QuarantineError(f"{qid}: not a quarantine ID")
        try:
            with open(self.record_path(qid), "rb") as f:
                raw = json.loads(f.read().decode("utf-8"))
            envelope = Envelope.from_json(raw["envelope"])
            envelope.queue_id = qid
            return QuarantinedMessage(
                qid,
                float(raw["quarantined_at"]),
                str(raw["reason"]),
                str(raw.get("rule", "")),
                str(raw.get("direction", "inbound")),
                int(raw.get("size", 0)),
                envelope,
                self.content_path(qid),
            )
        except FileNotFoundError:
            raise QuarantineError(f"{qid}: no such quarantined message") from None
        except (ValueError, KeyError, TypeError) as e:
            raise QuarantineError(f"{qid}: unreadable quarantine record: {e}") from None

    def list(self) -> list[QuarantinedMessage]:
        out = []
        for qid in self.ids():
            with contextlib.suppress(QuarantineError):
                out.append(self.get(qid))
        return out

    # -- changes ---------------------------------------------------------------------------

    def delete(self, qid: str) -> None:
        """Remove a quarantined message (record first, durably; then its content)."""
        self.get(qid)
        os.unlink(self.record_path(qid))
        _fsync_dir(self.root)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.content_path(qid))
        log.info("{qid}: removed from the quarantine", qid=qid)

    def release(self, qid: str, spool: Any) -> str:
        """Queue the message again (``spool``: a ``mailgw.spool.Spool``) and remove it from
        the quarantine; returns the queue ID. QuarantineError when the spool already holds
        that ID."""
        message = self.get(qid)
        envelope = message.envelope
        envelope.next_attempt = 0.0
        envelope.attempts = 0
        envelope.last_error = ""
        try:
            spool.inject(qid, message.content_path, envelope, "deferred")
        except FileExistsError:
            raise QuarantineError(f"{qid}: already in the queue") from None
        self.delete(qid)
        log.info(
            "{qid}: released from the quarantine ({direction}) to={rcpts}",
            qid=qid,
            direction=message.direction,
            rcpts=",".join(f"<{r}>" for r in envelope.recipients),
        )
        return qid
