"""``WebhookService``: turns tracking events into webhook payloads, keeps them in the outbox
and POSTs them, signed, to every ``[webhooks] urls`` receiver, retrying with back-off.

Events (``[webhooks] events``) and their tracking source:

- ``message.delivered``: ``delivered`` (stored in a local mailbox): recipient, user, folder;
- ``message.failed``: ``bounced`` or ``expired``: recipients, reason;
- ``message.quarantined``: a ``policy`` event with a ``quarantine`` verdict: rule, reason.

A POST carries ``Content-Type: application/json``, ``X-Mailgw-Event``, ``X-Mailgw-Delivery``
(the same on every retry: receivers de-duplicate with it), ``X-Mailgw-Timestamp`` (Unix
seconds of this attempt) and ``X-Mailgw-Signature: sha256=HEX``, the HMAC-SHA256 under the
secret of ``TIMESTAMP + "." + BODY``. A 2xx answer within ``timeout`` removes the row; anything
else is retried after ``retry_initial`` doubling to ``retry_max``; a row older than
``max_age`` is dropped (logged). ``listener`` is called by ``Tracker.record`` from any thread:
it only hands the event to the reactor thread; the rows are written in the I/O pool.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import uuid
from collections.abc import Callable
from io import BytesIO
from typing import Any

from twisted.application import service
from twisted.internet import defer
from twisted.logger import Logger
from twisted.web.client import Agent, FileBodyProducer, readBody
from twisted.web.http_headers import Headers

from mailgw.webhooks.outbox import Outbox, Pending

log = Logger(namespace="mailgw.webhooks")

USER_AGENT = b"mailgw-webhooks/1"


def sign(secret: bytes, timestamp: int, body: bytes) -> str:
    """The ``X-Mailgw-Signature`` value of ``body`` sent at ``timestamp``."""
    mac = hmac.new(secret, str(timestamp).encode("ascii") + b"." + body, hashlib.sha256)
    return "sha256=" + mac.hexdigest()


def payload_of(kind: str, queue_id: str, when: float, detail: dict[str, Any]) -> tuple[str, Any]:
    """(event name, data) of a tracking event, or ("", None) when it is not a webhook event."""
    if kind == "delivered":
        keys = ("recipient", "user", "folder")
        return "delivered", {k: detail[k] for k in keys if k in detail}
    if kind in ("bounced", "expired"):
        data: dict[str, Any] = {
            k: detail[k] for k in ("recipients", "reason", "age") if k in detail
        }
        data["cause"] = kind
        return "failed", data
    if kind == "policy":
        hits = [v for v in detail.get("verdicts", ()) if v.get("verdict") == "quarantine"]
        if hits:
            hit = hits[0]
            return "quarantined", {"check": hit.get("check", ""), "reason": hit.get("reason", "")}
    return "", None


class WebhookService(service.Service):
    """See the module docstring. ``run``: the I/O pool runner; ``agent``: an HTTP client
    (``twisted.web.client.Agent``; replaceable in tests)."""

    def __init__(
        self,
        reactor: Any,
        run: Callable[..., defer.Deferred[Any]],
        outbox: Outbox,
        settings: Any,
        secret: bytes,
        agent: Any = None,
    ) -> None:
        self.reactor = reactor
        self.run = run
        self.outbox = outbox
        self.settings = settings
        self.secret = secret
        self.agent = agent if agent is not None else Agent(reactor, connectTimeout=settings.timeout)  # type: ignore[no-untyped-call]
        self._busy = False
        self._again = False
        self._timer: Any = None
        self.setName("webhooks")  # type: ignore[no-untyped-call]

    # -- from the tracker (any thread) ----------------------------------------------------

    def listener(self, kind: str, queue_id: str, when: float, detail: dict[str, Any]) -> None:
        event, data = payload_of(str(kind), queue_id, when, detail)
        if not event or event not in self.settings.events or not self.settings.urls:
            return
        body = {
            "event": f"message.{event}",
            "time": when,
            "queue_id": queue_id,
            "message_id": detail.get("message_id", ""),
            "data": data,
        }
        self.reactor.callFromThread(self._add, body)

    def _add(self, body: dict[str, Any]) -> None:
        created = float(body["time"])
        rows = []
        for url in self.settings.urls:
            delivery = str(uuid.uuid4())
            raw = json.dumps({"id": delivery, **body}, ensure_ascii=False).encode("utf-8")
            rows.append((delivery, url, body["event"], raw, created))
        d = self.run(self.outbox.add, rows)
        d.addCallbacks(lambda _: self.kick(), lambda f: log.failure("webhooks: outbox write", f))

    # -- sending (reactor thread) ----------------------------------------------------------

    def startService(self) -> None:
        super().startService()  # type: ignore[no-untyped-call]
        self.kick()

    def stopService(self) -> Any:
        super().stopService()  # type: ignore[no-untyped-call]
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None

    def kick(self) -> None:
        """Send what is due now (one pass at a time; a kick during a pass runs another)."""
        if not self.running:
            return
        if self._busy:
            self._again = True
            return
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None
        self._busy = True
        d = self._pass()
        d.addErrback(lambda f: log.failure("webhooks: sending pass failed", f))
        d.addBoth(self._after_pass)

    @defer.inlineCallbacks
    def _pass(self) -> Any:
        now = self.reactor.seconds()
        expired = yield self.run(self.outbox.expire, now - self.settings.max_age)
        for row in expired:
            log.error(
                "webhooks: gave up on {event} {delivery} to {url} after {n} attempt(s)",
                event=row.event,
                delivery=row.delivery,
                url=row.url,
                n=row.attempts,
            )
        rows = yield self.run(self.outbox.due, now)
        if rows:
            yield defer.DeferredList([self._send(row) for row in rows], consumeErrors=True)
            if len(rows) >= 100:
                self._again = True
        next_due = yield self.run(self.outbox.next_due)
        return next_due

    def _after_pass(self, next_due: Any) -> None:
        self._busy = False
        if not self.running:
            return
        if self._again:
            self._again = False
            self.kick()
            return
        if isinstance(next_due, float):
            delay = min(max(0.0, next_due - self.reactor.seconds()), 60.0)
        else:
            delay = 60.0
        self._timer = self.reactor.callLater(delay, self.kick)

    def _send(self, row: Pending) -> defer.Deferred[Any]:
        timestamp = int(self.reactor.seconds())
        headers = Headers(
            {
                b"content-type": [b"application/json"],
                b"user-agent": [USER_AGENT],
                b"x-mailgw-event": [row.event.encode("ascii")],
                b"x-mailgw-delivery": [row.delivery.encode("ascii")],
                b"x-mailgw-timestamp": [str(timestamp).encode("ascii")],
                b"x-mailgw-signature": [sign(self.secret, timestamp, row.body).encode("ascii")],
            }
        )
        d = self.agent.request(
            b"POST",
            row.url.encode("utf-8"),
            headers,
            FileBodyProducer(BytesIO(row.body)),  # type: ignore[no-untyped-call]
        )
        d.addTimeout(self.settings.timeout, self.reactor)

        def answered(response: Any) -> Any:
            code = response.code
            body: defer.Deferred[bytes] = readBody(response)
            body.addErrback(lambda _: b"")
            return body.addCallback(lambda _: code)

        def outcome(code: Any) -> Any:
            if isinstance(code, int) and 200 <= code < 300:
                log.info(
                    "webhooks: {event} {delivery} sent to {url}",
                    event=row.event,
                    delivery=row.delivery,
                    url=row.url,
                )
                return self.run(self.outbox.sent, row.id)
            return self._retry(row, f"HTTP {code}")

        def failed(failure: Any) -> Any:
            return self._retry(row, failure.getErrorMessage() or failure.type.__name__)

        d.addCallback(answered)
        d.addCallbacks(outcome, failed)
        return d

    def _retry(self, row: Pending, error: str) -> defer.Deferred[Any]:
        s = self.settings
        delay = min(s.retry_initial * (2**row.attempts), s.retry_max)
        log.warn(
            "webhooks: {event} {delivery} to {url} failed ({error}); retry in {delay:.0f}s",
            event=row.event,
            delivery=row.delivery,
            url=row.url,
            error=error,
            delay=delay,
        )
        d: defer.Deferred[Any] = self.run(
            self.outbox.failed, row.id, self.reactor.seconds() + delay, error
        )
        return d


def read_secret(path: str) -> bytes:
    """The HMAC key in ``path`` (surrounding whitespace removed); ValueError when it cannot
    be read or is shorter than 16 bytes."""
    try:
        with open(path, "rb") as f:
            secret = f.read().strip()
    except OSError as e:
        raise ValueError(f"cannot read {path}: {e.strerror}") from None
    if len(secret) < 16:
        raise ValueError(f"{path}: the secret needs at least 16 characters")
    return secret


def build_webhooks(config: Any, reactor: Any, run: Callable[..., Any]) -> WebhookService | None:
    """The node's webhook service, or None when ``[webhooks] urls`` is empty; ValueError
    (to be reported as a config error) for a missing or unreadable secret."""
    import os

    from mailgw.webhooks.outbox import DB_NAME

    w = config.webhooks
    if not w.urls:
        return None
    if not w.secret_file:
        raise ValueError("secret_file is needed when urls are set")
    secret = read_secret(w.secret_file)
    outbox = Outbox(os.path.join(config.server.data_dir, DB_NAME))
    return WebhookService(reactor, run, outbox, w, secret)
