"""The IMAP session core: states, command dispatch, continuations, flow control, untagged
updates.

Commands run strictly in order: while one waits (authentication, a long FETCH being written
as the client reads it) later input stays buffered in the :class:`CommandReader`. The
commands themselves live in :mod:`mailgw.imap.commands` (one module per family, found by
name in its table); this module reads them, checks the state, dispatches, and owns what
every command shares: the response methods (``write``, ``ok``, ``no``, ``bad``), the
waiting (``suspend`` / ``done``), long commands in slices, FETCH output paced by the
transport (``stream``) and the untagged updates of the selected mailbox.
"""

from __future__ import annotations

import secrets
import time
from collections.abc import Callable, Generator, Iterator
from typing import TYPE_CHECKING, Any

from twisted.internet.interfaces import IDelayedCall, IPushProducer
from twisted.internet.protocol import Protocol, connectionDone
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from mailgw.imap import parser as p
from mailgw.imap import wire
from mailgw.imap.commands import COMMANDS, NO_EXPUNGE
from mailgw.imap.commands.search import context_updates
from mailgw.imap.contexts import SearchContext
from mailgw.imap.fetch import Fetcher
from mailgw.imap.parser import CommandError, CommandReader
from mailgw.imap.selected import SelectedMailbox, SequenceRangeError
from mailgw.imap.states import AUTHENTICATED, LOGOUT, NOT_AUTHENTICATED, SELECTED
from mailgw.interfaces import MailboxNotFound
from mailgw.net import sasl
from mailgw.net.progress import ProgressWatch
from mailgw.net.proxy import peer_ip
from mailgw.runtime.metrics import IMAP_COMMAND_SECONDS, IMAP_COMMANDS

if TYPE_CHECKING:
    from mailgw.imap.factory import IMAPFactory

__all__ = [
    "AUTHENTICATED",
    "IMAPServer",
    "LOGOUT",
    "MAX_PENDING_INPUT",
    "NOT_AUTHENTICATED",
    "SELECTED",
]

log = Logger()

PREAUTH_MAX_LITERAL = 8192  # LOGIN / AUTHENTICATE arguments before login
PREAUTH_MAX_DEPTH = 4
PREAUTH_MAX_ARGS = 64
MAX_PENDING_INPUT = 256 * 1024  # buffered input while a command runs before reading pauses
# A command written as a generator (SEARCH, SORT, THREAD) runs in slices: each slice ends
# after this much time or this many yields, then the reactor serves other sessions.
WRITING_COMMANDS = frozenset(
    ("APPEND", "CREATE", "DELETE", "RENAME", "SUBSCRIBE", "UNSUBSCRIBE")
    + ("STORE", "EXPUNGE", "COPY", "MOVE")
)
"""Refused with ``NO [READ-ONLY]`` while the store refuses writes (a DR replica)."""
SLICE_SECONDS = 0.02
SLICE_STEPS = 2000


@implementer(IPushProducer)
class _Pump:
    """Writes an iterator of byte chunks to the transport, pausing with it (the transport
    calls pauseProducing when its buffer fills); ``done(error)`` at the end."""

    def __init__(
        self, transport: Any, chunks: Iterator[bytes], done: Callable[[Failure | None], None]
    ) -> None:
        self.transport = transport
        self.chunks = chunks
        self.done = done
        self.paused = False
        self.finished = False
        self._running = False

    def start(self) -> None:
        self.transport.registerProducer(self, True)
        self.resumeProducing()

    def resumeProducing(self) -> None:
        self.paused = False
        if self._running or self.finished:
            return
        self._running = True
        try:
            while not self.paused and not self.finished:
                try:
                    chunk = next(self.chunks)
                except StopIteration:
                    self._finish(None)
                    return
                except Exception:
                    self._finish(Failure())
                    return
                self.transport.write(chunk)
        finally:
            self._running = False

    def pauseProducing(self) -> None:
        self.paused = True

    def stopProducing(self) -> None:
        self.finished = True

    def _finish(self, error: Failure | None) -> None:
        self.finished = True
        self.transport.unregisterProducer()
        self.done(error)


class IMAPServer(Protocol):
    """One IMAP session."""

    factory: IMAPFactory
    transport: Any

    def __init__(self, factory: IMAPFactory) -> None:
        self.factory = factory
        self.config = factory.config
        self.session_id = secrets.token_hex(6)
        self.state = NOT_AUTHENTICATED
        self.secure = factory.implicit_tls
        self.user: str | None = None
        self.selected: SelectedMailbox | None = None
        self.fetcher: Fetcher | None = None
        self.condstore = False
        self.qresync = False
        self.utf8_accept = False  # ENABLE UTF8=ACCEPT (RFC 6855)
        self._timing: tuple[str, float] | None = None  # the running command, for the metrics
        self.rev2 = False  # ENABLE IMAP4rev2 (RFC 9051)
        self.contexts: dict[str, SearchContext] = {}  # RETURN (UPDATE) searches (RFC 5267)
        self.reader = CommandReader(
            max_line=self.config.max_line_length,
            max_literal=PREAUTH_MAX_LITERAL,
            max_depth=PREAUTH_MAX_DEPTH,
            max_args=PREAUTH_MAX_ARGS,
        )
        self.peer = "-"
        # The command being run (name, UID form): decides whether EXPUNGE may be sent.
        self.current: tuple[str, bool] = ("", False)
        self.idle_tag: str | None = None  # the tag of a running IDLE
        self._busy = False
        self._processing = False
        self._closing = False
        self._lost = False
        self._paused = False
        self._errors = 0
        self._line_handler: Callable[[bytes], None] | None = None
        self._timer: IDelayedCall | None = None
        self._delay: IDelayedCall | None = None
        self._pump: _Pump | None = None
        self._counted_ip: str | None = None
        self._login_timer: IDelayedCall | None = None
        self._progress = ProgressWatch(
            factory.reactor,
            self.config.command_timeout,
            self._progress_expired,
            self.config.min_data_rate,
        )
        self._steps: tuple[str, Generator[None, None, None]] | None = None
        self._slice_call: IDelayedCall | None = None

    # -- connection ------------------------------------------------------------------------------

    def connectionMade(self) -> None:
        ip = peer_ip(self.transport.getPeer())
        self.peer = ip or "-"
        # Admission may take a round trip to the main process (IMAP workers): until it
        # answers, input is buffered (and paused beyond MAX_PENDING_INPUT), not processed.
        self._busy = True
        d = self.factory.connection_opened(ip)
        d.addCallback(self._admitted, ip)
        d.addErrback(self._admission_failed)

    def _admitted(self, admitted: bool, ip: str) -> None:
        if self._lost:
            if admitted:  # gone while waiting for the answer
                self.factory.connection_closed(ip)
            return
        if not admitted:
            log.warn(
                "imap {session} refused: too many connections from {peer}",
                session=self.session_id,
                peer=self.peer,
            )
            self.write(wire.untagged_status("BYE", "Too many connections from your address"))
            self.close()
            return
        self._counted_ip = ip
        self._timer = self.factory.reactor.callLater(self.config.idle_timeout, self._timeout)
        if self.config.login_timeout > 0:
            self._login_timer = self.factory.reactor.callLater(
                self.config.login_timeout, self._login_expired
            )
        self.write(
            wire.untagged_status(
                "OK",
                f"{self.factory.hostname} IMAP4rev1 mailgw ready",
                wire.code_capability(self.capabilities()),
            )
        )
        self.done()

    def _admission_failed(self, failure: Failure) -> None:
        log.failure("imap {session}: cannot admit the connection", failure, session=self.session_id)
        if not self._lost:
            self.write(wire.untagged_status("BYE", "Service temporarily unavailable"))
            self.close()

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self._lost = True
        self._closing = True
        for call in (self._timer, self._delay, self._login_timer, self._slice_call):
            if call is not None and call.active():
                call.cancel()
        self._timer = self._delay = self._login_timer = self._slice_call = None
        self._progress.cancel()
        if self._steps is not None:
            self._steps[1].close()
            self._steps = None
        self.reader.close()
        if self._pump is not None:
            self._pump.stopProducing()
            self._pump = None
        if self.user is not None:
            self.factory.logout(self.user, self)
        if self._counted_ip is not None:
            self.factory.connection_closed(self._counted_ip)
            self._counted_ip = None

    def dataReceived(self, data: bytes) -> None:
        if self._closing:
            return
        self.touch()
        self.reader.receive(data)
        self._process()
        self._watch_progress(len(data))

    def _watch_progress(self, received: int) -> None:
        """A command (line and literals) must be complete within ``command_timeout`` plus the
        ``min_data_rate`` allowance (slowloris defence); while the server is busy, what waits
        in the buffer is the server's delay, not the client's."""
        if self._closing or self._busy or not (self.reader.in_command or self.reader.buffered):
            self._progress.finished()
        else:
            self._progress.unfinished(received)

    def _progress_expired(self) -> None:
        log.info("imap {session} command not completed in time", session=self.session_id)
        self.write(wire.untagged_status("BYE", "Command not completed in time"))
        self.close()

    def _login_expired(self) -> None:
        self._login_timer = None
        if self.state != NOT_AUTHENTICATED or self._closing:
            return
        log.info(
            "imap {session} no login in time from {peer}", session=self.session_id, peer=self.peer
        )
        self.write(wire.untagged_status("BYE", "Disconnected for inactivity: no login in time"))
        self.close()

    def touch(self) -> None:
        """The client is active: restart the inactivity timer (longer while idling)."""
        if self._timer is not None and self._timer.active():
            timeout = self.config.idle_timeout
            if self.idle_tag is not None:
                timeout = max(timeout, self.config.idle_command_timeout)
            self._timer.reset(timeout)

    def _timeout(self) -> None:
        self._timer = None
        log.info(
            "imap {session} idle timeout (user {user})", session=self.session_id, user=self.user
        )
        if self._pump is not None:
            self._closing = True
            self.transport.abortConnection()
            return
        self.write(wire.untagged_status("BYE", "Autologout; idle for too long"))
        self.close()

    @property
    def lost(self) -> bool:
        """The connection is gone: a late answer has no one to go to."""
        return self._lost

    @property
    def closing(self) -> bool:
        return self._closing

    def close(self) -> None:
        """End the session (after what was written)."""
        self._closing = True
        self.state = LOGOUT
        self.transport.loseConnection()

    def write(self, data: bytes) -> None:
        if not self._lost:
            self.transport.write(data)

    # -- the command loop ------------------------------------------------------------------------

    def _process(self) -> None:
        if self._processing:
            return
        self._processing = True
        try:
            while not self._busy and not self._closing:
                event = self.reader.next_event()
                if event is None:
                    break
                self._event(event)
        finally:
            self._processing = False
        self._flow_control()

    def _flow_control(self) -> None:
        if self._closing:
            return
        pending = self.reader.buffered if self._busy else 0
        if not self._paused and pending > MAX_PENDING_INPUT:
            self._paused = True
            self.transport.pauseProducing()
        elif self._paused and pending <= MAX_PENDING_INPUT:
            self._paused = False
            self.transport.resumeProducing()

    def suspend(self) -> None:
        """The running command answers later: keep later input buffered until :meth:`done`."""
        self._busy = True

    def done(self) -> None:
        """An asynchronous command has answered: go on with buffered input."""
        self._busy = False
        self._timed()
        self.touch()
        if not self._closing:
            self._process()
            self._watch_progress(0)

    def later(self, delay: float, call: Callable[..., object], *args: object) -> None:
        """Run ``call(*args)`` after ``delay`` seconds unless the connection is lost first
        (a delayed answer, e.g. to a failed authentication)."""

        def run() -> None:
            self._delay = None
            call(*args)

        self._delay = self.factory.reactor.callLater(delay, run)

    def expect_line(self, handler: Callable[[bytes], None]) -> None:
        """The next input is one raw line (a SASL response, IDLE's DONE) for ``handler``."""
        self.reader.expect_line()
        self._line_handler = handler

    def _event(self, event: p.Event) -> None:
        try:
            if isinstance(event, p.Line):
                handler, self._line_handler = self._line_handler, None
                if handler is None:  # cannot happen: lines are only requested with a handler
                    raise RuntimeError("unexpected raw line")
                handler(event.data)
                self._answered()
            elif isinstance(event, p.NeedContinuation):
                self.write(wire.continuation())
            elif isinstance(event, p.BadCommand):
                self._bad_input(event)
            else:
                self._command(event)
        except Exception:
            self.internal_error(Failure(), getattr(event, "tag", None))

    def _bad_input(self, event: p.BadCommand) -> None:
        if event.code == "TOOBIG":
            self.tagged(event.tag, "NO", event.text, wire.TOOBIG)
            return
        self.bad(event.tag, event.text)

    def bad(self, tag: str | None, text: str, code: bytes | None = None) -> None:
        """A BAD answer; too many of them close the session."""
        self.tagged(tag, "BAD", text, code)
        self._errors += 1
        if self._errors >= self.config.max_errors and not self._closing:
            log.info(
                "imap {session} closed after {n} errors", session=self.session_id, n=self._errors
            )
            self.write(wire.untagged_status("BYE", "Too many invalid commands"))
            self.close()

    def tagged(self, tag: str | None, status: str, text: str, code: bytes | None = None) -> None:
        """A tagged (untagged when ``tag`` is None) status response, without updates."""
        if tag is None:
            self.write(wire.untagged_status(status, text, code))
        else:
            self.write(wire.tagged(tag, status, text, code))

    def internal_error(self, failure: Failure, tag: str | None) -> None:
        log.failure(
            "imap {session} user {user}: internal error",
            failure,
            session=self.session_id,
            user=self.user,
        )
        self._line_handler = None
        self.idle_tag = None
        if not self._closing:
            self.tagged(tag, "NO", "Internal server error", wire.SERVERBUG)
        self._busy = False

    def async_error(self, failure: Failure, tag: str) -> None:
        """An errback of a suspended command: NO [SERVERBUG], then go on."""
        if self._lost:
            return
        self.internal_error(failure, tag)
        self.done()

    def _command(self, raw: p.Command) -> None:
        name = raw.name
        self.current = (name, raw.uid)
        if name not in p.COMMAND_NAMES:
            self.bad(raw.tag, "Unknown command")
            return
        self._timing = (name, time.perf_counter())
        try:
            self._dispatch(raw, name)
        finally:
            self._answered()

    def _answered(self) -> None:
        """Count the running command if it has answered: not suspended (else at ``done``) and
        not waiting for a client line (IDLE's DONE, a SASL response: then after that line)."""
        if not self._busy and self._line_handler is None:
            self._timed()

    def _timed(self) -> None:
        """The running command has answered: count it and its time (``mailgw_imap_*``)."""
        timing, self._timing = self._timing, None
        if timing is not None:
            name, started = timing
            IMAP_COMMANDS.labels(name).inc()
            IMAP_COMMAND_SECONDS.labels(name).observe(time.perf_counter() - started)

    def _dispatch(self, raw: p.Command, name: str) -> None:
        command = COMMANDS.get(name)
        if command is None:
            self.tagged(raw.tag, "NO", f"{name} is not supported", wire.CANNOT)
            return
        if self.state not in command.states:
            self.bad(raw.tag, f"{name} is not allowed in the {self.state} state")
            return
        try:
            parsed = p.parse_command(raw, self.utf8_names)
        except CommandError as e:
            p.discard_literals(raw.args)  # an APPEND's spooled literals
            if command.rejected is not None:
                command.rejected(self, raw, e)
            code = e.code.encode("ascii") if e.code else None
            if e.status == "BAD":
                self.bad(raw.tag, e.text, code)
            else:
                self.tagged(raw.tag, e.status, e.text, code)
            return
        if name in WRITING_COMMANDS:
            refusal = self.factory.store.write_refusal()
            if refusal is not None:
                p.discard_literals(raw.args)
                self.tagged(raw.tag, "NO", refusal, wire.READ_ONLY)
                return
        result = command.handler(self, raw.tag, parsed)
        if isinstance(result, Generator):
            self._run_in_slices(raw.tag, result)

    # -- long commands in slices -----------------------------------------------------------------

    def _run_in_slices(self, tag: str, steps: Generator[None, None, None]) -> None:
        """Run a command written as a generator (it yields between units of work, e.g. each
        message a SEARCH reads) in slices of at most ``SLICE_SECONDS`` / ``SLICE_STEPS``,
        going back to the reactor between slices: other sessions of this process are served
        meanwhile, this one waits (its later input stays buffered)."""
        self._busy = True
        self._steps = (tag, steps)
        self._slice()

    def _slice(self) -> None:
        self._slice_call = None
        if self._steps is None:
            return
        tag, steps = self._steps
        seconds = self.factory.reactor.seconds
        deadline = seconds() + SLICE_SECONDS
        try:
            for _ in range(SLICE_STEPS):
                next(steps)
                if seconds() >= deadline:
                    break
            self._slice_call = self.factory.reactor.callLater(0, self._slice)
            return
        except StopIteration:
            pass
        except Exception:
            self.internal_error(Failure(), tag)
        self._steps = None
        self.done()

    # -- output paced by the client ---------------------------------------------------------------

    def stream(self, chunks: Iterator[bytes], finished: Callable[[Failure | None], None]) -> None:
        """Write ``chunks`` as the transport takes them (a FETCH's responses), the session
        waiting meanwhile; then ``finished(error)``, which answers and calls :meth:`done`.
        Not called when the connection is lost first."""

        def end(error: Failure | None) -> None:
            self._pump = None
            if not self._lost:
                finished(error)

        self._busy = True
        self._pump = _Pump(self.transport, chunks, end)
        self._pump.start()

    # -- untagged updates and completion ---------------------------------------------------------

    def updates(self) -> None:
        """Send what changed in the selected mailbox, at a moment that allows it."""
        sel = self.selected
        if sel is None:
            return
        name, uid = self.current
        allow = uid or name not in NO_EXPUNGE
        # Context updates are sent only where EXPUNGE could be; their REMOVEFROM lines use
        # the numbers the client knows before this update's EXPUNGE responses (as Dovecot).
        numbering = list(sel.uids) if self.contexts and allow else None
        try:
            # Every FETCH during a UID command carries the UID (RFC 3501 6.4.8; as Dovecot).
            lines = sel.sync(allow_expunge=allow, uid_fetch=uid)
        except MailboxNotFound:
            self._mailbox_vanished()
            return
        if self.contexts and allow:
            before, after = context_updates(self, numbering)
            lines = before + lines + after
        for line in lines:
            self.write(line)

    def _mailbox_vanished(self) -> None:
        log.info("imap {session}: selected mailbox was deleted", session=self.session_id)
        self.write(wire.untagged_status("BYE", "The selected mailbox was deleted"))
        self.close()

    def ok(self, tag: str, text: str, code: bytes | None = None) -> None:
        """The untagged updates that may be sent now, then a tagged OK."""
        self.updates()
        if not self._closing:
            self.write(wire.tagged(tag, "OK", text, code))

    def no(self, tag: str, text: str, code: bytes | None = None) -> None:
        """The untagged updates that may be sent now, then a tagged NO."""
        self.updates()
        if not self._closing:
            self.write(wire.tagged(tag, "NO", text, code))

    def mailbox_changed(self, folder: str) -> None:
        """Store listener (via the factory): push updates while idling."""
        sel = self.selected
        if sel is None or sel.name != folder or self._closing:
            return
        sel.dirty = True
        if self.idle_tag is not None:
            self.current = ("IDLE", False)
            try:
                self.updates()
            except Exception:
                self.internal_error(Failure(), None)

    # -- state -----------------------------------------------------------------------------------

    def logged_in(self, user: str) -> None:
        """Enter the authenticated state as ``user``: the reader takes the limits of a
        logged-in session."""
        self.user = user
        self.state = AUTHENTICATED
        self.reader.max_literal = self.config.max_literal_size
        self.reader.max_depth = 20
        self.reader.max_args = 100_000
        # large APPEND literals go to a temporary file as they arrive (issue 10); a
        # MULTIAPPEND larger than the user's whole quota could never be stored, so it may
        # not fill the disk with temporary files either
        self.reader.spool = self.factory.spool_literal
        self.reader.spool_above = self.config.literal_memory_max
        self.reader.max_command_literals = self.factory.store.quota_usage(user)[1]

    def logged_out(self) -> None:
        """Back to the not-authenticated state, as after the greeting (UNAUTHENTICATE)."""
        self.unselect()
        if self.user is not None:
            self.factory.logout(self.user, self)
        self.user = None
        self.state = NOT_AUTHENTICATED
        self.condstore = self.qresync = self.utf8_accept = self.rev2 = False
        self.reader.max_literal = PREAUTH_MAX_LITERAL
        self.reader.max_depth = PREAUTH_MAX_DEPTH
        self.reader.max_args = PREAUTH_MAX_ARGS
        self.reader.spool = None
        self.reader.max_command_literals = None

    def select(self, selected: SelectedMailbox, fetcher: Fetcher) -> None:
        """Enter the selected state."""
        self.selected = selected
        self.fetcher = fetcher
        self.state = SELECTED

    def unselect(self) -> None:
        """Leave the selected state (if in it)."""
        self.selected = None
        self.fetcher = None
        self.contexts = {}  # search contexts end with the selection (RFC 5267 4.2)
        self.state = AUTHENTICATED

    def username(self) -> str:
        """The logged-in user (only for commands of the authenticated states)."""
        assert self.user is not None
        return self.user

    def sel(self) -> SelectedMailbox:
        """The selected mailbox (only for commands of the selected state)."""
        assert self.selected is not None
        return self.selected

    def resolve(self, tag: str, seqset: Any, uid: bool) -> list[int] | None:
        """The UIDs a sequence set names; None after answering BAD when it is out of range."""
        sel = self.sel()
        try:
            uids = sel.resolve(seqset, uid)
        except SequenceRangeError as e:
            self.bad(tag, str(e))
            return None
        # A UID command does not need the numbers of messages expunged elsewhere.
        return [u for u in uids if u not in sel.gone] if uid and sel.gone else uids

    def enable_condstore(self) -> None:
        """A CONDSTORE enabling command (RFC 7162 3.1): from now on untagged FETCH responses
        carry MODSEQ; the first one issued while a mailbox is selected also reports the
        mailbox's HIGHESTMODSEQ in an untagged OK."""
        sel = self.selected
        first = not self.condstore
        self.condstore = True
        if sel is None:
            return
        sel.condstore = True
        if first:
            code = wire.code_highestmodseq(sel.mailbox.highestmodseq)
            self.write(wire.untagged_status("OK", "Highest", code))

    # -- capabilities, policy ---------------------------------------------------------------------

    def plaintext_allowed(self) -> bool:
        policy = sasl.PlaintextPolicy(self.config.allow_plaintext_auth)
        return policy.allows(self.secure, self.transport.getPeer)

    @property
    def utf8_names(self) -> bool:
        """Mailbox names travel as UTF-8 (UTF8=ACCEPT or IMAP4rev2 enabled), not mUTF-7."""
        return self.utf8_accept or self.rev2

    def capabilities(self) -> list[str]:
        caps = [
            "IMAP4rev1", "IMAP4rev2", "LITERAL+", "SASL-IR", "ID", "ENABLE", "IDLE", "NAMESPACE"
        ]  # fmt: skip
        if self.state == NOT_AUTHENTICATED:
            if self.factory.tls_options is not None and not self.secure:
                caps.append("STARTTLS")
            if self.plaintext_allowed():
                caps += [f"AUTH={m}" for m in sasl.IMAP.mechanisms]
            else:
                caps.append("LOGINDISABLED")
            return caps
        caps += [
            "UIDPLUS", "MOVE", "UNSELECT", "CHILDREN", "SPECIAL-USE", "LIST-EXTENDED",
            "LIST-STATUS", "ESEARCH", "CONDSTORE", "QRESYNC", "QUOTA", "SEARCHRES", "SORT",
            "SORT=DISPLAY", "THREAD=ORDEREDSUBJECT", "THREAD=REFERENCES", "UNAUTHENTICATE",
            "BINARY", "MULTIAPPEND", "ESORT", "CONTEXT=SEARCH", "CONTEXT=SORT", "UTF8=ACCEPT",
            "STATUS=SIZE",
        ]  # fmt: skip
        return caps
