"""IMAP worker process, child side: the control channel, remote admission, building the
factories on inherited sockets, its log format and its start-up failures."""

from __future__ import annotations

import io
import json
import socket
from pathlib import Path
from typing import Any

from twisted.internet.error import ConnectionLost
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.logger import capturedLogs, formatEvent
from twisted.python.failure import Failure

from mailgw.config import load
from mailgw.imap.factory import IMAPFactory
from mailgw.imap.worker_process import (
    Control,
    RemoteAdmission,
    accept_one_at_a_time,
    parse_args,
    run,
    serve,
    stderr_observer,
)
from mailgw.net.guard import ConnectionGuardFactory
from mailgw.net.proxy import ProxyHeaderFactory


def connected() -> tuple[Control, StringTransport, list[str]]:
    lost: list[str] = []
    control = Control(on_lost=lambda: lost.append("lost"))
    transport = StringTransport()
    control.makeConnection(transport)
    return control, transport, lost


def lines(transport: StringTransport) -> list[dict[str, Any]]:
    out = [json.loads(x) for x in transport.value().splitlines()]
    transport.clear()
    return out


def test_requests_are_answered_by_id() -> None:
    control, transport, _ = connected()
    admission = RemoteAdmission(control)
    results: list[bool] = []
    admission.open("192.0.2.1").addCallback(results.append)
    admission.login("alice").addCallback(results.append)
    admission.close("192.0.2.1")
    admission.logout("alice")
    assert lines(transport) == [
        {"op": "open", "id": 1, "ip": "192.0.2.1"},
        {"op": "login", "id": 2, "user": "alice"},
        {"op": "close", "ip": "192.0.2.1"},
        {"op": "logout", "user": "alice"},
    ]
    control.dataReceived(b'{"op":"reply","id":2,"ok":false}\n{"op":"reply",')
    control.dataReceived(b'"id":1,"ok":true}\n')
    assert results == [False, True]


def test_changes_from_elsewhere_and_bad_lines() -> None:
    control, _, _ = connected()
    changes: list[tuple[str, str]] = []
    control.on_changed = lambda user, folder: changes.append((user, folder))
    with capturedLogs() as events:
        control.dataReceived(b'{"op":"changed","user":"alice","folder":"INBOX"}\n')
        control.dataReceived(b'{"op":"reply","id":99,"ok":true}\n')  # nobody asked
        control.dataReceived(b"garbage\n")
        control.dataReceived(b'{"op":"sing"}\n')
    assert changes == [("alice", "INBOX")]
    assert sum("bad control message" in formatEvent(e) for e in events) == 3


def test_default_change_handler_ignores() -> None:
    control, _, _ = connected()
    control.dataReceived(b'{"op":"changed","user":"alice","folder":"INBOX"}\n')
    control.dataReceived(b'{"op":"accept","on":false}\n')


def test_lost_channel_fails_pending_and_later_requests() -> None:
    control, transport, lost = connected()
    failures: list[Failure] = []
    control.request("open", ip="192.0.2.1").addErrback(failures.append)
    control.connectionLost(Failure(ConnectionLost()))
    assert lost == ["lost"]
    assert len(failures) == 1 and failures[0].check(ConnectionLost)
    control.request("login", user="alice").addErrback(failures.append)
    assert len(failures) == 2
    transport.clear()
    control.send("close", ip="192.0.2.1")
    assert transport.value() == b""


class FakeListeningPort:
    def __init__(self) -> None:
        self.numberAccepts = 100
        self.reads = 0

    def doRead(self) -> None:
        self.reads += 1
        assert self.numberAccepts == 1


def test_accept_one_at_a_time() -> None:
    port = FakeListeningPort()
    accept_one_at_a_time(port)
    port.numberAccepts = 40  # as Twisted's accept loop adapts it
    port.doRead()
    port.doRead()
    assert port.reads == 2
    accept_one_at_a_time(object())  # not a TCP port: left alone


def test_stderr_observer_writes_system_and_text() -> None:
    stream = io.StringIO()
    observe = stderr_observer(stream)
    observe({"log_format": "hello {who}", "who": "world", "log_system": "IMAP,3", "log_time": 0})
    assert stream.getvalue() == "[IMAP,3] hello world\n"


def test_parse_args() -> None:
    args = parse_args(["--config", "/etc/m.ini", "--index", "2", "--listeners", '[{"fd": 3}]'])
    assert (args.config, args.index, args.listeners) == ("/etc/m.ini", 2, [{"fd": 3}])


def write_config(tmp_path: Path, extra: str = "") -> str:
    path = tmp_path / "mailgw.ini"
    path.write_text(f"[server]\ndata_dir = {tmp_path}/data\nhostname = mx.example.test\n{extra}")
    (tmp_path / "data").mkdir(exist_ok=True)
    return str(path)


def listening_fd() -> int:
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen()
    sock.setblocking(False)
    return sock.detach()


def test_serve_adopts_sockets_and_exchanges_changes(tmp_path: Path) -> None:
    config = load(write_config(tmp_path))
    reactor = MemoryReactorClock()
    control, transport, _ = connected()
    fds = [listening_fd(), listening_fd(), listening_fd()]
    specs = [
        {"fd": fds[0], "family": int(socket.AF_INET), "description": "tcp:1", "tls": False},
        {"fd": fds[1], "family": int(socket.AF_INET), "description": "haproxy:tcp:2", "tls": False},
        {"fd": fds[2], "family": int(socket.AF_INET), "description": "tcp:3", "tls": True},
    ]
    ports = serve(config, reactor, control, specs)
    assert len(ports) == 3
    adopted = reactor.adoptedPorts
    assert [a[0] for a in adopted] == fds
    guards = [a[2] for a in adopted]  # each listener's protocols under a ConnectionGuard
    assert isinstance(guards[1], ProxyHeaderFactory)
    guards[1] = guards[1].wrappedFactory
    assert all(isinstance(g, ConnectionGuardFactory) for g in guards)
    plain, proxied, tls = (g.wrappedFactory for g in guards)
    assert isinstance(plain, IMAPFactory) and not plain.implicit_tls
    assert proxied is plain
    assert isinstance(tls, IMAPFactory) and tls.implicit_tls  # no [tls]: no TLS wrapper
    assert isinstance(plain.admission, RemoteAdmission)
    for fd in fds:  # the worker closed its inherited descriptors (the ports hold duplicates)
        try:
            socket.socket(fileno=fd).close()
        except OSError:
            continue
        raise AssertionError(f"fd {fd} still open")
    # A change in this worker's store goes to the main process ...
    transport.clear()
    plain.store.open_mailbox("alice@example.test").append(b"Subject: x\r\n\r\nx\r\n")
    assert {"op": "changed", "user": "alice@example.test", "folder": "INBOX"} in lines(transport)
    # ... and one from elsewhere reaches the sessions of both factories.
    seen: list[tuple[str, str]] = []
    plain.store_changed = lambda u, f: seen.append(("plain", f))  # type: ignore[method-assign]
    tls.store_changed = lambda u, f: seen.append(("tls", f))  # type: ignore[method-assign]
    control.dataReceived(b'{"op":"changed","user":"alice@example.test","folder":"Sent"}\n')
    assert seen == [("plain", "Sent"), ("tls", "Sent")]
    # The main process's balance stops and resumes accepting on every listening port.
    calls: list[tuple[int, str]] = []
    for n, port in enumerate(ports):
        port.connected = n != 2  # type: ignore[attr-defined]  # the third stopped listening
        port.stopReading = lambda n=n: calls.append((n, "stop"))  # type: ignore[attr-defined]
        port.startReading = lambda n=n: calls.append((n, "start"))  # type: ignore[attr-defined]
    control.dataReceived(b'{"op":"accept","on":false}\n{"op":"accept","on":true}\n')
    assert calls == [(0, "stop"), (1, "stop"), (0, "start"), (1, "start")]


def test_reload_op_rereads_the_config_and_renews_tls(
    tmp_path: Path, selfsigned: tuple[Path, Path]
) -> None:
    cert, key = selfsigned
    path = Path(write_config(tmp_path))
    path.write_text(
        path.read_text() + f"[tls]\ncertificate = {cert}\nprivate_key = {key}\n"
        "[imap]\nidle_timeout = 30m\n"
    )
    config = load(str(path))
    control, _, _ = connected()
    fd = listening_fd()
    spec = {"fd": fd, "family": int(socket.AF_INET), "description": "tcp:1", "tls": True}
    reactor = MemoryReactorClock()
    serve(config, reactor, control, [spec])
    wrapped = reactor.adoptedPorts[0][2]  # TLS -> connection guard -> the IMAP factory
    imap = wrapped.wrappedFactory.wrappedFactory
    assert isinstance(imap, IMAPFactory) and imap.config.idle_timeout == 30 * 60.0
    imap_factories = [imap]
    tls = imap.tls_options
    context = tls.context
    path.write_text(path.read_text().replace("idle_timeout = 30m", "idle_timeout = 45m"))
    with capturedLogs() as events:
        control.dataReceived(b'{"op":"reload"}\n')
    assert imap_factories[0].config.idle_timeout == 45 * 60.0
    assert tls.context is not context  # the certificate files read again, same object
    texts = [formatEvent(e) for e in events]
    assert "reload: [imap] idle_timeout: 1800.0 -> 2700.0" in texts
    # A file that does not load: refused, nothing changes.
    path.write_text(path.read_text().replace("idle_timeout = 45m", "idle_timeout = soon"))
    with capturedLogs() as events:
        control.dataReceived(b'{"op":"reload"}\n')
    assert imap_factories[0].config.idle_timeout == 45 * 60.0
    assert any("reload refused" in formatEvent(e) for e in events)


def test_run_reports_a_bad_config(tmp_path: Path) -> None:
    path = tmp_path / "bad.ini"
    path.write_text("[imap]\nworkers = many\n")
    args = parse_args(["--config", str(path), "--index", "1", "--listeners", "[]"])
    with capturedLogs() as events:
        assert run(args, MemoryReactorClock()) == 1
    texts = [formatEvent(e) for e in events]
    assert any("imap worker 1:" in t and "imap:workers" in t for t in texts), texts


def test_run_reports_a_start_failure(tmp_path: Path) -> None:
    args = parse_args(
        ["--config", write_config(tmp_path), "--listeners", '[{"fd": 3, "family": 1}]']
    )
    with capturedLogs() as events:
        assert run(args, MemoryReactorClock()) == 1
    assert any("imap worker 0: cannot start" in formatEvent(e) for e in events)


def test_stderr_observer_skips_events_without_text() -> None:
    stream = io.StringIO()
    stderr_observer(stream)({"log_time": 0})
    assert stream.getvalue() == ""


def test_metrics_are_sent_when_asked() -> None:
    from mailgw.imap.worker_pool import MAX_CONTROL_LINE
    from mailgw.runtime.metrics import IMAP_COMMANDS, snapshot, valid

    control, transport, _ = connected()
    IMAP_COMMANDS.labels("NOOP").inc()
    control.dataReceived(b'{"op":"metrics"}\n')
    raw = transport.value()
    (message,) = lines(transport)
    assert message["op"] == "metrics"
    assert valid(message["figures"])
    assert message["figures"] == json.loads(json.dumps(snapshot()))
    assert len(raw) < MAX_CONTROL_LINE // 4  # room for many more command names
