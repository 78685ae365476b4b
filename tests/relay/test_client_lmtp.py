"""The client's LMTP mode against mailgw's own LMTP server on loopback: LHLO, and one reply
per accepted recipient after the final dot, matched to the right recipient."""

from __future__ import annotations

import ipaddress
from dataclasses import replace
from pathlib import Path

import pytest_twisted
from twisted.internet.defer import maybeDeferred

from mailgw.interfaces import QuotaExceeded
from mailgw.relay.client import ClientOptions, Target, Transaction, deliver
from mailgw.smtp.lmtp import LMTPFactory, LMTPRole
from mailgw.smtp.protocol import Limits
from tests.relay.reactorhelper import reactor, within
from tests.relay.test_client import OPTS
from tests.smtp.fakes import FakeSpool, default_directory
from tests.smtp.test_lmtp import FakeStore


@pytest_twisted.ensureDeferred
async def test_lmtp_delivery_gets_a_reply_per_recipient(tmp_path: Path) -> None:
    store = FakeStore()
    store.fail["bob@example.test"] = QuotaExceeded("full")
    role = LMTPRole(FakeSpool(), store, default_directory(), str(tmp_path / "tmp"))
    factory = LMTPFactory(
        role, "be1.test", Limits(), reactor, (ipaddress.ip_network("127.0.0.0/8"),)
    )
    port = reactor.listenTCP(0, factory, interface="127.0.0.1")
    try:
        message = tmp_path / "m.eml"
        message.write_bytes(b"Subject: x\r\n\r\nbody\r\n")
        rcpts = ["alice@example.test", "bob@example.test", "nobody@example.test"]
        tx = Transaction("s@remote.test", rcpts, str(message))
        options: ClientOptions = replace(OPTS, lmtp=True, tls="none")
        target = Target("be1", "127.0.0.1", port.getHost().port)
        result = await within(deliver(reactor, tx, [target], options))
        assert result.error is None
        codes = {r: reply.code for r, reply in result.recipients.items()}
        assert codes == {
            "alice@example.test": 250,
            "bob@example.test": 452,
            "nobody@example.test": 550,
        }
        assert [u for u, _ in store.stored] == ["alice@example.test"]
        # Small messages are sent from memory: the same replies.
        tx2 = replace(tx, data=message.read_bytes(), recipients=rcpts[:1])
        result2 = await within(deliver(reactor, tx2, [target], options))
        assert result2.recipients["alice@example.test"].code == 250
        assert len(store.stored) == 2
    finally:
        await within(maybeDeferred(port.stopListening))
