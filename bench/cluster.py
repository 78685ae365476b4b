"""Cluster benchmark (issue 15): HAProxy with 1 vs 2 gateways, HAProxy's added latency, and the
Redis gateway state against the embedded one, with real processes on loopback.

(a) throughput: two backends (be1 holds alice, be2 holds bob, LMTP listeners) and two gateways
    (gw1, gw2) forwarding to them over LMTP; two HAProxy instances in front, one balancing to
    gw1 only, one to gw1 and gw2 (PROXY v2, as in etc/cluster). Postfix's ``smtp-source`` sends
    N messages through one of them (half to alice, half to bob, two smtp-source processes),
    one new connection per message. Measured: wall time until every message got its 250
    (accepted/s) and until every message is a file in the backends' Maildirs (delivered/s),
    and the CPU seconds used by the gateways, backends and HAProxy. Rounds alternate 1gw/2gw.
(b) HAProxy's added latency: gw1 also listens without PROXY protocol; one smtplib client sends
    messages one at a time, alternating direct-to-gw1 and through HAProxy (to gw1 only), each a
    new connection: the time from connect to the 250 after DATA, p50/p99.
(c) gateway state: three standalone nodes (local delivery), no rule / a ``rate`` rule with
    ``[state] backend = embedded`` / the same rule with ``backend = redis`` (a private
    redis-server): per-message latency (one smtplib session, messages alternating between the
    nodes, MAIL FROM to the 250 after DATA) and smtp-source throughput.

The machine's load and CPU count are recorded: on a shared 2-CPU machine, 2 gateways cannot
show real scaling. Figures go to bench/results/cluster-<timestamp>.json.

Run: .venv/bin/python bench/cluster.py [--messages 1000] [--rounds 3] [--latency 300]
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import json
import os
import shutil
import smtplib
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(BENCH))

from smtp_inbound import (  # noqa: E402
    SMTP_SOURCE,
    count_delivered,
    machine_cpu,
    machine_info,
    tree_cpu_seconds,
)

from mailgw.testing.redis import RedisServer, redis_path  # noqa: E402
from mailgw.testing.server import MailgwServer, free_port, wait_for_port  # noqa: E402
from tests.integration.cluster_fixture import HAPROXY_CFG, Peer, backend_config  # noqa: E402
from tests.integration.cluster_fixture import Cluster as _Cluster  # noqa: E402
from tests.integration.conftest import provision  # noqa: E402

DOMAIN = "example.test"
SENDER = "bench@client.test"
RATE_RULES = """\
rule bench-rate
    match direction inbound
    match rate 1000000/1h per sender
    action tempfail 450 4.7.1 "Too many messages, slow down"
"""


def pct(values: list[float], p: float) -> float | None:
    """The p-th percentile (nearest rank) of ``values`` in milliseconds, rounded."""
    if not values:
        return None
    s = sorted(values)
    k = max(0, min(len(s) - 1, round(p / 100 * len(s) + 0.5) - 1))
    return round(s[k] * 1000, 2)


def lat_summary(values: list[float]) -> dict[str, Any]:
    return {
        "n": len(values),
        "p50_ms": pct(values, 50),
        "p90_ms": pct(values, 90),
        "p99_ms": pct(values, 99),
        "mean_ms": round(statistics.fmean(values) * 1000, 2) if values else None,
    }


def loadavg() -> float:
    return os.getloadavg()[0]


# -- the cluster ----------------------------------------------------------------------------------


class Bench:
    """be1, be2 (LMTP), gw1, gw2 (PROXY v2 listener for HAProxy + a plain one), HAProxy "1gw"
    (gw1 only) and HAProxy "2gw" (gw1 and gw2)."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.cluster = _Cluster(root)
        self.haproxy: dict[str, int] = {}
        self.direct: dict[str, int] = {}

    def start(self) -> None:
        c, root = self.cluster, self.root
        (root / "shared").mkdir(parents=True, exist_ok=True)
        p = c.ports
        for name in ("be1", "be2"):
            p[f"{name}-lmtp"] = free_port()
        nodes = " ".join(f"{b}=127.0.0.1:{p[f'{b}-lmtp']}" for b in ("be1", "be2"))
        shared = str(root / "shared" / "directory.sqlite")
        for name in ("be1", "be2"):
            cfg = backend_config(c, name, nodes)
            cfg["pop3"] = {"enabled": "no"}
            cfg["imap"] = {"enabled": "no"}
            c.backends[name] = MailgwServer(root / name, cfg)
        for name in ("gw1", "gw2"):
            p[f"{name}-mx"] = free_port()
            self.direct[name] = free_port()
            cfg = {
                "server": {"hostname": f"{name}.example.test"},
                "mx": {
                    "listen": f"haproxy:tcp:{p[f'{name}-mx']}:interface=127.0.0.1"
                    f" tcp:{self.direct[name]}:interface=127.0.0.1"
                },
                "pop3": {"enabled": "no"},
                "imap": {"enabled": "no"},
                "relay": {"enabled": "yes", "retry_schedule": "1s", "scan_interval": "1s"},
                "cluster": {"node_name": name, "mailbox_nodes": nodes, "directory": shared},
            }
            c.gateways[name] = MailgwServer(root / name, cfg)
        gw1 = c.gateways["gw1"]
        gw1.cli("domain", "add", DOMAIN)
        for user, node in (("alice", "be1"), ("bob", "be2")):
            gw1.cli("user", "add", f"{user}@{DOMAIN}", "--password", f"{user} password")
            gw1.cli("user", "node", f"{user}@{DOMAIN}", node)
        for name, server in c.backends.items():
            server.start()
            wait_for_port("127.0.0.1", p[f"{name}-lmtp"], proc=server.proc)
        for server in c.gateways.values():
            server.start()
        for label, gws in (("1gw", ("gw1",)), ("2gw", ("gw1", "gw2"))):
            front = free_port()
            servers = "\n".join(f"    server {g} 127.0.0.1:{p[f'{g}-mx']}" for g in gws)
            cfg_path = root / f"haproxy-{label}.cfg"
            cfg_path.write_text(HAPROXY_CFG.format(front=front, servers=servers))
            peer = Peer(f"haproxy-{label}", ["haproxy", "-db", "-f", str(cfg_path)], root / "h.log")
            peer.start()
            c.peers.append(peer)
            wait_for_port("127.0.0.1", front)
            self.haproxy[label] = front
        time.sleep(1.5)  # HAProxy's first health checks (inter 500ms, rise 2)

    def stop(self) -> None:
        self.cluster.stop()

    def maildirs(self) -> list[Path]:
        b = self.cluster.backends
        return [
            b["be1"].data_dir / "mail" / DOMAIN / "alice",
            b["be2"].data_dir / "mail" / DOMAIN / "bob",
        ]

    def pids(self) -> list[int]:
        c = self.cluster
        procs = [s.proc for s in [*c.gateways.values(), *c.backends.values()]]
        procs += [peer.proc for peer in c.peers]
        return [proc.pid for proc in procs if proc is not None]


def smtp_source(port: int, messages: int, sessions: int, size: int, rcpt: str) -> list[str]:
    return [
        SMTP_SOURCE,
        *("-s", str(sessions), "-m", str(messages), "-l", str(size)),
        *("-M", "client.test", "-f", SENDER, "-t", rcpt),
        f"127.0.0.1:{port}",
    ]


def drive(
    port: int,
    loads: list[tuple[str, int]],
    maildirs: list[Path],
    pids: list[int],
    sessions: int,
    size: int,
    timeout: float,
) -> dict[str, Any]:
    """Run one smtp-source per (recipient, count) in parallel against 127.0.0.1:port; wait
    until every message is in ``maildirs``. Returns the timings and CPU use."""
    total = sum(n for _, n in loads)
    before = sum(count_delivered(m) for m in maildirs)
    cpu0 = [sum(tree_cpu_seconds(pid)) for pid in pids]
    busy0, all0 = machine_cpu()
    load0 = loadavg()
    t0 = time.monotonic()
    procs = [
        subprocess.Popen(
            smtp_source(port, n, max(1, sessions // len(loads)), size, rcpt),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        for rcpt, n in loads
    ]
    res: dict[str, Any] = {"messages": total, "error": ""}
    accept = deliver = None
    delivered = 0
    try:
        while True:
            now = time.monotonic()
            if accept is None and all(p.poll() is not None for p in procs):
                accept = now - t0
                bad = [p for p in procs if p.returncode != 0]
                if bad:
                    err = bad[0].stderr.read()[-1000:] if bad[0].stderr else ""
                    res["error"] = f"smtp-source exited {bad[0].returncode}: {err}"
                    break
            delivered = sum(count_delivered(m) for m in maildirs) - before
            if delivered >= total and accept is not None:
                deliver = time.monotonic() - t0
                break
            if now - t0 > timeout:
                res["error"] = f"timeout: {delivered}/{total} delivered"
                break
            time.sleep(0.02)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
            if p.stderr is not None:
                p.stderr.close()
    busy1, all1 = machine_cpu()
    cpu1 = [sum(tree_cpu_seconds(pid)) for pid in pids]
    cpu = sum(cpu1) - sum(cpu0)
    res.update(
        accept_seconds=None if accept is None else round(accept, 2),
        deliver_seconds=None if deliver is None else round(deliver, 2),
        delivered=delivered,
        accepted_per_s=round(total / accept, 1) if accept else None,
        delivered_per_s=round(total / deliver, 1) if deliver else None,
        cpu_seconds=round(cpu, 2),
        cpu_ms_per_msg=round(cpu * 1000 / total, 2),
        machine_busy_cores=round((busy1 - busy0) / (all1 - all0) * (os.cpu_count() or 1), 2),
        loadavg_before=round(load0, 2),
    )
    res["ok"] = not res["error"] and delivered == total
    return res


def message(i: int, to: str) -> bytes:
    return (
        f"From: <{SENDER}>\r\nTo: <{to}>\r\nSubject: bench {i}\r\n"
        f"Message-ID: <bench-{i}-{time.monotonic_ns()}@client.test>\r\n\r\n" + "x" * 1000 + "\r\n"
    ).encode()


def one_transaction(port: int, rcpt: str, data: bytes) -> float:
    """Connect, EHLO, MAIL, RCPT, DATA: seconds until the 250 after DATA (QUIT not counted)."""
    t0 = time.perf_counter()
    s = smtplib.SMTP("127.0.0.1", port, local_hostname="client.test", timeout=30)
    try:
        s.sendmail(SENDER, [rcpt], data)
        return time.perf_counter() - t0
    finally:
        with contextlib.suppress(smtplib.SMTPException, OSError):
            s.quit()


def haproxy_latency(bench: Bench, count: int) -> dict[str, Any]:
    """Alternate direct-to-gw1 and HAProxy(1gw)-to-gw1, one new connection per message."""
    targets = {"direct": bench.direct["gw1"], "haproxy": bench.haproxy["1gw"]}
    times: dict[str, list[float]] = {k: [] for k in targets}
    rcpt = f"alice@{DOMAIN}"
    for i in range(10):  # warm up both paths
        for port in targets.values():
            one_transaction(port, rcpt, message(i, rcpt))
    for i in range(count):
        order = list(targets.items()) if i % 2 == 0 else list(reversed(targets.items()))
        for name, port in order:
            times[name].append(one_transaction(port, rcpt, message(i, rcpt)))
    out: dict[str, Any] = {name: lat_summary(v) for name, v in times.items()}
    d, h = out["direct"], out["haproxy"]
    out["added_ms"] = {k: round(h[k] - d[k], 2) for k in ("p50_ms", "p90_ms", "p99_ms", "mean_ms")}
    return out


# -- (c) gateway state ----------------------------------------------------------------------------


@contextlib.contextmanager
def state_nodes(root: Path, redis: RedisServer) -> Iterator[dict[str, MailgwServer]]:
    root.mkdir(parents=True, exist_ok=True)
    rules = root / "rules.txt"
    rules.write_text(RATE_RULES)
    common = {"pop3": {"enabled": "no"}, "imap": {"enabled": "no"}}
    variants: dict[str, dict[str, dict[str, str]]] = {
        "no rule": {},
        "embedded": {"policy": {"rules_file": str(rules)}, "state": {"backend": "embedded"}},
        "redis": {
            "policy": {"rules_file": str(rules)},
            "state": {"backend": "redis", "redis": redis.address},
            "cluster": {"node_name": "gw-redis"},
        },
    }
    nodes: dict[str, MailgwServer] = {}
    try:
        for name, over in variants.items():
            node = MailgwServer(root / name.replace(" ", "-"), {**common, **over})
            provision(node)
            nodes[name] = node
            node.start()
        yield nodes
    finally:
        for node in nodes.values():
            node.stop()


def state_latency(nodes: dict[str, MailgwServer], count: int) -> dict[str, Any]:
    """One smtplib session per node; messages alternate between the nodes (rotating order);
    each timing is MAIL FROM to the 250 after DATA."""
    rcpt = f"alice@{DOMAIN}"
    sessions = {
        name: smtplib.SMTP("127.0.0.1", node.ports["mx"], local_hostname="client.test", timeout=30)
        for name, node in nodes.items()
    }
    times: dict[str, list[float]] = {name: [] for name in nodes}
    names = list(nodes)
    try:
        for i in range(count + 10):
            k = i % len(names)
            for name in names[k:] + names[:k]:
                data = message(i, rcpt)
                t0 = time.perf_counter()
                sessions[name].sendmail(SENDER, [rcpt], data)
                if i >= 10:  # the first 10 warm up
                    times[name].append(time.perf_counter() - t0)
    finally:
        for s in sessions.values():
            with contextlib.suppress(smtplib.SMTPException, OSError):
                s.quit()
    return {name: lat_summary(v) for name, v in times.items()}


def redis_commandstats(redis: RedisServer) -> dict[str, int]:
    """Calls per command Redis has processed so far (INFO commandstats)."""
    with socket.create_connection(("127.0.0.1", redis.port), timeout=2) as s:
        s.sendall(b"INFO commandstats\r\nPING\r\n")
        data = b""
        while not data.endswith(b"+PONG\r\n"):
            chunk = s.recv(65536)
            if not chunk:
                break
            data += chunk
    out = {}
    for line in data.decode().splitlines():
        if line.startswith("cmdstat_"):  # cmdstat_incr:calls=12,usec=...
            name, _, fields = line.partition(":")
            calls = fields.split(",")[0].removeprefix("calls=")
            out[name.removeprefix("cmdstat_")] = int(calls)
    return out


# -- main -----------------------------------------------------------------------------------------


def median_of(runs: list[dict[str, Any]], key: str) -> float | None:
    vals = [r[key] for r in runs if r.get("ok") and r.get(key) is not None]
    return round(statistics.median(vals), 2) if vals else None


def ratio(a: float | None, b: float | None) -> float | None:
    return round(a / b, 2) if a and b else None


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--messages", "-n", type=int, default=1000, help="messages per throughput run")
    ap.add_argument("--sessions", "-s", type=int, default=20, help="parallel SMTP sessions")
    ap.add_argument("--size", "-l", type=int, default=2048, help="payload bytes per message")
    ap.add_argument("--rounds", type=int, default=3, help="throughput rounds (alternating)")
    ap.add_argument("--latency", type=int, default=300, help="messages per latency series")
    ap.add_argument("--timeout", type=float, default=300, help="seconds per throughput run")
    ap.add_argument("--skip", choices=("cluster", "state"), action="append", default=[])
    ap.add_argument("--keep", action="store_true", help="keep the temporary directories")
    args = ap.parse_args(argv)
    if not shutil.which("haproxy") or redis_path() is None:
        print("needs haproxy and redis-server", file=sys.stderr)
        return 2

    started = time.monotonic()
    root = Path(tempfile.mkdtemp(prefix="mailgw-bench-cluster-"))
    report: dict[str, Any] = {
        "benchmark": "cluster",
        "timestamp": dt.datetime.now().isoformat(timespec="seconds"),
        "command": " ".join([".venv/bin/python", "bench/cluster.py", *sys.argv[1:]]),
        "params": {k: v for k, v in vars(args).items() if k != "keep"},
        "machine": {**machine_info(None), "loadavg_start": os.getloadavg()},
    }
    ok = True
    try:
        if "cluster" not in args.skip:
            bench = Bench(root / "cluster")
            print("[cluster] starting be1, be2, gw1, gw2, haproxy-1gw, haproxy-2gw", flush=True)
            try:
                bench.start()
                runs: dict[str, list[dict[str, Any]]] = {"1gw": [], "2gw": []}
                half = args.messages // 2
                loads = [(f"alice@{DOMAIN}", half), (f"bob@{DOMAIN}", args.messages - half)]
                drive(  # warm-up through both gateways
                    bench.haproxy["2gw"], [(r, 20) for r, _ in loads], bench.maildirs(),
                    bench.pids(), 4, args.size, args.timeout,
                )  # fmt: skip
                for rnd in range(args.rounds):
                    order = ["1gw", "2gw"] if rnd % 2 == 0 else ["2gw", "1gw"]
                    for label in order:
                        r = drive(
                            bench.haproxy[label], loads, bench.maildirs(), bench.pids(),
                            args.sessions, args.size, args.timeout,
                        )  # fmt: skip
                        r["round"] = rnd + 1
                        runs[label].append(r)
                        ok = ok and r["ok"]
                        print(f"[throughput {label} round {rnd + 1}] {json.dumps(r)}", flush=True)
                summary = {
                    label: {
                        k: median_of(rs, k)
                        for k in ("accepted_per_s", "delivered_per_s", "cpu_ms_per_msg")
                    }
                    for label, rs in runs.items()
                }
                one, two = summary["1gw"], summary["2gw"]
                scaling = {k: ratio(two[k], one[k]) for k in ("accepted_per_s", "delivered_per_s")}
                report["throughput"] = {"runs": runs, "median": summary, "scaling_2gw_1gw": scaling}
                print(f"[throughput] medians {json.dumps(summary)} scaling {scaling}", flush=True)
                print(f"[latency] {args.latency} transactions direct vs HAProxy", flush=True)
                lat = haproxy_latency(bench, args.latency)
                report["haproxy_latency"] = lat
                print(f"[latency] {json.dumps(lat)}", flush=True)
            finally:
                bench.stop()
        if "state" not in args.skip:
            redis = RedisServer(root / "redis")
            redis.start()
            try:
                with state_nodes(root / "state", redis) as nodes:
                    print("[state] latency: no rule / embedded / redis", flush=True)
                    stats0 = redis_commandstats(redis)
                    lat = state_latency(nodes, args.latency)
                    stats1 = redis_commandstats(redis)
                    sent = args.latency + 10
                    per_msg = {
                        cmd: round((n - stats0.get(cmd, 0)) / sent, 2)
                        for cmd, n in stats1.items()
                        if n > stats0.get(cmd, 0) and cmd not in ("info", "ping")
                    }
                    lat["redis_commands_per_msg"] = per_msg
                    print(f"[state latency] {json.dumps(lat)}", flush=True)
                    thr: dict[str, list[dict[str, Any]]] = {name: [] for name in nodes}
                    names = list(nodes)
                    for rnd in range(args.rounds):  # rotating order
                        for name in names[rnd % 3 :] + names[: rnd % 3]:
                            node = nodes[name]
                            proc = node.proc
                            pids = [proc.pid] if proc is not None else []
                            if name == "redis" and redis.proc is not None:
                                pids.append(redis.proc.pid)
                            maildir = node.data_dir / "mail" / DOMAIN / "alice"
                            r = drive(
                                node.ports["mx"], [(f"alice@{DOMAIN}", args.messages)], [maildir],
                                pids, args.sessions, args.size, args.timeout,
                            )  # fmt: skip
                            ok = ok and r["ok"]
                            r["round"] = rnd + 1
                            thr[name].append(r)
                            print(f"[state throughput {name}] {json.dumps(r)}", flush=True)
                    state_median = {
                        name: {
                            k: median_of(rs, k)
                            for k in ("accepted_per_s", "delivered_per_s", "cpu_ms_per_msg")
                        }
                        for name, rs in thr.items()
                    }
                    print(f"[state throughput] medians {json.dumps(state_median)}", flush=True)
                    report["state"] = {
                        "latency": lat,
                        "throughput": {"runs": thr, "median": state_median},
                    }
                    rate_keys = redis.call("KEYS", "mailgw:rate:*")
                    report["state"]["redis_rate_keys_seen"] = SENDER.encode() in rate_keys
            finally:
                redis.stop()
    finally:
        if args.keep:
            print(f"data kept in {root}")
        else:
            shutil.rmtree(root, ignore_errors=True)

    report["machine"]["loadavg_end"] = os.getloadavg()
    report["wall_seconds"] = round(time.monotonic() - started, 1)
    out_dir = BENCH / "results"
    out_dir.mkdir(exist_ok=True)
    out = out_dir / f"cluster-{dt.datetime.now().strftime('%Y%m%d-%H%M%S')}.json"
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"\nwall {report['wall_seconds']} s; results written to {out.relative_to(REPO)}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
