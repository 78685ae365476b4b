"""The store split's seams: the tier-1 backend contract (``IMessageBackend``), the facade
going through it for every file operation, the tier-2 placement reaching tier-1 files only
through it, and the import layering of ``mailgw.store``."""

from __future__ import annotations

import ast
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from zope.interface import implementer
from zope.interface.verify import verifyClass, verifyObject

from mailgw.interfaces import IMailbox, IMessageStore, QuotaExceeded
from mailgw.model import MailboxStatus, MessageInfo, StoreCheck
from mailgw.store import MessageStore
from mailgw.store.backend import Folder, IMessageBackend, UserHandle
from mailgw.store.blobs import FileBlobStore
from mailgw.store.tier1 import MaildirBackend
from mailgw.store.tier2 import Tier2Placement

USER = "alice@example.test"
MSG = b"From: bob@example.org\r\nSubject: seam\r\n\r\nbody\r\n"


@implementer(IMessageBackend)
class RecordingBackend:
    """Delegates to a real backend and records the names of the methods called on it from
    outside (the facade, ``Mailbox``, the tier-2 placement)."""

    def __init__(self, inner: MaildirBackend) -> None:
        object.__setattr__(self, "_inner", inner)
        object.__setattr__(self, "calls", [])

    def __getattr__(self, name: str) -> Any:
        value = getattr(self._inner, name)
        if not callable(value):
            return value

        def call(*args: Any, **kwargs: Any) -> Any:
            self.calls.append(name)
            return value(*args, **kwargs)

        return call

    def __setattr__(self, name: str, value: Any) -> None:
        setattr(self._inner, name, value)


@pytest.fixture
def backend(tmp_path: Path) -> RecordingBackend:
    return RecordingBackend(MaildirBackend(str(tmp_path / "mail"), hostname="mx.example"))


@pytest.fixture
def store(tmp_path: Path, backend: RecordingBackend) -> Iterator[MessageStore]:
    s = MessageStore(
        str(tmp_path / "mail"),
        lambda user: None,
        hostname="mx.example",
        tier2=FileBlobStore(str(tmp_path / "tier2")),
        backend=backend,
    )
    yield s
    s.close()


def handles(store: MessageStore, name: str = "INBOX") -> tuple[UserHandle, Folder]:
    u = store._user(USER)
    with u.lock:
        return u, store._folder(u, name)


def test_the_maildir_backend_provides_the_interface(tmp_path: Path) -> None:
    assert verifyClass(IMessageBackend, MaildirBackend)
    backend = MaildirBackend(str(tmp_path / "mail"))
    assert verifyObject(IMessageBackend, backend)
    assert backend.root == os.path.abspath(tmp_path / "mail")
    assert backend.journal is None


def test_the_facade_provides_its_interfaces_with_model_types(store: MessageStore) -> None:
    assert verifyObject(IMessageStore, store)
    box = store.open_mailbox(USER)
    assert verifyObject(IMailbox, box)
    uid = box.append(MSG)
    [info] = box.messages()
    assert type(info) is MessageInfo and info.uid == uid
    assert type(store.mailbox_status(USER, "INBOX")) is MailboxStatus
    assert type(store.check(USER)) is StoreCheck


def test_the_facade_uses_the_backend_it_is_given(
    store: MessageStore, backend: RecordingBackend
) -> None:
    assert store.tier1 is backend
    assert store.root == backend.root
    assert backend.journal is store._journal  # the facade hands the backend its journal
    store.open_mailbox(USER)
    assert backend.calls[:2] == ["user_path", "disk_folders"]  # a new user's first use


def test_every_file_operation_of_the_facade_crosses_the_seam(
    store: MessageStore, backend: RecordingBackend, tmp_path: Path
) -> None:
    spool = tmp_path / "spooled"
    spool.write_bytes(MSG)
    uid = store.deliver(USER, str(spool))
    assert {"user_path", "make_folder", "write", "place", "make_durable"} <= set(backend.calls)
    box = store.open_mailbox(USER)
    assert box.read_message(uid) == MSG and "open" in backend.calls
    box.set_flags([uid], ["\\Seen"], "add")
    assert "rename_for_flags" in backend.calls
    store.create_mailbox(USER, "Work")
    assert "folder_exists" in backend.calls
    assert box.copy_to([uid], "Work") and "store" in backend.calls
    assert box.move_to([uid], "Archive") and {"move", "sync_dirs"} <= set(backend.calls)
    store.rename_mailbox(USER, "Work", "Play")
    assert {"rename_folder", "sync_root"} <= set(backend.calls)
    work = store.open_mailbox(USER, "Play")
    assert work.expunge([m.uid for m in work.messages()]) and "unlink" in backend.calls
    store.delete_mailbox(USER, "Play")
    assert {"remove_folder", "purge"} <= set(backend.calls)
    assert store.check(USER).ok and "check" in backend.calls


def test_tier2_moves_reach_tier1_files_only_through_the_backend(
    store: MessageStore, backend: RecordingBackend
) -> None:
    box = store.open_mailbox(USER)
    uid = box.append(MSG, ["\\Flagged"])
    backend.calls.clear()
    assert store.migrate_message(USER, "INBOX", uid)
    assert {"open", "unlink"} <= set(backend.calls)
    backend.calls.clear()
    assert store.promote_message(USER, "INBOX", uid)
    assert {"write", "adopt", "sync_file"} <= set(backend.calls)
    box.refresh()
    [info] = box.messages()
    assert info.blob is None and info.flags == {"\\Flagged"} and box.read_message(uid) == MSG
    u, f = handles(store)
    assert backend.open(f, info.filename).read() == MSG


def test_place_removes_the_written_file_when_allocation_fails(store: MessageStore) -> None:
    backend = store.tier1
    u, f = handles(store)

    def over_quota(c: Any, size: int) -> tuple[int, int]:
        raise QuotaExceeded(f"{size} bytes")

    written = backend.write(f, b"", None, MSG)
    assert os.path.exists(written[1])
    with pytest.raises(QuotaExceeded):
        backend.place(u, f, written, frozenset(), None, None, over_quota)
    assert not os.path.exists(written[1])
    assert os.listdir(os.path.join(f.path, "new")) == []
    assert store.open_mailbox(USER).messages() == []


def test_place_indexes_what_allocate_hands_out(store: MessageStore) -> None:
    backend = store.tier1
    u, f = handles(store)
    seen: list[int] = []

    def allocate(c: Any, size: int) -> tuple[int, int]:
        seen.append(size)
        return store._allocate(c, u, f, None, size)

    info = backend.place(
        u, f, backend.write(f, b"X: 1\r\n", None, MSG), frozenset(), 5.0, 60, allocate
    )
    backend.make_durable(u, f, info)
    assert seen == [len(MSG) + 6]
    assert (info.internaldate, info.internaldate_tz) == (5.0, 60)
    [listed] = store.open_mailbox(USER).messages()
    assert listed == info
    assert backend.open(f, info.filename).read() == b"X: 1\r\n" + MSG


def test_sync_and_check_see_files_changed_behind_the_index(store: MessageStore) -> None:
    backend = store.tier1
    box = store.open_mailbox(USER)
    uid = box.append(MSG)
    u, f = handles(store)
    # Another Maildir program delivers a file and removes ours.
    other = os.path.join(f.path, "new", "1.M1P1Q1.elsewhere,S=4")
    Path(other).write_bytes(b"abcd")
    report = StoreCheck()
    with u.lock, u.index.write() as c:
        rows = c.execute(
            "SELECT uid, base, filename, size FROM messages WHERE mailbox = ?", (f.id,)
        ).fetchall()
    assert backend.check(u, f, rows, report) == {"unknown"}
    assert report.unknown == [(USER, "INBOX", "new/1.M1P1Q1.elsewhere,S=4")]
    [mine] = box.messages()
    os.unlink(os.path.join(f.path, mine.filename))
    with u.lock:
        assert backend.sync(u, f, force=True)
        assert not backend.sync(u, f, force=False)
    box.refresh()
    assert [(m.uid > uid, m.size) for m in box.messages()] == [(True, 4)]


def test_vanished_files_are_reported_as_none(store: MessageStore) -> None:
    backend = store.tier1
    box = store.open_mailbox(USER)
    box.append(MSG)
    store.create_mailbox(USER, "Work")
    u, f = handles(store)
    _, work = handles(store, "Work")
    [info] = box.messages()
    os.unlink(os.path.join(f.path, info.filename))
    assert backend.rename_for_flags(f, info.filename, frozenset({"\\Seen"})) is None
    base = info.filename.split("/", 1)[1]
    assert backend.move(f, work, info.filename, base) is None
    # Through the facade the vanished message is dropped, not given flags.
    assert box.set_flags([info.uid], ["\\Seen"], "add") == {}
    assert box.messages() == []


def test_a_renamed_file_is_found_by_its_base_name(store: MessageStore) -> None:
    backend = store.tier1
    box = store.open_mailbox(USER)
    box.append(MSG)
    store.create_mailbox(USER, "Work")
    u, f = handles(store)
    _, work = handles(store, "Work")
    [info] = box.messages()
    base = info.filename.split("/", 1)[1]
    renamed = backend.rename_for_flags(f, info.filename, frozenset({"\\Seen"}))
    assert renamed == f"cur/{base}:2,S"
    # ``info`` still has the old name: ``move`` finds the file by its base.
    assert backend.move(f, work, info.filename, base) == renamed
    assert os.path.exists(os.path.join(work.path, renamed))


def test_the_placement_needs_a_blob_store(tmp_path: Path) -> None:
    backend = MaildirBackend(str(tmp_path / "mail"))
    store = MessageStore(str(tmp_path / "mail"), lambda user: None, backend=backend)
    placement = store.placement
    assert isinstance(placement, Tier2Placement) and placement.tier1 is backend
    with pytest.raises(OSError, match="tier2_dir is not set"):
        placement.store()
    store.tier2 = FileBlobStore(str(tmp_path / "tier2"))
    assert placement.store() is store.tier2
    store.close()


# -- who may import whom inside mailgw.store -------------------------------------------------

STORE = Path(__file__).resolve().parents[2] / "mailgw" / "store"
# module -> the store modules it must not import (the layers: facade > mailbox > tier2,
# tier1 > backend > rows, index; tier2 sees tier1 only through the backend interface).
FORBIDDEN = {
    "backend": {"facade", "mailbox", "tier1", "tier2"},
    "rows": {"facade", "mailbox", "tier1", "tier2", "backend"},
    "tier1": {"facade", "mailbox", "tier2"},
    "tier2": {"facade", "mailbox", "tier1"},
    "mailbox": {"tier1", "tier2"},
}


def store_imports(module: str) -> set[str]:
    tree = ast.parse((STORE / f"{module}.py").read_text())
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module:
            if node.module == "mailgw.store":
                found.update(alias.name for alias in node.names)
            elif node.module.startswith("mailgw.store."):
                found.add(node.module.split(".")[2])
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.startswith("mailgw.store."):
                    found.add(alias.name.split(".")[2])
    return found


@pytest.mark.parametrize("module", sorted(FORBIDDEN))
def test_store_layers_import_downwards_only(module: str) -> None:
    assert store_imports(module) & FORBIDDEN[module] == set()


def test_the_model_imports_nothing_of_the_layers() -> None:
    model = STORE.parent / "model"

    def check(name: str) -> bool:
        return name.startswith("mailgw.") and not name.startswith("mailgw.model")

    for path in model.glob("*.py"):
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.module:
                assert not check(node.module), (path.name, node.module)
            elif isinstance(node, ast.Import):
                assert not any(check(a.name) for a in node.names), path.name
