"""The antivirus check: the received message scanned by clamd at the end of DATA.

``AntivirusCheck`` (``DATA``) sends the message as received (``open_content()``, before the
250) to a ``ClamdPool``:

- a virus: ``554 5.7.0 Message rejected: virus found: NAME`` (inbound and submission);
- clean: an ``X-Virus-Scanned: clamav`` header;
- no clamd reachable or answering in time, clamd refusing the stream (its
  ``StreamMaxLength``), or a message larger than ``max_scan_size`` (not sent at all: clamd
  would refuse it): ``on_failure = tempfail`` answers ``451 4.7.0`` (the client retries),
  ``on_failure = accept`` takes the message with ``X-Virus-Scanned: skipped``.
"""

from __future__ import annotations

from twisted.internet.defer import Deferred
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from mailgw.model.reply import Reply
from mailgw.model.verdict import Verdict
from mailgw.policy.clamd import ClamdError, ClamdPool, ClamdUnavailable, ScanResult
from mailgw.policy.pipeline import CheckContext, ICheck, Stage, VerdictResult

log = Logger(namespace="mailgw.policy.antivirus")

SCAN_UNAVAILABLE = Reply(451, "4.7.0", "Virus scan unavailable, try again later")
SCANNED = Verdict.add_headers(("X-Virus-Scanned", "clamav"))
SKIPPED = Verdict.add_headers(("X-Virus-Scanned", "skipped"))


def infected(virus: str) -> Verdict:
    """The refusal of a message carrying ``virus``."""
    name = "".join(c if 32 < ord(c) < 127 else "?" for c in virus)[:200]
    return Verdict.reject(Reply(554, "5.7.0", f"Message rejected: virus found: {name}"))


@implementer(ICheck)
class AntivirusCheck:
    """``DATA``: scan the message with clamd (see the module docstring)."""

    name = "antivirus"
    stages = frozenset({Stage.DATA})

    def __init__(self, pool: ClamdPool, on_failure: str = "tempfail", max_scan_size: int = 0):
        if on_failure not in ("tempfail", "accept"):
            raise ValueError(f"on_failure must be tempfail or accept, not {on_failure!r}")
        self.pool = pool
        self.on_failure = on_failure
        self.max_scan_size = max_scan_size
        """Largest message sent to clamd (its StreamMaxLength); 0: no limit here."""

    def failed(self, context: CheckContext, why: str) -> Verdict:
        log.warn("{sid}: virus scan failed: {why}", sid=context.session_id, why=why)
        if self.on_failure == "accept":
            return SKIPPED
        return Verdict.tempfail(SCAN_UNAVAILABLE)

    def check(self, context: CheckContext) -> VerdictResult:
        message = context.message
        assert message is not None
        size = int(message.size)
        if self.max_scan_size and size > self.max_scan_size:
            return self.failed(context, f"{size} bytes is over max_scan_size")

        def scanned(result: ScanResult) -> Verdict:
            if result.clean:
                return SCANNED
            log.info(
                "{sid}: virus {virus} found by clamd {server}",
                sid=context.session_id,
                virus=result.virus,
                server=result.server,
            )
            return infected(result.virus or "unknown")

        def error(f: Failure) -> Verdict | Failure:
            if f.check(ClamdUnavailable, ClamdError):
                return self.failed(context, f.getErrorMessage())
            return f

        d: Deferred[Verdict] = self.pool.scan(message.open_content).addCallbacks(scanned, error)
        return d
