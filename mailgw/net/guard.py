"""Every connection gets closed: a guard between the transport (TLS, PROXY or the socket) and
the session protocol aborts implicit-TLS connections whose handshake does not finish in time,
and any connection whose close does not complete (a peer that never speaks TLS after STARTTLS,
or stops reading)."""

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

CLOSE_TIMEOUT = 30.0
"""Seconds a closing connection may take to flush what was written to it before it is aborted."""


@implementer(IHandshakeListener)
class ConnectionGuard(policies.ProtocolWrapper):
    """Sits right under the session protocol (its transport).

    On an implicit-TLS listener (``factory.handshake_timeout`` set, the guard's transport is
    the ``TLSMemoryBIOProtocol``):

    - a handshake not finished ``handshake_timeout`` seconds after the TCP connection is
      aborted: the descriptor and the session's connection slot are freed;
    - ``loseConnection`` before the handshake finished (a refused connection, an idle timeout
      of a peer that never spoke TLS) aborts at once: nothing can be sent before the
      handshake, and the TLS layer would keep the reply and the descriptor until the peer
      completes a handshake it may never start.

    After STARTTLS (the protocol calls ``startTLS`` through the guard) the same holds until
    the client's first bytes arrive through TLS (which proves the handshake): a close before
    that aborts at once, so an idle timeout ends a peer that never sent its ClientHello.

    On every listener, a ``loseConnection`` that has not completed ``factory.close_timeout``
    seconds later is turned into an abort: after STARTTLS a silent peer leaves the goodbye
    line unsendable, and a peer that stops reading leaves it unflushed, for ever otherwise.
    """

    factory: ConnectionGuardFactory
    transport: Any

    def __init__(self, factory: Any, wrappedProtocol: IProtocol) -> None:
        super().__init__(factory, wrappedProtocol)
        self.handshake_done = factory.handshake_timeout is None
        self._handshake_timer: Any = None
        self._close_timer: Any = None
        self._starttls_pending = False

    def startTLS(self, *args: Any, **kwargs: Any) -> None:
        self._starttls_pending = True
        self.transport.startTLS(*args, **kwargs)

    def dataReceived(self, data: bytes) -> None:
        self._starttls_pending = False
        super().dataReceived(data)

    def makeConnection(self, transport: Any) -> None:
        timeout = self.factory.handshake_timeout
        if timeout is not None:
            self._handshake_timer = self.factory.clock.callLater(timeout, self._handshake_expired)
        super().makeConnection(transport)

    def _handshake_expired(self) -> None:
        self._handshake_timer = None
        log.info(
            "{prefix} {peer}: no TLS handshake in {timeout}s, closed",
            prefix=self.factory.logPrefix(),
            peer=self._peer(),
            timeout=self.factory.handshake_timeout,
        )
        self.transport.abortConnection()

    def handshakeCompleted(self) -> None:
        self.handshake_done = True
        self._cancel_handshake()
        if IHandshakeListener.providedBy(self.wrappedProtocol):
            self.wrappedProtocol.handshakeCompleted()

    def loseConnection(self) -> None:
        if self.disconnecting:
            return
        if not self.handshake_done or self._starttls_pending:
            self._cancel_handshake()
            self.disconnecting = True
            self.transport.abortConnection()
            return
        super().loseConnection()
        if self.connected and self._close_timer is None:
            self._close_timer = self.factory.clock.callLater(
                self.factory.close_timeout, self._close_expired
            )

    def _close_expired(self) -> None:
        self._close_timer = None
        log.info(
            "{prefix} {peer}: close not completed in {timeout}s, aborted",
            prefix=self.factory.logPrefix(),
            peer=self._peer(),
            timeout=self.factory.close_timeout,
        )
        self.transport.abortConnection()

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self._cancel_handshake()
        if self._close_timer is not None and self._close_timer.active():
            self._close_timer.cancel()
        self._close_timer = None
        super().connectionLost(reason)

    def _cancel_handshake(self) -> None:
        if self._handshake_timer is not None and self._handshake_timer.active():
            self._handshake_timer.cancel()
        self._handshake_timer = None

    def _peer(self) -> str:
        return peer_ip(self.transport.getPeer()) or "-"


class ConnectionGuardFactory(policies.WrappingFactory):
    """Wraps a protocol factory with a ``ConnectionGuard`` per connection: put it inside the
    ``TLSMemoryBIOFactory`` with ``handshake_timeout`` for an implicit-TLS listener, right
    around the session factory with None for a plain one."""

    protocol = ConnectionGuard

    def __init__(
        self,
        wrappedFactory: Any,
        clock: IReactorTime,
        handshake_timeout: float | None = None,
        close_timeout: float = CLOSE_TIMEOUT,
    ) -> None:
        super().__init__(wrappedFactory)
        self.clock = clock
        self.handshake_timeout = handshake_timeout
        self.close_timeout = close_timeout

    def logPrefix(self) -> str:
        inner = getattr(self.wrappedFactory, "logPrefix", None)
        return inner() if callable(inner) else self.wrappedFactory.__class__.__name__
