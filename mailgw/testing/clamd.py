"""A real clamd for tests: a private database with an EICAR body signature, loopback TCP.

The official databases cannot be downloaded here: ``Clamd`` writes ``test.ndb`` with one
body signature of the EICAR test string (``Test.EICAR-NDB``, reported by clamd as
``Test.EICAR-NDB.UNOFFICIAL``: an unsigned database), so EICAR is found also inside larger
data (a MIME part, a zip). clamd runs in the foreground (``Foreground yes``), on a free
port of 127.0.0.1 and optionally a unix socket, with ``StreamMaxLength`` as given, and is
stopped by PID.
"""

from __future__ import annotations

import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

from mailgw.testing.server import free_port

EICAR = rb"X5O!P%@AP[4\PZX54(P^)7CC)7}$EICAR-STANDARD-ANTIVIRUS-TEST-FILE!$H+H*"
"""The EICAR test file (68 bytes): harmless, detected as a virus by every scanner."""
SIGNATURE = "Test.EICAR-NDB"
FOUND = f"{SIGNATURE}.UNOFFICIAL"
"""The name clamd reports for EICAR with the test database."""


def clamd_path() -> str | None:
    """The clamd program, None when it is not installed."""
    return shutil.which("clamd") or (
        "/usr/sbin/clamd" if Path("/usr/sbin/clamd").exists() else None
    )


class Clamd:
    """One clamd in ``workdir`` (see the module docstring)."""

    def __init__(self, workdir: Path, stream_max_length: str = "10M", unix: bool = True) -> None:
        self.workdir = Path(workdir)
        self.port = free_port()
        self.address = f"127.0.0.1:{self.port}"
        self.socket_path = self.workdir / "clamd.sock" if unix else None
        self.stream_max_length = stream_max_length
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> Clamd:
        program = clamd_path()
        if program is None:
            raise RuntimeError("clamd is not installed (Debian: clamav-daemon)")
        db = self.workdir / "db"
        db.mkdir(parents=True, exist_ok=True)
        (db / "test.ndb").write_text(f"{SIGNATURE}:0:*:{EICAR.hex()}\n")
        lines = [
            f"DatabaseDirectory {db}",
            f"TCPSocket {self.port}",
            "TCPAddr 127.0.0.1",
            "Foreground yes",
            f"StreamMaxLength {self.stream_max_length}",
            f"LogFile {self.workdir / 'clamd.log'}",
            f"TemporaryDirectory {self.workdir}",
        ]
        if self.socket_path is not None:
            lines.append(f"LocalSocket {self.socket_path}")
        conf = self.workdir / "clamd.conf"
        conf.write_text("\n".join(lines) + "\n")
        self.proc = subprocess.Popen(
            [program, "--config-file", str(conf)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                log = self.workdir / "clamd.log"
                text = log.read_text() if log.exists() else ""
                raise RuntimeError(f"clamd exited with {self.proc.returncode}: {text[-2000:]}")
            if self.ping():
                return self
            time.sleep(0.05)
        self.stop()
        raise RuntimeError("clamd did not answer PING within 60 s")

    def ping(self) -> bool:
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=2) as s:
                s.sendall(b"zPING\0")
                return s.recv(100).startswith(b"PONG")
        except OSError:
            return False

    def stop(self) -> None:
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None
