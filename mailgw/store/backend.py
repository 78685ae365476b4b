"""The seam between the store facade and the backend that holds tier-1 message bytes.

``mailgw.store.facade.MessageStore`` (the ``IMessageStore`` facade: users, quota, UIDs and
modseqs in the per-user SQLite index, listeners, tiering) and ``mailgw.store.mailbox.Mailbox``
keep every message's row in the index; where the bytes of a tier-1 message live is the
backend's business, behind ``IMessageBackend``: today ``mailgw.store.tier1.MaildirBackend``
(Dovecot-compatible Maildir++ files). Tier 2 (``mailgw.store.tier2.Tier2Placement``: blobs
and manifests) sits beside it and reaches tier-1 files only through this interface.

Rules every backend keeps: the index is the facade's, the backend changes rows only where a
method says so (``place``, ``make_durable``, ``record_mtimes``, ``sync``), always inside the
index's write transaction it is given or opens itself, and journals each such change there
(``journal``); a file operation done in a write transaction is the one the transaction
commits (a crash in between is repaired by ``sync``); and methods are called with the
user's lock (``UserHandle.lock``) held unless they say otherwise.
"""

from __future__ import annotations

import sqlite3
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, BinaryIO, Protocol

from zope.interface import Attribute, Interface

from mailgw.interfaces import MailboxNotFound
from mailgw.model.message import MessageInfo, StoreCheck
from mailgw.store.index import UserIndex


class SizedReader(Protocol):
    """A message given as a file (an IMAP literal spooled to disk): read from its position
    to its end, whose size ``len()`` gives."""

    def read(self, n: int = -1, /) -> bytes: ...

    def __len__(self) -> int: ...


MessageData = bytes | SizedReader

# A message file written and fsynced, not yet placed: (name head, temporary path, size,
# virtual size, mtime).
Written = tuple[str, str, int, int, float]

# Called by ``place`` inside its write transaction with the message's size: checks the quota
# and hands out (UID, modseq), counting the folder's totals up (the facade's ``_allocate``).
Allocate = Callable[[sqlite3.Connection, int], tuple[int, int]]


@dataclass(frozen=True)
class Folder:
    """A folder as resolved from the index: its row id, canonical name and directory."""

    id: int
    name: str
    path: str


class UserHandle:
    """A user's open index. Folder names are resolved from the index each time (another
    process may rename, delete or re-create a folder at any moment)."""

    def __init__(self, name: str, path: str, index: UserIndex) -> None:
        self.name = name
        self.path = path
        self.index = index

    @property
    def lock(self) -> threading.RLock:
        return self.index.lock


def folder_gone(folder: Folder) -> MailboxNotFound:
    """The error for a folder deleted or renamed since it was resolved."""
    return MailboxNotFound(folder.name)


class IMessageBackend(Interface):
    """Tier-1 storage of message bytes and folder directories for the store facade."""

    root = Attribute("The directory all users' mail lives under (str, absolute).")
    journal = Attribute(
        "Where the backend records the index changes it makes itself, in their transactions"
        " (a message placed or taken out again, a resync): the facade's"
        " ``mailgw.journal.store.StoreJournal``, set by the facade; None records nothing."
    )

    # -- users and folders -----------------------------------------------------------

    def user_path(user: str) -> str:
        """The directory of ``user``'s mail (created when missing); its index lives there."""

    def users() -> list[str]:
        """Names (``local@domain``) of every user with an index under ``root``, sorted."""

    def disk_folders(u: UserHandle) -> list[str]:
        """Folder names found in the storage (also those another program made), sorted."""

    def folder_path(u: UserHandle, name: str) -> str:
        """The directory of folder ``name`` (canonical), whether it exists or not."""

    def folder_exists(u: UserHandle, name: str) -> bool:
        """True when the storage holds folder ``name``."""

    def make_folder(u: UserHandle, name: str) -> str:
        """Create folder ``name``'s storage when missing; returns ``folder_path``."""

    def remove_folder(u: UserHandle, f: Folder) -> str:
        """In the write transaction that drops the folder's rows: move its storage aside;
        returns what ``purge`` removes later ("" when there was nothing)."""

    def purge(u: UserHandle, removed: str) -> None:
        """After that commit: make the removal durable and delete what was moved aside."""

    def rename_folder(u: UserHandle, old: str, new: str) -> tuple[str, str]:
        """Rename a folder's storage (in the write transaction renaming its row); returns
        what ``undo_rename`` needs should the transaction fail."""

    def undo_rename(moved: tuple[str, str]) -> None:
        """Take back one ``rename_folder``."""

    def sync_root(u: UserHandle) -> None:
        """Make folder creations, renames and removals of the user durable."""

    def clean_tmp(path: str) -> None:
        """Remove leftovers of crashed writers in the folder (or user) directory ``path``."""

    # -- messages ----------------------------------------------------------------------

    def write(f: Folder, prefix: bytes, src: BinaryIO | None, data: bytes | None) -> Written:
        """Write ``prefix`` followed by ``data`` or ``src``'s remaining bytes to a new
        temporary file of the folder and fsync it (no lock needed)."""

    def place(
        u: UserHandle,
        f: Folder,
        written: Written,
        flags: frozenset[str],
        internaldate: float | None,
        tz: int | None,
        allocate: Allocate,
    ) -> MessageInfo:
        """In one write transaction: ``allocate``, move the written file into the folder,
        insert its row. ``internaldate`` None is the file's mtime, ``tz`` None the server's
        zone. The written file is removed on error. The caller then calls ``make_durable``."""

    def make_durable(u: UserHandle, f: Folder, info: MessageInfo) -> None:
        """fsync what ``place`` did; on failure take the message out again (file, row) and
        raise."""

    def make_durable_many(
        placed: Sequence[tuple[UserHandle, Folder, MessageInfo]],
    ) -> list[tuple[UserHandle, Folder, MessageInfo]]:
        """``make_durable`` for several placed messages at once, with one fsync per
        directory; the messages whose fsync failed are taken out again and returned (the
        error is logged), the others are durable."""

    def store(
        u: UserHandle,
        f: Folder,
        allocate: Allocate,
        prefix: bytes,
        src: BinaryIO | None,
        data: bytes | None,
        flags: frozenset[str],
        internaldate: float | None,
        tz: int | None,
    ) -> MessageInfo:
        """``write``, ``place`` and ``make_durable`` in one call."""

    def open(f: Folder, filename: str) -> BinaryIO:
        """The stored bytes of the message at ``filename``. FileNotFoundError when that
        name is gone (renamed by a flag change, expunged)."""

    def new_tmp(f: Folder) -> str:
        """A fresh temporary path in the folder (to write a message to, then ``adopt``)."""

    def adopt(f: Folder, tmp: str, base: str, filename: str, flags: frozenset[str]) -> str:
        """Move the written temporary file ``tmp`` in as the message ``base`` known by
        ``filename`` (its name before it left tier 1) with ``flags``; returns its new name.
        The caller fsyncs with ``sync_file``."""

    def sync_file(f: Folder, filename: str) -> None:
        """Make the placing of ``filename`` durable."""

    def unlink(f: Folder, filename: str) -> None:
        """Remove a message's bytes, also when a flag change renamed them meanwhile."""

    def discard(f: Folder, filename: str) -> None:
        """Remove a stale copy at exactly ``filename`` if there is one (a leftover of a
        migration to tier 2)."""

    def move(src: Folder, dst: Folder, filename: str, base: str) -> str | None:
        """Move a message's bytes to another folder of the user (in the write transaction
        moving its row); its name there, None when it has vanished. The caller fsyncs with
        ``sync_dirs``."""

    def rename_for_flags(f: Folder, filename: str, flags: frozenset[str]) -> str | None:
        """Make the stored message show ``flags`` (in the write transaction changing its
        row); its name now, None when it has vanished."""

    def sync_dirs(*folders: Folder) -> None:
        """Make the placing, moving and renaming of messages in ``folders`` durable."""

    # -- keeping the index in step with the storage ----------------------------------

    def record_mtimes(c: sqlite3.Connection, u: UserHandle, f: Folder) -> None:
        """After a change of the folder's storage by this writer (in its transaction):
        record that the index matches the storage as it is now."""

    def sync(u: UserHandle, f: Folder, force: bool = False) -> bool:
        """Make the index match the folder's storage if it may have changed since the last
        check (always with ``force``): rows for unknown messages, none for vanished ones.
        True when the index changed. MailboxNotFound when the folder is gone."""

    def check(u: UserHandle, f: Folder, rows: Sequence[Any], report: StoreCheck) -> set[str]:
        """Compare tier-1 rows (uid, base, filename, size) with the storage: missing and
        unknown messages and wrong sizes go into ``report``; the kinds of problem found."""
