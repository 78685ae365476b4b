"""The smart DNS role's network side: DNS over UDP and over TCP (RFC 1035 4.2, RFC 7766) on
Twisted, their listeners, and the role's part (``DNSRole``) that a reloaded config reaches."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from twisted.application import service
from twisted.internet import defer
from twisted.internet.error import CannotListenError
from twisted.internet.interfaces import IAddress
from twisted.internet.protocol import DatagramProtocol, Factory, connectionDone
from twisted.logger import Logger
from twisted.protocols.basic import Int16StringReceiver
from twisted.protocols.policies import TimeoutMixin
from twisted.python.failure import Failure

from mailgw.config import Config
from mailgw.config.schema import parse_udp_listen
from mailgw.dns.regions import ZoneData
from mailgw.dns.responder import Responder
from mailgw.net.limits import ConnectionCounter
from mailgw.net.listen import ListenerService
from mailgw.net.proxy import peer_ip

log = Logger()

MAX_DATAGRAM = 65535


class DNSDatagramProtocol(DatagramProtocol):
    """DNS over UDP: every datagram is one query, answered (or not: see ``Responder``) to
    the address it came from."""

    noisy = False

    def __init__(self, responder: Responder) -> None:
        self.responder = responder

    def datagramReceived(self, datagram: bytes, addr: Any) -> None:  # noqa: N802 (Twisted)
        reply = self.responder.respond(datagram, addr[0], udp=True)
        if reply is not None and self.transport is not None:
            self.transport.write(reply, addr)


class DNSStreamProtocol(Int16StringReceiver, TimeoutMixin):
    """DNS over TCP: length-prefixed messages, answered in order; the connection is closed
    after ``idle_timeout`` without a query, on a message we do not answer (fewer than 12
    bytes, a response), and when the role's connection limits refuse it."""

    factory: DNSStreamFactory
    transport: Any
    MAX_LENGTH = 65535

    def __init__(self) -> None:
        self._ip: str | None = None

    def connectionMade(self) -> None:  # noqa: N802 (Twisted)
        ip = peer_ip(self.transport.getPeer())
        counter = self.factory.counter
        if counter is not None and counter.admit(ip) is not None:
            self.transport.loseConnection()
            return
        self._ip = ip
        self.setTimeout(self.factory.idle_timeout)  # type: ignore[no-untyped-call]

    def stringReceived(self, string: bytes) -> None:  # noqa: N802 (Twisted)
        if self._ip is None:
            return
        self.resetTimeout()  # type: ignore[no-untyped-call]
        reply = self.factory.responder.respond(string, self._ip, udp=False)
        if reply is None:
            self.transport.loseConnection()
            return
        self.sendString(reply)  # type: ignore[no-untyped-call]

    def timeoutConnection(self) -> None:  # noqa: N802 (Twisted)
        self.transport.loseConnection()

    def connectionLost(self, reason: Failure = connectionDone) -> None:  # noqa: N802 (Twisted)
        self.setTimeout(None)  # type: ignore[no-untyped-call]
        if self._ip is not None:
            ip, self._ip = self._ip, None
            if self.factory.counter is not None:
                self.factory.counter.release(ip)


class DNSStreamFactory(Factory[DNSStreamProtocol]):
    """Builds ``DNSStreamProtocol``s sharing the role's responder and limits."""

    protocol = DNSStreamProtocol
    noisy = False

    def __init__(
        self, responder: Responder, idle_timeout: float, counter: ConnectionCounter | None
    ) -> None:
        self.responder = responder
        self.idle_timeout = idle_timeout
        self.counter = counter

    def buildProtocol(self, addr: IAddress | None) -> DNSStreamProtocol:  # noqa: N802 (Twisted)
        p = DNSStreamProtocol()
        p.factory = self
        return p


class UDPListenerService(service.Service):
    """Listens on one ``udp:PORT:interface=ADDR`` while running; a port that cannot be bound
    stops start-up with ``where: cannot listen on DESCRIPTION: reason`` (as TCP listeners)."""

    def __init__(self, reactor: Any, description: str, protocol: Any, where: str) -> None:
        self.reactor = reactor
        self.description = description
        self.protocol = protocol
        self.where = where
        self.port: Any = None
        self.setName(f"{where} {description}")  # type: ignore[no-untyped-call]

    def privilegedStartService(self) -> None:  # noqa: N802 (Twisted)
        service.Service.privilegedStartService(self)  # type: ignore[no-untyped-call]
        port, interface = parse_udp_listen(self.description)
        try:
            self.port = self.reactor.listenUDP(
                port, self.protocol, interface=interface, maxPacketSize=MAX_DATAGRAM
            )
        except CannotListenError as e:
            reason = e.socketError
            raise SystemExit(
                f"{self.where}: cannot listen on {self.description}: {reason}"
            ) from None
        host = self.port.getHost()
        log.info("dns listening on udp {host}:{port}", host=host.host, port=host.port)

    def stopService(self) -> defer.Deferred[None] | None:  # noqa: N802 (Twisted)
        service.Service.stopService(self)  # type: ignore[no-untyped-call]
        if self.port is not None:
            port, self.port = self.port, None
            return defer.maybeDeferred(port.stopListening)
        return None


class DNSRole:
    """The ``dns`` role's part (``node.parts["dns"]``): the responder shared by every
    listener, and ``reconfigure(config)`` that gives it the reloaded zone data (zones,
    regions, TTLs, ECS trust) and the TCP limits."""

    def __init__(
        self,
        config: Config,
        reactor: Any,
        counter: ConnectionCounter | None = None,
        zone_data: Callable[[Config], ZoneData] = ZoneData.from_config,
    ) -> None:
        self.config = config
        self.reactor = reactor
        self._zone_data = zone_data
        self.responder = Responder(zone_data(config))
        self.stream = DNSStreamFactory(self.responder, config.dns.idle_timeout, counter)

    def reconfigure(self, config: Config) -> None:
        """Answer from ``config`` from now on (the listeners stay: they need a restart)."""
        self.config = config
        self.responder.data = self._zone_data(config)
        self.stream.idle_timeout = config.dns.idle_timeout

    def services(self) -> list[service.IService]:
        """One listener per ``[dns] listen`` description: UDP ones (``udp:``) and TCP ones."""
        where = f"{self.config.path}:dns:listen"
        out: list[service.IService] = []
        for description in self.config.dns.listen:
            if description.startswith("udp:"):  # a protocol per port (its transport)
                datagram = DNSDatagramProtocol(self.responder)
                out.append(UDPListenerService(self.reactor, description, datagram, where))
            else:
                out.append(ListenerService(self.reactor, description, self.stream, where))
        return out
