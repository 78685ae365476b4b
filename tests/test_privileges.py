"""mailgw.privileges and tap.build_as: who twistd switches to, the data directory's owner and
access checks, acting as another user (in a child process), one-line errors."""

from __future__ import annotations

import os
import pwd
import shutil
import stat
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from mailgw import privileges
from mailgw.privileges import Identity, OwnershipError
from mailgw.tap import build_as

NOBODY = pwd.getpwnam("nobody")


@pytest.fixture
def open_tmp() -> Iterator[Path]:
    """A folder under /tmp that other users can traverse (pytest's tmp_path is in a 0700 one)."""
    folder = Path(tempfile.mkdtemp(prefix="mailgw-priv-", dir="/tmp"))
    folder.chmod(0o755)
    try:
        yield folder
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def test_switch_target_follows_twistd() -> None:
    assert privileges.switch_target(None, None, real_uid=0) is None
    assert privileges.switch_target(0, 0, real_uid=0) is None  # stays root
    assert privileges.switch_target(None, 100, real_uid=0) is None  # group only
    assert privileges.switch_target(NOBODY.pw_uid, None, real_uid=1000) is None  # not root
    who = privileges.switch_target(NOBODY.pw_uid, None, real_uid=0)
    assert who == Identity(NOBODY.pw_uid, NOBODY.pw_gid)  # twistd: the user's primary group
    assert privileges.switch_target(NOBODY.pw_uid, 5, real_uid=0) == Identity(NOBODY.pw_uid, 5)


def test_switch_target_of_a_uid_without_passwd_entry_needs_a_gid() -> None:
    unknown = next(u for u in range(54321, 60000) if _no_user(u))
    with pytest.raises(OwnershipError, match=f"uid {unknown} has no passwd entry"):
        privileges.switch_target(unknown, None, real_uid=0)
    assert privileges.switch_target(unknown, 7, real_uid=0) == Identity(unknown, 7)
    assert str(Identity(unknown, 7)) == f"{unknown} (uid {unknown})"


def _no_user(uid: int) -> bool:
    try:
        pwd.getpwuid(uid)
    except KeyError:
        return True
    return False


def me() -> Identity:
    return Identity(os.getuid(), os.getgid())


def test_prepare_creates_a_missing_data_dir_for_its_user(tmp_path: Path) -> None:
    data = tmp_path / "a" / "data"
    privileges.prepare_data_dir(str(data), me())
    st = data.stat()
    assert (st.st_uid, st.st_gid) == (os.getuid(), os.getgid())
    assert stat.S_IMODE(st.st_mode) == 0o750


def test_prepare_refuses_a_data_dir_of_someone_else(tmp_path: Path) -> None:
    other = Identity(os.getuid() + 1, os.getgid())
    with pytest.raises(OwnershipError) as raised:
        privileges.prepare_data_dir(str(tmp_path), other)
    message = str(raised.value)
    owner = pwd.getpwuid(os.getuid()).pw_name
    assert message.startswith(f"{tmp_path} belongs to {owner} (uid {os.getuid()}), not to ")
    assert f"chown -R {other.user}:{other.group} {tmp_path}" in message
    assert "\n" not in message


def test_prepare_checks_tier2_outside_the_data_dir(tmp_path: Path) -> None:
    data, tier2 = tmp_path / "data", tmp_path / "tier2"
    data.mkdir()
    tier2.mkdir()
    privileges.prepare_data_dir(str(data), me(), [str(tier2), str(tmp_path / "missing")])
    if os.getuid() == 0:
        os.chown(tier2, NOBODY.pw_uid, NOBODY.pw_gid)
        with pytest.raises(OwnershipError, match=f"^{tier2} belongs to nobody"):
            privileges.prepare_data_dir(str(data), me(), [str(tier2)])


def in_child(who: Identity, check: Any) -> str:
    """Run ``check()`` in a forked child acting as ``who``; its OwnershipError text or ''."""
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child's coverage is not saved
        os.close(read)
        code = 0
        try:
            with privileges.acting_as(who):
                check()
        except OwnershipError as e:
            os.write(write, str(e).encode())
            code = 1
        except BaseException as e:
            os.write(write, repr(e).encode())
            code = 2
        os._exit(code)
    os.close(write)
    with os.fdopen(read, "rb") as f:
        text = f.read().decode()
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) in (0, 1), text
    return text


def test_check_usable_names_an_entry_the_user_cannot_write(open_tmp: Path) -> None:
    data = open_tmp / "data"
    spool = data / "spool"
    spool.mkdir(parents=True)
    (data / "directory.sqlite").write_bytes(b"")
    (data / "unrelated-backup").mkdir(mode=0o500)  # not mailgw's: not checked
    if os.getuid() == 0:
        open_tmp.chmod(0o755)
        os.chown(data, NOBODY.pw_uid, NOBODY.pw_gid)
        os.chown(data / "directory.sqlite", NOBODY.pw_uid, NOBODY.pw_gid)
        who = Identity(NOBODY.pw_uid, NOBODY.pw_gid)
        assert in_child(who, lambda: privileges.check_usable(str(data), who)) != ""
        os.chown(spool, NOBODY.pw_uid, NOBODY.pw_gid)
        assert in_child(who, lambda: privileges.check_usable(str(data), who)) == ""
        os.chown(spool, 0, 0)
        message = in_child(who, lambda: privileges.check_usable(str(data), who))
    else:
        privileges.check_usable(str(data), me())
        spool.chmod(0o500)
        try:
            with pytest.raises(OwnershipError) as raised:
                privileges.check_usable(str(data), me())
        finally:
            spool.chmod(0o700)
        message = str(raised.value)
    assert message.startswith(f"{spool} (owner ")
    assert "is not writable by" in message


def test_check_usable_names_the_folder_that_cannot_be_traversed(open_tmp: Path) -> None:
    if os.getuid() != 0:
        pytest.skip("needs root to act as another user")
    open_tmp.chmod(0o755)
    closed = open_tmp / "closed"
    (closed / "data").mkdir(parents=True)
    closed.chmod(0o700)
    who = Identity(NOBODY.pw_uid, NOBODY.pw_gid)
    message = in_child(who, lambda: privileges.check_usable(str(closed / "data"), who))
    assert message == (
        f"{closed / 'data'} is out of reach of nobody (uid {NOBODY.pw_uid}):"
        f" {closed} (owner root (uid 0), mode 0700) cannot be traversed"
    )


def test_acting_as_creates_files_for_the_user_and_comes_back(open_tmp: Path) -> None:
    if os.getuid() != 0:
        pytest.skip("needs root to act as another user")
    open_tmp.chmod(0o777)
    who = Identity(NOBODY.pw_uid, NOBODY.pw_gid)
    made = open_tmp / "made"
    assert in_child(who, lambda: made.write_bytes(b"x")) == ""
    assert (made.stat().st_uid, made.stat().st_gid) == (NOBODY.pw_uid, NOBODY.pw_gid)


class _Config:
    """The few config fields build_as reads."""

    def __init__(self, data_dir: Path, tier2: str = "") -> None:
        self.path = str(data_dir.parent / "mailgw.ini")
        self.server = type("S", (), {"data_dir": str(data_dir)})()
        self.store = type("T", (), {"tier2_dir": tier2})()


def test_build_as_without_switch_builds_directly(tmp_path: Path) -> None:
    built: list[Any] = []
    config = _Config(tmp_path / "data")
    result = build_as(config, "reactor", None, None, lambda c, r: built.append((c, r)) or "svc")
    assert result == "svc" and built == [(config, "reactor")]


def test_build_as_reports_an_unusable_data_dir_in_one_line(tmp_path: Path) -> None:
    if os.getuid() != 0:
        pytest.skip("needs root: twistd --uid")
    data = tmp_path / "data"
    data.mkdir()  # root's
    config = _Config(data)
    with pytest.raises(SystemExit) as raised:
        build_as(config, None, NOBODY.pw_uid, None, lambda c, r: pytest.fail("built"))
    assert str(raised.value) == (
        f"mailgw: {config.path}:server:data_dir: {data} belongs to root (uid 0), not to"
        f" nobody (uid {NOBODY.pw_uid}) that mailgw runs as: chown -R nobody:"
        f"{privileges.group_name(NOBODY.pw_gid)} {data}"
    )
