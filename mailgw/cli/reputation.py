"""``mailgw report spam|ham QUEUE-ID|FILE`` and ``mailgw reputation show|reset|allow|block``."""

from __future__ import annotations

import argparse
import json
import os
import time
from collections.abc import Callable
from typing import Any

from mailgw.cli.context import Context, Failure


def _store(ctx: Context) -> Any:
    from mailgw.policy.reputation.service import limits_from_config
    from mailgw.policy.reputation.store import SQLiteReputationStore, store_path

    limits = limits_from_config(ctx.config.reputation)
    return SQLiteReputationStore(store_path(ctx.config.server.data_dir), limits)


def _subject(text: str) -> str:
    from mailgw.policy.reputation.standing import check_subject

    try:
        return check_subject(text)
    except ValueError as e:
        raise Failure(str(e)) from None


def _subjects_of_message(store: Any, target: str) -> tuple[str, list[str]]:
    """(what was found, subjects) of a queue ID or a message file."""
    from email.utils import parseaddr

    from mailgw.policy.reputation.service import queue_ids_in

    if not os.path.isfile(target):
        subjects = store.linked(target)
        if not subjects:
            raise Failure(f"{target}: no such file, and no message with that queue ID is known")
        return target, subjects
    with open(target, "rb") as f:
        data = f.read(1 << 20)
    for qid in queue_ids_in(data):
        subjects = store.linked(qid)
        if subjects:
            return qid, subjects
    end = data.find(b"\n\n") if b"\r\n\r\n" not in data else data.find(b"\r\n\r\n")
    head = data[: end if end >= 0 else None].decode("utf-8", "replace")
    sender = ""
    for line in head.splitlines():
        if line.lower().startswith("from:"):
            sender = parseaddr(line[5:])[1].lower()
    if "@" not in sender:
        raise Failure(f"{target}: no known queue ID and no From address")
    return "From", [f"domain:{sender.rpartition('@')[2]}"]


def cmd_report(ctx: Context, args: argparse.Namespace) -> None:
    from mailgw.policy.reputation.service import report

    store = _store(ctx)
    found, subjects = _subjects_of_message(store, args.target)
    records = report(store, subjects, args.kind, store.limits, time.time())
    for subject, record in zip(subjects, records, strict=True):
        print(f"{args.kind} report ({found}): {subject}: points {record.points:.1f}")


def _show(subject: str, record: Any, limits: Any) -> dict[str, Any]:
    from mailgw.policy.reputation.standing import standing

    data: dict[str, Any] = dict(record.to_dict())
    data["subject"] = subject
    data["standing"] = standing(record, limits)
    data["bounce_rate"] = round(record.bounce_rate, 4)
    data["unknown_rate"] = round(record.unknown_rate, 4)
    return data


def cmd_reputation_show(ctx: Context, args: argparse.Namespace) -> None:
    store = _store(ctx)
    now = time.time()
    subjects = [_subject(args.subject)] if args.subject else store.subjects()
    rows = [_show(s, store.get(s, now), store.limits) for s in subjects]
    if args.json:
        print(json.dumps(rows, indent=1))
        return
    if not rows:
        print("no reputation records")
    for r in rows:
        print(
            f"{r['subject']}: {r['standing']}"
            + (f" (override {r['override']})" if r["override"] else "")
            + f" points={r['points']:.1f} sent={r['sent']} delivered={r['delivered']}"
            f" bounced={r['bounced']} ({r['bounce_rate']:.0%}) unknown={r['unknown']}"
            f" ({r['unknown_rate']:.0%}) spam={r['spam']} reports={r['reports_spam']}/"
            f"{r['reports_ham']} content={r['content']:.1f} this-hour={r['hour_count']}"
            f" baseline={r['baseline']:.1f}/h"
        )


def _override(value: str) -> Callable[[Context, argparse.Namespace], None]:
    def run(ctx: Context, args: argparse.Namespace) -> None:
        subject = _subject(args.subject)
        store = _store(ctx)
        if value == "reset":
            store.reset(subject)
            print(f"{subject}: reset")
            return
        store.set_override(subject, value)
        print(f"{subject}: {value}")

    return run


def register_reputation_commands(
    top: Any, group: Callable[[str, str], Any], command: Callable[..., Any]
) -> None:
    """Add ``report`` and the ``reputation`` group to the ``mailgw`` parser."""
    p = top.add_parser("report", help="report a message as spam or ham (moves its senders)")
    p.set_defaults(func=cmd_report)
    p.add_argument("kind", choices=("spam", "ham"))
    p.add_argument("target", metavar="QUEUE-ID|FILE")
    rep = group("reputation", "sender reputation: show, reset, allow, block")
    p = command(rep, "show", cmd_reputation_show, "a subject's record (all without one)")
    p.add_argument("subject", nargs="?", metavar="SUBJECT", help="user:X, domain:X or ip:X")
    p.add_argument("--json", action="store_true", help="JSON output")
    for name, help_text in (
        ("reset", "forget the record and override"),
        ("allow", "never limit or block (override)"),
        ("block", "always refuse (override)"),
    ):
        command(rep, name, _override(name), help_text).add_argument(
            "subject", metavar="SUBJECT", help="user:X, domain:X or ip:X"
        )
