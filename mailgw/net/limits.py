"""Connection limits shared by every role: sessions open in the process, per role and per
client address; the process's descriptor limit, and role caps that fit inside it."""

from __future__ import annotations

import resource
from collections.abc import Mapping
from dataclasses import dataclass
from enum import Enum

from mailgw.runtime.metrics import CONNECTIONS, CONNECTIONS_REFUSED

STRESS_AT = 0.8
"""A role is *stressed* (``ConnectionCounter.stressed``) from this share of its cap (or of the
process's): SMTP then shortens its timeouts as Postfix does under stress."""


class Refusal(Enum):
    """Why a new session was not admitted."""

    TOTAL = "total"
    PER_IP = "per_ip"


class SharedTotal:
    """The process-wide count of client sessions, over every role that shares it."""

    def __init__(self, limit: int | None = None) -> None:
        self.limit = limit
        self.total = 0

    @property
    def full(self) -> bool:
        return self.limit is not None and self.total >= self.limit


class ConnectionCounter:
    """Counts open sessions, in all and per client address, and refuses those over the limits.

    ``admit`` counts a session or says why not (a refused session is never counted); ``release``
    forgets a counted one. ``max_total`` None means no limit of this counter's own; ``shared``
    (one per process) also caps the sum over every counter that shares it (``Refusal.TOTAL``).
    ``protocol`` (e.g. ``smtp``): admitted and refused sessions are counted in the metrics
    under this name (``mailgw.runtime.metrics``); None: not counted.
    """

    def __init__(
        self,
        max_per_ip: int,
        max_total: int | None = None,
        shared: SharedTotal | None = None,
        protocol: str | None = None,
    ) -> None:
        self.max_per_ip = max_per_ip
        self.max_total = max_total
        self.shared = shared
        self.protocol = protocol
        self.total = 0
        self.per_ip: dict[str, int] = {}

    def admit(self, ip: str) -> Refusal | None:
        refusal = self._admit(ip)
        if self.protocol is not None:
            if refusal is None:
                CONNECTIONS.labels(self.protocol).inc()
            else:
                CONNECTIONS_REFUSED.labels(self.protocol, refusal.value).inc()
        return refusal

    def _admit(self, ip: str) -> Refusal | None:
        if self.max_total is not None and self.total >= self.max_total:
            return Refusal.TOTAL
        if self.shared is not None and self.shared.full:
            return Refusal.TOTAL
        current = self.per_ip.get(ip, 0)
        if current >= self.max_per_ip:
            return Refusal.PER_IP
        self.per_ip[ip] = current + 1
        self.total += 1
        if self.shared is not None:
            self.shared.total += 1
        return None

    def release(self, ip: str) -> None:
        current = self.per_ip.get(ip, 0)
        if current <= 0:
            return
        self.total -= 1
        if self.shared is not None:
            self.shared.total -= 1
        if current > 1:
            self.per_ip[ip] = current - 1
        else:
            del self.per_ip[ip]

    def count(self, ip: str) -> int:
        return self.per_ip.get(ip, 0)

    @property
    def stressed(self) -> bool:
        """True from ``STRESS_AT`` of this counter's cap or of the shared one."""
        if self.max_total is not None and self.total >= STRESS_AT * self.max_total:
            return True
        shared = self.shared
        return (
            shared is not None
            and shared.limit is not None
            and (shared.total >= STRESS_AT * shared.limit)
        )


# -- descriptors ---------------------------------------------------------------------------------


def raise_nofile(wanted: int | None = None) -> tuple[int, int]:
    """Raise this process's soft ``RLIMIT_NOFILE`` towards ``wanted`` (None: the hard limit),
    never above the hard limit and never lowering it; returns ``(soft, hard)`` after."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = hard if wanted is None else wanted
    if hard != resource.RLIM_INFINITY:
        target = min(target, hard)
    if target > soft or soft == resource.RLIM_INFINITY:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
        except (ValueError, OSError):
            pass
    return soft, hard


@dataclass(frozen=True)
class Budget:
    """What the descriptor limit allows: the process total and each role's cap."""

    total: int
    roles: Mapping[str, int]
    lowered: bool
    """True when the caps had to be lowered to fit the descriptor limit."""


def fit_caps(nofile: int, reserved: int, total: int, roles: Mapping[str, int]) -> Budget:
    """Caps that fit in ``nofile`` descriptors keeping ``reserved`` for everything else (files,
    spool, databases, pipes, listeners): the total is at most ``nofile - reserved``, and when
    the role caps add up to more than that, each is lowered in proportion, so that every role
    keeps a share of the descriptors whatever the others do (at least 1 each). A configured
    ``total`` below the sum of the role caps is the operator's choice and is kept as it is."""
    room = max(len(roles), nofile - reserved)
    new_total = min(total, room)
    wanted = sum(roles.values())
    if wanted <= room:
        return Budget(new_total, dict(roles), new_total < total)
    scaled = {name: max(1, cap * room // wanted) for name, cap in roles.items()}
    return Budget(new_total, scaled, True)
