"""HandshakeGuard: implicit-TLS connections that never finish the handshake are aborted after
the timeout, and a close before the handshake (a refusal, an idle timeout) aborts at once."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from twisted.internet.address import IPv4Address
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.protocols.tls import TLSMemoryBIOFactory

from mailgw.net.handshake import HandshakeGuard, HandshakeGuardFactory
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
    guarded = HandshakeGuardFactory(Factory.forProtocol(app), clock, timeout)
    factory = TLSMemoryBIOFactory(options, False, guarded)
    addr = IPv4Address("TCP", "192.0.2.5", 40000)
    tls = factory.buildProtocol(addr)
    transport = StringTransport(peerAddress=addr)
    tls.makeConnection(transport)
    return clock, tls, transport


def test_no_handshake_is_aborted_after_the_timeout(selfsigned: tuple[Path, Path]) -> None:
    clock, tls, transport = serve(selfsigned, Quiet, timeout=30.0)
    guard = tls.wrappedProtocol
    assert isinstance(guard, HandshakeGuard)
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
