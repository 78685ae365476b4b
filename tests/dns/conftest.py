"""Shared pieces of the smart DNS unit tests: a config file with three regions."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from mailgw.config import Config, load

ZONE_CONFIG = """
[dns]
enabled = yes
zones = example.test sub.example.test
nameservers = ns1.example.test=192.0.2.53,2001:db8::53 ns.other.example
regions = domestic overseas lab
default_region = overseas
ecs_trusted = 127.0.0.4/32 ::1
ttl = 60
ns_ttl = 1h
negative_ttl = 30
[dns_region:domestic]
networks = 10.0.0.0/8 127.0.0.1/32 2001:db8:c::/48
mx = mx.example.test=192.0.2.1 20:cn2.example.test=192.0.2.2,2001:db8::2
[dns_region:overseas]
networks = 10.9.0.0/16 127.0.0.2/32
mx = mx.example.test=198.51.100.1 30:cn2.example.test
[dns_region:lab]
networks = 10.9.0.0/16
mx = 5:lab.mx.sub.example.test=203.0.113.5
"""


@pytest.fixture
def make_config(tmp_path: Path) -> Callable[[str], Config]:
    def make(text: str = ZONE_CONFIG) -> Config:
        path = tmp_path / "mailgw.ini"
        path.write_text(f"[server]\ndata_dir = {tmp_path}/data\n" + text)
        return load(str(path))

    return make
