"""A small template approach for the server-rendered pages: ``{name}`` fields filled with
values that are HTML-escaped unless they are ``Markup`` (already safe HTML)."""

from __future__ import annotations

import html
import string
from collections.abc import Iterable
from typing import Any


class Markup(str):
    """Text that is HTML already (built by this package from escaped pieces)."""

    __slots__ = ()


def esc(value: Any) -> Markup:
    """``value`` as HTML: Markup as it is, anything else escaped (quotes too)."""
    if isinstance(value, Markup):
        return value
    return Markup(html.escape("" if value is None else str(value), quote=True))


def join(pieces: Iterable[Any], sep: str = "") -> Markup:
    """The pieces, each escaped unless Markup, joined."""
    return Markup(sep.join(esc(p) for p in pieces))


class Template:
    """``Template(text).render(**values)``: ``{name}`` replaced by ``esc(value)``; ``{{`` and
    ``}}`` are literal braces. A field without a value is a KeyError (a bug, not a blank)."""

    def __init__(self, text: str) -> None:
        self.text = text
        self.fields = {f for _, f, _, _ in string.Formatter().parse(text) if f}

    def render(self, **values: Any) -> Markup:
        missing = self.fields - values.keys()
        if missing:
            raise KeyError(f"template fields without a value: {sorted(missing)}")
        return Markup(self.text.format_map({k: esc(v) for k, v in values.items()}))
