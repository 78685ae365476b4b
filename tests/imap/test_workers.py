"""IMAP worker pool, main side: limits across holders, the control protocol, spawning,
restarts with backoff, log relay and stopping, with a fake reactor and fake processes."""

from __future__ import annotations

import json
import socket
from pathlib import Path
from typing import Any

import pytest
from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.error import ProcessDone, ProcessTerminated
from twisted.internet.testing import MemoryReactorClock
from twisted.logger import capturedLogs, formatEvent
from twisted.python.failure import Failure

from mailgw.config import load
from mailgw.imap.factory import LocalAdmission, SessionLimits
from mailgw.imap.worker_pool import (
    LineBuffer,
    Listener,
    WorkerPool,
    describe_end,
    encode,
    worker_count,
)


class FakePort:
    def __init__(self, port: int, interface: str) -> None:
        self.port, self.interface = port, interface
        self.reading = True
        self.listening = True
        self.addressFamily = socket.AF_INET6 if ":" in interface else socket.AF_INET

    def stopReading(self) -> None:
        self.reading = False

    def getHost(self) -> IPv4Address | IPv6Address:  # IListeningPort
        kind = IPv6Address if ":" in self.interface else IPv4Address
        return kind("TCP", self.interface, self.port)

    def fileno(self) -> int:
        return 100 + self.port

    def stopListening(self) -> None:
        self.listening = False


class FakeProcess:
    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.written: list[bytes] = []
        self.signals: list[str] = []
        self.gone = False

    def writeToChild(self, fd: int, data: bytes) -> None:
        assert fd == 0
        self.written.append(data)

    def signalProcess(self, name: str) -> None:
        from twisted.internet.error import ProcessExitedAlready

        if self.gone:
            raise ProcessExitedAlready()
        self.signals.append(name)

    def messages(self) -> list[dict[str, Any]]:
        return [json.loads(line) for line in b"".join(self.written).splitlines()]


class FakeReactor(MemoryReactorClock):
    def __init__(self) -> None:
        super().__init__()
        self.spawned: list[tuple[Any, str, list[str], dict[str, str], dict[int, Any]]] = []
        self.ports: list[FakePort] = []
        self.fail_spawn = False
        self.next_pid = 1000

    def listenTCP(self, port: int, factory: Any, backlog: int = 50, interface: str = "") -> Any:
        fake = FakePort(port, interface)
        self.ports.append(fake)
        return fake

    def spawnProcess(
        self, proto: Any, executable: str, args: list[str], env: Any, childFDs: Any
    ) -> FakeProcess:
        if self.fail_spawn:
            raise OSError("no such interpreter")
        self.next_pid += 1
        process = FakeProcess(self.next_pid)
        self.spawned.append((proto, executable, args, env, childFDs))
        proto.makeConnection(process)
        return process


def config_file(tmp_path: Path, **imap: str) -> str:
    path = tmp_path / "mailgw.ini"
    keys = "".join(f"{k} = {v}\n" for k, v in imap.items())
    path.write_text(f"[server]\ndata_dir = {tmp_path}/data\n[imap]\n{keys}")
    return str(path)


def make_pool(tmp_path: Path, count: int = 2, **imap: str) -> tuple[WorkerPool, FakeReactor]:
    reactor = FakeReactor()
    config = load(config_file(tmp_path, **imap))
    listeners = [
        Listener("listen", "tcp:8143:interface=127.0.0.1", False),
        Listener("listen_tls", "haproxy:tcp6:8993:interface=\\:\\:1", True),
    ]
    pool = WorkerPool(config, reactor, count, listeners, executable="/usr/bin/python3")
    return pool, reactor


def started(tmp_path: Path, count: int = 2, **imap: str) -> tuple[WorkerPool, FakeReactor]:
    pool, reactor = make_pool(tmp_path, count, **imap)
    pool.privilegedStartService()
    pool.startService()
    reactor.run()  # runs the callWhenRunning hooks (the spawns)
    return pool, reactor


def control(worker: Any, **message: Any) -> None:
    worker.childDataReceived(1, json.dumps(message).encode() + b"\n")


def sent(worker: Any) -> list[dict[str, Any]]:
    process: FakeProcess = worker.transport
    out = process.messages()
    process.written.clear()
    return out


# -- small parts ------------------------------------------------------------------------------


def test_worker_count() -> None:
    assert worker_count(None, lambda: 8) == 8
    assert worker_count(None, lambda: None) == 1
    assert worker_count(0, lambda: 8) == 0
    assert worker_count(3, lambda: 8) == 3


def test_line_buffer_splits_and_bounds_lines() -> None:
    lines = LineBuffer(max_line=4)
    assert lines.feed(b"ab\ncd") == [b"ab"]
    assert lines.feed(b"e\n") == [b"cde"]
    assert lines.feed(b"0123456789") == [b"0123", b"4567"]
    assert lines.rest() == b"89"
    assert lines.rest() == b""


def test_encode_is_one_json_line() -> None:
    assert encode({"op": "changed", "folder": "Grüße"}) == (
        b'{"op":"changed","folder":"Gr\\u00fc\\u00dfe"}\n'
    )


def test_describe_end() -> None:
    assert describe_end(Failure(ProcessDone(0))) == "exit code 0"
    assert describe_end(Failure(ProcessTerminated(exitCode=3))) == "exit code 3"
    assert describe_end(Failure(ProcessTerminated(signal=9))) == "signal 9"


def test_session_limits_per_ip_and_user_per_holder() -> None:
    limits = SessionLimits(max_per_ip=2, max_per_user=2)
    assert limits.open("192.0.2.1", "w1") and limits.open("192.0.2.1", "w2")
    assert not limits.open("192.0.2.1", "w1")
    assert limits.open("192.0.2.2", "w1")
    assert limits.login("alice", "w1") and limits.login("alice", "w2")
    assert not limits.login("alice", "w2")
    assert limits.connections_from("192.0.2.1") == 2 and limits.sessions_of("alice") == 2
    # A release by a holder that does not hold it changes nothing.
    limits.close("192.0.2.1", "w3")
    limits.logout("alice", "w3")
    assert limits.connections_from("192.0.2.1") == 2 and limits.sessions_of("alice") == 2
    limits.release("w1")
    assert limits.connections_from("192.0.2.1") == 1
    assert limits.connections_from("192.0.2.2") == 0
    assert limits.sessions_of("alice") == 1
    limits.logout("alice", "w2")
    limits.close("192.0.2.1", "w2")
    assert limits.sessions_of("alice") == 0 and limits.connections_from("192.0.2.1") == 0
    limits.release("w2")  # nothing left: harmless
    assert limits.login("alice", "w2")


def test_session_limits_release_of_several_sessions() -> None:
    limits = SessionLimits(max_per_ip=5, max_per_user=5)
    for _ in range(3):
        assert limits.open("192.0.2.1", "w1") and limits.login("bob", "w1")
    assert limits.login("bob", "w2")
    limits.release("w1")
    assert limits.sessions_of("bob") == 1 and limits.connections_from("192.0.2.1") == 0
    limits.release("w2")
    assert limits.sessions_of("bob") == 0


def test_local_admission_answers_at_once() -> None:
    admission = LocalAdmission(SessionLimits(max_per_ip=1, max_per_user=1))
    results: list[bool] = []
    admission.open("192.0.2.1").addCallback(results.append)
    admission.open("192.0.2.1").addCallback(results.append)
    admission.login("alice").addCallback(results.append)
    admission.login("alice").addCallback(results.append)
    assert results == [True, False, True, False]
    admission.close("192.0.2.1")
    admission.logout("alice")
    assert admission.limits.connections_from("192.0.2.1") == 0
    assert admission.limits.sessions_of("alice") == 0


# -- the pool ---------------------------------------------------------------------------------


def test_start_binds_without_accepting_and_spawns_workers(tmp_path: Path) -> None:
    pool, reactor = started(tmp_path, count=2)
    assert [(p.port, p.reading) for p in reactor.ports] == [(8143, False), (8993, False)]
    assert len(reactor.spawned) == 2 and sorted(pool.workers) == [0, 1]
    proto, executable, args, env, fds = reactor.spawned[1]
    assert executable == "/usr/bin/python3"
    assert args[:3] == ["/usr/bin/python3", "-m", "mailgw.imap.worker_process"]
    assert args[args.index("--config") + 1] == pool.config.path
    assert args[args.index("--index") + 1] == "1"
    specs = json.loads(args[args.index("--listeners") + 1])
    assert specs == [
        {
            "fd": 3,
            "family": int(socket.AF_INET),
            "description": "tcp:8143:interface=127.0.0.1",
            "tls": False,
        },
        {
            "fd": 4,
            "family": int(socket.AF_INET6),
            "description": "haproxy:tcp6:8993:interface=\\:\\:1",
            "tls": True,
        },
    ]
    assert fds == {0: "w", 1: "r", 2: "r", 3: 100 + 8143, 4: 100 + 8993}
    assert "PATH" in env or env == {}  # the environment is passed on (coverage, PYTHONPATH)
    assert proto.pid == pool.workers[1].transport.pid


def test_ready_and_log_lines_are_relayed(tmp_path: Path) -> None:
    pool, _ = started(tmp_path, count=1)
    worker = pool.workers[0]
    with capturedLogs() as events:
        control(worker, op="ready", pid=worker.pid)
        worker.childDataReceived(2, b"[IMAP] imap abc login alice {x}\r\n[IMAP] part")
        worker.childDataReceived(2, b"ial\n\n")
    texts = [formatEvent(e) for e in events]
    assert worker.ready
    assert f"imap worker 0 (pid {worker.pid}) ready" in texts
    assert f"imap worker 0 (pid {worker.pid}): [IMAP] imap abc login alice {{x}}" in texts
    assert f"imap worker 0 (pid {worker.pid}): [IMAP] partial" in texts
    assert len(texts) == 3  # the empty line is dropped


def test_limits_are_arbitrated_across_workers(tmp_path: Path) -> None:
    pool, _ = started(tmp_path, count=2, max_connections_per_ip="2", max_connections_per_user="1")
    w0, w1 = pool.workers[0], pool.workers[1]
    sent(w0), sent(w1)
    control(w0, op="open", id=1, ip="192.0.2.1")
    control(w1, op="open", id=1, ip="192.0.2.1")
    control(w1, op="open", id=2, ip="192.0.2.1")
    assert sent(w0) == [{"op": "reply", "id": 1, "ok": True}]
    assert sent(w1) == [{"op": "reply", "id": 1, "ok": True}, {"op": "reply", "id": 2, "ok": False}]
    control(w0, op="login", id=2, user="alice")
    control(w1, op="login", id=3, user="alice")
    assert sent(w0) == [{"op": "reply", "id": 2, "ok": True}]
    assert sent(w1) == [{"op": "reply", "id": 3, "ok": False}]
    control(w0, op="logout", user="alice")
    control(w0, op="close", ip="192.0.2.1")
    control(w1, op="login", id=4, user="alice")
    control(w1, op="open", id=5, ip="192.0.2.1")
    assert sent(w1) == [{"op": "reply", "id": 4, "ok": True}, {"op": "reply", "id": 5, "ok": True}]


def test_store_changes_are_forwarded(tmp_path: Path) -> None:
    pool, _ = started(tmp_path, count=3)
    workers = [pool.workers[i] for i in range(3)]
    for w in workers:
        sent(w)
    control(workers[1], op="changed", user="alice", folder="INBOX")
    change = {"op": "changed", "user": "alice", "folder": "INBOX"}
    assert [sent(w) for w in workers] == [[change], [], [change]]
    pool.store_changed("bob", "Sent")
    change = {"op": "changed", "user": "bob", "folder": "Sent"}
    assert [sent(w) for w in workers] == [[change], [change], [change]]


def test_bad_control_lines_are_logged_and_ignored(tmp_path: Path) -> None:
    pool, _ = started(tmp_path, count=1)
    worker = pool.workers[0]
    sent(worker)
    with capturedLogs() as events:
        worker.childDataReceived(1, b"not json\n")
        control(worker, op="dance")
        control(worker, op="open", ip="192.0.2.1")  # no id: answered nothing, counted once
        control(worker, nothing="here")
    texts = [formatEvent(e) for e in events]
    assert len([t for t in texts if "bad control message" in t]) == 4, texts
    assert sent(worker) == []


def test_a_dead_worker_releases_and_restarts_with_backoff(tmp_path: Path) -> None:
    pool, reactor = started(tmp_path, count=2, max_connections_per_user="1")
    w0 = pool.workers[0]
    control(w0, op="login", id=1, user="alice")
    control(w0, op="open", id=2, ip="192.0.2.1")
    assert pool.limits.sessions_of("alice") == 1
    sent(w0)
    with capturedLogs() as events:
        w0.transport.gone = True
        w0.processEnded(Failure(ProcessTerminated(signal=9)))
    assert any("ended (signal 9); restarting in 0.5s" in formatEvent(e) for e in events)
    assert pool.limits.sessions_of("alice") == 0
    assert pool.limits.connections_from("192.0.2.1") == 0
    assert 0 not in pool.workers and w0.ended.called
    w0.send({"op": "changed"})  # a dead worker is not written to
    assert sent(w0) == []
    reactor.advance(0.5)
    assert pool.workers[0] is not w0 and len(reactor.spawned) == 3
    # Quick crashes double the delay, up to the maximum.
    delays = []
    for _ in range(8):
        with capturedLogs() as events:
            pool.workers[0].processEnded(Failure(ProcessTerminated(exitCode=1)))
        text = next(formatEvent(e) for e in events if "restarting" in formatEvent(e))
        delays.append(float(text.rsplit("in ", 1)[1].rstrip("s")))
        reactor.advance(delays[-1])
    assert delays == [1.0, 2.0, 4.0, 8.0, 16.0, 30.0, 30.0, 30.0]
    # A worker that ran a while is restarted after the first delay again.
    reactor.advance(60)
    pool.workers[0].processEnded(Failure(ProcessDone(0)))
    assert pool._restarts[0].getTime() - reactor.seconds() == 0.5


def test_a_failed_spawn_is_retried(tmp_path: Path) -> None:
    pool, reactor = make_pool(tmp_path, count=1)
    reactor.fail_spawn = True
    pool.privilegedStartService()
    with capturedLogs() as events:
        pool.startService()
        reactor.run()
    assert any("cannot start" in formatEvent(e) for e in events)
    assert pool.workers == {}
    reactor.fail_spawn = False
    reactor.advance(0.5)
    assert sorted(pool.workers) == [0]


def test_stop_terms_waits_then_closes_the_listeners(tmp_path: Path) -> None:
    pool, reactor = started(tmp_path, count=2)
    w0, w1 = pool.workers[0], pool.workers[1]
    pool.workers[1].processEnded(Failure(ProcessTerminated(signal=9)))  # a restart is pending
    d = pool.stopService()
    assert w0.transport.signals == ["TERM"]
    assert not d.called and all(p.listening for p in reactor.ports)
    with capturedLogs() as events:
        w0.processEnded(Failure(ProcessDone(0)))
    assert any("stopped (exit code 0)" in formatEvent(e) for e in events)
    assert d.called and not any(p.listening for p in reactor.ports)
    reactor.advance(60)  # neither the cancelled restart nor the killer runs
    assert len(reactor.spawned) == 2 and w1 not in pool.workers.values()


def test_stop_kills_workers_that_do_not_stop(tmp_path: Path) -> None:
    pool, reactor = started(tmp_path, count=2)
    w0, w1 = pool.workers[0], pool.workers[1]
    d = pool.stopService()
    w1.processEnded(Failure(ProcessDone(0)))
    assert not d.called
    with capturedLogs() as events:
        reactor.advance(10)
    assert any("did not stop in 10.0s: SIGKILL" in formatEvent(e) for e in events)
    assert w0.transport.signals == ["TERM", "KILL"]
    assert w1.transport.signals == ["TERM"]
    w0.transport.gone = True
    w0.signal("KILL")  # already gone: no error
    w0.processEnded(Failure(ProcessTerminated(signal=9)))
    assert d.called
    w0.signal("TERM")  # ended: nothing sent


def test_stop_without_workers(tmp_path: Path) -> None:
    pool, reactor = make_pool(tmp_path, count=1)
    pool.privilegedStartService()
    pool.startService()  # the reactor is not running yet: nothing spawned
    d = pool.stopService()
    assert d.called and reactor.spawned == []
    reactor.run()  # the spawn hook finds the pool stopping
    assert reactor.spawned == []


def test_the_main_side_never_serves_and_ignores_other_pipes(tmp_path: Path) -> None:
    pool, _ = started(tmp_path, count=1)
    assert pool._listener_services[0].factory.buildProtocol(None) is None
    worker = pool.workers[0]
    sent(worker)
    worker.childDataReceived(3, b'{"op":"open","id":1,"ip":"192.0.2.1"}\n')
    assert sent(worker) == [] and pool.limits.connections_from("192.0.2.1") == 0
    with capturedLogs() as events:
        worker.childDataReceived(2, b"Traceback (most recent call last):")
        worker.processEnded(Failure(ProcessTerminated(exitCode=1)))
    texts = [formatEvent(e) for e in events]
    assert f"imap worker 0 (pid {worker.pid}): Traceback (most recent call last):" in texts


def test_node_with_workers_hands_both_listeners_to_the_pool(
    tmp_path: Path, selfsigned: tuple[Path, Path]
) -> None:
    from twisted.internet.task import Clock

    from mailgw.service import Node

    cert, key = selfsigned
    path = tmp_path / "node.ini"
    path.write_text(
        f"[server]\ndata_dir = {tmp_path}/data\n[tls]\ncertificate = {cert}\nprivate_key = {key}\n"
        "[imap]\nworkers = 3\nlisten = tcp:0:interface=127.0.0.1 tcp:0:interface=127.0.0.2\n"
        "listen_tls = tcp:0:interface=127.0.0.1\n"
    )
    node = Node(load(str(path)), Clock())
    pool = node.getServiceNamed("imap workers")
    assert isinstance(pool, WorkerPool) and pool.count == 3
    assert [(x.key, x.implicit_tls) for x in pool.listeners] == [
        ("listen", False),
        ("listen", False),
        ("listen_tls", True),
    ]
    assert [s.where for s in pool._listener_services] == [
        f"{path}:imap:listen",
        f"{path}:imap:listen",
        f"{path}:imap:listen_tls",
    ]
    # The change journal's entries (deliveries, POP3, other workers) go to the workers.
    assert pool.changes is node.store.changes
    assert pool.journal_changed in node.store.changes._subscribers


def test_node_with_zero_workers_shares_one_count(tmp_path: Path) -> None:
    from twisted.internet.task import Clock

    from mailgw.imap.factory import IMAPFactory
    from mailgw.net.listen import ListenerService
    from mailgw.service import Node

    path = tmp_path / "node.ini"
    path.write_text(f"[server]\ndata_dir = {tmp_path}/data\n[imap]\nworkers = 0\n")
    node = Node(load(str(path)), Clock())
    factories = [
        s.factory.wrappedFactory  # under the ConnectionGuard
        for s in node
        if isinstance(s, ListenerService) and isinstance(s.factory.wrappedFactory, IMAPFactory)
    ]
    assert len(factories) == 1
    with pytest.raises(KeyError):
        node.getServiceNamed("imap workers")


def test_the_busiest_worker_stops_accepting_until_the_others_catch_up(tmp_path: Path) -> None:
    from mailgw.imap.worker_pool import BALANCE_SLACK

    pool, _ = started(tmp_path, count=2)
    w0, w1 = pool.workers[0], pool.workers[1]
    control(w0, op="ready", pid=w0.pid)
    control(w1, op="ready", pid=w1.pid)
    sent(w0), sent(w1)
    for n in range(BALANCE_SLACK):
        control(w0, op="open", id=n, ip="192.0.2.1")
    assert all(m["op"] == "reply" for m in sent(w0))
    # One more than the slack above the other: told to stop before its reply, so the next
    # connection (made after this one's greeting) goes to the other worker.
    control(w0, op="open", id=99, ip="192.0.2.1")
    assert sent(w0) == [{"op": "accept", "on": False}, {"op": "reply", "id": 99, "ok": True}]
    assert sent(w1) == []
    control(w1, op="open", id=1, ip="192.0.2.2")
    assert sent(w0) == [{"op": "accept", "on": True}]
    # Closing is counted too; a dead worker no longer holds the others back.
    control(w1, op="close", ip="192.0.2.2")
    assert sent(w0) == [{"op": "accept", "on": False}]
    w1.transport.gone = True
    w1.processEnded(Failure(ProcessTerminated(signal=9)))
    assert sent(w0) == [{"op": "accept", "on": True}]


def test_a_worker_not_ready_yet_is_not_the_least_loaded(tmp_path: Path) -> None:
    pool, _ = started(tmp_path, count=2)
    w0, w1 = pool.workers[0], pool.workers[1]
    control(w0, op="ready", pid=w0.pid)
    sent(w0)
    for n in range(5):
        control(w0, op="open", id=n, ip="192.0.2.1")
    assert [m["op"] for m in sent(w0)] == ["reply"] * 5
    control(w1, op="ready", pid=w1.pid)
    assert sent(w0) == [{"op": "accept", "on": False}]


def test_reconfigure_sets_the_user_limit_and_tells_every_worker_to_reload(tmp_path: Path) -> None:
    pool, _ = started(tmp_path, count=2, max_connections_per_user="1")
    w0, w1 = pool.workers[0], pool.workers[1]
    sent(w0), sent(w1)
    control(w0, op="login", id=1, user="alice")
    control(w1, op="login", id=2, user="alice")
    assert sent(w0) == [{"op": "reply", "id": 1, "ok": True}]
    assert sent(w1) == [{"op": "reply", "id": 2, "ok": False}]
    pool.reconfigure(load(config_file(tmp_path, max_connections_per_user="2")))
    assert pool.config.imap.max_connections_per_user == 2
    assert sent(w0) == [{"op": "reload"}] and sent(w1) == [{"op": "reload"}]
    control(w1, op="login", id=3, user="alice")
    assert sent(w1) == [{"op": "reply", "id": 3, "ok": True}]


# -- metrics ------------------------------------------------------------------------------------


def test_workers_metrics_are_asked_for_kept_and_retired(tmp_path: Path) -> None:
    pool, reactor = started(tmp_path, count=2)
    w0, w1 = pool.workers[0], pool.workers[1]
    control(w0, op="ready", pid=w0.pid)
    sent(w0), sent(w1)
    fired: list[None] = []
    pool.refresh_metrics(timeout=1.0).addCallback(fired.append)
    assert sent(w0) == [{"op": "metrics"}]
    assert sent(w1) == []  # not ready: not asked
    assert fired == []
    figures = {"mailgw_imap_commands": [[{"command": "NOOP"}, 3.0]]}
    control(w0, op="metrics", figures=figures)
    assert fired == [None]
    assert pool.metrics.total() == figures
    # A push between scrapes replaces the last figures (cumulative); a bad one is refused.
    control(w0, op="metrics", figures={"mailgw_imap_commands": [[{"command": "NOOP"}, 4.0]]})
    with capturedLogs() as events:
        control(w0, op="metrics", figures={"mailgw_imap_commands": [[{}, "many"]]})
    assert any("not a metrics snapshot" in formatEvent(e) for e in events)
    assert pool.metrics.total() == {"mailgw_imap_commands": [[{"command": "NOOP"}, 4.0]]}
    # A worker that does not answer in time: the scrape goes on with what it has.
    late: list[None] = []
    pool.refresh_metrics(timeout=1.0).addCallback(late.append)
    reactor.advance(1.0)
    assert late == [None]
    # A worker that ends while asked: the wait ends, its figures stay in the sums.
    ended: list[None] = []
    pool.refresh_metrics(timeout=1.0).addCallback(ended.append)
    w0.processEnded(Failure(ProcessTerminated(signal=9)))
    assert ended == [None]
    assert pool.metrics.live == {}
    assert pool.metrics.total() == {"mailgw_imap_commands": [[{"command": "NOOP"}, 4.0]]}


def test_no_ready_worker_means_nothing_to_wait_for_and_not_ready(tmp_path: Path) -> None:
    pool, _ = started(tmp_path, count=1)
    done: list[None] = []
    pool.refresh_metrics().addCallback(done.append)
    assert done == [None]
    assert pool.listener_problems() == ["imap: no worker process ready"]
    worker = pool.workers[0]
    control(worker, op="ready", pid=worker.pid)
    assert pool.listener_problems() == []
    pool._listener_services[0].port = None
    assert pool.listener_problems() == ["imap: not listening on tcp:8143:interface=127.0.0.1"]
