"""``mailgw token create|list|revoke``: the admin API's bearer tokens (``mailgw.http.api.tokens``)."""

from __future__ import annotations

import argparse
import datetime
import json
from collections.abc import Callable
from typing import Any

from mailgw.cli.context import Context, Failure


def _store(ctx: Context) -> Any:
    from mailgw.http.api.tokens import TokenStore, token_path

    return TokenStore(token_path(ctx.config.server.data_dir))


def _when(t: float | None) -> str:
    if t is None:
        return "-"
    return datetime.datetime.fromtimestamp(t, datetime.UTC).strftime("%Y-%m-%d %H:%M:%SZ")


def cmd_token_create(ctx: Context, args: argparse.Namespace) -> None:
    from mailgw.config import values
    from mailgw.http.api.tokens import TokenError

    expires = None
    if args.expires:
        try:
            expires = values.parse_duration(args.expires)
        except ValueError as e:
            raise Failure(f"--expires: {e}") from None
    store = _store(ctx)
    try:
        token, text = store.create(args.scope, args.name or "", expires, args.sender or "")
    except TokenError as e:
        raise Failure(str(e)) from None
    finally:
        store.close()
    if args.json:
        print(json.dumps({**token.to_json(), "token": text}))
        return
    print(text)
    print(f"# id {token.id}, scope {token.scope}, expires {_when(token.expires)}", flush=True)


def cmd_token_list(ctx: Context, args: argparse.Namespace) -> None:
    store = _store(ctx)
    try:
        tokens = store.list()
    finally:
        store.close()
    if args.json:
        print(json.dumps([t.to_json() for t in tokens], indent=1))
        return
    for t in tokens:
        state = "revoked" if t.revoked is not None else "active"
        print(
            f"{t.id}  {t.scope:<5}  {state:<7}  expires {_when(t.expires)}"
            f"  {t.name or '-'}{'  sender=' + t.sender if t.sender else ''}"
        )
    print(f"{len(tokens)} token(s)")


def cmd_token_revoke(ctx: Context, args: argparse.Namespace) -> None:
    from mailgw.http.api.tokens import TokenError

    store = _store(ctx)
    try:
        store.revoke(args.id)
    except TokenError as e:
        raise Failure(str(e)) from None
    finally:
        store.close()
    print(f"revoked {args.id}")


def register_token_commands(group: Callable[[str, str], Any], command: Callable[..., Any]) -> None:
    """Add the ``token`` command group to the ``mailgw`` parser."""
    from mailgw.http.api.tokens import SCOPES

    token = group("token", "admin API bearer tokens: create, list, revoke")
    p = command(token, "create", cmd_token_create, "make a token (printed once)")
    p.add_argument("--scope", required=True, choices=SCOPES, help="admin, read or send")
    p.add_argument("--name", metavar="N", help="what it is for")
    p.add_argument("--expires", metavar="DURATION", help="e.g. 30d; default: never")
    p.add_argument("--sender", metavar="ADDRESS", help="send scope: the OA messages' sender")
    p.add_argument("--json", action="store_true", help="JSON output")
    p = command(token, "list", cmd_token_list, "list tokens (never their secrets)")
    p.add_argument("--json", action="store_true", help="JSON output")
    command(token, "revoke", cmd_token_revoke, "revoke a token").add_argument("id", metavar="ID")
