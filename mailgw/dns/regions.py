"""The smart DNS zone data from the config, and which region a querier's address is in."""

from __future__ import annotations

import functools
import ipaddress
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from mailgw.config import Config

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
Network = ipaddress.IPv4Network | ipaddress.IPv6Network


@dataclass(frozen=True)
class Host:
    """A name we answer A/AAAA for (an MX gateway, a name server) and its addresses."""

    name: str
    addresses: tuple[IPAddress, ...]

    @classmethod
    def make(cls, name: str, addresses: Iterable[str]) -> Host:
        return cls(name, tuple(ipaddress.ip_address(a) for a in addresses))


@dataclass(frozen=True)
class MX:
    """One MX record of a region: preference and gateway host."""

    preference: int
    host: Host


@dataclass(frozen=True)
class Region:
    """A region: the querier networks in it and the MX gateways it is answered."""

    name: str
    networks: tuple[Network, ...]
    mx: tuple[MX, ...]

    def host(self, name: str) -> Host | None:
        """This region's gateway called ``name``, if it has one."""
        for record in self.mx:
            if record.host.name == name:
                return record.host
        return None


def _plain(address: IPAddress) -> IPAddress:
    """An IPv4-mapped IPv6 address (``::ffff:192.0.2.1``, a dual-stack socket) as IPv4."""
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address


class RegionMap:
    """Which region an address is in: the region of the longest configured network holding
    it (a /24 listed for *overseas* inside a /8 listed for *domestic* is overseas); between
    equal networks, the region named first; no network: the default region."""

    def __init__(self, regions: Sequence[Region], default: Region) -> None:
        self.regions = tuple(regions)
        self.default = default
        order = {r.name: i for i, r in enumerate(self.regions)}
        entries = [(net, r) for r in self.regions for net in r.networks]
        entries.sort(key=lambda e: (-e[0].prefixlen, order[e[1].name]))
        self._entries = entries

    def match(self, address: IPAddress | str) -> Region:
        """The region of ``address`` (text or ``ipaddress``); an unparsable one: default."""
        if isinstance(address, str):
            try:
                address = ipaddress.ip_address(address.split("%", 1)[0])
            except ValueError:
                return self.default
        address = _plain(address)
        for network, region in self._entries:
            if address.version == network.version and address in network:
                return region
        return self.default

    def match_network(self, network: Network) -> Region:
        """The region of a client subnet (EDNS Client Subnet): the region of its first
        address; a /0 subnet carries no information (the caller answers by the querier)."""
        return self.match(network.network_address)


@dataclass(frozen=True)
class ZoneData:
    """Everything the responder answers from: see ``from_config``."""

    zones: tuple[str, ...]
    """Zone apexes, longest first (so a zone inside another one is found first)."""
    nameservers: tuple[Host, ...]
    regions: RegionMap
    hostmaster: str
    serial: int
    ttl: int
    ns_ttl: int
    negative_ttl: int
    max_udp_size: int
    ecs_trusted: tuple[Network, ...]

    @classmethod
    def from_config(cls, config: Config, now: float | None = None) -> ZoneData:
        """The zone data of ``config``'s ``[dns]`` and ``[dns_region:*]``; the SOA serial is
        the time the config was (re)loaded, so it grows on every reload."""
        dns = config.dns
        sections = {r.name: r for r in config.dns_regions}
        regions = [
            Region(
                name,
                sections[name].networks,
                tuple(MX(pref, Host.make(host, addrs)) for pref, host, addrs in sections[name].mx),
            )
            for name in dns.regions
            if name in sections
        ]
        if not regions:  # a disabled role with no regions: answers nothing but REFUSED
            regions = [Region("none", (), ())]
        by_name = {r.name: r for r in regions}
        default = by_name.get(dns.default_region, regions[-1])
        return cls(
            zones=tuple(sorted(dns.zones, key=len, reverse=True)),
            nameservers=tuple(Host.make(name, addrs) for name, addrs in dns.nameservers),
            regions=RegionMap(regions, default),
            hostmaster=dns.hostmaster,
            serial=int(time.time() if now is None else now) & 0xFFFFFFFF,
            ttl=dns.ttl,
            ns_ttl=dns.ns_ttl,
            negative_ttl=dns.negative_ttl,
            max_udp_size=dns.max_udp_size,
            ecs_trusted=dns.ecs_trusted,
        )

    def zone_of(self, name: str) -> str | None:
        """The zone ``name`` (lower case, no trailing dot) is in, or None."""
        for zone in self.zones:
            if name == zone or name.endswith("." + zone):
                return zone
        return None

    def names(self, zone: str) -> set[str]:
        """The names that own records in ``zone``: the apex, in-zone name servers and MX
        gateways (of any region); not those of a zone inside it."""
        out = {zone}
        hosts = [h.name for h in self.nameservers]
        hosts += [mx.host.name for r in self.regions.regions for mx in r.mx]
        out.update(h for h in hosts if self.zone_of(h) == zone)
        return out

    @functools.cached_property
    def _nodes(self) -> frozenset[str]:
        """Every node of every zone: names owning records and the names between them and
        their apex (empty non-terminals); computed once per zone data."""
        out: set[str] = set()
        for zone in self.zones:
            for name in self.names(zone):
                while name != zone:
                    out.add(name)
                    name = name.partition(".")[2]
                out.add(zone)
        return frozenset(out)

    def exists(self, name: str, zone: str) -> bool:
        """Whether ``name`` is a node of ``zone``: it owns records, or a name below it does
        (an empty non-terminal: NODATA, not NXDOMAIN)."""
        return self.zone_of(name) == zone and name in self._nodes

    def host(self, name: str, region: Region) -> Host | None:
        """The addresses answered for ``name`` to a querier in ``region``: the region's own
        gateway of that name; else the first region's (a gateway name answers the same
        everywhere unless regions give it different addresses); else a name server's. A
        gateway or name server listed without addresses gives none (it is out of our zones,
        or another region gives it addresses)."""
        for candidate in (region, *self.regions.regions):
            found = candidate.host(name)
            if found is not None and found.addresses:
                return found
        for ns in self.nameservers:
            if ns.name == name and ns.addresses:
                return ns
        return None
