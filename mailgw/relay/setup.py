"""Build the relay from the config: channels, router, resolver, client options, scheduler."""

from __future__ import annotations

import os
from typing import Any

from twisted.python.threadpool import ThreadPool

from mailgw.config import Config, ConfigError
from mailgw.relay.channels import Channel, ChannelSelector, Router, RoutingRule, parse_tiers
from mailgw.relay.client import DEFAULT_CHANNEL_PATTERNS, Classifier, ConnectionPool, Timeouts
from mailgw.relay.dkim import DKIMSigner
from mailgw.relay.mx import MXResolver
from mailgw.relay.retry_schedule import RetrySchedule
from mailgw.relay.scheduler import RelayScheduler, RelaySettings
from mailgw.runtime.threads import Runner


def build_channels(config: Config) -> list[Channel]:
    """``[channel:*]`` sections as Channels; none configured: one ``direct`` channel."""
    if not config.channels:
        return [Channel("direct")]
    channels = []
    for c in config.channels:
        auth = None
        if c.auth_user:
            try:
                with open(c.auth_password_file, encoding="utf-8") as f:
                    auth = (c.auth_user, f.read().strip())
            except OSError as e:
                raise ConfigError(
                    config.path, f"channel:{c.name}", "auth_password_file", f"cannot read: {e}"
                ) from None
        channels.append(
            Channel(
                c.name,
                kind=c.kind,
                weight=c.weight,
                concurrency=c.concurrency,
                rate_per_minute=c.rate,
                burst=c.burst,
                source_addresses=c.source_addresses,
                helo=c.helo,
                hosts=c.hosts,
                tls=c.tls,
                auth=auth,
            )
        )
    return channels


def build_router(config: Config, channels: list[Channel]) -> Router:
    """``[route:*]`` rules in file order; default tiers from ``[relay] default_route`` (empty:
    every channel in one tier)."""
    rules = [
        RoutingRule(
            parse_tiers(r.channels),
            recipient_domains=r.recipient_domains,
            sender_domains=r.sender_domains,
            message_class=r.message_class,
        )
        for r in config.routes
    ]
    if config.relay.default_route:
        default = parse_tiers(config.relay.default_route)
    else:
        default = (tuple(c.name for c in channels),)
    return Router(rules, default)


def _timeouts(r: Any) -> Timeouts:
    step = r.command_timeout
    return Timeouts(
        connect=r.connect_timeout,
        greeting=step,
        ehlo=step,
        starttls=step,
        auth=step,
        mail=step,
        rcpt=step,
        data_init=step,
        data_block=step,
        data_end=max(step, 600.0),
        rset=min(step, 60.0),
        quit=min(step, 10.0),
    )


def _classifier(r: Any) -> Classifier:
    patterns = DEFAULT_CHANNEL_PATTERNS + tuple(
        p.strip() for p in r.channel_failure_patterns.split(";") if p.strip()
    )
    return Classifier(patterns)


def _settings(config: Config) -> RelaySettings:
    r = config.relay
    return RelaySettings(
        window=r.window,
        retry_share=r.retry_window_percent / 100.0,
        per_domain=r.per_domain_concurrency,
        mx_port=r.mx_port,
        max_targets=r.max_mx_addresses,
        tls_require_domains=r.tls_require_domains,
        timeouts=_timeouts(r),
        scan_interval=r.scan_interval,
        status_path=os.path.join(config.server.data_dir, "relay", "channels.json"),
        status_interval=r.status_interval,
        delay_warning_after=r.delay_warning_after,
    )


def _schedule(config: Config) -> RetrySchedule:
    r = config.relay
    return RetrySchedule.parse(" ".join(r.retry_schedule), f"{r.max_age}s")


def build_relay(config: Config, spool: Any, reactor: Any, run: Runner) -> RelayScheduler:
    """The relay service of a node (its DNS thread pool starts and stops with it)."""
    r = config.relay
    channels = build_channels(config)
    selector = ChannelSelector(
        channels,
        build_router(config, channels),
        reactor,
        failure_threshold=r.failure_threshold,
        cooldown=r.cooldown,
    )
    dns_pool = ThreadPool(minthreads=0, maxthreads=8, name="mailgw-dns")
    resolver = MXResolver(reactor, dns_pool, r.resolvers, timeout=r.dns_timeout)
    data_dir = config.server.data_dir
    signer = DKIMSigner(os.path.join(data_dir, "dkim")) if config.submission.dkim else None
    return RelayScheduler(
        spool,
        selector,
        resolver,
        reactor,
        _schedule(config),
        config.server.hostname,
        run=run,
        pool=ConnectionPool(
            reactor,
            idle_timeout=r.connection_idle,
            max_reuse=r.connection_reuse,
            max_age=r.connection_reuse_time,
        ),
        settings=_settings(config),
        classifier=_classifier(r),
        signer=signer,
        threadpool=dns_pool,
    )


def check_relay(config: Config) -> None:
    """ConfigError when the relay could not take ``config`` on reload (a channel's password
    file unreadable)."""
    build_channels(config)


def reconfigure_relay(relay: RelayScheduler, config: Config) -> None:
    """Apply a reloaded config to the running relay (``mailgw.config.reload``): channels and
    routes, failover thresholds, retry schedule, window and limits, timeouts, failure
    patterns. Messages being sent finish with what they started with; the next choice of a
    channel, the next retry time, the next connection and the next DNS lookup use the new
    values."""
    r = config.relay
    channels = build_channels(config)
    relay.selector.reconfigure(
        channels, build_router(config, channels), r.failure_threshold, r.cooldown
    )
    relay.settings = _settings(config)
    relay.schedule = _schedule(config)
    relay.classifier = _classifier(r)
    relay.pool.idle_timeout = r.connection_idle
    relay.pool.max_reuse = r.connection_reuse
    relay.pool.max_age = r.connection_reuse_time
    if relay.threadpool is not None:  # DNS servers and time limit (its cache starts empty)
        relay.resolver = MXResolver(
            relay.reactor, relay.threadpool, r.resolvers, timeout=r.dns_timeout
        )
