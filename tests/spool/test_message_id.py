"""The queued message's Message-ID, read from its header section as it is written (for the log)."""

from __future__ import annotations

from pathlib import Path

from mailgw.model import Envelope
from mailgw.spool import Spool
from mailgw.spool.spool import HeaderSniffer


def test_message_id_of_a_message_written_in_pieces(tmp_path: Path) -> None:
    spool = Spool(str(tmp_path / "spool"), hostname="mx.example.test")
    incoming = spool.begin()
    assert incoming.message_id == ""
    message = (
        b"Received: from x\r\n\tby y; Sat, 5 Dec 2026 10:00:00 +0000\r\n"
        b"message-ID:\r\n <a.b@example.test>\r\nSubject: s\r\n\r\nMessage-ID: <body@x>\r\n"
    )
    for i in range(0, len(message), 3):
        incoming.write(message[i : i + 3])
    assert incoming.message_id == "<a.b@example.test>"
    incoming.commit(Envelope(sender="a@x.test", recipients=["b@y.test"]))
    spool.close()


def test_no_message_id_and_a_field_after_the_header_does_not_count() -> None:
    sniffer = HeaderSniffer()
    sniffer.feed(b"Subject: s\r\n\r\nMessage-ID: <in-body@x>\r\n")
    assert sniffer.field(b"message-id") == ""


def test_header_section_beyond_the_limit_is_not_kept() -> None:
    sniffer = HeaderSniffer(limit=100)
    sniffer.feed(b"X-Long: " + b"a" * 200 + b"\r\n")
    sniffer.feed(b"Message-ID: <late@x>\r\n\r\n")
    assert sniffer.field(b"message-id") == ""
    early = HeaderSniffer(limit=100)
    early.feed(b"Message-ID: <early@x>\r\nX-Long: " + b"a" * 200 + b"\r\n\r\n")
    assert early.field(b"message-id") == "<early@x>"


def test_submission_reports_the_message_id_it_adds(tmp_path: Path) -> None:
    from twisted.internet.task import Clock

    from mailgw.policy.submission import HeaderCompleter, SubmissionPolicy

    spool = Spool(str(tmp_path / "spool"), hostname="mx.example.test")
    policy = SubmissionPolicy(None, "mx.example.test", Clock())  # type: ignore[arg-type]
    wrapper = HeaderCompleter(spool.begin(), policy, "alice@example.test")
    wrapper.write(b"From: alice@example.test\r\nSubject: s\r\n\r\nbody\r\n")
    wrapper.finish()
    added = wrapper.message_id
    assert added.startswith("<") and added.endswith("@example.test>"), added
    box: list[str] = []
    wrapper.commit(Envelope(sender="alice@example.test", recipients=["b@y.test"])).addCallback(
        box.append
    )
    with spool.load(box[0]).open_content() as f:
        assert f"Message-ID: {added}\r\n".encode() in f.read()
    spool.close()
