"""mailgw.config.reload: diffing two configs, which changes need a restart, the running config
kept for those, and ReloadableConfig's refusal / check / apply branches."""

from __future__ import annotations

from pathlib import Path

from twisted.logger import capturedLogs, formatEvent

from mailgw.config import Config, ConfigError, load
from mailgw.config.reload import (
    RELOADABLE,
    Change,
    ReloadableConfig,
    classify,
    diff,
    needs_restart,
    running_config,
    show_value,
)

BASE = """
[server]
data_dir = data
hostname = mx.example.test
[mx]
listen = tcp:0:interface=127.0.0.1
max_connections_per_ip = 50
[relay]
enabled = yes
default_route = a
[channel:a]
weight = 1
[channel:b]
weight = 2
[route:cn]
recipient_domains = .cn
channels = a; b
"""


def write(tmp_path: Path, text: str, name: str = "mailgw.ini") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def configs(tmp_path: Path, old: str, new: str) -> tuple[Config, Config]:
    return load(str(write(tmp_path, old, "old.ini"))), load(str(write(tmp_path, new, "new.ini")))


def test_no_change_no_diff(tmp_path: Path) -> None:
    a, b = configs(tmp_path, BASE, BASE)
    assert diff(a, b) == []


def test_diff_names_plain_keys_and_prefixed_sections(tmp_path: Path) -> None:
    new = (
        BASE.replace("max_connections_per_ip = 50", "max_connections_per_ip = 2")
        .replace("[channel:b]\nweight = 2", "[channel:b]\nweight = 3\n[channel:c]\nweight = 1")
        .replace("[route:cn]\nrecipient_domains = .cn\nchannels = a; b\n", "")
    )
    a, b = configs(tmp_path, BASE, new)
    changes = diff(a, b)
    described = [c.describe() for c in changes]
    assert "[mx] max_connections_per_ip: 50 -> 2" in described
    assert "[channel:b] weight: 2 -> 3" in described
    assert "[channel:c] added" in described
    assert "[route:cn] removed" in described
    assert len(changes) == 4
    assert all(not needs_restart(c) for c in changes)


def test_restart_keys_are_named_and_kept_at_running_values(tmp_path: Path) -> None:
    new = BASE.replace("tcp:0:interface=127.0.0.1", "tcp:0:interface=127.0.0.2").replace(
        "hostname = mx.example.test", "hostname = other.example.test"
    )
    new = new.replace("max_connections_per_ip = 50", "max_connections_per_ip = 7")
    a, b = configs(tmp_path, BASE, new)
    applied, restart = classify(a, b)
    assert [c.where for c in restart] == ["[server] hostname", "[mx] listen"]
    assert [c.where for c in applied] == ["[mx] max_connections_per_ip"]
    running = running_config(b, restart)
    assert running.mx.listen == a.mx.listen
    assert running.server.hostname == "mx.example.test"
    assert running.mx.max_connections_per_ip == 7
    # Reloading the same file again names the restart keys again.
    again_applied, again_restart = classify(running, b)
    assert again_applied == [] and [c.where for c in again_restart] == [
        "[server] hostname",
        "[mx] listen",
    ]


def test_tls_on_or_off_needs_a_restart(tmp_path: Path, selfsigned: tuple[Path, Path]) -> None:
    cert, key = selfsigned
    with_tls = BASE + f"[tls]\ncertificate = {cert}\nprivate_key = {key}\n"
    a, b = configs(tmp_path, BASE, with_tls)
    applied, restart = classify(a, b)
    assert applied == [] and {c.key for c in restart} == {"certificate", "private_key"}
    assert running_config(b, restart).tls_enabled is False
    # Another certificate file while TLS stays on: applied.
    both = tmp_path / "both.pem"
    both.write_bytes(cert.read_bytes() + key.read_bytes())
    a, b = configs(tmp_path, with_tls, BASE + f"[tls]\ncertificate = {both}\n")
    applied, restart = classify(a, b)
    assert [c.where for c in applied] == ["[tls] certificate", "[tls] private_key"]
    assert restart == []


def test_unknown_section_kind_needs_restart() -> None:
    assert needs_restart(Change("somerole", "anything", 1, 2))
    assert needs_restart(Change("thing:x", None, None, object()))
    assert not needs_restart(Change("channel:x", None, None, object()))
    assert not needs_restart(Change("directory", "auth_failure_delay", 1.0, 2.0))
    assert "listen" not in RELOADABLE["imap"] and "workers" not in RELOADABLE["imap"]


def test_show_value() -> None:
    assert show_value(True) == "yes" and show_value(False) == "no"
    assert show_value(("a", "b")) == "a b" and show_value(()) == "(empty)"
    assert show_value(None) == "(empty)" and show_value("") == "(empty)"
    assert show_value(2.5) == "2.5"


def test_reload_applies_and_logs(tmp_path: Path) -> None:
    path = write(tmp_path, BASE)
    settings = ReloadableConfig(load(str(path)))
    seen: list[Config] = []
    settings.subscribe(seen.append)
    path.write_text(BASE.replace("max_connections_per_ip = 50", "max_connections_per_ip = 3"))
    with capturedLogs() as events:
        result = settings.reload()
    assert result.ok and [c.where for c in result.applied] == ["[mx] max_connections_per_ip"]
    assert seen == [settings.current] and settings.current.mx.max_connections_per_ip == 3
    text = [formatEvent(e) for e in events]
    assert "reload: [mx] max_connections_per_ip: 50 -> 3" in text
    assert any("1 change(s) applied, 0 need a restart" in t for t in text)
    assert result.as_dict() == {
        "ok": True,
        "error": "",
        "applied": ["[mx] max_connections_per_ip: 50 -> 3"],
        "restart_needed": [],
    }


def test_invalid_file_is_refused_as_a_whole(tmp_path: Path) -> None:
    path = write(tmp_path, BASE)
    settings = ReloadableConfig(load(str(path)))
    before = settings.current
    seen: list[Config] = []
    settings.subscribe(seen.append)
    path.write_text(BASE.replace("max_connections_per_ip = 50", "max_connections_per_ip = x"))
    with capturedLogs() as events:
        result = settings.reload()
    assert not result.ok and "max_connections_per_ip" in result.error
    assert settings.current is before and seen == []
    assert any("reload refused, the running configuration stays" in formatEvent(e) for e in events)
    assert result.as_dict()["ok"] is False


def test_a_check_refuses_before_anything_applies(tmp_path: Path) -> None:
    path = write(tmp_path, BASE)
    settings = ReloadableConfig(load(str(path)))
    before = settings.current
    applied: list[str] = []

    def refuse(config: Config) -> None:
        raise ConfigError(config.path, "tls", "certificate", "no PEM certificate")

    settings.subscribe(lambda config: applied.append("first"))
    settings.subscribe(lambda config: applied.append("second"), refuse)
    path.write_text(BASE.replace("weight = 2", "weight = 5"))
    result = settings.reload()
    assert not result.ok and "tls:certificate: no PEM certificate" in result.error
    assert applied == [] and settings.current is before


def test_a_failing_part_does_not_stop_the_others(tmp_path: Path) -> None:
    path = write(tmp_path, BASE)
    settings = ReloadableConfig(load(str(path)))
    told: list[str] = []

    def broken(config: Config) -> None:
        raise RuntimeError("boom")

    settings.subscribe(broken)
    settings.subscribe(lambda config: told.append("after"))
    with capturedLogs() as events:
        result = settings.reload()
    assert result.ok and told == ["after"]
    assert any("applying the new config failed" in formatEvent(e) for e in events)


def test_loader_is_replaceable(tmp_path: Path) -> None:
    path = write(tmp_path, BASE)
    config = load(str(path))

    def loader(p: str) -> Config:
        raise ConfigError(p, "-", None, "cannot read config file: gone")

    result = ReloadableConfig(config, loader).reload(label="imap worker 1")
    assert "cannot read config file" in result.error
