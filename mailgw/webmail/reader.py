"""How the webmail reads and changes a user's folders: ``IMailReader`` and its local-store
implementation (``StoreReader``); an IMAP-backed reader plugs in behind the same contract."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from twisted.internet import defer
from zope.interface import Interface, implementer

from mailgw.interfaces import MailboxNotFound
from mailgw.runtime.threads import Runner, run_inline

HEADER_READ_LIMIT = 256 * 1024
"""At most this many bytes are read to find a message's header block."""


@dataclass(frozen=True)
class FolderInfo:
    """A folder as the folder list shows it."""

    name: str
    total: int
    unseen: int


@dataclass(frozen=True)
class Summary:
    """One message of a folder for the message list: UID, flags, size, arrival time."""

    uid: int
    flags: frozenset[str]
    size: int
    internaldate: float


class IMailReader(Interface):
    """A user's mail as the webmail sees it. Every method returns a Deferred; a missing
    folder fails with ``MailboxNotFound``, a missing message with ``KeyError``."""

    def open_session(user: str, password: str) -> None:
        """The user logged in to the webmail with ``password`` (a reader that logs in to a
        mail server as the user keeps it until ``close_session``)."""

    def close_session(user: str) -> defer.Deferred[None]:
        """The user logged out: drop what ``open_session`` kept."""

    def folders(user: str) -> defer.Deferred[list[FolderInfo]]:
        """The user's folders (INBOX first) with their message and unseen counts."""

    def summaries(user: str, folder: str) -> defer.Deferred[list[Summary]]:
        """Every message of ``folder``, by UID (from the index: no message is read)."""

    def headers(user: str, folder: str, uids: Sequence[int]) -> defer.Deferred[dict[int, bytes]]:
        """The header block of each of the messages (UIDs gone meanwhile are left out)."""

    def fetch(user: str, folder: str, uid: int) -> defer.Deferred[bytes]:
        """The message's stored bytes."""

    def fetch_many(user: str, folder: str, uids: Sequence[int]) -> defer.Deferred[dict[int, bytes]]:
        """The stored bytes of each of the messages (UIDs gone meanwhile are left out)."""

    def set_flags(
        user: str, folder: str, uids: Sequence[int], flags: Sequence[str], add: bool
    ) -> defer.Deferred[None]:
        """Add (``add``) or remove ``flags`` on the messages."""

    def move(user: str, folder: str, uids: Sequence[int], dest: str) -> defer.Deferred[None]:
        """Move the messages into ``dest`` (created when missing)."""

    def expunge(user: str, folder: str, uids: Sequence[int]) -> defer.Deferred[None]:
        """Remove the messages for good."""

    def append(user: str, folder: str, data: bytes, flags: Sequence[str]) -> defer.Deferred[int]:
        """Store a message in ``folder`` (created when missing); fires with its UID."""


def header_block(data: bytes) -> bytes:
    """The header section of a message (up to and including the empty line)."""
    for sep in (b"\r\n\r\n", b"\n\n"):
        i = data.find(sep)
        if i >= 0:
            return data[: i + len(sep)]
    return data


@implementer(IMailReader)
class StoreReader:
    """``IMailReader`` over the node's own ``IMessageStore`` (the webmail on the node that
    holds the mailboxes). The store is thread-safe: ``run`` (the node's I/O thread pool in
    the server, ``run_inline`` by default) keeps index reads of big folders and message file
    reads off the reactor thread."""

    def __init__(self, store: Any, run: Runner = run_inline) -> None:
        self.store = store
        self.run = run

    def open_session(self, user: str, password: str) -> None:
        """Nothing to keep: the store needs no credentials."""

    def close_session(self, user: str) -> defer.Deferred[None]:
        return defer.succeed(None)

    def folders(self, user: str) -> defer.Deferred[list[FolderInfo]]:
        return self.run(self._folders, user)

    def _folders(self, user: str) -> list[FolderInfo]:
        out = []
        for name in self.store.list_mailboxes(user):
            try:
                st = self.store.mailbox_status(user, name)
            except (MailboxNotFound, ValueError):
                continue
            out.append(FolderInfo(name, st.messages, st.unseen))
        if not out or out[0].name != "INBOX":
            out.insert(0, FolderInfo("INBOX", 0, 0))
        return out

    def summaries(self, user: str, folder: str) -> defer.Deferred[list[Summary]]:
        return self.run(self._summaries, user, folder)

    def _summaries(self, user: str, folder: str) -> list[Summary]:
        try:
            box = self.store.open_mailbox(user, folder)
        except MailboxNotFound:
            if folder == "INBOX":
                return []
            raise
        return [Summary(i.uid, i.flags, i.size, i.internaldate) for i in box.messages()]

    def headers(
        self, user: str, folder: str, uids: Sequence[int]
    ) -> defer.Deferred[dict[int, bytes]]:
        return self.run(self._headers, user, folder, uids)

    def _headers(self, user: str, folder: str, uids: Sequence[int]) -> dict[int, bytes]:
        box = self.store.open_mailbox(user, folder)
        out = {}
        for uid in uids:
            try:
                with box.open_message(uid) as f:
                    out[uid] = header_block(f.read(HEADER_READ_LIMIT))
            except (KeyError, OSError):
                continue
        return out

    def fetch(self, user: str, folder: str, uid: int) -> defer.Deferred[bytes]:
        return self.run(lambda: bytes(self.store.open_mailbox(user, folder).read_message(uid)))

    def fetch_many(
        self, user: str, folder: str, uids: Sequence[int]
    ) -> defer.Deferred[dict[int, bytes]]:
        def run() -> dict[int, bytes]:
            box = self.store.open_mailbox(user, folder)  # one snapshot for all
            out = {}
            for uid in uids:
                try:
                    out[uid] = bytes(box.read_message(uid))
                except (KeyError, OSError):
                    continue
            return out

        return self.run(run)

    def set_flags(
        self, user: str, folder: str, uids: Sequence[int], flags: Sequence[str], add: bool
    ) -> defer.Deferred[None]:
        def run() -> None:
            self.store.open_mailbox(user, folder).set_flags(uids, flags, "add" if add else "remove")

        return self.run(run)

    def _ensure(self, user: str, folder: str) -> None:
        if folder == "INBOX":
            return
        if folder not in self.store.list_mailboxes(user):
            with contextlib.suppress(ValueError):  # created meanwhile
                self.store.create_mailbox(user, folder)

    def move(self, user: str, folder: str, uids: Sequence[int], dest: str) -> defer.Deferred[None]:
        def run() -> None:
            self._ensure(user, dest)
            self.store.open_mailbox(user, folder).move_to(list(uids), dest)

        return self.run(run)

    def expunge(self, user: str, folder: str, uids: Sequence[int]) -> defer.Deferred[None]:
        def run() -> None:
            self.store.open_mailbox(user, folder).expunge(list(uids))

        return self.run(run)

    def append(
        self, user: str, folder: str, data: bytes, flags: Sequence[str]
    ) -> defer.Deferred[int]:
        def run() -> int:
            self._ensure(user, folder)
            _validity, uids = self.store.append_messages(
                user, folder, [(data, list(flags), time.time())]
            )
            return int(uids[0])

        return self.run(run)
