"""Implicit-TLS connections must finish their handshake in time: a guard between the TLS layer
and the protocol aborts those that do not, and those the protocol closes before it is done."""

from __future__ import annotations

from typing import Any

from twisted.internet.interfaces import IHandshakeListener, IProtocol, IReactorTime
from twisted.internet.protocol import connectionDone
from twisted.logger import Logger
from twisted.protocols import policies
from twisted.python.failure import Failure
from zope.interface import implementer

from mailgw.net.proxy import peer_ip

log = Logger()


@implementer(IHandshakeListener)
class HandshakeGuard(policies.ProtocolWrapper):
    """Sits on a ``TLSMemoryBIOProtocol`` (its transport) in front of the session protocol.

    - A handshake not finished ``factory.timeout`` seconds after the TCP connection is aborted:
      the descriptor and the session's connection slot are freed.
    - ``loseConnection`` before the handshake finished (a refused connection, an idle timeout
      of a peer that never spoke TLS) aborts at once: nothing can be sent before the
      handshake, and the TLS layer would otherwise keep the reply and the descriptor until
      the peer completes a handshake it may never start.
    """

    factory: HandshakeGuardFactory
    transport: Any

    def __init__(self, factory: Any, wrappedProtocol: IProtocol) -> None:
        super().__init__(factory, wrappedProtocol)
        self.handshake_done = False
        self._timer: Any = None

    def makeConnection(self, transport: Any) -> None:
        self._timer = self.factory.clock.callLater(self.factory.timeout, self._expired)
        super().makeConnection(transport)

    def _expired(self) -> None:
        self._timer = None
        log.info(
            "{prefix} {peer}: no TLS handshake in {timeout}s, closed",
            prefix=self.factory.logPrefix(),
            peer=peer_ip(self.transport.getPeer()) or "-",
            timeout=self.factory.timeout,
        )
        self.transport.abortConnection()

    def handshakeCompleted(self) -> None:
        self.handshake_done = True
        self._cancel()
        if IHandshakeListener.providedBy(self.wrappedProtocol):
            self.wrappedProtocol.handshakeCompleted()

    def loseConnection(self) -> None:
        if not self.handshake_done:
            self._cancel()
            self.transport.abortConnection()
            return
        super().loseConnection()

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self._cancel()
        super().connectionLost(reason)

    def _cancel(self) -> None:
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None


class HandshakeGuardFactory(policies.WrappingFactory):
    """Wraps a protocol factory with a ``HandshakeGuard`` per connection (put it inside the
    ``TLSMemoryBIOFactory``)."""

    protocol = HandshakeGuard

    def __init__(self, wrappedFactory: Any, clock: IReactorTime, timeout: float) -> None:
        super().__init__(wrappedFactory)
        self.clock = clock
        self.timeout = timeout

    def logPrefix(self) -> str:
        inner = getattr(self.wrappedFactory, "logPrefix", None)
        return inner() if callable(inner) else self.wrappedFactory.__class__.__name__
