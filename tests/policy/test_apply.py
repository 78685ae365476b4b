"""Applying DATA-stage verdicts: header fields first, subject tags, class / channel / folder
and recipient changes on the queued envelope, and quarantine into its own store (MX over a
socket-free SMTP session, the non-SMTP submit path, the spool's header rewrite in memory and
spilled)."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest
from twisted.internet.task import Clock
from zope.interface import implementer

from mailgw.config import MXConfig
from mailgw.model import Envelope
from mailgw.model.verdict import ACCEPT, Verdict
from mailgw.policy import CheckContext, ICheck, Stage
from mailgw.policy.apply import (
    PolicyMessage,
    apply_to_envelope,
    describe,
    direction_of,
    header_edit,
    tag_subject,
)
from mailgw.policy.quarantine import QuarantineError, QuarantineStore
from mailgw.policy.submission import SubmissionPolicy, submission_pipeline
from mailgw.policy.submit import Submitter
from mailgw.smtp.protocol import SMTPServer
from mailgw.smtp.roles.mx import MXFactory
from mailgw.spool import Spool
from mailgw.spool.spool import HEADER_SCAN
from mailgw.testing.fakes import TLSStringTransport, peer_address
from tests.policy.test_submit import result
from tests.smtp.fakes import Client, default_directory


@implementer(ICheck)
class Answer:
    def __init__(self, stage: Stage, verdict: Verdict, name: str = "answer") -> None:
        self.name = name
        self.stages = frozenset({stage})
        self.verdict = verdict

    def check(self, context: CheckContext) -> Verdict:
        return self.verdict


# -- pure functions ---------------------------------------------------------------------------


def test_tag_subject() -> None:
    head = b"From: a@b\r\nSubject: hello\r\n"
    assert tag_subject(head, "[SPAM]") == b"From: a@b\r\nSubject: [SPAM] hello\r\n"
    tagged = tag_subject(head, "[SPAM]")
    assert tag_subject(tagged, "[SPAM]") == tagged  # not twice
    assert tag_subject(b"subject:x\r\n", "[T]") == b"subject:[T] x\r\n"
    assert tag_subject(b"From: a@b\r\n", "[T]") == b"From: a@b\r\nSubject: [T]\r\n"
    # only the first Subject, never a field merely containing the word
    assert tag_subject(b"X-Subject: a\r\nSubject: b\r\n", "[T]") == (
        b"X-Subject: a\r\nSubject: [T] b\r\n"
    )


def test_header_edit() -> None:
    assert header_edit((), ()) is None
    edit = header_edit((("X-A", "1"),), ("[T]",))
    assert edit is not None
    assert edit(b"Subject: s\r\n") == b"X-A: 1\r\nSubject: [T] s\r\n"


def test_apply_to_envelope() -> None:
    env = Envelope("s@x", ["a@example.test"])
    outcome = (
        Verdict.set_class("spam")
        .combine(Verdict.reroute("sdn"))
        .combine(Verdict.file_into("Junk"))
        .combine(Verdict.add_bcc("archive@example.test", "A@example.test"))
    )
    apply_to_envelope(outcome, env)
    assert (env.message_class, env.channel, env.folder) == ("spam", "sdn", "Junk")
    assert env.recipients == ["a@example.test", "archive@example.test"]  # no duplicate
    env2 = Envelope("s@x", ["a@example.test"])
    apply_to_envelope(Verdict.redirect_to("b@example.test"), env2)
    assert env2.recipients == ["b@example.test"] and env2.message_class == ""
    assert "class=spam" in describe(outcome) and describe(ACCEPT) == "nothing"


def test_direction() -> None:
    assert direction_of("smtp") == "inbound"
    assert direction_of("submission") == direction_of("webmail") == "outbound"


# -- the spool's header rewrite -----------------------------------------------------------------


@pytest.mark.parametrize("spill", [False, True])
def test_rewrite_header_in_memory_and_spilled(tmp_path: Path, spill: bool) -> None:
    spool = Spool(str(tmp_path / "spool"), memory_limit=64 if spill else 1 << 20)
    incoming = spool.begin()
    body = b"x" * 200 + b"\r\n"
    incoming.write(b"Subject: hi\r\nFrom: a@b\r\n\r\n" + body)
    incoming.rewrite_header(lambda head: b"X-New: 1\r\n" + head.replace(b"hi", b"[T] hi"))
    expected = b"X-New: 1\r\nSubject: [T] hi\r\nFrom: a@b\r\n\r\n" + body
    assert incoming.size == len(expected)
    with incoming.open_content() as f:
        assert f.read() == expected
    qid = result(incoming.commit(Envelope("a@b", ["c@d"])))
    with spool.load(qid).open_content() as f:
        assert f.read() == expected
    assert spool.load(qid).envelope.size == len(expected)
    assert os.listdir(spool.tmp_dir) == []


def test_rewrite_header_of_a_message_without_body_or_header(tmp_path: Path) -> None:
    spool = Spool(str(tmp_path / "spool"))
    a = spool.begin()
    a.write(b"Subject: only\r\n")
    a.rewrite_header(lambda h: b"X: 1\r\n" + h)
    with a.open_content() as f:
        assert f.read() == b"X: 1\r\nSubject: only\r\n"
    b = spool.begin()
    b.write(b"\r\nbody only\r\n")
    b.rewrite_header(lambda h: b"X: 1\r\n" + h)
    with b.open_content() as f:
        assert f.read() == b"X: 1\r\n\r\nbody only\r\n"


def test_rewrite_header_spilled_without_end_in_the_scanned_part(tmp_path: Path) -> None:
    """A spilled message whose first HEADER_SCAN bytes hold no empty line: only prepended."""
    spool = Spool(str(tmp_path / "spool"), memory_limit=1024)
    incoming = spool.begin()
    data = b"X-Long: " + b"y" * (HEADER_SCAN + 10) + b"\r\n\r\nbody\r\n"
    incoming.write(data)
    incoming.rewrite_header(lambda h: b"X: 1\r\n" + h)
    with incoming.open_content() as f:
        assert f.read() == b"X: 1\r\n" + data
    incoming.abort()
    assert os.listdir(spool.tmp_dir) == []


# -- the quarantine store -----------------------------------------------------------------------


def test_quarantine_put_list_show_release_delete(tmp_path: Path) -> None:
    spool = Spool(str(tmp_path / "spool"))
    store = QuarantineStore(str(tmp_path / "quarantine"))
    incoming = spool.begin()
    incoming.write(b"Subject: q\r\n\r\nbody\r\n")
    env = Envelope("s@far.example", ["alice@example.test"], message_class="spam")
    qid = result(store.put(incoming, env, "looks bad", "rule-x", "inbound"))
    assert qid == incoming.queue_id
    assert store.ids() == [qid]
    m = store.get(qid)
    assert (m.reason, m.rule, m.direction, m.size) == ("looks bad", "rule-x", "inbound", 20)
    assert m.envelope.message_class == "spam" and m.envelope.recipients == ["alice@example.test"]
    assert json.loads(Path(store.record_path(qid)).read_text())["id"] == qid
    assert spool.list("incoming") == [] and os.listdir(spool.tmp_dir) == []  # not queued
    with pytest.raises(ValueError):
        incoming.write(b"more")  # aborted once kept
    assert store.release(qid, spool) == qid
    assert spool.list("deferred") == [qid] and store.ids() == []
    queued = spool.load(qid)
    assert queued.envelope.next_attempt == 0 and queued.envelope.message_class == "spam"
    with queued.open_content() as f:
        assert f.read() == b"Subject: q\r\n\r\nbody\r\n"
    with pytest.raises(QuarantineError):
        store.get(qid)
    with pytest.raises(QuarantineError):
        store.release(qid, spool)
    with pytest.raises(QuarantineError):
        store.get("../etc")
    other = spool.begin()
    other.write(b"x\r\n")
    oid = result(store.put(other, Envelope("a@b", ["c@d"]), "r", "", "outbound"))
    store.delete(oid)
    assert store.ids() == [] and os.listdir(tmp_path / "quarantine") == ["tmp"]


def test_release_refused_while_the_spool_holds_the_id(tmp_path: Path) -> None:
    spool = Spool(str(tmp_path / "spool"))
    store = QuarantineStore(str(tmp_path / "quarantine"))
    incoming = spool.begin()
    incoming.write(b"x\r\n")
    qid = result(store.put(incoming, Envelope("a@b", ["c@d"]), "r", "", "inbound"))
    with open(store.content_path(qid), "rb"):
        pass
    spool.inject(qid, store.content_path(qid), Envelope("a@b", ["c@d"]), "hold")
    with pytest.raises(QuarantineError, match="already in the queue"):
        store.release(qid, spool)
    assert store.ids() == [qid]


def test_unreadable_record_is_reported(tmp_path: Path) -> None:
    store = QuarantineStore(str(tmp_path / "q"))
    Path(store.record_path("0" * 16)).write_text("{not json")
    with pytest.raises(QuarantineError, match="unreadable"):
        store.get("0" * 16)
    assert store.list() == []


def test_put_failure_keeps_nothing(tmp_path: Path) -> None:
    spool = Spool(str(tmp_path / "spool"))
    store = QuarantineStore(str(tmp_path / "q"))
    incoming = spool.begin()
    incoming.write(b"x\r\n")
    Path(store.content_path(incoming.queue_id)).write_bytes(b"in the way")  # O_EXCL fails
    failure = result(store.put(incoming, Envelope("a@b", ["c@d"]), "r", "", "inbound"))
    assert isinstance(failure.value, FileExistsError)
    assert store.ids() == [] and os.listdir(store.tmp) == []


# -- end to end over SMTP (socket-free) and the submit path -------------------------------------


class MX:
    def __init__(self, tmp_path: Path, *checks: ICheck, quarantine: bool = True) -> None:
        self.spool = Spool(str(tmp_path / "spool"))
        self.store = QuarantineStore(str(tmp_path / "quarantine")) if quarantine else None
        self.clock = Clock()
        self.clock.advance(1_700_000_000)
        self.factory = MXFactory(
            MXConfig(),
            "mx.example.test",
            self.spool,
            default_directory(),
            self.clock,
            extra_checks=checks,
            quarantine=self.store,
        )

    def send(self, message: str) -> list[str]:
        addr = peer_address("192.0.2.7", 40000)
        protocol = self.factory.buildProtocol(addr)
        assert isinstance(protocol, SMTPServer)
        transport = TLSStringTransport(peerAddress=addr)
        protocol.makeConnection(transport)
        client = Client(protocol, transport)
        client.lines()
        for line in ("EHLO c.example", "MAIL FROM:<s@far.example>", "RCPT TO:<alice@example.test>"):
            client.send(line + "\r\n")
        assert client.send("DATA\r\n")[-1].startswith("354")
        return client.send(message + "\r\n.\r\n")

    def queued(self) -> tuple[Envelope, bytes]:
        (qid,) = self.spool.list("incoming")
        m = self.spool.load(qid)
        with m.open_content() as f:
            return m.envelope, f.read()


def test_mx_applies_data_stage_headers_tag_class_channel_folder(tmp_path: Path) -> None:
    mx = MX(
        tmp_path,
        Answer(Stage.MAIL, Verdict.add_headers(("X-Early", "1"))),
        Answer(
            Stage.DATA,
            Verdict.add_headers(("X-Spam-Flag", "YES"))
            .combine(Verdict.tag_subject("[SPAM]"))
            .combine(Verdict.set_class("spam"))
            .combine(Verdict.reroute("sdn"))
            .combine(Verdict.file_into("Junk"))
            .combine(Verdict.add_bcc("archive@example.test")),
        ),
    )
    lines = mx.send("From: s@far.example\r\nSubject: cheap\r\n\r\nbuy")
    assert lines[-1].startswith("250 2.0.0 OK queued as")
    env, data = mx.queued()
    assert data.startswith(b"X-Spam-Flag: YES\r\nReceived: from c.example")
    assert data.count(b"X-Early: 1\r\n") == 1
    assert b"\r\nSubject: [SPAM] cheap\r\n" in data and data.endswith(b"\r\n\r\nbuy\r\n")
    assert (env.message_class, env.channel, env.folder) == ("spam", "sdn", "Junk")
    assert env.recipients == ["alice@example.test", "archive@example.test"]
    assert env.size == len(data)


def test_mx_quarantines_with_250_and_does_not_queue(tmp_path: Path) -> None:
    mx = MX(tmp_path, Answer(Stage.DATA, Verdict.quarantine("bad attachment"), "attach"))
    lines = mx.send("Subject: q\r\n\r\nbody")
    assert lines[-1].startswith("250 2.0.0 OK queued as")
    qid = lines[-1].rsplit(" ", 1)[1]
    assert mx.spool.list("incoming") == []
    assert mx.store is not None
    m = mx.store.get(qid)
    assert (m.reason, m.rule, m.direction) == ("bad attachment", "attach", "inbound")
    with open(m.content_path, "rb") as f:
        assert f.read().endswith(b"Subject: q\r\n\r\nbody\r\n")


def test_mx_without_a_quarantine_store_tempfails(tmp_path: Path) -> None:
    mx = MX(tmp_path, Answer(Stage.DATA, Verdict.quarantine("x")), quarantine=False)
    assert mx.send("Subject: q\r\n\r\nbody")[-1].startswith("451 4.3.0")
    assert mx.spool.list("incoming") == []


def test_a_later_refusal_beats_quarantine(tmp_path: Path) -> None:
    from mailgw.model.reply import R

    mx = MX(
        tmp_path,
        Answer(Stage.DATA, Verdict.quarantine("x")),
        Answer(Stage.DATA, Verdict.reject(R.UNKNOWN_USER), "later"),
    )
    assert mx.send("Subject: q\r\n\r\nbody")[-1].startswith("550")
    assert mx.store is not None and mx.store.ids() == []


def _submitter(tmp_path: Path, *checks: ICheck) -> tuple[Submitter, Spool, QuarantineStore]:
    clock = Clock()
    clock.advance(1_700_000_000)
    directory = default_directory()
    policy = SubmissionPolicy(directory, "mail.example.test", clock, 10, 100)
    spool = Spool(str(tmp_path / "spool"))
    store = QuarantineStore(str(tmp_path / "quarantine"))
    pipeline = submission_pipeline(policy, list(checks))
    return Submitter(policy, spool, pipeline, quarantine=store), spool, store


def test_submit_path_applies_and_quarantines(tmp_path: Path) -> None:
    user = "alice@example.test"
    submitter, spool, store = _submitter(
        tmp_path,
        Answer(
            Stage.DATA,
            Verdict.add_headers(("X-Checked", "yes")).combine(Verdict.set_class("bulk")),
        ),
    )
    env = Envelope(user, ["bob@example.test"])
    qid = result(submitter.submit(user, env, b"From: alice@example.test\nSubject: s\n\nhi\n"))
    m = spool.load(qid)
    assert m.envelope.message_class == "bulk"
    with m.open_content() as f:
        assert f.read().startswith(b"X-Checked: yes\r\nReceived: by mail.example.test")

    submitter2, spool2, store2 = _submitter(
        tmp_path / "2", Answer(Stage.DATA, Verdict.quarantine("dlp"), "dlp-rule")
    )
    qid2 = result(
        submitter2.submit(
            user, Envelope(user, ["bob@example.test"]), b"From: alice@example.test\n\nx\n"
        )
    )
    assert spool2.list("incoming") == []
    got = store2.get(qid2)
    assert (got.rule, got.direction) == ("dlp-rule", "outbound")


def test_policy_message_commit_failure_of_the_rewrite_aborts(tmp_path: Path) -> None:
    class Broken:
        queue_id = "0" * 16
        size = 0
        message_id = ""
        aborted = False

        def rewrite_header(self, edit: Any) -> None:
            raise OSError(28, "No space left on device")

        def abort(self) -> None:
            self.aborted = True

    inner = Broken()
    msg = PolicyMessage(inner)  # type: ignore[arg-type]
    msg.decide(Verdict.add_headers(("X", "1")))
    failure = result(msg.commit(Envelope("a@b", ["c@d"])))
    assert isinstance(failure.value, OSError) and inner.aborted


def test_a_quarantined_submission_gets_its_header_completed(tmp_path: Path) -> None:
    """A message whose header never ended (no body) is completed (Message-ID, Date) before
    it is kept, as it would have been queued."""
    from mailgw.policy.submission import HeaderCompleter

    clock = Clock()
    clock.advance(1_700_000_000)
    policy = SubmissionPolicy(default_directory(), "mail.example.test", clock, 10, 100)
    spool = Spool(str(tmp_path / "spool"))
    store = QuarantineStore(str(tmp_path / "q"))
    completer = HeaderCompleter(spool.begin(), policy, "alice@example.test")
    msg = PolicyMessage(completer, store, "outbound")
    msg.write(b"From: alice@example.test\r\nSubject: no body")
    msg.decide(Verdict.quarantine("q", "r"))
    qid = result(msg.commit(Envelope("alice@example.test", ["bob@example.test"])))
    data = Path(store.content_path(qid)).read_bytes()
    assert b"\r\nMessage-ID: <" in data and b"\r\nDate: " in data
    assert store.get(qid).size == len(data)
