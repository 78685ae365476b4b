"""The webmail in Debian's Chromium (headless, driven by Playwright): log in, read a mail that
arrived over SMTP, reply with an attachment and see the reply in another user's mailbox over
IMAP; hostile mail rendered without running anything; CSRF and lockout; a phone-sized screen.
One browser for the module; a failing test leaves a screenshot in its tmp dir."""

from __future__ import annotations

import contextlib
import email
import email.policy
import os
import smtplib
from collections.abc import Iterator
from email.message import EmailMessage
from pathlib import Path
from typing import Any

import pytest

from mailgw.testing.server import MailgwServer, free_port, wait_for_port
from tests.integration.conftest import make_server
from tests.integration.helpers import PASSWORD
from tests.integration.test_webmail import BOB, BOB_PASSWORD, XSS_HTML, find_uid, folder_messages

CHROMIUM = "/usr/bin/chromium"
sync_api = pytest.importorskip("playwright.sync_api")
pytestmark = pytest.mark.skipif(not os.path.exists(CHROMIUM), reason="chromium is not installed")


@pytest.fixture(scope="module")
def node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MailgwServer]:
    port, sub, subs = free_port(), free_port(), free_port()
    server = make_server(
        tmp_path_factory.mktemp("webmail-browser"),
        {
            "http": {"enabled": "yes", "listen": f"tcp:{port}:interface=127.0.0.1"},
            "webmail": {"enabled": "yes"},
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
    server.ports.update(http=port)
    server.cli("user", "add", "carol@example.test", "--password", "carol password")
    try:
        wait_for_port("127.0.0.1", port, proc=server.proc)
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    with sync_api.sync_playwright() as p:
        b = p.chromium.launch(
            executable_path=CHROMIUM,
            headless=True,
            args=["--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage"],
        )
        try:
            yield b
        finally:
            b.close()


@contextlib.contextmanager
def screenshot_on_failure(page: Any, tmp_path: Path) -> Iterator[None]:
    try:
        yield
    except BaseException:
        with contextlib.suppress(Exception):
            shot = tmp_path / "failure.png"
            page.screenshot(path=str(shot), full_page=True)
            print(f"screenshot: {shot}")
        raise


@pytest.fixture
def page(browser: Any, node: MailgwServer, tmp_path: Path) -> Iterator[Any]:
    context = browser.new_context(base_url=f"http://127.0.0.1:{node.ports['http']}")
    context.set_default_timeout(15_000)
    pg = context.new_page()
    dialogs: list[str] = []
    pg.on("dialog", lambda d: (dialogs.append(d.message), d.dismiss()))
    pg.dialogs = dialogs
    with screenshot_on_failure(pg, tmp_path):
        yield pg
    context.close()


def log_in(page: Any, user: str = "alice@example.test", password: str = PASSWORD) -> None:
    page.goto("/")
    page.fill("#user", user)
    page.fill("#password", password)
    page.click("#login")


def smtp_send(node: MailgwServer, msg: EmailMessage, to: str = "alice@example.test") -> None:
    with smtplib.SMTP("127.0.0.1", node.ports["mx"], timeout=15) as smtp:
        smtp.send_message(msg, to_addrs=[to])


def test_read_and_reply_with_an_attachment(page: Any, node: MailgwServer) -> None:
    msg = EmailMessage()
    msg["From"] = f"鲍勃 <{BOB}>"
    msg["To"] = "alice@example.test"
    msg["Subject"] = "浏览器测试 browser hello"
    msg["Message-ID"] = "<browser-1@example.test>"
    msg.set_content("你好 Alice, see https://example.org/doc\n")
    smtp_send(node, msg)
    find_uid(node, "浏览器测试 browser hello")
    log_in(page)
    page.wait_for_url("**/mail?folder=INBOX")
    page.click("text=浏览器测试 browser hello")
    assert page.inner_text("#subject") == "浏览器测试 browser hello"
    assert "鲍勃" in page.inner_text(".msghead")
    link = page.locator("#body a")
    assert link.get_attribute("href") == "https://example.org/doc"
    assert link.get_attribute("rel") == "noopener noreferrer"
    page.click("#reply")
    assert page.input_value("#subject") == "Re: 浏览器测试 browser hello"
    page.fill("#body", "回复 with a file\n" + page.input_value("#body"))
    page.set_input_files(
        "#attach",
        files=[{"name": "附件.txt", "mimeType": "text/plain", "buffer": "附件内容\n".encode()}],
    )
    page.click("#send")
    assert "Message sent" in page.inner_text("main")
    uid = find_uid(node, "Re: 浏览器测试 browser hello", user=BOB, password=BOB_PASSWORD)
    raw = next(r for u, _f, r in folder_messages(node, "INBOX", BOB, BOB_PASSWORD) if u == uid)
    reply = email.message_from_bytes(raw, policy=email.policy.default)
    assert reply["In-Reply-To"] == "<browser-1@example.test>"
    (att,) = list(reply.iter_attachments())
    assert att.get_filename() == "附件.txt" and att.get_content() == "附件内容\n"
    assert page.dialogs == []


def test_hostile_mail_runs_nothing(page: Any, node: MailgwServer) -> None:
    html_mail = EmailMessage()
    html_mail["From"] = "attacker@outside.test"
    html_mail["To"] = "alice@example.test"
    html_mail["Subject"] = "xss html"
    html_mail.set_content("text part")
    html_mail.add_alternative(XSS_HTML, subtype="html")
    html_mail.add_attachment(
        b"<html><script>alert('attachment')</script></html>",
        maintype="text",
        subtype="html",
        filename="inline.html",
    )
    smtp_send(node, html_mail)
    text_mail = EmailMessage()
    text_mail["From"] = "attacker@outside.test"
    text_mail["To"] = "alice@example.test"
    text_mail["Subject"] = "xss <img src=x onerror=alert('subject')>"
    text_mail.set_content(
        "<script>alert('text')</script> javascript:alert('link') http://ok.test/\n"
    )
    smtp_send(node, text_mail)
    html_uid = find_uid(node, "xss html")
    find_uid(node, "xss <img src=x onerror=alert('subject')>")
    log_in(page)
    page.wait_for_url("**/mail?folder=INBOX")
    assert page.locator("main img").count() == 0  # the subject is text in the list
    page.click("text=xss <img src=x onerror=alert('subject')>")
    assert page.locator("#body a").count() == 1  # only the http link
    assert page.locator("script:not([src='/static/app.js'])").count() == 0
    page.goto(f"/read?folder=INBOX&uid={html_uid}")
    frame_el = page.locator("iframe#body")
    assert frame_el.get_attribute("sandbox") == "allow-popups allow-popups-to-escape-sandbox"
    frame = page.frame_locator("iframe#body")
    frame.locator("text=ok link").wait_for()
    assert frame.locator("script").count() == 0
    assert frame.locator("[onclick], [onerror], svg, iframe, form").count() == 0
    assert frame.locator("a[href^='javascript']").count() == 0
    # Sandboxed without allow-same-origin: the page cannot reach into the frame either.
    assert page.evaluate("document.querySelector('iframe#body').contentDocument === null")
    frame.locator("text=click").click()
    assert page.locator("#images-blocked").is_visible()
    page.click("#show-images")
    assert "images=1" in (page.locator("iframe#body").get_attribute("src") or "")
    page.frame_locator("iframe#body").locator("text=ok link").wait_for()
    assert page.frame_locator("iframe#body").locator("script").count() == 0
    # The HTML attachment downloads; it is never rendered.
    with page.expect_download() as download:
        page.click("text=inline.html")
    assert download.value.suggested_filename == "inline.html"
    page.wait_for_timeout(300)  # a dialog, if any, would have been raised by now
    assert page.dialogs == []


def test_csrf_and_lockout(page: Any, node: MailgwServer) -> None:
    log_in(page)
    page.wait_for_url("**/mail?folder=INBOX")
    forged = page.request.post("/action", form={"folder": "INBOX", "uid": "1", "op": "delete"})
    assert forged.status == 403
    page.context.clear_cookies()
    for _ in range(3):
        log_in(page, "carol@example.test", "wrong")
        assert "Login failed" in page.inner_text(".error")
    log_in(page, "carol@example.test", "carol password")
    assert "Login failed" in page.inner_text(".error")


def test_phone_sized_screen(browser: Any, node: MailgwServer, tmp_path: Path) -> None:
    context = browser.new_context(
        base_url=f"http://127.0.0.1:{node.ports['http']}",
        viewport={"width": 375, "height": 700},
        is_mobile=True,
    )
    pg = context.new_page()
    with screenshot_on_failure(pg, tmp_path):
        log_in(pg)
        pg.wait_for_url("**/mail?folder=INBOX")
        assert pg.evaluate("document.documentElement.scrollWidth") <= 376
        assert pg.locator("nav").bounding_box()["width"] <= 376
        pg.click("#compose")
        assert pg.locator("#to").bounding_box()["width"] <= 376
    context.close()
