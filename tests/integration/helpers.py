"""Helpers for integration tests: polling, reading Maildirs, provisioning a node, logging in."""

from __future__ import annotations

import contextlib
import imaplib
import io
import os
import poplib
import socket
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from mailgw.cli.main import main as cli_main
from mailgw.testing.server import MailgwServer

PASSWORD = "s3cret alice"
ALICE = "alice@example.test"


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


PROVISION = (
    ("domain", "add", "example.test"),
    ("user", "add", "alice@example.test", "--password", PASSWORD),
    ("user", "add", "bob@example.test", "--password", "bob password"),
    ("alias", "add", "postmaster@example.test", "alice@example.test"),
)
"""The admin commands that set up a test node: example.test, alice, bob, postmaster."""


def provision(server: MailgwServer, *commands: tuple[str, ...]) -> None:
    """Run ``PROVISION``, then ``commands`` (more admin commands, each an argument tuple
    such as ``("alias", "add", A, B)``), on a node not started yet. A node of this checkout gets them in this
    process through the admin command's own entry point (``mailgw.cli.main.main``): four
    interpreters per node, under coverage, were a tenth of the suite's CPU. Another
    installation's node (its own ``cli``), or a data directory that is someone else's
    (the command would switch to its owner), goes through the command itself."""
    data_dir = server.data_dir
    own = not data_dir.exists() or data_dir.stat().st_uid == os.geteuid()
    this_checkout = server.cli_command == [sys.executable, "-m", "mailgw.cli"]
    if not this_checkout or server._env is not None or not own:
        for args in (*PROVISION, *commands):
            server.cli(*args)
        return
    for args in (*PROVISION, *commands):
        out, err = io.StringIO(), io.StringIO()
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            code = cli_main(["--config", str(server.config_path), *args])
        assert code == 0, f"mailgw {' '.join(args)}: exit {code}: {err.getvalue()}"


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


def pop3_login(server: MailgwServer, password: str, user: str = ALICE) -> str:
    """Log in over POP3: ``ok`` or the server's error text."""
    pop = poplib.POP3("127.0.0.1", server.ports["pop3"], timeout=30)
    try:
        pop.user(user)
        pop.pass_(password)
        return "ok"
    except poplib.error_proto as e:
        return e.args[0].decode()
    finally:
        pop.quit()


def imap_login(server: MailgwServer, password: str, user: str = ALICE) -> str:
    """Log in over IMAP: ``ok`` or the server's error text."""
    imap = imaplib.IMAP4("127.0.0.1", server.ports["imap"], timeout=30)
    try:
        imap.login(user, password)
        imap.logout()
        return "ok"
    except imaplib.IMAP4.error as e:
        imap.shutdown()
        return str(e)
