"""The config schema (sections, keys, defaults, parsers) and the INI loader that validates it."""

from __future__ import annotations

import configparser
import dataclasses
import ipaddress
import os
import socket
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from mailgw.config import values as v

Network = ipaddress.IPv4Network | ipaddress.IPv6Network


class ConfigError(Exception):
    """A config problem; ``str()`` is ``file:section:key: what is wrong``."""

    def __init__(self, path: str, section: str, key: str | None, message: str) -> None:
        where = f"{path}:{section}" + (f":{key}" if key else "")
        super().__init__(f"{where}: {message}")
        self.path, self.section, self.key, self.message = path, section, key, message


def key(default: str, parse: Callable[[str], Any], doc: str) -> Any:
    """Declare a config key: its INI default text, its parser, and a one-line doc."""
    return field(default=parse(default), metadata={"text": default, "parse": parse, "doc": doc})


def _text(s: str) -> str:
    return s.strip()


def _tls_version(s: str) -> str:
    if s.strip() not in ("TLSv1.2", "TLSv1.3"):
        raise ValueError(f"expected TLSv1.2 or TLSv1.3, got {s!r}")
    return s.strip()


def _delimiter(s: str) -> str:
    s = s.strip()
    if len(s) > 1 or (s and (s.isalnum() or s in '@."')):
        raise ValueError("expected one punctuation character (like +) or nothing")
    return s


@dataclass(frozen=True)
class ServerConfig:
    """[server] where state lives and how the node names itself."""

    data_dir: str = key(
        "/var/lib/mailgw",
        _text,
        "Folder holding all state (directory, spool, mailboxes); relative to this file's folder.",
    )
    hostname: str = key(
        "", _text, "Name used in greetings and Received headers; empty: the machine's hostname."
    )


@dataclass(frozen=True)
class TLSConfig:
    """[tls] the certificate used for STARTTLS, STLS and implicit-TLS listeners."""

    certificate: str = key(
        "", _text, "PEM certificate chain; empty: no TLS (no STARTTLS/STLS, no TLS listeners)."
    )
    private_key: str = key("", _text, "PEM private key; empty: read it from the certificate file.")
    min_version: str = key(
        "TLSv1.2", _tls_version, "Lowest TLS version accepted: TLSv1.2 or TLSv1.3."
    )


@dataclass(frozen=True)
class DirectoryConfig:
    """[directory] users, aliases and password hashing."""

    recipient_delimiter: str = key(
        "+", _delimiter, "alice+tag@domain delivers to alice@domain; empty: off."
    )
    argon2_time_cost: int = key("2", v.parse_positive_int, "argon2id passes for new hashes.")
    argon2_memory_kib: int = key(
        "19456", v.parse_positive_int, "argon2id memory for new hashes (KiB)."
    )
    auth_failure_delay: float = key(
        "2s", v.parse_duration, "Delay before answering a failed login (slows guessing)."
    )


@dataclass(frozen=True)
class StoreConfig:
    """[store] mailboxes (tier 1: Maildir++ under data_dir/mail)."""

    default_quota: int | None = key(
        "1G", v.parse_optional_size, "Quota of users without their own; 0 or none: unlimited."
    )
    default_folders: tuple[str, ...] = key(
        "Sent Drafts Trash Junk Archive", v.parse_list, "Folders created for every new mailbox."
    )


@dataclass(frozen=True)
class DeliveryConfig:
    """[delivery] spool -> mailbox delivery."""

    enabled: bool = key("yes", v.parse_bool, "Deliver queued mail to local mailboxes.")
    retry_interval: float = key(
        "5m", v.parse_duration, "Wait before retrying a deferred delivery (e.g. over quota)."
    )


@dataclass(frozen=True)
class MXConfig:
    """[mx] inbound SMTP for local domains."""

    enabled: bool = key("yes", v.parse_bool, "Run the MX role.")
    listen: tuple[str, ...] = key(
        "tcp:8025:interface=127.0.0.1",
        v.parse_list,
        "Twisted endpoint descriptions, space separated; prefix haproxy: for PROXY v1/v2.",
    )
    proxy_trusted: tuple[Network, ...] = key(
        "127.0.0.0/8 ::1", v.parse_networks, "Peers allowed to send a PROXY header (haproxy:)."
    )
    max_message_size: int = key("25M", v.parse_size, "Largest message accepted (552 5.3.4).")
    max_recipients: int = key("100", v.parse_positive_int, "Recipients per message (452 4.5.3).")
    max_line_length: int = key(
        "10000", v.parse_positive_int, "Longest line inside DATA, without CRLF (554 5.6.0)."
    )
    max_errors: int = key("10", v.parse_positive_int, "Errors before the session is closed.")
    max_connections: int = key("1000", v.parse_positive_int, "Concurrent sessions in all.")
    max_connections_per_ip: int = key(
        "50", v.parse_positive_int, "Concurrent sessions from one client address."
    )
    idle_timeout: float = key("5m", v.parse_duration, "Close after this long without input.")
    session_timeout: float = key("30m", v.parse_duration, "Close a session after this long.")


@dataclass(frozen=True)
class POP3Config:
    """[pop3] mailbox access over POP3."""

    enabled: bool = key("yes", v.parse_bool, "Run the POP3 role.")
    listen: tuple[str, ...] = key(
        "tcp:8110:interface=127.0.0.1", v.parse_list, "Plain listeners (STLS offered with TLS)."
    )
    listen_tls: tuple[str, ...] = key(
        "tcp:8995:interface=127.0.0.1",
        v.parse_list,
        "Implicit-TLS listeners, used only when [tls] certificate is set.",
    )
    proxy_trusted: tuple[Network, ...] = key(
        "127.0.0.0/8 ::1", v.parse_networks, "Peers allowed to send a PROXY header (haproxy:)."
    )
    allow_plaintext_auth: str = key(
        "loopback",
        v.parse_plaintext_auth,
        "Passwords without TLS: yes, no, or loopback (only from 127.0.0.0/8 and ::1).",
    )
    idle_timeout: float = key("10m", v.parse_duration, "Close after this long without input.")
    max_errors: int = key("10", v.parse_positive_int, "Errors before the session is closed.")
    max_connections_per_ip: int = key(
        "50", v.parse_positive_int, "Concurrent sessions from one client address."
    )


@dataclass(frozen=True)
class Config:
    """The whole validated configuration."""

    path: str
    server: ServerConfig
    tls: TLSConfig
    directory: DirectoryConfig
    store: StoreConfig
    delivery: DeliveryConfig
    mx: MXConfig
    pop3: POP3Config

    @property
    def tls_enabled(self) -> bool:
        return bool(self.tls.certificate)


_SECTIONS: dict[str, type] = {
    "server": ServerConfig,
    "tls": TLSConfig,
    "directory": DirectoryConfig,
    "store": StoreConfig,
    "delivery": DeliveryConfig,
    "mx": MXConfig,
    "pop3": POP3Config,
}

# Keys whose value is a file path, resolved against the config file's folder.
_PATH_KEYS = {("server", "data_dir"), ("tls", "certificate"), ("tls", "private_key")}
# Keys whose values are listen endpoint descriptions, checked with Twisted's parser.
_LISTEN_KEYS = {("mx", "listen"), ("pop3", "listen"), ("pop3", "listen_tls")}


def schema() -> dict[str, list[tuple[str, str, str]]]:
    """Every section's keys as (name, default text, doc): used by docs and their test."""
    out: dict[str, list[tuple[str, str, str]]] = {}
    for name, cls in _SECTIONS.items():
        out[name] = [
            (f.name, f.metadata["text"], f.metadata["doc"]) for f in dataclasses.fields(cls)
        ]
    return out


def load(path: str) -> Config:
    """Read and validate ``path``; raise ConfigError on the first problem found."""
    path = os.path.abspath(path)
    parser = configparser.ConfigParser(interpolation=None, strict=True, empty_lines_in_values=False)
    parser.optionxform = str  # type: ignore[assignment,method-assign]
    try:
        with open(path, encoding="utf-8") as f:
            parser.read_file(f)
    except OSError as e:
        raise ConfigError(path, "-", None, f"cannot read config file: {e.strerror}") from None
    except configparser.Error as e:
        raise ConfigError(path, "-", None, f"not a valid INI file: {e.message}") from None
    base = os.path.dirname(path)
    sections: dict[str, Any] = {}
    for section in parser.sections():
        if section not in _SECTIONS:
            raise ConfigError(path, section, None, "unknown section")
    for name, cls in _SECTIONS.items():
        fields = {f.name: f for f in dataclasses.fields(cls)}
        kwargs: dict[str, Any] = {}
        if parser.has_section(name):
            for k, raw in parser.items(name):
                if k not in fields:
                    raise ConfigError(path, name, k, "unknown key")
                try:
                    kwargs[k] = fields[k].metadata["parse"](raw)
                except ValueError as e:
                    raise ConfigError(path, name, k, str(e)) from None
        for k, spec in fields.items():
            if (name, k) in _PATH_KEYS:
                value = kwargs.get(k, spec.default)
                if value:
                    kwargs[k] = os.path.normpath(os.path.join(base, value))
        sections[name] = cls(**kwargs)
    if not sections["server"].hostname:
        sections["server"] = dataclasses.replace(sections["server"], hostname=socket.gethostname())
    config = Config(path=path, **sections)
    _check_tls(config)
    _check_listeners(config)
    return config


def _check_tls(config: Config) -> None:
    from mailgw.net.tls import TLSError, load_certificate_options

    if not config.tls.certificate:
        if config.tls.private_key:
            raise ConfigError(config.path, "tls", "private_key", "set without certificate")
        return
    try:
        load_certificate_options(
            config.tls.certificate, config.tls.private_key or None, config.tls.min_version
        )
    except TLSError as e:
        bad_key = "private_key" if e.which == "key" else "certificate"
        raise ConfigError(config.path, "tls", bad_key, str(e)) from None


def _check_listeners(config: Config) -> None:
    from mailgw.net.listen import ListenError, parse_listen

    for section, k in sorted(_LISTEN_KEYS):
        for description in getattr(getattr(config, section), k):
            try:
                parse_listen(description)
            except ListenError as e:
                raise ConfigError(config.path, section, k, str(e)) from None
