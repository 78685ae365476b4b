"""The rules file and ``RulesCheck``: the parser and its errors, every match type's branches,
every action, stages, first-match-wins / continue, the rate counter, the hit counter."""

from __future__ import annotations

import io
import zipfile
from email.message import EmailMessage
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import REGISTRY
from twisted.internet import defer
from twisted.internet.task import Clock
from zope.interface import implementer
from zope.interface.verify import verifyObject

from mailgw.model import Address, Envelope
from mailgw.model.reply import R, Reply
from mailgw.model.verdict import ACCEPT, Disposition, Verdict
from mailgw.policy import CheckContext, ICheck, Stage
from mailgw.policy.content import ContentLimits
from mailgw.policy.ratelimit import IRateCounter, MemoryRateCounter
from mailgw.policy.rules import (
    AddressPattern,
    RulesCheck,
    RulesError,
    TextPattern,
    load_rules,
    parse_rules,
    rules_check,
)
from mailgw.testing.deferreds import fired

LOCAL = {"example.test"}


class Message:
    """An IIncomingMessage enough for the rules: queue_id, size, open_content."""

    def __init__(self, data: bytes, queue_id: str = "0000000000000QID") -> None:
        self.data = data
        self.queue_id = queue_id
        self.size = len(data)
        self.opened = 0

    def open_content(self) -> io.BytesIO:
        self.opened += 1
        return io.BytesIO(self.data)


def check(text: str, counter: Any = None, limits: ContentLimits | None = None) -> RulesCheck:
    rules = parse_rules(text, "t.rules", counter)
    return RulesCheck(rules, lambda d: d in LOCAL, limits or ContentLimits())


def ctx(
    protocol: str = "smtp",
    sender: str = "a@far.example",
    rcpts: tuple[str, ...] = (),
    recipient: str | None = None,
    ip: str = "192.0.2.7",
    user: str | None = None,
    data: bytes | None = None,
) -> CheckContext:
    c = CheckContext(protocol=protocol, client_ip=ip, user=user, sender=sender)
    c.recipients = [Address.parse(r) for r in rcpts]
    c.recipient = Address.parse(recipient) if recipient else None
    if data is not None:
        c.message = Message(data)  # type: ignore[assignment]
        c.envelope = Envelope(sender, list(rcpts), size=len(data))
    return c


def at(rc: RulesCheck, stage: Stage, c: CheckContext) -> Verdict:
    c.stage = stage
    result = rc.check(c)
    if isinstance(result, defer.Deferred):
        result = fired(result)
    assert isinstance(result, Verdict)
    return result


def hit(text: str, stage: Stage, c: CheckContext) -> bool:
    """Does the one rule ``text`` (with ``action add-header X-Hit: 1``) match?"""
    rc = check("rule r\n" + text + "\naction add-header X-Hit: 1\n")
    return at(rc, stage, c).headers == (("X-Hit", "1"),)


def mail(subject: str = "s", body: str = "hello\n", **headers: str) -> EmailMessage:
    m = EmailMessage()
    m["From"] = "a@far.example"
    m["To"] = "b@example.test"
    m["Subject"] = subject
    for k, v in headers.items():
        m[k.replace("_", "-")] = v
    m.set_content(body)
    return m


def raw(m: EmailMessage) -> bytes:
    return m.as_bytes().replace(b"\n", b"\r\n")


# -- the parser -----------------------------------------------------------------------------------


def test_parse_and_stages() -> None:
    rules = parse_rules(
        "# comment\n\nrule a\n match sender x@y\n action reject\n"
        "rule b\n  match recipient @example.test\n  action class spam\n  action continue\n"
        "rule c\n match subject hi\n match client-ip 10.0.0.0/8\n action quarantine why\n"
        "rule d\n match all\n action accept\n"
    )
    assert [(r.name, r.stage, r.stop) for r in rules] == [
        ("a", Stage.MAIL, True),
        ("b", Stage.RCPT, False),
        ("c", Stage.DATA, True),
        ("d", Stage.MAIL, True),
    ]
    assert rules[0].verdict.reply == Reply(550, "5.7.1", "Message refused by security policy")
    assert rules[1].verdict.message_class == "spam"
    assert rules[2].verdict.reason == "why" and rules[2].verdict.rule == "c"
    assert rules[3].verdict is ACCEPT and rules[3].action_label == "accept"
    assert "c [data] match subject hi; client-ip 10.0.0.0/8" in rules[2].describe()


@pytest.mark.parametrize(
    ("text", "line", "message"),
    [
        ("match all\n", 1, "match before the first rule line"),
        ("rule\n", 1, "rule takes one NAME"),
        ("rule a b\n", 1, "rule takes one NAME"),
        ("rule a\nmatch all\naction accept\nrule a\n", 4, "rule a is defined twice"),
        ("rule a\naction accept\n", 1, "rule a has no match line"),
        ("rule a\nmatch all\n", 1, "rule a has no action line"),
        ("rule a\nmatch bogus x\n", 2, "unknown match type 'bogus'"),
        ("rule a\nmatch\n", 2, "match needs a type"),
        ("rule a\nmatch not\n", 2, "match not needs a type"),
        ("rule a\nfoo bar\n", 2, "expected rule, match or action"),
        ("rule a\nmatch all\naction explode\n", 3, "unknown action 'explode'"),
        ("rule a\nmatch all x\n", 2, "all takes no arguments"),
        ("rule a\nmatch sender\n", 2, "sender needs at least one argument"),
        ("rule a\nmatch sender @\n", 2, "bad address pattern"),
        ("rule a\nmatch client-ip 10.0.0.300\n", 2, "client-ip"),
        ("rule a\nmatch direction sideways\n", 2, "direction takes inbound or outbound"),
        ("rule a\nmatch size big\n", 2, "size takes an operator"),
        ("rule a\nmatch size > lots\n", 2, "size:"),
        ("rule a\nmatch recipients > -1\n", 2, "recipients"),
        ("rule a\nmatch rate 10 per user\n", 2, "rate takes N/WINDOW"),
        ("rule a\nmatch rate 10/forever per user\n", 2, "rate:"),
        ("rule a\nmatch rate 10/1h per planet\n", 2, "rate takes"),
        ("rule a\nmatch rate 10/0s per user\n", 2, "WINDOW more than 0"),
        ("rule a\nmatch header X-A\n", 2, "header takes a field name"),
        ("rule a\nmatch header Bad:Name x\n", 2, "bad header field name"),
        ("rule a\nmatch subject /([/\n", 2, "bad regex"),
        ("rule a\nmatch subject /x/q\n", 2, "unknown regex flag"),
        ("rule a\nmatch body /never closed\n", 2, "is not closed"),
        ('rule a\nmatch subject "unclosed\n', 2, "cannot split the line"),
        ("rule a\nmatch dlp passport\n", 2, "dlp takes cn-id or card-number"),
        ("rule a\nmatch dlp cn-id x\n", 2, "dlp:"),
        ("rule a\nmatch attachment-type exe pdfx\n", 2, "unknown attachment type 'pdfx'"),
        ("rule a\nmatch mime-error x\n", 2, "mime-error takes no arguments"),
        ("rule a\nmatch all\naction reject 450\n", 3, "reject needs a 5xx code"),
        ("rule a\nmatch all\naction tempfail 550\n", 3, "tempfail needs a 4xx code"),
        ("rule a\nmatch all\naction reject 550 4.7.1 x\n", 3, "does not go with 550"),
        ("rule a\nmatch all\naction add-header\n", 3, "add-header takes NAME: VALUE"),
        ("rule a\nmatch all\naction add-header X-A\n", 3, "add-header takes NAME: VALUE"),
        ("rule a\nmatch all\naction add-header Bad Name: v\n", 3, "invalid header field name"),
        ("rule a\nmatch all\naction tag-subject\n", 3, "invalid subject tag"),
        ("rule a\nmatch all\naction bcc nobody\n", 3, "bcc"),
        ("rule a\nmatch all\naction redirect\n", 3, "redirect"),
        ("rule a\nmatch all\naction class a b\n", 3, "class takes one name"),
        ("rule a\nmatch all\naction accept now\n", 3, "accept takes no arguments"),
        ("rule a\nmatch all\naction route nowhere\n", 3, "route: unknown channel 'nowhere'"),
        (
            "rule a\nmatch all\naction reject\naction quarantine q\n",
            1,
            "reject, tempfail and quarantine exclude each other",
        ),
    ],
)
def test_errors_name_file_and_line(text: str, line: int, message: str) -> None:
    with pytest.raises(RulesError) as e:
        parse_rules(text, "rules.txt", channels=["sdn"])
    assert str(e.value).startswith(f"rules.txt:{line}: ")
    assert message in str(e.value)


def test_load_rules_reports_unreadable_files(tmp_path: Path) -> None:
    with pytest.raises(RulesError, match=r"missing: cannot read the rules file"):
        load_rules(str(tmp_path / "missing"))
    binary = tmp_path / "bin"
    binary.write_bytes(b"\xff\xfe\x00")
    with pytest.raises(RulesError, match="not UTF-8"):
        load_rules(str(binary))
    good = tmp_path / "good"
    good.write_text("rule a\n match all\n action accept\n")
    assert [r.name for r in load_rules(str(good))] == ["a"]
    rc = rules_check(str(good), lambda d: True)
    assert verifyObject(ICheck, rc)
    with pytest.raises(TypeError):
        rules_check(str(good), lambda d: True, counter=object())


def test_actions_build_their_verdicts() -> None:
    rules = parse_rules(
        "rule a\nmatch all\n"
        "action reject 554 5.7.1 Go away now\n"
        "rule b\nmatch all\naction tempfail\n"
        "rule c\nmatch all\naction tempfail 421\n"
        "rule d\nmatch all\n"
        "action add-header X-One: 1\naction add-header X-Two two words\n"
        "action tag-subject [EXT]\naction bcc a@x.test b@x.test\naction redirect r@x.test\n"
        "action class bulk\naction route sdn\naction folder Junk\n",
        channels=["sdn"],
    )
    assert rules[0].verdict.reply == Reply(554, "5.7.1", "Go away now")
    assert rules[1].verdict.reply == Reply(451, "4.7.1", rules[1].verdict.reply.text)  # type: ignore[union-attr]
    assert rules[2].verdict.reply == Reply(421, "4.7.1", rules[2].verdict.reply.text)  # type: ignore[union-attr]
    v = rules[3].verdict
    assert v.headers == (("X-One", "1"), ("X-Two", "two words"))
    assert v.subject_tags == ("[EXT]",) and v.bcc == ("a@x.test", "b@x.test")
    assert (v.redirect, v.message_class, v.channel, v.folder) == (
        ("r@x.test",),
        "bulk",
        "sdn",
        "Junk",
    )
    assert rules[3].action_label == "add-header+tag-subject+bcc+redirect+class+route+folder"


# -- patterns -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("pattern", "yes", "no"),
    [
        ("a@b.example", ["A@B.example"], ["a@c.example", "xa@b.example"]),
        ("@b.example", ["x@b.example", "y@B.EXAMPLE"], ["x@sub.b.example"]),
        ("b.example", ["x@b.example"], ["x@c.example"]),
        (".b.example", ["x@b.example", "x@sub.b.example"], ["x@bb.example"]),
        ("@.b.example", ["x@deep.sub.b.example"], ["x@b.exampl"]),
        ("*@*.cn", ["x@a.cn", "y@b.c.CN"], ["x@cn.com"]),
        ("*.cn", ["x@a.cn"], ["x@a.com"]),
        ("/^bulk-[0-9]+@/", ["bulk-1@x", "BULK-22@y"], ["xbulk-1@x", "bulk-@x"]),
        ("<>", [""], ["a@b"]),
    ],
)
def test_address_patterns(pattern: str, yes: list[str], no: list[str]) -> None:
    p = AddressPattern.parse(pattern)
    assert all(p.test(a) for a in yes), pattern
    assert not any(p.test(a) for a in no), pattern


def test_text_patterns() -> None:
    kw = TextPattern.parse("Cheap Pills")
    assert kw.test("buy CHEAP pills now") and not kw.test("cheap-pills")
    rx = TextPattern.parse("/^re: .*urgent$/i")
    assert rx.test("RE: very URGENT") and not rx.test("fw: urgent")
    multi = TextPattern.parse("/^line2$/m")
    assert multi.test("line1\nline2\n")
    dot = TextPattern.parse("/a.b/s")
    assert dot.test("a\nb")
    case = TextPattern.parse("/Exact/")
    assert case.test("Exact") and not case.test("exact")


# -- envelope matches -----------------------------------------------------------------------------


def test_sender_user_authenticated_direction_client_ip() -> None:
    assert hit("match sender @far.example", Stage.MAIL, ctx())
    assert not hit("match sender @near.example", Stage.MAIL, ctx())
    assert hit("match not sender @near.example", Stage.MAIL, ctx())
    assert hit("match sender <>", Stage.MAIL, ctx(sender=""))
    assert hit("match user alice@example.test", Stage.MAIL, ctx(user="alice@example.test"))
    assert not hit("match user alice@example.test", Stage.MAIL, ctx())
    assert hit("match user @example.test", Stage.MAIL, ctx(user="bob@example.test"))
    assert hit("match authenticated", Stage.MAIL, ctx(user="bob@example.test"))
    assert hit("match not authenticated", Stage.MAIL, ctx())
    assert hit("match direction inbound", Stage.MAIL, ctx(protocol="smtp"))
    assert hit("match direction outbound", Stage.MAIL, ctx(protocol="submission"))
    assert hit("match direction outbound", Stage.MAIL, ctx(protocol="webmail"))
    assert not hit("match direction outbound", Stage.MAIL, ctx(protocol="smtp"))
    assert hit("match client-ip 192.0.2.0/24", Stage.MAIL, ctx())
    assert hit("match client-ip 10.0.0.1 192.0.2.7", Stage.MAIL, ctx())
    assert not hit("match client-ip 10.0.0.0/8", Stage.MAIL, ctx())
    assert hit("match client-ip 2001:db8::/32", Stage.MAIL, ctx(ip="2001:db8::5"))
    assert hit("match client-ip 192.0.2.0/24", Stage.MAIL, ctx(ip="::ffff:192.0.2.9"))
    assert not hit("match client-ip 0.0.0.0/0", Stage.MAIL, ctx(ip=""))  # not an address


def test_recipient_at_rcpt_is_the_one_added_and_at_data_any() -> None:
    c = ctx(rcpts=("x@example.test",), recipient="boss@example.test")
    assert hit("match recipient boss@example.test", Stage.RCPT, c)
    c2 = ctx(rcpts=("boss@example.test",), recipient="x@example.test")
    assert not hit("match recipient boss@example.test", Stage.RCPT, c2)
    rc = check("rule r\nmatch recipient boss@example.test\nmatch subject hi\naction class x\n")
    c3 = ctx(rcpts=("x@example.test", "boss@example.test"), data=raw(mail("hi")))
    assert at(rc, Stage.DATA, c3).message_class == "x"


def test_external_recipient() -> None:
    assert hit("match external-recipient", Stage.RCPT, ctx(recipient="x@far.example"))
    assert not hit("match external-recipient", Stage.RCPT, ctx(recipient="x@example.test"))
    rc = check("rule r\nmatch external-recipient\nmatch size > 0\naction class ext\n")
    inside = ctx(rcpts=("a@example.test",), data=b"x\r\n")
    assert at(rc, Stage.DATA, inside) is ACCEPT
    mixed = ctx(rcpts=("a@example.test", "b@far.example"), data=b"x\r\n")
    assert at(rc, Stage.DATA, mixed).message_class == "ext"


def test_recipient_count() -> None:
    text = "match recipients > 2"
    assert not hit(text, Stage.RCPT, ctx(rcpts=("a@x.test",), recipient="b@x.test"))
    assert hit(text, Stage.RCPT, ctx(rcpts=("a@x.test", "b@x.test"), recipient="c@x.test"))
    for op, n, yes in ((">=", 2, True), ("<", 2, False), ("<=", 1, False), ("=", 2, True)):
        rc = check(f"rule r\nmatch recipients {op} {n}\nmatch size > 0\naction class c\n")
        c = ctx(rcpts=("a@x.test", "b@x.test"), data=b"x\r\n")
        assert (at(rc, Stage.DATA, c).message_class == "c") is yes, op


def test_size() -> None:
    assert hit("match size > 1K", Stage.DATA, ctx(data=b"x" * 1025))
    assert not hit("match size > 1K", Stage.DATA, ctx(data=b"x" * 1024))
    assert hit("match size <= 10", Stage.DATA, ctx(data=b"x"))


def test_rate_per_user_ip_sender_domain_and_sender() -> None:
    clock = Clock()
    counter = MemoryRateCounter(clock)
    for per, make in [
        ("user", lambda: ctx(user="u@example.test")),
        ("ip", lambda: ctx(ip="198.51.100.1")),
        ("sender-domain", lambda: ctx(sender="x@Bulk.example")),
        ("sender", lambda: ctx(sender="X@bulk.example")),
    ]:
        rc = check(
            f"rule r-{per}\nmatch rate 2/1m per {per}\naction tempfail 450 4.7.1 slow\n",
            counter,
        )
        results = [at(rc, Stage.MAIL, make()).is_final for _ in range(3)]
        assert results == [False, False, True], per
        clock.advance(61)
        assert not at(rc, Stage.MAIL, make()).is_final  # the window slid
    rc = check("rule r\nmatch rate 0/1m per user\naction class c\n", counter)
    assert at(rc, Stage.MAIL, ctx()) is ACCEPT  # no user: never counted, never matches


def test_rate_counts_once_per_transaction_and_only_when_the_rest_matched() -> None:
    counter = MemoryRateCounter(Clock())
    rc = check(
        "rule r\nmatch rate 1/1h per ip\nmatch recipient @example.test\naction class c\n", counter
    )
    c = ctx(rcpts=(), recipient="a@far.example")
    assert at(rc, Stage.RCPT, c) is ACCEPT  # recipient did not match: not counted
    c.recipient = Address.parse("a@example.test")
    assert at(rc, Stage.RCPT, c) is ACCEPT  # counted: 1
    c.recipient = Address.parse("b@example.test")
    assert at(rc, Stage.RCPT, c) is ACCEPT  # same transaction: still 1
    assert at(rc, Stage.RCPT, ctx(recipient="a@example.test")).message_class == "c"  # 2 > 1


def test_a_rate_counter_answering_later() -> None:
    @implementer(IRateCounter)
    class Later:
        def __init__(self) -> None:
            self.pending: list[defer.Deferred[int]] = []

        def hit(self, key: str, window: float) -> defer.Deferred[int]:
            d: defer.Deferred[int] = defer.Deferred()
            self.pending.append(d)
            return d

    later = Later()
    rc = check(
        "rule r\nmatch sender @far.example\nmatch rate 1/1h per ip\naction reject\n"
        "rule s\nmatch all\naction class after\n",
        later,
    )
    c = ctx()
    c.stage = Stage.MAIL
    result = rc.check(c)
    assert isinstance(result, defer.Deferred)
    later.pending[0].callback(2)
    verdict = fired(result)
    assert verdict.disposition is Disposition.REJECT
    c2 = ctx()
    c2.stage = Stage.MAIL
    result = rc.check(c2)
    assert isinstance(result, defer.Deferred)
    later.pending[1].callback(1)
    assert fired(result).message_class == "after"  # no match: the next rule ran
    c3 = ctx()
    c3.stage = Stage.MAIL
    result = rc.check(c3)
    later.pending[2].errback(ConnectionError("redis down"))
    assert fired(result).reply == R.LOCAL_ERROR  # tempfail at worst


def test_memory_counter_forgets_idle_keys() -> None:
    clock = Clock()
    counter = MemoryRateCounter(clock, cap=3, max_keys=4)
    assert [counter.hit("k", 10) for _ in range(5)] == [1, 2, 3, 3, 3]  # saturates at cap
    for i in range(3):
        counter.hit(f"other{i}", 10)
    clock.advance(11)
    counter.hit("new", 10)  # full: idle keys swept
    assert set(counter._events) == {"new"}
    for i in range(10):
        counter.hit(f"busy{i}", 100)  # never idle: the oldest half goes
    assert len(counter._events) <= 4


# -- content matches ------------------------------------------------------------------------------


def test_header_subject_body() -> None:
    m = raw(mail("Hello =?utf-8?b?5Lit5paH?= world", "Visit our CASINO\n", X_Mailer="Mass 2"))
    assert hit("match header X-Mailer /^mass/i", Stage.DATA, ctx(data=m))
    assert not hit("match header X-Other /./", Stage.DATA, ctx(data=m))
    assert hit("match header * /mass 2/i", Stage.DATA, ctx(data=m))
    assert hit("match subject 中文", Stage.DATA, ctx(data=m))  # RFC 2047 decoded
    assert not hit("match subject casino", Stage.DATA, ctx(data=m))
    assert hit("match body casino", Stage.DATA, ctx(data=m))
    assert hit("match body /our\\s+casino/i", Stage.DATA, ctx(data=m))
    assert hit("match body /Visit our/", Stage.DATA, ctx(data=m))  # unquoted blank


def test_body_reads_base64_and_quoted_printable_text() -> None:
    m = EmailMessage()
    m["Subject"] = "x"
    m.set_content("secret plans " * 20, cte="base64")
    assert hit("match body /secret plans/", Stage.DATA, ctx(data=raw(m)))
    m2 = EmailMessage()
    m2["Subject"] = "x"
    m2.set_content("caf\u00e9 secret=plans " * 10, cte="quoted-printable")
    assert hit("match body café", Stage.DATA, ctx(data=raw(m2)))


def test_dlp() -> None:
    good_id = "11010519491231002X"
    assert hit("match dlp cn-id", Stage.DATA, ctx(data=raw(mail("s", f"id {good_id}\n"))))
    bad_id = good_id[:-1] + "1"
    assert not hit("match dlp cn-id", Stage.DATA, ctx(data=raw(mail("s", f"id {bad_id}\n"))))
    assert hit("match dlp cn-id", Stage.DATA, ctx(data=raw(mail(f"id {good_id}"))))  # subject
    cards = "4111 1111 1111 1111 and 5500-0000-0000-0004"
    assert hit("match dlp card-number", Stage.DATA, ctx(data=raw(mail("s", cards))))
    assert hit("match dlp card-number 2", Stage.DATA, ctx(data=raw(mail("s", cards))))
    assert not hit("match dlp card-number 3", Stage.DATA, ctx(data=raw(mail("s", cards))))
    luhn_bad = "4111 1111 1111 1112"
    assert not hit("match dlp card-number", Stage.DATA, ctx(data=raw(mail("s", luhn_bad))))


def attach(data: bytes, filename: str, maintype: str = "application", sub: str = "x") -> bytes:
    m = mail("with attachment")
    m.add_attachment(data, maintype, sub, filename=filename)
    return raw(m)


def zipped(files: dict[str, bytes], nested: str | None = None) -> bytes:
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w", zipfile.ZIP_DEFLATED) as z:
        for name, data in files.items():
            z.writestr(name, data)
    data = out.getvalue()
    if nested:
        return zipped({nested: data})
    return data


def test_attachment_name_ext_and_type() -> None:
    exe = b"MZ\x90\x00" + b"\x00" * 64
    assert hit("match attachment-ext exe", Stage.DATA, ctx(data=attach(exe, "A.EXE")))
    assert hit("match attachment-ext .exe", Stage.DATA, ctx(data=attach(exe, "a.b.exe")))
    assert not hit("match attachment-ext exe", Stage.DATA, ctx(data=attach(exe, "exe")))
    assert hit(
        "match attachment-name invoice*.pdf", Stage.DATA, ctx(data=attach(b"x", "Invoice-1.PDF"))
    )
    assert not hit("match attachment-name invoice*", Stage.DATA, ctx(data=attach(b"x", "bill.pdf")))
    assert hit("match attachment-type exe", Stage.DATA, ctx(data=attach(exe, "harmless.pdf")))
    pdf = b"%PDF-1.4 ..."
    assert hit("match attachment-type pdf", Stage.DATA, ctx(data=attach(pdf, "x.bin")))
    assert not hit("match attachment-type exe", Stage.DATA, ctx(data=attach(pdf, "x.exe")))
    assert hit("match attachment-type exe", Stage.DATA, ctx(data=attach(exe, "")))  # nameless


def test_inside_zip_archives() -> None:
    z = zipped({"a/readme.txt": b"hello", "a/Setup.EXE": b"MZ" + b"\0" * 100})
    message = attach(z, "files.zip")
    assert hit("match attachment-type exe", Stage.DATA, ctx(data=message))
    assert hit("match attachment-type zip", Stage.DATA, ctx(data=message))
    assert hit("match attachment-ext exe", Stage.DATA, ctx(data=message))
    assert hit("match attachment-name setup.*", Stage.DATA, ctx(data=message))
    assert not hit("match attachment-type encrypted", Stage.DATA, ctx(data=message))
    nested = zipped({"deep/tool": b"\x7fELF" + b"\0" * 100}, nested="inner.zip")
    assert hit("match attachment-type elf", Stage.DATA, ctx(data=attach(nested, "outer.zip")))


def test_encrypted_zip_is_detected() -> None:
    z = bytearray(zipped({"secret.txt": b"plans"}))
    # set the "encrypted" flag (bit 0) in the local and central headers, as zip -e does
    for sig, offset in ((b"PK\x03\x04", 6), (b"PK\x01\x02", 8)):
        pos = z.find(sig)
        z[pos + offset] |= 1
    assert hit("match attachment-type encrypted", Stage.DATA, ctx(data=attach(bytes(z), "s.zip")))


def test_mime_error_for_many_parts_deep_nesting_and_scan_size() -> None:
    limits = ContentLimits(max_parts=50, max_depth=5, max_scan=10_000)
    rc = check("rule r\nmatch mime-error\naction quarantine too complex\n", limits=limits)
    parts = b"".join(b"--b\r\nContent-Type: text/plain\r\n\r\np\r\n" for _ in range(200))
    many = b'Content-Type: multipart/mixed; boundary="b"\r\n\r\n' + parts + b"--b--\r\n"
    assert at(rc, Stage.DATA, ctx(data=many)).is_quarantined
    body = b"x\r\n"
    for i in range(10):
        b = b"n%d" % i
        body = (
            b'Content-Type: multipart/mixed; boundary="' + b + b'"\r\n\r\n--' + b + b"\r\n" + body
        )
        body += b"\r\n--" + b + b"--\r\n"
    assert at(rc, Stage.DATA, ctx(data=body)).is_quarantined
    assert at(rc, Stage.DATA, ctx(data=b"Subject: x\r\n\r\n" + b"y" * 20_000)).is_quarantined
    assert at(rc, Stage.DATA, ctx(data=b"Subject: x\r\n\r\nsmall\r\n")) is ACCEPT


def test_a_failing_content_scan_tempfails() -> None:
    class Broken(Message):
        def open_content(self) -> io.BytesIO:
            raise OSError(5, "I/O error")

    rc = check("rule r\nmatch body x\naction reject\n")
    c = ctx(data=b"x")
    c.message = Broken(b"x")  # type: ignore[assignment]
    assert at(rc, Stage.DATA, c).reply == R.LOCAL_ERROR


def test_content_is_read_once_per_message_and_not_for_envelope_rules() -> None:
    rc = check(
        "rule a\nmatch subject x\naction class a\naction continue\n"
        "rule b\nmatch body y\naction class b\naction continue\n"
    )
    c = ctx(data=raw(mail("x", "y\n")))
    assert at(rc, Stage.DATA, c).message_class == "b"
    assert c.message.opened == 1  # type: ignore[union-attr]
    rc2 = check("rule a\nmatch size > 0\naction class a\n")
    c2 = ctx(data=b"x")
    at(rc2, Stage.DATA, c2)
    assert c2.message.opened == 0  # type: ignore[union-attr]


# -- evaluation order -----------------------------------------------------------------------------


def test_first_match_wins_and_continue() -> None:
    rc = check(
        "rule tag\nmatch all\naction add-header X-A: 1\naction continue\n"
        "rule first\nmatch sender @far.example\naction class first\n"
        "rule second\nmatch all\naction class second\n"
    )
    v = at(rc, Stage.MAIL, ctx())
    assert v.headers == (("X-A", "1"),) and v.message_class == "first"
    v2 = at(rc, Stage.MAIL, ctx(sender="x@elsewhere.example"))
    assert v2.message_class == "second"


def test_a_stop_at_mail_holds_for_later_stages_but_not_for_earlier_rules() -> None:
    rc = check(
        "rule early-content\nmatch subject hi\naction class early\naction continue\n"
        "rule whitelist\nmatch sender trusted@far.example\naction accept\n"
        "rule late-content\nmatch subject hi\naction reject\n"
    )
    c = ctx(sender="trusted@far.example", data=raw(mail("hi")))
    assert at(rc, Stage.MAIL, c) is ACCEPT
    v = at(rc, Stage.DATA, c)
    assert v.message_class == "early" and not v.is_final  # late-content skipped
    other = ctx(sender="x@far.example", data=raw(mail("hi")))
    assert at(rc, Stage.MAIL, other) is ACCEPT
    assert at(rc, Stage.DATA, other).is_final


def test_a_stop_at_rcpt_holds_for_that_recipient_only() -> None:
    rc = check(
        "rule vip\nmatch recipient vip@example.test\naction accept\n"
        "rule nobody\nmatch recipient @example.test\naction tempfail\n"
    )
    c = ctx(recipient="vip@example.test")
    assert at(rc, Stage.RCPT, c) is ACCEPT
    c.recipients.append(Address.parse("vip@example.test"))
    c.recipient = Address.parse("joe@example.test")
    assert at(rc, Stage.RCPT, c).is_final


def test_reject_stops_even_with_continue() -> None:
    rc = check(
        "rule r\nmatch all\naction reject\naction continue\nrule s\nmatch all\naction class never\n"
    )
    assert at(rc, Stage.MAIL, ctx()).is_final


def test_hits_are_counted_for_prometheus() -> None:
    def value() -> float:
        v = REGISTRY.get_sample_value(
            "mailgw_policy_rule_hits_total", {"rule": "metric-rule", "action": "class"}
        )
        return v or 0.0

    before = value()
    rc = check("rule metric-rule\nmatch all\naction class m\n")
    at(rc, Stage.MAIL, ctx())
    at(rc, Stage.MAIL, ctx())
    assert value() == before + 2


def test_the_check_runs_at_its_rules_stages_and_data() -> None:
    rc = check("rule a\nmatch sender x@y\naction reject\n")
    assert rc.stages == {Stage.MAIL, Stage.DATA}
    assert at(rc, Stage.DATA, ctx(data=b"x")) is ACCEPT


# -- group ------------------------------------------------------------------------------------


def group_check(text: str, directory: Any) -> RulesCheck:
    rules = parse_rules(text, "t.rules")
    return RulesCheck(rules, lambda d: d in LOCAL, ContentLimits(), in_group=directory.in_group)


def test_group_matches_an_authenticated_member_of_any_group_at_mail() -> None:
    from mailgw.testing.fakes import FakeDirectory

    directory = FakeDirectory(["alice@example.test", "bob@example.test"])
    directory.groups = {"finance": {"alice@example.test"}, "board": {"carol@example.test"}}
    rc = group_check(
        "rule money\nmatch group Board finance\naction reject 554 5.7.1 Finance may not\n",
        directory,
    )
    assert [r.stage for r in rc.rules] == [Stage.MAIL]
    assert rc.rules[0].matches[0].groups == ("board", "finance")  # type: ignore[attr-defined]
    refused = at(rc, Stage.MAIL, ctx(user="alice@example.test"))
    assert refused.reply == Reply(554, "5.7.1", "Finance may not")
    assert at(rc, Stage.MAIL, ctx(user="bob@example.test")) is ACCEPT
    # Anonymous mail never matches, whatever its sender claims.
    assert at(rc, Stage.MAIL, ctx(sender="alice@example.test")) is ACCEPT
    # Membership is asked at each evaluation: a change counts for the next message.
    directory.groups["finance"].add("bob@example.test")
    assert at(rc, Stage.MAIL, ctx(user="bob@example.test")).reply is not None
    directory.groups["finance"].clear()
    assert at(rc, Stage.MAIL, ctx(user="alice@example.test")) is ACCEPT


def test_group_negated_and_without_a_directory() -> None:
    from mailgw.testing.fakes import FakeDirectory

    directory = FakeDirectory(["alice@example.test"])
    directory.groups = {"staff": {"alice@example.test"}}
    rc = group_check(
        "rule outsiders\nmatch authenticated\nmatch not group staff\naction class c\n", directory
    )
    assert at(rc, Stage.MAIL, ctx(user="alice@example.test")) is ACCEPT
    assert at(rc, Stage.MAIL, ctx(user="eve@example.test")).message_class == "c"
    # A RulesCheck built without a membership lookup: group never matches.
    assert not hit("match group staff", Stage.MAIL, ctx(user="alice@example.test"))


def test_group_with_the_real_directory(tmp_path: Path) -> None:
    from mailgw.directory import Directory

    with Directory(str(tmp_path / "d.sqlite"), argon2_time_cost=1, argon2_memory_kib=8) as d:
        d.add_domain("example.test")
        d.add_user("alice@example.test", "pw")
        rc = group_check("rule r\nmatch group finance\naction add-header X-Finance: 1\n", d)
        assert at(rc, Stage.MAIL, ctx(user="alice@example.test")) is ACCEPT  # no such group yet
        d.add_group("finance")
        d.add_to_group("finance", "alice@example.test")
        verdict = at(rc, Stage.MAIL, ctx(user="Alice@Example.test"))
        assert verdict.headers == (("X-Finance", "1"),)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("rule a\nmatch group\naction reject\n", "t.rules:2: group needs at least one argument"),
        ("rule a\nmatch group fin/ance\naction reject\n", "t.rules:2: group: bad group name"),
        ("rule a\nmatch group -x\naction reject\n", "t.rules:2: group: bad group name"),
    ],
)
def test_group_errors(text: str, message: str) -> None:
    with pytest.raises(RulesError) as e:
        parse_rules(text, "t.rules")
    assert str(e.value).startswith(message)
