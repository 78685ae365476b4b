"""Smart DNS: the ``dns`` role, authoritative for the mail zones, answering MX and A/AAAA with
the MX gateway set of the querier's region (the seed's inbound flow: overseas senders reach
the overseas MX gateways, domestic senders the domestic ones).

- ``regions``: the zone data built from ``[dns]`` and ``[dns_region:NAME]`` (``ZoneData``) and
  the querier -> region match (``RegionMap``: longest prefix of the configured networks);
- ``responder``: one query's bytes -> the answer's bytes (``Responder``), with twisted.names'
  wire format and dnspython's EDNS Client Subnet (RFC 7871) option parser;
- ``server``: the UDP and TCP protocols, their listeners, and the role's part (``DNSRole``,
  reloadable through ``reconfigure(config)``).

Imports: ``config``, ``net`` (listeners, connection counter), twisted.names, dnspython,
prometheus_client; nothing imports it but ``mailgw.roles``.
"""
