"""The unified configuration: the pushed policy (``mailgw config push``) as versions in the
gateway state, and the node side that applies them (``ConfigFollower``).

A version is a JSON bundle: ``ini``, an INI fragment of the main config's sections that apply
to a running node (channels, routes, relay, limits, auth lockout: ``PUSHABLE``), and
``rules``, the text of a rules file (or null). A node applies a version as an overlay on top
of its own config file: the fragment is read after the file (its keys win), the rules are
written to ``DATA_DIR/cluster/rules-vN.txt`` and named as ``[policy] rules_file``; then the
node reloads (``mailgw.config.reload``), so a version that the node refuses leaves it running
as before. The last version applied is kept in ``DATA_DIR/cluster/applied.json``: a node
starts with it (``startup_config``), Redis reachable or not. Each node reports what it
applied (``config_report``: version, time, error) for ``mailgw config status``.
"""

from __future__ import annotations

import configparser
import io
import json
import os
import socket
import tempfile
import time
from collections.abc import Callable
from typing import Any

from twisted.application import service
from twisted.internet import defer, task
from twisted.logger import Logger

from mailgw.config import Config, ConfigError, load

log = Logger(namespace="mailgw.state.config")

FORMAT = 1
CLUSTER_DIR = "cluster"
"""In ``[server] data_dir``: the applied version and its rules files."""
APPLIED_FILE = "applied.json"

PUSHABLE: dict[str, frozenset[str] | None] = {
    "channel": None,
    "route": None,
    "relay": None,
    "mx": frozenset(
        {"max_message_size", "max_errors", "soft_error_limit", "error_delay", "idle_timeout"}
        | {"max_connections", "max_connections_per_ip", "min_data_rate"}
    ),
    "submission": frozenset(
        {"max_message_size", "max_recipients", "max_messages_per_hour", "max_header_size"}
        | {"max_connections", "max_connections_per_ip"}
    ),
    "directory": frozenset(
        {"auth_failure_delay", "auth_max_delay", "auth_lockout_window"}
        | {"auth_lockout_failures", "auth_lockout_address_failures", "auth_lockout_time"}
    ),
    "policy": frozenset({"rules_file"}),
}
"""Sections (``channel``/``route`` for every ``[channel:NAME]``/``[route:NAME]``) and keys a
pushed fragment may set (None: every key the section has that applies while running)."""


class BundleError(ValueError):
    """A pushed file or a stored version that cannot be used."""


def read_fragment(text: str, source: str) -> configparser.ConfigParser:
    """The INI fragment ``text`` parsed (``BundleError`` on a syntax error)."""
    parser = configparser.ConfigParser(interpolation=None, strict=True, empty_lines_in_values=False)
    parser.optionxform = str  # type: ignore[assignment,method-assign]
    try:
        parser.read_string(text, source=source)
    except configparser.Error as e:
        raise BundleError(f"{source}: not a valid INI file: {e.message}") from None
    return parser


def check_pushable(parser: configparser.ConfigParser, source: str) -> None:
    """``BundleError`` for a section or key a node cannot take while running."""
    from mailgw.config.reload import RELOADABLE

    for section in parser.sections():
        kind = section.partition(":")[0]
        if kind not in PUSHABLE:
            allowed = ", ".join(sorted(PUSHABLE))
            raise BundleError(f"{source}: [{section}] cannot be pushed (allowed: {allowed})")
        keys = PUSHABLE[kind]
        live = RELOADABLE.get(kind, frozenset())
        for key in parser.options(section):
            ok = key in keys if keys is not None else ("*" in live or key in live)
            if not ok:
                raise BundleError(
                    f"{source}: [{section}] {key} cannot be pushed "
                    "(it does not apply to a running node)"
                )


def fragment_text(parser: configparser.ConfigParser) -> str:
    out = io.StringIO()
    parser.write(out)
    return out.getvalue()


def make_bundle(ini: str, rules: str | None, source: str) -> bytes:
    """The stored form of a version."""
    return json.dumps(
        {
            "format": FORMAT,
            "ini": ini,
            "rules": rules,
            "source": source,
            "pushed_at": time.time(),
            "pushed_from": socket.gethostname(),
        }
    ).encode()


def read_bundle(blob: bytes) -> dict[str, Any]:
    try:
        bundle = json.loads(blob)
    except ValueError as e:
        raise BundleError(f"not a config version: {e}") from None
    if not isinstance(bundle, dict) or bundle.get("format") != FORMAT:
        raise BundleError("not a config version of this format")
    if not isinstance(bundle.get("ini"), str):
        raise BundleError("config version without its INI text")
    rules = bundle.get("rules")
    if rules is not None and not isinstance(rules, str):
        raise BundleError("config version with bad rules")
    return bundle


def overlay_for(bundle: dict[str, Any], rules_path: str | None) -> str:
    """The INI overlay of a version: its fragment, ``[policy] rules_file`` set to
    ``rules_path`` (where the node wrote the rules) when the version has rules."""
    parser = read_fragment(bundle["ini"], "<version>")
    if parser.has_section("policy"):
        parser.remove_section("policy")
    if rules_path is not None:
        parser.add_section("policy")
        parser.set("policy", "rules_file", rules_path)
    return fragment_text(parser)


class VersionRefused(BundleError):
    """A fragment that does not load on top of the node config: ``config_error`` is the
    loader's ``ConfigError`` when that is why (its ``section``, ``key``, ``message``)."""

    def __init__(self, message: str, config_error: ConfigError | None = None) -> None:
        super().__init__(message)
        self.config_error = config_error


def build_version(
    config: Config, ini: str, source: str, rules: str | None = None, rules_source: str = ""
) -> tuple[bytes, str]:
    """Validate the INI fragment ``ini`` (and the rules text ``rules``, None: none) against
    the node config ``config`` exactly as a node applying it would: the fragment may set only
    pushable keys, it must load on top of the node's file, the rules must parse with the
    channels that result. The version to publish and a one-line summary; ``BundleError``
    (``VersionRefused`` when the config loader or the rules refuse it) saying what is wrong.
    Shared by ``mailgw config push`` and the admin API (``PUT /api/v1/channels``)."""

    from mailgw.policy.rules import RulesError, parse_rules

    parser = read_fragment(ini, source)
    check_pushable(parser, source)
    if parser.has_section("policy"):
        parser.remove_section("policy")  # the rules travel as text, not as a path
    blob = make_bundle(fragment_text(parser), rules, source)
    bundle = read_bundle(blob)
    with tempfile.TemporaryDirectory(prefix="mailgw-push-") as tmp:
        rules_path = None
        if rules is not None:
            rules_path = os.path.join(tmp, "rules.txt")
            with open(rules_path, "w", encoding="utf-8") as f:
                f.write(rules)
        try:
            merged = load(config.path, overlay_for(bundle, rules_path), source)
        except ConfigError as e:
            raise VersionRefused(f"{e} (with {source} on top)", e) from None
    n_rules = 0
    if rules is not None:
        channels = [c.name for c in merged.channels] or ["direct"]
        try:
            n_rules = len(parse_rules(rules, rules_source or source, None, channels))
        except RulesError as e:
            raise VersionRefused(str(e)) from None
    sections = len(read_fragment(bundle["ini"], source).sections())
    summary = f"{sections} section(s)" + (f", {n_rules} rule(s)" if rules is not None else "")
    return blob, summary


def cluster_dir(data_dir: str) -> str:
    return os.path.join(data_dir, CLUSTER_DIR)


def write_rules(data_dir: str, version: int, bundle: dict[str, Any]) -> str | None:
    """Write a version's rules under ``cluster_dir``; their path (None: no rules)."""
    rules = bundle.get("rules")
    if rules is None:
        return None
    folder = cluster_dir(data_dir)
    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, f"rules-v{version}.txt")
    with open(path + ".tmp", "w", encoding="utf-8") as f:
        f.write(rules)
        f.flush()
        os.fsync(f.fileno())
    os.replace(path + ".tmp", path)
    return path


def read_applied(data_dir: str) -> tuple[int, str] | None:
    """The last-good version on disk: (version, overlay), None when there is none."""
    path = os.path.join(cluster_dir(data_dir), APPLIED_FILE)
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
        return int(data["version"]), str(data["overlay"])
    except FileNotFoundError:
        return None
    except (OSError, ValueError, KeyError, TypeError) as e:
        log.warn("ignoring {path}: {error}", path=path, error=e)
        return None


def write_applied(data_dir: str, version: int, overlay: str) -> None:
    folder = cluster_dir(data_dir)
    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, APPLIED_FILE)
    with open(path + ".tmp", "w", encoding="utf-8") as f:
        json.dump({"version": version, "overlay": overlay, "time": time.time()}, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(path + ".tmp", path)


def startup_config(config: Config) -> tuple[Config, int, str]:
    """``config`` with the last-good pushed version of its node on top (as at start, Redis
    reachable or not): (config, version, overlay); version 0 and no overlay when there is
    none or it no longer fits the local file (logged)."""
    applied = read_applied(config.server.data_dir)
    if applied is None:
        return config, 0, ""
    version, overlay = applied
    try:
        merged = load(config.path, overlay, f"<pushed config v{version}>")
    except ConfigError as e:
        log.error(
            "the last-good pushed config v{version} does not apply to this node: {error}",
            version=version,
            error=e,
        )
        return config, 0, ""
    log.info("starting with pushed config v{version} (last good)", version=version)
    return merged, version, overlay


class ConfigFollower(service.Service):
    """A node's side of the unified config (see the module docstring).

    ``state``: the gateway state; ``settings``: the node's ``ReloadableConfig`` (its loader
    becomes this overlay's); ``reload``: the node's reload (applies, logs, returns the
    ``ReloadResult``); ``subscribe(on_message)``: follows the pub/sub channel, returns its
    stop function (None: poll only); ``poll_interval``: how often the current version is read
    anyway (the only way without pub/sub, a safety net with it).
    """

    def __init__(
        self,
        state: Any,
        settings: Any,
        reload: Callable[[], Any],
        data_dir: str,
        node_name: str,
        clock: Any,
        version: int = 0,
        overlay: str = "",
        subscribe: Callable[[Callable[[int | None], None]], Callable[[], Any]] | None = None,
        poll_interval: float = 1.0,
    ) -> None:
        self.state = state
        self.settings = settings
        self.reload = reload
        self.data_dir = data_dir
        self.node_name = node_name
        self.clock = clock
        self.version = version
        self.overlay = overlay
        self.subscribe = subscribe
        self.poll_interval = poll_interval
        self.error = ""
        self._stop_subscription: Callable[[], Any] | None = None
        self._poll: task.LoopingCall | None = None
        self._busy = False
        self._again = False
        self._reported = False
        settings.loader = self.load

    def load(self, path: str) -> Config:
        """The node's config loader: the file with the applied version on top."""
        return load(path, self.overlay, f"<pushed config v{self.version}>")

    def startService(self) -> None:
        super().startService()  # type: ignore[no-untyped-call]
        if self.subscribe is not None:
            self._stop_subscription = self.subscribe(self.on_message)
        self._poll = task.LoopingCall(self.check)
        self._poll.clock = self.clock
        self._poll.start(self.poll_interval, now=True)

    def stopService(self) -> Any:
        super().stopService()  # type: ignore[no-untyped-call]
        if self._poll is not None and self._poll.running:
            self._poll.stop()
        if self._stop_subscription is not None:
            stop, self._stop_subscription = self._stop_subscription, None
            d = defer.maybeDeferred(stop)
            d.addErrback(lambda _: None)
            return d
        return None

    def resync(self) -> None:
        """The state answers again after an outage: report and catch up."""
        self._reported = False
        self.check()

    def on_message(self, version: int | None) -> None:
        """A version made current (or a new subscription: maybe missed ones)."""
        if version is None or version != self.version:
            self.check()

    def check(self) -> defer.Deferred[None]:
        """Read the current version and apply it when it is not the applied one."""
        if self._busy:
            self._again = True
            return defer.succeed(None)
        self._busy = True
        d: defer.Deferred[Any] = defer.maybeDeferred(self.state.config_current)

        def got(current: tuple[int, bytes] | None) -> Any:
            if current is None or current[0] == self.version:
                if not self._reported:  # status lists the node from its start
                    return self._report(self.version, self.error, self.version)
                return None
            return self.apply(*current)

        def done(_: object) -> None:
            self._busy = False
            if self._again:
                self._again = False
                self.check()

        d.addCallback(got)
        d.addErrback(lambda _: None)  # state unreachable: keep the last good (logged there)
        return d.addBoth(done)

    def apply(self, version: int, blob: bytes) -> defer.Deferred[None]:
        """Apply ``version`` (its ``blob``); report the outcome."""
        previous_version, previous_overlay = self.version, self.overlay
        try:
            bundle = read_bundle(blob)
            rules_path = write_rules(self.data_dir, version, bundle)
            overlay = overlay_for(bundle, rules_path)
        except (BundleError, OSError) as e:
            return self._report(version, str(e), previous_version)
        self.version, self.overlay = version, overlay
        result = self.reload()
        if not result.ok:
            self.version, self.overlay = previous_version, previous_overlay
            log.error(
                "pushed config v{version} refused, v{previous} stays: {error}",
                version=version,
                previous=previous_version,
                error=result.error,
            )
            return self._report(version, result.error, previous_version)
        try:
            write_applied(self.data_dir, version, overlay)
        except OSError as e:
            log.warn("cannot keep pushed config v{version}: {e}", version=version, e=e)
        pushed_at = bundle.get("pushed_at")
        log.info(
            "applied pushed config v{version} ({delay})",
            version=version,
            delay=(
                f"{time.time() - float(pushed_at):.3f}s after the push"
                if isinstance(pushed_at, int | float)
                else "time of push unknown"
            ),
        )
        return self._report(version, "", version)

    def _report(self, version: int, error: str, applied: int) -> defer.Deferred[None]:
        self.error = error
        self._reported = True
        info = {
            "applied": applied,
            "latest_seen": version,
            "error": error,
            "time": time.time(),
            "pid": os.getpid(),
        }
        d: defer.Deferred[Any] = defer.maybeDeferred(
            self.state.config_report, self.node_name, json.dumps(info).encode()
        )
        d.addErrback(lambda f: log.warn("config report failed: {e}", e=f.getErrorMessage()))
        return d.addCallback(lambda _: None)
