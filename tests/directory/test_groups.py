"""Groups in the directory: the schema migration from version 1, add/remove/list, members,
and the membership lookup the rules' ``group`` match makes (``in_group``)."""

from __future__ import annotations

import json
import sqlite3

import pytest

from mailgw.directory import Directory
from mailgw.directory.names import group_name
from mailgw.model import change

FAST = {"argon2_time_cost": 1, "argon2_memory_kib": 8}

# The version-1 schema as earlier releases created it (no groups).
V1 = """
CREATE TABLE domains (name TEXT PRIMARY KEY) WITHOUT ROWID;
CREATE TABLE users (
    name TEXT PRIMARY KEY,
    domain TEXT NOT NULL REFERENCES domains(name),
    password TEXT NOT NULL,
    quota INTEGER,
    enabled INTEGER NOT NULL DEFAULT 1
);
CREATE INDEX users_domain ON users(domain);
CREATE TABLE aliases (
    id INTEGER PRIMARY KEY,
    source TEXT NOT NULL,
    destination TEXT NOT NULL,
    domain TEXT NOT NULL REFERENCES domains(name),
    UNIQUE (source, destination)
);
CREATE INDEX aliases_domain ON aliases(domain);
INSERT INTO domains VALUES ('example.test');
INSERT INTO users(name, domain, password) VALUES ('old@example.test', 'example.test', 'x');
PRAGMA user_version=1;
"""


@pytest.fixture
def path(tmp_path) -> str:
    return str(tmp_path / "data" / "directory.sqlite")


@pytest.fixture
def directory(path):
    d = Directory(path, **FAST)
    d.add_domain("example.test")
    d.add_domain("other.test")
    d.add_user("alice@example.test", "pw")
    d.add_user("bob@example.test", "pw")
    d.add_user("carol@other.test", "pw")
    yield d
    d.close()


def test_a_version_1_database_gains_groups_and_keeps_its_users(tmp_path):
    path = tmp_path / "directory.sqlite"
    db = sqlite3.connect(path)
    db.executescript(V1)
    db.close()
    with Directory(str(path), **FAST) as d:
        assert [u.name for u in d.list_users()] == ["old@example.test"]
        assert d.add_group("Finance") == "finance"
        d.add_to_group("finance", "old@example.test")
        assert d.in_group("old@example.test", ("finance",))
    db = sqlite3.connect(path)
    assert db.execute("PRAGMA user_version").fetchone()[0] == 2
    db.close()


def test_group_names_are_checked_and_lower_cased():
    assert group_name(" Board.EU ") == "board.eu"
    for bad in ("", "-x", "a b", "x" * 65, "é", "a/b"):
        with pytest.raises(ValueError, match="bad group name"):
            group_name(bad)


def test_add_list_members_and_remove(directory):
    directory.add_group("finance")
    directory.add_group("hr")
    with pytest.raises(ValueError, match="already exists"):
        directory.add_group("FINANCE")
    assert directory.add_to_group("Finance", "Bob@Example.test") == ("finance", "bob@example.test")
    directory.add_to_group("finance", "alice@example.test")
    directory.add_to_group("hr", "alice@example.test")
    with pytest.raises(ValueError, match="already in group"):
        directory.add_to_group("finance", "alice@example.test")
    with pytest.raises(ValueError, match="no such group"):
        directory.add_to_group("sales", "alice@example.test")
    with pytest.raises(ValueError, match="no such user"):
        directory.add_to_group("finance", "nobody@example.test")
    assert directory.list_groups() == [("finance", 2), ("hr", 1)]
    assert directory.group_members("finance") == ["alice@example.test", "bob@example.test"]
    assert directory.groups_of("alice@example.test") == ["finance", "hr"]
    assert directory.groups_of("carol@other.test") == []
    with pytest.raises(ValueError, match="no such group"):
        directory.group_members("sales")
    assert directory.remove_from_group("finance", "bob@example.test") == (
        "finance",
        "bob@example.test",
    )
    with pytest.raises(ValueError, match="not in group"):
        directory.remove_from_group("finance", "bob@example.test")
    assert directory.remove_group("finance") == 1
    with pytest.raises(ValueError, match="no such group"):
        directory.remove_group("finance")
    assert directory.groups_of("alice@example.test") == ["hr"]
    assert directory.list_groups() == [("hr", 1)]


def test_in_group(directory):
    directory.add_group("finance")
    directory.add_group("board")
    directory.add_to_group("finance", "alice@example.test")
    assert directory.in_group("alice@example.test", ("finance",))
    assert directory.in_group("Alice@Example.test", ("board", "finance"))
    assert not directory.in_group("alice@example.test", ("board",))
    assert not directory.in_group("alice@example.test", ("nosuchgroup",))
    assert not directory.in_group("alice@example.test", ())
    assert not directory.in_group("bob@example.test", ("finance",))
    assert not directory.in_group("nobody@example.test", ("finance",))


def test_in_group_sees_changes_made_by_another_connection(directory, path):
    """The server's directory has no cache: what ``mailgw group adduser`` (another process,
    another connection) commits counts at the next lookup."""
    directory.add_group("finance")
    assert not directory.in_group("bob@example.test", ("finance",))
    with Directory(path, **FAST) as admin:
        admin.add_to_group("finance", "bob@example.test")
    assert directory.in_group("bob@example.test", ("finance",))
    with Directory(path, **FAST) as admin:
        admin.remove_from_group("finance", "bob@example.test")
    assert not directory.in_group("bob@example.test", ("finance",))


def test_in_group_is_an_indexed_search_not_a_scan(directory):
    directory.add_group("finance")
    plan = directory._query(
        "EXPLAIN QUERY PLAN SELECT 1 FROM group_members WHERE user=? AND grp IN (?, ?) LIMIT 1",
        ("alice@example.test", "finance", "hr"),
    )
    detail = " ".join(str(row[-1]) for row in plan)
    assert detail.startswith("SEARCH group_members USING") and "SCAN" not in detail


def test_removing_a_user_or_its_domain_removes_its_memberships(directory):
    directory.add_group("all")
    for user in ("alice@example.test", "bob@example.test", "carol@other.test"):
        directory.add_to_group("all", user)
    directory.remove_user("alice@example.test")
    assert directory.group_members("all") == ["bob@example.test", "carol@other.test"]
    directory.add_user("alice@example.test", "pw")  # a new user of the same name: no groups
    assert directory.groups_of("alice@example.test") == []
    directory.remove_domain("example.test", force=True)
    assert directory.group_members("all") == ["carol@other.test"]


def test_group_changes_are_journaled(directory, path):
    directory.add_group("finance")
    directory.add_to_group("finance", "bob@example.test")
    directory.remove_from_group("finance", "bob@example.test")
    directory.remove_group("finance")
    db = sqlite3.connect(path)
    rows = db.execute(
        "SELECT kind, user, payload FROM journal WHERE kind LIKE 'group.%' ORDER BY seq"
    ).fetchall()
    db.close()
    assert [(kind, user, json.loads(payload)) for kind, user, payload in rows] == [
        (change.GROUP_ADDED, "", {"group": "finance"}),
        (change.GROUP_MEMBER_ADDED, "", {"group": "finance", "member": "bob@example.test"}),
        (change.GROUP_MEMBER_REMOVED, "", {"group": "finance", "member": "bob@example.test"}),
        (change.GROUP_REMOVED, "", {"group": "finance", "members": 0}),
    ]
