"""What a node's policy is made of: the quarantine store and the checks each role adds.

``build_policy`` is called once per node (``mailgw.service``); the MX role runs its own
checks (``mailgw.policy.mx``) then ``inbound``, the submission role (and the submit path of
the webmail and the OA API) its own (``mailgw.policy.submission``) then ``outbound``. A new
check (rules, antivirus, reputation) is appended to the lists here, cheap ones first.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any

from mailgw.policy.pipeline import ICheck
from mailgw.policy.quarantine import QuarantineStore
from mailgw.runtime.threads import Runner, run_inline


@dataclass
class PolicySetup:
    """The node's quarantine and the checks its SMTP roles run after their own."""

    quarantine: QuarantineStore
    inbound: list[ICheck] = field(default_factory=list)
    """Checks of the MX role (mail arriving for local users)."""
    outbound: list[ICheck] = field(default_factory=list)
    """Checks of submission, webmail and the OA API (mail users send)."""


def quarantine_dir(data_dir: str) -> str:
    """Where the quarantine store lives (``data_dir/quarantine``)."""
    return os.path.join(data_dir, "quarantine")


def build_policy(config: Any, directory: Any, clock: Any, run: Runner = run_inline) -> PolicySetup:
    """The policy of a node with ``config`` (a ``mailgw.config.Config``)."""
    quarantine = QuarantineStore(quarantine_dir(config.server.data_dir), run=run, clock=clock)
    return PolicySetup(quarantine)
