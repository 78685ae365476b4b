"""The inbound (MX) checks: mail for existing local recipients only, no relaying.

Recipient local parts are never interpreted for routing (``%``, ``!``, quoted ``@``): they
are looked up as they are, so such forms are unknown users (``550 5.1.1``); a foreign domain
is refused (``550 5.7.1``) whatever source route preceded it.
"""

from __future__ import annotations

from collections.abc import Callable

from zope.interface import implementer

from mailgw.interfaces import IDirectory
from mailgw.model.reply import R, Reply
from mailgw.model.verdict import ACCEPT, Verdict
from mailgw.policy.pipeline import CheckContext, ICheck, Stage
from mailgw.policy.submission import RecipientLimit


@implementer(ICheck)
class LocalRecipient:
    """``RCPT``: the recipient's domain is local (else ``550 5.7.1`` relaying denied) and
    the directory resolves it (else ``550 5.1.1``)."""

    name = "local-recipient"
    stages = frozenset({Stage.RCPT})

    def __init__(self, directory: IDirectory) -> None:
        self.directory = directory

    def check(self, context: CheckContext) -> Verdict:
        recipient = context.recipient
        assert recipient is not None
        if not self.directory.is_local_domain(recipient.domain):
            return _RELAY_DENIED
        if not self.directory.resolve(recipient.key):
            return _UNKNOWN_USER
        return ACCEPT


@implementer(ICheck)
class StoreWritable:
    """``RCPT``: ``451 4.3.2`` while the store refuses new mail (a DR replica: the mail
    goes to the primary, or waits at the sender until this node is promoted)."""

    name = "store-writable"
    stages = frozenset({Stage.RCPT})

    def __init__(self, refusal: Callable[[], str | None]) -> None:
        self.refusal = refusal

    def check(self, context: CheckContext) -> Verdict:
        reason = self.refusal()
        if reason is None:
            return ACCEPT
        return Verdict.tempfail(Reply(451, "4.3.2", f"{reason}, try again later"))


_RELAY_DENIED = Verdict.reject(R.RELAY_DENIED)
_UNKNOWN_USER = Verdict.reject(R.UNKNOWN_USER)


def mx_checks(directory: IDirectory, max_recipients: int) -> list[ICheck]:
    """The MX role's checks, in order: recipient count, then local recipient."""
    return [RecipientLimit(lambda: max_recipients), LocalRecipient(directory)]
