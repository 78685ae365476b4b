"""A clamd client on Twisted: INSTREAM scans over TCP or a unix socket, servers in turn.

``scan_stream`` sends one stream to one clamd (``zINSTREAM``, then chunks of at most
``CHUNK`` bytes each behind a 4-byte big-endian length, then a zero length) and parses its one
reply (``stream: OK``, ``stream: NAME FOUND``, ``... ERROR``). The content is read chunk by
chunk as the socket takes it (a pull producer), so a large message is never held in memory.

``ClamdPool`` keeps the servers of ``[antivirus] servers`` (``host:port``, ``[v6]:port`` or
``unix:/path``) and starts each scan at the next one (round robin); a server that cannot be
reached, resets the connection or does not answer within ``timeout`` is skipped for the next
one (failover). When every server failed the scan fails with ``ClamdUnavailable``. A clamd
that answers with an error (``size limit exceeded``: its ``StreamMaxLength``) fails with
``ClamdError`` without trying the others (they would answer the same).
"""

from __future__ import annotations

import struct
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import IO, Any

from twisted.internet.defer import Deferred, fail
from twisted.internet.endpoints import TCP4ClientEndpoint, TCP6ClientEndpoint, UNIXClientEndpoint
from twisted.internet.error import ConnectionDone
from twisted.internet.interfaces import IPullProducer
from twisted.internet.protocol import Factory, Protocol
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from mailgw.config.values import parse_host_port

log = Logger(namespace="mailgw.policy.clamd")

CHUNK = 64 * 1024
"""Bytes per INSTREAM chunk."""
MAX_REPLY = 4096
"""A clamd reply longer than this is an error (a reply is one short line)."""


class ClamdError(Exception):
    """clamd answered, but with an error (e.g. ``INSTREAM size limit exceeded``)."""


class ClamdUnavailable(Exception):
    """No clamd could be reached, or none answered in time."""


@dataclass(frozen=True)
class ScanResult:
    """One scan's answer: ``virus`` is the signature name, None when clean."""

    server: str
    virus: str | None = None

    @property
    def clean(self) -> bool:
        return self.virus is None


def parse_server(text: str) -> tuple[str, str, int]:
    """``host:port``, ``[v6]:port`` or ``unix:/path`` -> (kind, host or path, port);
    ValueError for anything else."""
    text = text.strip()
    if text.startswith("unix:"):
        path = text[5:]
        if not path.startswith("/"):
            raise ValueError(f"expected unix:/absolute/path, got {text!r}")
        return "unix", path, 0
    try:
        host, port = parse_host_port(text)
    except ValueError:
        raise ValueError(f"expected host:port, [v6]:port or unix:/path, got {text!r}") from None
    return ("tcp6" if ":" in host else "tcp"), host, port


def parse_reply(reply: bytes) -> str | None:
    """The virus name of an INSTREAM reply, None for ``OK``; ClamdError otherwise."""
    text = reply.rstrip(b"\0\r\n").decode("utf-8", "replace")
    body = text.partition(": ")[2] if text.startswith("stream") else text
    if body == "OK":
        return None
    if body.endswith(" FOUND"):
        name = body[: -len(" FOUND")].strip()
        return name or "unknown"
    raise ClamdError(text or "empty reply")


@implementer(IPullProducer)
class _InstreamProtocol(Protocol):
    """Sends ``content`` as an INSTREAM and fires ``done`` with the reply bytes."""

    def __init__(self, content: IO[bytes], done: Deferred[bytes]) -> None:
        self.content = content
        self.done = done
        self.reply = b""
        self._sent_end = False

    def connectionMade(self) -> None:
        assert self.transport is not None
        self.transport.write(b"zINSTREAM\0")
        self.transport.registerProducer(self, False)  # type: ignore[attr-defined]

    def resumeProducing(self) -> None:
        if self._sent_end or self.transport is None:
            return
        chunk = self.content.read(CHUNK)
        if chunk:
            self.transport.write(struct.pack(">I", len(chunk)) + chunk)
            return
        self._sent_end = True
        self.transport.write(b"\0\0\0\0")
        self.transport.unregisterProducer()  # type: ignore[attr-defined]

    def stopProducing(self) -> None:
        self._sent_end = True

    def dataReceived(self, data: bytes) -> None:
        self.reply += data
        if b"\0" in self.reply or len(self.reply) > MAX_REPLY:
            reply, self.reply = self.reply, b""
            self._fire(reply)
            assert self.transport is not None
            self.transport.loseConnection()

    def connectionLost(self, reason: Failure = ConnectionDone) -> None:  # type: ignore[assignment]
        if self.reply:  # a reply without its NUL, then the close
            self._fire(self.reply)
        elif not self.done.called:
            self.done.errback(ClamdUnavailable(f"connection lost: {reason.getErrorMessage()}"))

    def _fire(self, reply: bytes) -> None:
        if not self.done.called:
            self.done.callback(reply)


class ClamdServer:
    """One clamd, reached at ``address`` (see ``parse_server``)."""

    def __init__(self, reactor: Any, address: str, timeout: float) -> None:
        self.reactor = reactor
        self.address = address
        self.timeout = timeout
        kind, host, port = parse_server(address)
        if kind == "unix":
            self.endpoint: Any = UNIXClientEndpoint(  # type: ignore[no-untyped-call]
                reactor, host, timeout=timeout
            )
        elif kind == "tcp6":
            self.endpoint = TCP6ClientEndpoint(  # type: ignore[no-untyped-call]
                reactor, host, port, timeout=timeout
            )
        else:
            self.endpoint = TCP4ClientEndpoint(reactor, host, port, timeout=timeout)

    def scan(self, content: IO[bytes]) -> Deferred[ScanResult]:
        """Scan ``content`` (closed when done); fails with ClamdUnavailable or ClamdError."""
        reply: Deferred[bytes] = Deferred()
        protocols: list[_InstreamProtocol] = []

        def build() -> _InstreamProtocol:
            p = _InstreamProtocol(content, reply)
            protocols.append(p)
            return p

        connecting = self.endpoint.connect(Factory.forProtocol(build))

        def not_connected(f: Failure) -> None:
            if not reply.called:
                reply.errback(ClamdUnavailable(f"cannot connect: {f.getErrorMessage()}"))

        connecting.addErrback(not_connected)

        def too_late() -> None:
            if reply.called:
                return
            reply.errback(ClamdUnavailable(f"no answer within {self.timeout:g}s"))
            connecting.cancel()
            for p in protocols:
                if p.transport is not None:
                    p.transport.abortConnection()  # type: ignore[attr-defined]

        timer = self.reactor.callLater(self.timeout, too_late)

        def finish(result: bytes | Failure) -> ScanResult | Failure:
            if timer.active():
                timer.cancel()
            content.close()
            if isinstance(result, Failure):
                return result
            return ScanResult(self.address, parse_reply(result))

        return reply.addBoth(finish)


class ClamdPool:
    """clamd servers used in turn, each scan starting at the next; failover on errors."""

    def __init__(self, reactor: Any, servers: Sequence[str], timeout: float) -> None:
        if not servers:
            raise ValueError("no clamd servers")
        self.servers = [ClamdServer(reactor, s, timeout) for s in servers]
        self._next = 0

    def scan(self, open_content: Callable[[], IO[bytes]]) -> Deferred[ScanResult]:
        """Scan what ``open_content()`` reads (opened again for each server tried)."""
        start = self._next
        self._next = (self._next + 1) % len(self.servers)
        order = self.servers[start:] + self.servers[:start]
        errors: list[str] = []

        def attempt(i: int) -> Deferred[ScanResult]:
            server = order[i]
            d = server.scan(open_content())

            def failed(f: Failure) -> Deferred[ScanResult]:
                if not f.check(ClamdUnavailable):
                    return fail(f)
                log.warn(
                    "clamd {server} unavailable: {why}",
                    server=server.address,
                    why=f.getErrorMessage(),
                )
                errors.append(f"{server.address}: {f.getErrorMessage()}")
                if i + 1 < len(order):
                    return attempt(i + 1)
                return fail(ClamdUnavailable("; ".join(errors)))

            scanned: Deferred[ScanResult] = d.addErrback(failed)
            return scanned

        return attempt(0)
