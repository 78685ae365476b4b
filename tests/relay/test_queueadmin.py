"""Queue administration (internal API and `mailgw queue/channel/dkim` commands)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from mailgw.cli.main import main
from mailgw.model import Envelope
from mailgw.relay import queueadmin as qa
from mailgw.spool import Spool


def queue(spool: Spool, recipients: list[str], state: str, **fields: object) -> str:
    incoming = spool.begin()
    incoming.write(b"Subject: queued\r\nFrom: a@example.test\r\n\r\nbody\r\n")
    box: list[str] = []
    envelope = Envelope("a@example.test", recipients, **fields)  # type: ignore[arg-type]
    incoming.commit(envelope).addCallback(box.append)
    spool.move(box[0], state)
    return box[0]


@pytest.fixture
def spool(tmp_path: Path) -> Spool:
    return Spool(str(tmp_path / "data" / "spool"))


def test_list_show_flush_hold_release_delete(spool: Spool) -> None:
    r = queue(spool, ["x@far.example"], "retry", attempts=2, next_attempt=9e9, last_error="421")
    d = queue(spool, ["u@example.test"], "deferred", next_attempt=9e9)
    a = queue(spool, ["y@far.example"], "active")
    rows = qa.list_queue(spool)
    assert [(x["queue_id"], x["state"]) for x in rows] == [
        (r, "retry"),
        (d, "deferred"),
        (a, "active"),
    ]
    assert rows[0]["attempts"] == 2 and rows[0]["last_error"] == "421"
    shown = qa.show(spool, r)
    assert "Subject: queued" in shown["headers"] and shown["recipients"] == ["x@far.example"]
    assert sorted(qa.flush(spool)) == sorted([r, d])
    assert spool.load(r).envelope.next_attempt == 0.0
    assert qa.flush(spool, d) == [d]
    with pytest.raises(qa.QueueError, match="is active, not deferred"):
        qa.flush(spool, a)
    assert qa.hold(spool, r) == "retry"
    with pytest.raises(qa.QueueError, match="already held"):
        qa.hold(spool, r)
    with pytest.raises(qa.QueueError, match="cannot hold"):
        qa.hold(spool, a)
    local = lambda domain: domain == "example.test"  # noqa: E731
    assert qa.release(spool, r, local) == "retry"
    qa.hold(spool, d)
    assert qa.release(spool, d, local) == "deferred"
    with pytest.raises(qa.QueueError, match="not held"):
        qa.release(spool, d, local)
    with pytest.raises(qa.QueueError, match="being delivered"):
        qa.delete(spool, a)
    qa.delete(spool, r)
    with pytest.raises(qa.QueueError, match="no such queued message"):
        qa.show(spool, r)
    assert qa.age_text(5) == "5s" and qa.age_text(7200) == "2h" and qa.age_text(90) == "1m"


def test_corrupt_envelope_is_listed(spool: Spool) -> None:
    q = queue(spool, ["x@far.example"], "retry")
    Path(spool.envelope_path("retry", q)).write_bytes(b"{not json")
    [row] = qa.list_queue(spool)
    assert row["state"] == "corrupt" and "unreadable" in row["error"]


def cli(tmp_path: Path, *args: str) -> int:
    config = tmp_path / "mailgw.ini"
    if not config.exists():
        config.write_text(f"[server]\ndata_dir = {tmp_path / 'data'}\n")
    return main(["--config", str(config), *args])


def test_queue_commands(tmp_path: Path, spool: Spool, capsys: pytest.CaptureFixture[str]) -> None:
    q = queue(spool, ["x@far.example"], "retry", last_error="451 4.7.1 later", attempts=1)
    assert cli(tmp_path, "queue", "list") == 0
    out = capsys.readouterr().out
    assert q in out and "retry" in out and "451 4.7.1 later" in out and "1 message(s)" in out
    assert cli(tmp_path, "queue", "list", "--json", "--state", "retry") == 0
    assert json.loads(capsys.readouterr().out)[0]["queue_id"] == q
    assert cli(tmp_path, "queue", "show", q) == 0
    assert "Subject: queued" in capsys.readouterr().out
    assert cli(tmp_path, "queue", "show", q, "--json") == 0
    assert json.loads(capsys.readouterr().out)["state"] == "retry"
    assert cli(tmp_path, "queue", "flush") == 0
    assert "1 message(s) due now" in capsys.readouterr().out
    assert cli(tmp_path, "queue", "hold", q) == 0
    assert cli(tmp_path, "queue", "release", q) == 0
    assert "released to retry" in capsys.readouterr().out
    assert cli(tmp_path, "queue", "delete", q) == 0
    assert cli(tmp_path, "queue", "show", q) == 1
    assert "no such queued message" in capsys.readouterr().err


def test_channel_status_and_dkim_keygen(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli(tmp_path, "channel", "status") == 1
    assert "no channel status" in capsys.readouterr().err
    status = tmp_path / "data" / "relay" / "channels.json"
    status.parent.mkdir(parents=True)
    row = {
        "name": "overseas",
        "kind": "direct",
        "state": "suspended",
        "weight": 1,
        "in_flight": 0,
        "attempts": 7,
        "successes": 2,
        "failures": 5,
        "consecutive_failures": 5,
        "last_error": "connection refused",
        "last_error_at": 0,
        "suspended_until": 0,
    }
    status.write_text(json.dumps({"updated": 0, "channels": [row], "queue": {"sent": 2}}))
    assert cli(tmp_path, "channel", "status") == 0
    out = capsys.readouterr().out
    assert "overseas" in out and "suspended" in out and "connection refused" in out
    assert "sent=2" in out
    assert cli(tmp_path, "channel", "status", "--json") == 0
    assert json.loads(capsys.readouterr().out)["channels"][0]["failures"] == 5
    assert (
        cli(tmp_path, "dkim", "keygen", "example.test", "--selector", "s1", "--bits", "1024") == 0
    )
    out = capsys.readouterr().out
    assert 's1._domainkey.example.test. IN TXT ( "v=DKIM1; k=rsa; p=' in out
    assert (tmp_path / "data" / "dkim" / "example.test" / "s1.pem").exists()
    assert (
        cli(tmp_path, "dkim", "keygen", "example.test", "--selector", "s1", "--bits", "1024") == 1
    )
    assert "exists" in capsys.readouterr().err


def test_queue_without_spool(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli(tmp_path, "queue", "list") == 1
    assert "no spool" in capsys.readouterr().err
