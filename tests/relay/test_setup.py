"""[relay], [channel:NAME], [route:NAME], [submission] config and the relay built from it."""

from __future__ import annotations

from pathlib import Path

import pytest
from twisted.internet.task import Clock

from mailgw.config import ConfigError, load
from mailgw.relay.channels import MessageRoute
from mailgw.relay.setup import build_channels, build_relay, build_router
from mailgw.spool import Spool

GOOD = """
[server]
data_dir = state
[relay]
enabled = yes
resolvers = 127.0.0.1:5353 [::1]:53 192.0.2.1
retry_schedule = 1m, 5m
max_age = 2h
default_route = overseas, sdn
channel_failure_patterns = greylisted; \\bpoor reputation\\b
[channel:domestic]
source_addresses = 127.0.0.4
helo = cn.example.test
rate = 120
[channel:overseas]
source_addresses = 127.0.0.2
weight = 2
[channel:sdn]
kind = smarthost
hosts = 127.0.0.3:2525
tls = require
auth_user = relay
auth_password_file = sdn.pw
[channel:spam]
[route:spam]
message_class = spam
channels = spam
[route:domestic]
recipient_domains = .cn qq.com
channels = domestic; overseas, sdn
"""


def write(tmp_path: Path, text: str) -> str:
    path = tmp_path / "mailgw.ini"
    path.write_text(text)
    return str(path)


def test_channels_routes_and_relay_settings(tmp_path: Path) -> None:
    (tmp_path / "sdn.pw").write_text("s3cret\n")
    config = load(write(tmp_path, GOOD))
    assert config.relay.enabled and config.relay.max_age == 7200
    assert config.relay.retry_schedule == ("1m", "5m")
    assert [c.name for c in config.channels] == ["domestic", "overseas", "sdn", "spam"]
    assert config.channels[2].auth_password_file == str(tmp_path / "sdn.pw")
    channels = build_channels(config)
    assert channels[2].auth == ("relay", "s3cret") and channels[2].tls == "require"
    assert channels[0].rate_per_minute == 120 and channels[1].weight == 2
    router = build_router(config, channels)
    assert router.eligible(MessageRoute("qq.com")) == ["domestic", "overseas", "sdn"]
    assert router.eligible(MessageRoute("mail.qq.com")) == ["overseas", "sdn"]
    assert router.eligible(MessageRoute("a.b.cn"))[0] == "domestic"
    assert router.eligible(MessageRoute("x.cn", message_class="spam")) == ["spam"]
    spool = Spool(str(tmp_path / "spool"))
    relay = build_relay(config, spool, Clock(), run=lambda f, *a: None)  # type: ignore[arg-type,return-value]
    assert relay.schedule.delays == (60.0, 300.0) and relay.schedule.max_age == 7200
    assert relay.classifier(__import__("mailgw.model").model.Reply(550, "", "greylisted")) == (
        "channel_failure"
    )
    assert relay.settings.status_path == str(tmp_path / "state" / "relay" / "channels.json")
    spool.close()


def test_no_channels_gives_one_direct_channel(tmp_path: Path) -> None:
    config = load(write(tmp_path, "[relay]\nenabled = yes\n"))
    channels = build_channels(config)
    assert [c.name for c in channels] == ["direct"]
    assert build_router(config, channels).eligible(MessageRoute("a.example")) == ["direct"]
    assert not config.submission.enabled


@pytest.mark.parametrize(
    ("text", "where", "message"),
    [
        ("[channel:a]\nkind = carrier-pigeon\n", "channel:a:kind", "expected direct or smarthost"),
        ("[channel:a]\ncolour = red\n", "channel:a:colour", "unknown key"),
        ("[channel:a b]\n", "channel:a b", "NAME may use"),
        ("[channel:a]\nkind = smarthost\n", "channel:a:hosts", "needs hosts"),
        ("[channel:a]\nsource_addresses = here\n", "channel:a:source_addresses", "not an IP"),
        ("[channel:a]\nauth_user = x\n", "channel:a:auth_user", "go together"),
        ("[channel:a]\ntls = maybe\n", "channel:a:tls", "expected may or require or none"),
        ("[channel:a]\nrate = -1\n", "channel:a:rate", ">= 0"),
        ("[channel:a]\nburst = x\n", "channel:a:burst", "whole number"),
        ("[channel:a]\n[route:r]\nchannels = b\n", "route:r:channels", "unknown channel 'b'"),
        ("[route:r]\nrecipient_domains = .cn\n", "route:r:channels", "needs channels"),
        ("[route:r]\nchannels = ;\n", "route:r:channels", "expected channel names"),
        ("[relay]\ndefault_route = nowhere\n", "relay:default_route", "unknown channel"),
        ("[relay]\nresolvers = dns.example\n", "relay:resolvers", "not an address"),
        ("[relay]\nresolvers = 127.0.0.1:99999\n", "relay:resolvers", "not an address"),
        ("[relay]\nretry_schedule = 5m 0s\n", "relay:retry_schedule", "must be positive"),
        ("[relay]\nretry_schedule =\n", "relay:retry_schedule", "at least one"),
        ("[relay]\nretry_window_percent = 101\n", "relay:retry_window_percent", "1..100"),
        ("[relay]\nmx_port = 70000\n", "relay:mx_port", "out of range"),
        ("[relay]\nchannel_failure_patterns = (\n", "relay:channel_failure_patterns", "bad"),
        ("[submission]\nlisten = bogus:1\n", "submission:listen", ""),
        ("[bogus:x]\n", "bogus:x", "unknown section"),
    ],
)
def test_errors_name_file_section_key(tmp_path: Path, text: str, where: str, message: str) -> None:
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as info:
        load(path)
    assert str(info.value).startswith(f"{path}:{where}: ")
    assert message in str(info.value)


def test_unreadable_password_file(tmp_path: Path) -> None:
    text = "[channel:a]\nkind = smarthost\nhosts = h\nauth_user = u\nauth_password_file = nope\n"
    config = load(write(tmp_path, text))
    with pytest.raises(ConfigError, match="channel:a:auth_password_file: cannot read"):
        build_channels(config)
