"""Byte sizes for the command line: parsed as in the config file, shown exactly or for people."""

from __future__ import annotations

from mailgw.config.values import parse_size

__all__ = ["parse_size", "format_size", "human_size"]

_UNITS = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}


def format_size(size: int) -> str:
    """The shortest exact form, as the config file takes it: 26214400 -> ``25M``, 1000 ->
    ``1000``."""
    for suffix in ("T", "G", "M", "K"):
        unit = _UNITS[suffix]
        if size and size % unit == 0:
            return f"{size // unit}{suffix}"
    return str(size)


def human_size(size: int) -> str:
    """For people, one decimal in binary units: ``512 B``, ``4.0 KiB``, ``2.3 MiB``."""
    if size < 1024:
        return f"{size} B"
    value = float(size)
    for unit in ("KiB", "MiB", "GiB", "TiB"):
        value /= 1024
        if value < 1024 or unit == "TiB":
            break
    return f"{value:.1f} {unit}"
