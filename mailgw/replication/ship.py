"""The primary's side: reading the journal from the replica's position, adding what each entry
needs to be reproduced (message bytes, tier-2 blobs, the directory rows), and streaming
batches over AMP with a window of unacknowledged ones (``ShipperProtocol``).
"""

from __future__ import annotations

import hashlib
import json
import os
import time
import zlib
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
from mailgw.replication.apply import (
    DIRECTORY_KINDS,
    GROUP_KINDS,
    MARKS,
    directory_digest,
    directory_rows,
    group_rows,
)
from mailgw.store import blobs
from mailgw.store.facade import MessageStore
from mailgw.store.replica import ReplicaStore, base_of, current_row, read_current

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
        """The lowest sequence number from which the journal still holds every entry: its
        oldest route segment's first, or above the highest number retention pruning
        deleted from a database (rows go by age long before their route segment does)."""
        names = self.log.sequencer.segments()
        first = int(names[0].split(".")[0]) if names else 1
        return max(first, self.log.sequencer.pruned() + 1)

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
            # domain.added / removed are journaled with an empty user and the domain in the
            # payload; the others name a user or an alias source.
            domain = str(p.get("domain") or e.user.rpartition("@")[2])
            ship["directory"] = directory_rows(self.directory_path, domain)
        elif e.kind in GROUP_KINDS:
            ship["groups"] = group_rows(self.directory_path)
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

    # -- full resync -----------------------------------------------------------------------

    def local_digest(self, user: str) -> dict[str, Any]:
        if not user:
            return directory_digest(self.directory_path)
        return ReplicaStore(self.store).digest(user)

    def users(self) -> list[str]:
        return self.store.users()

    def resync_directory(self, remote: dict[str, Any]) -> list[Batch]:
        """Entries giving the replica every domain's rows (ours, or none), then every group."""
        local = directory_digest(self.directory_path)
        domains = sorted(set(local["domains"]) | set(remote.get("domains", [])))
        entries = [
            _entry(k.DOMAIN_ADDED, d, "", {}, {"directory": directory_rows(self.directory_path, d)})
            for d in domains
        ]
        # Then the groups (after the users their memberships name).
        entries.append(
            _entry(k.GROUP_ADDED, "", "", {}, {"groups": group_rows(self.directory_path)})
        )
        return _chunks(entries, {}, [])

    def resync_user(self, user: str, remote: dict[str, Any]) -> list[Batch]:
        """Entries making the replica's mail of ``user`` equal to ours, copying only what
        differs: folders (by name and UIDVALIDITY), messages (by UID and content hash),
        flags and modseqs, subscriptions, UIDNEXT and HIGHESTMODSEQ."""
        have = set(self.store.users())
        if user in have:
            local = ReplicaStore(self.store).digest(user)
        else:  # gone here: the replica's copy empties
            inbox = remote.get("folders", {}).get("INBOX", {})
            local = {"folders": {"INBOX": {**inbox, "messages": {}}}, "subscriptions": []}
        theirs: dict[str, Any] = remote.get("folders", {})
        mine: dict[str, Any] = local["folders"]
        entries: list[dict[str, Any]] = []
        data: dict[str, bytes] = {}
        digests: list[str] = []
        for name in sorted(set(theirs) - set(mine)):
            if name != "INBOX":
                entries.append(_entry(k.MAILBOX_DELETED, user, name, {}))
        for name, box in sorted(mine.items()):
            other = theirs.get(name)
            if other is None or other["uidvalidity"] != box["uidvalidity"]:
                entries.append(
                    _entry(
                        k.MAILBOX_CREATED,
                        user,
                        name,
                        {"uidvalidity": box["uidvalidity"], "subscribed": False},
                    )
                )
                other = {"messages": {}}
            ours, their_msgs = box["messages"], other["messages"]
            gone = [
                int(uid)
                for uid, row in their_msgs.items()
                if uid not in ours or _content(row) != _content(ours[uid])
            ]
            if gone:
                entries.append(
                    _entry(
                        k.MESSAGE_EXPUNGED,
                        user,
                        name,
                        {"uids": sorted(gone), "modseq": box["highestmodseq"]},
                    )
                )
            changes = []
            for uid, row in sorted(ours.items(), key=lambda item: int(item[0])):
                there = their_msgs.get(uid)
                if there is None or int(uid) in gone:
                    entry = self._resync_add(user, name, int(uid), data, digests)
                    if entry is not None:
                        entries.append(entry)
                elif row != there:
                    changes.append([int(uid), row[2], row[1]])
            if changes:
                entries.append(
                    _entry(
                        k.MESSAGE_FLAGS,
                        user,
                        name,
                        {"modseq": box["highestmodseq"], "changes": changes},
                    )
                )
            entries.append(
                _entry(
                    MARKS,
                    user,
                    name,
                    {"uidnext": box["uidnext"], "highestmodseq": box["highestmodseq"]},
                )
            )
        subscribed = set(local["subscriptions"])
        for name in sorted(subscribed ^ set(remote.get("subscriptions", []))):
            entries.append(
                _entry(k.MAILBOX_SUBSCRIBED, user, name, {"subscribed": name in subscribed})
            )
        return _chunks(entries, data, digests)

    def _resync_add(
        self, user: str, folder: str, uid: int, data: dict[str, bytes], digests: list[str]
    ) -> dict[str, Any] | None:
        info = current_row(self.store, user, folder, uid)
        if info is None:
            return None
        ship: dict[str, Any] = {}
        if info.blob is not None:
            tier2 = self.store.tier2
            if tier2 is None:
                return None
            ship = {"blob": info.blob, "filename": info.filename}
            digests += [d for d in blobs.split_ref(info.blob) if d not in digests]
        else:
            try:
                body = self.store.open_mailbox(user, folder, snapshot=False).read_message(uid)
            except (KeyError, OSError):
                return None
            digest = hashlib.sha256(body).hexdigest()
            data[digest] = body
            ship = {"data": digest}
        payload = {
            "uid": uid,
            "modseq": info.modseq,
            "size": info.size,
            "flags": sorted(info.flags),
            "internaldate": info.internaldate,
            "tz": info.internaldate_tz,
        }
        return _entry(k.MESSAGE_ADDED, user, folder, payload, ship)


def _content(row: list[Any]) -> tuple[Any, ...]:
    """What a digest row says about a message's bytes and dates (not flags or modseq)."""
    return (row[0], row[3], row[4], row[5], row[6])


def _entry(
    kind: str, user: str, folder: str, payload: dict[str, Any], ship: dict[str, Any] | None = None
) -> dict[str, Any]:
    entry: dict[str, Any] = {
        "seq": None,
        "time": time.time(),
        "kind": kind,
        "user": user,
        "folder": folder,
        "payload": payload,
    }
    if ship:
        entry["ship"] = ship
    return entry


def _chunks(
    entries: list[dict[str, Any]], data: dict[str, bytes], digests: list[str]
) -> list[Batch]:
    """Resync entries in batches of ``BATCH_ENTRIES`` / about ``BATCH_BYTES``."""
    out: list[Batch] = []
    current = Batch(0, [])
    size = 0
    for entry in entries:
        current.entries.append(entry)
        ship = entry.get("ship") or {}
        if "data" in ship:
            current.data[ship["data"]] = data[ship["data"]]
            size += len(data[ship["data"]])
        if "blob" in ship:
            current.blob_digests += [
                d for d in blobs.split_ref(ship["blob"]) if d not in current.blob_digests
            ]
        if len(current.entries) >= BATCH_ENTRIES or size >= BATCH_BYTES:
            out.append(current)
            current, size = Batch(0, []), 0
    if current.entries:
        out.append(current)
    return out


Run = Callable[..., "defer.Deferred[Any]"]


@defer.inlineCallbacks
def authenticate(proto: amp.AMP, secret: bytes, node: str = "") -> Any:
    """The primary's half of the handshake on ``proto`` (TLS established): checks the
    replica's proof, shows its own; fires with the ``Authenticate`` answer."""
    cert = wire.fingerprint(proto.transport.getPeerCertificate())  # type: ignore[union-attr]
    mine = wire.new_nonce()
    answer = yield wire.call(proto, wire.Challenge, nonce=mine)
    expected = wire.proof(secret, "replica", mine, answer["nonce"], cert)
    if not wire.check(expected, answer["proof"]):
        raise wire.AuthFailed("the replica's proof is wrong (secret or certificate)")
    proof = wire.proof(secret, "primary", mine, answer["nonce"], cert)
    if node:
        result = yield wire.call(proto, wire.Authenticate, proof=proof, node=node)
    else:
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
        node: str = "",
        on_ack: Callable[[], None] | None = None,
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
        self.node = node
        self.on_ack = on_ack
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
            result = yield authenticate(self, self.secret, self.node)
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
        if applied != wire.RESYNC:
            oldest = yield self.run(self.reader.oldest_available)
            if applied + 1 < oldest:
                log.warn(
                    "replication: the journal starts at {oldest}, the replica stands at"
                    " {seq}: full resync",
                    oldest=oldest,
                    seq=applied,
                )
                applied = wire.RESYNC
        if applied == wire.RESYNC:
            try:
                applied = yield self._resync()
            except Exception as e:
                if not self._stopped:
                    log.error("replication: full resync failed: {error}", error=e)
                    self.status.error = f"resync failed: {e}"
                    self.transport.loseConnection()  # type: ignore[union-attr]
                return
        self.status.acked = applied
        log.info("replication: shipping to the replica from sequence {seq}", seq=applied)
        self.ready.callback(applied)
        self._pump(applied)

    @defer.inlineCallbacks
    def _resync(self) -> Any:
        """Compare every mailbox and the directory with the replica's and send only the
        differences; then the replica stands at the journal's end as it was when the
        comparison started (later changes follow by streaming, applied idempotently)."""
        start = yield self.run(self.reader.last_seq)
        log.info("replication: full resync of the replica up to {seq}", seq=start)
        self.status.error = "full resync in progress"
        yield wire.call(self, wire.ResyncBegin, node=self.node)
        remote = yield self._remote_digest("")
        batches = yield self.run(self.reader.resync_directory, remote)
        for batch in batches:
            yield self._send(batch, resync=True)
        theirs = (yield wire.call(self, wire.Users))["users"]
        mine = yield self.run(self.reader.users)
        for user in sorted(set(theirs) | set(mine)):
            remote = yield self._remote_digest(user)
            batches = yield self.run(self.reader.resync_user, user, remote)
            for batch in batches:
                yield self._send(batch, resync=True)
        while self._inflight:
            yield self._inflight[0]
        answer = yield wire.call(self, wire.ResyncEnd, upto=start)
        self.status.error = ""
        log.info("replication: full resync complete")
        return int(answer["applied"])

    @defer.inlineCallbacks
    def _remote_digest(self, user: str) -> Any:
        data = b""
        part = 0
        while True:
            answer = yield wire.call(self, wire.Digest, user=user, part=part)
            data += answer["data"]
            if not answer["more"]:
                return json.loads(zlib.decompress(data))
            part += 1

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
    def _send(self, batch: Batch, resync: bool = False) -> Any:
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
        body = {"entries": batch.entries, "upto": batch.upto, "resync": resync}
        yield self._put(key, json.dumps(body).encode())
        if not resync:
            self.status.shipped = batch.upto
        sent_at = time.time()
        d = wire.call(self, wire.Apply, key=key)
        self._inflight.append(d)

        def acked(answer: dict[str, Any]) -> None:
            self._inflight.remove(d)
            if not resync:
                self.status.acked = max(self.status.acked, int(answer["applied"]))
                self.status.acked_time = batch.last_time or sent_at
                if self.on_ack is not None:
                    self.on_ack()

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
