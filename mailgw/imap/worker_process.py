"""An IMAP worker process (``python -m mailgw.imap.worker_process``): serves IMAP sessions on the
listening sockets inherited from the main process, which it asks for connection limits and
exchanges store changes with over stdin/stdout (see ``mailgw.imap.worker_pool``)."""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import sys
from collections.abc import Callable, Sequence
from typing import IO, Any, cast

from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.error import ConnectionLost, ReactorNotRunning
from twisted.internet.protocol import Protocol, connectionDone
from twisted.logger import (
    FileLogObserver,
    ILogObserver,
    LogEvent,
    Logger,
    formatEventAsClassicLogText,
    globalLogBeginner,
)
from twisted.python.failure import Failure
from twisted.python.threadpool import ThreadPool
from zope.interface import implementer

from mailgw.config import Config
from mailgw.imap.worker_pool import LineBuffer, encode
from mailgw.interfaces import IAuthPenalty
from mailgw.maillog import without_noise

log = Logger()

METRICS_INTERVAL = 5.0
"""Seconds between two pushes of a worker's figures to the main process (it also asks for
them before it answers a scrape of /metrics)."""


class Control(Protocol):
    """The worker's end of the control channel (stdin/stdout, JSON lines).

    ``request`` asks the main process and fires with its ``ok`` answer (``ask``: with the
    whole reply message); ``send`` tells it something. Changes made elsewhere go to
    ``on_changed(user, folder)``; the balance's "accept" to ``on_accept(on)``. When the channel
    closes (the main process stopped or died), pending requests fail and ``on_lost`` runs.
    """

    transport: Any

    def __init__(self, on_lost: Callable[[], None]) -> None:
        self.on_lost = on_lost
        self.on_changed: Callable[[str, str], None] = lambda user, folder: None
        self.on_accept: Callable[[bool], None] = lambda on: None
        self.on_reload: Callable[[], None] = lambda: None
        self._lines = LineBuffer()
        self._pending: dict[int, tuple[Deferred[Any], bool]] = {}
        self._next_id = 0
        self._lost = False

    def dataReceived(self, data: bytes) -> None:
        for line in self._lines.feed(data):
            self._message(line)

    def _message(self, line: bytes) -> None:
        try:
            message = json.loads(line)
            op = message["op"]
            if op == "reply":
                d, whole = self._pending.pop(int(message["id"]))
                d.callback(message if whole else bool(message["ok"]))
            elif op == "changed":
                self.on_changed(str(message["user"]), str(message["folder"]))
            elif op == "accept":
                self.on_accept(bool(message["on"]))
            elif op == "reload":
                self.on_reload()
            elif op == "metrics":
                self.send_metrics()
            else:
                raise ValueError(f"unknown op {op!r}")
        except (ValueError, KeyError, TypeError) as e:
            log.warn("bad control message {line!r}: {error}", line=line[:200], error=e)

    def send(self, op: str, **fields: Any) -> None:
        if not self._lost:
            self.transport.write(encode({"op": op, **fields}))

    def send_metrics(self) -> None:
        """This process's cumulative figures (``mailgw.runtime.metrics``) to the main process,
        which adds them to its own in ``/metrics``: every ``METRICS_INTERVAL`` and when asked."""
        from mailgw.runtime.metrics import snapshot

        self.send("metrics", figures=snapshot())

    def request(self, op: str, **fields: Any) -> Deferred[bool]:
        return self._ask(op, False, fields)

    def ask(self, op: str, **fields: Any) -> Deferred[dict[str, Any]]:
        return self._ask(op, True, fields)

    def _ask(self, op: str, whole: bool, fields: dict[str, Any]) -> Deferred[Any]:
        if self._lost:
            return fail(ConnectionLost("the main process is gone"))
        self._next_id += 1
        d: Deferred[Any] = Deferred()
        self._pending[self._next_id] = (d, whole)
        self.send(op, id=self._next_id, **fields)
        return d

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self._lost = True
        pending, self._pending = self._pending, {}
        for d, _ in pending.values():
            d.errback(ConnectionLost("the main process is gone"))
        self.on_lost()


class RemoteAdmission:
    """Connection limits decided by the main process (``mailgw.imap.factory.Admission``)."""

    def __init__(self, control: Control) -> None:
        self.control = control

    def open(self, ip: str) -> Deferred[bool]:
        return self.control.request("open", ip=ip)

    def close(self, ip: str) -> None:
        self.control.send("close", ip=ip)

    def login(self, user: str) -> Deferred[bool]:
        return self.control.request("login", user=user)

    def logout(self, user: str) -> None:
        self.control.send("logout", user=user)


@implementer(IAuthPenalty)
class RemoteAuthPenalty:
    """The auth penalty of the main process (``IAuthPenalty``), asked over the control pipe,
    so that failures count across the workers and the other roles of the node."""

    def __init__(self, control: Control) -> None:
        self.control = control

    def locked(self, user: str, ip: str) -> Deferred[bool]:
        return self.control.request("auth_locked", user=user, ip=ip)

    def failed(self, user: str, ip: str) -> Deferred[float]:
        d = self.control.ask("auth_failed", user=user, ip=ip)
        return d.addCallback(lambda reply: float(reply.get("delay", 0.0)))

    def succeeded(self, user: str, ip: str) -> Deferred[None]:
        self.control.send("auth_ok", user=user, ip=ip)
        return succeed(None)


def accept_one_at_a_time(port: Any) -> None:
    """Let ``port`` accept at most one connection each time it is readable, so that a burst of
    connections is spread over the workers instead of being taken by the first to wake."""
    if not hasattr(port, "numberAccepts"):
        return
    read = port.doRead

    def do_read() -> Any:
        port.numberAccepts = 1
        return read()

    port.doRead = do_read


def serve(
    config: Config, reactor: Any, control: Control, listeners: Sequence[dict[str, Any]]
) -> list[Any]:
    """Build this worker's directory, store and IMAP factories (as the main process does:
    ``mailgw.runtime.process``, ``mailgw.imap.setup``) and adopt the inherited listening
    sockets; returns the listening ports."""
    from mailgw.config.reload import ReloadableConfig
    from mailgw.directory.penalty import AuthGuard
    from mailgw.imap.factory import IMAPFactory, structure_cache
    from mailgw.imap.setup import build_imap_factory
    from mailgw.net.listen import parse_listen, wrap_factory
    from mailgw.runtime.process import IO_THREADS, ServerTLSSet, build_directory, build_store
    from mailgw.runtime.threads import pool_runner
    from mailgw.store.migration import tier2_from_config

    data_dir = config.server.data_dir
    directory = build_directory(config, reactor)
    store = build_store(config, directory, reactor, tier2_from_config(data_dir, config.store))
    tls = ServerTLSSet(config)
    tls_options = tls.get("imap")
    admission = RemoteAdmission(control)
    auth = AuthGuard(directory, RemoteAuthPenalty(control), reactor)
    cache = structure_cache(config.imap)
    io_pool = ThreadPool(minthreads=0, maxthreads=IO_THREADS, name="mailgw-imap-io")
    io_pool.start()
    reactor.addSystemEventTrigger("during", "shutdown", io_pool.stop)
    run_io = pool_runner(reactor, io_pool)
    factories: dict[bool, IMAPFactory] = {}
    ports = []
    for listener in listeners:
        implicit = bool(listener["tls"])
        factory = factories.get(implicit)
        if factory is None:
            factory = factories[implicit] = build_imap_factory(
                config,
                store,
                directory,
                reactor,
                implicit_tls=implicit,
                tls_options=tls_options,
                cache=cache,
                admission=admission,
                run_blocking=run_io,
                auth=auth,
            )
        spec, _ = parse_listen(listener["description"])
        wrapped = wrap_factory(
            factory,
            spec,
            reactor,
            config.imap.proxy_trusted,
            tls_options=tls_options if implicit else None,
            handshake_timeout=config.tls.handshake_timeout,
        )
        fd = int(listener["fd"])
        port = reactor.adoptStreamPort(fd, int(listener["family"]), wrapped)
        os.close(fd)  # the port holds its own duplicate
        accept_one_at_a_time(port)
        ports.append(port)

    def changed_elsewhere(user: str, folder: str) -> None:
        for factory in factories.values():
            factory.store_changed(user, folder)

    control.on_changed = changed_elsewhere

    def accept(on: bool) -> None:  # the main process's least-connections balance
        for port in ports:
            if not port.connected:  # stopped listening (shutting down)
                continue
            if on:
                port.startReading()
            else:
                port.stopReading()

    control.on_accept = accept
    # The main process reloaded the config file: re-read it here too (the same file, checked
    # there a moment ago); TLS, the directory and the factories take what applies.
    settings = ReloadableConfig(config)
    settings.subscribe(tls.reconfigure, tls.check)
    settings.subscribe(directory.reconfigure)
    for factory in factories.values():
        settings.subscribe(factory.reconfigure)

    def reload() -> None:
        settings.reload()

    control.on_reload = reload
    store.add_listener(lambda user, folder: control.send("changed", user=user, folder=folder))
    return ports


def stderr_observer(stream: IO[str]) -> ILogObserver:
    """Log events as ``[system] text`` lines (the main process adds time and worker)."""

    @implementer(ILogObserver)
    def observe(event: LogEvent) -> None:
        text = formatEventAsClassicLogText(event, formatTime=lambda when: "")
        if text:
            stream.write(text.lstrip())
            stream.flush()

    return cast(ILogObserver, observe)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m mailgw.imap.worker_process")
    parser.add_argument("--config", required=True, help="the main process's config file")
    parser.add_argument("--index", type=int, default=0, help="this worker's number")
    parser.add_argument(
        "--log-format", choices=("text", "json"), default="text", help="[log] format"
    )
    parser.add_argument(
        "--listeners",
        type=json.loads,
        required=True,
        help='JSON list of {"fd", "family", "description", "tls"}: the inherited sockets',
    )
    return parser.parse_args(argv)


def run(args: argparse.Namespace, reactor: Any) -> int:
    """Serve until SIGTERM or until the control channel closes: 0 on a clean stop, 1 when the
    worker cannot start (the main process logs it and starts it again later)."""
    from mailgw.config import ConfigError, load

    def stop() -> None:
        with contextlib.suppress(ReactorNotRunning):
            reactor.stop()

    control = Control(on_lost=stop)
    try:
        config = load(args.config)
        serve(config, reactor, control, args.listeners)
    except ConfigError as e:
        log.error("imap worker {index}: {error}", index=args.index, error=e)
        return 1
    except Exception:
        log.failure("imap worker {index}: cannot start", index=args.index)
        return 1
    from twisted.internet.stdio import StandardIO

    StandardIO(control, reactor=reactor)
    control.send("ready", pid=os.getpid())
    from twisted.internet.task import LoopingCall

    push = LoopingCall(control.send_metrics)
    push.clock = reactor
    push.start(METRICS_INTERVAL, now=False)
    reactor.addSystemEventTrigger("before", "shutdown", control.send_metrics)
    # Ctrl-C on `twistd -n` reaches the whole process group: the main process stops the
    # workers itself (SIGTERM), so a worker ignores SIGINT instead of dying early.
    reactor.callWhenRunning(signal.signal, signal.SIGINT, signal.SIG_IGN)
    # Likewise SIGHUP (a hangup of `twistd -n`'s terminal, `kill -HUP` of the group): the main
    # process reloads and tells its workers over the control pipe ({"op": "reload"}).
    reactor.callWhenRunning(signal.signal, signal.SIGHUP, signal.SIG_IGN)
    # Stopping, a second SIGTERM (systemd signals the whole control group, then the main
    # process signals its workers) must not kill the worker before it has closed its sessions.
    reactor.addSystemEventTrigger(
        "before", "shutdown", signal.signal, signal.SIGTERM, signal.SIG_IGN
    )
    reactor.run()  # SIGTERM stops it; returning lets atexit handlers (coverage) run
    # The reactor put back the default SIGTERM action: a late signal must not cut the exit.
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """The process entry point: log to stderr (relayed by the main process), then ``run``."""
    args = parse_args(argv)
    if args.log_format == "json":
        from mailgw.logjson import json_line

        observer: ILogObserver = FileLogObserver(sys.stderr, json_line)
    else:
        observer = stderr_observer(sys.stderr)
    globalLogBeginner.beginLoggingTo([without_noise(observer)], redirectStandardIO=False)
    from twisted.internet import reactor

    return run(args, reactor)


if __name__ == "__main__":
    sys.exit(main())
