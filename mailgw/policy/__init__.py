"""Message policy, independent of any protocol: checks run by stage returning ``Verdict``s
(``pipeline``), the submission rules and header completion (``submission``), the inbound
rules (``mx``) and the submit path for non-SMTP senders (``submit``).

Imports: ``mailgw.model``, ``mailgw.interfaces``, ``mailgw.mime`` and Twisted; never a
protocol package (``mailgw.smtp``, ``mailgw.imap``, ...). Protocols import this package.
"""

from mailgw.model.verdict import Disposition, Verdict
from mailgw.policy.pipeline import CheckContext, ICheck, Pipeline, Stage, refusal_at_end

__all__ = [
    "CheckContext",
    "Disposition",
    "ICheck",
    "Pipeline",
    "Stage",
    "Verdict",
    "refusal_at_end",
]
