"""Mirror sync to a disaster-recovery node: the primary ships its change journal
(``mailgw.journal``) over TLS to the replica, which applies it with the same UIDs, modseqs,
flags and dates (``ship``, ``apply``, ``wire``, ``service``; ``docs/replication.md``)."""
