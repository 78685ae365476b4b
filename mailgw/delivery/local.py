"""Local delivery: takes committed messages from the spool and stores them in user mailboxes.

Each message's work (steps 1-4) runs through the runner ``run`` (``mailgw.runtime.threads``; a
thread pool in the server), in jobs of up to ``batch`` queued messages, at most ``concurrency``
jobs at a time, and a new job is started at most once per reactor turn, so SMTP stays
responsive. Within a job the store's directory fsyncs are shared (group commit,
``IMessageStore.unsynced_deliveries`` when the store has it): each message's file is written
and fsynced, the job fsyncs each Maildir directory it placed messages in once, and only then
records progress or removes the spool copies, so a spool copy still goes only after its
Maildir file, its directory entry and its index row are written and synced. The spool, the store and the
directory are thread-safe; scheduling state lives in the reactor thread only. Flow per
message:

1. ``incoming`` (or a due ``deferred``) -> ``active``.
2. Each recipient not yet in ``envelope.done`` is expanded with ``IDirectory.resolve``. Every
   local user target gets the content via ``IMessageStore.deliver`` with the prefix
   ``Return-Path: <sender>`` (RFC 5321 4.4; ``<>`` for the null sender) and
   ``Delivered-To: user``, into ``envelope.folder`` when the policy set one (``file_into``:
   created when missing; a name the store refuses: INBOX), else INBOX. One user reached
   through several recipients of the same message gets one copy.
3. Progress is recorded in ``envelope.done`` and written with ``ISpool.update`` after each
   successful delivery that is followed by more work, so a crash never repeats a finished
   delivery except the very last one (a duplicate is acceptable, a loss is not):

   - ``"rcpt>user"``: the copy for ``user`` reached through ``rcpt`` is stored;
   - ``"rcpt"``: every local target of ``rcpt`` is stored and it has no external target.
4. Every recipient done -> ``ISpool.remove``. Otherwise the message is *deferred*:
   ``attempts += 1``, ``next_attempt = now + retry_interval``, ``last_error``, state
   ``deferred``. Reasons: ``QuotaExceeded`` / ``OSError`` from the store, a failing directory
   lookup, a recipient that no longer resolves, or an alias target outside our users
   (external) when no relay is configured: such mail stays deferred and is retried, and each
   deferral is logged. With ``max_attempts_age`` set, a message older than that is logged as
   "would bounce".
3b. Permanent failures bounce at once, never wait: a recipient that resolves to nobody
   (``5.1.1``: e.g. a user removed after the message was accepted) and, when this node has
   no relay, a recipient or alias target outside the local domains (``5.4.4``). Before any
   other work on the message, one RFC 3464 DSN for them is queued from the null sender to
   the envelope sender (``mailgw.relay.dsn``; none for a null-sender message, which is
   only logged); once the DSN is committed (in the reactor thread), the failed recipients
   (``"rcpt"``) or targets (``"rcpt>target"``) are recorded in ``envelope.done`` and the
   message is processed again for the rest. A crash in between sends the DSN twice at
   worst, never loses it.
4a. Cluster (``mailbox_map`` set, with a relay): a local user whose mailbox is on another
   node (``IMailboxMap.get(user) != node_name``) is treated as an external target: handed
   over to the relay, which sends it to that node over LMTP (``RelayScheduler.mailboxes``).
4b. With a ``relay`` (``mailgw.relay.scheduler.RelayScheduler``): recipients outside the local
   domains and external alias targets are *handed over* once every local copy is stored: the
   envelope is rewritten in one atomic update to hold only the external targets (``done``
   emptied, arrival time kept) and renamed into ``outbound``; then ``relay.handover(qid)`` is
   called in the reactor thread. One owner at a time: a crash before the rename leaves the
   message in ``active`` (recovered to ``incoming``, dispatched again: its recipients are now
   all external, so it is handed over again, never delivered twice locally nor lost). While a
   local recipient is still failing the message stays deferred here, external targets too.
5. A timer scans ``deferred`` at start and then at the earliest ``next_attempt`` found (at
   most ``retry_interval`` later), and feeds due messages back into step 1.
"""

from __future__ import annotations

import contextlib
from collections import deque
from dataclasses import dataclass
from typing import Any

from twisted.application.service import Service
from twisted.internet.base import DelayedCall
from twisted.internet.defer import Deferred, fail, succeed
from twisted.logger import Logger
from twisted.python.failure import Failure

from mailgw.interfaces import InvalidMailbox, MailboxNotFound, QuotaExceeded
from mailgw.model import Envelope, QueuedMessage
from mailgw.relay.dsn import MAX_ORIGINAL_HEADERS, RecipientStatus, build_dsn, should_bounce
from mailgw.runtime.threads import Runner, run_inline
from mailgw.tracking import NO_TRACKING, Kind, Tracker

log = Logger(namespace="mailgw.delivery")

NO_ROUTE = "No route to this domain: this node does not send mail outside ([relay] is off)"


MAX_DSN_HEADER = 64 * 1024
"""Bytes of the original message read for the DSN's text/rfc822-headers part."""


@dataclass(frozen=True)
class _Finish:
    """A message whose copies are stored but whose directory fsyncs are shared with the
    rest of its job: removed from the spool (``_finish``) once they are done."""

    queue_id: str
    sender: str
    nrcpt: int
    stored: str
    copies: list[tuple[str, int]]
    """(user, UID) of the copies stored by this attempt."""


@dataclass(frozen=True)
class _Bounce:
    """A DSN to queue (in the reactor thread) before the message's processing goes on."""

    dsn: bytes
    sender: str
    done: list[str]
    """``envelope.done`` entries recording the failures once the DSN is queued."""
    failed: list[str]
    reason: str = ""


def delivery_prefix(sender: str, user: str) -> bytes:
    """The header lines put in front of the message for ``user`` (CRLF line ends)."""
    return f"Return-Path: <{sender}>\r\nDelivered-To: {user}\r\n".encode()


class LocalDelivery(Service):
    """Delivers spooled messages to local mailboxes (see the module docstring); ``tracker``
    records each step (``mailgw.tracking``)."""

    name = "delivery"
    tracker: Tracker = NO_TRACKING
    mailbox_map: Any = None
    """``IMailboxMap`` on cluster nodes: a user mapped to a node other than ``node_name``
    is handed to the relay (which forwards over LMTP) instead of stored here."""
    node_name = ""

    def __init__(
        self,
        spool: Any,
        store: Any,
        directory: Any,
        reactor: Any,
        retry_interval: float = 300.0,
        max_attempts_age: float | None = None,
        hostname: str = "localhost",
        run: Runner = run_inline,
        concurrency: int = 4,
        relay: Any = None,
        batch: int = 1,
    ) -> None:
        if retry_interval <= 0:
            raise ValueError("retry_interval must be positive")
        if concurrency < 1:
            raise ValueError("concurrency must be at least 1")
        if batch < 1:
            raise ValueError("batch must be at least 1")
        self.run = run
        self.batch = batch
        self._jobs = 0
        self.relay = relay
        self.concurrency = concurrency
        self.spool = spool
        self.store = store
        self.directory = directory
        self.reactor = reactor
        self.retry_interval = retry_interval
        self.max_attempts_age = max_attempts_age
        self.hostname = hostname
        self._queue: deque[str] = deque()
        self._queued: set[str] = set()
        self._in_flight: set[str] = set()
        self._turn_call: DelayedCall | None = None
        self._retry_call: DelayedCall | None = None
        self._waiters: list[Deferred[None]] = []
        self._delivered_waiters: dict[str, list[Deferred[None]]] = {}
        # DSNs built by deliveries (any thread), queued by the reactor thread.
        self._bounces: deque[tuple[str, str, list[str], bytes, str]] = deque()
        self._listening = False

    # -- service ---------------------------------------------------------------------------

    def startService(self) -> None:
        super().startService()
        requeued = self.spool.recover()
        if requeued:
            log.info("requeued {n} interrupted message(s)", n=len(requeued))
        if not self._listening:
            self.spool.add_listener(self._committed)
            self._listening = True
        for queue_id in self.spool.list("incoming"):
            self._enqueue(queue_id)
        self._scan_deferred()

    def stopService(self) -> None:
        super().stopService()
        for call in (self._turn_call, self._retry_call):
            if call is not None and call.active():
                call.cancel()
        self._turn_call = self._retry_call = None
        # Whatever is queued stays in ``incoming`` on disk and is picked up at next start.
        self._queue.clear()
        self._queued.clear()
        self._fire_waiters()
        for queue_id in list(self._delivered_waiters):
            self._fire_delivered(queue_id)

    # -- observation -----------------------------------------------------------------------

    def pending(self) -> int:
        """Messages waiting for their delivery turn or being delivered (deferred ones are not
        counted)."""
        return len(self._queue) + len(self._in_flight)

    def wait_idle(self) -> Deferred[None]:
        """A Deferred that fires once nothing is queued for delivery or being delivered."""
        if not self.pending():
            return succeed(None)
        d: Deferred[None] = Deferred()
        self._waiters.append(d)
        return d

    def wait_delivered(self, queue_id: str) -> Deferred[None]:
        """A Deferred that fires once the delivery attempt of ``queue_id`` (queued or in
        flight) has finished (synchronous replication waits for it before SMTP's 250); at
        once when it is neither."""
        if queue_id not in self._queued and queue_id not in self._in_flight:
            return succeed(None)
        d: Deferred[None] = Deferred()
        self._delivered_waiters.setdefault(queue_id, []).append(d)
        return d

    def _fire_delivered(self, queue_id: str) -> None:
        for d in self._delivered_waiters.pop(queue_id, []):
            d.callback(None)

    def _fire_waiters(self) -> None:
        waiters, self._waiters = self._waiters, []
        for d in waiters:
            d.callback(None)

    # -- scheduling ------------------------------------------------------------------------

    def deliver_now(self, queue_id: str) -> None:
        """Deliver a message of the ``deferred`` state now, before the next retry scan (the
        admin API after releasing it from the quarantine or from hold). Reactor thread."""
        if self.running:
            self._enqueue(queue_id)

    def _committed(self, queue_id: str) -> None:
        """Spool listener: a new message is in ``incoming``."""
        if self.running:
            self._enqueue(queue_id)

    def _enqueue(self, queue_id: str) -> None:
        if queue_id in self._queued or queue_id in self._in_flight:
            return
        self._queue.append(queue_id)
        self._queued.add(queue_id)
        self._schedule()

    def _schedule(self) -> None:
        """Arrange the next turn if a message waits and a slot is free."""
        if (
            self._turn_call is None
            and self._queue
            and self._jobs < self.concurrency
            and self.running
        ):
            self._turn_call = self.reactor.callLater(0, self._turn)

    def _turn(self) -> None:
        """Start a job of up to ``batch`` messages, then yield to the reactor before the
        next."""
        self._turn_call = None
        ids: list[str] = []
        while self._queue and len(ids) < self.batch:
            queue_id = self._queue.popleft()
            self._queued.discard(queue_id)
            self._in_flight.add(queue_id)
            ids.append(queue_id)
        self._jobs += 1
        self.run(self._process_job, ids).addBoth(self._job_finished, ids)
        self._schedule()

    def _job_finished(self, results: list[Any] | Failure, ids: list[str]) -> None:
        self._jobs -= 1
        if isinstance(results, Failure):  # pragma: no cover - _process_job catches all
            results = [results] * len(ids)
        for queue_id, result in zip(ids, results, strict=True):
            self._finished(result, queue_id)

    def _process_job(self, ids: list[str]) -> list[str | _Bounce | None]:
        """Deliver a job's messages (in a pool thread); their results, in order."""
        unsynced = getattr(self.store, "unsynced_deliveries", None)
        if unsynced is None or len(ids) == 1:
            return [self._process_unbatched(queue_id) for queue_id in ids]
        with unsynced() as batch:
            results = [self._process_safely(queue_id, batch) for queue_id in ids]
            failed = batch.sync()
        # The stored messages leave the spool together: one fsync of active/ for the job.
        removable = [
            r.queue_id
            for r in results
            if isinstance(r, _Finish) and not any(copy in failed for copy in r.copies)
        ]
        remove_many = getattr(self.spool, "remove_many", None)
        removed: dict[str, BaseException] | None = None
        if remove_many is not None and len(removable) > 1:
            removed = remove_many(removable, "active")
        out: list[str | _Bounce | None] = []
        for result in results:
            if isinstance(result, _Finish):
                self._finish(result, failed, removed)
                out.append(None)
            else:
                out.append(result)
        return out

    def _process_unbatched(self, queue_id: str) -> str | _Bounce | None:
        result = self._process_safely(queue_id)
        assert not isinstance(result, _Finish)  # only with a batch
        return result

    def _finish(
        self,
        done: _Finish,
        failed: set[tuple[str, int]],
        removed: dict[str, BaseException] | None = None,
    ) -> None:
        """After the job's directory fsyncs: remove a stored message from the spool, or,
        when one of its copies was taken out again, defer it. ``removed``: the job's
        messages were already removed together (``Spool.remove_many``; its errors)."""
        queue_id = done.queue_id
        try:
            lost = [f"{user} uid={uid}" for user, uid in done.copies if (user, uid) in failed]
            if lost:
                message = self.spool.load(queue_id)
                error = f"directory fsync failed for {', '.join(lost)}"
                self._defer(queue_id, message.envelope, error)
                return
            if removed is None:
                self.spool.remove(queue_id, "active")
            elif queue_id in removed:
                raise removed[queue_id]
            self._log_delivered(queue_id, done.sender, done.nrcpt, done.stored)
        except Exception:
            log.failure("{queue_id} delivery failed unexpectedly", queue_id=queue_id)
            self._defer_after_crash(queue_id)

    def _log_delivered(self, queue_id: str, sender: str, nrcpt: int, stored: str) -> None:
        log.info(
            "{queue_id} delivered: from=<{sender}> nrcpt={nrcpt} to {stored}",
            event="delivered",
            queue_id=queue_id,
            sender=sender,
            nrcpt=nrcpt,
            stored=stored,
        )

    def _finished(self, result: object, queue_id: str) -> None:
        """In the reactor thread, after a message's work (in whichever thread it ran)."""
        if isinstance(result, _Bounce):
            # Still in flight: queue the DSN, record the failures, go on with the rest.
            self._queue_bounce(queue_id, result).addBoth(self._finished, queue_id)
            return
        self._in_flight.discard(queue_id)
        self._fire_delivered(queue_id)
        self._queue_bounces()
        if isinstance(result, Failure):  # pragma: no cover - _process_safely catches all
            log.failure("{queue_id} delivery failed", result, queue_id=queue_id)
        elif result == queue_id and self.relay is not None:
            self.relay.handover(queue_id)
        self._schedule()
        if not self.pending():
            self._fire_waiters()

    def _queue_bounce(self, queue_id: str, bounce: _Bounce) -> Deferred[Any]:
        """Commit the DSN to the spool, then (through ``run``) record the failures and
        process the message again; fires with that processing's result."""
        now = self.reactor.seconds()
        d: Deferred[Any]
        try:
            incoming = self.spool.begin()
            incoming.write(bounce.dsn)
            d = incoming.commit(
                Envelope(
                    sender="",
                    recipients=[bounce.sender],
                    received_at=now,
                    protocol="local",
                    size=len(bounce.dsn),
                )
            )
        except Exception as e:
            d = fail(e)

        def queued(dsn_id: str) -> Deferred[Any]:
            log.info(
                "{queue_id} bounced {rcpts} to <{sender}> as {dsn_id}",
                event="bounced",
                queue_id=queue_id,
                rcpts=",".join(f"<{r}>" for r in bounce.failed),
                sender=bounce.sender,
                dsn_id=dsn_id,
            )
            self.tracker.bounced(
                queue_id,
                bounce.failed,
                bounce.reason,
                dsn_id,
                bounce.sender,
                len(bounce.dsn),
            )
            return self.run(self._after_bounce, queue_id, bounce.done)

        def not_queued(failure: Failure) -> Deferred[Any]:
            log.failure("{queue_id} cannot queue its bounce", failure, queue_id=queue_id)
            return self.run(self._defer_after_crash, queue_id)

        return d.addCallbacks(queued, not_queued)

    def _after_bounce(self, queue_id: str, done: list[str]) -> str | _Bounce | None:
        """Record bounced recipients in ``envelope.done``; process the message again."""
        try:
            message = self.spool.load(queue_id, "active")
            message.envelope.done.extend(e for e in done if e not in message.envelope.done)
            self.spool.update(queue_id, message.envelope, "active")
            self.spool.move(queue_id, "incoming", durable=False, from_state="active")
        except Exception:
            log.failure("{queue_id} cannot record its bounce", queue_id=queue_id)
            self._defer_after_crash(queue_id)
            return None
        return self._process_unbatched(queue_id)

    def _process_safely(self, queue_id: str, batch: Any = None) -> str | _Bounce | _Finish | None:
        """The queue ID when the message was handed over to the relay, a ``_Bounce`` when a
        DSN must be queued first, a ``_Finish`` when it waits for ``batch.sync`` (an
        ``unsynced_deliveries`` batch of the store) to be removed, else None."""
        try:
            return self._process(queue_id, batch)
        except Exception:
            log.failure("{queue_id} delivery failed unexpectedly", queue_id=queue_id)
            self._defer_after_crash(queue_id)
            return None

    def _scan_deferred(self) -> None:
        """Enqueue due deferred messages; re-arm the timer for the next due one."""
        self._retry_call = None
        now = self.reactor.seconds()
        next_scan = now + self.retry_interval
        for queue_id in self.spool.list("deferred"):
            try:
                envelope = self.spool.load(queue_id).envelope
            except KeyError:
                continue
            except ValueError as e:
                self._to_corrupt(queue_id, e)
                continue
            if envelope.next_attempt <= now:
                self._enqueue(queue_id)
            else:
                next_scan = min(next_scan, envelope.next_attempt)
        # A deferral sets next_attempt = now + retry_interval, never before this next scan,
        # and that scan re-arms for it: one pending timer is enough.
        self._retry_call = self.reactor.callLater(next_scan - now, self._scan_deferred)

    # -- delivery of one message -----------------------------------------------------------

    def _process(self, queue_id: str, batch: Any = None) -> str | _Bounce | _Finish | None:
        try:
            message = self.spool.load(queue_id)
        except KeyError:
            log.info("{queue_id} no longer in the spool", queue_id=queue_id)
            return None
        except ValueError as e:
            self._to_corrupt(queue_id, e)
            return None
        envelope: Envelope = message.envelope
        if message.state == "deferred" and envelope.next_attempt > self.reactor.seconds():
            return None
        if message.state not in ("incoming", "deferred"):
            log.info(
                "{queue_id} is {state}, not delivering", queue_id=queue_id, state=message.state
            )
            return None
        # Not fsynced: after a crash, recovery moves active back to incoming anyway.
        self.spool.move(queue_id, "active", durable=False, from_state=message.state)

        errors: list[str] = []
        done = set(envelope.done)
        delivered_users = {entry.split(">", 1)[1] for entry in envelope.done if ">" in entry}
        # Plan: (rcpt, local users still to deliver) and which recipients can complete.
        plan: list[tuple[str, list[str], bool]] = []
        relay_targets: list[str] = []
        # Permanent failures: (recipient, envelope.done entry, status, diagnostic).
        permanent: list[tuple[str, str, str, str]] = []
        for rcpt in envelope.recipients:
            if rcpt in done:
                continue
            try:
                targets = self.directory.resolve(rcpt)
                is_local = bool(targets) or self._is_local(rcpt)
                if not targets and self.relay is not None and not is_local:
                    targets = [rcpt]
                local = [u for u in targets if self.directory.get_user(u) is not None]
                if self.mailbox_map is not None and self.relay is not None:
                    # Cluster: users whose mailbox is on another node go to the relay,
                    # which forwards them there over LMTP.
                    local = [u for u in local if self.mailbox_map.get(u) == self.node_name]
            except Exception as e:
                log.failure("{queue_id} lookup of <{rcpt}> failed", queue_id=queue_id, rcpt=rcpt)
                errors.append(f"<{rcpt}>: directory lookup failed: {e}")
                continue
            external = [u for u in targets if u not in local]
            if not targets:
                if is_local:
                    why = ("5.1.1", f"<{rcpt}>: Recipient address rejected: user unknown")
                else:
                    why = ("5.4.4", f"<{rcpt}>: {NO_ROUTE}")
                log.warn("{queue_id} <{rcpt}>: {why}", queue_id=queue_id, rcpt=rcpt, why=why[1])
                permanent.append((rcpt, rcpt, *why))
                continue
            if self.relay is None:
                for target in external:
                    if f"{rcpt}>{target}" not in done:
                        diagnostic = f"<{rcpt}> -> <{target}>: {NO_ROUTE}"
                        log.warn("{queue_id} {why}", queue_id=queue_id, why=diagnostic)
                        permanent.append((rcpt, f"{rcpt}>{target}", "5.4.4", diagnostic))
                external = []  # bounced: they never wait for a relay this node does not run
            for target in external:
                if target not in relay_targets:
                    relay_targets.append(target)
            todo = [u for u in local if f"{rcpt}>{u}" not in done]
            plan.append((rcpt, todo, not external))

        if permanent:
            entries = [entry for _, entry, _, _ in permanent]
            if should_bounce(envelope):
                with message.open_content() as f:
                    head = f.read(MAX_DSN_HEADER)
                dsn = build_dsn(
                    head,
                    envelope,
                    [RecipientStatus(r, status, "", text) for r, _, status, text in permanent],
                    self.hostname,
                    now=self.reactor.seconds(),
                )
                bounced = list(dict.fromkeys(r for r, _, _, _ in permanent))
                reason = "; ".join(f"{status} {text}" for _, _, status, text in permanent)
                return _Bounce(dsn, envelope.sender, entries, bounced, reason)
            log.warn(
                "{queue_id} failed {rcpts}; null sender, no bounce",
                queue_id=queue_id,
                rcpts=",".join(f"<{r}>" for r, _, _, _ in permanent),
            )
            self.tracker.bounced(
                queue_id,
                list(dict.fromkeys(r for r, _, _, _ in permanent)),
                "; ".join(f"{status} {text}" for _, _, status, text in permanent),
            )
            envelope.done.extend(entries)
            self.spool.update(queue_id, envelope, "active")

        remaining = sum(len(todo) for _, todo, _ in plan)
        copies: list[tuple[str, int]] = []

        def synced() -> None:
            """Before progress is recorded: this message's copies must be durable."""
            if batch is not None and copies and batch.sync() & set(copies):
                raise OSError("the directory fsync of a stored copy failed")

        stored: list[str] = []
        failed: list[RecipientStatus] = []
        for rcpt, todo, completes in plan:
            rcpt_ok = True
            for user in todo:
                remaining -= 1
                if user in delivered_users:
                    log.info(
                        "{queue_id} <{rcpt}> -> {user}: copy already delivered",
                        queue_id=queue_id,
                        rcpt=rcpt,
                        user=user,
                    )
                else:
                    try:
                        uid = self._store_copy(
                            queue_id,
                            user,
                            message,
                            delivery_prefix(envelope.sender, user),
                            envelope.folder,
                        )
                    except InvalidMailbox as e:
                        # Never storable (a user created before names were checked): a
                        # permanent failure, bounced, not retried.
                        log.error(
                            "{queue_id} <{rcpt}> -> {user}: {reason}; failed permanently",
                            queue_id=queue_id,
                            rcpt=rcpt,
                            user=user,
                            reason=e,
                        )
                        failed.append(
                            RecipientStatus(
                                rcpt, "5.1.3", "", "x-mailgw; the mailbox name cannot be stored"
                            )
                        )
                        uid = None
                    except (QuotaExceeded, OSError) as e:
                        rcpt_ok = False
                        reason = "over quota" if isinstance(e, QuotaExceeded) else str(e)
                        errors.append(f"<{rcpt}> -> {user}: {reason}")
                        log.warn(
                            "{queue_id} delivery to {user} failed: {reason}",
                            queue_id=queue_id,
                            user=user,
                            reason=reason,
                        )
                        continue
                    if uid is not None:
                        delivered_users.add(user)
                        copies.append((user, uid))
                        stored.append(f"{user} uid={uid}")
                        self.tracker.record(
                            Kind.DELIVERED,
                            queue_id,
                            addresses=(rcpt, user),
                            recipient=rcpt,
                            user=user,
                            folder="INBOX",
                            uid=uid,
                        )
                envelope.done.append(f"{rcpt}>{user}")
                if completes and rcpt_ok and user == todo[-1]:
                    envelope.done.append(rcpt)
                if remaining:
                    synced()
                    self.spool.update(queue_id, envelope, "active")
            if completes and rcpt_ok and not todo:
                envelope.done.append(rcpt)

        if failed:
            self._bounce(queue_id, message, envelope, failed)
        synced_before_finish = batch is None or not copies
        if errors or relay_targets:
            synced()
        if errors:
            if stored:
                log.info(
                    "{queue_id} delivered to {stored}; other recipients wait",
                    queue_id=queue_id,
                    stored=", ".join(stored),
                )
            if relay_targets:
                errors.append(f"{len(relay_targets)} external target(s) wait for the local ones")
            self._defer(queue_id, envelope, "; ".join(errors))
            return None
        if relay_targets:
            return self._hand_over(queue_id, envelope, relay_targets, stored)
        text = ", ".join(stored) or ("nobody" if failed else "(copies stored earlier)")
        if not synced_before_finish:
            return _Finish(queue_id, envelope.sender, len(envelope.recipients), text, copies)
        self.spool.remove(queue_id, "active")
        self._log_delivered(queue_id, envelope.sender, len(envelope.recipients), text)
        return None

    def _bounce(
        self,
        queue_id: str,
        message: QueuedMessage,
        envelope: Envelope,
        failed: list[RecipientStatus],
    ) -> None:
        """Build the DSN for permanently failed recipients (in the delivery's thread) and
        leave it for ``_finished`` to queue from the reactor thread, from the null sender.
        The failed recipients are recorded as done with the message's next envelope update:
        a crash in between loses the bounce, never mail."""
        reason = "; ".join(f"{f.status} {f.diagnostic}" for f in failed)
        if not should_bounce(envelope):
            log.warn(
                "{queue_id} failed {rcpts}; null sender, no bounce",
                queue_id=queue_id,
                rcpts=",".join(f"<{f.recipient}>" for f in failed),
            )
            self.tracker.bounced(queue_id, [f.recipient for f in failed], reason)
            return
        with message.open_content() as fh:
            head = fh.read(MAX_ORIGINAL_HEADERS)
        dsn = build_dsn(head, envelope, failed, self.hostname, now=self.reactor.seconds())
        self._bounces.append(
            (queue_id, envelope.sender, [f.recipient for f in failed], dsn, reason)
        )

    def _queue_bounces(self) -> None:
        """In the reactor thread: queue the DSNs ``_bounce`` built."""
        while self._bounces:
            queue_id, sender, rcpts, dsn, reason = self._bounces.popleft()
            incoming = self.spool.begin()
            incoming.write(dsn)
            envelope = Envelope(
                sender="",
                recipients=[sender],
                received_at=self.reactor.seconds(),
                protocol="local",
                size=len(dsn),
            )

            def queued(
                dsn_id: str,
                queue_id: str = queue_id,
                rcpts: list[str] = rcpts,
                to: str = sender,
                reason: str = reason,
                size: int = len(dsn),
            ) -> None:
                log.info(
                    "{queue_id} bounced {rcpts} to <{sender}> as {dsn_id}",
                    event="bounced",
                    queue_id=queue_id,
                    rcpts=",".join(f"<{r}>" for r in rcpts),
                    sender=to,
                    dsn_id=dsn_id,
                )
                self.tracker.bounced(queue_id, rcpts, reason, dsn_id, to, size)

            def lost(failure: Failure, queue_id: str = queue_id) -> None:
                log.failure("{queue_id} bounce could not be queued", failure, queue_id=queue_id)

            incoming.commit(envelope).addCallbacks(queued, lost)

    def _store_copy(
        self, queue_id: str, user: str, message: QueuedMessage, prefix: bytes, folder: str
    ) -> int:
        """Store one copy into ``folder`` of ``user`` (the policy's ``file_into``; empty:
        INBOX), creating the folder when missing; a folder name the store refuses gets the
        copy into INBOX instead (logged)."""
        path, offset = message.content_path, message.content_offset
        if not folder or folder.upper() == "INBOX":
            return int(self.store.deliver(user, path, prefix, offset=offset))
        try:
            try:
                return int(self.store.deliver(user, path, prefix, folder, offset))
            except MailboxNotFound:
                with contextlib.suppress(ValueError):  # made meanwhile by someone else
                    self.store.create_mailbox(user, folder)
                    log.info(
                        "{queue_id} created folder {folder} of {user}",
                        queue_id=queue_id,
                        folder=folder,
                        user=user,
                    )
                return int(self.store.deliver(user, path, prefix, folder, offset))
        except InvalidMailbox:
            raise
        except (ValueError, MailboxNotFound) as e:
            log.warn(
                "{queue_id} folder {folder!r} of {user} unusable ({e}): delivered to INBOX",
                queue_id=queue_id,
                folder=folder,
                user=user,
                e=e,
            )
            return int(self.store.deliver(user, path, prefix, offset=offset))

    def _is_local(self, address: str) -> bool:
        return bool(self.directory.is_local_domain(address.rpartition("@")[2].lower()))

    def _hand_over(
        self, queue_id: str, envelope: Envelope, targets: list[str], stored: list[str]
    ) -> str:
        """Rewrite the envelope to the external targets and move it to ``outbound``."""
        outbound = Envelope(
            sender=envelope.sender,
            recipients=targets,
            queue_id=queue_id,
            received_at=envelope.received_at,
            client_address=envelope.client_address,
            client_helo=envelope.client_helo,
            protocol=envelope.protocol,
            body_8bitmime=envelope.body_8bitmime,
            smtputf8=envelope.smtputf8,
            size=envelope.size,
            message_class=envelope.message_class,
            channel=envelope.channel,
        )
        self.spool.update(queue_id, outbound, "active")
        self.spool.move(queue_id, "outbound", from_state="active")
        self.tracker.record(Kind.QUEUED, queue_id, addresses=targets, recipients=list(targets))
        log.info(
            "{queue_id} handed to the relay: to={targets}{local}",
            event="queued",
            queue_id=queue_id,
            targets=",".join(f"<{t}>" for t in targets),
            local=f"; delivered locally to {', '.join(stored)}" if stored else "",
        )
        return queue_id

    def _defer(self, queue_id: str, envelope: Envelope, error: str) -> None:
        now = self.reactor.seconds()
        envelope.attempts += 1
        envelope.next_attempt = now + self.retry_interval
        envelope.last_error = error
        self.spool.update(queue_id, envelope, "active")
        self.spool.move(queue_id, "deferred", from_state="active")
        self.tracker.record(
            Kind.DEFERRED,
            queue_id,
            channel="local",
            reason=error,
            attempts=envelope.attempts,
            next_try=envelope.next_attempt,
            recipients=[r for r in envelope.recipients if r not in envelope.done],
        )
        log.warn(
            "{queue_id} deferred (attempt {attempts}, retry in {delay:.0f}s): {error}",
            event="deferred",
            queue_id=queue_id,
            attempts=envelope.attempts,
            delay=self.retry_interval,
            error=error,
        )
        age = now - envelope.received_at
        if self.max_attempts_age is not None and age > self.max_attempts_age:
            log.warn(
                "{queue_id} queued for {age:.0f}s, would bounce; bounces are not implemented"
                " yet, keeping it deferred",
                queue_id=queue_id,
                age=age,
            )

    def _defer_after_crash(self, queue_id: str) -> None:
        """After an unexpected error, put the message where a retry will find it."""
        try:
            message = self.spool.load(queue_id)
            self._defer(queue_id, message.envelope, "internal error during delivery")
        except Exception:
            log.failure("{queue_id} could not be deferred", queue_id=queue_id)

    def _to_corrupt(self, queue_id: str, error: Exception) -> None:
        log.error("{queue_id} unreadable envelope: {error}", queue_id=queue_id, error=error)
        try:
            self.spool.move(queue_id, "corrupt")
        except (KeyError, OSError) as e:
            log.error("{queue_id} could not move to corrupt: {error}", queue_id=queue_id, error=e)
