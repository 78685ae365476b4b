"""The primary's side: reading the journal from the replica's position, adding what each entry
needs to be reproduced (message bytes, tier-2 blobs, the directory rows), and streaming
batches over AMP with a window of unacknowledged ones (``ShipperProtocol``).
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from twisted.internet import defer
from twisted.internet.interfaces import IHandshakeListener
from twisted.logger import Logger
from twisted.protocols import amp
from zope.interface import implementer

from mailgw.journal.changelog import ChangeLog
from mailgw.model import change as k
from mailgw.model.change import ChangeEntry
from mailgw.replication import wire
from mailgw.replication.apply import DIRECTORY_KINDS, directory_rows
from mailgw.store import blobs
from mailgw.store.facade import MessageStore
from mailgw.store.replica import base_of, read_current

log = Logger()

BATCH_ENTRIES = 200
BATCH_BYTES = 8 << 20


@dataclass
class Batch:
    """Entries ``first``..``upto`` ready to ship: the JSON, tier-1 message data by digest,
    tier-2 blob digests."""

    upto: int
    entries: list[dict[str, Any]]
    data: dict[str, bytes] = field(default_factory=dict)
    blob_digests: list[str] = field(default_factory=list)
    last_time: float = 0.0


class Reader:
    """Builds batches from the node's journal (blocking: run it in a thread)."""

    def __init__(self, store: MessageStore, directory_path: str) -> None:
        self.store = store
        self.directory_path = directory_path
        self.log = ChangeLog(os.path.join(os.path.dirname(store.root), "journal"))

    def close(self) -> None:
        self.log.close()

    def last_seq(self) -> int:
        return self.log.last_seq()

    def oldest_available(self) -> int:
        """The lowest sequence number the journal may still hold (its oldest route
        segment's first)."""
        names = self.log.sequencer.segments()
        return int(names[0].split(".")[0]) if names else 1

    def batch(self, after: int, limit: int = BATCH_ENTRIES) -> Batch:
        entries, covered = self.log.read_upto(after, limit)
        out = Batch(covered, [])
        size = 0
        for entry in entries:
            item = self._ship(entry, out)
            out.entries.append(item)
            out.last_time = entry.time
            size = sum(len(v) for v in out.data.values())
            if size >= BATCH_BYTES:
                out.upto = entry.seq
                break
        return out

    def _ship(self, e: ChangeEntry, out: Batch) -> dict[str, Any]:
        item: dict[str, Any] = {
            "seq": e.seq,
            "time": e.time,
            "kind": e.kind,
            "user": e.user,
            "folder": e.folder,
            "payload": dict(e.payload),
        }
        ship: dict[str, Any] = {}
        p = e.payload
        if e.kind in DIRECTORY_KINDS:
            ship["directory"] = directory_rows(self.directory_path, e.user.rpartition("@")[2])
        elif e.kind in (k.MESSAGE_ADDED, k.MESSAGE_COPIED):
            self._message(e, ship, out)
        elif e.kind == k.TIER_MIGRATED:
            self._blob(str(p["blob"]), ship, out)
        if ship:
            item["ship"] = ship
        return item

    def _blob(self, ref: str, ship: dict[str, Any], out: Batch) -> bool:
        tier2 = self.store.tier2
        if tier2 is None:
            return False
        digests = blobs.split_ref(ref)
        if not all(tier2.exists(d) for d in digests):
            return False
        ship["blob"] = ref
        out.blob_digests += [d for d in digests if d not in out.blob_digests]
        return True

    def _message(self, e: ChangeEntry, ship: dict[str, Any], out: Batch) -> None:
        """Where the message's bytes are now (it may have been moved, renamed for a flag
        change or migrated since): its data or its blobs; nothing when it is gone."""
        p = e.payload
        if "blob" in p and "file" not in p:
            if self._blob(str(p["blob"]), ship, out):
                ship["filename"] = f"cur/{base_of(str(p.get('file', '')) or 'x')}"
            return
        base = base_of(str(p["file"]))
        for _attempt in range(3):
            found = read_current(self.store, e.user, base)
            if found is None:
                return
            folder, info = found
            if "tz" not in p:
                ship["tz"] = info.internaldate_tz
            if info.blob is not None:
                if self._blob(info.blob, ship, out):
                    ship["filename"] = info.filename
                return
            try:
                box = self.store.open_mailbox(e.user, folder, snapshot=False)
                data = box.read_message(info.uid)
            except (KeyError, OSError):
                continue  # renamed or moved meanwhile: look again
            digest = hashlib.sha256(data).hexdigest()
            out.data[digest] = data
            ship["data"] = digest
            return


Run = Callable[..., "defer.Deferred[Any]"]


@defer.inlineCallbacks
def authenticate(proto: amp.AMP, secret: bytes) -> Any:
    """The primary's half of the handshake on ``proto`` (TLS established): checks the
    replica's proof, shows its own; fires with the ``Authenticate`` answer."""
    cert = wire.fingerprint(proto.transport.getPeerCertificate())  # type: ignore[union-attr]
    mine = wire.new_nonce()
    answer = yield wire.call(proto, wire.Challenge, nonce=mine)
    expected = wire.proof(secret, "replica", mine, answer["nonce"], cert)
    if not wire.check(expected, answer["proof"]):
        raise wire.AuthFailed("the replica's proof is wrong (secret or certificate)")
    proof = wire.proof(secret, "primary", mine, answer["nonce"], cert)
    result = yield wire.call(proto, wire.Authenticate, proof=proof)
    return result


@implementer(IHandshakeListener)
class ShipperProtocol(amp.AMP):
    """The primary's end: handshake (on TLS handshake completion), then the stream."""

    def __init__(
        self,
        reader: Reader,
        secret: bytes,
        run: Run,
        window: int,
        status: Any,
        clock: Any,
        poll: float = 0.2,
        on_conflict: Callable[[str], None] | None = None,
    ) -> None:
        super().__init__()  # type: ignore[no-untyped-call]
        self.reader = reader
        self.secret = secret
        self.run = run
        self.window = max(1, window)
        self.status = status
        self.clock = clock
        self.poll = poll
        self.on_conflict = on_conflict
        self.ready: defer.Deferred[int] = defer.Deferred()
        self._inflight: deque[defer.Deferred[Any]] = deque()
        self._stopped = False
        self._wake: defer.Deferred[None] | None = None
        self._batches = 0

    def handshakeCompleted(self) -> None:
        self._authenticate()

    @defer.inlineCallbacks
    def _authenticate(self) -> Any:
        try:
            result = yield authenticate(self, self.secret)
        except wire.Conflict as e:
            self.transport.loseConnection()  # type: ignore[union-attr]
            if self.on_conflict is not None:
                self.on_conflict(f"the peer refuses to be our replica ({e})")
            return
        except Exception as e:
            log.error("replication: handshake with the replica failed: {error}", error=e)
            self.status.error = f"handshake failed: {e}"
            self.transport.loseConnection()  # type: ignore[union-attr]
            return
        applied = int(result["applied"])
        self.status.connected = True
        self.status.error = ""
        self.status.acked = applied
        log.info("replication: shipping to the replica from sequence {seq}", seq=applied)
        self.ready.callback(applied)
        self._pump(applied)

    def connectionLost(self, reason: Any) -> None:  # type: ignore[override]
        self._stopped = True
        self.status.connected = False
        if self._wake is not None:
            wake, self._wake = self._wake, None
            wake.callback(None)
        super().connectionLost(reason)  # type: ignore[no-untyped-call]

    def wake(self) -> None:
        """New entries may be in the journal."""
        if self._wake is not None:
            wake, self._wake = self._wake, None
            wake.callback(None)

    def _sleep(self) -> defer.Deferred[None]:
        d: defer.Deferred[None] = defer.Deferred()
        self._wake = d
        call = self.clock.callLater(self.poll, self.wake)
        d.addBoth(lambda r: call.active() and call.cancel() or r)
        return d

    @defer.inlineCallbacks
    def _pump(self, position: int) -> Any:
        try:
            oldest = yield self.run(self.reader.oldest_available)
            if position + 1 < oldest:
                self.status.error = (
                    f"the journal starts at {oldest}, the replica stands at {position}:"
                    " a full resync is needed"
                )
                log.error("replication: {error}", error=self.status.error)
                self.transport.loseConnection()  # type: ignore[union-attr]
                return
            while not self._stopped:
                while len(self._inflight) >= self.window:
                    yield self._inflight[0]
                batch = yield self.run(self.reader.batch, position)
                self.status.journal_last = max(self.status.journal_last, batch.upto)
                if batch.upto <= position:
                    yield self._sleep()
                    continue
                yield self._send(batch)
                position = batch.upto
        except Exception as e:
            if not self._stopped:
                log.error("replication: shipping failed: {error}", error=e)
                self.status.error = str(e)
                self.transport.loseConnection()  # type: ignore[union-attr]

    @defer.inlineCallbacks
    def _send(self, batch: Batch) -> Any:
        if batch.blob_digests:
            missing: list[str] = []
            for i in range(0, len(batch.blob_digests), 500):
                answer = yield wire.call(
                    self, wire.Missing, digests=batch.blob_digests[i : i + 500]
                )
                missing += answer["digests"]
            tier2 = self.reader.store.tier2
            for digest in missing:
                data = yield self.run(tier2.get, digest)  # type: ignore[union-attr]
                yield self._put(f"blob:{digest}", data)
        for digest, data in batch.data.items():
            yield self._put(digest, data)
        self._batches += 1
        key = f"batch:{self._batches}"
        yield self._put(key, json.dumps({"entries": batch.entries, "upto": batch.upto}).encode())
        self.status.shipped = batch.upto
        sent_at = time.time()
        d = wire.call(self, wire.Apply, key=key)
        self._inflight.append(d)

        def acked(answer: dict[str, Any]) -> None:
            self._inflight.remove(d)
            self.status.acked = max(self.status.acked, int(answer["applied"]))
            self.status.acked_time = batch.last_time or sent_at

        def failed(f: Any) -> None:
            if d in self._inflight:
                self._inflight.remove(d)
            if not self._stopped:
                log.error("replication: the replica failed a batch: {error}", error=f.value)
                self.status.error = f"apply failed: {f.value}"
                self.transport.loseConnection()  # type: ignore[union-attr]

        d.addCallbacks(acked, failed)

    def _put(self, key: str, data: bytes) -> defer.Deferred[Any]:
        parts = wire.pieces(data)
        sent = [
            wire.call(self, wire.Put, key=key, data=piece, last=n == len(parts) - 1)
            for n, piece in enumerate(parts)
        ]
        return defer.gatherResults(sent, consumeErrors=True)
