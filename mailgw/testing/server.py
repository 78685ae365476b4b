"""Run a real `twistd -n mailgw` on free loopback ports for integration tests and benchmarks."""

from __future__ import annotations

import os
import random
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
# The real twistd of the running interpreter's environment (not `python -m twisted`, which is twist).
TWISTD = str(Path(sys.executable).with_name("twistd"))


PORT_RANGE = (20000, 32000)
"""Where ``free_port`` looks: below the kernel's ephemeral range (32768-60999 on Linux)."""
_handed_out: set[int] = set()


def port_range() -> range:
    """This process's share of ``PORT_RANGE``: all of it, or under pytest-xdist the slice of
    this worker (``PYTEST_XDIST_WORKER`` gwN of ``PYTEST_XDIST_WORKER_COUNT``), so that two
    test processes never pick the same port for servers they start at the same moment."""
    low, high = PORT_RANGE
    worker = os.environ.get("PYTEST_XDIST_WORKER", "")
    count = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1") or 1)
    if not worker.startswith("gw") or not worker[2:].isdigit() or count < 2:
        return range(low, high)
    index = int(worker[2:]) % count
    width = (high - low) // count
    return range(low + index * width, low + (index + 1) * width)


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that was free a moment ago on ``host``.

    Chosen at random in this process's share of ``PORT_RANGE``, below the kernel's ephemeral
    range, so that the outgoing connections of tests and servers cannot take it before the
    server binds it; never the same port twice in one process (one test may ask for several
    before any is bound).
    """
    ports = port_range()
    for _ in range(200):
        port = random.choice(ports)
        if port in _handed_out:
            continue
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            try:
                s.bind((host, port))
            except OSError:
                continue
        _handed_out.add(port)
        if len(_handed_out) > len(ports) // 2:  # a long run: start afresh
            _handed_out.clear()
        return port
    raise OSError(f"no free port found in {ports.start}-{ports.stop - 1}")


def wait_for_port(
    host: str, port: int, timeout: float = 20.0, proc: subprocess.Popen | None = None
) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode} before listening on {port}")
        try:
            with socket.create_connection((host, port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.05)
    raise TimeoutError(f"nothing listening on {host}:{port} after {timeout}s")


def render_config(sections: Mapping[str, Mapping[str, str]]) -> str:
    out = []
    for name, keys in sections.items():
        out.append(f"[{name}]")
        out.extend(f"{k} = {v}" for k, v in keys.items())
        out.append("")
    return "\n".join(out)


class MailgwServer:
    """A mailgw node in ``workdir``: config file, data dir, log; started and stopped by PID."""

    def __init__(
        self,
        workdir: Path,
        overrides: Mapping[str, Mapping[str, str]] | None = None,
        host: str = "127.0.0.1",
        launcher: Sequence[str] | None = None,
        twistd_args: Sequence[str] = (),
        env: Mapping[str, str] | None = None,
        cwd: Path | None = None,
        cli: Sequence[str] | None = None,
    ) -> None:
        """``launcher`` (the twistd command, default this environment's, under coverage when
        measuring), ``twistd_args`` (before ``mailgw``, e.g. ``--uid``), ``env`` (instead of
        this one's with the checkout on PYTHONPATH), ``cwd`` (default the checkout) and
        ``cli`` (the admin command, default ``python -m mailgw.cli``): for running another
        installation of mailgw, or as another user."""
        self.workdir = Path(workdir)
        self.launcher = list(launcher) if launcher is not None else None
        self.twistd_args = list(twistd_args)
        self._env = dict(env) if env is not None else None
        self.cwd = cwd if cwd is not None else REPO
        self.cli_command = list(cli) if cli is not None else [sys.executable, "-m", "mailgw.cli"]
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.host = host
        self.ports = {"mx": free_port(host), "pop3": free_port(host), "pop3s": free_port(host)}
        self.ports.update(imap=free_port(host), imaps=free_port(host))
        sections: dict[str, dict[str, str]] = {
            "server": {"data_dir": str(self.workdir / "data"), "hostname": "mx.example.test"},
            "directory": {
                "argon2_time_cost": "1",
                "argon2_memory_kib": "8192",
                "auth_failure_delay": "0.2s",
            },
            "mx": {"listen": f"tcp:{self.ports['mx']}:interface={host}"},
            "pop3": {
                "listen": f"tcp:{self.ports['pop3']}:interface={host}",
                "listen_tls": f"tcp:{self.ports['pop3s']}:interface={host}",
            },
            "imap": {
                "listen": f"tcp:{self.ports['imap']}:interface={host}",
                "listen_tls": f"tcp:{self.ports['imaps']}:interface={host}",
            },
        }
        for name, keys in (overrides or {}).items():
            sections.setdefault(name, {}).update(keys)
        self.sections = sections
        self.config_path = self.workdir / "mailgw.ini"
        self.config_path.write_text(render_config(sections))
        self.log_path = self.workdir / "twistd.log"
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def data_dir(self) -> Path:
        return Path(self.sections["server"]["data_dir"])

    def env(self) -> dict[str, str]:
        if self._env is not None:
            return dict(self._env)
        env = dict(os.environ)
        env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
        return env

    def cli(
        self, *args: str, input: str | None = None, check: bool = True
    ) -> subprocess.CompletedProcess[str]:
        """Run the admin command ``mailgw --config ... ARGS`` and return its result."""
        cmd = [*self.cli_command, "--config", str(self.config_path), *args]
        return subprocess.run(
            cmd,
            input=input,
            capture_output=True,
            text=True,
            check=check,
            env=self.env(),
            cwd=self.cwd,
            timeout=60,
        )

    def start(self, wait: bool = True) -> None:
        """Start twistd; when another process took one of the free ports chosen a moment ago
        (the server exits with EADDRINUSE), move every listener to fresh ports and try again."""
        for attempt in range(3):
            try:
                self._launch(wait)
                return
            except RuntimeError:
                if attempt == 2 or "Address already in use" not in self.log():
                    raise
                self.stop()
                self._move_ports()

    def _move_ports(self) -> None:
        moves: dict[int, int] = {}

        def fresh(match: re.Match[str]) -> str:
            old = int(match.group(2))
            return match.group(1) + str(moves.setdefault(old, free_port(self.host)))

        for keys in self.sections.values():
            for key, value in keys.items():
                if key.startswith("listen"):
                    keys[key] = re.sub(r"(tcp:)(\d+)", fresh, value)
        self.ports = {name: moves.get(port, port) for name, port in self.ports.items()}
        self.config_path.write_text(render_config(self.sections))
        self.log_path.write_text("")

    def _launch(self, wait: bool) -> None:
        # Under coverage (make test), twistd runs through a wrapper that saves coverage data
        # when it shuts down; otherwise it is the twistd script itself.
        if self.launcher is not None:
            launcher = self.launcher
        elif os.environ.get("COVERAGE_PROCESS_CONFIG") or os.environ.get("COVERAGE_PROCESS_START"):
            launcher = [sys.executable, "-m", "mailgw.testing.twistd_coverage"]
        else:
            launcher = [TWISTD]
        cmd = [
            *launcher,
            *self.twistd_args,
            "--pidfile=",
            "--nodaemon",
            f"--logfile={self.log_path}",
            "mailgw",
            "--config",
            str(self.config_path),
        ]
        self.proc = subprocess.Popen(
            cmd, cwd=self.cwd, env=self.env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT
        )
        if wait:
            # Every enabled role's first listener: they are bound one after the other, so a
            # client of the last one must not race the start-up once the first one answers.
            for role in ("mx", "pop3", "imap"):
                keys = self.sections.get(role, {})
                if keys.get("enabled", "yes") == "no" or "listen" not in keys:
                    continue
                port = self.listen_port(role)
                if port:
                    wait_for_port(self.host, port, proc=self.proc)

    def listen_port(self, role: str) -> int:
        """The TCP port of the role's first listener, as written in the config."""
        description = self.sections[role]["listen"].split()[0]
        return int(description.removeprefix("haproxy:").split(":")[1])

    def stop(self, timeout: float = 15.0) -> int | None:
        """SIGTERM by PID, then SIGKILL if it does not exit; returns the exit code."""
        if self.proc is None:
            return None
        proc, self.proc = self.proc, None
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        if proc.stdout:
            proc.stdout.close()
        return proc.returncode

    def kill9(self) -> None:
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait()
            if self.proc.stdout:
                self.proc.stdout.close()
            self.proc = None

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def wait_for_log(self, text: str, timeout: float = 20.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if text in self.log():
                return
            time.sleep(0.05)
        raise TimeoutError(f"{text!r} not in log after {timeout}s:\n{self.log()[-3000:]}")
