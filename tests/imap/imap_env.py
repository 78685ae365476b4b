"""Test harness for the IMAP session: a real Maildir store in tmp_path, a fake directory, a
Clock, and a client driving an ``IMAPServer`` over a StringTransport (with STARTTLS)."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from twisted.internet.error import ConnectionDone
from twisted.internet.task import Clock
from twisted.python.failure import Failure

from mailgw.config.schema import IMAPConfig
from mailgw.imap.factory import IMAPFactory
from mailgw.imap.session import IMAPServer
from mailgw.store import MessageStore
from mailgw.testing.fakes import FakeDirectory, TLSStringTransport, peer_address

PASSWORDS = {"alice@example.test": "secret", "bob@example.test": "bobpw"}


class Env:
    """A store, a directory, a clock and a factory; ``connect()`` opens client sessions."""

    def __init__(self, root: Path, **config: Any) -> None:
        self.clock = Clock()
        self.directory = FakeDirectory(PASSWORDS)
        self.store = MessageStore(str(root / "mail"), quota_for=self.directory.quota_for)
        defaults = {"allow_plaintext_auth": "yes"}
        defaults.update(config)
        self.config = dataclasses.replace(IMAPConfig(), **defaults)
        self.tls = object()
        self.factory = IMAPFactory(
            self.config,
            "mail.example.test",
            self.store,
            self.directory,
            self.clock,
            tls_options=self.tls,
            auth_failure_delay=2.0,
        )

    def connect(self, ip: str = "127.0.0.1", login: str | None = None) -> Client:
        client = Client(self, ip)
        if login is not None:
            client.login(login)
        return client

    def deliver(
        self,
        data: bytes,
        user: str = "alice@example.test",
        folder: str = "INBOX",
        flags: tuple[str, ...] = (),
    ) -> int:
        return self.store.open_mailbox(user, folder).append(data, flags)


class Client:
    """Drives one server session: ``send`` bytes, ``cmd`` a tagged command and get the reply."""

    def __init__(self, env: Env, ip: str) -> None:
        self.env = env
        self.transport = TLSStringTransport(peerAddress=peer_address(ip))
        self.server: IMAPServer = env.factory.buildProtocol(None)
        self.server.makeConnection(self.transport)
        self.greeting = self.take()
        self._n = 0

    def take(self) -> bytes:
        data = self.transport.value()
        self.transport.clear()
        return data

    def send(self, data: bytes) -> bytes:
        self.server.dataReceived(data)
        return self.take()

    def cmd(self, line: str | bytes) -> bytes:
        self._n += 1
        tag = b"a%d" % self._n
        raw = line.encode("utf-8") if isinstance(line, str) else line
        out = self.send(tag + b" " + raw + b"\r\n")
        assert tag + b" " in out, out
        return out

    def login(self, user: str = "alice@example.test") -> bytes:
        out = self.cmd(f'LOGIN {user} "{PASSWORDS[user]}"')
        assert b"OK" in out.splitlines()[-1], out
        return out

    def close(self) -> None:
        self.server.connectionLost(Failure(ConnectionDone()))
