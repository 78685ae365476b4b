"""The [antivirus] and [inbound_auth] keys: defaults and `file:section:key: what is wrong`."""

from __future__ import annotations

from pathlib import Path

import pytest

from mailgw.config import ConfigError, load


def write(tmp_path: Path, text: str) -> str:
    path = tmp_path / "mailgw.ini"
    path.write_text(text)
    return str(path)


def test_defaults(tmp_path: Path) -> None:
    config = load(write(tmp_path, ""))
    av, ia = config.antivirus, config.inbound_auth
    assert (av.enabled, av.servers, av.on_failure, av.timeout) == (
        False,
        ("127.0.0.1:3310",),
        "tempfail",
        30.0,
    )
    assert av.max_scan_size == 25 * 1024 * 1024
    assert (ia.enabled, ia.authserv_id, ia.resolvers, ia.dnsbl) == (False, "", (), ())
    assert (ia.junk_score, ia.quarantine_score, ia.reject_score) == (3, 6, 10)


def test_values(tmp_path: Path) -> None:
    config = load(
        write(
            tmp_path,
            "[antivirus]\nenabled = yes\nservers = 10.0.0.1:3310 [::1]:3310 unix:/run/c.ctl\n"
            "on_failure = accept\n[inbound_auth]\nenabled = yes\ndnsbl = Zen.Example.ORG. bl.test\n"
            "resolvers = 127.0.0.1:5353\nreject_score = 0\n",
        )
    )
    assert config.antivirus.servers == ("10.0.0.1:3310", "[::1]:3310", "unix:/run/c.ctl")
    assert config.antivirus.on_failure == "accept"
    assert config.inbound_auth.dnsbl == ("zen.example.org", "bl.test")
    assert config.inbound_auth.resolvers == ("127.0.0.1:5353",)
    assert config.inbound_auth.reject_score == 0


@pytest.mark.parametrize(
    ("text", "where"),
    [
        ("[antivirus]\nservers = clamd\n", "antivirus:servers"),
        ("[antivirus]\nservers = ::1:3310\n", "antivirus:servers"),
        ("[antivirus]\nservers = unix:relative.sock\n", "antivirus:servers"),
        ("[antivirus]\nservers = 127.0.0.1:70000\n", "antivirus:servers"),
        ("[antivirus]\nservers =\n", "antivirus:servers"),
        ("[antivirus]\non_failure = ignore\n", "antivirus:on_failure"),
        ("[inbound_auth]\ndnsbl = bad..zone\n", "inbound_auth:dnsbl"),
        ("[inbound_auth]\ndnsbl = a/b\n", "inbound_auth:dnsbl"),
        ("[inbound_auth]\nresolvers = dns.example\n", "inbound_auth:resolvers"),
        ("[inbound_auth]\njunk_score = -1\n", "inbound_auth:junk_score"),
    ],
)
def test_bad_values(tmp_path: Path, text: str, where: str) -> None:
    with pytest.raises(ConfigError) as info:
        load(write(tmp_path, text))
    assert f"mailgw.ini:{where}: " in str(info.value)
