"""The ``replication`` role's service: on a primary, a reconnecting TLS client shipping the
journal to the replica; on a replica, the TLS listener applying what the primary ships. Both
write their state to ``data_dir/replication/status.json`` for ``mailgw dr status``.
"""

from __future__ import annotations

import contextlib
import ipaddress
import json
import os
import time
import uuid
from collections import deque
from dataclasses import asdict, dataclass
from typing import Any

from twisted.application import internet, service
from twisted.internet import endpoints, ssl
from twisted.internet.protocol import Factory
from twisted.logger import Logger
from twisted.protocols.tls import TLSMemoryBIOFactory

from mailgw.config.values import parse_host_port
from mailgw.journal import barrier
from mailgw.replication import state, wire
from mailgw.replication.apply import Applier, ReplicaProtocol
from mailgw.replication.ship import Reader, ShipperProtocol

log = Logger()

STATUS_NAME = "status.json"
STATUS_INTERVAL = 1.0
SYNC_TICK = 0.05


def state_dir(data_dir: str) -> str:
    return os.path.join(data_dir, "replication")


@dataclass
class Status:
    """What ``mailgw dr status`` shows (the primary's or the replica's view)."""

    role: str = "primary"
    peer: str = ""
    mode: str = "async"
    connected: bool = False
    journal_last: int = 0
    shipped: int = 0
    acked: int = 0
    acked_time: float = 0.0
    applied: int = 0
    applied_time: float = 0.0
    error: str = ""
    fallbacks: int = 0
    updated: float = 0.0
    pid: int = 0

    def lag_entries(self) -> int:
        if self.role == "primary":
            return max(0, self.journal_last - self.acked)
        return 0

    def as_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["lag_entries"] = self.lag_entries()
        return out


def write_status(data_dir: str, status: Status) -> None:
    directory = state_dir(data_dir)
    os.makedirs(directory, mode=0o750, exist_ok=True)
    status.updated = time.time()
    status.pid = os.getpid()
    tmp = os.path.join(directory, STATUS_NAME + ".tmp")
    with open(tmp, "w", encoding="utf-8") as fh:
        json.dump(status.as_dict(), fh, indent=1, sort_keys=True)
    os.replace(tmp, os.path.join(directory, STATUS_NAME))


def read_status(data_dir: str) -> dict[str, Any] | None:
    try:
        with open(os.path.join(state_dir(data_dir), STATUS_NAME), encoding="utf-8") as fh:
            return dict(json.load(fh))
    except (OSError, ValueError):
        return None


def node_id(data_dir: str) -> str:
    """This node's identity as a primary (made once): a replica that followed another
    primary needs a full resync."""
    path = os.path.join(state_dir(data_dir), "node-id")
    try:
        with open(path, encoding="utf-8") as fh:
            found = fh.read().strip()
        if found:
            return found
    except FileNotFoundError:
        pass
    os.makedirs(state_dir(data_dir), mode=0o750, exist_ok=True)
    made = uuid.uuid4().hex
    with open(path, "w", encoding="utf-8") as fh:
        fh.write(made + "\n")
    return made


def parse_peer(peer: str) -> tuple[str, int]:
    """``host:port`` (``[v6]:port``) -> (host, port); ValueError when malformed."""
    return parse_host_port(peer)


def client_endpoint(reactor: Any, peer: str) -> Any:
    """A TLS client endpoint to the replica. Its certificate is not checked against a CA
    (self-signed certificates are the norm between two own nodes): the handshake's proofs
    are bound to its fingerprint instead (``mailgw.replication.wire``)."""
    host, port = parse_peer(peer)
    tcp: Any
    try:
        literal = ipaddress.ip_address(host)
    except ValueError:
        tcp = endpoints.HostnameEndpoint(reactor, host, port, timeout=10)
    else:
        kind = (
            endpoints.TCP6ClientEndpoint if literal.version == 6 else endpoints.TCP4ClientEndpoint
        )
        tcp = kind(reactor, host, port, timeout=10)
    return endpoints.wrapClientTLS(ssl.CertificateOptions(), tcp)


class ShipperFactory(Factory):
    def __init__(self, owner: ReplicationService) -> None:
        self.owner = owner

    def buildProtocol(self, addr: Any) -> ShipperProtocol:
        o = self.owner
        assert o.reader is not None
        proto = ShipperProtocol(
            o.reader,
            o.secret,
            o.run,
            o.window,
            o.status,
            o.reactor,
            on_conflict=o.fence,
            node=o.node_id,
            on_ack=o.acknowledged,
        )
        o.shipper = proto
        return proto


class ReplicaFactory(Factory):
    def __init__(self, owner: ReplicationService) -> None:
        self.owner = owner

    def buildProtocol(self, addr: Any) -> ReplicaProtocol:
        o = self.owner
        assert o.applier is not None
        return ReplicaProtocol(
            o.applier, o.secret, o.run, o.current_role, o.applied, o.authenticated
        )


class ReplicationService(service.MultiService):
    """The role's service (``node``: the ``mailgw.service.Node``)."""

    name = "replication"

    def __init__(self, node: Any) -> None:
        super().__init__()  # type: ignore[no-untyped-call]
        config = node.config.replication
        self.reactor = node.reactor
        self.data_dir = node.config.server.data_dir
        self.store = node.store
        self.run = node.run_io
        self.configured_role = config.role
        self.role = state.effective_role(self.data_dir, config.role)
        if self.role == "replica" and state.read_state(self.data_dir) is None:
            state.write_state(self.data_dir, "replica")  # the store refuses writes from now
        self.window = config.window
        self.secret = wire.read_secret(config.secret_file)
        self.status = Status(role=self.role, peer=config.peer, mode=config.mode)
        self.sync = config.mode == "sync" and self.role == "primary"
        self.sync_timeout = config.sync_timeout
        self._pending: deque[tuple[int, float]] = deque()
        self._acked_written: tuple[int, str] | None = None
        self.node_id = node_id(self.data_dir)
        self.reader: Reader | None = None
        self.applier: Applier | None = None
        self.shipper: ShipperProtocol | None = None
        self.client: Any = None
        directory_path = node.directory.path
        if self.role == "fenced":
            self.status.error = "fenced: the replica was promoted; run mailgw dr demote --resync"
            log.error("replication: {error}", error=self.status.error)
        elif self.role == "primary":
            self.reader = Reader(node.store, directory_path)
            client = self.client = internet.ClientService(
                client_endpoint(node.reactor, config.peer), ShipperFactory(self)
            )
            client.setServiceParent(self)  # type: ignore[no-untyped-call]
            node.store.changes.subscribe(self._journal_changed)
        else:
            if node.tls_options is None:
                raise ValueError("a replica needs [tls] certificate for its listener")
            self.applier = Applier(node.store, directory_path)
            factory = TLSMemoryBIOFactory(node.tls_options, False, ReplicaFactory(self))
            for description in config.listen:
                endpoint = endpoints.serverFromString(  # type: ignore[no-untyped-call]
                    node.reactor, description
                )
                server = internet.StreamServerEndpointService(  # type: ignore[no-untyped-call]
                    endpoint, factory
                )
                server.setServiceParent(self)  # type: ignore[no-untyped-call]
        timer: Any = internet.TimerService
        self._timer = timer(STATUS_INTERVAL, self._write_status)
        if self.sync:
            timer(SYNC_TICK, self.sync_tick).setServiceParent(self)
        self._timer.setServiceParent(self)

    def current_role(self) -> str:
        """The role now (``mailgw dr promote`` changes it while the node runs)."""
        return state.effective_role(self.data_dir, self.configured_role)

    def fence(self, reason: str) -> None:
        """The peer is a primary: our replica was promoted. Ship nothing, accept no writes
        until ``mailgw dr demote --resync``."""
        state.write_state(self.data_dir, "fenced")
        self.role = self.status.role = "fenced"
        self.status.error = f"fenced: {reason}; run mailgw dr demote --resync"
        log.error("replication: {error}", error=self.status.error)
        if self.client is not None and self.client.running:
            self.client.stopService()
        self.sync = False
        with contextlib.suppress(OSError):
            barrier.write_acked(barrier.acked_path(self.data_dir), self.status.acked, "async")

    def acknowledged(self) -> None:
        """The replica acknowledged a batch."""
        self.sync_tick()
        self._write_status()

    def sync_tick(self) -> None:
        """Synchronous mode: publish the replica's position for the waiters
        (``mailgw.journal.barrier``); fall back to async when an entry waits longer than
        ``sync_timeout`` (logged, counted in ``dr status``), back to sync once caught up."""
        if not self.sync:
            return
        acked = self.status.acked
        while self._pending and self._pending[0][0] <= acked:
            self._pending.popleft()
        if self.status.mode == "sync":
            if self._pending and time.time() - self._pending[0][1] > self.sync_timeout:
                self.status.mode = "async"
                self.status.fallbacks += 1
                log.warn(
                    "replication: the replica did not acknowledge within {timeout}s:"
                    " falling back to async (fallback {n})",
                    timeout=self.sync_timeout,
                    n=self.status.fallbacks,
                )
        elif self.status.connected and not self._pending and self.role == "primary":
            self.status.mode = "sync"
            log.info("replication: the replica caught up: back to sync")
        current = (acked, self.status.mode)
        if current != self._acked_written:
            try:
                barrier.write_acked(barrier.acked_path(self.data_dir), *current)
                self._acked_written = current
            except OSError as e:
                log.warn("replication: cannot write {path}: {error}", path="acked", error=e)

    def _journal_changed(self, entries: list[Any]) -> None:
        if entries:
            self.status.journal_last = max(self.status.journal_last, entries[-1].seq)
            if self.sync:
                self._pending.extend((e.seq, e.time) for e in entries)
        if self.shipper is not None:
            self.shipper.wake()

    def applied(self, position: int, when: float) -> None:
        self.status.applied = position
        if when:
            self.status.applied_time = when

    def authenticated(self, proto: ReplicaProtocol, ok: bool) -> None:
        if ok:
            self.status.connected = True
            self.status.error = ""
            proto.connectionLost = self._lost(proto.connectionLost)  # type: ignore[method-assign]
        else:
            self.status.error = "a peer failed to authenticate"

    def _lost(self, original: Any) -> Any:
        def lost(reason: Any) -> None:
            self.status.connected = False
            original(reason)

        return lost

    def startService(self) -> None:
        os.makedirs(state_dir(self.data_dir), mode=0o750, exist_ok=True)
        if self.sync:
            # Until the replica has answered, waiters wait (at most sync_timeout each).
            barrier.write_acked(barrier.acked_path(self.data_dir), 0, "sync")
        if self.applier is not None:
            self.status.applied = self.applier.position()
        if self.reader is not None:
            self.status.journal_last = self.reader.last_seq()
        super().startService()  # type: ignore[no-untyped-call]

    def stopService(self) -> Any:
        d = super().stopService()  # type: ignore[no-untyped-call]
        if self.sync:
            with contextlib.suppress(OSError):
                barrier.write_acked(barrier.acked_path(self.data_dir), self.status.acked, "async")
        self._write_status()
        return d

    def _write_status(self) -> None:
        self.status.role = self.current_role()
        try:
            write_status(self.data_dir, self.status)
        except OSError as e:
            log.warn("replication: cannot write the status: {error}", error=e)
