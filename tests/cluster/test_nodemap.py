"""The user -> node map in the directory database, and the mailbox move (locked copy)."""

from __future__ import annotations

from pathlib import Path

import pytest

from mailgw.cluster.move import move_mailbox
from mailgw.cluster.nodemap import DirectoryMailboxMap, hashed_node
from mailgw.store import MessageStore


def test_hash_is_stable_and_spreads(tmp_path: Path) -> None:
    nodes = ["be1", "be2"]
    assert hashed_node("Alice@Example.test", nodes) == hashed_node("alice@example.test", nodes)
    chosen = {hashed_node(f"u{i}@example.test", nodes) for i in range(50)}
    assert chosen == {"be1", "be2"}
    with pytest.raises(ValueError):
        hashed_node("a@b", [])


def test_first_lookup_pins_the_node(tmp_path: Path) -> None:
    path = str(tmp_path / "directory.sqlite")
    m = DirectoryMailboxMap(path, ["be1", "be2"])
    first = m.get("alice@example.test")
    assert first == hashed_node("alice@example.test", ["be1", "be2"])
    # A node added later does not move an existing user; another process sees the same.
    other = DirectoryMailboxMap(path, ["be1", "be2", "be3", "be4", "be5"])
    assert other.get("alice@example.test") == first
    other.set_node("alice@example.test", "be5")
    assert m.get("ALICE@example.test") == "be5"
    with pytest.raises(ValueError):
        m.set_node("alice@example.test", "be9")
    assert not m.held("alice@example.test")
    m.set_held("bob@example.test", True)  # no row yet: assigned, then held
    assert other.held("bob@example.test")
    assert other.get("bob@example.test") in ("be1", "be2")
    m.set_held("bob@example.test", False)
    assert not other.held("bob@example.test")
    m.close()
    other.close()


class RecordingMap(DirectoryMailboxMap):
    """Records the order of holds and switches."""

    def __init__(self, path: str, nodes: list[str]) -> None:
        super().__init__(path, nodes)
        self.events: list[str] = []

    def set_held(self, user: str, held: bool) -> None:
        self.events.append(f"held={held}")
        super().set_held(user, held)

    def set_node(self, user: str, node: str) -> None:
        self.events.append(f"node={node}")
        super().set_node(user, node)


def store(root: Path) -> MessageStore:
    return MessageStore(str(root), quota_for=lambda _: None, default_folders=("Archive",))


def test_move_copies_folders_flags_and_late_arrivals(tmp_path: Path) -> None:
    user = "alice@example.test"
    m = RecordingMap(str(tmp_path / "d.sqlite"), ["be1", "be2"])
    m.set_node(user, "be1")
    src, dst = store(tmp_path / "be1"), store(tmp_path / "be2")
    msg = tmp_path / "m.eml"
    msg.write_bytes(b"Subject: one\r\n\r\n1\r\n")
    src.deliver(user, str(msg))
    src.create_mailbox(user, "Work")
    src.append_messages(
        user, "Work", [(b"Subject: two\r\n\r\n2\r\n", ["\\Seen", "\\Flagged"], None)]
    )
    sleeps: list[float] = []

    def sleep(seconds: float) -> None:
        sleeps.append(seconds)
        if len(sleeps) == 2:  # after the switch: a delivery that was in flight lands late
            msg.write_bytes(b"Subject: late\r\n\r\n3\r\n")
            src.deliver(user, str(msg))

    report = move_mailbox(user, "be2", m, src, dst, settle=1.5, sleep=sleep)
    assert m.events == ["node=be1", "held=True", "node=be2", "held=False"]
    assert sleeps == [1.5, 1.5]
    assert report.copied == {"INBOX": 2, "Work": 1}
    assert report.expunged == 3
    assert m.get(user) == "be2" and not m.held(user)
    inbox = dst.open_mailbox(user, "INBOX")
    subjects = sorted(inbox.read_message(i.uid).split(b"\r\n")[0] for i in inbox.messages())
    assert subjects == [b"Subject: late", b"Subject: one"]
    [work] = dst.open_mailbox(user, "Work").messages()
    assert work.flags == frozenset({"\\Seen", "\\Flagged"})
    assert src.open_mailbox(user, "INBOX").messages() == []
    with pytest.raises(ValueError):
        move_mailbox(user, "be2", m, src, dst, sleep=lambda s: None)


def test_a_failed_copy_releases_the_hold_and_keeps_the_node(tmp_path: Path) -> None:
    user = "alice@example.test"
    m = RecordingMap(str(tmp_path / "d.sqlite"), ["be1", "be2"])
    m.set_node(user, "be1")

    class Broken:
        def list_mailboxes(self, user: str) -> list[str]:
            raise OSError(5, "I/O error")

    with pytest.raises(OSError):
        move_mailbox(user, "be2", m, Broken(), Broken(), sleep=lambda s: None)
    assert m.get(user) == "be1" and not m.held(user)
    assert m.events[-1] == "held=False"


def test_cluster_config_values(tmp_path: Path) -> None:
    from mailgw.config import ConfigError, load

    path = tmp_path / "m.ini"
    path.write_text(
        "[cluster]\nnode_name = gw1\nmailbox_nodes = be1=127.0.0.2:8024 be2=[::1]:8024\n"
        "lmtp_source_address = 127.0.0.11\nsmtp_server = 127.0.0.11:10587\n"
    )
    c = load(str(path)).cluster
    assert c.mailbox_nodes == (("be1", "127.0.0.2", 8024), ("be2", "::1", 8024))
    assert c.lmtp_source_address == "127.0.0.11"
    for bad in (
        "mailbox_nodes = be1",
        "mailbox_nodes = be1=127.0.0.2",
        "mailbox_nodes = be1=127.0.0.2:0",
        "mailbox_nodes = be1=h:1 be1=h:2",
        "lmtp_source_address = gw1",
        "smtp_server = 127.0.0.1",
    ):
        path.write_text(f"[cluster]\n{bad}\n")
        with pytest.raises(ConfigError):
            load(str(path))
