"""``TrackingResource`` served by a real twisted.web Site on a loopback port, fetched with
urllib: the same JSON as ``mailgw track --json``, 400 on bad input, 405 on other methods."""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from twisted.internet import threads
from twisted.web.server import Site

from mailgw.tracking import Kind, Tracker
from mailgw.tracking.web import TrackingResource
from tests.relay.reactorhelper import reactor, within


@pytest_twisted.async_yield_fixture
async def base(tmp_path: Path) -> AsyncIterator[str]:
    path = str(tmp_path / "tracking.sqlite")
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
    port = reactor.listenTCP(0, Site(TrackingResource(path, reactor)), interface="127.0.0.1")
    yield f"http://127.0.0.1:{port.getHost().port}/"
    await port.stopListening()


def fetch(url: str, method: str = "GET") -> tuple[int, Any]:
    request = urllib.request.Request(url, method=method)
    try:
        with urllib.request.urlopen(request, timeout=10) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        body = e.read()
        return e.code, json.loads(body) if body.startswith(b"{") else body


async def get(url: str, method: str = "GET") -> tuple[int, Any]:
    return await within(threads.deferToThread(fetch, url, method))


@pytest_twisted.ensureDeferred
async def test_lookup_by_each_kind_of_query(base: str) -> None:
    for q in ("QWEB1", "%3Cweb-1%40sender.test%3E", "web-1%40sender.test", "carol%40sender.test"):
        code, body = await get(f"{base}?q={q}")
        assert code == 200, (q, body)
        [m] = body["messages"]
        assert m["queue_id"] == "QWEB1" and m["status"] == "delivered"
        assert [e["kind"] for e in m["events"]] == ["received", "delivered"]
    code, body = await get(f"{base}?q=carol%40sender.test&since=@1500")
    assert code == 200 and body["messages"] == [] and body["since"] == 1500.0


@pytest.mark.parametrize(
    ("query", "error"), [("", "missing q"), ("?q=x&since=yesterday", "expected a time")]
)
@pytest_twisted.ensureDeferred
async def test_bad_requests(base: str, query: str, error: str) -> None:
    code, body = await get(base + query)
    assert code == 400 and error in body["error"]


@pytest_twisted.ensureDeferred
async def test_only_get(base: str) -> None:
    code, _ = await get(f"{base}?q=QWEB1", method="DELETE")
    assert code == 405
