"""The node's rules check is always there and takes new rules on a reload (SIGHUP, a pushed
unified config); a rules file with an error refuses the reload."""

from __future__ import annotations

from pathlib import Path

import pytest
from twisted.internet.task import Clock

from mailgw.config import ConfigError, load
from mailgw.config.reload import ReloadableConfig
from mailgw.policy.pipeline import Stage
from mailgw.policy.setup import build_policy
from mailgw.testing.fakes import FakeDirectory


def test_rules_are_replaced_on_reload_and_a_bad_file_is_refused(tmp_path: Path) -> None:
    ini = tmp_path / "mailgw.ini"
    ini.write_text(f"[server]\ndata_dir = {tmp_path / 'data'}\n")
    config = load(str(ini))
    setup = build_policy(config, FakeDirectory(domains=["example.test"]), Clock())
    assert setup.rules is not None and setup.rules.rules == ()
    assert setup.rules in setup.inbound and setup.rules in setup.outbound
    assert {Stage.MAIL, Stage.RCPT, Stage.DATA} <= setup.rules.stages  # every stage
    settings = ReloadableConfig(config)
    settings.subscribe(setup.reconfigure, setup.check)
    rules = tmp_path / "rules.txt"
    rules.write_text("rule a\n    match sender x@y.test\n    action reject\n")
    ini.write_text(ini.read_text() + "[policy]\nrules_file = rules.txt\n")
    result = settings.reload()
    assert result.ok and not result.restart
    assert [r.name for r in setup.rules.rules] == ["a"]
    rules.write_text("rule b\n    match sendr x\n    action reject\n")
    result = settings.reload()
    assert "rules.txt:2" in result.error
    assert [r.name for r in setup.rules.rules] == ["a"]  # the running rules stay
    with pytest.raises(ConfigError):
        setup.check(load(str(ini)))
