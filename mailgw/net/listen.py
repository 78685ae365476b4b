"""Listen endpoints from config text: Twisted endpoint descriptions, ``haproxy:`` prefix for the
PROXY protocol, implicit TLS, and a service that reports a busy port as a config error."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from twisted.application import service
from twisted.internet import defer
from twisted.internet.endpoints import serverFromString
from twisted.internet.interfaces import IStreamServerEndpoint
from twisted.logger import Logger
from twisted.protocols.tls import TLSMemoryBIOFactory
from twisted.python.failure import Failure

from mailgw.net.guard import ConnectionGuardFactory
from mailgw.net.proxy import Network, ProxyHeaderFactory

log = Logger()


class ListenError(Exception):
    """A listen description that cannot be parsed or used."""


@dataclass(frozen=True)
class ListenSpec:
    """A parsed listen description: the Twisted endpoint text and whether PROXY is expected."""

    description: str
    endpoint: str
    proxy: bool


class _ParseOnlyReactor:
    """Stands in for the reactor while only checking a description's syntax."""


def parse_listen(description: str, reactor: Any = None) -> tuple[ListenSpec, IStreamServerEndpoint]:
    """Parse ``[haproxy:]ENDPOINT``; raise ListenError with Twisted's complaint if invalid."""
    proxy = description.startswith("haproxy:")
    inner = description[len("haproxy:") :] if proxy else description
    try:
        endpoint = serverFromString(reactor if reactor is not None else _ParseOnlyReactor(), inner)
    except Exception as e:  # Twisted raises ValueError, KeyError, OSError, SSL errors...
        raise ListenError(f"invalid endpoint {description!r}: {e}") from None
    return ListenSpec(description, inner, proxy), endpoint


def wrap_factory(
    factory: Any,
    spec: ListenSpec,
    reactor: Any,
    proxy_trusted: Sequence[Network],
    tls_options: Any = None,
    header_timeout: float = 10.0,
    handshake_timeout: float = 30.0,
) -> Any:
    """Stack the layers: socket -> PROXY header (if asked) -> TLS (if given) -> connection
    guard (close deadline; with TLS, ``handshake_timeout``) -> protocol."""
    factory = ConnectionGuardFactory(
        factory, reactor, handshake_timeout if tls_options is not None else None
    )
    if tls_options is not None:
        factory = TLSMemoryBIOFactory(tls_options, False, factory)
    if spec.proxy:
        factory = ProxyHeaderFactory(factory, proxy_trusted, reactor, header_timeout)
    return factory


def address_text(address: Any) -> str:
    """``127.0.0.1:8025``, ``[::1]:8025``, or a UNIX socket's path."""
    host, port = getattr(address, "host", None), getattr(address, "port", None)
    if host is None or port is None:
        name = getattr(address, "name", None)
        return name.decode("utf-8", "replace") if isinstance(name, bytes) else str(name or address)
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


class ListenerService(service.Service):
    """Listens on one endpoint while running; a failure to listen stops start-up with
    ``where: cannot listen on DESCRIPTION: reason`` (SystemExit, so twistd exits non-zero)."""

    def __init__(self, reactor: Any, description: str, factory: Any, where: str) -> None:
        self.reactor = reactor
        self.description = description
        self.factory = factory
        self.where = where
        self.port: Any = None
        self.setName(f"{where} {description}")

    def privilegedStartService(self) -> None:
        service.Service.privilegedStartService(self)
        _, endpoint = parse_listen(self.description, self.reactor)
        d = endpoint.listen(self.factory)
        result: list[Any] = []
        d.addBoth(result.append)
        if not result:
            raise SystemExit(f"{self.where}: cannot listen on {self.description}: no answer")
        outcome = result[0]
        if isinstance(outcome, Failure):
            reason = outcome.getErrorMessage()
            raise SystemExit(f"{self.where}: cannot listen on {self.description}: {reason}")
        self.port = outcome
        log.info(
            "{role} listening on {address}{proxy}",
            role=self.label,
            address=address_text(self.port.getHost()),
            proxy=", PROXY header required" if self.description.startswith("haproxy:") else "",
        )

    @property
    def label(self) -> str:
        """``mx``, ``imap``, ``imap TLS`` (a ``listen_tls`` key), from ``where``."""
        section, key = self.where.rsplit(":", 2)[-2:]
        return f"{section} TLS" if key == "listen_tls" else section

    def startService(self) -> None:
        service.Service.startService(self)
        if self.port is None:  # started without privilegedStartService (tests)
            self.privilegedStartService()

    def stopService(self) -> defer.Deferred[None] | None:
        service.Service.stopService(self)
        if self.port is not None:
            port, self.port = self.port, None
            return defer.maybeDeferred(port.stopListening)
        return None
