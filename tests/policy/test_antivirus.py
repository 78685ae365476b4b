"""The clamd client and the antivirus check against a real clamd (EICAR test signature)."""

from __future__ import annotations

import base64
import io
import quopri
import zipfile
from collections.abc import AsyncIterator
from pathlib import Path
from typing import IO, Any

import pytest
import pytest_twisted
from twisted.internet.defer import Deferred
from twisted.internet.protocol import Factory, Protocol
from zope.interface import implementer

from mailgw.interfaces import IIncomingMessage
from mailgw.model.verdict import Disposition
from mailgw.policy.antivirus import AntivirusCheck
from mailgw.policy.clamd import (
    ClamdError,
    ClamdPool,
    ClamdUnavailable,
    parse_reply,
    parse_server,
)
from mailgw.policy.pipeline import CheckContext, Pipeline, Stage
from mailgw.testing.clamd import EICAR, FOUND, Clamd
from mailgw.testing.server import free_port
from tests.relay.reactorhelper import reactor, within


@implementer(IIncomingMessage)
class Received:
    """A received message as the checks see it (``size``, ``open_content``)."""

    queue_id = "Q1"
    message_id = ""

    def __init__(self, data: bytes) -> None:
        self.data = data
        self.opened = 0

    @property
    def size(self) -> int:
        return len(self.data)

    def open_content(self) -> IO[bytes]:
        self.opened += 1
        return io.BytesIO(self.data)

    def write(self, data: bytes) -> None:
        raise AssertionError("not written to")

    def commit(self, envelope: Any) -> Any:
        raise AssertionError("not committed")

    def abort(self) -> None:
        pass


def mime(*parts: tuple[str, bytes]) -> bytes:
    """A multipart message whose parts are (Content-Transfer-Encoding, encoded body)."""
    out = [
        b"From: a@example.test\r\nTo: b@example.test\r\nSubject: test\r\nMIME-Version: 1.0\r\n"
        b'Content-Type: multipart/mixed; boundary="XX"\r\n\r\npreamble\r\n'
    ]
    for i, (cte, body) in enumerate(parts):
        out.append(
            b"--XX\r\nContent-Type: application/octet-stream\r\n"
            + f'Content-Disposition: attachment; filename="f{i}.bin"\r\n'.encode()
            + f"Content-Transfer-Encoding: {cte}\r\n\r\n".encode()
            + body
            + b"\r\n"
        )
    out.append(b"--XX--\r\n")
    return b"".join(out)


def zipped(name: str, data: bytes) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as z:
        z.writestr(name, data)
    return buf.getvalue()


def b64(data: bytes) -> bytes:
    return base64.encodebytes(data).replace(b"\n", b"\r\n")


async def check(av: AntivirusCheck, data: bytes | Received) -> Any:
    received = data if isinstance(data, Received) else Received(data)
    context = CheckContext(message=received, session_id="S1")
    result = Pipeline([av]).run(Stage.DATA, context)
    return await within(result, 30) if isinstance(result, Deferred) else result


@pytest.fixture
def pool(clamd: Clamd) -> ClamdPool:
    return ClamdPool(reactor, [clamd.address], timeout=20)


# -- parsing -----------------------------------------------------------------------------


def test_parse_server() -> None:
    assert parse_server("127.0.0.1:3310") == ("tcp", "127.0.0.1", 3310)
    assert parse_server("[::1]:3310") == ("tcp6", "::1", 3310)
    assert parse_server("clamd.lan:3310") == ("tcp", "clamd.lan", 3310)
    assert parse_server("unix:/run/clamav/clamd.ctl") == ("unix", "/run/clamav/clamd.ctl", 0)
    for bad in ("127.0.0.1", "unix:relative", "::1:3310", "host:0", "host:x", ":3310"):
        with pytest.raises(ValueError):
            parse_server(bad)


def test_parse_reply() -> None:
    assert parse_reply(b"stream: OK\0") is None
    assert parse_reply(b"stream: Eicar-Signature FOUND\0") == "Eicar-Signature"
    with pytest.raises(ClamdError, match="size limit exceeded"):
        parse_reply(b"INSTREAM size limit exceeded. ERROR\0")
    with pytest.raises(ClamdError):
        parse_reply(b"")


# -- against the real clamd --------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_clean_message_gets_the_scanned_header(pool: ClamdPool) -> None:
    verdict = await check(AntivirusCheck(pool), mime(("7bit", b"just text")))
    assert verdict.disposition is Disposition.ACCEPT
    assert verdict.headers == (("X-Virus-Scanned", "clamav"),)


@pytest.mark.parametrize(
    "data",
    [
        pytest.param(EICAR, id="plain"),
        pytest.param(b"Subject: x\r\n\r\n" + EICAR + b"\r\n", id="in-body"),
        pytest.param(mime(("base64", b64(EICAR))), id="base64"),
        pytest.param(mime(("base64", b64(zipped("eicar.com", EICAR)))), id="zip"),
        pytest.param(mime(("quoted-printable", quopri.encodestring(EICAR))), id="qp"),
        pytest.param(
            mime(("base64", b64(b"x" * 300_000 + EICAR + b"y" * 300_000))), id="large-chunked"
        ),
    ],
)
@pytest_twisted.ensureDeferred
async def test_eicar_is_found(pool: ClamdPool, data: bytes) -> None:
    verdict = await check(AntivirusCheck(pool), data)
    assert verdict.disposition is Disposition.REJECT
    assert verdict.reply.code == 554 and verdict.reply.enhanced == "5.7.0"
    assert verdict.reply.text == f"Message rejected: virus found: {FOUND}"


@pytest_twisted.ensureDeferred
async def test_eicar_split_across_mime_parts_is_not_one_virus(pool: ClamdPool) -> None:
    """Each half in its own part: clamd scans each decoded part on its own and finds no
    signature (the EICAR file is not in the message, only its halves)."""
    verdict = await check(
        AntivirusCheck(pool), mime(("base64", b64(EICAR[:34])), ("base64", b64(EICAR[34:])))
    )
    assert verdict.disposition is Disposition.ACCEPT
    assert verdict.headers == (("X-Virus-Scanned", "clamav"),)


@pytest_twisted.ensureDeferred
async def test_clamd_down_tempfails_or_accepts_as_configured() -> None:
    down = ClamdPool(reactor, [f"127.0.0.1:{free_port()}"], timeout=10)
    verdict = await check(AntivirusCheck(down), EICAR)
    assert verdict.disposition is Disposition.TEMPFAIL
    assert (verdict.reply.code, verdict.reply.enhanced) == (451, "4.7.0")
    verdict = await check(AntivirusCheck(down, on_failure="accept"), EICAR)
    assert verdict.disposition is Disposition.ACCEPT
    assert verdict.headers == (("X-Virus-Scanned", "skipped"),)


@pytest_twisted.ensureDeferred
async def test_failover_to_the_next_server_and_round_robin(clamd: Clamd) -> None:
    assert clamd.socket_path is not None
    dead = f"127.0.0.1:{free_port()}"
    pool = ClamdPool(reactor, [dead, clamd.address], timeout=10)
    for _ in range(2):  # starting at the dead one, then at the live one
        result = await within(pool.scan(lambda: io.BytesIO(EICAR)), 30)
        assert result.server == clamd.address and result.virus == FOUND
    live = ClamdPool(reactor, [clamd.address, f"unix:{clamd.socket_path}"], timeout=10)
    servers = [(await within(live.scan(lambda: io.BytesIO(b"ok")), 30)).server for _ in range(4)]
    assert servers == [clamd.address, f"unix:{clamd.socket_path}"] * 2


@pytest_twisted.ensureDeferred
async def test_all_servers_down_names_each() -> None:
    a, b = f"127.0.0.1:{free_port()}", "unix:/nonexistent/clamd.sock"
    pool = ClamdPool(reactor, [a, b], timeout=10)
    with pytest.raises(ClamdUnavailable) as e:
        await within(pool.scan(lambda: io.BytesIO(b"x")), 30)
    assert a in str(e.value) and b in str(e.value)


class Silent(Protocol):
    """Accepts the stream and never answers."""

    def dataReceived(self, data: bytes) -> None:
        pass


@pytest_twisted.async_yield_fixture
async def silent_server() -> AsyncIterator[str]:
    port = reactor.listenTCP(0, Factory.forProtocol(Silent), interface="127.0.0.1")
    yield f"127.0.0.1:{port.getHost().port}"
    await port.stopListening()


@pytest_twisted.ensureDeferred
async def test_a_server_that_does_not_answer_times_out(silent_server: str) -> None:
    verdict = await check(AntivirusCheck(ClamdPool(reactor, [silent_server], 0.5)), EICAR)
    assert verdict.disposition is Disposition.TEMPFAIL


@pytest_twisted.ensureDeferred
async def test_stream_max_length_and_max_scan_size(tmp_path: Path, pool: ClamdPool) -> None:
    big = mime(("base64", b64(b"z" * 4000)))
    # Over max_scan_size: not sent, on_failure decides.
    received = Received(big)
    verdict = await check(AntivirusCheck(pool, "accept", 1000), received)
    assert verdict.headers == (("X-Virus-Scanned", "skipped"),) and received.opened == 0
    # A clamd whose StreamMaxLength is smaller than the message: its error (or reset).
    small = Clamd(tmp_path, stream_max_length="1K", unix=False).start()
    try:
        limited = ClamdPool(reactor, [small.address], timeout=20)
        verdict = await check(AntivirusCheck(limited), big)
        assert verdict.disposition is Disposition.TEMPFAIL
        verdict = await check(AntivirusCheck(limited, "accept"), big)
        assert verdict.headers == (("X-Virus-Scanned", "skipped"),)
    finally:
        small.stop()


def test_on_failure_must_be_known(pool: ClamdPool) -> None:
    with pytest.raises(ValueError):
        AntivirusCheck(pool, on_failure="ignore")
    with pytest.raises(ValueError):
        ClamdPool(reactor, [], 1)
