"""``WebmailResource`` with a fake reader, auth guard and submitter: the branches the real
server does not reach easily (TLS cookies, penalty delays on the clock, an auth store down,
no submitter, a refused submission, the spam hook, session expiry)."""

from __future__ import annotations

import io
import re
from typing import Any

from twisted.cred.error import UnauthorizedLogin
from twisted.internet import defer
from twisted.internet.task import Clock
from twisted.web.test.requesthelper import DummyRequest

from mailgw.directory.penalty import PenalisedLogin
from mailgw.model import User
from mailgw.model.reply import R
from mailgw.policy.submit import SubmissionError
from mailgw.webmail.reader import FolderInfo, Summary
from mailgw.webmail.settings import UserSettings
from mailgw.webmail.web import WebmailResource

MSG = b"From: a@outside.test\r\nSubject: hi\r\nMessage-ID: <1@x>\r\n\r\nbody\r\n"


class FakeReader:
    def __init__(self) -> None:
        self.boxes: dict[str, dict[int, tuple[bytes, set[str]]]] = {
            "INBOX": {1: (MSG, set())},
            "Junk": {},
        }
        self.next_uid = 10

    def open_session(self, user: str, password: str) -> None:
        self.opened = (user, password)

    def close_session(self, user: str) -> defer.Deferred[None]:
        return defer.succeed(None)

    def folders(self, user: str) -> defer.Deferred[list[FolderInfo]]:
        return defer.succeed([FolderInfo(n, len(b), 0) for n, b in self.boxes.items()])

    def summaries(self, user: str, folder: str) -> defer.Deferred[list[Summary]]:
        return defer.succeed(
            [Summary(u, frozenset(f), len(d), 0.0) for u, (d, f) in self.boxes[folder].items()]
        )

    def headers(self, user: str, folder: str, uids: Any) -> defer.Deferred[dict[int, bytes]]:
        box = self.boxes[folder]
        return defer.succeed({u: box[u][0].split(b"\r\n\r\n")[0] for u in uids if u in box})

    def fetch(self, user: str, folder: str, uid: int) -> defer.Deferred[bytes]:
        return defer.maybeDeferred(lambda: self.boxes[folder][uid][0])

    def set_flags(
        self, user: str, folder: str, uids: Any, flags: Any, add: bool
    ) -> defer.Deferred[None]:
        for u in uids:
            (
                self.boxes[folder][u][1].update
                if add
                else self.boxes[folder][u][1].difference_update
            )(flags)
        return defer.succeed(None)

    def move(self, user: str, folder: str, uids: Any, dest: str) -> defer.Deferred[None]:
        for u in uids:
            self.boxes.setdefault(dest, {})[u] = self.boxes[folder].pop(u)
        return defer.succeed(None)

    def expunge(self, user: str, folder: str, uids: Any) -> defer.Deferred[None]:
        for u in uids:
            self.boxes[folder].pop(u, None)
        return defer.succeed(None)

    def append(self, user: str, folder: str, data: bytes, flags: Any) -> defer.Deferred[int]:
        self.next_uid += 1
        self.boxes.setdefault(folder, {})[self.next_uid] = (data, set(flags))
        return defer.succeed(self.next_uid)


class FakeAuth:
    def __init__(self) -> None:
        self.answer: Any = None

    def check_password(
        self, name: str, password: str, ip: str, protocol: str = ""
    ) -> defer.Deferred[Any]:
        if self.answer is not None:
            return defer.fail(self.answer)
        if password == "right":
            return defer.succeed(User(name, None, True))
        return defer.fail(PenalisedLogin(2.0))


class FakeSubmitter:
    def __init__(self) -> None:
        self.sent: list[tuple[str, Any, bytes]] = []
        self.refuse: Exception | None = None

    def submit(
        self, user: str, envelope: Any, message: bytes, protocol: str = "", client_ip: str = ""
    ) -> defer.Deferred[str]:
        if self.refuse is not None:
            return defer.fail(self.refuse)
        self.sent.append((user, envelope, message))
        return defer.succeed("QID1")


class Request(DummyRequest):
    def __init__(
        self,
        method: bytes,
        path: bytes,
        args: dict[str, str] | None = None,
        secure: bool = False,
        cookies: dict[bytes, bytes] | None = None,
    ) -> None:
        super().__init__(path.lstrip(b"/").split(b"/"))
        self.method = method
        self.path = path
        self.uri = path
        self.args = {k.encode(): [v.encode()] for k, v in (args or {}).items()}
        self.secure = secure
        self.cookies: list[bytes] = []
        self.received = cookies or {}
        self.content = io.BytesIO(b"")

    def isSecure(self) -> bool:  # noqa: N802 (twisted.web)
        return self.secure

    def getCookie(self, name: bytes) -> bytes | None:  # noqa: N802 (twisted.web)
        return self.received.get(name)

    def text(self) -> str:
        return b"".join(self.written).decode()


def make(
    tmp_path: Any, submitter: Any = None
) -> tuple[WebmailResource, Clock, FakeAuth, FakeReader]:
    clock, auth, reader = Clock(), FakeAuth(), FakeReader()
    resource = WebmailResource(
        reader, auth, submitter, None, UserSettings(str(tmp_path)), clock, "h.test", 60.0, 1000, 50
    )
    return resource, clock, auth, reader


def render(resource: WebmailResource, request: Request) -> Request:
    resource.render(request)
    return request


def login(resource: WebmailResource, password: str = "right", secure: bool = False) -> Request:
    return render(
        resource,
        Request(
            b"POST",
            b"/login",
            {"user": "alice@example.test", "password": password, "login_token": "t"},
            secure,
            {b"mailgw_login": b"t"},
        ),
    )


def session_of(request: Request) -> dict[bytes, bytes]:
    value = next(
        c
        for c in request.cookies
        if c.startswith(b"mailgw_session=") and not c.startswith(b"mailgw_session=;")
    )
    return {b"mailgw_session": value.split(b";")[0].split(b"=", 1)[1]}


def test_tls_cookies_are_secure(tmp_path: Any) -> None:
    resource, *_ = make(tmp_path)
    form = render(resource, Request(b"GET", b"/", secure=True))
    assert form.cookies and all(b"; Secure" in c for c in form.cookies)
    done = login(resource, secure=True)
    assert done.responseCode == 303
    assert all(
        b"HttpOnly" in c and b"SameSite=Strict" in c and b"Secure" in c for c in done.cookies
    )


def test_a_failed_login_answers_after_the_penalty_delay(tmp_path: Any) -> None:
    resource, clock, auth, _ = make(tmp_path)
    request = login(resource, "wrong")
    assert not request.finished
    clock.advance(1.9)
    assert not request.finished
    clock.advance(0.2)
    assert request.finished and request.responseCode == 401
    auth.answer = UnauthorizedLogin("locked out")  # a lockout without delay
    assert login(resource).responseCode == 401
    auth.answer = RuntimeError("directory down")
    down = login(resource)
    assert down.responseCode == 503 and "unavailable" in down.text()


def test_sessions_expire(tmp_path: Any) -> None:
    resource, clock, *_ = make(tmp_path)
    cookies = session_of(login(resource))
    ok = render(resource, Request(b"GET", b"/mail", cookies=cookies))
    assert ok.finished and ok.responseCode in (None, 200)
    clock.advance(61)
    expired = render(resource, Request(b"GET", b"/mail", cookies=cookies))
    assert expired.responseCode == 303 and expired.responseHeaders.getRawHeaders(b"location") == [
        b"/"
    ]


def _csrf(resource: WebmailResource, cookies: dict[bytes, bytes]) -> str:
    page = render(resource, Request(b"GET", b"/mail", {"folder": "INBOX"}, cookies=cookies)).text()
    m = re.search(r'name="csrf" value="([^"]+)"', page)
    assert m
    return m.group(1)


def test_sending_without_a_submitter_and_refused(tmp_path: Any) -> None:
    resource, *_ = make(tmp_path)
    cookies = session_of(login(resource))
    csrf = _csrf(resource, cookies)
    off = render(
        resource,
        Request(
            b"POST", b"/send", {"csrf": csrf, "to": "b@example.test", "op": "send"}, cookies=cookies
        ),
    )
    assert off.responseCode == 503 and "not enabled" in off.text()
    sub = FakeSubmitter()
    resource.submitter = sub
    sub.refuse = SubmissionError(R.TOO_MANY_RECIPIENTS)
    refused = render(
        resource,
        Request(
            b"POST", b"/send", {"csrf": csrf, "to": "b@example.test", "op": "send"}, cookies=cookies
        ),
    )
    assert refused.responseCode == 503 and "Not sent: 452" in refused.text()
    sub.refuse = RuntimeError("boom")
    broken = render(
        resource,
        Request(
            b"POST", b"/send", {"csrf": csrf, "to": "b@example.test", "op": "send"}, cookies=cookies
        ),
    )
    assert broken.responseCode == 500 and "boom" not in broken.text()


def test_spam_hook_and_move(tmp_path: Any) -> None:
    resource, _, _, reader = make(tmp_path)
    reported: list[tuple[str, bytes, bool]] = []
    resource.report_spam = lambda user, raw, spam: reported.append((user, raw, spam))
    cookies = session_of(login(resource))
    csrf = _csrf(resource, cookies)
    done = render(
        resource,
        Request(
            b"POST",
            b"/action",
            {"csrf": csrf, "folder": "INBOX", "uid": "1", "op": "spam", "back": "//evil.test/"},
            cookies=cookies,
        ),
    )
    assert done.responseCode == 303
    assert reported == [("alice@example.test", MSG, True)]
    assert 1 in reader.boxes["Junk"] and 1 not in reader.boxes["INBOX"]
    nothing = render(
        resource,
        Request(
            b"POST",
            b"/action",
            {"csrf": csrf, "op": "spam", "back": "//evil.test/"},
            cookies=cookies,
        ),
    )
    assert nothing.responseHeaders.getRawHeaders(b"location") == [b"/"]  # never off-site
