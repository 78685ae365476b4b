"""The webmail's twisted.web resource: routing, sessions, CSRF checks and the handlers of
every page and action (see ``docs/webmail.md``)."""

from __future__ import annotations

import base64
import contextlib
import email.parser
import email.policy
import email.utils
import math
import secrets
from collections import OrderedDict
from collections.abc import Callable, Generator
from dataclasses import dataclass
from typing import Any

from twisted.cred.error import UnauthorizedLogin
from twisted.internet import defer, task
from twisted.logger import Logger
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET

from mailgw.interfaces import MailboxNotFound, QuotaExceeded
from mailgw.mime import parse, parse_date
from mailgw.model import Envelope
from mailgw.webmail import compose, pages, static
from mailgw.webmail.imapreader import IMAPError
from mailgw.webmail.message import (
    MessageView,
    address_list,
    attachment_data,
    base_subject,
    body_text,
    format_addresses,
    header_text,
    message_ids,
    read_message,
)
from mailgw.webmail.reader import IMailReader, Summary
from mailgw.webmail.sanitize import clean_html, linkify
from mailgw.webmail.sessions import COOKIE, LOGIN_COOKIE, Session, Sessions, cookie
from mailgw.webmail.settings import MAX_SIGNATURE, UserSettings
from mailgw.webmail.template import Markup
from mailgw.webmail.threads import group

log = Logger(namespace="mailgw.webmail")

PAGE_CSP = (
    b"default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
    b"frame-src 'self'; form-action 'self'; base-uri 'none'; frame-ancestors 'none'"
)
BODY_CSP = (
    b"default-src 'none'; style-src 'unsafe-inline'; img-src data:%s; font-src 'none'; "
    b"form-action 'none'; base-uri 'none'; frame-ancestors 'self'; "
    b"sandbox allow-popups allow-popups-to-escape-sandbox"
)
DOWNLOAD_CSP = b"default-src 'none'; sandbox"
MAX_INLINE_IMAGE = 2 * 1024 * 1024
INLINE_IMAGE_TYPES = frozenset({"image/png", "image/gif", "image/jpeg", "image/webp", "image/bmp"})
SUMMARY_CACHE = 200_000
"""Header facts kept for the message lists (all users), least recently used dropped."""
HEADER_BATCH = 500
FETCH_BATCH = 200
"""Whole messages asked of the reader at once (a body search)."""
"""Headers asked of the reader at once."""
MIN_PASSWORD = 8


class HTTPError(Exception):
    """Answer the request with ``status`` and a short page saying ``text``."""

    def __init__(self, status: int, text: str) -> None:
        super().__init__(text)
        self.status = status
        self.text = text


class Redirect(Exception):
    """Answer 303 See Other to ``location``."""

    def __init__(self, location: str) -> None:
        super().__init__(location)
        self.location = location


@dataclass(frozen=True)
class Head:
    """What the list needs of a message's header (cached: a header never changes)."""

    sender: str
    sender_addr: str
    subject: str
    date: float | None
    message_id: str
    refs: list[str]


@dataclass(frozen=True)
class Line:
    """A message of the list with the header fields it is sorted, searched and threaded by."""

    summary: Summary
    sender: str
    sender_addr: str
    subject: str
    date: float
    message_id: str
    refs: list[str]


def spam_report_none(user: str, raw: bytes, spam: bool) -> None:
    """The default spam/ham hook: nothing to tell (the message is still moved to Junk or
    back to INBOX). A reputation service sets ``WebmailResource.report_spam``."""


class WebmailResource(Resource):
    """The webmail at ``/`` (a leaf: it routes on the whole request path)."""

    isLeaf = True

    def __init__(
        self,
        reader: IMailReader,
        auth: Any,
        submitter: Any,
        directory: Any,
        settings: UserSettings,
        clock: Any,
        hostname: str,
        session_timeout: float,
        max_upload: int,
        page_size: int,
    ) -> None:
        super().__init__()  # type: ignore[no-untyped-call]
        self.reader = reader
        self.auth = auth
        self.submitter = submitter
        self.directory = directory
        self.settings = settings
        self.clock = clock
        self.hostname = hostname
        self.sessions = Sessions(clock, session_timeout, user_gone=self._user_gone)
        self.max_upload = max_upload
        self.page_size = page_size
        self.report_spam: Callable[[str, bytes, bool], Any] = spam_report_none
        """``report_spam(user, message bytes, is_spam)``: the reputation hook (may return a
        Deferred); called before the message is moved."""
        self._heads: OrderedDict[tuple[str, str, int, int, float], Head] = OrderedDict()
        self.routes: dict[tuple[bytes, bytes], Callable[[Any, Any], Any]] = {
            (b"GET", b"/"): self.home,
            (b"POST", b"/login"): self.login,
            (b"POST", b"/logout"): self.logout,
            (b"GET", b"/mail"): self.mail,
            (b"GET", b"/read"): self.read,
            (b"GET", b"/body"): self.body,
            (b"GET", b"/att"): self.attachment,
            (b"GET", b"/compose"): self.compose,
            (b"POST", b"/send"): self.send,
            (b"POST", b"/action"): self.action,
            (b"GET", b"/settings"): self.settings_get,
            (b"POST", b"/settings"): self.settings_post,
            (b"GET", b"/static/app.css"): self.css,
            (b"GET", b"/static/app.js"): self.js,
        }
        self.public = {b"/", b"/login", b"/static/app.css", b"/static/app.js"}

    def _user_gone(self, user: str) -> None:
        """The user's last session ended: the reader forgets the password."""
        d = self.reader.close_session(user)
        d.addErrback(lambda f: log.failure("webmail: closing {user}", f, user=user))

    # -- dispatch ------------------------------------------------------------------------

    def render(self, request: Any) -> Any:
        path = request.path
        method = b"GET" if request.method == b"HEAD" else request.method
        handler = self.routes.get((method, path))
        if handler is None:
            known = any(p == path for _m, p in self.routes)
            status, text = (405, "method not allowed") if known else (404, "not found")
            if status == 405:
                allowed = sorted({m for m, p in self.routes if p == path})
                request.setHeader(b"allow", b", ".join(allowed))
            return self._error(request, status, text)
        session = self.sessions.get(_cookie(request, COOKIE))
        if session is None and path not in self.public:
            if method == b"GET":
                return self._redirect(request, "/")
            return self._error(request, 403, "your session has ended: log in again")
        if (
            method == b"POST"
            and path != b"/login"
            and (session is None or not session.csrf_ok(_arg(request, "csrf")))
        ):
            return self._error(request, 403, "missing or wrong CSRF token: reload the page")
        d = defer.maybeDeferred(handler, request, session)
        d.addCallbacks(lambda body: self._finish(request, body), lambda f: self._failed(request, f))
        return NOT_DONE_YET

    def _finish(self, request: Any, body: bytes | None) -> None:
        if request.finished or getattr(request, "_disconnected", False):
            return
        if body is not None and request.method != b"HEAD":
            request.write(body)
        request.finish()

    def _failed(self, request: Any, failure: Any) -> None:
        value = failure.value
        if isinstance(value, Redirect):
            body = self._redirect(request, value.location)
        elif isinstance(value, HTTPError):
            body = self._error(request, value.status, value.text)
        elif isinstance(value, IMAPError):
            log.warn("webmail: {path}: {error}", path=request.path, error=str(value))
            body = self._error(request, 502, "the mail server is unavailable: try again later")
        elif isinstance(value, MailboxNotFound):
            body = self._error(request, 404, "no such folder")
        elif isinstance(value, KeyError):
            body = self._error(request, 404, "no such message")
        else:
            log.failure("webmail: {path} failed", failure, path=request.path)
            body = self._error(request, 500, "internal error: the details are in the server log")
        self._finish(request, body)

    def _headers(self, request: Any, content_type: bytes = b"text/html; charset=utf-8") -> None:
        request.setHeader(b"content-type", content_type)
        request.setHeader(b"cache-control", b"no-store")
        request.setHeader(b"x-content-type-options", b"nosniff")
        request.setHeader(b"referrer-policy", b"no-referrer")
        request.setHeader(b"content-security-policy", PAGE_CSP)
        request.setHeader(b"x-frame-options", b"DENY")

    def _error(self, request: Any, status: int, text: str) -> bytes:
        request.setResponseCode(status)
        self._headers(request)
        return b"" if request.method == b"HEAD" else pages.error_page(status, text)

    def _redirect(self, request: Any, location: str) -> bytes:
        request.setResponseCode(303)
        self._headers(request)
        request.setHeader(b"location", location.encode("utf-8"))
        return b""

    def _page(self, request: Any, session: Session, title: str, content: Markup) -> bytes:
        self._headers(request)
        return pages.layout(title, content, session.user, session.csrf)

    # -- static --------------------------------------------------------------------------

    def css(self, request: Any, session: Session | None) -> bytes:
        self._headers(request, b"text/css; charset=utf-8")
        request.setHeader(b"cache-control", b"max-age=3600")
        return static.CSS.encode("utf-8")

    def js(self, request: Any, session: Session | None) -> bytes:
        self._headers(request, b"text/javascript; charset=utf-8")
        request.setHeader(b"cache-control", b"max-age=3600")
        return static.JS.encode("utf-8")

    # -- login ---------------------------------------------------------------------------

    def home(self, request: Any, session: Session | None) -> bytes:
        if session is not None:
            raise Redirect("/mail?folder=INBOX")
        return self._login_form(request)

    def _login_form(self, request: Any, message: str = "", user: str = "") -> bytes:
        token = secrets.token_urlsafe(24)
        self._headers(request)
        request.cookies.append(cookie(LOGIN_COOKIE, token, request.isSecure()))
        return pages.login_page(token, message, user)

    @defer.inlineCallbacks
    def login(self, request: Any, session: Session | None) -> Generator[Any, Any, bytes]:
        token = _arg(request, "login_token")
        expected = _cookie(request, LOGIN_COOKIE)
        if not token or not expected or not secrets.compare_digest(token, expected):
            raise HTTPError(403, "the login form has expired: reload the page")
        name = (_arg(request, "user") or "").strip()
        password = _arg(request, "password") or ""
        ip = request.getClientAddress().host if hasattr(request.getClientAddress(), "host") else ""
        if not name or not password:
            request.setResponseCode(400)
            return self._login_form(request, "Enter your address and password.", name)
        try:
            user = yield self.auth.check_password(name, password, ip, "webmail")
        except UnauthorizedLogin as e:
            delay = float(getattr(e, "delay", 0.0))
            if delay > 0:
                yield task.deferLater(self.clock, delay, lambda: None)
            log.info("webmail: login failed for {user!r} from {ip}", user=name, ip=ip or "-")
            request.setResponseCode(401)
            return self._login_form(
                request, "Login failed: wrong address or password, or too many attempts.", name
            )
        except Exception:
            log.failure("webmail: login check failed")
            request.setResponseCode(503)
            return self._login_form(request, "Login is unavailable for now: try again later.", name)
        if session is not None:
            self.sessions.end(session.sid)
        new = self.sessions.create(user.name)
        self.reader.open_session(user.name, password)
        request.cookies.append(cookie(COOKIE, new.sid, request.isSecure()))
        request.cookies.append(cookie(LOGIN_COOKIE, "", request.isSecure(), 0))
        log.info("webmail: {user} logged in from {ip}", user=user.name, ip=ip or "-")
        raise Redirect("/mail?folder=INBOX")

    def logout(self, request: Any, session: Session | None) -> bytes:
        assert session is not None
        self.sessions.end(session.sid)
        request.cookies.append(cookie(COOKIE, "", request.isSecure(), 0))
        raise Redirect("/")

    # -- message list --------------------------------------------------------------------

    @staticmethod
    def _head(header: bytes) -> Head:
        msg = parse(header)
        senders = address_list(msg, "From")
        sender = (senders[0][0] or senders[0][1]) if senders else header_text(msg, "From")
        refs = message_ids(header_text(msg, "References")) + message_ids(
            header_text(msg, "In-Reply-To")
        )
        return Head(
            sender,
            senders[0][1] if senders else "",
            header_text(msg, "Subject"),
            parse_date(header_text(msg, "Date")),
            (message_ids(header_text(msg, "Message-ID")) or [""])[0],
            refs,
        )

    @defer.inlineCallbacks
    def _lines_of(self, user: str, folder: str) -> Generator[Any, Any, list[Line]]:
        """The folder's messages with their header facts: headers read only for the
        messages not in the cache (a 10,000-message folder is read once)."""
        summaries: list[Summary] = yield self.reader.summaries(user, folder)
        cache = self._heads

        def key(s: Summary) -> tuple[str, str, int, int, float]:
            return (user, folder, s.uid, s.size, s.internaldate)

        missing = [s.uid for s in summaries if key(s) not in cache]
        if missing:
            got: dict[int, bytes] = {}
            for i in range(0, len(missing), HEADER_BATCH):
                got.update((yield self.reader.headers(user, folder, missing[i : i + HEADER_BATCH])))
            for s in summaries:
                if s.uid in got:
                    cache[key(s)] = self._head(got[s.uid])
            while len(cache) > SUMMARY_CACHE:
                cache.popitem(last=False)
        lines = []
        for s in summaries:
            head = cache.get(key(s))
            if head is None:  # gone meanwhile
                continue
            cache.move_to_end(key(s))
            lines.append(
                Line(
                    s,
                    head.sender,
                    head.sender_addr,
                    head.subject,
                    head.date if head.date is not None else s.internaldate,
                    head.message_id,
                    head.refs,
                )
            )
        return lines

    @defer.inlineCallbacks
    def mail(self, request: Any, session: Session) -> Generator[Any, Any, bytes]:
        state = pages.ListState(
            folder=_arg(request, "folder") or "INBOX",
            page=_int(_arg(request, "page"), 1),
            sort=_choice(_arg(request, "sort"), ("date", "from", "subject")),
            order="asc" if _arg(request, "order") == "asc" else "desc",
            thread=_arg(request, "thread") == "1",
            q=(_arg(request, "q") or "").strip(),
            field=_choice(_arg(request, "field"), ("all", "subject", "from", "body")),
        )
        folders = yield self.reader.folders(session.user)
        lines = yield self._lines_of(session.user, state.folder)
        if state.q:
            lines = yield self._search(session.user, state.folder, lines, state.q, state.field)
        key: Callable[[Line], Any] = {
            "date": lambda ln: (ln.date, ln.summary.uid),
            "from": lambda ln: (ln.sender.casefold(), ln.date),
            "subject": lambda ln: (base_subject(ln.subject).casefold(), ln.date),
        }[state.sort]
        reverse = state.order == "desc"
        if state.thread:
            by_date = sorted(lines, key=lambda ln: (ln.date, ln.summary.uid))
            convs = group(by_date, [(ln.message_id, ln.refs) for ln in by_date])
            convs.sort(
                key=lambda c: key(max(c, key=key) if reverse else min(c, key=key)), reverse=reverse
            )
            units: list[list[Line]] = convs
        else:
            units = [[ln] for ln in sorted(lines, key=key, reverse=reverse)]
        pages_n = max(1, math.ceil(len(units) / self.page_size))
        state.page = min(max(state.page, 1), pages_n)
        shown = units[(state.page - 1) * self.page_size : state.page * self.page_size]
        rows = []
        for unit in shown:
            for depth, ln in enumerate(unit):
                f = ln.summary.flags
                rows.append(
                    pages.Row(
                        ln.summary.uid,
                        "\\Seen" in f,
                        "\\Flagged" in f,
                        "\\Answered" in f,
                        ln.sender,
                        ln.subject,
                        ln.date,
                        ln.summary.size,
                        depth=1 if depth else 0,
                        thread_size=len(unit) if depth == 0 else 1,
                    )
                )
        notice = _arg(request, "notice") or ""
        content = pages.message_list(
            state, rows, len(lines), pages_n, folders, session.csrf, notice
        )
        return self._page(request, session, f"{state.folder} - mailgw", content)

    @defer.inlineCallbacks
    def _search(
        self, user: str, folder: str, lines: list[Line], q: str, field: str
    ) -> Generator[Any, Any, list[Line]]:
        needle = q.casefold()
        out = []
        body_wanted = []
        for ln in lines:
            if (
                field in ("all", "subject")
                and needle in ln.subject.casefold()
                or field in ("all", "from")
                and (needle in ln.sender.casefold() or needle in ln.sender_addr.casefold())
            ):
                out.append(ln)
            elif field in ("all", "body"):
                body_wanted.append(ln)
        for i in range(0, len(body_wanted), FETCH_BATCH):
            batch = body_wanted[i : i + FETCH_BATCH]
            raws = yield self.reader.fetch_many(user, folder, [ln.summary.uid for ln in batch])
            out.extend(
                ln
                for ln in batch
                if ln.summary.uid in raws and needle in body_text(raws[ln.summary.uid]).casefold()
            )
        order = {id(ln): k for k, ln in enumerate(lines)}
        out.sort(key=lambda ln: order[id(ln)])
        return out

    # -- reading -------------------------------------------------------------------------

    def _message_args(self, request: Any) -> tuple[str, int]:
        folder = _arg(request, "folder") or "INBOX"
        uid = _int(_arg(request, "uid"), 0)
        if uid <= 0:
            raise HTTPError(400, "no message given")
        return folder, uid

    @defer.inlineCallbacks
    def read(self, request: Any, session: Session) -> Generator[Any, Any, bytes]:
        folder, uid = self._message_args(request)
        raw = yield self.reader.fetch(session.user, folder, uid)
        folders = yield self.reader.folders(session.user)
        view = read_message(raw)
        summaries = yield self.reader.summaries(session.user, folder)
        flags: frozenset[str] = next((s.flags for s in summaries if s.uid == uid), frozenset())
        if "\\Seen" not in flags:
            yield self.reader.set_flags(session.user, folder, [uid], ["\\Seen"], True)
            folders = yield self.reader.folders(session.user)
        images = _arg(request, "images") == "1"
        text_html = None
        blocked = 0
        if view.html is None:
            text_html = Markup(linkify(view.text or ""))
        else:
            blocked = clean_html(view.html, allow_remote=False).blocked
        content = pages.read_page(
            folder,
            uid,
            view,
            folders,
            session.csrf,
            text_html,
            blocked,
            images,
            "\\Flagged" in flags,
        )
        return self._page(request, session, view.subject or "(no subject)", content)

    @defer.inlineCallbacks
    def body(self, request: Any, session: Session) -> Generator[Any, Any, bytes]:
        folder, uid = self._message_args(request)
        raw = yield self.reader.fetch(session.user, folder, uid)
        view = read_message(raw)
        images = _arg(request, "images") == "1"
        inline = {a.content_id: a for a in view.attachments if a.content_id}

        def cid_url(cid: str) -> str | None:
            att = inline.get(cid)
            if (
                att is None
                or att.content_type not in INLINE_IMAGE_TYPES
                or att.size > MAX_INLINE_IMAGE
            ):
                return None
            found = attachment_data(raw, att.section)
            if found is None:
                return None
            return f"data:{att.content_type};base64," + base64.b64encode(found[1]).decode("ascii")

        if view.html is not None:
            clean = clean_html(view.html, allow_remote=images, cid_url=cid_url).html
        else:
            clean = '<pre style="white-space:pre-wrap">' + linkify(view.text or "") + "</pre>"
        self._headers(request)
        request.setHeader(
            b"content-security-policy", BODY_CSP % (b" https: http:" if images else b"")
        )
        request.setHeader(b"x-frame-options", b"SAMEORIGIN")
        return pages.html_body_document(clean)

    @defer.inlineCallbacks
    def attachment(self, request: Any, session: Session) -> Generator[Any, Any, bytes]:
        folder, uid = self._message_args(request)
        part = _arg(request, "part") or ""
        raw = yield self.reader.fetch(session.user, folder, uid)
        found = attachment_data(raw, part)
        if found is None:
            raise HTTPError(404, "no such attachment")
        att, data = found
        self._headers(request, b"application/octet-stream")
        request.setHeader(b"content-security-policy", DOWNLOAD_CSP)
        request.setHeader(b"content-disposition", content_disposition(att.filename))
        return data

    # -- compose and send ----------------------------------------------------------------

    @defer.inlineCallbacks
    def compose(self, request: Any, session: Session) -> Generator[Any, Any, bytes]:
        mode = _arg(request, "mode") or "new"
        folders = yield self.reader.folders(session.user)
        draft = compose.Draft(to=_arg(request, "to") or "")
        hidden: dict[str, str] = {}
        forwarded: list[Any] = []
        if mode in ("reply", "replyall", "forward", "draft"):
            folder, uid = self._message_args(request)
            raw = yield self.reader.fetch(session.user, folder, uid)
            view = read_message(raw)
            if mode == "forward":
                draft = compose.forward(view)
                forwarded = view.attachments
                hidden.update(fwd_folder=folder, fwd_uid=str(uid))
            elif mode == "draft":
                draft = _draft_of(view)
                forwarded = view.attachments
                hidden.update(
                    fwd_folder=folder,
                    fwd_uid=str(uid),
                    draft_uid=str(uid) if folder == "Drafts" else "",
                )
            else:
                draft = compose.reply(view, session.user, mode == "replyall")
                hidden.update(orig_folder=folder, orig_uid=str(uid))
        hidden.update(in_reply_to=draft.in_reply_to, references=draft.references)
        content = pages.compose_page(
            draft, session.csrf, folders, self.max_upload, hidden, forwarded
        )
        return self._page(request, session, "Compose", content)

    @defer.inlineCallbacks
    def send(self, request: Any, session: Session) -> Generator[Any, Any, bytes]:
        form = multipart_form(request)
        op = form.text("op") or "send"
        draft = compose.Draft(
            to=form.text("to"),
            cc=form.text("cc"),
            bcc=form.text("bcc"),
            subject=form.text("subject"),
            body=form.text("body"),
            in_reply_to=form.text("in_reply_to"),
            references=form.text("references"),
            attachments=[u for u in form.files if u.data or u.filename],
        )
        hidden = {
            k: form.text(k)
            for k in (
                "in_reply_to",
                "references",
                "orig_folder",
                "orig_uid",
                "fwd_folder",
                "fwd_uid",
                "draft_uid",
            )
        }
        fwd_folder, fwd_uid = form.text("fwd_folder"), _int(form.text("fwd_uid"), 0)
        forwarded: list[Any] = []
        if fwd_folder and fwd_uid > 0:
            raw = yield self.reader.fetch(session.user, fwd_folder, fwd_uid)
            view = read_message(raw)
            forwarded = view.attachments
            for section in form.values("fwd_part"):
                found = attachment_data(raw, section)
                if found is not None:
                    att, data = found
                    draft.attachments.append(compose.Upload(att.filename, att.content_type, data))
        folders = yield self.reader.folders(session.user)

        def again(error: str, status: int = 400) -> bytes:
            request.setResponseCode(status)
            kept = [a for a in forwarded if a.section in form.values("fwd_part")]
            content = pages.compose_page(
                draft, session.csrf, folders, self.max_upload, hidden, kept, error
            )
            return self._page(request, session, "Compose", content)

        total = sum(len(a.data) for a in draft.attachments)
        if total > self.max_upload:
            return again(
                f"The attachments are {pages.human_size(total)}: at most {pages.human_size(self.max_upload)} in all.",
                413,
            )
        signature = self.settings.signature(session.user) if op == "send" else ""
        try:
            data, rcpts = compose.build(
                session.user, draft, self.hostname, signature, with_bcc=op == "draft"
            )
        except compose.ComposeError as e:
            return again(str(e))
        draft_uid = _int(form.text("draft_uid"), 0)
        if op == "draft":
            try:
                yield self.reader.append(session.user, "Drafts", data, ["\\Draft", "\\Seen"])
            except QuotaExceeded:
                return again("Your mailbox is full: the draft was not saved.", 507)
            if draft_uid > 0:
                yield self.reader.expunge(session.user, "Drafts", [draft_uid])
            raise Redirect(pages.url("/mail", folder="Drafts", notice="Draft saved. 草稿已保存。"))
        if not rcpts:
            return again("Add at least one recipient.")
        if self.submitter is None:
            return again("Sending is not enabled on this server.", 503)
        ip = getattr(request.getClientAddress(), "host", "")
        envelope = Envelope(sender=session.user, recipients=list(rcpts), client_address=ip)
        try:
            queue_id = yield self.submitter.submit(session.user, envelope, data, "webmail", ip)
        except Exception as e:  # SubmissionError carries the SMTP reply
            reply = getattr(e, "reply", None)
            if reply is None:
                raise
            return again(f"Not sent: {reply.format().strip()}", 400 if reply.is_permanent else 503)
        sent_copy, _ = compose.build(session.user, draft, self.hostname, signature, with_bcc=True)
        try:
            yield self.reader.append(session.user, "Sent", _same_id(sent_copy, data), ["\\Seen"])
        except QuotaExceeded:
            log.warn(
                "webmail: {user}: sent {qid} but the Sent copy is over quota",
                user=session.user,
                qid=queue_id,
            )
        if draft_uid > 0:
            yield self.reader.expunge(session.user, "Drafts", [draft_uid])
        orig_folder, orig_uid = form.text("orig_folder"), _int(form.text("orig_uid"), 0)
        if orig_folder and orig_uid > 0:
            with contextlib.suppress(KeyError, MailboxNotFound):  # gone meanwhile
                yield self.reader.set_flags(
                    session.user, orig_folder, [orig_uid], ["\\Answered"], True
                )
        log.info("webmail: {user} sent {qid}", user=session.user, qid=queue_id)
        raise Redirect(
            pages.url("/mail", folder="INBOX", notice=f"Message sent ({queue_id}). 邮件已发送。")
        )

    # -- actions -------------------------------------------------------------------------

    @defer.inlineCallbacks
    def action(self, request: Any, session: Session) -> Generator[Any, Any, bytes]:
        folder = _arg(request, "folder") or "INBOX"
        op = _arg(request, "op") or ""
        uids = [u for u in (_int(x, 0) for x in _args(request, "uid")) if u > 0]
        back = _arg(request, "back") or pages.url("/mail", folder=folder)
        if not _local_path(back):
            back = "/"
        if not uids:
            raise Redirect(back)
        user = session.user
        after = back
        if op in ("read", "unread"):
            yield self.reader.set_flags(user, folder, uids, ["\\Seen"], op == "read")
        elif op in ("flag", "unflag"):
            yield self.reader.set_flags(user, folder, uids, ["\\Flagged"], op == "flag")
        elif op == "delete":
            if folder == "Trash":
                yield self.reader.expunge(user, folder, uids)
            else:
                yield self.reader.move(user, folder, uids, "Trash")
            after = pages.url("/mail", folder=folder)
        elif op == "move":
            dest = _arg(request, "dest") or ""
            if not dest or dest == folder:
                raise HTTPError(400, "choose another folder to move to")
            yield self.reader.move(user, folder, uids, dest)
            after = pages.url("/mail", folder=folder)
        elif op in ("spam", "ham"):
            spam = op == "spam"
            for uid in uids:
                raw = yield self.reader.fetch(user, folder, uid)
                yield defer.maybeDeferred(self.report_spam, user, raw, spam)
            dest = "Junk" if spam else "INBOX"
            if dest != folder:
                yield self.reader.move(user, folder, uids, dest)
            after = pages.url("/mail", folder=folder)
        else:
            raise HTTPError(400, "unknown action")
        raise Redirect(after)

    # -- settings ------------------------------------------------------------------------

    @defer.inlineCallbacks
    def settings_get(
        self, request: Any, session: Session, message: str = "", error: str = ""
    ) -> Generator[Any, Any, bytes]:
        folders = yield self.reader.folders(session.user)
        content = pages.settings_page(
            self.settings.signature(session.user), session.csrf, folders, message, error
        )
        return self._page(request, session, "Settings", content)

    @defer.inlineCallbacks
    def settings_post(self, request: Any, session: Session) -> Generator[Any, Any, bytes]:
        status, message, error = yield self._change_setting(request, session)
        request.setResponseCode(status)
        page: bytes = yield self.settings_get(request, session, message, error)
        return page

    @defer.inlineCallbacks
    def _change_setting(
        self, request: Any, session: Session
    ) -> Generator[Any, Any, tuple[int, str, str]]:
        """(status, message, error) of a settings form."""
        op = _arg(request, "op")
        if op == "signature":
            text = (_arg(request, "signature") or "").replace("\r\n", "\n")[:MAX_SIGNATURE]
            self.settings.save(session.user, signature=text)
            return 200, "Signature saved. 签名已保存。", ""
        if op != "password":
            raise HTTPError(400, "unknown setting")
        current, new, confirm = (_arg(request, k) or "" for k in ("current", "new", "confirm"))
        if new != confirm:
            return 400, "", "The new passwords differ."
        if len(new) < MIN_PASSWORD:
            return 400, "", f"Use at least {MIN_PASSWORD} characters."
        ip = getattr(request.getClientAddress(), "host", "")
        try:
            yield self.auth.check_password(session.user, current, ip, "webmail")
        except UnauthorizedLogin as e:
            delay = float(getattr(e, "delay", 0.0))
            if delay > 0:
                yield task.deferLater(self.clock, delay, lambda: None)
            return 403, "", "The current password is wrong."
        self.directory.set_password(session.user, new)
        self.reader.open_session(session.user, new)
        self.sessions.end_user(session.user, keep=session.sid)
        log.info("webmail: {user} changed the password", user=session.user)
        return 200, "Password changed. 密码已修改。", ""


def _draft_of(view: MessageView) -> compose.Draft:
    return compose.Draft(
        to=format_addresses(view.to),
        cc=format_addresses(view.cc),
        subject=view.subject,
        body=view.text or "",
        in_reply_to="",
        references=" ".join(view.references),
    )


def _same_id(copy: bytes, sent: bytes) -> bytes:
    """The Sent copy with the Message-ID (and Date) of the message that went out."""

    def field(data: bytes, name: bytes) -> bytes | None:
        head = data.split(b"\r\n\r\n", 1)[0]
        for line in head.split(b"\r\n"):
            if line.lower().startswith(name.lower() + b":"):
                return line
        return None

    out = copy
    for name in (b"Message-ID", b"Date"):
        a, b = field(copy, name), field(sent, name)
        if a is not None and b is not None:
            out = out.replace(a, b, 1)
    return out


def content_disposition(filename: str) -> bytes:
    """``attachment`` with an ASCII ``filename`` fallback and the RFC 6266 / 5987 UTF-8
    ``filename*`` (so Chinese names arrive whole)."""
    from urllib.parse import quote

    cleaned = (
        "".join(c for c in filename if c >= " " and c != "\x7f")
        .replace("/", "_")
        .replace("\\", "_")
    )
    cleaned = cleaned.strip() or "attachment"
    fallback = "".join(c if c.isascii() and c not in '"%' else "_" for c in cleaned)
    value = f'attachment; filename="{fallback}"'
    if not cleaned.isascii() or '"' in cleaned or "%" in cleaned:
        value += "; filename*=UTF-8''" + quote(cleaned, safe="")
    return value.encode("ascii")


# -- request arguments --------------------------------------------------------------------


def _arg(request: Any, name: str) -> str | None:
    values = request.args.get(name.encode("ascii"))
    if not values:
        return None
    try:
        return str(values[0].decode("utf-8"))
    except UnicodeDecodeError:
        raise HTTPError(400, f"{name}: not UTF-8") from None


def _args(request: Any, name: str) -> list[str]:
    return [v.decode("utf-8", "replace") for v in request.args.get(name.encode("ascii"), [])]


def _local_path(text: str) -> bool:
    """Whether ``text`` is a path on this site (never ``//host`` or ``/\\host``, which
    browsers take for another site, nor a control character)."""
    return (
        text.startswith("/")
        and not text.startswith(("//", "/\\"))
        and "\\" not in text
        and all(" " < c < "\x7f" for c in text)
    )


def _choice(text: str | None, choices: tuple[str, ...]) -> str:
    """``text`` when it is one of ``choices``, else the first choice."""
    return text if text in choices else choices[0]


def _int(text: str | None, default: int) -> int:
    try:
        return int(text) if text is not None and text.strip().isdigit() else default
    except ValueError:
        return default


def _cookie(request: Any, name: bytes) -> str | None:
    value = request.getCookie(name)
    if value is None:
        return None
    try:
        return str(value.decode("ascii"))
    except UnicodeDecodeError:
        return None


class Form:
    """A POSTed form's fields and files."""

    def __init__(self) -> None:
        self.fields: dict[str, list[str]] = {}
        self.files: list[compose.Upload] = []

    def text(self, name: str) -> str:
        values = self.fields.get(name)
        return values[0] if values else ""

    def values(self, name: str) -> list[str]:
        return self.fields.get(name, [])


def _header_text(value: str) -> str:
    """A header value the parser read from raw UTF-8 (surrogate-escaped) back as text."""
    try:
        return value.encode("utf-8", "surrogateescape").decode("utf-8")
    except UnicodeError:
        return value.encode("utf-8", "replace").decode("utf-8")


def multipart_form(request: Any) -> Form:
    """The fields and uploaded files of a ``multipart/form-data`` (or urlencoded) POST.
    Twisted's own parsing keeps no file names, so the body is read again here."""
    form = Form()
    ctype = request.getHeader(b"content-type") or b""
    if not ctype.lower().startswith(b"multipart/form-data"):
        for k, vs in request.args.items():
            form.fields[k.decode("utf-8", "replace")] = [v.decode("utf-8", "replace") for v in vs]
        return form
    request.content.seek(0)
    body = request.content.read()
    head = b"MIME-Version: 1.0\r\nContent-Type: " + ctype + b"\r\n\r\n"
    msg = email.parser.BytesParser(policy=email.policy.HTTP).parsebytes(head + body)
    if not msg.is_multipart():
        raise HTTPError(400, "malformed form")
    parts: list[Any] = msg.get_payload()  # type: ignore[assignment]
    for part in parts:
        name = part.get_param("name", header="content-disposition")
        if not name:
            continue
        name = _header_text(str(name))
        payload = part.get_payload(decode=True) or b""
        filename = part.get_filename()
        if filename is not None:
            fname = _header_text(str(filename)).replace("\\", "/").rsplit("/", 1)[-1]
            if not fname and not payload:
                continue
            form.files.append(
                compose.Upload(
                    fname or "attachment",
                    compose.guess_type(fname, part.get_content_type()),
                    payload,
                )
            )
        else:
            form.fields.setdefault(name, []).append(payload.decode("utf-8", "replace"))
    return form
