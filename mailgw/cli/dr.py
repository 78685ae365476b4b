"""``mailgw dr status|verify``: the state of the mirror sync, and a comparison of both nodes."""

from __future__ import annotations

import argparse
import json
import os
import time
import zlib
from collections.abc import Callable
from typing import Any

from mailgw.cli.context import Context, Failure


def cmd_dr_status(ctx: Context, args: argparse.Namespace) -> None:
    from mailgw.replication.service import read_status

    config = ctx.config
    r = config.replication
    status = read_status(config.server.data_dir) or {}
    running = bool(status) and _alive(int(status.get("pid", 0)))
    role = status.get("role", r.role)
    journal_last = _journal_last(config.server.data_dir)
    acked = int(status.get("acked", 0))
    # The journal's end as it is now (the status file may be a second old: the lag shown is
    # never smaller than the real one).
    lag = max(0, journal_last - acked) if running and role == "primary" else 0
    lag_seconds = 0.0
    if running and role == "primary" and lag > 0 and status.get("acked_time"):
        lag_seconds = max(0.0, time.time() - float(status["acked_time"]))
    out = {
        "enabled": bool(r.enabled),
        "role": role,
        "peer": r.peer if role == "primary" else ",".join(r.listen),
        "mode": status.get("mode", r.mode) if running else r.mode,
        "sync_fallbacks": int(status.get("fallbacks", 0)),
        "running": running,
        "connected": bool(status.get("connected")) and running,
        "journal_last": journal_last,
        "last_shipped": int(status.get("shipped", 0)),
        "last_acked": int(status.get("acked", 0)),
        "last_applied": int(status.get("applied", 0)),
        "lag_entries": lag,
        "lag_seconds": round(lag_seconds, 3),
        "error": status.get("error", ""),
    }
    if args.json:
        print(json.dumps(out, sort_keys=True))
        return
    for key, value in out.items():
        print(f"{key:15} {value}")


def _journal_last(data_dir: str) -> int:
    from mailgw.journal.changelog import ChangeLog

    path = os.path.join(data_dir, "journal")
    if not os.path.isdir(path):
        return 0
    log = ChangeLog(path)
    try:
        return log.last_seq()
    finally:
        log.close()


def _alive(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def diff(a: Any, b: Any, path: str, out: list[str], limit: int = 200) -> None:
    """Differences between ``a`` (here) and ``b`` (the peer) as readable lines."""
    if len(out) >= limit:
        return
    if isinstance(a, dict) and isinstance(b, dict):
        for key in sorted(set(a) | set(b), key=str):
            if key not in b:
                out.append(f"{path}/{key}: only here")
            elif key not in a:
                out.append(f"{path}/{key}: only on the peer")
            else:
                diff(a[key], b[key], f"{path}/{key}", out, limit)
    elif a != b:
        out.append(f"{path}: here {json.dumps(a)}, peer {json.dumps(b)}")


def _local_store(ctx: Context) -> Any:
    from mailgw.store import MessageStore
    from mailgw.store.migration import tier2_from_config

    config = ctx.config
    return MessageStore(
        root=os.path.join(config.server.data_dir, "mail"),
        quota_for=ctx.directory.quota_for,
        default_folders=config.store.default_folders,
        hostname=config.server.hostname,
        tier2=tier2_from_config(config.server.data_dir, config.store),
    )


def cmd_dr_verify(ctx: Context, args: argparse.Namespace) -> None:
    from mailgw.replication.apply import directory_digest
    from mailgw.replication.wire import read_secret
    from mailgw.store.replica import ReplicaStore

    config = ctx.config
    r = config.replication
    from mailgw.replication.state import effective_role

    if not r.enabled or effective_role(config.server.data_dir, r.role) != "primary":
        raise Failure("dr verify runs on the primary ([replication] enabled, role = primary)")
    try:
        secret = read_secret(r.secret_file)
    except (OSError, ValueError) as e:
        raise Failure(str(e)) from None
    store = _local_store(ctx)
    try:
        local = ReplicaStore(store)
        remote = _fetch_remote(r.peer, secret, lambda users: users)
        differences: list[str] = []
        diff(
            directory_digest(os.path.join(config.server.data_dir, "directory.sqlite")),
            remote[""],
            "directory",
            differences,
        )
        users = sorted(set(store.users()) | set(remote) - {""})
        for user in users:
            if user not in remote:
                differences.append(f"{user}: only here")
                continue
            if user not in store.users():
                differences.append(f"{user}: only on the peer")
                continue
            diff(local.digest(user), remote[user], user, differences)
    finally:
        store.close()
    if differences:
        for line in differences:
            print(line)
        raise Failure(f"{len(differences)} difference(s) with the replica {r.peer}")
    print(f"identical: {len(users)} user(s) and the directory ({r.peer})")


def _fetch_remote(
    peer: str, secret: bytes, pick: Callable[[list[str]], list[str]]
) -> dict[str, Any]:
    """The replica's digests: the directory's ("") and every user's."""
    from twisted.internet import defer, task
    from twisted.internet.interfaces import IHandshakeListener
    from twisted.internet.protocol import Factory
    from twisted.protocols import amp
    from zope.interface import implementer

    from mailgw.replication import wire
    from mailgw.replication.service import client_endpoint
    from mailgw.replication.ship import authenticate

    result: dict[str, Any] = {}
    errors: list[str] = []

    @implementer(IHandshakeListener)
    class Verifier(amp.AMP):
        def __init__(self) -> None:
            super().__init__()  # type: ignore[no-untyped-call]
            self.ready: defer.Deferred[Any] = defer.Deferred()

        def handshakeCompleted(self) -> None:
            authenticate(self, secret).chainDeferred(self.ready)

    @defer.inlineCallbacks
    def run(reactor: Any) -> Any:
        proto = yield client_endpoint(reactor, peer).connect(Factory.forProtocol(Verifier))
        try:
            yield proto.ready
            users = (yield wire.call(proto, wire.Users))["users"]
            for user in ["", *pick(users)]:
                data = b""
                part = 0
                while True:
                    answer = yield wire.call(proto, wire.Digest, user=user, part=part)
                    data += answer["data"]
                    if not answer["more"]:
                        break
                    part += 1
                result[user] = json.loads(zlib.decompress(data))
        except Exception as e:
            errors.append(str(e))
        finally:
            proto.transport.loseConnection()

    try:
        task.react(run, [])
    except SystemExit as e:
        if e.code:
            raise Failure(f"cannot reach the replica at {peer}") from None
    if errors:
        raise Failure(f"the replica at {peer}: {errors[0]}")
    return result


def cmd_dr_promote(ctx: Context, args: argparse.Namespace) -> None:
    from mailgw.replication import state

    config = ctx.config
    data_dir = config.server.data_dir
    now = state.effective_role(data_dir, config.replication.role)
    if now != "replica":
        raise Failure(f"this node is a {now}, not a replica: nothing to promote")
    state.write_state(data_dir, "primary")
    print(
        "promoted: this node accepts writes now. Point clients and MX records here; when the"
        " old primary returns it refuses to ship and to accept writes until"
        " `mailgw dr demote --resync` is run on it."
    )


def cmd_dr_demote(ctx: Context, args: argparse.Namespace) -> None:
    from mailgw.replication import state

    config = ctx.config
    data_dir = config.server.data_dir
    now = state.effective_role(data_dir, config.replication.role)
    if now == "replica":
        raise Failure("this node is a replica already")
    if not args.resync:
        raise Failure(
            "demote replaces this node's mail with the new primary's: confirm with --resync"
        )
    state.write_state(data_dir, "replica")
    with open(os.path.join(data_dir, "replication", "resync"), "w", encoding="utf-8") as fh:
        fh.write("requested\n")
    print(
        "demoted: this node is a read-only replica now; restart it with [replication] listen"
        " reachable from the new primary (whose peer points here): the new primary compares"
        " every mailbox and copies the differences, then streams."
    )


def register_dr_commands(group: Callable[[str, str], Any], command: Callable[..., Any]) -> None:
    """Add the ``dr`` command group to the ``mailgw`` parser."""
    dr = group("dr", "disaster recovery: mirror sync to the replica node")
    p = command(dr, "status", cmd_dr_status, "role, peer, connection, sequences, lag")
    p.add_argument("--json", action="store_true", help="JSON output")
    command(dr, "verify", cmd_dr_verify, "compare this primary with its replica (exit 0: same)")
    command(dr, "promote", cmd_dr_promote, "make this replica a primary that accepts writes")
    p = command(dr, "demote", cmd_dr_demote, "make this (old) primary a replica of the new one")
    p.add_argument(
        "--resync", action="store_true", help="required: take the new primary's data over"
    )
