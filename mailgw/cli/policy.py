"""``mailgw quarantine list|show|release|delete`` and ``mailgw policy check FILE``."""

from __future__ import annotations

import argparse
import json
import os
from collections.abc import Callable
from typing import Any

from mailgw.cli.context import Context, Failure
from mailgw.cli.sizes import human_size


def _store(ctx: Context) -> Any:
    from mailgw.policy.quarantine import QuarantineStore
    from mailgw.policy.setup import quarantine_dir

    return QuarantineStore(quarantine_dir(ctx.config.server.data_dir))


def _get(store: Any, qid: str) -> Any:
    from mailgw.policy.quarantine import QuarantineError

    try:
        return store.get(qid)
    except QuarantineError as e:
        raise Failure(str(e)) from None


def cmd_quarantine_list(ctx: Context, args: argparse.Namespace) -> None:
    from mailgw.cli.queue import date_text

    rows = _store(ctx).list()
    if args.json:
        print(json.dumps([m.to_json() for m in rows], indent=1))
        return
    for m in rows:
        e = m.envelope
        print(
            f"{m.id}  {m.direction:<8}  {human_size(m.size):>9}  {date_text(m.quarantined_at)}"
            f"  <{e.sender}> -> {', '.join(e.recipients)}"
        )
        print(f"    rule={m.rule or '-'}: {m.reason}")
    print(f"{len(rows)} message(s)")


def cmd_quarantine_show(ctx: Context, args: argparse.Namespace) -> None:
    from mailgw.cli.queue import date_text

    m = _get(_store(ctx), args.id)
    if args.json:
        print(json.dumps(m.to_json(), indent=1))
        return
    e = m.envelope
    print(f"id: {m.id}")
    print(f"quarantined: {date_text(m.quarantined_at)}")
    print(f"direction: {m.direction}")
    print(f"rule: {m.rule or '-'}")
    print(f"reason: {m.reason}")
    print(f"from: <{e.sender}>")
    print(f"to: {', '.join(f'<{r}>' for r in e.recipients)}")
    print(f"client: {e.client_address or '-'} ({e.protocol})")
    extra = [f"{k}={getattr(e, k)}" for k in ("message_class", "channel", "folder")]
    print("policy: " + " ".join(x for x in extra if not x.endswith("=")) or "policy: -")
    print(f"size: {m.size}")
    print()
    with open(m.content_path, "rb") as f:
        data = f.read() if args.raw else f.read(256 * 1024)
    if not args.raw:
        end = data.find(b"\r\n\r\n")
        data = data[: end + 2] if end >= 0 else data
    print(data.decode("utf-8", "replace").replace("\r\n", "\n"), end="")


def _each(ctx: Context, ids: list[str], action: Callable[[Any, str], str]) -> None:
    from mailgw.policy.quarantine import QuarantineError

    store = _store(ctx)
    failed = []
    for qid in ids:
        try:
            print(action(store, qid))
        except QuarantineError as e:
            failed.append(str(e))
    if failed:
        raise Failure("; ".join(failed))


def cmd_quarantine_release(ctx: Context, args: argparse.Namespace) -> None:
    from mailgw.spool import Spool

    path = os.path.join(ctx.config.server.data_dir, "spool")
    if not os.path.isdir(path):
        raise Failure(f"no spool at {path}")
    spool = Spool(path, hostname=ctx.config.server.hostname)

    def release(store: Any, qid: str) -> str:
        m = store.get(qid)
        store.release(qid, spool)
        how = "delivered" if m.direction == "inbound" else "relayed"
        return f"{qid}: released to the queue (to be {how})"

    _each(ctx, args.id, release)


def cmd_quarantine_delete(ctx: Context, args: argparse.Namespace) -> None:
    def delete(store: Any, qid: str) -> str:
        store.delete(qid)
        return f"{qid}: deleted"

    _each(ctx, args.id, delete)


def cmd_policy_check(ctx: Context, args: argparse.Namespace) -> None:
    from mailgw.policy.rules import RulesError, load_rules

    path = args.file
    if not os.path.isfile(path):
        raise Failure(f"{path}: no such file")
    channels = None
    if args.config_channels:
        channels = [c.name for c in ctx.config.channels] or ["direct"]
    try:
        rules = load_rules(path, channels=channels)
    except RulesError as e:
        raise Failure(str(e)) from None
    print(f"{path}: {len(rules)} rule(s) OK")
    if args.verbose:
        for rule in rules:
            print(f"  {rule.describe()}")
    for group in _unknown_groups(ctx, rules):
        print(f"note: group {group} is not in the directory (yet): it matches nobody until made")


def _unknown_groups(ctx: Context, rules: list[Any]) -> list[str]:
    """The groups the rules' ``group`` matches name that the node's directory does not have
    (read only; none when there is no config or directory to ask). Not an error: groups
    change at run time, without a reload, so a rule may name one before it is made."""
    import sqlite3

    from mailgw.config import ConfigError
    from mailgw.policy.rules import GroupMatch, Not

    named: dict[str, None] = {}
    for rule in rules:
        for match in rule.matches:
            inner = match.inner if isinstance(match, Not) else match
            if isinstance(inner, GroupMatch):
                named.update(dict.fromkeys(inner.groups))
    if not named:
        return []
    try:
        path = os.path.join(ctx.config.server.data_dir, "directory.sqlite")
    except (ConfigError, OSError):
        return []
    if not os.path.isfile(path):
        return []
    try:
        db = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=5)
        try:
            known = {r[0] for r in db.execute("SELECT name FROM groups")}
        finally:
            db.close()
    except sqlite3.Error:  # a version-1 directory (no groups table yet), or unreadable
        known = set()
    return [g for g in named if g not in known]


def register_policy_commands(group: Callable[[str, str], Any], command: Callable[..., Any]) -> None:
    """Add the ``quarantine`` and ``policy`` command groups to the ``mailgw`` parser."""
    q = group("quarantine", "messages the policy kept apart: list, show, release, delete")
    p = command(q, "list", cmd_quarantine_list, "list quarantined messages")
    p.add_argument("--json", action="store_true", help="JSON output")
    p = command(q, "show", cmd_quarantine_show, "record and header of a message")
    p.add_argument("id", metavar="ID")
    p.add_argument("--json", action="store_true", help="JSON output (the record)")
    p.add_argument("--raw", action="store_true", help="the whole message, not only its header")
    p = command(q, "release", cmd_quarantine_release, "queue it again (deliver or relay)")
    p.add_argument("id", metavar="ID", nargs="+")
    p = command(q, "delete", cmd_quarantine_delete, "remove it for good")
    p.add_argument("id", metavar="ID", nargs="+")

    policy = group("policy", "the security rules")
    p = command(policy, "check", cmd_policy_check, "validate a rules file")
    p.set_defaults(no_data_dir=True)
    p.add_argument("file", metavar="FILE")
    p.add_argument("-v", "--verbose", action="store_true", help="list the rules")
    p.add_argument(
        "--config-channels",
        action="store_true",
        help="check route actions against the channels of the config file",
    )
