"""``mailgw track QUERY [--since 2h] [--until T] [--json]``: a message's whole story.

QUERY is a queue ID, a Message-ID (with or without angle brackets) or an address (sender,
recipient or mailbox); each message found is printed as a timeline, one line per step, from
the tracking database (``mailgw.tracking``); ``--json`` prints the same as the HTTP API.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from typing import Any

from mailgw.cli.context import Context, Failure


def cmd_track(ctx: Context, args: argparse.Namespace) -> None:
    from mailgw.tracking import timeline
    from mailgw.tracking.tracker import DB_NAME

    now = time.time()
    try:
        since = timeline.parse_when(args.since, now) if args.since else None
        until = timeline.parse_when(args.until, now) if args.until else None
    except ValueError as e:
        raise Failure(str(e)) from None
    path = os.path.join(ctx.config.server.data_dir, DB_NAME)
    if not ctx.config.tracking.record and not os.path.exists(path):
        raise Failure("message tracking is off ([tracking] record = no)")
    messages = timeline.lookup(path, args.query, since, until)
    if args.json:
        body: dict[str, Any] = {
            "query": args.query,
            "since": since,
            "until": until,
            "messages": messages,
        }
        print(json.dumps(body, indent=1, ensure_ascii=False))
        return
    if not messages:
        raise Failure(f"no message found for {args.query!r}")
    print(timeline.render(messages))


def register_track_command(top: Any) -> None:
    """Add ``track`` to the top-level subcommands ``top``."""
    p = top.add_parser("track", help="the timeline of a message (queue ID, Message-ID, address)")
    p.set_defaults(func=cmd_track)
    p.add_argument("query", metavar="QUERY", help="queue ID, Message-ID or address")
    p.add_argument("--since", metavar="WHEN", help="e.g. 2h (ago), 2026-12-06T03:00, @UNIX")
    p.add_argument("--until", metavar="WHEN", help="same forms as --since")
    p.add_argument("--json", action="store_true", help="JSON for tools (as the HTTP API)")
