"""``mailgw config check`` (as ``postfix check``), ``mailgw config show [--non-default]`` (as
``postconf`` / ``postconf -n``) and ``mailgw reload`` (as ``postfix reload``: SIGHUP to the
running server, whose PID is in ``DATA_DIR/mailgw.pid``, then its outcome)."""

from __future__ import annotations

import argparse
import configparser
import dataclasses
import datetime
import json
import os
import signal
import time
from collections.abc import Callable, Iterator
from typing import Any

from mailgw.cli.context import Context, Failure

PID_FILE = "mailgw.pid"
"""In ``[server] data_dir``, written by the running server (``mailgw.service.PID_FILE``)."""
RELOAD_STATUS_FILE = "reload.json"
"""In ``[server] data_dir``: the server's outcome of its last reload."""
SECRET_WORDS = ("password", "secret", "token")
"""A key whose name holds one of these (and is not a file's path) has its value masked."""
MASK = "********"


@dataclasses.dataclass(frozen=True)
class Problem:
    """One problem of a config file, shown as ``file: [section] key: what is wrong``."""

    path: str
    section: str
    key: str | None
    message: str

    def __str__(self) -> str:
        where = f"[{self.section}]" + (f" {self.key}" if self.key else "")
        return f"{self.path}: {where}: {self.message}"


# -- check -----------------------------------------------------------------------------------


def check_config(path: str, now: float | None = None) -> list[Problem]:
    """Every problem found in the config file ``path``: first whatever stops it from loading
    (syntax, unknown keys, bad values, unknown channels in routes, certificate and key that
    do not load or match), then what the server would trip on later: data folders missing or
    not writable, an expired certificate, unreadable password files, two listeners on one
    endpoint."""
    from mailgw.config import ConfigError, load

    try:
        config = load(path)
    except ConfigError as e:
        section = "" if e.section == "-" else e.section
        return [Problem(e.path, section, e.key, e.message)]
    problems: list[Problem] = []
    at = config.path
    _check_dir(problems, at, "server", "data_dir", config.server.data_dir)
    if config.store.tier2_dir:
        tier2 = os.path.join(config.server.data_dir, config.store.tier2_dir)
        _check_dir(problems, at, "store", "tier2_dir", tier2)
    if config.tls.certificate:
        _check_expiry(problems, at, config.tls.certificate, now)
    for channel in config.channels:
        if channel.auth_password_file and not os.access(channel.auth_password_file, os.R_OK):
            problems.append(
                Problem(
                    at,
                    f"channel:{channel.name}",
                    "auth_password_file",
                    f"cannot read {channel.auth_password_file}",
                )
            )
    problems += _check_endpoints(config)
    return problems


def _check_dir(problems: list[Problem], at: str, section: str, key: str, path: str) -> None:
    if not os.path.isdir(path):
        parent = os.path.dirname(os.path.abspath(path))
        if os.path.isdir(parent) and os.access(parent, os.W_OK):
            return  # the server creates it at start
        problems.append(Problem(at, section, key, f"{path} does not exist and cannot be created"))
    elif not os.access(path, os.W_OK | os.X_OK):
        problems.append(Problem(at, section, key, f"{path} is not writable"))


def _check_expiry(problems: list[Problem], at: str, certificate: str, now: float | None) -> None:
    from cryptography import x509

    with open(certificate, "rb") as f:
        cert = x509.load_pem_x509_certificates(f.read())[0]
    when = datetime.datetime.fromtimestamp(now if now is not None else time.time(), datetime.UTC)
    if cert.not_valid_after_utc < when:
        problems.append(
            Problem(
                at,
                "tls",
                "certificate",
                f"{certificate} expired on {cert.not_valid_after_utc:%Y-%m-%d %H:%M} UTC",
            )
        )
    elif cert.not_valid_before_utc > when:
        problems.append(
            Problem(
                at,
                "tls",
                "certificate",
                f"{certificate} is not valid before {cert.not_valid_before_utc:%Y-%m-%d %H:%M} UTC",
            )
        )


def _check_endpoints(config: Any) -> list[Problem]:
    """Two enabled listeners with one endpoint (the second could not listen)."""
    seen: dict[str, str] = {}
    problems = []
    for f in dataclasses.fields(config):
        section = getattr(config, f.name)
        if not dataclasses.is_dataclass(section) or not getattr(section, "enabled", False):
            continue
        for key in ("listen", "listen_tls"):
            for description in getattr(section, key, ()) or ():
                endpoint = description.removeprefix("haproxy:")
                where = f"[{f.name}] {key}"
                if endpoint in seen:
                    problems.append(
                        Problem(
                            config.path,
                            f.name,
                            key,
                            f"{description} is also the endpoint of {seen[endpoint]}",
                        )
                    )
                else:
                    seen[endpoint] = where
    return problems


def cmd_config_check(ctx: Context, args: argparse.Namespace) -> None:
    problems = check_config(ctx.config_path)
    for problem in problems:
        print(problem)
    if problems:
        raise Failure(f"{len(problems)} problem(s) in {os.path.abspath(ctx.config_path)}")


# -- show ------------------------------------------------------------------------------------


def is_secret(key: str) -> bool:
    """Whether ``key``'s value is masked by ``config show`` (a password, a token; not the
    path of a file holding one)."""
    name = key.lower()
    if name.endswith(("_file", "_path", "_dir")):
        return False
    return any(word in name for word in SECRET_WORDS)


def _raw_file(path: str) -> configparser.ConfigParser:
    parser = configparser.ConfigParser(interpolation=None, strict=True, empty_lines_in_values=False)
    parser.optionxform = str  # type: ignore[assignment,method-assign]
    with open(path, encoding="utf-8") as f:
        parser.read_file(f)
    return parser


def _value_text(value: Any, raw: str | None, default: str) -> str:
    if isinstance(value, str):
        return value  # as the server uses it: paths resolved, the hostname filled in
    text = raw if raw is not None else default
    return "\n    ".join(line.strip() for line in text.strip().splitlines())


def _default(f: dataclasses.Field[Any], config: Any) -> Any:
    """The value of field ``f`` when it is not set (a path resolved as the loader does)."""
    value = f.default
    if isinstance(value, str) and value and f.name in ("data_dir", "certificate", "private_key"):
        return os.path.normpath(os.path.join(os.path.dirname(config.path), value))
    return value


def effective_config(path: str, non_default: bool = False) -> Iterator[tuple[str, list[str]]]:
    """``(section, ["key = value", ...])`` of the effective config of ``path`` (schema
    order, then ``[channel:*]`` and ``[route:*]`` in file order); ``non_default``: only the
    keys set in the file to a value other than the default (``postconf -n``; a
    ``[channel:*]`` or ``[route:*]`` section is always shown). Secrets are masked."""
    from mailgw.config import load, schema

    config = load(path)
    raw = _raw_file(config.path)
    sections: list[tuple[str, Any]] = [(name, getattr(config, name)) for name in schema()]
    sections += [(f"channel:{c.name}", c) for c in config.channels]
    sections += [(f"route:{r.name}", r) for r in config.routes]
    sections += [(f"dns_region:{r.name}", r) for r in config.dns_regions]
    for name, value in sections:
        lines = []
        for f in dataclasses.fields(value):
            if f.name == "name":
                continue
            text = raw.get(name, f.name, fallback=None) if raw.has_section(name) else None
            if non_default and (
                text is None
                or text.strip() == f.metadata["text"]
                or getattr(value, f.name) == _default(f, config)
            ):
                continue
            shown = _value_text(getattr(value, f.name), text, f.metadata["text"])
            if shown and is_secret(f.name):
                shown = MASK
            lines.append(f"{f.name} = {shown}".rstrip())
        if lines or not non_default or ":" in name:
            yield name, lines


def cmd_config_show(ctx: Context, args: argparse.Namespace) -> None:
    first = True
    for section, lines in effective_config(ctx.config_path, args.non_default):
        if not first:
            print()
        first = False
        print(f"[{section}]")
        for line in lines:
            print(line)


# -- reload ----------------------------------------------------------------------------------


def read_pid(path: str) -> int:
    """The PID in the pid file ``path`` of a running process; Failure otherwise."""
    try:
        with open(path, encoding="ascii") as f:
            text = f.read().strip()
    except OSError as e:
        raise Failure(f"cannot read {path}: {e.strerror} (is the server running?)") from None
    try:
        pid = int(text)
    except ValueError:
        raise Failure(f"{path}: not a process ID: {text[:40]!r}") from None
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        raise Failure(f"{path}: no process {pid} (stale pid file)") from None
    except PermissionError:
        pass  # it runs, as another user: SIGHUP tells us whether we may signal it
    return pid


def _status(path: str) -> dict[str, Any] | None:
    try:
        with open(path, encoding="utf-8") as f:
            value = json.load(f)
    except (OSError, ValueError):
        return None
    return value if isinstance(value, dict) else None


def reload_server(
    data_dir: str,
    pid_file: str | None = None,
    timeout: float = 10.0,
    say: Callable[[str], None] = print,
    sleep: Callable[[float], None] = time.sleep,
) -> None:
    """SIGHUP the server whose PID is in ``pid_file`` (default ``data_dir/mailgw.pid``) and,
    unless ``timeout`` is 0, wait for its outcome in ``data_dir/reload.json`` and say it;
    Failure when it refused the new config or did not answer."""
    pid = read_pid(pid_file or os.path.join(data_dir, PID_FILE))
    status_path = os.path.join(data_dir, RELOAD_STATUS_FILE)
    before = _status(status_path)
    try:
        os.kill(pid, signal.SIGHUP)
    except PermissionError:
        raise Failure(f"not allowed to signal process {pid} (run as its user or root)") from None
    if timeout <= 0:
        say(f"sent SIGHUP to {pid}")
        return
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        status = _status(status_path)
        if status is not None and status != before and status.get("pid") == pid:
            break
        sleep(0.05)
    else:
        raise Failure(f"sent SIGHUP to {pid}, but no reload outcome in {status_path}")
    if not status.get("ok"):
        raise Failure(f"reload refused, the running configuration stays: {status.get('error')}")
    applied, restart = status.get("applied", []), status.get("restart_needed", [])
    say(f"reloaded (pid {pid}): {len(applied)} change(s) applied, {len(restart)} need a restart")
    for line in applied:
        say(f"  applied: {line}")
    for where in restart:
        say(f"  restart needed for {where}")


def data_dir_of(path: str) -> str:
    """``[server] data_dir`` of the config file ``path``, found even when the file does not
    load as a whole (the running server is to say what is wrong with it)."""
    from mailgw.config import ConfigError, load, schema

    try:
        return load(path).server.data_dir
    except ConfigError:
        pass
    default = dict((k, text) for k, text, _ in schema()["server"])["data_dir"]
    try:
        value = _raw_file(path).get("server", "data_dir", fallback=default).strip() or default
    except (OSError, configparser.Error) as e:
        raise Failure(f"{path}: cannot find [server] data_dir: {e}") from None
    return os.path.normpath(os.path.join(os.path.dirname(os.path.abspath(path)), value))


def cmd_reload(ctx: Context, args: argparse.Namespace) -> None:
    data_dir = data_dir_of(ctx.config_path)
    reload_server(data_dir, args.pid_file, 0.0 if args.no_wait else args.timeout)


def register_config_commands(group: Any, command: Any, top: Any) -> None:
    """``config check``, ``config show`` and the top-level ``reload``."""
    config = group("config", "check or show the configuration")
    p = command(config, "check", cmd_config_check, "validate the config file (exit 1 on problems)")
    p.set_defaults(as_data_owner=False)  # report a bad file as problems, whoever runs it
    p = command(config, "show", cmd_config_show, "print the effective configuration")
    p.set_defaults(as_data_owner=False)
    p.add_argument(
        "--non-default",
        action="store_true",
        help="only keys set to other values than their defaults (postconf -n)",
    )
    p = top.add_parser(
        "reload",
        help="make the running server re-read its config (SIGHUP)",
        description=(
            "Send SIGHUP to the running server (its PID is in DATA_DIR/mailgw.pid, written at "
            "start) and print what the reload did: the changes applied and the keys that need "
            "a restart. Exit 1 when the server refused the new file (it keeps running with "
            "the old one)."
        ),
    )
    p.set_defaults(func=cmd_reload, as_data_owner=False)
    p.add_argument(
        "--pid-file", metavar="FILE", help="the server's pid file (default DATA_DIR/mailgw.pid)"
    )
    p.add_argument(
        "--timeout", type=float, default=10.0, metavar="S", help="wait for the outcome (10)"
    )
    p.add_argument("--no-wait", action="store_true", help="only send the signal")
