"""``mailgw quarantine list|show|release|delete`` and ``mailgw policy check`` in-process."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from mailgw.cli.main import main
from mailgw.model import Envelope
from mailgw.policy.quarantine import QuarantineStore
from mailgw.spool import Spool
from mailgw.testing.deferreds import result_of


@pytest.fixture
def config(tmp_path: Path) -> Path:
    path = tmp_path / "mailgw.ini"
    path.write_text(
        "[server]\ndata_dir = data\nhostname = mx.example.test\n"
        "[relay]\nenabled = yes\n[channel:sdn]\n"
    )
    return path


@pytest.fixture
def run(config: Path, capsys: pytest.CaptureFixture[str]) -> Any:
    def run(*args: str) -> tuple[int, str, str]:
        code = main(["--config", str(config), *args])
        out, err = capsys.readouterr()
        return code, out, err

    return run


def quarantine(config: Path, subject: str, direction: str = "inbound") -> str:
    data = config.parent / "data"
    spool = Spool(str(data / "spool"))
    store = QuarantineStore(str(data / "quarantine"))
    incoming = spool.begin()
    incoming.write(f"Subject: {subject}\r\nX-A: 1\r\n\r\nthe body\r\n".encode())
    env = Envelope("s@far.example", ["alice@example.test"], message_class="spam", folder="Junk")
    return result_of(store.put(incoming, env, "looks bad", "rule-x", direction))


def test_list_show_release_delete(config: Path, run: Any) -> None:
    assert run("quarantine", "list") == (0, "0 message(s)\n", "")
    one = quarantine(config, "first")
    two = quarantine(config, "second", "outbound")
    code, out, _ = run("quarantine", "list")
    assert code == 0 and one in out and two in out and "rule=rule-x: looks bad" in out
    code, out, _ = run("quarantine", "list", "--json")
    rows = json.loads(out)
    assert [r["id"] for r in rows] == [one, two] and rows[1]["direction"] == "outbound"
    code, out, _ = run("quarantine", "show", one)
    assert "reason: looks bad" in out and "policy: message_class=spam folder=Junk" in out
    assert "Subject: first" in out and "the body" not in out
    code, out, _ = run("quarantine", "show", one, "--raw")
    assert "the body" in out
    code, out, _ = run("quarantine", "show", one, "--json")
    assert json.loads(out)["envelope"]["folder"] == "Junk"
    code, out, _ = run("quarantine", "release", one)
    assert code == 0 and "to be delivered" in out
    spool = Spool(str(config.parent / "data" / "spool"))
    assert spool.list("deferred") == [one]
    code, out, _ = run("quarantine", "release", two)
    assert "to be relayed" in out
    three = quarantine(config, "third")
    code, out, err = run("quarantine", "delete", three, one)
    assert code == 1 and f"{three}: deleted" in out and "no such quarantined message" in err
    assert run("quarantine", "show", "nonsense")[0] == 1


def test_policy_check(tmp_path: Path, run: Any) -> None:
    rules = tmp_path / "r.txt"
    rules.write_text("rule a\n match all\n action route sdn\n")
    code, out, _ = run("policy", "check", "-v", str(rules))
    assert code == 0 and "1 rule(s) OK" in out and "a [mail] match all -> route sdn" in out
    assert run("policy", "check", "--config-channels", str(rules))[0] == 0
    rules.write_text("rule a\n match all\n action route overseas\n")
    code, _, err = run("policy", "check", "--config-channels", str(rules))
    assert code == 1 and "r.txt:3: route: unknown channel 'overseas'" in err
    assert run("policy", "check", str(tmp_path / "missing"))[0] == 1


def test_policy_check_accepts_a_group_the_directory_lacks_with_a_note(
    tmp_path: Path, run: Any
) -> None:
    rules = tmp_path / "r.txt"
    rules.write_text("rule a\n match group finance Board\n action reject\n")
    # No directory yet: nothing to compare with, no note.
    assert run("policy", "check", str(rules)) == (0, f"{rules}: 1 rule(s) OK\n", "")
    assert run("domain", "add", "example.test")[0] == 0
    assert run("group", "add", "finance")[0] == 0
    code, out, err = run("policy", "check", str(rules))
    assert code == 0 and err == ""
    assert out.splitlines()[1:] == [
        "note: group board is not in the directory (yet): it matches nobody until made"
    ]
    rules.write_text("rule a\n match group fin@nce\n action reject\n")
    code, _, err = run("policy", "check", str(rules))
    assert code == 1 and "r.txt:2: group: bad group name 'fin@nce'" in err
