"""The admin API's route table machinery: ``Route`` (method, path, scope, schemas, handler),
the twisted.web resource that dispatches ``/api/v1/...`` to routes (token and scope checks,
JSON bodies validated against the route's own schema, errors as JSON), and the OpenAPI 3
document generated from the same table, so the document cannot drift from the handlers.

Errors are ``{"error": {"code": "...", "message": "..."}}`` with the status: 400 (bad JSON,
a body or query that does not match the schema, a value the handler refuses), 401 (no or an
invalid token, with ``WWW-Authenticate: Bearer``; a route marked ``networks`` also lets
clients of the ``[http] allow`` networks in without a token, as the admin guard does), 403
(the token lacks the scope), 404 (no such path or object), 405 (with ``Allow``), 409
(conflicts: exists already, busy), 413 (body too large), 415 (not JSON), 500 (a bug: logged
with a traceback, the client gets a short message), 503 (a part this node does not run). A handler runs in the I/O pool (``blocking``)
or on the reactor thread, returning a value or a Deferred of one.
"""

from __future__ import annotations

import hmac
import json
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import unquote

import jsonschema
from twisted.internet import defer
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET

from mailgw.http.api.tokens import Token, TokenStore
from mailgw.http.guard import REALM
from mailgw.http.root import Folder
from mailgw.net.proxy import Network, is_trusted

log = Logger(namespace="mailgw.api")

STR: dict[str, Any] = {"type": "string"}
"""The JSON schema of a string, shared by the route tables."""

JSON_TYPE = b"application/json; charset=utf-8"


class ApiError(Exception):
    """An error answer: ``status``, a short ``code`` and a human ``message``."""

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message


def not_found(message: str) -> ApiError:
    return ApiError(404, "not_found", message)


def conflict(message: str) -> ApiError:
    return ApiError(409, "conflict", message)


def invalid(message: str) -> ApiError:
    return ApiError(400, "invalid", message)


@dataclass(frozen=True)
class Param:
    """A query parameter: its JSON schema (applied to the text, or to a bool for
    ``"type": "boolean"``: ``true``/``false``/``1``/``0``/``yes``/``no``)."""

    name: str
    schema: dict[str, Any]
    description: str
    required: bool = False


@dataclass
class Call:
    """One request as a handler sees it."""

    params: dict[str, str]
    query: dict[str, Any]
    body: Any
    token: Token
    client_ip: str


@dataclass(frozen=True)
class Route:
    """One endpoint. ``path`` below ``/api/v1`` (``/users/{address}``); ``scope`` the token
    needs; ``handler(call)``; ``body``/``response``: JSON schemas; ``errors``: the statuses
    it can answer besides the auth ones; ``blocking``: run in the I/O pool; ``networks``:
    without a token, clients of the ``[http] allow`` networks may call it (with the ``read``
    scope, as the admin guard lets them read /metrics)."""

    method: str
    path: str
    scope: str
    handler: Callable[[Call], Any]
    summary: str
    response: dict[str, Any]
    body: dict[str, Any] | None = None
    query: Sequence[Param] = ()
    status: int = 200
    errors: Sequence[int] = ()
    blocking: bool = True
    tag: str = ""
    param_docs: dict[str, str] = field(default_factory=dict)
    networks: bool = False

    @property
    def segments(self) -> list[str]:
        return [s for s in self.path.strip("/").split("/") if s]

    def match(self, segments: list[str]) -> dict[str, str] | None:
        mine = self.segments
        if len(mine) != len(segments):
            return None
        params: dict[str, str] = {}
        for pattern, value in zip(mine, segments, strict=True):
            if pattern.startswith("{") and pattern.endswith("}"):
                params[pattern[1:-1]] = value
            elif pattern != value:
                return None
        return params

    @property
    def operation_id(self) -> str:
        words = [s.strip("{}") for s in self.segments]
        return self.method.lower() + "_" + "_".join(re.sub(r"\W", "_", w) for w in words)


NETWORK_TOKEN = Token("network", "[http] allow", "read", "", 0.0, None, None)
"""Who a tokenless client of an ``[http] allow`` network is, on a ``networks`` route."""


class Authenticator:
    """Bearer tokens: the ``[http] admin_token_file`` token (full admin) or a stored token
    (``tokens``; None: none is accepted); ``allow``: the ``[http] allow`` networks."""

    def __init__(
        self,
        tokens: TokenStore | None,
        admin_token: bytes | None,
        allow: Sequence[Network] = (),
    ) -> None:
        self.tokens = tokens
        self.admin_token = admin_token
        self.allow = tuple(allow)

    def for_request(self, request: Any, route: Route) -> Token:
        """Who ``request`` is (``authenticate`` its header), or ``NETWORK_TOKEN`` for no
        header from an allowed network on a ``networks`` route."""
        header = request.getHeader(b"authorization")
        if header is None and route.networks and is_trusted(request.getClientAddress(), self.allow):
            return NETWORK_TOKEN
        return self.authenticate(header)

    def authenticate(self, header: bytes | None) -> Token:
        """The token of an ``Authorization`` header; ApiError 401 when there is none or it
        is not valid."""
        if header is None:
            raise ApiError(401, "unauthorized", "an API token is needed (Authorization: Bearer)")
        scheme, _, credentials = header.strip().partition(b" ")
        given = credentials.strip()
        if scheme.lower() != b"bearer" or not given:
            raise ApiError(401, "invalid_token", "expected Authorization: Bearer TOKEN")
        if self.admin_token is not None and hmac.compare_digest(given, self.admin_token):
            return Token("admin-file", "admin_token_file", "admin", "", 0.0, None, None)
        token = None
        if self.tokens is not None:
            try:
                token = self.tokens.authenticate(given.decode("ascii"))
            except UnicodeDecodeError:
                token = None
        if token is None:
            raise ApiError(401, "invalid_token", "the token is unknown, revoked or expired")
        return token


def _query_value(param: Param, raw: str) -> Any:
    if param.schema.get("type") == "boolean":
        lowered = raw.strip().lower()
        if lowered in ("true", "1", "yes"):
            return True
        if lowered in ("false", "0", "no"):
            return False
        raise invalid(f"query {param.name}: expected true or false")
    if param.schema.get("type") == "integer":
        try:
            return int(raw)
        except ValueError:
            raise invalid(f"query {param.name}: expected an integer") from None
    return raw


def _validate(instance: Any, schema: dict[str, Any], what: str) -> None:
    try:
        jsonschema.validate(instance, schema, format_checker=jsonschema.FormatChecker())
    except jsonschema.ValidationError as e:
        where = "/".join(str(p) for p in e.absolute_path)
        raise invalid(f"{what}{' ' + where if where else ''}: {e.message}") from None


class ApiResource(Folder):
    """``/api/v1``: dispatches to ``routes``; other resources may still be mounted below it
    (``/api/v1/NAME``), and those take precedence."""

    def __init__(
        self,
        routes: Sequence[Route],
        auth: Authenticator,
        run: Callable[..., defer.Deferred[Any]],
        max_body: int,
    ) -> None:
        super().__init__()
        self.routes = list(routes)
        self.auth = auth
        self.run = run
        self.max_body = max_body

    def getChild(self, path: bytes, request: Any) -> Resource:  # noqa: N802 (twisted.web)
        return _Dispatch(self)

    def render(self, request: Any) -> Any:
        return _Dispatch(self).render(request)


class _Dispatch(Resource):
    isLeaf = True

    def __init__(self, api: ApiResource) -> None:
        super().__init__()  # type: ignore[no-untyped-call]
        self.api = api

    def render(self, request: Any) -> Any:
        # request.postpath: this segment and the rest (the leaf was found by getChild).
        raw = [request.prepath[-1], *request.postpath] if request.postpath is not None else []
        try:
            segments = [unquote(s.decode("utf-8"), errors="strict") for s in raw]
        except UnicodeDecodeError:
            return _error(request, not_found("no such path"))
        if segments and segments[-1] == "":
            segments.pop()  # /api/v1/domains/ as /api/v1/domains
        method = request.method.decode("ascii", "replace").upper()
        matched = [(r, p) for r in self.api.routes if (p := r.match(segments)) is not None]
        if not matched:
            return _error(request, not_found("no such path"))
        methods = {r.method for r, _ in matched}
        if "GET" in methods:
            methods.add("HEAD")
        allowed = sorted(methods)
        lookup = "GET" if method == "HEAD" else method
        chosen = [(r, p) for r, p in matched if r.method == lookup]
        if not chosen:
            request.setHeader(b"allow", ", ".join(allowed).encode("ascii"))
            return _error(request, ApiError(405, "method_not_allowed", f"{method} not allowed"))
        route, params = chosen[0]
        try:
            token = self.api.auth.for_request(request, route)
            if not token.allows(route.scope):
                raise ApiError(403, "forbidden", f"this token lacks the {route.scope} scope")
            call = Call(
                params,
                self._query(request, route),
                self._body(request, route),
                token,
                _client_ip(request),
            )
        except ApiError as e:
            return _error(request, e)
        if route.blocking:
            d = self.api.run(route.handler, call)
        else:
            d = defer.maybeDeferred(route.handler, call)
        gone: list[bool] = []
        request.notifyFinish().addErrback(lambda _: gone.append(True))

        def done(result: Any) -> None:
            if not gone:
                _finish(request, route.status, result)

        def failed(failure: Failure) -> None:
            if gone:
                return
            if isinstance(failure.value, ApiError):
                error = failure.value
            else:
                log.failure("API {method} {path} failed", failure, method=method, path=request.path)
                error = ApiError(500, "internal", "internal error (see the server log)")
            _finish(request, error.status, _error_body(error))

        d.addCallbacks(done, failed)
        return NOT_DONE_YET

    def _query(self, request: Any, route: Route) -> dict[str, Any]:
        args = request.args or {}
        out: dict[str, Any] = {}
        for param in route.query:
            values = args.get(param.name.encode("ascii"))
            if not values:
                if param.required:
                    raise invalid(f"query {param.name} is required")
                continue
            try:
                text = values[0].decode("utf-8")
            except UnicodeDecodeError:
                raise invalid(f"query {param.name}: not UTF-8") from None
            value = _query_value(param, text)
            _validate(value, param.schema, f"query {param.name}")
            out[param.name] = value
        return out

    def _body(self, request: Any, route: Route) -> Any:
        if route.body is None:
            return None
        content_type = (request.getHeader(b"content-type") or b"").split(b";")[0].strip().lower()
        if content_type != b"application/json":
            raise ApiError(415, "unsupported_media_type", "send the body as application/json")
        request.content.seek(0)
        data = request.content.read(self.api.max_body + 1)
        if len(data) > self.api.max_body:
            raise ApiError(413, "too_large", f"the body is over {self.api.max_body} bytes")
        try:
            body = json.loads(data.decode("utf-8"))
        except (UnicodeDecodeError, ValueError) as e:
            raise invalid(f"the body is not JSON: {e}") from None
        _validate(body, route.body, "body")
        return body


def _client_ip(request: Any) -> str:
    address = request.getClientAddress()
    return str(getattr(address, "host", ""))


def _error_body(error: ApiError) -> dict[str, Any]:
    return {"error": {"code": error.code, "message": error.message}}


def _encode(request: Any, status: int, body: Any) -> bytes:
    request.setResponseCode(status)
    request.setHeader(b"content-type", JSON_TYPE)
    request.setHeader(b"cache-control", b"no-store")
    if status == 401:
        request.setHeader(b"www-authenticate", f'Bearer realm="{REALM}"'.encode("ascii"))
    data = json.dumps(body, ensure_ascii=False).encode("utf-8") + b"\n"
    return b"" if request.method == b"HEAD" else data


def _error(request: Any, error: ApiError) -> bytes:
    return _encode(request, error.status, _error_body(error))


def _finish(request: Any, status: int, body: Any) -> None:
    request.write(_encode(request, status, body))
    request.finish()


# -- the OpenAPI document ---------------------------------------------------------------------

ERROR_SCHEMA: dict[str, Any] = {
    "type": "object",
    "required": ["error"],
    "properties": {
        "error": {
            "type": "object",
            "required": ["code", "message"],
            "properties": {"code": {"type": "string"}, "message": {"type": "string"}},
        }
    },
}

_STATUS_TEXT = {
    400: "Invalid input",
    401: "No token, or an invalid one",
    403: "The token lacks the scope",
    404: "No such object",
    409: "Conflict with the current state",
    413: "Body too large",
    415: "Body is not JSON",
    422: "Refused as it stands: the SMTP reply, or section:key: what is wrong in a config",
    429: "Refused for now by a policy or rate limit (retry later)",
    503: "This node does not run the part needed",
}


def openapi(routes: Sequence[Route], title: str, version: str) -> dict[str, Any]:
    """The OpenAPI 3.0 document of ``routes``."""
    paths: dict[str, dict[str, Any]] = {}
    for route in routes:
        op: dict[str, Any] = {
            "operationId": route.operation_id,
            "summary": route.summary,
            "tags": [route.tag or route.segments[0]],
            "security": [{"bearer": []}],
            "x-scope": route.scope,
        }
        if route.networks:
            op["description"] = (
                "Also without a token from an [http] allow network (scope read), as /metrics."
            )
            op["x-networks"] = True
        parameters = []
        for segment in route.segments:
            if segment.startswith("{"):
                name = segment[1:-1]
                parameters.append(
                    {
                        "name": name,
                        "in": "path",
                        "required": True,
                        "description": route.param_docs.get(name, name),
                        "schema": {"type": "string"},
                    }
                )
        for q in route.query:
            parameters.append(
                {
                    "name": q.name,
                    "in": "query",
                    "required": q.required,
                    "description": q.description,
                    "schema": q.schema,
                }
            )
        if parameters:
            op["parameters"] = parameters
        if route.body is not None:
            op["requestBody"] = {
                "required": True,
                "content": {"application/json": {"schema": route.body}},
            }
        responses: dict[str, Any] = {
            str(route.status): {
                "description": "Success",
                "content": {"application/json": {"schema": route.response}},
            }
        }
        codes = {401, 403, *route.errors}
        if route.body is not None or route.query:
            codes |= {400}
        if route.body is not None:
            codes |= {413, 415}
        if any(s.startswith("{") for s in route.segments):
            codes |= {400, 404}  # a malformed or an unknown name
        for code in sorted(codes):
            responses[str(code)] = {
                "description": _STATUS_TEXT.get(code, "Error"),
                "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}},
            }
        op["responses"] = responses
        paths.setdefault("/api/v1" + route.path, {})[route.method.lower()] = op
    return {
        "openapi": "3.0.3",
        "info": {
            "title": title,
            "version": version,
            "description": "mailgw admin and OA API. Every endpoint needs a bearer token "
            "(`mailgw token create --scope admin|read|send`); `x-scope` names the scope.",
        },
        "servers": [{"url": "/"}],
        "paths": paths,
        "components": {
            "schemas": {"Error": ERROR_SCHEMA},
            "securitySchemes": {
                "bearer": {
                    "type": "http",
                    "scheme": "bearer",
                    "description": "A token of `mailgw token create`, or the "
                    "[http] admin_token_file token (scope admin).",
                }
            },
        },
    }


class OpenAPIResource(Resource):
    """``/api/openapi.json``: the document, public (it holds no data)."""

    isLeaf = True

    def __init__(self, document: dict[str, Any]) -> None:
        super().__init__()  # type: ignore[no-untyped-call]
        self.data = json.dumps(document, indent=1).encode("utf-8") + b"\n"

    def render_GET(self, request: Any) -> bytes:  # noqa: N802 (twisted.web)
        request.setHeader(b"content-type", JSON_TYPE)
        request.setHeader(b"access-control-allow-origin", b"*")
        return self.data

    def render_HEAD(self, request: Any) -> bytes:  # noqa: N802 (twisted.web)
        self.render_GET(request)
        return b""
