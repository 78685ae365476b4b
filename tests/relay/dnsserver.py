"""A small authoritative DNS server for tests: zone data in a dict, on a loopback UDP+TCP port.

Records: ``{("example.test", "MX"): ["10 mx1.example.test."], ("mx1.example.test", "A"):
["127.0.0.2"]}``. A name present with any type answers NODATA for other types; an absent
name answers NXDOMAIN; names in ``servfail`` answer SERVFAIL; names in ``silent`` never answer.
"""

from __future__ import annotations

import socket
import struct
from typing import Any

import dns.flags
import dns.message
import dns.name
import dns.rcode
import dns.rdataclass
import dns.rdatatype
import dns.rrset
from twisted.internet.protocol import DatagramProtocol, Factory, Protocol


class Zone:
    def __init__(self) -> None:
        self.records: dict[tuple[str, str], list[str]] = {}
        self.servfail: set[str] = set()
        self.silent: set[str] = set()
        self.queries: list[tuple[str, str]] = []

    def add(self, name: str, rdtype: str, *values: str) -> None:
        self.records.setdefault((name.lower().rstrip("."), rdtype), []).extend(values)

    def answer(self, wire: bytes) -> bytes | None:
        query = dns.message.from_wire(wire)
        response = dns.message.make_response(query)
        response.flags |= dns.flags.AA
        question = query.question[0]
        name = question.name.to_text(omit_final_dot=True).lower()
        rdtype = dns.rdatatype.to_text(question.rdtype)
        self.queries.append((name, rdtype))
        if name in self.silent:
            return None
        if name in self.servfail:
            response.set_rcode(dns.rcode.SERVFAIL)
            return response.to_wire()
        if not any(key[0] == name for key in self.records):
            response.set_rcode(dns.rcode.NXDOMAIN)
            return response.to_wire()
        values = self.records.get((name, rdtype), [])
        if values:
            response.answer.append(
                dns.rrset.from_text_list(question.name, 300, dns.rdataclass.IN, rdtype, values)
            )
        return response.to_wire()


class _UDP(DatagramProtocol):
    def __init__(self, zone: Zone) -> None:
        self.zone = zone

    def datagramReceived(self, datagram: bytes, addr: Any) -> None:
        reply = self.zone.answer(datagram)
        if reply is not None:
            self.transport.write(reply, addr)


class _TCP(Protocol):
    def __init__(self, zone: Zone) -> None:
        self.zone = zone
        self.buffer = b""

    def dataReceived(self, data: bytes) -> None:
        self.buffer += data
        while len(self.buffer) >= 2:
            (length,) = struct.unpack("!H", self.buffer[:2])
            if len(self.buffer) < 2 + length:
                return
            wire, self.buffer = self.buffer[2 : 2 + length], self.buffer[2 + length :]
            reply = self.zone.answer(wire)
            if reply is not None:
                self.transport.write(struct.pack("!H", len(reply)) + reply)


def free_udp_tcp_port(host: str = "127.0.0.1") -> int:
    """A port free for both UDP and TCP a moment ago."""
    for _ in range(50):
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as u:
            u.bind((host, 0))
            port = int(u.getsockname()[1])
            with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as t:
                try:
                    t.bind((host, port))
                except OSError:
                    continue
                return port
    raise RuntimeError("no free UDP+TCP port")


def start_dns(reactor: Any, zone: Zone, host: str = "127.0.0.1") -> tuple[int, list[Any]]:
    """Listen on UDP and TCP ``host:port``; return the port and the listening ports to stop."""
    port = free_udp_tcp_port(host)
    udp = reactor.listenUDP(port, _UDP(zone), interface=host)
    tcp = reactor.listenTCP(port, Factory.forProtocol(lambda: _TCP(zone)), interface=host)
    return port, [udp, tcp]
