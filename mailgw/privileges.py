"""Running as root on behalf of an unprivileged user: the data directory's owner and acting as it.

``twistd --uid U --gid G mailgw`` builds the application as root and drops privileges only
afterwards (after binding the listeners). Everything mailgw creates while being built
(``directory.sqlite`` and its WAL, ``spool/*``, ``mail/``, tier 2, relay state) is therefore
created while acting as U/G (effective ids, :func:`acting_as`), so it belongs to the user the
server then runs as; the IMAP workers, the I/O thread pool and the per-user Maildirs and index
files come after the switch and belong to it anyway. A data directory that belongs to someone
else stops start-up with one line naming the path and its owner, never a traceback.

The admin command run by root on a data directory owned by another user becomes that user
(:func:`data_owner`, :func:`become`), so what it creates stays usable by the server.
"""

from __future__ import annotations

import contextlib
import grp
import os
import pwd
import stat
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

STATE_ENTRIES = (
    "directory.sqlite",
    "directory.sqlite-wal",
    "directory.sqlite-shm",
    "spool",
    "mail",
    "relay",
    "dkim",
    "tls",
    "journal",
    "quarantine",
)
"""What mailgw keeps directly under ``[server] data_dir`` (``[store] tier2_dir`` besides)."""


class OwnershipError(Exception):
    """The data directory cannot be used by the user mailgw runs as; ``str()`` is one line."""


@dataclass(frozen=True)
class Identity:
    """A user and group to run as."""

    uid: int
    gid: int

    @property
    def user(self) -> str:
        return user_name(self.uid)

    @property
    def group(self) -> str:
        return group_name(self.gid)

    def __str__(self) -> str:
        return f"{self.user} (uid {self.uid})"


def user_name(uid: int) -> str:
    """The login name of ``uid``, or the number when it has none."""
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return str(uid)


def group_name(gid: int) -> str:
    """The name of group ``gid``, or the number when it has none."""
    try:
        return grp.getgrgid(gid).gr_name
    except KeyError:
        return str(gid)


def describe(path: str) -> str:
    """``PATH (owner root (uid 0), mode 0755)`` for error messages."""
    try:
        st = os.stat(path)
    except OSError as e:
        return f"{path} ({e.strerror})"
    return f"{path} (owner {user_name(st.st_uid)} (uid {st.st_uid}), mode {stat.S_IMODE(st.st_mode):04o})"


def switch_target(uid: int | None, gid: int | None, real_uid: int | None = None) -> Identity | None:
    """The user ``twistd --uid/--gid`` switches to after building the application, when root
    switches to another user; None when nothing is switched (or only the group: root can still
    write everything it created). ``gid`` defaults to the user's primary group, as in twistd."""
    if (os.getuid() if real_uid is None else real_uid) != 0:
        return None
    if uid is None or uid == 0:
        return None
    if gid is None:
        try:
            gid = pwd.getpwuid(uid).pw_gid
        except KeyError:
            raise OwnershipError(f"uid {uid} has no passwd entry: give --gid as well") from None
    return Identity(uid, gid)


def _groups_of(who: Identity) -> list[int]:
    try:
        name = pwd.getpwuid(who.uid).pw_name
    except KeyError:
        return [who.gid]
    return os.getgrouplist(name, who.gid)


@contextlib.contextmanager
def acting_as(who: Identity) -> Iterator[None]:
    """Effective uid, gid and groups of ``who`` inside the block (files created there belong to
    it, access is checked as it); root's again afterwards. Needs root."""
    saved_groups, saved_egid = os.getgroups(), os.getegid()
    os.setgroups(_groups_of(who))
    os.setegid(who.gid)
    os.seteuid(who.uid)
    try:
        yield
    finally:
        os.seteuid(0)
        os.setegid(saved_egid)
        os.setgroups(saved_groups)


def become(who: Identity) -> None:
    """Switch the whole process to ``who`` for good (the admin command). Needs root."""
    os.setgroups(_groups_of(who))
    os.setgid(who.gid)
    os.setuid(who.uid)


def data_owner(data_dir: str) -> Identity | None:
    """The user root should act as on ``data_dir``: its owner when that is not root (with the
    owner's primary group when known, else the directory's group); None when not running as
    root, or the directory is root's or missing."""
    if os.geteuid() != 0:
        return None
    try:
        st = os.stat(data_dir)
    except OSError:
        return None
    if st.st_uid == 0:
        return None
    try:
        gid = pwd.getpwuid(st.st_uid).pw_gid
    except KeyError:
        gid = st.st_gid
    return Identity(st.st_uid, gid)


def prepare_data_dir(data_dir: str, who: Identity, extra: Iterable[str] = ()) -> None:
    """As root, before acting as ``who``: create a missing ``data_dir`` (mode 0750) owned by
    ``who``; refuse one that belongs to someone else. ``extra`` (tier 2 outside the data
    directory): the same ownership rule when it exists. Raises OwnershipError."""
    if not os.path.lexists(data_dir):
        parent = os.path.dirname(os.path.abspath(data_dir))
        try:
            os.makedirs(parent, exist_ok=True)
            os.mkdir(data_dir, 0o750)
            os.chown(data_dir, who.uid, who.gid)
        except OSError as e:
            raise OwnershipError(f"cannot create {data_dir}: {e.strerror}") from None
    for path in (data_dir, *extra):
        try:
            st = os.stat(path)
        except FileNotFoundError:
            continue
        except OSError as e:
            raise OwnershipError(f"{path}: {e.strerror}") from None
        if st.st_uid != who.uid:
            raise OwnershipError(
                f"{path} belongs to {user_name(st.st_uid)} (uid {st.st_uid}), not to {who} that"
                f" mailgw runs as: chown -R {who.user}:{who.group} {path}"
            )


def check_usable(data_dir: str, who: Identity, extra: Iterable[str] = ()) -> None:
    """As the user mailgw runs as (after :func:`acting_as`, or run by it directly): the data
    directory is reachable and writable, and so is every state entry in it (an entry left by a
    run as root is not). Raises OwnershipError naming the path, its owner and mode."""
    for ancestor in _ancestors(os.path.abspath(data_dir)):
        if not os.path.exists(ancestor):
            return  # created by mailgw (or reported) later
        if not os.access(ancestor, os.X_OK, effective_ids=True):
            raise OwnershipError(
                f"{data_dir} is out of reach of {who}: {describe(ancestor)} cannot be traversed"
            )
    paths = [data_dir, *(os.path.join(data_dir, name) for name in STATE_ENTRIES), *extra]
    for path in paths:
        try:
            st = os.stat(path)
        except FileNotFoundError:
            continue
        except OSError as e:
            raise OwnershipError(f"{path}: {e.strerror}") from None
        need = os.W_OK | os.R_OK | (os.X_OK if stat.S_ISDIR(st.st_mode) else 0)
        if not os.access(path, need, effective_ids=True):
            raise OwnershipError(f"{describe(path)} is not writable by {who}")


def current_identity() -> Identity:
    """The effective user and group of this process."""
    return Identity(os.geteuid(), os.getegid())


def _ancestors(path: str) -> list[str]:
    """``/a/b/c`` -> ``["/", "/a", "/a/b"]``: the directories to traverse to reach ``path``."""
    parts: list[str] = []
    parent = os.path.dirname(path)
    while True:
        parts.append(parent)
        if parent == os.path.dirname(parent):
            break
        parent = os.path.dirname(parent)
    return list(reversed(parts))
