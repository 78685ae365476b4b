"""free_port: each pytest-xdist worker draws from its own slice, never twice the same port."""

from __future__ import annotations

import socket

import pytest

from mailgw.testing import server
from mailgw.testing.server import PORT_RANGE, free_port, port_range


def test_without_xdist_the_whole_range(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("PYTEST_XDIST_WORKER", raising=False)
    monkeypatch.delenv("PYTEST_XDIST_WORKER_COUNT", raising=False)
    assert port_range() == range(*PORT_RANGE)


def test_workers_get_disjoint_slices(monkeypatch: pytest.MonkeyPatch) -> None:
    slices = []
    for index in range(3):
        monkeypatch.setenv("PYTEST_XDIST_WORKER", f"gw{index}")
        monkeypatch.setenv("PYTEST_XDIST_WORKER_COUNT", "3")
        slices.append(set(port_range()))
    assert all(slices)
    assert not (slices[0] & slices[1] or slices[1] & slices[2] or slices[0] & slices[2])
    assert min(min(s) for s in slices) >= PORT_RANGE[0]
    assert max(max(s) for s in slices) < PORT_RANGE[1]


def test_free_port_is_in_the_slice_bindable_and_not_repeated(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("PYTEST_XDIST_WORKER", "gw1")
    monkeypatch.setenv("PYTEST_XDIST_WORKER_COUNT", "2")
    monkeypatch.setattr(server, "_handed_out", set())
    ports = [free_port() for _ in range(50)]
    assert len(set(ports)) == 50
    assert all(p in port_range() for p in ports)
    with socket.socket() as s:
        s.bind(("127.0.0.1", ports[0]))


def test_a_taken_port_is_skipped(monkeypatch: pytest.MonkeyPatch) -> None:
    low = PORT_RANGE[0]
    monkeypatch.setattr(server, "PORT_RANGE", (low, low + 2))
    monkeypatch.setattr(server, "_handed_out", set())
    monkeypatch.delenv("PYTEST_XDIST_WORKER", raising=False)
    with socket.socket() as blocker:
        try:
            blocker.bind(("127.0.0.1", low))
        except OSError:
            pytest.fail(f"port {low} is taken on this machine: the test needs it free")
        blocker.listen()
        chosen = set()
        for _ in range(20):
            server._handed_out.clear()
            chosen.add(free_port())
        assert chosen == {low + 1}
