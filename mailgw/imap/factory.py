"""The IMAP listener factory: shared settings, connection limits, \\Recent claims, store pushes."""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Hashable
from typing import Any, Protocol

from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import IAddress, IReactorTime
from twisted.internet.protocol import ServerFactory

from mailgw.config.schema import IMAPConfig
from mailgw.directory.penalty import AuthGuard, local_auth_guard
from mailgw.imap.literal import SpooledLiteral, open_spool
from mailgw.imap.session import IMAPServer
from mailgw.interfaces import IDirectory, IMessageStore
from mailgw.mime import StructureCache
from mailgw.net.limits import ConnectionCounter
from mailgw.runtime.threads import Runner, run_inline


class SessionLimits:
    """``max_connections_per_ip`` and ``max_connections_per_user`` over every session it is
    told about (``counter``, if given, counts the connections instead: the role's counter with
    its ``max_connections`` and the process total), remembering what each *holder* (a worker process; None in-process) holds so
    that everything a dead holder held can be released at once."""

    def __init__(
        self, max_per_ip: int, max_per_user: int, counter: ConnectionCounter | None = None
    ) -> None:
        self.max_per_user = max_per_user
        self._ips = counter if counter is not None else ConnectionCounter(max_per_ip)
        self._users: Counter[str] = Counter()
        self._held_ips: dict[Hashable, Counter[str]] = {}
        self._held_users: dict[Hashable, Counter[str]] = {}

    def open(self, ip: str, holder: Hashable = None) -> bool:
        """Count a connection from ``ip``; False (not counted) when over the limit."""
        if self._ips.admit(ip) is not None:
            return False
        self._held_ips.setdefault(holder, Counter())[ip] += 1
        return True

    def close(self, ip: str, holder: Hashable = None) -> None:
        """Forget one connection from ``ip`` counted for ``holder`` (nothing if none is)."""
        if _take(self._held_ips, holder, ip):
            self._ips.release(ip)

    def login(self, user: str, holder: Hashable = None) -> bool:
        """Count an authenticated session of ``user``; False when the user has too many."""
        if self._users[user] >= self.max_per_user:
            return False
        self._users[user] += 1
        self._held_users.setdefault(holder, Counter())[user] += 1
        return True

    def logout(self, user: str, holder: Hashable = None) -> None:
        """Forget one session of ``user`` counted for ``holder`` (nothing if none is)."""
        if _take(self._held_users, holder, user):
            self._drop_user(user, 1)

    def release(self, holder: Hashable) -> None:
        """Forget every connection and session ``holder`` held (a worker died)."""
        for ip, n in self._held_ips.pop(holder, Counter()).items():
            for _ in range(n):
                self._ips.release(ip)
        for user, n in self._held_users.pop(holder, Counter()).items():
            self._drop_user(user, n)

    def _drop_user(self, user: str, n: int) -> None:
        left = self._users[user] - n
        if left > 0:
            self._users[user] = left
        else:
            del self._users[user]

    def connections_held(self, holder: Hashable) -> int:
        """How many connections ``holder`` holds (open and not yet closed)."""
        return sum(self._held_ips.get(holder, Counter()).values())

    def connections_from(self, ip: str) -> int:
        return self._ips.count(ip)

    def sessions_of(self, user: str) -> int:
        return self._users.get(user, 0)


def _take(held: dict[Hashable, Counter[str]], holder: Hashable, name: str) -> bool:
    """Take one ``name`` off ``holder``'s counts; False if it held none."""
    counts = held.get(holder)
    if counts is None or counts[name] <= 0:
        return False
    counts[name] -= 1
    if counts[name] <= 0:
        del counts[name]
        if not counts:
            del held[holder]
    return True


class Admission(Protocol):
    """Who admits connections and logins: answers are Deferreds (a worker asks the main
    process), releases are fire-and-forget."""

    def open(self, ip: str) -> Deferred[bool]: ...

    def close(self, ip: str) -> None: ...

    def login(self, user: str) -> Deferred[bool]: ...

    def logout(self, user: str) -> None: ...


class LocalAdmission:
    """In-process admission: a ``SessionLimits`` of this process, answering at once."""

    def __init__(self, limits: SessionLimits) -> None:
        self.limits = limits

    def open(self, ip: str) -> Deferred[bool]:
        return succeed(self.limits.open(ip))

    def close(self, ip: str) -> None:
        self.limits.close(ip)

    def login(self, user: str) -> Deferred[bool]:
        return succeed(self.limits.login(user))

    def logout(self, user: str) -> None:
        self.limits.logout(user)


def structure_cache(config: IMAPConfig) -> StructureCache:
    """The parsed-message cache of one IMAP process, bounded as ``[imap]`` says."""
    return StructureCache(
        max_entries=65536,
        max_bytes=config.parsed_cache_size,
        max_entry_bytes=config.parsed_cache_max_message,
    )


def local_admission(config: IMAPConfig, counter: ConnectionCounter | None = None) -> LocalAdmission:
    """Admission by this process's own counters, with the limits of ``config`` (connections
    counted by ``counter`` when given, else by a counter of ``config``'s caps)."""
    if counter is None:
        counter = ConnectionCounter(config.max_connections_per_ip, config.max_connections)
    return LocalAdmission(
        SessionLimits(config.max_connections_per_ip, config.max_connections_per_user, counter)
    )


class IMAPFactory(ServerFactory[IMAPServer]):
    """Builds an ``IMAPServer`` per connection.

    ``tls_options``: TLS context factory for STARTTLS (None: not offered); ``implicit_tls``:
    the listener already wraps connections in TLS. The factory registers one store listener
    and forwards each change to the sessions of that user (IDLE pushes, untagged updates).
    ``cache`` (parsed message structures) may be shared between factories. ``admission``
    decides on connections and logins (per-IP and per-user limits): by default this factory's
    own counters; shared between the plain and TLS factories, or asked of the main process in
    an IMAP worker (``mailgw.imap.worker_process``). ``run_blocking`` runs blocking store writes
    (APPEND's files and fsyncs): in the server a thread pool, inline by default (tests).
    ``auth`` checks passwords under the auth penalty (the node's, or the main process's from
    a worker); by default one of this factory's own.
    ``literal_dir``: where large APPEND literals are spooled (the system's temporary
    directory when None).
    """

    noisy = False  # no "Starting factory <...>" in the mail log

    def __init__(
        self,
        config: IMAPConfig,
        hostname: str,
        store: IMessageStore,
        directory: IDirectory,
        reactor: IReactorTime,
        tls_options: Any = None,
        implicit_tls: bool = False,
        auth_failure_delay: float = 2.0,
        cache: StructureCache | None = None,
        admission: Admission | None = None,
        run_blocking: Runner = run_inline,
        auth: AuthGuard | None = None,
        literal_dir: str | None = None,
    ) -> None:
        self.config = config
        self.hostname = hostname
        self.store = store
        self.durable: Callable[[], Deferred[Any]] | None = None
        """Set for synchronous replication: what APPEND's OK waits for."""
        self.directory = directory
        self.reactor = reactor
        self.tls_options = tls_options
        self.implicit_tls = implicit_tls
        self.auth_failure_delay = auth_failure_delay
        self.cache = cache if cache is not None else structure_cache(config)
        self.admission: Admission = admission if admission is not None else local_admission(config)
        self.run_blocking = run_blocking
        self.auth = (
            auth if auth is not None else local_auth_guard(directory, reactor, auth_failure_delay)
        )
        self.literal_dir = literal_dir
        self._sessions: dict[str, set[IMAPServer]] = {}
        store.add_listener(self.store_changed)

    def reconfigure(self, config: Any) -> None:
        """A reloaded config (``mailgw.config.reload``): ``[imap]`` settings for new sessions,
        the failed-login delay, and ``max_connections_per_user`` when this process admits
        sessions itself (in worker processes the main process does)."""
        self.config = config.imap
        self.auth_failure_delay = config.directory.auth_failure_delay
        if isinstance(self.admission, LocalAdmission):
            self.admission.limits.max_per_user = config.imap.max_connections_per_user

    def buildProtocol(self, addr: IAddress | None) -> IMAPServer:
        return IMAPServer(self)

    def spool_literal(self, size: int) -> SpooledLiteral:
        """A temporary file for an APPEND literal of ``size`` bytes, in ``literal_dir``."""
        return open_spool(self.literal_dir, size)

    def logPrefix(self) -> str:
        return "IMAPS" if self.implicit_tls else "IMAP"

    # -- connections per client address and per user -------------------------------------------

    def connection_opened(self, ip: str) -> Deferred[bool]:
        """Ask to count a session from ``ip``: fires False (not counted) when over the limit."""
        return self.admission.open(ip)

    def connection_closed(self, ip: str) -> None:
        """Release a session counted by ``connection_opened``."""
        self.admission.close(ip)

    def login(self, user: str, session: IMAPServer) -> Deferred[bool]:
        """Ask to register an authenticated session: fires False when the user has too many.
        Once registered (True), the session gets the user's store pushes until ``logout``."""

        def registered(admitted: bool) -> bool:
            if admitted:
                self._sessions.setdefault(user, set()).add(session)
            return admitted

        return self.admission.login(user).addCallback(registered)

    def logout(self, user: str, session: IMAPServer) -> None:
        """Unregister a session registered by ``login`` (nothing if it is not)."""
        sessions = self._sessions.get(user)
        if sessions is None or session not in sessions:
            return
        sessions.discard(session)
        if not sessions:
            del self._sessions[user]
            # The user's last session here: their parsed messages are the first to go when
            # room is needed, and serve them again if they come back before (a client that
            # connects for each check; Dovecot keeps such fields in dovecot.index.cache).
            # Dropping them at once made every session re-read and re-parse what it listed.
            # Keys start with the user.
            self.cache.demote_if(lambda key: isinstance(key, tuple) and key[:1] == (user,))
        self.admission.logout(user)

    def sessions_of(self, user: str) -> set[IMAPServer]:
        return set(self._sessions.get(user, ()))

    # -- store changes ----------------------------------------------------------------------------

    def store_changed(self, user: str, folder: str) -> None:
        """Store listener (reactor thread): tell the user's sessions."""
        for session in self.sessions_of(user):
            session.mailbox_changed(folder)
