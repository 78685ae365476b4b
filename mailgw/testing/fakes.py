"""In-memory fakes of the server's interfaces, shared by the tests (never imported by the server).

- ``FakeDirectory``: an ``IDirectory`` whose users, aliases, domains and quotas are plain dicts
  and sets that a test reads and changes, with switches for the failures the roles must handle.
- ``Quotas``: the ``quota_for`` callable a ``MessageStore`` takes, as a dict.
- ``CallsFromThreads``: the ``callFromThread`` of a reactor; the test's thread runs the queue.
- ``HeldRunner``: a ``run(function, *args) -> Deferred`` that holds the work until released.
- ``TLSStringTransport``: a ``StringTransport`` that records ``startTLS`` (no TLS is done).
"""

from __future__ import annotations

import queue
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from twisted.cred.error import UnauthorizedLogin
from twisted.internet import defer
from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.interfaces import IReactorFromThreads
from twisted.internet.testing import StringTransport
from zope.interface import implementer

from mailgw.directory import User
from mailgw.interfaces import IDirectory


def _domain(address: str) -> str:
    return address.rpartition("@")[2]


@implementer(IDirectory)
class FakeDirectory:
    """Users, aliases, local domains and quotas in memory, for the roles that use a directory.

    ``users`` maps a canonical user name (``local@domain``, lower-case) to its plain password,
    or to None for a user who cannot log in; a plain list of names makes users without
    passwords. ``aliases`` maps an address to what it delivers to, one level deep (the real
    directory follows aliases recursively: a test that needs that uses the real one).
    ``domains`` defaults to the domains of the users and aliases given.

    Switches and records for tests:

    - ``lookups``: every address given to ``resolve``, as given, in order;
    - ``resolve_errors``: address -> the exception ``resolve`` raises for it (a database error);
    - ``calls``: every ``(name, password)`` given to ``check_password``, in order;
    - ``error``: when set, ``check_password`` fails with it (the directory is down);
    - ``hold``: when true, ``check_password`` returns unfired Deferreds, kept in ``pending``.
    """

    def __init__(
        self,
        users: Mapping[str, str | None] | Iterable[str] = (),
        aliases: Mapping[str, Iterable[str]] | None = None,
        domains: Iterable[str] | None = None,
        quotas: Mapping[str, int | None] | None = None,
    ) -> None:
        self.users: dict[str, str | None] = (
            dict(users) if isinstance(users, Mapping) else dict.fromkeys(users)
        )
        self.aliases: dict[str, list[str]] = {
            source: list(targets) for source, targets in (aliases or {}).items()
        }
        if domains is None:
            domains = {_domain(name) for name in [*self.users, *self.aliases]}
        self.domains: set[str] = set(domains)
        self.quotas: dict[str, int | None] = dict(quotas or {})
        self.lookups: list[str] = []
        self.resolve_errors: dict[str, Exception] = {}
        self.calls: list[tuple[str, str | bytes]] = []
        self.error: Exception | None = None
        self.hold = False
        self.pending: list[defer.Deferred[User]] = []
        self.groups: dict[str, set[str]] = {}
        """Group name -> member user names (``in_group``)."""

    def add_user(self, name: str, password: str | None = None, quota: int | None = None) -> User:
        """Add a user (and its domain, as a local one)."""
        self.users[name] = password
        self.domains.add(_domain(name))
        if quota is not None:
            self.quotas[name] = quota
        return self._user(name)

    def _user(self, name: str) -> User:
        return User(name, self.quotas.get(name), True)

    # -- IDirectory ------------------------------------------------------------------------

    def is_local_domain(self, domain: str) -> bool:
        return domain.lower() in self.domains

    def list_domains(self) -> list[str]:
        return sorted(self.domains)

    def resolve(self, address: str) -> list[str]:
        self.lookups.append(address)
        key = address.lower()
        if key in self.resolve_errors:
            raise self.resolve_errors[key]
        if key in self.aliases:
            return list(self.aliases[key])
        return [key] if key in self.users else []

    def get_user(self, name: str) -> User | None:
        return self._user(name) if name in self.users else None

    def in_group(self, name: str, groups: tuple[str, ...]) -> bool:
        return any(name.lower() in self.groups.get(g, ()) for g in groups)

    def check_password(self, name: str, password: str | bytes) -> defer.Deferred[User]:
        self.calls.append((name, password))
        if self.error is not None:
            return defer.fail(self.error)
        if self.hold:
            d: defer.Deferred[User] = defer.Deferred()
            self.pending.append(d)
            return d
        key = name.lower()
        if isinstance(password, bytes):
            password = password.decode("utf-8", "surrogateescape")
        stored = self.users.get(key)
        if stored is not None and stored == password:
            return defer.succeed(self._user(key))
        return defer.fail(UnauthorizedLogin())

    def quota_for(self, name: str) -> int | None:
        return self.quotas.get(name)


class Quotas:
    """The ``quota_for`` of a ``MessageStore``: ``limits[user]`` bytes, None (or absent) for
    no limit."""

    def __init__(self) -> None:
        self.limits: dict[str, int | None] = {}

    def __call__(self, user: str) -> int | None:
        return self.limits.get(user)


@implementer(IReactorFromThreads)
class CallsFromThreads:
    """The ``callFromThread`` of a reactor, for code that hands work from its threads back to
    the reactor thread: calls are queued, and the test's thread (standing for the reactor
    thread) runs them with ``run_pending`` or ``run_until``."""

    def __init__(self) -> None:
        self.calls: queue.Queue[tuple[Callable[..., Any], tuple[object, ...], dict[str, object]]]
        self.calls = queue.Queue()

    def callFromThread(self, callable: Callable[..., Any], *args: object, **kwargs: object) -> None:
        self.calls.put((callable, args, kwargs))

    def run_pending(self) -> int:
        """Run the calls queued so far (and those they queue); return how many ran."""
        ran = 0
        while True:
            try:
                f, args, kwargs = self.calls.get_nowait()
            except queue.Empty:
                return ran
            f(*args, **kwargs)
            ran += 1

    def run_until(self, done: Callable[[], bool], timeout: float = 30.0) -> None:
        """Run calls as the threads queue them until ``done()``; ``queue.Empty`` when no call
        comes for ``timeout`` seconds."""
        while not done():
            f, args, kwargs = self.calls.get(timeout=timeout)
            f(*args, **kwargs)


class HeldRunner:
    """A runner (``run(function, *args)`` returning a Deferred: where code hands blocking work
    to a thread pool) that holds the work until the test runs it, so that a test sees what
    happens while the work is in flight. ``held``: the work not run yet, oldest first; its
    errors go to its Deferred, as a thread pool's would."""

    def __init__(self) -> None:
        self.held: list[tuple[Callable[..., Any], tuple[Any, ...], defer.Deferred[Any]]] = []

    def __call__(self, function: Callable[..., Any], *args: Any) -> defer.Deferred[Any]:
        d: defer.Deferred[Any] = defer.Deferred()
        self.held.append((function, args, d))
        return d

    def run_one(self) -> None:
        """Run the oldest held work."""
        function, args, d = self.held.pop(0)
        defer.maybeDeferred(function, *args).chainDeferred(d)

    def release(self) -> None:
        """Run the work held so far (not what that queues meanwhile)."""
        held, self.held = self.held, []
        for function, args, d in held:
            defer.maybeDeferred(function, *args).chainDeferred(d)


def peer_address(ip: str, port: int = 40000) -> IPv4Address | IPv6Address:
    """The TCP address of a client at ``ip`` (IPv6 when it has a colon)."""
    return IPv6Address("TCP", ip, port) if ":" in ip else IPv4Address("TCP", ip, port)


class TLSStringTransport(StringTransport):
    """A ``StringTransport`` recording ``startTLS`` (no TLS is done): the options of each call
    in ``tls_started``, the bytes written before the first one in ``before_tls``; and whether
    the connection was aborted in ``aborted``."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)  # type: ignore[no-untyped-call]
        self.tls_started: list[Any] = []
        self.before_tls = b""
        self.aborted = False

    def startTLS(self, options: Any, normal: bool = True) -> None:
        if not self.tls_started:
            self.before_tls = self.value()  # type: ignore[no-untyped-call]
        self.tls_started.append(options)

    def abortConnection(self) -> None:
        self.aborted = True
        super().abortConnection()  # type: ignore[no-untyped-call]
