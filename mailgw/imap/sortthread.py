"""SORT and THREAD (RFC 5256, RFC 5957 DISPLAYFROM/DISPLAYTO): base subjects, sort keys and
the ORDEREDSUBJECT and REFERENCES threading algorithms, over the parsed message headers.

Strings compare with the ``i;unicode-casemap`` collation (RFC 5051: simple titlecase, then
NFKD); ties are broken by mailbox order (sequence number), as RFC 5256 asks. The threading
code is iterative, so a reply chain thousands of messages deep needs no recursion.
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Iterable
from functools import cached_property
from typing import Any

from mailgw.mime import addresses, decode_header_value, header_values, parse_date

__all__ = [
    "SortMessage",
    "base_subject",
    "casemap",
    "sort_messages",
    "thread_orderedsubject",
    "thread_references",
    "format_threads",
    "ThreadNode",
]

_WSP_RUN = re.compile(r"[ \t\r\n]+")
_BLOB = r"\[[^\[\]]*\][ \t]*"
_LEADER = re.compile(rf"(?:{_BLOB})*(?:re|fwd?)[ \t]*(?:{_BLOB})?:", re.IGNORECASE)
_BLOB_RE = re.compile(_BLOB)
_MSGID = re.compile(rb"<([^<>\s@]+@[^<>\s]+)>")


def _titlecase(text: str) -> str:
    out = []
    for c in text:
        t = c.title()
        if len(t) != 1:  # only the simple (one-character) mapping counts
            t = c.upper() if len(c.upper()) == 1 else c
        out.append(t)
    return "".join(out)


def casemap(text: str) -> str:
    """The ``i;unicode-casemap`` key of ``text`` (RFC 5051): each character mapped to its
    simple titlecase, then fully decomposed (NFKD); characters a decomposition produces are
    titlecased too (``ﬁ`` sorts as ``FI``). Keys compare like their UTF-8 bytes."""
    return _titlecase(unicodedata.normalize("NFKD", _titlecase(text)))


def base_subject(subject: str) -> tuple[str, bool]:
    """RFC 5256 2.1: the base subject of a (decoded) Subject, and whether the extraction
    removed a reply/forward marker (``Re:``, ``Fwd:``, ``Fw:``, ``(fwd)``, ``[fwd: ...]``)."""
    s = _WSP_RUN.sub(" ", subject)
    reply = False
    while True:
        # (2) trailers: "(fwd)" and white space
        while True:
            if s.endswith(" "):
                s = s.rstrip(" ")
            elif s[-5:].lower() == "(fwd)":
                s = s[:-5]
                reply = True
            else:
                break
        # (3)-(5) leaders and blobs
        while True:
            changed = False
            while True:
                if s.startswith(" "):
                    s = s.lstrip(" ")
                    changed = True
                    continue
                m = _LEADER.match(s)
                if m is None:
                    break
                s = s[m.end() :]
                reply = changed = True
            m = _BLOB_RE.match(s)
            if m is not None and s[m.end() :].strip(" "):
                s = s[m.end() :]
                changed = True
            if not changed:
                break
        # (6) "[fwd: ...]"
        if s[:5].lower() == "[fwd:" and s.endswith("]"):
            s = s[5:-1]
            reply = True
            continue
        return s, reply


def _ids(values: Iterable[bytes]) -> list[str]:
    out: list[str] = []
    for value in values:
        out.extend(m.decode("latin-1") for m in _MSGID.findall(value))
    return out


class SortMessage:
    """What SORT and THREAD need of one message: ``seq`` (mailbox order), ``number`` (what
    the response names: sequence number or UID), size, internal date and parsed ``structure``
    (``mailgw.mime``); header-derived keys are computed on first use."""

    def __init__(
        self, seq: int, number: int, size: int, internaldate: float, structure: Any
    ) -> None:
        self.seq = seq
        self.number = number
        self.size = size
        self.internaldate = internaldate
        self.structure = structure

    def _header(self, name: str) -> list[bytes]:
        return header_values(self.structure, name) if self.structure is not None else []

    @cached_property
    def sent_date(self) -> float:
        """The Date header (UTC), or the internal date when missing or unparsable (2.2)."""
        values = self._header("Date")
        ts = parse_date(values[0]) if values else None
        return ts if ts is not None else self.internaldate

    @cached_property
    def _subject(self) -> tuple[str, bool]:
        values = self._header("Subject")
        base, reply = base_subject(decode_header_value(values[0]) if values else "")
        return casemap(base), reply

    @property
    def subject(self) -> str:
        """The casemapped base subject."""
        return self._subject[0]

    @property
    def is_reply(self) -> bool:
        return self._subject[1]

    def _first(self, name: str) -> tuple[str, str, str] | None:
        if self.structure is None:
            return None
        found = addresses(self.structure, name)
        return found[0] if found else None

    def mailbox_of(self, name: str) -> str:
        """SORT FROM/TO/CC: the addr-mailbox (local part) of the first address, casemapped."""
        first = self._first(name)
        return casemap(first[1]) if first is not None else ""

    def display_of(self, name: str) -> str:
        """RFC 5957 DISPLAYFROM/DISPLAYTO: the display name of the first address, else its
        addr-spec, casemapped; "" without an address."""
        first = self._first(name)
        if first is None:
            return ""
        display, local, domain = first
        if display.strip():
            return casemap(display.strip())
        return casemap(f"{local}@{domain}" if domain else local)

    @cached_property
    def message_id(self) -> str | None:
        found = _ids(self._header("Message-ID")[:1])
        return found[0] if found else None

    @cached_property
    def references(self) -> list[str]:
        """References, or the first message ID of In-Reply-To when there are none (3)."""
        refs = _ids(self._header("References"))
        if refs:
            return refs
        return _ids(self._header("In-Reply-To"))[:1]


def _key(criterion: str) -> Any:
    if criterion == "ARRIVAL":
        return lambda m: m.internaldate
    if criterion == "DATE":
        return lambda m: m.sent_date
    if criterion == "SIZE":
        return lambda m: m.size
    if criterion == "SUBJECT":
        return lambda m: m.subject
    if criterion in ("FROM", "TO", "CC"):
        header = criterion.capitalize()
        return lambda m: m.mailbox_of(header)
    if criterion in ("DISPLAYFROM", "DISPLAYTO"):
        header = criterion[7:].capitalize()
        return lambda m: m.display_of(header)
    raise ValueError(f"unknown sort criterion {criterion}")


def sort_messages(
    messages: Iterable[SortMessage], criteria: Iterable[tuple[str, bool]]
) -> list[SortMessage]:
    """``messages`` ordered by ``criteria`` (``(name, reverse)`` pairs, most significant
    first); exact ties keep mailbox order whatever REVERSE says."""
    out = sorted(messages, key=lambda m: m.seq)
    for name, reverse in reversed(list(criteria)):
        out.sort(key=_key(name), reverse=reverse)  # stable, also with reverse
    return out


class ThreadNode:
    """A thread container: a message, or a dummy (``message`` None) with children."""

    __slots__ = ("message", "parent", "children", "key")

    def __init__(self, message: SortMessage | None = None) -> None:
        self.message = message
        self.parent: ThreadNode | None = None
        self.children: list[ThreadNode] = []
        self.key: tuple[float, int] = (0.0, 0)

    def first_message(self) -> SortMessage | None:
        node: ThreadNode | None = self
        while node is not None and node.message is None:
            node = node.children[0] if node.children else None
        return node.message if node is not None else None


def _date_key(m: SortMessage) -> tuple[float, int]:
    return (m.sent_date, m.seq)


def thread_orderedsubject(messages: Iterable[SortMessage]) -> list[ThreadNode]:
    """ORDEREDSUBJECT: messages grouped by base subject; in each group the oldest message is
    the parent of all the others (in sent-date order); groups ordered by their first message."""
    ordered = sorted(messages, key=lambda m: (m.subject, m.sent_date, m.seq))
    roots: list[ThreadNode] = []
    current: ThreadNode | None = None
    for m in ordered:
        if (
            current is not None
            and current.message is not None
            and current.message.subject == m.subject
        ):
            _link(current, ThreadNode(m))
            continue
        current = ThreadNode(m)
        roots.append(current)
    roots.sort(key=lambda n: _date_key(n.message) if n.message is not None else (0.0, 0))
    return roots


def _is_ancestor(node: ThreadNode, of: ThreadNode) -> bool:
    """Whether ``node`` is ``of`` or one of its ancestors."""
    x: ThreadNode | None = of
    while x is not None:
        if x is node:
            return True
        x = x.parent
    return False


def _link(parent: ThreadNode, child: ThreadNode) -> None:
    child.parent = parent
    parent.children.append(child)


def _unlink(child: ThreadNode) -> None:
    if child.parent is not None:
        child.parent.children.remove(child)
        child.parent = None


def _postorder(roots: list[ThreadNode]) -> list[ThreadNode]:
    """Every node below ``roots`` (included), children before their parents."""
    order: list[ThreadNode] = []
    stack = list(roots)
    while stack:
        node = stack.pop()
        order.append(node)
        stack.extend(node.children)
    order.reverse()
    return order


def _sort_siblings(roots: list[ThreadNode]) -> None:
    """Sort every set of siblings by sent date (then mailbox order); a dummy sorts as its
    first child."""
    for node in _postorder(roots):
        node.children.sort(key=lambda n: n.key)
        if node.message is not None:
            node.key = _date_key(node.message)
        elif node.children:
            node.key = node.children[0].key
    roots.sort(key=lambda n: n.key)


def _prune(roots: list[ThreadNode]) -> list[ThreadNode]:
    """Step 3: drop childless dummies; replace dummies by their children, except at the top
    level where a dummy keeps two or more children."""
    for node in _postorder(roots):
        if not any(c.message is None for c in node.children):
            continue
        kept: list[ThreadNode] = []
        for child in node.children:
            if child.message is None:
                for grandchild in child.children:
                    grandchild.parent = node
                kept.extend(child.children)
            else:
                kept.append(child)
        node.children = kept
    out: list[ThreadNode] = []
    for node in roots:
        if node.message is None:
            if not node.children:
                continue
            if len(node.children) == 1:
                node.children[0].parent = None
                out.append(node.children[0])
                continue
        out.append(node)
    return out


def thread_references(messages: Iterable[SortMessage]) -> list[ThreadNode]:
    """REFERENCES (RFC 5256 3): link by Message-ID / References / In-Reply-To, prune dummies,
    merge top-level threads with the same base subject, sort siblings by sent date."""
    table: dict[str, ThreadNode] = {}
    for m in sorted(messages, key=lambda m: m.seq):
        mid = m.message_id
        if mid is None or (mid in table and table[mid].message is not None):
            mid = f"\0{m.seq}"  # no or duplicate Message-ID: a unique one
        node = table.get(mid)
        if node is None:
            node = table[mid] = ThreadNode()
        node.message = m
        prev: ThreadNode | None = None
        for ref in m.references:
            ref_node = table.get(ref)
            if ref_node is None:
                ref_node = table[ref] = ThreadNode()
            if prev is not None and ref_node.parent is None and not _is_ancestor(ref_node, prev):
                _link(prev, ref_node)
            prev = ref_node
        _unlink(node)
        if prev is not None and not _is_ancestor(node, prev):
            _link(prev, node)
    roots = _prune([n for n in table.values() if n.parent is None])
    _sort_siblings(roots)
    return _merge_subjects(roots)


def _merge_subjects(roots: list[ThreadNode]) -> list[ThreadNode]:
    """Step 5: gather top-level threads whose base subjects are equal, then step 6."""
    subjects: dict[str, ThreadNode] = {}

    def info(node: ThreadNode) -> tuple[str, bool]:
        m = node.first_message()
        return (m.subject, m.is_reply) if m is not None else ("", False)

    for node in roots:
        subject, reply = info(node)
        if not subject:
            continue
        old = subjects.get(subject)
        if (
            old is None
            or (node.message is None and old.message is not None)
            or (old.message is not None and info(old)[1] and not reply)
        ):
            subjects[subject] = node
    replaced: dict[int, ThreadNode] = {}
    merged: set[int] = set()
    for node in roots:
        subject, reply = info(node)
        if not subject or node.parent is not None:  # already merged into a new dummy
            continue
        target = subjects[subject]
        if target is node:
            continue
        merged.add(id(node))
        if target.message is None and node.message is None:
            for child in node.children:
                child.parent = target
            target.children.extend(node.children)
            node.children = []
        elif target.message is None or (reply and not info(target)[1]):
            _link(target, node)
        else:
            dummy = ThreadNode()
            replaced[id(target)] = dummy
            target.parent = None
            _link(dummy, target)
            _link(dummy, node)
            subjects[subject] = dummy
    out = [replaced.get(id(n), n) for n in roots if id(n) not in merged]
    _sort_siblings(out)
    return out


def format_threads(roots: list[ThreadNode]) -> bytes:
    """The thread lists of a THREAD response: ``(3 6 (4 23)(44 7 96))``."""
    out: list[str] = []
    stack: list[str | ThreadNode] = []
    for root in reversed(roots):
        stack.extend((")", root, "("))
    while stack:
        item = stack.pop()
        if isinstance(item, str):
            out.append(item)
            continue
        children = item.children
        if item.message is not None:
            out.append(str(item.message.number))
            if children:
                out.append(" ")
        if len(children) == 1:
            stack.append(children[0])
        else:
            for child in reversed(children):
                stack.extend((")", child, "("))
    return "".join(out).encode("ascii")
