"""Helpers for integration tests: polling, reading Maildirs, provisioning a node."""

from __future__ import annotations

import socket
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from mailgw.testing.server import MailgwServer

PASSWORD = "s3cret alice"


def wait_until(predicate: Callable[[], Any], timeout: float = 20.0, what: str = "condition") -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.05)
    raise TimeoutError(f"{what} not reached after {timeout}s")


def mailbox_files(
    server: MailgwServer, user: str = "alice", domain: str = "example.test"
) -> list[Path]:
    root = server.data_dir / "mail" / domain / user
    files: list[Path] = []
    for sub in ("new", "cur"):
        folder = root / sub
        if folder.is_dir():
            files.extend(sorted(folder.iterdir()))
    return files


def provision(server: MailgwServer) -> None:
    server.cli("domain", "add", "example.test")
    server.cli("user", "add", "alice@example.test", "--password", PASSWORD)
    server.cli("user", "add", "bob@example.test", "--password", "bob password")
    server.cli("alias", "add", "postmaster@example.test", "alice@example.test")


class Session:
    """A raw SMTP client socket: send bytes, read replies."""

    def __init__(self, port: int) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=10)
        self.buffer = b""
        self.greeting = self.reply()

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def reply(self) -> bytes:
        """One (possibly multi-line) reply."""
        while True:
            lines = self.buffer.split(b"\r\n")
            for i, line in enumerate(lines[:-1]):
                if len(line) >= 4 and line[3:4] == b" ":
                    out = b"\r\n".join(lines[: i + 1])
                    self.buffer = b"\r\n".join(lines[i + 1 :])
                    return out
            chunk = self.sock.recv(65536)
            if not chunk:
                raise ConnectionError(f"closed; pending {self.buffer!r}")
            self.buffer += chunk

    def command(self, line: bytes) -> bytes:
        self.send(line + b"\r\n")
        return self.reply()

    def closed(self) -> bool:
        try:
            self.sock.settimeout(5)
            return self.sock.recv(1) == b""
        except (ConnectionError, OSError):
            return True

    def close(self) -> None:
        self.sock.close()
