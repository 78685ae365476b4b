"""The rules file re-read on reload: ``PolicySetup.check``/``reconfigure`` and
``RulesCheck.replace``."""

from __future__ import annotations

from pathlib import Path

import pytest
from twisted.internet.task import Clock

from mailgw.config import ConfigError, load
from mailgw.policy.pipeline import Stage
from mailgw.policy.rules import RulesCheck, parse_rules
from mailgw.policy.setup import build_policy
from mailgw.testing.fakes import FakeDirectory

FIRST = 'rule a\n    match subject A\n    action reject 550 5.7.1 "a"\n'
SECOND = 'rule b\n    match sender x@y.test\n    action reject 550 5.7.1 "b"\n'


def test_reload_replaces_the_rules_or_refuses_a_bad_file(tmp_path: Path) -> None:
    rules = tmp_path / "rules.txt"
    rules.write_text(FIRST)
    ini = tmp_path / "mailgw.ini"
    ini.write_text(f"[server]\ndata_dir = {tmp_path}/data\n[policy]\nrules_file = {rules}\n")
    config = load(str(ini))
    setup = build_policy(config, FakeDirectory(), Clock())
    check = setup.rules
    assert check is not None and [r.name for r in check.rules] == ["a"]
    assert check.stages == frozenset(Stage)  # any rule may come with a reload
    rules.write_text(SECOND)  # a MAIL-stage rule
    setup.check(config)
    setup.reconfigure(config)
    assert [r.name for r in check.rules] == ["b"]
    rules.write_text("rule broken\n")
    with pytest.raises(ConfigError, match="rules_file"):
        setup.check(config)
    assert [r.name for r in check.rules] == ["b"]


def test_replace_refuses_stages_a_plain_check_is_not_called_at() -> None:
    check = RulesCheck(parse_rules(FIRST), lambda d: True)
    assert check.stages == {Stage.DATA}
    with pytest.raises(ValueError, match="restart"):
        check.replace(parse_rules(SECOND))
    check.replace(parse_rules(FIRST.replace("rule a", "rule c")))
    assert [r.name for r in check.rules] == ["c"]
