"""Fakes for the SMTP tests: an in-memory spool and directory, and a scripted SMTP client."""

from __future__ import annotations

import dataclasses
import io
from typing import Any

from twisted.internet import defer
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from zope.interface import implementer

from mailgw.config import MXConfig
from mailgw.interfaces import IIncomingMessage, ISpool
from mailgw.model import Envelope
from mailgw.smtp.protocol import SMTPServer
from mailgw.smtp.roles.mx import MXFactory
from mailgw.testing.fakes import FakeDirectory, TLSStringTransport, peer_address


@implementer(IIncomingMessage)
class FakeIncoming:
    def __init__(self, spool: FakeSpool, queue_id: str) -> None:
        self.spool = spool
        self.queue_id = queue_id
        self.size = 0
        self.message_id = ""
        self.chunks: list[bytes] = []
        self.aborted = False
        self.committing = False
        self.committed = False

    def write(self, data: bytes) -> None:
        assert not self.aborted and not self.committed, "write after abort/commit"
        if self.spool.fail_write:
            raise OSError(28, "No space left on device")
        self.size += len(data)
        self.spool.largest_write = max(self.spool.largest_write, len(data))
        if self.spool.keep_content:
            self.chunks.append(data)

    def open_content(self) -> io.BytesIO:
        assert self.spool.keep_content, "open_content needs keep_content"
        if self.aborted or self.committing or self.committed:
            raise ValueError("message already committed or aborted")
        return io.BytesIO(b"".join(self.chunks))

    def rewrite_header(self, edit: Any) -> None:
        assert self.spool.keep_content, "rewrite_header needs keep_content"
        data = b"".join(self.chunks)
        end = data.find(b"\r\n\r\n")
        end = len(data) if end < 0 else end + 2
        self.chunks = [edit(data[:end]) + data[end:]]
        self.size = len(self.chunks[0])

    def commit(self, envelope: Envelope) -> defer.Deferred[str]:
        assert not self.aborted and not self.committing
        self.committing = True
        if self.spool.fail_commit:
            self.committing = False  # the spool removed what it had: abort() is harmless
            return defer.fail(OSError(28, "No space left on device"))
        if self.spool.hold_commits:
            d: defer.Deferred[str] = defer.Deferred()
            self.spool.held.append((self, envelope, d))
            return d
        return defer.succeed(self.finish(envelope))

    def finish(self, envelope: Envelope) -> str:
        envelope.queue_id = self.queue_id
        self.committed = True
        self.spool.committed.append((envelope, b"".join(self.chunks)))
        return self.queue_id

    def abort(self) -> None:
        if self.committing:
            return  # like the real spool: the commit owns the message now
        self.aborted = True
        self.chunks = []


@implementer(ISpool)
class FakeSpool:
    def __init__(self, keep_content: bool = True) -> None:
        self.keep_content = keep_content
        self.fail_commit = False
        self.fail_begin = False
        self.hold_commits = False
        self.fail_write = False
        self.held: list[tuple[FakeIncoming, Envelope, defer.Deferred[str]]] = []
        self.committed: list[tuple[Envelope, bytes]] = []
        self.begun: list[FakeIncoming] = []
        self.largest_write = 0

    def begin(self) -> FakeIncoming:
        if self.fail_begin:
            raise OSError(13, "Permission denied")
        incoming = FakeIncoming(self, f"Q{len(self.begun) + 1:04d}")
        self.begun.append(incoming)
        return incoming

    def release(self, fail: bool = False) -> None:
        """Finish the held commits (as the spool's thread would), or fail them."""
        held, self.held = self.held, []
        for incoming, envelope, d in held:
            if fail:
                d.errback(OSError(5, "I/O error"))
            else:
                d.callback(incoming.finish(envelope))

    def list(self, state: str) -> list[str]:
        return [e.queue_id for e, _ in self.committed] if state == "incoming" else []

    def load(self, queue_id: str) -> Any:
        raise KeyError(queue_id)

    def move(self, queue_id: str, to_state: str) -> None:
        raise KeyError(queue_id)

    def update(self, queue_id: str, envelope: object) -> None:
        raise KeyError(queue_id)

    def remove(self, queue_id: str) -> None:
        pass

    def recover(self) -> list[str]:
        return []

    def add_listener(self, callback: object) -> None:
        pass


def default_directory() -> FakeDirectory:
    return FakeDirectory(
        ["alice@example.test", "bob@example.test", "carol@other.test"],
        domains={"example.test", "other.test"},
    )


class Client:
    """Drives one SMTPServer over a StringTransport and collects its replies."""

    def __init__(self, protocol: SMTPServer, transport: StringTransport) -> None:
        self.protocol = protocol
        self.transport = transport

    def output(self) -> str:
        out = self.transport.value().decode("utf-8")
        self.transport.clear()
        return out

    def lines(self) -> list[str]:
        return [line for line in self.output().split("\r\n") if line]

    def send(self, data: bytes | str) -> list[str]:
        if isinstance(data, str):
            data = data.encode("utf-8")
        self.protocol.dataReceived(data)
        return self.lines()

    def codes(self, data: bytes | str) -> list[str]:
        """Reply codes (first line of each reply only: continuation lines dropped)."""
        return [line[:3] for line in self.send(data) if line[3:4] != "-"]

    def exchange(self, data: str) -> list[str]:
        """Like ``codes``, but as a PIPELINING client: each ``DATA`` line ends a write and the
        rest is sent only after the reply (RFC 2920 3.1: the client waits for the 354)."""
        out: list[str] = []
        pieces = data.split("DATA\r\n")
        for i, piece in enumerate(pieces):
            chunk = piece + ("DATA\r\n" if i < len(pieces) - 1 else "")
            if chunk:
                out += self.codes(chunk)
        return out

    @property
    def closed(self) -> bool:
        return bool(self.transport.disconnecting)


class Harness:
    """An MXFactory with fake spool/directory and a Clock; ``connect()`` opens sessions."""

    def __init__(self, tls_options: Any = None, **config: Any) -> None:
        keep_content = config.pop("keep_content", True)
        self.config = dataclasses.replace(MXConfig(), **config)
        self.spool = FakeSpool(keep_content=keep_content)
        self.directory = default_directory()
        self.clock = Clock()
        self.clock.advance(1_700_000_000)
        self.factory = MXFactory(
            self.config, "mx.example.test", self.spool, self.directory, self.clock, tls_options
        )

    def connect(self, ip: str = "192.0.2.7", port: int = 40000, greet: bool = True) -> Client:
        addr = peer_address(ip, port)
        protocol = self.factory.buildProtocol(addr)
        assert isinstance(protocol, SMTPServer)
        transport = TLSStringTransport(peerAddress=addr)
        protocol.makeConnection(transport)
        client = Client(protocol, transport)
        if greet:
            assert client.lines() == ["220 mx.example.test ESMTP mailgw"]
        return client

    @property
    def messages(self) -> list[tuple[Envelope, bytes]]:
        return self.spool.committed
