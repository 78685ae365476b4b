"""SORT and THREAD (RFC 5256, RFC 5957 DISPLAYFROM/DISPLAYTO): base subjects, sort keys and
the ORDEREDSUBJECT and REFERENCES threading algorithms, over the parsed message headers.

Strings compare with the ``i;unicode-casemap`` collation (RFC 5051: simple titlecase, then
NFKD); ties are broken by mailbox order (sequence number), as RFC 5256 asks. The threading
code is iterative, so a reply chain thousands of messages deep needs no recursion.

Hostile input stays cheap: REFERENCES takes at most the last ``MAX_REFERENCES`` message IDs
of each message and runs in near-linear time (a parent map whose loop check finds roots
through path-compressed shortcuts, or a link-cut forest once a subtree has moved, not by
walking whole reply chains), and every algorithm
has a ``*_steps`` generator form that yields every few hundred elementary steps, so the IMAP
session can give the reactor back to other sessions during a long SORT or THREAD.
"""

from __future__ import annotations

import re
import unicodedata
from collections import deque
from collections.abc import Generator, Iterable
from functools import cached_property
from typing import Any

from mailgw.mime import decode_bytes, decode_header_value, header_values, parse_date
from mailgw.mime.addresses import MISSING_DOMAIN, MISSING_MAILBOX, parse_address_list

__all__ = [
    "MAX_REFERENCES",
    "Steps",
    "SortMessage",
    "base_subject",
    "casemap",
    "sort_messages",
    "sort_messages_steps",
    "thread_orderedsubject",
    "thread_orderedsubject_steps",
    "thread_references",
    "thread_references_steps",
    "format_threads",
    "ThreadNode",
]

_WSP_RUN = re.compile(r"[ \t\r\n]+")
_BLOB = r"\[[^\[\]]*\][ \t]*"
_LEADER = re.compile(rf"(?:{_BLOB})*(?:re|fwd?)[ \t]*(?:{_BLOB})?:", re.IGNORECASE)
_BLOB_RE = re.compile(_BLOB)
_MSGID = re.compile(rb"<([^<>\s@]+@[^<>\s]+)>")

# Message IDs taken from one message's References (the last ones: the nearest ancestors).
# Dovecot 2.3.19 takes them all (measured: 100,000 still link a message to the first one);
# real References fields are trimmed by clients long before this.
MAX_REFERENCES = 1000
# Elementary steps between two yields of the ``*_steps`` generators.
STEPS_PER_YIELD = 256


class Steps:
    """Counts the elementary steps of a SORT or THREAD run (a message read, a reference
    linked, one hop of a loop check, a node pruned or sorted) and says when the generator
    forms should yield: every ``every`` steps."""

    __slots__ = ("count", "every", "_next")

    def __init__(self, every: int = STEPS_PER_YIELD) -> None:
        self.count = 0
        self.every = every
        self._next = every

    def add(self, n: int = 1) -> bool:
        """Count ``n`` steps; True when a yield is due."""
        self.count += n
        if self.count < self._next:
            return False
        self._next = self.count + self.every
        return True


def run_steps(steps: Generator[None, None, Any]) -> Any:
    """Run a ``*_steps`` generator to the end and return its result."""
    while True:
        try:
            next(steps)
        except StopIteration as done:
            return done.value


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


def _ids(values: Iterable[bytes], last: int | None = None) -> list[str]:
    """The message IDs in ``values``; only the ``last`` ones when given (memory stays
    bounded however long the field is)."""
    out: deque[str] = deque(maxlen=last)
    for value in values:
        out.extend(m.group(1).decode("latin-1") for m in _MSGID.finditer(value))
    return list(out)


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
        """(display name, local part, domain) of the first address of the first ``name``
        field that has one. A group (``team: a@x, b@y;``) counts as an address whose local
        part is the group name, without domain or display name: the first item of the
        ENVELOPE address list, which is what Dovecot sorts on (compared side by side)."""
        for value in self._header(name):
            for item in parse_address_list(value, 1):
                if item.mailbox is None:
                    continue  # the end of a group
                if item.host is None:  # the start of a group: its (unquoted) name
                    return "", decode_bytes(item.mailbox), ""
                local = b"" if item.mailbox == MISSING_MAILBOX else item.mailbox
                host = b"" if item.host == MISSING_DOMAIN else item.host
                display = decode_header_value(item.name) if item.name else ""
                return display, decode_bytes(local), decode_bytes(host)
        return None

    def mailbox_of(self, name: str) -> str:
        """SORT FROM/TO/CC: the addr-mailbox (local part) of the first address, casemapped;
        a group's name when the field starts with a group (RFC 5256 3: the first ENVELOPE
        address, whose mailbox is the group name)."""
        first = self._first(name)
        return casemap(first[1]) if first is not None else ""

    def display_of(self, name: str) -> str:
        """RFC 5957 DISPLAYFROM/DISPLAYTO: the display name of the first address, else its
        addr-spec (a group's name for a group), casemapped; "" without an address."""
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

    @property
    def references(self) -> list[str]:
        """References, or the first message ID of In-Reply-To when there are none (3)."""
        return self.last_references(None)

    def last_references(self, limit: int | None) -> list[str]:
        """:attr:`references`, only the last ``limit`` of them when given."""
        refs = _ids(self._header("References"), limit)
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
    result: list[SortMessage] = run_steps(sort_messages_steps(messages, criteria))
    return result


def sort_messages_steps(
    messages: Iterable[SortMessage],
    criteria: Iterable[tuple[str, bool]],
    steps: Steps | None = None,
) -> Generator[None, None, list[SortMessage]]:
    """:func:`sort_messages` as a generator: the keys (which parse headers) are computed one
    message at a time, yielding as ``steps`` says; then the keys are sorted."""
    steps = steps if steps is not None else Steps()
    ordered = sorted(messages, key=lambda m: m.seq)
    wanted = list(criteria)
    keys = [_key(name) for name, _reverse in wanted]
    table: list[tuple[Any, ...]] = []
    for m in ordered:
        table.append(tuple(key(m) for key in keys))
        if steps.add(len(keys)):
            yield
    order = list(range(len(ordered)))
    for i in range(len(wanted) - 1, -1, -1):
        order.sort(key=lambda j: table[j][i], reverse=wanted[i][1])  # stable, also reversed
        if steps.add(len(order)):
            yield
    return [ordered[j] for j in order]


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
    result: list[ThreadNode] = run_steps(thread_orderedsubject_steps(messages))
    return result


def thread_orderedsubject_steps(
    messages: Iterable[SortMessage], steps: Steps | None = None
) -> Generator[None, None, list[ThreadNode]]:
    """:func:`thread_orderedsubject` as a generator yielding as ``steps`` says."""
    steps = steps if steps is not None else Steps()
    keyed: list[tuple[str, float, int, SortMessage]] = []
    for m in messages:
        keyed.append((m.subject, m.sent_date, m.seq, m))
        if steps.add():
            yield
    keyed.sort(key=lambda k: k[:3])
    roots: list[ThreadNode] = []
    current: ThreadNode | None = None
    for subject, _date, _seq, m in keyed:
        if (
            current is not None
            and current.message is not None
            and current.message.subject == subject
        ):
            _link(current, ThreadNode(m))
        else:
            current = ThreadNode(m)
            roots.append(current)
        if steps.add():
            yield
    roots.sort(key=lambda n: _date_key(n.message) if n.message is not None else (0.0, 0))
    return roots


def _link(parent: ThreadNode, child: ThreadNode) -> None:
    child.parent = parent
    parent.children.append(child)


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


def _sort_siblings(roots: list[ThreadNode], steps: Steps) -> Generator[None, None, None]:
    """Sort every set of siblings by sent date (then mailbox order); a dummy sorts as its
    first child."""
    for node in _postorder(roots):
        node.children.sort(key=lambda n: n.key)
        if node.message is not None:
            node.key = _date_key(node.message)
        elif node.children:
            node.key = node.children[0].key
        if steps.add(1 + len(node.children)):
            yield
    roots.sort(key=lambda n: n.key)


def _prune(roots: list[ThreadNode], steps: Steps) -> Generator[None, None, list[ThreadNode]]:
    """Step 3: drop childless dummies; replace dummies by their children, except at the top
    level where a dummy keeps two or more children."""
    for node in _postorder(roots):
        if steps.add(1 + len(node.children)):
            yield
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


def thread_references(
    messages: Iterable[SortMessage], max_references: int | None = MAX_REFERENCES
) -> list[ThreadNode]:
    """REFERENCES (RFC 5256 3): link by Message-ID / References / In-Reply-To, prune dummies,
    merge top-level threads with the same base subject, sort siblings by sent date."""
    result: list[ThreadNode] = run_steps(thread_references_steps(messages, max_references))
    return result


def thread_references_steps(
    messages: Iterable[SortMessage],
    max_references: int | None = MAX_REFERENCES,
    steps: Steps | None = None,
) -> Generator[None, None, list[ThreadNode]]:
    """:func:`thread_references` as a generator yielding as ``steps`` says (which also
    counts the work: near-linear in the number of message IDs taken).

    Step 1 works on a parent map over container numbers. Its loop check ("do not link A as
    the parent of B if B is A or one of A's ancestors") is only ever asked about a B that
    is a root, so it is "is B the root of A's tree": roots are found through shortcut
    pointers (each points to an ancestor, path-compressed as in union-find), which links
    keep valid. The only other change to the forest is a message leaving the parent an
    earlier References guessed for it; when that message has replies below it, shortcuts
    could jump over the cut edge, so from then on roots are found in a link-cut forest
    (Sleator-Tarjan), O(log n) amortized per link, cut or root query.
    """
    steps = steps if steps is not None else Steps()
    number: dict[str, int] = {}  # message ID -> container
    parent: list[int] = []  # -1: a root
    children: list[int] = []  # how many children each container has
    held: list[SortMessage | None] = []
    up: list[int] = []  # an ancestor (or the container itself): root-finding shortcuts
    forest: _LinkCutForest | None = None  # replaces the shortcuts once a subtree moved

    def container(mid: str) -> int:
        n = number.get(mid)
        if n is None:
            n = number[mid] = len(parent)
            parent.append(-1)
            children.append(0)
            held.append(None)
            up.append(n)
            if forest is not None:
                forest.add()
        return n

    def root(x: int) -> int:
        if forest is not None:
            return forest.root(x)
        path: list[int] = []
        while True:
            nxt = up[x]
            if nxt == x:
                nxt = parent[x]
                if nxt < 0:
                    break
            path.append(x)
            x = nxt
        for y in path:
            up[y] = x
        steps.count += len(path)
        return x

    def link(child: int, new_parent: int) -> None:
        parent[child] = new_parent
        children[new_parent] += 1
        if forest is not None:
            forest.link(child, new_parent)

    for m in sorted(messages, key=lambda m: m.seq):
        mid = m.message_id
        if mid is None or (mid in number and held[number[mid]] is not None):
            mid = f"\0{m.seq}"  # no or duplicate Message-ID: a unique one
        node = container(mid)
        held[node] = m
        refs = m.last_references(max_references)
        prev = -1
        for ref in refs:
            r = container(ref)
            # (1B) link prev -> r unless r already has a parent or it would make a loop
            if prev >= 0 and parent[r] < 0 and r != prev and root(prev) != r:
                link(r, prev)
            prev = r
            if steps.add():
                yield
        # (1C) the message's parent is its last reference (or none), unless that loops
        if parent[node] != prev:
            if parent[node] >= 0:
                children[parent[node]] -= 1
                parent[node] = -1
                if forest is not None:
                    forest.cut(node)
                elif children[node]:
                    # Shortcuts from below may jump over the edge just cut: from now on
                    # roots are found in a link-cut forest (O(log n) per operation).
                    forest = _LinkCutForest(parent, steps)
                else:
                    up[node] = node  # no other container's shortcut passes through it
            if prev >= 0 and prev != node and root(prev) != node:
                link(node, prev)
        if steps.add():
            yield
    nodes = [ThreadNode(held[i]) for i in range(len(parent))]
    for i, p in enumerate(parent):
        if p >= 0:
            _link(nodes[p], nodes[i])
    if steps.add(len(nodes)):
        yield
    roots = yield from _prune([n for n in nodes if n.parent is None], steps)
    yield from _sort_siblings(roots, steps)
    merged = yield from _merge_subjects(roots, steps)
    return merged


class _LinkCutForest:
    """A link-cut forest (Sleator and Tarjan) over container numbers: ``link`` a root
    under a node, ``cut`` a node from its parent, find a node's ``root``, each in O(log n)
    amortized. Each preferred path is a splay tree keyed by depth; ``par`` is the splay
    parent, or for a splay root the path-parent. Every splay step counts in ``steps``."""

    __slots__ = ("left", "right", "par", "steps")

    def __init__(self, parent: list[int], steps: Steps) -> None:
        # every node alone on its path, the path-parent being its parent in the forest
        self.left = [-1] * len(parent)
        self.right = [-1] * len(parent)
        self.par = list(parent)
        self.steps = steps
        steps.count += len(parent)

    def add(self) -> None:
        self.left.append(-1)
        self.right.append(-1)
        self.par.append(-1)

    def _is_root(self, x: int) -> bool:
        p = self.par[x]
        return p < 0 or (self.left[p] != x and self.right[p] != x)

    def _rotate(self, x: int) -> None:
        left, right, par = self.left, self.right, self.par
        p = par[x]
        g = par[p]
        if not self._is_root(p):
            if left[g] == p:
                left[g] = x
            else:
                right[g] = x
        par[x] = g
        if left[p] == x:
            b = right[x]
            left[p] = b
            right[x] = p
        else:
            b = left[x]
            right[p] = b
            left[x] = p
        if b >= 0:
            par[b] = p
        par[p] = x
        self.steps.count += 1

    def _splay(self, x: int) -> None:
        left, par = self.left, self.par
        while not self._is_root(x):
            p = par[x]
            if not self._is_root(p):
                g = par[p]
                self._rotate(p if (left[g] == p) == (left[p] == x) else x)
            self._rotate(x)

    def _access(self, x: int) -> None:
        last = -1
        y = x
        while y >= 0:
            self._splay(y)
            self.right[y] = last
            last = y
            y = self.par[y]
        self._splay(x)

    def root(self, x: int) -> int:
        self._access(x)
        left = self.left
        while left[x] >= 0:
            x = left[x]
            self.steps.count += 1
        self._splay(x)
        return x

    def link(self, child: int, parent: int) -> None:
        """``child`` (a root) becomes a child of ``parent``."""
        self._access(child)
        self.par[child] = parent

    def cut(self, x: int) -> None:
        """``x`` leaves its parent (it must have one)."""
        self._access(x)
        above = self.left[x]
        if above >= 0:
            self.par[above] = -1
            self.left[x] = -1


def _merge_subjects(
    roots: list[ThreadNode], steps: Steps
) -> Generator[None, None, list[ThreadNode]]:
    """Step 5: gather top-level threads whose base subjects are equal, then step 6."""
    subjects: dict[str, ThreadNode] = {}

    def info(node: ThreadNode) -> tuple[str, bool]:
        m = node.first_message()
        return (m.subject, m.is_reply) if m is not None else ("", False)

    for node in roots:
        if steps.add():
            yield
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
        if steps.add():
            yield
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
    yield from _sort_siblings(out, steps)
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
