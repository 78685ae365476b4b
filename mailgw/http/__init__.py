"""The ``http`` role on twisted.web: metrics (``/metrics``), health (``/healthz``, ``/readyz``),
and the tree other HTTP resources (admin API, webmail) are mounted in.

Layout:

- ``root.HTTPRoot`` (a twisted.web ``Resource``): the root of the site. Mount a resource
  with ONE call, guarded (admin token or allowed network) or not::

      http = node.parts["http"]                     # the role's part, an HTTPRole
      http.root.mount("/metrics", MetricsResource(...))                  # guarded
      http.root.mount("/webmail", WebmailResource(...), guarded=False)    # public

  Intermediate path segments are created as needed; mounting twice at a path is an error.
- ``guard.AdminGuard`` wraps a resource: a request passes with ``Authorization: Bearer
  TOKEN`` (the token of ``[http] admin_token_file``, compared with ``hmac.compare_digest``)
  from anywhere, or without a token from an ``[http] allow`` network; otherwise 401 (with
  ``WWW-Authenticate: Bearer``; a wrong token is ``error="invalid_token"``) when a token is
  configured, 403 when there is none. ``/metrics`` and ``/readyz`` are behind it;
  ``/healthz`` is not (it says only that the process runs).
- ``metrics``: ``/metrics`` in Prometheus text format from prometheus_client's default
  ``REGISTRY``; a collector adds the node's figures (queue by state, open connections, store
  bytes per tier, relay channel health) and the processes' own counters
  (``mailgw.runtime.metrics``: this process's plus every IMAP worker's, merged).
- ``health``: ``/healthz`` and ``/readyz`` (listeners, spool and store writable, free disk).
- ``api``: the admin and OA API (``/api/v1``, bearer tokens with scopes, the OpenAPI
  document at ``/api/openapi.json`` generated from its route table; ``docs/api.md``), message
  tracking (``GET /api/v1/tracking``) among its routes; with ``[api] enabled = no`` that route
  alone, for the admin token and the allowed networks.
- ``setup.build_http(node)``: the role's part (``HTTPRole``): root, listener factories and the
  service registering the collector while the role runs.

Imports: twisted.web, prometheus_client, ``mailgw.net``, ``mailgw.runtime``, ``mailgw.config``;
the node comes in as an argument (``mailgw.roles`` builds the role), never imported.
"""
