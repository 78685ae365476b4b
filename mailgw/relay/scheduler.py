"""The relay scheduler: sends spooled mail to other domains through channels, retries, bounces.

Ownership: local delivery (``mailgw.delivery.local``) dispatches every message; it stores the
local copies and hands the external recipients over by renaming the envelope into the spool's
``outbound`` state and calling ``handover(qid)``. From then on the scheduler owns the message:
``outbound`` (fresh) and ``retry`` (waiting for ``envelope.next_attempt``) are its states, and
it uses ``active`` while sending (a crash there sends the message back through ``incoming``
and local delivery hands it over again).

Scheduling:

- **Bounded active window**: at most ``window`` messages in flight. Fresh mail goes first;
  retries may take at most ``retry_share`` of the window, so a deferred backlog never delays
  fresh mail. Retry times are kept in a heap (filled from ``retry/`` at start and rescanned
  every ``scan_interval``, which also picks up ``mailgw queue flush/release``).
- **Per message**: pending recipients (``recipients`` minus ``done``) are grouped by domain;
  each group is one *job*, at most ``per_domain`` jobs per destination domain at a time.
- **Per job**: MX lookup (null MX / no such domain: bounce at once; DNS failure: defer), then
  ``ChannelSelector.choose(route, exclude)``; the client's ``deliver`` sends through the
  channel (its source address, HELO, TLS policy; smarthost hosts and AUTH), reusing pooled
  sessions per (channel, source, MX address). ``classify`` sorts each recipient's reply:
  OK → ``done`` (recorded in the envelope at once, so a crash never re-sends it), recipient
  or message 5xx → bounce, *channel failure* → the same recipients go at once to the next
  eligible channel (the failed one excluded); when no channel is left they are deferred.
- **After the jobs**: bounces become one RFC 3464 DSN queued with the null sender to the
  envelope sender (never for a null-sender message); deferred recipients get the next
  attempt from the ``RetrySchedule`` (``retry`` state) or, past the maximum age, a bounce.

Every attempt is logged with queue ID, recipients, channel, source address, MX and reply.
"""

from __future__ import annotations

import heapq
import json
import os
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from twisted.application.service import Service
from twisted.internet.base import DelayedCall
from twisted.internet.defer import Deferred, DeferredLock, gatherResults, succeed
from twisted.internet.task import deferLater
from twisted.logger import Logger

from mailgw.model import Envelope, QueuedMessage
from mailgw.relay.channels import DIRECT, Channel, ChannelSelector, MessageRoute, domain_matches
from mailgw.relay.client import (
    CHANNEL_FAILURE,
    OK,
    Classifier,
    ClientOptions,
    ConnectionPool,
    DeliveryResult,
    Target,
    Timeouts,
    Transaction,
    deliver,
)
from mailgw.relay.dsn import RecipientStatus, build_dsn, should_bounce
from mailgw.relay.mx import MXError, MXHost, NoSuchDomain, NullMX
from mailgw.relay.retry_schedule import RetrySchedule
from mailgw.runtime.threads import Runner, run_inline
from mailgw.tracking import NO_TRACKING, Kind, Tracker

log = Logger(namespace="mailgw.relay")

DELIVERED = "delivered"
BOUNCE = "bounce"
DEFER = "defer"


@dataclass(frozen=True)
class RelaySettings:
    """Tunables of the scheduler (from the ``[relay]`` config section)."""

    window: int = 200
    retry_share: float = 0.5
    per_domain: int = 10
    mx_port: int = 25
    max_targets: int = 5
    tls_require_domains: tuple[str, ...] = ()
    timeouts: Timeouts = field(default_factory=Timeouts)
    scan_interval: float = 60.0
    busy_wait: float = 0.05
    status_path: str = ""
    status_interval: float = 10.0
    delay_warning_after: float | None = None  # None: no delay DSNs


@dataclass
class Outcome:
    """What happened to one recipient in this run: delivered, bounce or defer."""

    kind: str
    status: str = ""
    diagnostic: str = ""
    remote: str = ""
    channel: str = ""
    held: bool = False
    """Deferred because the user's mailbox is being moved (retried soon, not on the
    schedule)."""


@dataclass(frozen=True)
class MailboxRouting:
    """Gateway mode (``[cluster] mailbox_nodes``): recipients that are users whose mailbox
    is on a backend node are sent there over LMTP instead of through a channel.

    ``node_of(rcpt)``: the node name, or None for a recipient that is not such a user (a
    blocking call, run through the scheduler's runner); ``held(rcpt)``: its mailbox is being
    moved, keep it queued; ``nodes``: name -> (host, port) of each node's LMTP listener."""

    node_of: Callable[[str], str | None]
    held: Callable[[str], bool]
    nodes: dict[str, tuple[str, int]]
    hold_retry: float = 5.0
    bind_address: str | None = None
    """Source address of the LMTP connections (None: the system's choice)."""


MEMORY_SEND_LIMIT = 256 * 1024
"""Messages up to this size are read with the claim (in the runner) and sent from memory."""


@dataclass
class _Job:
    queue_id: str
    envelope: Envelope
    message: QueuedMessage
    prefix: bytes
    lock: DeferredLock
    data: bytes | None = None
    domains: int = 1


def _status_of(result: DeliveryResult, recipient: str, default: str) -> str:
    reply = result.recipients.get(recipient) or result.reply
    if reply is not None and reply.enhanced:
        return reply.enhanced
    if reply is not None:
        return f"{str(reply.code)[0]}.0.0"
    return default


class RelayScheduler(Service):
    """Sends messages handed over by local delivery (see the module docstring).

    ``resolver``: an ``MXResolver`` (``resolve_mx``, ``resolve_host``); ``run``: the runner
    for spool file work; ``signer``: optional ``signer(envelope, message) -> bytes``
    (header lines put before the message, e.g. DKIM-Signature), run through ``run``;
    ``deliver_fn``: the client's ``deliver`` (replaceable in tests); ``threadpool``: the
    resolver's pool, started and stopped with the service.
    """

    name = "relay"
    tracker: Tracker = NO_TRACKING
    """Records each attempt's outcome, deferrals, bounces (``mailgw.tracking``)."""

    def __init__(
        self,
        spool: Any,
        selector: ChannelSelector,
        resolver: Any,
        reactor: Any,
        schedule: RetrySchedule,
        hostname: str,
        run: Runner = run_inline,
        pool: ConnectionPool | None = None,
        settings: RelaySettings | None = None,
        classifier: Classifier | None = None,
        signer: Callable[[Envelope, QueuedMessage], bytes] | None = None,
        deliver_fn: Callable[..., Deferred[DeliveryResult]] = deliver,
        threadpool: Any = None,
    ) -> None:
        self.threadpool = threadpool
        self.spool = spool
        self.selector = selector
        self.resolver = resolver
        self.reactor = reactor
        self.schedule = schedule
        self.hostname = hostname
        self.run = run
        self.pool = pool if pool is not None else ConnectionPool(reactor)
        self.settings = settings or RelaySettings()
        if self.settings.window < 1 or self.settings.per_domain < 1:
            raise ValueError("window and per_domain must be at least 1")
        self.classifier = classifier or Classifier()
        self.signer = signer
        self.deliver_fn = deliver_fn
        self._fresh: deque[str] = deque()
        self._retry_ready: deque[str] = deque()
        self._queued: set[str] = set()
        self._heap: list[tuple[float, str]] = []
        self._in_flight: dict[str, str] = {}  # queue ID -> "outbound" or "retry"
        self._domain_busy: dict[str, int] = {}
        self._domain_waiters: dict[str, deque[Deferred[None]]] = {}
        self._source_turn: dict[str, int] = {}
        self._timer: DelayedCall | None = None
        self._scan_call: DelayedCall | None = None
        self._status_call: DelayedCall | None = None
        self._idle_waiters: list[Deferred[None]] = []
        self.sent = 0
        self.bounced = 0
        self.deferred = 0
        self.mailboxes: MailboxRouting | None = None
        """Set on gateways: where users' mailboxes are (``MailboxRouting``)."""

    # -- service -----------------------------------------------------------------------------

    def startService(self) -> None:
        if self.threadpool is not None:
            self.threadpool.start()
        super().startService()
        for queue_id in self.spool.list("outbound"):
            self._add_fresh(queue_id)
        self._scan_retry()
        if self.settings.status_path:
            self._write_status()

    def stopService(self) -> Deferred[Any]:
        super().stopService()
        for call in (self._timer, self._scan_call, self._status_call):
            if call is not None and call.active():
                call.cancel()
        self._timer = self._scan_call = self._status_call = None
        self._fresh.clear()
        self._retry_ready.clear()
        self._queued.clear()
        self._heap = []
        if self.settings.status_path:
            self._dump_status()
        d = self.pool.close_all()
        if self.threadpool is not None:
            self.threadpool.stop()
        return d

    # -- observation -------------------------------------------------------------------------

    def pending(self) -> int:
        """Messages waiting for a slot or being sent (not those waiting for a retry time)."""
        return len(self._fresh) + len(self._retry_ready) + len(self._in_flight)

    def wait_idle(self) -> Deferred[None]:
        """Fires once nothing is waiting for a slot or being sent."""
        if not self.pending():
            return succeed(None)
        d: Deferred[None] = Deferred()
        self._idle_waiters.append(d)
        return d

    def queue_summary(self) -> dict[str, int]:
        """Counts for the admin API: in flight, waiting, scheduled retries, totals."""
        return {
            "in_flight": len(self._in_flight),
            "fresh": len(self._fresh),
            "retry_ready": len(self._retry_ready),
            "retry_scheduled": len(self._heap),
            "sent": self.sent,
            "bounced": self.bounced,
            "deferred": self.deferred,
        }

    # -- intake ------------------------------------------------------------------------------

    def handover(self, queue_id: str) -> None:
        """A message was renamed into ``outbound`` (reactor thread)."""
        if self.running:
            self._add_fresh(queue_id)

    def _add_fresh(self, queue_id: str) -> None:
        if queue_id in self._queued or queue_id in self._in_flight:
            return
        self._queued.add(queue_id)
        self._fresh.append(queue_id)
        self._pump()

    def _scan_retry(self) -> None:
        """Rebuild the retry heap from ``retry/`` (start, then every ``scan_interval``)."""
        self._scan_call = None
        d = self.run(self._read_retry_times)

        def done(times: list[tuple[float, str]]) -> None:
            if not self.running:
                return
            self._heap = [
                (t, q) for t, q in times if q not in self._queued and q not in self._in_flight
            ]
            heapq.heapify(self._heap)
            self._wake()
            self._scan_call = self.reactor.callLater(self.settings.scan_interval, self._scan_retry)

        def failed(failure: Any) -> None:
            log.failure("retry queue scan failed", failure)
            if self.running:
                self._scan_call = self.reactor.callLater(
                    self.settings.scan_interval, self._scan_retry
                )

        d.addCallbacks(done, failed)

    def _read_retry_times(self) -> list[tuple[float, str]]:
        times = []
        for queue_id in self.spool.list("retry"):
            try:
                times.append((self.spool.load(queue_id, "retry").envelope.next_attempt, queue_id))
            except (KeyError, ValueError):
                continue
        return times

    def _wake(self) -> None:
        """Move due retries to the ready queue; arm the timer for the next one."""
        if self._timer is not None and self._timer.active():
            self._timer.cancel()  # called by a rescan: one timer at a time
        self._timer = None
        now = self.reactor.seconds()
        while self._heap and self._heap[0][0] <= now:
            _, queue_id = heapq.heappop(self._heap)
            if queue_id not in self._queued and queue_id not in self._in_flight:
                self._queued.add(queue_id)
                self._retry_ready.append(queue_id)
        if self._heap and self.running:
            self._timer = self.reactor.callLater(max(0.0, self._heap[0][0] - now), self._wake)
        self._pump()

    def _schedule_retry(self, queue_id: str, when: float) -> None:
        heapq.heappush(self._heap, (when, queue_id))
        if self._heap[0][1] == queue_id and self.running:
            if self._timer is not None and self._timer.active():
                self._timer.cancel()
            self._timer = self.reactor.callLater(
                max(0.0, when - self.reactor.seconds()), self._wake
            )

    def _pump(self) -> None:
        window = self.settings.window
        retry_slots = max(1, int(window * self.settings.retry_share))
        while self.running and len(self._in_flight) < window:
            if self._fresh:
                queue_id, state = self._fresh.popleft(), "outbound"
            elif self._retry_ready and self._retries_in_flight() < retry_slots:
                queue_id, state = self._retry_ready.popleft(), "retry"
            else:
                break
            self._queued.discard(queue_id)
            self._in_flight[queue_id] = state
            d = Deferred.fromCoroutine(self._send_message(queue_id, state))
            d.addErrback(self._crashed, queue_id)
            d.addBoth(self._finished, queue_id)

    def _retries_in_flight(self) -> int:
        return sum(1 for s in self._in_flight.values() if s == "retry")

    def _crashed(self, failure: Any, queue_id: str) -> None:
        log.failure("{queue_id} relay failed unexpectedly", failure, queue_id=queue_id)
        try:
            self.spool.move(queue_id, "retry")
            self._schedule_retry(queue_id, self.reactor.seconds() + self.schedule.delays[0])
        except (KeyError, OSError):
            log.failure("{queue_id} could not be put back", queue_id=queue_id)

    def _finished(self, _: object, queue_id: str) -> None:
        self._in_flight.pop(queue_id, None)
        self._pump()
        if not self.pending():
            waiters, self._idle_waiters = self._idle_waiters, []
            for d in waiters:
                d.callback(None)

    # -- one message -------------------------------------------------------------------------

    def _claim(self, queue_id: str, state: str, now: float) -> tuple[str, Any, bytes | None]:
        """Runner work: load the message; when it is still in ``state`` (and, for a retry,
        due) move it to ``active`` and read a small content into memory. Returns
        (``"claimed"`` / ``"moved"`` / ``"early"``, the loaded message, content or None)."""
        message = self.spool.load(queue_id, state)
        if message.state != state:
            return "moved", message, None
        if state == "retry" and message.envelope.next_attempt > now:
            return "early", message, None
        self.spool.move(queue_id, "active", False, state)
        data: bytes | None = None
        try:
            with message.open_content() as f:
                data = f.read(MEMORY_SEND_LIMIT + 1)
        except OSError:
            data = None  # the client reports the missing file as before
        if data is not None and len(data) > MEMORY_SEND_LIMIT:
            data = None  # large: streamed from the file
        return "claimed", message, data

    async def _send_message(self, queue_id: str, state: str) -> None:
        try:
            claim, message, data = await self.run(
                self._claim, queue_id, state, self.reactor.seconds()
            )
        except KeyError:
            log.info("{queue_id} no longer queued", queue_id=queue_id)
            return
        except ValueError as e:
            log.error("{queue_id} unreadable envelope: {e}", queue_id=queue_id, e=e)
            await self.run(self.spool.move, queue_id, "corrupt")
            return
        if claim == "moved":
            log.info("{queue_id} is {state} now, skipped", queue_id=queue_id, state=message.state)
            return
        envelope: Envelope = message.envelope
        if claim == "early":
            self._schedule_retry(queue_id, envelope.next_attempt)
            return
        done = set(envelope.done)
        pending = [r for r in envelope.recipients if r not in done]
        prefix = b""
        if self.signer is not None and pending:
            try:
                prefix = await self.run(self.signer, envelope, message)
            except Exception:
                log.failure("{queue_id} signing failed, sending unsigned", queue_id=queue_id)
        job = _Job(queue_id, envelope, message, prefix, DeferredLock(), data)
        groups: dict[str, list[str]] = {}
        nodes: dict[str, list[str]] = {}
        mailboxes = self.mailboxes
        where: dict[str, str | None] = {}
        if mailboxes is not None and pending:
            try:
                where = await self.run(lambda: {r: mailboxes.node_of(r) for r in pending})
            except Exception:
                log.failure("{queue_id} mailbox node lookup failed", queue_id=queue_id)
                where = {r: "" for r in pending}  # "": lookup failed, deferred below
        for rcpt in pending:
            node = where.get(rcpt)
            if node is not None:
                nodes.setdefault(node, []).append(rcpt)
            else:
                groups.setdefault(rcpt.rpartition("@")[2].lower(), []).append(rcpt)
        job.domains = len(groups) + len(nodes)
        results = await gatherResults(
            [Deferred.fromCoroutine(self._send_domain(job, d, r)) for d, r in groups.items()]
            + [Deferred.fromCoroutine(self._send_mailbox(job, n, r)) for n, r in nodes.items()]
        )
        outcomes: dict[str, Outcome] = {}
        for result in results:
            outcomes.update(result)
        await self._settle(job, outcomes)

    async def _send_mailbox(
        self, job: _Job, node: str, recipients: list[str]
    ) -> dict[str, Outcome]:
        """Deliver to users whose mailbox is on ``node`` over LMTP (RFC 2033): a ``250`` for
        a recipient means its copy is stored on the node; ``5xx`` bounces; anything else,
        a node that is down or a held (moving) mailbox, defers."""
        mailboxes = self.mailboxes
        assert mailboxes is not None
        outcomes: dict[str, Outcome] = {}
        address = mailboxes.nodes.get(node) if node else None
        if address is None:
            why = f"mailbox node {node!r} unknown" if node else "mailbox node lookup failed"
            return {r: Outcome(DEFER, "4.3.5", why) for r in recipients}
        try:
            held = await self.run(lambda: {r for r in recipients if mailboxes.held(r)})
        except Exception:
            log.failure("{queue_id} mailbox hold lookup failed", queue_id=job.queue_id)
            held = set(recipients)
        for rcpt in held:
            outcomes[rcpt] = Outcome(
                DEFER, "4.2.1", f"mailbox being moved, held on {self.hostname}", node, held=True
            )
        send = [r for r in recipients if r not in held]
        if not send:
            return outcomes
        envelope = job.envelope
        tx = Transaction(
            sender=envelope.sender,
            recipients=send,
            path=job.message.content_path,
            offset=job.message.content_offset,
            body_8bitmime=envelope.body_8bitmime,
            smtputf8=envelope.smtputf8,
            prefix=job.prefix,
            data=job.data,
        )
        options = ClientOptions(
            helo=self.hostname,
            tls="none",
            timeouts=self.settings.timeouts,
            lmtp=True,
            bind_address=mailboxes.bind_address,
        )
        host, port = address
        result = await self.deliver_fn(
            self.reactor, tx, [Target(node, host, port)], options, self.pool, ("lmtp", node), 1
        )
        delivered = []
        for rcpt in send:
            reply = result.recipients.get(rcpt)
            text = result.describe(rcpt)
            if reply is not None and reply.is_positive:
                outcomes[rcpt] = Outcome(DELIVERED, "2.0.0", text, node)
                delivered.append(rcpt)
                kind = OK
            elif reply is not None and reply.code >= 500:
                outcomes[rcpt] = Outcome(BOUNCE, _status_of(result, rcpt, "5.0.0"), text, node)
                kind = "bounce"
            else:
                status = _status_of(result, rcpt, "4.4.1")
                outcomes[rcpt] = Outcome(DEFER, status, f"via LMTP to {node}: {text}", node)
                kind = "defer"
            self.tracker.record(
                Kind.RELAYED if kind == OK else Kind.ATTEMPT,
                job.queue_id,
                recipient=rcpt,
                channel=f"lmtp:{node}",
                mx=f"{node}[{host}]:{port}",
                source=result.source_address or "",
                tls=False,
                result=kind,
                reply=text,
            )
            log.info(
                "{line}",
                line=f"{job.queue_id} from=<{envelope.sender}> to=<{rcpt}> node={node}"
                f" lmtp={host}:{port} result={kind} reply={text}",
                event="relayed" if kind == OK else "attempt",
                queue_id=job.queue_id,
            )
        if delivered and job.domains > 1:
            await self._record_done(job, delivered)
        elif delivered:
            job.envelope.done.extend(r for r in delivered if r not in job.envelope.done)
        return outcomes

    async def _send_domain(
        self, job: _Job, domain: str, recipients: list[str]
    ) -> dict[str, Outcome]:
        await self._domain_slot(domain)
        try:
            return await self._send_domain_locked(job, domain, recipients)
        finally:
            self._domain_release(domain)

    async def _send_domain_locked(
        self, job: _Job, domain: str, recipients: list[str]
    ) -> dict[str, Outcome]:
        envelope = job.envelope
        route = MessageRoute(
            domain,
            envelope.sender.rpartition("@")[2].lower(),
            envelope.message_class,
            envelope.channel,
        )
        if route.channel and route.channel not in self.selector.channels:
            log.warn(
                "{queue_id} routed to channel {channel}, which this node does not have",
                queue_id=job.queue_id,
                channel=route.channel,
            )
        outcomes: dict[str, Outcome] = {}
        mx_hosts: list[MXHost] | None = None
        needs_mx = any(
            self.selector.channels[n].kind == DIRECT for n in self.selector.eligible(route)
        )
        if needs_mx:
            try:
                mx_hosts = await self.resolver.resolve_mx(domain)
            except MXError as e:
                if isinstance(e, NullMX):
                    status = "5.1.10"
                elif isinstance(e, NoSuchDomain):
                    status = "5.1.2"
                else:
                    status = "4.4.3"
                kind = BOUNCE if e.permanent else DEFER
                log.info(
                    "{queue_id} to={rcpts} mx lookup: {error} ({kind})",
                    queue_id=job.queue_id,
                    rcpts=",".join(f"<{r}>" for r in recipients),
                    error=str(e),
                    kind=kind,
                )
                return {r: Outcome(kind, status, f"DNS: {e}") for r in recipients}
        remaining = list(recipients)
        exclude: list[str] = []
        last: dict[str, Outcome] = {}
        while remaining:
            channel = self.selector.choose(route, exclude)
            if channel is None:
                hint = self.selector.wait_hint(route, exclude)
                if hint is None or not self.running:
                    break
                await deferLater(self.reactor, max(hint, self.settings.busy_wait), lambda: None)
                continue
            try:
                result = await self._attempt(job, channel, domain, remaining, mx_hosts)
            except Exception as e:
                self.selector.release(channel.name, failed=True, error=str(e))
                log.failure(
                    "{queue_id} attempt through {channel} failed",
                    queue_id=job.queue_id,
                    channel=channel.name,
                )
                exclude.append(channel.name)
                continue
            per = result.outcomes(remaining, self.classifier)
            failed_channel = any(o == CHANNEL_FAILURE for o in per.values())
            self.selector.release(channel.name, failed=failed_channel, error=result.describe())
            where = f"{result.mx}[{result.address}]:{result.port}" if result.mx else "-"
            delivered = []
            for rcpt, kind in per.items():
                text = result.describe(rcpt)
                if kind == OK:
                    outcomes[rcpt] = Outcome(DELIVERED, "2.0.0", text, result.mx)
                    delivered.append(rcpt)
                elif kind == CHANNEL_FAILURE:
                    last[rcpt] = Outcome(
                        DEFER,
                        _status_of(result, rcpt, "4.4.1"),
                        f"via {channel.name}: {text}",
                        result.mx,
                        channel.name,
                    )
                else:
                    outcomes[rcpt] = Outcome(
                        BOUNCE, _status_of(result, rcpt, "5.0.0"), text, result.mx
                    )
                self.tracker.record(
                    Kind.RELAYED if kind == OK else Kind.ATTEMPT,
                    job.queue_id,
                    recipient=rcpt,
                    channel=channel.name,
                    mx=where,
                    source=result.source_address or "",
                    tls=bool(result.tls),
                    result=kind,
                    reply=text,
                )
                # The one line per attempt (Postfix's status= line), formatted here: a
                # format with a dozen fields costs twice as much in the log observer.
                log.info(
                    "{line}",
                    line=f"{job.queue_id} from=<{envelope.sender}> to=<{rcpt}>"
                    f" channel={channel.name} source={result.source_address or '-'}"
                    f" mx={where} tls={'yes' if result.tls else 'no'}"
                    f" reused={'yes' if result.reused else 'no'} result={kind} reply={text}",
                    event="relayed" if kind == OK else "attempt",
                    queue_id=job.queue_id,
                )
            if delivered and job.domains == 1 and len(delivered) == len(per):
                # The message's only job, all delivered: it is removed next, so the
                # envelope is not rewritten first (a crash in between re-sends it, as a
                # crash between the remote 250 and the update would).
                job.envelope.done.extend(r for r in delivered if r not in job.envelope.done)
            elif delivered:
                await self._record_done(job, delivered)
            remaining = [r for r in remaining if per[r] == CHANNEL_FAILURE]
            if remaining:
                exclude.append(channel.name)
        for rcpt in remaining:
            outcomes[rcpt] = last.get(rcpt) or Outcome(
                DEFER, "4.4.1", "no eligible channel available"
            )
        return outcomes

    async def _attempt(
        self,
        job: _Job,
        channel: Channel,
        domain: str,
        recipients: list[str],
        mx_hosts: list[MXHost] | None,
    ) -> DeliveryResult:
        source = self._source(channel)
        if channel.kind == DIRECT:
            assert mx_hosts is not None
            targets = [
                Target(h.name, a, self.settings.mx_port)
                for h in mx_hosts
                for a in h.addresses
                if not source or (":" in a) == (":" in source)
            ]
        else:
            targets = []
            for spec in channel.hosts:
                host, port = _split_host(spec)
                for address in await self.resolver.resolve_host(host):
                    targets.append(Target(host, address, port))
        tls = channel.tls
        if any(domain_matches(p, domain) for p in self.settings.tls_require_domains):
            tls = "require"
        options = ClientOptions(
            helo=channel.helo or self.hostname,
            tls=tls,
            auth=channel.auth,
            bind_address=source or None,
            timeouts=self.settings.timeouts,
            tls_hostname=targets[0].name if targets else None,
        )
        envelope = job.envelope
        tx = Transaction(
            sender=envelope.sender,
            recipients=list(recipients),
            path=job.message.content_path,
            offset=job.message.content_offset,
            body_8bitmime=envelope.body_8bitmime,
            smtputf8=envelope.smtputf8,
            prefix=job.prefix,
            data=job.data,
        )
        result: DeliveryResult = await self.deliver_fn(
            self.reactor,
            tx,
            targets,
            options,
            self.pool,
            (channel.name, source),
            self.settings.max_targets,
        )
        if not result.source_address and source:
            result.source_address = source
        return result

    def _source(self, channel: Channel) -> str:
        if not channel.source_addresses:
            return ""
        turn = self._source_turn.get(channel.name, 0)
        self._source_turn[channel.name] = turn + 1
        return channel.source_addresses[turn % len(channel.source_addresses)]

    async def _domain_slot(self, domain: str) -> None:
        if self._domain_busy.get(domain, 0) >= self.settings.per_domain:
            d: Deferred[None] = Deferred()
            self._domain_waiters.setdefault(domain, deque()).append(d)
            await d  # the slot is passed on by _domain_release
            return
        self._domain_busy[domain] = self._domain_busy.get(domain, 0) + 1

    def _domain_release(self, domain: str) -> None:
        waiters = self._domain_waiters.get(domain)
        if waiters:
            d = waiters.popleft()
            if not waiters:
                del self._domain_waiters[domain]
            d.callback(None)  # hand the slot over
            return
        left = self._domain_busy.get(domain, 1) - 1
        if left > 0:
            self._domain_busy[domain] = left
        else:
            self._domain_busy.pop(domain, None)

    async def _record_done(self, job: _Job, recipients: Sequence[str]) -> None:
        """Append delivered recipients to ``done`` and write the envelope (serialised per
        message, so concurrent domain jobs do not overwrite each other)."""
        await job.lock.acquire()
        try:
            job.envelope.done.extend(r for r in recipients if r not in job.envelope.done)
            snapshot = replace(job.envelope, done=list(job.envelope.done))
            await self.run(self.spool.update, job.queue_id, snapshot, "active")
        finally:
            job.lock.release()

    # -- end of a run: done, bounce or defer -------------------------------------------------

    async def _settle(self, job: _Job, outcomes: dict[str, Outcome]) -> None:
        envelope, queue_id = job.envelope, job.queue_id
        now = self.reactor.seconds()
        bounce = {r: o for r, o in outcomes.items() if o.kind == BOUNCE}
        defer = {r: o for r, o in outcomes.items() if o.kind == DEFER}
        self.sent += sum(1 for o in outcomes.values() if o.kind == DELIVERED)
        next_time: float | None = None
        if defer and self.mailboxes is not None and all(o.held for o in defer.values()):
            next_time = now + self.mailboxes.hold_retry  # a move takes moments: no backoff
        elif defer:
            next_time = self.schedule.next_attempt(envelope.attempts + 1, envelope.received_at, now)
            if next_time is None:
                self.tracker.record(
                    Kind.EXPIRED,
                    queue_id,
                    recipients=list(defer),
                    age=now - envelope.received_at,
                    reason="; ".join(f"<{r}>: {o.diagnostic}" for r, o in defer.items()),
                )
                for rcpt, o in defer.items():
                    bounce[rcpt] = Outcome(
                        BOUNCE,
                        o.status if o.status[:1] in "45" else "4.4.7",
                        f"delivery time expired; last error: {o.diagnostic}",
                        o.remote,
                    )
                log.warn(
                    "{queue_id} expired after {age:.0f}s: bouncing {n} recipient(s)",
                    event="expired",
                    queue_id=queue_id,
                    age=now - envelope.received_at,
                    n=len(defer),
                )
                defer = {}
        if bounce:
            await self._bounce(job, bounce, now)
        if not defer:
            await self.run(self.spool.remove, queue_id, "active")
            if len(outcomes) == 1 and not bounce:
                return  # its one attempt line said it all
            log.info(
                "{queue_id} relay finished: from=<{sender}> delivered={n} bounced={b}",
                queue_id=queue_id,
                sender=envelope.sender,
                n=len([r for r in envelope.recipients if r in envelope.done]) - len(bounce),
                b=len(bounce),
            )
            return
        assert next_time is not None
        await self._warn_delay(job, defer, now)
        envelope.attempts += 1
        envelope.next_attempt = next_time
        envelope.last_error = "; ".join(f"<{r}>: {o.diagnostic}" for r, o in defer.items())
        await self.run(self.spool.update, queue_id, envelope, "active")
        await self.run(self.spool.move, queue_id, "retry", True, "active")
        self.deferred += 1
        self._schedule_retry(queue_id, next_time)
        channels = [o.channel for o in defer.values() if o.channel]
        self.tracker.record(
            Kind.DEFERRED,
            queue_id,
            channel=channels[-1] if channels else "",
            reason=envelope.last_error,
            attempts=envelope.attempts,
            next_try=next_time,
            recipients=list(defer),
        )
        log.warn(
            "{queue_id} deferred (attempt {attempts}, next in {delay:.0f}s): {error}",
            event="deferred",
            queue_id=queue_id,
            attempts=envelope.attempts,
            delay=next_time - now,
            error=envelope.last_error,
        )

    async def _warn_delay(self, job: _Job, defer: dict[str, Outcome], now: float) -> None:
        """Once per message, after ``delay_warning_after``: a delay DSN (RFC 3464, Action:
        delayed) to the sender, saying until when delivery will be retried."""
        envelope = job.envelope
        after = self.settings.delay_warning_after
        if after is None or envelope.delay_warned or now - envelope.received_at < after:
            return
        envelope.delay_warned = True  # saved with the deferral's envelope update
        if not should_bounce(envelope):
            return
        headers = await self.run(_read_head, job.message)
        dsn = build_dsn(
            headers,
            envelope,
            [
                RecipientStatus(
                    r, o.status if o.status[:1] == "4" else "4.0.0", o.remote, o.diagnostic
                )
                for r, o in defer.items()
            ],
            self.hostname,
            kind="delay",
            will_retry_until=envelope.received_at + self.schedule.max_age,
            now=now,
        )
        dsn_id = await self._queue_dsn(dsn, envelope.sender, now)
        log.info(
            "{queue_id} delayed {rcpts}: warned <{sender}> as {dsn_id}",
            queue_id=job.queue_id,
            rcpts=",".join(f"<{r}>" for r in defer),
            sender=envelope.sender,
            dsn_id=dsn_id,
        )

    async def _queue_dsn(self, dsn: bytes, recipient: str, now: float) -> str:
        """Queue a DSN from the null sender (never bounced itself)."""
        incoming = self.spool.begin()
        incoming.write(dsn)
        queue_id: str = await incoming.commit(
            Envelope(
                sender="", recipients=[recipient], received_at=now, protocol="local", size=len(dsn)
            )
        )
        return queue_id

    async def _bounce(self, job: _Job, bounce: dict[str, Outcome], now: float) -> None:
        envelope, queue_id = job.envelope, job.queue_id
        self.bounced += len(bounce)
        if should_bounce(envelope):
            headers = await self.run(_read_head, job.message)
            dsn = build_dsn(
                headers,
                envelope,
                [
                    RecipientStatus(
                        r, o.status if o.status[:1] in "45" else "5.0.0", o.remote, o.diagnostic
                    )
                    for r, o in bounce.items()
                ],
                self.hostname,
                now=now,
            )
            dsn_id = await self._queue_dsn(dsn, envelope.sender, now)
            self.tracker.bounced(
                queue_id,
                list(bounce),
                "; ".join(f"<{r}>: {o.status} {o.diagnostic}" for r, o in bounce.items()),
                dsn_id,
                envelope.sender,
                len(dsn),
            )
            log.info(
                "{queue_id} bounced {rcpts} to <{sender}> as {dsn_id}",
                event="bounced",
                queue_id=queue_id,
                rcpts=",".join(f"<{r}>" for r in bounce),
                sender=envelope.sender,
                dsn_id=dsn_id,
            )
        else:
            self.tracker.bounced(
                queue_id,
                list(bounce),
                "; ".join(f"<{r}>: {o.status} {o.diagnostic}" for r, o in bounce.items()),
            )
            log.warn(
                "{queue_id} failed {rcpts}; null sender, no bounce",
                queue_id=queue_id,
                rcpts=",".join(f"<{r}>" for r in bounce),
            )
        await self._record_done(job, list(bounce))

    # -- channel status file -----------------------------------------------------------------

    def status(self) -> dict[str, Any]:
        """Channels and queue counters (``mailgw channel status``, the admin API)."""
        return {
            "updated": self.reactor.seconds(),
            "channels": self.selector.status(),
            "queue": self.queue_summary(),
        }

    def _dump_status(self) -> None:
        path = self.settings.status_path
        tmp = path + ".tmp"
        try:
            os.makedirs(os.path.dirname(path), exist_ok=True)
            with open(tmp, "w", encoding="utf-8") as f:
                json.dump(self.status(), f, indent=1)
            os.replace(tmp, path)
        except OSError as e:
            log.warn("cannot write channel status {path}: {e}", path=path, e=e)

    def _write_status(self) -> None:
        self._status_call = None
        if not self.running:
            return
        self._dump_status()
        self._status_call = self.reactor.callLater(
            self.settings.status_interval, self._write_status
        )


def _read_head(message: QueuedMessage) -> bytes:
    with message.open_content() as f:
        return f.read(64 * 1024)


def _split_host(spec: str) -> tuple[str, int]:
    """``host``, ``host:port``, ``[v6]:port`` → (host, port); port 25 by default."""
    spec = spec.strip()
    if spec.startswith("["):
        host, _, rest = spec[1:].partition("]")
        return host, int(rest[1:]) if rest.startswith(":") else 25
    if spec.count(":") == 1:
        host, _, port = spec.partition(":")
        return host, int(port)
    return spec, 25
