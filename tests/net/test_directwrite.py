"""``write_now`` on real loopback TCP connections (the real reactor, run by pytest-twisted):
bytes go out at once when nothing is buffered, in order with ``transport.write`` always."""

from __future__ import annotations

import io
from typing import Any

import pytest_twisted
from twisted.internet.protocol import ClientFactory, Factory, Protocol

from mailgw.maillog import BatchedFileLogObserver
from mailgw.net.directwrite import write_now
from mailgw.net.guard import ConnectionGuardFactory
from tests.relay.reactorhelper import reactor, until


class Server(Protocol):
    def __init__(self, script: Any) -> None:
        self.script = script
        self.checks: list[Any] = []

    def connectionMade(self) -> None:
        self.script(self)


class Reader(Protocol):
    def __init__(self) -> None:
        self.received = bytearray()
        self.closed = False

    def dataReceived(self, data: bytes) -> None:
        self.received += data

    def connectionLost(self, reason: Any = None) -> None:
        self.closed = True


async def exchange(script: Any, expected_size: int, guard: bool = True) -> tuple[Server, Reader]:
    """Connect to a server whose protocol runs ``script`` when connected (under the
    connection guard, as the listeners stack it); read until ``expected_size`` bytes came."""
    servers: list[Server] = []

    def build(addr: Any) -> Server:
        servers.append(Server(script))
        return servers[-1]

    inner = Factory.forProtocol(Server)
    inner.buildProtocol = build  # type: ignore[method-assign]
    factory = ConnectionGuardFactory(inner, reactor, None) if guard else inner
    port = reactor.listenTCP(0, factory, interface="127.0.0.1")
    reader = Reader()
    client = ClientFactory.forProtocol(lambda: reader)
    connector = reactor.connectTCP("127.0.0.1", port.getHost().port, client)
    try:
        await until(lambda: len(reader.received) >= expected_size)
    finally:
        connector.disconnect()
        await port.stopListening()
    return servers[0], reader


def tcp_of(protocol: Protocol) -> Any:
    transport: Any = protocol.transport
    while not hasattr(transport, "socket"):
        transport = transport.transport
    return transport


@pytest_twisted.ensureDeferred
async def test_nothing_buffered_goes_to_the_socket_at_once() -> None:
    def script(p: Server) -> None:
        write_now(p.transport, b"220 ready\r\n")
        tcp = tcp_of(p)
        # Sent already: nothing buffered, the socket not registered for writing.
        p.checks.append((list(tcp._tempDataBuffer), tcp in reactor.getWriters()))

    server, reader = await exchange(script, 11)
    assert bytes(reader.received) == b"220 ready\r\n"
    assert server.checks == [([], False)]


@pytest_twisted.ensureDeferred
async def test_a_line_logged_before_a_direct_reply_is_written_before_it() -> None:
    log = io.StringIO()
    observer = BatchedFileLogObserver(log, lambda e: e["log_format"] + "\n", reactor)

    def script(p: Server) -> None:
        observer({"log_format": "queued as X"})
        p.checks.append(log.getvalue())  # batched: not written yet
        write_now(p.transport, b"250 ok\r\n")
        p.checks.append(log.getvalue())  # written before the reply went out

    server, reader = await exchange(script, 8)
    assert bytes(reader.received) == b"250 ok\r\n"
    assert server.checks == ["", "queued as X\n"]


@pytest_twisted.ensureDeferred
async def test_order_is_kept_behind_buffered_data() -> None:
    def script(p: Server) -> None:
        write_now(p.transport, b"one ")
        p.transport.write(b"two ")  # buffered by Twisted
        write_now(p.transport, b"three")  # must queue behind it
        p.checks.append(tcp_of(p) in reactor.getWriters())

    server, reader = await exchange(script, 13, guard=False)
    assert bytes(reader.received) == b"one two three"
    assert server.checks == [True]


@pytest_twisted.ensureDeferred
async def test_what_the_socket_cannot_take_is_buffered_and_arrives_in_order() -> None:
    big = bytes(range(256)) * (16 * 1024)  # 4 MiB: more than loopback socket buffers hold

    def script(p: Server) -> None:
        write_now(p.transport, big)
        write_now(p.transport, b"end")
        p.checks.append(len(tcp_of(p)._tempDataBuffer) > 0)

    server, reader = await exchange(script, len(big) + 3)
    assert server.checks == [True]
    assert bytes(reader.received) == big + b"end"
