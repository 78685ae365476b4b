"""MX resolution for outbound mail: MX hosts with addresses, implicit MX, null MX, literals.

Design choice: the lookups run **dnspython's blocking** ``dns.resolver.Resolver`` in a thread
pool (``deferToThreadPool``), not ``dns.asyncresolver`` (asyncio) nor ``twisted.names``.
dnspython is the resolver the project depends on anyway (SPF/DKIM later), its errors separate
exactly the cases the relay must tell apart (``NXDOMAIN`` → permanent, ``NoAnswer`` → implicit
MX, ``NoNameservers`` (SERVFAIL/REFUSED) and ``LifetimeTimeout`` → temporary), it falls back to
TCP on truncation and follows CNAMEs; a bounded pool keeps the blocking calls off the reactor
thread. Resolver addresses (``host:port``) and the per-query timeout are configurable, so tests
point it at their own DNS server on loopback.
"""

from __future__ import annotations

import ipaddress
import random
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import dns.exception
import dns.name
import dns.nameserver
import dns.rdatatype
import dns.resolver
from twisted.internet.defer import Deferred
from twisted.internet.threads import deferToThreadPool
from twisted.python.threadpool import ThreadPool


@dataclass(frozen=True)
class MXHost:
    """One mail exchanger: MX preference, host name (no trailing dot) and its IP addresses."""

    preference: int
    name: str
    addresses: tuple[str, ...] = field(default=())


class MXError(Exception):
    """A destination could not be resolved; ``permanent`` says whether retrying is useless."""

    permanent = False

    def __init__(self, domain: str, message: str) -> None:
        super().__init__(f"{domain}: {message}")
        self.domain = domain
        self.message = message


class NullMX(MXError):
    """The domain publishes a null MX (RFC 7505): it accepts no mail. Bounce at once."""

    permanent = True


class NoSuchDomain(MXError):
    """NXDOMAIN, or no MX and no address record at all (RFC 5321 5.1): permanent."""

    permanent = True


class TemporaryDNSError(MXError):
    """SERVFAIL, REFUSED, timeout, or MX hosts without resolvable addresses: retry later."""


def parse_nameserver(text: str) -> tuple[str, int]:
    """``"192.0.2.53"``, ``"192.0.2.53:5353"`` or ``"[2001:db8::1]:53"`` → (address, port)."""
    text = text.strip()
    if text.startswith("["):
        host, _, rest = text[1:].partition("]")
        port = int(rest[1:]) if rest.startswith(":") else 53
    elif text.count(":") == 1:
        host, _, port_text = text.partition(":")
        port = int(port_text)
    else:
        host, port = text, 53
    ipaddress.ip_address(host)  # raises ValueError for a non-address
    if not 0 < port < 65536:
        raise ValueError(f"port out of range in {text!r}")
    return host, port


def address_literal(domain: str) -> str | None:
    """The IP of an address literal ``[192.0.2.1]`` / ``[IPv6:2001:db8::1]``, else None."""
    if not (domain.startswith("[") and domain.endswith("]")):
        return None
    inner = domain[1:-1]
    if inner[:5].lower() == "ipv6:":
        inner = inner[5:]
    try:
        return str(ipaddress.ip_address(inner))
    except ValueError:
        return None


def order_by_preference(hosts: Sequence[MXHost], rng: random.Random) -> list[MXHost]:
    """Sort by preference, shuffling hosts of equal preference (RFC 5321 5.1)."""
    shuffled = list(hosts)
    rng.shuffle(shuffled)
    return sorted(shuffled, key=lambda h: h.preference)  # sorted() is stable


class MXResolver:
    """Resolve a recipient domain to an ordered list of ``MXHost`` values.

    ``nameservers``: ``host[:port]`` strings (empty: the system's ``/etc/resolv.conf``);
    ``timeout``: seconds for each query (dnspython's lifetime, retries included);
    ``ipv6``: also look up AAAA records; ``rng``: for the order among equal preferences.
    """

    def __init__(
        self,
        reactor: Any,
        threadpool: ThreadPool,
        nameservers: Sequence[str] = (),
        timeout: float = 10.0,
        ipv6: bool = True,
        rng: random.Random | None = None,
        cache: bool = True,
    ) -> None:
        self.reactor = reactor
        self.threadpool = threadpool
        self.timeout = timeout
        self.ipv6 = ipv6
        self.rng = rng or random.Random()
        if nameservers:
            self.resolver = dns.resolver.Resolver(configure=False)
            self.resolver.nameservers = [
                dns.nameserver.Do53Nameserver(*parse_nameserver(ns)) for ns in nameservers
            ]
        else:
            self.resolver = dns.resolver.Resolver()
        self.resolver.lifetime = timeout
        self.resolver.timeout = timeout
        if cache:
            self.resolver.cache = dns.resolver.Cache()

    def resolve_mx(self, domain: str) -> Deferred[list[MXHost]]:
        """MX hosts for ``domain`` sorted by preference; fails with an ``MXError`` subclass."""
        literal = address_literal(domain)
        if literal is not None:
            d: Deferred[list[MXHost]] = Deferred()
            d.callback([MXHost(0, domain, (literal,))])
            return d
        hosts: Deferred[list[MXHost]] = deferToThreadPool(
            self.reactor, self.threadpool, self._lookup, domain
        )
        return hosts.addCallback(order_by_preference, self.rng)

    def resolve_host(self, name: str) -> Deferred[tuple[str, ...]]:
        """The addresses of a host name (a smarthost), or of an IP literal as it is."""
        try:
            d: Deferred[tuple[str, ...]] = Deferred()
            d.callback((str(ipaddress.ip_address(name.strip("[]"))),))
            return d
        except ValueError:
            pass
        return deferToThreadPool(self.reactor, self.threadpool, self._host_addresses, name)

    def _host_addresses(self, name: str) -> tuple[str, ...]:
        addresses = self._addresses(name, name)
        if not addresses:
            raise NoSuchDomain(name, "host has no address record")
        return addresses

    # -- blocking part, runs in the thread pool ----------------------------------------------

    def _query(self, domain: str, name: str, rdtype: str) -> dns.resolver.Answer | None:
        """One query: the answer, None for NODATA; MXError for NXDOMAIN / failures."""
        try:
            return self.resolver.resolve(
                dns.name.from_text(name), rdtype, search=False, raise_on_no_answer=False
            )
        except dns.resolver.NXDOMAIN:
            raise NoSuchDomain(domain, f"{name}: no such domain (NXDOMAIN)") from None
        except dns.resolver.NoNameservers as e:
            raise TemporaryDNSError(domain, f"{name} {rdtype}: server failure ({e})") from None
        except dns.exception.Timeout:
            raise TemporaryDNSError(domain, f"{name} {rdtype}: DNS timeout") from None
        except dns.exception.DNSException as e:
            raise TemporaryDNSError(domain, f"{name} {rdtype}: {e}") from None

    def _addresses(self, domain: str, name: str) -> tuple[str, ...]:
        found: list[str] = []
        for rdtype in ("A", "AAAA") if self.ipv6 else ("A",):
            answer = self._query(domain, name, rdtype)
            if answer is not None and answer.rrset is not None:
                found.extend(sorted(r.address for r in answer.rrset))
        return tuple(found)

    def _lookup(self, domain: str) -> list[MXHost]:
        answer = self._query(domain, domain, "MX")
        records = list(answer.rrset) if answer is not None and answer.rrset is not None else []
        if not records:
            # RFC 5321 5.1: no MX → the domain itself is the implicit MX (preference 0).
            addresses = self._addresses(domain, domain)
            if not addresses:
                raise NoSuchDomain(domain, "no MX and no address record")
            return [MXHost(0, domain, addresses)]
        if any(r.exchange == dns.name.root for r in records):
            raise NullMX(domain, "domain does not accept mail (null MX, RFC 7505)")
        hosts: list[MXHost] = []
        temporary: MXError | None = None
        for r in records:
            name = r.exchange.to_text(omit_final_dot=True).lower()
            try:
                addresses = self._addresses(domain, name)
            except NoSuchDomain:
                continue  # a broken MX host among others: skip it
            except TemporaryDNSError as e:
                temporary = e
                continue
            if addresses:
                hosts.append(MXHost(int(r.preference), name, addresses))
        if not hosts:
            if temporary is not None:
                raise temporary
            raise TemporaryDNSError(domain, "no MX host has an address")
        return hosts
