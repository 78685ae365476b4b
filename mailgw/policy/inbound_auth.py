"""Inbound sender authentication at the MX: SPF, DKIM, DMARC, DNSBL, and the verdict.

``InboundAuthCheck`` (``DATA``, anonymous sessions only: an authenticated user's mail is not
"inbound") evaluates, in a worker thread (``run``: lookups block), with the DNS servers of
``[inbound_auth] resolvers`` (dnspython, as the relay's MX lookups) and never the system's
when they are set:

- SPF (pyspf, RFC 7208) of the client address, ``MAIL FROM`` (``postmaster@HELO`` for the
  null sender) and HELO;
- DKIM (dkimpy): each ``DKIM-Signature`` (the first ``MAX_SIGNATURES``), one result each in
  the header; ``none`` without one;
- DMARC (authheaders, RFC 7489): the From domain's policy (or its organizational domain's
  ``sp``), passing when SPF passes for an aligned MAIL FROM domain or DKIM for an aligned
  ``d=`` of any passing signature (relaxed or strict as ``aspf``/``adkim`` say);
- DNSBL: the client address (reversed, nibbles for IPv6) under each ``dnsbl`` zone; an A
  record in 127.0.0.0/8 is a listing, except the error codes 127.255.255.0/24 (logged).

The results become one ``Authentication-Results`` header (RFC 8601, authres) with the
node's authserv-id, and a score (``*_score`` keys) that picks a band; the content score of
the reputation check (``mailgw.policy.reputation``, run before this one: its
``CONTENT_STATE`` entry of ``context.state``) is added to it:

- DMARC fails and the domain says ``p=reject`` (``dmarc_reject = yes``): ``550 5.7.1``;
- score >= ``reject_score``: ``550 5.7.1``;
- score >= ``quarantine_score``: quarantined (reason: the failed checks);
- score >= ``junk_score``, or DMARC fails with ``p=quarantine``: delivered to the
  recipient's Junk folder (``Verdict.file_into("Junk")``);
- otherwise delivered; in every accepted case with the Authentication-Results header.

A DNS server that does not answer makes the affected result ``temperror`` (scored 0: never
refused for our own resolver's trouble). The message is read whole for DKIM; a message
larger than ``max_size`` is not DKIM-checked (``dkim=policy``: too big).
"""

from __future__ import annotations

import functools
import importlib.resources
import ipaddress
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from email.utils import getaddresses
from typing import IO, Any

import authheaders
import authheaders.dmarc_lookup as _dmarc_lookup
import authres
import dkim
import dns.exception
import dns.name
import dns.nameserver
import dns.rdatatype
import dns.resolver
import spf
from authheaders import dmarc_per_from
from authheaders.dmarc_lookup import DMARCException
from authres.dmarc import DMARCAuthenticationResult
from twisted.internet.defer import Deferred
from twisted.logger import Logger
from zope.interface import implementer

from mailgw.mime.headers import parse_header_block, unfold
from mailgw.model.reply import Reply
from mailgw.model.verdict import Verdict
from mailgw.policy.pipeline import CheckContext, ICheck, Stage, VerdictResult

log = Logger(namespace="mailgw.policy.inbound_auth")

Runner = Callable[..., Deferred[Any]]

DMARC_REJECTED = "Message rejected: DMARC policy of {domain} (p=reject)"
AUTH_REJECTED = "Message rejected: sender authentication failed ({why})"
MAX_SIGNATURES = 5
"""DKIM signatures verified per message (a sender adding hundreds costs lookups)."""
MAX_SIZE = 50 * 1024 * 1024
"""Largest message read for DKIM (a larger one gets ``dkim=policy``)."""


# authheaders reads and parses the whole public suffix list (~270 ms) on each call of its
# ``get_org_domain`` (four or more per DMARC evaluation): parse it once, keep the answers.
_psl_lock = threading.Lock()
_psl: list[Any] = []


def _public_suffix_list() -> Any:
    with _psl_lock:
        if not _psl:
            from publicsuffix2 import PublicSuffixList

            try:
                from authheaders.findpsl import location  # a system list, when packaged so

                with open(location, encoding="utf-8") as f:
                    _psl.append(PublicSuffixList(f))
            except ModuleNotFoundError:
                ref = importlib.resources.files("authheaders") / "public_suffix_list.txt"
                with importlib.resources.as_file(ref) as path, open(path, encoding="utf-8") as f:
                    _psl.append(PublicSuffixList(f))
        return _psl[0]


@functools.lru_cache(maxsize=4096)
def org_domain(domain: str) -> str:
    """The organizational domain of ``domain`` (RFC 7489 3.2), as authheaders computes it."""
    return str(_public_suffix_list().get_public_suffix(domain))


_dmarc_lookup.get_org_domain = org_domain
authheaders.get_org_domain = org_domain


class DNSTempError(Exception):
    """The DNS server did not answer (timeout, SERVFAIL, refused)."""


def parse_nameserver(text: str) -> tuple[str, int]:
    """``address[:port]`` / ``[v6]:port`` (``[inbound_auth] resolvers``) -> (address, port)."""
    if text.startswith("["):
        host, _, rest = text[1:].partition("]")
        return host, int(rest[1:]) if rest.startswith(":") else 53
    if text.count(":") == 1:
        host, _, port = text.partition(":")
        return host, int(port)
    return text, 53


class DNS:
    """Blocking lookups (run them in a thread) with dnspython, at ``nameservers`` when given
    (``address[:port]``), else those of ``/etc/resolv.conf``."""

    def __init__(self, nameservers: Sequence[str] = (), timeout: float = 5.0) -> None:
        if nameservers:
            self.resolver = dns.resolver.Resolver(configure=False)
            self.resolver.nameservers = [
                dns.nameserver.Do53Nameserver(*parse_nameserver(ns)) for ns in nameservers
            ]
        else:
            self.resolver = dns.resolver.Resolver()
        self.resolver.lifetime = timeout
        self.resolver.timeout = timeout

    def query(self, name: str, rdtype: str) -> list[Any]:
        """The records (rdata) of ``name``; [] when it or the type does not exist;
        DNSTempError when no server answers."""
        try:
            answer = self.resolver.resolve(name, rdtype, search=False)
        except (dns.resolver.NXDOMAIN, dns.resolver.NoAnswer):
            return []
        except (dns.resolver.NoNameservers, dns.exception.Timeout) as e:
            raise DNSTempError(f"{name}/{rdtype}: {e}") from None
        except (dns.name.NameTooLong, dns.name.EmptyLabel, dns.name.LabelTooLong):
            return []
        return list(answer)

    def txt(self, name: str) -> list[bytes]:
        """Each TXT record of ``name``, its strings joined."""
        return [b"".join(r.strings) for r in self.query(name, "TXT")]

    # -- the lookup functions the libraries take ------------------------------------------

    def dkim_txt(self, name: bytes | str, timeout: float = 5) -> bytes | None:
        """dkimpy's ``dnsfunc``: the first TXT record of ``name`` (bytes), None if none."""
        text = name.decode("ascii", "replace") if isinstance(name, bytes) else name
        try:
            records = self.txt(text)
        except DNSTempError as e:
            raise dkim.DnsTimeoutError(str(e)) from None
        return records[0] if records else None

    def dmarc_txt(self, name: str) -> str | None:
        """authheaders' ``dnsfunc``: the DMARC record at ``name`` (text), None if none."""
        records = [r.decode("utf-8", "replace") for r in self.txt(name)]
        dmarc = [r for r in records if r.startswith("v=DMARC1")]
        if len(dmarc) > 1:
            return None  # RFC 7489 6.6.3: several records are no record
        return dmarc[0] if dmarc else (records[0] if records else None)


class _SPFQuery(spf.query):  # type: ignore[misc]  # pyspf: untyped
    """pyspf's query with its lookups going to our ``DNS`` (its own use the system's)."""

    def __init__(self, lookup: DNS, *args: Any, **kwargs: Any) -> None:
        self._lookup = lookup
        self._answers: dict[tuple[str, str], list[Any]] = {}
        super().__init__(*args, **kwargs)

    def dns(
        self, name: str, qtype: str, cnames: Any = None, ignore_void: bool = False
    ) -> list[Any]:
        """pyspf's lookup: the values of ``name``/``qtype`` (CNAMEs followed by dnspython),
        cached for this check; void lookups counted (RFC 7208 4.6.4)."""
        name = str(name).rstrip(".").lower()
        if not name or not all(0 < len(x) < 64 for x in name.split(".")):
            return []
        key = (name, qtype)
        if key in self._answers:
            return self._answers[key]
        try:
            records = self._lookup.query(name, qtype)
        except DNSTempError as e:
            raise spf.TempError(f"DNS {e}") from None
        if qtype in ("A", "AAAA"):
            result: list[Any] = [r.address for r in records]
        elif qtype == "MX":
            result = [(r.preference, r.exchange.to_text(True)) for r in records]
        elif qtype == "PTR":
            result = [r.target.to_text(True) for r in records]
        else:  # TXT, SPF
            result = [tuple(r.strings) for r in records]
        self._answers[key] = result
        if not result and not ignore_void:
            self.void_lookups += 1
            if self.void_lookups > spf.MAX_VOID_LOOKUPS:
                raise spf.PermError(f"Void lookup limit of {spf.MAX_VOID_LOOKUPS} exceeded")
        return result


def dnsbl_name(ip: str, zone: str) -> str | None:
    """The name to look up for ``ip`` in ``zone`` (None for a bad address)."""
    try:
        address = ipaddress.ip_address(ip)
    except ValueError:
        return None
    if address.version == 4:
        labels = str(address).split(".")[::-1]
    else:
        labels = list(address.exploded.replace(":", ""))[::-1]
    return ".".join(labels) + "." + zone


@dataclass
class Scores:
    """How much each failure counts (``[inbound_auth] *_score``) and the bands."""

    spf_fail: float = 3
    spf_softfail: float = 1
    dkim_fail: float = 2
    dmarc_fail: float = 3
    dnsbl: float = 5
    junk: float = 3
    quarantine: float = 6
    reject: float = 10


@dataclass
class AuthResults:
    """What one message's evaluation found."""

    spf: str = "none"
    spf_reason: str = ""
    dkim: str = "none"
    dkim_domain: str = ""
    dmarc: str = "none"
    dmarc_policy: str = ""
    from_domain: str = ""
    dnsbl: list[str] = field(default_factory=list)
    header: str = ""
    """The Authentication-Results value (without the field name)."""

    def score(self, scores: Scores) -> tuple[float, list[str]]:
        """The total and what counted (for the quarantine reason and the log)."""
        parts: list[tuple[float, str]] = []
        if self.spf == "fail":
            parts.append((scores.spf_fail, "spf=fail"))
        elif self.spf == "softfail":
            parts.append((scores.spf_softfail, "spf=softfail"))
        if self.dkim in ("fail", "neutral", "permerror"):
            parts.append((scores.dkim_fail, f"dkim={self.dkim}"))
        if self.dmarc == "fail":
            parts.append((scores.dmarc_fail, f"dmarc=fail (p={self.dmarc_policy or 'none'})"))
        for zone in self.dnsbl:
            parts.append((scores.dnsbl, f"listed in {zone}"))
        counted = [(s, why) for s, why in parts if s > 0]
        return sum(s for s, _ in counted), [why for _, why in counted]


def _from_domains(message: bytes) -> list[str]:
    """The domains of the From field(s) of ``message``'s header section."""
    end = message.find(b"\r\n\r\n")
    head = message[: end + 2] if end >= 0 else message
    block = parse_header_block(head, 0, len(head), 1000)
    values = [unfold(f.value).decode("utf-8", "replace") for f in block.fields if f.key == b"from"]
    return [a.rpartition("@")[2].strip().lower().rstrip(".") for _, a in getaddresses(values)]


class Authenticator:
    """SPF, DKIM, DMARC and DNSBL evaluation of one message (blocking: run in a thread)."""

    def __init__(
        self,
        lookup: DNS,
        authserv_id: str,
        dnsbl: Sequence[str] = (),
        max_size: int = MAX_SIZE,
    ) -> None:
        self.lookup = lookup
        self.authserv_id = authserv_id
        self.dnsbl = tuple(dnsbl)
        self.max_size = max_size

    def spf(self, ip: str, sender: str, helo: str) -> tuple[str, str]:
        """(result, explanation); ``none`` when there is nothing to check."""
        if not ip or not (sender or helo):
            return "none", "no sender"
        try:
            result, _code, why = _SPFQuery(self.lookup, i=ip, s=sender, h=helo, timeout=20).check()
        except spf.TempError as e:
            return "temperror", str(e)
        except (spf.PermError, ValueError, IndexError, TypeError, UnicodeError) as e:
            return "permerror", str(e)  # PermError; the others: pyspf on hostile input
        return str(result), str(why)

    def dkim(self, message: bytes) -> list[tuple[str, str]]:
        """(result, d= domain) of each DKIM-Signature (the first ``MAX_SIGNATURES``);
        [] without one; one ``permerror`` when the header section cannot be parsed."""
        try:
            verifier = dkim.DKIM(message)
        except (dkim.DKIMException, IndexError, ValueError):
            end = message.find(b"\r\n\r\n")
            signed = b"dkim-signature:" in message[: end if end >= 0 else None].lower()
            return [("permerror", "")] if signed else []
        count = sum(1 for name, _ in verifier.headers if name.lower() == b"dkim-signature")
        out = []
        for idx in range(min(count, MAX_SIGNATURES)):
            try:
                ok = verifier.verify(idx=idx, dnsfunc=self.lookup.dkim_txt)
                result = "pass" if ok else "fail"
            except dkim.DnsTimeoutError:
                result = "temperror"
            except (dkim.DKIMException, IndexError, ValueError, TypeError):
                result = "fail"
            out.append((result, _d_tag(verifier)))
            verifier.signature_fields = {}  # not carried over to the next signature
        return out

    def dmarc(
        self,
        from_domain: str,
        spf_result: authres.SPFAuthenticationResult,
        dkim_result: authres.DKIMAuthenticationResult,
    ) -> tuple[str, str]:
        """(result, policy) of ``from_domain``."""
        if not from_domain:
            return "none", ""
        try:
            result, _comment, _domain, policy = dmarc_per_from(
                from_domain, spf_result, dkim_result, dnsfunc=self.lookup.dmarc_txt
            )
        except DNSTempError:
            return "temperror", ""
        except (DMARCException, ValueError, IndexError, TypeError, UnicodeError):
            return "permerror", ""
        return str(result), str(policy or "")

    def listed(self, ip: str) -> list[str]:
        """The DNSBL zones listing ``ip`` (a lookup that fails counts as not listed)."""
        out = []
        for zone in self.dnsbl:
            name = dnsbl_name(ip, zone)
            if name is None:
                continue
            try:
                answers = self.lookup.query(name, "A")
            except DNSTempError as e:
                log.warn("DNSBL {zone} did not answer: {e}", zone=zone, e=str(e))
                continue
            codes = [ipaddress.ip_address(r.address) for r in answers]
            if any(c in _ERROR_CODES for c in codes):
                log.warn("DNSBL {zone} refused the query ({codes})", zone=zone, codes=codes)
                continue
            if any(c in _LOOPBACK_NET for c in codes):
                out.append(zone)
        return out

    def evaluate(self, message: bytes, ip: str, sender: str, helo: str) -> AuthResults:
        out = AuthResults()
        out.spf, out.spf_reason = self.spf(ip, sender, helo)
        mailfrom = sender or (f"postmaster@{helo}" if helo else "")
        identities = {"smtp_mailfrom": mailfrom, "smtp_helo": helo}
        identities = {k: v for k, v in identities.items() if v}

        def spf_result() -> authres.SPFAuthenticationResult:
            # A new one each time: dmarc_per_from rewrites its smtp_mailfrom to the domain.
            return authres.SPFAuthenticationResult(result=out.spf, **identities)

        results: list[Any] = [spf_result()]
        if len(message) > self.max_size:
            out.dkim = "policy"
            dkim_results = [
                authres.DKIMAuthenticationResult(
                    result="policy", result_comment="message too big to verify"
                )
            ]
        else:
            signatures = self.dkim(message)
            passed = [d for r, d in signatures if r == "pass"]
            if passed:
                out.dkim, out.dkim_domain = "pass", passed[0]
            elif signatures:
                out.dkim, out.dkim_domain = signatures[0]
            dkim_results = [
                authres.DKIMAuthenticationResult(result=r, header_d=d or None)
                for r, d in signatures
            ] or [authres.DKIMAuthenticationResult(result="none")]
        results.extend(dkim_results)
        domains = _from_domains(message)
        out.from_domain = domains[0] if len(domains) == 1 else ""
        if len(domains) == 1:
            # Any passing signature may be the aligned one: the first that makes DMARC pass.
            candidates = [r for r in dkim_results if r.result == "pass"] or dkim_results[:1]
            for dkim_result in candidates:
                out.dmarc, out.dmarc_policy = self.dmarc(out.from_domain, spf_result(), dkim_result)
                if out.dmarc == "pass":
                    break
        else:
            out.dmarc = "none" if not domains else "permerror"
        results.append(
            DMARCAuthenticationResult(
                result=out.dmarc,
                header_from=out.from_domain or None,
                policy=out.dmarc_policy.upper() or None,
            )
        )
        out.dnsbl = self.listed(ip)
        header = authres.AuthenticationResultsHeader(authserv_id=self.authserv_id, results=results)
        value = str(header).partition(":")[2].strip()
        out.header = " ".join(value.split())  # one line; the store folds nothing
        return out


_LOOPBACK_NET = ipaddress.ip_network("127.0.0.0/8")
_ERROR_CODES = ipaddress.ip_network("127.255.255.0/24")
"""DNSBL answers that are errors, not listings (Spamhaus: 127.255.255.252-255, e.g. a query
through a public resolver)."""


def _d_tag(verifier: Any) -> str:
    d = verifier.signature_fields.get(b"d", b"") if verifier.signature_fields else b""
    return bytes(d).decode("ascii", "replace").lower()


CONTENT_STATE = "content-score"
"""The ``context.state`` key under which a content check leaves ``(score, [what counted])``
for the band (``mailgw.policy.reputation``)."""


def decide(
    results: AuthResults,
    scores: Scores,
    dmarc_reject: bool = True,
    content: tuple[float, list[str]] | None = None,
) -> Verdict:
    """The band of ``results`` plus the ``content`` score (see the module docstring)."""
    header = Verdict.add_headers(("Authentication-Results", results.header))
    if results.dmarc == "fail" and results.dmarc_policy == "reject" and dmarc_reject:
        text = DMARC_REJECTED.format(domain=results.from_domain)
        return Verdict.reject(Reply(550, "5.7.1", text))
    score, why = results.score(scores)
    if content is not None and content[0] > 0:
        score += content[0]
        why = [*why, f"content score {content[0]:g}"]
    if scores.reject and score >= scores.reject:
        return Verdict.reject(Reply(550, "5.7.1", AUTH_REJECTED.format(why=", ".join(why))))
    if scores.quarantine and score >= scores.quarantine:
        reason = f"sender authentication: score {score:g} ({', '.join(why)})"
        return header.combine(Verdict.quarantine(reason))
    junk = results.dmarc == "fail" and results.dmarc_policy == "quarantine"
    if junk or (scores.junk and score >= scores.junk):
        return header.combine(Verdict.file_into("Junk"))
    return header


def outcome(verdict: Verdict) -> str:
    """What a band decided, for the log."""
    if verdict.reply is not None:
        return verdict.reply.format()
    if verdict.is_quarantined:
        return f"quarantined: {verdict.reason}"
    if verdict.folder:
        return f"filed into {verdict.folder}"
    return "delivered"


@implementer(ICheck)
class InboundAuthCheck:
    """``DATA``: authenticate an anonymous session's message (see the module docstring)."""

    name = "inbound-auth"
    stages = frozenset({Stage.DATA})

    def __init__(
        self,
        authenticator: Authenticator,
        run: Runner,
        scores: Scores | None = None,
        dmarc_reject: bool = True,
    ) -> None:
        self.authenticator = authenticator
        self.run = run
        self.scores = scores or Scores()
        self.dmarc_reject = dmarc_reject

    def _evaluate(self, content: IO[bytes], ip: str, sender: str, helo: str) -> AuthResults:
        with content:
            message = content.read(self.authenticator.max_size + 1)
        return self.authenticator.evaluate(message, ip, sender, helo)

    def check(self, context: CheckContext) -> VerdictResult:
        if context.user is not None:
            return Verdict.accept()

        assert context.message is not None
        queue_id = str(context.message.queue_id)

        def decided(results: AuthResults) -> Verdict:
            content = context.state.get(CONTENT_STATE)
            verdict = decide(results, self.scores, self.dmarc_reject, content)
            log.info(
                "{sid} {qid}: {results} dnsbl={dnsbl}: {outcome}",
                sid=context.session_id,
                qid=queue_id,
                results=results.header,
                dnsbl=",".join(results.dnsbl) or "-",
                outcome=outcome(verdict),
            )
            return verdict

        content = context.message.open_content()  # opened here, read in the worker thread
        d: Deferred[Verdict] = self.run(
            self._evaluate, content, context.client_ip, context.sender, context.helo
        ).addCallback(decided)
        return d
