"""IMAP benchmark: mailgw vs a private Dovecot, same mixed load and idle test, same run.

For each server in turn (never both at once, each on a fresh data directory, the order
alternating between rounds):

1. ``--users`` mailboxes are filled with ``--messages`` messages each (pipelined APPEND).
2. Mixed load: ``--clients`` client processes, each its own user, run sessions for
   ``--duration`` seconds. A session is LOGIN, SELECT INBOX, then ``--ops-per-session`` times
   (FETCH headers of 10 messages, FETCH the body of one, STORE +FLAGS, APPEND, UID STORE
   \\Deleted on the appended message, EXPUNGE), then LOGOUT. Every command is timed from
   sending it to its tagged reply; any reply other than OK counts as an error.
3. Idle memory: the summed RSS and PSS of the server's process tree is read with no client
   connected, then ``--idle`` connections each LOGIN, SELECT INBOX and IDLE (wait for ``+``),
   then it is read again; the delta divided by the number of connections is the memory per
   idle connection.

It prints a table (medians over the rounds, ratios mailgw/Dovecot) and writes the figures as
JSON to bench/results/imap-<timestamp>.json.

Run: .venv/bin/python bench/imap.py [--clients 20] [--duration 15] [--rounds 3] [--idle 1000]

Large mailbox (``--large N``, instead of the above): both servers get one INBOX of N messages
(mailgw by APPEND, Dovecot as Maildir files written before it starts; both servers idle while
the other is measured); then each round times, on
each server in turn (the order alternating), ``--repeat`` fresh connections (LOGIN untimed):
SELECT INBOX, then ``UID FETCH 1:* (FLAGS)`` twice (the first as after a SELECT, the second
alone), ``UID SEARCH ALL``, LOGOUT. A warm-up connection runs first (page cache, snapshots).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import email.utils
import io
import json
import multiprocessing as mp
import os
import platform
import random
import re
import resource
import select
import shutil
import socket
import statistics
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(BENCH))

import argon2  # noqa: E402
from peers import DovecotPeer, dovecot_version  # noqa: E402
from smtp_inbound import machine_cpu  # noqa: E402

from mailgw.testing.server import MailgwServer, free_port  # noqa: E402

DOMAIN = "bench.test"
PASSWORD = "bench password"
OPS = ("LOGIN", "SELECT", "FETCH_HDR", "FETCH_BODY", "STORE", "APPEND", "EXPUNGE", "LOGOUT")
CLK_TCK = os.sysconf("SC_CLK_TCK")
_LITERAL = re.compile(rb"\{(\d+)\}\r\n$")
_APPENDUID = re.compile(rb"APPENDUID \d+ (\d+)")


def user_name(i: int) -> str:
    return f"u{i}@{DOMAIN}"


def sample(i: int) -> bytes:
    """A message of ~2 KiB, every 5th with a ~30 KiB base64 attachment; UTF-8 headers."""
    head = (
        f"From: Jörg Müller <jorg{i}@elsewhere.test>\r\nTo: <u@{DOMAIN}>\r\n"
        f"Subject: Grüße Nummer {i}\r\nMessage-ID: <b{i}.{random.random()}@elsewhere.test>\r\n"
        f"Date: {email.utils.formatdate(1700000000 + i * 60)}\r\n"
    ).encode()
    text = b"Hallo \xc3\xa9 lorem ipsum dolor sit amet " * 50 + b"\r\n"
    if i % 5:
        return head + b"Content-Type: text/plain; charset=utf-8\r\n\r\n" + text
    return head + (
        b'MIME-Version: 1.0\r\nContent-Type: multipart/mixed; boundary="=b"\r\n\r\n'
        b"--=b\r\nContent-Type: text/plain; charset=utf-8\r\n\r\n%s"
        b'--=b\r\nContent-Type: application/octet-stream; name="d.bin"\r\n'
        b"Content-Transfer-Encoding: base64\r\n\r\n%s--=b--\r\n"
    ) % (text, (b"QUJD" * 19 + b"\r\n") * 400)


# -- a minimal IMAP client ------------------------------------------------------------------------


class ImapError(Exception):
    """A tagged reply other than OK, or a closed connection."""


class Client:
    """A blocking IMAP connection: send a command, read until its tagged reply (with literals)."""

    def __init__(self, port: int, timeout: float = 30.0) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)
        self.reader = self.sock.makefile("rb")
        self.n = 0
        greeting = self.reader.readline()
        if not greeting.startswith(b"* OK"):
            raise ImapError(f"greeting {greeting!r}")

    def command(self, text: bytes, literal: bytes | None = None) -> tuple[bytes, list[bytes]]:
        self.n += 1
        tag = b"T%d" % self.n
        if literal is None:
            self.sock.sendall(tag + b" " + text + b"\r\n")
        else:
            self.sock.sendall(tag + b" " + text + b" {%d+}\r\n" % len(literal) + literal + b"\r\n")
        untagged: list[bytes] = []
        while True:
            line = self.reader.readline()
            if not line:
                raise ImapError("connection closed")
            while (m := _LITERAL.search(line)) is not None:
                line += self.reader.read(int(m.group(1)))
                line += self.reader.readline()
            if line.startswith(tag + b" "):
                if line[len(tag) + 1 : len(tag) + 3] != b"OK":
                    raise ImapError(line[:200].decode(errors="replace"))
                return line, untagged
            untagged.append(line)

    def close(self) -> None:
        self.reader.close()
        self.sock.close()


def preload(port: int, user: str, messages: list[bytes]) -> None:
    """All messages into INBOX over one connection, pipelined with LITERAL+."""
    c = Client(port, timeout=120)
    try:
        c.command(b'LOGIN "%s" "%s"' % (user.encode(), PASSWORD.encode()))
        out = bytearray()
        for n, data in enumerate(messages):
            out += b"P%d APPEND INBOX {%d+}\r\n%s\r\n" % (n, len(data), data)
        c.sock.sendall(bytes(out))
        done = 0
        while done < len(messages):
            line = c.reader.readline()
            if not line:
                raise ImapError(f"closed after {done} APPENDs")
            if line.startswith(b"P"):
                if line.split()[1] != b"OK":
                    raise ImapError(line.decode(errors="replace"))
                done += 1
        c.command(b"LOGOUT")
    finally:
        c.close()


def worker(
    port: int, user: str, deadline: float, ops_per_session: int, seed: int, out: mp.Queue
) -> None:
    """Run sessions until ``deadline``; put {op: [seconds]} and the error count on ``out``."""
    rnd = random.Random(seed)
    lat: dict[str, list[float]] = {op: [] for op in OPS}
    errors = 0
    append_data = sample(seed * 7 + 1)

    def timed(
        c: Client, op: str, text: bytes, literal: bytes | None = None
    ) -> tuple[bytes, list[bytes]]:
        t = time.perf_counter()
        result = c.command(text, literal)
        lat[op].append(time.perf_counter() - t)
        return result

    while time.time() < deadline:
        try:
            c = Client(port)
        except (OSError, ImapError):
            errors += 1
            time.sleep(0.01)
            continue
        try:
            timed(c, "LOGIN", b'LOGIN "%s" "%s"' % (user.encode(), PASSWORD.encode()))
            _, untagged = timed(c, "SELECT", b"SELECT INBOX")
            exists = next(int(x.split()[1]) for x in untagged if x.endswith(b" EXISTS\r\n"))
            for _ in range(ops_per_session):
                if time.time() >= deadline:
                    break
                first = rnd.randint(1, max(1, exists - 9))
                fetch = b"FETCH %d:%d (UID FLAGS RFC822.SIZE BODY.PEEK[HEADER])"
                timed(c, "FETCH_HDR", fetch % (first, first + 9))
                one = rnd.randint(1, exists)
                timed(c, "FETCH_BODY", b"FETCH %d (BODY.PEEK[])" % one)
                timed(c, "STORE", b"STORE %d +FLAGS (\\Seen)" % one)
                line, _ = timed(c, "APPEND", b"APPEND INBOX", append_data)
                uid = _APPENDUID.search(line)
                if uid is None:
                    raise ImapError(f"no APPENDUID in {line!r}")
                timed(c, "STORE", b"UID STORE %s +FLAGS.SILENT (\\Deleted)" % uid.group(1))
                timed(c, "EXPUNGE", b"EXPUNGE")
            timed(c, "LOGOUT", b"LOGOUT")
        except (OSError, ImapError, StopIteration):
            errors += 1
        finally:
            c.close()
    out.put((lat, errors))


LARGE_OPS = ("SELECT", "SELECT_FETCH_FLAGS", "FETCH_FLAGS", "SEARCH_ALL")


def large_session(port: int, user: str, lat: dict[str, list[float]]) -> None:
    """One timed connection of the large-mailbox measure (see the module's docstring)."""
    c = Client(port, timeout=120)
    try:
        c.command(b'LOGIN "%s" "%s"' % (user.encode(), PASSWORD.encode()))
        t0 = time.perf_counter()
        c.command(b"SELECT INBOX")
        t1 = time.perf_counter()
        _, untagged = c.command(b"UID FETCH 1:* (FLAGS)")
        t2 = time.perf_counter()
        c.command(b"UID FETCH 1:* (FLAGS)")
        t3 = time.perf_counter()
        c.command(b"UID SEARCH ALL")
        t4 = time.perf_counter()
        c.command(b"LOGOUT")
        if len(untagged) < 2:
            raise ImapError(f"UID FETCH 1:* (FLAGS) gave {len(untagged)} responses")
        lat["SELECT"].append(t1 - t0)
        lat["SELECT_FETCH_FLAGS"].append(t2 - t0)
        lat["FETCH_FLAGS"].append(t3 - t2)
        lat["SEARCH_ALL"].append(t4 - t3)
    finally:
        c.close()


def maildir_fill(peer: DovecotPeer, user: str, messages: list[bytes]) -> None:
    """Dovecot's INBOX written as Maildir files before it starts (its APPEND slows down as
    the folder grows: ~20 minutes for 20,000 here); it indexes them on the first SELECT
    (the warm-up session, not timed)."""
    root = peer.mail_base / user.split("@")[0]
    for sub in ("cur", "new", "tmp"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    for i, data in enumerate(messages):
        name = f"{1700000000 + i}.M{i}P1.bench,S={len(data)}:2,"
        (root / "cur" / name).write_bytes(data)
        os.utime(root / "cur" / name, (1700000000 + i, 1700000000 + i))
    for path in [peer.mail_base, root, *root.iterdir(), *(root / "cur").iterdir()]:
        os.chown(path, peer.uid, peer.gid)


def run_large(args: argparse.Namespace, messages: list[bytes]) -> dict[str, object]:
    """The large-mailbox measure: both servers filled, then measured in alternation."""
    from mailgw.cli.main import main as cli

    base = Path(tempfile.mkdtemp(prefix="imap-large-", dir=args.base_dir))
    base.chmod(0o755)
    user = user_name(0)
    servers: dict[str, tuple[int, int]] = {}
    stop: list[object] = []
    fill_s: dict[str, float] = {}
    lat: dict[str, dict[str, list[float]]] = {}
    medians: dict[str, list[dict[str, float]]] = {"mailgw": [], "dovecot": []}
    try:
        if args.only != "dovecot":
            imap: dict[str, object] = {}
            if args.workers is not None:
                imap["workers"] = args.workers
            server = MailgwServer(base / "mailgw", {"imap": imap})
            conf = str(server.config_path)
            with contextlib.redirect_stdout(io.StringIO()):
                assert cli(["--config", conf, "domain", "add", DOMAIN]) == 0
                assert cli(["--config", conf, "user", "add", user, "--password", PASSWORD]) == 0
            server.start()
            stop.append(server.stop)
            assert server.proc is not None
            servers["mailgw"] = (server.ports["imap"], server.proc.pid)
        if args.only != "mailgw":
            hashed = "{ARGON2ID}" + argon2.PasswordHasher(
                time_cost=1, memory_cost=8192, parallelism=1
            ).hash(PASSWORD)
            peer = DovecotPeer(base / "dovecot", free_port(), {user: hashed})
            maildir_fill(peer, user, messages)
            peer.start()
            stop.append(peer.stop)
            assert peer.pid is not None
            servers["dovecot"] = (peer.port, peer.pid)
        for name, (port, _pid) in servers.items():
            t = time.monotonic()
            if name == "mailgw":
                for start in range(0, len(messages), 1000):
                    preload(port, user, messages[start : start + 1000])
            fill_s[name] = round(time.monotonic() - t, 1)
            large_session(port, user, {op: [] for op in LARGE_OPS})  # warm-up
            print(f"{name}: {len(messages)} messages in {fill_s[name]} s", flush=True)
        order = list(servers)
        for rnd in range(1, args.rounds + 1):
            for name in order if rnd % 2 else list(reversed(order)):
                port, pid = servers[name]
                one: dict[str, list[float]] = {op: [] for op in LARGE_OPS}
                cpu0 = cpu_seconds(pid)
                for _ in range(args.repeat):
                    large_session(port, user, one)
                cpu = cpu_seconds(pid) - cpu0
                row = {op: round(statistics.median(v) * 1000, 2) for op, v in one.items()}
                row["server_cpu_ms_per_session"] = round(cpu * 1000 / args.repeat, 1)
                medians[name].append(row)
                for op, v in one.items():
                    lat.setdefault(name, {}).setdefault(op, []).extend(v)
                print(f"round {rnd} {name:8} " + "  ".join(f"{k} {v}" for k, v in row.items()))
    finally:
        for fn in reversed(stop):
            fn()  # type: ignore[operator]
        shutil.rmtree(base, ignore_errors=True)
    table: dict[str, dict[str, float]] = {}
    for name, rows in medians.items():
        if rows:
            table[name] = {k: med([r[k] for r in rows]) for k in rows[0]}
    return {"fill_s": fill_s, "rounds": medians, "summary": table}


# -- measuring ------------------------------------------------------------------------------------


def process_tree(root: int) -> list[int]:
    """``root`` and all its descendants (from /proc/*/stat)."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        children.setdefault(ppid, []).append(int(entry))
    out, todo = [], [root]
    while todo:
        pid = todo.pop()
        out.append(pid)
        todo.extend(children.get(pid, []))
    return out


def memory_kib(root: int) -> tuple[int, int, int]:
    """(summed RSS KiB, summed PSS KiB, process count) of the tree under ``root``."""
    rss = pss = n = 0
    for pid in process_tree(root):
        try:
            text = Path(f"/proc/{pid}/smaps_rollup").read_text()
        except OSError:
            continue
        n += 1
        for line in text.splitlines():
            if line.startswith("Rss:"):
                rss += int(line.split()[1])
            elif line.startswith("Pss:"):
                pss += int(line.split()[1])
    return rss, pss, n


def cpu_seconds(root: int) -> float:
    """CPU of the tree under ``root``, with reaped children (cutime/cstime) of each."""
    total = 0
    for pid in process_tree(root):
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += sum(int(x) for x in fields[11:15])
    return total / CLK_TCK


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


@dataclass
class RunResult:
    """What one server did in one round."""

    server: str
    round: int
    ok: bool = False
    error: str = ""
    ops: int = 0
    errors: int = 0
    ops_per_s: float = 0.0
    sessions_per_s: float = 0.0
    p50_ms: dict[str, float] = field(default_factory=dict)
    p99_ms: dict[str, float] = field(default_factory=dict)
    server_cpu_s: float = 0.0
    busy_cores: float = 0.0
    idle_connections: int = 0
    idle_open_s: float = 0.0
    base_rss_kib: int = 0
    base_pss_kib: int = 0
    idle_rss_kib: int = 0
    idle_pss_kib: int = 0
    idle_processes: int = 0
    rss_per_idle_kib: float = 0.0
    pss_per_idle_kib: float = 0.0


def run_load(port: int, root: int, args: argparse.Namespace, result: RunResult) -> None:
    ctx = mp.get_context("fork")
    queue: mp.Queue = ctx.Queue()
    start = time.time() + 0.5
    deadline = start + args.duration
    procs = [
        ctx.Process(
            target=worker,
            args=(port, user_name(i % args.users), deadline, args.ops_per_session, i, queue),
        )
        for i in range(args.clients)
    ]
    cpu0 = cpu_seconds(root)
    busy0, total0 = machine_cpu()
    for p in procs:
        p.start()
    results = [queue.get(timeout=args.duration + 120) for _ in procs]
    for p in procs:
        p.join(30)
    result.server_cpu_s = round(cpu_seconds(root) - cpu0, 2)
    busy1, total1 = machine_cpu()
    result.busy_cores = round((busy1 - busy0) / (total1 - total0) * (os.cpu_count() or 1), 2)
    lat: dict[str, list[float]] = {op: [] for op in OPS}
    for one, errors in results:
        result.errors += errors
        for op, values in one.items():
            lat[op].extend(values)
    elapsed = max(time.time(), deadline) - start
    result.ops = sum(len(v) for v in lat.values())
    result.ops_per_s = round(result.ops / elapsed, 1)
    result.sessions_per_s = round(len(lat["LOGOUT"]) / elapsed, 1)
    for op, values in lat.items():
        if values:
            result.p50_ms[op] = round(percentile(values, 0.50) * 1000, 2)
            result.p99_ms[op] = round(percentile(values, 0.99) * 1000, 2)


def run_idle(port: int, root: int, args: argparse.Namespace, result: RunResult) -> None:
    time.sleep(1.0)
    result.base_rss_kib, result.base_pss_kib, _ = memory_kib(root)
    socks: list[socket.socket] = []
    t0 = time.monotonic()
    try:
        for i in range(args.idle):
            s = socket.create_connection(("127.0.0.1", port), timeout=30)
            socks.append(s)
            user = user_name(i % args.users).encode()
            s.sendall(
                b'a LOGIN "%s" "%s"\r\nb SELECT INBOX\r\nc IDLE\r\n' % (user, PASSWORD.encode())
            )
            buf = b""
            while not (buf.startswith(b"+") or b"\n+" in buf):
                ready, _, _ = select.select([s], [], [], 30)
                chunk = s.recv(65536) if ready else b""
                if not chunk:
                    raise ImapError(f"idle connection {i}: no continuation; got {buf[-300:]!r}")
                buf += chunk
                if b"\nc NO" in buf or b"\nc BAD" in buf or b"\na NO" in buf:
                    raise ImapError(f"idle connection {i}: {buf[-300:]!r}")
        result.idle_open_s = round(time.monotonic() - t0, 2)
        result.idle_connections = len(socks)
        time.sleep(2.0)
        result.idle_rss_kib, result.idle_pss_kib, result.idle_processes = memory_kib(root)
        n = len(socks)
        result.rss_per_idle_kib = round((result.idle_rss_kib - result.base_rss_kib) / n, 1)
        result.pss_per_idle_kib = round((result.idle_pss_kib - result.base_pss_kib) / n, 1)
    finally:
        for s in socks:
            s.close()


# -- the servers ----------------------------------------------------------------------------------


def mailgw_round(workdir: Path, args: argparse.Namespace, messages: list[bytes]) -> RunResult:
    from mailgw.cli.main import main as cli

    result = RunResult("mailgw", args.round)
    limit = str(max(5000, args.idle * 2))
    imap = {"max_connections_per_ip": limit, "max_connections_per_user": limit}
    if args.workers is not None:
        imap["workers"] = args.workers
    server = MailgwServer(workdir, {"imap": imap, "directory": {"auth_failure_delay": "0.2s"}})
    conf = str(server.config_path)
    with contextlib.redirect_stdout(io.StringIO()):
        assert cli(["--config", conf, "domain", "add", DOMAIN]) == 0
        for i in range(args.users):
            added = cli(["--config", conf, "user", "add", user_name(i), "--password", PASSWORD])
            assert added == 0
    server.start()
    try:
        assert server.proc is not None
        port = server.ports["imap"]
        for i in range(args.users):
            preload(port, user_name(i), messages)
        run_load(port, server.proc.pid, args, result)
        run_idle(port, server.proc.pid, args, result)
        result.ok = True
    except Exception as e:  # noqa: BLE001 - recorded in the results
        result.error = f"{type(e).__name__}: {e}\n{server.log()[-2000:]}"
    finally:
        server.stop()
    return result


def dovecot_round(workdir: Path, args: argparse.Namespace, messages: list[bytes]) -> RunResult:
    result = RunResult("dovecot", args.round)
    # the same password hash parameters as mailgw's test server (argon2id, t=1, m=8 MiB, p=1)
    hashed = "{ARGON2ID}" + argon2.PasswordHasher(
        time_cost=1, memory_cost=8192, parallelism=1
    ).hash(PASSWORD)
    peer = DovecotPeer(workdir, free_port(), {user_name(i): hashed for i in range(args.users)})
    peer.start()
    try:
        assert peer.pid is not None
        for i in range(args.users):
            preload(peer.port, user_name(i), messages)
        run_load(peer.port, peer.pid, args, result)
        run_idle(peer.port, peer.pid, args, result)
        result.ok = True
    except Exception as e:  # noqa: BLE001 - recorded in the results
        result.error = f"{type(e).__name__}: {e}{peer.log_tail()}"
    finally:
        peer.stop()
    return result


# -- report ---------------------------------------------------------------------------------------


def med(values: list[float]) -> float:
    return round(statistics.median(values), 2) if values else float("nan")


def summary(results: list[RunResult]) -> dict[str, dict[str, float]]:
    out: dict[str, dict[str, float]] = {}
    for name in ("mailgw", "dovecot"):
        ok = [r for r in results if r.server == name and r.ok]
        row: dict[str, float] = {
            "rounds_ok": len(ok),
            "ops_per_s": med([r.ops_per_s for r in ok]),
            "sessions_per_s": med([r.sessions_per_s for r in ok]),
            "errors": sum(r.errors for r in ok),
            "server_cpu_ms_per_op": med([1000 * r.server_cpu_s / max(1, r.ops) for r in ok]),
            "busy_cores": med([r.busy_cores for r in ok]),
            "rss_per_idle_kib": med([r.rss_per_idle_kib for r in ok]),
            "pss_per_idle_kib": med([r.pss_per_idle_kib for r in ok]),
            "idle_open_s": med([r.idle_open_s for r in ok]),
        }
        for op in OPS:
            row[f"p50_{op}"] = med([r.p50_ms[op] for r in ok if op in r.p50_ms])
            row[f"p99_{op}"] = med([r.p99_ms[op] for r in ok if op in r.p99_ms])
        out[name] = row
    return out


def print_report(table: dict[str, dict[str, float]]) -> dict[str, float]:
    m, d = table["mailgw"], table["dovecot"]
    ratios: dict[str, float] = {}
    print(f"{'figure':28} {'mailgw':>12} {'dovecot':>12} {'mailgw/dovecot':>15}")
    for key in m:
        a, b = m[key], d[key]
        ratio = round(a / b, 2) if isinstance(b, float | int) and b else float("nan")
        ratios[key] = ratio
        print(f"{key:28} {a:>12} {b:>12} {ratio:>15}")
    return ratios


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=20)
    parser.add_argument("--users", type=int, default=20, help="mailboxes (clients share them)")
    parser.add_argument("--duration", type=float, default=15.0, help="seconds of mixed load")
    parser.add_argument("--ops-per-session", type=int, default=5)
    parser.add_argument("--messages", type=int, default=200, help="messages per mailbox")
    parser.add_argument("--idle", type=int, default=1000, help="idle IDLE connections")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--only", choices=("mailgw", "dovecot"), help="run one server only")
    parser.add_argument(
        "--workers", default=None, help="mailgw [imap] workers (default: the config default)"
    )
    parser.add_argument("--base-dir", default=None, help="where data directories go ($TMPDIR)")
    parser.add_argument(
        "--large", type=int, default=0, help="the large-mailbox measure with N messages"
    )
    parser.add_argument("--repeat", type=int, default=5, help="--large: sessions per round")
    args = parser.parse_args()
    if args.large:
        return large_main(args)

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = min(hard, max(soft, args.idle * 3 + 1000))
    resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))
    messages = [sample(i) for i in range(args.messages)]
    runners = {"mailgw": mailgw_round, "dovecot": dovecot_round}
    order = [args.only] if args.only else ["mailgw", "dovecot"]
    results: list[RunResult] = []
    base = tempfile.mkdtemp(prefix="imap-bench-", dir=args.base_dir)
    Path(base).chmod(0o755)  # Dovecot's auth process (user dovecot) reads the passwd file
    try:
        for rnd in range(1, args.rounds + 1):
            args.round = rnd
            for name in order if rnd % 2 else list(reversed(order)):
                workdir = Path(base) / f"{name}-{rnd}"
                r = runners[name](workdir, args, messages)
                shutil.rmtree(workdir, ignore_errors=True)
                results.append(r)
                status = "ok" if r.ok else f"FAILED {r.error[:2000]}"
                print(
                    f"round {rnd} {name:8} {r.ops_per_s:>8} ops/s  errors {r.errors}  "
                    f"idle {r.rss_per_idle_kib} KiB RSS / {r.pss_per_idle_kib} KiB PSS per "
                    f"connection  {status}",
                    flush=True,
                )
    finally:
        shutil.rmtree(base, ignore_errors=True)
    table = summary(results)
    ratios = print_report(table)
    machine = {
        "cpus": os.cpu_count(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "dovecot": dovecot_version(),
        "cpu_model": next(
            (
                line.split(":", 1)[1].strip()
                for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")
            ),
            "",
        ),
    }
    out_dir = BENCH / "results"
    out_dir.mkdir(exist_ok=True)
    stamp = dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    path = out_dir / f"imap-{stamp}.json"
    path.write_text(
        json.dumps(
            {
                "args": {k: v for k, v in vars(args).items() if k != "round"},
                "machine": machine,
                "runs": [asdict(r) for r in results],
                "summary": table,
                "ratios_mailgw_over_dovecot": ratios,
            },
            indent=2,
        )
    )
    print(f"written {path}")
    return 0 if all(r.ok for r in results) else 1


def large_main(args: argparse.Namespace) -> int:
    """``--large``: print and write (bench/results/imap-large-<timestamp>.json) the figures."""
    messages = [sample(i) for i in range(args.large)]
    load0 = os.getloadavg()
    out = run_large(args, messages)
    table = out["summary"]
    assert isinstance(table, dict)
    if "mailgw" in table and "dovecot" in table:
        print_report(table)
    out_dir = BENCH / "results"
    out_dir.mkdir(exist_ok=True)
    stamp = dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    path = out_dir / f"imap-large-{stamp}.json"
    out["args"] = {k: v for k, v in vars(args).items() if k != "round"}
    out["loadavg_before_after"] = [load0, os.getloadavg()]
    path.write_text(json.dumps(out, indent=2))
    print(f"load average before {load0}, after {os.getloadavg()}; written {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
