"""Mail addresses: RFC 5321 path parsing (strict, open-relay safe) and a normalised value."""

from __future__ import annotations

import re
from dataclasses import dataclass

# RFC 5322 atext; UTF-8 (RFC 6531) is allowed separately when SMTPUTF8 is in effect.
_ATEXT = r"A-Za-z0-9!#$%&'*+/=?^_`{|}~\-"
_ATOM = rf"[{_ATEXT}]+"
_ATOM_UTF8 = rf"[{_ATEXT}\x80-\U0010ffff]+"  # atext or any non-ASCII character
_DOT_STRING_RE = re.compile(rf"{_ATOM}(?:\.{_ATOM})*")
_DOT_STRING_UTF8_RE = re.compile(rf"{_ATOM_UTF8}(?:\.{_ATOM_UTF8})*")
_QCONTENT_RE = re.compile(r"(?:[\x20\x21\x23-\x5b\x5d-\x7e]|\\[\x20-\x7e])*")
_QCONTENT_UTF8_RE = re.compile(r"(?:[\x20\x21\x23-\x5b\x5d-\x7e]|[^\x00-\x7f]|\\[\x20-\x7e])*")
_LABEL_RE = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?")
_ADDRESS_LITERAL_RE = re.compile(r"\[(?:IPv6:[0-9A-Fa-f:.]+|[0-9]{1,3}(?:\.[0-9]{1,3}){3})\]")

MAX_LOCAL_PART = 64
MAX_DOMAIN = 255
MAX_PATH = 256


class AddressError(ValueError):
    """The text is not a syntactically valid address or path."""


@dataclass(frozen=True, order=True)
class Address:
    """A mailbox address. ``domain`` is lower-case ASCII (A-labels); ``local`` is kept as sent."""

    local: str
    domain: str

    def __str__(self) -> str:
        return f"{quote_local(self.local)}@{self.domain}"

    @property
    def key(self) -> str:
        """Case-insensitive lookup key ``local@domain`` (local part lower-cased)."""
        return f"{self.local.lower()}@{self.domain}"

    @property
    def is_ascii(self) -> bool:
        return self.local.isascii()

    @classmethod
    def parse(cls, text: str, allow_utf8: bool = True) -> Address:
        """Parse a bare ``local@domain`` mailbox (no angle brackets)."""
        return _parse_mailbox(text.strip(), allow_utf8)


def quote_local(local: str) -> str:
    """Return the local part as it must appear on the wire (quoted when not a dot-string)."""
    if _is_dot_string(local, allow_utf8=True):
        return local
    escaped = local.replace("\\", "\\\\").replace('"', '\\"')
    return f'"{escaped}"'


def _is_dot_string(local: str, allow_utf8: bool) -> bool:
    dot_string = _DOT_STRING_UTF8_RE if allow_utf8 else _DOT_STRING_RE
    return dot_string.fullmatch(local) is not None


def normalise_domain(domain: str) -> str:
    """Lower-case a domain and convert U-labels to A-labels; raise AddressError if invalid."""
    if _ADDRESS_LITERAL_RE.fullmatch(domain):
        return domain
    if domain.endswith("."):
        raise AddressError("domain must not end with a dot")
    try:
        ascii_domain = domain.encode("idna").decode("ascii") if not domain.isascii() else domain
    except UnicodeError as e:
        raise AddressError(f"invalid internationalised domain: {e}") from None
    ascii_domain = ascii_domain.lower()
    if len(ascii_domain) > MAX_DOMAIN or not ascii_domain:
        raise AddressError("domain too long or empty")
    labels = ascii_domain.split(".")
    if not all(_LABEL_RE.fullmatch(label) for label in labels):
        raise AddressError(f"invalid domain {domain!r}")
    return ascii_domain


def _parse_mailbox(text: str, allow_utf8: bool) -> Address:
    if not text:
        raise AddressError("empty address")
    if text.startswith('"'):
        # Quoted-string local part: find the closing quote, honouring backslash escapes.
        i, n = 1, len(text)
        while i < n:
            c = text[i]
            if c == "\\":
                i += 2
                continue
            if c == '"':
                break
            i += 1
        else:
            raise AddressError("unterminated quoted local part")
        quoted = text[1:i]
        rest = text[i + 1 :]
        qre = _QCONTENT_UTF8_RE if allow_utf8 else _QCONTENT_RE
        if not qre.fullmatch(quoted):
            raise AddressError("invalid character in quoted local part")
        local = re.sub(r"\\(.)", r"\1", quoted)
        if not rest.startswith("@"):
            raise AddressError("missing domain")
        domain = rest[1:]
    else:
        local, at, domain = text.rpartition("@")
        if not at:
            raise AddressError("missing domain")
        if not _is_dot_string(local, allow_utf8):
            raise AddressError(f"invalid local part {local!r}")
    if "@" in domain:
        raise AddressError("more than one @")
    if len(local.encode("utf-8")) > MAX_LOCAL_PART:
        raise AddressError("local part too long")
    return Address(local, normalise_domain(domain))


def parse_path(text: str, allow_utf8: bool = False) -> Address | None:
    """Parse an RFC 5321 Reverse-path/Forward-path ``<...>``; ``<>`` gives None.

    A source route (``<@a,@b:user@c>``) is accepted and ignored as RFC 5321 4.1.1.3 asks,
    so ``<@ourdomain:user@ext>`` means ``user@ext`` (and is then refused as relaying).
    Characters outside ASCII are allowed only when ``allow_utf8`` (SMTPUTF8) is set.
    """
    if len(text) > MAX_PATH + 2:
        raise AddressError("path too long")
    if not (text.startswith("<") and text.endswith(">")):
        raise AddressError("path must be enclosed in <>")
    inner = text[1:-1]
    if inner == "":
        return None
    if not allow_utf8 and not inner.isascii():
        raise AddressError("non-ASCII address without SMTPUTF8")
    if any(c in inner for c in "\r\n\x00<>") or any(ord(c) < 0x20 or ord(c) == 0x7F for c in inner):
        raise AddressError("control character in path")
    if inner.startswith("@"):
        route, colon, mailbox = inner.partition(":")
        if not colon:
            raise AddressError("source route without mailbox")
        for hop in route.split(","):
            if not hop.startswith("@"):
                raise AddressError("invalid source route")
            normalise_domain(hop[1:])
        inner = mailbox
    return _parse_mailbox(inner, allow_utf8)
