"""Connection limits shared by every role: sessions open in all and per client address."""

from __future__ import annotations

from enum import Enum


class Refusal(Enum):
    """Why a new session was not admitted."""

    TOTAL = "total"
    PER_IP = "per_ip"


class ConnectionCounter:
    """Counts open sessions, in all and per client address, and refuses those over the limits.

    ``admit`` counts a session or says why not (a refused session is never counted); ``release``
    forgets a counted one. ``max_total`` None means no overall limit.
    """

    def __init__(self, max_per_ip: int, max_total: int | None = None) -> None:
        self.max_per_ip = max_per_ip
        self.max_total = max_total
        self.total = 0
        self.per_ip: dict[str, int] = {}

    def admit(self, ip: str) -> Refusal | None:
        if self.max_total is not None and self.total >= self.max_total:
            return Refusal.TOTAL
        current = self.per_ip.get(ip, 0)
        if current >= self.max_per_ip:
            return Refusal.PER_IP
        self.per_ip[ip] = current + 1
        self.total += 1
        return None

    def release(self, ip: str) -> None:
        current = self.per_ip.get(ip, 0)
        if current <= 0:
            return
        self.total -= 1
        if current > 1:
            self.per_ip[ip] = current - 1
        else:
            del self.per_ip[ip]

    def count(self, ip: str) -> int:
        return self.per_ip.get(ip, 0)
