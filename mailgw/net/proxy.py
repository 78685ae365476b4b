"""PROXY protocol v1/v2 in front of any role: trusted peers only, the wrapped protocol starts
(and greets) only once the header has been parsed."""

from __future__ import annotations

import ipaddress
from collections.abc import Sequence
from typing import Any

from twisted.internet import address as taddress
from twisted.internet.interfaces import IAddress, IProtocol, IReactorTime
from twisted.internet.protocol import connectionDone
from twisted.logger import Logger
from twisted.protocols import policies
from twisted.protocols.haproxy._exceptions import InvalidProxyHeader
from twisted.protocols.haproxy._v1parser import V1Parser
from twisted.protocols.haproxy._v2parser import V2Parser
from twisted.python.failure import Failure

Network = ipaddress.IPv4Network | ipaddress.IPv6Network

MAX_HEADER = 4096
log = Logger()


def peer_ip(addr: IAddress) -> str:
    """The IP text of a TCP address (``""`` for anything else, e.g. UNIX sockets)."""
    host = getattr(addr, "host", "")
    return host if isinstance(host, str) else ""


def is_trusted(addr: IAddress, networks: Sequence[Network]) -> bool:
    ip_text = peer_ip(addr)
    if not ip_text:
        return False
    try:
        ip = ipaddress.ip_address(ip_text)
    except ValueError:
        return False
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped:
        ip = ip.ipv4_mapped
    return any(ip in net for net in networks)


class ProxyHeaderProtocol(policies.ProtocolWrapper):
    """Reads the PROXY header, then connects the wrapped protocol with the proxied addresses."""

    factory: ProxyHeaderFactory
    transport: Any

    def __init__(self, factory: Any, wrappedProtocol: IProtocol) -> None:
        super().__init__(factory, wrappedProtocol)
        self._buffer = b""
        self._info: Any = None
        self._started = False
        self._timer: Any = None

    def makeConnection(self, transport: Any) -> None:
        # Like ProtocolWrapper.makeConnection, but the wrapped protocol waits for the header.
        from zope.interface import directlyProvides, providedBy

        directlyProvides(self, providedBy(transport))
        self.connected = 1
        self.transport = transport
        self.factory.registerProtocol(self)
        real = transport.getPeer()
        if not is_trusted(real, self.factory.trusted):
            log.warn("PROXY header refused from untrusted peer {peer}", peer=peer_ip(real))
            transport.abortConnection()
            return
        self._timer = self.factory.clock.callLater(self.factory.header_timeout, self._timeout)

    def _timeout(self) -> None:
        self._timer = None
        log.warn("no PROXY header from {peer} in time", peer=peer_ip(self.transport.getPeer()))
        self.transport.abortConnection()

    def dataReceived(self, data: bytes) -> None:
        if self._started:
            self.wrappedProtocol.dataReceived(data)
            return
        self._buffer += data
        try:
            info, remaining = self._parse()
        except InvalidProxyHeader:
            log.warn("invalid PROXY header from {peer}", peer=peer_ip(self.transport.getPeer()))
            self.transport.abortConnection()
            return
        if info is None:
            if len(self._buffer) > MAX_HEADER:
                self.transport.abortConnection()
            return
        self._info = info
        self._buffer = b""
        self._started = True
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None
        self.wrappedProtocol.makeConnection(self)  # type: ignore[arg-type]
        if remaining and self.connected:
            self.wrappedProtocol.dataReceived(remaining)

    def _parse(self) -> tuple[Any, bytes]:
        buf = self._buffer
        if buf[: len(V2Parser.PREFIX)] == V2Parser.PREFIX[: len(buf)] and len(buf) < 16:
            return None, b""
        if len(buf) >= 16 and buf[:12] == V2Parser.PREFIX:
            if buf[12] & 0xF0 != 0x20:
                raise InvalidProxyHeader()
            total = 16 + int.from_bytes(buf[14:16], "big")
            if len(buf) < total:
                return None, b""
            return V2Parser.parse(buf[:total]), buf[total:]
        if buf[:6] == b"PROXY "[: len(buf)] and len(buf) < 6:
            return None, b""
        if buf.startswith(b"PROXY "):
            end = buf.find(b"\r\n")
            if end < 0:
                if len(buf) > 107:
                    raise InvalidProxyHeader()
                return None, b""
            return V1Parser.parse(buf[: end + 2]), buf[end + 2 :]
        raise InvalidProxyHeader()

    def getPeer(self) -> IAddress:
        if self._info is not None and self._info.source is not None:
            return self._info.source
        return self.transport.getPeer()

    def getHost(self) -> IAddress:
        if self._info is not None and self._info.destination is not None:
            return self._info.destination
        return self.transport.getHost()

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self.factory.unregisterProtocol(self)
        if self._started:
            self.wrappedProtocol.connectionLost(reason)


class ProxyHeaderFactory(policies.WrappingFactory):
    """Wraps a factory so that each connection must start with a PROXY v1/v2 header."""

    protocol = ProxyHeaderProtocol
    noisy = False  # no "Starting factory <...>" in the mail log

    def __init__(
        self,
        wrappedFactory: Any,
        trusted: Sequence[Network],
        clock: IReactorTime,
        header_timeout: float = 10.0,
    ) -> None:
        super().__init__(wrappedFactory)
        self.trusted = tuple(trusted)
        self.clock = clock
        self.header_timeout = header_timeout

    def logPrefix(self) -> str:
        inner = getattr(self.wrappedFactory, "logPrefix", None)
        name = inner() if callable(inner) else self.wrappedFactory.__class__.__name__
        return f"{name} (PROXY)"


def is_loopback(addr: IAddress) -> bool:
    """True for a TCP peer on 127.0.0.0/8 or ::1 (after PROXY, the proxied client)."""
    if not isinstance(addr, taddress.IPv4Address | taddress.IPv6Address):
        return False
    try:
        ip = ipaddress.ip_address(addr.host)
    except ValueError:
        return False
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped:
        ip = ip.ipv4_mapped
    return ip.is_loopback
