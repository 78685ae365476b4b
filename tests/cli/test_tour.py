"""The README tour keeps `make test` green: step 6 writes the untracked etc/local.ini (which
`make run`, twistd and `mailgw` then prefer), and `mailgw cert selfsigned` prints exactly the
config fragment the README shows, which works appended to that file."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from mailgw import tap
from mailgw.cli.main import default_config_path, main
from mailgw.config import load

REPO = Path(__file__).resolve().parents[2]


def readme_step6() -> str:
    text = (REPO / "README.md").read_text()
    return text[text.index("# 6. TLS") : text.index("```", text.index("# 6. TLS"))]


def test_readme_shows_what_cert_selfsigned_prints(tmp_path: Path) -> None:
    step = readme_step6()
    shown = [
        line.removeprefix("#      ") for line in step.splitlines() if line.startswith("#      ")
    ]
    assert shown, step
    printf = re.search(r"^printf '(.*)' > etc/local\.ini$", step, re.M)
    command = re.search(r"^\.venv/bin/mailgw (cert selfsigned .*) >> etc/local\.ini$", step, re.M)
    assert printf and command, step
    # Run the step in a fresh checkout-like folder: etc/, no config but the one it writes.
    (tmp_path / "etc").mkdir()
    local = tmp_path / "etc" / "local.ini"
    local.write_text(printf.group(1).encode().decode("unicode_escape"))
    done = subprocess.run(
        [sys.executable, "-m", "mailgw.cli", *command.group(1).split()],
        cwd=tmp_path,
        env={**os.environ, "PYTHONPATH": str(REPO)},
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    printed = done.stdout.splitlines()
    folder = tmp_path / "var" / "tls"
    expected = [line.replace("/.../var/tls", str(folder)) for line in shown]
    assert printed == expected
    with local.open("a") as f:
        f.write(done.stdout)
    config = load(str(local))  # checks the certificate and key belong together
    assert config.tls_enabled
    assert config.tls.certificate == str(folder / "mailgw.crt")
    assert config.tls.private_key == str(folder / "mailgw.key")
    assert config.server.data_dir == str(tmp_path / "var")  # the same state as make run's


def test_local_config_is_preferred_and_untracked(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MAILGW_CONFIG", raising=False)
    (tmp_path / "etc").mkdir()
    (tmp_path / "etc" / "mailgw.ini").write_text("")
    assert default_config_path() == tap.default_config_path() == os.path.join("etc", "mailgw.ini")
    (tmp_path / "etc" / "local.ini").write_text("")
    assert default_config_path() == tap.default_config_path() == os.path.join("etc", "local.ini")
    monkeypatch.setenv("MAILGW_CONFIG", "/x/y.ini")
    assert default_config_path() == tap.default_config_path() == "/x/y.ini"
    assert "etc/local.ini" in (REPO / ".gitignore").read_text().splitlines()


def test_make_run_uses_the_local_config_when_there_is_one(tmp_path: Path) -> None:
    for name in ("Makefile", "setup.cfg", "pyproject.toml"):
        (tmp_path / name).write_bytes((REPO / name).read_bytes())
    (tmp_path / "etc").mkdir()

    def run_command() -> str:
        # Not as a sub-make of `make test`: no inherited MAKEFLAGS, no directory lines.
        env = {k: v for k, v in os.environ.items() if k not in ("MAKEFLAGS", "MFLAGS", "MAKELEVEL")}
        done = subprocess.run(
            ["make", "--no-print-directory", "-n", "run", "VENV=venv"],
            cwd=tmp_path,
            env=env,
            capture_output=True,
            text=True,
            timeout=30,
            check=True,
        )
        return done.stdout.splitlines()[-1]

    assert run_command() == "venv/bin/twistd --pidfile= -n mailgw --config etc/mailgw.ini"
    (tmp_path / "etc" / "local.ini").write_text("")
    assert run_command() == "venv/bin/twistd --pidfile= -n mailgw --config etc/local.ini"


def test_local_config_keeps_the_shipped_values(tmp_path: Path) -> None:
    """etc/local.ini of the tour sets data_dir only (and [tls]): every other key then has the
    value etc/mailgw.ini ships, because that file documents the defaults."""
    (tmp_path / "etc").mkdir()
    local = tmp_path / "etc" / "local.ini"
    local.write_text("[server]\ndata_dir = ../var\n")
    shipped = load(str(REPO / "etc" / "mailgw.ini"))
    mine = load(str(local))
    for name in vars(shipped):
        if name in ("path", "server"):
            continue
        assert getattr(mine, name) == getattr(shipped, name), name
    assert mine.server.hostname == shipped.server.hostname


def test_cert_selfsigned_then_run_main(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = tmp_path / "local.ini"
    config.write_text("[server]\ndata_dir = data\n\n")
    assert main(["--config", str(config), "cert", "selfsigned", "--hostname", "mx.test"]) == 0
    with config.open("a") as f:
        f.write(capsys.readouterr().out)
    assert load(str(config)).tls_enabled
