"""Parsers for config values: booleans, sizes, durations, lists, endpoint descriptions, networks."""

from __future__ import annotations

import ipaddress
import re

_SIZE_RE = re.compile(r"(\d+(?:\.\d+)?)\s*([KMGT]?)(?:i?B)?", re.IGNORECASE)
_SIZE_UNITS = {"": 1, "K": 1024, "M": 1024**2, "G": 1024**3, "T": 1024**4}
_DURATION_RE = re.compile(r"(\d+(?:\.\d+)?)\s*(ms|s|m|h|d)?")
_DURATION_UNITS = {"ms": 0.001, "s": 1, "": 1, "m": 60, "h": 3600, "d": 86400}


def parse_bool(text: str) -> bool:
    value = text.strip().lower()
    if value in ("yes", "true", "on", "1"):
        return True
    if value in ("no", "false", "off", "0"):
        return False
    raise ValueError(f"expected yes or no, got {text!r}")


def parse_size(text: str) -> int:
    """Binary units: ``25M`` -> 26214400, ``1.5K`` -> 1536, ``10MiB``/``10MB``, ``1024`` (bytes,
    whole). The one size parser of the config file and the ``mailgw`` command."""
    m = _SIZE_RE.fullmatch(text.strip())
    if not m:
        raise ValueError(f"expected a size like 25M or 1G, got {text!r}")
    number, unit = m.group(1), _SIZE_UNITS[m.group(2).upper()]
    if "." in number:
        if unit == 1:
            raise ValueError(f"expected a size like 25M or 1G, got {text!r}: bytes are whole")
        return int(float(number) * unit)
    return int(number) * unit


def parse_quota(text: str) -> int | None:
    """A quota: a size (``parse_size``), or ``0``, ``none``, ``unlimited`` (or nothing): no
    limit (None). The one quota parser of the config file and ``mailgw user``."""
    if text.strip().lower() in ("", "none", "unlimited", "0"):
        return None
    return parse_size(text)


def parse_duration(text: str) -> float:
    """``5m`` -> 300.0 seconds; plain numbers are seconds."""
    m = _DURATION_RE.fullmatch(text.strip())
    if not m:
        raise ValueError(f"expected a duration like 30s, 5m, 1h, got {text!r}")
    return float(m.group(1)) * _DURATION_UNITS[m.group(2) or ""]


def parse_optional_duration(text: str) -> float | None:
    """Like parse_duration; ``0``, ``none`` or ``off`` mean not at all (None)."""
    if text.strip().lower() in ("", "0", "none", "off"):
        return None
    return parse_duration(text)


def parse_positive_int(text: str) -> int:
    try:
        value = int(text.strip())
    except ValueError:
        raise ValueError(f"expected a whole number, got {text!r}") from None
    if value <= 0:
        raise ValueError(f"expected a number above 0, got {value}")
    return value


def parse_list(text: str) -> tuple[str, ...]:
    """Whitespace- or newline-separated words."""
    return tuple(text.split())


def parse_networks(text: str) -> tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...]:
    nets = []
    for word in text.replace(",", " ").split():
        try:
            nets.append(ipaddress.ip_network(word, strict=False))
        except ValueError:
            raise ValueError(f"not an IP network: {word!r}") from None
    return tuple(nets)


def parse_plaintext_auth(text: str) -> str:
    value = text.strip().lower()
    if value not in ("yes", "no", "loopback"):
        raise ValueError(f"expected yes, no or loopback, got {text!r}")
    return value


def parse_host_port(text: str, default_port: int | None = None) -> tuple[str, int]:
    """``host:port`` or ``[v6]:port`` -> (host without brackets, port). With
    ``default_port``, a bare ``host`` or ``[v6]`` takes that port. ValueError otherwise
    (an IPv6 address must be bracketed: ``::1:25`` is ambiguous)."""
    text = text.strip()
    if text.startswith("["):
        host, close, rest = text[1:].partition("]")
        if not close or rest and not rest.startswith(":"):
            raise ValueError(f"expected host:port or [v6]:port, got {text!r}")
        port = rest[1:]
        if not rest and default_port is not None:
            port = str(default_port)
    else:
        host, colon, port = text.rpartition(":")
        if not colon and default_port is not None:
            host, port = text, str(default_port)
        if ":" in host:
            raise ValueError(f"expected host:port or [v6]:port, got {text!r}")
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"expected host:port or [v6]:port, got {text!r}")
    return host, int(port)


def format_host_port(host: str, port: int) -> str:
    """The inverse of ``parse_host_port``: ``host:port``, ``[v6]:port`` for IPv6."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
