"""The CAC reputation service (``[reputation]``): content score, spam class, sender standing.

``standing`` (the arithmetic), ``store`` (``IReputationStore``: memory, SQLite), ``heuristics``
(the built-in content score), ``rspamd`` (the optional ``/checkv2`` scorer), ``service``
(``ReputationService`` and its checks). ``build_reputation`` makes a node's service.
"""

from __future__ import annotations

from typing import Any

from mailgw.policy.inbound_auth import Scores
from mailgw.policy.reputation.service import (
    ReputationService,
    limits_from_config,
    settings_from_config,
)
from mailgw.policy.reputation.store import (
    SQLiteReputationStore,
    ThreadedReputationStore,
    store_path,
)

__all__ = ["ReputationService", "build_reputation"]


def build_reputation(config: Any, clock: Any, run: Any, rate_counter: Any) -> ReputationService:
    """The reputation service of a node with ``config``: the SQLite store in ``data_dir``
    used through ``run`` (the I/O pool)."""
    limits = limits_from_config(config.reputation)
    store = ThreadedReputationStore(
        SQLiteReputationStore(store_path(config.server.data_dir), limits), run
    )
    ia = config.inbound_auth
    bands = None
    if not ia.enabled:
        bands = Scores(junk=ia.junk_score, quarantine=ia.quarantine_score, reject=ia.reject_score)
    return ReputationService(
        store,
        clock,
        run,
        rate_counter,
        limits,
        settings_from_config(config),
        authserv_id=(ia.authserv_id or config.server.hostname).lower(),
        inbound_bands=bands,
        reactor=clock,
    )
