"""Replication benchmark: lag under load, catch-up after an outage, SMTP cost of async / sync.

Two real ``twistd mailgw`` nodes on 127.0.0.1 (a primary shipping to a replica over TLS with a
shared secret, as in tests/integration/test_replication.py), fresh data directories per part.

(a) **Lag** (async mode). A paced smtplib load of ``--rate`` msg/s for ``--seconds`` s over
    ``--connections`` parallel SMTP sessions to the primary; each message has a unique
    Subject, and the client notes the wall-clock time its 250 (after DATA) arrived. On the
    replica's side, a poller thread reads the replica's index of the user's INBOX
    (``mailgw-index.sqlite``, read-only SQLite, the database the applier writes each entry
    into in one transaction with its sequence number) every ``--poll-ms`` ms and notes, for
    each UID, the first time it is there: the moment the message is applied (committed) on
    the replica. After the run an IMAP FETCH on the primary maps Subject → UID (the replica
    keeps the primary's UIDs). Lag of a message = replica time − 250 time. The resolution is
    the poll interval plus the poller's scheduling on a loaded machine; both clocks are the
    same host's ``time.time()``.
(b) **Catch-up**. The replica is stopped, the same paced load runs for ``--outage-seconds``
    (the primary keeps accepting: async), the replica is started again; timed: from the
    restart to the first newly applied message (reconnect backoff, TLS, handshake), and from
    then until every message is applied on the replica. Catch-up rate = messages applied /
    the second span.
(c) **SMTP throughput**. Postfix's ``smtp-source`` (as bench/smtp_inbound.py: ``--messages``
    messages, ``--sessions`` parallel sessions, ``--size`` bytes, one message per connection)
    against one node without replication, a pair in async mode and a pair in sync mode
    (250 only after the replica applied the message). Accepted msgs/s = messages / wall time
    of smtp-source.

It prints a table and writes the figures as JSON to bench/results/replication-<timestamp>.json.

Run: .venv/bin/python bench/replication.py [--seconds 30] [--rate 200] [--outage-seconds 20]
     [--messages 2000] [--only lag,catchup,throughput]
The issue's full outage: --outage-seconds 600 (120,000 messages at 200 msg/s).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import imaplib
import json
import shutil
import smtplib
import sqlite3
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import asdict
from pathlib import Path
from typing import Any

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(BENCH))

from smtp_inbound import RunResult, drive, machine_info  # noqa: E402

from mailgw.cli.certs import make_selfsigned  # noqa: E402
from mailgw.store.index import INDEX_NAME  # noqa: E402
from mailgw.testing.server import MailgwServer, free_port  # noqa: E402

DOMAIN = "bench.test"
LOCAL = "alice"
RCPT = f"{LOCAL}@{DOMAIN}"
PASSWORD = "bench-password-1"
SENDER = "bench@client.test"
SECRET = "replication bench secret 0123456789"
WARMUP = 3.0


# -- the nodes ------------------------------------------------------------------------------------


class Pair:
    """A replica and a primary shipping to it (``mode`` async or sync), in ``root``."""

    def __init__(self, root: Path, mode: str) -> None:
        root.mkdir(parents=True, exist_ok=True)
        cert, key = make_selfsigned("localhost")
        (root / "cert.pem").write_bytes(cert)
        (root / "key.pem").write_bytes(key)
        (root / "replication.secret").write_text(SECRET + "\n")
        port = free_port()
        common = {
            "enabled": "yes",
            "mode": mode,
            "secret_file": str(root / "replication.secret"),
        }
        tls = {"certificate": str(root / "cert.pem"), "private_key": str(root / "key.pem")}
        self.replica = MailgwServer(
            root / "replica",
            {
                "tls": tls,
                "replication": {
                    **common,
                    "role": "replica",
                    "listen": f"tcp:{port}:interface=127.0.0.1",
                    "peer": f"127.0.0.1:{free_port()}",
                },
            },
        )
        self.primary = MailgwServer(
            root / "primary",
            {
                "tls": tls,
                "replication": {
                    **common,
                    "role": "primary",
                    "peer": f"127.0.0.1:{port}",
                    "listen": f"tcp:{free_port()}:interface=127.0.0.1",
                },
            },
        )

    def start(self) -> None:
        self.replica.start()
        provision(self.primary)
        self.primary.start()
        wait(lambda: self.status()["connected"], 60, "the primary connected to the replica")
        time.sleep(WARMUP)  # both nodes' IMAP worker processes finish starting

    def verify(self) -> int:
        """``mailgw dr verify`` once the primary has no unacknowledged entry; its exit code."""
        wait(
            lambda: (s := self.status())["connected"] and s["lag_entries"] == 0,
            120,
            "the replica acknowledged every journal entry",
        )
        result = self.primary.cli("dr", "verify", check=False)
        if result.returncode:
            print(result.stdout[-2000:] + result.stderr[-2000:], file=sys.stderr)
        return result.returncode

    def status(self) -> dict[str, Any]:
        return dict(json.loads(self.primary.cli("dr", "status", "--json").stdout))

    def stop(self) -> None:
        self.primary.stop()
        self.replica.stop()

    @property
    def replica_index(self) -> Path:
        return self.replica.data_dir / "mail" / DOMAIN / LOCAL / INDEX_NAME


def provision(server: MailgwServer) -> None:
    server.cli("domain", "add", DOMAIN)
    server.cli("user", "add", RCPT, "--password", PASSWORD)


def wait(predicate: Any, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out waiting for {what}")
        time.sleep(0.1)


@contextlib.contextmanager
def started(pair: Pair) -> Iterator[Pair]:
    try:
        pair.start()
        yield pair
    finally:
        pair.stop()


# -- load and observation -------------------------------------------------------------------------


def paced_load(
    port: int, rate: float, seconds: float, connections: int, tag: str
) -> dict[str, Any]:
    """Send ``rate`` msg/s for ``seconds`` over ``connections`` sessions; Subject → 250 time.

    Message k is due at start + k / rate; a session that falls behind sends at once (no
    catching up by bursts beyond what the server accepts)."""
    total = int(rate * seconds)
    acked: dict[str, float] = {}
    errors: list[str] = []
    start = time.monotonic() + 0.2
    lock = threading.Lock()

    def worker(first: int) -> None:
        try:
            smtp = smtplib.SMTP("127.0.0.1", port, timeout=60)
            smtp.ehlo("client.test")
            for k in range(first, total, connections):
                delay = start + k / rate - time.monotonic()
                if delay > 0:
                    time.sleep(delay)
                subject = f"{tag} {k}"
                body = (
                    f"From: {SENDER}\r\nTo: {RCPT}\r\nSubject: {subject}\r\n"
                    f"Message-ID: <{tag}.{k}@client.test>\r\n\r\n" + "x" * 1000 + "\r\n"
                )
                smtp.sendmail(SENDER, [RCPT], body.encode())
                now = time.time()
                with lock:
                    acked[subject] = now
            smtp.quit()
        except Exception as exc:  # a failed session is reported, not hidden
            errors.append(f"{type(exc).__name__}: {exc}")

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(connections)]
    t0 = time.monotonic()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    elapsed = time.monotonic() - t0 - 0.2
    return {
        "sent": total,
        "acked": acked,
        "errors": errors,
        "seconds": elapsed,
        "achieved_rate": len(acked) / elapsed if elapsed > 0 else 0.0,
    }


class ReplicaWatcher(threading.Thread):
    """Polls the replica's INBOX index: the first time each UID is there (wall clock)."""

    def __init__(self, index: Path, poll: float) -> None:
        super().__init__(daemon=True)
        self.index = index
        self.poll = poll
        self.seen: dict[int, float] = {}
        self.low = 0  # every UID <= low has been seen (or never existed)
        self.halt = threading.Event()
        self.polls = 0

    def run(self) -> None:
        db: sqlite3.Connection | None = None
        while not self.halt.is_set():
            try:
                if db is None:
                    if not self.index.exists():
                        time.sleep(self.poll)
                        continue
                    db = sqlite3.connect(f"file:{self.index}?mode=ro", uri=True, timeout=5)
                rows = db.execute(
                    "SELECT m.uid FROM messages m JOIN mailboxes b ON b.id = m.mailbox"
                    " WHERE b.name = 'INBOX' AND m.uid > ?",
                    (self.low,),
                ).fetchall()
                now = time.time()
                for (uid,) in rows:
                    self.seen.setdefault(uid, now)
                while self.low + 1 in self.seen:
                    self.low += 1
                self.polls += 1
            except sqlite3.Error:
                if db is not None:
                    db.close()
                db = None
            time.sleep(self.poll)
        if db is not None:
            db.close()

    def stop(self) -> None:
        self.halt.set()
        self.join()


def subjects_to_uids(server: MailgwServer) -> dict[str, int]:
    """Subject → UID of every message in the user's INBOX on ``server`` (IMAP FETCH)."""
    c = imaplib.IMAP4("127.0.0.1", server.ports["imap"], timeout=120)
    try:
        c.login(RCPT, PASSWORD)
        c.select("INBOX", readonly=True)
        typ, data = c.uid("FETCH", "1:*", "(UID BODY.PEEK[HEADER.FIELDS (SUBJECT)])")
        out: dict[str, int] = {}
        for part in data:
            if isinstance(part, tuple):
                uid = int(part[0].split(b"UID ", 1)[1].split()[0])
                subject = part[1].decode().split(":", 1)[1].strip()
                out[subject] = uid
        return out
    finally:
        c.logout()


def percentile(values: list[float], p: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(p / 100 * len(ordered) + 0.5) - 1))]


# -- the three parts ------------------------------------------------------------------------------


def run_lag(root: Path, args: argparse.Namespace) -> dict[str, Any]:
    with started(Pair(root / "lag", "async")) as pair:
        watcher = ReplicaWatcher(pair.replica_index, args.poll_ms / 1000)
        watcher.start()
        load = paced_load(
            pair.primary.ports["mx"], args.rate, args.seconds, args.connections, "lag"
        )
        acked: dict[str, float] = load["acked"]
        uids = subjects_to_uids(pair.primary)
        wait(
            lambda: all(uids[s] in watcher.seen for s in acked if s in uids),
            120,
            "the replica applied every message",
        )
        watcher.stop()
        timed = sorted((t, watcher.seen[uids[s]] - t) for s, t in acked.items() if s in uids)
        lags = [lag for _, lag in timed]
        # p50 per third of the run, in the order of the 250s: a lag that keeps growing means
        # the replica does not keep up with the rate (a stable one: it does, with that delay).
        n = len(timed)
        thirds = [[lag for _, lag in timed[i * n // 3 : (i + 1) * n // 3]] for i in range(3)]
        verify = pair.verify()
    return {
        "rate_target": args.rate,
        "rate_achieved": round(load["achieved_rate"], 1),
        "seconds": round(load["seconds"], 1),
        "messages": len(acked),
        "session_errors": load["errors"],
        "poll_ms": args.poll_ms,
        "lag_ms_p50": round(percentile(lags, 50) * 1000, 1),
        "lag_ms_p99": round(percentile(lags, 99) * 1000, 1),
        "lag_ms_max": round(max(lags) * 1000, 1),
        "lag_ms_mean": round(statistics.fmean(lags) * 1000, 1),
        "lag_ms_p50_by_third": [round(percentile(t, 50) * 1000, 1) for t in thirds if t],
        "dr_verify_rc": verify,
    }


def run_catchup(root: Path, args: argparse.Namespace) -> dict[str, Any]:
    with started(Pair(root / "catchup", "async")) as pair:
        pair.replica.stop()
        load = paced_load(
            pair.primary.ports["mx"], args.rate, args.outage_seconds, args.connections, "out"
        )
        count = len(load["acked"])
        watcher = ReplicaWatcher(pair.replica_index, args.poll_ms / 1000)
        t_restart = time.time()
        pair.replica.start()
        watcher.start()
        wait(lambda: len(watcher.seen) >= count, max(300, count / 10), "the replica caught up")
        watcher.stop()
        first = min(watcher.seen.values())
        last = max(watcher.seen.values())
        verify = pair.verify()
    span = last - first
    return {
        "outage_seconds": round(load["seconds"], 1),
        "messages": count,
        "session_errors": load["errors"],
        "restart_to_first_applied_s": round(first - t_restart, 2),
        "first_to_last_applied_s": round(span, 2),
        "restart_to_caught_up_s": round(last - t_restart, 2),
        "catchup_msgs_per_s": round(count / span, 1) if span > 0 else None,
        "dr_verify_rc": verify,
    }


def run_throughput(root: Path, args: argparse.Namespace, mode: str) -> dict[str, Any]:
    res = RunResult(
        server=f"mailgw {mode}", messages=args.messages, sessions=args.sessions, size=args.size
    )
    pair: Pair | None = None
    if mode == "off":
        server = MailgwServer(root / f"tp-{mode}")
        provision(server)
        server.start()
        time.sleep(WARMUP)
    else:
        pair = Pair(root / f"tp-{mode}", mode)
        pair.start()
        server = pair.primary
    try:
        assert server.proc is not None
        maildir = server.data_dir / "mail" / DOMAIN / LOCAL
        drive(server.ports["mx"], maildir, server.proc.pid, res, args.timeout, False)
        out = asdict(res)
        if pair is not None:
            s = pair.status()
            out["sync_fallbacks"] = s["sync_fallbacks"]
            out["mode_after"] = s["mode"]
    finally:
        if pair is not None:
            pair.stop()
        else:
            server.stop()
    return out


# -- main -----------------------------------------------------------------------------------------


def ratio(a: float | None, b: float | None) -> float | None:
    return round(a / b, 2) if a and b else None


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--rate", type=float, default=200, help="msg/s of the paced load (a, b)")
    ap.add_argument("--seconds", type=float, default=30, help="length of the lag run (a)")
    ap.add_argument("--connections", type=int, default=8, help="SMTP sessions of the paced load")
    ap.add_argument("--poll-ms", type=float, default=5, help="replica index poll interval")
    ap.add_argument(
        "--outage-seconds", type=float, default=20, help="replica down while loading (b); 600"
    )
    ap.add_argument("--messages", type=int, default=2000, help="smtp-source messages (c)")
    ap.add_argument("--sessions", type=int, default=20, help="smtp-source sessions (c)")
    ap.add_argument("--size", type=int, default=4096, help="smtp-source payload bytes (c)")
    ap.add_argument("--timeout", type=float, default=300, help="seconds per throughput run")
    ap.add_argument(
        "--only", default="lag,catchup,throughput", help="comma list: lag, catchup, throughput"
    )
    ap.add_argument("--base-dir", default=None, help="parent of the data directories")
    ap.add_argument("--keep", action="store_true", help="keep the temporary data directories")
    args = ap.parse_args(argv)
    parts = set(args.only.split(","))
    root = Path(tempfile.mkdtemp(prefix="mailgw-bench-repl-", dir=args.base_dir))
    results: dict[str, Any] = {}
    t0 = time.monotonic()
    try:
        if "lag" in parts:
            results["lag"] = run_lag(root, args)
        if "catchup" in parts:
            results["catchup"] = run_catchup(root, args)
        if "throughput" in parts:
            results["throughput"] = {
                m: run_throughput(root, args, m) for m in ("off", "async", "sync")
            }
    finally:
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)
    ok = True
    if "lag" in results:
        r = results["lag"]
        ok &= r["dr_verify_rc"] == 0 and not r["session_errors"]
        print(f"\n(a) lag, async, target {r['rate_target']:.0f} msg/s for {args.seconds:.0f} s")
        print(
            f"  achieved {r['rate_achieved']} msg/s, {r['messages']} messages, poll {r['poll_ms']} ms"
        )
        print(
            f"  lag ms: p50 {r['lag_ms_p50']}  p99 {r['lag_ms_p99']}  max {r['lag_ms_max']}"
            f"  mean {r['lag_ms_mean']}   dr verify rc {r['dr_verify_rc']}"
        )
        print(f"  p50 ms by third of the run: {r['lag_ms_p50_by_third']}")
    if "catchup" in results:
        r = results["catchup"]
        ok &= r["dr_verify_rc"] == 0 and not r["session_errors"]
        print(f"\n(b) catch-up after a {r['outage_seconds']} s outage ({r['messages']} messages)")
        print(
            f"  restart → first applied {r['restart_to_first_applied_s']} s;"
            f" first → last applied {r['first_to_last_applied_s']} s;"
            f" restart → caught up {r['restart_to_caught_up_s']} s"
        )
        print(f"  catch-up rate {r['catchup_msgs_per_s']} msg/s   dr verify rc {r['dr_verify_rc']}")
    if "throughput" in results:
        tp = results["throughput"]
        print(
            f"\n(c) SMTP throughput, smtp-source -m {args.messages} -s {args.sessions}"
            f" -l {args.size}"
        )
        print(
            f"  {'replication':12} {'accepted/s':>10} {'accept s':>9} {'server CPU s':>12}"
            f" {'busy cores':>10}  notes"
        )
        for mode, r in tp.items():
            ok &= bool(r["ok"])
            note = r["error"] or ""
            if "sync_fallbacks" in r:
                note += f" mode after: {r['mode_after']}, sync fallbacks {r['sync_fallbacks']}"
            print(
                f"  {mode:12} {r['accepted_per_s'] or '-':>10} {r['accept_seconds'] or 0:>9.2f}"
                f" {r['server_cpu_seconds'] or 0:>12} {r['machine_busy_cores'] or 0:>10}  {note}"
            )
        off, asy, syn = (tp[m]["accepted_per_s"] for m in ("off", "async", "sync"))
        results["ratios"] = {
            "async/off": ratio(asy, off),
            "sync/off": ratio(syn, off),
            "sync/async": ratio(syn, asy),
        }
        print("  ratios: " + "  ".join(f"{k} {v}" for k, v in results["ratios"].items()))
    print(f"\ntotal {time.monotonic() - t0:.0f} s")
    out_dir = BENCH / "results"
    out_dir.mkdir(exist_ok=True)
    stamp = dt.datetime.now(dt.UTC).strftime("%Y%m%dT%H%M%SZ")
    out = out_dir / f"replication-{stamp}.json"
    with open("/proc/loadavg") as f:
        load = f.read().split()[:3]
    payload = {
        "when": stamp,
        "args": vars(args),
        "machine": {**machine_info(args.base_dir), "loadavg_after": load},
        **results,
    }
    out.write_text(json.dumps(payload, indent=2, default=str))
    print(f"results written to {out.relative_to(REPO)}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
