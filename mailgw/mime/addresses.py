"""RFC 5322 address-list parsing over bytes (groups, display names, obsolete routes), linear."""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["AddressItem", "parse_address_list", "MISSING_MAILBOX", "MISSING_DOMAIN"]

MISSING_MAILBOX = b"MISSING_MAILBOX"
MISSING_DOMAIN = b"MISSING_DOMAIN"

# token kinds
_ATOM, _QUOTED, _COMMENT, _LITERAL, _SPECIAL = range(5)
_SPECIALS = frozenset(b'()<>[]:;@\\,."')


@dataclass(frozen=True, slots=True)
class AddressItem:
    """One element of a parsed address list, in IMAP ENVELOPE terms.

    A mailbox has ``mailbox`` and ``host`` set (``name`` may be None); a group start has
    ``mailbox`` = the group name and ``host`` None; a group end has all fields None.
    ``route`` is the obsolete source route of ``<@a,@b:local@domain>`` (``b"@a,@b"``; the
    ENVELOPE's at-domain-list), else None.
    Values are raw bytes (quotes removed, encoded-words not decoded).
    """

    name: bytes | None
    mailbox: bytes | None
    host: bytes | None
    route: bytes | None = None

    @property
    def is_group_start(self) -> bool:
        """True for the marker opening a group (``mailbox`` holds the group name)."""
        return self.host is None and self.mailbox is not None

    @property
    def is_group_end(self) -> bool:
        """True for the marker closing a group."""
        return self.host is None and self.mailbox is None


def _tokenize(v: bytes) -> list[tuple[int, bytes]]:
    tokens: list[tuple[int, bytes]] = []
    n = len(v)
    i = 0
    while i < n:
        c = v[i]
        if c in (32, 9, 13, 10):
            i += 1
        elif c == 34:  # quoted string
            out = bytearray()
            i += 1
            while i < n and v[i] != 34:
                if v[i] == 92 and i + 1 < n:
                    i += 1
                if v[i] not in (13, 10):
                    out.append(v[i])
                i += 1
            tokens.append((_QUOTED, bytes(out)))
            i += 1
        elif c == 40:  # comment, nested
            depth = 0
            j = i
            while j < n:
                d = v[j]
                if d == 92:
                    j += 2
                    continue
                if d == 40:
                    depth += 1
                elif d == 41:
                    depth -= 1
                    if depth == 0:
                        break
                j += 1
            tokens.append((_COMMENT, v[i + 1 : min(j, n)]))
            i = j + 1
        elif c == 91:  # domain literal
            j = v.find(b"]", i)
            j = n - 1 if j < 0 else j
            tokens.append((_LITERAL, v[i : j + 1]))
            i = j + 1
        elif c in _SPECIALS:
            tokens.append((_SPECIAL, v[i : i + 1]))
            i += 1
        else:
            j = i
            while j < n and v[j] not in _SPECIALS and v[j] not in (32, 9, 13, 10):
                j += 1
            tokens.append((_ATOM, v[i:j]))
            i = j
    return tokens


def _phrase(tokens: list[tuple[int, bytes]]) -> bytes | None:
    words = [t for k, t in tokens if k in (_ATOM, _QUOTED) or (k == _SPECIAL and t == b".")]
    if not words:
        return None
    out = bytearray()
    for w in words:
        if out and w != b".":
            out += b" "
        out += w
    return bytes(out)


def _addr_spec(tokens: list[tuple[int, bytes]]) -> tuple[bytes, bytes]:
    """Split tokens of ``local@domain`` (comments dropped) into (mailbox, host)."""
    words = [(k, t) for k, t in tokens if k != _COMMENT]
    at = -1
    for idx in range(len(words) - 1, -1, -1):
        if words[idx] == (_SPECIAL, b"@"):
            at = idx
            break
    local = words if at < 0 else words[:at]
    domain = [] if at < 0 else words[at + 1 :]
    mailbox = b"".join(t for _, t in local)
    host = b"".join(t for _, t in domain)
    return (mailbox or MISSING_MAILBOX), (host or MISSING_DOMAIN)


def _mailbox(tokens: list[tuple[int, bytes]]) -> AddressItem | None:
    if not any(k != _COMMENT for k, _ in tokens):
        return None
    lt = next((i for i, (k, t) in enumerate(tokens) if k == _SPECIAL and t == b"<"), -1)
    if lt >= 0:
        gt = next(
            (i for i in range(lt + 1, len(tokens)) if tokens[i] == (_SPECIAL, b">")),
            len(tokens),
        )
        inner = tokens[lt + 1 : gt]
        # obsolete route: <@a,@b:local@domain>
        colon = next((i for i, (k, t) in enumerate(inner) if k == _SPECIAL and t == b":"), -1)
        route = None
        if colon >= 0 and inner and inner[0] == (_SPECIAL, b"@"):
            route = b"".join(t for k, t in inner[:colon] if k != _COMMENT) or None
            inner = inner[colon + 1 :]
        name = _phrase(tokens[:lt])
        if name is None:
            comments = [t for k, t in tokens[gt + 1 :] if k == _COMMENT]
            name = (comments[0].strip() or None) if comments else None
        if not inner:
            return AddressItem(name, MISSING_MAILBOX, MISSING_DOMAIN)
        mailbox, host = _addr_spec(inner)
        return AddressItem(name, mailbox, host, route)
    mailbox, host = _addr_spec(tokens)
    comments = [t for k, t in tokens if k == _COMMENT and t.strip()]
    return AddressItem(comments[-1].strip() if comments else None, mailbox, host)


def parse_address_list(value: bytes, max_items: int = 100_000) -> list[AddressItem]:
    """Parse an address-list header value into mailboxes and group markers.

    Lenient like IMAP servers: empty elements are skipped, a missing local part or
    domain becomes ``MISSING_MAILBOX`` / ``MISSING_DOMAIN``, an unclosed group is closed.
    At most ``max_items`` items are returned. Runs in time linear in ``len(value)``.
    """
    tokens = _tokenize(value)
    items: list[AddressItem] = []
    current: list[tuple[int, bytes]] = []
    in_angle = False
    in_group = False
    for tok in tokens:
        if len(items) >= max_items:
            break
        kind, text = tok
        if kind == _SPECIAL:
            if text == b"<":
                in_angle = True
            elif text == b">":
                in_angle = False
            elif not in_angle:
                if text == b",":
                    item = _mailbox(current)
                    if item is not None:
                        items.append(item)
                    current = []
                    continue
                if text == b":" and not in_group:
                    items.append(AddressItem(None, _phrase(current) or b"", None))
                    in_group = True
                    current = []
                    continue
                if text == b";" and in_group:
                    item = _mailbox(current)
                    if item is not None:
                        items.append(item)
                    items.append(AddressItem(None, None, None))
                    in_group = False
                    current = []
                    continue
        current.append(tok)
    if len(items) < max_items:
        item = _mailbox(current)
        if item is not None:
            items.append(item)
    if in_group:
        items.append(AddressItem(None, None, None))
    return items[: max_items + 1] if in_group else items[:max_items]
