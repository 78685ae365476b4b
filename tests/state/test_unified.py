"""The unified configuration: what may be pushed, the validation before publishing
(``mailgw config push``), the overlay a node applies, its last-good copy on disk, and the
follower applying, refusing and reporting versions (embedded state, ``mailgw config
status|rollback`` through the command)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from twisted.internet.task import Clock

from mailgw.cli.context import Failure
from mailgw.cli.main import main
from mailgw.cli.unified import build_version
from mailgw.config import load
from mailgw.config.reload import ReloadableConfig
from mailgw.state.embedded import EmbeddedState
from mailgw.state.unified import (
    BundleError,
    ConfigFollower,
    check_pushable,
    overlay_for,
    read_applied,
    read_bundle,
    read_fragment,
    startup_config,
)

RULES = 'rule block\n    match sender bad@spam.test\n    action reject 550 5.7.1 "no"\n'


@pytest.fixture
def node_config(tmp_path: Path) -> Path:
    path = tmp_path / "mailgw.ini"
    path.write_text(
        f"[server]\ndata_dir = {tmp_path / 'data'}\n"
        "[channel:sdn]\nkind = smarthost\nhosts = 127.0.0.1:2525\n"
    )
    return path


def policy(tmp_path: Path, ini: str, rules: str | None = RULES) -> Path:
    folder = tmp_path / "push"
    folder.mkdir(exist_ok=True)
    if rules is not None:
        (folder / "rules.txt").write_text(rules)
        ini = "[policy]\nrules_file = rules.txt\n" + ini
    path = folder / "policy.ini"
    path.write_text(ini)
    return path


@pytest.mark.parametrize(
    ("ini", "message"),
    [
        ("[server]\nhostname = x\n", "[server] cannot be pushed"),
        ("[mx]\nlisten = tcp:25\n", "[mx] listen cannot be pushed"),
        ("[policy]\nmax_parts = 3\n", "[policy] max_parts cannot be pushed"),
        ("[relay\n", "not a valid INI file"),
    ],
)
def test_what_cannot_be_pushed(ini: str, message: str) -> None:
    with pytest.raises(BundleError, match=message.replace("[", r"\[").replace("]", r"\]")):
        check_pushable(read_fragment(ini, "p.ini"), "p.ini")


def test_channels_routes_limits_and_lockout_can_be_pushed() -> None:
    check_pushable(
        read_fragment(
            "[channel:new]\nhosts = 10.0.0.1\n[route:r]\nrecipient_domains = *\nchannels = new\n[relay]\nwindow = 5\n"
            "[mx]\nmax_message_size = 10M\n[submission]\nmax_messages_per_hour = 5\n"
            "[directory]\nauth_lockout_failures = 4\n",
            "p.ini",
        ),
        "p.ini",
    )


def test_a_valid_policy_becomes_a_version(node_config: Path, tmp_path: Path) -> None:
    config = load(str(node_config))
    blob, summary = build_version(config, str(policy(tmp_path, "[mx]\nmax_errors = 3\n")))
    bundle = read_bundle(blob)
    assert bundle["rules"] == RULES
    assert "rules_file" not in bundle["ini"] and "max_errors = 3" in bundle["ini"]
    assert summary == "1 section(s), 1 rule(s)"
    overlay = overlay_for(bundle, "/x/rules-v1.txt")
    assert "rules_file = /x/rules-v1.txt" in overlay


@pytest.mark.parametrize(
    ("ini", "rules", "message"),
    [
        ("", "rule x\n    match sendr a@b\n    action reject\n", "rules.txt:2: unknown match"),
        ("", "rule x\n    match all\n    action route nowhere\n", "nowhere"),
        ("[mx]\nmax_errors = many\n", None, "mx:max_errors"),
        ("[route:r]\nrecipient_domains = *\nchannels = missing\n", None, "missing"),
    ],
)
def test_an_invalid_policy_is_refused(
    node_config: Path, tmp_path: Path, ini: str, rules: str | None, message: str
) -> None:
    config = load(str(node_config))
    with pytest.raises(Failure, match="nothing published") as e:
        build_version(config, str(policy(tmp_path, ini, rules)))
    assert message in str(e.value)


def test_push_status_rollback_on_the_embedded_state(
    node_config: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    c = ["--config", str(node_config)]
    assert main([*c, "config", "status"]) == 0
    assert "none published" in capsys.readouterr().out
    assert main([*c, "config", "rollback"]) == 1
    assert "no previous version" in capsys.readouterr().err
    p = str(policy(tmp_path, ""))
    assert main([*c, "config", "push", "--dry-run", p]) == 0
    assert "not published" in capsys.readouterr().out
    assert main([*c, "config", "push", p]) == 0
    assert "published v1 (0 section(s), 1 rule(s)) to embedded" in capsys.readouterr().out
    assert main([*c, "config", "push", p]) == 0
    assert main([*c, "config", "rollback"]) == 0
    assert "v1 is current again" in capsys.readouterr().out
    assert main([*c, "config", "status", "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == {"current": 1, "nodes": {}}


class FakeResult:
    def __init__(self, error: str = "") -> None:
        self.error = error
        self.ok = not error


def test_the_follower_applies_keeps_and_reports_versions(node_config: Path, tmp_path: Path) -> None:
    config = load(str(node_config))
    data = config.server.data_dir
    state = EmbeddedState(data)
    settings = ReloadableConfig(config)
    follower = ConfigFollower(state, settings, lambda: settings.reload(), data, "gw1", Clock())
    follower.check()
    reports = state.config_nodes().result
    assert json.loads(reports["gw1"])["applied"] == 0
    blob, _ = build_version(config, str(policy(tmp_path, "[mx]\nmax_errors = 3\n")))
    state.config_publish(blob)
    follower.check()
    assert follower.version == 1
    assert settings.current.mx.max_errors == 3
    assert settings.current.policy.rules_file.endswith("cluster/rules-v1.txt")
    assert read_applied(data) == (1, follower.overlay)
    assert json.loads(state.config_nodes().result["gw1"])["applied"] == 1
    # A node starting later (Redis down or not) starts with v1 from disk.
    again, version, overlay = startup_config(config)
    assert version == 1 and again.mx.max_errors == 3 and overlay == follower.overlay
    # A version this node refuses (its file no longer fits): v1 stays, the refusal reported.
    state.config_publish(b'{"format": 1, "ini": "[mx]\\nmax_errors = x\\n", "rules": null}')
    follower.check()
    assert follower.version == 1 and settings.current.mx.max_errors == 3
    report = json.loads(state.config_nodes().result["gw1"])
    assert report["applied"] == 1 and report["latest_seen"] == 2 and "max_errors" in report["error"]
    # Garbage in the state is refused the same way.
    state.config_publish(b"not json")
    follower.check()
    assert follower.version == 1
    assert "not a config version" in json.loads(state.config_nodes().result["gw1"])["error"]


def test_a_last_good_version_that_no_longer_fits_is_ignored_at_start(
    node_config: Path,
) -> None:
    config = load(str(node_config))
    folder = Path(config.server.data_dir) / "cluster"
    folder.mkdir(parents=True)
    (folder / "applied.json").write_text(json.dumps({"version": 4, "overlay": "[mx]\nx = 1\n"}))
    same, version, overlay = startup_config(config)
    assert version == 0 and overlay == "" and same is config
    (folder / "applied.json").write_text("{broken")
    assert startup_config(config)[1] == 0


def test_follower_load_reads_the_file_with_the_overlay(node_config: Path) -> None:
    config = load(str(node_config))
    settings = ReloadableConfig(config)
    follower: Any = ConfigFollower(
        EmbeddedState(config.server.data_dir), settings, lambda: FakeResult(), "", "n", Clock()
    )
    follower.overlay = "[mx]\nmax_errors = 7\n"
    assert settings.loader(str(node_config)).mx.max_errors == 7


def test_push_with_redis_unreachable_fails_and_says_so(
    node_config: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    import os
    import subprocess
    import sys

    from mailgw.testing.server import REPO, free_port

    port = free_port()  # nothing listens there
    node_config.write_text(
        node_config.read_text() + f"[state]\nbackend = redis\nredis = 127.0.0.1:{port}\n"
    )
    # In a process of its own: the command runs (and stops) the global reactor.
    result = subprocess.run(
        [sys.executable, "-m", "mailgw.cli", "--config", str(node_config), "config", "push"]
        + [str(policy(tmp_path, ""))],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")},
    )
    assert result.returncode == 1
    assert f"no answer from Redis (127.0.0.1:{port}) in 3s: nothing done" in result.stderr
