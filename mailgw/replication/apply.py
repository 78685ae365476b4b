"""The replica's side: applying the primary's journal entries in order (``Applier``) and the
AMP server protocol the primary ships them over (``ReplicaProtocol``).

Each entry is applied in one write transaction of the database it concerns (a user's index,
or the directory) together with its sequence number: a crash leaves an entry applied with
its number, or neither, so re-shipping from the replica's position never applies one twice.
The replica's position is the highest number any of its databases holds.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import sqlite3
import zlib
from collections.abc import Callable, Mapping
from typing import Any

from twisted.internet import defer
from twisted.logger import Logger
from twisted.protocols import amp

from mailgw.model import change as k
from mailgw.replication import wire
from mailgw.store.facade import MessageStore
from mailgw.store.replica import ReplicaStore

log = Logger()

STAGING_MAX = 512 << 20
"""Bytes of message data one connection may stage before its batch is applied."""

_DIRECTORY_TABLE = "CREATE TABLE IF NOT EXISTS replication (key TEXT PRIMARY KEY, value TEXT)"


class DirectoryReplica:
    """The replica's copy of the primary's directory (``directory.sqlite``): each directory
    entry carries the primary's rows of the domain it concerns, which replace ours in one
    transaction with the entry's sequence number."""

    def __init__(self, path: str) -> None:
        self.path = path
        self._db = sqlite3.connect(path, isolation_level=None, check_same_thread=False, timeout=30)
        self._db.execute("PRAGMA foreign_keys=ON")
        self._db.execute(_DIRECTORY_TABLE)

    def close(self) -> None:
        self._db.close()

    def position(self) -> int:
        row = self._db.execute("SELECT value FROM replication WHERE key = 'seq'").fetchone()
        return int(row[0]) if row else 0

    def advance(self, seq: int) -> None:
        """Record that every entry up to ``seq`` is applied (gaps, entries with nothing to do
        here)."""
        with self._write() as db:
            self._mark(db, seq)

    @staticmethod
    def _mark(db: sqlite3.Connection, seq: int) -> None:
        db.execute(
            "INSERT INTO replication(key, value) VALUES ('seq', ?) ON CONFLICT(key)"
            " DO UPDATE SET value = max(CAST(value AS INTEGER), excluded.value)",
            (str(seq),),
        )

    def _write(self) -> Any:
        db = self._db

        class _Txn:
            def __enter__(self) -> sqlite3.Connection:
                db.execute("BEGIN IMMEDIATE")
                return db

            def __exit__(self, exc_type: Any, *rest: Any) -> None:
                db.execute("ROLLBACK" if exc_type is not None else "COMMIT")

        return _Txn()

    def get(self, key: str) -> str | None:
        row = self._db.execute("SELECT value FROM replication WHERE key = ?", (key,)).fetchone()
        return None if row is None else str(row[0])

    def set(self, key: str, value: str | None) -> None:
        with self._write() as db:
            if value is None:
                db.execute("DELETE FROM replication WHERE key = ?", (key,))
            else:
                db.execute(
                    "INSERT OR REPLACE INTO replication(key, value) VALUES (?, ?)", (key, value)
                )

    def apply(self, seq: int | None, snapshot: Mapping[str, Any]) -> None:
        """Replace the rows of ``snapshot['domain']`` with the primary's (``seq`` None: a
        resync's, recorded by its end)."""
        if seq is not None and self.position() >= seq:
            return
        domain = str(snapshot["domain"])
        with self._write() as db:
            db.execute("DELETE FROM aliases WHERE domain = ?", (domain,))
            db.execute("DELETE FROM users WHERE domain = ?", (domain,))
            if snapshot.get("exists"):
                db.execute("INSERT OR IGNORE INTO domains(name) VALUES (?)", (domain,))
                db.executemany(
                    "INSERT INTO users(name, domain, password, quota, enabled)"
                    " VALUES (?, ?, ?, ?, ?)",
                    [tuple(r) for r in snapshot.get("users", [])],
                )
                db.executemany(
                    "INSERT INTO aliases(source, destination, domain) VALUES (?, ?, ?)",
                    [tuple(r) for r in snapshot.get("aliases", [])],
                )
            else:
                db.execute("DELETE FROM domains WHERE name = ?", (domain,))
            # The primary takes a removed user out of its groups in the same transaction.
            db.execute("DELETE FROM group_members WHERE user NOT IN (SELECT name FROM users)")
            if seq is not None:
                self._mark(db, seq)

    def apply_groups(self, seq: int | None, snapshot: Mapping[str, Any]) -> None:
        """Replace every group and membership with the primary's (``group_rows``)."""
        if seq is not None and self.position() >= seq:
            return
        with self._write() as db:
            db.execute("DELETE FROM group_members")
            db.execute("DELETE FROM groups")
            db.executemany(
                "INSERT INTO groups(name) VALUES (?)", [(g,) for g in snapshot.get("groups", [])]
            )
            db.executemany(
                "INSERT INTO group_members(user, grp) VALUES (?, ?)",
                [tuple(r) for r in snapshot.get("members", [])],
            )
            if seq is not None:
                self._mark(db, seq)


def group_rows(path: str) -> dict[str, Any]:
    """Every group and membership of the directory at ``path``, as a group entry ships them
    (groups belong to no domain: the whole, small, table goes each time)."""
    db = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=30)
    try:
        groups = [r[0] for r in db.execute("SELECT name FROM groups ORDER BY name")]
        members = db.execute("SELECT user, grp FROM group_members ORDER BY grp, user").fetchall()
    finally:
        db.close()
    return {"groups": groups, "members": [list(r) for r in members]}


def directory_rows(path: str, domain: str) -> dict[str, Any]:
    """The rows of ``domain`` in the directory at ``path``, as a directory entry ships them."""
    db = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=30)
    try:
        exists = db.execute("SELECT 1 FROM domains WHERE name = ?", (domain,)).fetchone()
        users = db.execute(
            "SELECT name, domain, password, quota, enabled FROM users WHERE domain = ?"
            " ORDER BY name",
            (domain,),
        ).fetchall()
        aliases = db.execute(
            "SELECT source, destination, domain FROM aliases WHERE domain = ? ORDER BY id",
            (domain,),
        ).fetchall()
    finally:
        db.close()
    return {
        "domain": domain,
        "exists": bool(exists),
        "users": [list(r) for r in users],
        "aliases": [list(r) for r in aliases],
    }


def directory_digest(path: str) -> dict[str, Any]:
    """Everything of the directory that must be identical on both nodes."""
    db = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=30)
    try:
        return {
            "domains": [r[0] for r in db.execute("SELECT name FROM domains ORDER BY name")],
            "users": [
                list(r)
                for r in db.execute(
                    "SELECT name, password, quota, enabled FROM users ORDER BY name"
                )
            ],
            "aliases": [
                list(r)
                for r in db.execute(
                    "SELECT source, destination FROM aliases ORDER BY source, destination"
                )
            ],
            "groups": [r[0] for r in db.execute("SELECT name FROM groups ORDER BY name")],
            "group_members": [
                list(r)
                for r in db.execute("SELECT grp, user FROM group_members ORDER BY grp, user")
            ],
        }
    finally:
        db.close()


MARKS = "replica.marks"
"""A resync's own entry: a folder's UIDNEXT and HIGHESTMODSEQ as the primary has them."""

DIRECTORY_KINDS = frozenset(
    (
        k.DOMAIN_ADDED,
        k.DOMAIN_REMOVED,
        k.USER_CREATED,
        k.USER_CHANGED,
        k.USER_DELETED,
        k.QUOTA_CHANGED,
        k.ALIAS_ADDED,
        k.ALIAS_REMOVED,
    )
)
GROUP_KINDS = frozenset(
    (k.GROUP_ADDED, k.GROUP_REMOVED, k.GROUP_MEMBER_ADDED, k.GROUP_MEMBER_REMOVED)
)
"""Group changes: each ships every group with its members (``group_rows``)."""


class Applier:
    """Applies shipped entries to this node's store and directory, in order."""

    def __init__(self, store: MessageStore, directory_path: str) -> None:
        self.store = store
        self.replica = ReplicaStore(store)
        self.directory = DirectoryReplica(directory_path)
        self._position: int | None = None
        self.last_time = 0.0
        """The primary's time of the last entry applied (0: none in this run)."""

    def close(self) -> None:
        self.directory.close()

    def position(self) -> int:
        """The last sequence number applied (every lower one is applied too)."""
        if self._position is None:
            self._position = max(self.directory.position(), self.replica.position())
        return self._position

    # -- full resync -----------------------------------------------------------------------

    def needs_resync(self, node: str | None) -> bool:
        """True when this replica cannot stream from primary ``node``: it was demoted (a
        ``resync`` request file) or it followed another primary, whose numbers mean
        nothing to this one."""
        if os.path.exists(self.resync_marker()):
            return True
        followed = self.directory.get("primary")
        return bool(node) and followed is not None and followed != node

    def resync_marker(self) -> str:
        return os.path.join(os.path.dirname(self.directory.path), "replication", "resync")

    def request_resync(self) -> None:
        """Ask for a full resync at the next connection (the ``resync`` file)."""
        marker = self.resync_marker()
        os.makedirs(os.path.dirname(marker), mode=0o750, exist_ok=True)
        with open(marker, "w", encoding="utf-8") as fh:
            fh.write("requested\n")

    def begin_resync(self, node: str) -> None:
        """Forget every position (the resync's changes are applied without numbers)."""
        for user in self.store.users():
            self.replica.reset(user)
        self.directory.set("seq", None)
        self.directory.set("primary", node)
        self._position = 0

    def end_resync(self, upto: int) -> int:
        """The resync is complete and everything up to the primary's ``upto`` is in: the
        position to stream from."""
        self.directory.advance(upto)
        self._position = upto
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.resync_marker())
        return upto

    def follow(self, node: str) -> None:
        """Remember the primary being followed (its first connection)."""
        if node and self.directory.get("primary") is None:
            self.directory.set("primary", node)

    def apply_batch(self, batch: Mapping[str, Any], contents: Mapping[str, bytes]) -> int:
        """Apply ``batch`` (``entries`` in order, ``upto``: the last number it covers) with
        the message data it refers to; returns the new position. A resync's batch
        (``resync``) applies its entries unconditionally and moves no position."""
        if batch.get("resync"):
            for entry in batch["entries"]:
                self.apply(entry, contents)
            return self.position()
        position = self.position()
        for entry in batch["entries"]:
            seq = int(entry["seq"])
            if seq <= position:
                continue
            self.apply(entry, contents)
            position = self._position = seq
            self.last_time = float(entry["time"])
        upto = int(batch.get("upto", position))
        if upto > position:
            self.directory.advance(upto)
            position = self._position = upto
        return position

    def apply(self, entry: Mapping[str, Any], contents: Mapping[str, bytes]) -> None:
        """Apply one entry (``seq``, ``kind``, ``user``, ``folder``, ``payload`` and what the
        primary added for shipping: ``ship``)."""
        seq = None if entry.get("seq") is None else int(entry["seq"])
        kind = str(entry["kind"])
        user = str(entry["user"])
        folder = str(entry["folder"])
        p: Mapping[str, Any] = entry["payload"]
        ship: Mapping[str, Any] = entry.get("ship") or {}
        r = self.replica
        if kind in DIRECTORY_KINDS:
            self.directory.apply(seq, ship["directory"])
        elif kind in GROUP_KINDS:
            self.directory.apply_groups(seq, ship["groups"])
        elif kind in (k.MESSAGE_ADDED, k.MESSAGE_COPIED):
            data = None
            if "data" in ship:
                data = contents[str(ship["data"])]
                if hashlib.sha256(data).hexdigest() != ship["data"]:
                    raise ValueError(f"entry {seq}: message data does not match its digest")
            r.added(
                user,
                seq,
                folder,
                int(p["uid"]),
                int(p["modseq"]),
                p.get("flags", ()),
                float(p["internaldate"]),
                int(p.get("tz", ship.get("tz", 0))),
                data=data,
                blob=ship.get("blob"),
                filename=str(ship.get("filename", "")),
            )
        elif kind == k.MESSAGE_FLAGS:
            r.flags(user, seq, folder, int(p["modseq"]), p["changes"])
        elif kind == k.MESSAGE_EXPUNGED:
            r.expunged(user, seq, folder, p["uids"], int(p["modseq"]))
        elif kind == k.MESSAGE_MOVED:
            r.moved(
                user,
                seq,
                folder,
                str(p["to"]),
                p["uids"],
                p.get("modseqs"),
                p.get("modseq"),
                p.get("to_modseq"),
            )
        elif kind == k.MAILBOX_CREATED:
            r.created(user, seq, folder, int(p["uidvalidity"]), bool(p.get("subscribed")))
        elif kind == k.MAILBOX_DELETED:
            r.deleted(user, seq, folder)
        elif kind == k.MAILBOX_RENAMED:
            r.renamed(user, seq, str(p["from"]), folder)
        elif kind == k.MAILBOX_SUBSCRIBED:
            r.subscribed(user, seq, folder, bool(p["subscribed"]))
        elif kind == k.TIER_MIGRATED:
            r.migrated(user, seq, folder, int(p["uid"]))
        elif kind == k.TIER_PROMOTED:
            r.promoted(user, seq, folder, int(p["uid"]))
        elif kind == MARKS:
            r.set_marks(user, folder, int(p["uidnext"]), int(p["highestmodseq"]))
        else:
            # mailbox.resynced (the primary's index repaired from files another program
            # changed) and kinds this version does not know: nothing is reproduced; ``dr
            # verify`` shows the difference.
            log.warn("replication: entry {seq} ({kind}) not applied", seq=seq, kind=kind)
            if user and seq is not None:
                r.mark(user, seq)

    # -- comparing -------------------------------------------------------------------------

    def digest(self, user: str) -> dict[str, Any]:
        """The digest ``dr verify`` compares (``user`` empty: the directory)."""
        if not user:
            return directory_digest(self.directory.path)
        return self.replica.digest(user)


Run = Callable[..., "defer.Deferred[Any]"]


class ReplicaProtocol(amp.AMP):
    """The replica's end of one connection: the handshake, then pieces, blobs and batches
    applied strictly in the order they arrive (``run`` runs blocking work in a thread)."""

    def __init__(
        self,
        applier: Applier,
        secret: bytes,
        run: Run,
        role: Callable[[], str],
        on_applied: Callable[[int, float], None] | None = None,
        on_auth: Callable[[ReplicaProtocol, bool], None] | None = None,
    ) -> None:
        super().__init__()  # type: ignore[no-untyped-call]
        self.applier = applier
        self.secret = secret
        self.run = run
        self.role = role
        self.on_applied = on_applied
        self.on_auth = on_auth
        self.authenticated = False
        self._nonces: tuple[bytes, bytes] | None = None
        self._staged: dict[str, bytearray] = {}
        self._complete: dict[str, bytes] = {}
        self._staged_bytes = 0
        self._chain: defer.Deferred[Any] = defer.succeed(None)
        self._broken = False

    def _serial(self, fn: Callable[..., Any], *args: Any) -> defer.Deferred[Any]:
        """Run blocking ``fn`` in a thread after everything queued before it (blobs, batches
        and digests are handled strictly in the order they arrived)."""
        result: defer.Deferred[Any] = defer.Deferred()

        def start(_: Any) -> defer.Deferred[Any]:
            d = self.run(fn, *args)
            d.addCallbacks(result.callback, result.errback)
            return d.addErrback(lambda _f: None)

        self._chain.addCallback(start)
        return result

    def locateResponder(self, name: bytes) -> Any:
        if not self.authenticated and name not in (b"Challenge", b"Authenticate"):
            log.warn(
                "replication: {peer} sent {name!r} before authenticating",
                peer=self._peer(),
                name=name,
            )
            self._close_soon()
            return None
        return super().locateResponder(name)  # type: ignore[no-untyped-call]

    def _peer(self) -> str:
        try:
            return str(self.transport.getPeer())  # type: ignore[union-attr]
        except Exception:
            return "?"

    def _own_cert(self) -> str:
        try:
            handle = self.transport.getHandle()  # type: ignore[union-attr]
            return wire.fingerprint(handle.get_certificate())
        except Exception:
            return ""

    def _close_soon(self) -> None:
        from twisted.internet import reactor

        transport = self.transport
        if transport is not None:
            reactor.callLater(0, transport.loseConnection)

    @wire.Challenge.responder
    def challenge(self, nonce: bytes) -> dict[str, bytes]:
        if len(nonce) != wire.NONCE_BYTES:
            raise wire.AuthFailed("bad nonce")
        mine = wire.new_nonce()
        self._nonces = (nonce, mine)
        return {
            "nonce": mine,
            "proof": wire.proof(self.secret, "replica", nonce, mine, self._own_cert()),
        }

    @wire.Authenticate.responder
    def authenticate(self, proof: bytes, node: str | None = None) -> Any:
        nonces, self._nonces = self._nonces, None
        if nonces is None or not wire.check(
            wire.proof(self.secret, "primary", nonces[0], nonces[1], self._own_cert()), proof
        ):
            log.warn("replication: {peer} failed to authenticate", peer=self._peer())
            if self.on_auth is not None:
                self.on_auth(self, False)
            self._close_soon()
            raise wire.AuthFailed("authentication failed")
        role = self.role()
        if role != "replica":
            self._close_soon()
            raise wire.Conflict(f"this node is a {role}, not a replica")
        self.authenticated = True
        if self.on_auth is not None:
            self.on_auth(self, True)

        def where() -> dict[str, Any]:
            if self.applier.needs_resync(node):
                return {"applied": wire.RESYNC, "role": role}
            self.applier.follow(node or "")
            return {"applied": self.applier.position(), "role": role}

        return self._serial(where)

    @wire.ResyncBegin.responder
    def resync_begin(self, node: str) -> Any:
        if self.role() != "replica":
            raise wire.Conflict("not a replica")
        log.info("replication: full resync from primary {node} begins", node=node)

        def begin() -> dict[str, Any]:
            self.applier.begin_resync(node)
            return {}

        return self._serial(begin)

    @wire.ResyncEnd.responder
    def resync_end(self, upto: int) -> Any:
        def end() -> dict[str, Any]:
            return {"applied": self.applier.end_resync(upto)}

        def done(answer: dict[str, Any]) -> dict[str, Any]:
            log.info("replication: full resync complete at {seq}", seq=upto)
            if self.on_applied is not None:
                self.on_applied(upto, 0.0)
            return answer

        return self._serial(end).addCallback(done)

    @wire.Missing.responder
    def missing(self, digests: list[str]) -> Any:
        tier2 = self.applier.store.tier2
        if tier2 is None:
            return {"digests": list(digests)}
        return self.run(lambda: {"digests": [d for d in digests if not tier2.exists(d)]})

    @wire.Put.responder
    def put(self, key: str, data: bytes, last: bool) -> Any:
        if self.role() != "replica":
            raise wire.Conflict("not a replica")
        buf = self._staged.setdefault(key, bytearray())
        buf += data
        self._staged_bytes += len(data)
        if self._staged_bytes > STAGING_MAX:
            raise wire.Conflict("too much staged data")
        if not last:
            return {}
        whole = bytes(self._staged.pop(key))
        if key.startswith("blob:"):
            return self._store_blob(key[5:], whole)
        self._complete[key] = whole
        return {}

    def _store_blob(self, digest: str, data: bytes) -> Any:
        tier2 = self.applier.store.tier2
        if tier2 is None:
            raise wire.Conflict("this node has no tier 2 ([store] tier2_dir)")
        if hashlib.sha256(data).hexdigest() != digest:
            raise wire.Conflict(f"blob {digest} does not match its digest")
        self._staged_bytes -= len(data)

        def store() -> dict[str, Any]:
            tier2.put(data)
            return {}

        return self._serial(store)

    @wire.Apply.responder
    def apply(self, key: str) -> Any:
        if self.role() != "replica":
            raise wire.Conflict("not a replica")
        batch = json.loads(self._complete.pop(key))
        contents = {}
        for entry in batch["entries"]:
            ship = entry.get("ship") or {}
            if "data" in ship and ship["data"] in self._complete:
                contents[ship["data"]] = self._complete.pop(ship["data"])
        self._staged_bytes = sum(len(v) for v in self._complete.values()) + sum(
            len(v) for v in self._staged.values()
        )

        def work() -> int:
            if self._broken:
                raise wire.Conflict("an earlier batch failed")
            try:
                return self.applier.apply_batch(batch, contents)
            except Exception:
                self._broken = True
                raise

        def done(position: int) -> dict[str, int]:
            if self.on_applied is not None:
                self.on_applied(position, self.applier.last_time)
            return {"applied": position}

        def failed(f: Any) -> Any:
            log.failure("replication: applying batch {key} failed", f, key=key)
            if not f.check(wire.Conflict):
                # This replica cannot follow the stream (it diverged, or an entry cannot be
                # reproduced): the next connection compares everything and repairs it.
                try:
                    self.applier.request_resync()
                    log.warn("replication: a full resync is requested for the next connection")
                except OSError as e:
                    log.error("replication: cannot request a resync: {error}", error=e)
            self._close_soon()
            return f

        return self._serial(work).addCallbacks(done, failed)

    @wire.Digest.responder
    def digest(self, user: str, part: int) -> Any:
        key = f"digest:{user}"

        def answer(blob: bytes) -> dict[str, Any]:
            piece = blob[part * wire.CHUNK : (part + 1) * wire.CHUNK]
            more = (part + 1) * wire.CHUNK < len(blob)
            if more:
                self._complete[key] = blob
            else:
                self._complete.pop(key, None)
            return {"data": piece, "more": more}

        if part > 0 and key in self._complete:
            return answer(self._complete[key])

        def make() -> bytes:
            digest = self.applier.digest(user)
            return zlib.compress(json.dumps(digest, sort_keys=True).encode())

        return self._serial(make).addCallback(answer)

    @wire.Users.responder
    def users(self) -> Any:
        return self.run(lambda: {"users": self.applier.store.users()})
