"""The http role inside a node: its part, what the collector and /readyz read from the node,
and the admin token file as a start-up check."""

from __future__ import annotations

from pathlib import Path

import pytest
from twisted.internet.task import Clock

from mailgw.config import load
from mailgw.http.root import HTTPRoot
from mailgw.net.listen import ListenerService
from mailgw.service import Node, build_service

HTTP = "[http]\nenabled = yes\nlisten = tcp:0:interface=127.0.0.1\n"


def node(tmp_path: Path, extra: str = "") -> Node:
    path = tmp_path / "mailgw.ini"
    path.write_text(
        f"[server]\ndata_dir = {tmp_path}/data\n[imap]\nworkers = 0\n"
        f"[store]\ntier2_dir = tier2\n{HTTP}{extra}"
    )
    return Node(load(str(path)), Clock())


def test_the_part_reads_the_node(tmp_path: Path) -> None:
    n = node(tmp_path, "[relay]\nenabled = yes\n")
    part = n.parts["http"]
    assert isinstance(part.root, HTTPRoot)
    assert set(part.root.children) == {
        b"healthz",
        b"readyz",
        b"metrics",
        b"api",
        b"auth",
    }  # tracking
    assert [row["name"] for row in part.collector.channels()] == ["direct"]
    families = {f.name: f for f in part.collector.collect()}
    up = families["mailgw_relay_channel_up"].samples
    assert [(s.labels, s.value) for s in up] == [({"channel": "direct"}, 1)]
    names = [f.name for f in part.readiness.folders]
    assert names == ["spool", "store", "tier-2 store"]
    assert part.readiness.folders[0].path == str(tmp_path / "data" / "spool" / "tmp")
    assert part.readiness.min_free == ("percent", 1.0)
    services = n.role_services["http"]
    assert services[0] is part.service
    assert [type(s) for s in services[1:]] == [ListenerService]  # no TLS: no HTTPS listener
    assert part.readiness.role_services() is n.role_services


def test_without_relay_no_channels_and_an_unusable_token_stops_start_up(tmp_path: Path) -> None:
    assert node(tmp_path).parts["http"].collector.channels() == []
    short = tmp_path / "token"
    short.write_text("short\n")
    path = tmp_path / "mailgw.ini"
    path.write_text(
        f"[server]\ndata_dir = {tmp_path}/data\n{HTTP}admin_token_file = token\n"
        "[imap]\nworkers = 0\n"
    )
    with pytest.raises(SystemExit, match=r"mailgw.ini:http:admin_token_file: .*at least 16"):
        build_service(load(str(path)), Clock())


@pytest.mark.parametrize(
    ("value", "message"),
    [("lots", "expected a size"), ("101%", "between 0% and 100%"), ("", "or 0")],
)
def test_min_free_disk_is_checked(tmp_path: Path, value: str, message: str) -> None:
    from mailgw.config import ConfigError

    path = tmp_path / "mailgw.ini"
    path.write_text(f"[http]\nmin_free_disk = {value}\n")
    with pytest.raises(ConfigError, match=message):
        load(str(path))
