"""SMTP roles run their checks through the policy pipeline: a DATA-stage check reads the
received bytes back (``open_content``) and refuses before the 250; CONNECT runs once, at the
first MAIL; a check may answer later (the session waits); headers added before DATA."""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any

from twisted.internet import defer
from twisted.internet.address import IPv4Address
from twisted.internet.task import Clock
from zope.interface import implementer

from mailgw.config import MXConfig
from mailgw.model.reply import R, Reply
from mailgw.model.verdict import ACCEPT, Verdict
from mailgw.policy import CheckContext, ICheck, Stage
from mailgw.smtp.protocol import SMTPServer
from mailgw.smtp.roles.mx import MXFactory
from mailgw.spool import Spool
from tests.smtp.fakes import Client, TLSStringTransport, default_directory

VIRUS = Reply(554, "5.7.0", "Message refused: virus found (Test-Signature)")
EICAR = "X5O!P%@AP[4\\PZX54(P^)7CC)7}$EICAR-STANDARD-ANTIVIRUS-TEST-FILE!$H+H*"


@implementer(ICheck)
class ContentScan:
    name = "scan"
    stages = frozenset({Stage.DATA})

    def __init__(self) -> None:
        self.seen: list[tuple[bytes, list[str]]] = []

    def check(self, context: CheckContext) -> Verdict:
        assert context.message is not None and context.envelope is not None
        with context.message.open_content() as f:
            data = f.read()
        self.seen.append((data, list(context.envelope.recipients)))
        return Verdict.reject(VIRUS) if EICAR.encode() in data else ACCEPT


@implementer(ICheck)
class Scripted:
    def __init__(self, stages: set[Stage], answer: Any) -> None:
        self.name = "scripted"
        self.stages = frozenset(stages)
        self.answer = answer
        self.calls: list[CheckContext] = []

    def check(self, context: CheckContext) -> Any:
        self.calls.append(context)
        return self.answer() if callable(self.answer) else self.answer


class Server:
    """An MX factory over a real spool on disk, sessions over StringTransport."""

    def __init__(self, tmp_path: Path, *checks: ICheck, memory_limit: int = 256 * 1024) -> None:
        self.clock = Clock()
        self.clock.advance(1_700_000_000)
        self.spool = Spool(str(tmp_path / "spool"), memory_limit=memory_limit)
        self.factory = MXFactory(
            dataclasses.replace(MXConfig()),
            "mx.example.test",
            self.spool,
            default_directory(),
            self.clock,
            extra_checks=checks,
        )

    def connect(self) -> Client:
        addr = IPv4Address("TCP", "192.0.2.7", 40000)
        protocol = self.factory.buildProtocol(addr)
        assert isinstance(protocol, SMTPServer)
        protocol.makeConnection(TLSStringTransport(peerAddress=addr))
        client = Client(protocol, protocol.transport)
        assert client.lines() == ["220 mx.example.test ESMTP mailgw"]
        assert client.codes("EHLO c.example\r\n") == ["250"]
        return client

    def content(self, queue_id: str) -> bytes:
        with self.spool.load(queue_id).open_content() as f:
            return f.read()

    def leftovers(self) -> list[str]:
        return os.listdir(self.spool.tmp_dir)


def transaction(client: Client, body: str) -> list[str]:
    assert client.codes("MAIL FROM:<x@far.example>\r\n") == ["250"]
    assert client.codes("RCPT TO:<alice@example.test>\r\n") == ["250"]
    assert client.codes("DATA\r\n") == ["354"]
    return client.send(f"Subject: t\r\n\r\n{body}\r\n.\r\n")


def test_a_content_check_refuses_before_the_250(tmp_path: Path) -> None:
    scan = ContentScan()
    s = Server(tmp_path, scan)
    c = s.connect()
    assert transaction(c, f"an attachment\r\n{EICAR}") == [VIRUS.format()]
    assert s.spool.list("incoming") == [] and s.leftovers() == []
    data, recipients = scan.seen[0]
    assert data.startswith(b"Received: from c.example") and data.endswith(EICAR.encode() + b"\r\n")
    assert recipients == ["alice@example.test"]
    # the session goes on; a clean message is queued with exactly the bytes checked
    (reply,) = transaction(c, "clean")
    assert reply.startswith("250 2.0.0 OK queued as ")
    qid = reply.rsplit(" ", 1)[1]
    assert s.spool.list("incoming") == [qid]
    assert s.content(qid) == scan.seen[1][0]


def test_a_content_check_reads_a_message_spilled_to_disk(tmp_path: Path) -> None:
    scan = ContentScan()
    s = Server(tmp_path, scan, memory_limit=4096)
    c = s.connect()
    filler = "".join(f"line {i:06d} {'y' * 60}\r\n" for i in range(2000))  # ~150 KB
    assert transaction(c, filler + EICAR) == [VIRUS.format()]
    assert len(scan.seen[0][0]) > 100_000
    assert s.spool.list("incoming") == [] and s.leftovers() == []


def test_a_check_answering_later_holds_the_reply(tmp_path: Path) -> None:
    pending: list[defer.Deferred[Verdict]] = []

    def later() -> defer.Deferred[Verdict]:
        d: defer.Deferred[Verdict] = defer.Deferred()
        pending.append(d)
        return d

    s = Server(tmp_path, Scripted({Stage.DATA}, later))
    c = s.connect()
    assert transaction(c, "x") == []  # no answer while the check works
    assert c.protocol.transport.producerState == "paused"
    pending[0].callback(Verdict.tempfail(Reply(451, "4.7.0", "Scanner busy, try later")))
    assert c.lines() == ["451 4.7.0 Scanner busy, try later"]
    assert s.spool.list("incoming") == []


def test_connect_stage_runs_once_at_the_first_mail(tmp_path: Path) -> None:
    dnsbl = Scripted({Stage.CONNECT}, Verdict.reject(Reply(554, "5.7.1", "Listed")))
    s = Server(tmp_path, dnsbl)
    c = s.connect()
    assert dnsbl.calls == []  # not at connect: delayed to the first MAIL
    assert c.send("MAIL FROM:<x@far.example>\r\n") == ["554 5.7.1 Listed"]
    assert c.send("MAIL FROM:<y@far.example>\r\n") == ["554 5.7.1 Listed"]
    assert len(dnsbl.calls) == 1 and dnsbl.calls[0].client_ip == "192.0.2.7"
    assert dnsbl.calls[0].helo == "c.example" and dnsbl.calls[0].protocol == "smtp"


def test_headers_added_before_data_follow_the_received_header(tmp_path: Path) -> None:
    tag = Scripted({Stage.CONNECT}, Verdict.add_headers(("X-Listed", "no")))
    rcpt = Scripted({Stage.RCPT}, Verdict.add_headers(("X-Rcpt", "checked")))
    s = Server(tmp_path, tag, rcpt)
    c = s.connect()
    for _ in range(2):  # the connect stage's header goes into every message of the session
        (reply,) = transaction(c, "x")
        data = s.content(reply.rsplit(" ", 1)[1])
        head = data.split(b"\r\n\r\n", 1)[0]
        lines = head.split(b"\r\n")
        assert lines[0].startswith(b"Received: ") and lines[-3:] == [
            b"X-Listed: no",
            b"X-Rcpt: checked",
            b"Subject: t",
        ]
    assert len(tag.calls) == 1 and len(rcpt.calls) == 2


def test_a_refused_recipient_leaves_no_annotation(tmp_path: Path) -> None:
    before: list[list[str]] = []

    def per_recipient() -> Verdict:
        ctx = rcpt.calls[-1]
        assert ctx.recipient is not None
        before.append([str(a) for a in ctx.recipients])
        if ctx.recipient.local == "bob":
            return Verdict.reject(R.UNKNOWN_USER)
        return Verdict.add_headers(("X-Ok", ctx.recipient.local))

    rcpt = Scripted({Stage.RCPT}, per_recipient)
    s = Server(tmp_path, rcpt)
    c = s.connect()
    c.send("MAIL FROM:<x@far.example>\r\n")
    assert c.send("RCPT TO:<bob@example.test>\r\n") == [R.UNKNOWN_USER.format()]
    assert c.codes("RCPT TO:<alice@example.test>\r\n") == ["250"]
    assert c.codes("RCPT TO:<carol@other.test>\r\nDATA\r\n") == ["250", "354"]
    (reply,) = c.send("Subject: t\r\n\r\nx\r\n.\r\n")
    data = s.content(reply.rsplit(" ", 1)[1])
    assert b"\r\nX-Ok: alice\r\nX-Ok: carol\r\n" in data and b"bob" not in data
    assert before == [[], [], ["alice@example.test"]]  # recipients accepted before each RCPT


def test_each_queued_message_is_tracked_with_every_verdict(tmp_path: Path) -> None:
    """``received`` then ``policy`` per queued message; the CONNECT stage (run once) is in the
    trail of every message of the session; a later check (here a DATA scan) shows up without
    any change to the role."""
    from mailgw.tracking import Tracker
    from mailgw.tracking.timeline import lookup

    path = str(tmp_path / "t.sqlite")
    s = Server(tmp_path, Scripted({Stage.CONNECT}, ACCEPT), ContentScan())
    s.factory.role.tracker = Tracker(path)
    c = s.connect()
    qids = []
    for i in range(2):
        (reply,) = transaction(c, f"clean {i}")
        qids.append(reply.rsplit(" ", 1)[1])
    s.factory.role.tracker.close()
    for qid in qids:
        [m] = lookup(path, qid)
        received, policy = m["events"]
        assert (received["kind"], policy["kind"]) == ("received", "policy")
        assert received["role"] == "mx" and received["client"] == "192.0.2.7"
        assert received["helo"] == "c.example" and received["sender"] == "x@far.example"
        assert received["recipients"] == ["alice@example.test"] and received["size"] > 0
        assert [(v["stage"], v["check"]) for v in policy["verdicts"]] == [
            ("connect", "scripted"),
            ("rcpt", "recipient-limit"),
            ("rcpt", "local-recipient"),
            ("data", "scan"),
        ]
    assert [m["queue_id"] for m in lookup(path, "x@far.example")] == qids


def test_refusals_are_tracked_with_the_check_and_reply(tmp_path: Path) -> None:
    """A refused recipient (before DATA: filed under the session) and a message refused at
    DATA (under its queue ID) are ``rejected`` events, found by address."""
    from mailgw.tracking import Tracker
    from mailgw.tracking.timeline import lookup

    path = str(tmp_path / "t.sqlite")
    s = Server(tmp_path, ContentScan())
    s.factory.role.tracker = Tracker(path)
    c = s.connect()
    assert c.codes("MAIL FROM:<x@far.example>\r\n") == ["250"]
    assert c.codes("RCPT TO:<nobody@example.test>\r\n") == ["550"]
    assert c.codes("RCPT TO:<alice@example.test>\r\n") == ["250"]
    assert c.codes("DATA\r\n") == ["354"]
    assert c.send(f"Subject: t\r\n\r\n{EICAR}\r\n.\r\n") == [VIRUS.format()]
    s.factory.role.tracker.close()
    [rcpt] = lookup(path, "nobody@example.test")
    assert rcpt["queue_id"].startswith("session:") and rcpt["status"] == "rejected"
    [event] = rcpt["events"]
    assert event["stage"] == "rcpt" and event["check"] == "local-recipient"
    assert event["reply"].startswith("550 5.1.1") and event["client"] == "192.0.2.7"
    assert event["recipients"] == ["nobody@example.test"] and event["sender"] == "x@far.example"
    [data] = [m for m in lookup(path, "alice@example.test") if m["queue_id"] != rcpt["queue_id"]]
    [event] = data["events"]
    assert event["kind"] == "rejected" and event["stage"] == "data" and event["check"] == "scan"
    assert event["reply"] == VIRUS.format() and event["recipients"] == ["alice@example.test"]
    assert s.spool.list("incoming") == []  # nothing queued under that ID
