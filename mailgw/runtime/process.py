"""What every mailgw process builds from its config: the user directory, the message store,
the server TLS options and the I/O thread pool.

The main process (``mailgw.service.Node``) and each IMAP worker process
(``mailgw.imap.worker_process``) build theirs here, so that the two stay the same and the
worker need not import the composition root. Only those process entry points import this
module; the role packages take what it builds as arguments.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any

from twisted.python.threadpool import ThreadPool

from mailgw.config import Config, ConfigError
from mailgw.net.tls import ServerTLS, TLSError, server_tls

if TYPE_CHECKING:
    from mailgw.directory import Directory
    from mailgw.store import MessageStore

IO_THREADS = 16
"""Threads doing the spool's and the store's blocking file work (fsyncs wait in parallel)."""


def io_pool(name: str) -> ThreadPool:
    """A (not yet started) pool of ``IO_THREADS`` threads for blocking file work."""
    return ThreadPool(minthreads=0, maxthreads=IO_THREADS, name=name)


def build_directory(config: Config, reactor: Any) -> Directory:
    """The user directory of ``[server] data_dir`` (each process that authenticates has one)."""
    from mailgw.directory import Directory

    return Directory(
        os.path.join(config.server.data_dir, "directory.sqlite"),
        recipient_delimiter=config.directory.recipient_delimiter,
        argon2_time_cost=config.directory.argon2_time_cost,
        argon2_memory_kib=config.directory.argon2_memory_kib,
        default_quota=config.store.default_quota,
        postmaster=config.server.postmaster,
        reactor=reactor,
    )


def build_store(config: Config, directory: Directory, reactor: Any, tier2: Any) -> MessageStore:
    """The message store of ``[server] data_dir/mail`` (one per process: the main one and each
    IMAP worker); ``tier2`` from ``mailgw.store.migration.tier2_from_config`` or None."""
    from mailgw.store import MessageStore

    return MessageStore(
        os.path.join(config.server.data_dir, "mail"),
        quota_for=directory.quota_for,
        default_folders=config.store.default_folders,
        hostname=config.server.hostname,
        reactor=reactor,
        tier2=tier2,
        promote_on_read=config.store.promote_on_read,
    )


def build_tls_options(config: Config, service: str = "smtp") -> ServerTLS | None:
    """The server TLS of ``[tls]`` for ``service`` (``smtp``, ``imap``, ``pop3``: its ALPN ID,
    see ``mailgw.net.tls.ServerTLS``), None when no certificate is configured."""
    if not config.tls_enabled:
        return None
    try:
        return server_tls(
            config.tls.certificate, config.tls.private_key or None, config.tls.min_version, service
        )
    except TLSError as e:  # unreadable for the user twistd --uid switches to, changed since
        bad_key = "private_key" if e.which == "key" else "certificate"
        raise ConfigError(config.path, "tls", bad_key, str(e)) from None
