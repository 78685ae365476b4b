"""The webmail of the real ``twistd mailgw`` driven over HTTP with urllib: every handler's
branches (login, lockout shared with IMAP, CSRF, list paging / sorting / threading / search,
read, HTML in a sandbox, downloads, compose / reply / forward / drafts, actions, spam, settings),
mail arriving over SMTP and leaving to another user read back over IMAP."""

from __future__ import annotations

import email
import email.policy
import imaplib
import re
import smtplib
import ssl
from collections.abc import Iterator
from email.message import EmailMessage
from pathlib import Path

import pytest

from mailgw.testing.server import MailgwServer, free_port, wait_for_port
from tests.integration.conftest import make_server
from tests.integration.helpers import PASSWORD, wait_until
from tests.webmail.client import Browser

ALICE = "alice@example.test"
BOB = "bob@example.test"
BOB_PASSWORD = "bob password"


@pytest.fixture(scope="module", params=["store", "imap"])
def node(
    tmp_path_factory: pytest.TempPathFactory, request: pytest.FixtureRequest
) -> Iterator[MailgwServer]:
    """The webmail reading the node's store, then (the same tests) reading it over IMAP as a
    gateway's webmail does."""
    port, sub, subs, imap_port = free_port(), free_port(), free_port(), free_port()
    server = make_server(
        tmp_path_factory.mktemp(f"webmail-{request.param}"),
        {
            "http": {"enabled": "yes", "listen": f"tcp:{port}:interface=127.0.0.1"},
            "imap": {"listen": f"tcp:{imap_port}:interface=127.0.0.1"},
            "webmail": {
                "enabled": "yes",
                "page_size": "3",
                "max_upload_size": "64K",
                "reader": request.param,
                "imap_port": str(imap_port),
            },
            "submission": {
                "enabled": "yes",
                "listen": f"tcp:{sub}:interface=127.0.0.1",
                "listen_tls": f"tcp:{subs}:interface=127.0.0.1",
            },
            "directory": {
                "auth_failure_delay": "0s",
                "auth_lockout_failures": "3",
                "auth_lockout_address_failures": "0",
            },
        },
    )
    server.ports.update(http=port, imap=imap_port)
    server.cli("user", "add", "carol@example.test", "--password", "carol password")
    server.cli("user", "add", "dave@example.test", "--password", "dave password")
    server.cli("user", "add", "erin@example.test", "--password", "erin password")
    try:
        wait_for_port("127.0.0.1", port, proc=server.proc)
        yield server
    finally:
        server.stop()


def base(node: MailgwServer) -> str:
    return f"http://127.0.0.1:{node.ports['http']}"


def smtp_send(node: MailgwServer, msg: EmailMessage, to: str = ALICE) -> None:
    with smtplib.SMTP("127.0.0.1", node.ports["mx"], timeout=15) as smtp:
        smtp.send_message(msg, to_addrs=[to])


def mail(
    subject: str, body: str = "hello", sender: str = "someone@outside.test", **headers: str
) -> EmailMessage:
    msg = EmailMessage()
    msg["From"] = sender
    msg["To"] = ALICE
    msg["Subject"] = subject
    for k, v in headers.items():
        msg[k.replace("_", "-")] = v
    msg.set_content(body)
    return msg


def imap(node: MailgwServer, user: str = ALICE, password: str = PASSWORD) -> imaplib.IMAP4:
    conn = imaplib.IMAP4("127.0.0.1", node.ports["imap"])
    conn.login(user, password)
    return conn


def folder_messages(
    node: MailgwServer, folder: str, user: str = ALICE, password: str = PASSWORD
) -> list[tuple[int, str, bytes]]:
    """(UID, flags, bytes) of each message of a folder, over IMAP."""
    conn = imap(node, user, password)
    try:
        typ, _ = conn.select(f'"{folder}"', readonly=True)
        assert typ == "OK"
        typ, data = conn.uid("SEARCH", "ALL")
        out = []
        for uid in data[0].split():
            typ, got = conn.uid("FETCH", uid, "(FLAGS BODY.PEEK[])")
            meta, raw = got[0]  # type: ignore[misc]
            flags = re.search(rb"FLAGS \(([^)]*)\)", meta)
            out.append((int(uid), flags.group(1).decode() if flags else "", raw))
        return out
    finally:
        conn.logout()


def find_uid(
    node: MailgwServer,
    subject: str,
    folder: str = "INBOX",
    user: str = ALICE,
    password: str = PASSWORD,
) -> int:
    def look() -> int:
        for uid, _flags, raw in folder_messages(node, folder, user, password):
            msg = email.message_from_bytes(raw, policy=email.policy.default)
            if msg["Subject"] == subject:
                return uid
        return 0

    return int(wait_until(look, what=f"{subject!r} in {folder} of {user}"))


@pytest.fixture
def alice(node: MailgwServer) -> Browser:
    b = Browser(base(node))
    page = b.login(ALICE, PASSWORD)
    assert page.status == 200 and "/mail?folder=INBOX" in page.url, page.text
    return b


# -- login, sessions, headers -----------------------------------------------------------


def test_login_page_headers_and_cookie_flags(node: MailgwServer) -> None:
    b = Browser(base(node))
    page = b.get("/")
    assert page.status == 200
    assert 'name="login_token"' in page.text
    csp = page.header("Content-Security-Policy")
    assert "script-src 'self'" in csp and "frame-ancestors 'none'" in csp
    assert page.header("X-Frame-Options") == "DENY"
    assert page.header("X-Content-Type-Options") == "nosniff"
    (login_cookie,) = page.set_cookies()
    assert "HttpOnly" in login_cookie and "SameSite=Strict" in login_cookie
    assert "Secure" not in login_cookie  # plain HTTP
    token = re.search(r'name="login_token" value="([^"]+)"', page.text).group(1)  # type: ignore[union-attr]
    answer = b.post(
        "/login", {"user": ALICE, "password": PASSWORD, "login_token": token}, follow=False
    )
    assert answer.status == 303 and answer.header("Location") == "/mail?folder=INBOX"
    cookies = answer.set_cookies()
    session = next(c for c in cookies if c.startswith("mailgw_session="))
    assert "HttpOnly" in session and "SameSite=Strict" in session and "Path=/" in session
    assert any(c.startswith("mailgw_login=;") and "Max-Age=0" in c for c in cookies)
    # Logged in, / goes to the inbox.
    assert b.get("/", follow=False).header("Location") == "/mail?folder=INBOX"


def test_login_refusals(node: MailgwServer) -> None:
    b = Browser(base(node))
    assert b.post("/login", {"user": ALICE, "password": PASSWORD}).status == 403  # no login token
    wrong = b.login(ALICE, "wrong password")
    assert wrong.status == 401 and "Login failed" in wrong.text
    empty = b.login(ALICE, "")
    assert empty.status == 400
    # Not logged in: pages send to the login form, POSTs are refused.
    assert b.get("/mail", follow=False).header("Location") == "/"
    assert b.post("/action", {"op": "read"}).status == 403


def test_lockout_is_shared_with_imap(node: MailgwServer) -> None:
    b = Browser(base(node))
    for _ in range(3):
        assert b.login("carol@example.test", "not it").status == 401
    # Locked: the right password fails on the webmail and over IMAP alike.
    assert b.login("carol@example.test", "carol password").status == 401
    conn = imaplib.IMAP4("127.0.0.1", node.ports["imap"])
    with pytest.raises(imaplib.IMAP4.error):
        conn.login("carol@example.test", "carol password")
    conn.logout()
    assert "auth refused for 'carol@example.test'" in node.log()


def test_imap_failures_lock_the_webmail(node: MailgwServer) -> None:
    for _ in range(3):
        conn = imaplib.IMAP4("127.0.0.1", node.ports["imap"])
        with pytest.raises(imaplib.IMAP4.error):
            conn.login("dave@example.test", "wrong")
        conn.logout()
    assert Browser(base(node)).login("dave@example.test", "dave password").status == 401


def test_csrf_is_required_on_every_post(node: MailgwServer, alice: Browser) -> None:
    page = alice.get("/mail", folder="INBOX")
    for path in ("/action", "/logout", "/settings", "/send"):
        assert alice.post(path, {"op": "read", "uid": "1"}).status == 403, path
        assert alice.post(path, {"op": "read", "uid": "1", "csrf": "forged"}).status == 403, path
    multipart = alice.post_multipart("/send", [("to", BOB), ("op", "send")])
    assert multipart.status == 403
    # Still logged in, and the token works.
    assert alice.post("/action", {"csrf": page.csrf(), "folder": "INBOX"}).status == 200


def test_logout_ends_the_session(node: MailgwServer) -> None:
    b = Browser(base(node))
    page = b.login(ALICE, PASSWORD)
    csrf = page.csrf()
    out = b.post("/logout", {"csrf": csrf}, follow=False)
    assert out.status == 303 and out.header("Location") == "/"
    assert any(c.startswith("mailgw_session=;") for c in out.set_cookies())
    assert b.get("/mail", follow=False).status == 303
    assert b.post("/action", {"csrf": csrf, "op": "read", "uid": "1"}).status == 403


def test_unknown_paths_and_methods(node: MailgwServer, alice: Browser) -> None:
    assert alice.get("/nowhere").status == 404
    wrong = alice.request("DELETE", "/mail")
    assert wrong.status == 405 and wrong.header("Allow") == "GET"
    assert alice.post("/mail", {}).status == 405
    head = alice.request("HEAD", "/mail?folder=INBOX")
    assert head.status == 200 and head.body == b""
    assert alice.get("/read", folder="INBOX", uid="999999").status == 404
    assert alice.get("/read", folder="INBOX").status == 400
    assert alice.get("/mail", folder="No such folder").status == 404
    css = alice.get("/static/app.css")
    assert css.status == 200 and css.header("Content-Type").startswith("text/css")
    assert alice.get("/static/app.js").header("Content-Type").startswith("text/javascript")
    # Mounted by other parts, not the webmail's.
    assert alice.get("/healthz").text == "ok\n"


# -- reading ----------------------------------------------------------------------------


def test_read_a_chinese_mail_with_links_and_an_attachment(
    node: MailgwServer, alice: Browser
) -> None:
    msg = mail(
        "季度报告 Q3",
        "请看 https://example.org/a?b=1&c=2 和 javascript:alert(1)\n",
        sender="张三 <zhang@outside.test>",
    )
    msg.add_attachment(
        "内容".encode(), maintype="application", subtype="pdf", filename="报告 2026.pdf"
    )
    msg.add_attachment(
        b"<script>alert(1)</script>", maintype="text", subtype="html", filename="evil.html"
    )
    smtp_send(node, msg)
    uid = find_uid(node, "季度报告 Q3")
    listing = alice.get("/mail", folder="INBOX", q="季度报告")
    assert "季度报告 Q3" in listing.text and "张三" in listing.text
    assert f'data-uid="{uid}"' in listing.text and 'class="unseen"' in listing.text
    page = alice.get("/read", folder="INBOX", uid=uid)
    assert page.status == 200
    assert "张三 &lt;zhang@outside.test&gt;" in page.text
    assert (
        '<a href="https://example.org/a?b=1&amp;c=2" rel="noopener noreferrer" target="_blank">'
        in page.text
    )
    assert "javascript:alert(1)" in page.text and 'href="javascript' not in page.text
    assert "报告 2026.pdf" in page.text
    # Reading marked it seen.
    flags = {u: f for u, f, _ in folder_messages(node, "INBOX")}
    assert "\\Seen" in flags[uid]
    seen = alice.get("/mail", folder="INBOX", q="季度报告").text
    assert f'<tr class="" data-uid="{uid}">' in seen  # the list shows it read now
    download = alice.get("/att", folder="INBOX", uid=uid, part="2")
    assert download.status == 200 and download.body == "内容".encode()
    assert download.header("Content-Type") == "application/octet-stream"
    assert download.header("X-Content-Type-Options") == "nosniff"
    assert download.header("Content-Disposition") == (
        "attachment; filename=\"__ 2026.pdf\"; filename*=UTF-8''%E6%8A%A5%E5%91%8A%202026.pdf"
    )
    # An HTML attachment is never served inline or as HTML.
    evil = alice.get("/att", folder="INBOX", uid=uid, part="3")
    assert evil.header("Content-Type") == "application/octet-stream"
    assert evil.header("Content-Disposition").startswith("attachment;")
    assert "sandbox" in evil.header("Content-Security-Policy")
    assert alice.get("/att", folder="INBOX", uid=uid, part="9").status == 404


def test_rfc2231_and_rfc2047_attachment_names(node: MailgwServer, alice: Browser) -> None:
    raw = (
        "From: a@outside.test\r\nTo: alice@example.test\r\nSubject: =?gb2312?B?1tDOxCDD+7PG?=\r\n"
        "MIME-Version: 1.0\r\nContent-Type: multipart/mixed; boundary=b\r\n\r\n--b\r\n"
        "Content-Type: text/plain; charset=utf-8\r\n\r\nbody\r\n--b\r\n"
        'Content-Type: application/octet-stream; name="=?utf-8?B?5ZCN5Y2VLnhsc3g=?="\r\n'
        "Content-Disposition: attachment\r\nContent-Transfer-Encoding: base64\r\n\r\nYWJj\r\n--b\r\n"
        "Content-Type: application/octet-stream\r\n"
        "Content-Disposition: attachment; filename*0*=utf-8''%E5%90%88%E5%90%8C; filename*1=.doc\r\n"
        "\r\nxyz\r\n--b--\r\n"
    )
    with smtplib.SMTP("127.0.0.1", node.ports["mx"], timeout=15) as smtp:
        smtp.sendmail("a@outside.test", [ALICE], raw.encode())
    uid = find_uid(node, "中文 名称")
    page = alice.get("/read", folder="INBOX", uid=uid)
    assert "中文 名称" in page.text and "名单.xlsx" in page.text and "合同.doc" in page.text
    got = alice.get("/att", folder="INBOX", uid=uid, part="3")
    assert got.body == b"xyz"
    assert "filename*=UTF-8''%E5%90%88%E5%90%8C.doc" in got.header("Content-Disposition")


XSS_HTML = """<html><head><style>body{background:url(http://evil.test/css.png)}</style>
<script>alert('script')</script><base href="http://evil.test/"></head><body>
<p onclick="alert(1)">click</p>
<svg><animate onbegin="alert('svg')" attributeName="x" dur="1s"/></svg>
<a href="javascript:alert('js')">js link</a>
<a href="http://ok.test/">ok link</a>
<img src="http://evil.test/track.png" onerror="alert('img')">
<div style="background-image:url(http://evil.test/bg.png);color:red">styled</div>
<iframe src="http://evil.test/"></iframe><form action="http://evil.test/"><input name=x></form>
<math><mtext><table><mglyph><style><img src=x onerror=alert('math')>
</body></html>"""


def test_html_mail_is_sanitised_and_sandboxed(node: MailgwServer, alice: Browser) -> None:
    msg = mail("html xss", "plain part")
    msg.add_alternative(XSS_HTML, subtype="html")
    smtp_send(node, msg)
    uid = find_uid(node, "html xss")
    page = alice.get("/read", folder="INBOX", uid=uid)
    frame = re.search(r"<iframe[^>]*>", page.text).group(0)  # type: ignore[union-attr]
    assert 'sandbox="allow-popups allow-popups-to-escape-sandbox"' in frame
    assert "allow-scripts" not in frame and "allow-same-origin" not in frame
    assert 'id="images-blocked"' in page.text and "1 remote image(s) blocked" in page.text
    body = alice.get("/body", folder="INBOX", uid=uid)
    csp = body.header("Content-Security-Policy")
    assert "default-src 'none'" in csp and "script-src" not in csp and "sandbox" in csp
    assert "img-src data:;" in csp and "frame-ancestors 'self'" in csp
    assert body.header("X-Frame-Options") == "SAMEORIGIN"
    text = body.text.lower()
    for bad in (
        "<script",
        "onclick",
        "onbegin",
        "onerror",
        "javascript:",
        "<svg",
        "<iframe",
        "<form",
        "evil.test",
        "url(",
    ):
        assert bad not in text, bad
    assert 'href="http://ok.test/" target="_blank" rel="noopener noreferrer"' in body.text
    assert 'style="color:red"' in body.text
    shown = alice.get("/body", folder="INBOX", uid=uid, images="1")
    assert "img-src data: https: http:;" in shown.header("Content-Security-Policy")
    assert '<img src="http://evil.test/track.png">' in shown.text
    # Plain-text mail in the frame is escaped text too.
    plain = mail("plain frame", "<script>alert(1)</script> http://x.test/")
    smtp_send(node, plain)
    puid = find_uid(node, "plain frame")
    framed = alice.get("/body", folder="INBOX", uid=puid)
    assert "&lt;script&gt;" in framed.text and "<script" not in framed.text


def test_inline_cid_images_become_data_urls(node: MailgwServer, alice: Browser) -> None:
    msg = mail("cid image", "text")
    msg.add_alternative('<p>logo <img src="cid:logo@x"></p>', subtype="html")
    png = b"\x89PNG\r\n\x1a\n" + b"0" * 20
    msg.get_payload()[1].add_related(png, maintype="image", subtype="png", cid="<logo@x>")
    smtp_send(node, msg)
    uid = find_uid(node, "cid image")
    body = alice.get("/body", folder="INBOX", uid=uid)
    assert '<img src="data:image/png;base64,' in body.text


def test_folder_names_are_text(node: MailgwServer, alice: Browser) -> None:
    conn = imap(node)
    typ, _ = conn.create('"<img src=x onerror=alert(1)>"')
    conn.logout()
    assert typ == "OK"
    page = alice.get("/mail", folder="INBOX").text
    assert "<img" not in page and "&lt;img src=x onerror=alert(1)&gt;" in page


# -- list: paging, sorting, threading, search ------------------------------------------


def test_paging_sorting_threading_and_search(node: MailgwServer, alice: Browser) -> None:
    folder = "ListTest"
    conn = imap(node)
    conn.create(folder)
    dates = [
        "Mon, 01 Jan 2024 10:00:00 +0000",
        "Tue, 02 Jan 2024 10:00:00 +0000",
        "Wed, 03 Jan 2024 10:00:00 +0000",
        "Thu, 04 Jan 2024 10:00:00 +0000",
    ]
    msgs = [
        ("Zebra topic", "zed@outside.test", dates[0], "<t1@x>", "", "needle in the body"),
        ("Re: Zebra topic", "amy@outside.test", dates[2], "<t2@x>", "<t1@x>", "reply"),
        ("Apple", "bob@outside.test", dates[1], "<a1@x>", "", "other"),
        ("Mango", "carl@outside.test", dates[3], "<m1@x>", "", "third"),
    ]
    for subject, sender, date, mid, irt, body in msgs:
        m = mail(subject, body, sender=sender, Date=date, Message_ID=mid)
        if irt:
            m["In-Reply-To"] = irt
            m["References"] = irt
        conn.append(folder, "", None, m.as_bytes())
    conn.logout()

    def subjects(page: str) -> list[str]:
        return re.findall(r'<td class="subj"><a [^>]*>([^<]*)</a>', page)

    first = alice.get("/mail", folder=folder)
    assert subjects(first.text) == ["Mango", "Re: Zebra topic", "Apple"]  # date, newest first
    assert "Page 1 / 2 · 4 messages" in first.text
    second = alice.get("/mail", folder=folder, page="2")
    assert subjects(second.text) == ["Zebra topic"]
    assert subjects(alice.get("/mail", folder=folder, page="99").text) == ["Zebra topic"]
    asc = alice.get("/mail", folder=folder, sort="subject", order="asc")
    assert subjects(asc.text) == ["Apple", "Mango", "Zebra topic"]
    by_from = alice.get("/mail", folder=folder, sort="from", order="asc")
    assert subjects(by_from.text) == ["Re: Zebra topic", "Apple", "Mango"]
    threaded = alice.get("/mail", folder=folder, thread="1")
    # Conversations: the Zebra thread (latest 3 Jan) after Mango (4 Jan), its two messages together.
    assert subjects(threaded.text) == ["Mango", "Zebra topic", "Re: Zebra topic", "Apple"]
    assert 'class="child"' in threaded.text or 'class="unseen child"' in threaded.text
    assert "Page 1 / 1" in threaded.text
    assert subjects(alice.get("/mail", folder=folder, q="apple", field="subject").text) == ["Apple"]
    assert subjects(alice.get("/mail", folder=folder, q="carl", field="from").text) == ["Mango"]
    assert subjects(alice.get("/mail", folder=folder, q="NEEDLE", field="body").text) == [
        "Zebra topic"
    ]
    assert subjects(alice.get("/mail", folder=folder, q="needle", field="subject").text) == []
    assert subjects(alice.get("/mail", folder=folder, q="zebra").text) == [
        "Re: Zebra topic",
        "Zebra topic",
    ]


# -- actions ----------------------------------------------------------------------------


def test_flags_move_delete_and_spam(node: MailgwServer, alice: Browser) -> None:
    smtp_send(node, mail("action target"))
    uid = find_uid(node, "action target")
    csrf = alice.get("/mail", folder="INBOX").csrf()

    def act(op: str, folder: str = "INBOX", u: int = uid, **extra: str) -> None:
        answer = alice.post(
            "/action", {"csrf": csrf, "folder": folder, "uid": u, "op": op, **extra}
        )
        assert answer.status == 200, answer.text

    def flags(folder: str = "INBOX") -> dict[int, str]:
        return {u: f for u, f, _ in folder_messages(node, folder)}

    act("read")
    assert "\\Seen" in flags()[uid]
    act("unread")
    assert "\\Seen" not in flags()[uid]
    act("flag")
    assert "\\Flagged" in flags()[uid]
    assert 'id="flagged"' in alice.get("/read", folder="INBOX", uid=uid).text
    act("unflag")
    assert "\\Flagged" not in flags()[uid]
    bad = alice.post("/action", {"csrf": csrf, "folder": "INBOX", "uid": uid, "op": "explode"})
    assert bad.status == 400
    assert (
        alice.post("/action", {"csrf": csrf, "folder": "INBOX", "uid": uid, "op": "move"}).status
        == 400
    )
    act("move", dest="Archive")
    assert uid not in flags()
    moved = find_uid(node, "action target", "Archive")
    act("spam", "Archive", moved)
    junk = find_uid(node, "action target", "Junk")
    assert "Not spam" in alice.get("/mail", folder="Junk").text
    act("ham", "Junk", junk)
    back = find_uid(node, "action target", "INBOX")
    act("delete", "INBOX", back)
    trashed = find_uid(node, "action target", "Trash")
    act("delete", "Trash", trashed)
    assert trashed not in flags("Trash")
    # Nothing selected: back to the list, nothing done.
    assert alice.post("/action", {"csrf": csrf, "folder": "INBOX", "op": "delete"}).status == 200


# -- compose, send, drafts ---------------------------------------------------------------


def test_compose_reply_with_attachment_reaches_bob(node: MailgwServer, alice: Browser) -> None:
    smtp_send(
        node,
        mail(
            "please answer",
            "question?",
            sender=f"Bob <{BOB}>",
            Message_ID="<q1@outside.test>",
            Cc="carol@example.test",
        ),
    )
    uid = find_uid(node, "please answer")
    form = alice.get("/compose", mode="reply", folder="INBOX", uid=uid)
    assert 'value="Re: please answer"' in form.text
    assert f'value="Bob &lt;{BOB}&gt;"' in form.text
    assert "&gt; question?" in form.text
    assert 'name="in_reply_to" value="&lt;q1@outside.test&gt;"' in form.text
    assert "up to 64.0 KB in all" in form.text
    everyone = alice.get("/compose", mode="replyall", folder="INBOX", uid=uid)
    assert 'id="cc" name="cc" value="carol@example.test"' in everyone.text
    fields = [
        ("csrf", form.csrf()),
        ("to", BOB),
        ("subject", "Re: please answer"),
        ("body", "答复：见附件 answer"),
        ("in_reply_to", "<q1@outside.test>"),
        ("references", "<q1@outside.test>"),
        ("orig_folder", "INBOX"),
        ("orig_uid", str(uid)),
        ("op", "send"),
    ]
    sent = alice.post_multipart(
        "/send", fields, [("attach", "清单.txt", "text/plain", "第一行\n".encode())]
    )
    assert sent.status == 200 and "Message sent" in sent.text, sent.text
    got = find_uid(node, "Re: please answer", user=BOB, password=BOB_PASSWORD)
    raw = next(r for u, _f, r in folder_messages(node, "INBOX", BOB, BOB_PASSWORD) if u == got)
    msg = email.message_from_bytes(raw, policy=email.policy.default)
    assert msg["In-Reply-To"] == "<q1@outside.test>"
    assert "with webmail" in msg["Received"]
    assert "答复：见附件 answer" in msg.get_body(("plain",)).get_content()  # type: ignore[union-attr]
    (att,) = list(msg.iter_attachments())
    assert att.get_filename() == "清单.txt" and att.get_content() == "第一行\n"
    # The original is answered, a copy is in Sent.
    assert "\\Answered" in {u: f for u, f, _ in folder_messages(node, "INBOX")}[uid]
    sent_uid = find_uid(node, "Re: please answer", "Sent")
    assert "\\Seen" in {u: f for u, f, _ in folder_messages(node, "Sent")}[sent_uid]


def test_forward_keeps_the_attachments(node: MailgwServer, alice: Browser) -> None:
    msg = mail("to forward", "see attached")
    msg.add_attachment(b"PDFDATA", maintype="application", subtype="pdf", filename="doc.pdf")
    smtp_send(node, msg)
    uid = find_uid(node, "to forward")
    form = alice.get("/compose", mode="forward", folder="INBOX", uid=uid)
    assert 'value="Fwd: to forward"' in form.text and 'name="fwd_part" value="2"' in form.text
    fields = [
        ("csrf", form.csrf()),
        ("to", BOB),
        ("subject", "Fwd: to forward"),
        ("body", "fyi"),
        ("fwd_folder", "INBOX"),
        ("fwd_uid", str(uid)),
        ("fwd_part", "2"),
        ("op", "send"),
    ]
    assert "Message sent" in alice.post_multipart("/send", fields).text
    got = find_uid(node, "Fwd: to forward", user=BOB, password=BOB_PASSWORD)
    raw = next(r for u, _f, r in folder_messages(node, "INBOX", BOB, BOB_PASSWORD) if u == got)
    (att,) = list(email.message_from_bytes(raw, policy=email.policy.default).iter_attachments())
    assert att.get_filename() == "doc.pdf" and att.get_content() == b"PDFDATA"


def test_drafts_saved_edited_and_sent(node: MailgwServer, alice: Browser) -> None:
    csrf = alice.get("/compose").csrf()
    fields = [
        ("csrf", csrf),
        ("to", BOB),
        ("bcc", "carol@example.test"),
        ("subject", "draft one"),
        ("body", "草稿"),
        ("op", "draft"),
    ]
    saved = alice.post_multipart(
        "/send", fields, [("attach", "a.bin", "application/octet-stream", b"\x00\x01")]
    )
    assert saved.status == 200 and "Draft saved" in saved.text
    uid = find_uid(node, "draft one", "Drafts")
    flags = {u: f for u, f, _ in folder_messages(node, "Drafts")}[uid]
    assert "\\Draft" in flags
    edit = alice.get("/compose", mode="draft", folder="Drafts", uid=uid)
    assert 'value="draft one"' in edit.text and "草稿" in edit.text
    assert (
        f'name="draft_uid" value="{uid}"' in edit.text and 'name="fwd_part" value="2"' in edit.text
    )
    fields = [
        ("csrf", csrf),
        ("to", BOB),
        ("subject", "draft one"),
        ("body", "草稿 final"),
        ("fwd_folder", "Drafts"),
        ("fwd_uid", str(uid)),
        ("fwd_part", "2"),
        ("draft_uid", str(uid)),
        ("op", "send"),
    ]
    assert "Message sent" in alice.post_multipart("/send", fields).text
    assert uid not in {u for u, _f, _r in folder_messages(node, "Drafts")}
    got = find_uid(node, "draft one", user=BOB, password=BOB_PASSWORD)
    raw = next(r for u, _f, r in folder_messages(node, "INBOX", BOB, BOB_PASSWORD) if u == got)
    assert b"Bcc" not in raw


def test_send_refusals(node: MailgwServer, alice: Browser) -> None:
    csrf = alice.get("/compose").csrf()
    none = alice.post_multipart("/send", [("csrf", csrf), ("subject", "x"), ("op", "send")])
    assert none.status == 400 and "at least one recipient" in none.text
    bad = alice.post_multipart("/send", [("csrf", csrf), ("to", "not an address"), ("op", "send")])
    assert bad.status == 400 and "not an e-mail address" in bad.text
    big = alice.post_multipart(
        "/send",
        [("csrf", csrf), ("to", BOB), ("subject", "big"), ("op", "send")],
        [("attach", "big.bin", "application/octet-stream", b"x" * 70_000)],
    )
    assert big.status == 413 and "at most 64.0 KB" in big.text
    spoof = alice.post_multipart(
        "/send", [("csrf", csrf), ("to", "someone@far.test"), ("subject", "far"), ("op", "send")]
    )
    # No relay on this node: the submission checks refuse an outside recipient, as SMTP would.
    assert spoof.status in (400, 503) and "Not sent" in spoof.text


# -- settings ----------------------------------------------------------------------------


def test_signature_and_password_change(node: MailgwServer) -> None:
    b = Browser(base(node))
    b.login(BOB, BOB_PASSWORD)
    page = b.get("/settings")
    csrf = page.csrf()
    saved = b.post(
        "/settings", {"csrf": csrf, "op": "signature", "signature": "鲍勃 Bob\n<b>x</b>"}
    )
    assert "Signature saved" in saved.text and "鲍勃 Bob\n&lt;b&gt;x&lt;/b&gt;" in saved.text
    assert b.post("/settings", {"csrf": csrf, "op": "what"}).status == 400
    differ = b.post(
        "/settings",
        {
            "csrf": csrf,
            "op": "password",
            "current": BOB_PASSWORD,
            "new": "newpass123",
            "confirm": "other123",
        },
    )
    assert differ.status == 400
    short = b.post(
        "/settings",
        {
            "csrf": csrf,
            "op": "password",
            "current": BOB_PASSWORD,
            "new": "short",
            "confirm": "short",
        },
    )
    assert short.status == 400
    wrong = b.post(
        "/settings",
        {
            "csrf": csrf,
            "op": "password",
            "current": "nope",
            "new": "newpass123",
            "confirm": "newpass123",
        },
    )
    assert wrong.status == 403
    other = Browser(base(node))
    other.login(BOB, BOB_PASSWORD)
    ok = b.post(
        "/settings",
        {
            "csrf": csrf,
            "op": "password",
            "current": BOB_PASSWORD,
            "new": "bob new password",
            "confirm": "bob new password",
        },
    )
    assert ok.status == 200 and "Password changed" in ok.text
    assert other.get("/mail", follow=False).status == 303  # the other session ended
    try:
        imap(node, BOB, "bob new password").logout()
        sent = b.post_multipart(
            "/send",
            [("csrf", csrf), ("to", ALICE), ("subject", "signed"), ("body", "hi"), ("op", "send")],
        )
        assert "Message sent" in sent.text
        uid = find_uid(node, "signed")
        raw = next(r for u, _f, r in folder_messages(node, "INBOX") if u == uid)
        body = (
            email.message_from_bytes(raw, policy=email.policy.default)
            .get_body(("plain",))
            .get_content()
        )  # type: ignore[union-attr]
        assert body.replace("\r\n", "\n").endswith("-- \n鲍勃 Bob\n<b>x</b>\n")
    finally:
        node.cli("user", "passwd", BOB, "--password", BOB_PASSWORD)


def test_the_configured_reader_is_used(node: MailgwServer) -> None:
    """With ``reader = imap`` the webmail logs in to the IMAP server as the user; with the
    store reader it does not."""
    imap_logins = len(re.findall(r"imap \S+ login erin@example\.test from", node.log()))
    b = Browser(base(node))
    assert b.login("erin@example.test", "erin password").status == 200
    if node.sections["webmail"]["reader"] == "imap":
        wait_until(
            lambda: (
                len(re.findall(r"imap \S+ login erin@example\.test from", node.log()))
                == imap_logins + 1
            ),
            what="the webmail's IMAP login",
        )
    else:
        # A marker login after the page was served: any login of the webmail is logged before.
        marks = node.log().count("login bob@example.test from")
        imap(node, BOB, BOB_PASSWORD).logout()
        wait_until(
            lambda: node.log().count("login bob@example.test from") > marks, what="the marker"
        )
        assert len(re.findall(r"imap \S+ login erin@example\.test from", node.log())) == imap_logins


def test_cookies_are_secure_over_https(tmp_path: Path, selfsigned: tuple[Path, Path]) -> None:
    """HTTPS to the webmail, and the webmail reading over IMAP with implicit TLS, the
    server's certificate checked against imap_ca_file."""
    cert, key = selfsigned
    port, tls_port, imaps = free_port(), free_port(), free_port()
    server = make_server(
        tmp_path / "tls",
        {
            "tls": {"certificate": str(cert), "private_key": str(key)},
            "http": {
                "enabled": "yes",
                "listen": f"tcp:{port}:interface=127.0.0.1",
                "listen_tls": f"tcp:{tls_port}:interface=127.0.0.1",
            },
            "imap": {"listen_tls": f"tcp:{imaps}:interface=127.0.0.1"},
            "webmail": {
                "enabled": "yes",
                "reader": "imap",
                "imap_port": str(imaps),
                "imap_tls": "yes",
                "imap_ca_file": str(cert),
            },
        },
    )
    try:
        wait_for_port("127.0.0.1", tls_port, proc=server.proc)
        context = ssl.create_default_context(cafile=str(cert))
        context.check_hostname = False
        b = Browser(f"https://127.0.0.1:{tls_port}", context)
        (login_cookie,) = b.get("/").set_cookies()
        assert "; Secure" in login_cookie
        page = b.get("/")
        token = re.search(r'name="login_token" value="([^"]+)"', page.text).group(1)  # type: ignore[union-attr]
        done = b.post(
            "/login", {"user": ALICE, "password": PASSWORD, "login_token": token}, follow=False
        )
        assert done.status == 303
        session = next(c for c in done.set_cookies() if c.startswith("mailgw_session="))
        assert "HttpOnly" in session and "SameSite=Strict" in session and "Secure" in session
        inbox = b.get("/mail", folder="INBOX")
        assert inbox.status == 200 and 'data-folder="Sent"' in inbox.text  # read over IMAPS
        wait_until(
            lambda: re.search(r"imap \S+ login alice@example\.test from", server.log()),
            what="the webmail's IMAPS login",
        )
        # Plain HTTP on the same node: no Secure flag (the browser would drop the cookie).
        (plain,) = Browser(f"http://127.0.0.1:{port}").get("/").set_cookies()
        assert "Secure" not in plain
    finally:
        server.stop()


def test_spam_button_reports_to_the_reputation_service(tmp_path: Path) -> None:
    port = free_port()
    server = make_server(
        tmp_path / "reputation",
        {
            "http": {"enabled": "yes", "listen": f"tcp:{port}:interface=127.0.0.1"},
            "webmail": {"enabled": "yes"},
            "reputation": {"enabled": "yes"},
        },
    )
    try:
        wait_for_port("127.0.0.1", port, proc=server.proc)
        smtp_send(server, mail("report me", sender="spammer@outside.test"))
        uid = find_uid(server, "report me")
        raw = next(r for u, _f, r in folder_messages(server, "INBOX") if u == uid)
        qid = re.search(rb"\(mailgw\) with \S+ id (\w+)", raw).group(1).decode()  # type: ignore[union-attr]
        b = Browser(f"http://127.0.0.1:{port}")
        csrf = b.login(ALICE, PASSWORD).csrf()
        done = b.post("/action", {"csrf": csrf, "folder": "INBOX", "uid": uid, "op": "spam"})
        assert done.status == 200
        wait_until(lambda: f"spam report of {qid}:" in server.log(), what="the spam report")
        junk = find_uid(server, "report me", "Junk")
        b.post("/action", {"csrf": csrf, "folder": "Junk", "uid": junk, "op": "ham"})
        wait_until(lambda: f"ham report of {qid}:" in server.log(), what="the ham report")
    finally:
        server.stop()
