"""The wheel as an administrator installs it: built from the checkout, installed into a fresh
venv outside the source tree, `twistd -n mailgw` run from there, one message in and out.

Offline: the wheel is built with this environment's setuptools (``--no-build-isolation``,
``--no-index``) and installed with ``--no-deps``; the new venv gets the dependencies (Twisted
and the rest, never mailgw) from this environment's site-packages through a ``.pth`` line,
which adds the folder without running the ``.pth`` files in it (so the editable install's
path to the checkout is not added). The test checks that mailgw, its plugin and its admin
command come from the new venv, not from the checkout.
"""

from __future__ import annotations

import imaplib
import os
import shutil
import site
import smtplib
import subprocess
import sys
import sysconfig
import time
import zipfile
from pathlib import Path

import pytest

from mailgw.testing.server import REPO, MailgwServer

pytestmark = pytest.mark.deploy

PASSWORD = "wheel password"
SKIP_COPY = shutil.ignore_patterns(
    ".git",
    ".venv",
    "var",
    "build",
    "dist",
    "*.egg-info",
    "__pycache__",
    ".pytest_cache",
    ".mypy_cache",
    ".ruff_cache",
    ".coverage*",
    "htmlcov",
)


def clean_env(**extra: str) -> dict[str, str]:
    """This environment without what would point a child at the checkout or at coverage."""
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV", "PYTHONSTARTUP")
        and not k.startswith(("COVERAGE_", "COV_CORE_"))
    }
    env.update(extra)
    return env


def run(cmd: list[str], cwd: Path, env: dict[str, str], timeout: float = 300) -> str:
    result = subprocess.run(
        cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout, check=False
    )
    assert result.returncode == 0, (
        f"{cmd} exited {result.returncode}:\n{result.stdout}{result.stderr}"
    )
    return result.stdout


def build_wheel(work: Path) -> Path:
    """The wheel of a copy of the checkout (so the build leaves nothing in it), with a stale
    ``twisted/plugins/dropin.cache`` there as twistd leaves one in a work tree."""
    import setuptools

    major, minor = (int(part) for part in setuptools.__version__.split(".")[:2])
    assert (major, minor) >= (70, 1), (
        f"setuptools {setuptools.__version__} cannot build the wheel offline: the [test] extra"
        " asks for >= 70.1 (make test reinstalls .venv when setup.cfg changes)"
    )
    src = work / "src"
    shutil.copytree(REPO, src, ignore=SKIP_COPY)
    (src / "twisted" / "plugins" / "dropin.cache").write_bytes(b"stale cache of a work tree\n")
    dist = work / "dist"
    run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "--no-index",
            "--wheel-dir",
            str(dist),
            str(src),
        ],
        cwd=work,
        env=clean_env(),
    )
    (wheel,) = dist.glob("mailgw-*.whl")
    return wheel


def test_wheel_ships_the_plugin_and_every_module(tmp_path: Path) -> None:
    wheel = build_wheel(tmp_path)
    names = set(zipfile.ZipFile(wheel).namelist())
    assert "twisted/plugins/mailgw_plugin.py" in names
    twisted_files = sorted(n for n in names if n.startswith("twisted/"))
    assert twisted_files == ["twisted/plugins/mailgw_plugin.py"]  # no __init__.py, no cache
    assert not [n for n in names if n.endswith("dropin.cache")]
    modules = {p.relative_to(REPO).as_posix() for p in (REPO / "mailgw").rglob("*.py")}
    assert modules - names == set()
    entry_points = next(n for n in names if n.endswith(".dist-info/entry_points.txt"))
    assert "mailgw = mailgw.cli.main:main" in zipfile.ZipFile(wheel).read(entry_points).decode()


def make_venv(work: Path, wheel: Path) -> Path:
    """A fresh venv with the wheel installed (no pip inside: this environment's pip installs
    into it), the dependencies visible through a .pth line, and a twistd script like the one
    pip writes for Twisted."""
    venv = work / "venv"
    run([sys.executable, "-m", "venv", "--without-pip", str(venv)], cwd=work, env=clean_env())
    python = venv / "bin" / "python"
    purelib = Path(
        subprocess.check_output(
            [str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
            text=True,
            env=clean_env(),
            cwd=work,
        ).strip()
    )
    ours = {sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]}
    ours.update(p for p in site.getsitepackages() if p.startswith(sys.prefix))
    (purelib / "zz-mailgw-test-deps.pth").write_text("".join(f"{p}\n" for p in sorted(ours)))
    run(
        [
            sys.executable,
            "-m",
            "pip",
            "--python",
            str(python),
            "install",
            "--no-deps",
            "--no-index",
            str(wheel),
        ],
        cwd=work,
        env=clean_env(),
    )
    twistd = venv / "bin" / "twistd"
    twistd.write_text(
        f"#!{python}\nimport sys\nfrom twisted.scripts.twistd import run\nsys.exit(run())\n"
    )
    twistd.chmod(0o755)
    return venv


def test_installed_wheel_serves_mail_from_outside_the_checkout(tmp_path: Path) -> None:
    wheel = build_wheel(tmp_path)
    venv = make_venv(tmp_path, wheel)
    bin_dir = venv / "bin"
    here = tmp_path / "elsewhere"
    here.mkdir()
    env = clean_env(PATH=f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}")

    where = run(
        [
            str(bin_dir / "python"),
            "-c",
            "import sys, mailgw, mailgw.tap, twisted\n"
            "print(mailgw.__file__)\nprint(twisted.__file__)\nprint('\\n'.join(sys.path))",
        ],
        cwd=here,
        env=env,
    ).splitlines()
    assert Path(where[0]).is_relative_to(venv), where[0]
    assert not Path(where[1]).is_relative_to(venv)  # a dependency, through the .pth line
    assert str(REPO) not in where[2:]

    usage = run([str(bin_dir / "mailgw"), "--help"], cwd=here, env=env)
    assert "domain" in usage and "user" in usage
    listing = run([str(bin_dir / "twistd"), "--help"], cwd=here, env=env)
    assert "mailgw" in listing

    server = MailgwServer(
        tmp_path / "node",
        launcher=[str(bin_dir / "twistd")],
        env=env,
        cwd=here,
        cli=[str(bin_dir / "mailgw")],
    )
    server.cli("domain", "add", "example.test")
    server.cli("user", "add", "alice@example.test", "--password", PASSWORD)
    server.start()
    try:
        with smtplib.SMTP("127.0.0.1", server.ports["mx"], timeout=30) as smtp:
            smtp.sendmail(
                "bob@elsewhere.test",
                ["alice@example.test"],
                b"From: bob@elsewhere.test\r\nSubject: from the wheel\r\n\r\nInstalled body.\r\n",
            )
        imap = imaplib.IMAP4("127.0.0.1", server.ports["imap"], timeout=30)
        try:
            imap.login("alice@example.test", PASSWORD)
            body = b""
            for _ in range(200):  # delivery is asynchronous after the 250
                imap.select("INBOX")
                typ, data = imap.fetch("1", "(BODY.PEEK[])")
                if typ == "OK" and data and isinstance(data[0], tuple):
                    body = data[0][1]
                    break
                imap.close()
                time.sleep(0.1)
            assert b"Subject: from the wheel" in body
            assert b"Installed body." in body
        finally:
            imap.logout()
    finally:
        server.stop()
    log = server.log()
    assert "Traceback" not in log, log[-3000:]
