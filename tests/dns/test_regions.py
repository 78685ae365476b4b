"""Region matching (longest prefix, order between equals, default, IPv6, mapped IPv4) and the
zone data built from the config."""

from __future__ import annotations

import ipaddress
from collections.abc import Callable

import pytest

from mailgw.config import Config
from mailgw.dns.regions import MX, Host, Region, RegionMap, ZoneData


def region(name: str, *networks: str) -> Region:
    nets = tuple(ipaddress.ip_network(n) for n in networks)
    return Region(name, nets, (MX(10, Host.make(f"mx.{name}.test", ["192.0.2.1"])),))


DOMESTIC = region("domestic", "10.0.0.0/8", "2001:db8:c::/48", "192.0.2.0/24")
OVERSEAS = region("overseas", "10.9.0.0/16")
SAME = region("same", "192.0.2.0/24")
MAP = RegionMap([DOMESTIC, OVERSEAS, SAME], OVERSEAS)


@pytest.mark.parametrize(
    ("address", "expected"),
    [
        ("10.1.2.3", "domestic"),
        ("10.9.2.3", "overseas"),  # the longer network wins, whatever the order
        ("192.0.2.7", "domestic"),  # equal networks: the region named first
        ("203.0.113.1", "overseas"),  # no network: the default
        ("2001:db8:c::1", "domestic"),
        ("2001:db8:1::1", "overseas"),
        ("::ffff:10.1.2.3", "domestic"),  # a dual-stack socket's IPv4 querier
        ("fe80::1%eth0", "overseas"),  # a scoped address parses
        ("not an address", "overseas"),
    ],
)
def test_match(address: str, expected: str) -> None:
    assert MAP.match(address).name == expected


def test_match_takes_ipaddress_objects_and_networks() -> None:
    assert MAP.match(ipaddress.ip_address("10.0.0.1")) is DOMESTIC
    assert MAP.match_network(ipaddress.ip_network("10.9.0.0/16")) is OVERSEAS
    assert MAP.match_network(ipaddress.ip_network("10.0.0.0/8")) is DOMESTIC


def test_zone_data_from_config(make_config: Callable[[], Config]) -> None:
    data = ZoneData.from_config(make_config(), now=1234.5)
    assert data.serial == 1234
    assert data.zones == ("sub.example.test", "example.test")  # longest first
    assert data.zone_of("a.sub.example.test") == "sub.example.test"
    assert data.zone_of("EXAMPLE.test".lower()) == "example.test"
    assert data.zone_of("badexample.test") is None
    assert data.zone_of("test") is None
    assert [r.name for r in data.regions.regions] == ["domestic", "overseas", "lab"]
    assert data.regions.default.name == "overseas"
    # Two regions with the same /16: the one named first in [dns] regions.
    assert data.regions.match("10.9.1.1").name == "overseas"
    domestic, overseas, lab = data.regions.regions
    assert [(m.preference, m.host.name) for m in domestic.mx] == [
        (10, "mx.example.test"),
        (20, "cn2.example.test"),
    ]
    # A name with region-specific addresses; one only a region gives addresses to.
    mx = data.host("mx.example.test", overseas)
    assert mx is not None and [str(a) for a in mx.addresses] == ["198.51.100.1"]
    cn2 = data.host("cn2.example.test", overseas)
    assert cn2 is not None and [str(a) for a in cn2.addresses] == ["192.0.2.2", "2001:db8::2"]
    ns = data.host("ns1.example.test", lab)
    assert ns is not None and len(ns.addresses) == 2
    assert data.host("nothing.example.test", lab) is None
    assert data.names("example.test") == {
        "example.test",
        "ns1.example.test",
        "mx.example.test",
        "cn2.example.test",
    }
    # lab.mx.sub.example.test makes mx.sub.example.test an empty non-terminal.
    assert data.exists("mx.sub.example.test", "sub.example.test")
    assert not data.exists("other.sub.example.test", "sub.example.test")


def test_default_region_is_the_last_one_when_not_set(make_config: Callable[[str], Config]) -> None:
    from tests.dns.conftest import ZONE_CONFIG

    config = make_config(ZONE_CONFIG.replace("default_region = overseas\n", ""))
    assert ZoneData.from_config(config).regions.default.name == "lab"


def test_a_disabled_role_without_regions_still_builds(make_config: Callable[[str], Config]) -> None:
    data = ZoneData.from_config(make_config(""))
    assert data.zones == () and data.regions.match("10.0.0.1").name == "none"
