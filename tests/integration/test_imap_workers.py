"""IMAP worker processes end to end: the real twistd with ``[imap] workers``, real sockets.

Which worker serves a session is read from the main log: each worker's lines are relayed as
``imap worker N (pid P): ...``, and every LOGIN logs ``imap SESSION login USER``. Logins are
made one at a time, each waiting for its log line, so the k-th login line is the k-th login.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import smtplib
import socket
import subprocess
import time
from pathlib import Path

from mailgw.testing.server import REPO, TWISTD, MailgwServer, free_port
from tests.integration.helpers import PASSWORD, wait_until

ALICE = "alice@example.test"
BOB = "bob@example.test"
BOB_PASSWORD = "bob password"
CAROL = "carol@example.test"
PASSWORDS = {ALICE: PASSWORD, BOB: BOB_PASSWORD, CAROL: "carol password"}
LOGIN_LINE = re.compile(r"imap worker (\d+) \(pid (\d+)\): .*? login (\S+) from")
REFUSED_LINE = re.compile(r"imap worker (\d+) \(pid (\d+)\): .*? refused: too many connections")
LIMIT_LINE = re.compile(r"imap worker (\d+) \(pid (\d+)\): .*? (\S+): too many sessions")
READY_LINE = re.compile(r"imap worker (\d+) \(pid (\d+)\) ready")


class Client:
    """A raw IMAP client: tagged commands, untagged lines kept for IDLE."""

    def __init__(self, server: MailgwServer) -> None:
        self.sock = socket.create_connection(("127.0.0.1", server.ports["imap"]), timeout=10)
        self.file = self.sock.makefile("rb")
        self.greeting = self.file.readline()
        self.n = 0
        self.worker: int | None = None
        self.pid: int | None = None

    def command(self, text: str) -> list[bytes]:
        self.n += 1
        tag = f"t{self.n}".encode()
        self.sock.sendall(tag + b" " + text.encode() + b"\r\n")
        lines = []
        while True:
            line = self.file.readline()
            if not line:
                raise ConnectionError(f"closed after {lines!r}")
            lines.append(line)
            if line.startswith(tag + b" "):
                return lines

    def ok(self, text: str) -> list[bytes]:
        lines = self.command(text)
        assert lines[-1].split()[1] == b"OK", lines
        return lines

    def readline(self, timeout: float) -> bytes:
        self.sock.settimeout(timeout)
        try:
            return self.file.readline()
        finally:
            self.sock.settimeout(10)

    def untagged(self, timeout: float = 5) -> bytes:
        """The next untagged update, skipping ``* N RECENT`` (which follows EXISTS)."""
        while True:
            line = self.readline(timeout)
            if not re.fullmatch(rb"\* \d+ RECENT\r\n", line):
                return line

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.close()


def start(server_factory, **imap: str) -> MailgwServer:  # type: ignore[no-untyped-def]
    server = server_factory({"imap": {"workers": "2", **imap}})
    wait_ready(server, 2)
    return server


def wait_ready(server: MailgwServer, n: int) -> list[tuple[int, int]]:
    def ready() -> list[tuple[int, int]] | None:
        found = [(int(i), int(p)) for i, p in READY_LINE.findall(server.log())]
        return found if len(found) >= n else None

    return wait_until(ready, what=f"{n} workers ready")  # type: ignore[no-any-return]


def worker_pids(server: MailgwServer) -> set[int]:
    """The live worker processes under the server (from /proc)."""
    assert server.proc is not None
    out = set()
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
            cmdline = Path(f"/proc/{entry}/cmdline").read_bytes()
        except OSError:
            continue
        fields = stat.rsplit(")", 1)[1].split()
        parent, state = int(fields[1]), fields[0]
        if parent == server.proc.pid and state != "Z" and b"mailgw.imap.worker_process" in cmdline:
            out.add(int(entry))
    return out


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def match_after(server: MailgwServer, pattern: re.Pattern[str], before: int) -> tuple[str, ...]:
    """The first match of ``pattern`` in the log after the first ``before`` ones (waits)."""

    def new() -> list[tuple[str, ...]] | None:
        found = pattern.findall(server.log())
        return found if len(found) > before else None

    return wait_until(new, what=pattern.pattern)[before]  # type: ignore[no-any-return]


def login(server: MailgwServer, user: str = ALICE, retry: bool = False) -> Client:
    """A new session logged in as ``user``, with the worker that serves it; with ``retry``,
    a refusal (a release still on its way to the main process) is tried again."""
    before = len(LOGIN_LINE.findall(server.log()))
    deadline = time.monotonic() + 10
    while True:
        client = Client(server)
        lines = client.command(f'LOGIN {user} "{PASSWORDS[user]}"')
        if lines[-1].split()[1] == b"OK":
            break
        client.close()
        assert retry and time.monotonic() < deadline, lines
        time.sleep(0.05)
    index, pid, who = match_after(server, LOGIN_LINE, before)
    assert who == user
    client.worker, client.pid = int(index), int(pid)
    return client


def test_sessions_land_in_both_workers(server_factory) -> None:  # type: ignore[no-untyped-def]
    server = start(server_factory)
    ready = wait_ready(server, 2)
    assert {pid for _, pid in ready} == worker_pids(server)
    clients = []
    try:
        for _ in range(19):  # below max_connections_per_user (20)
            clients.append(login(server))
            if len({c.worker for c in clients}) == 2:
                break
        assert {c.worker for c in clients} == {0, 1}
        assert {c.pid for c in clients} == worker_pids(server)
        for c in clients:
            c.ok("SELECT INBOX")
    finally:
        for c in clients:
            c.close()


def other_worker(server: MailgwServer, than: Client, *users: str) -> Client:
    """A session of one of ``users`` (default alice), taken in turn, in another worker than
    ``than``'s. Those landing in the same worker are kept open until then (so the
    least-connections balance, not luck, sends a later one to the other worker), then logged
    out. Up to ``BALANCE_SLACK`` + 2 sessions can be needed: with a low per-user limit, pass
    enough users to hold them."""
    users = users or (ALICE,)
    same: list[Client] = []
    try:
        for n in range(15):  # below max_connections_per_user (20)
            client = login(server, users[n % len(users)], retry=True)
            if client.worker != than.worker:
                return client
            same.append(client)
    finally:
        for client in same:
            client.ok("LOGOUT")
            client.close()
    raise AssertionError("every session landed in the same worker")


def test_idle_sees_appends_from_another_worker_and_smtp_deliveries(
    server_factory,  # type: ignore[no-untyped-def]
) -> None:
    server = start(server_factory)
    idler = login(server)
    other = other_worker(server, idler)
    try:
        idler.ok("SELECT INBOX")
        idler.sock.sendall(b"i1 IDLE\r\n")
        assert idler.readline(5).startswith(b"+")
        message = b"From: bob@example.test\r\nSubject: hi\r\n\r\nhello\r\n"
        other.sock.sendall(b"a1 APPEND INBOX {%d+}\r\n%s\r\n" % (len(message), message))
        assert other.file.readline().startswith(b"a1 OK")
        sent = time.monotonic()
        assert idler.untagged() == b"* 1 EXISTS\r\n"
        assert time.monotonic() - sent < 1.0

        with smtplib.SMTP("127.0.0.1", server.ports["mx"], timeout=10) as smtp:
            smtp.sendmail("carol@elsewhere.test", [ALICE], b"Subject: by smtp\r\n\r\nbody\r\n")
        sent = time.monotonic()
        assert idler.untagged() == b"* 2 EXISTS\r\n"
        assert time.monotonic() - sent < 1.0

        # A flag change in the other worker reaches the idler too.
        other.ok("SELECT INBOX")
        other.ok("STORE 1 +FLAGS (\\Flagged)")
        line = idler.untagged()
        assert line.startswith(b"* 1 FETCH (") and b"\\Flagged" in line, line
        idler.sock.sendall(b"DONE\r\n")
        assert idler.untagged().startswith(b"i1 OK")
    finally:
        for c in (idler, other):
            c.close()


def same_worker(server: MailgwServer, worker: int, user: str = ALICE) -> Client:
    """A session of ``user`` in worker ``worker`` (others are logged out again)."""
    for _ in range(40):
        client = login(server, user, retry=True)
        if client.worker == worker:
            return client
        client.ok("LOGOUT")
        client.close()
    raise AssertionError(f"no session landed in worker {worker}")


def test_a_worker_kept_snapshot_sees_what_changed_while_nobody_held_the_folder(
    server_factory,  # type: ignore[no-untyped-def]
) -> None:
    server = start(server_factory)
    first = login(server)
    other = other_worker(server, first)
    assert first.worker is not None
    message = b"From: bob@example.test\r\nSubject: hi\r\n\r\nhello\r\n"
    try:
        for _ in range(3):
            other.sock.sendall(b"a APPEND INBOX {%d+}\r\n%s\r\n" % (len(message), message))
            assert other.file.readline().startswith(b"a OK")
        first.ok("SELECT INBOX")  # loads the folder in first's worker, kept after LOGOUT
        first.ok("LOGOUT")
        first.close()
        # Meanwhile: a flag change and an expunge in the other worker, a delivery by SMTP.
        other.ok("SELECT INBOX")
        other.ok("STORE 2 +FLAGS (\\Flagged)")
        other.ok("STORE 1 +FLAGS.SILENT (\\Deleted)")
        other.ok("EXPUNGE")
        with smtplib.SMTP("127.0.0.1", server.ports["mx"], timeout=10) as smtp:
            smtp.sendmail("carol@elsewhere.test", [ALICE], b"Subject: by smtp\r\n\r\nbody\r\n")
        wait_until(lambda: b"* 3 EXISTS\r\n" in b"".join(other.ok("NOOP")), what="delivery")
        again = same_worker(server, first.worker)
        try:
            lines = again.ok("SELECT INBOX")
            assert b"* 3 EXISTS\r\n" in lines, lines
            here = [x for x in again.ok("UID FETCH 1:* (FLAGS)") if x.startswith(b"* ")]
            there = [x for x in other.ok("UID FETCH 1:* (FLAGS)") if x.startswith(b"* ")]
            strip = [x.replace(b" \\Recent", b"").replace(b"(\\Recent)", b"()") for x in here]
            assert strip == [
                x.replace(b" \\Recent", b"").replace(b"(\\Recent)", b"()") for x in there
            ]
            assert here[0] == b"* 1 FETCH (UID 2 FLAGS (\\Flagged))\r\n", here
            assert [x.split()[4] for x in here] == [b"2", b"3", b"4"]
        finally:
            again.close()
    finally:
        other.close()


def test_per_user_limit_holds_across_workers(server_factory) -> None:  # type: ignore[no-untyped-def]
    limit = 3
    server = start(server_factory, max_connections_per_user=str(limit))
    held = [login(server) for _ in range(limit)]
    per_worker = {w: sum(1 for c in held if c.worker == w) for w in (0, 1)}
    refused: list[Client] = []
    try:
        # Refused everywhere, also where that worker alone holds fewer than the limit.
        for _ in range(40):
            before = len(LIMIT_LINE.findall(server.log()))
            client = Client(server)
            refused.append(client)
            lines = client.command(f'LOGIN {ALICE} "{PASSWORD}"')
            assert b"NO [LIMIT]" in lines[-1], lines
            index = match_after(server, LIMIT_LINE, before)[0]
            if per_worker[int(index)] < limit:
                break
        else:
            raise AssertionError("no refusal in a worker holding fewer than the limit")
        # Another user is not affected; a logout (in any worker) frees a place.
        bob = login(server, BOB)
        bob.close()
        held[0].ok("LOGOUT")
        again = wait_until(lambda: _try_login(server), what="login after a logout")
        again.close()
    finally:
        for c in held + refused:
            c.close()


def _try_login(server: MailgwServer) -> Client | None:
    client = Client(server)
    if client.command(f'LOGIN {ALICE} "{PASSWORD}"')[-1].split()[1] == b"OK":
        return client
    client.close()
    return None


def test_per_ip_limit_holds_across_workers(server_factory) -> None:  # type: ignore[no-untyped-def]
    limit = 4
    server = start(server_factory, max_connections_per_ip=str(limit))
    held = [login(server) for _ in range(limit)]
    per_worker = {w: sum(1 for c in held if c.worker == w) for w in (0, 1)}
    try:
        for _ in range(40):
            before = len(REFUSED_LINE.findall(server.log()))
            client = Client(server)
            assert client.greeting.startswith(b"* BYE"), client.greeting
            client.close()
            index = match_after(server, REFUSED_LINE, before)[0]
            if per_worker[int(index)] < limit:
                break
        else:
            raise AssertionError("no refusal in a worker holding fewer than the limit")
        held.pop().close()  # the release reaches the main process: a new one is admitted
        client = wait_until(
            lambda: (c := Client(server)).greeting.startswith(b"* OK") and c, what="admitted"
        )
        held.append(client)
    finally:
        for c in held:
            c.close()


def test_kill9_of_a_worker(server_factory) -> None:  # type: ignore[no-untyped-def]
    per_ip = 8
    server = start(server_factory, max_connections_per_user="2", max_connections_per_ip=str(per_ip))
    server.cli("user", "add", CAROL, "--password", PASSWORDS[CAROL])
    a1 = login(server)
    a2 = login(server)
    assert _try_login(server) is None  # the per-user limit is reached
    # Which worker takes a connection is the kernel's choice within the balance's slack: up to
    # four sessions may land in a1's worker first, more than bob alone may hold (2).
    bob = other_worker(server, a1, BOB, CAROL)
    victim = a1.pid
    assert victim is not None
    os.kill(victim, signal.SIGKILL)
    held: list[Client] = []
    try:
        server.wait_for_log(f"(pid {victim}) ended (signal 9); restarting")
        with contextlib.suppress(ConnectionResetError):  # its sessions are gone
            assert a1.readline(5) == b""
        bob.ok("NOOP")  # the other worker keeps serving
        wait_until(lambda: len(worker_pids(server)) == 2 and victim not in worker_pids(server))
        wait_ready(server, 3)
        # What the dead worker held is released: alice may log in again up to the limit...
        survivors = [c for c in (a2,) if c.pid != victim]
        held += [login(server) for _ in range(2 - len(survivors))]
        assert _try_login(server) is None
        # ... and its connections no longer count against the per-IP limit.
        open_now = 1 + len(survivors) + len(held)  # bob's (or carol's) and alice's sessions
        for _ in range(per_ip - open_now):
            held.append(
                wait_until(
                    lambda: (c := Client(server)).greeting.startswith(b"* OK") and c,
                    what="admitted",
                )
            )
        last = Client(server)
        assert last.greeting.startswith(b"* BYE"), last.greeting
        last.close()
    finally:
        for c in (a1, a2, bob, *held):
            c.close()


def test_stop_stops_the_workers(server_factory) -> None:  # type: ignore[no-untyped-def]
    server = start(server_factory)
    pids = worker_pids(server)
    assert len(pids) == 2
    server.stop()
    wait_until(lambda: not any(alive(p) for p in pids), what="workers gone")
    log = server.log()
    for pid in pids:
        assert f"(pid {pid}) stopped (exit code 0)" in log, log[-3000:]


def test_sigterm_to_the_whole_group_stops_every_worker_cleanly(
    server_factory,  # type: ignore[no-untyped-def]
) -> None:
    """As systemd stops a service: SIGTERM to every process at once, so each worker gets a
    second one from the main process while it is already stopping."""
    server = start(server_factory)
    pids = worker_pids(server)
    assert len(pids) == 2 and server.proc is not None
    os.kill(server.proc.pid, signal.SIGTERM)
    for pid in pids:
        os.kill(pid, signal.SIGTERM)
    time.sleep(0.05)
    for pid in pids:  # and once more, late
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
    wait_until(lambda: not any(alive(p) for p in pids), what="workers gone")
    server.stop()
    log = server.log()
    for pid in pids:
        ends = re.findall(rf"\(pid {pid}\) (?:stopped|ended) \(([^)]*)\)", log)
        assert ends == ["exit code 0"], log[-3000:]


def test_workers_exit_when_the_main_process_is_killed(
    server_factory,  # type: ignore[no-untyped-def]
) -> None:
    server = start(server_factory)
    pids = worker_pids(server)
    assert len(pids) == 2
    server.kill9()
    wait_until(lambda: not any(alive(p) for p in pids), what="workers gone")


def test_zero_workers_serves_in_the_main_process(server_factory) -> None:  # type: ignore[no-untyped-def]
    server = server_factory({"imap": {"workers": "0", "max_connections_per_user": "2"}})
    idler = Client(server)
    other = Client(server)
    try:
        assert worker_pids(server) == set()
        assert "imap worker" not in server.log()
        idler.ok(f'LOGIN {ALICE} "{PASSWORD}"')
        other.ok(f'LOGIN {ALICE} "{PASSWORD}"')
        assert _try_login(server) is None
        idler.ok("SELECT INBOX")
        idler.sock.sendall(b"i1 IDLE\r\n")
        assert idler.readline(5).startswith(b"+")
        message = b"Subject: hi\r\n\r\nhello\r\n"
        other.sock.sendall(b"a1 APPEND INBOX {%d+}\r\n%s\r\n" % (len(message), message))
        assert other.file.readline().startswith(b"a1 OK")
        assert idler.untagged() == b"* 1 EXISTS\r\n"
    finally:
        idler.close()
        other.close()


def test_busy_imap_port_stops_startup_with_workers(tmp_path: Path) -> None:
    busy = socket.socket()
    busy.bind(("127.0.0.1", 0))
    busy.listen()
    port = busy.getsockname()[1]
    config = tmp_path / "busy.ini"
    config.write_text(
        f"[server]\ndata_dir = {tmp_path}/data\n"
        f"[mx]\nlisten = tcp:{free_port()}:interface=127.0.0.1\n"
        f"[pop3]\nlisten = tcp:{free_port()}:interface=127.0.0.1\n"
        f"[imap]\nworkers = 2\nlisten = tcp:{port}:interface=127.0.0.1\n"
    )
    try:
        result = subprocess.run(
            [TWISTD, "--pidfile=", "-n", "mailgw", "--config", str(config)],
            capture_output=True,
            text=True,
            timeout=60,
            cwd=REPO,
            env={**os.environ, "PYTHONPATH": str(REPO)},
        )
    finally:
        busy.close()
    assert result.returncode != 0
    output = result.stdout + result.stderr
    assert f"{config}:imap:listen: cannot listen on tcp:{port}" in output, output
    assert "Traceback" not in output
