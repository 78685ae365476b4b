"""`twistd --uid U --gid G mailgw` as root, for real: a user this test creates, an empty then an
existing data directory, mail in over SMTP and out over IMAP (worker process) and POP3, every
file under data_dir owned by U; a data directory that is someone else's stops start-up with one
line. Root only (CI runs as root); skipped with the reason otherwise."""

from __future__ import annotations

import imaplib
import os
import poplib
import pwd
import secrets
import shutil
import smtplib
import stat
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from mailgw.testing.server import REPO, TWISTD, MailgwServer
from tests.integration.helpers import PASSWORD, provision, wait_until

pytestmark = [
    pytest.mark.deploy,
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root: twistd --uid/--gid switches user"),
]


@pytest.fixture(scope="module")
def service_user() -> Iterator[pwd.struct_passwd]:
    """A throwaway system user and group of its own, removed afterwards."""
    name = f"mgwtest{secrets.token_hex(4)}"
    subprocess.run(
        [
            "useradd",
            "--system",
            "--user-group",
            "--no-create-home",
            "--home-dir",
            "/nonexistent",
            "--shell",
            "/usr/sbin/nologin",
            name,
        ],
        check=True,
        capture_output=True,
    )
    try:
        yield pwd.getpwnam(name)
    finally:
        subprocess.run(["userdel", name], check=False, capture_output=True)
        subprocess.run(["groupdel", name], check=False, capture_output=True)


def _blocking_ancestors(paths: list[str]) -> list[str]:
    """Directories on the way to ``paths`` that others cannot traverse (``/root`` when the
    interpreter or the checkout lives there)."""
    found: list[str] = []
    for path in paths:
        current = os.path.realpath(path)
        chain = []
        while True:
            chain.append(current)
            parent = os.path.dirname(current)
            if parent == current:
                break
            current = parent
        for folder in reversed(chain):
            blocked = os.path.isdir(folder) and not os.stat(folder).st_mode & stat.S_IXOTH
            if blocked and folder not in found:
                found.append(folder)
    return found


@pytest.fixture(scope="module")
def reachable(service_user: pwd.struct_passwd) -> Iterator[dict[str, str]]:
    """The environment twistd runs in, with the interpreter, its libraries and the checkout
    reachable by the service user: directories on the way that others cannot traverse (o+x)
    get it for the duration of these tests, then their mode back."""
    import site
    import sysconfig

    needed = [
        sys.executable,
        sys.base_prefix,
        sys.prefix,
        sysconfig.get_paths()["stdlib"],
        sysconfig.get_paths()["purelib"],
        *site.getsitepackages(),
        str(REPO),
    ]
    saved = {
        folder: stat.S_IMODE(os.stat(folder).st_mode) for folder in _blocking_ancestors(needed)
    }
    for folder, mode in saved.items():
        os.chmod(folder, mode | stat.S_IXOTH)
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in ("PYTHONPATH", "PYTHONHOME") and not k.startswith(("COVERAGE_", "COV_CORE_"))
    }
    env["PYTHONPATH"] = str(REPO)
    try:
        probe = subprocess.run(
            [
                "setpriv",
                f"--reuid={service_user.pw_uid}",
                f"--regid={service_user.pw_gid}",
                "--init-groups",
                "--",
                sys.executable,
                "-c",
                "import mailgw.tap, twisted.scripts.twistd",
            ],
            env=env,
            cwd="/",
            capture_output=True,
            text=True,
            check=False,
        )
        assert probe.returncode == 0, f"the service user cannot run mailgw: {probe.stderr}"
        yield env
    finally:
        for folder, mode in saved.items():
            os.chmod(folder, mode)


@pytest.fixture
def workdir() -> Iterator[Path]:
    """A folder the service user can traverse (pytest's tmp_path is root's, mode 0700)."""
    folder = Path(tempfile.mkdtemp(prefix="mailgw-uid-", dir="/tmp"))
    folder.chmod(0o755)
    try:
        yield folder
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def node(
    workdir: Path, user: pwd.struct_passwd, env: dict[str, str], workers: str = "1"
) -> MailgwServer:
    return MailgwServer(
        workdir,
        {"imap": {"workers": workers}},
        launcher=[TWISTD],  # not under coverage: its data file would be written as the user
        twistd_args=["--uid", user.pw_name, "--gid", str(user.pw_gid)],
        env=env,
    )


def uid_of(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("Uid:"):
            return int(line.split()[2])  # real, effective, saved, fs: the effective one
    raise AssertionError(f"no Uid line for {pid}")


def children_of(pid: int) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[1]) == pid:
                found.append(int(entry.name))
    return found


def send(server: MailgwServer, subject: str) -> None:
    with smtplib.SMTP("127.0.0.1", server.ports["mx"], timeout=30) as smtp:
        smtp.sendmail(
            "bob@elsewhere.test",
            ["alice@example.test"],
            f"From: bob@elsewhere.test\r\nSubject: {subject}\r\n\r\nbody of {subject}\r\n".encode(),
        )


def imap_subjects(server: MailgwServer, count: int) -> list[bytes]:
    imap = imaplib.IMAP4("127.0.0.1", server.ports["imap"], timeout=30)
    try:
        imap.login("alice@example.test", PASSWORD)

        def listed() -> list[bytes]:
            typ, data = imap.select("INBOX")
            assert typ == "OK", data
            if int(data[0] or 0) < count:
                return []
            typ, data = imap.fetch(f"1:{count}", "(BODY.PEEK[HEADER.FIELDS (SUBJECT)])")
            assert typ == "OK", data
            return [part[1].strip() for part in data if isinstance(part, tuple)]

        return wait_until(listed, what=f"{count} message(s) over IMAP")
    finally:
        imap.logout()


def pop3_bodies(server: MailgwServer) -> list[bytes]:
    pop = poplib.POP3("127.0.0.1", server.ports["pop3"], timeout=30)
    try:
        pop.user("alice@example.test")
        pop.pass_(PASSWORD)
        count, _ = pop.stat()
        return [b"\n".join(pop.retr(n + 1)[1]) for n in range(count)]
    finally:
        pop.quit()


def not_owned_by(root: Path, uid: int) -> list[str]:
    wrong = []
    for folder, dirs, files in os.walk(root):
        for name in [".", *dirs, *files]:
            path = os.path.join(folder, name)
            st = os.lstat(path)
            if st.st_uid != uid:
                wrong.append(f"{path} uid {st.st_uid}")
    return wrong


def test_uid_switch_on_an_empty_then_an_existing_data_dir(
    service_user: pwd.struct_passwd, reachable: dict[str, str], workdir: Path
) -> None:
    uid = service_user.pw_uid
    server = node(workdir, service_user, reachable)
    assert not server.data_dir.exists()
    server.start()
    try:
        provision(server)  # the admin command as root becomes the data directory's owner
        send(server, "first")
        assert imap_subjects(server, 1) == [b"Subject: first"]
        (body,) = pop3_bodies(server)
        assert b"body of first" in body
        main_pid = server.proc.pid if server.proc else 0
        assert uid_of(main_pid) == uid
        workers = wait_until(lambda: children_of(main_pid), what="an IMAP worker")
        assert [uid_of(pid) for pid in workers] == [uid] * len(workers)
    finally:
        server.stop()
    assert "Traceback" not in server.log(), server.log()[-3000:]
    # The admin command as root, server stopped: what it creates belongs to the user too.
    server.cli("user", "add", "carol@example.test", "--password", "carol password")
    server.cli("store", "reindex", "carol@example.test")
    server.cli("cert", "selfsigned", "--hostname", "localhost")  # into data_dir/tls
    assert (server.data_dir / "mail" / "example.test" / "carol").is_dir()
    assert (server.data_dir / "tls" / "mailgw.key").is_file()
    assert (server.data_dir / "mail" / "example.test" / "alice").is_dir()
    assert (server.data_dir / "spool" / "tmp").is_dir()
    assert not_owned_by(server.data_dir, uid) == []
    assert stat.S_IMODE(server.data_dir.stat().st_mode) == 0o750

    again = node(workdir, service_user, reachable)
    again.start()
    try:
        send(again, "second")
        assert imap_subjects(again, 2) == [b"Subject: first", b"Subject: second"]
        assert len(pop3_bodies(again)) == 2
    finally:
        again.stop()
    assert "Traceback" not in again.log(), again.log()[-3000:]
    assert not_owned_by(again.data_dir, uid) == []


def start_fails(server: MailgwServer) -> str:
    """Start, expect exit != 0 before listening; its output and log."""
    server.start(wait=False)
    proc = server.proc
    assert proc is not None
    assert proc.wait(60) != 0
    output = proc.stdout.read().decode(errors="replace") if proc.stdout else ""
    server.stop()
    return output + server.log()


def test_data_dir_of_someone_else_is_one_clear_line(
    service_user: pwd.struct_passwd, reachable: dict[str, str], workdir: Path
) -> None:
    server = node(workdir, service_user, reachable, workers="0")
    server.data_dir.mkdir()  # root's, as `mkdir` by the administrator leaves it
    out = start_fails(server)
    lines = [line for line in out.splitlines() if line.startswith("mailgw:")]
    assert len(lines) == 1, out
    assert f"{server.data_dir} belongs to root (uid 0)" in lines[0]
    assert f"not to {service_user.pw_name} (uid {service_user.pw_uid})" in lines[0]
    assert "Traceback" not in out
    assert list(server.data_dir.iterdir()) == []  # nothing created in it


def test_state_left_by_a_run_as_root_is_one_clear_line(
    service_user: pwd.struct_passwd, reachable: dict[str, str], workdir: Path
) -> None:
    server = node(workdir, service_user, reachable, workers="0")
    server.data_dir.mkdir()
    os.chown(server.data_dir, service_user.pw_uid, service_user.pw_gid)
    (server.data_dir / "spool").mkdir()  # root's: an earlier `twistd mailgw` as root
    out = start_fails(server)
    lines = [line for line in out.splitlines() if line.startswith("mailgw:")]
    assert len(lines) == 1, out
    assert f"{server.data_dir / 'spool'} (owner root (uid 0), mode 0755)" in lines[0]
    assert "not writable" in lines[0]
    assert "Traceback" not in out


def test_unreadable_tls_key_is_one_clear_line(
    service_user: pwd.struct_passwd,
    reachable: dict[str, str],
    workdir: Path,
    selfsigned: tuple[Path, Path],
) -> None:
    cert, key = selfsigned
    private = workdir / "tls"
    private.mkdir()
    shutil.copy(cert, private / "cert.pem")
    shutil.copy(key, private / "key.pem")
    (private / "key.pem").chmod(0o600)  # root's only: the service user cannot read it
    server = MailgwServer(
        workdir,
        {
            "imap": {"workers": "0"},
            "tls": {
                "certificate": str(private / "cert.pem"),
                "private_key": str(private / "key.pem"),
            },
        },
        launcher=[TWISTD],
        twistd_args=["--uid", service_user.pw_name],
        env=reachable,
    )
    out = start_fails(server)
    lines = [line for line in out.splitlines() if line.startswith("mailgw:")]
    assert len(lines) == 1, out
    assert "tls:private_key: cannot read" in lines[0] and "Permission denied" in lines[0]
    assert "Traceback" not in out
    # Readable by the service user's group (root:GROUP 0640): it starts.
    os.chown(private / "key.pem", 0, service_user.pw_gid)
    (private / "key.pem").chmod(0o640)
    server.start()
    try:
        with smtplib.SMTP("127.0.0.1", server.ports["mx"], timeout=30) as smtp:
            smtp.ehlo()
            assert smtp.has_extn("starttls")
    finally:
        server.stop()
    assert "Traceback" not in server.log(), server.log()[-3000:]
