"""``mailgw config push FILE``, ``config status`` and ``config rollback``: the unified
configuration of the gateways (``mailgw.state.unified``), published through ``[state]``."""

from __future__ import annotations

import argparse
import json
import os
import time
from collections.abc import Callable
from typing import Any

from mailgw.cli.context import Context, Failure

MIN_WAIT = 3.0
"""Seconds a command waits for Redis at least (else six times ``[state] timeout``)."""


def run_state(config: Any, action: Callable[[Any], Any]) -> Any:
    """``action(state)`` (a Deferred) on the gateway state of ``config``, waited for: the
    embedded one in ``data_dir``, or Redis (a server or Sentinels) through a reactor run for
    this command only."""
    from twisted.python.failure import Failure as TwistedFailure

    if config.state.backend != "redis":
        from mailgw.state.embedded import EmbeddedState

        out: list[Any] = []
        action(EmbeddedState(config.server.data_dir)).addBoth(out.append)
        if isinstance(out[0], TwistedFailure):
            out[0].raiseException()
        return out[0]
    from twisted.internet import reactor as _reactor

    from mailgw.state.failover import with_timeout
    from mailgw.state.redis import RedisState, connect_redis

    reactor: Any = _reactor
    handler, close = connect_redis(config.state, config.state.timeout)
    wait = max(MIN_WAIT, 6 * config.state.timeout)
    result: list[Any] = []

    def finish(value: Any) -> None:
        result.append(value)
        d = close()
        d.addBoth(lambda _: reactor.stop())

    def start() -> None:
        d = with_timeout(action(RedisState(handler)), wait, reactor)
        d.addBoth(finish)

    reactor.callWhenRunning(start)
    reactor.run(installSignalHandlers=False)
    value = result[0] if result else Failure("the gateway state did not answer")
    if isinstance(value, TwistedFailure):
        from mailgw.state.failover import StateTimeout

        if value.check(StateTimeout):
            raise Failure(f"no answer from Redis ({where(config)}) in {wait:g}s: nothing done")
        if value.check(LookupError):
            raise Failure(str(value.value))
        raise Failure(f"gateway state ({where(config)}): {value.getErrorMessage()}")
    return value


def where(config: Any) -> str:
    s = config.state
    if s.backend != "redis":
        return "embedded"
    return f"sentinels {' '.join(s.sentinels)}" if s.sentinels else s.redis


def build_version(config: Any, path: str) -> tuple[bytes, str]:
    """Validate the policy file ``path`` against the node config ``config`` (the overlay
    must load on top of it, its rules must parse with its channels:
    ``mailgw.state.unified.build_version``); the version to store and a one-line summary.
    ``Failure`` saying what is wrong: nothing is published then."""
    from mailgw.state.unified import BundleError, build_version, fragment_text, read_fragment

    path = os.path.abspath(path)
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except OSError as e:
        raise Failure(f"{path}: cannot read: {e.strerror}") from None
    except UnicodeDecodeError:
        raise Failure(f"{path}: not UTF-8 text") from None
    try:
        parser = read_fragment(text, path)
        rules_text = None
        rules_source = ""
        if parser.has_option("policy", "rules_file"):
            name = parser.get("policy", "rules_file").strip()
            if name:
                rules_source = os.path.join(os.path.dirname(path), name)
                try:
                    with open(rules_source, encoding="utf-8") as f:
                        rules_text = f.read()
                except (OSError, UnicodeDecodeError) as e:
                    raise Failure(f"refused, nothing published: {rules_source}: {e}") from None
            parser.remove_option("policy", "rules_file")
        return build_version(config, fragment_text(parser), path, rules_text, rules_source)
    except BundleError as e:
        raise Failure(f"refused, nothing published: {e}") from None


def cmd_config_push(ctx: Context, args: argparse.Namespace) -> None:
    config = ctx.config
    blob, summary = build_version(config, args.file)
    if args.dry_run:
        print(f"{args.file}: valid ({summary}); not published (--dry-run)")
        return
    version = run_state(config, lambda s: s.config_publish(blob))
    print(f"published v{version} ({summary}) to {where(config)}")


def cmd_config_rollback(ctx: Context, args: argparse.Namespace) -> None:
    config = ctx.config
    version = run_state(config, lambda s: s.config_rollback())
    print(f"rolled back: v{version} is current again ({where(config)})")


def status(config: Any) -> dict[str, Any]:
    """The current version and every node's report."""

    def both(s: Any) -> Any:
        out: dict[str, Any] = {}

        def nodes(reports: dict[str, bytes]) -> dict[str, Any]:
            out["nodes"] = {}
            for name, info in sorted(reports.items()):
                try:
                    out["nodes"][name] = json.loads(info)
                except ValueError:
                    out["nodes"][name] = {"error": "unreadable report"}
            return out

        def current(value: Any) -> Any:
            out["current"] = value[0] if value else 0
            return s.config_nodes().addCallback(nodes)

        return s.config_current().addCallback(current)

    result: dict[str, Any] = run_state(config, both)
    return result


def cmd_config_status(ctx: Context, args: argparse.Namespace) -> None:
    result = status(ctx.config)
    if args.json:
        print(json.dumps(result, indent=2, sort_keys=True))
        return
    current = result["current"]
    print(f"current version: {'v' + str(current) if current else 'none published'}")
    behind = 0
    now = time.time()
    for name, info in result["nodes"].items():
        applied = info.get("applied", 0)
        mark = "ok" if applied == current else "BEHIND"
        behind += applied != current
        age = now - float(info.get("time", now))
        line = f"  {name}: applied v{applied} ({mark}), reported {age:.0f}s ago"
        if info.get("error"):
            line += f"; v{info.get('latest_seen')} refused: {info['error']}"
        print(line)
    if not result["nodes"]:
        print("  no node has reported yet")
    if behind:
        raise Failure(f"{behind} node(s) not on v{current}")


def register_unified_commands(config: Any, command: Any) -> None:
    """``config push|status|rollback`` in the ``config`` group."""
    p = command(config, "push", cmd_config_push, "validate and publish a policy file to all nodes")
    p.add_argument("file", metavar="FILE", help="INI fragment (channels, routes, limits, rules)")
    p.add_argument("--dry-run", action="store_true", help="validate only")
    p.set_defaults(as_data_owner=True)
    p = command(config, "status", cmd_config_status, "each node's applied config version")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p = command(config, "rollback", cmd_config_rollback, "return to the previous version")
