"""A private redis-server (and redis-sentinel) for tests: free loopback port, no
persistence, started and stopped by PID (``RedisServer``, ``RedisSentinel``)."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

from mailgw.testing.server import free_port


def redis_path() -> str | None:
    """The redis-server binary, None when it is not installed."""
    return shutil.which("redis-server")


def _ping(port: int, command: bytes = b"PING\r\n") -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=1) as s:
        s.sendall(command)
        return s.recv(65536)


class RedisServer:
    """``redis-server --save '' --appendonly no`` on a free port of 127.0.0.1 in ``workdir``;
    ``start()``/``stop()`` (by PID) may be repeated: the port stays the same."""

    def __init__(self, workdir: Path, port: int | None = None, extra: list[str] | None = None):
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.port = port or free_port()
        self.extra = list(extra or [])
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def command(self) -> list[str]:
        return [
            redis_path() or "redis-server",
            "--port",
            str(self.port),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
            "--dir",
            str(self.workdir),
            "--logfile",
            str(self.workdir / "redis.log"),
            *self.extra,
        ]

    def start(self) -> None:
        self.proc = subprocess.Popen(self.command(), stdout=subprocess.DEVNULL)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                if _ping(self.port).startswith(b"+PONG"):
                    return
            except OSError:
                pass
            if self.proc.poll() is not None:
                break
            time.sleep(0.05)
        raise RuntimeError(f"redis-server on {self.port} did not start")

    def call(self, *args: str) -> bytes:
        """One command (inline protocol), the raw reply."""
        return _ping(self.port, (" ".join(args) + "\r\n").encode())

    def kill(self, sig: int = signal.SIGTERM) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.kill(self.proc.pid, sig)
            self.proc.wait(10)
        self.proc = None

    stop = kill


class RedisSentinel(RedisServer):
    """``redis-server CONF --sentinel`` watching the master ``name`` at ``master``."""

    def __init__(self, workdir: Path, master: RedisServer, name: str = "mailgw") -> None:
        super().__init__(workdir)
        conf = self.workdir / "sentinel.conf"
        conf.write_text(
            f"port {self.port}\nbind 127.0.0.1\ndir {self.workdir}\n"
            f"logfile {self.workdir / 'sentinel.log'}\n"
            f"sentinel monitor {name} 127.0.0.1 {master.port} 1\n"
            f"sentinel down-after-milliseconds {name} 1000\n"
            f"sentinel failover-timeout {name} 3000\n"
            f"sentinel parallel-syncs {name} 1\n"
        )
        self.conf = conf

    def command(self) -> list[str]:
        return [redis_path() or "redis-server", str(self.conf), "--sentinel"]
