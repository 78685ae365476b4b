"""IMAP worker processes, main side: binds the IMAP listeners, spawns and restarts the workers,
relays their logs, and arbitrates what must hold across them (connection limits, store pushes).

The control channel is each worker's stdin (main -> worker) and stdout (worker -> main), one
JSON object per line:

- worker -> main: ``{"op": "ready", "pid": N}``; ``{"op": "open", "id": N, "ip": IP}`` and
  ``{"op": "login", "id": N, "user": USER}`` (answered by ``{"op": "reply", "id": N, "ok": B}``);
  ``{"op": "close", "ip": IP}``, ``{"op": "logout", "user": USER}`` (releases, no answer);
  the auth penalty (``mailgw.interfaces.IAuthPenalty``): ``{"op": "auth_locked", "id": N,
  "user": USER, "ip": IP}`` (reply ``ok`` True when locked out), ``{"op": "auth_failed", "id":
  N, "user": USER, "ip": IP}`` (reply with ``"delay": SECONDS``), ``{"op": "auth_ok", "user":
  USER, "ip": IP}`` (no answer);
  ``{"op": "changed", "user": USER, "folder": FOLDER}`` (a change in the worker's store: a
  hint; the main process reads what changed from the change journal, ``mailgw.journal``);
  ``{"op": "metrics", "figures": SNAPSHOT}`` (the worker's cumulative metrics,
  ``mailgw.runtime.metrics``: every few seconds, at shutdown, and when asked).
- main -> worker: ``reply`` as above; ``{"op": "accept", "on": B}`` (stop or go on accepting
  connections: the least-connections balance, ``BALANCE_SLACK``); ``{"op": "changed", ...}`` (a change made elsewhere:
  another worker, a local delivery, POP3, the ``mailgw`` command), one per folder of each
  journal entry, to every worker but the one that made the change; ``{"op": "metrics"}``
  (send your figures now: the HTTP role is answering a scrape of /metrics).
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from twisted.application import service
from twisted.internet import defer
from twisted.internet.error import ProcessExitedAlready, ProcessTerminated
from twisted.internet.interfaces import IAddress, IDelayedCall
from twisted.internet.protocol import ProcessProtocol, Protocol, ServerFactory
from twisted.logger import Logger
from twisted.python.failure import Failure

from mailgw.config import Config
from mailgw.directory.penalty import MemoryAuthPenalty, PenaltyPolicy
from mailgw.imap.factory import SessionLimits
from mailgw.interfaces import IChangeLog
from mailgw.logjson import relayed_fields
from mailgw.model.change import ChangeEntry
from mailgw.net.limits import ConnectionCounter
from mailgw.net.listen import ListenerService
from mailgw.runtime import metrics

log = Logger()

HINT_COALESCE = 0.005
"""Seconds a worker's "changed" hint waits for others before the journal is read."""
WORKER_MODULE = "mailgw.imap.worker_process"
MAX_CONTROL_LINE = 65536
"""Longest line kept whole on a control or log pipe; longer ones are cut there."""
FIRST_FD = 3
"""The first file descriptor of the inherited listening sockets in a worker."""
BALANCE_SLACK = 2
"""A ready worker stops accepting while it holds more than this many connections above the
least-loaded ready worker: new connections go to the others (least connections, within this)."""
STABLE_AFTER = 10.0
"""A worker that ran this long before it ended is restarted at once (no backoff)."""


def worker_count(setting: int | None, cpu_count: Callable[[], int | None] = os.cpu_count) -> int:
    """``[imap] workers``: None (``auto``) is one per CPU, at least 1; else the number."""
    if setting is None:
        return max(1, cpu_count() or 1)
    return setting


def encode(message: dict[str, Any]) -> bytes:
    """One control message as a JSON line."""
    return json.dumps(message, separators=(",", ":")).encode("ascii") + b"\n"


class LineBuffer:
    """Splits a byte stream into lines (without the newline); a line longer than ``max_line``
    is cut into pieces of that size rather than held without bound."""

    def __init__(self, max_line: int = MAX_CONTROL_LINE) -> None:
        self.max_line = max_line
        self._pending = b""

    def feed(self, data: bytes) -> list[bytes]:
        self._pending += data
        *lines, self._pending = self._pending.split(b"\n")
        while len(self._pending) > self.max_line:
            lines.append(self._pending[: self.max_line])
            self._pending = self._pending[self.max_line :]
        return lines

    def rest(self) -> bytes:
        """What is left without a newline (at end of stream)."""
        rest, self._pending = self._pending, b""
        return rest


@dataclass(frozen=True)
class Listener:
    """One IMAP listener handed to the workers: its config key, description, implicit TLS."""

    key: str
    description: str
    implicit_tls: bool


class _NotAccepting(ServerFactory[Protocol]):
    """The main process's factory on the shared sockets: it never accepts on them (reading is
    stopped before the reactor runs); should a connection slip through, it is closed."""

    noisy = False  # no "Starting factory <...>" in the mail log

    def buildProtocol(self, addr: IAddress) -> None:  # type: ignore[override]
        return None


class WorkerProcess(ProcessProtocol):
    """The main side of one worker: its control lines (stdout), its log lines (stderr)."""

    transport: Any

    def __init__(self, pool: WorkerPool, index: int) -> None:
        self.pool = pool
        self.index = index
        self.pid: int | None = None
        self.started = pool.reactor.seconds()
        self.ready = False
        self.alive = True
        self.accepting = True
        self.ended: defer.Deferred[None] = defer.Deferred()
        self._control = LineBuffer()
        self._log = LineBuffer()

    def connectionMade(self) -> None:
        self.pid = self.transport.pid

    def childDataReceived(self, childFD: int, data: bytes) -> None:
        if childFD == 1:
            for line in self._control.feed(data):
                self.pool.control_line(self, line)
        elif childFD == 2:
            for line in self._log.feed(data):
                self.pool.log_line(self, line)

    def send(self, message: dict[str, Any]) -> None:
        if self.alive and self.transport is not None:
            self.transport.writeToChild(0, encode(message))

    def signal(self, name: str) -> None:
        if not self.alive:
            return
        with contextlib.suppress(ProcessExitedAlready):
            self.transport.signalProcess(name)

    def processEnded(self, reason: Failure) -> None:
        self.alive = False
        rest = self._log.rest()
        if rest:
            self.pool.log_line(self, rest)
        self.pool.worker_ended(self, reason)
        self.ended.callback(None)


def describe_end(reason: Failure) -> str:
    """How a process ended, for the log: ``exit code N`` or ``signal N``."""
    value = reason.value
    if isinstance(value, ProcessTerminated) and value.signal is not None:
        return f"signal {value.signal}"
    return f"exit code {getattr(value, 'exitCode', None) or 0}"


class WorkerPool(service.MultiService):
    """``count`` IMAP worker processes sharing the IMAP listening sockets of this process.

    The listeners are bound at (privileged) start-up, so a busy port stops start-up with the
    usual ``file:imap:key: cannot listen`` error, but this process never accepts on them: the
    workers inherit the sockets (``childFDs``) and the kernel spreads the connections among
    them. The pool is the arbiter of ``max_connections_per_ip`` / ``_per_user`` across the
    workers (a dead worker's share is released) and forwards the change journal's entries
    (``changes``: every process's, woken by the workers' hints) to them. A worker that
    ends is restarted after a delay doubling on each quick crash (``restart_delay`` up to
    ``max_restart_delay``). Stopping sends SIGTERM and waits up to ``stop_timeout``, then
    SIGKILL.
    """

    def __init__(
        self,
        config: Config,
        reactor: Any,
        count: int,
        listeners: Sequence[Listener],
        executable: str = sys.executable,
        module: str = WORKER_MODULE,
        restart_delay: float = 0.5,
        max_restart_delay: float = 30.0,
        stop_timeout: float = 10.0,
        counter: ConnectionCounter | None = None,
        penalty: Any = None,
        changes: IChangeLog | None = None,
    ) -> None:
        super().__init__()
        self.setName("imap workers")
        self.config = config
        self.reactor = reactor
        self.count = count
        self.listeners = tuple(listeners)
        self.executable = executable
        self.module = module
        self.restart_delay = restart_delay
        self.max_restart_delay = max_restart_delay
        self.stop_timeout = stop_timeout
        imap = config.imap
        if counter is None:
            counter = ConnectionCounter(imap.max_connections_per_ip, imap.max_connections)
        self.limits = SessionLimits(
            imap.max_connections_per_ip, imap.max_connections_per_user, counter
        )
        self.penalty = (
            penalty
            if penalty is not None
            else MemoryAuthPenalty(reactor, PenaltyPolicy.from_config(config.directory))
        )
        self.workers: dict[int, WorkerProcess] = {}
        self._sockets: list[tuple[int, int, Listener]] = []
        self._restarts: dict[int, IDelayedCall] = {}
        self._quick_failures: dict[int, int] = {}
        self._stopping = False
        self._listener_services: list[ListenerService] = []
        # The node's change journal: its entries are forwarded (``journal_changed``); a
        # worker's "changed" is a hint to read it now. Without it, "changed" is forwarded.
        self.changes = changes
        self._wake: IDelayedCall | None = None
        # The workers' metrics, added to this process's in /metrics (``mailgw.http``).
        self.metrics = metrics.WorkerFigures()
        self._metrics_waiting: dict[WorkerProcess, list[defer.Deferred[None]]] = {}
        if changes is not None:
            changes.subscribe(self.journal_changed)
        for listener in self.listeners:
            where = f"{config.path}:imap:{listener.key}"
            svc = ListenerService(reactor, listener.description, _NotAccepting(), where)
            svc.setServiceParent(self)
            self._listener_services.append(svc)

    # -- life cycle -------------------------------------------------------------------------------

    def startService(self) -> None:
        super().startService()  # the listeners: bound now if privilegedStartService did not
        self._stopping = False
        self._sockets = []
        for svc, listener in zip(self._listener_services, self.listeners, strict=True):
            port = svc.port
            port.stopReading()  # the workers accept; this process only holds the socket
            self._sockets.append((port.fileno(), int(port.addressFamily), listener))
        self.reactor.callWhenRunning(self._spawn_all)

    def _spawn_all(self) -> None:
        for index in range(self.count):
            if index not in self.workers and index not in self._restarts:
                self._spawn(index)

    def _spawn(self, index: int) -> None:
        self._restarts.pop(index, None)
        if self._stopping:
            return
        child_fds: dict[int, int | str] = {0: "w", 1: "r", 2: "r"}
        specs = []
        for n, (fd, family, listener) in enumerate(self._sockets):
            child_fds[FIRST_FD + n] = fd
            specs.append(
                {
                    "fd": FIRST_FD + n,
                    "family": family,
                    "description": listener.description,
                    "tls": listener.implicit_tls,
                }
            )
        args = [
            self.executable,
            "-m",
            self.module,
            "--config",
            self.config.path,
            "--index",
            str(index),
            "--listeners",
            json.dumps(specs),
        ]
        if self.config.log.format == "json":
            args += ["--log-format", "json"]
        worker = WorkerProcess(self, index)
        try:
            self.reactor.spawnProcess(
                worker, self.executable, args, env=dict(os.environ), childFDs=child_fds
            )
        except Exception:
            log.failure("imap worker {index}: cannot start", index=index)
            self._schedule_restart(index, quick=True)
            return
        self.workers[index] = worker
        log.info("imap worker {index} started (pid {pid})", index=index, pid=worker.pid)

    def worker_ended(self, worker: WorkerProcess, reason: Failure) -> None:
        """A worker process ended: release what it held; restart it unless stopping."""
        self.limits.release(worker)
        self.metrics.retire(worker)
        self._metrics_arrived(worker)
        if self.workers.get(worker.index) is worker:
            del self.workers[worker.index]
        self.balance()  # the dead worker no longer counts as the least loaded
        how = describe_end(reason)
        if self._stopping:
            log.info(
                "imap worker {index} (pid {pid}) stopped ({how})",
                index=worker.index,
                pid=worker.pid,
                how=how,
            )
            return
        quick = self.reactor.seconds() - worker.started < STABLE_AFTER
        delay = self._schedule_restart(worker.index, quick)
        log.warn(
            "imap worker {index} (pid {pid}) ended ({how}); restarting in {delay}s",
            index=worker.index,
            pid=worker.pid,
            how=how,
            delay=delay,
        )

    def _schedule_restart(self, index: int, quick: bool) -> float:
        failures = self._quick_failures.get(index, 0) if quick else 0
        delay = min(self.max_restart_delay, self.restart_delay * 2**failures)
        self._quick_failures[index] = failures + 1
        self._restarts[index] = self.reactor.callLater(delay, self._spawn, index)
        return delay

    def stopService(self) -> defer.Deferred[None]:
        self._stopping = True
        for call in self._restarts.values():
            if call.active():
                call.cancel()
        self._restarts.clear()
        if self._wake is not None and self._wake.active():
            self._wake.cancel()
        running = list(self.workers.values())
        for worker in running:
            worker.signal("TERM")
        killer = self.reactor.callLater(self.stop_timeout, self._kill, running)

        def stop_listeners(_: object) -> Any:
            if killer.active():
                killer.cancel()
            # Only now: closing a listener while a worker still accepts on it would be harmless
            # (each process has its own descriptor), but the workers go first all the same.
            return service.MultiService.stopService(self)

        d: defer.Deferred[Any] = defer.DeferredList([w.ended for w in running], consumeErrors=True)
        return d.addBoth(stop_listeners)

    def _kill(self, workers: list[WorkerProcess]) -> None:
        for worker in workers:
            if worker.alive:
                log.warn(
                    "imap worker {index} (pid {pid}) did not stop in {timeout}s: SIGKILL",
                    index=worker.index,
                    pid=worker.pid,
                    timeout=self.stop_timeout,
                )
                worker.signal("KILL")

    def reconfigure(self, config: Config) -> None:
        """A reloaded config (``mailgw.config.reload``): the per-user limit this process
        arbitrates (the per-address and total ones are the node's counter's), and a ``reload``
        to every running worker (one started later reads the file anew)."""
        self.config = config
        self.limits.max_per_user = config.imap.max_connections_per_user
        for worker in list(self.workers.values()):
            worker.send({"op": "reload"})

    # -- the arbiter ------------------------------------------------------------------------------

    def control_line(self, worker: WorkerProcess, line: bytes) -> None:
        """One control message from ``worker``."""
        try:
            message = json.loads(line)
            op = message["op"]
            if op == "open":
                ok = self.limits.open(str(message["ip"]), worker)
                self.balance()  # before the reply: the next connection already sees it
                worker.send({"op": "reply", "id": message["id"], "ok": ok})
            elif op == "close":
                self.limits.close(str(message["ip"]), worker)
                self.balance()
            elif op == "login":
                ok = self.limits.login(str(message["user"]), worker)
                worker.send({"op": "reply", "id": message["id"], "ok": ok})
            elif op == "logout":
                self.limits.logout(str(message["user"]), worker)
            elif op in ("auth_locked", "auth_failed", "auth_ok"):
                self._penalty(worker, op, message)
            elif op == "changed":
                if self.changes is not None:
                    self._hinted()
                else:
                    self._forward(str(message["user"]), str(message["folder"]), worker)
            elif op == "metrics":
                figures = message["figures"]
                if not metrics.valid(figures):
                    raise ValueError("figures are not a metrics snapshot")
                self.metrics.update(worker, figures)
                self._metrics_arrived(worker)
            elif op == "ready":
                worker.ready = True
                self.balance()
                log.info(
                    "imap worker {index} (pid {pid}) ready", index=worker.index, pid=worker.pid
                )
            else:
                raise ValueError(f"unknown op {op!r}")
        except (ValueError, KeyError, TypeError) as e:
            log.warn(
                "imap worker {index} (pid {pid}): bad control message {line!r}: {error}",
                index=worker.index,
                pid=worker.pid,
                line=line[:200],
                error=e,
            )

    def listener_problems(self) -> list[str]:
        """For /readyz: IMAP listeners not bound, or no worker ready to accept on them."""
        problems = [
            f"imap: not listening on {svc.description}"
            for svc in self._listener_services
            if svc.port is None
        ]
        if not any(w.ready and w.alive for w in self.workers.values()):
            problems.append("imap: no worker process ready")
        return problems

    def refresh_metrics(self, timeout: float = 1.0) -> defer.Deferred[None]:
        """Ask every ready worker for its figures; fires when all have answered (or ended),
        or after ``timeout`` seconds (then the last figures received are used)."""
        asked = []
        for worker in self.workers.values():
            if worker.ready and worker.alive:
                d: defer.Deferred[None] = defer.Deferred()
                self._metrics_waiting.setdefault(worker, []).append(d)
                worker.send({"op": "metrics"})
                asked.append(d)
        if not asked:
            return defer.succeed(None)
        all_in: defer.Deferred[Any] = defer.DeferredList(asked, consumeErrors=True)
        out: defer.Deferred[None] = defer.Deferred()

        def late() -> None:
            if not out.called:
                out.callback(None)

        timer = self.reactor.callLater(timeout, late)

        def arrived(_: object) -> None:
            if timer.active():
                timer.cancel()
            if not out.called:
                out.callback(None)

        all_in.addCallback(arrived)
        return out

    def _metrics_arrived(self, worker: WorkerProcess) -> None:
        for d in self._metrics_waiting.pop(worker, []):
            d.callback(None)

    def _penalty(self, worker: Any, op: str, message: dict[str, Any]) -> None:
        """A worker's question to the node's auth penalty (``IAuthPenalty``: in memory, or
        the gateway state's, which answers later); its reply, if it waits for one."""
        user, ip = str(message["user"]), str(message["ip"])
        if op == "auth_ok":
            done: defer.Deferred[Any] = defer.maybeDeferred(self.penalty.succeeded, user, ip)
            done.addErrback(lambda f: log.failure("auth penalty: recording a success", f))
            return
        ident = message["id"]
        if op == "auth_locked":
            d: defer.Deferred[Any] = defer.maybeDeferred(self.penalty.locked, user, ip)
            d.addCallback(lambda locked: {"ok": bool(locked)})
        else:
            d = defer.maybeDeferred(self.penalty.failed, user, ip)
            d.addCallback(lambda delay: {"ok": True, "delay": float(delay)})

        def failed(failure: Failure) -> dict[str, Any]:
            log.failure("auth penalty: {op} failed", failure, op=op)
            # not known to be locked; a failure waits the base delay
            return {"ok": op != "auth_locked", "delay": self.penalty.policy.base_delay}

        d.addErrback(failed)
        d.addCallback(lambda fields: worker.send({"op": "reply", "id": ident, **fields}))

    def balance(self) -> None:
        """Least connections: a ready worker holding more than ``BALANCE_SLACK`` connections
        above the least-loaded ready one stops accepting until the others catch up (the
        kernel hands a connection on the shared sockets to whichever worker wakes first)."""
        ready = [w for w in self.workers.values() if w.ready and w.alive]
        if not ready:
            return
        held = {w: self.limits.connections_held(w) for w in ready}
        least = min(held.values())
        for worker, n in held.items():
            accepting = n <= least + BALANCE_SLACK
            if accepting != worker.accepting:
                worker.accepting = accepting
                worker.send({"op": "accept", "on": accepting})

    def log_line(self, worker: WorkerProcess, line: bytes) -> None:
        """One line of ``worker``'s log (its stderr) into this process's log."""
        text = line.decode("utf-8", "replace").rstrip("\r")
        relayed = relayed_fields(text) if text else None
        if relayed is not None:  # [log] format = json: the worker's fields stay fields
            log.emit(
                relayed["level"],
                "imap worker {index} (pid {pid}): {line}",
                index=worker.index,
                pid=worker.pid,
                line=relayed["line"],
                **relayed["fields"],
            )
        elif text:
            log.info(
                "imap worker {index} (pid {pid}): {line}",
                index=worker.index,
                pid=worker.pid,
                line=text,
            )

    def store_changed(self, user: str, folder: str) -> None:
        """A change made in this process (deliveries, POP3, migration): tell every worker."""
        self._forward(user, folder, None)

    def _hinted(self) -> None:
        """A worker changed the store: read the journal soon. Hints that arrive together
        (a busy node sends hundreds a second) are read in one pass ``HINT_COALESCE`` later,
        instead of one journal read per hint."""
        if self._wake is None or not self._wake.active():
            self._wake = self.reactor.callLater(HINT_COALESCE, self._wake_journal)

    def _wake_journal(self) -> None:
        self._wake = None
        if self.changes is not None:
            self.changes.wake()

    def journal_changed(self, entries: list[ChangeEntry]) -> None:
        """Subscriber of the change journal: each folder of each entry goes to every worker
        but the one whose process made the change (its sessions heard of it already)."""
        told: set[tuple[int, str, str]] = set()
        for entry in entries:
            origin = next((w for w in self.workers.values() if w.pid == entry.pid), None)
            for folder in entry.folders():
                key = (entry.pid, entry.user, folder)
                if key not in told:
                    told.add(key)
                    self._forward(entry.user, folder, origin)

    def _forward(self, user: str, folder: str, origin: WorkerProcess | None) -> None:
        message = {"op": "changed", "user": user, "folder": folder}
        for worker in list(self.workers.values()):
            if worker is not origin:
                worker.send(message)
