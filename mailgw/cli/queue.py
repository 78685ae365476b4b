"""``mailgw queue ...``, ``mailgw channel status`` and ``mailgw dkim keygen`` (the relay's tools)."""

from __future__ import annotations

import argparse
import datetime
import json
import os
from collections.abc import Callable
from typing import Any

from mailgw.cli.context import Context, Failure
from mailgw.cli.sizes import human_size
from mailgw.relay import queueadmin as qa


def _spool(ctx: Context) -> Any:
    from mailgw.spool import Spool

    path = os.path.join(ctx.config.server.data_dir, "spool")
    if not os.path.isdir(path):
        raise Failure(f"no spool at {path}")
    return Spool(path, hostname=ctx.config.server.hostname)


def _run(action: Callable[[], Any]) -> Any:
    try:
        return action()
    except qa.QueueError as e:
        raise Failure(str(e)) from None


def cmd_queue_list(ctx: Context, args: argparse.Namespace) -> None:
    states = tuple(args.state) if args.state else qa.QUEUE_STATES
    rows = qa.list_queue(_spool(ctx), states)
    if args.json:
        print(json.dumps(rows, indent=1))
        return
    now = qa.now()
    for r in rows:
        if "sender" not in r:
            print(f"{r['queue_id']}  {r['state']:<8}  {r['error']}")
            continue
        print(
            f"{r['queue_id']}  {r['state']:<8}  {human_size(r['size']):>9}"
            f"  {qa.age_text(now - r['received_at']):>4}"
            f"  <{r['sender']}> -> {', '.join(r['recipients']) or '(none pending)'}"
        )
        if r["last_error"]:
            print(f"    attempts={r['attempts']}: {r['last_error']}")
    print(f"{len(rows)} message(s)")


def date_text(timestamp: float) -> str:
    """``2026-12-05 10:12:03 +01:00``: local time, with its offset from UTC."""
    when = datetime.datetime.fromtimestamp(timestamp, datetime.UTC).astimezone()
    offset = when.isoformat()[-6:]  # +01:00, -05:00
    return f"{when:%Y-%m-%d %H:%M:%S} {offset}"


_DATES = ("received_at", "next_attempt")


def show_value(key: str, value: Any) -> str:
    """A ``queue show`` field for people: dates as dates, sizes with units, lists joined."""
    if key in _DATES:
        if not value:
            return "-" if key == "received_at" else "now"
        return date_text(float(value))
    if key == "size":
        return f"{human_size(int(value))} ({value} bytes)"
    if isinstance(value, list):
        return ", ".join(str(v) for v in value) or "-"
    return str(value) if value not in ("", None) else "-"


def cmd_queue_show(ctx: Context, args: argparse.Namespace) -> None:
    row = _run(lambda: qa.show(_spool(ctx), args.id))
    if args.json:
        print(json.dumps(row, indent=1))
        return
    for key, value in row.items():
        if key != "headers":
            print(f"{key}: {show_value(key, value)}")
    print()
    print(row.get("headers", ""))


def cmd_queue_flush(ctx: Context, args: argparse.Namespace) -> None:
    flushed = _run(lambda: qa.flush(_spool(ctx), args.id))
    print(f"{len(flushed)} message(s) due now (the server picks them up at its next scan)")


def cmd_queue_hold(ctx: Context, args: argparse.Namespace) -> None:
    came_from = _run(lambda: qa.hold(_spool(ctx), args.id))
    print(f"{args.id}: held (was {came_from})")


def cmd_queue_release(ctx: Context, args: argparse.Namespace) -> None:
    target = _run(lambda: qa.release(_spool(ctx), args.id, ctx.directory.is_local_domain))
    print(f"{args.id}: released to {target}")


def cmd_queue_delete(ctx: Context, args: argparse.Namespace) -> None:
    from mailgw.tracking import tracker_from_config

    spool = _spool(ctx)
    tracker = tracker_from_config(ctx.config)
    try:
        _run(lambda: qa.delete_recorded(spool, args.id, tracker, _who()))
    finally:
        tracker.close()  # written now, by this process (WAL: safe beside the server's writer)
    print(f"{args.id}: deleted")


def _who() -> str:
    """The administrator running the command (login name, else the user ID)."""
    import getpass

    try:
        return getpass.getuser()
    except (KeyError, OSError):
        return f"uid {os.getuid()}"


def cmd_channel_status(ctx: Context, args: argparse.Namespace) -> None:
    path = os.path.join(ctx.config.server.data_dir, "relay", "channels.json")
    try:
        with open(path, encoding="utf-8") as f:
            status = json.load(f)
    except FileNotFoundError:
        raise Failure(f"no channel status at {path} (is the relay running?)") from None
    if args.json:
        print(json.dumps(status, indent=1))
        return
    age = qa.now() - float(status.get("updated", 0))
    print(f"as of {qa.age_text(age)} ago ({path})")
    print(
        f"{'channel':<12} {'kind':<9} {'state':<9} {'w':>3} {'busy':>4} {'tries':>6} "
        f"{'ok':>6} {'fail':>5} {'streak':>6}  last error"
    )
    for c in status.get("channels", []):
        print(
            f"{c['name']:<12} {c['kind']:<9} {c['state']:<9} {c['weight']:>3} {c['in_flight']:>4}"
            f" {c['attempts']:>6} {c['successes']:>6} {c['failures']:>5}"
            f" {c['consecutive_failures']:>6}  {c['last_error'][:80]}"
        )
    q = status.get("queue", {})
    if q:
        print("queue: " + ", ".join(f"{k}={v}" for k, v in q.items()))


def cmd_dkim_keygen(ctx: Context, args: argparse.Namespace) -> None:
    from mailgw.relay.dkim import keygen

    folder = os.path.join(ctx.config.server.data_dir, "dkim")
    try:
        record = keygen(folder, args.domain, args.selector, args.bits)
    except FileExistsError:
        raise Failure(f"{args.domain}: selector {args.selector} exists; pick a new one") from None
    print(f"; publish this record, then mail from {args.domain} is signed:")
    print(record)


def register_relay_commands(group: Callable[[str, str], Any], command: Callable[..., Any]) -> None:
    """Add the ``queue``, ``channel`` and ``dkim`` command groups to the ``mailgw`` parser."""
    queue = group("queue", "the mail queue (spool): list, show, flush, hold, release, delete")
    p = command(queue, "list", cmd_queue_list, "list queued messages")
    p.add_argument("--state", action="append", choices=qa.QUEUE_STATES, help="only these")
    p.add_argument("--json", action="store_true", help="JSON output (as the admin API)")
    p = command(queue, "show", cmd_queue_show, "envelope and headers of a message")
    p.add_argument("id", metavar="ID")
    p.add_argument("--json", action="store_true", help="JSON output")
    command(queue, "flush", cmd_queue_flush, "retry deferred mail now").add_argument(
        "id", nargs="?", metavar="ID"
    )
    command(queue, "hold", cmd_queue_hold, "park a message").add_argument("id", metavar="ID")
    command(queue, "release", cmd_queue_release, "release a held message").add_argument(
        "id", metavar="ID"
    )
    command(queue, "delete", cmd_queue_delete, "delete a message").add_argument("id", metavar="ID")

    channel = group("channel", "outbound channels")
    p = command(channel, "status", cmd_channel_status, "state, counters and last error")
    p.add_argument("--json", action="store_true", help="JSON output")

    dkim = group("dkim", "DKIM signing keys")
    p = command(dkim, "keygen", cmd_dkim_keygen, "make a key and print its DNS TXT record")
    p.add_argument("domain", metavar="DOMAIN")
    p.add_argument("--selector", default="mailgw", metavar="S", help="default: mailgw")
    p.add_argument("--bits", type=int, default=2048, choices=(1024, 2048, 3072, 4096))
