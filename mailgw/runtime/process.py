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

from twisted.logger import Logger
from twisted.python.threadpool import ThreadPool

from mailgw.config import Config, ConfigError
from mailgw.net.tls import ServerTLS, TLSError, server_tls

if TYPE_CHECKING:
    from mailgw.directory import Directory
    from mailgw.store import MessageStore

log = Logger()

IO_THREADS = 16
"""Threads doing the spool's and the store's blocking file work (fsyncs wait in parallel)."""


def io_pool(name: str) -> ThreadPool:
    """A (not yet started) pool of ``IO_THREADS`` threads for blocking file work."""
    return ThreadPool(minthreads=0, maxthreads=IO_THREADS, name=name)


def directory_path(config: Config) -> str:
    """``[cluster] directory``, else ``data_dir/directory.sqlite``."""
    return config.cluster.directory or os.path.join(config.server.data_dir, "directory.sqlite")


def build_mailbox_map(config: Config, state: Any = None, reactor: Any = None) -> Any:
    """The ``IMailboxMap`` of ``[cluster] mailbox_nodes`` (None when that is empty): on the
    gateway state ``state`` when given (``[state] backend = redis``: shared through Redis,
    ``mailgw.cluster.statemap``), else in the directory database."""
    if not config.cluster.mailbox_nodes:
        return None
    names = [name for name, _, _ in config.cluster.mailbox_nodes]
    if state is not None:
        from mailgw.cluster.statemap import StateMailboxMap

        return StateMailboxMap(state, names, reactor)
    from mailgw.cluster.nodemap import DirectoryMailboxMap

    return DirectoryMailboxMap(directory_path(config), names)


def build_directory(config: Config, reactor: Any) -> Directory:
    """The user directory of ``[server] data_dir`` (each process that authenticates has one)."""
    from mailgw.directory import Directory

    return Directory(
        directory_path(config),
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


class ServerTLSSet:
    """The server TLS of one process, one ``ServerTLS`` per service (its ALPN ID), built from
    ``[tls]`` on first use and renewed in place on reload (``check`` then ``reconfigure``):
    listeners and STARTTLS keep the same objects, new connections get the new certificate.
    Turning TLS on or off needs a restart (``mailgw.config.reload``)."""

    def __init__(self, config: Config) -> None:
        self.config = config
        self._by_service: dict[str, ServerTLS | None] = {}
        self._pending: tuple[Config, dict[str, Any]] | None = None

    def get(self, service: str = "smtp") -> ServerTLS | None:
        """This process's ``ServerTLS`` for ``service``; None without a certificate."""
        if service not in self._by_service:
            self._by_service[service] = build_tls_options(self.config, service)
        return self._by_service[service]

    def check(self, config: Config) -> None:
        """Load the certificate and key of ``config`` for every service in use: ConfigError
        (the reload is refused) when they do not load or do not match."""
        from mailgw.net.tls import load_certificate_options

        options: dict[str, Any] = {}
        if config.tls_enabled:
            for service, tls in self._by_service.items():
                if tls is None:
                    continue
                try:
                    options[service] = load_certificate_options(
                        config.tls.certificate,
                        config.tls.private_key or None,
                        config.tls.min_version,
                    )
                except TLSError as e:
                    bad_key = "private_key" if e.which == "key" else "certificate"
                    raise ConfigError(config.path, "tls", bad_key, str(e)) from None
        self._pending = (config, options)

    def reconfigure(self, config: Config) -> None:
        """Serve new connections with the certificate ``check`` loaded for ``config``."""
        if self._pending is None or self._pending[0] is not config:
            self.check(config)
        assert self._pending is not None
        _, options = self._pending
        self._pending = None
        self.config = config
        renewed = []
        for service, tls in self._by_service.items():
            if tls is not None and service in options:
                tls.replace(options[service])
                renewed.append(service)
        if renewed:
            log.info(
                "TLS: new connections get {certificate} ({services})",
                certificate=config.tls.certificate,
                services=", ".join(renewed),
            )
