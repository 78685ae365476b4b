"""Synchronous replication's wait: a change is acknowledged to its client (SMTP ``250``, IMAP
``APPEND`` OK) only once the DR replica has durably applied it.

The primary's replication service (``mailgw.replication``) writes ``data_dir/replication/acked``
(``SEQ MODE``) after each acknowledgement: the replica's durable position and ``sync`` or
``async`` (fallen back: the replica did not answer within ``sync_timeout``). Any process of the
node (the main one, IMAP workers) waits by reading that file, so no channel to the main
process is needed.
"""

from __future__ import annotations

import os
from typing import Any

from twisted.internet import defer

ACKED_NAME = "acked"
POLL = 0.01


def acked_path(data_dir: str) -> str:
    return os.path.join(data_dir, "replication", ACKED_NAME)


def read_acked(path: str) -> tuple[int, str]:
    """(the replica's acknowledged sequence number, ``sync`` or ``async``); (0, ``async``)
    when the file is missing or unreadable."""
    try:
        with open(path, encoding="ascii") as fh:
            words = fh.read().split()
        return int(words[0]), words[1]
    except (OSError, ValueError, IndexError):
        return 0, "async"


def write_acked(path: str, seq: int, mode: str) -> None:
    """Replace the file atomically (write, rename; no fsync: a reader after a crash finds an
    older number, and waits longer)."""
    tmp = f"{path}.{os.getpid()}.tmp"
    with open(tmp, "w", encoding="ascii") as fh:
        fh.write(f"{seq} {mode}\n")
    os.replace(tmp, path)


class ReplicaBarrier:
    """``wait(seq)``: a Deferred firing (with True) once the replica has acknowledged
    ``seq``, or at once (False) while replication runs asynchronously, or after ``timeout``
    seconds (False: the replication service falls back to async meanwhile)."""

    def __init__(self, data_dir: str, clock: Any, timeout: float) -> None:
        self.path = acked_path(data_dir)
        self.clock = clock
        self.timeout = timeout

    def wait(self, seq: int) -> defer.Deferred[bool]:
        d: defer.Deferred[bool] = defer.Deferred()
        deadline = self.clock.seconds() + self.timeout

        def check() -> None:
            acked, mode = read_acked(self.path)
            if acked >= seq:
                d.callback(True)
            elif mode != "sync" or self.clock.seconds() >= deadline:
                d.callback(False)
            else:
                self.clock.callLater(POLL, check)

        check()
        return d
