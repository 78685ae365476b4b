"""The HTTP role's part: the site (root with /healthz, /readyz, /metrics), its listener
factories with connection limits, and the service that registers the metrics collector."""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

from prometheus_client import REGISTRY
from twisted.application import service
from twisted.internet.interfaces import IAddress, IHandshakeListener
from twisted.internet.protocol import Protocol, connectionDone
from twisted.protocols import policies
from twisted.python.failure import Failure
from twisted.web.server import Site

from mailgw.config import ConfigError
from mailgw.http.guard import Access, TokenFileError, read_token
from mailgw.http.health import Folder, Healthz, Readiness, Readyz, parse_min_free
from mailgw.http.metrics import MetricsResource, NodeCollector
from mailgw.http.root import HTTPRoot
from mailgw.net.limits import ConnectionCounter, Refusal
from mailgw.net.proxy import peer_ip

_REFUSED = {
    Refusal.TOTAL: b"too many connections\n",
    Refusal.PER_IP: b"too many connections from your address\n",
}


class _CountedConnection(policies.ProtocolWrapper):
    """One HTTP connection inside the role's connection limits: over a limit it is answered
    503 and closed (then it is not counted)."""

    factory: CountedFactory
    transport: Any

    def __init__(self, factory: CountedFactory, wrapped: Protocol) -> None:
        super().__init__(factory, wrapped)  # type: ignore[arg-type]
        self._ip: str | None = None

    def makeConnection(self, transport: Any) -> None:  # noqa: N802 (Twisted)
        ip = peer_ip(transport.getPeer())
        refusal = self.factory.counter.admit(ip)
        if refusal is not None:
            body = _REFUSED[refusal]
            transport.write(
                b"HTTP/1.1 503 Service Unavailable\r\nConnection: close\r\n"
                b"Content-Type: text/plain; charset=utf-8\r\n"
                b"Content-Length: " + str(len(body)).encode("ascii") + b"\r\n\r\n" + body
            )
            transport.loseConnection()
            return
        self._ip = ip
        super().makeConnection(transport)  # type: ignore[no-untyped-call]

    def handshakeCompleted(self) -> None:  # noqa: N802 (Twisted)
        # Defined here: ProtocolWrapper would look it up on the transport (the connection
        # guard, which calls this one: endless recursion).
        if IHandshakeListener.providedBy(self.wrappedProtocol):
            self.wrappedProtocol.handshakeCompleted()

    def connectionLost(self, reason: Failure = connectionDone) -> None:  # noqa: N802 (Twisted)
        if self._ip is None:
            return
        ip, self._ip = self._ip, None
        self.factory.counter.release(ip)
        super().connectionLost(reason)  # type: ignore[no-untyped-call]


class CountedFactory(policies.WrappingFactory):
    """``site`` behind ``counter`` (the role's ``max_connections`` and ``_per_ip``)."""

    protocol = _CountedConnection
    noisy = False

    def __init__(self, site: Site, counter: ConnectionCounter) -> None:
        super().__init__(site)  # type: ignore[no-untyped-call]
        self.counter = counter

    def buildProtocol(self, addr: IAddress | None) -> _CountedConnection:  # noqa: N802 (Twisted)
        return _CountedConnection(self, self.wrappedFactory.buildProtocol(addr))


QUIET_PATHS = frozenset({b"/healthz", b"/readyz", b"/metrics"})
"""Paths whose successful requests are not logged (probes and scrapes every few seconds)."""


class QuietSite(Site):
    """The site, whose access log leaves out successful health checks and scrapes (as
    nginx's ``access_log off`` for them); refusals and errors are still logged."""

    def log(self, request: Any) -> None:
        if request.code < 400 and request.path in QUIET_PATHS:
            return
        super().log(request)


class CollectorService(service.Service):
    """Registers ``collector`` in prometheus_client's default registry while running."""

    def __init__(self, collector: NodeCollector, registry: Any = REGISTRY) -> None:
        self.collector = collector
        self.registry = registry
        self.setName("http metrics")  # type: ignore[no-untyped-call]

    def startService(self) -> None:
        service.Service.startService(self)  # type: ignore[no-untyped-call]
        self.registry.register(self.collector)

    def stopService(self) -> None:
        service.Service.stopService(self)  # type: ignore[no-untyped-call]
        self.registry.unregister(self.collector)


@dataclass
class HTTPRole:
    """The part of the ``http`` role (``node.parts["http"]``): ``root`` (mount resources on
    it, see ``mailgw.http``), ``site``, ``endpoints`` (``mailgw.roles.Endpoint``) and the
    collector's ``service``."""

    root: HTTPRoot
    site: Site
    endpoints: list[Any]
    service: CollectorService
    collector: NodeCollector
    readiness: Readiness


def store_folders(node: Any) -> list[Folder]:
    """The folders /readyz probes: the spool's ``tmp``, the store's root, tier 2's ``tmp``."""
    folders = [Folder("spool", node.spool.tmp_dir), Folder("store", node.store.root, create=True)]
    tier2 = getattr(node.store, "tier2", None)
    root = getattr(tier2, "root", None)
    if root:
        folders.append(Folder("tier-2 store", os.path.join(root, "tmp")))
    return folders


def build_http(node: Any, endpoint: Any) -> HTTPRole:
    """The HTTP role of ``node`` (see ``HTTPRole``); ``endpoint`` is ``Endpoint`` of
    ``mailgw.roles``. ConfigError for an unusable ``admin_token_file``."""
    from mailgw.runtime.process import build_tls_options

    config = node.config
    http = config.http
    try:
        token = read_token(http.admin_token_file)
    except TokenFileError as e:
        raise ConfigError(config.path, "http", "admin_token_file", str(e)) from None
    access = Access(http.allow, token)
    root = HTTPRoot(access)
    relay = node.parts.get("relay")
    collector = NodeCollector(
        node.reactor,
        node.run_io,
        node.spool,
        node.store,
        node.counters,
        (lambda: relay.selector.status()) if relay is not None else (lambda: []),
        workers=node.imap_workers,
        store_interval=http.store_stats_interval,
    )
    readiness = Readiness(
        node.reactor,
        node.run_io,
        lambda: node.role_services,
        store_folders(node),
        parse_min_free(http.min_free_disk),
        http.ready_timeout,
    )
    root.mount("/healthz", Healthz(), guarded=False)  # type: ignore[no-untyped-call]
    root.mount("/readyz", Readyz(readiness))
    root.mount("/metrics", MetricsResource(collector))
    tracker = getattr(node, "tracker", None)
    if getattr(config, "api", None) is not None and config.api.enabled:
        from mailgw.http.api import mount_api

        mount_api(node, root, token)  # with GET /api/v1/tracking
    elif tracker is not None and tracker.path is not None:  # [tracking] record = yes
        from mailgw.http.api import mount_tracking

        mount_tracking(node, root, token)
    if config.webmail.enabled:  # the webmail at / (mailgw.webmail)
        from mailgw.webmail.setup import mount_webmail

        mount_webmail(node, root)
    site = QuietSite(root, timeout=http.idle_timeout)  # type: ignore[no-untyped-call]
    site.noisy = False
    site.displayTracebacks = False
    factory = CountedFactory(site, node.counters["http"])
    endpoints = [endpoint("listen", factory)]
    tls = node.tls.get("http") if hasattr(node, "tls") else build_tls_options(config, "http")
    if tls is not None:
        endpoints.append(endpoint("listen_tls", factory, tls))
    return HTTPRole(root, site, endpoints, CollectorService(collector), collector, readiness)
