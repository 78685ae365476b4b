"""One DNS query in, its authoritative answer out: region-dependent MX and A/AAAA, SOA, NS,
NXDOMAIN/NODATA with the SOA, REFUSED outside our zones, EDNS(0) and Client Subnet, and
truncation of UDP answers (the wire format is twisted.names', the ECS option dnspython's).

Rules (``Responder.respond``):

- fewer than 12 bytes, or a response (QR=1): no answer at all (no reflection loops);
- a header that parses but a body that does not: FORMERR (header only); so are a QDCOUNT
  other than 1, two OPT records, a malformed OPT or Client Subnet option;
- an opcode other than QUERY: NOTIMP; EDNS version above 0: BADVERS;
- class other than IN, a name outside the zones, a zone transfer (AXFR/IXFR): REFUSED,
  AA=0; everything else in a zone: AA=1, RA=0 (no recursion, ever);
- a name with no records below or at it: NXDOMAIN with the zone's SOA in the authority
  section; a name without records of the asked type: NOERROR, no answer, SOA (NODATA);
- ANY: one HINFO ``RFC8482`` record (RFC 8482), not every record;
- UDP answers longer than 512 bytes (without EDNS) or than the smaller of the querier's EDNS
  size and ``[dns] max_udp_size``: sent empty with TC=1, so the querier asks again over TCP,
  which gets the whole answer.

The region: the querier's source address, matched against the regions' networks
(``RegionMap``); when the query carries an EDNS Client Subnet option (RFC 7871) *and* comes
from a resolver in ``[dns] ecs_trusted``, the client subnet instead (a /0 subnet: the
resolver's address). The answer echoes the option: SCOPE PREFIX-LENGTH is the source prefix
length when the subnet chose a region-dependent answer, 0 otherwise (the answer does not
depend on the subnet). An untrusted resolver's subnet is never used: anyone could otherwise
pick the other region's gateways by forging the option.
"""

from __future__ import annotations

import ipaddress
import struct
from dataclasses import dataclass
from typing import Any

import dns.edns
import dns.wire
from prometheus_client import Counter
from twisted.logger import Logger
from twisted.names import dns as wire

from mailgw.dns.regions import IPAddress, Network, Region, ZoneData

log = Logger()

QUERIES = Counter(
    "mailgw_dns_queries",
    "Smart DNS queries answered, by region chosen (none: not in a zone), type and rcode.",
    ["region", "type", "rcode"],
)

FORMERR, SERVFAIL, NXDOMAIN, NOTIMP, REFUSED = 1, 2, 3, 4, 5
BADVERS = 16
RCODES = {
    0: "NOERROR",
    FORMERR: "FORMERR",
    SERVFAIL: "SERVFAIL",
    NXDOMAIN: "NXDOMAIN",
    NOTIMP: "NOTIMP",
    REFUSED: "REFUSED",
    BADVERS: "BADVERS",
}
ECS_CODE = 8
SOA_REFRESH, SOA_RETRY, SOA_EXPIRE = 3600, 600, 14 * 86400
UDP_PLAIN = 512
TCP_MAX = 65535
_REGION_TYPES = {wire.MX, wire.A, wire.AAAA}
_HEADER = struct.Struct("!HH")


class Malformed(Exception):
    """A query we answer FORMERR."""


@dataclass(frozen=True)
class ClientSubnet:
    """A parsed EDNS Client Subnet option of a query."""

    network: Network
    option: dns.edns.ECSOption

    def reply(self, scope: int) -> Any:
        """The option echoed in the answer with SCOPE PREFIX-LENGTH ``scope``."""
        option = dns.edns.ECSOption(self.option.address, self.option.srclen, scope)
        return _make(wire._OPTVariableOption, ECS_CODE, option.to_wire())


def parse_client_subnet(data: bytes) -> ClientSubnet:
    """An ECS option's data -> ``ClientSubnet``; ``Malformed`` when RFC 7871 says FORMERR:
    an unknown family, a prefix longer than the address, more or fewer address octets than
    the prefix needs, bits set beyond the prefix."""
    if len(data) < 4:
        raise Malformed("client subnet option shorter than 4 bytes")
    try:
        option = dns.edns.option_from_wire_parser(dns.edns.OptionType.ECS, dns.wire.Parser(data))
    except Exception as e:  # dnspython: ValueError, FormError, ...
        raise Malformed(f"client subnet option: {e}") from None
    assert isinstance(option, dns.edns.ECSOption)
    srclen = data[2]
    address = data[4:]
    if len(address) != (srclen + 7) // 8:
        raise Malformed("client subnet address octets do not match its prefix length")
    if srclen % 8 and address[-1] & (0xFF >> (srclen % 8)):
        raise Malformed("client subnet address has bits set beyond its prefix")
    network = ipaddress.ip_network(f"{option.address}/{srclen}")
    return ClientSubnet(network, option)


def _make(factory: Any, *args: Any, **kwargs: Any) -> Any:
    """Call one of twisted.names' constructors (records, OPT), which carry no type hints."""
    return factory(*args, **kwargs)


def type_label(qtype: int) -> str:
    """A query type for the metric (a bounded set: Twisted's known types, else ``other``)."""
    if qtype == wire.ALL_RECORDS:
        return "ANY"
    return wire.QUERY_TYPES.get(qtype) or wire.EXT_QUERIES.get(qtype) or "other"


def _header_only(packet: bytes, rcode: int) -> bytes:
    """An answer carrying only the header (counts 0): for a query whose body does not
    parse. Opcode and RD are copied."""
    qid, flags = _HEADER.unpack_from(packet)
    flags = 0x8000 | (flags & 0x7900) | (rcode & 0xF)
    return _HEADER.pack(qid, flags) + b"\x00" * 8


class Responder:
    """Answers queries from ``data`` (``ZoneData``); ``data`` may be replaced at any time
    (a reloaded config)."""

    def __init__(self, data: ZoneData) -> None:
        self.data = data

    def respond(self, packet: bytes, peer: str, udp: bool) -> bytes | None:
        """The answer to ``packet`` from ``peer`` (its IP address as text), or None when
        nothing must be sent (see the module docstring); never raises: an unexpected error
        is logged and answered SERVFAIL."""
        if len(packet) < 12:
            QUERIES.labels("none", "none", "FORMERR").inc()
            return None
        _, flags = _HEADER.unpack_from(packet)
        if flags & 0x8000:
            return None
        try:
            return self._respond(packet, peer, udp)
        except Exception:
            log.failure("dns: answering a query from {peer} failed", peer=peer)
            QUERIES.labels("none", "none", "SERVFAIL").inc()
            return _header_only(packet, SERVFAIL)

    def _respond(self, packet: bytes, peer: str, udp: bool) -> bytes:
        message = wire.Message()
        try:
            message.fromStr(packet)
        except Exception:  # EOFError, ValueError, struct.error, UnicodeError...
            QUERIES.labels("none", "none", "FORMERR").inc()
            return _header_only(packet, FORMERR)
        answer = _Answer(self.data, message, peer)
        try:
            answer.build()
        except Malformed as e:
            log.debug("dns: FORMERR to {peer}: {error}", peer=peer, error=e)
            answer.fail(FORMERR)
        QUERIES.labels(answer.region_label, answer.type_label, RCODES[answer.rcode]).inc()
        return answer.encode(udp)


class _Answer:
    """The answer to one parsed query, built by ``build`` then ``encode``d."""

    def __init__(self, data: ZoneData, query: wire.Message, peer: str) -> None:
        self.data = data
        self.query = query
        self.peer = peer
        self.rcode = 0
        self.aa = False
        self.answers: list[wire.RRHeader] = []
        self.authority: list[wire.RRHeader] = []
        self.additional: list[wire.RRHeader] = []
        self.edns: Any = None  # the query's OPT (twisted.names' _OPTHeader)
        self.ecs_reply: Any = None  # twisted.names' _OPTVariableOption
        self.region_label = "none"
        self.type_label = "none"

    def fail(self, rcode: int) -> None:
        self.rcode = rcode
        self.aa = False
        self.answers, self.authority, self.additional = [], [], []
        self.ecs_reply = None

    def build(self) -> None:
        query = self.query
        if len(query.queries) == 1:
            self.type_label = type_label(query.queries[0].type)
        subnet = self._edns()
        if query.opCode != wire.OP_QUERY:
            self.fail(NOTIMP)
            return
        if len(query.queries) != 1:
            raise Malformed(f"{len(query.queries)} questions")
        if self.edns is not None and self.edns.version != 0:
            self.fail(BADVERS)
            return
        question = query.queries[0]
        name = question.name.name.decode("latin-1").lower()
        zone = self.data.zone_of(name)
        if question.cls != wire.IN or zone is None or question.type in (wire.AXFR, wire.IXFR):
            self.fail(REFUSED)
            return
        region, scope = self._region(subnet, question.type)
        self.region_label = region.name
        if subnet is not None:
            self.ecs_reply = subnet.reply(scope)
        self.aa = True
        self._records(question, name, zone, region)

    def _edns(self) -> ClientSubnet | None:
        """Read the query's OPT record (``self.edns``) and its Client Subnet option."""
        opts = [r for r in self.query.additional if r.type == wire.OPT]
        if not opts:
            return None
        if len(opts) > 1:
            raise Malformed("more than one OPT record")
        if opts[0].name.name != b"":
            raise Malformed("OPT record not owned by the root")
        try:
            self.edns = _make(wire._OPTHeader.fromRRHeader, opts[0])
        except Exception as e:
            raise Malformed(f"OPT record: {e}") from None
        subnets = [o for o in self.edns.options or [] if o.code == ECS_CODE]
        if len(subnets) > 1:
            raise Malformed("more than one client subnet option")
        return parse_client_subnet(subnets[0].data) if subnets else None

    def _region(self, subnet: ClientSubnet | None, qtype: int) -> tuple[Region, int]:
        """The querier's region, and the ECS scope to answer with."""
        regions = self.data.regions
        if subnet is not None and subnet.option.srclen > 0 and self._trusted():
            scope = subnet.option.srclen if qtype in _REGION_TYPES else 0
            return regions.match_network(subnet.network), scope
        return regions.match(self.peer), 0

    def _trusted(self) -> bool:
        try:
            peer: IPAddress = ipaddress.ip_address(self.peer)
        except ValueError:
            return False
        if isinstance(peer, ipaddress.IPv6Address) and peer.ipv4_mapped is not None:
            peer = peer.ipv4_mapped
        return any(peer.version == n.version and peer in n for n in self.data.ecs_trusted)

    # -- records -------------------------------------------------------------------------

    def _rr(self, owner: bytes, rtype: int, ttl: int, payload: Any) -> wire.RRHeader:
        return wire.RRHeader(owner, rtype, wire.IN, ttl, payload, auth=True)

    def _soa(self, zone: str, negative: bool = False) -> wire.RRHeader:
        data = self.data
        contact = data.hostmaster or f"hostmaster@{zone}"
        mname = data.nameservers[0].name if data.nameservers else zone
        ttl = min(data.ns_ttl, data.negative_ttl) if negative else data.ns_ttl
        payload = _make(
            wire.Record_SOA,
            mname=mname,
            rname=contact.replace("@", ".", 1),
            serial=data.serial,
            refresh=SOA_REFRESH,
            retry=SOA_RETRY,
            expire=SOA_EXPIRE,
            minimum=data.negative_ttl,
            ttl=ttl,
        )
        return self._rr(zone.encode("ascii"), wire.SOA, ttl, payload)

    def _addresses(self, owner: bytes, addresses: Any, ttl: int, only: int = 0) -> list[Any]:
        out = []
        for address in addresses:
            if address.version == 4 and only in (0, wire.A):
                out.append(self._rr(owner, wire.A, ttl, _make(wire.Record_A, str(address), ttl)))
            elif address.version == 6 and only in (0, wire.AAAA):
                out.append(
                    self._rr(owner, wire.AAAA, ttl, _make(wire.Record_AAAA, str(address), ttl))
                )
        return out

    def _glue(self, names: list[str], zone: str, region: Region, ttl: int) -> list[Any]:
        out = []
        for name in dict.fromkeys(names):
            if self.data.zone_of(name) != zone:
                continue
            host = self.data.host(name, region)
            if host is not None:
                out += self._addresses(name.encode("ascii"), host.addresses, ttl)
        return out

    def _records(self, question: wire.Query, name: str, zone: str, region: Region) -> None:
        data = self.data
        if not data.exists(name, zone):
            self.rcode = NXDOMAIN
            self.authority = [self._soa(zone, negative=True)]
            return
        owner, qtype, apex = question.name.name, question.type, name == zone
        if qtype == wire.ALL_RECORDS:
            hinfo = _make(wire.Record_HINFO, b"RFC8482", b"", data.ttl)
            self.answers = [self._rr(owner, wire.HINFO, data.ttl, hinfo)]
        elif qtype == wire.SOA and apex:
            soa = self._soa(zone)
            self.answers = [self._rr(owner, wire.SOA, soa.ttl, soa.payload)]
        elif qtype == wire.NS and apex:
            self.answers = [
                self._rr(owner, wire.NS, data.ns_ttl, _make(wire.Record_NS, ns.name, data.ns_ttl))
                for ns in data.nameservers
            ]
            names = [ns.name for ns in data.nameservers]
            self.additional = self._glue(names, zone, region, data.ns_ttl)
        elif qtype == wire.MX and apex:
            self.answers = [
                self._rr(
                    owner,
                    wire.MX,
                    data.ttl,
                    _make(wire.Record_MX, mx.preference, mx.host.name, data.ttl),
                )
                for mx in region.mx
            ]
            names = [mx.host.name for mx in region.mx]
            self.additional = self._glue(names, zone, region, data.ttl)
        elif qtype in (wire.A, wire.AAAA):
            host = data.host(name, region)
            if host is not None:
                self.answers = self._addresses(owner, host.addresses, data.ttl, only=qtype)
        if not self.answers:
            self.authority = [self._soa(zone, negative=True)]  # NODATA

    # -- wire ----------------------------------------------------------------------------

    def _message(self, trunc: bool) -> wire.Message:
        query = self.query
        out = wire.Message(
            id=query.id,
            answer=1,
            opCode=query.opCode,
            recDes=query.recDes,
            recAv=0,
            auth=self.aa,
            rCode=self.rcode & 0xF,
            trunc=int(trunc),
            maxSize=0,  # never cut by Twisted: see encode
            checkingDisabled=query.checkingDisabled,
        )
        out.queries = list(query.queries)
        additional: list[Any] = []
        if not trunc:
            out.answers = list(self.answers)
            out.authority = list(self.authority)
            additional += self.additional
        if self.edns is not None:
            options = [self.ecs_reply] if self.ecs_reply is not None else []
            opt = _make(
                wire._OPTHeader,
                udpPayloadSize=self.data.max_udp_size,
                extendedRCODE=self.rcode >> 4,
                version=0,
                dnssecOK=self.edns.dnssecOK,
                options=options,
            )
            additional.append(opt)  # twisted.names encodes it as the OPT pseudo-record
        out.additional = additional
        return out

    def limit(self, udp: bool) -> int:
        """The largest answer this query may get."""
        if not udp:
            return TCP_MAX
        if self.edns is None:
            return UDP_PLAIN
        asked: int = self.edns.udpPayloadSize
        return max(UDP_PLAIN, min(asked, self.data.max_udp_size))

    def encode(self, udp: bool) -> bytes:
        """The answer's bytes: whole, or (too long for ``limit``) with no records and TC=1."""
        packet: bytes = self._message(trunc=False).toStr()
        if len(packet) > self.limit(udp):
            packet = self._message(trunc=True).toStr()
        return packet
