"""Header hygiene at the end of DATA: trace fields a sender must not write are removed.

``HeaderHygieneCheck`` answers ``Verdict.remove_headers``: the received message's
``Authentication-Results`` fields claiming our authserv-id (RFC 8601 section 5) and, inbound,
the sender's ``X-Virus-Scanned`` fields, taken out before ours are added
(``mailgw.policy.apply``). ``mailgw.policy.setup`` adds it whenever ``[inbound_auth]``,
``[antivirus]`` or ``[reputation]`` is on (the features that write those fields).
"""

from __future__ import annotations

from zope.interface import implementer

from mailgw.model.verdict import ACCEPT, Verdict
from mailgw.policy.pipeline import CheckContext, ICheck, Stage, VerdictResult


@implementer(ICheck)
class HeaderHygieneCheck:
    """``DATA``: the received message's ``Authentication-Results`` fields claiming our
    authserv-id, and inbound the sender's ``X-Virus-Scanned`` fields, are removed before
    ours are added (see the module docstring)."""

    name = "header-hygiene"
    stages = frozenset({Stage.DATA})

    def __init__(self, authserv_id: str, inbound: bool) -> None:
        fields = [("Authentication-Results", authserv_id.lower())] if authserv_id else []
        if inbound:
            fields.append(("X-Virus-Scanned", ""))
        self.verdict = Verdict.remove_headers(*fields) if fields else ACCEPT

    def check(self, context: CheckContext) -> VerdictResult:
        return self.verdict
