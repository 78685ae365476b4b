"""Byte sizes for the command line: ``25M``, ``2G``, ``1024`` (binary units) and back."""

from __future__ import annotations

import re

_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}
_SIZE_RE = re.compile(r"(\d+(?:\.\d+)?)\s*([KMGT]?)(?:I?B)?", re.IGNORECASE)


def parse_size(text: str) -> int:
    """``25M`` -> 26214400, ``1.5K`` -> 1536, ``1024`` -> 1024; ValueError otherwise."""
    m = _SIZE_RE.fullmatch(text.strip())
    if not m:
        raise ValueError(f"invalid size {text!r}: expected a number with K, M, G or T")
    number, unit = m.group(1), _UNITS[m.group(2).upper()]
    if "." in number:
        if unit == 1:
            raise ValueError(f"invalid size {text!r}: a byte count must be whole")
        return int(float(number) * unit)
    return int(number) * unit


def format_size(size: int) -> str:
    """The shortest exact form: 26214400 -> ``25M``, 1000 -> ``1000``."""
    for suffix in ("T", "G", "M", "K"):
        unit = _UNITS[suffix]
        if size and size % unit == 0:
            return f"{size // unit}{suffix}"
    return str(size)
