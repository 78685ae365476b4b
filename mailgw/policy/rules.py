"""Security rules: the rules file (``load_rules``) and the check that runs it (``RulesCheck``).

A rules file is a list of rules, each a ``rule NAME`` line followed by ``match`` and
``action`` lines (the syntax, every match type and action: ``docs/policy.md``)::

    rule no-executables
        match attachment-type exe elf macho script
        action reject 554 5.7.1 "Executable attachments are not accepted"

A rule matches when every one of its ``match`` lines does (``match not ...`` inverts one).
Each rule runs at the cheapest stage where all its matches can be decided (envelope sender,
client, user, group, rate: ``MAIL``; recipient: ``RCPT``; content: ``DATA``). Rules run in file
order; the first matching rule ends the evaluation of the rules after it (first match wins)
unless one of its actions is ``continue``. A stop decided at ``MAIL`` or ``DATA`` holds for the
rest of the transaction (rules before it that run at a later stage still run); one decided at
``RCPT`` holds for that recipient only.

A file with an error is refused whole: ``RulesError`` says ``file:line: what is wrong``.
"""

from __future__ import annotations

import abc
import fnmatch
import ipaddress
import os
import re
import shlex
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from prometheus_client import Counter
from twisted.internet.defer import Deferred
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from mailgw.config import values
from mailgw.directory.names import group_name
from mailgw.model.reply import R, Reply
from mailgw.model.verdict import ACCEPT, Verdict, combine
from mailgw.policy.apply import direction_of
from mailgw.policy.content import (
    DEFAULT_CONTENT_LIMITS,
    ContentFacts,
    ContentLimits,
    card_numbers,
    cn_id_numbers,
    content_facts,
)
from mailgw.policy.filetypes import TYPES
from mailgw.policy.pipeline import CheckContext, ICheck, Stage
from mailgw.policy.ratelimit import IRateCounter, MemoryRateCounter

log = Logger(namespace="mailgw.policy.rules")

RULE_HITS = Counter(
    "mailgw_policy_rule_hits",
    "Security rule matches, by rule name and action.",
    ["rule", "action"],
)
"""``mailgw_policy_rule_hits_total{rule,action}`` in the default prometheus REGISTRY."""

POLICY_REJECT = Reply(550, "5.7.1", "Message refused by security policy")
POLICY_TEMPFAIL = Reply(451, "4.7.1", "Message deferred by security policy, try again later")

_ORDER = {Stage.CONNECT: 0, Stage.MAIL: 1, Stage.RCPT: 2, Stage.DATA: 3}
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}")
_HEADER_NAME = re.compile(r"[!-9;-~]+")


class RulesError(ValueError):
    """A rules file cannot be used; ``str()`` is ``file:line: what is wrong``."""

    def __init__(self, path: str, line: int, message: str) -> None:
        super().__init__(f"{path}:{line}: {message}" if line else f"{path}: {message}")
        self.path, self.line, self.message = path, line, message


class _Bad(ValueError):
    """A problem in one line (the parser adds file and line)."""


# -- patterns ---------------------------------------------------------------------------------


def _regex(token: str, default_flags: int = 0) -> re.Pattern[str] | None:
    """``/.../flags`` (flags from ``ims``) as a compiled regex; None when ``token`` is not
    written as a regex."""
    if len(token) < 2 or not token.startswith("/"):
        return None
    end = token.rfind("/")
    if end == 0:
        return None
    flags = default_flags
    for c in token[end + 1 :]:
        if c not in "ims":
            raise _Bad(f"unknown regex flag {c!r} in {token} (use i, m, s)")
        flags |= {"i": re.IGNORECASE, "m": re.MULTILINE, "s": re.DOTALL}[c]
    try:
        return re.compile(token[1:end], flags)
    except re.error as e:
        raise _Bad(f"bad regex {token}: {e}") from None


@dataclass(frozen=True)
class AddressPattern:
    """One envelope address pattern (see ``parse``)."""

    text: str
    test: Callable[[str], bool] = field(compare=False, repr=False)

    @classmethod
    def parse(cls, text: str) -> AddressPattern:
        """``<>`` the null sender; ``/regex/`` searched in the address (case-insensitive);
        a glob (``*``, ``?``, ``[``) over the address, or over the domain when it has no
        ``@``; ``user@domain`` exact; ``@domain`` or ``domain`` the domain; ``.domain`` or
        ``@.domain`` the domain and its subdomains. Case-insensitive."""
        rx = _regex(text, re.IGNORECASE)
        if rx is not None:
            return cls(text, lambda a: rx.search(a) is not None)
        t = text.lower()
        if t == "<>":
            return cls(text, lambda a: a == "")
        if any(c in t for c in "*?["):
            if "@" in t:
                return cls(text, lambda a: fnmatch.fnmatchcase(a.lower(), t))
            return cls(text, lambda a: fnmatch.fnmatchcase(_domain(a), t))
        if "@" in t and not t.startswith("@"):
            return cls(text, lambda a: a.lower() == t)
        domain = t.lstrip("@")
        if not domain or any(c in domain for c in " <>@,"):
            raise _Bad(f"bad address pattern {text!r}")
        if domain.startswith("."):
            return cls(text, lambda a: _domain(a) == domain[1:] or _domain(a).endswith(domain))
        return cls(text, lambda a: _domain(a) == domain)


def _domain(address: str) -> str:
    return address.rpartition("@")[2].lower().rstrip(".")


@dataclass(frozen=True)
class TextPattern:
    """``/regex/flags`` searched in the text, or a keyword (case-insensitive substring)."""

    text: str
    test: Callable[[str], bool] = field(compare=False, repr=False)

    @classmethod
    def parse(cls, text: str) -> TextPattern:
        rx = _regex(text)
        if rx is not None:
            return cls(text, lambda s: rx.search(s) is not None)
        if not text:
            raise _Bad("empty keyword")
        word = text.casefold()
        return cls(text, lambda s: word in s.casefold())


# -- matches ----------------------------------------------------------------------------------


@dataclass
class Facts:
    """What a rule evaluation may need, per transaction (kept in ``CheckContext.state``)."""

    content: ContentFacts | None = None
    stop: int | None = None
    """Index of the rule whose match ended evaluation for the transaction."""
    rates: dict[str, int] = field(default_factory=dict)
    """``rate`` counts taken in this transaction, per rule and key."""
    hits: list[str] = field(default_factory=list)
    """Rules hit before the queue ID was known (logged again with it at DATA)."""


@dataclass(frozen=True)
class Env:
    """One evaluation: the context and the per-transaction facts, plus helpers."""

    context: CheckContext
    facts: Facts
    is_local_domain: Callable[[str], bool]
    in_group: Callable[[str, tuple[str, ...]], bool] | None = None

    def recipients(self) -> list[str]:
        c = self.context
        if c.stage is Stage.RCPT and c.recipient is not None:
            return [str(c.recipient)]
        return [str(r) for r in c.recipients]


Result = bool | Deferred[bool]


class Match(abc.ABC):
    """A match line: ``stage`` (cheapest where it can be decided) and ``test(env)``."""

    kind = ""
    stage = Stage.MAIL
    content = False
    """Needs the message's ``ContentFacts``."""
    last = False
    """Evaluated after the other matches of its rule (``rate``: counts only when the rest
    matched)."""

    def __init__(self, args: list[str]) -> None:
        self.args = args

    @abc.abstractmethod
    def test(self, env: Env) -> Result:
        """Whether the message (``env``) matches, now or (Deferred) later."""

    def __str__(self) -> str:
        return " ".join([self.kind, *self.args])


class AllMatch(Match):
    kind = "all"

    def __init__(self, args: list[str]) -> None:
        super().__init__(args)
        if args:
            raise _Bad("all takes no arguments")

    def test(self, env: Env) -> Result:
        return True


def _need(args: list[str], what: str) -> None:
    if not args:
        raise _Bad(f"{what} needs at least one argument")


class SenderMatch(Match):
    kind = "sender"

    def __init__(self, args: list[str]) -> None:
        super().__init__(args)
        _need(args, "sender")
        self.patterns = [AddressPattern.parse(a) for a in args]

    def test(self, env: Env) -> Result:
        sender = env.context.sender
        return any(p.test(sender) for p in self.patterns)


class RecipientMatch(Match):
    """At RCPT: the recipient being added; at DATA: any recipient."""

    kind = "recipient"
    stage = Stage.RCPT

    def __init__(self, args: list[str]) -> None:
        super().__init__(args)
        _need(args, "recipient")
        self.patterns = [AddressPattern.parse(a) for a in args]

    def test(self, env: Env) -> Result:
        return any(p.test(r) for r in env.recipients() for p in self.patterns)


class ClientIPMatch(Match):
    kind = "client-ip"

    def __init__(self, args: list[str]) -> None:
        super().__init__(args)
        _need(args, "client-ip")
        try:
            self.networks = [ipaddress.ip_network(a, strict=False) for a in args]
        except ValueError as e:
            raise _Bad(f"client-ip: {e}") from None

    def test(self, env: Env) -> Result:
        try:
            ip = ipaddress.ip_address(env.context.client_ip)
        except ValueError:
            return False
        if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
            ip = ip.ipv4_mapped
        return any(ip in n for n in self.networks)


class UserMatch(Match):
    kind = "user"

    def __init__(self, args: list[str]) -> None:
        super().__init__(args)
        _need(args, "user")
        self.patterns = [AddressPattern.parse(a) for a in args]

    def test(self, env: Env) -> Result:
        user = env.context.user
        return user is not None and any(p.test(user) for p in self.patterns)


class GroupMatch(Match):
    """``group NAME...``: the authenticated user is a member of one of the groups, looked up
    in the directory at each evaluation (``IDirectory.in_group``: a membership change counts
    for the next message, no reload). Never for anonymous mail. A group that does not exist
    (yet) is not an error: it has no members."""

    kind = "group"

    def __init__(self, args: list[str]) -> None:
        super().__init__(args)
        _need(args, "group")
        try:
            self.groups = tuple(dict.fromkeys(group_name(a) for a in args))
        except ValueError as e:
            raise _Bad(f"group: {e}") from None

    def test(self, env: Env) -> Result:
        user = env.context.user
        if user is None or env.in_group is None:
            return False
        return env.in_group(user, self.groups)


class AuthenticatedMatch(Match):
    kind = "authenticated"

    def __init__(self, args: list[str]) -> None:
        super().__init__(args)
        if args:
            raise _Bad("authenticated takes no arguments")

    def test(self, env: Env) -> Result:
        return env.context.user is not None


class DirectionMatch(Match):
    """``inbound`` (arrived by MX) or ``outbound`` (sent by a user)."""

    kind = "direction"

    def __init__(self, args: list[str]) -> None:
        super().__init__(args)
        if len(args) != 1 or args[0] not in ("inbound", "outbound"):
            raise _Bad("direction takes inbound or outbound")

    def test(self, env: Env) -> Result:
        return direction_of(env.context.protocol) == self.args[0]


class ExternalRecipientMatch(Match):
    """At RCPT: the recipient being added is outside the local domains; at DATA: any is."""

    kind = "external-recipient"
    stage = Stage.RCPT

    def __init__(self, args: list[str]) -> None:
        super().__init__(args)
        if args:
            raise _Bad("external-recipient takes no arguments")

    def test(self, env: Env) -> Result:
        return any(not env.is_local_domain(_domain(r)) for r in env.recipients())


_COMPARE: dict[str, Callable[[int, int], bool]] = {
    ">": lambda a, b: a > b,
    ">=": lambda a, b: a >= b,
    "<": lambda a, b: a < b,
    "<=": lambda a, b: a <= b,
    "=": lambda a, b: a == b,
}


def _comparison(args: list[str], what: str, parse: Callable[[str], int]) -> tuple[str, int]:
    if len(args) != 2 or args[0] not in _COMPARE:
        raise _Bad(f"{what} takes an operator (> >= < <= =) and a number, e.g. {what} > 10")
    try:
        return args[0], parse(args[1])
    except ValueError as e:
        raise _Bad(f"{what}: {e}") from None


class RecipientCountMatch(Match):
    """At RCPT: the count with the recipient being added; at DATA: all of them."""

    kind = "recipients"
    stage = Stage.RCPT

    def __init__(self, args: list[str]) -> None:
        super().__init__(args)
        self.op, self.number = _comparison(args, "recipients", _int)

    def test(self, env: Env) -> Result:
        c = env.context
        count = len(c.recipients) + (1 if c.stage is Stage.RCPT and c.recipient else 0)
        return _COMPARE[self.op](count, self.number)


def _int(text: str) -> int:
    value = int(text)
    if value < 0:
        raise ValueError(f"expected a number >= 0, got {value}")
    return value


class SizeMatch(Match):
    kind = "size"
    stage = Stage.DATA

    def __init__(self, args: list[str]) -> None:
        super().__init__(args)
        self.op, self.number = _comparison(args, "size", values.parse_size)

    def test(self, env: Env) -> Result:
        c = env.context
        size = c.message.size if c.message is not None else c.envelope.size if c.envelope else 0
        return _COMPARE[self.op](int(size), self.number)


class RateMatch(Match):
    """``rate N/WINDOW per user|ip|sender-domain|sender``: more than N messages in WINDOW;
    counted once per transaction when the rule's other matches hold."""

    kind = "rate"
    last = True
    _KEYS = ("user", "ip", "sender-domain", "sender")

    def __init__(self, args: list[str], rule: str = "", counter: Any = None) -> None:
        super().__init__(args)
        if len(args) != 3 or args[1] != "per" or args[2] not in self._KEYS or "/" not in args[0]:
            raise _Bad("rate takes N/WINDOW per user|ip|sender-domain|sender, e.g. 100/1h per user")
        n, _, window = args[0].partition("/")
        try:
            self.limit = int(n)
            self.window = values.parse_duration(window)
        except ValueError as e:
            raise _Bad(f"rate: {e}") from None
        if self.limit < 0 or self.window <= 0:
            raise _Bad("rate: N must be >= 0 and WINDOW more than 0")
        self.per = args[2]
        self.rule = rule
        self.counter: Any = counter

    def _key(self, c: CheckContext) -> str | None:
        if self.per == "user":
            return c.user
        if self.per == "ip":
            return c.client_ip or None
        if self.per == "sender-domain":
            return _domain(c.sender) or None
        return c.sender.lower() or None

    def test(self, env: Env) -> Result:
        key = self._key(env.context)
        if key is None:
            return False
        full = f"{self.rule}|{self.per}|{key}"
        seen = env.facts.rates.get(full)
        if seen is not None:
            return seen > self.limit
        count = self.counter.hit(full, self.window)

        def compare(n: int) -> bool:
            env.facts.rates[full] = int(n)
            return int(n) > self.limit

        if isinstance(count, Deferred):
            return count.addCallback(compare)
        return compare(count)


class _ContentMatch(Match):
    stage = Stage.DATA
    content = True

    def facts(self, env: Env) -> ContentFacts:
        assert env.facts.content is not None
        return env.facts.content


class HeaderMatch(_ContentMatch):
    """``header NAME|* PATTERN...``: a top-level header field's decoded value."""

    kind = "header"

    def __init__(self, args: list[str]) -> None:
        super().__init__(args)
        if len(args) < 2:
            raise _Bad("header takes a field name (or *) and at least one pattern")
        if args[0] != "*" and not _HEADER_NAME.fullmatch(args[0]):
            raise _Bad(f"bad header field name {args[0]!r}")
        self.name = args[0].lower()
        self.patterns = [TextPattern.parse(a) for a in args[1:]]

    def test(self, env: Env) -> Result:
        return any(
            p.test(value)
            for name, value in self.facts(env).headers
            if self.name in ("*", name)
            for p in self.patterns
        )


class SubjectMatch(_ContentMatch):
    kind = "subject"

    def __init__(self, args: list[str]) -> None:
        super().__init__(args)
        _need(args, "subject")
        self.patterns = [TextPattern.parse(a) for a in args]

    def test(self, env: Env) -> Result:
        subject = self.facts(env).subject
        return any(p.test(subject) for p in self.patterns)


class BodyMatch(_ContentMatch):
    kind = "body"

    def __init__(self, args: list[str]) -> None:
        super().__init__(args)
        _need(args, "body")
        self.patterns = [TextPattern.parse(a) for a in args]

    def test(self, env: Env) -> Result:
        text = self.facts(env).text
        return any(p.test(text) for p in self.patterns)


class DLPMatch(_ContentMatch):
    """``dlp cn-id|card-number [MIN]``: at least MIN (default 1) such numbers in the
    Subject and the text."""

    kind = "dlp"
    _FINDERS: dict[str, Callable[[str], list[str]]] = {
        "cn-id": cn_id_numbers,
        "card-number": card_numbers,
    }

    def __init__(self, args: list[str]) -> None:
        super().__init__(args)
        if not args or args[0] not in self._FINDERS or len(args) > 2:
            raise _Bad("dlp takes cn-id or card-number and an optional minimum count")
        try:
            self.minimum = _int(args[1]) if len(args) == 2 else 1
        except ValueError as e:
            raise _Bad(f"dlp: {e}") from None
        self.find = self._FINDERS[args[0]]

    def test(self, env: Env) -> Result:
        f = self.facts(env)
        return len(set(self.find(f.subject + "\n" + f.text))) >= max(1, self.minimum)


class AttachmentNameMatch(_ContentMatch):
    """File names (globs, case-insensitive) of attachments and of the files inside zips."""

    kind = "attachment-name"

    def __init__(self, args: list[str]) -> None:
        super().__init__(args)
        _need(args, "attachment-name")
        self.globs = [a.lower() for a in args]

    def test(self, env: Env) -> Result:
        for a in self.facts(env).attachments:
            names = [a.name, *(m.name for m in a.members)]
            for name in names:
                base = name.replace("\\", "/").rsplit("/", 1)[-1].lower()
                if base and any(fnmatch.fnmatchcase(base, g) for g in self.globs):
                    return True
        return False


class AttachmentExtMatch(_ContentMatch):
    kind = "attachment-ext"

    def __init__(self, args: list[str]) -> None:
        super().__init__(args)
        _need(args, "attachment-ext")
        self.exts = {a.lower().lstrip(".") for a in args}

    def test(self, env: Env) -> Result:
        for a in self.facts(env).attachments:
            if a.extension in self.exts:
                return True
            for m in a.members:
                base = m.name.rsplit("/", 1)[-1]
                if "." in base and base.rsplit(".", 1)[1].lower() in self.exts:
                    return True
        return False


class AttachmentTypeMatch(_ContentMatch):
    """Real types by magic bytes (``filetypes.TYPES``), inside zips too; ``encrypted``: an
    archive with an encrypted member."""

    kind = "attachment-type"

    def __init__(self, args: list[str]) -> None:
        super().__init__(args)
        _need(args, "attachment-type")
        unknown = [a for a in args if a.lower() not in TYPES]
        if unknown:
            raise _Bad(
                f"unknown attachment type {unknown[0]!r} (known: {', '.join(sorted(TYPES))})"
            )
        self.types = {a.lower() for a in args}

    def test(self, env: Env) -> Result:
        for a in self.facts(env).attachments:
            if a.type in self.types or ("encrypted" in self.types and a.encrypted):
                return True
            if any(m.type in self.types for m in a.members):
                return True
        return False


class MimeErrorMatch(_ContentMatch):
    """The message was not scanned whole: a parse limit cut its structure (too many parts,
    too deep) or it is larger than ``[policy] max_scan_size``."""

    kind = "mime-error"

    def __init__(self, args: list[str]) -> None:
        super().__init__(args)
        if args:
            raise _Bad("mime-error takes no arguments")

    def test(self, env: Env) -> Result:
        f = self.facts(env)
        return f.mime_truncated or f.scan_truncated


MATCHES: dict[str, type[Match]] = {
    m.kind: m
    for m in (
        AllMatch,
        SenderMatch,
        RecipientMatch,
        ClientIPMatch,
        UserMatch,
        GroupMatch,
        AuthenticatedMatch,
        DirectionMatch,
        ExternalRecipientMatch,
        RecipientCountMatch,
        SizeMatch,
        RateMatch,
        HeaderMatch,
        SubjectMatch,
        BodyMatch,
        DLPMatch,
        AttachmentNameMatch,
        AttachmentExtMatch,
        AttachmentTypeMatch,
        MimeErrorMatch,
    )
}


class Not(Match):
    def __init__(self, inner: Match) -> None:
        super().__init__(inner.args)
        self.inner = inner
        self.kind = "not " + inner.kind
        self.stage = inner.stage
        self.content = inner.content
        self.last = inner.last

    def test(self, env: Env) -> Result:
        result = self.inner.test(env)
        if isinstance(result, Deferred):
            return result.addCallback(lambda r: not r)
        return not result


# -- actions ----------------------------------------------------------------------------------

_CODE = re.compile(r"[245]\d\d")
_ENHANCED = re.compile(r"[245]\.\d{1,3}\.\d{1,3}")


def _reply(args: list[str], default: Reply, permanent: bool) -> Reply:
    code, enhanced, rest = default.code, default.enhanced, list(args)
    if rest and _CODE.fullmatch(rest[0]):
        code = int(rest.pop(0))
        has_enhanced = bool(rest) and _ENHANCED.fullmatch(rest[0]) is not None
        enhanced = rest.pop(0) if has_enhanced else f"{code // 100}.7.1"
    if permanent and not 500 <= code < 600:
        raise _Bad(f"reject needs a 5xx code, not {code}")
    if not permanent and not 400 <= code < 500:
        raise _Bad(f"tempfail needs a 4xx code, not {code}")
    if enhanced and enhanced[0] != str(code)[0]:
        raise _Bad(f"enhanced status {enhanced} does not go with {code}")
    text = " ".join(rest) if rest else default.text
    if any(ord(c) < 32 for c in text):
        raise _Bad("reply text holds a control character")
    return Reply(code, enhanced, text)


def _action(verb: str, args: list[str], rule: str) -> Verdict | None:
    """The verdict of one action line (None for ``accept`` and ``continue``)."""
    try:
        if verb == "reject":
            return Verdict.reject(_reply(args, POLICY_REJECT, True))
        if verb == "tempfail":
            return Verdict.tempfail(_reply(args, POLICY_TEMPFAIL, False))
        if verb == "quarantine":
            return Verdict.quarantine(" ".join(args) or f"rule {rule}", rule)
        if verb == "add-header":
            if not args:
                raise _Bad("add-header takes NAME: VALUE")
            text = " ".join(args)
            name, colon, value = text.partition(":")
            if not colon:
                if len(args) < 2:
                    raise _Bad("add-header takes NAME: VALUE")
                name, value = args[0], " ".join(args[1:])
            return Verdict.add_headers((name.strip(), value.strip()))
        if verb == "tag-subject":
            return Verdict.tag_subject(" ".join(args))
        if verb == "bcc":
            return Verdict.add_bcc(*args)
        if verb == "redirect":
            return Verdict.redirect_to(*args)
        if verb in ("class", "route", "folder"):
            if len(args) != 1:
                raise _Bad(f"{verb} takes one name")
            if verb == "class":
                return Verdict.set_class(args[0])
            if verb == "route":
                return Verdict.reroute(args[0])
            return Verdict.file_into(args[0])
        if verb in ("accept", "continue"):
            if args:
                raise _Bad(f"{verb} takes no arguments")
            return None
    except ValueError as e:
        if isinstance(e, _Bad):
            raise
        raise _Bad(f"{verb}: {e}") from None
    raise _Bad(
        f"unknown action {verb!r} (reject, tempfail, quarantine, add-header, tag-subject, bcc,"
        " redirect, class, route, folder, accept, continue)"
    )


# -- rules ------------------------------------------------------------------------------------


@dataclass
class Rule:
    name: str
    line: int
    matches: list[Match] = field(default_factory=list)
    actions: list[tuple[str, list[str]]] = field(default_factory=list)
    verdict: Verdict = ACCEPT
    stop: bool = True
    stage: Stage = Stage.MAIL

    @property
    def action_label(self) -> str:
        """The label of the hit counter: the action verbs (``continue`` left out)."""
        verbs = [v for v, _ in self.actions if v != "continue"]
        return "+".join(dict.fromkeys(verbs)) or "continue"

    @property
    def content(self) -> bool:
        return any(m.content for m in self.matches)

    def describe(self) -> str:
        matches = "; ".join(str(m) for m in self.matches)
        actions = "; ".join(" ".join([v, *a]) for v, a in self.actions)
        return f"{self.name} [{self.stage.value}] match {matches} -> {actions}"


def _tokens(text: str) -> list[str]:
    """The words of a line (shlex: quotes group, no escapes, no comments); on a ``match``
    line a ``/regex/`` holding blanks may be written without quotes."""
    lexer = shlex.shlex(text, posix=True)
    lexer.whitespace_split = True
    lexer.escape = ""
    lexer.commenters = ""
    try:
        words = list(lexer)
    except ValueError as e:
        raise _Bad(f"cannot split the line: {e}") from None
    if not words or words[0] != "match":
        return words
    # A /regex/ written with blanks and without quotes: its words joined by one blank.
    out: list[str] = []
    open_regex = False
    for word in words:
        if open_regex:
            out[-1] += " " + word
        else:
            out.append(word)
        current = out[-1]
        open_regex = current.startswith("/") and not _CLOSED.fullmatch(current)
    if open_regex:
        raise _Bad(f"regex {out[-1]} is not closed with /")
    return out


_CLOSED = re.compile(r"/.*/[A-Za-z]*", re.S)


def parse_rules(
    text: str,
    path: str = "<rules>",
    counter: Any = None,
    channels: Sequence[str] | None = None,
) -> list[Rule]:
    """The rules of ``text`` (see the module docstring); RulesError at the first problem.
    ``counter``: the ``IRateCounter`` of ``rate`` matches (default: a new memory one);
    ``channels``: the relay's channel names, to check ``route`` actions against."""
    counter = counter if counter is not None else MemoryRateCounter()
    rules: list[Rule] = []
    names: set[str] = set()
    rule: Rule | None = None
    n = 0

    def finish(r: Rule | None) -> None:
        if r is None:
            return
        if not r.matches:
            raise RulesError(path, r.line, f"rule {r.name} has no match line")
        if not r.actions:
            raise RulesError(path, r.line, f"rule {r.name} has no action line")
        verdicts = [v for v in (_action(verb, a, r.name) for verb, a in r.actions) if v]
        finals = [v for v in verdicts if v.is_final or v.is_quarantined]
        if len(finals) > 1:
            raise RulesError(
                path, r.line, f"rule {r.name}: reject, tempfail and quarantine exclude each other"
            )
        r.verdict = combine(verdicts)
        r.stop = not any(verb == "continue" for verb, _ in r.actions)
        r.stage = max((m.stage for m in r.matches), key=_ORDER.__getitem__)
        r.matches.sort(key=lambda m: m.last)
        rules.append(r)

    for n, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        try:
            words = _tokens(line)
            keyword, args = words[0], words[1:]
            if keyword == "rule":
                finish(rule)
                if len(args) != 1 or not _NAME.fullmatch(args[0]):
                    raise _Bad("rule takes one NAME (letters, digits, . _ -)")
                if args[0] in names:
                    raise _Bad(f"rule {args[0]} is defined twice")
                names.add(args[0])
                rule = Rule(args[0], n)
            elif keyword in ("match", "action"):
                if rule is None:
                    raise _Bad(f"{keyword} before the first rule line")
                if not args:
                    raise _Bad(f"{keyword} needs a type")
                if keyword == "action":
                    _action(args[0], args[1:], rule.name)  # checked here, for the line number
                    if args[0] == "route" and channels is not None and args[1] not in channels:
                        raise _Bad(f"route: unknown channel {args[1]!r}")
                    rule.actions.append((args[0], args[1:]))
                    continue
                negate = args[0] == "not"
                if negate:
                    args = args[1:]
                    if not args:
                        raise _Bad("match not needs a type")
                kind = MATCHES.get(args[0])
                if kind is None:
                    raise _Bad(f"unknown match type {args[0]!r} ({', '.join(MATCHES)})")
                match: Match = (
                    RateMatch(args[1:], rule.name, counter) if kind is RateMatch else kind(args[1:])
                )
                rule.matches.append(Not(match) if negate else match)
            else:
                raise _Bad(f"expected rule, match or action, not {keyword!r}")
        except _Bad as e:
            raise RulesError(path, n, str(e)) from None
    finish(rule)
    return rules


def load_rules(path: str, counter: Any = None, channels: Sequence[str] | None = None) -> list[Rule]:
    """Read and parse the rules file ``path`` (RulesError, without a line number when it
    cannot be read)."""
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except OSError as e:
        raise RulesError(path, 0, f"cannot read the rules file: {e.strerror}") from None
    except UnicodeDecodeError:
        raise RulesError(path, 0, "the rules file is not UTF-8 text") from None
    return parse_rules(text, os.path.abspath(path), counter, channels)


# -- the check --------------------------------------------------------------------------------


@implementer(ICheck)
class RulesCheck:
    """Runs ``rules`` at their stages (see the module docstring). ``is_local_domain`` tells
    internal from external recipients; ``in_group`` (``IDirectory.in_group``) answers
    ``group`` matches (None: they never match); ``limits`` bound the content scan."""

    name = "rules"

    def __init__(
        self,
        rules: Sequence[Rule],
        is_local_domain: Callable[[str], bool],
        limits: ContentLimits = DEFAULT_CONTENT_LIMITS,
        every_stage: bool = False,
        in_group: Callable[[str, tuple[str, ...]], bool] | None = None,
    ) -> None:
        self.rules = tuple(rules)
        self.is_local_domain = is_local_domain
        self.in_group = in_group
        self.limits = limits
        # every_stage: the pipeline calls it at every stage, so rules replaced on a reload
        # (``replace``) may run at stages the first ones did not use.
        stages = set(Stage) if every_stage else {r.stage for r in self.rules} | {Stage.DATA}
        self.stages = frozenset(stages)

    def replace(self, rules: Sequence[Rule]) -> None:
        """Run ``rules`` from now on (transactions under way may see either set); ValueError
        when one needs a stage this check is not called at (built without ``every_stage``)."""
        missing = {r.stage for r in rules} - self.stages
        if missing:
            raise ValueError(f"rules at stages {sorted(s.value for s in missing)} need a restart")
        self.rules = tuple(rules)

    def _facts(self, context: CheckContext) -> Facts:
        facts = context.state.get(self.name)
        if not isinstance(facts, Facts):
            facts = context.state[self.name] = Facts()
        return facts

    def check(self, context: CheckContext) -> Verdict | Deferred[Verdict]:
        facts = self._facts(context)
        stage = context.stage
        if stage is Stage.DATA:
            queue_id = context.message.queue_id if context.message is not None else "-"
            for hit in facts.hits:
                log.info("{qid}: {hit}", qid=queue_id, hit=hit)
            facts.hits = []
        todo = [
            (i, r)
            for i, r in enumerate(self.rules)
            if r.stage is stage and (facts.stop is None or i < facts.stop)
        ]
        if not todo:
            return ACCEPT
        env = Env(context, facts, self.is_local_domain, self.in_group)
        if stage is Stage.DATA and facts.content is None and any(r.content for _, r in todo):
            try:
                facts.content = self._scan(context)
            except Exception:
                log.failure(
                    "{qid}: the content scan failed: message deferred",
                    qid=context.message.queue_id if context.message else "-",
                )
                return Verdict.tempfail(R.LOCAL_ERROR)
        return self._evaluate(todo, 0, env, ACCEPT)

    def _scan(self, context: CheckContext) -> ContentFacts:
        assert context.message is not None
        with context.message.open_content() as f:
            raw = f.read(self.limits.max_scan + 1)
        return content_facts(raw, self.limits)

    def _evaluate(
        self, todo: list[tuple[int, Rule]], start: int, env: Env, verdict: Verdict
    ) -> Verdict | Deferred[Verdict]:
        for k in range(start, len(todo)):
            i, rule = todo[k]
            try:
                result = self._matches(rule, 0, env)
            except Exception:
                log.failure("rule {rule}: evaluation failed", rule=rule.name)
                return Verdict.tempfail(R.LOCAL_ERROR)
            if isinstance(result, Deferred):
                after: Deferred[Verdict] = result.addCallback(self._after, todo, k, env, verdict)
                d: Deferred[Verdict] = after.addErrback(self._failed, rule)
                return d
            if result:
                verdict, stop = self._hit(i, rule, env, verdict)
                if stop:
                    return verdict
        return verdict

    def _after(
        self, matched: bool, todo: list[tuple[int, Rule]], k: int, env: Env, verdict: Verdict
    ) -> Verdict | Deferred[Verdict]:
        if matched:
            i, rule = todo[k]
            verdict, stop = self._hit(i, rule, env, verdict)
            if stop:
                return verdict
        return self._evaluate(todo, k + 1, env, verdict)

    @staticmethod
    def _failed(failure: Failure, rule: Rule) -> Verdict:
        log.failure("rule {rule}: evaluation failed", failure, rule=rule.name)
        return Verdict.tempfail(R.LOCAL_ERROR)

    def _matches(self, rule: Rule, start: int, env: Env) -> Result:
        for j in range(start, len(rule.matches)):
            result = rule.matches[j].test(env)
            if isinstance(result, Deferred):
                rest: Deferred[bool] = result.addCallback(self._rest, rule, j + 1, env)
                return rest
            if not result:
                return False
        return True

    def _rest(self, ok: bool, rule: Rule, start: int, env: Env) -> Result:
        return self._matches(rule, start, env) if ok else False

    def _hit(self, i: int, rule: Rule, env: Env, verdict: Verdict) -> tuple[Verdict, bool]:
        context = env.context
        RULE_HITS.labels(rule.name, rule.action_label).inc()
        what = (
            f"rule {rule.name} hit at {context.stage.value}: {rule.action_label}"
            + (f" rcpt=<{context.recipient}>" if context.stage is Stage.RCPT else "")
            + f" from=<{context.sender}> client={context.client_ip or '-'}"
            + (f" user={context.user}" if context.user else "")
        )
        queue_id = context.message.queue_id if context.message is not None else None
        if queue_id is not None:
            log.info("{sid} {qid}: {what}", sid=context.session_id or "-", qid=queue_id, what=what)
        else:
            log.info("{sid} -: {what}", sid=context.session_id or "-", what=what)
            env.facts.hits.append(what)
        verdict = verdict.combine(rule.verdict)
        stop = rule.stop or verdict.is_final
        if rule.stop and context.stage is not Stage.RCPT:
            env.facts.stop = i
        return verdict, stop


def rules_check(
    path: str,
    is_local_domain: Callable[[str], bool],
    counter: Any = None,
    limits: ContentLimits = DEFAULT_CONTENT_LIMITS,
    channels: Sequence[str] | None = None,
    in_group: Callable[[str, tuple[str, ...]], bool] | None = None,
) -> RulesCheck:
    """The ``RulesCheck`` of the rules file ``path`` (RulesError when it has an error)."""
    if counter is not None and not IRateCounter.providedBy(counter):
        raise TypeError(f"{counter!r} does not provide IRateCounter")
    rules = load_rules(path, counter, channels)
    return RulesCheck(rules, is_local_domain, limits, in_group=in_group)
