"""Small parts of replication: the sync barrier, the handshake proofs, the config checks,
the state file, the primary's choice between streaming and a full resync."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from twisted.internet import defer
from twisted.internet.task import Clock

from mailgw.config import ConfigError, load
from mailgw.journal.barrier import ReplicaBarrier, acked_path, read_acked, write_acked
from mailgw.replication import ship, state, wire
from mailgw.replication.service import parse_peer


def test_barrier_fires_when_acknowledged(tmp_path: Path) -> None:
    (tmp_path / "replication").mkdir()
    clock = Clock()
    barrier = ReplicaBarrier(str(tmp_path), clock, 2.0)
    write_acked(acked_path(str(tmp_path)), 5, "sync")
    assert barrier.wait(5).result is True  # already there
    waiting = barrier.wait(7)
    results: list[bool] = []
    waiting.addCallback(results.append)
    clock.advance(0.5)
    assert results == []
    write_acked(acked_path(str(tmp_path)), 7, "sync")
    clock.advance(0.02)
    assert results == [True]


def test_barrier_gives_up_after_the_timeout_or_at_once_in_async(tmp_path: Path) -> None:
    (tmp_path / "replication").mkdir()
    clock = Clock()
    barrier = ReplicaBarrier(str(tmp_path), clock, 1.0)
    write_acked(acked_path(str(tmp_path)), 1, "sync")
    results: list[bool] = []
    barrier.wait(9).addCallback(results.append)
    clock.pump([0.1] * 11)
    assert results == [False]
    write_acked(acked_path(str(tmp_path)), 1, "async")  # fallen back: nobody waits
    assert barrier.wait(9).result is False


def test_barrier_without_a_file_does_not_wait(tmp_path: Path) -> None:
    assert read_acked(str(tmp_path / "nothing")) == (0, "async")
    assert ReplicaBarrier(str(tmp_path), Clock(), 5).wait(3).result is False


def test_proofs_bind_secret_side_nonces_and_certificate() -> None:
    a, b = wire.new_nonce(), wire.new_nonce()
    base = wire.proof(b"s" * 16, "replica", a, b, "AA:BB")
    assert wire.check(base, wire.proof(b"s" * 16, "replica", a, b, "AA:BB"))
    for other in (
        wire.proof(b"t" * 16, "replica", a, b, "AA:BB"),
        wire.proof(b"s" * 16, "primary", a, b, "AA:BB"),
        wire.proof(b"s" * 16, "replica", b, a, "AA:BB"),
        wire.proof(b"s" * 16, "replica", a, b, "CC:DD"),
    ):
        assert not wire.check(base, other)


def test_secret_file_must_be_long_enough(tmp_path: Path) -> None:
    short = tmp_path / "short"
    short.write_text("tooshort\n")
    with pytest.raises(ValueError, match="16 bytes"):
        wire.read_secret(str(short))
    good = tmp_path / "good"
    good.write_text("  sixteen bytes or more  \n")
    assert wire.read_secret(str(good)) == b"sixteen bytes or more"


def test_pieces_cover_the_data() -> None:
    data = bytes(range(256)) * 600
    parts = wire.pieces(data)
    assert b"".join(parts) == data and max(map(len, parts)) <= wire.CHUNK
    assert wire.pieces(b"") == [b""]


def _config(tmp_path: Path, text: str) -> str:
    path = tmp_path / "mailgw.ini"
    path.write_text(f"[server]\ndata_dir = {tmp_path}/data\n" + text)
    return str(path)


def test_config_checks(tmp_path: Path, selfsigned: tuple[Path, Path]) -> None:
    (tmp_path / "secret").write_text("a secret of sixteen bytes\n")
    on = "[replication]\nenabled = yes\nsecret_file = secret\n"
    config = load(_config(tmp_path, on + "mode = sync\nsync_timeout = 500ms\n"))
    assert config.replication.mode == "sync" and config.replication.sync_timeout == 0.5
    assert config.replication.secret_file == str(tmp_path / "secret")
    with pytest.raises(ConfigError, match="role: a replica needs"):
        load(_config(tmp_path, on + "role = replica\n"))
    tls = f"[tls]\ncertificate = {selfsigned[0]}\nprivate_key = {selfsigned[1]}\n"
    assert load(_config(tmp_path, tls + on + "role = replica\n")).replication.role == "replica"
    with pytest.raises(ConfigError, match="secret_file: no such file"):
        load(_config(tmp_path, "[replication]\nenabled = yes\nsecret_file = nope\n"))
    with pytest.raises(ConfigError, match="peer"):
        load(_config(tmp_path, on + "peer = nowhere\n"))
    with pytest.raises(ConfigError, match="mode"):
        load(_config(tmp_path, on + "mode = eventually\n"))
    assert not load(_config(tmp_path, "")).replication.enabled  # off by default


def test_peer_parsing() -> None:
    assert parse_peer("10.0.0.2:8873") == ("10.0.0.2", 8873)
    assert parse_peer("[::1]:8873") == ("::1", 8873)
    for bad in ("host", "host:0", ":1", "host:x"):
        with pytest.raises(ValueError):
            parse_peer(bad)


def test_state_file(tmp_path: Path) -> None:
    data = str(tmp_path)
    assert state.effective_role(data, "replica") == "replica"
    state.write_state(data, "fenced")
    assert state.read_state(data) == "fenced"
    assert state.effective_role(data, "primary") == "fenced"
    with pytest.raises(ValueError):
        state.write_state(data, "boss")
    Path(state.state_path(data)).write_text("garbage\n")
    assert state.read_state(data) is None


def test_the_store_refuses_writes_by_the_state_file(tmp_path: Path) -> None:
    from mailgw.store import MessageStore

    store = MessageStore(str(tmp_path / "mail"), lambda u: None)
    assert store.write_refusal() is None
    state.write_state(str(tmp_path), "replica")
    assert "read-only replica" in (store.write_refusal() or "")
    state.write_state(str(tmp_path), "fenced")
    assert "demoted" in (store.write_refusal() or "")
    state.write_state(str(tmp_path), "primary")  # promoted
    assert store.write_refusal() is None
    store.close()


class _Reader:
    def __init__(self, oldest: int) -> None:
        self.oldest = oldest

    def oldest_available(self) -> int:
        return self.oldest


def _handshake(
    monkeypatch: pytest.MonkeyPatch, applied: int, oldest: int
) -> tuple[list[str], list[int]]:
    """Run the primary's handshake against a replica standing at ``applied`` with a journal
    complete from ``oldest``: (what it did, where it started shipping)."""
    did: list[str] = []
    started: list[int] = []

    def run(f: Callable[..., Any], *args: Any) -> defer.Deferred[Any]:
        return defer.succeed(f(*args))

    monkeypatch.setattr(ship, "authenticate", lambda *a, **kw: defer.succeed({"applied": applied}))
    proto = ship.ShipperProtocol(
        _Reader(oldest),  # type: ignore[arg-type]
        b"s" * 32,
        run,
        4,
        SimpleNamespace(connected=False, error="", acked=0),
        Clock(),
    )

    def resync() -> defer.Deferred[int]:
        did.append("resync")
        return defer.succeed(99)

    monkeypatch.setattr(proto, "_resync", resync)
    monkeypatch.setattr(proto, "_pump", lambda position: started.append(position))
    proto.handshakeCompleted()
    return did, started


def test_a_replica_within_the_journal_is_streamed_to(monkeypatch: pytest.MonkeyPatch) -> None:
    assert _handshake(monkeypatch, 10, 11) == ([], [10])  # entry 11 is still there
    assert _handshake(monkeypatch, 0, 1) == ([], [0])  # a new replica, nothing pruned


def test_a_replica_below_the_journal_gets_a_full_resync(monkeypatch: pytest.MonkeyPatch) -> None:
    assert _handshake(monkeypatch, 10, 12) == (["resync"], [99])  # entry 11 pruned
    assert _handshake(monkeypatch, 0, 5) == (["resync"], [99])


def test_a_replica_asking_for_a_resync_gets_one(monkeypatch: pytest.MonkeyPatch) -> None:
    assert _handshake(monkeypatch, wire.RESYNC, 1) == (["resync"], [99])
