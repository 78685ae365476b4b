"""etc/systemd/mailgw.service: `systemd-analyze verify` accepts it without a complaint (when
systemd is installed), its ExecStart is a command line twistd and the plugin accept, and it
has the sandbox and privilege settings docs/operations.md promises."""

from __future__ import annotations

import shlex
import shutil
import subprocess
from pathlib import Path

import pytest

from mailgw.testing.server import REPO, TWISTD

pytestmark = pytest.mark.deploy

UNIT = REPO / "etc" / "systemd" / "mailgw.service"


def parse_unit(text: str) -> dict[str, dict[str, list[str]]]:
    """systemd's unit syntax: [Section], Key=Value (a key may repeat), # and ; comments,
    backslash continuation lines."""
    sections: dict[str, dict[str, list[str]]] = {}
    current: dict[str, list[str]] | None = None
    pending = ""
    for raw in text.splitlines():
        line = pending + raw.strip()
        pending = ""
        if line.endswith("\\"):
            pending = line[:-1].rstrip() + " "
            continue
        if not line or line[0] in "#;":
            continue
        if line.startswith("[") and line.endswith("]"):
            current = sections.setdefault(line[1:-1], {})
            continue
        assert current is not None, f"key outside a section: {line!r}"
        key, sep, value = line.partition("=")
        assert sep, f"not Key=Value: {line!r}"
        current.setdefault(key.strip(), []).append(value.strip())
    return sections


def test_parse_unit_reads_what_systemd_reads() -> None:
    parsed = parse_unit("# c\n[A]\nK=1\nK=2\n; c\nL=a \\\n  b\n[B]\nM=\n")
    assert parsed == {"A": {"K": ["1", "2"], "L": ["a b"]}, "B": {"M": [""]}}


def one(section: dict[str, list[str]], key: str) -> str:
    values = section.get(key)
    assert values is not None and len(values) == 1, f"{key}: {values}"
    return values[0]


def test_unit_sandbox_and_privileges() -> None:
    unit = parse_unit(UNIT.read_text())
    service = unit["Service"]
    assert one(service, "User") == "mailgw"
    assert one(service, "Group") == "mailgw"
    assert one(service, "Restart") == "on-failure"
    assert one(service, "CapabilityBoundingSet") == "CAP_NET_BIND_SERVICE"
    assert one(service, "AmbientCapabilities") == "CAP_NET_BIND_SERVICE"
    for key in ("NoNewPrivileges", "ProtectHome", "PrivateTmp", "PrivateDevices"):
        assert one(service, key) == "yes", key
    assert one(service, "ProtectSystem") == "strict"
    # The data directory is the one writable place, and systemd creates it for mailgw.
    assert one(service, "StateDirectory") == "mailgw"
    assert "/var/lib/mailgw" in one(service, "ReadWritePaths").split()
    assert unit["Install"]["WantedBy"] == ["multi-user.target"]


def test_exec_start_is_a_twistd_command_line_the_plugin_accepts() -> None:
    from twisted.scripts.twistd import ServerOptions

    service = parse_unit(UNIT.read_text())["Service"]
    argv = shlex.split(one(service, "ExecStart"))
    assert argv[0] == "/opt/mailgw/bin/twistd"
    options = ServerOptions()
    options.parseOptions(argv[1:])
    assert options["nodaemon"] and options["logfile"] == "-" and options["pidfile"] == ""
    assert options.subCommand == "mailgw"
    assert options.subOptions["config"] == "/etc/mailgw/mailgw.ini"
    assert options["uid"] is None  # User= runs it as mailgw from the start: no switch


@pytest.mark.skipif(not shutil.which("systemd-analyze"), reason="systemd-analyze not installed")
def test_systemd_analyze_verify_is_silent(tmp_path: Path) -> None:
    # verify checks that ExecStart's program exists: point it at this environment's twistd.
    text = UNIT.read_text().replace("/opt/mailgw/bin/twistd", TWISTD)
    copy = tmp_path / "mailgw.service"
    copy.write_text(text)
    result = subprocess.run(
        ["systemd-analyze", "verify", "--man=no", str(copy)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    # An unknown or misspelt key is only a warning (exit 0): any line about the unit fails.
    about_unit = [
        line for line in (result.stdout + result.stderr).splitlines() if "mailgw.service" in line
    ]
    assert result.returncode == 0 and about_unit == [], result.stdout + result.stderr
