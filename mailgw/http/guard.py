"""Admin access to HTTP resources: the admin bearer token from anywhere, or an allowed network."""

from __future__ import annotations

import hmac
from collections.abc import Sequence
from typing import Any

from twisted.web.resource import Resource

from mailgw.net.proxy import Network, is_trusted

REALM = "mailgw"


class TokenFileError(Exception):
    """The admin token file cannot be used (unreadable, empty, too short)."""


MIN_TOKEN_LENGTH = 16


def read_token(path: str) -> bytes | None:
    """The admin token in ``path`` (surrounding whitespace removed); None for no path.
    TokenFileError when the file is unreadable or holds fewer than ``MIN_TOKEN_LENGTH``
    characters (a guessable token)."""
    if not path:
        return None
    try:
        with open(path, "rb") as f:
            token = f.read().strip()
    except OSError as e:
        raise TokenFileError(f"cannot read {path}: {e.strerror}") from None
    if len(token) < MIN_TOKEN_LENGTH:
        raise TokenFileError(f"{path}: the token needs at least {MIN_TOKEN_LENGTH} characters")
    if any(c <= 0x20 or c >= 0x7F for c in token):
        raise TokenFileError(f"{path}: the token must be printable ASCII without spaces")
    return token


class Access:
    """Who may use an admin resource: clients from ``allow`` (networks), or with ``token``."""

    def __init__(self, allow: Sequence[Network], token: bytes | None) -> None:
        self.allow = tuple(allow)
        self.token = token

    def refusal(self, request: Any) -> tuple[int, bytes, dict[bytes, bytes]] | None:
        """None when ``request`` may pass; else (status, body, extra headers)."""
        header = request.getHeader(b"authorization")
        if header is not None:
            scheme, _, credentials = header.strip().partition(b" ")
            given = credentials.strip()
            if (
                scheme.lower() == b"bearer"
                and self.token is not None
                and hmac.compare_digest(given, self.token)
            ):
                return None
            if self.token is None:
                return 403, b"403 Forbidden: no admin token is configured\n", {}
            challenge = f'Bearer realm="{REALM}", error="invalid_token"'.encode("ascii")
            return 401, b"401 Unauthorized: invalid admin token\n", {b"www-authenticate": challenge}
        if is_trusted(request.getClientAddress(), self.allow):
            return None
        if self.token is None:
            return 403, b"403 Forbidden: not allowed from this address\n", {}
        challenge = f'Bearer realm="{REALM}"'.encode("ascii")
        return (
            401,
            b"401 Unauthorized: an admin token is needed from this address\n",
            {b"www-authenticate": challenge},
        )


class Refused(Resource):
    """The answer to a refused request: its status, headers and a plain-text body."""

    isLeaf = True

    def __init__(self, status: int, body: bytes, headers: dict[bytes, bytes]) -> None:
        super().__init__()  # type: ignore[no-untyped-call]
        self.status = status
        self.body = body
        self.headers = headers

    def render(self, request: Any) -> bytes:
        request.setResponseCode(self.status)
        request.setHeader(b"content-type", b"text/plain; charset=utf-8")
        request.setHeader(b"cache-control", b"no-store")
        for name, value in self.headers.items():
            request.setHeader(name, value)
        return b"" if request.method == b"HEAD" else self.body


class AdminGuard(Resource):
    """``wrapped`` (and everything under it) for the clients ``access`` lets in; the others
    get 401 or 403 (see ``Access.refusal``)."""

    def __init__(self, wrapped: Resource, access: Access) -> None:
        super().__init__()  # type: ignore[no-untyped-call]
        self.wrapped = wrapped
        self.access = access

    def getChildWithDefault(self, path: bytes, request: Any) -> Resource:  # noqa: N802
        refused = self.access.refusal(request)
        if refused is not None:
            return Refused(*refused)
        return self.wrapped.getChildWithDefault(path, request)  # type: ignore[no-any-return,no-untyped-call]

    def render(self, request: Any) -> Any:
        refused = self.access.refusal(request)
        if refused is not None:
            return Refused(*refused).render(request)
        return self.wrapped.render(request)  # type: ignore[no-untyped-call]
