"""Nginx mail proxy ``auth_http`` endpoint: authenticates a user and names their server.

Nginx (``mail { auth_http http://gw:8080/auth/nginx; }``) asks with request headers
``Auth-Method`` (plain, login), ``Auth-User`` and ``Auth-Pass`` (URL-escaped by nginx),
``Auth-Protocol`` (imap, pop3, smtp), ``Auth-Login-Attempt`` and ``Client-IP``. The password
is checked through the node's ``AuthGuard`` (the auth penalty and lockout shared by every
role, counted under the real client's address). Answers, always ``200`` with headers:

- success: ``Auth-Status: OK``, ``Auth-Server``/``Auth-Port``: for IMAP and POP3 the
  listener of the node holding the user's mailbox (``IMailboxMap``; ``[cluster]
  imap_servers``/``pop3_servers``), for SMTP the submission listener (``[cluster]
  smtp_server``, which takes nginx's XCLIENT); ``Auth-User`` the canonical name;
- failure: ``Auth-Status: Invalid login or password``, ``Auth-Wait`` (seconds, the
  penalty's delay: nginx waits, then lets the client try again), and for SMTP
  ``Auth-Error-Code: 535 5.7.8``;
- trouble (directory down, no server for the node): ``Auth-Status: Temporary server
  problem, try again later`` with ``Auth-Wait`` (``451 4.3.0`` for SMTP).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any
from urllib.parse import unquote

from twisted.internet.defer import Deferred, maybeDeferred, succeed
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET

from mailgw.config.values import parse_host_port
from mailgw.directory.penalty import PenalisedLogin

log = Logger(namespace="mailgw.http.authhttp")

PROTOCOLS = ("imap", "pop3", "smtp")
INVALID = "Invalid login or password"
TEMPORARY = "Temporary server problem, try again later"


@dataclass(frozen=True)
class Servers:
    """Where to send a user: ``imap``/``pop3``: node name -> (ip, port), with ``None``
    standing for "any node" (one node, no cluster); ``smtp``: (ip, port) or None."""

    imap: dict[str | None, tuple[str, int]]
    pop3: dict[str | None, tuple[str, int]]
    smtp: tuple[str, int] | None


class AuthHTTP(Resource):
    """The ``auth_http`` resource (see the module docstring). ``node_of(user)`` is the
    blocking ``IMailboxMap.get`` (None: no cluster), run through ``run``."""

    isLeaf = True

    def __init__(
        self,
        auth: Any,
        servers: Servers,
        run: Callable[..., Deferred[Any]],
        node_of: Callable[[str], str] | None = None,
        failure_wait: float = 2.0,
    ) -> None:
        super().__init__()  # type: ignore[no-untyped-call]
        self.auth = auth
        self.servers = servers
        self.run = run
        self.node_of = node_of
        self.failure_wait = failure_wait

    def render_GET(self, request: Any) -> Any:  # noqa: N802 (twisted.web)
        def header(name: str) -> str:
            value = request.getHeader(name)
            return value if isinstance(value, str) else (value or b"").decode("utf-8", "replace")

        protocol = header("Auth-Protocol").lower()
        method = header("Auth-Method").lower()
        user = unquote(header("Auth-User"))
        password = unquote(header("Auth-Pass"))
        client_ip = header("Client-IP")
        request.setHeader(b"content-type", b"text/plain")
        if protocol not in PROTOCOLS or method not in ("plain", "login") or not user:
            log.info(
                "auth_http: refused protocol={protocol} method={method}",
                protocol=protocol or "-",
                method=method or "-",
            )
            self._fail(request, protocol, INVALID, self.failure_wait)
            return b""

        d = self.auth.check_password(user, password, client_ip, protocol=protocol)
        d.addCallback(lambda account: self._route(str(getattr(account, "name", user)), protocol))
        d.addCallbacks(
            lambda answer: self._ok(request, answer),
            lambda failure: self._failed(request, protocol, user, client_ip, failure),
        )
        d.addErrback(lambda f: log.failure("auth_http: answer failed", f))
        return NOT_DONE_YET

    def _route(self, user: str, protocol: str) -> Deferred[tuple[str, str, int]]:
        """(canonical user, server ip, port) for the protocol; LookupError: none known."""
        if protocol == "smtp":
            if self.servers.smtp is None:
                raise LookupError("no SMTP submission server configured")
            ip, port = self.servers.smtp
            return succeed((user, ip, port))
        table = self.servers.imap if protocol == "imap" else self.servers.pop3

        def pick(node: str | None) -> tuple[str, str, int]:
            server = table.get(node) or table.get(None)
            if server is None:
                raise LookupError(f"no {protocol} server known for node {node}")
            return (user, *server)

        if self.node_of is None:
            return maybeDeferred(pick, None)
        return self.run(self.node_of, user).addCallback(pick)

    def _ok(self, request: Any, answer: tuple[str, str, int]) -> None:
        user, ip, port = answer
        request.setHeader(b"Auth-Status", b"OK")
        request.setHeader(b"Auth-Server", ip.encode())
        request.setHeader(b"Auth-Port", str(port).encode())
        request.setHeader(b"Auth-User", user.encode("utf-8"))
        log.info("auth_http: {user} -> {ip}:{port}", user=user, ip=ip, port=port)
        self._finish(request)

    def _failed(
        self, request: Any, protocol: str, user: str, client_ip: str, failure: Failure
    ) -> None:
        if failure.check(PenalisedLogin):
            delay = failure.value.delay  # type: ignore[union-attr]
            log.info(
                "auth_http: {protocol} login failed for {user!r} from {ip}",
                protocol=protocol,
                user=user,
                ip=client_ip or "-",
            )
            self._fail(request, protocol, INVALID, delay)
        else:
            log.failure("auth_http: cannot authenticate {user!r}", failure, user=user)
            self._fail(request, protocol, TEMPORARY, self.failure_wait, temporary=True)
        self._finish(request)

    def _fail(
        self, request: Any, protocol: str, status: str, wait: float, temporary: bool = False
    ) -> None:
        request.setHeader(b"Auth-Status", status.encode())
        request.setHeader(b"Auth-Wait", str(max(1, math.ceil(wait))).encode())
        if protocol == "smtp":
            code = b"451 4.3.0" if temporary else b"535 5.7.8"
            request.setHeader(b"Auth-Error-Code", code)

    @staticmethod
    def _finish(request: Any) -> None:
        if not request.finished and not getattr(request, "_disconnected", False):
            request.finish()


def _listener(descriptions: tuple[str, ...]) -> tuple[str, int] | None:
    """(ip, port) of the first ``tcp:PORT:interface=IP`` description (``haproxy:`` allowed)."""
    for description in descriptions:
        parts = description.removeprefix("haproxy:").split(":")
        if parts[0] != "tcp" or len(parts) < 2 or not parts[1].isdigit():
            continue
        ip = "0.0.0.0"
        for part in parts[2:]:
            if part.startswith("interface="):
                ip = part.split("=", 1)[1]
        return (ip if ip not in ("0.0.0.0", "::") else "127.0.0.1", int(parts[1]))
    return None


def servers_from_config(config: Any) -> Servers:
    """``Servers`` from ``[cluster]`` (or this node's own listeners)."""
    cluster = config.cluster
    imap: dict[str | None, tuple[str, int]] = {n: (h, p) for n, h, p in cluster.imap_servers}
    pop3: dict[str | None, tuple[str, int]] = {n: (h, p) for n, h, p in cluster.pop3_servers}
    if not imap and config.imap.enabled and (own := _listener(config.imap.listen)):
        imap[None] = own
    if not pop3 and config.pop3.enabled and (own := _listener(config.pop3.listen)):
        pop3[None] = own
    smtp: tuple[str, int] | None = None
    if cluster.smtp_server:
        smtp = parse_host_port(cluster.smtp_server)
    elif config.submission.enabled:
        smtp = _listener(config.submission.listen)
    return Servers(imap, pop3, smtp)
