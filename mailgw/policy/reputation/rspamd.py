"""An rspamd client: ``POST /checkv2`` over HTTP (twisted.web.client.Agent), with a timeout.

``RspamdClient.check(message, **facts)`` sends the message with rspamd's request headers
(``IP``, ``Helo``, ``From``, ``Rcpt``, ``User``, ``Queue-Id``) and fires with an
``RspamdResult``: rspamd's score, its action and the symbols that counted. A forced action
(GTUBE, a ``reject`` from a module) scores at least the threshold rspamd reports for that
action, so a message rspamd would reject is spam here too. Any failure (refused connection,
timeout, an HTTP error, a body that is not rspamd's JSON) fails the Deferred with
``RspamdError``: the caller goes on with the heuristics only.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from twisted.internet.defer import Deferred, succeed
from twisted.internet.protocol import Protocol
from twisted.python.failure import Failure
from twisted.web.client import Agent, HTTPConnectionPool, ResponseDone
from twisted.web.http_headers import Headers
from twisted.web.iweb import UNKNOWN_LENGTH, IBodyProducer, IResponse
from zope.interface import implementer

from mailgw.config.values import parse_host_port

ACTION_KEYS = ("reject", "soft reject", "rewrite subject", "add header", "greylist")


class RspamdError(Exception):
    """rspamd could not give a score (see the module docstring)."""


@dataclass
class RspamdResult:
    score: float
    action: str
    symbols: list[str] = field(default_factory=list)


def parse_address(text: str) -> tuple[str, int]:
    """``host:port`` (``[v6]:port``) -> (host, port); ValueError when it is not."""
    return parse_host_port(text)


def parse_result(body: bytes) -> RspamdResult:
    """The ``RspamdResult`` of a ``/checkv2`` answer (RspamdError when it is not one)."""
    try:
        data = json.loads(body)
        score = float(data["score"])
        action = str(data.get("action", "no action"))
    except (ValueError, KeyError, TypeError) as e:
        raise RspamdError(f"not an rspamd answer: {e}") from None
    symbols = data.get("symbols") or {}
    names = sorted(symbols) if isinstance(symbols, dict) else []
    thresholds: dict[str, Any] = {}
    if isinstance(data.get("thresholds"), dict):
        thresholds = data["thresholds"]
    elif isinstance(data.get("required_score"), int | float):
        thresholds = {"reject": data["required_score"]}
    floor = thresholds.get(action)
    if isinstance(floor, int | float) and action in ACTION_KEYS and score < floor:
        score = float(floor)  # a forced action (GTUBE, pre-result) may carry score 0
    return RspamdResult(score, action, names)


MAX_ANSWER = 1 << 20
"""Largest /checkv2 answer read (a longer one is not rspamd's)."""


class _Body(Protocol):
    """Collects a response body (at most ``MAX_ANSWER`` bytes)."""

    def __init__(self, done: Deferred[bytes]) -> None:
        self.done = done
        self.parts: list[bytes] = []
        self.size = 0

    def dataReceived(self, data: bytes) -> None:
        self.size += len(data)
        if self.size > MAX_ANSWER:
            self.parts = []
            stop = getattr(self.transport, "stopProducing", None)
            if stop is not None:
                stop()
            return
        self.parts.append(data)

    def connectionLost(self, reason: Failure = Failure(ResponseDone())) -> None:  # noqa: B008
        if self.done.called:
            return
        if self.size > MAX_ANSWER:
            self.done.errback(RspamdError(f"answer over {MAX_ANSWER} bytes"))
        elif reason.check(ResponseDone):
            self.done.callback(b"".join(self.parts))
        else:
            self.done.errback(reason)


def read_body(response: IResponse) -> Deferred[bytes]:
    done: Deferred[bytes] = Deferred()
    response.deliverBody(_Body(done))  # type: ignore[no-untyped-call]
    return done


@implementer(IBodyProducer)
class BytesProducer:
    """A request body held in memory, written at once."""

    def __init__(self, data: bytes) -> None:
        self.data = data
        self.length = len(data) if data else UNKNOWN_LENGTH

    def startProducing(self, consumer: Any) -> Deferred[None]:
        consumer.write(self.data)
        return succeed(None)

    def pauseProducing(self) -> None:
        pass

    def resumeProducing(self) -> None:
        pass

    def stopProducing(self) -> None:
        pass


class RspamdClient:
    """``/checkv2`` on ``address`` (``host:port``) with ``timeout`` seconds per request."""

    def __init__(self, reactor: Any, address: str, timeout: float = 10.0) -> None:
        self.reactor = reactor
        self.address = address
        host, port = parse_address(address)
        self.url = f"http://{'[' + host + ']' if ':' in host else host}:{port}/checkv2".encode()
        self.timeout = timeout
        self.pool = HTTPConnectionPool(reactor, persistent=True)  # type: ignore[no-untyped-call]
        self.pool.maxPersistentPerHost = 4
        self.agent = Agent(reactor, pool=self.pool, connectTimeout=timeout)  # type: ignore[no-untyped-call]

    def check(
        self,
        message: bytes,
        ip: str = "",
        helo: str = "",
        sender: str = "",
        recipients: list[str] | None = None,
        user: str = "",
        queue_id: str = "",
    ) -> Deferred[RspamdResult]:
        headers = Headers({b"Content-Type": [b"message/rfc822"]})
        facts = {"IP": ip, "Helo": helo, "From": sender, "User": user, "Queue-Id": queue_id}
        for name, value in facts.items():
            if value and value.isprintable():
                headers.addRawHeader(name.encode(), value.encode())
        for rcpt in recipients or []:
            if rcpt.isprintable():
                headers.addRawHeader(b"Rcpt", rcpt.encode())
        d: Deferred[Any] = self.agent.request(b"POST", self.url, headers, BytesProducer(message))

        def got(response: IResponse) -> Deferred[bytes]:
            body = read_body(response)
            if response.code != 200:

                def status(data: bytes) -> bytes:
                    raise RspamdError(f"HTTP {response.code}: {data[:200]!r}")

                body.addCallback(status)
            return body

        def failed(f: Failure) -> Failure:
            if f.check(RspamdError):
                return f
            return Failure(
                RspamdError(f"{getattr(f.type, '__name__', 'error')}: {f.getErrorMessage()}")
            )

        d.addCallback(got)
        d.addCallback(parse_result)

        def timed_out(result: Any, timeout: float) -> Any:
            raise RspamdError(f"no answer within {timeout:g}s")

        d.addTimeout(self.timeout, self.reactor, onTimeoutCancel=timed_out)
        d.addErrback(failed)
        return d

    def close(self) -> Deferred[None]:
        closed: Deferred[None] = self.pool.closeCachedConnections()  # type: ignore[no-untyped-call]
        return closed
