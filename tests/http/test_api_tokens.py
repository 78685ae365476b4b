"""The API token store and the OpenAPI document generated from the route table."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from mailgw.http.api.endpoints import AdminAPI, build_message, reply_error
from mailgw.http.api.router import ApiError, Authenticator, openapi
from mailgw.http.api.tokens import TokenError, TokenStore
from mailgw.model.reply import Reply


def test_tokens_hashed_scoped_revoked_expired(tmp_path: Path) -> None:
    now = [1000.0]
    store = TokenStore(str(tmp_path / "t.sqlite"), clock=lambda: now[0])
    token, text = store.create("read", "ci", expires_in=60)
    assert text.startswith(f"mgw_{token.id}_")
    assert text.encode() not in (tmp_path / "t.sqlite").read_bytes()
    found = store.authenticate(text)
    assert found is not None and found.allows("read") and not found.allows("admin")
    assert store.authenticate(text[:-1] + ("A" if text[-1] != "A" else "B")) is None
    assert store.authenticate("mgw_ffffffff_" + "x" * 43) is None
    now[0] += 61
    assert store.authenticate(text) is None  # expired
    admin, admin_text = store.create("admin")
    assert store.authenticate(admin_text).allows("send")  # type: ignore[union-attr]
    store.revoke(admin.id)
    assert store.authenticate(admin_text) is None
    with pytest.raises(TokenError):
        store.revoke(admin.id)
    with pytest.raises(TokenError):
        store.create("root")


def test_authenticator_accepts_the_admin_file_token(tmp_path: Path) -> None:
    auth = Authenticator(TokenStore(str(tmp_path / "t.sqlite")), b"file-token-0123456789")
    assert auth.authenticate(b"Bearer file-token-0123456789").scope == "admin"
    for header in (None, b"Basic abc", b"Bearer", b"Bearer wrong", b"Bearer \xff"):
        with pytest.raises(ApiError) as e:
            auth.authenticate(header)
        assert e.value.status == 401


class _Node:
    config: Any = None


def test_openapi_lists_every_route_with_its_errors() -> None:
    routes = AdminAPI(_Node()).routes()
    doc = openapi(routes, "t", "1")
    ops = [(m, p) for p, item in doc["paths"].items() for m in item]
    assert len(ops) == len(routes) == len(set(ops))
    user = doc["paths"]["/api/v1/users/{address}"]["get"]
    assert {"400", "401", "403", "404"} <= set(user["responses"])
    post = doc["paths"]["/api/v1/messages"]["post"]
    assert post["x-scope"] == "send" and "415" in post["responses"]


def test_build_message_refuses_bad_input() -> None:
    raw, rcpts = build_message(
        "oa@example.test",
        {"to": "A <a@example.test>", "cc": ["b@example.test"], "subject": "s", "text": "t"},
        "h.test",
        10_000,
    )
    assert rcpts == ["a@example.test", "b@example.test"] and b"Subject: s" in raw
    for body in (
        {"to": "", "subject": "s", "text": "t"},
        {"to": "a@example.test", "subject": "s"},
        {"to": "a@example.test", "subject": "x\r\nBcc: y@z", "text": "t"},
        {
            "to": "a@x.test",
            "subject": "s",
            "text": "t",
            "attachments": [{"filename": "f", "content": "***"}],
        },
    ):
        with pytest.raises(ApiError) as e:
            build_message("oa@example.test", body, "h.test", 10_000)
        assert e.value.status == 400
    with pytest.raises(ApiError) as e:
        build_message(
            "oa@example.test", {"to": "a@x.test", "subject": "s", "text": "t" * 200}, "h.test", 100
        )
    assert e.value.status == 413


def test_submission_replies_map_to_statuses() -> None:
    assert reply_error(Reply(554, "5.7.1", "no")).status == 422
    assert reply_error(Reply(452, "4.5.3", "too many")).status == 422
    assert reply_error(Reply(450, "4.7.1", "slow down")).status == 429
    assert reply_error(Reply(451, "4.3.0", "later")).status == 503
