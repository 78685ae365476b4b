"""Reloading the config file while running: what changed, what applies at once, what needs a
restart, and the one object that owns the running config and tells the parts holding it.

``diff(old, new)`` lists every changed key (``[channel:NAME]`` / ``[route:NAME]`` sections by
name, added or removed ones as a whole). ``needs_restart(change)`` says which of those cannot
apply to a running node (listeners, ``data_dir``, worker count, a section of a role this
module does not know...): ``RELOADABLE`` names the keys that can. ``ReloadableConfig``
re-reads the file (``reload()``): a file that does not load is refused as a whole and the
running config stays; otherwise each subscriber first ``check``s the new config (it may
refuse it with ``ConfigError``: a certificate that does not load, an unreadable password
file), then each one ``reconfigure``s. The config that runs afterwards is the new one with the
keys that need a restart kept at their running values (``running_config``), so they are named
again on the next reload until the node restarts.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, Protocol

from twisted.logger import Logger

from mailgw.config.schema import Config, ConfigError, load

log = Logger()

_ALL = "*"
_LIMITS = {"max_connections", "max_connections_per_ip"}
_SMTP = {
    "max_message_size",
    "max_line_length",
    "max_errors",
    "soft_error_limit",
    "error_delay",
    "idle_timeout",
    "session_timeout",
    "command_timeout",
    "min_data_rate",
    "stress_idle_timeout",
} | _LIMITS

RELOADABLE: dict[str, frozenset[str]] = {
    "server": frozenset({"postmaster", "max_connections", "reserved_descriptors"}),
    "tls": frozenset({"certificate", "private_key", "min_version"}),
    "directory": frozenset({_ALL}),
    "store": frozenset({"default_quota"}),
    "delivery": frozenset({"retry_interval"}),
    "mx": frozenset(_SMTP),  # not max_recipients: the MX checks hold it (restart)
    "submission": frozenset(_SMTP | {"max_recipients", "max_messages_per_hour", "max_header_size"}),
    "pop3": frozenset(
        {"allow_plaintext_auth", "idle_timeout", "max_errors", "login_timeout", "command_timeout"}
        | _LIMITS
    ),
    "imap": frozenset(
        {
            "allow_plaintext_auth",
            "idle_timeout",
            "idle_command_timeout",
            "max_line_length",
            "max_literal_size",
            "max_errors",
            "login_timeout",
            "command_timeout",
            "min_data_rate",
            "max_connections_per_user",
            "literal_memory_max",
        }
        | _LIMITS
    ),
    "relay": frozenset(
        {
            "retry_schedule",
            "max_age",
            "window",
            "retry_window_percent",
            "per_domain_concurrency",
            "mx_port",
            "max_mx_addresses",
            "tls_require_domains",
            "default_route",
            "failure_threshold",
            "cooldown",
            "channel_failure_patterns",
            "connect_timeout",
            "command_timeout",
            "delay_warning_after",
            "resolvers",
            "dns_timeout",
            "connection_idle",
            "connection_reuse",
            "connection_reuse_time",
            "scan_interval",
            "status_interval",
        }
    ),
    "policy": frozenset({"rules_file"}),  # the rules file is read again on every reload
    "channel": frozenset({_ALL}),
    "route": frozenset({_ALL}),
    "dns": frozenset(
        {
            "zones",
            "nameservers",
            "hostmaster",
            "regions",
            "default_region",
            "ecs_trusted",
            "ttl",
            "ns_ttl",
            "negative_ttl",
            "max_udp_size",
            "idle_timeout",
        }
        | _LIMITS
    ),
    "dns_region": frozenset({_ALL}),
    # Not enabled (the checks are built at start): every other key applies live.
    "reputation": frozenset(
        {
            "rspamd",
            "rspamd_timeout",
            "spam_threshold",
            "spam_action",
            "url_blocklist",
            "limit_score",
            "block_score",
            "limited_rate",
            "half_life",
            "spam_points",
            "report_points",
            "bounce_points",
            "unknown_points",
            "spike_points",
            "spike_factor",
            "min_volume",
        }
    ),
}
"""Keys (by section; ``channel``/``route`` for every ``[channel:NAME]``/``[route:NAME]``) that
apply to a running node (``dns_region`` for every ``[dns_region:NAME]``); every other key, and every key of a section not named here, needs a
restart. Turning TLS on or off (``[tls] certificate`` set or emptied) needs one too."""

_PREFIXED_FIELDS = {"channels": "channel", "routes": "route", "dns_regions": "dns_region"}


@dataclass(frozen=True)
class Change:
    """One changed key: ``section`` as written in the file (``mx``, ``channel:sdn``); ``key``
    None for a ``[channel:*]``/``[route:*]`` section added or removed as a whole."""

    section: str
    key: str | None
    old: Any
    new: Any

    @property
    def where(self) -> str:
        return f"[{self.section}]" + (f" {self.key}" if self.key else "")

    def describe(self) -> str:
        """``[mx] max_connections_per_ip: 50 -> 1``; ``[channel:sdn] added``."""
        if self.key is None:
            return f"{self.where} {'added' if self.old is None else 'removed'}"
        return f"{self.where}: {show_value(self.old)} -> {show_value(self.new)}"


def show_value(value: Any) -> str:
    """A parsed config value as text for the log (lists space separated, yes/no)."""
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, tuple):
        return " ".join(str(v) for v in value) or "(empty)"
    if value is None or value == "":
        return "(empty)"
    return str(value)


def _section_items(config: Config) -> dict[str, Any]:
    """Every section of ``config`` by its name in the file (``channel:NAME`` for those)."""
    out: dict[str, Any] = {}
    for f in dataclasses.fields(config):
        value = getattr(config, f.name)
        if f.name in _PREFIXED_FIELDS:
            for item in value:
                out[f"{_PREFIXED_FIELDS[f.name]}:{item.name}"] = item
        elif dataclasses.is_dataclass(value):
            out[f.name] = value
    return out


def diff(old: Config, new: Config) -> list[Change]:
    """Every key whose value differs between ``old`` and ``new``, in section order."""
    changes: list[Change] = []
    before, after = _section_items(old), _section_items(new)
    for name in list(before) + [n for n in after if n not in before]:
        a, b = before.get(name), after.get(name)
        if a is None or b is None:
            changes.append(Change(name, None, a, b))
            continue
        for f in dataclasses.fields(a):
            if f.name == "name":
                continue
            x, y = getattr(a, f.name), getattr(b, f.name)
            if x != y:
                changes.append(Change(name, f.name, x, y))
    return changes


def needs_restart(change: Change) -> bool:
    """Whether ``change`` cannot apply to a running node (see ``RELOADABLE``)."""
    kind = change.section.partition(":")[0]
    keys = RELOADABLE.get(kind, frozenset())
    if change.key is None:
        return _ALL not in keys
    if kind == "tls" and change.key in ("certificate", "private_key"):
        return False  # TLS on or off: see running_config
    return _ALL not in keys and change.key not in keys


def _tls_toggled(old: Config, new: Config) -> bool:
    return bool(old.tls.certificate) != bool(new.tls.certificate)


def classify(old: Config, new: Config) -> tuple[list[Change], list[Change]]:
    """``diff(old, new)`` split into (applied at once, needing a restart)."""
    applied, restart = [], []
    toggled = _tls_toggled(old, new)
    for change in diff(old, new):
        if needs_restart(change) or (toggled and change.section == "tls"):
            restart.append(change)
        else:
            applied.append(change)
    return applied, restart


def running_config(new: Config, restart: Iterable[Change]) -> Config:
    """``new`` with the keys of ``restart`` put back to their running (old) values."""
    config = new
    by_section: dict[str, dict[str, Any]] = {}
    for change in restart:
        if change.key is not None and ":" not in change.section:
            by_section.setdefault(change.section, {})[change.key] = change.old
    for section, values in by_section.items():
        current = getattr(config, section)
        config = dataclasses.replace(config, **{section: dataclasses.replace(current, **values)})
    return config


class Reconfigurable(Protocol):
    """A part holding values of the config: given the new running config, it applies them
    (to what it does from now on; work already running may finish with the old values)."""

    def reconfigure(self, config: Config) -> None: ...


@dataclass
class ReloadResult:
    """What one reload did: ``error`` set when the file was refused (nothing changed)."""

    error: str = ""
    applied: list[Change] = field(default_factory=list)
    restart: list[Change] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.error

    def as_dict(self) -> dict[str, Any]:
        return {
            "ok": self.ok,
            "error": self.error,
            "applied": [c.describe() for c in self.applied],
            "restart_needed": [c.where for c in self.restart],
        }


Check = Callable[[Config], None]


class ReloadableConfig:
    """The running config of one process and the parts to tell when it changes.

    ``subscribe(reconfigure, check)``: ``check(config)`` (optional) may raise ``ConfigError``
    to refuse a config before anything changes; ``reconfigure(config)`` applies it. Parts are
    told in the order they subscribed. ``loader`` reads the file (``mailgw.config.load``).
    """

    def __init__(self, config: Config, loader: Callable[[str], Config] = load) -> None:
        self.current = config
        self.loader = loader
        self._parts: list[tuple[Callable[[Config], None], Check | None]] = []
        self.reloads = 0

    def subscribe(self, reconfigure: Callable[[Config], None], check: Check | None = None) -> None:
        self._parts.append((reconfigure, check))

    def reload(self, label: str = "") -> ReloadResult:
        """Re-read ``current.path`` and apply it (see the module docstring); logs the outcome
        (``label``: whose log, e.g. an IMAP worker's) and returns it."""
        self.reloads += 1
        prefix = f"{label}: " if label else ""
        path = self.current.path
        try:
            new = self.loader(path)
        except ConfigError as e:
            return self._refused(prefix, str(e))
        applied, restart = classify(self.current, new)
        config = running_config(new, restart)
        try:
            for _, check in self._parts:
                if check is not None:
                    check(config)
        except ConfigError as e:
            return self._refused(prefix, str(e))
        self.current = config
        for reconfigure, _ in self._parts:
            try:
                reconfigure(config)
            except Exception:
                log.failure("{prefix}reload: applying the new config failed", prefix=prefix)
        for change in applied:
            log.info("{prefix}reload: {change}", prefix=prefix, change=change.describe())
        for change in restart:
            log.warn("{prefix}restart needed for {where}", prefix=prefix, where=change.where)
        log.info(
            "{prefix}reloaded {path}: {n} change(s) applied, {m} need a restart",
            prefix=prefix,
            path=path,
            n=len(applied),
            m=len(restart),
        )
        return ReloadResult("", applied, restart)

    def _refused(self, prefix: str, error: str) -> ReloadResult:
        log.error(
            "{prefix}reload refused, the running configuration stays: {error}",
            prefix=prefix,
            error=error,
        )
        return ReloadResult(error)
