"""The reputation arithmetic, without I/O: a subject's record, its decay, its hourly volume
baseline (EWMA) and the standing it gives (ok, limited, blocked).

A *subject* is ``user:ADDRESS`` (an authenticated user), ``domain:DOMAIN`` (an envelope
sender's domain) or ``ip:ADDRESS`` (a client address). Its record (``Record``) holds:

- ``points``: bad points, each event adding some (a message classed spam, a spam report, a
  bounce, an unknown recipient, a message over the volume baseline; a ham report takes some
  away), halved every ``half_life`` seconds (``decayed``);
- the volume: ``hour`` (the hour number, ``now // 3600``) and ``hour_count`` (messages in it),
  and ``baseline``: the exponentially weighted moving average of the past hours' counts
  (``roll``: each hour that ended folds its count in with weight ``alpha``, each hour without
  mail folds a zero); a message is a *spike* when the hour's count passes
  ``max(min_volume, spike_factor * baseline)``;
- counters: ``sent``, ``delivered``, ``bounced``, ``unknown`` (recipients refused as
  unknown), ``spam`` (messages whose content score passed the threshold), ``reports_spam``,
  ``reports_ham``, and ``content`` (an EWMA of content scores);
- ``override``: ``allow`` or ``block`` set by an administrator (``mailgw reputation``), which
  wins over the points.

``standing(record, limits)``: ``blocked`` (override block, or points >= ``block_score``),
``limited`` (points >= ``limit_score``), else ``ok``; ``allow`` is always ``ok``.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields

OK = "ok"
LIMITED = "limited"
BLOCKED = "blocked"
SUBJECT_KINDS = ("user", "domain", "ip")
COUNTERS = ("sent", "delivered", "bounced", "unknown", "spam", "reports_spam", "reports_ham")


@dataclass
class Record:
    """One subject's reputation (see the module docstring)."""

    points: float = 0.0
    points_at: float = 0.0
    hour: int = 0
    hour_count: int = 0
    baseline: float = 0.0
    hours: int = 0
    """Hours folded into the baseline so far."""
    sent: int = 0
    delivered: int = 0
    bounced: int = 0
    unknown: int = 0
    spam: int = 0
    reports_spam: int = 0
    reports_ham: int = 0
    content: float = 0.0
    override: str = ""

    def to_dict(self) -> dict[str, float | int | str]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, object]) -> Record:
        names = {f.name: f.type for f in fields(cls)}
        kwargs: dict[str, object] = {}
        for k, value in data.items():
            if k not in names:
                continue
            kind = names[k]
            if kind == "float":
                kwargs[k] = float(value)  # type: ignore[arg-type]
            elif kind == "int":
                kwargs[k] = int(value)  # type: ignore[call-overload]
            else:
                kwargs[k] = str(value)
        return cls(**kwargs)  # type: ignore[arg-type]

    @property
    def bounce_rate(self) -> float:
        return self.bounced / self.sent if self.sent else 0.0

    @property
    def unknown_rate(self) -> float:
        return self.unknown / self.sent if self.sent else 0.0


@dataclass(frozen=True)
class Limits:
    """How events count and where the standings start (``[reputation]``)."""

    half_life: float = 86400.0
    alpha: float = 0.3
    spike_factor: float = 5.0
    min_volume: int = 100
    spam_points: float = 2.0
    report_points: float = 5.0
    bounce_points: float = 0.5
    unknown_points: float = 1.0
    spike_points: float = 1.0
    limit_score: float = 10.0
    block_score: float = 20.0


def check_subject(subject: str) -> str:
    """``subject`` normalised (lower case), or ValueError when it is not ``kind:value``."""
    kind, colon, value = subject.strip().partition(":")
    if not colon or kind.lower() not in SUBJECT_KINDS or not value.strip():
        raise ValueError(f"not a subject (user:ADDRESS, domain:DOMAIN, ip:ADDRESS): {subject!r}")
    return f"{kind.lower()}:{value.strip().lower()}"


def decayed(points: float, since: float, now: float, half_life: float) -> float:
    """``points`` counted at ``since``, as they stand at ``now`` (halved every
    ``half_life`` seconds; never below 0)."""
    if points <= 0:
        return 0.0
    if half_life <= 0 or now <= since:
        return points
    return points * math.pow(0.5, (now - since) / half_life)


def ewma_fold(
    baseline: float, hours: int, count: float, gap: int, alpha: float
) -> tuple[float, int]:
    """The baseline after the hour holding ``count`` ended and ``gap - 1`` empty hours
    followed (``gap`` >= 1); the first hour folded is taken as it is. (baseline, hours)."""
    if gap < 1:
        return baseline, hours
    baseline = count if hours == 0 else alpha * count + (1 - alpha) * baseline
    hours += 1
    empty = gap - 1
    if empty > 0:
        baseline *= math.pow(1 - alpha, empty)  # each empty hour folds a zero
        hours += empty
    return baseline, hours


def roll(record: Record, now: float, alpha: float) -> None:
    """Bring ``record``'s volume to the hour of ``now`` (fold the hours that ended)."""
    hour = int(now // 3600)
    if record.hour == 0 and record.hours == 0 and record.hour_count == 0:
        record.hour = hour
        return
    if hour > record.hour:
        record.baseline, record.hours = ewma_fold(
            record.baseline, record.hours, record.hour_count, hour - record.hour, alpha
        )
        record.hour, record.hour_count = hour, 0


def is_spike(record: Record, limits: Limits) -> bool:
    """The current hour's count is over the baseline (see the module docstring)."""
    return record.hour_count > max(limits.min_volume, limits.spike_factor * record.baseline)


def advance(record: Record, now: float, limits: Limits) -> Record:
    """``record`` brought to ``now``: points decayed, volume rolled."""
    record.points = decayed(record.points, record.points_at, now, limits.half_life)
    record.points_at = now
    roll(record, now, limits.alpha)
    return record


def apply_event(record: Record, event: dict[str, float], now: float, limits: Limits) -> Record:
    """``record`` after ``event`` at ``now``: ``message`` (1: one more message sent: the
    volume, ``sent``, a spike's points), ``points`` (added, may be negative), ``content``
    (a content score: its EWMA), and any of ``COUNTERS`` (added)."""
    advance(record, now, limits)
    if event.get("message"):
        record.hour_count += int(event["message"])
        record.sent += int(event["message"])
        if is_spike(record, limits):
            record.points += limits.spike_points
    if "content" in event:
        c = float(event["content"])
        record.content = (
            c if record.sent <= 1 else limits.alpha * c + (1 - limits.alpha) * (record.content)
        )
    for name in COUNTERS:
        if name != "sent" and event.get(name):
            setattr(record, name, getattr(record, name) + int(event[name]))
    record.points = max(0.0, record.points + float(event.get("points", 0.0)))
    return record


def standing(record: Record, limits: Limits) -> str:
    """``ok``, ``limited`` or ``blocked`` (see the module docstring)."""
    if record.override == "allow":
        return OK
    if record.override == "block":
        return BLOCKED
    if limits.block_score and record.points >= limits.block_score:
        return BLOCKED
    if limits.limit_score and record.points >= limits.limit_score:
        return LIMITED
    return OK
