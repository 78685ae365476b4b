"""The admin guard and the root's mounting: network or token, 401 or 403, one-call mounts."""

from __future__ import annotations

import ipaddress
from pathlib import Path
from typing import Any

import pytest
from twisted.internet.address import IPv4Address, IPv6Address
from twisted.web.resource import Resource
from twisted.web.test.requesthelper import DummyRequest

from mailgw.http.guard import Access, AdminGuard, TokenFileError, read_token
from mailgw.http.root import HTTPRoot

TOKEN = b"0123456789abcdef-token"
LOOPBACK = (ipaddress.ip_network("127.0.0.0/8"), ipaddress.ip_network("::1/128"))


class Leaf(Resource):
    isLeaf = True

    def render_GET(self, request: Any) -> bytes:  # noqa: N802
        return b"secret figures"


def request(
    path: bytes = b"", ip: str = "127.0.0.1", auth: bytes | None = None, method: bytes = b"GET"
) -> DummyRequest:
    kind = IPv6Address if ":" in ip else IPv4Address
    r = DummyRequest([p for p in path.split(b"/") if p])
    r.client = kind("TCP", ip, 40000)
    r.method = method
    if auth is not None:
        r.requestHeaders.setRawHeaders(b"authorization", [auth])
    return r


def serve(resource: Resource, r: DummyRequest) -> tuple[int, bytes, DummyRequest]:
    """Traverse from ``resource`` as the site does, render; (status, body, request)."""
    target = resource
    while r.postpath and not target.isLeaf:
        segment = r.postpath.pop(0)
        r.prepath.append(segment)
        target = target.getChildWithDefault(segment, r)
    body = target.render(r)
    if isinstance(body, bytes):
        r.write(body)
    return r.responseCode or 200, b"".join(r.written), r


@pytest.mark.parametrize(
    ("ip", "auth", "token", "status", "challenge"),
    [
        ("127.0.0.1", None, TOKEN, 200, None),
        ("::1", None, None, 200, None),
        ("::ffff:127.0.0.1", None, None, 200, None),  # IPv4-mapped loopback
        ("192.0.2.7", b"Bearer " + TOKEN, TOKEN, 200, None),
        ("192.0.2.7", b"bearer  " + TOKEN + b" ", TOKEN, 200, None),
        ("192.0.2.7", None, TOKEN, 401, b'Bearer realm="mailgw"'),
        ("192.0.2.7", b"Bearer nope", TOKEN, 401, b'Bearer realm="mailgw", error="invalid_token"'),
        (
            "192.0.2.7",
            b"Basic " + TOKEN,
            TOKEN,
            401,
            b'Bearer realm="mailgw", error="invalid_token"',
        ),
        ("127.0.0.1", b"Bearer nope", TOKEN, 401, b'Bearer realm="mailgw", error="invalid_token"'),
        ("192.0.2.7", None, None, 403, None),
        ("192.0.2.7", b"Bearer " + TOKEN, None, 403, None),  # no token configured
        ("127.0.0.1", b"Bearer " + TOKEN, None, 403, None),
    ],
)
def test_access(
    ip: str, auth: bytes | None, token: bytes | None, status: int, challenge: bytes | None
) -> None:
    guard = AdminGuard(Leaf(), Access(LOOPBACK, token))
    got, body, r = serve(guard, request(ip=ip, auth=auth))
    assert got == status
    assert r.responseHeaders.getRawHeaders(b"www-authenticate", [None])[0] == challenge
    if status == 200:
        assert body == b"secret figures"
    else:
        assert b"secret" not in body
        assert body.startswith(str(status).encode())
        assert r.responseHeaders.getRawHeaders(b"content-type") == [b"text/plain; charset=utf-8"]


def test_head_of_a_refusal_has_no_body() -> None:
    guard = AdminGuard(Leaf(), Access(LOOPBACK, TOKEN))
    status, body, _ = serve(guard, request(ip="192.0.2.1", method=b"HEAD"))
    assert (status, body) == (401, b"")


def test_everything_under_a_guard_is_guarded() -> None:
    tree = Resource()
    tree.putChild(b"deep", Leaf())
    root = HTTPRoot(Access(LOOPBACK, TOKEN))
    root.mount("/api/v1", tree)
    assert serve(root, request(b"api/v1/deep", ip="192.0.2.1"))[0] == 401
    assert serve(root, request(b"api/v1/deep", ip="192.0.2.1", auth=b"Bearer " + TOKEN))[:2] == (
        200,
        b"secret figures",
    )


def test_mount_is_one_call_guarded_or_public() -> None:
    root = HTTPRoot(Access(LOOPBACK, None))
    mounted = root.mount("/api/v1/tracking", Leaf())
    assert isinstance(mounted, AdminGuard)
    public = Leaf()
    assert root.mount("api/v1/public/", public, guarded=False) is public
    assert serve(root, request(b"api/v1/tracking", ip="192.0.2.1"))[0] == 403
    assert serve(root, request(b"api/v1/tracking"))[:2] == (200, b"secret figures")
    assert serve(root, request(b"api/v1/public", ip="192.0.2.1"))[:2] == (200, b"secret figures")
    assert serve(root, request(b"api/v2"))[0] == 404
    assert serve(root, request(b""))[0] == 404
    with pytest.raises(ValueError, match="mounted already"):
        root.mount("/api/v1/tracking", Leaf())
    with pytest.raises(ValueError, match="is a mounted resource already"):
        root.mount("/api/v1/tracking/more", Leaf())
    with pytest.raises(ValueError, match="needs a path"):
        root.mount("", Leaf())


def test_a_resource_mounted_at_the_root_answers_every_other_path() -> None:
    root = HTTPRoot(Access(LOOPBACK, None))
    root.mount("/api/v1/tracking", Leaf())
    assert serve(root, request(b"elsewhere"))[0] == 404
    public = Leaf()
    assert root.mount("/", public, guarded=False) is public
    assert serve(root, request(b""))[:2] == (200, b"secret figures")
    assert serve(root, request(b"mail", ip="192.0.2.1"))[:2] == (200, b"secret figures")
    assert serve(root, request(b"api/v1/tracking", ip="192.0.2.1"))[0] == 403
    assert serve(root, request(b"api/v2"))[0] == 404  # below a mounted folder: not the root's
    with pytest.raises(ValueError, match="/ is mounted already"):
        root.mount("/", Leaf())


def test_read_token(tmp_path: Path) -> None:
    assert read_token("") is None
    good = tmp_path / "token"
    good.write_bytes(TOKEN + b"\n")
    assert read_token(str(good)) == TOKEN
    short = tmp_path / "short"
    short.write_text("abc\n")
    with pytest.raises(TokenFileError, match="at least 16"):
        read_token(str(short))
    spaced = tmp_path / "spaced"
    spaced.write_text("0123456789 abcdef-more\n")
    with pytest.raises(TokenFileError, match="printable ASCII"):
        read_token(str(spaced))
    with pytest.raises(TokenFileError, match="cannot read"):
        read_token(str(tmp_path / "missing"))
