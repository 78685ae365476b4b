"""MX resolution against a real DNS server on loopback (dnspython in a thread pool)."""

from __future__ import annotations

import random
from collections.abc import AsyncIterator, Iterator

import pytest
import pytest_twisted
from twisted.internet.defer import maybeDeferred
from twisted.python.threadpool import ThreadPool

from mailgw.relay.mx import (
    MXHost,
    MXResolver,
    NoSuchDomain,
    NullMX,
    TemporaryDNSError,
    address_literal,
    order_by_preference,
    parse_nameserver,
)
from tests.relay.dnsserver import Zone, start_dns
from tests.relay.reactorhelper import reactor, within


@pytest.fixture
def zone() -> Zone:
    z = Zone()
    z.add("example.test", "MX", "10 mx1.example.test.", "20 mx2.example.test.")
    z.add("mx1.example.test", "A", "127.0.0.2")
    z.add("mx2.example.test", "A", "127.0.0.3")
    z.add("mx2.example.test", "AAAA", "::1")
    z.add("implicit.test", "A", "127.0.0.4")
    z.add("implicit.test", "TXT", '"v=spf1 -all"')
    z.add("nullmx.test", "MX", "0 .")
    z.add("noaddr.test", "TXT", '"nothing"')
    z.add("equal.test", "MX", *(f"10 m{i}.equal.test." for i in range(6)))
    for i in range(6):
        z.add(f"m{i}.equal.test", "A", f"127.0.1.{i}")
    z.add("broken.test", "MX", "10 gone.broken.test.", "20 ok.broken.test.")
    z.add("ok.broken.test", "A", "127.0.0.9")
    z.add("allbroken.test", "MX", "10 gone.allbroken.test.")
    z.add("slowhost.test", "MX", "10 slow.test.")
    z.servfail.add("servfail.test")
    z.silent.update({"silent.test", "slow.test"})
    return z


@pytest.fixture
def pool() -> Iterator[ThreadPool]:
    p = ThreadPool(minthreads=1, maxthreads=4, name="mx-test")
    p.start()
    yield p
    p.stop()


@pytest_twisted.async_yield_fixture
async def resolver(zone: Zone, pool: ThreadPool) -> AsyncIterator[MXResolver]:
    port, listeners = start_dns(reactor, zone)
    yield MXResolver(
        reactor, pool, nameservers=[f"127.0.0.1:{port}"], timeout=0.5, rng=random.Random(1)
    )
    for listener in listeners:
        await within(maybeDeferred(listener.stopListening))


@pytest_twisted.ensureDeferred
async def test_mx_hosts_sorted_by_preference_with_addresses(resolver: MXResolver) -> None:
    hosts = await within(resolver.resolve_mx("example.test"))
    assert hosts == [
        MXHost(10, "mx1.example.test", ("127.0.0.2",)),
        MXHost(20, "mx2.example.test", ("127.0.0.3", "::1")),
    ]


@pytest_twisted.ensureDeferred
async def test_ipv6_lookups_can_be_disabled(zone: Zone, pool: ThreadPool) -> None:
    port, listeners = start_dns(reactor, zone)
    try:
        r = MXResolver(reactor, pool, [f"127.0.0.1:{port}"], timeout=0.5, ipv6=False)
        hosts = await within(r.resolve_mx("example.test"))
        assert hosts[1].addresses == ("127.0.0.3",)
        assert ("mx2.example.test", "AAAA") not in zone.queries
    finally:
        for listener in listeners:
            await within(maybeDeferred(listener.stopListening))


@pytest_twisted.ensureDeferred
async def test_no_mx_gives_implicit_mx_from_address(resolver: MXResolver) -> None:
    assert await within(resolver.resolve_mx("implicit.test")) == [
        MXHost(0, "implicit.test", ("127.0.0.4",))
    ]


@pytest_twisted.ensureDeferred
async def test_null_mx_is_a_permanent_nullmx_failure(resolver: MXResolver) -> None:
    with pytest.raises(NullMX) as info:
        await within(resolver.resolve_mx("nullmx.test"))
    assert info.value.permanent and "RFC 7505" in str(info.value)


@pytest_twisted.ensureDeferred
async def test_nxdomain_is_permanent(resolver: MXResolver) -> None:
    with pytest.raises(NoSuchDomain) as info:
        await within(resolver.resolve_mx("nowhere.test"))
    assert info.value.permanent and info.value.domain == "nowhere.test"


@pytest_twisted.ensureDeferred
async def test_no_mx_and_no_address_is_permanent(resolver: MXResolver) -> None:
    with pytest.raises(NoSuchDomain, match="no MX and no address"):
        await within(resolver.resolve_mx("noaddr.test"))


@pytest_twisted.ensureDeferred
async def test_servfail_is_temporary(resolver: MXResolver) -> None:
    with pytest.raises(TemporaryDNSError, match="server failure") as info:
        await within(resolver.resolve_mx("servfail.test"))
    assert not info.value.permanent


@pytest_twisted.ensureDeferred
async def test_timeout_is_temporary(resolver: MXResolver) -> None:
    with pytest.raises(TemporaryDNSError, match="timeout|timed out|lifetime"):
        await within(resolver.resolve_mx("silent.test"))


@pytest_twisted.ensureDeferred
async def test_mx_host_without_address_is_skipped(resolver: MXResolver) -> None:
    assert await within(resolver.resolve_mx("broken.test")) == [
        MXHost(20, "ok.broken.test", ("127.0.0.9",))
    ]


@pytest_twisted.ensureDeferred
async def test_all_mx_hosts_without_address_is_temporary(resolver: MXResolver) -> None:
    with pytest.raises(TemporaryDNSError, match="no MX host has an address"):
        await within(resolver.resolve_mx("allbroken.test"))


@pytest_twisted.ensureDeferred
async def test_mx_host_lookup_timeout_is_temporary(resolver: MXResolver) -> None:
    with pytest.raises(TemporaryDNSError, match="slow.test"):
        await within(resolver.resolve_mx("slowhost.test"))


@pytest_twisted.ensureDeferred
async def test_equal_preferences_come_in_random_order(resolver: MXResolver) -> None:
    orders = set()
    for _ in range(8):
        hosts = await within(resolver.resolve_mx("equal.test"))
        orders.add(tuple(h.name for h in hosts))
    assert len(orders) > 1
    assert all(sorted(o) == [f"m{i}.equal.test" for i in range(6)] for o in orders)


@pytest_twisted.ensureDeferred
async def test_address_literal_bypasses_dns(resolver: MXResolver, zone: Zone) -> None:
    assert await within(resolver.resolve_mx("[192.0.2.1]")) == [
        MXHost(0, "[192.0.2.1]", ("192.0.2.1",))
    ]
    assert (await within(resolver.resolve_mx("[IPv6:2001:db8::1]")))[0].addresses == (
        "2001:db8::1",
    )
    assert zone.queries == []


def test_address_literal_parsing() -> None:
    assert address_literal("[127.0.0.1]") == "127.0.0.1"
    assert address_literal("[IPv6:::1]") == "::1"
    assert address_literal("[not-an-ip]") is None
    assert address_literal("example.test") is None


def test_parse_nameserver() -> None:
    assert parse_nameserver("192.0.2.53") == ("192.0.2.53", 53)
    assert parse_nameserver(" 127.0.0.1:5353 ") == ("127.0.0.1", 5353)
    assert parse_nameserver("[::1]:5300") == ("::1", 5300)
    assert parse_nameserver("[::1]") == ("::1", 53)
    assert parse_nameserver("2001:db8::1") == ("2001:db8::1", 53)
    with pytest.raises(ValueError):
        parse_nameserver("dns.example:53")
    with pytest.raises(ValueError):
        parse_nameserver("127.0.0.1:70000")


def test_order_by_preference_is_stable_by_preference() -> None:
    hosts = [MXHost(30, "c"), MXHost(10, "a"), MXHost(20, "b"), MXHost(10, "a2")]
    ordered = order_by_preference(hosts, random.Random(0))
    assert [h.preference for h in ordered] == [10, 10, 20, 30]


def test_system_resolver_configuration_is_used_without_nameservers(pool: ThreadPool) -> None:
    r = MXResolver(reactor, pool, timeout=2.0, cache=False)
    assert r.resolver.nameservers  # read from /etc/resolv.conf
    assert r.resolver.cache is None
