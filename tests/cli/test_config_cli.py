"""``mailgw config check``, ``mailgw config show [--non-default]`` and ``mailgw reload`` (its
pid file and outcome handling; the real server's side is tests/integration/test_reload.py)."""

from __future__ import annotations

import datetime
import json
import os
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from mailgw.cli.config import (
    MASK,
    Problem,
    check_config,
    data_dir_of,
    effective_config,
    is_secret,
    read_pid,
    reload_server,
)
from mailgw.cli.context import Failure
from mailgw.cli.main import main

GOOD = """\
[server]
data_dir = data
hostname = mx.example.test

[mx]
listen = tcp:2525:interface=127.0.0.1
max_connections_per_ip = 5

[relay]
enabled = yes
default_route = out

[channel:out]
kind = smarthost
hosts = smtp.example.test:587
auth_user = gw
auth_password_file = secret.txt

[route:cn]
recipient_domains = .cn
channels = out
"""

Run = Callable[..., tuple[int, str, str]]


@pytest.fixture
def good(tmp_path: Path) -> Path:
    (tmp_path / "secret.txt").write_text("hunter2\n")
    path = tmp_path / "mailgw.ini"
    path.write_text(GOOD)
    return path


@pytest.fixture
def run(capsys: pytest.CaptureFixture[str]) -> Run:
    def run(config: Path, *args: str) -> tuple[int, str, str]:
        code = main(["--config", str(config), *args])
        out, err = capsys.readouterr()
        return code, out, err

    return run


def certificate(folder: Path, days: int) -> tuple[Path, Path]:
    """A certificate valid until ``days`` from now (negative: expired), and its key."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "mx.example.test")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now + datetime.timedelta(days=min(days, 0) - 30))
        .not_valid_after(now + datetime.timedelta(days=days))
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = folder / f"cert{days}.pem", folder / f"key{days}.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return cert_path, key_path


# -- check -----------------------------------------------------------------------------------


def test_check_good_file_is_silent(good: Path, run: Run) -> None:
    assert run(good, "config", "check") == (0, "", "")


def test_check_bad_value_one_line(good: Path, run: Run) -> None:
    good.write_text(GOOD.replace("max_connections_per_ip = 5", "max_connections_per_ip = lots"))
    code, out, err = run(good, "config", "check")
    assert code == 1
    assert out == (f"{good}: [mx] max_connections_per_ip: expected a whole number, got 'lots'\n")
    assert "1 problem(s)" in err


def test_check_unknown_channel_in_route(good: Path, run: Run) -> None:
    good.write_text(GOOD.replace("channels = out", "channels = nowhere"))
    code, out, _ = run(good, "config", "check")
    assert code == 1 and out == f"{good}: [route:cn] channels: unknown channel 'nowhere'\n"


def test_check_not_an_ini_file(tmp_path: Path, run: Run) -> None:
    path = tmp_path / "bad.ini"
    path.write_text("no section here\n")
    code, out, _ = run(path, "config", "check")
    assert code == 1 and out.startswith(f"{path}: []: not a valid INI file")


def test_check_key_not_matching_certificate(good: Path, tmp_path: Path, run: Run) -> None:
    cert, _ = certificate(tmp_path, 30)
    _, other_key = certificate(tmp_path, 31)
    good.write_text(GOOD + f"\n[tls]\ncertificate = {cert}\nprivate_key = {other_key}\n")
    code, out, _ = run(good, "config", "check")
    assert code == 1 and f"{good}: [tls] private_key: key does not match" in out


def test_check_finds_several_problems(tmp_path: Path, run: Run) -> None:
    cert, key = certificate(tmp_path, -1)
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    (tmp_path / "secret.txt").write_text("x")
    os.chmod(tmp_path / "secret.txt", 0)
    path = tmp_path / "mailgw.ini"
    path.write_text(
        GOOD.replace("data_dir = data", f"data_dir = {blocker}/data")
        + f"\n[tls]\ncertificate = {cert}\nprivate_key = {key}\n"
        "[pop3]\nlisten = tcp:2525:interface=127.0.0.1\n"
    )
    problems = [str(p) for p in check_config(str(path))]
    assert f"{path}: [server] data_dir: {blocker}/data does not exist and cannot be created" in (
        problems
    )
    assert any(p.startswith(f"{path}: [tls] certificate: {cert} expired on ") for p in problems)
    assert (
        f"{path}: [pop3] listen: tcp:2525:interface=127.0.0.1 is also the endpoint of [mx] listen"
        in problems
    )
    if os.geteuid() != 0:  # root reads any file
        assert any("[channel:out] auth_password_file: cannot read" in p for p in problems)
    code, out, _ = run(path, "config", "check")
    assert code == 1 and out.splitlines() == problems


def test_check_data_dir_not_writable(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    data = tmp_path / "data"
    data.mkdir()
    path = tmp_path / "mailgw.ini"
    path.write_text("[server]\ndata_dir = data\n")
    assert check_config(str(path)) == []
    real_access = os.access

    def access(where: object, mode: int) -> bool:  # as an unprivileged user on a 0500 folder
        return False if str(where) == str(data) else real_access(where, mode)  # type: ignore[arg-type]

    monkeypatch.setattr("mailgw.cli.config.os.access", access)
    assert [str(p) for p in check_config(str(path))] == [
        f"{path}: [server] data_dir: {data} is not writable"
    ]


def test_check_not_yet_valid_certificate(tmp_path: Path) -> None:
    cert, key = certificate(tmp_path, 30)
    path = tmp_path / "mailgw.ini"
    path.write_text(
        f"[server]\ndata_dir = data\n[tls]\ncertificate = {cert}\nprivate_key = {key}\n"
    )
    assert check_config(str(path)) == []
    long_ago = datetime.datetime(2000, 1, 1, tzinfo=datetime.UTC).timestamp()
    [problem] = check_config(str(path), now=long_ago)
    assert problem.key == "certificate" and "is not valid before" in problem.message


def test_problem_text() -> None:
    assert str(Problem("/etc/m.ini", "mx", "listen", "bad")) == "/etc/m.ini: [mx] listen: bad"
    assert str(Problem("/etc/m.ini", "x", None, "unknown section")) == (
        "/etc/m.ini: [x]: unknown section"
    )


# -- show ------------------------------------------------------------------------------------


def test_show_prints_every_key_effective(good: Path, run: Run) -> None:
    code, out, _ = run(good, "config", "show")
    assert code == 0
    assert f"[server]\ndata_dir = {good.parent / 'data'}\nhostname = mx.example.test\n" in out
    assert "[imap]\nenabled = yes\n" in out and "workers = auto\n" in out
    assert "max_connections_per_ip = 5\n" in out
    assert "[channel:out]\nkind = smarthost\n" in out
    assert f"auth_password_file = {good.parent / 'secret.txt'}\n" in out
    assert "[route:cn]\nrecipient_domains = .cn\n" in out
    assert "hunter2" not in out


def test_show_non_default(good: Path, run: Run) -> None:
    code, out, _ = run(good, "config", "show", "--non-default")
    assert code == 0
    sections = {name: lines for name, lines in effective_config(str(good), non_default=True)}
    assert list(sections) == ["server", "mx", "relay", "channel:out", "route:cn"]
    assert sections["mx"] == ["listen = tcp:2525:interface=127.0.0.1", "max_connections_per_ip = 5"]
    assert sections["relay"] == ["enabled = yes", "default_route = out"]
    assert "[imap]" not in out and "workers" not in out
    # A key set to its default is not shown (as postconf -n shows only what differs).
    good.write_text(GOOD.replace("max_connections_per_ip = 5", "max_connections_per_ip = 50"))
    _, out, _ = run(good, "config", "show", "--non-default")
    assert "max_connections_per_ip" not in out


def test_show_masks_secrets() -> None:
    assert is_secret("auth_password") and is_secret("admin_token") and is_secret("secret")
    assert not is_secret("auth_password_file") and not is_secret("token_path")
    assert not is_secret("max_connections")
    assert MASK == "********"


def test_show_bad_file_fails(tmp_path: Path, run: Run) -> None:
    path = tmp_path / "m.ini"
    path.write_text("[mx]\nenabled = perhaps\n")
    code, _, err = run(path, "config", "show")
    assert code == 1 and "m.ini:mx:enabled: expected yes or no" in err


# -- reload ----------------------------------------------------------------------------------


@pytest.fixture
def ignoring_hup() -> Iterator[subprocess.Popen[bytes]]:
    """A process that ignores SIGHUP and never answers (a server that does not reload)."""
    code = "import signal, time\nsignal.signal(signal.SIGHUP, signal.SIG_IGN)\nprint('ok', flush=True)\ntime.sleep(60)\n"
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE)
    assert proc.stdout is not None and proc.stdout.readline() == b"ok\n"
    yield proc
    proc.kill()
    proc.wait()
    proc.stdout.close()


def test_read_pid_problems(tmp_path: Path) -> None:
    with pytest.raises(Failure, match="is the server running"):
        read_pid(str(tmp_path / "none.pid"))
    garbage = tmp_path / "garbage.pid"
    garbage.write_text("hello\n")
    with pytest.raises(Failure, match="not a process ID"):
        read_pid(str(garbage))
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    stale = tmp_path / "stale.pid"
    stale.write_text(f"{gone.pid}\n")
    with pytest.raises(Failure, match="stale pid file"):
        read_pid(str(stale))


def test_reload_sends_sighup_and_waits_for_the_outcome(
    tmp_path: Path, ignoring_hup: subprocess.Popen[bytes]
) -> None:
    data = tmp_path / "data"
    data.mkdir()
    (data / "mailgw.pid").write_text(f"{ignoring_hup.pid}\n")
    said: list[str] = []
    reload_server(str(data), timeout=0, say=said.append)
    assert said == [f"sent SIGHUP to {ignoring_hup.pid}"]
    assert ignoring_hup.poll() is None
    # No outcome written: a clear failure after the timeout.
    with pytest.raises(Failure, match="no reload outcome"):
        reload_server(str(data), timeout=0.2, say=said.append)

    # The outcome appears while waiting (as the server writes it): said line by line.
    def outcome(ok: bool) -> Callable[[float], None]:
        def sleep(seconds: float) -> None:
            status = {
                "time": 1.0,
                "pid": ignoring_hup.pid,
                "ok": ok,
                "error": "" if ok else "m.ini:mx:listen: bad",
                "applied": ["[mx] max_connections_per_ip: 50 -> 2"] if ok else [],
                "restart_needed": ["[imap] listen"] if ok else [],
            }
            (data / "reload.json").write_text(json.dumps(status))

        return sleep

    said.clear()
    reload_server(str(data), timeout=5, say=said.append, sleep=outcome(True))
    assert said == [
        f"reloaded (pid {ignoring_hup.pid}): 1 change(s) applied, 1 need a restart",
        "  applied: [mx] max_connections_per_ip: 50 -> 2",
        "  restart needed for [imap] listen",
    ]
    (data / "reload.json").unlink()
    with pytest.raises(Failure, match="reload refused, the running configuration stays: m.ini"):
        reload_server(str(data), timeout=5, say=said.append, sleep=outcome(False))


def test_reload_with_another_pid_file_and_no_wait(
    tmp_path: Path, good: Path, run: Run, ignoring_hup: subprocess.Popen[bytes]
) -> None:
    pid_file = tmp_path / "twistd.pid"
    pid_file.write_text(str(ignoring_hup.pid))
    code, out, _ = run(good, "reload", "--pid-file", str(pid_file), "--no-wait")
    assert code == 0 and out == f"sent SIGHUP to {ignoring_hup.pid}\n"
    code, _, err = run(good, "reload")
    assert code == 1 and "mailgw.pid" in err and "is the server running" in err


def test_data_dir_of_a_file_that_does_not_load(tmp_path: Path) -> None:
    path = tmp_path / "m.ini"
    path.write_text("[server]\ndata_dir = here\n[mx]\nenabled = perhaps\n")
    assert data_dir_of(str(path)) == str(tmp_path / "here")
    path.write_text("[mx]\nenabled = perhaps\n")
    assert data_dir_of(str(path)) == "/var/lib/mailgw"
    path.write_text("garbage")
    with pytest.raises(Failure, match="cannot find"):
        data_dir_of(str(path))


def test_help_names_the_commands(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["reload", "--help"]) == 0
    out = capsys.readouterr().out
    assert "DATA_DIR/mailgw.pid" in out and "--pid-file" in out
    assert main(["config", "--help"]) == 0
    out = capsys.readouterr().out
    assert "check" in out and "show" in out
