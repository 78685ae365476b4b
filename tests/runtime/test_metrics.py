"""The process metrics and their snapshots: what a worker sends, how the main process adds
them up, keeps a dead worker's figures, and rejects what is not a snapshot; and the places
that feed them (connection counter, auth guard, spool commit, IMAP commands)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.parser import text_string_to_metric_families
from twisted.cred.error import UnauthorizedLogin
from twisted.internet.task import Clock

from mailgw.directory.penalty import local_auth_guard
from mailgw.model import Envelope
from mailgw.net.limits import ConnectionCounter, Refusal
from mailgw.runtime import metrics
from mailgw.runtime.metrics import PROCESS, WorkerFigures, add, families, merged, snapshot, valid
from mailgw.spool import Spool
from mailgw.testing.fakes import FakeDirectory
from tests.imap.imap_env import Env


def sample(name: str, **labels: str) -> float:
    return PROCESS.get_sample_value(name, labels) or 0.0


def small_registry() -> tuple[CollectorRegistry, Counter, Histogram]:
    registry = CollectorRegistry()
    counter = Counter("t_things", "Things.", ["kind"], registry=registry)
    histogram = Histogram("t_seconds", "Time.", ["kind"], buckets=(0.1, 1.0), registry=registry)
    return registry, counter, histogram


def test_a_snapshot_is_compact_cumulative_json() -> None:
    registry, counter, histogram = small_registry()
    counter.labels("a").inc(2)
    histogram.labels("a").observe(0.05)
    histogram.labels("a").observe(0.5)
    snap = json.loads(json.dumps(snapshot(registry)))
    assert snap == {
        "t_things": [[{"kind": "a"}, 2.0]],
        "t_seconds": [[{"kind": "a"}, [1.0, 2.0, 2.0], 0.55]],
    }
    assert valid(snap)


def test_add_sums_by_labels_and_skips_histograms_of_another_shape() -> None:
    one = {"c": [[{"k": "a"}, 1.0]], "h": [[{"k": "a"}, [1.0, 2.0], 0.5]]}
    two = {
        "c": [[{"k": "a"}, 2.0], [{"k": "b"}, 5.0]],
        "h": [[{"k": "a"}, [0.0, 1.0], 2.0], [{"k": "a"}, [9.0], 9.0]],
    }
    total = add(one, two)
    assert total["c"] == [[{"k": "a"}, 3.0], [{"k": "b"}, 5.0]]
    assert total["h"] == [[{"k": "a"}, [1.0, 3.0], 2.5]]
    assert one == {"c": [[{"k": "a"}, 1.0]], "h": [[{"k": "a"}, [1.0, 2.0], 0.5]]}  # unchanged


@pytest.mark.parametrize(
    "bad",
    [
        [],
        {"c": {}},
        {"c": [["labels", 1]]},
        {"c": [[{}, "1"]]},
        {"c": [[{}, True]]},
        {"c": [[{}, float("nan")]]},
        {"h": [[{}, 1.0, 2.0]]},
        {"h": [[{}, [1.0, "x"], 2.0]]},
        {"h": [[{}]]},
        {1: []},
    ],
)
def test_what_is_not_a_snapshot(bad: object) -> None:
    assert not valid(bad)


def test_families_use_the_definitions_help_and_buckets() -> None:
    registry, counter, histogram = small_registry()
    counter.labels("x")  # a series at 0, so the family is known with its samples
    histogram.labels("x")
    snap = {
        "t_things": [[{"kind": "x"}, 4.0]],
        "t_seconds": [[{"kind": "x"}, [1.0, 3.0, 4.0], 2.0]],
    }
    out = CollectorRegistry()

    class Replay:
        def collect(self):  # type: ignore[no-untyped-def]
            return families(snap, registry)

    out.register(Replay())
    parsed = {f.name: f for f in text_string_to_metric_families(generate_latest(out).decode())}
    assert parsed["t_things"].documentation == "Things."
    assert [(s.name, s.value) for s in parsed["t_things"].samples] == [("t_things_total", 4.0)]
    buckets = [(s.labels["le"], s.value) for s in parsed["t_seconds"].samples if "le" in s.labels]
    assert buckets == [("0.1", 1.0), ("1.0", 3.0), ("+Inf", 4.0)]
    count = [s.value for s in parsed["t_seconds"].samples if s.name == "t_seconds_count"]
    assert count == [4.0]


def test_worker_figures_keep_what_ended_workers_counted() -> None:
    figures = WorkerFigures()
    figures.update("w1", {"c": [[{}, 2.0]]})
    figures.update("w2", {"c": [[{}, 3.0]]})
    figures.update("w1", {"c": [[{}, 4.0]]})  # cumulative: replaces w1's last
    assert figures.total() == {"c": [[{}, 7.0]]}
    figures.retire("w1")
    figures.retire("never seen")
    figures.update("w1 again", {"c": [[{}, 1.0]]})
    assert figures.total() == {"c": [[{}, 8.0]]}


def test_merged_adds_workers_to_this_process() -> None:
    before = sample("mailgw_imap_commands_total", command="NOOP")
    worker = {"mailgw_imap_commands": [[{"command": "NOOP"}, 5.0]]}
    out = {f.name: f for f in merged([worker, worker])}
    values = {tuple(s.labels.items()): s.value for s in out["mailgw_imap_commands"].samples}
    assert values[(("command", "NOOP"),)] == before + 10
    assert "mailgw_spool_commit_duration_seconds" in out  # every definition, series or not


def test_the_connection_counter_counts_admitted_and_refused_by_protocol() -> None:
    counter = ConnectionCounter(1, 5, protocol="pop3")
    admitted = sample("mailgw_connections_total", protocol="pop3")
    refused = sample("mailgw_connections_refused_total", protocol="pop3", reason="per_ip")
    assert counter.admit("10.0.0.1") is None
    assert counter.admit("10.0.0.1") is Refusal.PER_IP
    assert sample("mailgw_connections_total", protocol="pop3") == admitted + 1
    assert (
        sample("mailgw_connections_refused_total", protocol="pop3", reason="per_ip") == refused + 1
    )
    quiet = ConnectionCounter(1)  # no protocol: not counted
    assert quiet.admit("10.0.0.2") is None
    assert sample("mailgw_connections_total", protocol="pop3") == admitted + 1


def test_the_auth_guard_counts_failures_by_protocol() -> None:
    clock = Clock()
    guard = local_auth_guard(FakeDirectory({"a@x.test": "pw"}), clock, 0.0)
    before = sample("mailgw_auth_failures_total", protocol="submission")
    results: list[object] = []
    guard.check_password("a@x.test", "wrong", "10.0.0.1", protocol="submission").addErrback(
        results.append
    )
    guard.check_password("a@x.test", "pw", "10.0.0.1", protocol="submission").addCallback(
        results.append
    )
    guard.check_password("a@x.test", "wrong", "10.0.0.1").addErrback(results.append)  # no label
    assert len(results) == 3
    assert results[0].check(UnauthorizedLogin)  # type: ignore[attr-defined]
    assert sample("mailgw_auth_failures_total", protocol="submission") == before + 1


def test_a_spool_commit_is_timed(tmp_path: Path) -> None:
    spool = Spool(str(tmp_path / "spool"), hostname="mx.test")
    before = sample("mailgw_spool_commit_duration_seconds_count")
    message = spool.begin()
    message.write(b"Subject: x\r\n\r\nbody\r\n")
    done: list[str] = []
    message.commit(Envelope("a@x.test", ["b@y.test"])).addCallback(done.append)
    assert done
    assert sample("mailgw_spool_commit_duration_seconds_count") == before + 1
    assert sample("mailgw_spool_commit_duration_seconds_sum") > 0


def test_imap_commands_are_counted_when_they_answer(tmp_path: Path) -> None:
    env = Env(tmp_path)
    noop = sample("mailgw_imap_commands_total", command="NOOP")
    login = sample("mailgw_imap_commands_total", command="LOGIN")
    timed = sample("mailgw_imap_command_duration_seconds_count", command="NOOP")
    bogus = sum(
        s.value
        for f in PROCESS.collect()
        for s in f.samples
        if f.name == "mailgw_imap_commands" and s.labels.get("command") == "BOGUS"
    )
    c = env.connect()
    assert b"a1 OK" in c.cmd("LOGIN alice@example.test secret")
    assert b"a2 OK" in c.cmd("NOOP")
    assert b"BAD" in c.cmd("BOGUS")  # unknown names are not counted (bounded labels)
    assert sample("mailgw_imap_commands_total", command="NOOP") == noop + 1
    assert sample("mailgw_imap_commands_total", command="LOGIN") == login + 1
    assert sample("mailgw_imap_command_duration_seconds_count", command="NOOP") == timed + 1
    assert bogus == 0
    # A failed login answers only after the delay (on the clock): counted then, not before.
    failed = env.connect()
    failed.send(b"f LOGIN alice@example.test wrong\r\n")
    assert sample("mailgw_imap_commands_total", command="LOGIN") == login + 1
    env.clock.advance(10)
    assert b"f NO" in failed.take()
    assert sample("mailgw_imap_commands_total", command="LOGIN") == login + 2


def test_metric_names_and_help() -> None:
    for family in metrics.PROCESS.collect():
        assert family.name.startswith("mailgw_")
        assert family.documentation


def test_idle_and_sasl_continuations_are_timed_to_their_tagged_answer(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import base64

    from mailgw.imap import session as session_module

    now = [1000.0]
    monkeypatch.setattr(session_module.time, "perf_counter", lambda: now[0])
    env = Env(tmp_path)
    idle_count = sample("mailgw_imap_commands_total", command="IDLE")
    idle_sum = sample("mailgw_imap_command_duration_seconds_sum", command="IDLE")
    c = env.connect(login="alice@example.test")
    assert c.send(b"i IDLE\r\n").startswith(b"+ ")
    now[0] += 42.0
    assert sample("mailgw_imap_commands_total", command="IDLE") == idle_count  # still idling
    assert b"i OK" in c.send(b"DONE\r\n")
    assert sample("mailgw_imap_commands_total", command="IDLE") == idle_count + 1
    assert sample("mailgw_imap_command_duration_seconds_sum", command="IDLE") == idle_sum + 42.0

    auth_count = sample("mailgw_imap_commands_total", command="AUTHENTICATE")
    a = env.connect()
    assert a.send(b"x AUTHENTICATE PLAIN\r\n") == b"+ \r\n"
    assert sample("mailgw_imap_commands_total", command="AUTHENTICATE") == auth_count
    token = base64.b64encode(b"\0alice@example.test\0secret")
    assert b"x OK" in a.send(token + b"\r\n")
    assert sample("mailgw_imap_commands_total", command="AUTHENTICATE") == auth_count + 1
