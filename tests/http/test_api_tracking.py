"""The ``GET /api/v1/tracking`` route in the admin API's resource, served by a real twisted.web
Site on a loopback port and fetched with urllib: the same JSON as ``mailgw track --json``,
tokens and scopes, tokenless clients of an allowed network, 400 on bad input, 405 on other
methods, 503 when tracking is not recorded."""

from __future__ import annotations

import ipaddress
import json
import threading
import urllib.error
import urllib.request
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from twisted.internet import threads
from twisted.web.server import Site

from mailgw.http.api.router import ApiResource, Authenticator
from mailgw.http.api.tokens import TokenStore
from mailgw.http.api.tracking import tracking_route
from mailgw.http.root import Folder
from mailgw.runtime.threads import pool_runner
from mailgw.tracking import Kind, Tracker
from tests.relay.reactorhelper import reactor, within

ADMIN_FILE_TOKEN = b"file-token-for-tracking-0123456789"
LOOPBACK = ipaddress.ip_network("127.0.0.0/8")


@dataclass
class Served:
    """The route at ``url`` with ``tokens`` by scope."""

    url: str
    tokens: dict[str, str]


async def serve(tmp_path: Path, path: str | None, allow: tuple[Any, ...]) -> tuple[Served, Any]:
    store = TokenStore(str(tmp_path / "api_tokens.sqlite"))
    tokens = {s: store.create(s, f"t-{s}")[1] for s in ("admin", "read", "send")}
    threads_seen: list[str] = []

    def run(function: Any, *args: Any) -> Any:
        def recorded(*a: Any) -> Any:
            threads_seen.append(threading.current_thread().name)
            return function(*a)

        return pool_runner(reactor, reactor.getThreadPool())(recorded, *args)

    api = ApiResource(
        [tracking_route(path)], Authenticator(store, ADMIN_FILE_TOKEN, allow), run, 1000
    )
    api.threads_seen = threads_seen  # type: ignore[attr-defined]
    root = Folder()
    root.putChild(b"v1", api)
    port = reactor.listenTCP(0, Site(root), interface="127.0.0.1")
    return Served(f"http://127.0.0.1:{port.getHost().port}/v1/tracking", tokens), port


def record(path: str) -> None:
    tracker = Tracker(path)
    tracker.record(
        Kind.RECEIVED,
        "QWEB1",
        message_id="<web-1@sender.test>",
        addresses=["carol@sender.test", "alice@example.test"],
        when=1000.0,
        role="mx",
        sender="carol@sender.test",
        recipients=["alice@example.test"],
    )
    tracker.record(Kind.DELIVERED, "QWEB1", when=1001.0, user="alice@example.test", uid=3)
    tracker.close()


@pytest_twisted.async_yield_fixture
async def served(tmp_path: Path) -> AsyncIterator[Served]:
    path = str(tmp_path / "tracking.sqlite")
    record(path)
    s, port = await serve(tmp_path, path, ())
    yield s
    await port.stopListening()


def fetch(url: str, token: str | bytes | None, method: str = "GET") -> tuple[int, dict, Any]:
    request = urllib.request.Request(url, method=method)
    if token is not None:
        text = token.decode() if isinstance(token, bytes) else token
        request.add_header("Authorization", f"Bearer {text}")
    try:
        with urllib.request.urlopen(request, timeout=10) as r:
            return r.status, dict(r.headers), json.loads(r.read())
    except urllib.error.HTTPError as e:
        body = e.read()
        return e.code, dict(e.headers), json.loads(body) if body else None


async def get(url: str, token: str | bytes | None, method: str = "GET") -> tuple[int, dict, Any]:
    return await within(threads.deferToThread(fetch, url, token, method))


@pytest_twisted.ensureDeferred
async def test_lookup_by_each_kind_of_query_with_a_read_token(served: Served) -> None:
    read = served.tokens["read"]
    for q in ("QWEB1", "%3Cweb-1%40sender.test%3E", "web-1%40sender.test", "carol%40sender.test"):
        code, headers, body = await get(f"{served.url}?q={q}", read)
        assert code == 200, (q, body)
        assert headers["Content-Type"].startswith("application/json")
        [m] = body["messages"]
        assert m["queue_id"] == "QWEB1" and m["status"] == "delivered"
        assert [e["kind"] for e in m["events"]] == ["received", "delivered"]
        assert body["since"] is None and body["until"] is None
    code, _, body = await get(f"{served.url}?q=carol%40sender.test&since=@1500", read)
    assert code == 200 and body["messages"] == [] and body["since"] == 1500.0
    code, _, body = await get(f"{served.url}?q=QWEB1&until=@1000.5", served.tokens["admin"])
    assert code == 200 and len(body["messages"]) == 1 and body["until"] == 1000.5


@pytest_twisted.ensureDeferred
async def test_scopes_and_tokens(served: Served) -> None:
    url = f"{served.url}?q=QWEB1"
    code, _, body = await get(url, served.tokens["send"])
    assert code == 403 and body["error"]["code"] == "forbidden"
    assert (await get(url, ADMIN_FILE_TOKEN))[0] == 200
    code, headers, body = await get(url, None)  # loopback is not in allow here
    assert code == 401 and headers["WWW-Authenticate"].startswith("Bearer")
    assert body["error"]["code"] == "unauthorized"
    assert (await get(url, "mgw_00000000_" + "x" * 43))[0] == 401


@pytest.mark.parametrize(
    ("query", "error"),
    [
        ("", "query q is required"),
        ("?q=%20", "missing q"),
        ("?q=x&since=yesterday", "expected a time"),
        ("?q=x&until=2026-13-45", "expected a time"),
        ("?q=x&since=@soon", "could not convert"),
        ("?q=x&since=@inf", "not a finite time"),
    ],
)
@pytest_twisted.ensureDeferred
async def test_bad_requests(served: Served, query: str, error: str) -> None:
    code, _, body = await get(served.url + query, served.tokens["read"])
    assert code == 400 and body["error"]["code"] == "invalid"
    assert error in body["error"]["message"]


@pytest_twisted.ensureDeferred
async def test_only_get(served: Served) -> None:
    code, headers, _ = await get(f"{served.url}?q=QWEB1", served.tokens["admin"], "DELETE")
    assert code == 405 and headers["Allow"] == "GET, HEAD"


@pytest_twisted.ensureDeferred
async def test_an_allowed_network_without_a_token_runs_in_the_pool(tmp_path: Path) -> None:
    path = str(tmp_path / "tracking.sqlite")
    record(path)
    s, port = await serve(tmp_path, path, (LOOPBACK,))
    try:
        code, _, body = await get(f"{s.url}?q=QWEB1", None)
        assert code == 200 and body["messages"][0]["queue_id"] == "QWEB1"
        # a token is still checked when one is given, from an allowed network too
        assert (await get(f"{s.url}?q=QWEB1", "wrong-token"))[0] == 401
        assert (await get(f"{s.url}?q=QWEB1", s.tokens["send"]))[0] == 403
        seen = port.factory.resource.children[b"v1"].threads_seen
        assert seen and threading.main_thread().name not in seen  # off the reactor thread
    finally:
        await port.stopListening()


@pytest_twisted.ensureDeferred
async def test_not_recorded_is_503(tmp_path: Path) -> None:
    s, port = await serve(tmp_path, None, ())
    try:
        code, _, body = await get(f"{s.url}?q=QWEB1", s.tokens["read"])
        assert code == 503 and body["error"]["code"] == "not_recorded"
        assert "[tracking] record = no" in body["error"]["message"]
    finally:
        await port.stopListening()
