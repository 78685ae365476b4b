"""Outbound relay benchmark: mailgw vs a private Postfix, N queued messages to the same smtp-sink.

For each server in turn (never both at once, each on a fresh data directory and a fresh
``smtp-sink`` on 127.0.0.1), N messages of about SIZE bytes for ``rcpt@sink.test`` are queued
first, then released, and the relay sends them to the sink:

- **mailgw**: the spool is filled offline in the ``outbound`` state (what local delivery's
  hand-over leaves; files written with the spool's own API, flushed with one ``sync``), then
  ``twistd -n mailgw`` starts with ``[relay] enabled = yes`` and one smarthost channel
  pointing at the sink (concurrency 20, like Postfix's default per destination).
- **Postfix**: ``smtp-source`` injects N messages over SMTP, each put on hold
  (``check_client_access static:HOLD``); then ``postsuper -H ALL`` + ``postqueue -f`` release
  them to the ``relayhost = [127.0.0.1]:SINK``.

The sink's running counters (``smtp-sink -c``) give the time of the first and of the Nth
message. The rate is (N-1) / (last - first); the time from the release (mailgw: process
start) to the Nth message is reported too. The server's CPU (process tree, including reaped
children) is measured between the first and the last message. The figures are printed and
written as JSON to bench/results/relay_outbound-<timestamp>.json.

Run: .venv/bin/python bench/relay_outbound.py [--messages 10000] [--rounds 3]
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(BENCH))

from peers import PostfixRelayPeer  # noqa: E402
from smtp_inbound import (  # noqa: E402
    ProfiledMailgw,
    machine_cpu,
    machine_info,
    print_profile,
    tree_cpu_seconds,
)

from mailgw.model import Envelope  # noqa: E402
from mailgw.spool import Spool  # noqa: E402
from mailgw.testing.server import MailgwServer, free_port, wait_for_port  # noqa: E402

SMTP_SINK = "/usr/sbin/smtp-sink"
SMTP_SOURCE = "/usr/sbin/smtp-source"
SENDER = "bench@client.test"
RCPT = "rcpt@sink.test"
CONCURRENCY = 20  # Postfix's default_destination_concurrency_limit


@dataclass
class RunResult:
    """What one server did with one queue."""

    server: str
    round: int
    messages: int
    size: int
    ok: bool = False
    error: str = ""
    queue_seconds: float | None = None  # filling the queue (not measured against anything)
    first_seconds: float | None = None  # release -> first message at the sink
    total_seconds: float | None = None  # release -> Nth message at the sink
    send_seconds: float | None = None  # first -> Nth message at the sink
    msgs_per_s: float | None = None  # (N-1) / send_seconds
    msgs_per_s_from_release: float | None = None  # N / total_seconds
    received: int = 0
    sink_sessions: int = 0
    server_cpu_user: float | None = None
    server_cpu_system: float | None = None
    server_cpu_seconds: float | None = None
    machine_busy_cores: float | None = None
    notes: list[str] = field(default_factory=list)


# -- the sink -------------------------------------------------------------------------------------


class Sink:
    """``smtp-sink -c`` on 127.0.0.1:port; a thread reads its counters (``sess=S quit=Q
    mesg=M``, one update per ``\\r``) and notes when the first and the Nth message came."""

    def __init__(self, expect: int) -> None:
        self.expect = expect
        self.port = free_port()
        self.messages = 0
        self.sessions = 0
        self.first_at: float | None = None
        self.all_at: float | None = None
        self.proc: subprocess.Popen[bytes] | None = None
        self._reader: threading.Thread | None = None

    def start(self) -> None:
        cmd = [SMTP_SINK, "-c"]
        if os.geteuid() == 0:
            cmd += ["-u", "nobody"]
        cmd += [f"127.0.0.1:{self.port}", "256"]
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        self._reader = threading.Thread(target=self._read, args=(self.proc,), daemon=True)
        self._reader.start()
        wait_for_port("127.0.0.1", self.port, timeout=10, proc=self.proc)

    def _read(self, proc: subprocess.Popen[bytes]) -> None:
        assert proc.stdout is not None
        fd = proc.stdout.fileno()
        rest = b""
        with contextlib.suppress(OSError, ValueError):
            for chunk in iter(lambda: os.read(fd, 65536), b""):
                now = time.monotonic()
                *updates, rest = (rest + chunk).split(b"\r")
                for update in updates:
                    fields = dict(
                        kv.split(b"=", 1) for kv in update.split() if b"=" in kv
                    )  # the connect probe of wait_for_port counts as a session
                    try:
                        self.sessions = int(fields.get(b"sess", b"0"))
                        mesg = int(fields.get(b"mesg", b"0"))
                    except ValueError:
                        continue
                    if mesg and self.first_at is None:
                        self.first_at = now
                    self.messages = max(self.messages, mesg)
                    if self.messages >= self.expect and self.all_at is None:
                        self.all_at = now

    def stop(self) -> None:
        proc, self.proc = self.proc, None
        if proc is None:
            return
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        if self._reader is not None:
            self._reader.join(2)
        if proc.stdout is not None:
            proc.stdout.close()


# -- measuring ------------------------------------------------------------------------------------


def wait_sink(sink: Sink, pid_of: object, res: RunResult, t_release: float, timeout: float) -> None:
    """Poll until the sink has N messages (or timeout); CPU of the server's process tree and
    of the machine from the first to the last message. ``pid_of()`` gives the server's PID."""
    deadline = t_release + timeout
    cpu0: tuple[float, float] | None = None
    busy0 = total0 = 0.0
    pid = pid_of()  # type: ignore[operator]
    while sink.all_at is None:
        if sink.first_at is not None and cpu0 is None:
            cpu0 = tree_cpu_seconds(pid)
            busy0, total0 = machine_cpu()
        if time.monotonic() > deadline:
            res.error = f"timeout after {timeout:.0f}s: {sink.messages}/{res.messages} at the sink"
            break
        if sink.proc is not None and sink.proc.poll() is not None:
            res.error = f"smtp-sink exited with {sink.proc.returncode}"
            break
        time.sleep(0.01)
    if cpu0 is not None and sink.all_at is not None:
        cpu1 = tree_cpu_seconds(pid)
        busy1, total1 = machine_cpu()
        res.server_cpu_user = round(cpu1[0] - cpu0[0], 2)
        res.server_cpu_system = round(cpu1[1] - cpu0[1], 2)
        res.server_cpu_seconds = round(res.server_cpu_user + res.server_cpu_system, 2)
        if total1 > total0:
            res.machine_busy_cores = round(
                (busy1 - busy0) / (total1 - total0) * (os.cpu_count() or 1), 2
            )
    time.sleep(1.0)  # anything sent twice would show up now
    res.received = sink.messages
    if sink.first_at is not None:
        res.first_seconds = round(sink.first_at - t_release, 3)
    if sink.all_at is not None and sink.first_at is not None:
        res.total_seconds = round(sink.all_at - t_release, 3)
        res.send_seconds = round(sink.all_at - sink.first_at, 3)
        if res.send_seconds > 0:
            res.msgs_per_s = round((res.messages - 1) / res.send_seconds, 1)
        res.msgs_per_s_from_release = round(res.messages / res.total_seconds, 1)
    if res.received > res.messages:
        res.notes.append(f"{res.received - res.messages} extra messages at the sink")
    res.ok = not res.error and res.received == res.messages


def sink_sessions(sink: Sink, res: RunResult) -> None:
    """SMTP sessions the sink saw, once the server stopped (a session counts when it ends;
    the readiness probe is not counted)."""
    time.sleep(0.5)
    res.sink_sessions = max(0, sink.sessions - 1)


def message_bytes(i: int, size: int) -> bytes:
    """A plain message of about ``size`` bytes (headers plus 64-byte lines)."""
    head = (
        f"From: <{SENDER}>\r\nTo: <{RCPT}>\r\nSubject: relay bench {i}\r\n"
        f"Message-ID: <bench-{i}@client.test>\r\nDate: Sat, 28 Nov 2026 12:00:00 +0000\r\n\r\n"
    ).encode()
    line = b"La de da de da 1. La de da de da 2. La de da de da 3. La de 4.\r\n"  # 64 bytes
    body = line * max(1, (size - len(head)) // len(line))
    return head + body


@contextlib.contextmanager
def _no_fsync() -> object:
    """Filling the queue is setup, not the measured run: skip the per-file fsyncs, then one
    ``sync`` makes everything durable before the server starts."""
    real = os.fsync
    os.fsync = lambda fd: None  # type: ignore[assignment]
    try:
        yield
    finally:
        os.fsync = real
        os.sync()


def fill_mailgw_spool(root: Path, n: int, size: int) -> None:
    """N messages in ``outbound``, as local delivery's hand-over leaves them."""
    with _no_fsync():  # type: ignore[attr-defined]
        spool = Spool(str(root), hostname="mx.example.test")
        now = time.time()
        for i in range(n):
            data = message_bytes(i, size)
            incoming = spool.begin()
            incoming.write(data)
            result: list[str] = []
            incoming.commit(
                Envelope(
                    sender=SENDER,
                    recipients=[RCPT],
                    received_at=now,
                    client_address="127.0.0.1",
                    client_helo="client.test",
                    size=len(data),
                )
            ).addCallback(result.append)
            spool.move(result[0], "outbound", False, "incoming")
        spool.close()


# -- the two servers ------------------------------------------------------------------------------


class RelayMailgw(ProfiledMailgw):
    """ProfiledMailgw (drains stdout, optional cProfile) with config overrides."""

    def __init__(
        self, workdir: Path, profile: Path | None, overrides: dict[str, dict[str, str]]
    ) -> None:
        MailgwServer.__init__(self, workdir, overrides)
        self.profile_path = profile
        self.output = bytearray()
        self._drain = None


def run_mailgw(args: argparse.Namespace, workdir: Path, res: RunResult) -> None:
    sink = Sink(args.messages)
    overrides = {
        "relay": {
            "enabled": "yes",
            "per_domain_concurrency": str(CONCURRENCY),
            "status_interval": "1m",
        },
        "channel:sink": {
            "kind": "smarthost",
            "hosts": "",  # set below, once the sink has its port
            "tls": "none",
            "concurrency": str(CONCURRENCY),
        },
    }
    sink.start()
    server: RelayMailgw | None = None
    try:
        overrides["channel:sink"]["hosts"] = f"127.0.0.1:{sink.port}"
        server = RelayMailgw(workdir, args.profile, overrides)
        t = time.monotonic()
        fill_mailgw_spool(server.data_dir / "spool", args.messages, args.size)
        res.queue_seconds = round(time.monotonic() - t, 2)
        print(f"[mailgw] {args.messages} messages queued in {res.queue_seconds}s", flush=True)
        t_release = time.monotonic()
        server.start(wait=False)
        assert server.proc is not None
        proc = server.proc
        wait_sink(sink, lambda: proc.pid, res, t_release, args.timeout)
        if not res.ok:
            res.notes.append("log tail: " + server.log()[-1500:])
    finally:
        if server is not None:
            rc = server.stop()
            if rc not in (None, 0, -15):
                res.notes.append(f"mailgw exited with {rc}")
        sink_sessions(sink, res)
        sink.stop()
    left = list((workdir / "data" / "spool" / "outbound").iterdir()) + list(
        (workdir / "data" / "spool" / "retry").iterdir()
    )
    if left:
        res.notes.append(f"{len(left)} envelopes left in outbound/retry")


def run_postfix(args: argparse.Namespace, workdir: Path, res: RunResult) -> None:
    sink = Sink(args.messages)
    sink.start()
    peer = PostfixRelayPeer(workdir, free_port(), f"[127.0.0.1]:{sink.port}")
    try:
        peer.start()
        t = time.monotonic()
        inject = subprocess.run(
            [
                SMTP_SOURCE,
                "-s",
                "20",
                "-d",
                "-m",
                str(args.messages),
                "-l",
                str(args.size),
                "-M",
                "client.test",
                "-f",
                SENDER,
                "-t",
                RCPT,
                f"127.0.0.1:{peer.port}",
            ],
            capture_output=True,
            text=True,
            timeout=args.timeout,
        )
        if inject.returncode != 0:
            raise RuntimeError(f"smtp-source exited {inject.returncode}: {inject.stderr[-1000:]}")
        deadline = time.monotonic() + 60
        while peer.count_queue("hold") < args.messages:
            if time.monotonic() > deadline:
                raise RuntimeError(
                    f"only {peer.count_queue('hold')} of {args.messages} on hold{peer.log_tail()}"
                )
            time.sleep(0.05)
        res.queue_seconds = round(time.monotonic() - t, 2)
        print(f"[postfix] {args.messages} messages on hold in {res.queue_seconds}s", flush=True)
        if sink.messages:
            raise RuntimeError(f"{sink.messages} messages reached the sink before the release")
        pid = peer.master_pid()
        if pid is None:
            raise RuntimeError(f"postfix master PID not found{peer.log_tail()}")
        t_release = time.monotonic()
        peer.release()
        wait_sink(sink, lambda: pid, res, t_release, args.timeout)
        if not res.ok:
            res.notes.append(peer.log_tail(1500))
    finally:
        peer.stop()
        sink_sessions(sink, res)
        sink.stop()


def run_one(name: str, args: argparse.Namespace, root: Path, rnd: int) -> RunResult:
    res = RunResult(server=name, round=rnd, messages=args.messages, size=args.size)
    workdir = root / f"{name}-{rnd}"
    print(f"[{name}] round {rnd}: fresh data dir {workdir}", flush=True)
    try:
        (run_mailgw if name == "mailgw" else run_postfix)(args, workdir, res)
    except Exception as exc:  # report and carry on with the other server
        res.error = res.error or f"{type(exc).__name__}: {exc}"
    print(
        f"[{name}] {'ok' if res.ok else 'FAILED: ' + res.error}: {res.msgs_per_s} msgs/s"
        f" ({res.send_seconds}s first->last, {res.total_seconds}s from release,"
        f" {res.sink_sessions} sessions)",
        flush=True,
    )
    if not args.keep:
        shutil.rmtree(workdir, ignore_errors=True)
    return res


# -- reporting ------------------------------------------------------------------------------------


def median(values: list[float | None]) -> float | None:
    vals = [v for v in values if v is not None]
    return round(statistics.median(vals), 2) if vals else None


def summarize(results: list[RunResult]) -> dict[str, dict[str, float | None]]:
    out: dict[str, dict[str, float | None]] = {}
    for name in dict.fromkeys(r.server for r in results):
        rs = [r for r in results if r.server == name and r.ok]
        out[name] = {
            "rounds_ok": len(rs),
            "msgs_per_s": median([r.msgs_per_s for r in rs]),
            "msgs_per_s_from_release": median([r.msgs_per_s_from_release for r in rs]),
            "server_cpu_ms_per_msg": median(
                [r.server_cpu_seconds * 1000 / r.messages for r in rs if r.server_cpu_seconds]
            ),
            "sink_sessions": median([float(r.sink_sessions) for r in rs]),
        }
    return out


def print_table(results: list[RunResult], ratios: dict[str, float | None]) -> None:
    head = (
        f"{'server':<8} {'rnd':>3} {'msgs':>6} {'queue s':>8} {'first s':>8} {'send s':>8}"
        f" {'msgs/s':>8} {'total s':>8} {'/s total':>9} {'sessions':>8}"
        f" {'CPU usr+sys s':>14} {'busy':>5} ok"
    )
    print()
    print(head)
    print("-" * len(head))

    def f(v: object, w: int) -> str:
        return f"{'-' if v is None else v:>{w}}"

    for r in results:
        cpu = f"{r.server_cpu_user}+{r.server_cpu_system}" if r.server_cpu_seconds else None
        print(
            f"{r.server:<8} {r.round:>3} {r.messages:>6} {f(r.queue_seconds, 8)}"
            f" {f(r.first_seconds, 8)} {f(r.send_seconds, 8)} {f(r.msgs_per_s, 8)}"
            f" {f(r.total_seconds, 8)} {f(r.msgs_per_s_from_release, 9)}"
            f" {f(r.sink_sessions, 8)} {f(cpu, 14)} {f(r.machine_busy_cores, 5)}"
            f" {'yes' if r.ok else 'NO'}"
        )
    print()
    for k, v in ratios.items():
        print(f"{k}: {'-' if v is None else v}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--messages", "-n", type=int, default=10000, help="messages per server")
    ap.add_argument("--size", "-l", type=int, default=4096, help="bytes per message")
    ap.add_argument("--rounds", type=int, default=3, help="postfix+mailgw rounds (medians)")
    ap.add_argument(
        "--only", choices=("both", "mailgw", "postfix"), default="both", help="servers to run"
    )
    ap.add_argument("--timeout", type=float, default=600, help="seconds per server and round")
    ap.add_argument(
        "--profile", type=Path, default=None, help="run mailgw under cProfile, stats to this file"
    )
    ap.add_argument("--base-dir", default=None, help="parent of the data dirs (default $TMPDIR)")
    ap.add_argument("--keep", action="store_true", help="keep the data directories")
    args = ap.parse_args(argv)
    if args.profile is not None:
        args.profile = args.profile.resolve()

    root = Path(tempfile.mkdtemp(prefix="mailgw-relaybench-", dir=args.base_dir))
    root.chmod(0o755)  # Postfix's daemons must traverse it
    names = ["postfix", "mailgw"] if args.only == "both" else [args.only]
    results: list[RunResult] = []
    started = time.monotonic()
    try:
        for rnd in range(1, args.rounds + 1):
            for name in names:  # one after the other, never at the same time
                results.append(run_one(name, args, root, rnd))
    finally:
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)
        else:
            print(f"data kept in {root}")

    summary = summarize(results)
    ratios: dict[str, float | None] = {}
    if "mailgw" in summary and "postfix" in summary:
        m, p = summary["mailgw"], summary["postfix"]
        for key in ("msgs_per_s", "msgs_per_s_from_release", "server_cpu_ms_per_msg"):
            ratios[f"{key} mailgw/postfix"] = (
                round(m[key] / p[key], 2) if m[key] and p[key] else None
            )
    print_table(results, ratios)
    print("medians:", json.dumps(summary))
    for r in results:
        for note in r.notes:
            print(f"note [{r.server} {r.round}]: {note}")

    stamp = dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    out_dir = BENCH / "results"
    out_dir.mkdir(exist_ok=True)
    out = out_dir / f"relay_outbound-{stamp}.json"
    report = {
        "benchmark": "relay_outbound",
        "timestamp": dt.datetime.now().isoformat(timespec="seconds"),
        "command": " ".join([".venv/bin/python", "bench/relay_outbound.py", *sys.argv[1:]]),
        "params": {
            "messages": args.messages,
            "size": args.size,
            "rounds": args.rounds,
            "concurrency": CONCURRENCY,
            "base_dir": args.base_dir or tempfile.gettempdir(),
        },
        "machine": machine_info(args.base_dir),
        "wall_seconds": round(time.monotonic() - started, 1),
        "results": [asdict(r) for r in results],
        "summary": summary,
        "ratios": ratios,
    }
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"\nresults written to {out.relative_to(REPO)}")
    if args.profile is not None and "mailgw" in summary:
        print_profile(args.profile, 30)
    return 0 if results and all(r.ok for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
