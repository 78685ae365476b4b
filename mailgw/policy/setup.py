"""What a node's policy is made of: the quarantine store and the checks each role adds.

``build_policy`` is called once per node (``mailgw.service``); the MX role runs its own
checks (``mailgw.policy.mx``) then ``inbound``, the submission role (and the submit path of
the webmail and the OA API) its own (``mailgw.policy.submission``) then ``outbound``. A new
check (rules, antivirus, reputation) is appended to the lists here, cheap ones first: the
rules, the header hygiene (``mailgw.policy.hygiene``: forged
``Authentication-Results`` and ``X-Virus-Scanned`` removed), the reputation checks.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any

from twisted.logger import Logger

from mailgw.config import ConfigError
from mailgw.policy.content import ContentLimits
from mailgw.policy.pipeline import ICheck
from mailgw.policy.quarantine import QuarantineStore
from mailgw.policy.ratelimit import MemoryRateCounter
from mailgw.policy.rules import RulesCheck, RulesError, load_rules
from mailgw.runtime.threads import Runner, run_inline

log = Logger(namespace="mailgw.policy")


@dataclass
class PolicySetup:
    """The node's quarantine and the checks its SMTP roles run after their own."""

    quarantine: QuarantineStore
    inbound: list[ICheck] = field(default_factory=list)
    """Checks of the MX role (mail arriving for local users)."""
    outbound: list[ICheck] = field(default_factory=list)
    """Checks of submission, webmail and the OA API (mail users send)."""
    rules: RulesCheck | None = None
    """The security rules (``[policy] rules_file``), in both lists; None without a file."""
    reputation: Any = None
    """The ``ReputationService`` (``[reputation] enabled``), its checks in both lists."""

    rate_counter: Any = None
    """The ``IRateCounter`` of the rules' ``rate`` matches (kept across reloads)."""

    def _load(self, config: Any) -> list[Any] | None:
        if self.rules is None:
            return None
        return read_rules(config, self.rate_counter)

    def check(self, config: Any) -> None:
        """Refuse a reload whose rules file has an error (the running rules stay)."""
        self._load(config)

    def reconfigure(self, config: Any) -> None:
        """Re-read the rules file on reload (SIGHUP, ``mailgw reload``, the admin API's
        ``PUT /api/v1/rules``, a pushed unified config); no file: no rules."""
        rules = self._load(config)
        if rules is not None and self.rules is not None:
            self.rules.replace(rules)
            log.info(
                "security rules: {n} from {path} (reloaded)",
                n=len(rules),
                path=config.policy.rules_file or "-",
            )


def quarantine_dir(data_dir: str) -> str:
    """Where the quarantine store lives (``data_dir/quarantine``)."""
    return os.path.join(data_dir, "quarantine")


def content_limits(config: Any) -> ContentLimits:
    """The content scan's bounds from ``[policy]``."""
    p = config.policy
    return ContentLimits(
        max_scan=p.max_scan_size,
        max_parts=p.max_parts,
        max_depth=p.max_depth,
        max_zip_members=p.max_zip_members,
    )


def build_policy(
    config: Any,
    directory: Any,
    clock: Any,
    run: Runner = run_inline,
    rate_counter: Any = None,
) -> PolicySetup:
    """The policy of a node with ``config`` (a ``mailgw.config.Config``): the quarantine
    store, and the security rules of ``[policy] rules_file`` first in both directions (a
    rules file with an error stops start-up: ``ConfigError`` holding ``file:line: ...``).
    ``rate_counter``: the ``IRateCounter`` of ``rate`` matches (default: in memory)."""
    quarantine = QuarantineStore(quarantine_dir(config.server.data_dir), run=run, clock=clock)
    setup = PolicySetup(quarantine)
    counter = rate_counter if rate_counter is not None else MemoryRateCounter(clock)
    setup.rate_counter = counter
    rules = read_rules(config, counter)
    # Always there (empty without a file), at every stage: a reload or a pushed unified
    # config may bring rules later, at any stage.
    check = RulesCheck(
        rules,
        directory.is_local_domain,
        content_limits(config),
        every_stage=True,
        in_group=directory.in_group,
    )
    setup.rules = check
    setup.inbound.append(check)
    setup.outbound.append(check)
    if config.policy.rules_file:
        log.info("security rules: {n} from {path}", n=len(rules), path=config.policy.rules_file)
    from mailgw.policy.hygiene import HeaderHygieneCheck

    # When we write Authentication-Results or X-Virus-Scanned ourselves, nobody else may.
    if config.inbound_auth.enabled or config.antivirus.enabled or config.reputation.enabled:
        authserv_id = config.inbound_auth.authserv_id or config.server.hostname
        setup.inbound.append(HeaderHygieneCheck(authserv_id, inbound=True))
        setup.outbound.append(HeaderHygieneCheck(authserv_id, inbound=False))
    if config.reputation.enabled:
        from mailgw.policy.reputation import build_reputation

        service = setup.reputation = build_reputation(config, clock, run, counter)
        setup.inbound.extend(service.checks("inbound"))
        setup.outbound.extend(service.checks("outbound"))
        r = config.reputation
        log.info(
            "reputation: spam_threshold={t:g} spam_action={a} rspamd={r}",
            t=r.spam_threshold,
            a=r.spam_action,
            r=r.rspamd or "-",
        )
    return setup


def read_rules(config: Any, counter: Any) -> list[Any]:
    """The rules of ``[policy] rules_file`` (none without one); ``ConfigError`` holding
    ``file:line: ...`` when the file has an error."""
    path = config.policy.rules_file
    if not path:
        return []
    channels = [c.name for c in config.channels] or ["direct"]
    try:
        return load_rules(path, counter, channels)
    except RulesError as e:
        raise ConfigError(config.path, "policy", "rules_file", str(e)) from None
