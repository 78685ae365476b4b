"""Outbound channels: the model, routing rules, weighted round robin, health and limits.

A message's route (recipient domain, sender domain, class) selects a routing rule; the rule
gives *tiers* of channel names ("domestic; overseas, sdn": domestic first, then overseas and
SDN). ``ChannelSelector.choose`` takes the first tier that still has a usable channel (not
excluded by the caller's failover, not suspended) and picks among its channels by smooth
weighted round robin (nginx's algorithm: deterministic, evenly interleaved), honouring each
channel's concurrency limit and token-bucket rate limit. A busy tier is waited for, not
skipped: only excluded or suspended channels make the choice fall through to the next tier.

Health: after ``failure_threshold`` consecutive channel failures a channel is suspended for
``cooldown`` seconds, then *probing*: one message at a time until a success makes it active
again (a failure suspends it anew).
"""

from __future__ import annotations

import fnmatch
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

DIRECT = "direct"
SMARTHOST = "smarthost"

ACTIVE = "active"
SUSPENDED = "suspended"
PROBING = "probing"


@dataclass(frozen=True)
class Channel:
    """One way out. ``kind`` direct: MX lookup, bind one of ``source_addresses``, EHLO
    ``helo``; smarthost: relay through ``hosts`` (``host:port``), optionally with ``auth``
    (user, password). ``tls``: may / require / none. ``rate_per_minute`` 0: unlimited;
    ``burst``: token-bucket size (0: a tenth of a minute's rate, at least 1)."""

    name: str
    kind: str = DIRECT
    weight: int = 1
    concurrency: int = 20
    rate_per_minute: float = 0.0
    burst: int = 0
    source_addresses: tuple[str, ...] = ()
    helo: str = ""
    hosts: tuple[str, ...] = ()
    tls: str = "may"
    auth: tuple[str, str] | None = None

    def __post_init__(self) -> None:
        if self.kind not in (DIRECT, SMARTHOST):
            raise ValueError(f"channel {self.name}: kind must be direct or smarthost")
        if self.kind == SMARTHOST and not self.hosts:
            raise ValueError(f"channel {self.name}: a smarthost channel needs hosts")
        if self.weight < 1 or self.concurrency < 1 or self.rate_per_minute < 0:
            raise ValueError(f"channel {self.name}: weight and concurrency must be >= 1")
        if self.tls not in ("may", "require", "none"):
            raise ValueError(f"channel {self.name}: tls must be may, require or none")


@dataclass(frozen=True)
class MessageRoute:
    """What routing looks at: recipient domain, sender domain, class set by earlier checks;
    ``channel``: a channel the policy forced (``Verdict.reroute``): the only one used."""

    recipient_domain: str
    sender_domain: str = ""
    message_class: str = ""
    channel: str = ""


def domain_matches(pattern: str, domain: str) -> bool:
    """``example.com`` exact; ``.cn`` the TLD/suffix and everything under it; ``*.cn`` and
    other globs via fnmatch (``*`` spans dots); ``*`` everything. Case-insensitive."""
    pattern, domain = pattern.strip().lower().rstrip("."), domain.lower().rstrip(".")
    if pattern.startswith("."):
        return domain == pattern[1:] or domain.endswith(pattern)
    if any(c in pattern for c in "*?["):
        return fnmatch.fnmatchcase(domain, pattern)
    return domain == pattern


def parse_tiers(text: str) -> tuple[tuple[str, ...], ...]:
    """``"domestic; overseas, sdn"`` → (("domestic",), ("overseas", "sdn"))."""
    tiers = tuple(
        tuple(n.strip() for n in tier.split(",") if n.strip()) for tier in text.split(";")
    )
    tiers = tuple(t for t in tiers if t)
    if not tiers:
        raise ValueError("a route needs at least one channel")
    return tiers


@dataclass(frozen=True)
class RoutingRule:
    """Matches when every given criterion matches; empty criteria match anything.

    Rules naming a ``message_class`` are tried before the others, so a classified message
    (``spam``) only ever goes to its listed channels."""

    tiers: tuple[tuple[str, ...], ...]
    recipient_domains: tuple[str, ...] = ()
    sender_domains: tuple[str, ...] = ()
    message_class: str = ""

    def matches(self, route: MessageRoute) -> bool:
        if self.message_class and self.message_class != route.message_class:
            return False
        if self.recipient_domains and not any(
            domain_matches(p, route.recipient_domain) for p in self.recipient_domains
        ):
            return False
        return not self.sender_domains or any(
            domain_matches(p, route.sender_domain) for p in self.sender_domains
        )


class Router:
    """First matching rule (class rules first, then in order) or the default tiers."""

    def __init__(self, rules: Sequence[RoutingRule], default: tuple[tuple[str, ...], ...]) -> None:
        self.rules = [r for r in rules if r.message_class] + [
            r for r in rules if not r.message_class
        ]
        self.default = default

    def tiers(self, route: MessageRoute) -> tuple[tuple[str, ...], ...]:
        if route.channel:
            return ((route.channel,),)
        for rule in self.rules:
            if rule.matches(route):
                return rule.tiers
        return self.default

    def eligible(self, route: MessageRoute) -> list[str]:
        """Every channel name the message may use, in preference order."""
        return [name for tier in self.tiers(route) for name in tier]


class TokenBucket:
    """``rate`` tokens per second up to ``capacity``; time from ``clock.seconds()``."""

    def __init__(self, rate: float, capacity: float, clock: Any) -> None:
        self.rate = rate
        self.capacity = capacity
        self.clock = clock
        self.tokens = capacity
        self.stamp = clock.seconds()

    def _refill(self) -> None:
        now = self.clock.seconds()
        self.tokens = min(self.capacity, self.tokens + (now - self.stamp) * self.rate)
        self.stamp = now

    def available(self) -> bool:
        self._refill()
        return self.tokens >= 1.0

    def take(self) -> bool:
        if not self.available():
            return False
        self.tokens -= 1.0
        return True

    def wait_time(self) -> float:
        """Seconds until a token is available (0 if one is)."""
        self._refill()
        return 0.0 if self.tokens >= 1.0 else (1.0 - self.tokens) / self.rate


@dataclass
class ChannelHealth:
    """Counters and state of one channel, as ``mailgw channel status`` shows them."""

    state: str = ACTIVE
    attempts: int = 0
    successes: int = 0
    failures: int = 0
    consecutive_failures: int = 0
    in_flight: int = 0
    last_error: str = ""
    last_error_at: float = 0.0
    suspended_until: float = 0.0
    current_weight: int = field(default=0, repr=False)


class ChannelSelector:
    """Choose a channel per message; track in-flight work, rate, health and counters.

    Usage: ``channel = selector.choose(route, exclude)``; deliver through it; then
    ``selector.release(channel.name, failed=..., error=...)`` (``failed``: a *channel*
    failure in the sense of ``client.classify``; recipient/message rejections are successes
    of the channel). On failure, call ``choose`` again with the failed channel excluded.
    """

    def __init__(
        self,
        channels: Iterable[Channel],
        router: Router,
        clock: Any,
        failure_threshold: int = 5,
        cooldown: float = 300.0,
    ) -> None:
        self.channels = {c.name: c for c in channels}
        self.router = router
        self.clock = clock
        self.failure_threshold = failure_threshold
        self.cooldown = cooldown
        self.health = {name: ChannelHealth() for name in self.channels}
        self.buckets: dict[str, TokenBucket] = {}
        for c in self.channels.values():
            if c.rate_per_minute > 0:
                capacity = c.burst or max(1, int(c.rate_per_minute // 10))
                self.buckets[c.name] = TokenBucket(c.rate_per_minute / 60.0, capacity, clock)
        unknown = {
            n
            for rule in [*router.rules, RoutingRule(router.default)]
            for tier in rule.tiers
            for n in tier
            if n not in self.channels
        }
        if unknown:
            raise ValueError(f"routes name unknown channels: {', '.join(sorted(unknown))}")

    # -- state --

    def _refresh(self, name: str) -> ChannelHealth:
        h = self.health[name]
        if h.state == SUSPENDED and self.clock.seconds() >= h.suspended_until:
            h.state = PROBING
        return h

    def _healthy(self, name: str) -> bool:
        return self._refresh(name).state != SUSPENDED

    def _ready(self, name: str) -> bool:
        h = self._refresh(name)
        if h.state == SUSPENDED:
            return False
        if h.state == PROBING and h.in_flight > 0:
            return False  # one probe at a time
        if h.in_flight >= self.channels[name].concurrency:
            return False
        bucket = self.buckets.get(name)
        return bucket is None or bucket.available()

    def tiers(self, route: MessageRoute) -> tuple[tuple[str, ...], ...]:
        """The route's tiers; a forced channel this node does not have gives none (the
        message is deferred, and bounces when it stays so)."""
        if route.channel and route.channel not in self.channels:
            return ()
        return self.router.tiers(route)

    def eligible(self, route: MessageRoute) -> list[str]:
        return [name for tier in self.tiers(route) for name in tier]

    def _tier(self, route: MessageRoute, exclude: Iterable[str]) -> tuple[str, ...]:
        excluded = set(exclude)
        for tier in self.tiers(route):
            usable = tuple(n for n in tier if n not in excluded and self._healthy(n))
            if usable:
                return usable
        return ()

    # -- selection --

    def choose(self, route: MessageRoute, exclude: Iterable[str] = ()) -> Channel | None:
        """The next channel for ``route``, or None when none can take it now (see
        ``wait_hint``). The chosen channel counts one attempt in flight until ``release``."""
        candidates = [n for n in self._tier(route, exclude) if self._ready(n)]
        if not candidates:
            return None
        total = 0
        best: str | None = None
        for name in candidates:
            h = self.health[name]
            weight = self.channels[name].weight
            h.current_weight += weight
            total += weight
            if best is None or h.current_weight > self.health[best].current_weight:
                best = name
        assert best is not None
        self.health[best].current_weight -= total
        h = self.health[best]
        h.in_flight += 1
        h.attempts += 1
        bucket = self.buckets.get(best)
        if bucket is not None:
            bucket.take()
        return self.channels[best]

    def wait_hint(self, route: MessageRoute, exclude: Iterable[str] = ()) -> float | None:
        """After ``choose`` gave None: seconds until a channel may be free (0: when a running
        delivery ends), or None when no eligible channel is left (defer the message)."""
        tier = self._tier(route, exclude)
        if not tier:
            excluded = set(exclude)
            pending = [
                self.health[n].suspended_until - self.clock.seconds()
                for t in self.tiers(route)
                for n in t
                if n not in excluded and self.health[n].state == SUSPENDED
            ]
            return max(0.0, min(pending)) if pending else None
        waits = []
        for name in tier:
            h = self.health[name]
            if h.in_flight >= self.channels[name].concurrency or (
                h.state == PROBING and h.in_flight
            ):
                waits.append(0.0)
            elif name in self.buckets:
                waits.append(self.buckets[name].wait_time())
            else:
                waits.append(0.0)
        return min(waits)

    def release(self, name: str, failed: bool = False, error: str = "") -> None:
        """End one delivery attempt through ``name``; a channel failure counts towards
        suspension, a success resets it (and ends probing)."""
        h = self._refresh(name)
        h.in_flight = max(0, h.in_flight - 1)
        now = self.clock.seconds()
        if not failed:
            h.successes += 1
            h.consecutive_failures = 0
            if h.state == PROBING:
                h.state = ACTIVE
            return
        h.failures += 1
        h.consecutive_failures += 1
        h.last_error, h.last_error_at = error, now
        if h.state == PROBING or h.consecutive_failures >= self.failure_threshold:
            h.state = SUSPENDED
            h.suspended_until = now + self.cooldown

    def status(self) -> list[dict[str, Any]]:
        """One row per channel for ``mailgw channel status`` and the admin API."""
        rows = []
        for name, channel in self.channels.items():
            h = self._refresh(name)
            rows.append(
                {
                    "name": name,
                    "kind": channel.kind,
                    "state": h.state,
                    "weight": channel.weight,
                    "in_flight": h.in_flight,
                    "attempts": h.attempts,
                    "successes": h.successes,
                    "failures": h.failures,
                    "consecutive_failures": h.consecutive_failures,
                    "last_error": h.last_error,
                    "last_error_at": h.last_error_at,
                    "suspended_until": h.suspended_until if h.state == SUSPENDED else 0.0,
                }
            )
        return rows
