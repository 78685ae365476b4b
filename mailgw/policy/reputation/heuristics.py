"""The built-in content score of a message: header and URL heuristics, no network.

``score_message(data, blocklist)`` reads a message's header section and its text parts (at
most ``MAX_PARTS`` parts, the first ``MAX_TEXT`` characters of each) and adds:

- ``MISSING_DATE`` / ``MISSING_MESSAGE_ID``: no ``Date`` / ``Message-ID`` field;
- ``FROM_NAME_ADDRESS``: the From display name holds an address that is not the From address
  (``"paypal@paypal.com" <x@evil.example>``);
- ``REPLY_TO_MISMATCH``: a Reply-To whose domain is not the From address's domain;
- ``URL_SHORTENER``: a link through a URL shortener (``SHORTENERS``), counted once;
- ``BLOCKLISTED``: each link or address whose host is (or is under) a domain of
  ``[reputation] url_blocklist``, or whose URL starts with a listed ``http(s)://`` prefix,
  counted once per listed entry.

The result is the total and the names of what counted (``Score``).
"""

from __future__ import annotations

import email
import email.policy
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from email.message import EmailMessage
from email.utils import getaddresses, parseaddr
from urllib.parse import urlsplit

MISSING_DATE = 1.0
MISSING_MESSAGE_ID = 1.0
FROM_NAME_ADDRESS = 3.0
REPLY_TO_MISMATCH = 1.5
URL_SHORTENER = 2.0
BLOCKLISTED = 6.0

MAX_PARTS = 100
MAX_TEXT = 1 << 20

SHORTENERS = frozenset(
    {
        "bit.ly",
        "bitly.com",
        "tinyurl.com",
        "t.co",
        "goo.gl",
        "ow.ly",
        "is.gd",
        "buff.ly",
        "cutt.ly",
        "rebrand.ly",
        "t.ly",
        "shorturl.at",
        "tiny.cc",
        "rb.gy",
        "s.id",
        "v.gd",
        "lnkd.in",
        "shorte.st",
        "adf.ly",
        "bl.ink",
    }
)

_URL = re.compile(r"(?i)\bhttps?://[^\s<>\"')\]]+")
_BARE_ADDRESS = re.compile(r"[\w.+-]+@[\w-]+(?:\.[\w-]+)+")


@dataclass
class Score:
    """A content score: the total and what counted (``NAME(points)``)."""

    total: float = 0.0
    why: list[str] = field(default_factory=list)

    def add(self, points: float, what: str) -> None:
        self.total += points
        self.why.append(f"{what}({points:g})")


def _domain(address: str) -> str:
    return address.rpartition("@")[2].strip().lower().rstrip(".") if "@" in address else ""


def _under(host: str, domain: str) -> bool:
    return host == domain or host.endswith("." + domain)


def parse_blocklist(entries: Iterable[str]) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """(domains, URL prefixes) of ``[reputation] url_blocklist`` words."""
    domains, prefixes = [], []
    for word in entries:
        w = word.strip().lower()
        if not w:
            continue
        if w.startswith(("http://", "https://")):
            prefixes.append(w)
        else:
            domains.append(w.strip(".").removeprefix("*."))
    return tuple(domains), tuple(prefixes)


def _texts(msg: EmailMessage) -> list[str]:
    out: list[str] = []
    for n, part in enumerate(msg.walk()):
        if n >= MAX_PARTS:
            break
        if part.get_content_maintype() != "text" or part.is_attachment():
            continue
        try:
            content = part.get_content()
        except (LookupError, ValueError, AssertionError, TypeError):
            payload = part.get_payload(decode=True)
            content = payload.decode("latin-1") if isinstance(payload, bytes) else ""
        if isinstance(content, str):
            out.append(content[:MAX_TEXT])
    return out


def score_message(data: bytes, blocklist: Iterable[str] = ()) -> Score:
    """The built-in content score of ``data`` (see the module docstring)."""
    domains, prefixes = parse_blocklist(blocklist)
    score = Score()
    msg = email.message_from_bytes(data, policy=email.policy.compat32)
    if msg.get("Date") is None:
        score.add(MISSING_DATE, "MISSING_DATE")
    if msg.get("Message-ID") is None:
        score.add(MISSING_MESSAGE_ID, "MISSING_MESSAGE_ID")
    from_name, from_addr = parseaddr(str(msg.get("From", "")))
    from_domain = _domain(from_addr)
    named = _BARE_ADDRESS.findall(from_name)
    if any(a.lower() != from_addr.lower() for a in named):
        score.add(FROM_NAME_ADDRESS, "FROM_NAME_ADDRESS")
    reply_to = [a for _, a in getaddresses([str(v) for v in msg.get_all("Reply-To", [])]) if a]
    if from_domain and any(_domain(a) and _domain(a) != from_domain for a in reply_to):
        score.add(REPLY_TO_MISMATCH, "REPLY_TO_MISMATCH")
    full = email.message_from_bytes(data, policy=email.policy.default)
    assert isinstance(full, EmailMessage)
    urls: list[str] = []
    for text in _texts(full):
        urls.extend(_URL.findall(text))
    hosts = []
    for url in urls:
        try:
            host = (urlsplit(url).hostname or "").lower().rstrip(".")
        except ValueError:
            continue
        hosts.append(host)
    if any(h in SHORTENERS for h in hosts):
        score.add(URL_SHORTENER, "URL_SHORTENER")
    addresses = [from_addr, *reply_to]
    seen: set[str] = set()
    for domain in domains:
        if any(_under(h, domain) for h in hosts) or any(
            _under(_domain(a), domain) for a in addresses if a
        ):
            seen.add(domain)
    lowered = [u.lower() for u in urls]
    for prefix in prefixes:
        if any(u.startswith(prefix) for u in lowered):
            seen.add(prefix)
    for entry in sorted(seen):
        score.add(BLOCKLISTED, f"BLOCKLISTED:{entry}")
    return score
