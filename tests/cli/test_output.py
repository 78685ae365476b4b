"""What the admin command prints for people: store stats without tier 2, queue dates and sizes."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from mailgw.cli.main import main
from mailgw.cli.queue import date_text, show_value
from mailgw.cli.sizes import human_size
from mailgw.directory import Directory
from mailgw.model import Envelope
from mailgw.spool import Spool
from mailgw.store import MessageStore


@pytest.fixture
def config(tmp_path: Path) -> Path:
    path = tmp_path / "mailgw.ini"
    path.write_text(
        "[server]\ndata_dir = data\nhostname = mx.example.test\n"
        "[directory]\nargon2_time_cost = 1\nargon2_memory_kib = 8\n"
    )
    return path


@pytest.fixture
def timezone(monkeypatch: pytest.MonkeyPatch):
    """Set TZ for the test (``timezone("UTC")``); the process's zone comes back after it."""

    def set_zone(name: str) -> None:
        monkeypatch.setenv("TZ", name)
        time.tzset()

    yield set_zone
    monkeypatch.undo()
    time.tzset()


def run(config: Path, capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    code = main(["--config", str(config), *args])
    out, err = capsys.readouterr()
    return code, out, err


@pytest.mark.parametrize(
    ("size", "text"),
    [
        (0, "0 B"),
        (1023, "1023 B"),
        (1024, "1.0 KiB"),
        (4096, "4.0 KiB"),
        (int(2.3 * (1 << 20)), "2.3 MiB"),
        (25 << 20, "25.0 MiB"),
        (3 << 30, "3.0 GiB"),
        (5 << 40, "5.0 TiB"),
        (2048 << 40, "2048.0 TiB"),
    ],
)
def test_human_size(size: int, text: str) -> None:
    assert human_size(size) == text


def test_dates_are_local_with_their_offset(timezone) -> None:
    timezone("America/New_York")
    assert date_text(1764930000) == "2025-12-05 05:20:00 -05:00"
    timezone("UTC")
    assert date_text(1764930000) == "2025-12-05 10:20:00 +00:00"


def test_show_values() -> None:
    assert show_value("size", 4096) == "4.0 KiB (4096 bytes)"
    assert show_value("next_attempt", 0) == "now"
    assert show_value("recipients", ["a@x.test", "b@x.test"]) == "a@x.test, b@x.test"
    assert show_value("done", []) == "-"
    assert show_value("last_error", "") == "-"
    assert show_value("attempts", 2) == "2"


def test_queue_show_and_list(
    tmp_path: Path, config: Path, capsys: pytest.CaptureFixture[str], timezone
) -> None:
    timezone("UTC")
    spool = Spool(str(tmp_path / "data" / "spool"))
    incoming = spool.begin()
    incoming.write(b"Subject: queued\r\n\r\n" + b"x" * 4000 + b"\r\n")
    box: list[str] = []
    envelope = Envelope(
        "a@example.test",
        ["b@far.example"],
        received_at=1764930000.0,
        next_attempt=1764933600.0,
        attempts=1,
        last_error="451 4.7.1 later",
    )
    incoming.commit(envelope).addCallback(box.append)
    spool.move(box[0], "retry")
    spool.close()
    code, out, _ = run(config, capsys, "queue", "show", box[0])
    assert code == 0
    lines = out.splitlines()
    assert "received_at: 2025-12-05 10:20:00 +00:00" in lines, out
    assert "next_attempt: 2025-12-05 11:20:00 +00:00" in lines, out
    assert "size: 3.9 KiB (4021 bytes)" in lines, out
    assert "recipients: b@far.example" in lines, out
    code, out, _ = run(config, capsys, "queue", "list")
    assert code == 0 and " 3.9 KiB " in out.splitlines()[0], out


def test_store_stats_without_tier2_shows_tier1(
    tmp_path: Path, config: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    data = tmp_path / "data"
    directory = Directory(str(data / "directory.sqlite"), argon2_time_cost=1, argon2_memory_kib=8)
    directory.add_domain("example.test")
    directory.add_user("alice@example.test", "secret")
    store = MessageStore(str(data / "mail"), quota_for=directory.quota_for)
    for n in range(3):
        message = tmp_path / f"m{n}.eml"
        message.write_bytes(b"Subject: %d\r\n\r\nbody\r\n" % n)
        store.deliver("alice@example.test", str(message))
    store.close()
    directory.close()
    code, out, err = run(config, capsys, "store", "stats")
    assert code == 0 and err == "", err
    rows = [line.split("\t") for line in out.splitlines() if not line.startswith("#")]
    assert rows[0][0] == "tier" and [r[0] for r in rows[1:]] == ["tier1"]
    size = sum(len(b"Subject: %d\r\n\r\nbody\r\n" % n) for n in range(3))
    assert rows[1][1:4] == ["3", str(size), str(size)]
    assert "tier2_dir is not set" in out.splitlines()[0]
