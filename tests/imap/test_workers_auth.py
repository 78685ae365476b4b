"""The auth penalty across IMAP workers: the worker asks over its pipe (RemoteAuthPenalty),
the main process answers from the node's one penalty (WorkerPool)."""

from __future__ import annotations

from pathlib import Path

from twisted.internet.task import Clock

from mailgw.config import load
from mailgw.directory.penalty import MemoryAuthPenalty, PenaltyPolicy
from mailgw.imap.worker_pool import Listener, WorkerPool
from mailgw.imap.worker_process import RemoteAuthPenalty
from tests.imap.test_workers import FakeReactor, config_file, control, sent
from tests.imap.test_workers_child import connected, lines


def test_worker_side_asks_the_main_process() -> None:
    control_, transport, _ = connected()
    penalty = RemoteAuthPenalty(control_)
    results: list[object] = []
    penalty.locked("alice@x", "192.0.2.1").addCallback(results.append)
    penalty.failed("alice@x", "192.0.2.1").addCallback(results.append)
    penalty.succeeded("alice@x", "192.0.2.1").addCallback(results.append)
    assert lines(transport) == [
        {"op": "auth_locked", "id": 1, "user": "alice@x", "ip": "192.0.2.1"},
        {"op": "auth_failed", "id": 2, "user": "alice@x", "ip": "192.0.2.1"},
        {"op": "auth_ok", "user": "alice@x", "ip": "192.0.2.1"},
    ]
    control_.dataReceived(b'{"op":"reply","id":2,"ok":true,"delay":4.0}\n')
    control_.dataReceived(b'{"op":"reply","id":1,"ok":true}\n')
    assert results == [None, 4.0, True]


def test_main_side_answers_from_the_shared_penalty(tmp_path: Path) -> None:
    reactor = FakeReactor()
    config = load(config_file(tmp_path))
    clock = Clock()
    shared = MemoryAuthPenalty(clock, PenaltyPolicy(base_delay=1.0, account_failures=2))
    assert not shared  # empty, and still the one the pool must use
    pool = WorkerPool(
        config,
        reactor,
        1,
        [Listener("listen", "tcp:8143:interface=127.0.0.1", False)],
        executable="/usr/bin/python3",
        penalty=shared,
    )
    assert pool.penalty is shared
    pool.privilegedStartService()
    pool.startService()
    reactor.run()
    worker = pool.workers[0]
    sent(worker)
    control(worker, op="auth_locked", id=1, user="alice@x", ip="192.0.2.1")
    control(worker, op="auth_failed", id=2, user="alice@x", ip="192.0.2.1")
    control(worker, op="auth_failed", id=3, user="alice@x", ip="192.0.2.2")
    control(worker, op="auth_locked", id=4, user="alice@x", ip="198.51.100.1")
    assert sent(worker) == [
        {"op": "reply", "id": 1, "ok": False},
        {"op": "reply", "id": 2, "ok": True, "delay": 1.0},
        {"op": "reply", "id": 3, "ok": True, "delay": 2.0},
        {"op": "reply", "id": 4, "ok": True},  # locked: seen by POP3/SMTP in this process too
    ]
    assert shared.is_locked("alice@x", "")
    control(worker, op="auth_ok", user="bob@x", ip="192.0.2.1")
    assert shared.failures(ip="192.0.2.1") == 1
