"""tap/service: options, default config path, composition of roles, start-up errors."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from twisted.application.service import MultiService
from twisted.internet.task import Clock

from mailgw import tap
from mailgw.config import load
from mailgw.net.listen import ListenerService
from mailgw.service import Node, build_service


def write_config(tmp_path: Path, extra: str = "") -> str:
    path = tmp_path / "mailgw.ini"
    path.write_text(
        f"[server]\ndata_dir = {tmp_path}/data\n"
        "[mx]\nlisten = tcp:0:interface=127.0.0.1\n"
        "[pop3]\nlisten = tcp:0:interface=127.0.0.1\nlisten_tls = tcp:0:interface=127.0.0.1\n"
        + extra
    )
    return str(path)


def test_default_config_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MAILGW_CONFIG", raising=False)
    assert tap.default_config_path() == "/etc/mailgw/mailgw.ini"
    (tmp_path / "etc").mkdir()
    (tmp_path / "etc" / "mailgw.ini").write_text("")
    assert tap.default_config_path() == os.path.join("etc", "mailgw.ini")
    monkeypatch.setenv("MAILGW_CONFIG", "/x/y.ini")
    assert tap.default_config_path() == "/x/y.ini"
    options = tap.Options()
    options.parseOptions([])
    assert options["config"] == "/x/y.ini"


def test_make_service_reports_config_errors_without_traceback(tmp_path: Path) -> None:
    path = tmp_path / "bad.ini"
    path.write_text("[mx]\nenabled = perhaps\n")
    options = tap.Options()
    options.parseOptions(["--config", str(path)])
    with pytest.raises(SystemExit, match=r"bad.ini:mx:enabled: expected yes or no"):
        tap.makeService(options)


def listeners(node: Node) -> list[str]:
    """The listeners of the node, also those of a child MultiService (the IMAP worker pool
    owns the IMAP listeners so that it stops the workers before closing them)."""
    out = []
    for s in node:
        if isinstance(s, ListenerService):
            out.append(s.name)
        elif isinstance(s, MultiService):
            out.extend(c.name for c in s if isinstance(c, ListenerService))
    return out


def test_roles_and_listeners_follow_the_config(tmp_path: Path) -> None:
    node = Node(load(write_config(tmp_path)), Clock())
    names = listeners(node)
    assert len(names) == 3  # mx + pop3 + imap; no POP3S/IMAPS without a certificate
    assert node.getServiceNamed("delivery") is node.delivery


def test_tls_adds_the_implicit_tls_listener(tmp_path: Path, selfsigned: tuple[Path, Path]) -> None:
    cert, key = selfsigned
    config = load(write_config(tmp_path, f"[tls]\ncertificate = {cert}\nprivate_key = {key}\n"))
    node = Node(config, Clock())
    assert any("listen_tls" in name for name in listeners(node))
    assert node.tls_options is not None


def test_roles_can_be_switched_off(tmp_path: Path) -> None:
    path = tmp_path / "off.ini"
    path.write_text(
        f"[server]\ndata_dir = {tmp_path}/data\n[mx]\nenabled = no\n[pop3]\nenabled = no\n"
        "[imap]\nenabled = no\n[delivery]\nenabled = no\n"
    )
    node = Node(load(str(path)), Clock())
    assert listeners(node) == []
    assert node.delivery is None


def test_unwritable_data_dir_stops_startup(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    path = tmp_path / "m.ini"
    path.write_text(f"[server]\ndata_dir = {blocker}/data\n")
    with pytest.raises(SystemExit, match=r"m.ini:server:data_dir: cannot create"):
        build_service(load(str(path)), Clock())
