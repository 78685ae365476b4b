"""The IMAP server session: states, command dispatch, authentication, TLS, IDLE, flow control.

Commands run strictly in order: while one waits (authentication, a long FETCH being written
as the client reads it) later input stays buffered in the :class:`CommandReader`. Mailbox
work is delegated to ``selected`` (sequence numbers, untagged updates), ``fetch``,
``search`` and ``mailboxes``; this module only sequences it and writes the responses.
"""

from __future__ import annotations

import base64
import binascii
import secrets
from collections.abc import Callable, Generator, Iterator
from typing import TYPE_CHECKING, Any

from twisted.cred.error import LoginFailed
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IDelayedCall, IPushProducer
from twisted.internet.protocol import Protocol, connectionDone
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from mailgw.directory.penalty import failure_delay
from mailgw.imap import parser as p
from mailgw.imap import wire
from mailgw.imap.contexts import MAX_CONTEXTS, SearchContext, esearch_line, update_lines
from mailgw.imap.fetch import Fetcher, MessageGone, fetch_responses, sets_seen
from mailgw.imap.mailboxes import (
    DELIMITER,
    list_lines,
    select_list_line,
    status_line,
    status_values,
)
from mailgw.imap.parser import CommandError, CommandReader
from mailgw.imap.search import Searcher
from mailgw.imap.selected import SelectedMailbox, SequenceRangeError
from mailgw.imap.sortthread import (
    SortMessage,
    Steps,
    format_threads,
    run_steps,
    sort_messages,
    sort_messages_steps,
    thread_orderedsubject_steps,
    thread_references_steps,
)
from mailgw.interfaces import IMailbox, IMessageStore, MailboxNotFound, QuotaExceeded
from mailgw.model import Address, AddressError
from mailgw.net.progress import ProgressWatch
from mailgw.net.proxy import is_loopback, peer_ip
from mailgw.store.maildir import normalize_flags
from mailgw.store.rows import is_disk_full

if TYPE_CHECKING:
    from mailgw.imap.factory import IMAPFactory

log = Logger()

NOT_AUTHENTICATED = "not authenticated"
AUTHENTICATED = "authenticated"
SELECTED = "selected"
LOGOUT = "logout"

PREAUTH_MAX_LITERAL = 8192  # LOGIN / AUTHENTICATE arguments before login
PREAUTH_MAX_DEPTH = 4
PREAUTH_MAX_ARGS = 64
MAX_PENDING_INPUT = 256 * 1024  # buffered input while a command runs before reading pauses
# A command written as a generator (SEARCH, SORT, THREAD) runs in slices: each slice ends
# after this much time or this many yields, then the reactor serves other sessions.
SLICE_SECONDS = 0.02
SLICE_STEPS = 2000

_ANY = frozenset({"CAPABILITY", "NOOP", "LOGOUT", "ID"})
_NOT_AUTH = frozenset({"STARTTLS", "LOGIN", "AUTHENTICATE"})
_AUTH = frozenset(
    {"SELECT", "EXAMINE", "CREATE", "DELETE", "RENAME", "SUBSCRIBE", "UNSUBSCRIBE", "LIST",
     "LSUB", "STATUS", "APPEND", "ENABLE", "NAMESPACE", "IDLE", "GETQUOTA", "GETQUOTAROOT",
     "UNAUTHENTICATE"}
)  # fmt: skip
_SELECTED = frozenset(
    {"CHECK", "CLOSE", "UNSELECT", "EXPUNGE", "SEARCH", "FETCH", "STORE", "COPY", "MOVE",
     "SORT", "THREAD", "CANCELUPDATE"}
)  # fmt: skip
# Commands during which EXPUNGE responses must not be sent (RFC 3501 7.4.1), unless UID.
_NO_EXPUNGE = frozenset({"FETCH", "STORE", "SEARCH", "SORT", "THREAD"})
_STORE_MODES = {"": "set", "+": "add", "-": "remove"}


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
        self.rev2 = False  # ENABLE IMAP4rev2 (RFC 9051)
        self.contexts: dict[str, SearchContext] = {}  # RETURN (UPDATE) searches (RFC 5267)
        self.reader = CommandReader(
            max_line=self.config.max_line_length,
            max_literal=PREAUTH_MAX_LITERAL,
            max_depth=PREAUTH_MAX_DEPTH,
            max_args=PREAUTH_MAX_ARGS,
        )
        self.peer = "-"
        self._busy = False
        self._processing = False
        self._closing = False
        self._lost = False
        self._paused = False
        self._errors = 0
        self._idle_tag: str | None = None
        self._line_handler: Callable[[bytes], None] | None = None
        self._timer: IDelayedCall | None = None
        self._delay: IDelayedCall | None = None
        self._pump: _Pump | None = None
        self._counted_ip: str | None = None
        self._current: tuple[str, bool] = ("", False)
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
            self._write(wire.untagged_status("BYE", "Too many connections from your address"))
            self._close()
            return
        self._counted_ip = ip
        self._timer = self.factory.reactor.callLater(self.config.idle_timeout, self._timeout)
        if self.config.login_timeout > 0:
            self._login_timer = self.factory.reactor.callLater(
                self.config.login_timeout, self._login_expired
            )
        self._write(
            wire.untagged_status(
                "OK",
                f"{self.factory.hostname} IMAP4rev1 mailgw ready",
                wire.code_capability(self.capabilities()),
            )
        )
        self._done()

    def _admission_failed(self, failure: Failure) -> None:
        log.failure("imap {session}: cannot admit the connection", failure, session=self.session_id)
        if not self._lost:
            self._write(wire.untagged_status("BYE", "Service temporarily unavailable"))
            self._close()

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
        self._touch()
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
        self._write(wire.untagged_status("BYE", "Command not completed in time"))
        self._close()

    def _login_expired(self) -> None:
        self._login_timer = None
        if self.state != NOT_AUTHENTICATED or self._closing:
            return
        log.info(
            "imap {session} no login in time from {peer}", session=self.session_id, peer=self.peer
        )
        self._write(wire.untagged_status("BYE", "Disconnected for inactivity: no login in time"))
        self._close()

    def _touch(self) -> None:
        if self._timer is not None and self._timer.active():
            timeout = self.config.idle_timeout
            if self._idle_tag is not None:
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
        self._write(wire.untagged_status("BYE", "Autologout; idle for too long"))
        self._close()

    def _close(self) -> None:
        self._closing = True
        self.state = LOGOUT
        self.transport.loseConnection()

    def _write(self, data: bytes) -> None:
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

    def _done(self) -> None:
        """An asynchronous command has answered: go on with buffered input."""
        self._busy = False
        self._touch()
        if not self._closing:
            self._process()
            self._watch_progress(0)

    def _event(self, event: p.Event) -> None:
        try:
            if isinstance(event, p.Line):
                handler, self._line_handler = self._line_handler, None
                if handler is None:  # cannot happen: lines are only requested with a handler
                    raise RuntimeError("unexpected raw line")
                handler(event.data)
            elif isinstance(event, p.NeedContinuation):
                self._write(wire.continuation())
            elif isinstance(event, p.BadCommand):
                self._bad_input(event)
            else:
                self._command(event)
        except Exception:
            self._internal_error(Failure(), getattr(event, "tag", None))

    def _bad_input(self, event: p.BadCommand) -> None:
        if event.code == "TOOBIG":
            self._tagged(event.tag, "NO", event.text, wire.TOOBIG)
            return
        self._error(event.tag, event.text)

    def _error(self, tag: str | None, text: str, code: bytes | None = None) -> None:
        """A BAD answer; too many of them close the session."""
        self._tagged(tag, "BAD", text, code)
        self._errors += 1
        if self._errors >= self.config.max_errors and not self._closing:
            log.info(
                "imap {session} closed after {n} errors", session=self.session_id, n=self._errors
            )
            self._write(wire.untagged_status("BYE", "Too many invalid commands"))
            self._close()

    def _tagged(self, tag: str | None, status: str, text: str, code: bytes | None = None) -> None:
        if tag is None:
            self._write(wire.untagged_status(status, text, code))
        else:
            self._write(wire.tagged(tag, status, text, code))

    def _internal_error(self, failure: Failure, tag: str | None) -> None:
        log.failure(
            "imap {session} user {user}: internal error",
            failure,
            session=self.session_id,
            user=self.user,
        )
        self._line_handler = None
        self._idle_tag = None
        if not self._closing:
            self._tagged(tag, "NO", "Internal server error", wire.SERVERBUG)
        self._busy = False

    def _command(self, raw: p.Command) -> None:
        name = raw.name
        self._current = (name, raw.uid)
        if name not in p.COMMAND_NAMES:
            self._error(raw.tag, "Unknown command")
            return
        if not self._allowed(name):
            self._error(raw.tag, f"{name} is not allowed in the {self.state} state")
            return
        try:
            command = p.parse_command(raw, self.utf8_names)
        except CommandError as e:
            p.discard_literals(raw.args)  # an APPEND's spooled literals
            if name == "SEARCH" and self.selected is not None and _saves(raw):
                self.selected.saved = []  # a failed SEARCH RETURN (SAVE) empties $ (RFC 5182)
            if name in ("SELECT", "EXAMINE") and e.status == "NO" and self.selected is not None:
                # A SELECT that fails (a name that cannot exist) leaves no mailbox selected
                # (RFC 3501 6.3.1), as Dovecot: the previous one is closed.
                self._unselect()
                self._write(wire.untagged_status("OK", "Previous mailbox closed", wire.CLOSED))
            if e.status == "BAD":
                self._error(raw.tag, e.text, e.code.encode("ascii") if e.code else None)
            else:
                self._tagged(raw.tag, e.status, e.text, e.code.encode("ascii") if e.code else None)
            return
        handler = getattr(self, "do_" + name.replace("-", "_"), None)
        if handler is None:
            self._tagged(raw.tag, "NO", f"{name} is not supported", wire.CANNOT)
            return
        result = handler(raw.tag, command)
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
            self._internal_error(Failure(), tag)
        self._steps = None
        self._done()

    def _allowed(self, name: str) -> bool:
        if name in _ANY:
            return True
        if self.state == NOT_AUTHENTICATED:
            return name in _NOT_AUTH
        if self.state == AUTHENTICATED:
            return name in _AUTH
        if self.state == SELECTED:
            return name in _AUTH or name in _SELECTED
        return False

    # -- untagged updates and completion ---------------------------------------------------------

    def _updates(self) -> None:
        """Send what changed in the selected mailbox, at a moment that allows it."""
        sel = self.selected
        if sel is None:
            return
        name, uid = self._current
        allow = uid or name not in _NO_EXPUNGE
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
            before, after = self._context_updates(numbering)
            lines = before + lines + after
        for line in lines:
            self._write(line)

    def _context_updates(self, numbering: list[int] | None) -> tuple[list[bytes], list[bytes]]:
        """The updates of the live search contexts whose mailbox state changed since they were
        last evaluated: the REMOVEFROM lines of expunged messages (numbered as before this
        update: they go before its EXPUNGE responses) and the lines of the other changes
        (numbered as after it)."""
        sel = self._sel()
        mark = self._context_mark()
        old_seq: Callable[[int], int] = sel.seq_of
        if numbering is not None:
            positions = {u: n for n, u in enumerate(numbering, 1)}
            old_seq = positions.__getitem__
        before: list[bytes] = []
        after: list[bytes] = []

        def exists(uid: int) -> bool:
            return bool(sel.seq_of(uid))

        for context in self.contexts.values():
            if context.mark == mark:
                continue
            context.mark = mark
            now = self._evaluate(context)
            if context.uid:
                first, then = update_lines(context, now, exists, _identity, _identity)
            else:
                first, then = update_lines(context, now, exists, old_seq, sel.seq_of)
            before += [first] if first is not None else []
            after += [then] if then is not None else []
        return before, after

    def _context_mark(self) -> tuple[int, int, int]:
        """What a context's result can depend on, cheaply: flag changes and expunges raise the
        mailbox's HIGHESTMODSEQ, new messages the count and the last UID."""
        sel = self._sel()
        return (int(sel.mailbox.highestmodseq), len(sel.uids), sel.uids[-1] if sel.uids else 0)

    def _evaluate(self, context: SearchContext) -> list[int]:
        """The current result of a live context, as UIDs in result order."""
        found = self._search(context.key)
        if context.criteria is None:
            return found
        need = any(name not in ("ARRIVAL", "SIZE") for name, _rev in context.criteria)
        messages = run_steps(self._sort_messages(found, need, True))
        return [m.number for m in sort_messages(messages, context.criteria)]

    def _mailbox_vanished(self) -> None:
        log.info("imap {session}: selected mailbox was deleted", session=self.session_id)
        self._write(wire.untagged_status("BYE", "The selected mailbox was deleted"))
        self._close()

    def _ok(self, tag: str, text: str, code: bytes | None = None) -> None:
        self._updates()
        if not self._closing:
            self._write(wire.tagged(tag, "OK", text, code))

    def _no(self, tag: str, text: str, code: bytes | None = None) -> None:
        self._updates()
        if not self._closing:
            self._write(wire.tagged(tag, "NO", text, code))

    def mailbox_changed(self, folder: str) -> None:
        """Store listener (via the factory): push updates while idling."""
        sel = self.selected
        if sel is None or sel.name != folder or self._closing:
            return
        sel.dirty = True
        if self._idle_tag is not None:
            self._current = ("IDLE", False)
            try:
                self._updates()
            except Exception:
                self._internal_error(Failure(), None)

    # -- capabilities, policy ---------------------------------------------------------------------

    def plaintext_allowed(self) -> bool:
        if self.secure:
            return True
        mode = self.config.allow_plaintext_auth
        if mode == "yes":
            return True
        return mode == "loopback" and is_loopback(self.transport.getPeer())

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
                caps += ["AUTH=PLAIN", "AUTH=LOGIN"]
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

    def do_CAPABILITY(self, tag: str, command: p.Simple) -> None:
        self._write(wire.untagged(b"CAPABILITY", " ".join(self.capabilities())))
        self._ok(tag, "CAPABILITY completed")

    def do_NOOP(self, tag: str, command: p.Simple) -> None:
        if self.selected is not None:
            self.selected.dirty = True
        self._ok(tag, "NOOP completed")

    def do_CHECK(self, tag: str, command: p.Simple) -> None:
        self.do_NOOP(tag, command)

    def do_LOGOUT(self, tag: str, command: p.Simple) -> None:
        self._write(wire.untagged_status("BYE", "Logging out"))
        self._write(wire.tagged(tag, "OK", "LOGOUT completed"))
        self._close()

    def do_ID(self, tag: str, command: p.Id) -> None:
        self._write(wire.untagged(b'ID ("name" "mailgw" "vendor" "mailgw")'))
        self._ok(tag, "ID completed")

    def do_STARTTLS(self, tag: str, command: p.Simple) -> None:
        if self.secure:
            self._tagged(tag, "BAD", "TLS is already active")
            return
        if self.factory.tls_options is None:
            self._tagged(tag, "NO", "TLS is not available", wire.UNAVAILABLE)
            return
        self._write(wire.tagged(tag, "OK", "Begin TLS negotiation now"))
        dropped = self.reader.discard_buffered()
        if dropped:
            # Plaintext pipelined after STARTTLS must never run as if it came over TLS.
            log.warn(
                "imap {session} discarding {n} bytes sent after STARTTLS from {peer}",
                session=self.session_id,
                n=dropped,
                peer=self.peer,
            )
        self.transport.startTLS(self.factory.tls_options)
        self.secure = True

    # -- authentication ---------------------------------------------------------------------------

    def do_LOGIN(self, tag: str, command: p.Login) -> None:
        if not self.plaintext_allowed():
            self._tagged(tag, "NO", "Use STARTTLS first", wire.PRIVACYREQUIRED)
            return
        try:
            name = command.username.decode("utf-8")
            password = command.password.decode("utf-8")
        except UnicodeDecodeError:
            self._busy = True
            self._fail_later(tag)
            return
        self._authenticate(tag, name, password)

    def do_AUTHENTICATE(self, tag: str, command: p.Authenticate) -> None:
        if command.mechanism not in ("PLAIN", "LOGIN"):
            self._tagged(tag, "NO", "Unsupported authentication mechanism", wire.CANNOT)
            return
        if not self.plaintext_allowed():
            self._tagged(tag, "NO", "Use STARTTLS first", wire.PRIVACYREQUIRED)
            return
        if command.mechanism == "LOGIN":
            if command.initial_response is not None:
                self._auth_login_user(tag, command.initial_response, initial=True)
            else:
                self._challenge(b"Username:", lambda line: self._auth_login_user(tag, line))
            return
        if command.initial_response is not None:
            self._auth_plain(tag, command.initial_response, initial=True)
            return
        self._challenge(b"", lambda line: self._auth_plain(tag, line))

    def _challenge(self, text: bytes, handler: Callable[[bytes], None]) -> None:
        """A SASL continuation (``+ base64``); the client's answer goes to ``handler``."""
        self._write(b"+ " + base64.b64encode(text) + b"\r\n")
        self.reader.expect_line()
        self._line_handler = handler

    def _sasl_decode(self, tag: str, response: bytes, initial: bool) -> bytes | None:
        """A client SASL response decoded; None (after answering BAD) when cancelled with
        ``*`` (RFC 3501 6.2.2) or not base64."""
        if response.strip() == b"*":
            self._error(tag, "Authentication cancelled")
            return None
        if initial and response == b"=":
            return b""
        try:
            return base64.b64decode(response.strip(), validate=True)
        except (binascii.Error, ValueError):
            self._error(tag, "Invalid base64 data")
            return None

    def _auth_login_user(self, tag: str, response: bytes, initial: bool = False) -> None:
        raw = self._sasl_decode(tag, response, initial)
        if raw is None:
            return
        self._challenge(b"Password:", lambda line: self._auth_login_password(tag, raw, line))

    def _auth_login_password(self, tag: str, user: bytes, response: bytes) -> None:
        password = self._sasl_decode(tag, response, False)
        if password is None:
            return
        try:
            name, secret = user.decode("utf-8"), password.decode("utf-8")
        except UnicodeDecodeError:
            self._busy = True
            self._fail_later(tag)
            return
        self._authenticate(tag, name, secret)

    def _auth_plain(self, tag: str, response: bytes, initial: bool = False) -> None:
        raw = self._sasl_decode(tag, response, initial)
        if raw is None:
            return
        parts = raw.split(b"\0")
        if len(parts) != 3:
            self._error(tag, "Invalid PLAIN response")
            return
        try:
            authzid, authcid, password = (x.decode("utf-8") for x in parts)
        except UnicodeDecodeError:
            self._error(tag, "Invalid PLAIN response")
            return
        if authzid and _normalise(authzid) != _normalise(authcid):
            self._busy = True
            self._fail_later(tag)
            return
        self._authenticate(tag, authcid, password)

    def _authenticate(self, tag: str, name: str, password: str) -> None:
        key = _normalise(name)
        self._busy = True
        if key is None:
            self._fail_later(tag)
            return
        d = self.factory.auth.check_password(key, password, self.peer)
        d.addCallbacks(
            self._authenticated,
            self._not_authenticated,
            callbackArgs=(tag, key),
            errbackArgs=(tag, key),
        )
        d.addErrback(self._async_error, tag)

    def _authenticated(self, user: Any, tag: str, key: str) -> Deferred[None] | None:
        if self._lost:
            return None
        name = getattr(user, "name", None)
        canonical = name if isinstance(name, str) and name else key
        # The registration may be a round trip to the main process (IMAP workers); errors in
        # it reach _authenticate's errback (NO [SERVERBUG]).
        return self.factory.login(canonical, self).addCallback(self._registered, tag, canonical)

    def _registered(self, admitted: bool, tag: str, canonical: str) -> None:
        if self._lost:
            if admitted:  # gone while waiting for the answer
                self.factory.logout(canonical, self)
            return
        if not admitted:
            log.info(
                "imap {session} {user}: too many sessions", session=self.session_id, user=canonical
            )
            self._tagged(tag, "NO", "Too many sessions for this user", wire.LIMIT)
            self._done()
            return
        self.user = canonical
        self.state = AUTHENTICATED
        self.reader.max_literal = self.config.max_literal_size
        self.reader.max_depth = 20
        self.reader.max_args = 100_000
        # large APPEND literals go to a temporary file as they arrive (issue 10); a
        # MULTIAPPEND larger than the user's whole quota could never be stored, so it may
        # not fill the disk with temporary files either
        self.reader.spool = self.factory.spool_literal
        self.reader.spool_above = self.config.literal_memory_max
        self.reader.max_command_literals = self.factory.store.quota_usage(canonical)[1]
        log.info(
            "imap {session} login {user} from {peer}",
            session=self.session_id,
            user=canonical,
            peer=self.peer,
        )
        self._write(wire.tagged(tag, "OK", "Logged in", wire.code_capability(self.capabilities())))
        self._done()

    def _not_authenticated(self, failure: Failure, tag: str, key: str) -> None:
        if self._lost:
            return
        if failure.check(LoginFailed):
            log.info(
                "imap {session} authentication failed for {user} from {peer}",
                session=self.session_id,
                user=key,
                peer=self.peer,
            )
            self._fail_later(tag, failure_delay(failure, self.factory.auth_failure_delay))
            return
        log.failure("imap {session}: directory error", failure, session=self.session_id)
        self._tagged(tag, "NO", "Authentication temporarily unavailable", wire.UNAVAILABLE)
        self._done()

    def _fail_later(self, tag: str, delay: float | None = None) -> None:
        if delay is None:
            delay = self.factory.auth_failure_delay
        self._delay = self.factory.reactor.callLater(delay, self._failed_reply, tag)

    def _failed_reply(self, tag: str) -> None:
        self._delay = None
        self._tagged(tag, "NO", "Authentication failed", wire.AUTHENTICATIONFAILED)
        self._done()

    def _async_error(self, failure: Failure, tag: str) -> None:
        if self._lost:
            return
        self._internal_error(failure, tag)
        self._done()

    # -- authenticated state ----------------------------------------------------------------------

    def _user(self) -> str:
        assert self.user is not None
        return self.user

    def do_ENABLE(self, tag: str, command: p.Enable) -> None:
        enabled = []
        for cap in command.capabilities:
            if cap == "CONDSTORE" and not self.condstore:
                self.condstore = True
                enabled.append(cap)
            elif cap == "QRESYNC" and not self.qresync:
                self.qresync = self.condstore = True  # QRESYNC implies CONDSTORE (RFC 7162)
                enabled.append(cap)
            elif cap == "UTF8=ACCEPT" and not self.utf8_accept:
                self.utf8_accept = True
                enabled.append(cap)
            elif cap == "IMAP4REV2" and not self.rev2:
                self.rev2 = True
                enabled.append("IMAP4rev2")
        if self.selected is not None:
            self.selected.condstore = self.condstore
            self.selected.qresync = self.qresync
            self.selected.rev2 = self.rev2
        self._write(wire.untagged(b"ENABLED", " ".join(enabled)) if enabled else b"* ENABLED\r\n")
        self._ok(tag, "ENABLE completed")

    def do_UNAUTHENTICATE(self, tag: str, command: p.Simple) -> None:
        """RFC 8437: back to the not-authenticated state, as after the greeting."""
        self._unselect()
        if self.user is not None:
            self.factory.logout(self.user, self)
        log.info("imap {session} unauthenticate {user}", session=self.session_id, user=self.user)
        self.user = None
        self.state = NOT_AUTHENTICATED
        self.condstore = self.qresync = self.utf8_accept = self.rev2 = False
        self.reader.max_literal = PREAUTH_MAX_LITERAL
        self.reader.max_depth = PREAUTH_MAX_DEPTH
        self.reader.max_args = PREAUTH_MAX_ARGS
        self.reader.spool = None
        self.reader.max_command_literals = None
        self._write(wire.tagged(tag, "OK", "UNAUTHENTICATE completed"))

    def do_NAMESPACE(self, tag: str, command: p.Simple) -> None:
        self._write(wire.untagged(b'NAMESPACE (("" "/")) NIL NIL'))
        self._ok(tag, "NAMESPACE completed")

    def _unselect(self) -> None:
        self.selected = None
        self.fetcher = None
        self.contexts = {}  # search contexts end with the selection (RFC 5267 4.2)
        self.state = AUTHENTICATED

    def do_SELECT(self, tag: str, command: p.Select) -> None:
        if self.selected is not None:
            self._unselect()
            self._write(wire.untagged_status("OK", "Previous mailbox closed", wire.CLOSED))
        if command.qresync is not None and not self.qresync:
            self._error(tag, "QRESYNC is not enabled")
            return
        user = self._user()
        try:
            mailbox = self.factory.store.open_mailbox(user, command.mailbox)
        except (MailboxNotFound, ValueError):
            self._tagged(tag, "NO", "No such mailbox", wire.NONEXISTENT)
            return
        if command.condstore:
            self.condstore = True
        readonly = command.readonly

        def claim(uids: list[int]) -> set[int]:
            # \Recent lives in the store (shared by every process); EXAMINE claims nothing.
            if readonly:
                return mailbox.unclaimed_recent(uids)
            return mailbox.claim_recent(uids)

        sel = SelectedMailbox(mailbox, readonly, claim, self.condstore, self.qresync)
        sel.rev2 = self.rev2
        self.selected = sel
        self.fetcher = Fetcher(user, sel, self.factory.cache)
        sel.on_gone = self.fetcher.forget  # expunged: its cached structure goes too
        self.state = SELECTED
        for line in sel.select_responses():
            self._write(line)
        if self.rev2:
            # RFC 9051 6.3.2: a LIST response with the mailbox's name and attributes.
            names = self.factory.store.list_mailboxes(user)
            self._write(select_list_line(str(mailbox.name), names, self.utf8_names))
        if command.qresync is not None:
            for line in sel.resync(command.qresync):
                self._write(line)
        code = wire.READ_ONLY if readonly else wire.READ_WRITE
        self._write(
            wire.tagged(tag, "OK", f"{'EXAMINE' if readonly else 'SELECT'} completed", code)
        )

    do_EXAMINE = do_SELECT

    def do_CREATE(self, tag: str, command: p.Create) -> None:
        name = command.mailbox.rstrip(DELIMITER)
        if not name or name.upper() == "INBOX":
            self._no(tag, "Mailbox already exists", wire.ALREADYEXISTS)
            return
        store = self.factory.store
        if name in store.list_mailboxes(self._user()):
            self._no(tag, "Mailbox already exists", wire.ALREADYEXISTS)
            return
        try:
            store.create_mailbox(self._user(), name)
        except ValueError as e:
            self._no(tag, f"Cannot create mailbox: {e}", wire.CANNOT)
            return
        self._ok(tag, "CREATE completed")

    def do_DELETE(self, tag: str, command: p.Delete) -> None:
        user = self._user()
        if command.mailbox == "INBOX":
            self._no(tag, "INBOX cannot be deleted", wire.CANNOT)
            return
        delete = self.factory.store.delete_mailbox
        names = self.factory.store.list_mailboxes(user)
        if command.mailbox not in names:
            prefix = command.mailbox + DELIMITER
            if any(name.startswith(prefix) for name in names):
                # Only a level implied by its children (\Noselect): an error (RFC 3501
                # 6.3.4). IMAP4rev2 has a code for it (RFC 9051 7.1); IMAP4rev1 clients get
                # NONEXISTENT, as from Dovecot.
                code = wire.HASCHILDREN if self.rev2 else wire.NONEXISTENT
                self._no(tag, "Mailbox has children", code)
                return
            self._no(tag, "No such mailbox", wire.NONEXISTENT)
            return
        if self.selected is not None and self.selected.name == command.mailbox:
            self._unselect()
        try:
            delete(user, command.mailbox)
        except MailboxNotFound:
            self._no(tag, "No such mailbox", wire.NONEXISTENT)
            return
        except ValueError as e:
            self._no(tag, f"Cannot delete mailbox: {e}", wire.CANNOT)
            return
        self._ok(tag, "DELETE completed")

    def do_RENAME(self, tag: str, command: p.Rename) -> None:
        user = self._user()
        rename = self.factory.store.rename_mailbox
        names = self.factory.store.list_mailboxes(user)
        target = command.target.rstrip(DELIMITER)
        if command.source not in names:
            self._no(tag, "No such mailbox", wire.NONEXISTENT)
            return
        if target in names or target.upper() == "INBOX":
            self._no(tag, "Target mailbox already exists", wire.ALREADYEXISTS)
            return
        try:
            rename(user, command.source, target)
        except MailboxNotFound:
            self._no(tag, "No such mailbox", wire.NONEXISTENT)
            return
        except ValueError as e:
            self._no(tag, f"Cannot rename mailbox: {e}", wire.CANNOT)
            return
        self._ok(tag, "RENAME completed")

    def _subscribed(self) -> set[str]:
        return set(self.factory.store.list_subscribed(self._user()))

    def _subscribe(self, tag: str, mailbox: str, on: bool) -> None:
        if on and mailbox not in self.factory.store.list_mailboxes(self._user()):
            self._no(tag, "No such mailbox", wire.NONEXISTENT)
            return
        self.factory.store.set_subscribed(self._user(), mailbox, on)
        self._ok(tag, ("SUBSCRIBE" if on else "UNSUBSCRIBE") + " completed")

    def do_SUBSCRIBE(self, tag: str, command: p.Subscribe) -> None:
        self._subscribe(tag, command.mailbox, True)

    def do_UNSUBSCRIBE(self, tag: str, command: p.Unsubscribe) -> None:
        self._subscribe(tag, command.mailbox, False)

    def do_LIST(self, tag: str, command: p.ListMailboxes) -> None:
        names = self.factory.store.list_mailboxes(self._user())
        need_subs = "SUBSCRIBED" in command.selection or "SUBSCRIBED" in command.returns
        subscribed = self._subscribed() if need_subs else set()

        def status(name: str) -> bytes | None:
            return self._status_line(name, command.status_items)

        for line in list_lines(command, names, subscribed, utf8=self.utf8_names, status=status):
            self._write(line)
        self._ok(tag, "LIST completed")

    def do_LSUB(self, tag: str, command: p.Lsub) -> None:
        names = self.factory.store.list_mailboxes(self._user())
        patterns = (command.pattern,) if command.pattern is not None else ()
        listing = p.ListMailboxes(command.reference, patterns)
        for line in list_lines(listing, names, self._subscribed(), lsub=True, utf8=self.utf8_names):
            self._write(line)
        self._ok(tag, "LSUB completed")

    def _status_line(self, name: str, items: tuple[str, ...]) -> bytes | None:
        user = self._user()
        try:
            mailbox: Any = self.factory.store.open_mailbox(user, name)
        except (MailboxNotFound, ValueError):
            return None
        recent = mailbox.recent_count() if "RECENT" in items else 0
        return status_line(mailbox.name, status_values(mailbox, items, recent), self.utf8_names)

    def do_STATUS(self, tag: str, command: p.Status) -> None:
        line = self._status_line(command.mailbox, command.items)
        if line is None:
            self._no(tag, "No such mailbox", wire.NONEXISTENT)
            return
        if "HIGHESTMODSEQ" in command.items:
            _enable_condstore(self)  # a CONDSTORE enabling command (RFC 7162 3.1)
        self._write(line)
        self._ok(tag, "STATUS completed")

    def do_APPEND(self, tag: str, command: p.Append) -> None:
        if any(not message.data for message in command.messages):
            _close_literals(command)
            self._no(tag, "Empty messages are not stored", wire.CANNOT)
            return
        # The date-time keeps its zone (FETCH INTERNALDATE, SEARCH BEFORE/ON/SINCE).
        messages = [(m.data, m.flags, m.date) for m in command.messages]
        # The writes and fsyncs run in the I/O pool (the factory's runner): other sessions
        # go on meanwhile; this one waits (commands run in order). All or none (RFC 3502).
        # Spooled literals are read from their files there, then deleted.
        self._busy = True
        d = self.factory.run_blocking(
            self.factory.store.append_messages, self._user(), command.mailbox, messages
        )
        d.addBoth(_passing(_close_literals, command))
        d.addCallbacks(self._appended, self._append_failed, callbackArgs=(tag,), errbackArgs=(tag,))

    def _appended(self, result: tuple[int, list[int]], tag: str) -> None:
        if self._lost:
            return
        uidvalidity, uids = result
        self._ok(tag, "APPEND completed", wire.code_appenduid(uidvalidity, uids))
        self._done()

    def _append_failed(self, failure: Failure, tag: str) -> None:
        if self._lost:
            return
        if failure.check(MailboxNotFound, ValueError):
            self._no(tag, "No such mailbox", wire.TRYCREATE)
        elif failure.check(QuotaExceeded):
            self._no(tag, "Quota exceeded", wire.OVERQUOTA)
        elif is_disk_full(failure.value):  # a temporary failure, as Dovecot answers ENOSPC
            log.warn(
                "imap {session} user {user}: APPEND failed, disk full: {error}",
                session=self.session_id,
                user=self.user,
                error=failure.value,
            )
            self._no(tag, "Not enough disk space", wire.OVERQUOTA)
        else:
            self._internal_error(failure, tag)
        self._done()

    def do_GETQUOTAROOT(self, tag: str, command: p.GetQuotaRoot) -> None:
        if command.mailbox not in self.factory.store.list_mailboxes(self._user()):
            self._no(tag, "No such mailbox", wire.NONEXISTENT)
            return
        name = wire.mailbox_name(command.mailbox, self.utf8_names)
        self._write(wire.untagged(b"QUOTAROOT", name, b'""'))
        self._write(self._quota_line())
        self._ok(tag, "GETQUOTAROOT completed")

    def do_GETQUOTA(self, tag: str, command: p.GetQuota) -> None:
        if command.root != "":
            self._no(tag, "No such quota root", wire.NONEXISTENT)
            return
        self._write(self._quota_line())
        self._ok(tag, "GETQUOTA completed")

    def _quota_line(self) -> bytes:
        used, limit = self.factory.store.quota_usage(self._user())
        if limit is None:
            return wire.untagged(b'QUOTA "" ()')
        return wire.untagged(b'QUOTA "" (STORAGE %d %d)' % ((used + 1023) // 1024, limit // 1024))

    def do_IDLE(self, tag: str, command: p.Simple) -> None:
        self._idle_tag = tag
        self._write(wire.continuation("idling"))
        self._current = ("IDLE", False)
        self._updates()
        self._touch()
        self.reader.expect_line()
        self._line_handler = self._idle_line

    def _idle_line(self, line: bytes) -> None:
        tag, self._idle_tag = self._idle_tag, None
        assert tag is not None
        self._touch()
        if line.strip().upper() != b"DONE":
            self._error(tag, "Expected DONE")
            return
        self._current = ("IDLE", False)
        self._ok(tag, "IDLE terminated")

    # -- selected state ---------------------------------------------------------------------------

    def _sel(self) -> SelectedMailbox:
        assert self.selected is not None
        return self.selected

    def _resolve(self, tag: str, seqset: Any, uid: bool) -> list[int] | None:
        sel = self._sel()
        try:
            uids = sel.resolve(seqset, uid)
        except SequenceRangeError as e:
            self._error(tag, str(e))
            return None
        # A UID command does not need the numbers of messages expunged elsewhere.
        return [u for u in uids if u not in sel.gone] if uid and sel.gone else uids

    def _expunge_deleted(self, only: set[int] | None = None) -> list[int]:
        sel = self._sel()
        sel.mailbox.refresh()
        doomed = [
            m.uid
            for m in sel.mailbox.messages()
            if "\\Deleted" in m.flags and (only is None or m.uid in only)
        ]
        return sel.mailbox.expunge(doomed) if doomed else []

    def do_CLOSE(self, tag: str, command: p.Simple) -> None:
        sel = self._sel()
        if not sel.readonly:
            self._expunge_deleted()
        self._unselect()
        self._ok(tag, "CLOSE completed")

    def do_UNSELECT(self, tag: str, command: p.Simple) -> None:
        self._unselect()
        self._ok(tag, "UNSELECT completed")

    def do_EXPUNGE(self, tag: str, command: p.Expunge) -> None:
        sel = self._sel()
        if sel.readonly:
            self._no(tag, "Mailbox is read-only", wire.READ_ONLY)
            return
        only = None
        if command.uids is not None:
            only = set(sel.resolve(command.uids, True))
        self._expunge_deleted(only)
        self._ok(tag, "EXPUNGE completed", self._modseq_code())

    def _modseq_code(self) -> bytes | None:
        """``[HIGHESTMODSEQ n]`` for the tagged OK of EXPUNGE and MOVE once CONDSTORE is on
        (RFC 7162 3.1.8, 3.2.10)."""
        sel = self.selected
        if sel is None or not self.condstore:
            return None
        return wire.code_highestmodseq(sel.mailbox.highestmodseq)

    def do_FETCH(self, tag: str, command: p.Fetch) -> None:
        sel = self._sel()
        fetcher = self.fetcher
        assert fetcher is not None
        if command.vanished and not self.qresync:
            self._error(tag, "VANISHED needs ENABLE QRESYNC")
            return
        uids = self._resolve(tag, command.sequence, command.uid)
        if uids is None:
            return
        changed_since = command.changed_since
        if changed_since is not None or any(i.name == "MODSEQ" for i in command.items):
            _enable_condstore(self)
        if changed_since is not None:
            uids = [u for u in uids if u in sel.infos and sel.infos[u].modseq > changed_since]
        if command.vanished and changed_since is not None:
            line = sel.vanished_earlier(command.sequence, changed_since)
            if line is not None:
                self._write(line)
        flags_changed: set[int] = set()
        if sets_seen(command.items) and not sel.readonly:
            unseen = [u for u in uids if u in sel.infos and "\\Seen" not in sel.infos[u].flags]
            if unseen:
                for info in sel.mailbox.set_flags(unseen, ["\\Seen"], "add").values():
                    sel.update_info(info)
                    flags_changed.add(info.uid)
        gone: list[int] = []
        undecodable: list[int] = []
        chunks = fetch_responses(
            fetcher,
            uids,
            command.items,
            command.uid,
            flags_changed,
            self.condstore and (changed_since is not None or bool(flags_changed)),
            gone,
            undecodable,
        )

        def finished(error: Failure | None) -> None:
            self._pump = None
            if self._lost:
                return
            if error is not None:
                self._internal_error(error, tag)
            elif undecodable:
                self._no(tag, "Unknown Content-Transfer-Encoding", wire.UNKNOWN_CTE)
            elif gone:
                self._no(tag, "Some messages were expunged", wire.EXPUNGEISSUED)
            else:
                self._ok(tag, "FETCH completed")
            self._done()

        self._busy = True
        self._pump = _Pump(self.transport, chunks, finished)
        self._pump.start()

    def do_STORE(self, tag: str, command: p.Store) -> None:
        sel = self._sel()
        if sel.readonly:
            self._no(tag, "Mailbox is read-only", wire.READ_ONLY)
            return
        uids = self._resolve(tag, command.sequence, command.uid)
        if uids is None:
            return
        uids = [u for u in uids if u not in sel.gone]
        modified: list[int] = []
        if command.unchanged_since is not None:
            _enable_condstore(self)
            sel.mailbox.refresh()
            current = {m.uid: m for m in sel.mailbox.messages()}
            keep = []
            for u in uids:
                info = current.get(u)
                if info is not None and info.modseq > command.unchanged_since:
                    modified.append(u)
                else:
                    keep.append(u)
            uids = keep
        echo = not command.silent or command.unchanged_since is not None
        mode = _STORE_MODES[command.mode]
        # Without an echo the client takes its change as applied to the flags it knew: a
        # change another session made meanwhile must still reach it (a FETCH below).
        known = {} if echo or mode == "set" else {u: sel.info(u) for u in uids}
        try:
            result = sel.mailbox.set_flags(uids, command.flags, mode)
            change = normalize_flags(command.flags) if known else frozenset()
        except ValueError as e:
            self._error(tag, str(e))
            return
        changed = []
        for uid in uids:
            info = result.get(uid)
            if info is None:
                continue
            before = known.get(uid)
            if before is not None:
                told = before.flags | change if mode == "add" else before.flags - change
                sel.update_info(info, told)
            else:
                sel.update_info(info)
            changed.append(uid)
        # A new keyword: FLAGS and PERMANENTFLAGS first (RFC 3501 7.2.6, as Dovecot).
        for line in sel.keyword_announcement():
            self._write(line)
        if echo:
            for uid in changed:
                seq = sel.seq_of(uid)
                if seq:
                    self._write(sel.flags_response(seq, uid, command.uid or self.condstore))
        if modified:
            code = wire.code_modified(sel.seq_of(u) if not command.uid else u for u in modified)
            self._ok(tag, "Conditional STORE failed", code)
            return
        self._ok(tag, "STORE completed")

    def _destination(self, tag: str, name: str) -> tuple[str, int] | None:
        """The store name and UIDVALIDITY of a COPY/MOVE target (``NO [TRYCREATE]`` if none)."""
        try:
            dest = _open_target(self.factory.store, self._user(), name)
        except (MailboxNotFound, ValueError):
            self._no(tag, "No such mailbox", wire.TRYCREATE)
            return None
        return str(dest.name), int(dest.uidvalidity)

    def do_COPY(self, tag: str, command: p.Copy) -> None:
        sel = self._sel()
        uids = self._resolve(tag, command.sequence, command.uid)
        if uids is None:
            return
        dest = self._destination(tag, command.mailbox)
        if dest is None:
            return
        try:
            pairs = sel.mailbox.copy_to([u for u in uids if u not in sel.gone], dest[0])
        except QuotaExceeded:
            self._no(tag, "Quota exceeded", wire.OVERQUOTA)
            return
        except MailboxNotFound:
            self._no(tag, "No such mailbox", wire.TRYCREATE)
            return
        self._ok(tag, "COPY completed", _copyuid(dest[1], pairs))

    def do_MOVE(self, tag: str, command: p.Move) -> None:
        sel = self._sel()
        if sel.readonly:
            self._no(tag, "Mailbox is read-only", wire.READ_ONLY)
            return
        uids = self._resolve(tag, command.sequence, command.uid)
        if uids is None:
            return
        dest = self._destination(tag, command.mailbox)
        if dest is None:
            return
        uids = [u for u in uids if u not in sel.gone]
        try:
            if dest[0] == sel.name:  # into itself: copy, then expunge the originals
                pairs = sel.mailbox.copy_to(uids, dest[0])
                sel.mailbox.expunge([src for src, _new in pairs])
            else:
                pairs = sel.mailbox.move_to(uids, dest[0])
        except QuotaExceeded:
            self._no(tag, "Quota exceeded", wire.OVERQUOTA)
            return
        except MailboxNotFound:
            self._no(tag, "No such mailbox", wire.TRYCREATE)
            return
        if pairs:
            self._write(wire.untagged_status("OK", "Moved", _copyuid(dest[1], pairs)))
        self._ok(tag, "MOVE completed", self._modseq_code())

    def _search(self, key: p.SearchKey) -> list[int]:
        fetcher = self.fetcher
        assert fetcher is not None
        return Searcher(fetcher, self.factory.reactor.seconds).search(key)

    def _search_steps(self, key: p.SearchKey) -> Generator[None, None, list[int]]:
        """:meth:`_search` yielding after each message read (see ``_run_in_slices``)."""
        fetcher = self.fetcher
        assert fetcher is not None
        return (yield from Searcher(fetcher, self.factory.reactor.seconds).search_steps(key))

    def _modseq_of(self, key: p.SearchKey, found: list[int]) -> int | None:
        """The highest MODSEQ of the result when the criteria use MODSEQ (RFC 7162 3.1.5)."""
        if not found or not _uses_modseq(key):
            return None
        infos = self._sel().infos
        return max(infos[u].modseq for u in found)

    def do_SEARCH(self, tag: str, command: p.Search) -> Generator[None, None, None]:
        if _uses_modseq(command.key):
            _enable_condstore(self)
        found = yield from self._search_steps(command.key)
        returns = command.returns
        if returns is None and self.rev2:
            returns = ("ALL",)  # IMAP4rev2 answers with ESEARCH only (RFC 9051 6.4.4)
        self._results(tag, command.key, command.uid, returns, command.partial, found, None)
        self._ok(tag, "SEARCH completed")

    def _results(
        self,
        tag: str,
        key: p.SearchKey,
        uid: bool,
        returns: tuple[str, ...] | None,
        partial: tuple[int, int] | None,
        found: list[int],
        criteria: tuple[tuple[str, bool], ...] | None,
    ) -> None:
        """Send the result of a SEARCH (``criteria`` None; ``found`` ascending) or SORT
        (``found`` in sorted order): ``* SEARCH`` / ``* SORT``, or with RETURN options an
        ``* ESEARCH`` (RFC 4731, RFC 5267); SAVE (RFC 5182) and UPDATE (a live context)."""
        sel = self._sel()
        numbers = found if uid else [sel.seq_of(u) for u in found]
        modseq = self._modseq_of(key, found)
        if returns is None:
            self._write(_numbers_line(b"SEARCH" if criteria is None else b"SORT", numbers, modseq))
            return
        if "SAVE" in returns:
            # RFC 5182 2.4: with MIN and/or MAX but neither ALL nor COUNT, save only those.
            saved = found
            if not ("ALL" in returns or "COUNT" in returns) and (
                "MIN" in returns or "MAX" in returns
            ):
                picks = set()
                if found and "MIN" in returns:
                    picks.add(found[0])
                if found and "MAX" in returns:
                    picks.add(found[-1])
                saved = list(picks)
            sel.saved = sorted(saved)
            returns = tuple(r for r in returns if r != "SAVE")
        if "UPDATE" in returns:
            self._add_context(SearchContext(tag, key, uid, criteria, list(found)))
        if not returns:
            return  # only SAVE: no ESEARCH response (RFC 5182 2.1)
        if modseq is not None and not ("ALL" in returns or "COUNT" in returns):
            # RFC 7162 3.1.5: the highest MODSEQ of the messages returned, here MIN/MAX.
            picked = [found[0]] if "MIN" in returns else []
            picked += [found[-1]] if "MAX" in returns else []
            modseq = max((sel.infos[u].modseq for u in picked), default=modseq)
        self._write(esearch_line(tag, uid, returns, numbers, modseq, partial))

    def _add_context(self, context: SearchContext) -> None:
        if context.tag not in self.contexts and len(self.contexts) >= MAX_CONTEXTS:
            code = b"NOUPDATE " + wire.quote(context.tag)
            self._write(wire.untagged_status("NO", "Too many search contexts", code))
            return
        context.mark = self._context_mark()
        self.contexts[context.tag] = context

    def do_CANCELUPDATE(self, tag: str, command: p.CancelUpdate) -> None:
        unknown = [t for t in command.tags if t not in self.contexts]
        for t in command.tags:
            self.contexts.pop(t, None)
        if unknown:
            self._no(tag, "Unknown tag")
            return
        self._ok(tag, "Updates cancelled")

    def _sort_messages(
        self, uids: list[int], need_headers: bool, uid: bool
    ) -> Generator[None, None, list[SortMessage]]:
        """The messages SORT and THREAD order, yielding after each one whose headers were
        read (see ``_run_in_slices``)."""
        sel = self._sel()
        fetcher = self.fetcher
        assert fetcher is not None
        out = []
        for u in uids:
            info = sel.infos.get(u)
            seq = sel.seq_of(u)
            if info is None or not seq:
                continue
            structure = None
            if need_headers:
                try:
                    structure = fetcher.load(u, False, True)[1]
                except MessageGone:
                    continue
                yield
            out.append(SortMessage(seq, u if uid else seq, info.size, info.internaldate, structure))
        return out

    def do_SORT(self, tag: str, command: p.Sort) -> Generator[None, None, None]:
        if _uses_modseq(command.key):
            _enable_condstore(self)
        found = yield from self._search_steps(command.key)
        need = any(name not in ("ARRIVAL", "SIZE") for name, _rev in command.criteria)
        messages = yield from self._sort_messages(found, need, True)
        ordered = yield from sort_messages_steps(messages, command.criteria, Steps())
        self._results(
            tag,
            command.key,
            command.uid,
            command.returns,
            command.partial,
            [m.number for m in ordered],
            command.criteria,
        )
        self._ok(tag, "SORT completed")

    def do_THREAD(self, tag: str, command: p.Thread) -> Generator[None, None, None]:
        found = yield from self._search_steps(command.key)
        messages = yield from self._sort_messages(found, True, command.uid)
        if command.algorithm == "REFERENCES":
            roots = yield from thread_references_steps(messages, steps=Steps())
        else:
            roots = yield from thread_orderedsubject_steps(messages, Steps())
        threads = format_threads(roots)
        self._write(b"* THREAD " + threads + b"\r\n" if threads else b"* THREAD\r\n")
        self._ok(tag, "THREAD completed")


def _close_literals(command: p.Append) -> None:
    """Delete the temporary files of an APPEND's spooled literals."""
    for message in command.messages:
        if not isinstance(message.data, bytes):
            message.data.close()


def _passing(action: Callable[[p.Append], None], command: p.Append) -> Callable[[Any], Any]:
    """A Deferred callback running ``action(command)`` and passing the result on."""

    def run(result: Any) -> Any:
        action(command)
        return result

    return run


def _enable_condstore(server: IMAPServer) -> None:
    """A CONDSTORE enabling command (RFC 7162 3.1): from now on untagged FETCH responses
    carry MODSEQ; the first one issued while a mailbox is selected also reports the
    mailbox's HIGHESTMODSEQ in an untagged OK."""
    sel = server.selected
    first = not server.condstore
    server.condstore = True
    if sel is None:
        return
    sel.condstore = True
    if first:
        code = wire.code_highestmodseq(sel.mailbox.highestmodseq)
        server._write(wire.untagged_status("OK", "Highest", code))


def _numbers_line(name: bytes, numbers: list[int], modseq: int | None) -> bytes:
    """``* SEARCH 1 2 3 (MODSEQ n)`` / ``* SORT ...``."""
    line = b"* " + name
    if numbers:
        line += b" " + b" ".join(b"%d" % n for n in numbers)
    if modseq is not None:
        line += b" (MODSEQ %d)" % modseq
    return line + b"\r\n"


def _saves(raw: p.Command) -> bool:
    """Whether a (malformed) SEARCH command asked for RETURN (SAVE)."""
    args = raw.args
    if len(args) < 2 or not isinstance(args[0], p.Atom) or args[0].text.upper() != "RETURN":
        return False
    options = args[1]
    return isinstance(options, p.PList) and any(
        isinstance(o, p.Atom) and o.text.upper() == "SAVE" for o in options.items
    )


def _copyuid(uidvalidity: int, pairs: list[tuple[int, int]]) -> bytes | None:
    if not pairs:
        return None
    return wire.code_copyuid(uidvalidity, [a for a, _b in pairs], [b for _a, b in pairs])


def _uses_modseq(key: p.SearchKey) -> bool:
    if isinstance(key, p.ModSeqKey):
        return True
    if isinstance(key, p.And):
        return any(_uses_modseq(k) for k in key.keys)
    if isinstance(key, p.Or):
        return _uses_modseq(key.left) or _uses_modseq(key.right)
    if isinstance(key, p.Not):
        return _uses_modseq(key.key)
    return False


def _identity(n: int) -> int:
    return n


def _normalise(name: str) -> str | None:
    """The directory key of a login name (an address), or None if it is not an address."""
    try:
        return Address.parse(name).key
    except AddressError:
        return None


def _open_target(store: IMessageStore, user: str, name: str) -> IMailbox:
    """Open an APPEND/COPY/MOVE target folder without loading its messages (only its
    UIDVALIDITY and the new UIDs are needed)."""
    return store.open_mailbox(user, name, snapshot=False)
