"""Tests for mailgw.directory.checkers.DirectoryChecker through a twisted.cred Portal."""

from __future__ import annotations

import pytest
from twisted.cred.checkers import ICredentialsChecker
from twisted.cred.credentials import Anonymous, UsernamePassword
from twisted.cred.error import UnauthorizedLogin, UnhandledCredentials
from twisted.cred.portal import IRealm, Portal
from twisted.python.failure import Failure
from zope.interface import Interface, implementer

from mailgw.directory import Directory, DirectoryChecker
from mailgw.testing.deferreds import fired

FAST = {"argon2_time_cost": 1, "argon2_memory_kib": 8}


class IAvatar(Interface):
    pass


@implementer(IRealm)
class Realm:
    def requestAvatar(self, avatarId, mind, *interfaces):
        return IAvatar, ("avatar", avatarId), lambda: None


@pytest.fixture
def setup(tmp_path, reactor):
    directory = Directory(str(tmp_path / "directory.sqlite"), reactor=reactor, **FAST)
    directory.add_domain("example.test")
    directory.add_user("alice@example.test", "pässword")
    yield directory, reactor
    directory.close()


def login(setup, credentials):
    directory, reactor = setup
    portal = Portal(Realm(), [DirectoryChecker(directory)])
    d = portal.login(credentials, None, IAvatar)
    reactor.pool.run_all()
    return fired(d)


def test_provides_interface(setup):
    checker = DirectoryChecker(setup[0])
    assert ICredentialsChecker.providedBy(checker)


@pytest.mark.parametrize(
    "username,password",
    [
        (b"alice@example.test", "pässword".encode()),
        (b"ALICE@Example.Test", "pässword".encode()),
        ("alice@example.test", "pässword"),
    ],
)
def test_login_ok_gives_canonical_name(setup, username, password):
    iface, avatar, _logout = login(setup, UsernamePassword(username, password))
    assert avatar == ("avatar", "alice@example.test")


@pytest.mark.parametrize(
    "username,password",
    [
        (b"alice@example.test", b"wrong"),
        (b"bob@example.test", "pässword".encode()),
        (b"\xff\xfe@example.test", b"x"),
        (b"", b"x"),
        (b"alice", b"x"),
    ],
)
def test_login_failures(setup, username, password):
    failure = login(setup, UsernamePassword(username, password))
    assert isinstance(failure, Failure) and failure.check(UnauthorizedLogin)


def test_other_credential_types_not_handled(setup):
    failure = login(setup, Anonymous())
    assert isinstance(failure, Failure) and failure.check(UnhandledCredentials)
