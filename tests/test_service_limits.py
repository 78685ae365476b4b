"""The composition root's limits: one counter per role sharing the process total, one auth
guard for every role, the submission listeners counting together, a guard on every listener
with the handshake timeout on the TLS ones."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from twisted.internet.task import Clock
from twisted.protocols.tls import TLSMemoryBIOFactory

from mailgw.config import load
from mailgw.net.guard import ConnectionGuardFactory
from mailgw.net.listen import ListenerService
from mailgw.service import Node


def inner(factory: Any) -> tuple[Any, ConnectionGuardFactory]:
    """The session factory of a listener and the guard above it."""
    if isinstance(factory, TLSMemoryBIOFactory):
        factory = factory.wrappedFactory
    assert isinstance(factory, ConnectionGuardFactory)
    return factory.wrappedFactory, factory


def test_roles_share_the_total_and_one_auth_guard(
    tmp_path: Path, selfsigned: tuple[Path, Path]
) -> None:
    cert, key = selfsigned
    path = tmp_path / "node.ini"
    path.write_text(
        f"[server]\ndata_dir = {tmp_path}/data\nmax_connections = 300\n"
        f"[tls]\ncertificate = {cert}\nprivate_key = {key}\nhandshake_timeout = 7s\n"
        "[mx]\nlisten = tcp:0:interface=127.0.0.1\nmax_connections = 100\n"
        "[pop3]\nlisten = tcp:0:interface=127.0.0.1\nlisten_tls = tcp:0:interface=127.0.0.1\n"
        "max_connections = 90\n"
        "[imap]\nworkers = 0\nlisten = tcp:0:interface=127.0.0.1\n"
        "listen_tls = tcp:0:interface=127.0.0.1\nmax_connections = 80\n"
        "[submission]\nenabled = yes\nlisten = tcp:0:interface=127.0.0.1\n"
        "listen_tls = tcp:0:interface=127.0.0.1\nmax_connections = 70\n"
    )
    node = Node(load(str(path)), Clock())
    assert node.connections.limit == 300
    assert {name: c.max_total for name, c in node.counters.items()} == {
        "mx": 100,
        "submission": 70,
        "pop3": 90,
        "imap": 80,
    }
    assert all(c.shared is node.connections for c in node.counters.values())
    by_name: dict[str, list[tuple[Any, ConnectionGuardFactory]]] = {}
    for service in node:
        if isinstance(service, ListenerService):
            role = service.where.split(":")[-2]
            by_name.setdefault(role, []).append(inner(service.factory))
    assert sorted(by_name) == ["imap", "mx", "pop3", "submission"]
    assert sum(len(pairs) for pairs in by_name.values()) == 7
    for role, pairs in by_name.items():
        for session_factory, guard in pairs:
            implicit = session_factory.implicit_tls
            assert guard.handshake_timeout == (7.0 if implicit else None), role
    subs = [f for f, _ in by_name["submission"]]
    assert len(subs) == 2 and subs[0].counter is subs[1].counter is node.counters["submission"]
    assert subs[0].sessions is subs[1].sessions
    assert subs[0].role.auth is node.auth
    pops = [f for f, _ in by_name["pop3"]]
    assert all(f.auth is node.auth and f._connections is node.counters["pop3"] for f in pops)
    imaps = [f for f, _ in by_name["imap"]]
    assert all(f.auth is node.auth for f in imaps)
    assert imaps[0].admission is imaps[1].admission
    assert imaps[0].admission.limits._ips is node.counters["imap"]
    assert by_name["mx"][0][0].counter is node.counters["mx"]
