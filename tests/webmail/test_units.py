"""The webmail's pure parts: message reading (RFC 2047 / 2231 names), composing and replies,
conversations, sessions and cookies, templates, download names, form parsing."""

from __future__ import annotations

import email
import email.policy
import io
from typing import Any

import pytest
from twisted.internet.task import Clock

from mailgw.webmail import compose
from mailgw.webmail.message import attachment_data, base_subject, body_text, read_message
from mailgw.webmail.sessions import COOKIE, Sessions, cookie
from mailgw.webmail.template import Markup, Template, esc, join
from mailgw.webmail.threads import group
from mailgw.webmail.web import HTTPError, content_disposition, multipart_form

RAW = (
    b"From: =?utf-8?B?5byg5LiJ?= <zs@outside.test>\r\nTo: alice@example.test, Bob <bob@example.test>\r\n"
    b"Cc: carol@example.test\r\nReply-To: list@outside.test\r\n"
    b"Subject: =?gb2312?B?1tDOxA==?= mixed\r\nDate: Tue, 02 Jan 2024 10:00:00 +0800\r\n"
    b"Message-ID: <m1@outside.test>\r\nReferences: <r0@x> <r1@x>\r\n"
    b"MIME-Version: 1.0\r\nContent-Type: multipart/mixed; boundary=o\r\n\r\n"
    b"--o\r\nContent-Type: multipart/alternative; boundary=a\r\n\r\n"
    b"--a\r\nContent-Type: text/plain; charset=gb2312\r\nContent-Transfer-Encoding: base64\r\n\r\n"
    b"1tDOxNX9zsQ=\r\n--a\r\nContent-Type: text/html; charset=utf-8\r\n\r\n<p>html body</p>\r\n--a--\r\n"
    b"--o\r\nContent-Type: application/pdf; name*=utf-8''%E6%8A%A5%E5%91%8A.pdf\r\n"
    b"Content-Transfer-Encoding: base64\r\n\r\nUERG\r\n"
    b"--o\r\nContent-Type: image/png\r\nContent-ID: <img1@x>\r\nContent-Disposition: inline\r\n\r\nPNG\r\n"
    b"--o--\r\n"
)


def test_read_message() -> None:
    view = read_message(RAW)
    assert view.subject == "中文 mixed"
    assert view.sender == [("张三", "zs@outside.test")]
    assert view.to == [("", "alice@example.test"), ("Bob", "bob@example.test")]
    assert view.reply_to == [("", "list@outside.test")]
    assert view.text == "中文正文" and view.html == "<p>html body</p>"
    assert view.message_id == "<m1@outside.test>" and view.references == ["<r0@x>", "<r1@x>"]
    assert [
        (a.section, a.filename, a.content_type, a.size, a.content_id) for a in view.attachments
    ] == [
        ("2", "报告.pdf", "application/pdf", 3, ""),
        ("3", "part-3.bin", "image/png", 3, "img1@x"),
    ]
    found = attachment_data(RAW, "2")
    assert found is not None and found[1] == b"PDF"
    assert attachment_data(RAW, "1.1") is None  # a body, not an attachment
    assert body_text(RAW) == "中文正文"
    html_only = b"Subject: x\r\nContent-Type: text/html\r\n\r\n<b>bold</b> text"
    assert body_text(html_only).split() == ["bold", "text"]
    assert body_text(b"Subject: x\r\nContent-Type: image/png\r\n\r\nPNG") == ""


def test_base_subject() -> None:
    assert base_subject("Re: Fwd: RE[2]: 回复：答复: hello") == "hello"
    assert base_subject("Fw: 转发: x") == "x"
    assert base_subject("Reply all") == "Reply all"


def test_compose_build_and_errors() -> None:
    draft = compose.Draft(
        to="Bob <bob@example.test>; carol@example.test",
        bcc="d@example.test",
        subject="你好",
        body="x",
    )
    data, rcpts = compose.build("alice@example.test", draft, "h.test", now=0)
    assert rcpts == ["bob@example.test", "carol@example.test", "d@example.test"]
    assert b"Bcc" not in data and b"\r\n" in data
    kept, _ = compose.build("alice@example.test", draft, "h.test", with_bcc=True)
    msg = email.message_from_bytes(kept, policy=email.policy.default)
    assert msg["Bcc"] == "d@example.test" and msg["Subject"] == "你好"
    assert msg["Message-ID"].endswith("@h.test>")
    with pytest.raises(compose.ComposeError, match="not an e-mail address: nobody"):
        compose.build("alice@example.test", compose.Draft(to="nobody"), "h.test")
    assert compose.parse_recipients(" , ") == []
    up = compose.Draft(
        to="b@example.test", attachments=[compose.Upload("x.zip", "multipart/mixed", b"z")]
    )
    attached = email.message_from_bytes(
        compose.build("a@example.test", up, "h")[0], policy=email.policy.default
    )
    (att,) = attached.iter_attachments()
    assert att.get_content_type() == "application/octet-stream"  # never a multipart from an upload
    assert compose.guess_type("a.pdf") == "application/pdf"
    assert compose.guess_type("a.unknownext") == "application/octet-stream"
    assert compose.guess_type("a.pdf", "image/png") == "image/png"


def test_reply_forward() -> None:
    view = read_message(RAW)
    one = compose.reply(view, "alice@example.test", everyone=False)
    assert one.to == "list@outside.test" and one.cc == ""
    assert one.subject == "Re: 中文 mixed" and "> 中文正文" in one.body
    assert one.in_reply_to == "<m1@outside.test>"
    assert one.references == "<r0@x> <r1@x> <m1@outside.test>"
    everyone = compose.reply(view, "ALICE@example.test", everyone=True)
    assert everyone.cc == "Bob <bob@example.test>, carol@example.test"  # not me, no repeats
    fwd = compose.forward(view)
    assert fwd.subject == "Fwd: 中文 mixed" and "Forwarded message" in fwd.body and fwd.to == ""


def test_threads_group() -> None:
    items = ["a", "b", "c", "d", "e"]
    ids = [("<1>", []), ("<2>", ["<1>"]), ("<3>", []), ("", ["<2>"]), ("<5>", ["<9>"])]
    assert group(items, ids) == [["a", "b", "d"], ["c"], ["e"]]
    # A reply seen before the message it answers joins it all the same.
    assert group(["r", "o"], [("<r>", ["<o>"]), ("<O>", [])]) == [["r", "o"]]


def test_sessions_expire_and_end() -> None:
    clock = Clock()
    sessions = Sessions(clock, idle_timeout=60, max_age=300)
    s = sessions.create("alice@example.test")
    assert sessions.get(s.sid) is s and sessions.get(None) is None and sessions.get("nope") is None
    assert s.csrf_ok(s.csrf) and not s.csrf_ok("x") and not s.csrf_ok(None)
    clock.advance(59)
    assert sessions.get(s.sid) is s  # activity restarts the idle time
    clock.advance(61)
    assert sessions.get(s.sid) is None
    t = sessions.create("alice@example.test")
    for _ in range(6):
        clock.advance(55)
        sessions.get(t.sid)
    assert sessions.get(t.sid) is None  # past max_age however active
    a, b, c = (sessions.create(u) for u in ("x@t", "x@t", "y@t"))
    sessions.end_user("x@t", keep=a.sid)
    assert sessions.get(a.sid) is a and sessions.get(b.sid) is None and sessions.get(c.sid) is c
    sessions.end(a.sid)
    assert sessions.get(a.sid) is None
    clock.advance(1000)
    sessions.create("z@t")
    assert len(sessions) == 1  # expired ones dropped


def test_cookie_flags() -> None:
    assert (
        cookie(COOKIE, "v", secure=False) == b"mailgw_session=v; Path=/; HttpOnly; SameSite=Strict"
    )
    assert cookie(COOKIE, "", secure=True, max_age=0).endswith(
        b"SameSite=Strict; Secure; Max-Age=0"
    )


def test_template_escapes() -> None:
    t = Template('<a href="{href}">{text}</a>{raw}')
    out = t.render(href='x" onclick="1', text="<b>", raw=Markup("<i>ok</i>"))
    assert out == '<a href="x&quot; onclick=&quot;1">&lt;b&gt;</a><i>ok</i>'
    with pytest.raises(KeyError, match="text"):
        t.render(href="x", raw="")
    assert esc(None) == "" and join(["<", Markup("<br>")]) == "&lt;<br>"


def test_content_disposition() -> None:
    assert content_disposition("a.pdf") == b'attachment; filename="a.pdf"'
    assert (
        content_disposition("报告.pdf")
        == b"attachment; filename=\"__.pdf\"; filename*=UTF-8''%E6%8A%A5%E5%91%8A.pdf"
    )
    assert content_disposition('a"b\r\n/../c%.txt') == (
        b"attachment; filename=\"a_b_.._c_.txt\"; filename*=UTF-8''a%22b_.._c%25.txt"
    )
    assert content_disposition("  ") == b'attachment; filename="attachment"'


class FormRequest:
    def __init__(
        self, ctype: bytes, body: bytes, args: dict[bytes, list[bytes]] | None = None
    ) -> None:
        self.ctype = ctype
        self.content = io.BytesIO(body)
        self.args = args or {}

    def getHeader(self, name: bytes) -> bytes | None:  # noqa: N802 (twisted.web)
        return self.ctype if name == b"content-type" else None


def test_multipart_form() -> None:
    body = (
        '--b\r\nContent-Disposition: form-data; name="to"\r\n\r\n张三 <z@x.test>\r\n'
        '--b\r\nContent-Disposition: form-data; name="attach"; filename="C:\\\\dir\\\\清单.txt"\r\n'
        "Content-Type: application/octet-stream\r\n\r\nabc\r\n"
        '--b\r\nContent-Disposition: form-data; name="attach"; filename=""\r\n'
        "Content-Type: application/octet-stream\r\n\r\n\r\n"
        "--b\r\nContent-Disposition: form-data\r\n\r\nno name\r\n--b--\r\n"
    ).encode()
    form = multipart_form(FormRequest(b"multipart/form-data; boundary=b", body))
    assert form.text("to") == "张三 <z@x.test>" and form.text("missing") == ""
    assert [(f.filename, f.content_type, f.data) for f in form.files] == [
        ("清单.txt", "text/plain", b"abc")
    ]
    plain = multipart_form(
        FormRequest(b"application/x-www-form-urlencoded", b"", {b"a": [b"1", b"2"]})
    )
    assert plain.values("a") == ["1", "2"]
    with pytest.raises(HTTPError):
        multipart_form(FormRequest(b"multipart/form-data", b"not multipart"))


def test_webmail_config_values(tmp_path: Any) -> None:
    from mailgw.config import ConfigError, load

    path = tmp_path / "mailgw.ini"
    path.write_text("[webmail]\nenabled = yes\n")
    with pytest.raises(ConfigError, match=r"webmail:enabled: needs \[http\] enabled"):
        load(str(path))
    path.write_text(
        "[http]\nenabled = yes\n[webmail]\nenabled = yes\nreader = IMAP\nimap_tls = STARTTLS\n"
        "max_upload_size = 1M\n"
    )
    config = load(str(path))
    assert (config.webmail.reader, config.webmail.imap_tls, config.webmail.max_upload_size) == (
        "imap",
        "starttls",
        1024 * 1024,
    )
    for key, value in (("reader", "pop3"), ("imap_tls", "maybe"), ("page_size", "0")):
        path.write_text(f"[webmail]\n{key} = {value}\n")
        with pytest.raises(ConfigError, match=f"webmail:{key}"):
            load(str(path))


def test_only_local_paths_are_redirect_targets() -> None:
    from mailgw.webmail.web import _local_path

    assert _local_path("/mail?folder=INBOX&q=%E4%B8%AD")
    for bad in (
        "//evil.test/",
        "/\\evil.test",
        "/a\\b",
        "http://evil.test/",
        "/a\r\nSet-Cookie: x",
        "",
        "/a b",
    ):
        assert not _local_path(bad), bad


def test_spam_report_finds_our_queue_id() -> None:
    from mailgw.webmail.report import queue_id_of, reputation_hook

    raw = (
        b"Return-Path: <a@outside.test>\r\nDelivered-To: alice@example.test\r\n"
        b"Received: from gw.test (unknown [192.0.2.1])\r\n\tby mx.example.test (mailgw) with ESMTPS"
        b" id 1K1XQXYJM6X00H99\r\n\tfor <alice@example.test>; Sun, 6 Dec 2026 02:37:01 +0000\r\n"
        b"Received: by other.test (mailgw) with webmail id OLDER0000000001 (authenticated user a);\r\n"
        b"Subject: x\r\n\r\nbody\r\n"
    )
    assert queue_id_of(raw) == "1K1XQXYJM6X00H99"
    assert queue_id_of(b"Received: from x by y with SMTP id abc\r\n\r\n") is None

    class Service:
        def __init__(self) -> None:
            self.calls: list[tuple[str, str]] = []

        def report(self, queue_id: str, kind: str) -> list[str]:
            self.calls.append((queue_id, kind))
            return ["user:a"]

    service = Service()
    hook = reputation_hook(service)
    assert hook("alice@example.test", raw, True) == ["user:a"]
    assert hook("alice@example.test", raw, False) == ["user:a"]
    assert hook("alice@example.test", b"Subject: no trace\r\n\r\n", True) is None
    assert service.calls == [("1K1XQXYJM6X00H99", "spam"), ("1K1XQXYJM6X00H99", "ham")]


def test_html_only_mail_is_quoted_as_text() -> None:
    from mailgw.webmail.message import html_to_text

    raw = (
        b"From: a@outside.test\r\nSubject: html only\r\nContent-Type: text/html; charset=utf-8\r\n\r\n"
        b"<html><head><style>p{}</style><title>t</title></head><body><p>Hello &amp; "
        b"\xe4\xbd\xa0\xe5\xa5\xbd</p><div>second<br>line</div><script>x()</script></body></html>"
    )
    view = read_message(raw)
    assert view.text is None
    assert html_to_text(view.html or "") == "Hello & 你好\nsecond\nline\n"
    assert "> Hello & 你好\n> second\n> line" in compose.reply(view, "me@x.test", False).body
    assert "second\nline" in compose.forward(view).body
    assert body_text(raw).split() == ["Hello", "&", "你好", "second", "line"]


def test_the_reader_hears_when_a_users_last_session_ends() -> None:
    clock = Clock()
    gone: list[str] = []
    sessions = Sessions(clock, idle_timeout=100, user_gone=gone.append)
    a1, a2, b = sessions.create("a@t"), sessions.create("a@t"), sessions.create("b@t")
    sessions.end(a1.sid)
    assert gone == []  # a@t still has a session
    sessions.end(a2.sid)
    assert gone == ["a@t"]
    sessions.end(a2.sid)  # twice: nothing more
    assert gone == ["a@t"]
    clock.advance(101)
    assert sessions.get(None) is None  # any request looks for expired sessions
    assert gone == ["a@t", "b@t"] and sessions.get(b.sid) is None
    c = sessions.create("c@t")
    sessions.create("c@t")
    sessions.end_user("c@t", keep=c.sid)
    assert gone == ["a@t", "b@t"]
