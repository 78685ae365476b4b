"""/healthz and /readyz: the write probe, the free-space threshold, listeners, the timeout."""

from __future__ import annotations

import os
import shutil
from collections import namedtuple
from pathlib import Path
from typing import Any

import pytest
from twisted.internet import defer
from twisted.internet.task import Clock
from twisted.web.test.requesthelper import DummyRequest

from mailgw.http.health import (
    PROBE_PREFIX,
    Folder,
    Healthz,
    Readiness,
    Readyz,
    disk_problem,
    folder_problems,
    listener_problems,
    parse_min_free,
    probe_write,
)
from mailgw.net.listen import ListenerService
from mailgw.runtime.threads import run_inline

Usage = namedtuple("Usage", "total used free")


def test_the_probe_writes_and_leaves_nothing(tmp_path: Path) -> None:
    probe_write(str(tmp_path))
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(OSError):
        probe_write(str(tmp_path / "missing"))
    (tmp_path / "file").write_text("")
    with pytest.raises(NotADirectoryError):
        probe_write(str(tmp_path / "file"))
    assert [p.name for p in tmp_path.iterdir()] == ["file"]
    assert PROBE_PREFIX.startswith(".")  # never taken for a user by the store's scan


@pytest.mark.parametrize(
    ("text", "parsed"),
    [("0", None), ("5%", ("percent", 5.0)), ("0.5%", ("percent", 0.5)), ("1G", ("bytes", 2.0**30))],
)
def test_parse_min_free(text: str, parsed: object) -> None:
    assert parse_min_free(text) == parsed


def test_disk_problem_by_percent_and_bytes() -> None:
    def usage(free: int) -> Any:
        return lambda path: Usage(1000, 1000 - free, free)

    assert disk_problem("spool", "/s", None, usage(0)) is None
    assert disk_problem("spool", "/s", ("percent", 5.0), usage(50)) is None
    problem = disk_problem("spool", "/s", ("percent", 5.0), usage(49))
    assert problem == "spool: 4.9% of the disk free, below 5% (/s)"
    assert disk_problem("store", "/m", ("bytes", 100.0), usage(100)) is None
    assert disk_problem("store", "/m", ("bytes", 100.0), usage(99)) == (
        "store: 99 bytes free, below 100 (/m)"
    )
    zero = disk_problem("x", "/z", ("percent", 1.0), lambda path: Usage(0, 0, 0))
    assert zero is not None and "0.0% of the disk free" in zero


def test_folder_problems(tmp_path: Path) -> None:
    ok = tmp_path / "ok"
    ok.mkdir()
    created = tmp_path / "made" / "later"
    blocked = tmp_path / "blocked"
    blocked.write_text("a file where a folder should be")
    folders = [
        Folder("spool", str(ok)),
        Folder("store", str(created), create=True),
        Folder("tier-2 store", str(blocked)),
    ]
    problems = folder_problems(folders, None)
    assert created.is_dir()
    assert problems == [f"tier-2 store: not writable: Not a directory ({blocked})"]
    free_pct = 100 * shutil.disk_usage(ok).free / shutil.disk_usage(ok).total
    full = folder_problems([Folder("spool", str(ok))], ("percent", free_pct + 1))
    assert len(full) == 1 and full[0].startswith("spool: ") and "of the disk free" in full[0]


class FakePort:
    def __init__(self, connected: bool = True) -> None:
        self.connected = connected


class FakePool:
    def __init__(self, problems: list[str]) -> None:
        self.problems = problems

    def listener_problems(self) -> list[str]:
        return self.problems


def listener(description: str, port: Any) -> ListenerService:
    svc = ListenerService(None, description, None, "/e/mailgw.ini:mx:listen")
    svc.port = port
    return svc


def test_listener_problems() -> None:
    services = {
        "mx": [listener("tcp:25", FakePort()), listener("tcp:26", None)],
        "pop3": [listener("tcp:110", FakePort(connected=False))],
        "imap-workers": [FakePool(["imap: no worker process ready"])],
        "delivery": [object()],
    }
    assert listener_problems(services) == [
        "mx: not listening on tcp:26",
        "pop3: not listening on tcp:110",
        "imap: no worker process ready",
    ]
    assert listener_problems({"mx": [listener("tcp:25", FakePort())]}) == []


def render(resource: Any, method: bytes = b"GET") -> DummyRequest:
    request = DummyRequest([])
    request.method = method
    body = resource.render(request)
    if isinstance(body, bytes):
        request.write(body)
        request.finish()
    return request


def test_healthz() -> None:
    request = render(Healthz())
    assert b"".join(request.written) == b"ok\n"
    assert request.responseCode in (None, 200)


def readiness(tmp_path: Path, services: dict[str, Any], run: Any = run_inline) -> Readiness:
    return Readiness(
        Clock(), run, lambda: services, [Folder("spool", str(tmp_path))], None, timeout=5.0
    )


def test_readyz_ready_and_not(tmp_path: Path) -> None:
    request = render(Readyz(readiness(tmp_path, {"mx": [listener("tcp:25", FakePort())]})))
    assert request.finished and request.responseCode in (None, 200)
    assert b"".join(request.written) == b"ready\n"
    os.rmdir(tmp_path)
    request = render(Readyz(readiness(tmp_path, {"mx": [listener("tcp:25", None)]})))
    assert request.responseCode == 503
    assert b"".join(request.written).decode() == (
        "not ready:\n- mx: not listening on tcp:25\n"
        f"- spool: not writable: No such file or directory ({tmp_path})\n"
    )
    head = render(Readyz(readiness(tmp_path, {})), method=b"HEAD")
    assert head.responseCode == 503 and head.written == []


def test_readyz_times_out_on_a_hung_probe(tmp_path: Path) -> None:
    hung: defer.Deferred[list[str]] = defer.Deferred()
    check = readiness(tmp_path, {}, run=lambda *a: hung)
    results: list[list[str]] = []
    check.check().addCallback(results.append)
    assert results == []
    check.reactor.advance(5)
    assert results == [["spool: write probe not done after 5s"]]
    hung.callback([])  # a late answer changes nothing
    assert len(results) == 1


def test_readyz_reports_a_failing_probe(tmp_path: Path) -> None:
    check = readiness(tmp_path, {}, run=lambda *a: defer.fail(RuntimeError("pool stopped")))
    results: list[list[str]] = []
    check.check().addCallback(results.append)
    assert results == [["probe failed: pool stopped"]]


def test_readyz_does_not_answer_a_client_gone(tmp_path: Path) -> None:
    pending: defer.Deferred[list[str]] = defer.Deferred()
    resource = Readyz(readiness(tmp_path, {}, run=lambda *a: pending))
    request = DummyRequest([])
    resource.render(request)
    request.processingFailed(Exception("client went away"))  # notifyFinish errbacks
    pending.callback([])
    assert request.written == []
