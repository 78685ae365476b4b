"""PROXY header wrapper: trusted peers only, greeting after the header, v1 and v2."""

from __future__ import annotations

import ipaddress
import socket
import struct

from twisted.internet import address
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport

from mailgw.net.proxy import ProxyHeaderFactory, is_loopback, is_trusted

TRUSTED = (ipaddress.ip_network("127.0.0.0/8"),)


class Greeter(Protocol):
    def __init__(self) -> None:
        self.received = b""
        self.peer: object = None
        self.lost = False

    def connectionMade(self) -> None:
        self.peer = self.transport.getPeer()  # type: ignore[union-attr]
        self.transport.write(b"220 hello\r\n")  # type: ignore[union-attr]

    def dataReceived(self, data: bytes) -> None:
        self.received += data

    def connectionLost(self, reason: object = None) -> None:
        self.lost = True


def connect(peer_host: str = "127.0.0.1") -> tuple[object, StringTransport, Greeter, Clock]:
    clock = Clock()
    inner = Factory.forProtocol(Greeter)
    factory = ProxyHeaderFactory(inner, TRUSTED, clock, header_timeout=5)
    proto = factory.buildProtocol(address.IPv4Address("TCP", peer_host, 4000))
    transport = StringTransport(peerAddress=address.IPv4Address("TCP", peer_host, 4000))
    proto.makeConnection(transport)
    return proto, transport, proto.wrappedProtocol, clock


def v2_header(src: str, dst: str, sport: int, dport: int, command: int = 0x21) -> bytes:
    body = socket.inet_aton(src) + socket.inet_aton(dst) + struct.pack("!HH", sport, dport)
    return b"\r\n\r\n\x00\r\nQUIT\n" + bytes([command, 0x11]) + struct.pack("!H", len(body)) + body


def test_v1_header_then_greeting_with_proxied_peer() -> None:
    proto, transport, inner, _ = connect()
    assert transport.value() == b""  # no greeting before the header
    proto.dataReceived(b"PROXY TCP4 192.0.2.7 127.0.0.1 5555 25\r\nEHLO x\r\n")
    assert transport.value() == b"220 hello\r\n"
    assert inner.peer.host == "192.0.2.7"
    assert inner.received == b"EHLO x\r\n"


def test_v1_header_in_pieces() -> None:
    proto, transport, inner, _ = connect()
    for piece in (b"PRO", b"XY TCP4 192.0.2.7 ", b"127.0.0.1 5555 25\r", b"\n"):
        proto.dataReceived(piece)
    assert transport.value() == b"220 hello\r\n"
    assert inner.peer.port == 5555


def test_v2_header() -> None:
    proto, transport, inner, _ = connect()
    header = v2_header("198.51.100.9", "127.0.0.1", 40000, 25)
    proto.dataReceived(header[:10])
    assert transport.value() == b""
    proto.dataReceived(header[10:] + b"QUIT\r\n")
    assert inner.peer.host == "198.51.100.9"
    assert inner.received == b"QUIT\r\n"


def test_v2_local_keeps_real_peer() -> None:
    proto, _, inner, _ = connect()
    body = b""
    proto.dataReceived(
        b"\r\n\r\n\x00\r\nQUIT\n" + bytes([0x20, 0x00]) + struct.pack("!H", 0) + body
    )
    assert inner.peer.host == "127.0.0.1"


def test_untrusted_peer_is_dropped_without_greeting() -> None:
    _, transport, inner, _ = connect("192.0.2.1")
    assert transport.value() == b""
    assert transport.disconnecting
    assert inner.peer is None


def test_garbage_instead_of_header_is_dropped() -> None:
    proto, transport, inner, _ = connect()
    proto.dataReceived(b"EHLO mail.example\r\n")
    assert transport.disconnecting
    assert inner.peer is None


def test_header_timeout() -> None:
    _, transport, _, clock = connect()
    clock.advance(5)
    assert transport.disconnecting


def test_connection_lost_before_header_does_not_reach_protocol() -> None:
    proto, _, inner, clock = connect()
    proto.connectionLost(None)
    assert not inner.lost
    assert not clock.getDelayedCalls()


def test_helpers() -> None:
    assert is_trusted(address.IPv6Address("TCP", "::ffff:127.0.0.1", 1), TRUSTED)
    assert not is_trusted(address.UNIXAddress(b"/tmp/x"), TRUSTED)
    assert is_loopback(address.IPv6Address("TCP", "::1", 1))
    assert not is_loopback(address.IPv4Address("TCP", "192.0.2.1", 1))
