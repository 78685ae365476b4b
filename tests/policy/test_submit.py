"""The submit path without SMTP (webmail, OA API): the submission checks, the shared pipeline,
content checks before the commit, and no import of ``mailgw.smtp``."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from twisted.internet import defer
from twisted.internet.task import Clock
from zope.interface import implementer

from mailgw.model import Envelope
from mailgw.model.reply import R, Reply
from mailgw.model.verdict import ACCEPT, Verdict
from mailgw.policy import CheckContext, ICheck, Stage
from mailgw.policy.submission import SubmissionPolicy, submission_pipeline
from mailgw.policy.submit import SubmissionError, Submitter
from mailgw.spool import Spool
from tests.smtp.fakes import FakeDirectory

VIRUS = Reply(554, "5.7.0", "Message refused: virus found (Test-Signature)")
ROOT = Path(__file__).resolve().parents[2]


def directory() -> FakeDirectory:
    return FakeDirectory(
        {"example.test"},
        {"alice@example.test": ["alice@example.test"], "bob@example.test": ["bob@example.test"]},
    )


@implementer(ICheck)
class ContentScan:
    """A DATA check that reads the received bytes back and refuses a marker."""

    name = "scan"
    stages = frozenset({Stage.DATA})

    def __init__(self) -> None:
        self.seen: list[bytes] = []

    def check(self, context: CheckContext) -> Verdict:
        assert context.message is not None and context.envelope is not None
        with context.message.open_content() as f:
            content = f.read()
        self.seen.append(content)
        return Verdict.reject(VIRUS) if b"X5O!P%@AP" in content else ACCEPT


@implementer(ICheck)
class Scripted:
    def __init__(self, stages: set[Stage], answer: Any) -> None:
        self.name = "scripted"
        self.stages = frozenset(stages)
        self.answer = answer

    def check(self, context: CheckContext) -> Any:
        return self.answer


def result(d: defer.Deferred[Any]) -> Any:
    box: list[Any] = []
    d.addBoth(box.append)
    assert box, "the Deferred has not fired"
    return box[0]


def setup(tmp_path: Path, *extra: ICheck) -> tuple[Submitter, Spool]:
    clock = Clock()
    clock.advance(1_700_000_000)
    policy = SubmissionPolicy(directory(), "mail.example.test", clock, 3, 2)
    spool = Spool(str(tmp_path / "spool"))
    return Submitter(policy, spool, submission_pipeline(policy, list(extra))), spool


def content(spool: Spool, queue_id: str) -> bytes:
    with spool.load(queue_id).open_content() as f:
        return f.read()


def leftovers(spool: Spool) -> list[str]:
    return os.listdir(spool.tmp_dir) + spool.list("incoming")


def test_submits_without_smtp_into_the_spool(tmp_path: Path) -> None:
    scan = ContentScan()
    submitter, spool = setup(tmp_path, scan)
    envelope = Envelope("alice@example.test", ["bob@example.test", "x@far.example"])
    qid = result(
        submitter.submit(
            "alice@example.test", envelope, b"From: alice@example.test\nSubject: s\n\nhello\n"
        )
    )
    assert spool.list("incoming") == [qid]
    queued = spool.load(qid).envelope
    assert queued.protocol == "webmail" and queued.recipients == envelope.recipients
    data = content(spool, qid)
    assert data.startswith(
        f"Received: by mail.example.test (mailgw) with webmail id {qid}"
        " (authenticated user alice@example.test);\r\n".encode()
    )
    assert b"\r\nMessage-ID: <" in data and b"\r\nDate: " in data
    assert data.endswith(b"\r\n\r\nhello\r\n")
    assert scan.seen == [data]  # the DATA check read exactly what was then committed
    assert queued.size == len(data)


def test_a_content_check_refuses_before_the_commit(tmp_path: Path) -> None:
    submitter, spool = setup(tmp_path, ContentScan())
    envelope = Envelope("alice@example.test", ["bob@example.test"])
    message = b"From: alice@example.test\n\nX5O!P%@AP[4\\PZX54(P^)7CC)7}$EICAR\n"
    failure = result(submitter.submit("alice@example.test", envelope, message))
    assert isinstance(failure.value, SubmissionError) and failure.value.reply == VIRUS
    assert leftovers(spool) == []  # aborted: nothing queued, nothing left in tmp/
    # a refused message does not count against the hourly limit (2)
    for _ in range(2):
        ok = b"From: alice@example.test\n\nclean\n"
        assert isinstance(result(submitter.submit("alice@example.test", envelope, ok)), str)


@pytest.mark.parametrize(
    ("stage", "answer", "reply"),
    [
        (Stage.CONNECT, Verdict.reject(R.RELAY_DENIED), R.RELAY_DENIED),
        (Stage.MAIL, defer.succeed(Verdict.tempfail(R.RATE_LIMITED)), R.RATE_LIMITED),
        (Stage.RCPT, Verdict.reject(R.UNKNOWN_USER), R.UNKNOWN_USER),
        (Stage.DATA, defer.succeed(Verdict.reject(VIRUS)), VIRUS),
        (Stage.DATA, Verdict.quarantine("suspicious"), R.LOCAL_ERROR),
    ],
)
def test_every_stage_runs_and_refuses(
    tmp_path: Path, stage: Stage, answer: Any, reply: Reply
) -> None:
    submitter, spool = setup(tmp_path, Scripted({stage}, answer))
    envelope = Envelope("alice@example.test", ["bob@example.test"])
    failure = result(
        submitter.submit("alice@example.test", envelope, b"From: alice@example.test\n\nx\n")
    )
    assert isinstance(failure.value, SubmissionError) and failure.value.reply == reply
    assert leftovers(spool) == []


def test_headers_added_before_data_follow_the_received_header(tmp_path: Path) -> None:
    submitter, spool = setup(
        tmp_path, Scripted({Stage.RCPT}, Verdict.add_headers(("X-Checked", "yes")))
    )
    envelope = Envelope("alice@example.test", ["bob@example.test"])
    qid = result(
        submitter.submit(
            "alice@example.test", envelope, b"From: alice@example.test\n\nx\n", protocol="api"
        )
    )
    data = content(spool, qid)
    received, _, rest = data.partition(b"\r\n\t")
    assert b" with api id " in received
    assert rest.split(b"\r\n", 2)[1] == b"X-Checked: yes"
    assert spool.load(qid).envelope.protocol == "api"


def test_submit_waits_for_an_asynchronous_check(tmp_path: Path) -> None:
    later: defer.Deferred[Verdict] = defer.Deferred()
    submitter, spool = setup(tmp_path, Scripted({Stage.DATA}, later))
    d = submitter.submit(
        "alice@example.test",
        Envelope("alice@example.test", ["bob@example.test"]),
        b"From: alice@example.test\n\nx\n",
    )
    box: list[Any] = []
    d.addBoth(box.append)
    assert box == [] and spool.list("incoming") == []
    later.callback(ACCEPT)
    assert spool.list("incoming") == box


def test_the_policy_package_does_not_import_smtp() -> None:
    code = (
        "import sys\n"
        "import mailgw.policy, mailgw.policy.submit, mailgw.policy.submission, mailgw.policy.mx\n"
        "import mailgw.model.verdict\n"
        "bad = sorted(m for m in sys.modules if m.startswith(('mailgw.smtp', 'mailgw.imap',"
        " 'mailgw.pop3', 'mailgw.service', 'mailgw.relay')))\n"
        "print(','.join(bad))\n"
        "assert 'mailgw.policy.submit' in sys.modules\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True
    )
    assert out.stdout.strip() == ""


def test_the_node_gives_the_webmail_a_submitter_sharing_the_smtp_pipeline(
    tmp_path: Path,
) -> None:
    from mailgw.config import load
    from mailgw.runtime.threads import run_inline
    from mailgw.service import Node
    from mailgw.smtp.roles.submission import SubmissionFactory

    path = tmp_path / "mailgw.ini"
    path.write_text(
        f"[server]\ndata_dir = {tmp_path}/data\nhostname = mail.example.test\n"
        "[mx]\nenabled = no\n[pop3]\nenabled = no\n[imap]\nenabled = no\n"
        "[delivery]\nenabled = no\n"
        "[submission]\nenabled = yes\nlisten = tcp:0:interface=127.0.0.1\n"
    )
    node = Node(load(str(path)), Clock())
    node.directory.add_domain("example.test")
    node.directory.add_user("alice@example.test", "secret")
    factories = []
    for child in node:
        factory = getattr(child, "factory", None)
        while factory is not None and not isinstance(factory, SubmissionFactory):
            factory = getattr(factory, "wrappedFactory", None)  # guard, TLS, PROXY layers
        if factory is not None:
            factories.append(factory)
    assert factories
    submitter = node.submitter
    assert isinstance(submitter, Submitter)
    for factory in factories:
        assert factory.role.pipeline is submitter.pipeline
        assert factory.policy is submitter.policy is node.submission_policy
    node.spool.run = run_inline  # the node's thread pool runs only once the node is started
    envelope = Envelope("alice@example.test", ["alice@example.test"])
    qid = result(
        submitter.submit("alice@example.test", envelope, b"From: alice@example.test\n\nhi\n")
    )
    assert node.spool.list("incoming") == [qid]
    failure = result(
        submitter.submit(
            "alice@example.test",
            Envelope("bob@example.test", ["alice@example.test"]),
            b"From: alice@example.test\n\nhi\n",
        )
    )
    assert failure.value.reply == R.SENDER_NOT_OWNED


def test_a_submitted_message_is_tracked_with_its_user_and_verdicts(tmp_path: Path) -> None:
    from mailgw.tracking import Tracker
    from mailgw.tracking.timeline import lookup

    submitter, spool = setup(tmp_path)
    submitter.tracker = Tracker(str(tmp_path / "t.sqlite"))
    envelope = Envelope("alice@example.test", ["bob@example.test"])
    message = b"From: alice@example.test\nMessage-ID: <w1@example.test>\n\nhi\n"
    qid = result(submitter.submit("alice@example.test", envelope, message, client_ip="192.0.2.9"))
    submitter.tracker.close()
    [m] = lookup(str(tmp_path / "t.sqlite"), "<w1@example.test>")
    assert m["queue_id"] == qid and [e["kind"] for e in m["events"]] == ["received", "policy"]
    received, policy = m["events"]
    assert received["role"] == "webmail" and received["user"] == "alice@example.test"
    assert received["client"] == "192.0.2.9" and received["size"] == spool.load(qid).envelope.size
    stages = [v["stage"] for v in policy["verdicts"]]
    assert stages[0] in ("connect", "mail") and "rcpt" in stages and stages[-1] == "data"


def test_the_webmail_submitter_runs_the_rules_and_quarantines(tmp_path: Path) -> None:
    """With ``[policy] rules_file`` the node's submitter (webmail, OA API) runs the same
    rules as SMTP submission and keeps quarantined mail in the node's quarantine."""
    from mailgw.config import load
    from mailgw.runtime.threads import run_inline
    from mailgw.service import Node

    (tmp_path / "rules.txt").write_text(
        "rule no-secrets\n match body /top secret/i\n action quarantine secret words\n"
        "rule tag\n match subject report\n action class bulk\n"
    )
    path = tmp_path / "mailgw.ini"
    path.write_text(
        f"[server]\ndata_dir = {tmp_path}/data\nhostname = mail.example.test\n"
        "[mx]\nenabled = no\n[pop3]\nenabled = no\n[imap]\nenabled = no\n"
        "[delivery]\nenabled = no\n"
        "[submission]\nenabled = yes\nlisten = tcp:0:interface=127.0.0.1\n"
        "[policy]\nrules_file = rules.txt\n"
    )
    node = Node(load(str(path)), Clock())
    node.directory.add_domain("example.test")
    node.directory.add_user("alice@example.test", "secret")
    assert node.policy.rules in node.submitter.pipeline.checks
    node.spool.run = run_inline
    node.policy.quarantine.run = run_inline
    alice = "alice@example.test"
    qid = result(
        node.submitter.submit(
            alice, Envelope(alice, [alice]), b"From: alice@example.test\nSubject: report\n\nhi\n"
        )
    )
    assert node.spool.load(qid).envelope.message_class == "bulk"
    qid2 = result(
        node.submitter.submit(
            alice, Envelope(alice, [alice]), b"From: alice@example.test\n\nTop Secret plans\n"
        )
    )
    kept = node.policy.quarantine.get(qid2)
    assert (kept.rule, kept.reason, kept.direction) == ("no-secrets", "secret words", "outbound")
    assert node.spool.list("incoming") == [qid]
