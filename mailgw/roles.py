"""The role registry: every role a mailgw node can run, with its config section, its
factories and its services. Part of the composition root (with ``mailgw.service``).

A role (``RoleSpec``) declares

- ``name``, and ``section``: the config section holding its keys. By default the role runs
  when ``[section] enabled`` is yes (``enabled`` overrides that: the IMAP roles also look at
  ``workers``, migration at ``[store] tier2_dir``);
- ``build(node)``: makes the role's *part* (its listener factories, or the object other roles
  use, such as the relay), kept in ``node.parts[name]``. Nothing is added to the node here.
  A role reads the parts of the roles named in ``uses``: those are built first (when they are
  enabled; a disabled one has no part);
- ``services(node, part)``: the services the role adds to the node. The node adds them in
  registry order, which is the start order (the relay starts after local delivery has
  recovered the spool; listeners last);
- ``requires``: roles that must be enabled with it (else a config error at ``[section]
  enabled``);
- ``listens``: the role accepts connections, so it gets a connection counter (``[section]
  max_connections``, ``max_connections_per_ip``) inside the process total;
- ``reconfigure`` / ``check``: how a reloaded config (SIGHUP, ``mailgw reload``) reaches the
  part (by default its own ``reconfigure(config)``, or its listener factories'), and what
  may refuse it first. Keys a role cannot take while running are named in
  ``mailgw.config.reload.RELOADABLE`` by their absence.

``ROLES`` holds today's roles. A new role (the HTTP role, the DNS role) adds a ``RoleSpec``
with ``ROLES.register``; the choice of the roles a node runs is ``RoleRegistry.enabled``.

Imports: this module imports the role packages (smtp, pop3, imap, delivery, relay, store
migration), inside the build functions; nothing but ``mailgw.service`` imports it.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from twisted.application.service import IService

from mailgw.config import Config, ConfigError

if TYPE_CHECKING:
    from mailgw.service import Node


def _section_enabled(section: str) -> Callable[[Config], bool]:
    def enabled(config: Config) -> bool:
        return bool(getattr(config, section).enabled)

    return enabled


@dataclass(frozen=True)
class RoleSpec:
    """One role: see the module's docstring."""

    name: str
    section: str
    build: Callable[[Node], Any]
    services: Callable[[Node, Any], Iterable[IService]]
    uses: tuple[str, ...] = ()
    requires: tuple[str, ...] = ()
    listens: bool = False
    enabled: Callable[[Config], bool] | None = None
    reconfigure: Callable[[Any, Config], None] | None = None
    """``reconfigure(part, config)`` on reload (``mailgw.config.reload``); None: the part's
    own ``reconfigure(config)`` if it has one, or each listener factory's."""
    check: Callable[[Config], None] | None = None
    """``check(config)`` before a reload applies: ConfigError refuses the new config."""

    def is_enabled(self, config: Config) -> bool:
        """Whether ``config`` runs this role."""
        check = self.enabled if self.enabled is not None else _section_enabled(self.section)
        return check(config)


class RoleRegistry:
    """The roles in start order, by unique name."""

    def __init__(self, roles: Iterable[RoleSpec] = ()) -> None:
        self._roles: dict[str, RoleSpec] = {}
        for role in roles:
            self.register(role)

    def register(self, role: RoleSpec) -> RoleSpec:
        """Add ``role`` after the others (it starts after them); ValueError if its name is
        taken."""
        if role.name in self._roles:
            raise ValueError(f"role {role.name!r} is registered already")
        self._roles[role.name] = role
        return role

    def __iter__(self) -> Iterator[RoleSpec]:
        return iter(list(self._roles.values()))

    def __len__(self) -> int:
        return len(self._roles)

    def __contains__(self, name: object) -> bool:
        return name in self._roles

    def __getitem__(self, name: str) -> RoleSpec:
        return self._roles[name]

    def check(self) -> None:
        """ValueError unless every role ``uses`` and ``requires`` registered roles only and
        no role uses itself, directly or through others."""
        for role in self:
            for other in role.uses + role.requires:
                if other not in self._roles:
                    raise ValueError(f"role {role.name!r} refers to unknown role {other!r}")
        self.build_order(list(self))

    def enabled(self, config: Config) -> list[RoleSpec]:
        """The roles ``config`` runs, in start order; a config error if one of them requires
        a role that does not run."""
        roles = [role for role in self if role.is_enabled(config)]
        names = {role.name for role in roles}
        for role in roles:
            for needed in role.requires:
                if needed not in names:
                    section = self._roles[needed].section
                    raise ConfigError(
                        config.path, role.section, "enabled", f"needs [{section}] enabled"
                    )
        return roles

    def build_order(self, roles: Sequence[RoleSpec]) -> list[RoleSpec]:
        """``roles`` with each one after the roles it uses (those among ``roles``), otherwise
        in the given order; ValueError on a cycle."""
        chosen = {role.name: role for role in roles}
        order: list[RoleSpec] = []
        done: set[str] = set()
        visiting: list[str] = []

        def visit(role: RoleSpec) -> None:
            if role.name in done:
                return
            if role.name in visiting:
                cycle = " -> ".join([*visiting[visiting.index(role.name) :], role.name])
                raise ValueError(f"roles use each other: {cycle}")
            visiting.append(role.name)
            for name in role.uses:
                if name in chosen:
                    visit(chosen[name])
            visiting.pop()
            done.add(role.name)
            order.append(role)

        for role in roles:
            visit(role)
        return order


@dataclass(frozen=True)
class Endpoint:
    """A listener factory for the listen key ``key`` (``listen`` or ``listen_tls``) of a role's
    section; ``tls``: the TLS options of a listener that starts TLS at once."""

    key: str
    factory: Any
    tls: Any = None


def listener_services(section: str) -> Callable[[Node, Sequence[Endpoint]], list[IService]]:
    """The ``services`` of a role whose part is its endpoints: one listener per description of
    each endpoint's key, behind the section's PROXY protocol setting."""

    def services(node: Node, endpoints: Sequence[Endpoint]) -> list[IService]:
        settings = getattr(node.config, section)
        out: list[IService] = []
        for e in endpoints:
            descriptions = getattr(settings, e.key)
            out += node.listeners(
                section, e.key, descriptions, e.factory, settings.proxy_trusted, tls=e.tls
            )
        return out

    return services


def _one(node: Node, part: Any) -> list[IService]:
    """The ``services`` of a role whose part is its one service."""
    return [part]


# -- background roles --------------------------------------------------------------------


def _build_replication(node: Node) -> Any:
    """Mirror sync to (primary) or from (replica) the disaster-recovery node."""
    from mailgw.replication.service import ReplicationService

    try:
        return ReplicationService(node)
    except (OSError, ValueError) as e:
        raise ConfigError(node.config.path, "replication", "enabled", str(e)) from None


def _build_migration(node: Node) -> Any:
    """Tier-1 -> tier-2 migration in the background, in the I/O pool, at a bounded rate."""
    from mailgw.store.migration import MigrationPolicy, MigrationService, Migrator

    store_config = node.config.store
    migrator = Migrator(node.store, MigrationPolicy.from_config(store_config))
    return MigrationService(
        migrator,
        node.reactor,
        node.run_io,
        rate=store_config.migrate_rate,
        interval=store_config.migrate_interval,
    )


def _build_delivery(node: Node) -> Any:
    from mailgw.delivery import LocalDelivery

    config = node.config
    delivery = LocalDelivery(
        node.spool,
        node.store,
        node.directory,
        node.reactor,
        retry_interval=config.delivery.retry_interval,
        hostname=config.server.hostname,
        run=node.run_io,
        relay=node.parts.get("relay"),
        # Jobs of up to 16 messages share their Maildir directory fsyncs.
        batch=16,
    )
    delivery.setName("delivery")  # type: ignore[no-untyped-call]  # Twisted: untyped
    delivery.tracker = node.tracker
    delivery.mailbox_map = node.mailbox_map
    delivery.node_name = _node_name(config)
    return delivery


def _node_name(config: Config) -> str:
    return config.cluster.node_name or config.server.hostname


def _build_relay(node: Node) -> Any:
    from mailgw.relay.setup import build_relay

    relay = build_relay(node.config, node.spool, node.reactor, node.run_io)
    relay.tracker = node.tracker
    mailbox_map = node.mailbox_map
    if mailbox_map is not None:
        from mailgw.relay.scheduler import MailboxRouting

        directory = node.directory

        def node_of(rcpt: str) -> str | None:
            return mailbox_map.get(rcpt) if directory.get_user(rcpt) is not None else None

        cluster = node.config.cluster
        relay.mailboxes = MailboxRouting(
            node_of,
            mailbox_map.held,
            {name: (host, port) for name, host, port in cluster.mailbox_nodes},
            cluster.move_hold_retry,
            cluster.lmtp_source_address or None,
        )
    return relay


def _reconfigure_relay(relay: Any, config: Config) -> None:
    from mailgw.relay.setup import reconfigure_relay

    reconfigure_relay(relay, config)


def _check_relay(config: Config) -> None:
    from mailgw.relay.setup import check_relay

    check_relay(config)


def _reconfigure_delivery(delivery: Any, config: Config) -> None:
    delivery.retry_interval = config.delivery.retry_interval


# -- listening roles ---------------------------------------------------------------------


def _antivirus_checks(node: Node) -> list[Any]:
    """``[antivirus]``: the clamd check (MX and submission), or none."""
    av = node.config.antivirus
    if not av.enabled:
        return []
    from mailgw.policy.antivirus import AntivirusCheck
    from mailgw.policy.clamd import ClamdPool

    if node.clamd_pool is None:
        node.clamd_pool = ClamdPool(node.reactor, av.servers, av.timeout)
    return [AntivirusCheck(node.clamd_pool, av.on_failure, av.max_scan_size)]


def _inbound_auth_checks(node: Node) -> list[Any]:
    """``[inbound_auth]``: SPF, DKIM, DMARC and DNSBL at the MX, or none."""
    ia = node.config.inbound_auth
    if not ia.enabled:
        return []
    from mailgw.policy.inbound_auth import DNS, Authenticator, InboundAuthCheck, Scores

    scores = Scores(
        spf_fail=ia.spf_fail_score,
        spf_softfail=ia.spf_softfail_score,
        dkim_fail=ia.dkim_fail_score,
        dmarc_fail=ia.dmarc_fail_score,
        dnsbl=ia.dnsbl_score,
        junk=ia.junk_score,
        quarantine=ia.quarantine_score,
        reject=ia.reject_score,
    )
    authenticator = Authenticator(
        DNS(ia.resolvers, ia.dns_timeout),
        ia.authserv_id or node.config.server.hostname,
        ia.dnsbl,
        max_size=node.config.mx.max_message_size,
    )
    return [InboundAuthCheck(authenticator, node.run_io, scores, ia.dmarc_reject)]


def _build_mx(node: Node) -> list[Endpoint]:
    from mailgw.policy.mx import StoreWritable
    from mailgw.smtp.roles.mx import MXFactory

    config = node.config
    mx = MXFactory(
        config.mx,
        config.server.hostname,
        node.spool,
        node.directory,
        node.reactor,
        tls_options=node.tls_options,
        # A DR replica (or a replaced primary) takes no mail: 451 4.3.2 at RCPT.
        extra_checks=[
            StoreWritable(node.store.write_refusal),
            *node.policy.inbound,
            *_inbound_auth_checks(node),
            *_antivirus_checks(node),
        ],
        quarantine=node.policy.quarantine,
    )
    mx.counter = node.counters["mx"]
    mx.xclient_trusted = config.mx.xclient_trusted
    mx.role.tracker = node.tracker
    replication = config.replication
    if replication.enabled and replication.mode == "sync":
        from mailgw.journal.barrier import ReplicaBarrier

        barrier = ReplicaBarrier(config.server.data_dir, node.reactor, replication.sync_timeout)

        def durable(queue_id: str) -> Any:
            # 250 once the message is delivered here and the DR replica has applied it.
            delivered = node.delivery.wait_delivered(queue_id) if node.delivery else None
            d = delivered if delivered is not None else node.run_io(lambda: None)
            d.addCallback(lambda _: node.run_io(node.store.changes.last_seq))
            return d.addCallback(barrier.wait)

        role: Any = mx.role
        role.durable = durable
    return [Endpoint("listen", mx)]


def _build_submission(node: Node) -> list[Endpoint]:
    """STARTTLS listeners, and implicit-TLS ones when TLS is set."""
    from mailgw.policy.submission import SubmissionPolicy, submission_pipeline
    from mailgw.policy.submit import Submitter
    from mailgw.smtp.roles.submission import SubmissionFactory

    config = node.config
    sub = config.submission
    policy = SubmissionPolicy(
        node.directory,
        config.server.hostname,
        node.reactor,
        sub.max_recipients,
        sub.max_messages_per_hour,
        sub.max_header_size,
        can_send_outside=node.parts.get("relay") is not None,
    )
    pipeline = submission_pipeline(policy, [*node.policy.outbound, *_antivirus_checks(node)])
    node.submission_policy = policy
    # The webmail's and OA API's way in: the same checks and quarantine as SMTP submission.
    node.submitter = Submitter(policy, node.spool, pipeline, quarantine=node.policy.quarantine)
    node.submitter.tracker = node.tracker
    sessions: set[Any] = set()
    endpoints = []
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
            pipeline=pipeline,
            quarantine=node.policy.quarantine,
        )
        factory.role.tracker = node.tracker
        factory.xclient_trusted = sub.xclient_trusted
        factory.counter = node.counters["submission"]  # one count for both listeners...
        factory.sessions = sessions  # ...and one set of sessions to make room in at the cap
        key = "listen_tls" if implicit else "listen"
        endpoints.append(Endpoint(key, factory, node.tls_options if implicit else None))
    return endpoints


def _build_pop3(node: Node) -> list[Endpoint]:
    from mailgw.pop3 import POP3Factory

    config = node.config
    pop3_tls = node.tls.get("pop3")  # its own ALPN ID
    endpoints = []
    for implicit in (False, True):
        if implicit and pop3_tls is None:
            break
        factory = POP3Factory(
            config.pop3,
            config.server.hostname,
            node.store,
            node.directory,
            node.reactor,
            tls_options=pop3_tls,
            implicit_tls=implicit,
            auth_failure_delay=config.directory.auth_failure_delay,
            auth=node.auth,
            counter=node.counters["pop3"],
        )
        key = "listen_tls" if implicit else "listen"
        endpoints.append(Endpoint(key, factory, pop3_tls if implicit else None))
    return endpoints


def _imap_workers(config: Config) -> int:
    from mailgw.imap.worker_pool import worker_count

    return worker_count(config.imap.workers)


def _build_imap(node: Node) -> list[Endpoint]:
    """IMAP sessions in this process (``[imap] workers = 0``)."""
    from mailgw.imap.factory import local_admission, structure_cache
    from mailgw.imap.setup import build_imap_factory

    config = node.config
    imap_tls = node.tls.get("imap")  # its own ALPN ID
    cache = structure_cache(config.imap)
    # One count for the plain and TLS listeners, inside the process total.
    admission = local_admission(config.imap, node.counters["imap"])
    endpoints = []
    for implicit in (False, True):
        if implicit and imap_tls is None:
            break
        factory = build_imap_factory(
            config,
            node.store,
            node.directory,
            node.reactor,
            implicit_tls=implicit,
            tls_options=imap_tls,
            cache=cache,
            admission=admission,
            run_blocking=node.run_io,
            auth=node.auth,
        )
        key = "listen_tls" if implicit else "listen"
        endpoints.append(Endpoint(key, factory, imap_tls if implicit else None))
    return endpoints


def _build_imap_workers(node: Node) -> Any:
    """IMAP sessions in worker processes sharing this process's listeners; this process
    arbitrates limits and forwards its store changes (deliveries) to them."""
    from mailgw.imap.worker_pool import Listener, WorkerPool

    imap = node.config.imap
    listeners = [Listener("listen", d, False) for d in imap.listen]
    if node.tls_options is not None:
        listeners += [Listener("listen_tls", d, True) for d in imap.listen_tls]
    pool = WorkerPool(
        node.config,
        node.reactor,
        _imap_workers(node.config),
        listeners,
        counter=node.counters["imap"],
        penalty=node.auth_penalty,
        changes=node.store.changes,
    )
    node.imap_workers = pool
    return pool


def _build_dns(node: Node) -> Any:
    """The smart DNS: authoritative MX and A/AAAA by the querier's region (``mailgw.dns``)."""
    from mailgw.dns.server import DNSRole

    return DNSRole(node.config, node.reactor, node.counters["dns"])


def _dns_services(node: Node, part: Any) -> list[IService]:
    """The UDP and TCP listeners of ``[dns] listen``."""
    return list(part.services())


def _build_lmtp(node: Node) -> list[Endpoint]:
    """The backend's LMTP listener (RFC 2033): copies go straight into the store."""
    import os

    from mailgw.smtp.lmtp import LMTPFactory, LMTPRole
    from mailgw.smtp.protocol import Limits

    config = node.config
    lmtp = config.lmtp
    role = LMTPRole(
        node.spool,
        node.store,
        node.directory,
        os.path.join(config.server.data_dir, "lmtp-tmp"),
        run=node.run_io,
        max_recipients=lmtp.max_recipients,
    )
    limits = Limits(
        max_message_size=lmtp.max_message_size,
        max_connections=lmtp.max_connections,
        max_connections_per_ip=lmtp.max_connections_per_ip,
    )
    factory = LMTPFactory(role, config.server.hostname, limits, node.reactor, lmtp.trusted)
    factory.counter = node.counters["lmtp"]
    return [Endpoint("listen", factory)]


def _build_http(node: Node) -> Any:
    """Metrics, health and (mounted later) the admin API and webmail: ``mailgw.http``."""
    from mailgw.http.authhttp import AuthHTTP, servers_from_config
    from mailgw.http.setup import build_http

    part = build_http(node, Endpoint)
    # Nginx's mail proxy asks here (guarded: [http] allow or the admin token).
    mailbox_map = node.mailbox_map
    part.root.mount(
        "/auth/nginx",
        AuthHTTP(
            node.auth,
            servers_from_config(node.config),
            node.run_io,
            mailbox_map.get if mailbox_map is not None else None,
            node.config.directory.auth_failure_delay,
        ),
    )
    return part


def _http_services(node: Node, part: Any) -> list[IService]:
    """The collector's service, then the listeners."""
    return [part.service, *listener_services("http")(node, part.endpoints)]


ROLES = RoleRegistry(
    [
        RoleSpec(
            "migration",
            "store",
            _build_migration,
            _one,
            enabled=lambda config: bool(config.store.tier2_dir),
        ),
        # Before the relay: the relay starts after local delivery has recovered the spool.
        RoleSpec(
            "delivery",
            "delivery",
            _build_delivery,
            _one,
            uses=("relay",),
            reconfigure=_reconfigure_delivery,
        ),
        RoleSpec(
            "relay",
            "relay",
            _build_relay,
            _one,
            requires=("delivery",),
            reconfigure=_reconfigure_relay,
            check=_check_relay,
        ),
        RoleSpec("mx", "mx", _build_mx, listener_services("mx"), listens=True),
        RoleSpec(
            "submission",
            "submission",
            _build_submission,
            listener_services("submission"),
            uses=("relay",),
            listens=True,
        ),
        RoleSpec("lmtp", "lmtp", _build_lmtp, listener_services("lmtp"), listens=True),
        RoleSpec("pop3", "pop3", _build_pop3, listener_services("pop3"), listens=True),
        RoleSpec(
            "imap",
            "imap",
            _build_imap,
            listener_services("imap"),
            listens=True,
            enabled=lambda config: config.imap.enabled and _imap_workers(config) == 0,
        ),
        RoleSpec(
            "imap-workers",
            "imap",
            _build_imap_workers,
            _one,  # the pool owns the IMAP listeners: it stops the workers before closing them
            listens=True,
            enabled=lambda config: config.imap.enabled and _imap_workers(config) > 0,
        ),
        RoleSpec("dns", "dns", _build_dns, _dns_services, listens=True),
        RoleSpec("replication", "replication", _build_replication, _one),
        # Last: it reads the other roles' parts (relay, IMAP workers) and services (/readyz).
        RoleSpec(
            "http",
            "http",
            _build_http,
            _http_services,
            uses=("relay", "imap-workers"),
            listens=True,
        ),
    ]
)
"""Today's roles, in start order."""
