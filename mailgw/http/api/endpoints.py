"""The ``/api/v1`` endpoints: one ``Route`` per operation, with its schemas, over the node's
directory, spool (``mailgw.relay.queueadmin``, shared with ``mailgw queue``), quarantine store
(shared with ``mailgw quarantine``), rules (``mailgw.policy.rules``), relay channels, DR state,
statistics, the OA submit path (``messages``) and message tracking (its route is in
``tracking``).

``AdminAPI(node, ...)`` holds what the handlers use; ``AdminAPI.routes()`` is the table the
resource dispatches on and the OpenAPI document is generated from.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import email.policy
import email.utils
import json
import os
import re
import tempfile
from collections.abc import Callable
from email.headerregistry import Address as HeaderAddress
from email.message import EmailMessage
from typing import Any

from twisted.internet import defer

from mailgw.http.api.router import (
    STR,
    ApiError,
    Call,
    Param,
    Route,
    conflict,
    invalid,
    not_found,
)
from mailgw.http.api.tracking import tracking_route
from mailgw.spool.queueid import is_queue_id

# -- schemas --------------------------------------------------------------------------------

NAME = {"type": "string", "minLength": 1, "maxLength": 320}
PASSWORD = {"type": "string", "minLength": 1, "maxLength": 1024}
QUOTA = {
    "type": "string",
    "minLength": 1,
    "maxLength": 40,
    "description": "A size (2G, 500M), none/unlimited/0 (no limit) or default",
}
USER = {
    "type": "object",
    "required": ["name", "quota", "enabled"],
    "properties": {
        "name": STR,
        "quota": {"type": ["integer", "null"], "description": "bytes; null: the default"},
        "enabled": {"type": "boolean"},
    },
}
OK = {"type": "object", "required": ["ok"], "properties": {"ok": {"type": "boolean"}}}
GROUP = {"type": "string", "minLength": 1, "maxLength": 64}
MEMBERSHIP = {
    "type": "object",
    "required": ["group", "user"],
    "properties": {"group": STR, "user": STR},
}
QUEUE_ROW = {
    "type": "object",
    "required": ["queue_id", "state"],
    "properties": {
        "queue_id": STR,
        "state": STR,
        "sender": STR,
        "recipients": {"type": "array", "items": STR},
        "size": {"type": "integer"},
        "received_at": {"type": "number"},
        "attempts": {"type": "integer"},
        "next_attempt": {"type": "number"},
        "last_error": STR,
        "error": STR,
    },
}
QUARANTINED = {
    "type": "object",
    "required": ["id", "quarantined_at", "reason", "direction", "size", "envelope"],
    "properties": {
        "id": STR,
        "quarantined_at": {"type": "number"},
        "reason": STR,
        "rule": STR,
        "direction": STR,
        "size": {"type": "integer"},
        "envelope": {"type": "object"},
        "headers": STR,
    },
}
CHANNEL = {
    "type": "object",
    "required": ["name", "kind", "state"],
    "properties": {
        "name": STR,
        "kind": STR,
        "state": {"type": "string", "enum": ["active", "probing", "suspended"]},
        "weight": {"type": "integer"},
        "in_flight": {"type": "integer"},
        "attempts": {"type": "integer"},
        "successes": {"type": "integer"},
        "failures": {"type": "integer"},
        "consecutive_failures": {"type": "integer"},
        "last_error": STR,
        "last_error_at": {"type": "number"},
        "suspended_until": {"type": "number"},
    },
}
RULES_TEXT = {
    "type": "object",
    "required": ["text"],
    "additionalProperties": False,
    "properties": {"text": {"type": "string", "maxLength": 1_000_000}},
}
SECTION_NAME = {
    "type": "string",
    "pattern": "^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$",
    "description": "The NAME of the [channel:NAME] / [route:NAME] section",
}
SECTION_VALUE = {
    "anyOf": [
        {"type": "string", "maxLength": 4096},
        {"type": "number"},
        {"type": "boolean"},
        {"type": "array", "maxItems": 256, "items": {"type": "string", "maxLength": 1024}},
    ],
    "description": "As in the config file; a boolean is yes/no, a list is joined with spaces (the file's lists)",
}
SECTION = {
    "type": "object",
    "required": ["name"],
    "properties": {"name": SECTION_NAME},
    "additionalProperties": SECTION_VALUE,
}
CHANNELS_BODY = {
    "type": "object",
    "required": ["channels", "routes"],
    "additionalProperties": False,
    "properties": {
        "channels": {
            "type": "array",
            "maxItems": 256,
            "items": SECTION,
            "description": "[channel:NAME] sections: name plus the keys of docs/relay.md",
        },
        "routes": {
            "type": "array",
            "maxItems": 1024,
            "items": SECTION,
            "description": "[route:NAME] sections, in the order they are tried",
        },
    },
}
CHANNELS_RESULT = {
    "type": "object",
    "required": ["valid", "channels", "routes"],
    "properties": {
        "valid": {"type": "boolean"},
        "summary": STR,
        "channels": {"type": "array", "items": STR},
        "routes": {"type": "array", "items": STR},
        "based_on": {"type": "integer", "description": "the version the sections replace"},
        "version": {"type": "integer", "description": "the version published (PUT)"},
        "applied": {"type": "boolean", "description": "this node runs it already (PUT)"},
        "error": {"type": "string", "description": "why this node refused it (PUT)"},
    },
}
RULES_RESULT = {
    "type": "object",
    "required": ["valid"],
    "properties": {
        "valid": {"type": "boolean"},
        "error": STR,
        "line": {"type": "integer"},
        "rules": {"type": "array", "items": STR},
        "reload": {"type": "object"},
    },
}
ADDRESS_LIST = {
    "oneOf": [
        {"type": "string", "minLength": 3, "maxLength": 4096},
        {
            "type": "array",
            "items": {"type": "string", "minLength": 3, "maxLength": 998},
            "maxItems": 1000,
        },
    ]
}
MESSAGE = {
    "type": "object",
    "required": ["to", "subject"],
    "additionalProperties": False,
    "properties": {
        "to": ADDRESS_LIST,
        "cc": ADDRESS_LIST,
        "bcc": ADDRESS_LIST,
        "subject": {"type": "string", "maxLength": 998},
        "text": {"type": "string"},
        "html": {"type": "string"},
        "reply_to": {"type": "string", "maxLength": 998},
        "attachments": {
            "type": "array",
            "maxItems": 100,
            "items": {
                "type": "object",
                "required": ["filename", "content"],
                "additionalProperties": False,
                "properties": {
                    "filename": {"type": "string", "minLength": 1, "maxLength": 255},
                    "content_type": {
                        "type": "string",
                        "pattern": "^[A-Za-z0-9][A-Za-z0-9!#$&^_.+-]*/[A-Za-z0-9][A-Za-z0-9!#$&^_.+-]*$",
                    },
                    "content": {"type": "string", "description": "base64"},
                },
            },
        },
    },
}
QUEUE_STATES = ["incoming", "active", "deferred", "outbound", "retry", "hold", "corrupt"]


def _directory_error(e: ValueError) -> ApiError:
    """The API error of a directory refusal (its ValueError texts)."""
    text = str(e)
    if text.startswith("no such"):
        return not_found(text)
    if "already exists" in text or "still has" in text or "already in group" in text:
        return conflict(text)
    if "is not in group" in text:
        return not_found(text)
    return invalid(text)


def _addresses(value: Any) -> list[str]:
    items = [value] if isinstance(value, str) else list(value or [])
    out = []
    for item in items:
        for _name, addr in email.utils.getaddresses([item]):
            if addr:
                out.append(addr)
    return out


APPLY_WAIT = 10.0
"""Seconds ``PUT /channels`` waits for this node to run the version it published."""
_KEY = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,63}")


def _refused(message: str) -> ApiError:
    """422: the config loader (or the push rules) refuse the sections; ``message`` is
    ``section:key: what is wrong``."""
    return ApiError(422, "invalid_config", message)


def _ini_value(value: Any) -> str:
    """A JSON value as the config file would spell it."""
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, list):
        return " ".join(str(v) for v in value)
    return str(value)


class AdminAPI:
    """The handlers over ``node`` (see the module docstring); ``oa_sender``: the default
    sender of ``POST /messages``; ``reload``: the node's config reload (rules apply)."""

    def __init__(self, node: Any) -> None:
        self.node = node

    @property
    def config(self) -> Any:
        return self.node.config

    # -- directory --------------------------------------------------------------------

    def _dir(self, action: Callable[[], Any]) -> Any:
        try:
            return action()
        except ValueError as e:
            raise _directory_error(e) from None

    def list_domains(self, call: Call) -> Any:
        return {"domains": self.node.directory.list_domains()}

    def create_domain(self, call: Call) -> Any:
        return {"name": self._dir(lambda: self.node.directory.add_domain(call.body["name"]))}

    def delete_domain(self, call: Call) -> Any:
        force = bool(call.query.get("force", False))
        self._dir(lambda: self.node.directory.remove_domain(call.params["domain"], force=force))
        return {"ok": True}

    def list_users(self, call: Call) -> Any:
        domain = call.query.get("domain")
        users = self._dir(lambda: self.node.directory.list_users(domain))
        return {"users": [self._user(u) for u in users]}

    @staticmethod
    def _user(u: Any) -> dict[str, Any]:
        return {"name": u.name, "quota": u.quota, "enabled": u.enabled}

    def _quota(self, text: str) -> int | None:
        from mailgw.config import values

        if text.strip().lower() == "default":
            return None
        try:
            quota = values.parse_quota(text)
        except ValueError as e:
            raise invalid(f"quota: {e}") from None
        return 0 if quota is None else quota

    def create_user(self, call: Call) -> Any:
        body = call.body
        quota = self._quota(body["quota"]) if "quota" in body else None
        user = self._dir(
            lambda: self.node.directory.add_user(body["address"], body["password"], quota=quota)
        )
        return self._user(user)

    def _existing(self, address: str) -> Any:
        try:
            user = self.node.directory.get_user(address)
        except ValueError as e:
            raise _directory_error(e) from None
        if user is None:
            raise not_found(f"no such user {address}")
        return user

    def get_user(self, call: Call) -> Any:
        return self._user(self._existing(call.params["address"]))

    def delete_user(self, call: Call) -> Any:
        self._dir(lambda: self.node.directory.remove_user(call.params["address"]))
        return {"ok": True}

    def _enable(self, call: Call, enabled: bool) -> Any:
        address = call.params["address"]
        self._dir(lambda: self.node.directory.set_enabled(address, enabled))
        return self._user(self._existing(address))

    def enable_user(self, call: Call) -> Any:
        return self._enable(call, True)

    def disable_user(self, call: Call) -> Any:
        return self._enable(call, False)

    def set_password(self, call: Call) -> Any:
        address = call.params["address"]
        self._existing(address)
        self._dir(lambda: self.node.directory.set_password(address, call.body["password"]))
        return {"ok": True}

    def set_quota(self, call: Call) -> Any:
        address = call.params["address"]
        quota = self._quota(call.body["quota"])
        self._dir(lambda: self.node.directory.set_quota(address, quota))
        return self._user(self._existing(address))

    def list_aliases(self, call: Call) -> Any:
        rows = self.node.directory.list_aliases()
        return {"aliases": [{"source": s, "destination": d} for s, d in rows]}

    def create_alias(self, call: Call) -> Any:
        body = call.body
        source, dest = self._dir(
            lambda: self.node.directory.add_alias(body["source"], body["destination"])
        )
        return {"source": source, "destination": dest}

    def delete_alias(self, call: Call) -> Any:
        dest = call.query.get("destination")
        count = self._dir(lambda: self.node.directory.remove_alias(call.params["source"], dest))
        return {"removed": count}

    def list_groups(self, call: Call) -> Any:
        rows = self.node.directory.list_groups()
        return {"groups": [{"name": n, "members": c} for n, c in rows]}

    def create_group(self, call: Call) -> Any:
        return {"name": self._dir(lambda: self.node.directory.add_group(call.body["name"]))}

    def delete_group(self, call: Call) -> Any:
        return {
            "members": self._dir(lambda: self.node.directory.remove_group(call.params["group"]))
        }

    def group_members(self, call: Call) -> Any:
        members = self._dir(lambda: self.node.directory.group_members(call.params["group"]))
        return {"members": members}

    def add_member(self, call: Call) -> Any:
        p = call.params
        group, user = self._dir(lambda: self.node.directory.add_to_group(p["group"], p["address"]))
        return {"group": group, "user": user}

    def remove_member(self, call: Call) -> Any:
        p = call.params
        group, user = self._dir(
            lambda: self.node.directory.remove_from_group(p["group"], p["address"])
        )
        return {"group": group, "user": user}

    # -- queue ------------------------------------------------------------------------

    def _queue(self, action: Callable[[], Any]) -> Any:
        from mailgw.relay import queueadmin as qa

        try:
            return action()
        except qa.QueueError as e:
            text = str(e)
            raise (not_found(text) if "no such" in text else conflict(text)) from None

    @staticmethod
    def _qid(call: Call) -> str:
        qid = call.params["id"]
        if not is_queue_id(qid):
            raise not_found(f"{qid}: no such queued message")
        return qid

    def list_queue(self, call: Call) -> Any:
        from mailgw.relay import queueadmin as qa

        state = call.query.get("state")
        states = (state,) if state else qa.QUEUE_STATES
        return {"messages": qa.list_queue(self.node.spool, states)}

    def show_queued(self, call: Call) -> Any:
        from mailgw.relay import queueadmin as qa

        qid = self._qid(call)
        return self._queue(lambda: qa.show(self.node.spool, qid))

    def retry_queued(self, call: Call) -> Any:
        from mailgw.relay import queueadmin as qa

        qid = self._qid(call)
        return {"flushed": self._queue(lambda: qa.flush(self.node.spool, qid))}

    def hold_queued(self, call: Call) -> Any:
        from mailgw.relay import queueadmin as qa

        qid = self._qid(call)
        return {"queue_id": qid, "was": self._queue(lambda: qa.hold(self.node.spool, qid))}

    def release_queued(self, call: Call) -> Any:
        from mailgw.relay import queueadmin as qa

        qid = self._qid(call)
        target = self._queue(
            lambda: qa.release(self.node.spool, qid, self.node.directory.is_local_domain)
        )
        if target == "deferred":
            self._deliver_now(qid)
        return {"queue_id": qid, "state": target}

    def delete_queued(self, call: Call) -> Any:
        from mailgw.relay import queueadmin as qa

        qid = self._qid(call)
        by = f"api:{call.token.name or call.token.id}"
        state = self._queue(lambda: qa.delete_recorded(self.node.spool, qid, self.node.tracker, by))
        return {"queue_id": qid, "was": state}

    # -- quarantine -------------------------------------------------------------------

    @property
    def _quarantine(self) -> Any:
        return self.node.policy.quarantine

    def _quarantined(self, call: Call) -> Any:
        from mailgw.policy.quarantine import QuarantineError

        qid = call.params["id"]
        if not is_queue_id(qid):
            raise not_found(f"{qid}: no such quarantined message")
        try:
            return self._quarantine.get(qid)
        except QuarantineError as e:
            raise not_found(str(e)) from None

    def list_quarantine(self, call: Call) -> Any:
        return {"messages": [m.to_json() for m in self._quarantine.list()]}

    def show_quarantined(self, call: Call) -> Any:
        m = self._quarantined(call)
        out: dict[str, Any] = m.to_json()
        try:
            with open(m.content_path, "rb") as f:
                head = f.read(256 * 1024)
        except OSError:
            head = b""
        end = head.find(b"\r\n\r\n")
        out["headers"] = (head[:end] if end >= 0 else head).decode("utf-8", "replace")
        return out

    def release_quarantined(self, call: Call) -> Any:
        from mailgw.policy.quarantine import QuarantineError

        m = self._quarantined(call)
        try:
            self._quarantine.release(m.id, self.node.spool)
        except QuarantineError as e:
            raise conflict(str(e)) from None
        self._deliver_now(m.id)
        return {"queue_id": m.id, "direction": m.direction}

    def _deliver_now(self, queue_id: str) -> None:
        """Released into ``deferred``: local delivery takes it now, not at its next scan."""
        delivery = self.node.parts.get("delivery")
        if delivery is not None and hasattr(delivery, "deliver_now"):
            self.node.reactor.callFromThread(delivery.deliver_now, queue_id)

    def delete_quarantined(self, call: Call) -> Any:
        from mailgw.policy.quarantine import QuarantineError

        m = self._quarantined(call)
        try:
            self._quarantine.delete(m.id)
        except QuarantineError as e:
            raise not_found(str(e)) from None
        return {"ok": True}

    # -- rules ------------------------------------------------------------------------

    def _rules_path(self) -> str:
        path: str = self.config.policy.rules_file
        if not path:
            raise conflict("no [policy] rules_file is configured on this node")
        return path

    def _channels(self) -> list[str]:
        return [c.name for c in self.config.channels] or ["direct"]

    def get_rules(self, call: Call) -> Any:
        from mailgw.policy.rules import RulesError, parse_rules

        path = self._rules_path()
        try:
            with open(path, encoding="utf-8") as f:
                text = f.read()
        except (OSError, UnicodeDecodeError) as e:
            raise conflict(f"{path}: cannot read: {e}") from None
        try:
            rules = [r.describe() for r in parse_rules(text, path, channels=self._channels())]
        except RulesError:
            rules = []
        return {"path": path, "text": text, "rules": rules}

    def _check(self, text: str, path: str) -> dict[str, Any]:
        from mailgw.policy.rules import RulesError, parse_rules

        try:
            rules = parse_rules(text, path, channels=self._channels())
        except RulesError as e:
            return {"valid": False, "error": str(e), "line": e.line}
        return {"valid": True, "rules": [r.describe() for r in rules]}

    def validate_rules(self, call: Call) -> Any:
        return self._check(call.body["text"], self.config.policy.rules_file or "<rules>")

    def apply_rules(self, call: Call) -> Any:
        """Validate, write the file atomically (in the I/O pool), then reload the node."""
        path = self._rules_path()
        text = call.body["text"]

        def write() -> dict[str, Any]:
            result = self._check(text, path)
            if not result["valid"]:
                raise ApiError(400, "invalid_rules", result["error"])
            write_atomically(path, text.encode("utf-8"))
            return result

        def reload(result: dict[str, Any]) -> dict[str, Any]:
            outcome = self.node.reload()
            if outcome.error:
                raise conflict(f"rules written, but the reload was refused: {outcome.error}")
            result["reload"] = outcome.as_dict()
            return result

        d: defer.Deferred[Any] = self.node.run_io(write)
        return d.addCallback(reload)

    # -- channels and routes: the unified configuration ------------------------------

    def _channels_fragment(self, body: dict[str, Any], current: Any) -> tuple[str, str | None]:
        """The INI fragment to publish: the current version's (``current``: (version, blob)
        or None) without its ``[channel:*]``/``[route:*]`` sections, plus the body's; and the
        current version's rules text, kept."""
        from mailgw.state.unified import BundleError, fragment_text, read_bundle, read_fragment

        ini, rules = "", None
        if current is not None:
            try:
                bundle = read_bundle(current[1])
            except BundleError as e:
                raise conflict(f"the current config v{current[0]}: {e}") from None
            ini, rules = bundle["ini"], bundle.get("rules")
        parser = read_fragment(ini, "<current version>")
        for section in parser.sections():
            if section.partition(":")[0] in ("channel", "route"):
                parser.remove_section(section)
        for kind, items in (("channel", body["channels"]), ("route", body["routes"])):
            for item in items:
                section = f"{kind}:{item['name']}"
                if parser.has_section(section):
                    raise _refused(f"{section}: given twice")
                parser.add_section(section)
                for key, value in item.items():
                    if key == "name":
                        continue
                    if not _KEY.fullmatch(key):
                        raise _refused(f"{section}:{key}: unknown key")
                    text = _ini_value(value)
                    if any(c in text for c in "\r\n\x00"):
                        raise _refused(f"{section}:{key}: a value is one line")
                    parser.set(section, key, text)
        return fragment_text(parser), rules

    def _channels_version(self, call: Call) -> defer.Deferred[dict[str, Any]]:
        """Validate the body on top of the running config (in the I/O pool), as a node
        applying the version would: the result with ``blob`` (the version to publish)."""
        from mailgw.state.unified import BundleError, VersionRefused, build_version

        body = call.body
        current: defer.Deferred[Any] = defer.maybeDeferred(self.node.gateway_state.config_current)

        def unreachable(failure: Any) -> Any:
            raise ApiError(
                503, "state_unavailable", f"the gateway state: {failure.getErrorMessage()}"
            )

        def build(value: Any) -> dict[str, Any]:
            ini, rules = self._channels_fragment(body, value)
            try:
                blob, summary = build_version(self.config, ini, "channels", rules, "pushed rules")
            except VersionRefused as e:
                ce = e.config_error
                if ce is not None:
                    where = ce.section + (f":{ce.key}" if ce.key else "")
                    raise _refused(f"{where}: {ce.message}") from None
                raise _refused(str(e)) from None
            except BundleError as e:
                raise _refused(str(e)) from None
            return {
                "valid": True,
                "summary": summary,
                "channels": [c["name"] for c in body["channels"]],
                "routes": [r["name"] for r in body["routes"]],
                "based_on": value[0] if value else 0,
                "blob": blob,
            }

        current.addErrback(unreachable)
        return current.addCallback(lambda value: self.node.run_io(build, value))

    def _applied(self, follower: Any, version: int) -> defer.Deferred[bool]:
        """Have ``follower`` read the current version now (it polls anyway) until it runs
        ``version`` or refuses it; False after ``APPLY_WAIT`` seconds (it goes on trying)."""
        from twisted.internet import task

        deadline = self.node.reactor.seconds() + APPLY_WAIT

        def again(_: object = None) -> Any:
            if follower.version >= version:
                return True
            if self.node.reactor.seconds() > deadline:
                return False
            d: defer.Deferred[Any] = defer.maybeDeferred(follower.check)
            d.addErrback(lambda _: None)

            def checked(_: object) -> Any:
                if follower.version >= version or (follower.error and not follower._busy):
                    return follower.version >= version
                return task.deferLater(self.node.reactor, 0.1, again)

            return d.addCallback(checked)

        return defer.maybeDeferred(again)

    def validate_channels(self, call: Call) -> Any:
        def strip(result: dict[str, Any]) -> dict[str, Any]:
            result.pop("blob")
            return result

        return self._channels_version(call).addCallback(strip)

    def apply_channels(self, call: Call) -> Any:
        """Publish the validated version through the gateway state (every node follows it:
        ``ConfigFollower``), then have this node apply it at once and say how that went."""
        state = self.node.gateway_state
        follower = getattr(self.node, "config_follower", None)

        def publish(result: dict[str, Any]) -> Any:
            d: defer.Deferred[int] = defer.maybeDeferred(state.config_publish, result.pop("blob"))

            def unreachable(failure: Any) -> Any:
                raise ApiError(
                    503, "state_unavailable", f"not published: {failure.getErrorMessage()}"
                )

            def published(version: int) -> Any:
                result["version"] = version
                if follower is None:
                    result["applied"] = False
                    return result
                return self._applied(follower, version).addCallback(report)

            def report(applied: bool) -> dict[str, Any]:
                result["applied"] = applied
                if not applied and follower is not None and follower.error:
                    result["error"] = follower.error
                return result

            return d.addCallbacks(published, unreachable)

        return self._channels_version(call).addCallback(publish)

    # -- channels, DR, statistics -----------------------------------------------------

    def _relay(self) -> Any:
        relay = self.node.parts.get("relay")
        if relay is None:
            raise ApiError(503, "not_running", "this node does not run the relay role")
        return relay

    def list_channels(self, call: Call) -> Any:
        return {"channels": self._relay().selector.status()}

    def show_channel(self, call: Call) -> Any:
        for row in self._relay().selector.status():
            if row["name"] == call.params["name"]:
                return row
        raise not_found(f"no such channel {call.params['name']}")

    def dr_status(self, call: Call) -> Any:
        part = self.node.parts.get("replication")
        status = getattr(part, "status", None)
        if callable(status):
            return {"configured": True, "status": status()}
        path = os.path.join(self.config.server.data_dir, "replication", "status.json")
        try:
            with open(path, encoding="utf-8") as f:
                return {"configured": True, "status": json.load(f)}
        except FileNotFoundError:
            raise ApiError(404, "not_configured", "replication is not configured") from None
        except (OSError, ValueError) as e:
            raise conflict(f"{path}: unreadable: {e}") from None

    def statistics(self, call: Call) -> Any:
        node = self.node
        spool = node.spool
        queue = {state: len(spool.list(state)) for state in spool.STATES}
        directory = node.directory
        users = directory.list_users()
        tiers = {"tier1": [0, 0], "tier2": [0, 0]}
        for user in node.store.users():
            for tier, (n, size) in node.store.tier_totals(user).items():
                tiers[tier][0] += n
                tiers[tier][1] += size
        out: dict[str, Any] = {
            "queue": queue,
            "quarantine": len(node.policy.quarantine.ids()),
            "domains": len(directory.list_domains()),
            "users": len(users),
            "users_disabled": sum(1 for u in users if not u.enabled),
            "aliases": len(directory.list_aliases()),
            "store": {t: {"messages": v[0], "bytes": v[1]} for t, v in tiers.items()},
        }
        webhooks = getattr(node, "webhooks", None)
        if webhooks is not None:
            out["webhooks"] = webhooks.outbox.counts()
        return out

    # -- OA messages ------------------------------------------------------------------

    def send_message(self, call: Call) -> Any:
        """Build the message and submit it as the token's (or ``[api] oa_sender``) sender."""
        from mailgw.model import Envelope
        from mailgw.policy.submit import SubmissionError

        submitter = self.node.submitter
        if submitter is None:
            raise ApiError(503, "not_running", "this node does not run the submission role")
        sender = call.token.sender or self.config.api.oa_sender
        if not sender:
            raise ApiError(403, "no_sender", "no sender for this token ([api] oa_sender)")
        body = call.body
        message, recipients = build_message(
            sender, body, self.config.server.hostname, self.config.api.max_message_size
        )
        envelope = Envelope(sender, recipients)
        d: defer.Deferred[str] = submitter.submit(
            sender, envelope, message, protocol="api", client_ip=call.client_ip
        )

        def done(queue_id: str) -> dict[str, Any]:
            return {"queue_id": queue_id, "recipients": recipients, "size": len(message)}

        def refused(failure: Any) -> Any:
            failure.trap(SubmissionError)
            reply = failure.value.reply
            raise reply_error(reply)

        return d.addCallbacks(done, refused)

    # -- the table --------------------------------------------------------------------

    def routes(self) -> list[Route]:
        r = Route
        user_p = {"address": "a user's address (local@domain)"}
        group_p = {"group": "a group's name"}
        qid_p = {"id": "a queue ID"}
        return [
            r(
                "GET",
                "/domains",
                "read",
                self.list_domains,
                "List local domains",
                {"type": "object", "properties": {"domains": {"type": "array", "items": STR}}},
            ),
            r(
                "POST",
                "/domains",
                "admin",
                self.create_domain,
                "Add a local domain",
                {"type": "object", "properties": {"name": STR}},
                status=201,
                errors=(409,),
                body={
                    "type": "object",
                    "required": ["name"],
                    "additionalProperties": False,
                    "properties": {"name": NAME},
                },
            ),
            r(
                "DELETE",
                "/domains/{domain}",
                "admin",
                self.delete_domain,
                "Remove a domain (force: with its users and aliases)",
                OK,
                errors=(409,),
                query=(Param("force", {"type": "boolean"}, "also remove users and aliases"),),
            ),
            r(
                "GET",
                "/users",
                "read",
                self.list_users,
                "List users",
                {"type": "object", "properties": {"users": {"type": "array", "items": USER}}},
                query=(Param("domain", {"type": "string", "minLength": 1}, "only this domain"),),
                errors=(404,),
            ),
            r(
                "POST",
                "/users",
                "admin",
                self.create_user,
                "Add a user",
                USER,
                status=201,
                errors=(404, 409),
                body={
                    "type": "object",
                    "required": ["address", "password"],
                    "additionalProperties": False,
                    "properties": {"address": NAME, "password": PASSWORD, "quota": QUOTA},
                },
            ),
            r("GET", "/users/{address}", "read", self.get_user, "A user", USER, param_docs=user_p),
            r(
                "DELETE",
                "/users/{address}",
                "admin",
                self.delete_user,
                "Remove a user (its mailbox files are kept)",
                OK,
                param_docs=user_p,
            ),
            r(
                "POST",
                "/users/{address}/disable",
                "admin",
                self.disable_user,
                "Disable logins",
                USER,
                param_docs=user_p,
            ),
            r(
                "POST",
                "/users/{address}/enable",
                "admin",
                self.enable_user,
                "Enable logins",
                USER,
                param_docs=user_p,
            ),
            r(
                "PUT",
                "/users/{address}/password",
                "admin",
                self.set_password,
                "Set the password",
                OK,
                param_docs=user_p,
                body={
                    "type": "object",
                    "required": ["password"],
                    "additionalProperties": False,
                    "properties": {"password": PASSWORD},
                },
            ),
            r(
                "PUT",
                "/users/{address}/quota",
                "admin",
                self.set_quota,
                "Set the quota",
                USER,
                param_docs=user_p,
                body={
                    "type": "object",
                    "required": ["quota"],
                    "additionalProperties": False,
                    "properties": {"quota": QUOTA},
                },
            ),
            r(
                "GET",
                "/aliases",
                "read",
                self.list_aliases,
                "List aliases",
                {
                    "type": "object",
                    "properties": {
                        "aliases": {
                            "type": "array",
                            "items": {
                                "type": "object",
                                "properties": {"source": STR, "destination": STR},
                            },
                        }
                    },
                },
            ),
            r(
                "POST",
                "/aliases",
                "admin",
                self.create_alias,
                "Add an alias destination",
                {"type": "object", "properties": {"source": STR, "destination": STR}},
                status=201,
                errors=(409,),
                body={
                    "type": "object",
                    "required": ["source", "destination"],
                    "additionalProperties": False,
                    "properties": {"source": NAME, "destination": NAME},
                },
            ),
            r(
                "DELETE",
                "/aliases/{source}",
                "admin",
                self.delete_alias,
                "Remove an alias (every destination, or one)",
                {"type": "object", "properties": {"removed": {"type": "integer"}}},
                query=(
                    Param(
                        "destination", {"type": "string", "minLength": 1}, "only this destination"
                    ),
                ),
                param_docs={"source": "the alias address, or @domain"},
            ),
            r(
                "GET",
                "/groups",
                "read",
                self.list_groups,
                "List groups (for the rules' group match) with their number of members",
                {
                    "type": "object",
                    "properties": {
                        "groups": {
                            "type": "array",
                            "items": {
                                "type": "object",
                                "properties": {"name": STR, "members": {"type": "integer"}},
                            },
                        }
                    },
                },
            ),
            r(
                "POST",
                "/groups",
                "admin",
                self.create_group,
                "Add a group",
                {"type": "object", "properties": {"name": STR}},
                status=201,
                errors=(409,),
                body={
                    "type": "object",
                    "required": ["name"],
                    "additionalProperties": False,
                    "properties": {"name": GROUP},
                },
            ),
            r(
                "DELETE",
                "/groups/{group}",
                "admin",
                self.delete_group,
                "Remove a group (its users stay)",
                {"type": "object", "properties": {"members": {"type": "integer"}}},
                param_docs=group_p,
            ),
            r(
                "GET",
                "/groups/{group}/members",
                "read",
                self.group_members,
                "A group's users",
                {"type": "object", "properties": {"members": {"type": "array", "items": STR}}},
                param_docs=group_p,
            ),
            r(
                "PUT",
                "/groups/{group}/members/{address}",
                "admin",
                self.add_member,
                "Add a user to a group",
                MEMBERSHIP,
                errors=(409,),
                param_docs={**group_p, **user_p},
            ),
            r(
                "DELETE",
                "/groups/{group}/members/{address}",
                "admin",
                self.remove_member,
                "Take a user out of a group",
                MEMBERSHIP,
                param_docs={**group_p, **user_p},
            ),
            r(
                "GET",
                "/queue",
                "read",
                self.list_queue,
                "List queued messages",
                {
                    "type": "object",
                    "properties": {"messages": {"type": "array", "items": QUEUE_ROW}},
                },
                query=(Param("state", {"type": "string", "enum": QUEUE_STATES}, "only this"),),
            ),
            r(
                "GET",
                "/queue/{id}",
                "read",
                self.show_queued,
                "Envelope and header of a queued message",
                QUEUE_ROW,
                param_docs=qid_p,
            ),
            r(
                "POST",
                "/queue/{id}/retry",
                "admin",
                self.retry_queued,
                "Retry a deferred message now",
                {"type": "object", "properties": {"flushed": {"type": "array", "items": STR}}},
                errors=(409,),
                param_docs=qid_p,
            ),
            r(
                "POST",
                "/queue/{id}/hold",
                "admin",
                self.hold_queued,
                "Park a message",
                {"type": "object", "properties": {"queue_id": STR, "was": STR}},
                errors=(409,),
                param_docs=qid_p,
            ),
            r(
                "POST",
                "/queue/{id}/release",
                "admin",
                self.release_queued,
                "Release a held message",
                {"type": "object", "properties": {"queue_id": STR, "state": STR}},
                errors=(409,),
                param_docs=qid_p,
            ),
            r(
                "DELETE",
                "/queue/{id}",
                "admin",
                self.delete_queued,
                "Delete a queued message",
                {"type": "object", "properties": {"queue_id": STR, "was": STR}},
                errors=(409,),
                param_docs=qid_p,
            ),
            r(
                "GET",
                "/quarantine",
                "read",
                self.list_quarantine,
                "List quarantined messages",
                {
                    "type": "object",
                    "properties": {"messages": {"type": "array", "items": QUARANTINED}},
                },
            ),
            r(
                "GET",
                "/quarantine/{id}",
                "read",
                self.show_quarantined,
                "Record and header of a quarantined message",
                QUARANTINED,
                param_docs={"id": "a quarantine ID"},
            ),
            r(
                "POST",
                "/quarantine/{id}/release",
                "admin",
                self.release_quarantined,
                "Queue it again (deliver or relay)",
                {"type": "object", "properties": {"queue_id": STR, "direction": STR}},
                errors=(409,),
                param_docs={"id": "a quarantine ID"},
            ),
            r(
                "DELETE",
                "/quarantine/{id}",
                "admin",
                self.delete_quarantined,
                "Remove it for good",
                OK,
                param_docs={"id": "a quarantine ID"},
            ),
            r(
                "GET",
                "/rules",
                "read",
                self.get_rules,
                "The security rules file",
                {
                    "type": "object",
                    "properties": {
                        "path": STR,
                        "text": STR,
                        "rules": {"type": "array", "items": STR},
                    },
                },
                errors=(409,),
            ),
            r(
                "POST",
                "/rules/validate",
                "read",
                self.validate_rules,
                "Check a rules text (nothing is written)",
                RULES_RESULT,
                body=RULES_TEXT,
            ),
            r(
                "PUT",
                "/rules",
                "admin",
                self.apply_rules,
                "Validate, write the rules file atomically and reload",
                RULES_RESULT,
                body=RULES_TEXT,
                errors=(409,),
                blocking=False,
            ),
            r(
                "GET",
                "/channels",
                "read",
                self.list_channels,
                "Outbound channels and state",
                {"type": "object", "properties": {"channels": {"type": "array", "items": CHANNEL}}},
                errors=(503,),
                blocking=False,
            ),
            r(
                "POST",
                "/channels/validate",
                "admin",
                self.validate_channels,
                "Check [channel:NAME] and [route:NAME] sections on top of the running config",
                CHANNELS_RESULT,
                body=CHANNELS_BODY,
                errors=(409, 422, 503),
                blocking=False,
            ),
            r(
                "PUT",
                "/channels",
                "admin",
                self.apply_channels,
                "Make these the pushed channels and routes: validate, publish a config version",
                CHANNELS_RESULT,
                body=CHANNELS_BODY,
                errors=(409, 422, 503),
                blocking=False,
            ),
            r(
                "GET",
                "/channels/{name}",
                "read",
                self.show_channel,
                "One channel",
                CHANNEL,
                errors=(503,),
                blocking=False,
                param_docs={"name": "a channel name"},
            ),
            r(
                "GET",
                "/dr",
                "read",
                self.dr_status,
                "Disaster-recovery replication state",
                {
                    "type": "object",
                    "properties": {"configured": {"type": "boolean"}, "status": {"type": "object"}},
                },
                errors=(404, 409),
            ),
            r(
                "GET",
                "/stats",
                "read",
                self.statistics,
                "Counts: queue, store, directory",
                {
                    "type": "object",
                    "required": ["queue", "store"],
                    "properties": {
                        "queue": {"type": "object"},
                        "store": {"type": "object"},
                        "quarantine": {"type": "integer"},
                        "domains": {"type": "integer"},
                        "users": {"type": "integer"},
                        "aliases": {"type": "integer"},
                        "webhooks": {"type": "object"},
                    },
                },
            ),
            r(
                "POST",
                "/messages",
                "send",
                self.send_message,
                "Send a notification mail (OA) through the submission checks",
                {
                    "type": "object",
                    "required": ["queue_id"],
                    "properties": {
                        "queue_id": STR,
                        "recipients": {"type": "array", "items": STR},
                        "size": {"type": "integer"},
                    },
                },
                status=202,
                body=MESSAGE,
                errors=(422, 429, 503),
                blocking=False,
                tag="messages",
            ),
            tracking_route(getattr(getattr(self.node, "tracker", None), "path", None)),
        ]


def reply_error(reply: Any) -> ApiError:
    """The API error of a refused submission: permanent (5xx) and request errors (4.5.x:
    too many recipients, bad syntax) 422; policy and rate tempfails (4.7.x) 429; other
    tempfails (a check out of order) 503. The message is the SMTP reply."""
    enhanced = str(getattr(reply, "enhanced", "") or "")
    if reply.code >= 500 or enhanced.startswith("4.5."):
        return ApiError(422, "rejected", reply.format())
    if enhanced.startswith("4.7."):
        return ApiError(429, "tempfail", reply.format())
    return ApiError(503, "tempfail", reply.format())


def build_message(
    sender: str, body: dict[str, Any], hostname: str, max_size: int
) -> tuple[bytes, list[str]]:
    """The RFC 5322 message of a ``POST /messages`` body and its envelope recipients;
    ApiError 400 for what cannot be made into a message, 413 when it is over ``max_size``."""
    recipients = []
    for key in ("to", "cc", "bcc"):
        recipients.extend(_addresses(body.get(key)))
    if not recipients:
        raise invalid("no recipient address in to, cc or bcc")
    if "text" not in body and "html" not in body:
        raise invalid("give text, html or both")
    msg = EmailMessage(policy=email.policy.SMTP)
    try:
        msg["From"] = HeaderAddress(addr_spec=sender)
        for key in ("to", "cc"):
            if body.get(key):
                value = body[key]
                msg[key.capitalize()] = value if isinstance(value, str) else ", ".join(value)
        if body.get("reply_to"):
            msg["Reply-To"] = body["reply_to"]
        msg["Subject"] = body["subject"]
        msg["Date"] = email.utils.formatdate(localtime=True)
        msg["Message-ID"] = email.utils.make_msgid(domain=hostname)
        if "text" in body:
            msg.set_content(body["text"])
            if "html" in body:
                msg.add_alternative(body["html"], subtype="html")
        else:
            msg.set_content(body["html"], subtype="html")
        for item in body.get("attachments", []):
            try:
                data = base64.b64decode(item["content"], validate=True)
            except (binascii.Error, ValueError):
                raise invalid(f"attachment {item['filename']}: content is not base64") from None
            maintype, _, subtype = item.get("content_type", "application/octet-stream").partition(
                "/"
            )
            msg.add_attachment(data, maintype=maintype, subtype=subtype, filename=item["filename"])
        raw = msg.as_bytes()
    except ApiError:
        raise
    except (ValueError, TypeError, IndexError, LookupError) as e:
        raise invalid(f"cannot build the message: {e}") from None
    if len(raw) > max_size:
        raise ApiError(413, "too_large", f"the message is over {max_size} bytes")
    return raw, recipients


def write_atomically(path: str, data: bytes) -> None:
    """Write ``data`` to a temporary file beside ``path``, fsync it, rename it over ``path``
    and fsync the folder: readers see the old file or the new one, never a part."""
    folder = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=".rules.", dir=folder)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        with contextlib.suppress(OSError):
            os.chmod(tmp, os.stat(path).st_mode & 0o777)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    dfd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)
