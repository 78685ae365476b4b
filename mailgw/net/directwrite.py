"""Replies written to the socket at once instead of through the reactor's write buffering.

Twisted's ``transport.write`` only buffers: it registers the socket for writability
(``epoll_ctl``), the next reactor turn sends, and an empty buffer unregisters it again
(``epoll_ctl``): two system calls and a reactor turn per reply. A command/reply protocol
whose reply fits the socket buffer can send it at once: ``write_now`` does so on a plain TCP
connection with nothing buffered, and leaves every other case (TLS, pending data, a closing
connection, a full socket buffer, an error) to ``transport.write``, so the bytes' order and
the error handling stay Twisted's. The mail log's pending lines are written first
(``mailgw.maillog.flush_pending``), so a line logged before a reply is in the log file when the
client has the reply, as with ``transport.write``. Protocol wrappers that pass ``write`` through unchanged
(the connection guard, the PROXY header reader) are looked through.
"""

from __future__ import annotations

from typing import Any

from twisted.internet import tcp
from twisted.protocols.policies import ProtocolWrapper

from mailgw.maillog import flush_pending


def write_now(transport: Any, data: bytes) -> None:
    """Send ``data`` on ``transport`` (see the module docstring)."""
    outer = transport
    while type(transport).write is ProtocolWrapper.write and transport.transport is not None:
        transport = transport.transport
    if (
        type(transport) is tcp.Server
        and not transport.TLS
        and transport.connected
        and not transport.disconnecting
        and not transport._tempDataBuffer
        and len(transport.dataBuffer) == transport.offset
    ):
        flush_pending()
        try:
            sent = transport.socket.send(data)
        except (BlockingIOError, InterruptedError):
            sent = 0
        except OSError:
            sent = 0  # transport.write's own send finds the error and reports it
        if sent >= len(data):
            return
        data = data[sent:]
    outer.write(data)
