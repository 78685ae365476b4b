"""In-memory IMessageStore / IMailbox and a session driver for the POP3 tests (the directory and
the transport are the shared ones of ``mailgw.testing.fakes``)."""

from __future__ import annotations

import dataclasses
import io
from dataclasses import dataclass, field
from typing import Any

from twisted.internet.error import ConnectionDone
from twisted.internet.task import Clock
from twisted.python.failure import Failure
from zope.interface import implementer

from mailgw.config.schema import POP3Config
from mailgw.interfaces import IMailbox, IMessageStore, MailboxNotFound
from mailgw.pop3 import POP3Factory, POP3Server
from mailgw.testing.fakes import FakeDirectory, TLSStringTransport, peer_address


@dataclass(frozen=True)
class Info:
    uid: int
    size: int
    flags: frozenset[str] = frozenset()


@dataclass
class _Folder:
    uidvalidity: int
    uidnext: int = 1
    data: dict[int, bytes] = field(default_factory=dict)
    flags: dict[int, set[str]] = field(default_factory=dict)
    recent_uid: int = 0  # the \\Recent claim mark (IMAP)


@implementer(IMailbox)
class FakeMailbox:
    """A view of one in-memory folder; ``messages()`` reflects the folder as of ``refresh``."""

    def __init__(
        self, folder: _Folder, name: str, store: FakeStore | None = None, user: str = ""
    ) -> None:
        self._folder = folder
        self.name = name
        self.store = store
        self.user = user
        self.uidvalidity = folder.uidvalidity
        self.highestmodseq = 1
        self.refresh()
        self.open_error: Exception | None = None
        self.flag_error: Exception | None = None
        self.expunge_error: Exception | None = None
        self.expunged: list[int] = []

    def refresh(self) -> None:
        self.uidnext = self._folder.uidnext

    def messages(self) -> list[Any]:
        return [
            Info(uid, len(data), frozenset(self._folder.flags[uid]))
            for uid, data in sorted(self._folder.data.items())
        ]

    def open_message(self, uid: int) -> Any:
        if self.open_error is not None:
            raise self.open_error
        return io.BytesIO(self._folder.data[uid])

    def read_message(self, uid: int) -> bytes:
        return self._folder.data[uid]

    def set_flags(self, uids: list[int], flags: list[str], mode: str) -> dict[int, Any]:
        if self.flag_error is not None:
            raise self.flag_error
        out = {}
        for uid in uids:
            current = self._folder.flags[uid]
            if mode == "set":
                current.clear()
            if mode == "remove":
                current.difference_update(flags)
            else:
                current.update(flags)
            out[uid] = Info(uid, len(self._folder.data[uid]), frozenset(current))
        return out

    def expunge(self, uids: list[int]) -> list[int]:
        if self.expunge_error is not None:
            raise self.expunge_error
        removed = [uid for uid in uids if self._folder.data.pop(uid, None) is not None]
        for uid in removed:
            del self._folder.flags[uid]
        self.expunged += removed
        return removed

    def append(self, data: bytes, flags: Any = (), internaldate: Any = None) -> int:
        uid = self._folder.uidnext
        self._folder.uidnext += 1
        self._folder.data[uid] = data
        self._folder.flags[uid] = set(flags)
        return uid

    # The rest of IMailbox, in memory (POP3 does not use these; IMAP does).
    def changes_since(self, modseq: int) -> tuple[list[Any], list[int]]:
        return (self.messages() if modseq < self.highestmodseq else []), []

    def copy_to(self, uids: Any, dest: str) -> list[tuple[int, int]]:
        assert self.store is not None, "copy needs a mailbox opened from a FakeStore"
        target = self.store.open_mailbox(self.user, dest)
        return [
            (uid, target.append(self._folder.data[uid], self._folder.flags[uid]))
            for uid in uids
            if uid in self._folder.data
        ]

    def move_to(self, uids: Any, dest: str) -> list[tuple[int, int]]:
        pairs = self.copy_to(uids, dest)
        self.expunge([src for src, _ in pairs])
        return pairs

    def claim_recent(self, uids: Any, ascending: bool = False) -> set[int]:
        claimed = {u for u in uids if u > self._folder.recent_uid}
        if claimed:
            self._folder.recent_uid = max(claimed)
        return claimed

    def unclaimed_recent(self, uids: Any, ascending: bool = False) -> set[int]:
        return {u for u in uids if u > self._folder.recent_uid}

    def recent_count(self) -> int:
        return len(self.unclaimed_recent(self._folder.data))


@implementer(IMessageStore)
class FakeStore:
    def __init__(self) -> None:
        self._folders: dict[tuple[str, str], _Folder] = {}
        self.opened: list[FakeMailbox] = []
        self.open_error: Exception | None = None
        self._listeners: list[Any] = []
        self._subscriptions: dict[str, set[str]] = {}

    def _folder(self, user: str, name: str = "INBOX", create: bool = False) -> _Folder:
        key = (user, name)
        if key not in self._folders:
            if not (create or name == "INBOX"):
                raise MailboxNotFound(name)
            self._folders[key] = _Folder(uidvalidity=1700000000 + len(self._folders))
        return self._folders[key]

    def add(self, user: str, data: bytes) -> int:
        """Test helper: append a message to the user's INBOX."""
        return FakeMailbox(self._folder(user), "INBOX").append(data)

    def contents(self, user: str) -> list[bytes]:
        folder = self._folder(user)
        return [folder.data[uid] for uid in sorted(folder.data)]

    def flags(self, user: str, uid: int) -> set[str]:
        return set(self._folder(user).flags[uid])

    def deliver(
        self,
        user: str,
        content_path: str,
        prefix: bytes = b"",
        folder: str = "INBOX",
        offset: int = 0,
    ) -> int:
        with open(content_path, "rb") as f:
            f.seek(offset)
            data = prefix + f.read()
        uid = FakeMailbox(self._folder(user, folder), folder).append(data)
        for callback in self._listeners:
            callback(user, folder)
        return uid

    def open_mailbox(self, user: str, name: str = "INBOX", snapshot: bool = True) -> FakeMailbox:
        if self.open_error is not None:
            raise self.open_error
        mailbox = FakeMailbox(self._folder(user, name), name, self, user)
        self.opened.append(mailbox)
        return mailbox

    def append_messages(self, user: str, name: str, messages: Any) -> tuple[int, list[int]]:
        box = self.open_mailbox(user, name, snapshot=False)
        return box.uidvalidity, [box.append(data, flags, when) for data, flags, when in messages]

    def list_mailboxes(self, user: str) -> list[str]:
        names = sorted(name for (u, name) in self._folders if u == user and name != "INBOX")
        return ["INBOX", *names]

    def create_mailbox(self, user: str, name: str) -> None:
        if (user, name) in self._folders:
            raise ValueError(f"{name} exists")
        self._folder(user, name, create=True)

    def write_refusal(self) -> str | None:
        return None

    def quota_usage(self, user: str) -> tuple[int, int | None]:
        return sum(
            len(d) for (u, _), f in self._folders.items() if u == user for d in f.data.values()
        ), None

    def reindex(self, user: str) -> int:
        return sum(len(f.data) for (u, _), f in self._folders.items() if u == user)

    def add_listener(self, callback: Any) -> None:
        self._listeners.append(callback)

    # The rest of IMessageStore, in memory (POP3 does not use these; IMAP does).
    def delete_mailbox(self, user: str, name: str) -> None:
        if name == "INBOX":
            raise ValueError("INBOX cannot be deleted")
        if self._folders.pop((user, name), None) is None:
            raise MailboxNotFound(name)

    def rename_mailbox(self, user: str, old: str, new: str) -> None:
        if (user, new) in self._folders:
            raise ValueError(f"{new} exists")
        self._folders[(user, new)] = self._folder(user, old)
        if old == "INBOX":
            self._folders[(user, old)] = _Folder(uidvalidity=1800000000 + len(self._folders))
        else:
            del self._folders[(user, old)]

    def set_subscribed(self, user: str, name: str, subscribed: bool) -> None:
        subs = self._subscriptions.setdefault(user, set())
        (subs.add if subscribed else subs.discard)(name)

    def list_subscribed(self, user: str) -> list[str]:
        return sorted(self._subscriptions.get(user, set()))

    def mailbox_status(self, user: str, name: str) -> Any:
        folder = self._folder(user, name)
        unseen = sum(1 for uid in folder.data if "\\Seen" not in folder.flags[uid])
        return {"messages": len(folder.data), "uidnext": folder.uidnext, "unseen": unseen}


ALICE = "alice@example.test"
BOB = "bob@example.test"
PASSWORDS = {ALICE: "alice secret", BOB: "bob-pw"}


class Session:
    """Drives one POP3Server over a StringTransport; producers are pumped to completion."""

    def __init__(self, factory: POP3Factory, peer: str = "192.0.2.7") -> None:
        self.factory = factory
        self.transport = TLSStringTransport(peerAddress=peer_address(peer))
        self.proto: POP3Server = factory.buildProtocol(None)
        self.proto.makeConnection(self.transport)
        self.greeting = self.take()

    def take(self) -> bytes:
        out = self.transport.value()
        self.transport.clear()
        return out

    def pump(self) -> None:
        while self.transport.producer is not None:
            self.transport.producer.resumeProducing()

    def send(self, data: bytes) -> bytes:
        self.proto.dataReceived(data)
        self.pump()
        return self.take()

    def cmd(self, line: str) -> str:
        return self.send(line.encode() + b"\r\n").decode("utf-8", "replace")

    def login(self, user: str = ALICE, password: str | None = None) -> str:
        self.cmd(f"USER {user}")
        return self.cmd(f"PASS {password if password is not None else PASSWORDS[user]}")

    @property
    def closed(self) -> bool:
        return bool(self.transport.disconnecting)

    def lose(self) -> None:
        self.proto.connectionLost(Failure(ConnectionDone()))


class Env:
    def __init__(self) -> None:
        self.clock = Clock()
        self.store = FakeStore()
        self.directory = FakeDirectory(PASSWORDS)
        self.config = POP3Config()
        self.tls_options: Any = None
        self.implicit_tls = False

    def factory(self, **config: Any) -> POP3Factory:
        return POP3Factory(
            dataclasses.replace(self.config, **config),
            "pop.example.test",
            self.store,
            self.directory,
            self.clock,
            tls_options=self.tls_options,
            implicit_tls=self.implicit_tls,
            auth_failure_delay=2.0,
        )

    def session(
        self, peer: str = "127.0.0.1", factory: POP3Factory | None = None, **config: Any
    ) -> Session:
        return Session(factory or self.factory(**config), peer)
