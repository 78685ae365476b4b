"""Tests for mailgw.directory: domains, users, aliases, resolution and passwords."""

from __future__ import annotations

import os
import sqlite3
import stat
from types import SimpleNamespace

import pytest
from twisted.cred.error import UnauthorizedLogin
from twisted.python.failure import Failure

from mailgw.directory import MAX_DEPTH, Directory, User
from mailgw.interfaces import IDirectory
from mailgw.testing.deferreds import fired

FAST = {"argon2_time_cost": 1, "argon2_memory_kib": 8}


@pytest.fixture
def path(tmp_path) -> str:
    return str(tmp_path / "data" / "directory.sqlite")


@pytest.fixture
def directory(path, reactor):
    d = Directory(path, reactor=reactor, **FAST)
    d.add_domain("example.test")
    yield d
    d.close()


# -- schema and files ----------------------------------------------------------------------


def test_provides_interface_and_creates_private_wal_database(directory, path):
    assert IDirectory.providedBy(directory)
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    db = sqlite3.connect(path)
    assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert db.execute("PRAGMA user_version").fetchone()[0] == 2
    db.close()


def test_reopen_keeps_data(directory, path):
    directory.add_user("alice@example.test", "pw")
    directory.close()
    with Directory(path, **FAST) as again:
        assert again.list_domains() == ["example.test"]
        assert again.get_user("alice@example.test") == User("alice@example.test", None, True)


def test_newer_schema_refused(path):
    Directory(path, **FAST).close()
    db = sqlite3.connect(path)
    db.execute("PRAGMA user_version=99")
    db.commit()
    db.close()
    with pytest.raises(ValueError, match="newer"):
        Directory(path, **FAST)


def test_bad_parameters(path):
    with pytest.raises(ValueError):
        Directory(path, default_quota=-1)
    with pytest.raises(ValueError):
        Directory(path, argon2_time_cost=0)
    with pytest.raises(ValueError):
        Directory(path, argon2_memory_kib=4)


# -- domains -------------------------------------------------------------------------------


def test_domains(directory):
    assert directory.add_domain("Other.TEST") == "other.test"
    assert directory.list_domains() == ["example.test", "other.test"]
    assert directory.is_local_domain("other.test")
    assert directory.is_local_domain("OTHER.test")
    assert not directory.is_local_domain("nowhere.test")
    with pytest.raises(ValueError, match="already exists"):
        directory.add_domain("other.test")
    directory.remove_domain("other.test")
    assert directory.list_domains() == ["example.test"]
    with pytest.raises(ValueError, match="no such domain"):
        directory.remove_domain("other.test")


@pytest.mark.parametrize("bad", ["", "exa mple.test", "-bad.test", "[127.0.0.1]", "a..b", "x."])
def test_invalid_domains(directory, bad):
    with pytest.raises(ValueError, match="invalid domain"):
        directory.add_domain(bad)


def test_idn_domain_stored_as_a_labels(directory):
    assert directory.add_domain("Bücher.Example") == "xn--bcher-kva.example"
    assert directory.is_local_domain("xn--bcher-kva.example")
    user = directory.add_user("Jörg@bücher.example", "pw")
    assert user.name == "jörg@xn--bcher-kva.example"
    assert directory.get_user("JÖRG@BÜCHER.example") == user
    assert directory.resolve("jörg@xn--bcher-kva.example") == [user.name]


def test_remove_domain_refused_with_users_unless_forced(directory):
    directory.add_user("alice@example.test", "pw")
    directory.add_alias("info@example.test", "alice@example.test")
    with pytest.raises(ValueError, match="1 user"):
        directory.remove_domain("example.test")
    directory.remove_domain("example.test", force=True)
    assert directory.list_domains() == []
    assert directory.list_users() == []
    assert directory.list_aliases() == []


def test_remove_domain_refused_with_alias_only(directory):
    directory.add_alias("@example.test", "someone@elsewhere.test")
    with pytest.raises(ValueError, match="1 alias"):
        directory.remove_domain("example.test")


# -- users ---------------------------------------------------------------------------------


def test_users(directory):
    alice = directory.add_user("Alice@Example.TEST", "secret", quota=1000)
    assert alice == User("alice@example.test", 1000, True)
    directory.add_domain("other.test")
    directory.add_user("bob@other.test", "pw")
    assert [u.name for u in directory.list_users()] == ["alice@example.test", "bob@other.test"]
    assert directory.list_users("other.test") == [User("bob@other.test", None, True)]
    with pytest.raises(ValueError, match="no such domain"):
        directory.list_users("nowhere.test")
    with pytest.raises(ValueError, match="already exists"):
        directory.add_user("ALICE@example.test", "x")
    assert directory.get_user("ALICE@example.test") == alice
    assert directory.get_user("nobody@example.test") is None
    directory.remove_user("alice@example.test")
    assert directory.get_user("alice@example.test") is None
    with pytest.raises(ValueError, match="no such user"):
        directory.remove_user("alice@example.test")


def test_add_user_validation(directory):
    with pytest.raises(ValueError, match="not a local domain"):
        directory.add_user("alice@nowhere.test", "pw")
    with pytest.raises(ValueError, match="invalid address"):
        directory.add_user("not-an-address", "pw")
    with pytest.raises(ValueError, match="quoted"):
        directory.add_user('"a b"@example.test', "pw")
    with pytest.raises(ValueError, match="empty"):
        directory.add_user("alice@example.test", "")
    with pytest.raises(ValueError, match="line breaks"):
        directory.add_user("alice@example.test", "a\nb")
    with pytest.raises(ValueError, match="longer"):
        directory.add_user("alice@example.test", "x" * 1025)
    with pytest.raises(ValueError, match="invalid quota"):
        directory.add_user("alice@example.test", "pw", quota=-5)
    with pytest.raises(ValueError, match="address literals"):
        directory.add_user("alice@[127.0.0.1]", "pw")
    assert directory.list_users() == []


def test_quota(path):
    with Directory(path, default_quota=5000, **FAST) as d:
        d.add_domain("example.test")
        d.add_user("alice@example.test", "pw")
        assert d.quota_for("alice@example.test") == 5000
        d.set_quota("alice@example.test", 100)
        assert d.quota_for("alice@example.test") == 100
        assert d.get_user("alice@example.test").quota == 100
        d.set_quota("alice@example.test", 0)
        assert d.quota_for("alice@example.test") is None  # 0: unlimited
        d.set_quota("alice@example.test", None)
        assert d.quota_for("alice@example.test") == 5000
        assert d.quota_for("nobody@example.test") == 5000
        with pytest.raises(ValueError, match="invalid quota"):
            d.set_quota("alice@example.test", True)
        with pytest.raises(ValueError, match="no such user"):
            d.set_quota("bob@example.test", 1)
    with Directory(path, **FAST) as d:
        assert d.quota_for("alice@example.test") is None


def test_second_instance_sees_changes(directory, path):
    other = Directory(path, **FAST)
    try:
        assert other.is_local_domain("example.test")
        other.add_domain("new.test")
        assert directory.is_local_domain("new.test")
        directory.add_user("alice@new.test", "pw")
        assert other.get_user("alice@new.test") is not None
        assert other.resolve("alice@new.test") == ["alice@new.test"]
        other.add_alias("info@new.test", "alice@new.test")
        assert directory.resolve("info@new.test") == ["alice@new.test"]
        other.remove_user("alice@new.test")
        assert directory.get_user("alice@new.test") is None
        assert directory.resolve("info@new.test") == []
    finally:
        other.close()


# -- aliases and resolution ----------------------------------------------------------------


@pytest.fixture
def populated(directory):
    for name in ("alice", "bob", "carol"):
        directory.add_user(f"{name}@example.test", "pw")
    return directory


def test_resolve_users_and_unknown(populated):
    assert populated.resolve("alice@example.test") == ["alice@example.test"]
    assert populated.resolve("ALICE@EXAMPLE.TEST") == ["alice@example.test"]
    assert populated.resolve("nobody@example.test") == []
    assert populated.resolve("alice@elsewhere.test") == []
    assert populated.resolve("garbage") == []
    assert populated.resolve('"alice@elsewhere.test"@example.test') == []
    assert populated.resolve("alice%elsewhere.test@example.test") == []


def test_alias_several_destinations_in_order_dedup(populated):
    populated.add_alias("team@example.test", "carol@example.test")
    populated.add_alias("team@example.test", "alice@example.test")
    populated.add_alias("team@example.test", "Ext.User@Elsewhere.TEST")
    populated.add_alias("all@example.test", "team@example.test")
    populated.add_alias("all@example.test", "alice@example.test")
    assert populated.resolve("team@example.test") == [
        "carol@example.test",
        "alice@example.test",
        "ext.user@elsewhere.test",
    ]
    assert populated.resolve("all@example.test") == [
        "carol@example.test",
        "alice@example.test",
        "ext.user@elsewhere.test",
    ]
    assert populated.list_aliases() == [
        ("all@example.test", "team@example.test"),
        ("all@example.test", "alice@example.test"),
        ("team@example.test", "carol@example.test"),
        ("team@example.test", "alice@example.test"),
        ("team@example.test", "ext.user@elsewhere.test"),
    ]


def test_alias_precedes_user_and_can_keep_a_copy(populated):
    populated.add_alias("alice@example.test", "bob@example.test")
    assert populated.resolve("alice@example.test") == ["bob@example.test"]
    populated.add_alias("alice@example.test", "alice@example.test")
    assert populated.resolve("alice@example.test") == ["bob@example.test", "alice@example.test"]


def test_alias_validation(populated):
    with pytest.raises(ValueError, match="already exists"):
        populated.add_alias("x@example.test", "alice@example.test")
        populated.add_alias("X@example.test", "ALICE@example.test")
    with pytest.raises(ValueError, match="not a local domain"):
        populated.add_alias("x@elsewhere.test", "alice@example.test")
    with pytest.raises(ValueError, match="not a local domain"):
        populated.add_alias("@elsewhere.test", "alice@example.test")
    with pytest.raises(ValueError, match="not a local user or alias"):
        populated.add_alias("y@example.test", "nobody@example.test")
    with pytest.raises(ValueError, match="catch-all"):
        populated.add_alias("y@example.test", "@example.test")
    with pytest.raises(ValueError, match="itself"):
        populated.add_alias("y@example.test", "y@example.test")
    with pytest.raises(ValueError, match="invalid address"):
        populated.add_alias("y@example.test", "not an address")
    # A destination reached through the delimiter is a valid local target.
    populated.add_alias("y@example.test", "alice+lists@example.test")
    assert populated.resolve("y@example.test") == ["alice@example.test"]


def test_remove_alias(populated):
    populated.add_alias("team@example.test", "alice@example.test")
    populated.add_alias("team@example.test", "bob@example.test")
    populated.add_alias("@example.test", "carol@example.test")
    assert populated.remove_alias("team@example.test", "ALICE@example.test") == 1
    assert populated.resolve("team@example.test") == ["bob@example.test"]
    with pytest.raises(ValueError, match="no such alias team@example.test -> alice"):
        populated.remove_alias("team@example.test", "alice@example.test")
    populated.add_alias("team@example.test", "alice@example.test")
    assert populated.remove_alias("team@example.test") == 2
    with pytest.raises(ValueError, match="no such alias team@example.test"):
        populated.remove_alias("team@example.test")
    assert populated.remove_alias("@EXAMPLE.test") == 1
    assert populated.list_aliases() == []


def test_catch_all_only_when_nothing_else_matches(populated):
    assert populated.resolve("random@example.test") == []  # no catch-all by default
    populated.add_alias("@example.test", "carol@example.test")
    assert populated.resolve("random@example.test") == ["carol@example.test"]
    assert populated.resolve("alice@example.test") == ["alice@example.test"]
    assert populated.resolve("alice+tag@example.test") == ["alice@example.test"]
    populated.add_alias("info@example.test", "bob@example.test")
    assert populated.resolve("info@example.test") == ["bob@example.test"]


def test_catch_all_to_unknown_local_does_not_loop(populated):
    populated.add_alias("@example.test", "carol@example.test")
    populated.remove_user("carol@example.test")
    assert populated.resolve("random@example.test") == []


def test_recipient_delimiter(populated):
    assert populated.resolve("alice+tag@example.test") == ["alice@example.test"]
    assert populated.resolve("alice+a+b@example.test") == ["alice@example.test"]
    assert populated.resolve("+tag@example.test") == []
    assert populated.resolve("nobody+tag@example.test") == []
    populated.add_alias("alice+lists@example.test", "bob@example.test")
    assert populated.resolve("alice+lists@example.test") == ["bob@example.test"]
    populated.add_user("dave+x@example.test", "pw")
    assert populated.resolve("dave+x@example.test") == ["dave+x@example.test"]
    populated.add_alias("sales@example.test", "carol@example.test")
    assert populated.resolve("sales+eu@example.test") == ["carol@example.test"]


def test_recipient_delimiter_disabled_or_other(path):
    with Directory(path, recipient_delimiter="", **FAST) as d:
        d.add_domain("example.test")
        d.add_user("alice@example.test", "pw")
        assert d.resolve("alice+tag@example.test") == []
    with Directory(path, recipient_delimiter="-", **FAST) as d:
        assert d.resolve("alice-tag@example.test") == ["alice@example.test"]
        assert d.resolve("alice+tag@example.test") == []


def test_loops_are_safe(populated):
    populated.add_alias("a@example.test", "alice@example.test")
    populated.add_alias("b@example.test", "a@example.test")
    populated.add_alias("a@example.test", "b@example.test")  # a -> b -> a
    assert populated.resolve("a@example.test") == ["alice@example.test"]
    assert populated.resolve("b@example.test") == ["alice@example.test"]
    # A loop through a user delivers to that user instead of looping.
    populated.add_alias("bob@example.test", "c@example.test") if False else None
    populated.add_alias("c@example.test", "bob@example.test")
    populated.add_alias("bob@example.test", "c@example.test")
    assert populated.resolve("bob@example.test") == ["bob@example.test"]
    # c -> bob -> c: bob is aliased away and c is nobody, so c reaches no one (as Postfix).
    assert populated.resolve("c@example.test") == []


def test_depth_limit(populated):
    populated.add_alias(f"l{MAX_DEPTH}@example.test", "alice@example.test")
    for i in range(MAX_DEPTH - 1, -1, -1):
        populated.add_alias(f"l{i}@example.test", f"l{i + 1}@example.test")
    # l0 -> l1 -> ... -> l10 -> alice: alice sits at depth 11.
    assert populated.resolve("l1@example.test") == ["alice@example.test"]
    assert populated.resolve("l0@example.test") == []


def test_external_destination_kept_quoted(populated):
    populated.add_alias("fwd@example.test", '"Some One"@elsewhere.test')
    assert populated.resolve("fwd@example.test") == ['"some one"@elsewhere.test']
    assert populated.remove_alias("fwd@example.test", '"some one"@ELSEWHERE.test') == 1


# -- passwords -----------------------------------------------------------------------------


class CountingHasher:
    """Wraps argon2's PasswordHasher (which has slots) to count verifications."""

    def __init__(self, hasher) -> None:
        self.hasher = hasher
        self.calls: list[str] = []

    def verify(self, stored, password):
        self.calls.append(stored)
        return self.hasher.verify(stored, password)

    def __getattr__(self, name):
        return getattr(self.hasher, name)


def count_verifications(directory, monkeypatch) -> list[str]:
    counting = CountingHasher(directory._hashing._hasher)
    monkeypatch.setattr(directory._hashing, "_hasher", counting)
    return counting.calls


def test_authenticate_sync(populated, monkeypatch):
    calls = count_verifications(populated, monkeypatch)
    assert populated.authenticate("ALICE@example.test", "pw") == User(
        "alice@example.test", None, True
    )
    assert populated.authenticate("alice@example.test", b"pw").name == "alice@example.test"
    for name, password in [
        ("alice@example.test", "wrong"),
        ("nobody@example.test", "pw"),
        ("garbage", "pw"),
    ]:
        with pytest.raises(UnauthorizedLogin):
            populated.authenticate(name, password)
    populated.set_enabled("alice@example.test", False)
    assert populated.get_user("alice@example.test").enabled is False
    with pytest.raises(UnauthorizedLogin):
        populated.authenticate("alice@example.test", "pw")
    # One argon2 verification for every attempt, whatever the reason for failing.
    assert len(calls) == 6
    populated.set_enabled("alice@example.test", True)
    assert populated.authenticate("alice@example.test", "pw").enabled


def test_set_password(populated):
    populated.set_password("alice@example.test", "new")
    with pytest.raises(UnauthorizedLogin):
        populated.authenticate("alice@example.test", "pw")
    assert populated.authenticate("alice@example.test", "new").name == "alice@example.test"
    with pytest.raises(ValueError, match="no such user"):
        populated.set_password("nobody@example.test", "x")
    with pytest.raises(ValueError, match="empty"):
        populated.set_password("alice@example.test", "")


def test_corrupt_hash_fails_after_work(populated, path, monkeypatch):
    db = sqlite3.connect(path)
    db.execute("UPDATE users SET password='not-a-hash' WHERE name='alice@example.test'")
    db.commit()
    db.close()
    calls = count_verifications(populated, monkeypatch)
    with pytest.raises(UnauthorizedLogin):
        populated.authenticate("alice@example.test", "pw")
    assert len(calls) == 2  # the unreadable one, then the dummy


def test_hashes_are_argon2id_with_parameters(populated, path):
    db = sqlite3.connect(path)
    (hashed,) = db.execute("SELECT password FROM users WHERE name='alice@example.test'").fetchone()
    db.close()
    assert hashed.startswith("$argon2id$")
    assert "m=8,t=1,p=1" in hashed


def test_rehash_when_parameters_change(populated, path, reactor):
    def stored() -> str:
        db = sqlite3.connect(path)
        (h,) = db.execute("SELECT password FROM users WHERE name='alice@example.test'").fetchone()
        db.close()
        return h

    before = stored()
    stronger = Directory(path, argon2_time_cost=2, argon2_memory_kib=16, reactor=reactor)
    try:
        with pytest.raises(UnauthorizedLogin):
            stronger.authenticate("alice@example.test", "wrong")
        assert stored() == before  # no rehash without the right password
        d = stronger.check_password("alice@example.test", "pw")
        reactor.pool.run_all()
        assert fired(d).name == "alice@example.test"
        after = stored()
        assert after != before and "m=16,t=2,p=1" in after
        # The old instance still verifies the new hash (parameters are in the hash).
        assert populated.authenticate("alice@example.test", "pw").name == "alice@example.test"
        assert stored() != after  # ...and rehashes back to its own parameters
    finally:
        stronger.close()


def test_check_password_runs_in_thread_pool(populated, reactor):
    d = populated.check_password("alice@example.test", "pw")
    assert not d.called
    assert len(reactor.pool.jobs) == 1
    reactor.pool.run_all()
    assert fired(d) == User("alice@example.test", None, True)


@pytest.mark.parametrize(
    "name,password,disable",
    [
        ("alice@example.test", "wrong", False),
        ("nobody@example.test", "pw", False),
        ("alice@example.test", "pw", True),
    ],
)
def test_check_password_failures(populated, reactor, name, password, disable):
    if disable:
        populated.set_enabled("alice@example.test", False)
    d = populated.check_password(name, password)
    assert len(reactor.pool.jobs) == 1  # the same work in every case
    reactor.pool.run_all()
    failure = fired(d)
    assert isinstance(failure, Failure) and failure.check(UnauthorizedLogin)


def test_check_password_database_error_is_a_failure(populated, reactor):
    populated.close()
    failure = fired(populated.check_password("alice@example.test", "pw"))
    assert isinstance(failure, Failure) and failure.check(sqlite3.ProgrammingError)


def test_check_password_uses_global_reactor_when_none(path, monkeypatch, reactor):
    from twisted.internet import reactor as global_reactor

    fake = reactor
    monkeypatch.setattr(global_reactor, "getThreadPool", fake.getThreadPool)
    monkeypatch.setattr(global_reactor, "callFromThread", fake.callFromThread)
    with Directory(path, **FAST) as d:
        d.add_domain("example.test")
        d.add_user("alice@example.test", "pw")
        deferred = d.check_password("alice@example.test", "pw")
        fake.pool.run_all()
        assert fired(deferred).name == "alice@example.test"


def test_lookups_never_raise_on_garbage(populated):
    assert populated.get_user("ü no address") is None
    assert populated.get_user('"unterminated@example.test') is None
    assert populated.quota_for("ü no address") is None
    assert populated.resolve("ü@") == []


# -- postmaster (RFC 5321 4.5.1) -----------------------------------------------------------


def test_postmaster_of_every_domain_goes_to_the_first_user_by_default(directory):
    assert directory.resolve("postmaster@example.test") == []  # no user yet: nobody to get it
    directory.add_user("carol@example.test", "pw")
    directory.add_user("alice@example.test", "pw")
    directory.add_domain("later.test")  # a domain added afterwards has a postmaster too
    assert directory.resolve("postmaster@example.test") == ["carol@example.test"]
    assert directory.resolve("PostMaster@Later.Test") == ["carol@example.test"]
    assert directory.resolve("postmaster+tag@later.test") == ["carol@example.test"]
    assert directory.resolve("webmaster@later.test") == []
    assert directory.resolve("postmaster@elsewhere.test") == []


def test_explicit_postmaster_alias_user_and_catch_all_keep_winning(directory):
    directory.add_user("carol@example.test", "pw")
    directory.add_user("alice@example.test", "pw")
    directory.add_alias("postmaster@example.test", "alice@example.test")
    assert directory.resolve("postmaster@example.test") == ["alice@example.test"]
    directory.add_domain("b.test")
    directory.add_user("bob@b.test", "pw")
    directory.add_alias("@b.test", "bob@b.test")
    assert directory.resolve("postmaster@b.test") == ["bob@b.test"]
    directory.add_domain("c.test")
    directory.add_user("postmaster@c.test", "pw")
    assert directory.resolve("postmaster@c.test") == ["postmaster@c.test"]


def test_configured_postmaster_address(path, reactor):
    with Directory(path, reactor=reactor, postmaster="Admin@Example.Test", **FAST) as d:
        d.add_domain("example.test")
        d.add_domain("other.test")
        d.add_user("first@example.test", "pw")
        assert d.resolve("postmaster@other.test") == []  # admin@ does not exist yet
        d.add_user("admin@example.test", "pw")
        assert d.resolve("postmaster@other.test") == ["admin@example.test"]
        assert d.postmaster_target() == "admin@example.test"
    with Directory(path, reactor=reactor, postmaster="hostmaster@corp.example", **FAST) as d:
        assert d.resolve("postmaster@other.test") == ["hostmaster@corp.example"]  # external
    with Directory(path, reactor=reactor, postmaster="postmaster@example.test", **FAST) as d:
        assert d.resolve("postmaster@other.test") == []  # points at itself: no loop
    with pytest.raises(ValueError, match="invalid address"):
        Directory(path, reactor=reactor, postmaster="not an address", **FAST)


# -- lookup cache ----------------------------------------------------------------------------


def test_lookups_see_another_connections_changes_at_once(directory, path):
    """Answers are cached, yet a change committed by another process (here: another
    Directory, as the ``mailgw`` command is) shows in the very next lookup."""
    directory.add_user("alice@example.test", "pw")
    assert directory.resolve("alice@example.test") == ["alice@example.test"]
    assert directory.get_user("alice@example.test") is not None
    assert not directory.is_local_domain("other.test")
    assert directory.resolve("bob@example.test") == []
    with Directory(path, **FAST) as cli:
        cli.remove_user("alice@example.test")
        cli.add_user("bob@example.test", "pw")
        cli.add_domain("other.test")
        assert directory.resolve("alice@example.test") == []
        assert directory.get_user("alice@example.test") is None
        assert directory.quota_for("bob@example.test") is None
        assert directory.resolve("bob@example.test") == ["bob@example.test"]
        assert directory.is_local_domain("other.test")
        cli.add_alias("carol@example.test", "bob@example.test")
        assert directory.resolve("carol@example.test") == ["bob@example.test"]
        cli.set_quota("bob@example.test", 1234)
        assert directory.quota_for("bob@example.test") == 1234
        cli.remove_domain("other.test")
        assert not directory.is_local_domain("other.test")


def test_repeated_lookups_are_served_from_the_cache(directory, path):
    directory.add_user("alice@example.test", "pw")
    assert directory.resolve("alice+x@example.test") == ["alice@example.test"]
    assert directory.get_user("alice@example.test") is not None
    statements: list[str] = []
    directory._db.set_trace_callback(statements.append)
    try:
        for _ in range(3):
            assert directory.resolve("alice+x@example.test") == ["alice@example.test"]
            assert directory.is_local_domain("example.test")
            assert directory.get_user("alice@example.test") is not None
    finally:
        directory._db.set_trace_callback(None)
    assert statements and all(s == "PRAGMA data_version" for s in statements)
    # A caller changing the list it got does not change the cached answer.
    directory.resolve("alice+x@example.test").append("mallory@example.test")
    assert directory.resolve("alice+x@example.test") == ["alice@example.test"]


def test_own_changes_and_reconfigure_empty_the_cache(directory):
    directory.add_user("alice@example.test", "pw")
    assert directory.resolve("alice-x@example.test") == []
    directory.reconfigure(
        SimpleNamespace(
            server=SimpleNamespace(postmaster=""),
            directory=SimpleNamespace(
                recipient_delimiter="-", argon2_time_cost=1, argon2_memory_kib=8
            ),
            store=SimpleNamespace(default_quota=None),
        )
    )
    assert directory.resolve("alice-x@example.test") == ["alice@example.test"]
    directory.remove_user("alice@example.test")
    assert directory.resolve("alice@example.test") == []
    assert directory.get_user("alice@example.test") is None
    directory.add_user("alice@example.test", "pw", quota=10)
    assert directory.quota_for("alice@example.test") == 10


def test_the_cache_is_bounded(directory, monkeypatch):
    import mailgw.directory.database as database

    monkeypatch.setattr(database, "CACHE_ENTRIES", 5)
    for i in range(20):
        assert directory.resolve(f"nobody{i}@example.test") == []
        assert len(directory._cache) <= 5
