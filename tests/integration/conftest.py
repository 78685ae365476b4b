"""Integration fixtures: a real `twistd -n mailgw` on free loopback ports, stopped by PID."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from mailgw.testing.server import MailgwServer
from tests.integration.helpers import provision
from tests.integration.relay_world import Peers


def make_server(tmp: Path, overrides: dict[str, dict[str, str]] | None = None) -> MailgwServer:
    server = MailgwServer(tmp, overrides)
    provision(server)
    server.start()
    return server


@pytest.fixture
def server_factory(tmp_path: Path) -> Iterator[Callable[..., MailgwServer]]:
    started: list[MailgwServer] = []

    def factory(
        overrides: dict[str, dict[str, str]] | None = None, name: str = "node"
    ) -> MailgwServer:
        server = make_server(tmp_path / name, overrides)
        started.append(server)
        return server

    yield factory
    for server in started:
        server.stop()


@pytest.fixture
def server(server_factory: Callable[..., MailgwServer]) -> MailgwServer:
    return server_factory()


@pytest.fixture
def tls_server(
    server_factory: Callable[..., MailgwServer], selfsigned: tuple[Path, Path]
) -> MailgwServer:
    cert, key = selfsigned
    return server_factory({"tls": {"certificate": str(cert), "private_key": str(key)}})


@pytest.fixture(scope="module")
def peers(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Peers]:
    """The relay's target MX servers and DNS server (``relay_world``), one per test module."""
    p = Peers(tmp_path_factory.mktemp("peers"))
    p.start()
    yield p
    p.stop()
