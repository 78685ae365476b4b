"""The SMTP server wire protocol: RFC 5321 state machine, framing, DATA streaming; no policy.

Policy (who may send, which recipients exist, what to add to a message) lives in a ``Role``
object the protocol calls; each hook returns a ``Reply`` or a ``Deferred`` firing with one.
While a hook's Deferred is pending the protocol stops consuming input (strict in-order
PIPELINING, never reading ahead into DATA).
"""

from __future__ import annotations

import ipaddress
import secrets
from collections.abc import Callable
from contextlib import suppress
from dataclasses import dataclass, field
from typing import Any

from twisted.internet.defer import Deferred, maybeDeferred
from twisted.internet.interfaces import IAddress, IDelayedCall, IReactorTime, ISSLTransport
from twisted.internet.protocol import Factory, Protocol, connectionDone
from twisted.logger import Logger
from twisted.python.failure import Failure

from mailgw.interfaces import IIncomingMessage, ISpool
from mailgw.model import Address, AddressError, Envelope, parse_path
from mailgw.model.reply import R, Reply
from mailgw.net import sasl
from mailgw.net.directwrite import write_now
from mailgw.net.limits import ConnectionCounter, Refusal
from mailgw.net.progress import ProgressWatch
from mailgw.smtp.trace import with_protocol
from mailgw.tracking import NO_TRACKING, Kind, Tracker

ReplyResult = Reply | Deferred[Reply]

MAX_COMMAND_LINE = 2048
"""Longest command line accepted, CRLF included (RFC 5321 says 512; extensions need more)."""


def is_error(reply: Reply) -> bool:
    """Whether a reply counts as a client error (Postfix counts its rejections alike): every
    permanent (5xx) reply — syntax, sequence, unknown recipient, relay or policy refusal,
    failed AUTH. Temporary (4xx) replies are the server's conditions and do not count."""
    return reply.code >= 500


_COMMAND, _DATA = "command", "data"
JUNK_COMMANDS = frozenset({"NOOP", "RSET", "VRFY", "EXPN", "HELP"})
"""Commands that move no mail forward (Postfix's junk commands)."""

log = Logger()

_WIRE: dict[Reply, bytes] = {}
"""Wire form of replies already sent (they are immutable values; EHLO lines vary little)."""


@dataclass(frozen=True)
class Limits:
    """Resource limits of one SMTP listener (normally taken from the role's config section)."""

    max_message_size: int = 25 * 1024 * 1024
    max_line_length: int = 10000
    max_errors: int = 20
    """Errors (see ``is_error``) after which the session is closed with ``421 4.7.0``; a
    queued message resets the count (Postfix's ``smtpd_hard_error_limit``)."""
    soft_error_limit: int = 10
    """Errors after which each command is answered only ``error_delay`` seconds after it
    was read (Postfix's ``smtpd_soft_error_limit``)."""
    error_delay: float = 1.0
    """Postfix's ``smtpd_error_sleep_time``; 0: no delay."""
    idle_timeout: float = 300.0
    session_timeout: float = 1800.0
    max_connections: int = 1000
    max_connections_per_ip: int = 50
    command_timeout: float = 60.0
    """A command line, or a DATA phase, must be complete within this (0: off)..."""
    min_data_rate: int = 1024
    """... plus one second per this many bytes received meanwhile (0: no allowance)."""
    stress_idle_timeout: float = 10.0
    """Idle timeout (and sessions idle this long are closed for newcomers) under stress."""


@dataclass
class Session:
    """What the protocol knows about a client session; roles read it (and may annotate it)."""

    session_id: str
    client_ip: str
    helo: str | None = None
    esmtp: bool = False
    tls: bool = False
    authenticated: str | None = None
    has_sender: bool = False
    sender: Address | None = None
    recipients: list[Address] = field(default_factory=list)
    body_8bitmime: bool = False
    smtputf8: bool = False
    declared_size: int = 0
    client_name: str = ""
    """The client's host name when a trusted proxy told it (XCLIENT NAME)."""
    checks: Any = None
    """The role's policy-check state for this session (``mailgw.smtp.roles.checked``)."""

    @property
    def protocol_name(self) -> str:
        """The RFC 3848 ``with`` keyword for this session's current transaction."""
        return with_protocol(self.esmtp, self.tls, self.authenticated is not None, self.smtputf8)

    def reset_transaction(self) -> None:
        """Forget the MAIL transaction (RSET, HELO/EHLO, end of DATA)."""
        self.has_sender = False
        self.sender = None
        self.recipients = []
        self.body_8bitmime = False
        self.smtputf8 = False
        self.declared_size = 0


class Role:
    """Policy hooks of an SMTP role; this base accepts everything and spools into ``spool``.

    Hooks returning ``ReplyResult`` may return a Deferred; a positive reply (2xx/3xx) means
    "go on", any other reply is sent to the client as it is. An exception (or failed
    Deferred) is logged and answered ``451 4.3.0``.
    """

    name = "smtp"
    """The role's name in message tracking and metrics (``mx``, ``submission``)."""
    tracker: Tracker = NO_TRACKING
    """Where the role records its messages' events (``mailgw.tracking``)."""

    def __init__(self, spool: ISpool) -> None:
        self.spool = spool

    def extensions(self, session: Session) -> list[str]:
        """Extra EHLO keywords of this role (e.g. ``AUTH PLAIN`` for submission)."""
        return []

    def helo(self, session: Session, name: str) -> ReplyResult:
        """HELO/EHLO ``name``; positive: the protocol sends its own greeting lines."""
        return R.OK

    def mail_from(self, session: Session, sender: Address | None) -> ReplyResult:
        """MAIL FROM (``None`` is the null sender ``<>``); session flags are already set."""
        return R.SENDER_OK

    def postmaster(self, session: Session) -> Address | None:
        """The address ``RCPT TO:<Postmaster>`` (no domain) stands for; None refuses it."""
        return None

    def rcpt_to(self, session: Session, recipient: Address) -> ReplyResult:
        """RCPT TO; ``session.recipients`` holds the recipients accepted so far."""
        return R.RECIPIENT_OK

    def data_start(self, session: Session) -> ReplyResult:
        """DATA command; positive: a message is begun and ``354`` is sent."""
        return R.START_DATA

    def begin_message(self, session: Session) -> IIncomingMessage:
        """Open the spool file that receives the message body."""
        return self.spool.begin()

    def data_header(self, session: Session, queue_id: str) -> bytes:
        """Header lines (CRLF-terminated) written before the client's message."""
        return b""

    def data_end(
        self, session: Session, incoming: IIncomingMessage, envelope: Envelope
    ) -> ReplyResult:
        """The whole message has been received; positive: commit. May adjust ``envelope``."""
        return R.OK

    def message_committed(self, session: Session, envelope: Envelope) -> None:
        """Called after the spool committed the message (for counters, notifications)."""

    def track_received(self, session: Session, envelope: Envelope, message_id: str) -> None:
        """Record the committed message's ``received`` event (``mailgw.tracking``)."""
        self.tracker.record(
            Kind.RECEIVED,
            envelope.queue_id,
            message_id=message_id,
            addresses=[envelope.sender, *envelope.recipients],
            role=self.name,
            session=session.session_id,
            client=session.client_ip,
            helo=session.helo or "",
            user=session.authenticated or "",
            tls=session.tls,
            sender=envelope.sender,
            recipients=list(envelope.recipients),
            size=envelope.size,
        )

    def after_commit(self, session: Session, queue_id: str) -> Deferred[Any] | None:
        """Something to wait for between the spool's commit and the ``250`` (synchronous
        replication: the local delivery acknowledged by the DR replica); None: nothing."""
        return None

    def unknown_command(self, session: Session, verb: str, argument: str) -> ReplyResult | None:
        """A verb the protocol does not know; None: ``500 5.5.2``."""
        return None

    def auth_start(self, session: Session, mechanism: str) -> Reply | None:
        """AUTH ``mechanism`` (upper-case): None to go ahead with the SASL exchange (the
        protocol speaks PLAIN and LOGIN), or the refusal. This base refuses (``502``), so a
        role without AUTH (MX) neither advertises nor accepts it."""
        return R.NOT_IMPLEMENTED

    def authenticate(self, session: Session, authzid: str, user: str, password: str) -> ReplyResult:
        """Check decoded credentials; ``235`` makes ``session.authenticated`` the user (the
        role may set it first, e.g. to the canonical name)."""
        return R.NOT_IMPLEMENTED


def _peer_ip(addr: IAddress) -> str:
    host = getattr(addr, "host", "")
    return host if isinstance(host, str) else ""


class _DataState:
    """Progress of one DATA phase (what was seen, whether the message is being discarded)."""

    __slots__ = ("line_start", "size", "too_long", "too_big", "nul", "eightbit")

    def __init__(self) -> None:
        self.line_start = True
        self.size = 0
        self.too_long = False
        self.too_big = False
        self.nul = False
        self.eightbit = False

    @property
    def discarding(self) -> bool:
        return self.too_long or self.too_big or self.nul


def xtext_decode(text: str) -> str:
    """RFC 3461 xtext: ``+HH`` is the byte 0xHH; ValueError on a bad escape."""
    out = bytearray()
    i = 0
    raw = text.encode("utf-8")
    while i < len(raw):
        if raw[i : i + 1] == b"+":
            digits = raw[i + 1 : i + 3]
            if len(digits) != 2 or not all(c in b"0123456789ABCDEFabcdef" for c in digits):
                raise ValueError(f"bad xtext escape in {text!r}")
            out.append(int(digits, 16))
            i += 3
        else:
            out.append(raw[i])
            i += 1
    return out.decode("utf-8", "replace")


XCLIENT_ATTRIBUTES = ("ADDR", "LOGIN", "NAME")
"""What XCLIENT may set here (Postfix's names; nginx's mail proxy sends these three)."""


class SMTPServer(Protocol):
    """One SMTP server session (see the module docstring)."""

    factory: SMTPFactory | None = None
    transport: Any
    greeting = "ESMTP mailgw"
    """The text after the host name in the 220 greeting."""

    def __init__(
        self,
        role: Role,
        hostname: str,
        limits: Limits,
        reactor: IReactorTime,
        tls_options: Any = None,
    ) -> None:
        self.role = role
        self.hostname = hostname
        self.limits = limits
        self.reactor = reactor
        self.tls_options = tls_options
        self.session = Session(session_id=secrets.token_hex(6), client_ip="")
        self._buf = b""
        self._mode = _COMMAND
        self._waiting = False
        self._paused = False
        self._processing = False
        # Replies to the commands of one read, sent together when it is worked off.
        self._out: list[bytes] = []
        self._closed = False
        self._discarding_line = False
        self._errors = 0
        self._error_wait: IDelayedCall | None = None
        self._error_waited = False
        self._accepted = 0
        self._incoming: IIncomingMessage | None = None
        self._data = _DataState()
        self._idle_timer: IDelayedCall | None = None
        self._session_timer: IDelayedCall | None = None
        self._counted = False
        self._last_input = 0.0
        self._junk = 0
        self._progress = ProgressWatch(
            reactor, limits.command_timeout, self._progress_expired, limits.min_data_rate
        )
        self._line_reader: Callable[[bytes], None] | None = None
        self._xclient_peer = ""
        self._handlers: dict[str, Callable[[str], None]] = {
            "EHLO": self._do_ehlo,
            "HELO": self._do_helo,
            "MAIL": self._do_mail,
            "RCPT": self._do_rcpt,
            "DATA": self._do_data,
            "RSET": self._do_rset,
            "NOOP": self._do_noop,
            "QUIT": self._do_quit,
            "VRFY": self._do_vrfy,
            "EXPN": self._do_expn,
            "HELP": self._do_help,
            "STARTTLS": self._do_starttls,
            "AUTH": self._do_auth,
            "XCLIENT": self._do_xclient,
        }

    # -- connection ----------------------------------------------------------------------------

    def connectionMade(self) -> None:
        self.session.client_ip = _peer_ip(self.transport.getPeer())
        self._xclient_peer = self.session.client_ip
        self.session.tls = ISSLTransport.providedBy(self.transport) or bool(
            getattr(self.factory, "implicit_tls", False)
        )
        if self.factory is not None:
            refusal = self.factory.connection_opened(self.session.client_ip)
            if refusal is not None:
                log.info(
                    "{sid} {peer} refused: {reply}",
                    sid=self.session.session_id,
                    peer=self.session.client_ip,
                    reply=refusal.format(),
                )
                self._send(refusal)
                self._closed = True
                self.transport.loseConnection()
                return
            self._counted = True
            self.factory.sessions.add(self)
        self._last_input = self.reactor.seconds()
        self._idle_timer = self.reactor.callLater(self._idle_timeout(), self._idle_expired)
        self._session_timer = self.reactor.callLater(
            self.limits.session_timeout, self._session_expired
        )
        self._send(Reply(220, "", f"{self.hostname} {self.greeting}"))

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self._closed = True
        self._cancel_timers()
        self._abort_incoming()
        if self.factory is not None:
            self.factory.sessions.discard(self)
        if self._counted and self.factory is not None:
            self.factory.connection_closed(self.session.client_ip)
            self._counted = False
        if not self._accepted:
            # Sessions that queued mail are traced by their "accepted" lines (which name the
            # session and the peer): one log line per message keeps logging cheap.
            log.info(
                "{sid} disconnect from {peer} without a message",
                sid=self.session.session_id,
                peer=self.session.client_ip,
            )

    def dataReceived(self, data: bytes) -> None:
        if self._closed:
            return
        self._last_input = self.reactor.seconds()
        if self._idle_timer is not None and self._idle_timer.active():
            self._idle_timer.reset(self._idle_timeout())
        self._buf = self._buf + data if self._buf else data
        self._process()
        self._watch_progress(len(data))

    def _cancel_timers(self) -> None:
        for timer in (self._idle_timer, self._session_timer, self._error_wait):
            if timer is not None and timer.active():
                timer.cancel()
        self._idle_timer = self._session_timer = self._error_wait = None
        self._progress.cancel()

    @property
    def stressed(self) -> bool:
        """The role is near its connection caps: Postfix-style short timeouts and limits."""
        return self.factory is not None and self.factory.counter.stressed

    def _idle_timeout(self) -> float:
        if self.stressed:
            return min(self.limits.idle_timeout, self.limits.stress_idle_timeout)
        return self.limits.idle_timeout

    def _watch_progress(self, received: int) -> None:
        """Unfinished client input (a partial command line, a DATA phase) must be finished
        within ``command_timeout`` (plus ``min_data_rate`` allowance): slowloris defence."""
        if self._closed:
            return
        if self._waiting:  # the server, not the client, is behind
            self._progress.finished()
        elif self._mode is _DATA or self._buf or self._discarding_line:
            self._progress.unfinished(received)
        else:
            self._progress.finished()

    def _progress_expired(self) -> None:
        in_data = self._mode is _DATA
        log.info(
            "{sid} {peer} {what} not completed in time, closing",
            sid=self.session.session_id,
            peer=self.session.client_ip,
            what="DATA" if in_data else "command",
        )
        self._send(R.DATA_TOO_SLOW if in_data else R.COMMAND_TIMEOUT)
        self._close()

    def idle_for(self) -> float:
        """Seconds since the client last sent anything; 0 while a command or message is in
        progress or the server is working on one (such a session is not idle)."""
        if self._closed or self._waiting or self._mode is _DATA or self._buf:
            return 0.0
        return self.reactor.seconds() - self._last_input

    def close_idle(self) -> None:
        """Closed to make room under load (``SMTPFactory``): 421, and the slot is free now."""
        log.info(
            "{sid} {peer} idle under load, closing",
            sid=self.session.session_id,
            peer=self.session.client_ip,
        )
        self._send(R.IDLE_UNDER_LOAD)
        self._close()
        if self._counted and self.factory is not None:
            self.factory.sessions.discard(self)
            self.factory.connection_closed(self.session.client_ip)
            self._counted = False

    def _idle_expired(self) -> None:
        self._idle_timer = None
        self._send(R.IDLE_TIMEOUT)
        self._close()

    def _session_expired(self) -> None:
        self._session_timer = None
        self._send(R.SESSION_TIMEOUT)
        self._close()

    def _close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._cancel_timers()
        self._abort_incoming()
        self._buf = b""
        self._flush()
        self.transport.loseConnection()

    # -- replies -------------------------------------------------------------------------------

    def _send(self, reply: Reply, text: str | None = None) -> None:
        if text is None:
            wire = _WIRE.get(reply)
            if wire is None:
                wire = _WIRE[reply] = reply.format().encode("utf-8") + b"\r\n"
            self._out.append(wire)
        else:
            self._out.append(reply.format(text).encode("utf-8") + b"\r\n")
        if not self._processing:
            self._flush()

    def _flush(self) -> None:
        """Send the replies held back while a read's commands were worked off (pipelined
        commands get their replies in one write), straight to the socket when it can take
        them (``mailgw.net.directwrite``)."""
        if self._out:
            data = self._out[0] if len(self._out) == 1 else b"".join(self._out)
            self._out.clear()
            write_now(self.transport, data)

    def _reply(self, reply: Reply, text: str | None = None, verb: str = "") -> None:
        """Send a reply to a command; log refusals and count client errors."""
        if self._closed:
            return
        self._send(reply, text)
        if reply.code >= 400:
            log.info(
                "{sid} {peer} {verb} rejected: {reply}",
                sid=self.session.session_id,
                peer=self.session.client_ip,
                verb=verb,
                reply=reply.format(text),
            )
        if is_error(reply):
            self._errors += 1
            # Under stress one error is enough (Postfix: smtpd_hard_error_limit ${stress?1}).
            stressed = self.stressed
            if self._errors >= self.limits.max_errors or stressed:
                log.info(
                    "{sid} {peer} too many errors ({n}), closing",
                    sid=self.session.session_id,
                    peer=self.session.client_ip,
                    n=self._errors,
                )
                if (
                    not stressed
                    and self.limits.error_delay > 0
                    and self._errors > self.limits.soft_error_limit
                ):
                    # Like Postfix, the 421 is slowed down too; nothing more is read.
                    self._buf = b""
                    self._waiting = True
                    if not self._paused:
                        self._paused = True
                        self.transport.pauseProducing()
                    self._error_wait = self.reactor.callLater(
                        self.limits.error_delay, self._too_many_errors
                    )
                else:
                    self._too_many_errors()

    def _too_many_errors(self) -> None:
        self._error_wait = None
        if not self._closed:
            self._send(R.TOO_MANY_ERRORS)
            self._close()

    def _call(
        self, hook: Callable[[], ReplyResult], then: Callable[[Reply], None], what: str
    ) -> None:
        """Run a policy hook; continue with ``then(reply)`` now or when its Deferred fires."""
        try:
            result = hook()
        except Exception:
            log.failure("{sid} policy error in {what}", sid=self.session.session_id, what=what)
            result = R.LOCAL_ERROR
        if not isinstance(result, Deferred):
            then(result)
            return
        self._waiting = True
        result.addErrback(self._policy_failed, what)
        result.addCallback(self._resume, then)
        if self._waiting and not self._paused:  # not fired yet: stop reading meanwhile
            self._paused = True
            self.transport.pauseProducing()

    def _policy_failed(self, failure: Failure, what: str) -> Reply:
        log.failure("{sid} policy error in {what}", failure, sid=self.session.session_id, what=what)
        return R.LOCAL_ERROR

    def _resume(self, reply: Reply, then: Callable[[Reply], None]) -> None:
        self._waiting = False
        if self._closed:
            return
        if self._paused:
            self._paused = False
            self.transport.resumeProducing()
        if self._idle_timer is not None and self._idle_timer.active():
            self._idle_timer.reset(self._idle_timeout())
        then(reply)
        self._process()
        self._watch_progress(0)

    # -- input ---------------------------------------------------------------------------------

    def _process(self) -> None:
        if self._processing:
            return
        self._processing = True
        try:
            while self._buf and not self._waiting and not self._closed:
                if self._mode is _DATA:
                    if not self._data_step():
                        break
                    continue
                if self._must_wait_for_errors():
                    break
                if not self._command_step():
                    break
                self._error_waited = False
        finally:
            self._processing = False
            self._flush()

    def _must_wait_for_errors(self) -> bool:
        """Past the soft error limit, hold each complete command line back ``error_delay``
        seconds before it is read (input paused meanwhile); True while holding."""
        if (
            self._errors < self.limits.soft_error_limit
            or self.limits.error_delay <= 0
            or self._error_waited
            or b"\n" not in self._buf
        ):
            return False
        self._waiting = True
        if not self._paused:
            self._paused = True
            self.transport.pauseProducing()
        self._error_wait = self.reactor.callLater(self.limits.error_delay, self._error_wait_over)
        return True

    def _error_wait_over(self) -> None:
        self._error_wait = None
        self._waiting = False
        self._error_waited = True
        if self._closed:
            return
        if self._paused:
            self._paused = False
            self.transport.resumeProducing()
        self._process()

    def _bare_newline(self) -> bool:
        log.info(
            "{sid} {peer} bare CR or LF, closing",
            sid=self.session.session_id,
            peer=self.session.client_ip,
        )
        self._send(R.BARE_NEWLINE)
        self._close()
        return False

    def _command_step(self) -> bool:
        """Take one command line off the buffer; False when more input is needed."""
        buf = self._buf
        if self._discarding_line:
            end = buf.find(b"\r\n")
            if end < 0:
                self._buf = buf[-1:] if buf.endswith(b"\r") else b""
                return False
            self._buf = buf[end + 2 :]
            self._discarding_line = False
            return True
        end = buf.find(b"\n")
        if end < 0:
            if len(buf) >= MAX_COMMAND_LINE:
                self._buf = buf[-1:] if buf.endswith(b"\r") else b""
                self._discarding_line = True
                self._reply(R.LINE_TOO_LONG)
            return False
        if end == 0 or buf[end - 1] != 13:
            return self._bare_newline()
        self._buf = buf[end + 1 :]
        if end + 1 > MAX_COMMAND_LINE:
            self._reply(R.LINE_TOO_LONG)
            return True
        line = buf[: end - 1]
        if b"\r" in line:
            return self._bare_newline()
        reader, self._line_reader = self._line_reader, None
        if reader is not None:
            reader(line)  # a continuation line (AUTH), not a command
        else:
            self._command(line)
        return True

    def _command(self, line: bytes) -> None:
        try:
            text = line.decode("utf-8")
        except UnicodeDecodeError:
            self._reply(R.SYNTAX_ERROR)
            return
        verb, _, argument = text.partition(" ")
        verb = verb.upper()
        if verb in JUNK_COMMANDS:
            self._junk += 1
            # Postfix under stress: smtpd_junk_command_limit ${stress?1}, then hard errors.
            if self._junk > 1 and self.stressed:
                self._send(R.TOO_MANY_ERRORS)
                self._close()
                return
        handler = self._handlers.get(verb)
        if handler is not None:
            handler(argument.strip(" "))
            return
        self._call(
            lambda: self.role.unknown_command(self.session, verb, argument) or R.SYNTAX_ERROR,
            lambda reply: self._reply(reply, verb=verb),
            verb,
        )

    # -- commands ------------------------------------------------------------------------------

    def _do_ehlo(self, argument: str) -> None:
        self._greet(argument, esmtp=True)

    def _do_helo(self, argument: str) -> None:
        self._greet(argument, esmtp=False)

    def _greet(self, name: str, esmtp: bool) -> None:
        verb = "EHLO" if esmtp else "HELO"
        if not name or " " in name:
            self._reply(R.PARAM_SYNTAX, verb=verb)
            return
        self.session.reset_transaction()

        def then(reply: Reply) -> None:
            if not reply.is_positive:
                self._reply(reply, verb=verb)
                return
            self.session.helo = name
            self.session.esmtp = esmtp
            if not esmtp:
                self._reply(Reply(250, "", self.hostname))
                return
            lines = [
                self.hostname,
                f"SIZE {self.limits.max_message_size}",
                "8BITMIME",
                "PIPELINING",
                "ENHANCEDSTATUSCODES",
                "SMTPUTF8",
            ]
            if self.tls_options is not None and not self.session.tls:
                lines.append("STARTTLS")
            lines.extend(self.role.extensions(self.session))
            if self._xclient_allowed():
                lines.append("XCLIENT " + " ".join(XCLIENT_ATTRIBUTES))
            self._reply(Reply(250, "", "\n".join(lines)))

        self._call(lambda: self.role.helo(self.session, name), then, verb)

    @staticmethod
    def _split_path(rest: str) -> tuple[str, list[str]] | None:
        """``<path> PARAM...`` -> (``<path>``, params); None when there is no ``<...>``."""
        rest = rest.lstrip(" ")
        if not rest.startswith("<"):
            return None
        end = rest.find(">")
        if end < 0:
            return None
        tail = rest[end + 1 :]
        if tail and not tail.startswith(" "):
            return None
        return rest[: end + 1], tail.split()

    def _do_mail(self, argument: str) -> None:
        s = self.session
        if s.helo is None:
            self._reply(R.NEED_HELO, verb="MAIL")
            return
        if s.has_sender:
            self._reply(R.NESTED_MAIL, verb="MAIL")
            return
        if argument[:5].upper() != "FROM:":
            self._reply(R.PARAM_SYNTAX, verb="MAIL")
            return
        split = self._split_path(argument[5:])
        if split is None:
            self._reply(R.BAD_SENDER_SYNTAX, verb="MAIL")
            return
        path, params = split
        if params and not s.esmtp:
            self._reply(R.PARAM_NOT_RECOGNIZED, verb="MAIL")
            return
        size, body, smtputf8 = 0, False, False
        for param in params:
            keyword, eq, value = param.partition("=")
            keyword = keyword.upper()
            if keyword == "SIZE" and eq and value.isdigit() and len(value) < 20:
                size = int(value)
            elif keyword == "BODY" and value.upper() in ("7BIT", "8BITMIME"):
                body = value.upper() == "8BITMIME"
            elif keyword == "SMTPUTF8" and not eq:
                smtputf8 = True
            elif keyword in ("SIZE", "BODY", "SMTPUTF8"):
                self._reply(R.PARAM_SYNTAX, verb="MAIL")
                return
            else:
                self._reply(R.PARAM_NOT_RECOGNIZED, verb="MAIL")
                return
        if size > self.limits.max_message_size:
            self._reply(R.MESSAGE_TOO_BIG_DECLARED, verb="MAIL")
            return
        if not smtputf8 and not path.isascii():
            self._reply(R.SMTPUTF8_REQUIRED, verb="MAIL")
            return
        try:
            sender = parse_path(path, allow_utf8=smtputf8)
        except AddressError:
            self._reply(R.BAD_SENDER_SYNTAX, verb="MAIL")
            return
        s.has_sender, s.sender = True, sender
        s.declared_size, s.body_8bitmime, s.smtputf8 = size, body, smtputf8

        def then(reply: Reply) -> None:
            if not reply.is_positive:
                s.reset_transaction()
            self._reply(reply, verb="MAIL")

        self._call(lambda: self.role.mail_from(s, sender), then, "MAIL")

    def _do_rcpt(self, argument: str) -> None:
        s = self.session
        if not s.has_sender:
            self._reply(R.NEED_MAIL, verb="RCPT")
            return
        if argument[:3].upper() != "TO:":
            self._reply(R.PARAM_SYNTAX, verb="RCPT")
            return
        split = self._split_path(argument[3:])
        if split is None:
            self._reply(R.BAD_RECIPIENT_SYNTAX, verb="RCPT")
            return
        path, params = split
        if params:
            self._reply(R.PARAM_NOT_RECOGNIZED, verb="RCPT")
            return
        if not s.smtputf8 and not path.isascii():
            self._reply(R.SMTPUTF8_REQUIRED, verb="RCPT")
            return
        try:
            if path.lower() == "<postmaster>":  # RFC 5321 4.5.1: must be accepted
                recipient = self.role.postmaster(s)
                if recipient is None:
                    self._reply(R.UNKNOWN_USER, verb="RCPT")
                    return
            else:
                recipient = parse_path(path, allow_utf8=s.smtputf8)
        except AddressError:
            recipient = None
        if recipient is None:
            self._reply(R.BAD_RECIPIENT_SYNTAX, verb="RCPT")
            return
        rcpt = recipient

        def then(reply: Reply) -> None:
            if reply.is_positive and rcpt not in s.recipients:
                s.recipients.append(rcpt)
            self._reply(reply, verb="RCPT")

        self._call(lambda: self.role.rcpt_to(s, rcpt), then, "RCPT")

    def _do_data(self, argument: str) -> None:
        s = self.session
        if argument:
            self._reply(R.PARAM_SYNTAX, verb="DATA")
            return
        if not s.has_sender:
            self._reply(R.NEED_MAIL, verb="DATA")
            return
        if not s.recipients:
            self._reply(R.NEED_RCPT, verb="DATA")
            return

        def then(reply: Reply) -> None:
            if not reply.is_positive:
                self._reply(reply, verb="DATA")
                return
            if self._buf:
                # RFC 2920 3.1: DATA ends a command group; the client must wait for the 354.
                # Bytes already here were sent before it: never take them as message content
                # nor as commands. Postfix (reject_unauth_pipelining) answers the same way.
                log.info(
                    "{sid} {peer} improper command pipelining after DATA: {n} bytes",
                    sid=s.session_id,
                    peer=s.client_ip,
                    n=len(self._buf),
                )
                self._buf = b""
                s.reset_transaction()
                self._reply(R.IMPROPER_PIPELINING, verb="DATA")
                if not self._closed:
                    self._send(R.IMPROPER_PIPELINING_BYE)
                    self._close()
                return
            try:
                incoming = self.role.begin_message(s)
                self._incoming = incoming
                incoming.write(self.role.data_header(s, incoming.queue_id))
            except Exception:
                log.failure("{sid} cannot begin message", sid=s.session_id)
                self._abort_incoming()
                self._reply(R.LOCAL_ERROR, verb="DATA")
                return
            self._mode = _DATA
            self._data = _DataState()
            self._reply(R.START_DATA)

        self._call(lambda: self.role.data_start(s), then, "DATA")

    def _xclient_allowed(self) -> bool:
        """XCLIENT is for the factory's ``xclient_trusted`` peers only (nginx's mail proxy),
        judged by the connection's address as seen before any XCLIENT."""
        trusted = getattr(self.factory, "xclient_trusted", ())
        if not trusted or not self._xclient_peer:
            return False
        try:
            ip = ipaddress.ip_address(self._xclient_peer)
        except ValueError:
            return False
        return any(ip in net for net in trusted)

    def _do_xclient(self, argument: str) -> None:
        """Postfix's XCLIENT: a trusted proxy passes on the real client (``ADDR``), its host
        ``NAME`` and the user it authenticated (``LOGIN``); the session starts over with a
        220 greeting, as if that client had connected (HELO and transaction forgotten)."""
        s = self.session
        if not self._xclient_allowed():
            self._reply(Reply(550, "5.7.0", "Insufficient authorization"), verb="XCLIENT")
            return
        if s.has_sender:
            self._reply(R.BAD_SEQUENCE, verb="XCLIENT")
            return
        values: dict[str, str] = {}
        for word in argument.split():
            name, eq, value = word.partition("=")
            name = name.upper()
            if not eq or not name:
                self._reply(Reply(501, "5.5.4", "Bad XCLIENT attribute syntax"), verb="XCLIENT")
                return
            if name not in XCLIENT_ATTRIBUTES:
                self._reply(
                    Reply(501, "5.5.4", f"Bad XCLIENT attribute name: {name}"), verb="XCLIENT"
                )
                return
            try:
                values[name] = xtext_decode(value)
            except ValueError:
                self._reply(Reply(501, "5.5.4", "Bad XCLIENT attribute value"), verb="XCLIENT")
                return
        if not values:
            self._reply(Reply(501, "5.5.4", "Syntax: XCLIENT attribute=value..."), verb="XCLIENT")
            return
        unavailable = ("[UNAVAILABLE]", "[TEMPUNAVAIL]")
        addr = values.get("ADDR")
        if addr is not None and addr.upper() not in unavailable:
            text = addr[5:] if addr.upper().startswith("IPV6:") else addr
            try:
                ipaddress.ip_address(text)
            except ValueError:
                self._reply(Reply(501, "5.5.4", "Bad XCLIENT ADDR value"), verb="XCLIENT")
                return
            s.client_ip = text
        login = values.get("LOGIN")
        if login is not None:
            s.authenticated = None if login.upper() in unavailable or not login else login
        host_name = values.get("NAME")
        if host_name is not None:
            s.client_name = "" if host_name.upper() in unavailable else host_name
        log.info(
            "{sid} XCLIENT from {proxy}: client={peer} name={name} login={login}",
            sid=s.session_id,
            proxy=self._xclient_peer,
            peer=s.client_ip,
            name=s.client_name or "-",
            login=s.authenticated or "-",
        )
        s.reset_transaction()
        s.helo = None
        s.esmtp = False
        self._send(Reply(220, "", f"{self.hostname} {self.greeting}"))

    def _do_rset(self, argument: str) -> None:
        if argument:
            self._reply(R.PARAM_SYNTAX, verb="RSET")
            return
        self.session.reset_transaction()
        self._reply(R.RESET_OK)

    def _do_noop(self, argument: str) -> None:
        self._reply(R.OK)

    def _do_quit(self, argument: str) -> None:
        if argument:
            self._reply(R.PARAM_SYNTAX, verb="QUIT")
            return
        self._send(R.BYE)
        self._close()

    def _do_vrfy(self, argument: str) -> None:
        if not argument:
            self._reply(R.PARAM_SYNTAX, verb="VRFY")
            return
        self._reply(R.VRFY_CANNOT)

    def _do_expn(self, argument: str) -> None:
        self._reply(R.NOT_IMPLEMENTED, verb="EXPN")

    def _do_help(self, argument: str) -> None:
        self._reply(R.HELP)

    def _do_starttls(self, argument: str) -> None:
        s = self.session
        if self.tls_options is None:
            self._reply(R.NOT_IMPLEMENTED, verb="STARTTLS")
            return
        if s.tls:
            self._reply(R.TLS_ALREADY_ACTIVE, verb="STARTTLS")
            return
        if argument:
            self._reply(R.PARAM_SYNTAX, verb="STARTTLS")
            return
        if s.has_sender:
            self._reply(R.TRANSACTION_IN_PROGRESS, verb="STARTTLS")
            return
        self._reply(R.READY_FOR_TLS)
        if self._buf:
            log.warn(
                "{sid} {peer} discarded {n} bytes pipelined after STARTTLS",
                sid=s.session_id,
                peer=s.client_ip,
                n=len(self._buf),
            )
            self._buf = b""
        self._flush()  # the 220 goes in plaintext, before the handshake
        try:
            self.transport.startTLS(self.tls_options)
        except Exception:
            log.failure("{sid} STARTTLS failed", sid=s.session_id)
            self._close()
            return
        self.session = Session(session_id=s.session_id, client_ip=s.client_ip, tls=True)

    def _do_auth(self, argument: str) -> None:
        """AUTH PLAIN / LOGIN (RFC 4954) with ``334`` continuations read by the line reader;
        which mechanisms are allowed, and when, is the role's ``auth_start``."""
        s = self.session
        mechanism, _, initial = argument.partition(" ")
        mechanism = mechanism.upper()
        if not mechanism:
            self._reply(R.PARAM_SYNTAX, verb="AUTH")
            return
        refusal = self.role.auth_start(s, mechanism)
        if refusal is not None:
            self._reply(refusal, verb="AUTH")
            return
        if s.helo is None or s.has_sender:
            self._reply(R.BAD_SEQUENCE, verb="AUTH")
            return
        if not sasl.SMTP.supports(mechanism):
            self._reply(R.AUTH_MECHANISM_UNKNOWN, verb="AUTH")
            return
        initial = initial.strip()
        exchange = sasl.SaslExchange(mechanism, sasl.SMTP)
        self._sasl_step(exchange, exchange.start(initial.encode("ascii", "replace") or None))

    def _sasl_step(self, exchange: sasl.SaslExchange, step: sasl.Step) -> None:
        """A step of the SASL exchange (``net/sasl.py``): a ``334`` continuation whose answer
        the line reader brings back here, a ``501``, or credentials for the role to check."""
        if isinstance(step, sasl.Challenge):
            self._send(Reply(334, "", step.encoded.decode("ascii")))
            self._line_reader = lambda line: self._sasl_step(exchange, exchange.respond(line))
        elif isinstance(step, sasl.Refused):
            cancelled = step.reason is sasl.SaslError.CANCELLED
            self._reply(R.AUTH_CANCELLED if cancelled else R.AUTH_BAD_RESPONSE, verb="AUTH")
        else:
            self._check_credentials(step.authzid, step.authcid, step.password)

    def _check_credentials(self, authzid: str, user: str, password: str) -> None:
        s = self.session

        def then(reply: Reply) -> None:
            if reply.code == 235 and s.authenticated is None:
                s.authenticated = user
            if reply.code != 235:
                s.authenticated = None
            log.info(
                "{sid} {peer} AUTH {user}: {result}",
                sid=s.session_id,
                peer=s.client_ip,
                user=user[:64],
                result=reply.code,
            )
            self._reply(reply, verb="AUTH")

        self._call(lambda: self.role.authenticate(s, authzid, user, password), then, "AUTH")

    # -- DATA ----------------------------------------------------------------------------------

    def _data_step(self) -> bool:
        """Consume message data from the buffer; True when the end of data was reached."""
        buf = self._buf
        d = self._data
        end = False
        if d.line_start and buf[:3] == b".\r\n":
            region, rest, end = b"", buf[3:], True
        elif d.line_start and len(buf) < 3 and b".\r\n".startswith(buf):
            return False
        else:
            i = buf.find(b"\r\n.\r\n")
            if i >= 0:
                region, rest, end = buf[: i + 2], buf[i + 5 :], True
            else:
                j = buf.rfind(b"\n") + 1
                region, rest = buf[:j], buf[j:]
        if region:
            lf = region.count(b"\n")
            if lf != region.count(b"\r") or lf != region.count(b"\r\n"):
                return self._bare_newline()
            self._consume(region)
        if end:
            self._buf = rest
            self._end_of_data()
            return True
        cr = rest.find(b"\r")
        if cr >= 0 and cr != len(rest) - 1:
            return self._bare_newline()
        if len(rest) > self.limits.max_line_length + 1:
            # An overlong line without its end yet: drop what we have, stay in DATA.
            if not d.too_long:
                d.too_long = True
                self._abort_incoming()
            d.line_start = False
            rest = b"\r" if rest.endswith(b"\r") else b""
        self._buf = rest
        return False

    def _consume(self, region: bytes) -> None:
        """Check and store complete lines (CRLF-terminated, bare CR/LF already excluded)."""
        d = self._data
        limit = self.limits.max_line_length
        if (
            not d.too_long
            and len(region) > limit + 2
            and max(map(len, region.split(b"\r\n"))) > limit
        ):
            d.too_long = True
        if not d.nul and b"\x00" in region:
            d.nul = True
        if not d.eightbit and not region.isascii():
            d.eightbit = True
        if d.line_start and region[:1] == b".":
            region = region[1:]
        region = region.replace(b"\r\n.", b"\r\n")
        d.line_start = True
        d.size += len(region)
        if d.size > self.limits.max_message_size:
            d.too_big = True
        if d.discarding:
            self._abort_incoming()
        elif self._incoming is not None:
            try:
                self._incoming.write(region)
            except OSError:
                # The end of DATA then finds no message and answers 451 4.3.0.
                log.failure("{sid} cannot store message data", sid=self.session.session_id)
                self._abort_incoming()

    def _abort_incoming(self) -> None:
        incoming, self._incoming = self._incoming, None
        if incoming is not None:
            try:
                incoming.abort()
            except Exception:
                log.failure("{sid} abort failed", sid=self.session.session_id)

    def _end_of_data(self) -> None:
        s, d = self.session, self._data
        self._mode = _COMMAND
        reject: tuple[Reply, str | None] | None = None
        if d.too_long:
            limit = self.limits.max_line_length
            reject = (R.DATA_LINE_TOO_LONG, R.DATA_LINE_TOO_LONG.text.format(limit=limit))
        elif d.too_big:
            reject = (R.MESSAGE_TOO_BIG, None)
        elif d.nul:
            reject = (R.NUL_IN_DATA, None)
        incoming = self._incoming
        if reject is not None or incoming is None:
            reply, text = reject or (R.LOCAL_ERROR, None)
            self._abort_incoming()
            s.reset_transaction()
            self._reply(reply, text, verb="DATA")
            return
        if d.eightbit and not s.body_8bitmime:
            log.info(
                "{sid} {qid}: 8-bit data without BODY=8BITMIME (accepted)",
                sid=s.session_id,
                qid=incoming.queue_id,
            )
        envelope = Envelope(
            sender=str(s.sender) if s.sender is not None else "",
            recipients=[str(r) for r in s.recipients],
            queue_id=incoming.queue_id,
            received_at=self.reactor.seconds(),
            client_address=s.client_ip,
            client_helo=s.helo or "",
            protocol=s.protocol_name,
            body_8bitmime=s.body_8bitmime or d.eightbit,
            smtputf8=s.smtputf8,
            size=incoming.size,
        )

        def then(reply: Reply) -> None:
            self._commit(incoming, envelope, reply)

        self._call(lambda: self.role.data_end(s, incoming, envelope), then, "end of DATA")

    def _commit(self, incoming: IIncomingMessage, envelope: Envelope, reply: Reply) -> None:
        s = self.session
        s.reset_transaction()
        if not reply.is_positive:
            self._abort_incoming()
            self._reply(reply, verb="DATA")
            return
        # From here the commit owns the message: a lost connection no longer aborts it.
        self._incoming = None
        sid, qid = s.session_id, incoming.queue_id
        queued: list[str] = []

        def committed(queue_id: str) -> Reply:
            log.info(
                "{sid} {qid}: accepted from={sender} to={recipients} size={size} peer={peer}"
                " message-id={msgid}",
                event="received",
                user=s.authenticated or "",
                sid=sid,
                qid=queue_id,
                msgid=incoming.message_id or "-",
                sender=f"<{envelope.sender}>",
                recipients=",".join(f"<{r}>" for r in envelope.recipients),
                size=envelope.size,
                peer=s.client_ip,
            )
            try:
                self.role.track_received(s, envelope, incoming.message_id)
            except Exception:
                log.failure("{sid} {qid}: tracking failed", sid=sid, qid=queue_id)
            try:
                self.role.message_committed(s, envelope)
            except Exception:
                log.failure("{sid} {qid}: message_committed failed", sid=sid, qid=queue_id)
            queued.append(queue_id)
            self._accepted += 1
            self._errors = 0  # Postfix: the error limits count errors "without delivering mail"
            return R.QUEUED

        def failed(failure: Failure) -> Reply:
            log.failure("{sid} {qid}: commit failed", failure, sid=sid, qid=qid)
            with suppress(Exception):
                incoming.abort()
            return R.LOCAL_ERROR

        def durable(reply: Reply) -> Reply | Deferred[Reply]:
            if reply is not R.QUEUED or not queued:
                return reply
            wait = self.role.after_commit(s, queued[0])
            if wait is None:
                return reply
            return wait.addBoth(lambda _: reply)

        def start() -> Deferred[Reply]:
            d = maybeDeferred(incoming.commit, envelope).addCallbacks(committed, failed)
            return d.addCallback(durable)

        def then(reply: Reply) -> None:
            if queued and reply is R.QUEUED:
                self._reply(reply, R.QUEUED.text.format(queue_id=queued[0]))
            else:
                self._reply(reply, verb="DATA")

        self._call(start, then, "commit")


class SMTPFactory(Factory):
    """Builds SMTP sessions for one role and enforces total and per-IP connection limits."""

    noisy = False  # no "Starting factory <...>" in the mail log

    def __init__(
        self,
        role: Role,
        hostname: str,
        limits: Limits,
        reactor: IReactorTime,
        tls_options: Any = None,
    ) -> None:
        self.role = role
        self.hostname = hostname
        self.limits = limits
        self.reactor = reactor
        self.tls_options = tls_options
        self.counter = ConnectionCounter(limits.max_connections_per_ip, limits.max_connections)
        """Admits sessions; ``mailgw.service`` puts in one per role, sharing the process total."""
        self.sessions: set[SMTPServer] = set()
        self._last_sweep = -1.0
        self.implicit_tls = False
        """Connections arrive already in TLS (the listener wraps them): no STARTTLS."""
        self.xclient_trusted: tuple[Any, ...] = ()
        """Networks whose peers may send XCLIENT (``[mx]``/``[submission] xclient_trusted``)."""

    def buildProtocol(self, addr: IAddress | None) -> Protocol:
        protocol = SMTPServer(self.role, self.hostname, self.limits, self.reactor, self.tls_options)
        protocol.factory = self
        return protocol

    def connection_opened(self, client_ip: str) -> Reply | None:
        """Count a new session; a reply (421) when it is over a limit (then it is not counted)."""
        refusal = self.counter.admit(client_ip)
        if refusal is Refusal.TOTAL and self._close_idle_sessions():
            refusal = self.counter.admit(client_ip)
        if refusal is Refusal.TOTAL:
            return R.TOO_MANY_CONNECTIONS
        if refusal is Refusal.PER_IP:
            return R.TOO_MANY_CONNECTIONS_FROM_IP
        return None

    def connection_closed(self, client_ip: str) -> None:
        """Forget a session counted by ``connection_opened``."""
        self.counter.release(client_ip)

    def _close_idle_sessions(self) -> int:
        """At the cap: close the sessions idle for ``stress_idle_timeout`` (at most one sweep a
        second), so that connections held open doing nothing cannot lock new clients out for
        the whole idle or session timeout. Returns how many were closed."""
        now = self.reactor.seconds()
        if now - self._last_sweep < 1.0:
            return 0
        self._last_sweep = now
        limit = self.limits.stress_idle_timeout
        idle = [s for s in self.sessions if s.idle_for() >= limit]
        for session in idle:
            session.close_idle()
        return len(idle)
