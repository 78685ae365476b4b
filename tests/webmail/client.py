"""A small browser-like HTTP client for the webmail tests: cookies, redirects, forms with
their CSRF token, multipart uploads (urllib only)."""

from __future__ import annotations

import html
import http.cookiejar
import re
import secrets
import ssl
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass, field


@dataclass
class Answer:
    status: int
    headers: dict[str, str]
    body: bytes
    url: str
    all_headers: list[tuple[str, str]] = field(default_factory=list)

    @property
    def text(self) -> str:
        return self.body.decode("utf-8")

    def csrf(self) -> str:
        m = re.search(r'name="csrf" value="([^"]+)"', self.text)
        assert m, "no CSRF token in the page"
        return html.unescape(m.group(1))

    def header(self, name: str) -> str:
        for k, v in self.headers.items():
            if k.lower() == name.lower():
                return v
        return ""

    def set_cookies(self) -> list[str]:
        return [v for k, v in self.all_headers if k.lower() == "set-cookie"]


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, *args: object, **kw: object) -> None:
        return None


class Browser:
    """Keeps cookies; follows redirects unless ``follow=False``."""

    def __init__(self, base: str, context: ssl.SSLContext | None = None) -> None:
        self.base = base.rstrip("/")
        self.jar = http.cookiejar.CookieJar()
        cookies = urllib.request.HTTPCookieProcessor(self.jar)
        https = urllib.request.HTTPSHandler(context=context)
        self.opener = urllib.request.build_opener(cookies, https)
        self.raw = urllib.request.build_opener(cookies, https, _NoRedirect())

    def request(
        self,
        method: str,
        path: str,
        data: bytes | None = None,
        headers: dict[str, str] | None = None,
        follow: bool = True,
    ) -> Answer:
        req = urllib.request.Request(
            self.base + path, data=data, method=method, headers=headers or {}
        )
        opener = self.opener if follow else self.raw
        try:
            with opener.open(req, timeout=30) as r:
                return Answer(r.status, dict(r.headers), r.read(), r.url, list(r.headers.items()))
        except urllib.error.HTTPError as e:
            return Answer(e.code, dict(e.headers), e.read(), e.url, list(e.headers.items()))

    def get(self, path: str, follow: bool = True, **query: object) -> Answer:
        if query:
            path += "?" + urllib.parse.urlencode({k: str(v) for k, v in query.items()})
        return self.request("GET", path, follow=follow)

    def post(
        self, path: str, fields: dict[str, object] | list[tuple[str, str]], follow: bool = True
    ) -> Answer:
        items = list(fields.items()) if isinstance(fields, dict) else fields
        flat: list[tuple[str, str]] = []
        for k, v in items:
            if isinstance(v, list):
                flat.extend((k, str(x)) for x in v)
            else:
                flat.append((k, str(v)))
        data = urllib.parse.urlencode(flat).encode()
        return self.request(
            "POST", path, data, {"Content-Type": "application/x-www-form-urlencoded"}, follow
        )

    def post_multipart(
        self,
        path: str,
        fields: list[tuple[str, str]],
        files: list[tuple[str, str, str, bytes]] = (),  # type: ignore[assignment]
        follow: bool = True,
    ) -> Answer:
        boundary = "----mailgwtest" + secrets.token_hex(8)
        out = bytearray()
        for k, v in fields:
            out += f'--{boundary}\r\nContent-Disposition: form-data; name="{k}"\r\n\r\n'.encode()
            out += v.encode("utf-8") + b"\r\n"
        for k, filename, ctype, data in files:
            out += (
                f'--{boundary}\r\nContent-Disposition: form-data; name="{k}"; filename="{filename}"\r\n'
                f"Content-Type: {ctype}\r\n\r\n"
            ).encode()
            out += data + b"\r\n"
        out += f"--{boundary}--\r\n".encode()
        headers = {"Content-Type": f"multipart/form-data; boundary={boundary}"}
        return self.request("POST", path, bytes(out), headers, follow)

    def login(self, user: str, password: str) -> Answer:
        page = self.get("/")
        token = re.search(r'name="login_token" value="([^"]+)"', page.text)
        assert token, page.text
        return self.post(
            "/login",
            {"user": user, "password": password, "login_token": html.unescape(token.group(1))},
        )
