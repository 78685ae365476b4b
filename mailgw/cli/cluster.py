"""``mailgw user node USER [NODE]`` and ``mailgw user move USER NODE``: where a user's
mailbox lives in a cluster (``[cluster] mailbox_nodes``), and moving it (``mailgw.cluster.move``)."""

from __future__ import annotations

import argparse
import os
from typing import Any

from mailgw.cli.context import Context, Failure

MIN_WAIT = 3.0
"""Seconds a command waits for Redis at least (else six times ``[state] timeout``)."""


def _map(ctx: Context) -> Any:
    from mailgw.runtime.process import build_mailbox_map

    if ctx.config.cluster.mailbox_nodes and ctx.config.state.backend == "redis":
        return _redis_map(ctx.config)
    mailbox_map = build_mailbox_map(ctx.config)
    if mailbox_map is None:
        raise Failure("no [cluster] mailbox_nodes in this config")
    return mailbox_map


def _redis_map(config: Any) -> Any:
    """The gateways' map in Redis (``[state] backend = redis``), its calls run by a reactor
    in a thread of this command (an unreachable Redis fails the command: nothing written)."""
    import threading

    from twisted.internet import reactor as _reactor
    from twisted.internet.defer import maybeDeferred
    from twisted.internet.threads import blockingCallFromThread

    from mailgw.cluster.statemap import StateMailboxMap
    from mailgw.state.redis import RedisState, connect_redis

    reactor: Any = _reactor
    thread = threading.Thread(
        target=reactor.run, kwargs={"installSignalHandlers": False}, daemon=True
    )
    thread.start()
    handler, close = blockingCallFromThread(
        reactor, lambda: connect_redis(config.state, config.state.timeout)
    )

    def stop() -> None:
        try:
            blockingCallFromThread(reactor, lambda: maybeDeferred(close).addTimeout(2, reactor))
        except Exception:
            pass  # closing a connection that never came up: nothing to keep
        finally:
            reactor.callFromThread(reactor.stop)
            thread.join(10)

    wait = max(MIN_WAIT, 6 * config.state.timeout)
    names = [name for name, _, _ in config.cluster.mailbox_nodes]
    return StateMailboxMap(RedisState(handler), names, reactor, close=stop, timeout=wait)


def _user(ctx: Context, name: str) -> str:
    user = ctx.directory.get_user(name)
    if user is None:
        raise Failure(f"no such user {name}")
    return str(user.name)


def cmd_user_node(ctx: Context, args: argparse.Namespace) -> None:
    user = _user(ctx, args.user)
    mailbox_map = _map(ctx)
    try:
        if args.node:
            mailbox_map.set_node(user, args.node)
        held = " (held: being moved)" if mailbox_map.held(user) else ""
        print(f"{user}\t{mailbox_map.get(user)}{held}")
    finally:
        mailbox_map.close()


def _store(config: Any, directory: Any) -> Any:
    """A node's store, with its tier 2 (a message there is read from its blobs; copies are
    written to the target's tier 1, where its own migration policy applies)."""
    from mailgw.store import MessageStore
    from mailgw.store.migration import tier2_from_config

    return MessageStore(
        root=os.path.join(config.server.data_dir, "mail"),
        quota_for=lambda _: None,  # a move copies what is there: no quota refusal halfway
        default_folders=(),
        hostname=config.server.hostname,
        tier2=tier2_from_config(config.server.data_dir, config.store),
    )


def cmd_user_move(ctx: Context, args: argparse.Namespace) -> None:
    from mailgw.cluster.move import move_mailbox
    from mailgw.config import load

    user = _user(ctx, args.user)
    mailbox_map = _map(ctx)
    try:
        current = mailbox_map.get(user)
        if args.node not in mailbox_map.nodes:
            raise Failure(f"unknown node {args.node} ([cluster] mailbox_nodes)")
        if current == args.node:
            raise Failure(f"{user} is on {args.node} already")
        source_config = ctx.config
        if (source_config.cluster.node_name or source_config.server.hostname) != current:
            raise Failure(f"{user} is on {current}: run this with the config of node {current}")
        target_config = load(args.target_config)
        if (target_config.cluster.node_name or target_config.server.hostname) != args.node:
            raise Failure(f"{args.target_config} is not the config of node {args.node}")
        source = _store(source_config, ctx.directory)
        target = _store(target_config, ctx.directory)
        try:
            report = move_mailbox(
                user,
                args.node,
                mailbox_map,
                source,
                target,
                settle=args.settle,
                keep_source=args.keep_source,
                say=print,
            )
        finally:
            source.close()
            target.close()
        folders = ", ".join(f"{f}: {n}" for f, n in report.copied.items()) or "none"
        print(
            f"moved {user} from {current} to {args.node}: {report.total} message(s) copied"
            f" ({folders}); {report.expunged} removed from {current}"
        )
    finally:
        mailbox_map.close()


def register_cluster_commands(user: Any, command: Any) -> None:
    """``user node`` and ``user move`` under the ``user`` group."""
    p = command(user, "node", cmd_user_node, "show (or set, no copy) a user's mailbox node")
    p.add_argument("user", metavar="USER")
    p.add_argument("node", nargs="?", metavar="NODE", help="record this node (mail not moved)")
    p = command(user, "move", cmd_user_move, "move a mailbox to another node, losing no mail")
    p.add_argument("user", metavar="USER")
    p.add_argument("node", metavar="NODE")
    p.add_argument(
        "--target-config",
        required=True,
        metavar="PATH",
        help="the target node's config (its data_dir must be reachable from here)",
    )
    p.add_argument(
        "--settle",
        type=float,
        default=2.0,
        metavar="S",
        help="wait for deliveries in flight after holding and after switching (2)",
    )
    p.add_argument("--keep-source", action="store_true", help="do not expunge the source copy")
