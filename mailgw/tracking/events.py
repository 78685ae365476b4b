"""The kinds of message events and what each one's detail holds."""

from __future__ import annotations

import enum


class Kind(enum.StrEnum):
    """One step of a message. Detail keys (all optional) by kind:

    - ``received``: role (mx, submission, webmail, dsn), client, helo, user, session, tls,
      sender, recipients, size;
    - ``policy``: verdicts, a list of {stage, check, verdict, recipient, reply, reason};
    - ``queued``: handed to the relay's queue: recipients;
    - ``delivered``: to a local mailbox: recipient, user, folder, uid;
    - ``relayed``: recipient, channel, mx, reply, tls, source;
    - ``attempt``: a relay attempt that failed through a channel (result ``channel-failure``:
      the recipient goes on to the next channel, or is deferred): the same keys;
    - ``deferred``: by local delivery (channel ``local``) or the relay: reason, next_try,
      attempts, recipients, channel;
    - ``bounced``: recipients, reason, dsn (the DSN's queue ID; '' for a null sender);
    - ``expired``: the relay gave up (age, recipients);
    - ``rejected``: a check refused the transaction or a recipient (role, stage, check,
      reply, client, sender, recipients); filed under ``session:SID`` before DATA;
    - ``deleted``: by an administrator (``mailgw queue delete``): by;
    - ``replicated``, ``read``: reserved for the replication and access paths.
    """

    RECEIVED = "received"
    POLICY = "policy"
    QUEUED = "queued"
    DELIVERED = "delivered"
    RELAYED = "relayed"
    ATTEMPT = "attempt"
    DEFERRED = "deferred"
    BOUNCED = "bounced"
    EXPIRED = "expired"
    DELETED = "deleted"
    REJECTED = "rejected"
    REPLICATED = "replicated"
    READ = "read"
