"""Inbound SMTP benchmark: mailgw vs a private Postfix, same load (smtp-source), same run.

For each server in turn (never both at once, each on a fresh data directory) it sends N messages
of SIZE bytes over S parallel sessions with Postfix's ``smtp-source`` to 127.0.0.1, and measures
the wall time until smtp-source exits (all messages accepted: 250 after DATA) and until all N
messages are files in the recipient's Maildir (new/ + cur/). It prints a table and writes the
figures as JSON to bench/results/smtp_inbound-<timestamp>.json.

Run: .venv/bin/python bench/smtp_inbound.py [--messages N] [--sessions 20] [--size 4096]
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import json
import os
import platform
import pstats
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(BENCH))

from peers import PostfixPeer, postfix_version  # noqa: E402

from mailgw.testing.server import MailgwServer, free_port, wait_for_port  # noqa: E402

SMTP_SOURCE = "/usr/sbin/smtp-source"
DOMAIN = "bench.test"
LOCAL = "alice"
RCPT = f"{LOCAL}@{DOMAIN}"
SENDER = "bench@client.test"
CLK_TCK = os.sysconf("SC_CLK_TCK")


@dataclass
class RunResult:
    """What one server did with one load."""

    server: str
    messages: int
    sessions: int
    size: int
    ok: bool = False
    error: str = ""
    smtp_source_rc: int | None = None
    accept_seconds: float | None = None
    deliver_seconds: float | None = None
    delivered: int = 0
    accepted_per_s: float | None = None
    delivered_per_s: float | None = None
    round: int = 1
    server_cpu_seconds: float | None = None
    server_cpu_user: float | None = None
    server_cpu_system: float | None = None
    machine_busy_cores: float | None = None
    sample_message_bytes: int | None = None
    notes: list[str] = field(default_factory=list)


# -- measuring ------------------------------------------------------------------------------------


def count_delivered(maildir: Path) -> int:
    """Messages in a Maildir's INBOX: files in new/ plus cur/ (tmp/ is not delivered)."""
    n = 0
    for sub in ("new", "cur"):
        with contextlib.suppress(FileNotFoundError):
            n += len(os.listdir(maildir / sub))
    return n


def machine_cpu() -> tuple[float, float]:
    """(busy, total) jiffies of all CPUs from /proc/stat; busy excludes idle and iowait."""
    with open("/proc/stat") as f:
        fields = [int(x) for x in f.readline().split()[1:]]
    total = float(sum(fields[:8]))
    return total - fields[3] - fields[4], total


def _proc_stat(pid: int) -> list[str] | None:
    try:
        with open(f"/proc/{pid}/stat") as f:
            data = f.read()
    except OSError:
        return None
    return data[data.rindex(")") + 2 :].split()  # fields from 3 (state) on


def tree_cpu_seconds(root: int) -> tuple[float, float]:
    """(user, system) CPU seconds of ``root`` and its descendants: its own, plus reaped
    children's (cutime, cstime), plus live descendants'. For Postfix's master this covers the smtpd,
    cleanup, qmgr and virtual processes, including those that already exited."""
    parents: dict[int, int] = {}
    stats: dict[int, list[str]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        st = _proc_stat(int(entry))
        if st is not None:
            parents[int(entry)] = int(st[1])
            stats[int(entry)] = st
    tree = {root}
    changed = True
    while changed:
        changed = False
        for pid, ppid in parents.items():
            if ppid in tree and pid not in tree:
                tree.add(pid)
                changed = True
    user = system = 0
    for pid in tree:
        st = stats.get(pid)
        if st is not None:  # utime stime cutime cstime are fields 14-17
            user += int(st[11]) + int(st[13])
            system += int(st[12]) + int(st[14])
    return user / CLK_TCK, system / CLK_TCK


def drive(
    port: int,
    maildir: Path,
    server_pid: int,
    res: RunResult,
    timeout: float,
    keep_sessions: bool,
) -> None:
    """Run smtp-source against 127.0.0.1:port and fill ``res`` with timings."""
    cmd = [
        SMTP_SOURCE,
        "-s",
        str(res.sessions),
        "-m",
        str(res.messages),
        "-l",
        str(res.size),
        "-M",
        "client.test",
        "-f",
        SENDER,
        "-t",
        RCPT,
    ]
    if keep_sessions:
        cmd.append("-d")
    cmd.append(f"127.0.0.1:{port}")
    before = count_delivered(maildir)
    if before:
        res.notes.append(f"{before} messages already in the Maildir before the run")
    cpu0 = tree_cpu_seconds(server_pid)
    busy0, total0 = machine_cpu()
    t0 = time.monotonic()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = t0 + timeout
    delivered = before
    try:
        while True:
            now = time.monotonic()
            if res.accept_seconds is None and proc.poll() is not None:
                res.accept_seconds = now - t0
                res.smtp_source_rc = proc.returncode
                if proc.returncode != 0:
                    res.error = (
                        f"smtp-source exited {proc.returncode}: {proc.stderr.read()[-2000:]}"  # type: ignore[union-attr]
                    )
                    break
            delivered = count_delivered(maildir) - before
            if delivered >= res.messages:
                res.deliver_seconds = time.monotonic() - t0
                if res.accept_seconds is None:  # delivery can only end after acceptance
                    proc.wait(timeout)
                    res.accept_seconds = res.deliver_seconds
                    res.smtp_source_rc = proc.returncode
                break
            if now > deadline:
                res.error = f"timeout after {timeout:.0f}s: {delivered}/{res.messages} delivered"
                break
            time.sleep(0.01)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        if proc.stderr is not None:
            proc.stderr.close()
    busy1, total1 = machine_cpu()
    cpu1 = tree_cpu_seconds(server_pid)
    res.server_cpu_user = round(cpu1[0] - cpu0[0], 2)
    res.server_cpu_system = round(cpu1[1] - cpu0[1], 2)
    res.server_cpu_seconds = round(res.server_cpu_user + res.server_cpu_system, 2)
    res.machine_busy_cores = round((busy1 - busy0) / (total1 - total0) * (os.cpu_count() or 1), 2)
    time.sleep(0.5)  # let stragglers land, then check nothing was delivered twice
    res.delivered = count_delivered(maildir) - before
    if res.delivered > res.messages:
        res.notes.append(f"{res.delivered - res.messages} extra messages in the Maildir")
    if res.accept_seconds:
        res.accepted_per_s = round(res.messages / res.accept_seconds, 1)
    if res.deliver_seconds:
        res.delivered_per_s = round(res.messages / res.deliver_seconds, 1)
    res.ok = not res.error and res.smtp_source_rc == 0 and res.delivered == res.messages
    new = maildir / "new"
    if new.is_dir():
        names = sorted(os.listdir(new))
        if names:
            sample = (new / names[0]).read_bytes()
            res.sample_message_bytes = len(sample)
            if b"Received:" not in sample or len(sample) < res.size:
                res.notes.append("sample message lacks a Received header or the payload")


# -- the two servers ------------------------------------------------------------------------------


class ProfiledMailgw(MailgwServer):
    """MailgwServer started under twistd's cProfile (stats written at a clean stop)."""

    def __init__(self, workdir: Path, profile_path: Path | None, tracking: bool = True) -> None:
        super().__init__(workdir, None if tracking else {"tracking": {"record": "no"}})
        self.profile_path = profile_path
        self.output = bytearray()
        self._drain: threading.Thread | None = None

    def start(self, wait: bool = True) -> None:
        prof = []
        if self.profile_path is not None:
            prof = [f"--profile={self.profile_path}", "--profiler=cprofile", "--savestats"]
        # twistd (not ``python -m twisted``, which is the ``twist`` runner without --pidfile or
        # --profile), run through the interpreter so the venv's packages are used.
        cmd = [
            sys.executable,
            "-c",
            "from twisted.scripts.twistd import run; run()",
            "--pidfile=",
            "--nodaemon",
            f"--logfile={self.log_path}",
            *prof,
            "mailgw",
            "--config",
            str(self.config_path),
        ]
        self.proc = subprocess.Popen(
            cmd, cwd=REPO, env=self.env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT
        )
        # Drain stdout so a chatty server never blocks on a full pipe.
        self._drain = threading.Thread(target=self._read_output, args=(self.proc,), daemon=True)
        self._drain.start()
        if wait:
            wait_for_port(self.host, self.ports["mx"], timeout=60, proc=self.proc)

    def _read_output(self, proc: subprocess.Popen[bytes]) -> None:
        if proc.stdout is None:
            return
        fd = proc.stdout.fileno()
        with contextlib.suppress(ValueError, OSError):
            for chunk in iter(lambda: os.read(fd, 65536), b""):
                self.output += chunk

    def stop(self, timeout: float = 60.0) -> int | None:
        proc = self.proc
        if proc is not None and proc.poll() is None:
            proc.terminate()
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout)
        if self._drain is not None:
            self._drain.join(2)
        return super().stop(timeout)


@contextlib.contextmanager
def mailgw_server(
    workdir: Path, profile: Path | None, tracking: bool = True
) -> Iterator[tuple[int, Path, int]]:
    server = ProfiledMailgw(workdir, profile, tracking)
    try:
        server.cli("domain", "add", DOMAIN)
        server.cli("user", "add", RCPT, "--password", "bench-password-1")
        try:
            server.start()
        except Exception as exc:
            raise RuntimeError(
                f"mailgw did not start: {exc}\n{server.output.decode(errors='replace')[-3000:]}"
                f"\n{server.log()[-3000:]}"
            ) from exc
        assert server.proc is not None
        yield server.ports["mx"], server.data_dir / "mail" / DOMAIN / LOCAL, server.proc.pid
    finally:
        rc = server.stop()
        if rc not in (None, 0, -15):  # twistd re-raises the SIGTERM it stopped on
            print(f"mailgw exited with {rc}; log tail:\n{server.log()[-2000:]}", file=sys.stderr)


@contextlib.contextmanager
def postfix_server(workdir: Path) -> Iterator[tuple[int, Path, int]]:
    peer = PostfixPeer(workdir, free_port(), DOMAIN, [LOCAL])
    try:
        peer.start()
        pid = peer.master_pid()
        if pid is None:
            raise RuntimeError(f"postfix master PID not found{peer.log_tail()}")
        yield peer.port, peer.maildir(LOCAL), pid
    finally:
        peer.stop()


def run_one(name: str, args: argparse.Namespace, root: Path, rnd: int) -> RunResult:
    res = RunResult(
        server=name, messages=args.messages, sessions=args.sessions, size=args.size, round=rnd
    )
    workdir = root / f"{name}-{rnd}"
    tracking = args.tracking == "on"
    cm = (
        mailgw_server(workdir, args.profile, tracking)
        if name == "mailgw"
        else postfix_server(workdir)
    )
    print(f"[{name}] starting on a fresh data dir {workdir}", flush=True)
    try:
        with cm as (port, maildir, pid):
            print(
                f"[{name}] pid {pid} on 127.0.0.1:{port}; sending {args.messages} messages",
                flush=True,
            )
            drive(port, maildir, pid, res, args.timeout, args.keep_sessions)
    except Exception as exc:  # report the failure and carry on with the other server
        res.error = res.error or f"{type(exc).__name__}: {exc}"
    status = "ok" if res.ok else f"FAILED: {res.error}"
    print(f"[{name}] {status}", flush=True)
    if not args.keep:
        shutil.rmtree(workdir, ignore_errors=True)
    return res


# -- reporting ------------------------------------------------------------------------------------


def machine_info(base_dir: str | None) -> dict[str, object]:
    model = ""
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    import twisted

    fs = subprocess.run(
        ["stat", "-f", "-c", "%T", base_dir or tempfile.gettempdir()],
        capture_output=True,
        text=True,
    ).stdout.strip()
    return {
        "nproc": os.cpu_count(),
        "cpu_model": model,
        "kernel": platform.release(),
        "python": platform.python_version(),
        "twisted": twisted.__version__,
        "postfix": postfix_version(),
        "data_filesystem": fs,
    }


def ratio(a: float | None, b: float | None) -> float | None:
    return round(a / b, 2) if a and b else None


def fmt(v: object, width: int) -> str:
    return f"{'-' if v is None else v:>{width}}"


def median(values: list[float | None]) -> float | None:
    vals = [v for v in values if v is not None]
    return round(statistics.median(vals), 2) if vals else None


def summarize(results: list[RunResult]) -> dict[str, dict[str, float | None]]:
    """Per server: medians over the successful rounds."""
    out: dict[str, dict[str, float | None]] = {}
    for name in dict.fromkeys(r.server for r in results):
        rs = [r for r in results if r.server == name and r.ok]
        out[name] = {
            "rounds_ok": len(rs),
            "accepted_per_s": median([r.accepted_per_s for r in rs]),
            "delivered_per_s": median([r.delivered_per_s for r in rs]),
            "server_cpu_seconds": median([r.server_cpu_seconds for r in rs]),
            "server_cpu_ms_per_msg": median(
                [r.server_cpu_seconds * 1000 / r.messages for r in rs if r.server_cpu_seconds]
            ),
        }
    return out


def print_table(results: list[RunResult], ratios: dict[str, float | None]) -> None:
    head = f"{'server':<8} {'rnd':>3} {'msgs':>6} {'accept s':>9} {'accepted/s':>11}"
    head += f" {'deliver s':>10} {'delivered/s':>12} {'CPU usr+sys s':>14} {'busy cores':>11} ok"
    print()
    print(head)
    print("-" * len(head))
    for r in results:
        acc = None if r.accept_seconds is None else round(r.accept_seconds, 2)
        dl = None if r.deliver_seconds is None else round(r.deliver_seconds, 2)
        cpu = f"{r.server_cpu_user}+{r.server_cpu_system}" if r.server_cpu_seconds else None
        print(
            f"{r.server:<8} {r.round:>3} {r.messages:>6} {fmt(acc, 9)} {fmt(r.accepted_per_s, 11)}"
            f" {fmt(dl, 10)} {fmt(r.delivered_per_s, 12)} {fmt(cpu, 14)}"
            f" {fmt(r.machine_busy_cores, 11)} {'yes' if r.ok else 'NO'}"
        )
    print()
    for k, v in ratios.items():
        print(f"{k}: {'-' if v is None else v}")


def print_profile(path: Path, top: int) -> None:
    if not path.exists():
        print(f"no profile written at {path}", file=sys.stderr)
        return
    print(f"\ncProfile of mailgw ({path}), top {top} by cumulative and internal time:")
    st = pstats.Stats(str(path))
    st.sort_stats("cumulative").print_stats(top)
    st.sort_stats("tottime").print_stats(top)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--messages", "-n", type=int, default=5000, help="messages per server")
    ap.add_argument("--sessions", "-s", type=int, default=20, help="parallel SMTP sessions")
    ap.add_argument("--size", "-l", type=int, default=4096, help="payload bytes per message")
    ap.add_argument(
        "--only", choices=("both", "mailgw", "postfix"), default="both", help="servers to run"
    )
    ap.add_argument(
        "--keep-sessions",
        action="store_true",
        help="smtp-source -d: several messages per connection (default: one per connection)",
    )
    ap.add_argument(
        "--rounds", type=int, default=1, help="repeat postfix+mailgw; ratios use the medians"
    )
    ap.add_argument("--timeout", type=float, default=900, help="seconds per server")
    ap.add_argument(
        "--tracking",
        choices=("on", "off"),
        default="on",
        help="mailgw's message tracking database ([tracking] record; counters stay on)",
    )
    ap.add_argument(
        "--profile", type=Path, default=None, help="run mailgw under cProfile, stats to this file"
    )
    ap.add_argument(
        "--base-dir",
        default=None,
        help="parent of the data directories (default: $TMPDIR); e.g. /dev/shm to take disk"
        " flushes out of the picture",
    )
    ap.add_argument("--keep", action="store_true", help="keep the temporary data directories")
    args = ap.parse_args(argv)
    if args.profile is not None:
        args.profile = args.profile.resolve()

    root = Path(tempfile.mkdtemp(prefix="mailgw-bench-", dir=args.base_dir))
    root.chmod(0o755)  # Postfix's daemons (user postfix, delivery as nobody) must traverse it
    results: list[RunResult] = []
    names = ["postfix", "mailgw"] if args.only == "both" else [args.only]
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
        ratios = {
            key + " mailgw/postfix": ratio(m[key], p[key])
            for key in ("accepted_per_s", "delivered_per_s", "server_cpu_seconds")
        }
    print_table(results, ratios)
    if args.rounds > 1:
        print("medians over rounds:", json.dumps(summary))
    for r in results:
        for note in r.notes:
            print(f"note [{r.server}]: {note}")

    stamp = dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    out_dir = BENCH / "results"
    out_dir.mkdir(exist_ok=True)
    out = out_dir / f"smtp_inbound-{stamp}.json"
    report = {
        "benchmark": "smtp_inbound",
        "timestamp": dt.datetime.now().isoformat(timespec="seconds"),
        "command": " ".join([".venv/bin/python", "bench/smtp_inbound.py", *sys.argv[1:]]),
        "params": {
            "messages": args.messages,
            "sessions": args.sessions,
            "size": args.size,
            "keep_sessions": args.keep_sessions,
            "rounds": args.rounds,
            "base_dir": args.base_dir or tempfile.gettempdir(),
        },
        "machine": machine_info(args.base_dir),
        "results": [asdict(r) for r in results],
        "summary": summary,
        "ratios": ratios,
    }
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"\nresults written to {out.relative_to(REPO)}")
    if args.profile is not None and "mailgw" in summary:
        print_profile(args.profile, 25)
    return 0 if results and all(r.ok for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
