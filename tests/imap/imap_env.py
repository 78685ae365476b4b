"""Test harness for the IMAP session: a real Maildir store in tmp_path, a fake directory, a
Clock, and a client driving an ``IMAPServer`` over a StringTransport (with STARTTLS)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from twisted.cred.error import UnauthorizedLogin
from twisted.internet import defer
from twisted.internet.address import IPv4Address
from twisted.internet.error import ConnectionDone
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure
from zope.interface import implementer

from mailgw.config.schema import IMAPConfig
from mailgw.imap.factory import IMAPFactory
from mailgw.imap.session import IMAPServer
from mailgw.interfaces import IDirectory
from mailgw.store import MessageStore

PASSWORDS = {"alice@example.test": "secret", "bob@example.test": "bobpw"}


@dataclass(frozen=True)
class FakeUser:
    name: str


@implementer(IDirectory)
class FakeDirectory:
    def __init__(self) -> None:
        self.quotas: dict[str, int | None] = {}
        self.broken = False

    def is_local_domain(self, domain: str) -> bool:
        return domain == "example.test"

    def list_domains(self) -> list[str]:
        return ["example.test"]

    def resolve(self, address: str) -> list[str]:
        return [address] if address in PASSWORDS else []

    def get_user(self, name: str) -> object | None:
        return FakeUser(name) if name in PASSWORDS else None

    def check_password(self, name: str, password: str) -> Any:
        if self.broken:
            return defer.fail(RuntimeError("directory down"))
        if PASSWORDS.get(name) == password:
            return defer.succeed(FakeUser(name))
        return defer.fail(UnauthorizedLogin())

    def quota_for(self, name: str) -> int | None:
        return self.quotas.get(name)


class TLSTransport(StringTransport):
    """A StringTransport that records startTLS."""

    def __init__(self, peer: IPv4Address) -> None:
        super().__init__(peerAddress=peer)
        self.tls_started: Any = None

    def startTLS(self, options: Any) -> None:
        self.tls_started = options

    def abortConnection(self) -> None:
        self.disconnecting = True
        self.aborted = True


class Env:
    """A store, a directory, a clock and a factory; ``connect()`` opens client sessions."""

    def __init__(self, root: Path, **config: Any) -> None:
        self.clock = Clock()
        self.directory = FakeDirectory()
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
        self.transport = TLSTransport(IPv4Address("TCP", ip, 40000))
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
