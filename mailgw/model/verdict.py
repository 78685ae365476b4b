"""The decision of a policy check on a message (``mailgw.policy``): a plain, immutable value.

A ``Verdict`` has one *disposition* and any number of *annotations*:

- disposition: ``accept`` (go on), ``reject(reply)`` (a 5xx reply), ``tempfail(reply)`` (a 4xx
  reply) or ``quarantine(reason)`` (take the message, keep it apart instead of delivering it);
- annotations: header fields to add (``add_headers``), a tag put before the Subject
  (``tag_subject``), a message class (``set_class``, e.g. ``spam``: the relay's
  ``[route:*] message_class``), a channel to send it through (``reroute``), a folder of the
  recipient's mailbox to deliver into (``file_into``, e.g. ``Junk``), recipients to add
  (``add_bcc``, e.g. an archive) or to send to instead (``redirect``), header fields of the
  received message to remove (``remove_headers``: a forged ``Authentication-Results``).

Combining (``a.combine(b)``: ``b`` was decided after ``a``; ``combine(vs)`` folds in order):

1. ``reject`` and ``tempfail`` are *final*: the first final verdict wins whole, later ones are
   not looked at (a pipeline stops there) and annotations collected so far are dropped (a
   refused message gets no headers, class or route).
2. ``quarantine`` is not final (a later check may still refuse the message); the first
   quarantine reason (and ``rule``) is kept, later ones do not replace it.
3. Headers, subject tags, BCC recipients and header removals accumulate in order (earlier
   checks' first, without repeating one); the class, the channel, the folder and the redirection are the
   last one set (a later, more specific check overrides an earlier one).
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
    rule: str = ""
    """Who asked for the quarantine (a rule or check name; the pipeline fills in the check's
    name when the check left it empty)."""
    folder: str | None = None
    """The recipient's folder to deliver into (``file_into``); None: the INBOX."""
    subject_tags: tuple[str, ...] = ()
    """Tags put before the Subject (``[SPAM]``), in order."""
    bcc: tuple[str, ...] = ()
    """Recipients added to the envelope (``add_bcc``)."""
    redirect: tuple[str, ...] = ()
    """When not empty: the recipients the message goes to instead of the envelope's."""
    removals: tuple[tuple[str, str], ...] = ()
    """Header fields of the received message to remove, ``(name, first word)`` (lower
    case; first word '' for every field of that name): see ``remove_headers``."""
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
    def quarantine(cls, reason: str, rule: str = "") -> Verdict:
        """Keep the message apart (accepted, not delivered) because of ``reason``; ``rule``
        names what decided it (default: the check's name)."""
        if not reason:
            raise ValueError("quarantine needs a reason")
        return cls(Disposition.QUARANTINE, reason=reason, rule=rule)

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

    @classmethod
    def file_into(cls, folder: str) -> Verdict:
        """Deliver to ``folder`` of each local recipient (created when missing)."""
        if not folder or any(ord(c) < 32 for c in folder):
            raise ValueError(f"invalid folder name {folder!r}")
        return cls(folder=folder)

    @classmethod
    def tag_subject(cls, tag: str) -> Verdict:
        """Put ``tag`` (e.g. ``[SPAM]``) before the Subject (once)."""
        if not tag.strip() or "\r" in tag or "\n" in tag:
            raise ValueError(f"invalid subject tag {tag!r}")
        return cls(subject_tags=(tag,))

    @classmethod
    def add_bcc(cls, *addresses: str) -> Verdict:
        """Send a copy to ``addresses`` too (envelope recipients; no header changes)."""
        return cls(bcc=_addresses(addresses, "add_bcc"))

    @classmethod
    def redirect_to(cls, *addresses: str) -> Verdict:
        """Send the message to ``addresses`` instead of its envelope recipients."""
        return cls(redirect=_addresses(addresses, "redirect"))

    @classmethod
    def remove_headers(cls, *fields: tuple[str, str]) -> Verdict:
        """Remove header fields of the received message, ``(name, first word)``: every
        field named ``name`` whose value's first word (up to white space or ``;``) is
        ``first word`` (case-insensitive), or every field of that name when it is ''. Done
        before the header fields the checks add are put in, so ours are never removed
        (RFC 8601 section 5: a forged ``Authentication-Results`` claiming our authserv-id)."""
        out = []
        for name, word in fields:
            if not name or not all(33 <= ord(c) <= 126 and c != ":" for c in name):
                raise ValueError(f"invalid header field name {name!r}")
            if any(c.isspace() or c == ";" for c in word):
                raise ValueError(f"invalid first word {word!r}")
            out.append((name.lower(), word.lower()))
        return cls(removals=tuple(out))

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
        first = self if self.is_quarantined or not later.is_quarantined else later
        return Verdict(
            Disposition.QUARANTINE if quarantined else Disposition.ACCEPT,
            reason=first.reason,
            headers=self.headers + later.headers,
            message_class=later.message_class or self.message_class,
            channel=later.channel or self.channel,
            rule=first.rule,
            folder=later.folder or self.folder,
            subject_tags=_union(self.subject_tags, later.subject_tags),
            bcc=_union(self.bcc, later.bcc),
            redirect=later.redirect or self.redirect,
            removals=self.removals + tuple(r for r in later.removals if r not in self.removals),
        )


def _union(a: tuple[str, ...], b: tuple[str, ...]) -> tuple[str, ...]:
    if not b:
        return a
    return a + tuple(x for x in dict.fromkeys(b) if x not in a)


def _addresses(addresses: Iterable[str], what: str) -> tuple[str, ...]:
    out = tuple(a.strip() for a in addresses)
    if not out or any(not a or "@" not in a or any(c in a for c in " <>\r\n") for a in out):
        raise ValueError(f"{what} needs addresses (local@domain), not {addresses!r}")
    return out


ACCEPT = Verdict()


def combine(verdicts: Iterable[Verdict]) -> Verdict:
    """Fold verdicts in order with ``Verdict.combine``; stops at the first final one."""
    out = ACCEPT
    for verdict in verdicts:
        out = out.combine(verdict)
        if out.is_final:
            break
    return out
