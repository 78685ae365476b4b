"""IIncomingMessage.open_content: the bytes received so far, readable before the commit."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from twisted.internet.task import Clock
from zope.interface.verify import verifyObject

from mailgw.interfaces import IIncomingMessage
from mailgw.model import Envelope
from mailgw.policy.submission import HeaderCompleter, SubmissionPolicy
from mailgw.spool import Spool
from tests.smtp.fakes import default_directory


def read(incoming: IIncomingMessage) -> bytes:
    with incoming.open_content() as f:
        return f.read()


@pytest.mark.parametrize("memory_limit", [1 << 20, 10])
def test_reads_back_what_was_written(tmp_path: Path, memory_limit: int) -> None:
    spool = Spool(str(tmp_path / "spool"), memory_limit=memory_limit)
    incoming = spool.begin()
    assert read(incoming) == b""
    incoming.write(b"Subject: one\r\n")
    incoming.write(b"\r\n")
    snapshot = incoming.open_content()
    incoming.write(b"body line\r\n")
    # the file opened before the last write stops where the message was then
    assert snapshot.read() == b"Subject: one\r\n\r\n"
    snapshot.close()
    assert read(incoming) == b"Subject: one\r\n\r\nbody line\r\n"
    spilled = os.path.exists(os.path.join(spool.tmp_dir, incoming.queue_id + ".content"))
    assert spilled == (memory_limit == 10)
    # reading does not disturb what is committed
    incoming.write(b"end\r\n")
    box: list[str] = []
    incoming.commit(Envelope("a@x.test", ["b@y.test"])).addCallback(box.append)
    with spool.load(box[0]).open_content() as f:
        assert f.read() == b"Subject: one\r\n\r\nbody line\r\nend\r\n"
    with pytest.raises(ValueError):
        incoming.open_content()
    spool.close()


def test_large_spilled_message_reads_in_chunks(tmp_path: Path) -> None:
    spool = Spool(str(tmp_path / "spool"), memory_limit=1000)
    incoming = spool.begin()
    lines = [b"%08d %s\r\n" % (i, b"x" * 70) for i in range(20000)]  # ~1.6 MB
    for line in lines:
        incoming.write(line)
    with incoming.open_content() as f:
        got = b"".join(iter(lambda: f.read(65536), b""))
    assert got == b"".join(lines) and len(got) == incoming.size
    incoming.abort()
    with pytest.raises(ValueError):
        incoming.open_content()


def test_header_completer_reads_back_held_and_completed_bytes(tmp_path: Path) -> None:
    spool = Spool(str(tmp_path / "spool"))
    policy = SubmissionPolicy(default_directory(), "smtp.example.test", Clock())
    wrapper = HeaderCompleter(spool.begin(), policy, "alice@example.test")
    assert verifyObject(IIncomingMessage, wrapper)
    wrapper.write(b"From: alice@example.test\r\nSubj")
    assert read(wrapper) == b"From: alice@example.test\r\nSubj"  # held back, still readable
    assert wrapper.size == len(read(wrapper))
    wrapper.write(b"ect: s\r\n\r\nbody\r\n")
    wrapper.finish()
    content = read(wrapper)
    assert content.startswith(b"From: alice@example.test\r\nSubject: s\r\n")
    assert b"\r\nMessage-ID: <" in content and b"\r\nDate: " in content
    assert content.endswith(b"\r\n\r\nbody\r\n") and len(content) == wrapper.size
    wrapper.abort()


def test_the_spool_message_provides_the_interface(tmp_path: Path) -> None:
    spool = Spool(str(tmp_path / "spool"))
    incoming = spool.begin()
    assert verifyObject(IIncomingMessage, incoming)
    incoming.abort()
