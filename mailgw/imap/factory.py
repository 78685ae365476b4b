"""The IMAP listener factory: shared settings, connection limits, \\Recent claims, store pushes."""

from __future__ import annotations

from typing import Any

from twisted.internet.interfaces import IAddress, IReactorTime
from twisted.internet.protocol import ServerFactory

from mailgw.config.schema import IMAPConfig
from mailgw.imap.session import IMAPServer
from mailgw.interfaces import IDirectory, IMessageStore
from mailgw.mime import StructureCache
from mailgw.net.limits import ConnectionCounter


class IMAPFactory(ServerFactory[IMAPServer]):
    """Builds an ``IMAPServer`` per connection.

    ``tls_options``: TLS context factory for STARTTLS (None: not offered); ``implicit_tls``:
    the listener already wraps connections in TLS. The factory registers one store listener
    and forwards each change to the sessions of that user (IDLE pushes, untagged updates).
    ``cache`` (parsed message structures) may be shared between factories.
    """

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
    ) -> None:
        self.config = config
        self.hostname = hostname
        self.store = store
        self.directory = directory
        self.reactor = reactor
        self.tls_options = tls_options
        self.implicit_tls = implicit_tls
        self.auth_failure_delay = auth_failure_delay
        self.cache = cache if cache is not None else StructureCache(4096)
        self._connections = ConnectionCounter(config.max_connections_per_ip)
        self._sessions: dict[str, set[IMAPServer]] = {}
        self._recent: dict[tuple[str, str, int], int] = {}
        store.add_listener(self.store_changed)

    def buildProtocol(self, addr: IAddress | None) -> IMAPServer:
        return IMAPServer(self)

    def logPrefix(self) -> str:
        return "IMAPS" if self.implicit_tls else "IMAP"

    # -- connections per client address and per user -------------------------------------------

    def connection_opened(self, ip: str) -> bool:
        """Count a session from ``ip``; False (not counted) when over the limit."""
        return self._connections.admit(ip) is None

    def connection_closed(self, ip: str) -> None:
        self._connections.release(ip)

    def connections_from(self, ip: str) -> int:
        return self._connections.count(ip)

    def login(self, user: str, session: IMAPServer) -> bool:
        """Register an authenticated session; False when the user has too many."""
        sessions = self._sessions.setdefault(user, set())
        if len(sessions) >= self.config.max_connections_per_user:
            if not sessions:
                del self._sessions[user]
            return False
        sessions.add(session)
        return True

    def logout(self, user: str, session: IMAPServer) -> None:
        sessions = self._sessions.get(user)
        if sessions is not None:
            sessions.discard(session)
            if not sessions:
                del self._sessions[user]

    def sessions_of(self, user: str) -> set[IMAPServer]:
        return set(self._sessions.get(user, ()))

    # -- \Recent: each message is recent in at most one session ---------------------------------

    def claim_recent(self, user: str, folder: str, uidvalidity: int, uids: list[int]) -> set[int]:
        """The UIDs of ``uids`` no session has seen as \\Recent yet, now claimed."""
        key = (user, folder, uidvalidity)
        claimed = self._recent.get(key, 0)
        out = {u for u in uids if u > claimed}
        if out:
            self._recent[key] = max(out)
        return out

    def recent_count(self, user: str, folder: str, uidvalidity: int, uids: list[int]) -> int:
        """How many of ``uids`` are still unclaimed (STATUS RECENT, EXAMINE)."""
        claimed = self._recent.get((user, folder, uidvalidity), 0)
        return sum(1 for u in uids if u > claimed)

    # -- store changes ----------------------------------------------------------------------------

    def store_changed(self, user: str, folder: str) -> None:
        """Store listener (reactor thread): tell the user's sessions."""
        for session in self.sessions_of(user):
            session.mailbox_changed(folder)
