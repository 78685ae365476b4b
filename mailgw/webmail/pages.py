"""The webmail's HTML pages, rendered on the server from escaped values (``template``)."""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from urllib.parse import urlencode

from mailgw.webmail.compose import Draft
from mailgw.webmail.message import Attachment, MessageView, format_addresses
from mailgw.webmail.reader import FolderInfo
from mailgw.webmail.template import Markup, Template, esc, join

SPECIAL = ("INBOX", "Drafts", "Sent", "Junk", "Trash")


def url(path: str, **query: object) -> str:
    """``path?query`` with the values URL-encoded (None and "" left out)."""
    q = {k: str(v) for k, v in query.items() if v is not None and v != ""}
    return path + ("?" + urlencode(q) if q else "")


def human_size(n: int) -> str:
    """``1.2 MB``-style size."""
    size = float(n)
    for unit in ("B", "KB", "MB", "GB"):
        if size < 1024 or unit == "GB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{n} B"


def short_date(ts: float | None, now: float | None = None) -> str:
    """Time today, else the date (local time of the server)."""
    if ts is None:
        return ""
    now = time.time() if now is None else now
    t, n = time.localtime(ts), time.localtime(now)
    if t[:3] == n[:3]:
        return time.strftime("%H:%M", t)
    return time.strftime("%Y-%m-%d", t)


_LAYOUT = Template(
    """<!doctype html>
<html lang="{lang}"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>{title}</title>
<link rel="stylesheet" href="/static/app.css">
<script src="/static/app.js"></script>
</head><body>
{header}
{content}
</body></html>
"""
)

_HEADER = Template(
    """<header><strong>mailgw</strong>
<a class="button" href="/compose" id="compose">Compose 写信</a>
<a href="/settings">Settings 设置</a>
<span class="who">{user}</span>
<form method="post" action="/logout"><input type="hidden" name="csrf" value="{csrf}">
<button type="submit" id="logout">Log out</button></form></header>"""
)


def layout(title: str, content: Markup, user: str = "", csrf: str = "") -> bytes:
    """A whole page (the bar with the user's name when logged in) as UTF-8."""
    header = _HEADER.render(user=user, csrf=csrf) if user else Markup("")
    return _LAYOUT.render(lang="en", title=title, header=header, content=content).encode("utf-8")


def with_folders(folders: Sequence[FolderInfo], current: str, main: Markup) -> Markup:
    """The folder list beside ``main``."""
    items = []
    for f in folders:
        count = Markup(f' <span class="count">{f.unseen}</span>') if f.unseen else Markup("")
        cls = ' class="cur"' if f.name == current else ""
        items.append(
            Markup(
                f'<li><a{cls} href="{esc(url("/mail", folder=f.name))}" data-folder="{esc(f.name)}">'
                f"<span>{esc(f.name)}</span>{count}</a></li>"
            )
        )
    return Markup(f'<div class="wrap"><nav><ul>{join(items)}</ul></nav><main>{main}</main></div>')


_LOGIN = Template(
    """<form class="login" method="post" action="/login">
<h1>mailgw webmail</h1>
{message}
<label for="user">E-mail address 邮箱地址</label>
<input id="user" name="user" type="text" autocomplete="username" required value="{user}">
<label for="password">Password 密码</label>
<input id="password" name="password" type="password" autocomplete="current-password" required>
<input type="hidden" name="login_token" value="{token}">
<button class="primary" type="submit" id="login">Log in 登录</button>
</form>"""
)


def login_page(token: str, message: str = "", user: str = "") -> bytes:
    """The login form; ``token`` the login CSRF value also set in a cookie."""
    msg = Markup(f'<p class="error" role="alert">{esc(message)}</p>') if message else Markup("")
    return layout("Log in", _LOGIN.render(message=msg, user=user, token=token))


@dataclass
class Row:
    """One message line of the list."""

    uid: int
    seen: bool
    flagged: bool
    answered: bool
    sender: str
    subject: str
    date: float | None
    size: int
    depth: int = 0
    thread_size: int = 1


@dataclass
class ListState:
    """The list's folder, page, sort, order, threading and search."""

    folder: str
    page: int = 1
    sort: str = "date"
    order: str = "desc"
    thread: bool = False
    q: str = ""
    field: str = "all"

    def link(self, **changes: object) -> str:
        values = {
            "folder": self.folder,
            "page": self.page,
            "sort": self.sort,
            "order": self.order,
            "thread": "1" if self.thread else "",
            "q": self.q,
            "field": self.field if self.q else "",
        }
        values.update(changes)
        if values.get("page") == 1:
            values["page"] = ""
        return url("/mail", **values)


def _sort_link(state: ListState, key: str, label: str) -> Markup:
    order = "asc" if state.sort == key and state.order == "desc" else "desc"
    arrow = ("▼" if state.order == "desc" else "▲") if state.sort == key else ""
    return Markup(
        f'<a href="{esc(state.link(sort=key, order=order, page=1))}">{esc(label)}{arrow}</a>'
    )


def message_list(
    state: ListState,
    rows: Sequence[Row],
    total: int,
    pages: int,
    folders: Sequence[FolderInfo],
    csrf: str,
    notice: str = "",
) -> Markup:
    """The folder's list: search, sort links, threading switch, actions, rows, pager."""
    fields = "".join(
        f'<option value="{k}"{" selected" if state.field == k else ""}>{v}</option>'
        for k, v in (
            ("all", "All 全部"),
            ("subject", "Subject 主题"),
            ("from", "From 发件人"),
            ("body", "Body 正文"),
        )
    )
    search = Markup(
        f'<form method="get" action="/mail" class="search"><input type="hidden" name="folder" value="{esc(state.folder)}">'
        f'<input type="search" name="q" value="{esc(state.q)}" placeholder="Search 搜索" id="q">'
        f'<select name="field">{fields}</select>'
        + ('<input type="hidden" name="thread" value="1">' if state.thread else "")
        + '<button type="submit" id="search">Search</button></form>'
    )
    thread_link = Markup(
        f'<a href="{esc(state.link(thread="" if state.thread else "1", page=1))}" id="threads">'
        f"{'List 列表' if state.thread else 'Conversations 会话'}</a>"
    )
    body = []
    for r in rows:
        cls = [] if r.seen else ["unseen"]
        if r.depth:
            cls.append("child")
        marks = ("★" if r.flagged else "") + ("↩" if r.answered else "")
        count = f" ({r.thread_size})" if r.thread_size > 1 else ""
        body.append(
            Markup(
                f'<tr class="{" ".join(cls)}" data-uid="{r.uid}">'
                f'<td><input type="checkbox" name="uid" value="{r.uid}" aria-label="select"></td>'
                f'<td class="flag">{esc(marks)}</td>'
                f'<td class="from">{esc(r.sender)}</td>'
                f'<td class="subj"><a href="{esc(url("/read", folder=state.folder, uid=r.uid))}">'
                f"{esc(r.subject or '(no subject)')}</a>{esc(count)}</td>"
                f'<td class="date">{esc(short_date(r.date))}</td></tr>'
            )
        )
    pager = Markup(
        '<div class="pager">'
        + (
            f'<a href="{esc(state.link(page=state.page - 1))}" id="prev">‹ Prev</a>'
            if state.page > 1
            else ""
        )
        + f"<span>Page {state.page} / {max(pages, 1)} · {total} messages</span>"
        + (
            f'<a href="{esc(state.link(page=state.page + 1))}" id="next">Next ›</a>'
            if state.page < pages
            else ""
        )
        + "</div>"
    )
    note = Markup(f'<p class="notice">{esc(notice)}</p>') if notice else Markup("")
    main = Markup(
        f'<div class="tools">{search}{thread_link}</div>{note}'
        f'<form method="post" action="/action" id="list-form">'
        f'<input type="hidden" name="csrf" value="{esc(csrf)}">'
        f'<input type="hidden" name="folder" value="{esc(state.folder)}">'
        f'<input type="hidden" name="back" value="{esc(state.link())}">'
        f"{action_buttons(folders, state.folder)}"
        f'<table class="list"><thead><tr><th><input type="checkbox" id="select-all" aria-label="all"></th>'
        f'<th></th><th class="from">{_sort_link(state, "from", "From 发件人")}</th>'
        f"<th>{_sort_link(state, 'subject', 'Subject 主题')}</th>"
        f"<th>{_sort_link(state, 'date', 'Date 日期')}</th></tr></thead>"
        f"<tbody>{join(body)}</tbody></table></form>{pager}"
    )
    return with_folders(folders, state.folder, main)


def action_buttons(folders: Sequence[FolderInfo], current: str) -> Markup:
    """The buttons acting on the selected (or shown) messages."""
    spam = (
        '<button name="op" value="ham" id="op-ham">Not spam 非垃圾</button>'
        if current == "Junk"
        else '<button name="op" value="spam" id="op-spam">Spam 垃圾邮件</button>'
    )
    options = "".join(
        f'<option value="{esc(f.name)}">{esc(f.name)}</option>'
        for f in folders
        if f.name != current
    )
    return Markup(
        '<div class="tools">'
        '<button name="op" value="delete" id="op-delete">Delete 删除</button>'
        '<button name="op" value="read" id="op-read">Mark read 已读</button>'
        '<button name="op" value="unread" id="op-unread">Mark unread 未读</button>'
        '<button name="op" value="flag" id="op-flag">Flag 标记</button>'
        '<button name="op" value="unflag" id="op-unflag">Unflag</button>'
        f"{spam}"
        f'<select name="dest" aria-label="folder" id="dest">{options}</select>'
        '<button name="op" value="move" id="op-move">Move 移动</button></div>'
    )


def read_page(
    folder: str,
    uid: int,
    view: MessageView,
    folders: Sequence[FolderInfo],
    csrf: str,
    text_html: Markup | None,
    blocked_images: int,
    images_shown: bool,
    flagged: bool,
) -> Markup:
    """One message: header, actions, text (escaped, links clickable) or the sanitised HTML
    in a sandboxed frame, attachments."""

    def row(name: str, value: str) -> Markup:
        return Markup(f"<dt>{esc(name)}</dt><dd>{esc(value)}</dd>") if value else Markup("")

    head = Markup(
        f'<div class="msghead"><h1 id="subject">{esc(view.subject or "(no subject)")}</h1><dl>'
        f"{row('From', format_addresses(view.sender))}{row('To', format_addresses(view.to))}"
        f"{row('Cc', format_addresses(view.cc))}{row('Date', view.date_text)}</dl></div>"
    )
    links = Markup(
        '<div class="tools">'
        f'<a class="button" id="reply" href="{esc(url("/compose", mode="reply", folder=folder, uid=uid))}">Reply 回复</a>'
        f'<a class="button" id="reply-all" href="{esc(url("/compose", mode="replyall", folder=folder, uid=uid))}">Reply all 全部回复</a>'
        f'<a class="button" id="forward" href="{esc(url("/compose", mode="forward", folder=folder, uid=uid))}">Forward 转发</a>'
        + (
            f'<a class="button" id="edit-draft" href="{esc(url("/compose", mode="draft", folder=folder, uid=uid))}">Edit draft</a>'
            if folder == "Drafts"
            else ""
        )
        + "</div>"
    )
    actions = Markup(
        f'<form method="post" action="/action"><input type="hidden" name="csrf" value="{esc(csrf)}">'
        f'<input type="hidden" name="folder" value="{esc(folder)}">'
        f'<input type="hidden" name="uid" value="{uid}">'
        f'<input type="hidden" name="back" value="{esc(url("/read", folder=folder, uid=uid))}">'
        f"{action_buttons(folders, folder)}</form>"
    )
    if text_html is not None:
        body = Markup(f'<pre class="text" id="body">{text_html}</pre>')
    else:
        src = url("/body", folder=folder, uid=uid, images="1" if images_shown else "")
        note = ""
        if blocked_images and not images_shown:
            show = url("/read", folder=folder, uid=uid, images="1")
            note = (
                f'<p class="notice" id="images-blocked">{blocked_images} remote image(s) blocked 已阻止远程图片. '
                f'<a href="{esc(show)}" id="show-images">Show images 显示图片</a></p>'
            )
        body = Markup(
            f'{Markup(note)}<iframe class="html" id="body" title="message" '
            f'sandbox="allow-popups allow-popups-to-escape-sandbox" '
            f'referrerpolicy="no-referrer" src="{esc(src)}"></iframe>'
        )
    atts = attachment_list(folder, uid, view.attachments)
    star = Markup('<p class="flag" id="flagged">★ Flagged</p>') if flagged else Markup("")
    return with_folders(folders, folder, Markup(f"{links}{actions}{head}{star}{body}{atts}"))


def attachment_list(folder: str, uid: int, attachments: Sequence[Attachment]) -> Markup:
    """Links that download each attachment."""
    if not attachments:
        return Markup("")
    items = [
        Markup(
            f'<li><a class="att" href="{esc(url("/att", folder=folder, uid=uid, part=a.section))}">'
            f"{esc(a.filename)}</a> <small>{esc(a.content_type)}, {esc(human_size(a.size))}</small></li>"
        )
        for a in attachments
    ]
    return Markup(f'<h2>Attachments 附件</h2><ul class="atts" id="attachments">{join(items)}</ul>')


def compose_page(
    draft: Draft,
    csrf: str,
    folders: Sequence[FolderInfo],
    max_upload: int,
    hidden: dict[str, str],
    forwarded: Sequence[Attachment] = (),
    error: str = "",
) -> Markup:
    """The compose form (multipart, so files can be attached)."""
    hidden_inputs = join(
        Markup(f'<input type="hidden" name="{esc(k)}" value="{esc(v)}">')
        for k, v in hidden.items()
        if v
    )
    fwd = join(
        Markup(
            f'<li><label><input type="checkbox" name="fwd_part" value="{esc(a.section)}" checked> '
            f"{esc(a.filename)} <small>{esc(human_size(a.size))}</small></label></li>"
        )
        for a in forwarded
    )
    fwd_block = (
        Markup(f"<p>Forwarded attachments 转发的附件:</p><ul>{fwd}</ul>")
        if forwarded
        else Markup("")
    )
    err = (
        Markup(f'<p class="error" role="alert" id="error">{esc(error)}</p>')
        if error
        else Markup("")
    )
    main = Markup(
        f'<form class="compose" method="post" action="/send" enctype="multipart/form-data">{err}'
        f'<input type="hidden" name="csrf" value="{esc(csrf)}">{hidden_inputs}'
        f'<label for="to">To 收件人</label><input type="text" id="to" name="to" value="{esc(draft.to)}">'
        f'<label for="cc">Cc 抄送</label><input type="text" id="cc" name="cc" value="{esc(draft.cc)}">'
        f'<label for="bcc">Bcc 密送</label><input type="text" id="bcc" name="bcc" value="{esc(draft.bcc)}">'
        f'<label for="subject">Subject 主题</label><input type="text" id="subject" name="subject" value="{esc(draft.subject)}">'
        f'<label for="body">Message 正文</label><textarea id="body" name="body">{esc(draft.body)}</textarea>'
        f"{fwd_block}"
        f'<label for="attach">Attachments 附件 (up to {esc(human_size(max_upload))} in all 总大小上限)</label>'
        f'<input type="file" id="attach" name="attach" multiple>'
        f'<div class="tools"><button class="primary" type="submit" name="op" value="send" id="send">Send 发送</button>'
        f'<button type="submit" name="op" value="draft" id="save-draft">Save draft 存草稿</button></div></form>'
    )
    return with_folders(folders, "", main)


def settings_page(
    signature: str, csrf: str, folders: Sequence[FolderInfo], message: str = "", error: str = ""
) -> Markup:
    """Signature and password change."""
    note = Markup(f'<p class="notice" id="notice">{esc(message)}</p>') if message else Markup("")
    err = (
        Markup(f'<p class="error" role="alert" id="error">{esc(error)}</p>')
        if error
        else Markup("")
    )
    main = Markup(
        f"<h1>Settings 设置</h1>{note}{err}"
        f'<form class="compose" method="post" action="/settings"><input type="hidden" name="csrf" value="{esc(csrf)}">'
        f'<input type="hidden" name="op" value="signature">'
        f'<label for="signature">Signature 签名</label><textarea id="signature" name="signature">{esc(signature)}</textarea>'
        f'<div class="tools"><button type="submit" id="save-signature">Save 保存</button></div></form>'
        f'<form class="compose" method="post" action="/settings"><input type="hidden" name="csrf" value="{esc(csrf)}">'
        f'<input type="hidden" name="op" value="password"><h2>Password 密码</h2>'
        f'<label for="current">Current password</label><input type="password" id="current" name="current" autocomplete="current-password">'
        f'<label for="new">New password (8+ characters)</label><input type="password" id="new" name="new" autocomplete="new-password">'
        f'<label for="confirm">Repeat</label><input type="password" id="confirm" name="confirm" autocomplete="new-password">'
        f'<div class="tools"><button type="submit" id="change-password">Change password</button></div></form>'
    )
    return with_folders(folders, "", main)


def error_page(status: int, text: str) -> bytes:
    """A short error page."""
    return layout(
        f"{status}",
        Markup(f'<main><p class="error">{esc(text)}</p><p><a href="/">Back</a></p></main>'),
    )


def html_body_document(clean: str) -> bytes:
    """The document the sandboxed frame loads: the sanitised HTML of a message."""
    return (
        '<!doctype html><html><head><meta charset="utf-8"><base target="_blank">'
        "<style>body{font-family:system-ui,sans-serif;margin:8px;overflow-wrap:anywhere}"
        "img{max-width:100%;height:auto}</style></head><body>" + clean + "</body></html>"
    ).encode("utf-8")
