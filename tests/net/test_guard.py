"""ConnectionGuard: implicit-TLS connections that never finish the handshake are aborted after
the timeout, a close before the handshake (a refusal, an idle timeout) aborts at once, and a
close that cannot complete (unflushable output) is turned into an abort."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from twisted.internet.address import IPv4Address
from twisted.internet.error import ConnectionDone
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.protocols.tls import TLSMemoryBIOFactory
from twisted.python.failure import Failure

from mailgw.net.guard import ConnectionGuard, ConnectionGuardFactory
from mailgw.net.tls import load_certificate_options


class Refuser(Protocol):
    """Greets with an error and closes at once, as a session over a connection limit does."""

    def connectionMade(self) -> None:
        self.transport.write(b"-ERR too many connections\r\n")
        self.transport.loseConnection()


class Quiet(Protocol):
    lost = False

    def connectionLost(self, reason: Any = None) -> None:
        self.lost = True


def serve(selfsigned: tuple[Path, Path], app: type[Protocol], timeout: float = 30.0) -> Any:
    cert, key = selfsigned
    clock = Clock()
    options = load_certificate_options(str(cert), str(key))
    guarded = ConnectionGuardFactory(Factory.forProtocol(app), clock, timeout)
    factory = TLSMemoryBIOFactory(options, False, guarded)
    addr = IPv4Address("TCP", "192.0.2.5", 40000)
    tls = factory.buildProtocol(addr)
    transport = StringTransport(peerAddress=addr)
    tls.makeConnection(transport)
    return clock, tls, transport


def test_no_handshake_is_aborted_after_the_timeout(selfsigned: tuple[Path, Path]) -> None:
    clock, tls, transport = serve(selfsigned, Quiet, timeout=30.0)
    guard = tls.wrappedProtocol
    assert isinstance(guard, ConnectionGuard)
    clock.advance(29.0)
    assert not transport.disconnecting
    clock.advance(1.0)
    assert transport.disconnecting and getattr(transport, "aborted", True)
    assert clock.getDelayedCalls() == []


def test_refusal_before_the_handshake_frees_the_connection_at_once(
    selfsigned: tuple[Path, Path],
) -> None:
    clock, tls, transport = serve(selfsigned, Refuser, timeout=3600.0)
    # Without the guard, TLS would keep the reply (and the socket) until a handshake.
    assert transport.disconnecting
    assert clock.getDelayedCalls() == []


def test_a_completed_handshake_cancels_the_timer(selfsigned: tuple[Path, Path]) -> None:
    clock, tls, transport = serve(selfsigned, Quiet, timeout=30.0)
    guard = tls.wrappedProtocol
    guard.handshakeCompleted()
    clock.advance(60.0)
    assert not transport.disconnecting
    assert guard.handshake_done


class Closer(Protocol):
    """Says goodbye and closes when told to."""

    def bye(self) -> None:
        self.transport.write(b"421 bye\r\n")
        self.transport.loseConnection()


class StuckTransport(StringTransport):
    """A transport whose close never completes (a peer that stops reading, or a STARTTLS
    peer that never sends its ClientHello): loseConnection only marks it."""

    aborted = False

    def loseConnection(self) -> None:
        self.disconnecting = True

    def abortConnection(self) -> None:
        self.disconnecting = True
        self.aborted = True


def plain(close_timeout: float = 30.0) -> tuple[Clock, Any, StuckTransport]:
    clock = Clock()
    factory = ConnectionGuardFactory(Factory.forProtocol(Closer), clock, None, close_timeout)
    guard = factory.buildProtocol(IPv4Address("TCP", "192.0.2.5", 40000))
    transport = StuckTransport()
    guard.makeConnection(transport)
    return clock, guard, transport


def test_plain_connections_have_no_handshake_timer() -> None:
    clock, guard, transport = plain()
    assert guard.handshake_done and clock.getDelayedCalls() == []


def test_a_close_that_does_not_complete_is_aborted() -> None:
    clock, guard, transport = plain(close_timeout=30.0)
    guard.wrappedProtocol.bye()
    assert transport.value() == b"421 bye\r\n" and not transport.aborted
    clock.advance(29.0)
    assert not transport.aborted
    clock.advance(1.0)
    assert transport.aborted


def test_a_close_that_completes_cancels_the_deadline() -> None:
    clock, guard, transport = plain(close_timeout=30.0)
    guard.wrappedProtocol.bye()
    guard.connectionLost(Failure(ConnectionDone()))
    assert clock.getDelayedCalls() == [] and not transport.aborted


class Starter(Protocol):
    """Answers STARTTLS, then later says goodbye (an idle timeout)."""

    def starttls(self) -> None:
        self.transport.write(b"OK begin TLS\r\n")
        self.transport.startTLS(object())

    def bye(self) -> None:
        self.transport.write(b"* BYE idle\r\n")
        self.transport.loseConnection()


class TLSCapable(StuckTransport):
    started: object = None

    def startTLS(self, options: object) -> None:
        self.started = options


def starter() -> tuple[Clock, Any, TLSCapable]:
    clock = Clock()
    factory = ConnectionGuardFactory(Factory.forProtocol(Starter), clock, None)
    guard = factory.buildProtocol(IPv4Address("TCP", "192.0.2.5", 40000))
    transport = TLSCapable()
    guard.makeConnection(transport)
    return clock, guard, transport


def test_close_after_starttls_without_client_bytes_aborts_at_once() -> None:
    clock, guard, transport = starter()
    guard.wrappedProtocol.starttls()
    assert transport.started is not None
    guard.wrappedProtocol.bye()  # the peer never sent a ClientHello
    assert transport.aborted and clock.getDelayedCalls() == []


def test_close_after_a_working_starttls_is_graceful() -> None:
    clock, guard, transport = starter()
    guard.wrappedProtocol.starttls()
    guard.dataReceived(b"a1 NOOP\r\n")  # bytes through TLS: the handshake worked
    guard.wrappedProtocol.bye()
    assert not transport.aborted and transport.disconnecting
    assert len(clock.getDelayedCalls()) == 1  # only the close deadline
