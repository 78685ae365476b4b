"""Composition root: Config -> MultiService of every enabled role; the only module importing all."""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any

from twisted.application import service
from twisted.logger import Logger
from twisted.python.threadpool import ThreadPool

from mailgw.config import Config, ConfigError
from mailgw.net.listen import ListenerService, parse_listen, wrap_factory
from mailgw.net.tls import TLSError, server_tls

if TYPE_CHECKING:
    from mailgw.directory import Directory
    from mailgw.store import MessageStore

log = Logger()


IO_THREADS = 16
"""Threads doing the spool's and the store's blocking file work (fsyncs wait in parallel)."""


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


def build_tls_options(config: Config, service: str = "smtp") -> Any:
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


class Node(service.MultiService):
    """One mailgw process: shared state (directory, spool, store) and its role services.

    ``io_pool`` runs the blocking file work (spool commits, local delivery) off the reactor
    thread; it starts and stops with this service.
    """

    def __init__(self, config: Config, reactor: Any) -> None:
        super().__init__()
        from mailgw.delivery import LocalDelivery
        from mailgw.spool import Spool
        from mailgw.spool.threads import pool_runner

        self.config = config
        self.reactor = reactor
        data_dir = config.server.data_dir
        try:
            os.makedirs(data_dir, exist_ok=True)
        except OSError as e:
            raise ConfigError(
                config.path, "server", "data_dir", f"cannot create: {e.strerror}"
            ) from None
        if not os.access(data_dir, os.W_OK):
            raise ConfigError(config.path, "server", "data_dir", f"not writable: {data_dir}")
        self.directory = build_directory(config, reactor)
        self.io_pool = ThreadPool(minthreads=0, maxthreads=IO_THREADS, name="mailgw-io")
        run_io = self.run_io = pool_runner(reactor, self.io_pool)
        self.spool = Spool(
            os.path.join(data_dir, "spool"), hostname=config.server.hostname, run=run_io
        )
        from mailgw.store.migration import tier2_from_config

        try:
            tier2 = tier2_from_config(data_dir, config.store)
        except OSError as e:
            raise ConfigError(
                config.path, "store", "tier2_dir", f"cannot create: {e.strerror}"
            ) from None
        self.store = build_store(config, self.directory, reactor, tier2)
        from mailgw.journal.changelog import JournalTail

        JournalTail(
            self.store.changes, config.store.journal_poll_interval, config.store.journal_retention
        ).setServiceParent(self)
        if tier2 is not None:
            self._add_migration(run_io)
        self.tls_options = build_tls_options(config)  # SMTP's (no ALPN ID); POP3, IMAP: theirs
        self.relay: Any = None
        self.submission_policy: Any = None
        if config.relay.enabled:
            from mailgw.relay.setup import build_relay

            if not config.delivery.enabled:
                raise ConfigError(config.path, "relay", "enabled", "needs [delivery] enabled")
            self.relay = build_relay(config, self.spool, reactor, run_io)
        self.delivery: Any = None
        if config.delivery.enabled:
            self.delivery = LocalDelivery(
                self.spool,
                self.store,
                self.directory,
                reactor,
                retry_interval=config.delivery.retry_interval,
                hostname=config.server.hostname,
                run=run_io,
                relay=self.relay,
            )
            self.delivery.setName("delivery")
            self.delivery.setServiceParent(self)
        if self.relay is not None:
            self.relay.setServiceParent(self)  # after delivery: it starts after recovery
        self._add_limits()
        self._add_roles()

    def _add_limits(self) -> None:
        """Connection caps (per role, and the process total they share) fitted to the
        descriptor limit, raised first; the auth penalty shared by every role (and the IMAP
        workers, through their pipe)."""
        from mailgw.directory.penalty import AuthGuard, MemoryAuthPenalty, PenaltyPolicy
        from mailgw.net.limits import ConnectionCounter, SharedTotal, fit_caps, raise_nofile

        config = self.config
        sections = {name: getattr(config, name) for name in ("mx", "submission", "pop3", "imap")}
        enabled = {name: sec.max_connections for name, sec in sections.items() if sec.enabled}
        soft, hard = raise_nofile()
        budget = fit_caps(
            soft, config.server.reserved_descriptors, config.server.max_connections, enabled
        )
        caps = ", ".join(f"{name} {cap}" for name, cap in budget.roles.items())
        log.info(
            "descriptor limit {soft} (hard {hard}): at most {total} connections ({caps})",
            soft=soft,
            hard=hard,
            total=budget.total,
            caps=caps,
        )
        if budget.lowered:
            log.warn(
                "connection caps lowered to fit {soft} descriptors minus {reserved} reserved: "
                "raise the descriptor limit (LimitNOFILE=) or lower max_connections",
                soft=soft,
                reserved=config.server.reserved_descriptors,
            )
        self.connections = SharedTotal(budget.total)
        self.counters = {
            name: ConnectionCounter(
                sections[name].max_connections_per_ip, cap, shared=self.connections
            )
            for name, cap in budget.roles.items()
        }
        self.auth_penalty = MemoryAuthPenalty(
            self.reactor, PenaltyPolicy.from_config(config.directory)
        )
        self.auth = AuthGuard(self.directory, self.auth_penalty, self.reactor)

    def _add_migration(self, run_io: Any) -> None:
        """Tier-1 -> tier-2 migration in the background, in the I/O pool, at a bounded rate."""
        from mailgw.store.migration import MigrationPolicy, MigrationService, Migrator

        store_config = self.config.store
        migrator = Migrator(self.store, MigrationPolicy.from_config(store_config))
        MigrationService(
            migrator,
            self.reactor,
            run_io,
            rate=store_config.migrate_rate,
            interval=store_config.migrate_interval,
        ).setServiceParent(self)

    twistd_options: Any = None
    """twistd's options when twistd runs this node (``mailgw.tap``): for the mail log."""

    def setServiceParent(self, parent: Any) -> None:
        if self.twistd_options is not None:  # parent: twistd's Application
            from mailgw.maillog import use_mail_log

            use_mail_log(parent, self.twistd_options)
        super().setServiceParent(parent)

    def startService(self) -> None:
        self.io_pool.start()
        super().startService()

    def stopService(self) -> Any:
        d = super().stopService()

        def stop_pool(result: object) -> object:
            # Joins the threads: work already started (a commit, a delivery) finishes first.
            self.io_pool.stop()
            return result

        return d.addBoth(stop_pool)

    def _listen(
        self, section: str, key: str, descriptions: Any, factory: Any, trusted: Any, tls: Any = None
    ) -> None:
        for description in descriptions:
            spec, _ = parse_listen(description)
            wrapped = wrap_factory(
                factory,
                spec,
                self.reactor,
                trusted,
                tls_options=tls,
                handshake_timeout=self.config.tls.handshake_timeout,
            )
            where = f"{self.config.path}:{section}:{key}"
            ListenerService(self.reactor, description, wrapped, where).setServiceParent(self)

    def _add_roles(self) -> None:
        config = self.config
        if config.mx.enabled:
            from mailgw.smtp.roles.mx import MXFactory

            mx = MXFactory(
                config.mx,
                config.server.hostname,
                self.spool,
                self.directory,
                self.reactor,
                tls_options=self.tls_options,
            )
            mx.counter = self.counters["mx"]
            self._listen("mx", "listen", config.mx.listen, mx, config.mx.proxy_trusted)
        if config.submission.enabled:
            _submission_listeners(self)
        if config.pop3.enabled:
            from mailgw.pop3 import POP3Factory

            pop3_tls = build_tls_options(config, "pop3")  # its own ALPN ID
            pop3 = POP3Factory(
                config.pop3,
                config.server.hostname,
                self.store,
                self.directory,
                self.reactor,
                tls_options=pop3_tls,
                auth_failure_delay=config.directory.auth_failure_delay,
                auth=self.auth,
                counter=self.counters["pop3"],
            )
            self._listen("pop3", "listen", config.pop3.listen, pop3, config.pop3.proxy_trusted)
            if pop3_tls is not None:
                pop3s = POP3Factory(
                    config.pop3,
                    config.server.hostname,
                    self.store,
                    self.directory,
                    self.reactor,
                    tls_options=pop3_tls,
                    implicit_tls=True,
                    auth_failure_delay=config.directory.auth_failure_delay,
                    auth=self.auth,
                    counter=self.counters["pop3"],
                )
                self._listen(
                    "pop3",
                    "listen_tls",
                    config.pop3.listen_tls,
                    pop3s,
                    config.pop3.proxy_trusted,
                    tls=pop3_tls,
                )
        if config.imap.enabled:
            self._add_imap()

    def _add_imap(self) -> None:
        from mailgw.imap.factory import IMAPFactory, local_admission, structure_cache
        from mailgw.imap.workers import worker_count

        config = self.config
        workers = worker_count(config.imap.workers)
        if workers > 0:
            self._add_imap_workers(workers)
            return
        imap_tls = build_tls_options(config, "imap")  # its own ALPN ID
        cache = structure_cache(config.imap)
        literal_dir = os.path.join(config.server.data_dir, "tmp")
        # One count for the plain and TLS listeners, inside the process total.
        admission = local_admission(config.imap, self.counters["imap"])
        for implicit in (False, True):
            if implicit and imap_tls is None:
                break
            factory = IMAPFactory(
                config.imap,
                config.server.hostname,
                self.store,
                self.directory,
                self.reactor,
                tls_options=imap_tls,
                implicit_tls=implicit,
                auth_failure_delay=config.directory.auth_failure_delay,
                cache=cache,
                admission=admission,
                run_blocking=self.run_io,
                auth=self.auth,
                literal_dir=literal_dir,
            )
            key = "listen_tls" if implicit else "listen"
            self._listen(
                "imap",
                key,
                getattr(config.imap, key),
                factory,
                config.imap.proxy_trusted,
                tls=imap_tls if implicit else None,
            )

    def _add_imap_workers(self, count: int) -> None:
        """IMAP sessions in ``count`` worker processes sharing this process's listeners; this
        process arbitrates limits and forwards its store changes (deliveries) to them."""
        from mailgw.imap.workers import Listener, WorkerPool

        imap = self.config.imap
        listeners = [Listener("listen", d, False) for d in imap.listen]
        if self.tls_options is not None:
            listeners += [Listener("listen_tls", d, True) for d in imap.listen_tls]
        pool = WorkerPool(
            self.config,
            self.reactor,
            count,
            listeners,
            counter=self.counters["imap"],
            penalty=self.auth_penalty,
            changes=self.store.changes,
        )
        pool.setServiceParent(self)
        self.imap_workers = pool


def _submission_listeners(node: Node) -> None:
    """The submission role: STARTTLS listeners, and implicit-TLS ones when TLS is set."""
    from mailgw.smtp.roles.submission import SubmissionFactory, SubmissionPolicy

    config = node.config
    sub = config.submission
    policy = SubmissionPolicy(
        node.directory,
        config.server.hostname,
        node.reactor,
        sub.max_recipients,
        sub.max_messages_per_hour,
        sub.max_header_size,
        can_send_outside=node.relay is not None,
    )
    node.submission_policy = policy  # for the webmail: mailgw.smtp.roles.submission.submit
    sessions: set[Any] = set()
    for implicit in (False, True):
        if implicit and node.tls_options is None:
            break
        factory = SubmissionFactory(
            sub,
            config.server.hostname,
            node.spool,
            node.directory,
            node.reactor,
            tls_options=node.tls_options,
            implicit_tls=implicit,
            auth_failure_delay=config.directory.auth_failure_delay,
            policy=policy,
            auth=node.auth,
        )
        factory.counter = node.counters["submission"]  # one count for both listeners...
        factory.sessions = sessions  # ...and one set of sessions to make room in at the cap
        key = "listen_tls" if implicit else "listen"
        node._listen(
            "submission",
            key,
            getattr(sub, key),
            factory,
            sub.proxy_trusted,
            tls=node.tls_options if implicit else None,
        )


def build_service(config: Config, reactor: Any) -> service.IService:
    try:
        return Node(config, reactor)
    except ConfigError as e:
        raise SystemExit(f"mailgw: {e}") from None
