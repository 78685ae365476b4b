"""The admin and OA API of the http role: ``/api/v1`` (JSON, bearer tokens with scopes) and
``/api/openapi.json``.

- ``tokens``: the token store (``mailgw token create|list|revoke``), hashed in SQLite;
- ``router``: ``Route``, the dispatching resource (auth, scopes, JSON validation, errors)
  and the OpenAPI document generated from the route table;
- ``endpoints``: ``AdminAPI`` and its route table over the node's parts;
- ``tracking``: the ``GET /api/v1/tracking`` route (message timelines, ``mailgw.tracking``);
- ``mount_api(node, root, admin_token)``: mounts it on the http role's root;
  ``mount_tracking(node, root, admin_token)``: only ``GET /api/v1/tracking`` (``[api]`` off).
"""

from __future__ import annotations

from typing import Any

API_VERSION = "1.0.0"


def mount_api(node: Any, root: Any, admin_token: bytes | None) -> Any:
    """Mount ``/api/v1`` and ``/api/openapi.json`` on ``root`` (an ``HTTPRoot``); returns
    the ``ApiResource``."""
    from mailgw.http.api.endpoints import AdminAPI
    from mailgw.http.api.router import ApiResource, Authenticator, OpenAPIResource, openapi
    from mailgw.http.api.tokens import TokenStore, token_path

    config = node.config
    tokens = TokenStore(token_path(config.server.data_dir))
    routes = AdminAPI(node).routes()
    auth = Authenticator(tokens, admin_token, root.access.allow)
    api = ApiResource(routes, auth, node.run_io, config.api.max_body_size)
    root.mount("/api/v1", api, guarded=False)
    root.mount(
        "/api/openapi.json",
        OpenAPIResource(openapi(routes, f"mailgw ({config.server.hostname})", API_VERSION)),
        guarded=False,
    )
    return api


def mount_tracking(node: Any, root: Any, admin_token: bytes | None) -> Any:
    """With ``[api] enabled = no`` and ``[tracking] record = yes``: ``/api/v1`` with the
    tracking route alone, for the ``[http] admin_token_file`` token and the ``[http] allow``
    networks (no stored token: the API is off; no OpenAPI document). Returns the
    ``ApiResource``."""
    from mailgw.http.api.router import ApiResource, Authenticator
    from mailgw.http.api.tracking import tracking_route

    routes = [tracking_route(node.tracker.path)]
    api = ApiResource(routes, Authenticator(None, admin_token, root.access.allow), node.run_io, 0)
    root.mount("/api/v1", api, guarded=False)
    return api


__all__ = ["API_VERSION", "mount_api", "mount_tracking"]
