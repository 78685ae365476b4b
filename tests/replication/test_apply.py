"""The replica's apply logic, in process: a primary store's journal read as the shipper reads
it (``Reader``) and applied to another data directory (``Applier``); both digests equal."""

from __future__ import annotations

import datetime
from pathlib import Path
from typing import Any

import pytest

from mailgw.directory import Directory
from mailgw.model import change as k
from mailgw.replication.apply import Applier, DirectoryReplica, directory_digest
from mailgw.replication.ship import Reader
from mailgw.store import MessageStore
from mailgw.store.blobs import FileBlobStore
from mailgw.store.replica import ReplicaStore

USER = "alice@example.test"


class Node:
    def __init__(self, root: Path, tier2: bool = False) -> None:
        root.mkdir(parents=True)
        self.root = root
        self.directory = Directory(
            str(root / "directory.sqlite"), argon2_time_cost=1, argon2_memory_kib=8192
        )
        blobs = FileBlobStore(str(root / "tier2")) if tier2 else None
        self.store = MessageStore(str(root / "mail"), lambda u: None, tier2=blobs)

    def close(self) -> None:
        self.store.close()
        self.directory.close()


@pytest.fixture
def nodes(tmp_path: Path) -> Any:
    primary, replica = Node(tmp_path / "p", True), Node(tmp_path / "r", True)
    yield primary, replica
    primary.close()
    replica.close()


def ship(primary: Node, replica: Node, after: int = 0, limit: int = 50) -> int:
    """Ship everything after ``after`` in batches of ``limit``; returns the position."""
    reader = Reader(primary.store, primary.directory.path)
    applier = Applier(replica.store, replica.directory.path)
    try:
        position = after
        while True:
            batch = reader.batch(position, limit)
            if batch.upto <= position:
                return position
            for digest in batch.blob_digests:
                assert replica.store.tier2 is not None and primary.store.tier2 is not None
                replica.store.tier2.put(primary.store.tier2.get(digest))
            position = applier.apply_batch(
                {"entries": batch.entries, "upto": batch.upto}, batch.data
            )
            assert position == batch.upto
    finally:
        reader.close()
        applier.close()


def same(primary: Node, replica: Node) -> None:
    assert ReplicaStore(replica.store).digest(USER) == ReplicaStore(primary.store).digest(USER)
    assert directory_digest(replica.directory.path) == directory_digest(primary.directory.path)


def test_every_kind_of_change_is_reproduced(nodes: Any, tmp_path: Path) -> None:
    primary, replica = nodes
    primary.directory.add_domain("example.test")
    primary.directory.add_user(USER, "password one", quota=10_000_000)
    primary.directory.add_alias("postmaster@example.test", USER)
    s = primary.store
    spool = tmp_path / "m.eml"
    for n in range(12):
        spool.write_bytes(b"Subject: %d\r\n\r\nbody %d\r\n" % (n, n))
        s.deliver(USER, str(spool))
    zone = datetime.timezone(datetime.timedelta(hours=-3))
    box = s.open_mailbox(USER, "INBOX")
    box.append(
        b"Subject: x\r\n\r\nappended\r\n",
        ["\\Seen", "$Label"],
        datetime.datetime(2026, 1, 2, 3, 4, 5, tzinfo=zone),
    )
    box.set_flags([1, 2, 3], ["\\Flagged"], "add")
    box.set_flags([2], ["\\Flagged"], "remove")
    box.copy_to([4, 5], "Archive")
    box.move_to([6, 7], "Trash")
    box.expunge([8])
    s.create_mailbox(USER, "Work")
    s.create_mailbox(USER, "Work/Sub")
    s.set_subscribed(USER, "Work", True)
    s.open_mailbox(USER, "INBOX").move_to([9], "Work/Sub")
    s.rename_mailbox(USER, "Work", "Jobs")
    s.create_mailbox(USER, "Gone")
    s.delete_mailbox(USER, "Gone")
    s.migrate_message(USER, "INBOX", 10)
    s.migrate_message(USER, "INBOX", 11)
    s.open_mailbox(USER, "INBOX").copy_to([10], "Archive")  # a copy sharing its blobs
    s.promote_message(USER, "INBOX", 11)
    primary.directory.set_quota(USER, 5_000_000)
    primary.directory.set_password(USER, "password two")
    position = ship(primary, replica, limit=7)
    assert position == s.changes.last_seq()
    same(primary, replica)
    replica_user = replica.directory.get_user(USER)
    assert replica_user is not None and replica_user.quota == 5_000_000
    replica.directory.authenticate(USER, "password two")
    assert "Jobs/Sub" in replica.store.list_mailboxes(USER)
    assert replica.store.list_subscribed(USER).count("Jobs") == 1


def test_applying_again_changes_nothing(nodes: Any, tmp_path: Path) -> None:
    primary, replica = nodes
    spool = tmp_path / "m.eml"
    spool.write_bytes(b"Subject: a\r\n\r\nbody\r\n")
    for _ in range(3):
        primary.store.deliver(USER, str(spool))
    primary.store.open_mailbox(USER).set_flags([1], ["\\Seen"], "add")
    reader = Reader(primary.store, primary.directory.path)
    batch = reader.batch(0)
    reader.close()
    applier = Applier(replica.store, replica.directory.path)
    for _ in range(2):  # the same batch twice (a resend after a lost acknowledgement)
        applier.apply_batch({"entries": batch.entries, "upto": batch.upto}, batch.data)
    # A fresh applier (a restart) skips entries below its durable position.
    again = Applier(replica.store, replica.directory.path)
    assert again.position() == batch.upto
    again.apply_batch({"entries": batch.entries, "upto": batch.upto}, batch.data)
    applier.close()
    again.close()
    same(primary, replica)
    assert len(replica.store.open_mailbox(USER).messages()) == 3


def test_message_gone_before_shipping_only_moves_the_counters(nodes: Any, tmp_path: Path) -> None:
    primary, replica = nodes
    spool = tmp_path / "m.eml"
    spool.write_bytes(b"Subject: a\r\n\r\nbody\r\n")
    primary.store.deliver(USER, str(spool))
    primary.store.deliver(USER, str(spool))
    primary.store.open_mailbox(USER).expunge([1])  # before anything was shipped
    ship(primary, replica)
    same(primary, replica)
    status = replica.store.mailbox_status(USER, "INBOX")
    assert status.messages == 1 and status.uidnext == 3


def test_folder_made_here_first_takes_the_primarys_uidvalidity(nodes: Any) -> None:
    primary, replica = nodes
    primary.store.list_mailboxes(USER)  # the user's folders, journaled as found
    replica.store.list_mailboxes(USER)  # made here too, with other UIDVALIDITYs
    ship(primary, replica)
    same(primary, replica)


def test_changes_to_folders_missing_here_are_marked_applied(nodes: Any) -> None:
    _primary, replica = nodes
    r = ReplicaStore(replica.store)
    r.flags(USER, 5, "Nowhere", 9, [[1, 9, ["\\Seen"]]])
    r.expunged(USER, 6, "Nowhere", [1], 10)
    r.moved(USER, 7, "Nowhere", "INBOX", [[1, 1]], [3], 4, 5)
    r.deleted(USER, 8, "Nowhere")
    r.renamed(USER, 9, "Nowhere", "Somewhere")
    assert r.user_seq(USER) == 9
    assert "Somewhere" not in replica.store.list_mailboxes(USER)


def test_unknown_kinds_are_skipped_but_counted(nodes: Any) -> None:
    _primary, replica = nodes
    applier = Applier(replica.store, replica.directory.path)
    entry = {
        "seq": 4,
        "time": 1.0,
        "kind": "mailbox.resynced",
        "user": USER,
        "folder": "INBOX",
        "payload": {},
    }
    assert applier.apply_batch({"entries": [entry], "upto": 6}, {}) == 6
    applier.close()
    assert Applier(replica.store, replica.directory.path).position() == 6


def test_message_data_must_match_its_digest(nodes: Any) -> None:
    _primary, replica = nodes
    replica.store.list_mailboxes(USER)
    applier = Applier(replica.store, replica.directory.path)
    entry = {
        "seq": 3,
        "time": 1.0,
        "kind": k.MESSAGE_ADDED,
        "user": USER,
        "folder": "INBOX",
        "payload": {"uid": 1, "modseq": 2, "flags": [], "internaldate": 1.0, "tz": 0},
        "ship": {"data": "0" * 64},
    }
    with pytest.raises(ValueError, match="digest"):
        applier.apply_batch({"entries": [entry], "upto": 3}, {"0" * 64: b"tampered"})
    applier.close()
    assert ReplicaStore(replica.store).user_seq(USER) == 0


def test_directory_domain_removed(tmp_path: Path) -> None:
    d = Directory(str(tmp_path / "directory.sqlite"), argon2_time_cost=1, argon2_memory_kib=8192)
    d.add_domain("example.test")
    d.add_user(USER, "password one")
    d.close()
    rep = DirectoryReplica(str(tmp_path / "directory.sqlite"))
    rep.apply(5, {"domain": "example.test", "exists": False})
    rep.apply(4, {"domain": "other.test", "exists": True})  # older than the position: ignored
    assert rep.position() == 5
    rep.close()
    assert directory_digest(str(tmp_path / "directory.sqlite")) == {
        "domains": [],
        "users": [],
        "aliases": [],
        "groups": [],
        "group_members": [],
    }


def resync(primary: Node, replica: Node) -> dict[str, int]:
    """A full resync as the shipper runs it, in process; returns how many entries of each
    kind it needed."""
    reader = Reader(primary.store, primary.directory.path)
    applier = Applier(replica.store, replica.directory.path)
    counts: dict[str, int] = {}
    try:
        start = reader.last_seq()
        applier.begin_resync("primary-node")
        batches = reader.resync_directory(applier.digest(""))
        for user in sorted(set(reader.users()) | set(replica.store.users())):
            batches += reader.resync_user(user, applier.digest(user))
        for batch in batches:
            for digest in batch.blob_digests:
                assert replica.store.tier2 is not None and primary.store.tier2 is not None
                replica.store.tier2.put(primary.store.tier2.get(digest))
            for entry in batch.entries:
                counts[entry["kind"]] = counts.get(entry["kind"], 0) + 1
            applier.apply_batch({"entries": batch.entries, "resync": True}, batch.data)
        assert applier.end_resync(start) == start
        assert not applier.needs_resync("primary-node")
        assert applier.needs_resync("another-node")
    finally:
        reader.close()
        applier.close()
    return counts


def test_full_resync_repairs_a_diverged_replica_copying_only_differences(
    nodes: Any, tmp_path: Path
) -> None:
    primary, replica = nodes
    primary.directory.add_domain("example.test")
    primary.directory.add_user(USER, "password one")
    spool = tmp_path / "m.eml"
    for n in range(10):
        spool.write_bytes(b"Subject: %d\r\n\r\nbody %d\r\n" % (n, n))
        primary.store.deliver(USER, str(spool))
    primary.store.migrate_message(USER, "INBOX", 3)
    primary.store.create_mailbox(USER, "Kept")
    ship(primary, replica)
    same(primary, replica)
    # Diverge: the replica loses a message, gains one, has other flags and a stray folder;
    # the primary changes more while the replica does not hear of it.
    r = replica.store.open_mailbox(USER)
    r.expunge([2])
    r.set_flags([4], ["\\Answered"], "add")
    spool.write_bytes(b"Subject: stray\r\n\r\nonly on the replica\r\n")
    replica.store.deliver(USER, str(spool), folder="INBOX")
    replica.store.create_mailbox(USER, "Stray")
    replica.directory.set_quota(USER, 1234)
    p = primary.store.open_mailbox(USER)
    p.set_flags([5], ["\\Seen"], "add")
    p.move_to([6], "Kept")
    counts = resync(primary, replica)
    same(primary, replica)
    # Only the differences travelled: message 2 again, nothing for the untouched ones.
    assert counts.get(k.MESSAGE_ADDED) == 2  # UID 2, and UID 1 of Kept (the move)
    assert counts.get(k.MAILBOX_DELETED) == 1  # Stray
    # Streaming goes on from the resync's position.
    p.set_flags([1], ["\\Flagged"], "add")
    ship(primary, replica, after=primary.store.changes.last_seq() - 1)
    same(primary, replica)


def test_resync_of_a_user_the_primary_does_not_have(nodes: Any, tmp_path: Path) -> None:
    primary, replica = nodes
    spool = tmp_path / "m.eml"
    spool.write_bytes(b"Subject: a\r\n\r\nbody\r\n")
    replica.store.deliver("ghost@example.test", str(spool))
    resync(primary, replica)
    assert replica.store.open_mailbox("ghost@example.test").messages() == []


def test_oldest_available_is_above_what_retention_pruned(nodes: Any, tmp_path: Path) -> None:
    """Rows go by age while their route segment stays: the reader's oldest complete number
    follows the journal's ``pruned`` mark, not only the segments."""
    primary, _replica = nodes
    for _ in range(3):
        spool = tmp_path / "m"
        spool.write_bytes(b"Subject: x\r\n\r\nx\r\n")
        primary.store.deliver(USER, str(spool))
    reader = Reader(primary.store, primary.directory.path)
    try:
        assert reader.oldest_available() == 1
        sequencer = reader.log.sequencer
        sequencer.begin()
        try:
            sequencer.record_pruned(2)
        finally:
            sequencer.end()
        assert len(sequencer.segments()) == 1
        assert reader.oldest_available() == 3
    finally:
        reader.close()


def test_groups_and_memberships_are_reproduced_and_resynced(nodes: Any) -> None:
    primary, replica = nodes
    d = primary.directory
    d.add_domain("example.test")
    d.add_domain("other.test")
    for user in (USER, "bob@example.test", "carol@other.test"):
        d.add_user(user, "password one")
    d.add_group("finance")
    d.add_group("board")
    d.add_to_group("finance", USER)
    d.add_to_group("finance", "carol@other.test")
    d.add_to_group("board", "bob@example.test")
    ship(primary, replica)
    same(primary, replica)
    assert replica.directory.group_members("finance") == [USER, "carol@other.test"]
    assert replica.directory.in_group("bob@example.test", ("board",))
    after = primary.store.changes.last_seq()
    # A user removed (and so out of its groups), a domain removed, a group removed.
    d.remove_user("bob@example.test")
    d.remove_domain("other.test", force=True)
    d.remove_group("board")
    d.remove_from_group("finance", USER)
    d.add_to_group("finance", USER)
    ship(primary, replica, after=after)
    same(primary, replica)
    assert replica.directory.list_groups() == [("finance", 1)]
    # A diverged replica gets the primary's groups back from a full resync.
    replica.directory.add_group("stray")
    replica.directory.remove_from_group("finance", USER)
    counts = resync(primary, replica)
    same(primary, replica)
    assert counts.get(k.GROUP_ADDED) == 1
    assert replica.directory.group_members("finance") == [USER]
