"""Composition root: Config -> MultiService of every enabled role; the only module importing all.

The roles themselves (their config sections, factories and services) are in the role registry,
``mailgw.roles``; this module builds what they share and adds them to the node.
"""

from __future__ import annotations

import json
import os
import signal
import time
from functools import partial
from typing import Any

from twisted.application import service
from twisted.logger import Logger

from mailgw.config import Config, ConfigError
from mailgw.config.reload import ReloadableConfig, ReloadResult
from mailgw.net.listen import ListenerService, parse_listen, wrap_factory
from mailgw.roles import ROLES, RoleRegistry
from mailgw.runtime.process import (
    ServerTLSSet,
    build_directory,
    build_mailbox_map,
    build_store,
    io_pool,
)

log = Logger()

PID_FILE = "mailgw.pid"
"""In ``[server] data_dir``: the main process's PID while it runs (``mailgw reload``)."""
RELOAD_STATUS_FILE = "reload.json"
"""In ``[server] data_dir``: the outcome of the last reload (``mailgw reload`` prints it)."""


class Node(service.MultiService):
    """One mailgw process: shared state (directory, spool, store, limits) and the services of
    the roles its config enables (``roles``, by default ``mailgw.roles.ROLES``).

    ``io_pool`` runs the blocking file work (spool commits, local delivery) off the reactor
    thread; it starts and stops with this service. ``parts`` holds each enabled role's part
    (``RoleSpec.build``), ``role_services`` the services each one added.
    """

    def __init__(self, config: Config, reactor: Any, roles: RoleRegistry = ROLES) -> None:
        super().__init__()
        from mailgw.runtime.threads import pool_runner
        from mailgw.spool import Spool

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
        from mailgw.state import StateService, build_state
        from mailgw.state.unified import startup_config

        # The last-good pushed unified config (if any) on top of the file, Redis up or not.
        config, pushed_version, pushed_overlay = startup_config(config)
        self.config = config
        # What the gateways share ([state]): counters, lockouts, mailbox nodes, config.
        self.state_setup = build_state(config, reactor)
        self.gateway_state = self.state_setup.state
        """``IGatewayState``; ``gateway_state.nodes`` is the ``IMailboxNodes`` (user ->
        backend node) that forwarding and ``auth_http`` read."""
        # Started after the roles, stopped before them (not children: the node's children are
        # the journal's tail and the roles' services).
        self.state_service = StateService(self.state_setup)
        self.directory = build_directory(config, reactor)
        # [cluster] mailbox_nodes: which node holds each user's mailbox (None: all local);
        # in the gateway state when that is Redis (shared by the gateways).
        self.mailbox_map = build_mailbox_map(
            config, self.gateway_state if self.state_setup.redis else None, reactor
        )
        from mailgw.tracking import tracker_from_config

        # Message events of every role, written by one thread of this process (and pruned).
        self.tracker = tracker_from_config(config, prune=True)
        self.io_pool = io_pool("mailgw-io")
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

        # Before every role: the node's change journal, read by IMAP (and next, replication).
        self.journal_tail = JournalTail(
            self.store.changes, config.store.journal_poll_interval, config.store.journal_retention
        )
        self.journal_tail.setServiceParent(self)
        from mailgw.webhooks.sender import build_webhooks

        # [webhooks]: signed POSTs of the tracker's message events, from a durable outbox.
        try:
            self.webhooks = build_webhooks(config, reactor, run_io)
        except ValueError as e:
            raise ConfigError(config.path, "webhooks", "secret_file", str(e)) from None
        if self.webhooks is not None:
            self.tracker.listeners.append(self.webhooks.listener)
            self.webhooks.setServiceParent(self)
        self.tls = ServerTLSSet(config)  # one ServerTLS per service, renewed on reload
        self.tls_options = self.tls.get("smtp")  # SMTP's (no ALPN ID); POP3, IMAP: theirs
        # The quarantine and the checks the SMTP roles add to their own (rules, antivirus...).
        from mailgw.policy.ratelimit import StateRateCounter
        from mailgw.policy.setup import build_policy

        shared_counter = StateRateCounter(self.gateway_state) if self.state_setup.redis else None
        self.policy = build_policy(config, self.directory, reactor, run_io, shared_counter)
        reputation = self.policy.reputation
        if reputation is not None:  # bounces and deliveries move reputations
            self.tracker.listeners.append(
                lambda kind, queue_id, when, detail: reputation.observe(kind, queue_id, detail)
            )
        self.submission_policy: Any = None  # set by the submission role
        self.clamd_pool: Any = None  # [antivirus]: one rotation shared by MX and submission
        self.submitter: Any = None  # set by the submission role: the webmail's way to submit
        self.imap_workers: Any = None  # set by the IMAP workers role
        self.roles = roles
        enabled = roles.enabled(config)
        self._add_limits(list(dict.fromkeys(role.section for role in enabled if role.listens)))
        self.parts: dict[str, Any] = {}
        for role in roles.build_order(enabled):
            self.parts[role.name] = role.build(self)
        self.relay: Any = self.parts.get("relay")
        self.delivery: Any = self.parts.get("delivery")
        self.role_services: dict[str, list[service.IService]] = {}
        for role in enabled:
            services = self.role_services[role.name] = list(
                role.services(self, self.parts[role.name])
            )
            for s in services:
                s.setServiceParent(self)
        self.settings = ReloadableConfig(config)
        """The running config: SIGHUP and ``mailgw reload`` re-read it (``reload``); a part
        holding config values subscribes its ``reconfigure`` (roles: ``RoleSpec``)."""
        self._subscribe_parts(enabled)
        self.config_follower = self._follow_unified_config(pushed_version, pushed_overlay)
        self._sighup_installed = False
        self._previous_sighup: Any = None

    def _subscribe_parts(self, enabled: list[Any]) -> None:
        """Who hears of a reloaded config, in this order: the node itself, TLS (which may
        refuse a certificate that does not load), the directory, the connection limits and
        auth penalty, then each role's part."""
        settings = self.settings
        settings.subscribe(self._set_config)
        settings.subscribe(self.tls.reconfigure, self.tls.check)
        settings.subscribe(self.directory.reconfigure)
        settings.subscribe(self._reconfigure_limits)
        settings.subscribe(self.policy.reconfigure, self.policy.check)  # the rules file
        if self.policy.reputation is not None:
            settings.subscribe(self.policy.reputation.reconfigure)
        for role in self.roles.build_order(enabled):
            part = self.parts[role.name]
            if role.reconfigure is not None:
                settings.subscribe(partial(role.reconfigure, part), role.check)
                continue
            items = part if isinstance(part, list | tuple) else [part]
            for item in items:
                target = getattr(item, "factory", item)  # a listener Endpoint: its factory
                reconfigure = getattr(target, "reconfigure", None)
                if callable(reconfigure):
                    settings.subscribe(reconfigure, role.check)

    def _follow_unified_config(self, version: int, overlay: str) -> Any:
        """The pushed unified config (``mailgw config push``): followed through Redis pub/sub
        (and a poll as safety net), or by polling the embedded state's SQLite file."""
        from mailgw.state.unified import ConfigFollower

        config = self.config
        subscriber: Any = None
        if self.state_setup.redis:
            from mailgw.state.redis import subscribe

            subscriber = partial(subscribe, config.state, self.reactor, config.state.timeout)
        follower = ConfigFollower(
            self.gateway_state,
            self.settings,
            self.reload,
            config.server.data_dir,
            config.cluster.node_name or config.server.hostname,
            self.reactor,
            version,
            overlay,
            subscriber,
            poll_interval=5.0 if self.state_setup.redis else 1.0,
        )
        on_recover = getattr(self.gateway_state, "on_recover", None)
        if on_recover is not None:
            on_recover.append(follower.resync)
        return follower

    def _set_config(self, config: Config) -> None:
        self.config = config

    def _reconfigure_limits(self, config: Config) -> None:
        """Reloaded connection caps (fitted to the descriptor limit again, as at start) and
        per-address limits of the listening roles; the auth penalty schedule."""
        from mailgw.directory.penalty import PenaltyPolicy
        from mailgw.net.limits import fit_caps, raise_nofile

        sections = {name: getattr(config, name) for name in self.counters}
        soft, _ = raise_nofile()
        budget = fit_caps(
            soft,
            config.server.reserved_descriptors,
            config.server.max_connections,
            {name: sec.max_connections for name, sec in sections.items()},
        )
        self.connections.limit = budget.total
        for name, counter in self.counters.items():
            counter.max_total = budget.roles[name]
            counter.max_per_ip = sections[name].max_connections_per_ip
        self.auth_penalty.set_policy(PenaltyPolicy.from_config(config.directory))

    def reload(self) -> ReloadResult:
        """Re-read the config file and apply what can be applied while running (SIGHUP,
        ``mailgw reload``); the outcome is logged and written to ``RELOAD_STATUS_FILE``."""
        result = self.settings.reload()
        status = {"time": time.time(), "pid": os.getpid(), **result.as_dict()}
        path = os.path.join(self.config.server.data_dir, RELOAD_STATUS_FILE)
        try:
            with open(path + ".tmp", "w", encoding="utf-8") as f:
                json.dump(status, f)
            os.replace(path + ".tmp", path)
        except OSError as e:
            log.warn("cannot write {path}: {error}", path=path, error=e.strerror)
        return result

    def _sighup(self, signum: int, frame: Any) -> None:
        # A signal handler runs between two bytecodes of the reactor thread: reload from the
        # reactor's loop instead (callFromThread is safe here).
        self.reactor.callFromThread(self.reload)

    def _add_limits(self, listening: list[str]) -> None:
        """Connection caps (per listening role's section, and the process total they share)
        fitted to the descriptor limit, raised first; the auth penalty shared by every role
        (and the IMAP workers, through their pipe)."""
        from mailgw.directory.penalty import AuthGuard, MemoryAuthPenalty, PenaltyPolicy
        from mailgw.net.limits import ConnectionCounter, SharedTotal, fit_caps, raise_nofile
        from mailgw.runtime.metrics import PROTOCOLS

        config = self.config
        sections = {name: getattr(config, name) for name in listening}
        enabled = {name: sec.max_connections for name, sec in sections.items()}
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
                sections[name].max_connections_per_ip,
                cap,
                shared=self.connections,
                protocol=PROTOCOLS.get(name, name),
            )
            for name, cap in budget.roles.items()
        }
        penalty_policy = PenaltyPolicy.from_config(config.directory)
        if self.state_setup.redis:  # failures and lockouts shared by the gateways
            from mailgw.directory.penalty import StateAuthPenalty

            self.auth_penalty: Any = StateAuthPenalty(self.gateway_state, penalty_policy)
        else:
            self.auth_penalty = MemoryAuthPenalty(self.reactor, penalty_policy)
        self.auth = AuthGuard(self.directory, self.auth_penalty, self.reactor)

    twistd_options: Any = None
    """twistd's options when twistd runs this node (``mailgw.tap``): for the mail log."""

    def setServiceParent(self, parent: Any) -> None:
        if self.twistd_options is not None:  # parent: twistd's Application
            from mailgw.maillog import use_mail_log

            use_mail_log(parent, self.twistd_options, self.config.log.format, self.reactor)
        super().setServiceParent(parent)

    def startService(self) -> None:
        self.io_pool.start()
        self.tracker.start()
        if self.twistd_options is not None:  # the twistd process: not in-process tests
            # Before the listeners: once a port answers, a SIGHUP is a reload, never the
            # default action (the end of the process).
            self._previous_sighup = signal.signal(signal.SIGHUP, self._sighup)
            self._sighup_installed = True
        super().startService()
        if self.twistd_options is not None:
            self._write_pid_file()
        # After the SIGHUP handler: the first read of the unified config takes a moment.
        self.state_service.startService()
        self.config_follower.startService()

    @property
    def pid_file(self) -> str:
        return os.path.join(self.config.server.data_dir, PID_FILE)

    def _write_pid_file(self) -> None:
        try:
            with open(self.pid_file + ".tmp", "w", encoding="ascii") as f:
                f.write(f"{os.getpid()}\n")
            os.replace(self.pid_file + ".tmp", self.pid_file)
        except OSError as e:
            log.warn("cannot write {path}: {error}", path=self.pid_file, error=e.strerror)

    def _remove_pid_file(self) -> None:
        try:
            with open(self.pid_file, encoding="ascii") as f:
                mine = f.read().strip() == str(os.getpid())
            if mine:
                os.unlink(self.pid_file)
        except OSError:
            pass

    def stopService(self) -> Any:
        if self._sighup_installed:
            self._sighup_installed = False
            signal.signal(signal.SIGHUP, self._previous_sighup or signal.SIG_DFL)
            self._remove_pid_file()
        from twisted.internet import defer

        first = defer.DeferredList(
            [
                defer.maybeDeferred(self.config_follower.stopService),
                defer.maybeDeferred(self.state_service.stopService),
            ],
            consumeErrors=True,
        )
        d = first.addCallback(lambda _: super(Node, self).stopService())

        def stop_pool(result: object) -> object:
            # Joins the threads: work already started (a commit, a delivery) finishes first.
            self.io_pool.stop()
            self.tracker.stop()  # writes the events still waiting
            return result

        return d.addBoth(stop_pool)

    def listeners(
        self, section: str, key: str, descriptions: Any, factory: Any, trusted: Any, tls: Any = None
    ) -> list[ListenerService]:
        """A listener service per description of ``[section] key``, serving ``factory``
        behind the connection guard (PROXY protocol from ``trusted``; ``tls``: implicit
        TLS)."""
        out = []
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
            out.append(ListenerService(self.reactor, description, wrapped, where))
        return out


def build_service(config: Config, reactor: Any) -> service.IService:
    try:
        return Node(config, reactor)
    except ConfigError as e:
        raise SystemExit(f"mailgw: {e}") from None
