"""The decision of a policy check on a message (``mailgw.policy``): a plain, immutable value.

A ``Verdict`` has one *disposition* and any number of *annotations*:

- disposition: ``accept`` (go on), ``reject(reply)`` (a 5xx reply), ``tempfail(reply)`` (a 4xx
  reply) or ``quarantine(reason)`` (take the message, keep it apart instead of delivering it);
- annotations: header fields to add (``add_headers``), a message class (``set_class``, e.g.
  ``spam``: the relay's ``[route:*] message_class``), a channel to send it through
  (``reroute``).

Combining (``a.combine(b)``: ``b`` was decided after ``a``; ``combine(vs)`` folds in order):

1. ``reject`` and ``tempfail`` are *final*: the first final verdict wins whole, later ones are
   not looked at (a pipeline stops there) and annotations collected so far are dropped (a
   refused message gets no headers, class or route).
2. ``quarantine`` is not final (a later check may still refuse the message); the first
   quarantine reason is kept, later ones do not replace it.
3. Headers accumulate in order (earlier checks' fields first); the class and the channel are
   the last one set (a later, more specific check overrides an earlier one).
4. ``accept`` is the neutral element: ``accept().combine(v) == v == v.combine(accept())``.
"""

from __future__ import annotations

import enum
from collections.abc import Iterable
from dataclasses import dataclass, field

from mailgw.model.reply import Reply


class Disposition(enum.Enum):
    """What happens to the message (or to the command being checked)."""

    ACCEPT = "accept"
    QUARANTINE = "quarantine"
    TEMPFAIL = "tempfail"
    REJECT = "reject"


@dataclass(frozen=True)
class Verdict:
    """One check's decision; build it with the class methods (see the module docstring)."""

    disposition: Disposition = Disposition.ACCEPT
    reply: Reply | None = None
    """The refusal (``reject``: 5xx, ``tempfail``: 4xx); None otherwise."""
    reason: str = ""
    """Why the message is quarantined (for the log and the quarantine list)."""
    headers: tuple[tuple[str, str], ...] = ()
    """Header fields to add, ``(name, value)``, in order."""
    message_class: str | None = None
    channel: str | None = None
    is_final: bool = field(init=False, repr=False, compare=False)
    """``reject`` or ``tempfail``: nothing decided later changes it (derived, an attribute
    rather than a property: it is read for every command)."""

    def __post_init__(self) -> None:
        final = self.disposition in (Disposition.REJECT, Disposition.TEMPFAIL)
        object.__setattr__(self, "is_final", final)

    # -- constructors ---------------------------------------------------------------------

    @classmethod
    def accept(cls) -> Verdict:
        return ACCEPT

    @classmethod
    def reject(cls, reply: Reply) -> Verdict:
        """Refuse permanently; ``reply`` must be a 5xx reply (ValueError otherwise)."""
        if not reply.is_permanent:
            raise ValueError(f"reject needs a 5xx reply, not {reply.code}")
        return cls(Disposition.REJECT, reply=reply)

    @classmethod
    def tempfail(cls, reply: Reply) -> Verdict:
        """Refuse for now (the client retries); ``reply`` must be a 4xx reply."""
        if not reply.is_transient:
            raise ValueError(f"tempfail needs a 4xx reply, not {reply.code}")
        return cls(Disposition.TEMPFAIL, reply=reply)

    @classmethod
    def refuse(cls, reply: Reply) -> Verdict:
        """``reject`` or ``tempfail`` by the reply's code (ValueError for a 2xx/3xx)."""
        return cls.tempfail(reply) if reply.is_transient else cls.reject(reply)

    @classmethod
    def quarantine(cls, reason: str) -> Verdict:
        if not reason:
            raise ValueError("quarantine needs a reason")
        return cls(Disposition.QUARANTINE, reason=reason)

    @classmethod
    def add_headers(cls, *fields: tuple[str, str]) -> Verdict:
        """Add header fields ``(name, value)``; a name must be printable ASCII without a
        colon, a value must not hold CR or LF (ValueError)."""
        for name, value in fields:
            if not name or not all(33 <= ord(c) <= 126 and c != ":" for c in name):
                raise ValueError(f"invalid header field name {name!r}")
            if "\r" in value or "\n" in value:
                raise ValueError(f"header field {name}: value holds a line break")
        return cls(headers=tuple(fields))

    @classmethod
    def set_class(cls, message_class: str) -> Verdict:
        if not message_class:
            raise ValueError("set_class needs a class name")
        return cls(message_class=message_class)

    @classmethod
    def reroute(cls, channel: str) -> Verdict:
        if not channel:
            raise ValueError("reroute needs a channel name")
        return cls(channel=channel)

    # -- reading --------------------------------------------------------------------------

    @property
    def is_quarantined(self) -> bool:
        return self.disposition is Disposition.QUARANTINE

    def header_bytes(self) -> bytes:
        """The header fields to add as CRLF-terminated lines (UTF-8)."""
        return b"".join(f"{name}: {value}\r\n".encode() for name, value in self.headers)

    # -- combining ------------------------------------------------------------------------

    def combine(self, later: Verdict) -> Verdict:
        """This verdict followed by ``later`` (rules in the module docstring)."""
        if later is ACCEPT or self.is_final:
            return self
        if self is ACCEPT or later.is_final:
            return later
        quarantined = self.is_quarantined or later.is_quarantined
        return Verdict(
            Disposition.QUARANTINE if quarantined else Disposition.ACCEPT,
            reason=self.reason or later.reason,
            headers=self.headers + later.headers,
            message_class=later.message_class or self.message_class,
            channel=later.channel or self.channel,
        )


ACCEPT = Verdict()


def combine(verdicts: Iterable[Verdict]) -> Verdict:
    """Fold verdicts in order with ``Verdict.combine``; stops at the first final one."""
    out = ACCEPT
    for verdict in verdicts:
        out = out.combine(verdict)
        if out.is_final:
            break
    return out
