"""The rspamd client against small HTTP servers on loopback (the real rspamd is in
tests/integration/test_reputation.py): what it sends, a good answer, an HTTP error, a body
that is not rspamd's, a refused connection, and no answer (the timeout, on a clock)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import pytest
import pytest_twisted
from twisted.internet import reactor as global_reactor
from twisted.internet.testing import MemoryReactorClock
from twisted.web import resource, server

from mailgw.policy.reputation.rspamd import RspamdClient, RspamdError
from mailgw.testing.server import free_port

reactor: Any = global_reactor


class CheckV2(resource.Resource):
    isLeaf = True

    def __init__(self, code: int, body: bytes) -> None:
        super().__init__()
        self.code = code
        self.body = body
        self.requests: list[tuple[dict[str, list[str]], bytes]] = []

    def render_POST(self, request: Any) -> bytes:
        raw = request.requestHeaders.getAllRawHeaders()
        headers = {k.decode().lower(): [x.decode() for x in v] for k, v in raw}
        self.requests.append((headers, request.content.read()))
        request.setResponseCode(self.code)
        return self.body


@pytest.fixture
def http() -> Iterator[tuple[CheckV2, int]]:
    page = CheckV2(200, b"")
    port = reactor.listenTCP(0, server.Site(page), interface="127.0.0.1")
    yield page, port.getHost().port
    port.stopListening()


async def ask(port: int, timeout: float = 10.0) -> Any:
    client = RspamdClient(reactor, f"127.0.0.1:{port}", timeout)
    try:
        return await client.check(
            b"Subject: x\r\n\r\nhi\r\n",
            ip="192.0.2.1",
            helo="h.example",
            sender="a@x.test",
            recipients=["b@y.test", "c@y.test"],
            user="a@x.test",
            queue_id="QID",
        )
    except RspamdError as e:
        return e
    finally:
        await client.close()


@pytest_twisted.ensureDeferred
async def test_answer_and_request_headers(http: tuple[CheckV2, int]) -> None:
    page, port = http
    page.body = json.dumps(
        {"score": 7.5, "required_score": 15, "action": "add header", "symbols": {"B": {}, "A": {}}}
    ).encode()
    result = await ask(port)
    assert (result.score, result.action, result.symbols) == (7.5, "add header", ["A", "B"])
    [(headers, body)] = page.requests
    assert body == b"Subject: x\r\n\r\nhi\r\n"
    assert headers["ip"] == ["192.0.2.1"] and headers["rcpt"] == ["b@y.test", "c@y.test"]
    assert headers["from"] == ["a@x.test"] and headers["queue-id"] == ["QID"]
    assert headers["helo"] == ["h.example"] and headers["user"] == ["a@x.test"]


@pytest_twisted.ensureDeferred
async def test_http_error_and_bad_body(http: tuple[CheckV2, int]) -> None:
    page, port = http
    page.code, page.body = 500, b"broken"
    error = await ask(port)
    assert isinstance(error, RspamdError) and "HTTP 500" in str(error)
    page.code, page.body = 200, b"<html>not json</html>"
    error = await ask(port)
    assert isinstance(error, RspamdError) and "not an rspamd answer" in str(error)


@pytest_twisted.ensureDeferred
async def test_refused_connection() -> None:
    error = await ask(free_port())
    assert isinstance(error, RspamdError)


def test_no_answer_times_out() -> None:
    clock = MemoryReactorClock()
    client = RspamdClient(clock, "127.0.0.1:11333", timeout=5)
    box: list[Any] = []
    client.check(b"x").addBoth(box.append)
    assert clock.tcpClients  # connecting, never answered
    clock.advance(4)
    assert box == []
    clock.advance(2)
    [error] = box
    assert error.check(RspamdError) and "no answer within 5s" in error.getErrorMessage()
