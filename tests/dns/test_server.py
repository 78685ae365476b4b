"""The DNS protocols without sockets: TCP framing, connection limits, idle timeout, closing
on what is not a query; UDP answering to the sender; the role's reconfigure and services."""

from __future__ import annotations

import struct
from collections.abc import Callable
from typing import Any

import dns.message
import pytest
from twisted.internet.task import Clock
from twisted.internet.testing import MemoryReactor, StringTransport

from mailgw.config import Config
from mailgw.dns.server import DNSDatagramProtocol, DNSRole, UDPListenerService
from mailgw.net.limits import ConnectionCounter
from mailgw.net.listen import ListenerService
from mailgw.testing.fakes import peer_address
from tests.dns.conftest import ZONE_CONFIG


@pytest.fixture
def role(make_config: Callable[[str], Config]) -> DNSRole:
    return DNSRole(make_config(ZONE_CONFIG), MemoryReactor(), ConnectionCounter(1, 2))


def framed(q: dns.message.Message) -> bytes:
    wire = q.to_wire()
    return struct.pack("!H", len(wire)) + wire


def connect(role: DNSRole, ip: str, clock: Clock | None = None) -> tuple[Any, StringTransport]:
    proto = role.stream.buildProtocol(peer_address(ip))
    if clock is not None:
        proto.callLater = clock.callLater
    transport = StringTransport(peerAddress=peer_address(ip))
    proto.makeConnection(transport)
    return proto, transport


def answers(transport: StringTransport) -> list[dns.message.Message]:
    data, out = transport.value(), []
    while data:
        (n,) = struct.unpack("!H", data[:2])
        out.append(dns.message.from_wire(data[2 : 2 + n]))
        data = data[2 + n :]
    return out


def test_tcp_answers_each_framed_query_in_order(role: DNSRole) -> None:
    proto, transport = connect(role, "127.0.0.2")
    q1 = dns.message.make_query("example.test", "MX")
    q2 = dns.message.make_query("mx.example.test", "A")
    data = framed(q1) + framed(q2)
    for i in range(len(data)):  # byte by byte: framing across reads
        proto.dataReceived(data[i : i + 1])
    a1, a2 = answers(transport)
    assert a1.id == q1.id and a2.id == q2.id
    assert [rr.address for rr in a2.answer[0]] == ["198.51.100.1"]  # overseas, by its address
    assert not transport.disconnecting


def test_tcp_closes_on_what_is_not_a_query(role: DNSRole) -> None:
    proto, transport = connect(role, "127.0.0.1")
    proto.dataReceived(b"\x00\x03abc")
    assert transport.disconnecting and transport.value() == b""


def test_tcp_connection_limits(role: DNSRole) -> None:
    counter = role.stream.counter
    assert counter is not None
    p1, t1 = connect(role, "127.0.0.1")
    _, t2 = connect(role, "127.0.0.1")  # a second one from the same address: over 1 per IP
    assert t2.disconnecting and not t1.disconnecting
    p3, _ = connect(role, "127.0.0.2")
    _, t4 = connect(role, "127.0.0.3")  # a third in all: over 2
    assert t4.disconnecting
    assert counter.total == 2
    p1.connectionLost(None)
    p3.connectionLost(None)
    assert counter.total == 0
    # A refused connection's query gets nothing.
    _, t5 = connect(role, "127.0.0.1")
    p6, t6 = connect(role, "127.0.0.1")
    assert t6.disconnecting
    p6.dataReceived(framed(dns.message.make_query("example.test", "SOA")))
    assert t6.value() == b"" and t5.value() == b""


def test_tcp_idle_timeout(role: DNSRole) -> None:
    clock = Clock()
    proto, transport = connect(role, "127.0.0.1", clock)
    clock.advance(9)
    proto.dataReceived(framed(dns.message.make_query("example.test", "SOA")))
    clock.advance(9)
    assert not transport.disconnecting  # the query reset the timer
    clock.advance(1.5)
    assert transport.disconnecting
    proto.connectionLost(None)
    assert role.stream.counter is not None and role.stream.counter.total == 0


class Written:
    def __init__(self) -> None:
        self.sent: list[tuple[bytes, Any]] = []

    def write(self, data: bytes, addr: Any) -> None:
        self.sent.append((data, addr))


def test_udp_answers_the_sender(role: DNSRole) -> None:
    transport = Written()
    datagram = DNSDatagramProtocol(role.responder)
    datagram.transport = transport  # type: ignore[assignment]
    q = dns.message.make_query("example.test", "MX")
    datagram.datagramReceived(q.to_wire(), ("127.0.0.1", 5353))
    datagram.datagramReceived(b"\x00\x01", ("127.0.0.1", 5354))  # not answered
    ((data, addr),) = transport.sent
    assert addr == ("127.0.0.1", 5353) and dns.message.from_wire(data).id == q.id


def test_reconfigure_swaps_the_zone_data(
    role: DNSRole, make_config: Callable[[str], Config]
) -> None:
    old = role.responder.data
    role.reconfigure(make_config(ZONE_CONFIG.replace("ttl = 60", "ttl = 61")))
    assert role.responder.data is not old and role.responder.data.ttl == 61
    changed = make_config(ZONE_CONFIG.replace("ns_ttl = 1h", "ns_ttl = 1h\nidle_timeout = 3s"))
    role.reconfigure(changed)
    assert role.stream.idle_timeout == 3.0


class UDPMemoryReactor(MemoryReactor):
    """MemoryReactor recording listenUDP calls too: (port, protocol, interface, size)."""

    def __init__(self) -> None:
        super().__init__()
        self.udpServers: list[tuple[int, Any, str, int]] = []

    def listenUDP(  # noqa: N802 (Twisted)
        self, port: int, protocol: Any, interface: str = "", maxPacketSize: int = 8192
    ) -> Any:
        self.udpServers.append((port, protocol, interface, maxPacketSize))
        return self.listenTCP(port, None, interface=interface)  # a fake port to stop


def test_services_one_per_listen_description(
    make_config: Callable[[str], Config],
) -> None:
    text = ZONE_CONFIG.replace(
        "enabled = yes",
        "enabled = yes\nlisten = udp:5300:interface=127.0.0.1 tcp:5300:interface=127.0.0.1 udp:5301",
    )
    reactor = UDPMemoryReactor()
    role = DNSRole(make_config(text), reactor)
    services = role.services()
    assert [type(s) for s in services] == [UDPListenerService, ListenerService, UDPListenerService]
    for s in services:
        s.privilegedStartService()
    assert [(port, interface) for port, _, interface, _ in reactor.udpServers] == [
        (5300, "127.0.0.1"),
        (5301, ""),
    ]
    first, second = reactor.udpServers[0][1], reactor.udpServers[1][1]
    assert first is not second  # a protocol per port, one responder
    assert first.responder is second.responder is role.responder
    assert reactor.tcpServers[0][0] == 5300


def test_udp_listener_that_cannot_bind_stops_start_up(
    make_config: Callable[[str], Config],
) -> None:
    from twisted.internet.error import CannotListenError

    class Busy(MemoryReactor):
        def listenUDP(self, port: int, *args: Any, **kwargs: Any) -> Any:  # noqa: N802
            raise CannotListenError("127.0.0.1", port, OSError("Address already in use"))

    service = UDPListenerService(Busy(), "udp:53:interface=127.0.0.1", None, "f:dns:listen")
    with pytest.raises(SystemExit, match="f:dns:listen: cannot listen on udp:53"):
        service.privilegedStartService()
