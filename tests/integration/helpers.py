"""Helpers for integration tests: polling, reading Maildirs, provisioning a node."""

from __future__ import annotations

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
