"""The metrics every mailgw process counts itself (prometheus_client objects in ``PROCESS``), and
their snapshots: how an IMAP worker's figures travel to the main process and are added up there.

The roles feed the objects below wherever the event happens (a spool commit, an admitted
connection, a failed login, an IMAP command). They live in their own registry, ``PROCESS``,
not in prometheus_client's default ``REGISTRY``, because the same code also runs in the IMAP
worker processes: a worker sends ``snapshot()`` (cumulative values, compact JSON) to the main
process over its control pipe, and the main process serves ``merged()``, this process's
figures plus every worker's, as ONE family per name from a collector in the default registry
(``mailgw.http.metrics``). Snapshots are cumulative, not deltas, so a lost or repeated one
never miscounts; the last snapshot of a worker that ended is kept (``WorkerFigures.retire``)
so the sums never go down when a worker is restarted.

Imports: prometheus_client only (the bottom layer: the spool, SMTP, IMAP, POP3 import it).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import CounterMetricFamily, HistogramMetricFamily, Metric

PROCESS = CollectorRegistry(auto_describe=True)
"""This process's own metrics (see the module docstring)."""

PROTOCOLS = {"mx": "smtp", "submission": "submission", "pop3": "pop3", "imap": "imap"}
"""The ``protocol`` label of a listening role's section."""

_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)

CONNECTIONS = Counter(
    "mailgw_connections",
    "Client connections admitted, by protocol (smtp, submission, pop3, imap, http).",
    ["protocol"],
    registry=PROCESS,
)
CONNECTIONS_REFUSED = Counter(
    "mailgw_connections_refused",
    "Client connections refused by a connection limit (reason: total or per_ip), by protocol.",
    ["protocol", "reason"],
    registry=PROCESS,
)
AUTH_FAILURES = Counter(
    "mailgw_auth_failures",
    "Failed logins (wrong password, unknown user, locked out), by protocol.",
    ["protocol"],
    registry=PROCESS,
)
IMAP_COMMANDS = Counter(
    "mailgw_imap_commands",
    "IMAP commands completed, by command name (all IMAP processes together).",
    ["command"],
    registry=PROCESS,
)
IMAP_COMMAND_SECONDS = Histogram(
    "mailgw_imap_command_duration_seconds",
    "Time from an IMAP command's arrival to its tagged answer (IDLE: its whole length).",
    ["command"],
    buckets=_LATENCY_BUCKETS,
    registry=PROCESS,
)
SPOOL_COMMIT_SECONDS = Histogram(
    "mailgw_spool_commit_duration_seconds",
    "Time of the fsynced spool write (content, envelope, directory) that precedes SMTP's 250.",
    buckets=_LATENCY_BUCKETS,
    registry=PROCESS,
)

# -- snapshots ---------------------------------------------------------------------------------

Snapshot = dict[str, list[list[Any]]]
"""``{family name: [[labels, value], ...]}`` for a counter; for a histogram
``[[labels, [cumulative bucket counts...], sum], ...]`` (the buckets of the family's
definition above, ``+Inf`` last). JSON-able; labels are a dict of the series' labels."""


def snapshot(registry: CollectorRegistry = PROCESS) -> Snapshot:
    """The cumulative figures of ``registry`` (see ``Snapshot``); ``_created`` is left out."""
    out: Snapshot = {}
    for family in registry.collect():
        series: dict[tuple[tuple[str, str], ...], list[Any]] = {}
        if family.type == "counter":
            for s in family.samples:
                if s.name.endswith("_total"):
                    out.setdefault(family.name, []).append([dict(s.labels), s.value])
        elif family.type == "histogram":
            for s in family.samples:
                labels = {k: v for k, v in s.labels.items() if k != "le"}
                row = series.setdefault(tuple(sorted(labels.items())), [labels, [], 0.0])
                if s.name.endswith("_bucket"):
                    row[1].append(s.value)
                elif s.name.endswith("_sum"):
                    row[2] = s.value
            out[family.name] = list(series.values())
    return out


def add(total: Snapshot, more: Snapshot) -> Snapshot:
    """``total`` + ``more`` (a new snapshot; neither argument changes). Series are matched by
    labels; histograms with a different number of buckets than the first seen are skipped
    (a worker of another version)."""
    out: dict[str, dict[tuple[tuple[str, str], ...], list[Any]]] = {}
    for snap in (total, more):
        for name, rows in snap.items():
            family = out.setdefault(name, {})
            for row in rows:
                labels = {str(k): str(v) for k, v in dict(row[0]).items()}
                key = tuple(sorted(labels.items()))
                if len(row) == 2:  # a counter
                    old = family.get(key)
                    family[key] = [labels, (old[1] if old else 0.0) + float(row[1])]
                    continue
                buckets, total_sum = [float(b) for b in row[1]], float(row[2])
                old = family.get(key)
                if old is None:
                    family[key] = [labels, buckets, total_sum]
                elif len(old[1]) == len(buckets):
                    family[key] = [
                        labels,
                        [a + b for a, b in zip(old[1], buckets, strict=True)],
                        old[2] + total_sum,
                    ]
    return {name: list(rows.values()) for name, rows in out.items()}


def valid(snap: object) -> bool:
    """Whether ``snap`` (from a control line) has the shape of a ``Snapshot``."""
    if not isinstance(snap, dict):
        return False
    for name, rows in snap.items():
        if not isinstance(name, str) or not isinstance(rows, list):
            return False
        for row in rows:
            if not isinstance(row, list) or len(row) not in (2, 3) or not isinstance(row[0], dict):
                return False
            if len(row) == 2:
                numbers = [row[1]]
            elif isinstance(row[1], list):
                numbers = [*row[1], row[2]]
            else:
                return False
            if not all(
                isinstance(n, (int, float)) and not isinstance(n, bool) and math.isfinite(n)
                for n in numbers
            ):
                return False
    return True


def families(snap: Snapshot, registry: CollectorRegistry = PROCESS) -> Iterator[Metric]:
    """Metric families of ``snap`` with the names, help texts and buckets of ``registry``'s
    definitions (every family the registry defines, also those with no series yet)."""
    for family in registry.collect():
        rows = snap.get(family.name, [])
        if family.type == "counter":
            counter = CounterMetricFamily(family.name, family.documentation, labels=None)
            for labels, value in (r for r in rows if len(r) == 2):
                counter.add_sample(family.name + "_total", dict(labels), float(value))
            yield counter
        elif family.type == "histogram":
            bounds = _bounds(family)
            histogram = HistogramMetricFamily(family.name, family.documentation)
            for row in rows:
                if len(row) != 3 or len(row[1]) != len(bounds):
                    continue
                labels, counts, total = dict(row[0]), row[1], float(row[2])
                for bound, count in zip(bounds, counts, strict=True):
                    histogram.add_sample(
                        family.name + "_bucket", {**labels, "le": bound}, float(count)
                    )
                histogram.add_sample(family.name + "_count", labels, float(counts[-1]))
                histogram.add_sample(family.name + "_sum", labels, total)
            yield histogram


def _bounds(family: Metric) -> list[str]:
    """The ``le`` texts of a histogram family's buckets, in order (``+Inf`` last): from its
    samples, or (no series yet) from its definition."""
    from prometheus_client.utils import floatToGoString

    seen: list[str] = []
    for s in family.samples:
        if s.name.endswith("_bucket") and s.labels["le"] not in seen:
            seen.append(s.labels["le"])
    if seen:
        return seen
    metric = _HISTOGRAMS.get(family.name)
    bounds = metric._upper_bounds if metric is not None else [math.inf]
    return [str(floatToGoString(b)) for b in bounds]  # type: ignore[no-untyped-call]


_HISTOGRAMS: dict[str, Histogram] = {
    "mailgw_imap_command_duration_seconds": IMAP_COMMAND_SECONDS,
    "mailgw_spool_commit_duration_seconds": SPOOL_COMMIT_SECONDS,
}


class WorkerFigures:
    """The main process's record of the worker processes' snapshots: the latest of each live
    worker (by a key, e.g. its index and pid) and the sum of those of workers that ended."""

    def __init__(self) -> None:
        self.live: dict[Any, Snapshot] = {}
        self.retired: Snapshot = {}

    def update(self, worker: Any, snap: Snapshot) -> None:
        self.live[worker] = snap

    def retire(self, worker: Any) -> None:
        """``worker`` ended: its last figures stay in the sums."""
        last = self.live.pop(worker, None)
        if last is not None:
            self.retired = add(self.retired, last)

    def total(self) -> Snapshot:
        out = self.retired
        for snap in self.live.values():
            out = add(out, snap)
        return out


def merged(workers: Iterable[Snapshot] = ()) -> Iterator[Metric]:
    """This process's families with ``workers``' figures added in."""
    total = snapshot()
    for snap in workers:
        total = add(total, snap)
    return families(total)
