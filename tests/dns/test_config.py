"""[dns] and [dns_region:NAME]: parsing, `file:section:key: what is wrong` errors, and which
keys a reload applies while running."""

from __future__ import annotations

from collections.abc import Callable

import pytest

from mailgw.config import Config, ConfigError
from mailgw.config.reload import classify
from mailgw.config.schema import parse_udp_listen
from tests.dns.conftest import ZONE_CONFIG


def test_parsed_values(make_config: Callable[[str], Config]) -> None:
    config = make_config(ZONE_CONFIG)
    dns = config.dns
    assert dns.zones == ("example.test", "sub.example.test")
    assert dns.nameservers == (
        ("ns1.example.test", ("192.0.2.53", "2001:db8::53")),
        ("ns.other.example", ()),
    )
    assert (dns.ttl, dns.ns_ttl, dns.negative_ttl) == (60, 3600, 30)
    regions = {r.name: r for r in config.dns_regions}
    assert regions["domestic"].mx == (
        (10, "mx.example.test", ("192.0.2.1",)),
        (20, "cn2.example.test", ("192.0.2.2", "2001:db8::2")),
    )
    assert [str(n) for n in regions["overseas"].networks] == ["10.9.0.0/16", "127.0.0.2/32"]


def test_names_are_lowered_and_lose_the_final_dot(make_config: Callable[[str], Config]) -> None:
    config = make_config(ZONE_CONFIG.replace("zones = example.test", "zones = Example.TEST."))
    assert config.dns.zones[0] == "example.test"


@pytest.mark.parametrize(
    ("text", "where", "message"),
    [
        ("[dns]\nenabled = yes\n", "dns:zones", "needed when [dns] enabled"),
        ("[dns]\nenabled = yes\nzones = a.test\n", "dns:nameservers", "needed"),
        (
            "[dns]\nenabled = yes\nzones = a.test\nnameservers = ns.a.test\n",
            "dns:regions",
            "needed",
        ),
        ("[dns]\nzones = a..test\n", "dns:zones", "not a DNS name"),
        ("[dns]\nzones = -a.test\n", "dns:zones", "not a DNS name"),
        ("[dns]\nnameservers = ns.a.test=1.2.3\n", "dns:nameservers", "not an IP address"),
        ("[dns]\nlisten = udp:99999\n", "dns:listen", "expected udp:PORT"),
        ("[dns]\nlisten = udp:53:interface=nowhere\n", "dns:listen", "not an IP address"),
        ("[dns]\nlisten = sctp:53\n", "dns:listen", "expected udp:... or tcp:..."),
        ("[dns]\nlisten = tcp:port\n", "dns:listen", "invalid endpoint"),
        ("[dns]\nregions = a a\n", "dns:regions", "named twice"),
        ("[dns]\nregions = a/b\n", "dns:regions", "letters, digits"),
        ("[dns]\nregions = a\n", "dns:regions", "no [dns_region:a] section"),
        (
            "[dns]\nregions = a\n[dns_region:a]\nmx = m.test\n[dns_region:b]\nmx = m.test\n",
            "dns_region:b",
            "not named in [dns] regions",
        ),
        (
            "[dns]\nregions = a\n[dns_region:a]\nnetworks = 10.0.0.0/8\n",
            "dns_region:a:mx",
            "needs MX",
        ),
        ("[dns]\nregions = a\n[dns_region:a]\nmx = 70000:m.test\n", "dns_region:a:mx", "above"),
        (
            "[dns]\nregions = a\n[dns_region:a]\nnetworks = x\nmx = m.test\n",
            "dns_region:a:networks",
            "not an IP",
        ),
        (
            "[dns]\nregions = a\n[dns_region:a]\nmx = m.test\nbogus = 1\n",
            "dns_region:a:bogus",
            "unknown key",
        ),
        (
            "[dns]\nregions = a\ndefault_region = b\n[dns_region:a]\nmx = m.test\n",
            "dns:default_region",
            "not named in [dns] regions",
        ),
        ("[dns]\nhostmaster = a.b@example.test\n", "dns:hostmaster", "expected an address"),
        ("[dns]\nttl = soon\n", "dns:ttl", "expected a duration"),
    ],
)
def test_errors(make_config: Callable[[str], Config], text: str, where: str, message: str) -> None:
    with pytest.raises(ConfigError) as info:
        make_config(text)
    assert f"mailgw.ini:{where}: " in str(info.value)
    assert message in str(info.value)


def test_udp_listen_descriptions() -> None:
    assert parse_udp_listen("udp:53") == (53, "")
    assert parse_udp_listen("udp:8053:interface=127.0.0.1") == (8053, "127.0.0.1")
    assert parse_udp_listen("udp:8053:interface=::1") == (8053, "::1")
    assert parse_udp_listen("udp:8053:interface=[::1]") == (8053, "::1")
    with pytest.raises(ValueError):
        parse_udp_listen("udp:53:backlog=5")


def test_reload_applies_everything_but_enabled_and_listen(
    make_config: Callable[[str], Config],
) -> None:
    old = make_config(ZONE_CONFIG)
    changed = (
        ZONE_CONFIG.replace("ttl = 60", "ttl = 30")
        .replace("zones = example.test", "zones = example.org example.test")
        .replace("mx = 5:lab", "mx = 7:lab")
        .replace("default_region = overseas", "default_region = lab")
        .replace("enabled = yes", "enabled = yes\nmax_connections = 5\nidle_timeout = 1s")
    )
    applied, restart = classify(old, make_config(changed))
    assert not restart
    assert {c.where for c in applied} == {
        "[dns] ttl",
        "[dns] zones",
        "[dns] default_region",
        "[dns] max_connections",
        "[dns] idle_timeout",
        "[dns_region:lab] mx",
    }
    # A new region (and its section) applies too; the listeners need a restart.
    more = changed.replace("regions = domestic overseas lab", "regions = domestic overseas lab x")
    more += "[dns_region:x]\nmx = x.example.test\n"
    more = more.replace("enabled = yes", "enabled = yes\nlisten = udp:5353", 1)
    applied, restart = classify(old, make_config(more))
    assert {c.where for c in restart} == {"[dns] listen"}
    assert "[dns_region:x]" in {c.where for c in applied}
