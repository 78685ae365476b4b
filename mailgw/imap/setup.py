"""Build the IMAP listener factories from the config: the one place mapping ``[imap]``,
``[server]`` and ``[directory]`` keys onto ``IMAPFactory``.

Two callers, one result: the main process's IMAP role (``mailgw.roles``, sessions in
process) and each IMAP worker process (``mailgw.imap.worker_process``). What differs between
them comes in as arguments: the store and directory of that process, ``admission`` (the
process's own counters, or the main process asked over the control pipe), ``auth`` (the
node's auth penalty, or the main process's) and ``run_blocking`` (that process's I/O pool).
"""

from __future__ import annotations

import os
from typing import Any

from mailgw.config import Config
from mailgw.directory.penalty import AuthGuard
from mailgw.imap.factory import Admission, IMAPFactory
from mailgw.interfaces import IDirectory, IMessageStore
from mailgw.mime import StructureCache
from mailgw.runtime.threads import Runner


def build_imap_factory(
    config: Config,
    store: IMessageStore,
    directory: IDirectory,
    reactor: Any,
    *,
    implicit_tls: bool,
    tls_options: Any,
    cache: StructureCache,
    admission: Admission,
    run_blocking: Runner,
    auth: AuthGuard,
) -> IMAPFactory:
    """The factory of the plain (STARTTLS) listeners, or with ``implicit_tls`` that of the
    implicit-TLS ones; the two of a process share ``cache`` and ``admission``."""
    factory = IMAPFactory(
        config.imap,
        config.server.hostname,
        store,
        directory,
        reactor,
        tls_options=tls_options,
        implicit_tls=implicit_tls,
        auth_failure_delay=config.directory.auth_failure_delay,
        cache=cache,
        admission=admission,
        run_blocking=run_blocking,
        auth=auth,
        literal_dir=os.path.join(config.server.data_dir, "tmp"),
    )
    replication = config.replication
    changes = getattr(store, "changes", None)
    if replication.enabled and replication.mode == "sync" and changes is not None:
        from mailgw.journal.barrier import ReplicaBarrier

        barrier = ReplicaBarrier(config.server.data_dir, reactor, replication.sync_timeout)
        factory.durable = lambda: barrier.wait(changes.last_seq())
    return factory
