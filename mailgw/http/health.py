"""``/healthz`` (the process runs) and ``/readyz`` (listening, spool and store writable for
real, disk free above ``[http] min_free_disk``) for HAProxy and orchestrators."""

from __future__ import annotations

import contextlib
import itertools
import os
import shutil
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from twisted.internet import defer
from twisted.logger import Logger
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET

from mailgw.runtime.threads import Runner

log = Logger()

PROBE_PREFIX = ".mailgw-ready-probe."
_probes = itertools.count()


def probe_write(folder: str) -> None:
    """Create a file in ``folder``, write and fsync it, remove it (OSError on failure): what a
    spool commit or a delivery does first, so a read-only or broken file system shows here."""
    path = os.path.join(folder, f"{PROBE_PREFIX}{os.getpid()}.{next(_probes)}")
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0), 0o600)
    try:
        try:
            os.write(fd, b"probe\n")
            os.fsync(fd)
        finally:
            os.close(fd)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)


def parse_min_free(text: str) -> tuple[str, float] | None:
    """``[http] min_free_disk``: ``0`` -> None (off), ``5%`` -> ("percent", 5.0), ``1G`` ->
    ("bytes", 1073741824.0)."""
    from mailgw.config.values import parse_size

    text = text.strip()
    if text in ("", "0"):
        return None
    if text.endswith("%"):
        return ("percent", float(text[:-1]))
    return ("bytes", float(parse_size(text)))


def disk_problem(
    name: str,
    folder: str,
    threshold: tuple[str, float] | None,
    usage: Callable[[str], Any] = shutil.disk_usage,
) -> str | None:
    """What is wrong with the free space of ``folder``'s file system, or None."""
    if threshold is None:
        return None
    du = usage(folder)
    kind, limit = threshold
    if kind == "percent":
        free_pct = 100.0 * du.free / du.total if du.total else 0.0
        if free_pct < limit:
            return f"{name}: {free_pct:.1f}% of the disk free, below {limit:g}% ({folder})"
        return None
    if du.free < limit:
        return f"{name}: {du.free} bytes free, below {int(limit)} ({folder})"
    return None


@dataclass(frozen=True)
class Folder:
    """A folder /readyz writes into (``name``: what it is, e.g. ``spool``); ``create``: made
    first when missing (the store makes its root at the first delivery)."""

    name: str
    path: str
    create: bool = False


def folder_problems(folders: Sequence[Folder], threshold: tuple[str, float] | None) -> list[str]:
    """The write probe and the free-space check of each folder (blocking: run in a thread)."""
    problems = []
    for f in folders:
        try:
            if f.create:
                os.makedirs(f.path, exist_ok=True)
            probe_write(f.path)
        except OSError as e:
            problems.append(f"{f.name}: not writable: {e.strerror or e} ({f.path})")
            continue
        try:
            problem = disk_problem(f.name, f.path, threshold)
        except OSError as e:
            problem = f"{f.name}: cannot read free space: {e.strerror or e} ({f.path})"
        if problem:
            problems.append(problem)
    return problems


def listener_problems(role_services: dict[str, Iterable[Any]]) -> list[str]:
    """Each enabled role's listeners that are not listening: a ``ListenerService`` without a
    listening port, or what a service with ``listener_problems()`` (the IMAP worker pool)
    reports."""
    from mailgw.net.listen import ListenerService

    problems = []
    for role, services in role_services.items():
        for svc in services:
            if isinstance(svc, ListenerService):
                port = svc.port
                if port is None or not getattr(port, "connected", True):
                    problems.append(f"{role}: not listening on {svc.description}")
            elif hasattr(svc, "listener_problems"):
                problems.extend(svc.listener_problems())
    return problems


class Readiness:
    """The checks of /readyz: ``check()`` fires with the list of problems (empty: ready)."""

    def __init__(
        self,
        reactor: Any,
        run: Runner,
        role_services: Callable[[], dict[str, Iterable[Any]]],
        folders: Sequence[Folder],
        min_free: tuple[str, float] | None,
        timeout: float,
    ) -> None:
        self.reactor = reactor
        self.run = run
        self.role_services = role_services
        self.folders = tuple(folders)
        self.min_free = min_free
        self.timeout = timeout

    def check(self) -> defer.Deferred[list[str]]:
        problems = listener_problems(self.role_services())
        d: defer.Deferred[list[str]] = self.run(folder_problems, self.folders, self.min_free)
        out: defer.Deferred[list[str]] = defer.Deferred()
        timer = self.reactor.callLater(self.timeout, self._late, out)

        def done(found: list[str]) -> None:
            if timer.active():
                timer.cancel()
            if not out.called:
                out.callback(problems + found)

        def failed(failure: Any) -> None:
            log.failure("readyz: probe failed", failure)
            done([f"probe failed: {failure.getErrorMessage()}"])

        d.addCallbacks(done, failed)
        return out

    def _late(self, out: defer.Deferred[list[str]]) -> None:
        if not out.called:
            names = ", ".join(f.name for f in self.folders)
            out.callback([f"{names}: write probe not done after {self.timeout:g}s"])


class Healthz(Resource):
    """200 ``ok`` while the process runs."""

    isLeaf = True

    def render_GET(self, request: Any) -> bytes:  # noqa: N802 (twisted.web)
        request.setHeader(b"content-type", b"text/plain; charset=utf-8")
        request.setHeader(b"cache-control", b"no-store")
        return b"ok\n"


class Readyz(Resource):
    """200 ``ready`` when ``readiness`` finds no problem, else 503 with one line per problem."""

    isLeaf = True

    def __init__(self, readiness: Readiness) -> None:
        super().__init__()  # type: ignore[no-untyped-call]
        self.readiness = readiness

    def render_GET(self, request: Any) -> Any:  # noqa: N802 (twisted.web)
        gone: list[bool] = []
        request.notifyFinish().addErrback(lambda _: gone.append(True))

        def answer(problems: list[str]) -> None:
            if gone:
                return
            request.setHeader(b"content-type", b"text/plain; charset=utf-8")
            request.setHeader(b"cache-control", b"no-store")
            if problems:
                request.setResponseCode(503)
                body = "not ready:\n" + "".join(f"- {p}\n" for p in problems)
            else:
                body = "ready\n"
            if request.method != b"HEAD":
                request.write(body.encode("utf-8"))
            request.finish()

        self.readiness.check().addCallback(answer)
        return NOT_DONE_YET
