"""The config schema (sections, keys, defaults, parsers) and the INI loader that validates it."""

from __future__ import annotations

import configparser
import dataclasses
import ipaddress
import os
import re
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


def _address(s: str) -> str:
    """Empty or one mail address (``local@domain``)."""
    from mailgw.model import Address, AddressError

    s = s.strip()
    if s:
        try:
            Address.parse(s)
        except AddressError as e:
            raise ValueError(f"expected an address like admin@example.com: {e}") from None
    return s


def _workers(s: str) -> int | None:
    """``auto`` -> None (one per CPU, decided at start-up), else a whole number >= 0."""
    text = s.strip().lower()
    if text == "auto":
        return None
    try:
        value = int(text)
    except ValueError:
        raise ValueError(f"expected auto or a whole number, got {s!r}") from None
    if value < 0:
        raise ValueError(f"expected auto or a number from 0, got {value}")
    return value


def _int0(s: str) -> int:
    try:
        value = int(s.strip())
    except ValueError:
        raise ValueError(f"expected a whole number, got {s!r}") from None
    if value < 0:
        raise ValueError(f"expected a number >= 0, got {value}")
    return value


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
    postmaster: str = key(
        "",
        _address,
        "Who gets postmaster@ any local domain without its own; empty: the first user created.",
    )
    max_connections: int = key(
        "4000",
        v.parse_positive_int,
        "Client connections of all roles together (lowered to fit the descriptor limit).",
    )
    reserved_descriptors: int = key(
        "256",
        v.parse_positive_int,
        "File descriptors kept out of the connection caps (files, databases, pipes).",
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
    handshake_timeout: float = key(
        "30s", v.parse_duration, "Implicit-TLS connections must finish the handshake within this."
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
    auth_max_delay: float = key(
        "15s", v.parse_duration, "The delay doubles with each failure counted, up to this."
    )
    auth_lockout_failures: int = key(
        "10", _int0, "Failed logins of one account within the window that lock it (0: never)."
    )
    auth_lockout_address_failures: int = key(
        "30", _int0, "Failed logins from one address within the window that lock it (0: never)."
    )
    auth_lockout_window: float = key("10m", v.parse_duration, "How long a failed login is counted.")
    auth_lockout_time: float = key(
        "15m", v.parse_duration, "How long a lockout lasts (every login then fails)."
    )


def _watermark(s: str) -> str:
    """Empty, a size (``500G``) or a percentage (``80%``)."""
    s = s.strip()
    if s.endswith("%"):
        try:
            value = float(s[:-1])
        except ValueError:
            raise ValueError(f"expected a size like 500G or a percentage, got {s!r}") from None
        if not 0 < value <= 100:
            raise ValueError(f"expected a percentage between 0% and 100%, got {s!r}")
    elif s:
        v.parse_size(s)
    return s


@dataclass(frozen=True)
class StoreConfig:
    """[store] mailboxes (tier 1: Maildir++ under data_dir/mail)."""

    default_quota: int | None = key(
        "1G", v.parse_quota, "Quota of users without their own; 0 or none: unlimited."
    )
    default_folders: tuple[str, ...] = key(
        "Sent Drafts Trash Junk Archive", v.parse_list, "Folders created for every new mailbox."
    )
    tier2_dir: str = key(
        "", _text, "Tier-2 blob directory (may be another mount); empty: off; relative: data_dir."
    )
    tier2_pack_max: int = key(
        "16K", v.parse_size, "Tier-2 blobs up to this size go into pack files (0: loose files)."
    )
    migrate_after: float = key(
        "0", v.parse_duration, "Move tier-1 messages older than this to tier 2 (0: not by age)."
    )
    migrate_folders: tuple[str, ...] = key(
        "", v.parse_list, "Folders whose messages all go to tier 2 (e.g. Archive)."
    )
    migrate_min_size: int = key("0", v.parse_size, "Only migrate messages at least this big.")
    tier1_high_watermark: str = key(
        "", _watermark, "Tier 1 above this (size like 500G, or % of its disk): migrate oldest first"
    )
    tier1_low_watermark: str = key(
        "", _watermark, "... until tier 1 is below this (empty: the high watermark)."
    )
    migrate_rate: int = key("50", v.parse_positive_int, "Most messages migrated per second.")
    migrate_interval: float = key("1h", v.parse_duration, "Time between migration passes.")
    promote_on_read: bool = key(
        "no", v.parse_bool, "Move a tier-2 message back to tier 1 when it is read."
    )
    journal_retention: float = key(
        "7d", v.parse_duration, "Keep change journal entries (data_dir/journal) this long."
    )
    journal_poll_interval: float = key(
        "1s", v.parse_duration, "Look for other processes' journal entries this often (0: off)."
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
    xclient_trusted: tuple[Network, ...] = key(
        "",
        v.parse_networks,
        "Peers allowed to send XCLIENT (ADDR, LOGIN, NAME: nginx's mail proxy); empty: none.",
    )
    max_message_size: int = key("25M", v.parse_size, "Largest message accepted (552 5.3.4).")
    max_recipients: int = key("100", v.parse_positive_int, "Recipients per message (452 4.5.3).")
    max_line_length: int = key(
        "10000", v.parse_positive_int, "Longest line inside DATA, without CRLF (554 5.6.0)."
    )
    max_errors: int = key(
        "20", v.parse_positive_int, "Errors (5xx replies) before 421 and close (hard limit)."
    )
    soft_error_limit: int = key(
        "10", v.parse_positive_int, "Errors after which every reply waits error_delay."
    )
    error_delay: float = key(
        "1s", v.parse_duration, "Wait before each reply past soft_error_limit (0: none)."
    )
    max_connections: int = key("1000", v.parse_positive_int, "Concurrent sessions in all.")
    max_connections_per_ip: int = key(
        "50", v.parse_positive_int, "Concurrent sessions from one client address."
    )
    idle_timeout: float = key("5m", v.parse_duration, "Close after this long without input.")
    session_timeout: float = key("30m", v.parse_duration, "Close a session after this long.")
    command_timeout: float = key(
        "1m", v.parse_duration, "A command line (or DATA) must be complete within this (0: off)."
    )
    min_data_rate: int = key(
        "1K", v.parse_size, "DATA gets 1 s more per this many bytes received (0: no extra time)."
    )
    stress_idle_timeout: float = key(
        "10s", v.parse_duration, "Idle timeout from 80% of the connection caps (Postfix stress)."
    )


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
    max_connections: int = key("1000", v.parse_positive_int, "Concurrent sessions in all.")
    login_timeout: float = key(
        "3m", v.parse_duration, "Close a session not logged in this long after connecting (0: off)."
    )
    command_timeout: float = key(
        "1m", v.parse_duration, "A command line must be complete within this (0: off)."
    )
    max_connections_per_ip: int = key(
        "50", v.parse_positive_int, "Concurrent sessions from one client address."
    )


@dataclass(frozen=True)
class IMAPConfig:
    """[imap] mailbox access over IMAP4rev1."""

    enabled: bool = key("yes", v.parse_bool, "Run the IMAP role.")
    listen: tuple[str, ...] = key(
        "tcp:8143:interface=127.0.0.1", v.parse_list, "Plain listeners (STARTTLS offered with TLS)."
    )
    listen_tls: tuple[str, ...] = key(
        "tcp:8993:interface=127.0.0.1",
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
    idle_timeout: float = key(
        "30m", v.parse_duration, "Close after this long without a command (RFC 3501: >= 30m)."
    )
    idle_command_timeout: float = key(
        "31m", v.parse_duration, "Longest IDLE before BYE (RFC 2177: clients renew every 29m)."
    )
    max_line_length: int = key(
        "65536", v.parse_positive_int, "Longest command line in bytes (BAD, session survives)."
    )
    max_literal_size: int = key(
        "64M", v.parse_size, "Largest literal (APPEND message) accepted: NO [TOOBIG] beyond."
    )
    max_errors: int = key("20", v.parse_positive_int, "BAD commands before the session closes.")
    max_connections: int = key("1000", v.parse_positive_int, "Concurrent sessions in all.")
    login_timeout: float = key(
        "3m", v.parse_duration, "Close a session not logged in this long after connecting (0: off)."
    )
    command_timeout: float = key(
        "1m", v.parse_duration, "A command line must be complete within this (0: off)."
    )
    min_data_rate: int = key(
        "1K", v.parse_size, "A literal gets 1 s more per this many bytes received (0: none)."
    )
    max_connections_per_ip: int = key(
        "50", v.parse_positive_int, "Concurrent sessions from one client address."
    )
    max_connections_per_user: int = key(
        "20", v.parse_positive_int, "Concurrent authenticated sessions of one user."
    )
    workers: int | None = key(
        "auto",
        _workers,
        "Worker processes serving IMAP sessions: auto (one per CPU), a number, or 0 (in-process).",
    )
    parsed_cache_size: int = key(
        "32M",
        v.parse_size,
        "Memory each IMAP process keeps for parsed messages (headers, structure), estimated.",
    )
    parsed_cache_max_message: int = key(
        "1M",
        v.parse_size,
        "A message whose parsed headers and structure take more is parsed on each use, not kept.",
    )
    literal_memory_max: int = key(
        "256K",
        v.parse_size,
        "APPEND message literals larger than this are spooled to a temporary file as they arrive.",
    )


# -- relay, channels, routes, submission (issue 4) ---------------------------------------------


def _durations(s: str) -> tuple[str, ...]:
    words = tuple(w for w in s.replace(",", " ").split() if w)
    if not words:
        raise ValueError("expected at least one duration")
    for w in words:
        if v.parse_duration(w) <= 0:
            raise ValueError(f"duration {w!r} must be positive")
    return words


def _percent(s: str) -> int:
    value = v.parse_positive_int(s)
    if value > 100:
        raise ValueError(f"expected 1..100, got {value}")
    return value


def _nonneg_float(s: str) -> float:
    try:
        value = float(s.strip())
    except ValueError:
        raise ValueError(f"expected a number, got {s!r}") from None
    if value < 0:
        raise ValueError(f"expected a number >= 0, got {value:g}")
    return value


def _port(s: str) -> int:
    value = v.parse_positive_int(s)
    if value > 65535:
        raise ValueError(f"port out of range: {value}")
    return value


def _resolvers(s: str) -> tuple[str, ...]:
    words = v.parse_list(s)
    for w in words:
        host, port = w, "53"
        if w.startswith("["):
            host, _, rest = w[1:].partition("]")
            port = rest[1:] if rest.startswith(":") else "53"
        elif w.count(":") == 1:
            host, _, port = w.partition(":")
        try:
            ipaddress.ip_address(host)
            _port(port)
        except ValueError:
            raise ValueError(f"not an address[:port]: {w!r}") from None
    return words


def _addresses(s: str) -> tuple[str, ...]:
    words = v.parse_list(s)
    for w in words:
        try:
            ipaddress.ip_address(w)
        except ValueError:
            raise ValueError(f"not an IP address: {w!r}") from None
    return words


def _one_of(*choices: str) -> Callable[[str], str]:
    def parse(s: str) -> str:
        value = s.strip().lower()
        if value not in choices:
            raise ValueError(f"expected {' or '.join(choices)}, got {s!r}")
        return value

    return parse


def tier_names(text: str) -> tuple[tuple[str, ...], ...]:
    """``"domestic; overseas, sdn"`` → (("domestic",), ("overseas", "sdn"))."""
    tiers = (tuple(n.strip() for n in t.split(",") if n.strip()) for t in text.split(";"))
    return tuple(t for t in tiers if t)


def _tiers(s: str) -> str:
    if s.strip() and not tier_names(s):
        raise ValueError("expected channel names like 'domestic; overseas, sdn'")
    return s.strip()


def _patterns(s: str) -> tuple[str, ...]:
    import re

    words = tuple(p.strip() for p in s.split(";") if p.strip())
    for p in words:
        try:
            re.compile(p)
        except re.error as e:
            raise ValueError(f"bad pattern {p!r}: {e}") from None
    return words


def _patterns_text(s: str) -> str:
    _patterns(s)
    return s.strip()


@dataclass(frozen=True)
class RelayConfig:
    """[relay] the outbound queue: MX lookup, retries, bounces, limits (see docs/relay.md)."""

    enabled: bool = key("no", v.parse_bool, "Send mail for other domains (needs [delivery]).")
    resolvers: tuple[str, ...] = key(
        "", _resolvers, "DNS servers for MX lookups, address[:port] list; empty: resolv.conf."
    )
    dns_timeout: float = key("10s", v.parse_duration, "Time limit of one DNS lookup.")
    retry_schedule: tuple[str, ...] = key(
        "5m 10m 30m 1h 2h 4h", _durations, "Waits between attempts; the last one repeats."
    )
    max_age: float = key("5d", v.parse_duration, "Bounce mail still undelivered after this long.")
    window: int = key("200", v.parse_positive_int, "Messages being sent at once (active window).")
    retry_window_percent: int = key(
        "50", _percent, "Share of the window deferred mail may use (fresh mail is never slowed)."
    )
    per_domain_concurrency: int = key(
        "10", v.parse_positive_int, "Deliveries at once to one destination domain."
    )
    mx_port: int = key("25", _port, "TCP port of MX hosts (tests use another one).")
    max_mx_addresses: int = key(
        "5", v.parse_positive_int, "MX addresses tried per attempt and channel."
    )
    tls_require_domains: tuple[str, ...] = key(
        "", v.parse_list, "Destination domains (patterns, e.g. .bank.example) that need TLS."
    )
    default_route: str = key(
        "", _tiers, "Channels when no [route:*] matches, e.g. 'overseas, sdn'; empty: all."
    )
    failure_threshold: int = key(
        "5", v.parse_positive_int, "Consecutive channel failures that suspend a channel."
    )
    cooldown: float = key("5m", v.parse_duration, "Suspension before a channel is probed again.")
    channel_failure_patterns: str = key(
        "",
        _patterns_text,
        "Extra regexes (; separated) marking a 5xx as the sending IP's fault (fail over).",
    )
    connect_timeout: float = key("30s", v.parse_duration, "TCP connect time limit.")
    command_timeout: float = key("5m", v.parse_duration, "Wait for one SMTP reply.")
    connection_idle: float = key("30s", v.parse_duration, "Keep an idle session for reuse.")
    connection_reuse: int = key(
        "1000", v.parse_positive_int, "Messages sent over one session before it is closed."
    )
    connection_reuse_time: float = key(
        "5m", v.parse_duration, "No new message over a session older than this (then closed)."
    )
    scan_interval: float = key(
        "1m", v.parse_duration, "Rescan of the retry queue (picks up queue flush/release)."
    )
    status_interval: float = key(
        "10s", v.parse_duration, "How often data_dir/relay/channels.json is written."
    )
    delay_warning_after: float | None = key(
        "0",
        v.parse_optional_duration,
        "Tell the sender once when mail is still undelivered after this long; 0: never.",
    )


@dataclass(frozen=True)
class ChannelConfig:
    """[channel:NAME] one way out (direct MX delivery or a smarthost)."""

    name: str = key("", _text, "(the NAME of the section)")
    kind: str = key("direct", _one_of("direct", "smarthost"), "direct (MX lookup) or smarthost.")
    weight: int = key("1", v.parse_positive_int, "Round-robin weight among a tier's channels.")
    concurrency: int = key("20", v.parse_positive_int, "Deliveries at once through the channel.")
    rate: float = key("0", _nonneg_float, "Messages per minute; 0: unlimited.")
    burst: int = key("0", _int0, "Token-bucket size of the rate limit; 0: a tenth of a minute.")
    source_addresses: tuple[str, ...] = key(
        "", _addresses, "Local addresses to connect from (rotated); empty: the system's choice."
    )
    helo: str = key("", _text, "EHLO name; empty: [server] hostname.")
    hosts: tuple[str, ...] = key("", v.parse_list, "Smarthost host[:port] list (kind smarthost).")
    tls: str = key("may", _one_of("may", "require", "none"), "STARTTLS: may, require or none.")
    auth_user: str = key("", _text, "Smarthost AUTH user (only over TLS).")
    auth_password_file: str = key("", _text, "File holding the smarthost password.")


@dataclass(frozen=True)
class RouteConfig:
    """[route:NAME] a routing rule; rules are tried in file order (class rules first)."""

    name: str = key("", _text, "(the NAME of the section)")
    recipient_domains: tuple[str, ...] = key(
        "", v.parse_list, "Domains: example.com exact, .cn suffix, *.example glob, * all."
    )
    sender_domains: tuple[str, ...] = key("", v.parse_list, "Sender domains (same patterns).")
    message_class: str = key("", _text, "Class set by earlier checks (e.g. spam).")
    channels: str = key("", _tiers, "Tiers: 'domestic; overseas, sdn' (; = fall back to).")


@dataclass(frozen=True)
class SubmissionConfig:
    """[submission] authenticated sending (STARTTLS and implicit TLS)."""

    enabled: bool = key("no", v.parse_bool, "Run the submission role (AUTH needs [tls]).")
    listen: tuple[str, ...] = key(
        "tcp:8587:interface=127.0.0.1", v.parse_list, "STARTTLS listeners (production: 587)."
    )
    listen_tls: tuple[str, ...] = key(
        "tcp:8465:interface=127.0.0.1",
        v.parse_list,
        "Implicit-TLS listeners (production: 465), used only when [tls] certificate is set.",
    )
    proxy_trusted: tuple[Network, ...] = key(
        "127.0.0.0/8 ::1", v.parse_networks, "Peers allowed to send a PROXY header (haproxy:)."
    )
    xclient_trusted: tuple[Network, ...] = key(
        "",
        v.parse_networks,
        "Peers allowed to send XCLIENT (ADDR, LOGIN, NAME: nginx's mail proxy); empty: none.",
    )
    max_message_size: int = key("25M", v.parse_size, "Largest message accepted (552 5.3.4).")
    max_recipients: int = key("100", v.parse_positive_int, "Recipients per message (452 4.5.3).")
    max_messages_per_hour: int = key(
        "200", v.parse_positive_int, "Messages one user may send per hour (450 4.7.1)."
    )
    max_header_size: int = key(
        "1M", v.parse_size, "Largest header section; all of it is checked (552 5.3.4)."
    )
    max_line_length: int = key(
        "10000", v.parse_positive_int, "Longest line inside DATA, without CRLF (554 5.6.0)."
    )
    max_errors: int = key(
        "20", v.parse_positive_int, "Errors (5xx replies) before 421 and close (hard limit)."
    )
    soft_error_limit: int = key(
        "10", v.parse_positive_int, "Errors after which every reply waits error_delay."
    )
    error_delay: float = key(
        "1s", v.parse_duration, "Wait before each reply past soft_error_limit (0: none)."
    )
    max_connections: int = key("1000", v.parse_positive_int, "Concurrent sessions in all.")
    max_connections_per_ip: int = key(
        "50", v.parse_positive_int, "Concurrent sessions from one client address."
    )
    idle_timeout: float = key("5m", v.parse_duration, "Close after this long without input.")
    session_timeout: float = key("30m", v.parse_duration, "Close a session after this long.")
    command_timeout: float = key(
        "1m", v.parse_duration, "A command line (or DATA) must be complete within this (0: off)."
    )
    min_data_rate: int = key(
        "1K", v.parse_size, "DATA gets 1 s more per this many bytes received (0: no extra time)."
    )
    stress_idle_timeout: float = key(
        "10s", v.parse_duration, "Idle timeout from 80% of the connection caps (Postfix stress)."
    )
    dkim: bool = key("yes", v.parse_bool, "DKIM-sign mail of domains with a key in data_dir/dkim.")


def _clamd_servers(s: str) -> tuple[str, ...]:
    """``host:port``, ``[v6]:port`` or ``unix:/path`` words (``mailgw.policy.clamd``)."""
    words = v.parse_list(s)
    for w in words:
        if w.startswith("unix:"):
            if not w[5:].startswith("/"):
                raise ValueError(f"expected unix:/absolute/path, got {w!r}")
            continue
        host, _, port = w[1:].partition("]:") if w.startswith("[") else w.rpartition(":")
        if not host or (":" in host and not w.startswith("[")) or not port.isdigit():
            raise ValueError(f"expected host:port, [v6]:port or unix:/path, got {w!r}")
        _port(port)
    if not words:
        raise ValueError("expected at least one clamd server")
    return words


def _zones(s: str) -> tuple[str, ...]:
    words = tuple(w.lower().strip(".") for w in v.parse_list(s))
    for w in words:
        labels = w.split(".")
        if len(w) > 200 or not all(
            lab and len(lab) < 64 and all(c.isalnum() or c in "-_" for c in lab) for lab in labels
        ):
            raise ValueError(f"not a DNS zone name: {w!r}")
    return words


@dataclass(frozen=True)
class AntivirusConfig:
    """[antivirus] messages scanned by clamd at the end of DATA (MX and submission)."""

    enabled: bool = key("no", v.parse_bool, "Scan every received message with clamd.")
    servers: tuple[str, ...] = key(
        "127.0.0.1:3310",
        _clamd_servers,
        "clamd addresses, host:port or unix:/path, used in turn with failover.",
    )
    on_failure: str = key(
        "tempfail",
        _one_of("tempfail", "accept"),
        "No clamd answering: tempfail (451 4.7.0) or accept (X-Virus-Scanned: skipped).",
    )
    timeout: float = key("30s", v.parse_duration, "Time limit of one scan on one server.")
    max_scan_size: int = key(
        "25M", v.parse_size, "Largest message sent to clamd (its StreamMaxLength); 0: any."
    )


@dataclass(frozen=True)
class InboundAuthConfig:
    """[inbound_auth] SPF, DKIM, DMARC and DNSBL checks of mail arriving at the MX."""

    enabled: bool = key("no", v.parse_bool, "Check inbound mail and add Authentication-Results.")
    authserv_id: str = key(
        "", _text, "The authserv-id of Authentication-Results; empty: [server] hostname."
    )
    resolvers: tuple[str, ...] = key(
        "", _resolvers, "DNS servers, address[:port] list; empty: resolv.conf."
    )
    dns_timeout: float = key("5s", v.parse_duration, "Time limit of one DNS lookup.")
    dnsbl: tuple[str, ...] = key("", _zones, "DNSBL zones the client address is looked up in.")
    dmarc_reject: bool = key(
        "yes", v.parse_bool, "Refuse (550 5.7.1) mail failing DMARC with p=reject."
    )
    spf_fail_score: float = key("3", _nonneg_float, "Score of an SPF fail.")
    spf_softfail_score: float = key("1", _nonneg_float, "Score of an SPF softfail.")
    dkim_fail_score: float = key("2", _nonneg_float, "Score of a DKIM signature that fails.")
    dmarc_fail_score: float = key("3", _nonneg_float, "Score of a DMARC fail (any policy).")
    dnsbl_score: float = key("5", _nonneg_float, "Score of each DNSBL zone listing the client.")
    junk_score: float = key("3", _nonneg_float, "From this score: deliver to Junk (0: never).")
    quarantine_score: float = key("6", _nonneg_float, "From this score: quarantine (0: never).")
    reject_score: float = key("10", _nonneg_float, "From this score: 550 5.7.1 (0: never).")


def _rate(s: str) -> tuple[int, float]:
    """``N/DURATION`` (``10/1h``) -> (N, seconds)."""
    count, slash, window = s.strip().partition("/")
    if not slash or not count.strip().isdigit() or int(count) < 1:
        raise ValueError(f"expected N/DURATION such as 10/1h, got {s!r}")
    seconds = v.parse_duration(window.strip())
    if seconds <= 0:
        raise ValueError(f"expected a window above 0, got {window!r}")
    return int(count), seconds


def _host_port(text: str) -> str:
    """Empty or ``host:port`` / ``[v6]:port``."""
    text = text.strip()
    if text:
        v.parse_host_port(text)
    return text


def _url_blocklist(s: str) -> tuple[str, ...]:
    words = tuple(w.lower() for w in v.parse_list(s))
    for w in words:
        if w.startswith(("http://", "https://")):
            continue
        d = w.removeprefix("*.").strip(".")
        if not d or not all(
            lab and all(c.isalnum() or c in "-_" for c in lab) for lab in d.split(".")
        ):
            raise ValueError(f"expected a domain or an http(s):// URL prefix, got {w!r}")
    return words


@dataclass(frozen=True)
class ReputationConfig:
    """[reputation] the CAC reputation service: content score, spam class, sender standing."""

    enabled: bool = key(
        "no", v.parse_bool, "Score content and keep sender reputation (MX and submission)."
    )
    rspamd: str = key(
        "", _host_port, "rspamd's normal worker (host:port) for /checkv2; empty: none."
    )
    rspamd_timeout: float = key(
        "10s", v.parse_duration, "Time limit of one rspamd request (then heuristics only)."
    )
    spam_threshold: float = key(
        "6", _nonneg_float, "Outbound: from this content score the message is spam (0: never)."
    )
    spam_action: str = key(
        "class",
        _one_of("class", "hold"),
        "Outbound spam: class (message class spam: the spam route) or hold (quarantine).",
    )
    url_blocklist: tuple[str, ...] = key(
        "", _url_blocklist, "Domains (and subdomains) or http(s):// URL prefixes scored 6 each."
    )
    limit_score: float = key(
        "10", _nonneg_float, "From these bad points a sender is rate limited (0: never)."
    )
    block_score: float = key(
        "20", _nonneg_float, "From these bad points a sender is refused, 550 5.7.1 (0: never)."
    )
    limited_rate: tuple[int, float] = key(
        "10/1h", _rate, "Messages a rate-limited sender may send per window (then 451 4.7.1)."
    )
    half_life: float = key("1d", v.parse_duration, "Bad points halve every this long (0: never).")
    spam_points: float = key("2", _nonneg_float, "Bad points of a message scored spam.")
    report_points: float = key(
        "5", _nonneg_float, "Bad points of a spam report (a ham report takes them away)."
    )
    bounce_points: float = key("0.5", _nonneg_float, "Bad points of each bounced recipient.")
    unknown_points: float = key(
        "1", _nonneg_float, "Bad points of each unknown recipient (5.1.1), added to a bounce's."
    )
    spike_points: float = key(
        "1", _nonneg_float, "Bad points of each message over the sender's volume baseline."
    )
    spike_factor: float = key(
        "5", _nonneg_float, "A spike: an hour's messages over this many times the baseline."
    )
    min_volume: int = key(
        "100", v.parse_positive_int, "...and over this many messages (no spike below it)."
    )


@dataclass(frozen=True)
class PolicyConfig:
    """[policy]: the security rules and the bounds of the content scan (docs/policy.md)."""

    rules_file: str = key(
        "",
        _text,
        "Security rules file (docs/policy.md); relative to this file's folder; empty: none.",
    )
    max_scan_size: int = key(
        "10M", v.parse_size, "Bytes of a message the content rules read (the rest: mime-error)."
    )
    max_parts: int = key(
        "1000", v.parse_positive_int, "MIME parts the content rules look at (more: mime-error)."
    )
    max_depth: int = key(
        "20", v.parse_positive_int, "MIME nesting the content rules open (deeper: mime-error)."
    )
    max_zip_members: int = key(
        "1000", v.parse_positive_int, "Files listed per zip attachment (nested zips included)."
    )


def _min_free(s: str) -> str:
    """A size (``1G``) or a percentage (``5%``) of the disk; ``0``: no threshold."""
    s = s.strip()
    if not s:
        raise ValueError("expected a size like 1G, a percentage like 5%, or 0")
    if s == "0":
        return s
    return _watermark(s)


@dataclass(frozen=True)
class HTTPConfig:
    """[http] metrics (/metrics), health (/healthz, /readyz), later webmail and admin API."""

    enabled: bool = key("no", v.parse_bool, "Run the HTTP role.")
    listen: tuple[str, ...] = key(
        "tcp:8080:interface=127.0.0.1", v.parse_list, "Plain HTTP listeners (production: 80)."
    )
    listen_tls: tuple[str, ...] = key(
        "tcp:8443:interface=127.0.0.1",
        v.parse_list,
        "HTTPS listeners (production: 443), used only when [tls] certificate is set.",
    )
    proxy_trusted: tuple[Network, ...] = key(
        "127.0.0.0/8 ::1", v.parse_networks, "Peers allowed to send a PROXY header (haproxy:)."
    )
    allow: tuple[Network, ...] = key(
        "127.0.0.0/8 ::1",
        v.parse_networks,
        "Networks that may read /metrics, /readyz and /api/v1/tracking without a token.",
    )
    admin_token_file: str = key(
        "",
        _text,
        "File holding the admin bearer token (Authorization: Bearer ...); empty: no token.",
    )
    min_free_disk: str = key(
        "1%",
        _min_free,
        "/readyz fails when the spool's or the store's disk has less free (size or %; 0: off).",
    )
    ready_timeout: float = key(
        "5s", v.parse_duration, "/readyz fails when its write probes take longer than this."
    )
    store_stats_interval: float = key(
        "1m",
        v.parse_duration,
        "Recount the store's bytes per tier for /metrics at most this often.",
    )
    max_connections: int = key("100", v.parse_positive_int, "Concurrent HTTP connections in all.")
    max_connections_per_ip: int = key(
        "20", v.parse_positive_int, "Concurrent HTTP connections from one client address."
    )
    idle_timeout: float = key("1m", v.parse_duration, "Close an idle HTTP connection after this.")


def _webmail_reader(text: str) -> str:
    value = text.strip().lower()
    if value not in ("store", "imap"):
        raise ValueError("expected store or imap")
    return value


def _webmail_tls(text: str) -> str:
    value = text.strip().lower()
    if value not in ("no", "starttls", "yes"):
        raise ValueError("expected no, starttls or yes")
    return value


@dataclass(frozen=True)
class WebmailConfig:
    """[webmail] the webmail at / of the http role (docs/webmail.md); needs [http] enabled."""

    enabled: bool = key("no", v.parse_bool, "Serve the webmail at / on the http role's listeners.")
    session_timeout: float = key(
        "30m", v.parse_duration, "Log a browser out after this long without a request."
    )
    max_upload_size: int = key(
        "25M", v.parse_size, "Largest total size of the attachments of one message sent."
    )
    page_size: int = key("50", v.parse_positive_int, "Messages (or conversations) per list page.")
    reader: str = key(
        "store",
        _webmail_reader,
        "How mail is read: store (this node's own store) or imap (a gateway: log in to imap_host).",
    )
    imap_host: str = key("127.0.0.1", _text, "The IMAP server of reader = imap.")
    imap_port: int = key("8143", v.parse_positive_int, "Its port.")
    imap_tls: str = key(
        "no", _webmail_tls, "TLS to it: no, starttls or yes (implicit TLS); certificates verified."
    )
    imap_ca_file: str = key(
        "", _text, "CA certificates (PEM) its certificate is checked against; empty: the system's."
    )


def _address_or_empty(s: str) -> str:
    s = s.strip()
    if s and (s.count("@") != 1 or any(c.isspace() or c in "<>" for c in s)):
        raise ValueError(f"expected an address like oa@example.com, got {s!r}")
    return s


@dataclass(frozen=True)
class APIConfig:
    """[api] the admin and OA API of the http role (/api/v1, docs/api.md)."""

    enabled: bool = key("yes", v.parse_bool, "Serve /api/v1 and /api/openapi.json (http role).")
    oa_sender: str = key(
        "",
        _address_or_empty,
        "Sender (a local user) of POST /api/v1/messages for tokens without their own sender.",
    )
    max_body_size: int = key("30M", v.parse_size, "Largest JSON request body.")
    max_message_size: int = key(
        "25M", v.parse_size, "Largest message POST /api/v1/messages builds (attachments included)."
    )


WEBHOOK_EVENTS = ("delivered", "failed", "quarantined")


def _webhook_urls(s: str) -> tuple[str, ...]:
    urls = v.parse_list(s)
    for url in urls:
        if not (url.startswith("http://") or url.startswith("https://")) or len(url) < 10:
            raise ValueError(f"expected http:// or https:// URLs, got {url!r}")
    return urls


def _webhook_events(s: str) -> tuple[str, ...]:
    events = v.parse_list(s)
    for e in events:
        if e not in WEBHOOK_EVENTS:
            raise ValueError(f"unknown event {e!r} (one of {', '.join(WEBHOOK_EVENTS)})")
    return events


@dataclass(frozen=True)
class WebhooksConfig:
    """[webhooks] signed POSTs on message events, from a durable outbox (docs/api.md)."""

    urls: tuple[str, ...] = key("", _webhook_urls, "Receivers (http:// or https://); empty: off.")
    secret_file: str = key(
        "", _text, "File holding the HMAC-SHA256 key of X-Mailgw-Signature (needed with urls)."
    )
    events: tuple[str, ...] = key(
        "delivered failed quarantined",
        _webhook_events,
        "Events sent: delivered (to a local mailbox), failed (bounced or expired), quarantined.",
    )
    timeout: float = key("10s", v.parse_duration, "A receiver must answer within this.")
    retry_initial: float = key("10s", v.parse_duration, "First retry after a failed POST ...")
    retry_max: float = key("1h", v.parse_duration, "... doubling up to this interval.")
    max_age: float = key("2d", v.parse_duration, "Give up (and log) on an event this old.")


def _peer(s: str) -> str:
    """Empty or ``HOST:PORT``."""
    s = s.strip()
    if s:
        host, sep, port = s.rpartition(":")
        if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise ValueError(f"expected HOST:PORT, got {s!r}")
    return s


@dataclass(frozen=True)
class ReplicationConfig:
    """[replication] mirror sync of the store and the directory to a disaster-recovery node."""

    enabled: bool = key("no", v.parse_bool, "Run the replication role.")
    role: str = key(
        "primary",
        _one_of("primary", "replica"),
        "primary: ship the journal to peer; replica: listen, apply, serve read-only.",
    )
    listen: tuple[str, ...] = key(
        "tcp:8873:interface=127.0.0.1",
        v.parse_list,
        "Where a replica listens for its primary (TLS with [tls] certificate).",
    )
    peer: str = key("127.0.0.1:8873", _peer, "HOST:PORT of the replica a primary ships to.")
    mode: str = key(
        "async",
        _one_of("async", "sync"),
        "async: acknowledge mail at once; sync: SMTP 250 / APPEND OK once the replica has it.",
    )
    sync_timeout: float = key(
        "2s", v.parse_duration, "In sync mode, wait this long for the replica before async."
    )
    secret_file: str = key(
        "/etc/mailgw/replication.secret",
        _text,
        "Shared secret of both nodes (16+ bytes); proves each to the other, never sent.",
    )
    window: int = key(
        "8", v.parse_positive_int, "Batches of entries shipped before the replica acknowledges."
    )


# -- smart DNS (issue 15) ------------------------------------------------------------------

_HOST_LABEL = re.compile(r"(?!-)[a-z0-9_-]{1,63}(?<!-)")
_UDP_LISTEN = re.compile(r"udp:(\d{1,5})(?::interface=([^:]+|\[[^\]]+\]|[0-9a-fA-F:]+))?")


def dns_name(s: str) -> str:
    """A host or zone name: lower case, no trailing dot, letters/digits/-/_ labels."""
    name = s.strip().lower().rstrip(".")
    labels = name.split(".")
    if not name or len(name) > 253 or not all(_HOST_LABEL.fullmatch(lab) for lab in labels):
        raise ValueError(f"not a DNS name: {s!r}")
    return name


def _dns_names(s: str) -> tuple[str, ...]:
    return tuple(dns_name(word) for word in s.split())


def _ip(word: str, what: str) -> str:
    try:
        return str(ipaddress.ip_address(word.strip("[]")))
    except ValueError:
        raise ValueError(f"{what}: not an IP address: {word!r}") from None


def _dns_hosts(s: str) -> tuple[tuple[str, tuple[str, ...]], ...]:
    """``NAME[=ADDR,ADDR...]`` words -> ((name, (addr, ...)), ...)."""
    out = []
    for word in s.split():
        name, _, addrs = word.partition("=")
        host = dns_name(name)
        out.append((host, tuple(_ip(a, host) for a in addrs.split(",") if a)))
    return tuple(out)


def _dns_mx(s: str) -> tuple[tuple[int, str, tuple[str, ...]], ...]:
    """``[PREF:]NAME[=ADDR,ADDR...]`` words -> ((preference, name, (addr, ...)), ...); the
    preference defaults to 10."""
    out = []
    for word in s.split():
        pref_text, colon, rest = word.partition(":")
        if colon and pref_text.isdigit():
            pref = int(pref_text)
            if pref > 65535:
                raise ValueError(f"MX preference above 65535: {word!r}")
        else:
            pref, rest = 10, word
        ((host, addrs),) = _dns_hosts(rest)
        out.append((pref, host, addrs))
    return tuple(out)


def _dns_region_names(s: str) -> tuple[str, ...]:
    names = tuple(s.split())
    for n in names:
        if not all(c.isalnum() or c in "-_" for c in n):
            raise ValueError(f"a region name may use letters, digits, - and _: {n!r}")
    if len(set(names)) != len(names):
        raise ValueError("a region is named twice")
    return names


def parse_udp_listen(description: str) -> tuple[int, str]:
    """``udp:PORT[:interface=ADDR]`` -> (port, interface; "" for every address)."""
    m = _UDP_LISTEN.fullmatch(description)
    if not m or not 0 <= int(m.group(1)) <= 65535:
        raise ValueError(f"expected udp:PORT:interface=ADDRESS, got {description!r}")
    interface = m.group(2) or ""
    if interface:
        interface = _ip(interface, "interface")
    return int(m.group(1)), interface


def _dns_listen(s: str) -> tuple[str, ...]:
    words = tuple(s.split())
    for word in words:
        if word.startswith("udp:"):
            parse_udp_listen(word)
        elif not word.startswith("tcp"):
            raise ValueError(f"expected udp:... or tcp:... listeners, got {word!r}")
    return words


def _mailbox(s: str) -> str:
    """Empty or ``local@domain`` with no dot in ``local`` (the SOA RNAME)."""
    s = s.strip().lower()
    if s:
        local, at, domain = s.partition("@")
        if not at or not local or not all(c.isalnum() or c in "-_+" for c in local):
            raise ValueError(f"expected an address like hostmaster@example.com, got {s!r}")
        dns_name(domain)
    return s


@dataclass(frozen=True)
class DNSConfig:
    """[dns] the smart DNS role: authoritative for the mail zones, MX by querier region."""

    enabled: bool = key("no", v.parse_bool, "Run the DNS role.")
    listen: tuple[str, ...] = key(
        "udp:8053:interface=127.0.0.1 tcp:8053:interface=127.0.0.1",
        _dns_listen,
        "UDP (udp:PORT:interface=ADDR) and TCP listeners (production: port 53).",
    )
    zones: tuple[str, ...] = key(
        "", _dns_names, "Zones answered authoritatively (the mail domains); others: REFUSED."
    )
    nameservers: tuple[tuple[str, tuple[str, ...]], ...] = key(
        "",
        _dns_hosts,
        "NS of every zone: NAME[=ADDR,ADDR] (addresses for names inside a zone: glue, A/AAAA).",
    )
    hostmaster: str = key(
        "", _mailbox, "SOA contact (local part without dots); empty: hostmaster@ZONE."
    )
    regions: tuple[str, ...] = key(
        "", _dns_region_names, "Region names, each with a [dns_region:NAME] section."
    )
    default_region: str = key(
        "", _text, "Region of a querier no region's networks match; empty: the last region."
    )
    ecs_trusted: tuple[Network, ...] = key(
        "",
        v.parse_networks,
        "Resolvers whose EDNS Client Subnet option chooses the region; others: their address.",
    )
    ttl: int = key("5m", lambda s: int(v.parse_duration(s)), "TTL of MX, A and AAAA answers.")
    ns_ttl: int = key("1d", lambda s: int(v.parse_duration(s)), "TTL of SOA and NS records.")
    negative_ttl: int = key(
        "5m", lambda s: int(v.parse_duration(s)), "SOA minimum: how long NXDOMAIN is cached."
    )
    max_udp_size: int = key(
        "1232", v.parse_positive_int, "Largest UDP answer with EDNS (512 without); more: TC."
    )
    max_connections: int = key("100", v.parse_positive_int, "Concurrent DNS TCP connections.")
    max_connections_per_ip: int = key(
        "10", v.parse_positive_int, "Concurrent DNS TCP connections from one address."
    )
    idle_timeout: float = key("10s", v.parse_duration, "Close an idle DNS TCP connection.")


@dataclass(frozen=True)
class DNSRegionConfig:
    """[dns_region:NAME] one region: who is in it, and the MX gateways it is given."""

    name: str = key("", _text, "(the NAME of the section)")
    networks: tuple[Network, ...] = key(
        "", v.parse_networks, "Querier networks of the region (longest prefix wins)."
    )
    mx: tuple[tuple[int, str, tuple[str, ...]], ...] = key(
        "",
        _dns_mx,
        "MX gateways: [PREF:]NAME[=ADDR,ADDR] (PREF default 10; addresses answer A/AAAA).",
    )


def _check_dns(config: Config) -> None:
    from mailgw.net.listen import ListenError, parse_listen

    dns = config.dns
    for description in dns.listen:
        if not description.startswith("udp:"):
            try:
                parse_listen(description)
            except ListenError as e:
                raise ConfigError(config.path, "dns", "listen", str(e)) from None
    sections = {r.name for r in config.dns_regions}
    for name in dns.regions:
        if name not in sections:
            raise ConfigError(config.path, "dns", "regions", f"no [dns_region:{name}] section")
    for region in config.dns_regions:
        if region.name not in dns.regions:
            raise ConfigError(
                config.path, f"dns_region:{region.name}", None, "not named in [dns] regions"
            )
        if not region.mx:
            raise ConfigError(config.path, f"dns_region:{region.name}", "mx", "needs MX hosts")
    if dns.default_region and dns.default_region not in dns.regions:
        raise ConfigError(config.path, "dns", "default_region", "not named in [dns] regions")
    if dns.enabled:
        for k in ("zones", "nameservers", "regions"):
            if not getattr(dns, k):
                raise ConfigError(config.path, "dns", k, "needed when [dns] enabled")


_PREFIXED: dict[str, type] = {
    "channel": ChannelConfig,
    "route": RouteConfig,
    "dns_region": DNSRegionConfig,
}


def _prefixed_sections(parser: configparser.ConfigParser, path: str) -> dict[str, Any]:
    """``[channel:NAME]`` and ``[route:NAME]`` sections, in file order, validated."""
    base = os.path.dirname(path)
    out: dict[str, list[Any]] = {prefix: [] for prefix in _PREFIXED}
    for section in parser.sections():
        prefix, colon, name = section.partition(":")
        if not colon or prefix not in _PREFIXED:
            continue
        cls = _PREFIXED[prefix]
        if not name or not all(c.isalnum() or c in "-_" for c in name):
            raise ConfigError(path, section, None, "NAME may use letters, digits, - and _")
        fields = {f.name: f for f in dataclasses.fields(cls) if f.name != "name"}
        kwargs: dict[str, Any] = {"name": name}
        for k, raw in parser.items(section):
            if k not in fields:
                raise ConfigError(path, section, k, "unknown key")
            try:
                kwargs[k] = fields[k].metadata["parse"](raw)
            except ValueError as e:
                raise ConfigError(path, section, k, str(e)) from None
        if prefix == "channel" and kwargs.get("auth_password_file"):
            kwargs["auth_password_file"] = os.path.normpath(
                os.path.join(base, kwargs["auth_password_file"])
            )
        value = cls(**kwargs)
        if prefix == "channel" and value.kind == "smarthost" and not value.hosts:
            raise ConfigError(path, section, "hosts", "a smarthost channel needs hosts")
        if prefix == "channel" and bool(value.auth_user) != bool(value.auth_password_file):
            raise ConfigError(
                path, section, "auth_user", "auth_user and auth_password_file go together"
            )
        if prefix == "route" and not value.channels:
            raise ConfigError(path, section, "channels", "a route needs channels")
        out[prefix].append(value)
    return {
        "channels": tuple(out["channel"]),
        "routes": tuple(out["route"]),
        "dns_regions": tuple(out["dns_region"]),
    }


def _check_routes(config: Config) -> None:
    names = {c.name for c in config.channels} or {"direct"}
    for route in config.routes:
        for tier in tier_names(route.channels):
            for n in tier:
                if n not in names:
                    raise ConfigError(
                        config.path, f"route:{route.name}", "channels", f"unknown channel {n!r}"
                    )
    if config.relay.default_route:
        for tier in tier_names(config.relay.default_route):
            for n in tier:
                if n not in names:
                    raise ConfigError(
                        config.path, "relay", "default_route", f"unknown channel {n!r}"
                    )


@dataclass(frozen=True)
class TrackingConfig:
    """[tracking] message tracking: every step of every message, in data_dir/tracking.sqlite."""

    record: bool = key(
        "yes", v.parse_bool, "Record message events (mailgw track); no: count them only."
    )
    retention: float = key("30d", v.parse_duration, "Keep events this long.")
    max_size: int = key(
        "1G", v.parse_size, "Largest database; above it the oldest events are removed first."
    )
    flush_interval: float = key(
        "200ms", v.parse_duration, "Write queued events at least this often (one transaction)."
    )
    flush_events: int = key(
        "500", v.parse_positive_int, "... or as soon as this many events are waiting."
    )
    max_pending: int = key(
        "100000",
        v.parse_positive_int,
        "Events waiting for the writer before new ones are dropped (and counted).",
    )
    prune_interval: float = key(
        "10m", v.parse_duration, "Look for events past retention or max_size this often."
    )


def _ip_or_empty(text: str) -> str:
    text = text.strip()
    if text:
        try:
            ipaddress.ip_address(text)
        except ValueError:
            raise ValueError(f"not an IP address: {text!r}") from None
    return text


def _mailbox_nodes(text: str) -> tuple[tuple[str, str, int], ...]:
    """``be1=127.0.0.1:8024 be2=[::1]:8024`` -> ((name, host, port), ...)."""
    out: list[tuple[str, str, int]] = []
    for word in text.split():
        name, eq, where = word.partition("=")
        try:
            host, port = v.parse_host_port(where)
        except ValueError:
            raise ValueError(f"expected NAME=HOST:PORT, got {word!r}") from None
        if not eq or not name:
            raise ValueError(f"expected NAME=HOST:PORT, got {word!r}")
        if any(n == name for n, _, _ in out):
            raise ValueError(f"node {name!r} named twice")
        out.append((name, host, port))
    return tuple(out)


@dataclass(frozen=True)
class LMTPConfig:
    """[lmtp] the backend's LMTP listener (RFC 2033): gateways deliver to mailboxes here."""

    enabled: bool = key("no", v.parse_bool, "Run the LMTP role (backend nodes).")
    listen: tuple[str, ...] = key(
        "tcp:8024:interface=127.0.0.1",
        v.parse_list,
        "Twisted endpoint descriptions, space separated; prefix haproxy: for PROXY v1/v2.",
    )
    trusted: tuple[Network, ...] = key(
        "127.0.0.0/8 ::1",
        v.parse_networks,
        "Only these peers may connect (the gateways); others get 554 and are closed.",
    )
    proxy_trusted: tuple[Network, ...] = key(
        "127.0.0.0/8 ::1", v.parse_networks, "Peers allowed to send a PROXY header (haproxy:)."
    )
    max_message_size: int = key("50M", v.parse_size, "Largest message accepted (552 5.3.4).")
    max_recipients: int = key("1000", v.parse_positive_int, "Recipients per transaction.")
    max_connections: int = key("200", v.parse_positive_int, "Concurrent sessions in all.")
    max_connections_per_ip: int = key(
        "100", v.parse_positive_int, "Concurrent sessions from one client address."
    )


@dataclass(frozen=True)
class ClusterConfig:
    """[cluster] this node's name and where mailboxes live (gateways forward over LMTP)."""

    node_name: str = key("", _text, "This node's name (as in mailbox_nodes); empty: hostname.")
    mailbox_nodes: tuple[tuple[str, str, int], ...] = key(
        "",
        _mailbox_nodes,
        "Backend nodes holding mailboxes, NAME=HOST:PORT (their LMTP listener), space separated;"
        " empty: every mailbox is local. Mail for a user on another node is forwarded there.",
    )
    directory: str = key(
        "",
        _text,
        "The user directory database shared by the nodes of a one-machine cluster;"
        " empty: data_dir/directory.sqlite.",
    )
    move_hold_retry: float = key(
        "5s", v.parse_duration, "Retry time of mail held for a user being moved to another node."
    )
    lmtp_source_address: str = key(
        "",
        _ip_or_empty,
        "Source IP of this gateway's LMTP connections (what the backends' [lmtp] trusted"
        " lists); empty: the system's choice.",
    )
    imap_servers: tuple[tuple[str, str, int], ...] = key(
        "",
        _mailbox_nodes,
        "Each mailbox node's IMAP listener, NAME=IP:PORT: what nginx auth_http answers"
        " (Auth-Server, Auth-Port); empty: this node's own [imap] listener.",
    )
    pop3_servers: tuple[tuple[str, str, int], ...] = key(
        "",
        _mailbox_nodes,
        "Each mailbox node's POP3 listener, NAME=IP:PORT (as imap_servers).",
    )
    smtp_server: str = key(
        "",
        _host_port,
        "IP:PORT auth_http answers for nginx's SMTP submission proxy (a submission listener"
        " that trusts nginx's XCLIENT); empty: this node's first [submission] listener.",
    )


def _log_format(s: str) -> str:
    value = s.strip().lower()
    if value not in ("text", "json"):
        raise ValueError(f"expected text or json, got {s!r}")
    return value


@dataclass(frozen=True)
class LogConfig:
    """[log] the mail log written by twistd (--logfile, stdout with -n)."""

    format: str = key(
        "text",
        _log_format,
        "text: classic lines; json: one JSON object per line (time, level, system, text,"
        " queue_id, message_id, session, client, user, event when known).",
    )


def _redis_host_port(default_port: int) -> Callable[[str], str]:
    def parse(s: str) -> str:
        return v.format_host_port(*v.parse_host_port(s, default_port))

    return parse


def _host_ports(s: str) -> tuple[str, ...]:
    parse = _redis_host_port(26379)
    return tuple(parse(item) for item in s.split())


def _state_timeout(s: str) -> float:
    value = v.parse_duration(s)
    if value <= 0:
        raise ValueError("must be more than 0")
    return float(value)


@dataclass(frozen=True)
class StateConfig:
    """[state]: the gateway state (counters, lockouts, mailbox nodes, unified config) shared
    by the gateways (docs/operations.md "Gateway state and unified configuration")."""

    backend: str = key(
        "embedded",
        _one_of("embedded", "redis"),
        "embedded (memory + SQLite in data_dir, one node) or redis (shared by the gateways).",
    )
    redis: str = key("127.0.0.1:6379", _redis_host_port(6379), "Redis HOST:PORT (backend = redis).")
    sentinels: tuple[str, ...] = key(
        "", _host_ports, "Redis Sentinels HOST:PORT ...; set: the master comes from them."
    )
    master_name: str = key("mailgw", _text, "The Sentinel service name of the Redis master.")
    timeout: float = key(
        "500ms",
        _state_timeout,
        "Longest wait for one Redis call; slower or unreachable: local state is used.",
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
    imap: IMAPConfig
    relay: RelayConfig
    submission: SubmissionConfig
    policy: PolicyConfig
    http: HTTPConfig
    channels: tuple[ChannelConfig, ...]
    routes: tuple[RouteConfig, ...]
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    log: LogConfig = field(default_factory=LogConfig)
    antivirus: AntivirusConfig = field(default_factory=AntivirusConfig)
    inbound_auth: InboundAuthConfig = field(default_factory=InboundAuthConfig)
    state: StateConfig = field(default_factory=StateConfig)
    webmail: WebmailConfig = field(default_factory=WebmailConfig)
    lmtp: LMTPConfig = field(default_factory=LMTPConfig)
    cluster: ClusterConfig = field(default_factory=ClusterConfig)
    dns: DNSConfig = field(default_factory=DNSConfig)
    api: APIConfig = field(default_factory=APIConfig)
    webhooks: WebhooksConfig = field(default_factory=WebhooksConfig)
    reputation: ReputationConfig = field(default_factory=ReputationConfig)
    dns_regions: tuple[DNSRegionConfig, ...] = ()
    replication: ReplicationConfig = ReplicationConfig()

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
    "imap": IMAPConfig,
    "state": StateConfig,
    "relay": RelayConfig,
    "submission": SubmissionConfig,
    "tracking": TrackingConfig,
    "log": LogConfig,
    "antivirus": AntivirusConfig,
    "inbound_auth": InboundAuthConfig,
    "reputation": ReputationConfig,
    "policy": PolicyConfig,
    "dns": DNSConfig,
    "http": HTTPConfig,
    "webmail": WebmailConfig,
    "api": APIConfig,
    "webhooks": WebhooksConfig,
    "lmtp": LMTPConfig,
    "cluster": ClusterConfig,
    "replication": ReplicationConfig,
}

# Keys whose value is a file path, resolved against the config file's folder.
_PATH_KEYS = {("server", "data_dir"), ("tls", "certificate"), ("tls", "private_key")}
_PATH_KEYS.add(("policy", "rules_file"))
_PATH_KEYS |= {("http", "admin_token_file"), ("cluster", "directory")}
_PATH_KEYS.add(("webmail", "imap_ca_file"))
_PATH_KEYS |= {("webhooks", "secret_file")}
_PATH_KEYS |= {("replication", "secret_file")}
# Keys whose values are listen endpoint descriptions, checked with Twisted's parser.
_LISTEN_KEYS = {("mx", "listen"), ("pop3", "listen"), ("pop3", "listen_tls")}
_LISTEN_KEYS |= {("imap", "listen"), ("imap", "listen_tls")}
_LISTEN_KEYS |= {("submission", "listen"), ("submission", "listen_tls")}
_LISTEN_KEYS |= {("http", "listen"), ("http", "listen_tls"), ("lmtp", "listen")}
_LISTEN_KEYS |= {("replication", "listen")}


def schema() -> dict[str, list[tuple[str, str, str]]]:
    """Every section's keys as (name, default text, doc): used by docs and their test."""
    out: dict[str, list[tuple[str, str, str]]] = {}
    for name, cls in _SECTIONS.items():
        out[name] = [
            (f.name, f.metadata["text"], f.metadata["doc"]) for f in dataclasses.fields(cls)
        ]
    return out


def load(path: str, overlay: str = "", overlay_name: str = "<overlay>") -> Config:
    """Read and validate ``path``; raise ConfigError on the first problem found.

    ``overlay``: INI text read after the file, its keys replacing the file's (the unified
    configuration's pushed version: ``mailgw.state.configsvc``); its relative paths are
    taken from the file's folder too."""
    path = os.path.abspath(path)
    parser = configparser.ConfigParser(interpolation=None, strict=True, empty_lines_in_values=False)
    parser.optionxform = str  # type: ignore[assignment,method-assign]
    try:
        with open(path, encoding="utf-8") as f:
            parser.read_file(f)
        if overlay:
            parser.read_string(overlay, source=overlay_name)
    except OSError as e:
        raise ConfigError(path, "-", None, f"cannot read config file: {e.strerror}") from None
    except configparser.Error as e:
        raise ConfigError(path, "-", None, f"not a valid INI file: {e.message}") from None
    base = os.path.dirname(path)
    sections: dict[str, Any] = {}
    for section in parser.sections():
        if section not in _SECTIONS and section.partition(":")[0] not in _PREFIXED:
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
    sections.update(_prefixed_sections(parser, path))
    config = Config(path=path, **sections)
    _check_routes(config)
    _check_tls(config)
    _check_listeners(config)
    _check_replication(config)
    _check_dns(config)
    _check_webmail(config)
    return config


def _check_webmail(config: Config) -> None:
    """The webmail is served by the http role: on without it, it would silently be absent."""
    if config.webmail.enabled and not config.http.enabled:
        raise ConfigError(config.path, "webmail", "enabled", "needs [http] enabled = yes")


def _check_replication(config: Config) -> None:
    r = config.replication
    if not r.enabled:
        return
    if r.role == "replica" and not config.tls_enabled:
        raise ConfigError(config.path, "replication", "role", "a replica needs [tls] certificate")
    if not os.path.isfile(r.secret_file):
        raise ConfigError(config.path, "replication", "secret_file", "no such file")


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
