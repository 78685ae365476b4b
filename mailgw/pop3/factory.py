"""The POP3 listener factory: shared settings, the per-user maildrop lock, per-address limits."""

from __future__ import annotations

from typing import Any

from twisted.internet.interfaces import IAddress, IReactorTime
from twisted.internet.protocol import ServerFactory

from mailgw.config.schema import POP3Config
from mailgw.directory.penalty import AuthGuard, local_auth_guard
from mailgw.interfaces import IDirectory, IMessageStore
from mailgw.net.limits import ConnectionCounter, Refusal
from mailgw.pop3.protocol import POP3Server


class POP3Factory(ServerFactory[POP3Server]):
    """Builds a ``POP3Server`` per connection.

    ``tls_options``: a TLS context factory for STLS (None: STLS not offered).
    ``implicit_tls``: connections are already TLS (the listener wraps them), so STLS is not
    offered and plaintext authentication is allowed. ``auth`` checks passwords under the
    node's auth penalty; ``counter`` counts connections (one per role in the server, sharing
    the process total; by default this factory's own).
    """

    noisy = False  # no "Starting factory <...>" in the mail log

    def __init__(
        self,
        config: POP3Config,
        hostname: str,
        store: IMessageStore,
        directory: IDirectory,
        reactor: IReactorTime,
        tls_options: Any = None,
        implicit_tls: bool = False,
        auth_failure_delay: float = 2.0,
        auth: AuthGuard | None = None,
        counter: ConnectionCounter | None = None,
    ) -> None:
        self.config = config
        self.hostname = hostname
        self.store = store
        self.directory = directory
        self.reactor = reactor
        self.tls_options = tls_options
        self.implicit_tls = implicit_tls
        self.auth_failure_delay = auth_failure_delay
        self._locks: dict[str, POP3Server] = {}
        self.auth = (
            auth if auth is not None else local_auth_guard(directory, reactor, auth_failure_delay)
        )
        self._connections = (
            counter
            if counter is not None
            else ConnectionCounter(config.max_connections_per_ip, config.max_connections)
        )

    def reconfigure(self, config: Any) -> None:
        """A reloaded config (``mailgw.config.reload``): ``[pop3]`` settings for new sessions
        (the connection counter is the node's, updated by it)."""
        self.config = config.pop3
        self.auth_failure_delay = config.directory.auth_failure_delay

    def buildProtocol(self, addr: IAddress | None) -> POP3Server:
        return POP3Server(self)

    def logPrefix(self) -> str:
        return "POP3S" if self.implicit_tls else "POP3"

    # -- maildrop locks (RFC 1939 section 8: exclusive access) --------------------------------

    def lock(self, user: str, session: POP3Server) -> bool:
        """Take ``user``'s maildrop lock for ``session``; False if another session holds it."""
        holder = self._locks.get(user)
        if holder is not None and holder is not session:
            return False
        self._locks[user] = session
        return True

    def unlock(self, user: str, session: POP3Server) -> None:
        """Release the lock if ``session`` holds it."""
        if self._locks.get(user) is session:
            del self._locks[user]

    def is_locked(self, user: str) -> bool:
        return user in self._locks

    # -- connections per client address -------------------------------------------------------

    def connection_opened(self, ip: str) -> Refusal | None:
        """Count a session from ``ip``; why not (then it is not counted) when over a limit."""
        return self._connections.admit(ip)

    def connection_closed(self, ip: str) -> None:
        self._connections.release(ip)

    def connections_from(self, ip: str) -> int:
        return self._connections.count(ip)
