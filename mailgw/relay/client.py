"""Outbound SMTP client: sessions (EHLO, STARTTLS, AUTH), transactions, pooling, classification.

Layers, bottom up:

- ``SMTPClientProtocol``: reply framing (multi-line, enhanced status codes), command/reply
  matching in FIFO order (so pipelined commands work), a timeout per awaited reply.
- ``SMTPConnection``: one session. ``connect()`` opens it (greeting, EHLO/HELO, STARTTLS,
  AUTH); ``send(tx)`` runs one transaction (MAIL/RCPT/DATA, pipelined when offered) and
  streams the message file with CRLF normalisation and dot-stuffing (``DataEncoder``);
  ``reset()`` (RSET) and ``quit()``.
- ``ConnectionPool``: idle sessions keyed by the caller (e.g. (channel, MX address, port))
  and the session's identity (TLS policy, AUTH, HELO), reused for at most ``max_reuse``
  messages and ``max_age`` seconds (Postfix's connection cache); RSET only after a
  transaction left unfinished; closed after an idle timeout.
- ``deliver()``: try the targets (MX addresses or smarthosts) in order until one takes the
  transaction (a cached session the server dropped before the content went out is replaced
  by a fresh one at once); returns a ``DeliveryResult`` with the connection facts and
  per-recipient replies. ``classify()`` sorts a reply or error for the failover logic.

Nothing here imports the global reactor; everything takes ``reactor``.
"""

from __future__ import annotations

import base64
import ipaddress
import os
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from twisted.internet import error as ierror
from twisted.internet import ssl
from twisted.internet.defer import Deferred, DeferredList, succeed
from twisted.internet.endpoints import TCP4ClientEndpoint, TCP6ClientEndpoint, connectProtocol
from twisted.internet.protocol import Protocol
from twisted.protocols.basic import FileSender
from twisted.python.failure import Failure

from mailgw.model import Reply

MAX_REPLY_LINE = 8192
_ENHANCED_RE = re.compile(r"^([245]\.\d{1,3}\.\d{1,3})(?: |$)")
_LINE_RE = re.compile(rb"\r?\n")
_EOL_RE = re.compile(rb"\r\n?|\n")


# -- errors ------------------------------------------------------------------------------------


class SMTPClientError(Exception):
    """A session-level failure. ``stage`` names the step; ``reply`` the server's, if any."""

    def __init__(self, message: str, stage: str = "", reply: Reply | None = None) -> None:
        super().__init__(message)
        self.stage = stage
        self.reply = reply


class ConnectFailed(SMTPClientError):
    """TCP connection refused, unreachable, timed out, or the source address could not bind."""


class SMTPTimeout(SMTPClientError):
    """The server did not answer a step within its timeout; the connection was aborted."""


class TLSFailure(SMTPClientError):
    """STARTTLS required but not offered/refused, or the TLS handshake failed."""


class AuthFailure(SMTPClientError):
    """AUTH refused, no usable mechanism, or AUTH would have been sent without TLS."""


class ProtocolError(SMTPClientError):
    """The server broke the protocol (garbage reply, overlong line, data after STARTTLS)."""


class ConnectionClosed(SMTPClientError):
    """The connection was lost while a reply was awaited."""


class SessionRejected(SMTPClientError):
    """The server refused the session (greeting or EHLO/HELO not 2xx, or a 421)."""


# -- classification ----------------------------------------------------------------------------

DEFAULT_CHANNEL_PATTERNS: tuple[str, ...] = (
    r"block ?list",
    r"black ?list",
    r"\bblocked\b",
    r"\bRBL\b",
    r"\bDNSBL\b",
    r"spamhaus",
    r"spamcop",
    r"barracuda",
    r"\blisted\b",
    r"reputation",
    r"your (?:ip|IP|address|host)",
    r"client host",
    r"sending (?:ip|IP|host|address)",
    r"\bpolicy\b",
    r"too many connections",
    r"rate limit",
)

OK = "ok"
RECIPIENT_PERMANENT = "recipient_permanent"
MESSAGE_PERMANENT = "message_permanent"
CHANNEL_FAILURE = "channel_failure"


class Classifier:
    """Sort a reply or error into ok / recipient_permanent / message_permanent / channel_failure.

    Channel failures (another channel may succeed, so fail over at once): any error of the
    connection (refused, timeout, TLS, AUTH, protocol), any 4xx, and a 5xx that names the
    sending IP or policy: enhanced 5.7.x, or text matching one of ``patterns`` (blocklists…).
    Recipient-level 5xx: 5.1.x and 5.2.x (except 5.2.3, message too large), or 550/551/553
    without an enhanced code. The rest of 5xx is about the message (5.3.x, 5.6.x, 552, 554…).
    """

    def __init__(self, patterns: Sequence[str] = DEFAULT_CHANNEL_PATTERNS) -> None:
        self.patterns = [re.compile(p, re.IGNORECASE) for p in patterns]

    def __call__(self, outcome: Reply | BaseException | None) -> str:
        if outcome is None or isinstance(outcome, BaseException):
            return CHANNEL_FAILURE
        if outcome.is_positive:
            return OK
        if outcome.is_transient:
            return CHANNEL_FAILURE
        enhanced = outcome.enhanced
        if enhanced.startswith("5.7.") or any(p.search(outcome.text) for p in self.patterns):
            return CHANNEL_FAILURE
        if enhanced == "5.2.3":
            return MESSAGE_PERMANENT
        if enhanced.startswith(("5.1.", "5.2.")):
            return RECIPIENT_PERMANENT
        if not enhanced and outcome.code in (550, 551, 553):
            return RECIPIENT_PERMANENT
        return MESSAGE_PERMANENT


_default_classifier = Classifier()


def classify(outcome: Reply | BaseException | None, patterns: Sequence[str] | None = None) -> str:
    """Classify with the default patterns, or with ``patterns`` (see ``Classifier``)."""
    return (_default_classifier if patterns is None else Classifier(patterns))(outcome)


# -- values ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Timeouts:
    """Seconds per step; defaults follow RFC 5321 4.5.3.2 (connect: ours)."""

    connect: float = 30.0
    greeting: float = 300.0
    ehlo: float = 300.0
    starttls: float = 120.0
    auth: float = 120.0
    mail: float = 300.0
    rcpt: float = 300.0
    data_init: float = 120.0
    data_block: float = 180.0
    data_end: float = 600.0
    rset: float = 60.0
    quit: float = 10.0


@dataclass(frozen=True)
class ClientOptions:
    """How to talk to a destination.

    ``tls``: ``"may"`` (opportunistic: STARTTLS when offered; a failed handshake is retried
    once without TLS by ``deliver``), ``"require"`` (fail unless TLS is established) or
    ``"none"``. ``tls_verify`` checks the certificate against ``tls_hostname`` (trust:
    ``tls_ca_file`` PEM, else the platform store). ``auth`` = (user, password) for smarthosts,
    sent only over TLS unless ``auth_plaintext``. ``bind_address``: source IP to connect from
    (used for targets of the same address family).
    """

    helo: str
    tls: str = "may"
    tls_verify: bool = False
    tls_hostname: str | None = None
    tls_ca_file: str | None = None
    auth: tuple[str, str] | None = None
    auth_plaintext: bool = False
    bind_address: str | None = None
    timeouts: Timeouts = field(default_factory=Timeouts)
    lmtp: bool = False
    """Speak LMTP (RFC 2033): LHLO, and one reply per accepted recipient after DATA."""

    def __post_init__(self) -> None:
        if self.tls not in ("may", "require", "none"):
            raise ValueError(f"tls must be may, require or none, not {self.tls!r}")


@dataclass(frozen=True)
class Transaction:
    """One message to send: envelope, content file, and its SMTP extensions needs.

    ``prefix`` is sent before the file (e.g. a trace header); the message is the file from
    ``offset`` on (a spool queue file holds its envelope first); ``size`` defaults to that.
    ``data``, when given, is the content of ``path`` already read (a small message): it is
    sent from memory in one write instead of streaming the file.
    """

    sender: str
    recipients: Sequence[str]
    path: str
    size: int = 0
    offset: int = 0
    body_8bitmime: bool = False
    smtputf8: bool = False
    prefix: bytes = b""
    data: bytes | None = None

    @property
    def declared_size(self) -> int:
        if self.size:
            return self.size
        if self.data is not None:
            return len(self.data) + len(self.prefix)
        return os.path.getsize(self.path) - self.offset + len(self.prefix)

    @property
    def needs_smtputf8(self) -> bool:
        return not (self.sender.isascii() and all(r.isascii() for r in self.recipients))


@dataclass
class TransactionResult:
    """Replies of one transaction: per recipient, and the transaction's final reply."""

    recipients: dict[str, Reply]
    reply: Reply | None

    @property
    def accepted(self) -> list[str]:
        return [r for r, reply in self.recipients.items() if reply.is_positive]


@dataclass(frozen=True)
class Target:
    """Where to connect: host name (for logs/TLS), IP address, port."""

    name: str
    address: str
    port: int = 25


@dataclass
class DeliveryResult:
    """Outcome of ``deliver``: the last target tried, and per-recipient replies.

    ``connected``: a session got past the greeting; ``reply``: the final reply of the
    transaction (DATA end) or the reply that ended it; ``error``: the session error when no
    reply decides (connection refused, timeout, TLS…); ``attempts``: one line per target tried.
    """

    connected: bool = False
    tls: bool = False
    mx: str = ""
    address: str = ""
    port: int = 0
    source_address: str = ""
    reply: Reply | None = None
    error: SMTPClientError | None = None
    recipients: dict[str, Reply] = field(default_factory=dict)
    attempts: list[str] = field(default_factory=list)
    reused: bool = False

    def outcome(self, recipient: str, classifier: Classifier = _default_classifier) -> str:
        """Classification for one recipient (its own reply, else the session's)."""
        reply = self.recipients.get(recipient)
        if reply is not None:
            return classifier(reply)
        return classifier(self.error if self.error is not None else self.reply)

    def outcomes(
        self, recipients: Sequence[str], classifier: Classifier = _default_classifier
    ) -> dict[str, str]:
        return {r: self.outcome(r, classifier) for r in recipients}

    def describe(self, recipient: str | None = None) -> str:
        """A reply text for logs and DSNs: the recipient's reply, else the session's."""
        reply = self.recipients.get(recipient) if recipient else None
        reply = reply or self.reply
        if reply is not None:
            return reply.format().replace("\r\n", " ")
        return str(self.error) if self.error else "no attempt"


# -- wire encoding -----------------------------------------------------------------------------


class DataEncoder:
    """Stream transform for DATA: every line end becomes CRLF (never a bare LF or CR), lines
    starting with "." get one more, and ``finish()`` returns the terminating CRLF "." CRLF."""

    def __init__(self) -> None:
        self.at_line_start = True
        self.pending_cr = False

    def encode(self, chunk: bytes) -> bytes:
        if self.pending_cr:
            chunk = b"\r" + chunk
            self.pending_cr = False
        if chunk.endswith(b"\r"):
            chunk = chunk[:-1]
            self.pending_cr = True  # may be the first half of a CRLF split across chunks
        if not chunk:
            return b""
        text = _EOL_RE.sub(b"\r\n", chunk).replace(b"\r\n.", b"\r\n..")
        if self.at_line_start and text.startswith(b"."):
            text = b"." + text
        self.at_line_start = text.endswith(b"\r\n")
        return text

    def finish(self) -> bytes:
        tail = b""
        if self.pending_cr:
            self.pending_cr = False
            tail = b"\r\n"
        elif not self.at_line_start:
            tail = b"\r\n"
        self.at_line_start = True
        return tail + b".\r\n"


def parse_reply(lines: Sequence[str]) -> Reply:
    """Build a Reply from raw reply lines (code + "-" or " " + text), stripping the enhanced
    status code (RFC 2034) from each line when the first line carries one."""
    code = int(lines[0][:3])
    texts = [line[4:] for line in lines]
    match = _ENHANCED_RE.match(texts[0])
    enhanced = ""
    if match and match.group(1)[0] == str(code)[0]:
        enhanced = match.group(1)
        texts = [t[len(enhanced) + 1 :] if t.startswith(enhanced) else t for t in texts]
    return Reply(code, enhanced, "\n".join(texts))


def parse_ehlo(reply: Reply) -> dict[str, str]:
    """EHLO keywords (upper-case) → parameters, from the lines after the first."""
    extensions: dict[str, str] = {}
    for line in reply.text.split("\n")[1:]:
        keyword, _, params = line.strip().partition(" ")
        if keyword:
            extensions[keyword.upper()] = params.strip()
    return extensions


# -- protocol ----------------------------------------------------------------------------------


class _Waiter:
    def __init__(self, d: Deferred[Reply], stage: str, timer: Any) -> None:
        self.d = d
        self.stage = stage
        self.timer = timer


class SMTPClientProtocol(Protocol):
    """Reply framing and FIFO command/reply matching with per-reply timeouts."""

    def __init__(self, reactor: Any) -> None:
        self.reactor = reactor
        self.buffer = b""
        self.lines: list[str] = []
        self.waiters: list[_Waiter] = []
        self.connected_d: Deferred[None] = Deferred()
        self.alive = False
        self.tls_pending = False
        self.unsolicited: list[Reply] = []
        self.on_lost: list[Callable[[], None]] = []
        self._error: SMTPClientError | None = None

    # -- Twisted callbacks --

    def connectionMade(self) -> None:
        self.alive = True

    def dataReceived(self, data: bytes) -> None:
        self.buffer += data
        while self.alive:
            match = _LINE_RE.search(self.buffer)
            if match is None:
                if len(self.buffer) > MAX_REPLY_LINE:
                    self._abort(ProtocolError("reply line too long", self._stage()))
                return
            raw, self.buffer = self.buffer[: match.start()], self.buffer[match.end() :]
            line = raw.decode("utf-8", "replace")
            if len(raw) > MAX_REPLY_LINE or not re.match(r"^[2-5]\d\d(?:[ -]|$)", line):
                self._abort(ProtocolError(f"malformed reply line {line[:80]!r}", self._stage()))
                return
            if self.lines and line[:3] != self.lines[0][:3]:
                self._abort(ProtocolError("reply code changed within a reply", self._stage()))
                return
            self.lines.append(line)
            if len(line) == 3 or line[3] == " ":
                reply = parse_reply(self.lines)
                self.lines = []
                self._deliver(reply)

    def connectionLost(self, reason: Failure = ierror.ConnectionDone) -> None:  # type: ignore[assignment]
        self.alive = False
        if self._error is None:
            if self.tls_pending:
                self._error = TLSFailure(
                    f"TLS handshake failed: {reason.getErrorMessage()}", "starttls"
                )
            else:
                self._error = ConnectionClosed(
                    f"connection lost: {reason.getErrorMessage()}", self._stage()
                )
        self._fail_waiters(self._error)
        for callback in self.on_lost:
            callback()

    # -- commands --

    def expect(self, stage: str, timeout: float) -> Deferred[Reply]:
        """A Deferred for the next reply; on timeout the connection is aborted."""
        d: Deferred[Reply] = Deferred()
        if not self.alive:
            d.errback(self._error or ConnectionClosed("not connected", stage))
            return d
        waiter = _Waiter(d, stage, None)
        waiter.timer = self.reactor.callLater(timeout, self._timed_out, waiter, timeout)
        self.waiters.append(waiter)
        return d

    def command(self, line: str, stage: str, timeout: float) -> Deferred[Reply]:
        """Send one command line and return the Deferred for its reply."""
        d = self.expect(stage, timeout)
        if self.alive:
            self.transport.write(line.encode("utf-8") + b"\r\n")  # type: ignore[union-attr]
        return d

    # -- internals --

    def _stage(self) -> str:
        return self.waiters[0].stage if self.waiters else "idle"

    def _deliver(self, reply: Reply) -> None:
        if not self.waiters:
            self.unsolicited.append(reply)
            return
        waiter = self.waiters.pop(0)
        if waiter.timer.active():
            waiter.timer.cancel()
        waiter.d.callback(reply)

    def _timed_out(self, waiter: _Waiter, timeout: float) -> None:
        self._abort(
            SMTPTimeout(f"no reply within {timeout:g}s during {waiter.stage}", waiter.stage)
        )

    def _fail_waiters(self, exc: SMTPClientError) -> None:
        waiters, self.waiters = self.waiters, []
        for waiter in waiters:
            if waiter.timer.active():
                waiter.timer.cancel()
            waiter.d.errback(exc)

    def _abort(self, exc: SMTPClientError) -> None:
        if self._error is None:
            self._error = exc
        self.alive = False
        self._fail_waiters(exc)
        if self.transport is not None:
            self.transport.abortConnection()  # type: ignore[attr-defined]

    def abort(self, exc: SMTPClientError) -> None:
        """Fail every awaited reply with ``exc`` and drop the connection."""
        self._abort(exc)


# -- session -----------------------------------------------------------------------------------


def _client_tls_options(options: ClientOptions, target: Target) -> Any:
    if options.tls_verify:
        if options.tls_ca_file:
            with open(options.tls_ca_file, "rb") as f:
                trust = ssl.Certificate.loadPEM(f.read())
        else:
            trust = ssl.platformTrust()
        return ssl.optionsForClientTLS(options.tls_hostname or target.name, trustRoot=trust)
    return ssl.CertificateOptions(verify=False)


def session_identity(options: ClientOptions) -> tuple[Any, ...]:
    """The options that make a session what it is: only a session opened with the same
    TLS policy and name, AUTH, HELO, source address and protocol is reused."""
    return (
        options.tls,
        options.tls_verify,
        options.tls_hostname if options.tls_verify else None,
        options.tls_ca_file if options.tls_verify else None,
        options.auth,
        options.auth_plaintext,
        options.helo,
        options.bind_address,
        options.lmtp,
    )


def _family(address: str) -> int:
    return ipaddress.ip_address(address).version


class SMTPConnection:
    """One outbound SMTP session; create with ``SMTPConnection.connect``."""

    def __init__(
        self, reactor: Any, protocol: SMTPClientProtocol, target: Target, options: ClientOptions
    ) -> None:
        self.reactor = reactor
        self.protocol = protocol
        self.target = target
        self.options = options
        self.extensions: dict[str, str] = {}
        self.greeting: Reply | None = None
        self.tls = False
        self.esmtp = True
        self.authenticated = False
        self.transactions = 0
        self.source_address = ""
        self.pooled = False
        self.opened_at = reactor.seconds()
        self.identity = session_identity(options)
        self.content_sent = False
        """Part of the current transaction's content went out (a retry could duplicate)."""
        """What the session was opened for (``session_identity`` of the caller's options)."""
        self.needs_reset = False
        """A transaction was started and not completed (no final reply after the data):
        RSET before the session is reused."""

    @property
    def alive(self) -> bool:
        return self.protocol.alive and not self.protocol.unsolicited

    @classmethod
    def connect(
        cls, reactor: Any, target: Target, options: ClientOptions
    ) -> Deferred[SMTPConnection]:
        """Connect, read the greeting, EHLO (or HELO), STARTTLS and AUTH as configured."""
        return Deferred.fromCoroutine(cls._connect(reactor, target, options))

    @classmethod
    async def _connect(cls, reactor: Any, target: Target, options: ClientOptions) -> SMTPConnection:
        bind = None
        if options.bind_address and _family(options.bind_address) == _family(target.address):
            bind = (options.bind_address, 0)
        endpoint_class = TCP6ClientEndpoint if _family(target.address) == 6 else TCP4ClientEndpoint
        endpoint = endpoint_class(
            reactor,
            target.address,
            target.port,
            timeout=options.timeouts.connect,
            bindAddress=bind,
        )
        protocol = SMTPClientProtocol(reactor)
        try:
            await connectProtocol(endpoint, protocol)
        except ierror.ConnectError as e:
            what = {
                ierror.ConnectionRefusedError: "connection refused",
                ierror.TCPTimedOutError: "connection timed out",
                ierror.TimeoutError: "connection timed out",
                ierror.ConnectBindError: f"cannot bind source address {options.bind_address}",
            }.get(type(e), f"cannot connect: {e}")
            raise ConnectFailed(f"{target.address}:{target.port}: {what}", "connect") from None
        conn = cls(reactor, protocol, target, options)
        host = protocol.transport.getHost()  # type: ignore[union-attr]
        conn.source_address = getattr(host, "host", "")
        try:
            await conn._handshake()
        except SMTPClientError:
            conn.close()
            raise
        return conn

    async def _handshake(self) -> None:
        t = self.options.timeouts
        self.greeting = await self.protocol.expect("greeting", t.greeting)
        if self.greeting.code != 220:
            raise SessionRejected(f"greeting: {self.greeting.format()}", "greeting", self.greeting)
        await self._ehlo()
        if self.options.tls != "none":
            await self._starttls()
        if self.options.auth is not None:
            await self._auth(*self.options.auth)

    async def _ehlo(self) -> None:
        t = self.options.timeouts
        verb = "LHLO" if self.options.lmtp else "EHLO"
        reply = await self.protocol.command(f"{verb} {self.options.helo}", "ehlo", t.ehlo)
        if reply.code == 250:
            self.extensions = parse_ehlo(reply)
            self.esmtp = True
            return
        if reply.code >= 500 and not self.options.lmtp and reply.code != 554:
            reply = await self.protocol.command(f"HELO {self.options.helo}", "helo", t.ehlo)
            if reply.code == 250:
                self.extensions = {}
                self.esmtp = False
                return
        raise SessionRejected(f"EHLO/HELO: {reply.format()}", "ehlo", reply)

    async def _starttls(self) -> None:
        require = self.options.tls == "require"
        if "STARTTLS" not in self.extensions:
            if require:
                raise TLSFailure("STARTTLS not offered", "starttls")
            return
        reply = await self.protocol.command("STARTTLS", "starttls", self.options.timeouts.starttls)
        if reply.code != 220:
            if require or reply.code == 421:
                raise TLSFailure(f"STARTTLS refused: {reply.format()}", "starttls", reply)
            return
        if self.protocol.buffer:
            # Data pipelined after the 220 would be treated as if it came over TLS (injection).
            raise ProtocolError("server sent data after the STARTTLS reply", "starttls")
        self.protocol.tls_pending = True
        self.protocol.transport.startTLS(  # type: ignore[union-attr]
            _client_tls_options(self.options, self.target)
        )
        await self._ehlo()  # the first data over TLS: completes (or fails) the handshake
        self.protocol.tls_pending = False
        self.tls = True

    async def _auth(self, user: str, password: str) -> None:
        if not self.tls and not self.options.auth_plaintext:
            raise AuthFailure("refusing to send AUTH without TLS", "auth")
        mechanisms = self.extensions.get("AUTH", "").upper().split()
        timeout = self.options.timeouts.auth
        if "PLAIN" in mechanisms:
            token = base64.b64encode(f"\0{user}\0{password}".encode()).decode("ascii")
            reply = await self.protocol.command(f"AUTH PLAIN {token}", "auth", timeout)
        elif "LOGIN" in mechanisms:
            reply = await self.protocol.command("AUTH LOGIN", "auth", timeout)
            for value in (user, password):
                if reply.code != 334:
                    break
                encoded = base64.b64encode(value.encode()).decode("ascii")
                reply = await self.protocol.command(encoded, "auth", timeout)
        else:
            raise AuthFailure(f"no supported AUTH mechanism in {mechanisms}", "auth")
        if reply.code != 235:
            raise AuthFailure(f"AUTH failed: {reply.format()}", "auth", reply)
        self.authenticated = True

    # -- transactions --

    def send(self, tx: Transaction) -> Deferred[TransactionResult]:
        """Run one transaction; per-recipient replies, or SMTPClientError for the session."""
        return Deferred.fromCoroutine(self._send(tx))

    def _mail_command(self, tx: Transaction) -> str | Reply:
        params = []
        size = tx.declared_size
        if "SIZE" in self.extensions:
            limit = self.extensions["SIZE"]
            if limit.isdigit() and int(limit) and size > int(limit):
                return Reply(552, "5.3.4", f"message size {size} exceeds the remote limit {limit}")
            params.append(f"SIZE={size}")
        if tx.body_8bitmime and "8BITMIME" in self.extensions:
            params.append("BODY=8BITMIME")
        if tx.needs_smtputf8 or tx.smtputf8:
            if "SMTPUTF8" in self.extensions:
                params.append("SMTPUTF8")
            elif tx.needs_smtputf8:
                return Reply(553, "5.6.7", "remote server does not support SMTPUTF8")
        return " ".join([f"MAIL FROM:<{tx.sender}>", *params])

    async def _send(self, tx: Transaction) -> TransactionResult:
        t = self.options.timeouts
        mail = self._mail_command(tx)
        if isinstance(mail, Reply):
            return TransactionResult({r: mail for r in tx.recipients}, mail)
        self.transactions += 1
        self.needs_reset = True  # until the transaction completes with a final reply
        self.content_sent = False
        p = self.protocol
        replies: dict[str, Reply] = {}
        if "PIPELINING" in self.extensions:
            mail_d = p.command(mail, "mail", t.mail)
            rcpt_ds = [(r, p.command(f"RCPT TO:<{r}>", "rcpt", t.rcpt)) for r in tx.recipients]
            data_d = p.command("DATA", "data", t.data_init)
            try:
                mail_reply = await mail_d
                for r, d in rcpt_ds:
                    replies[r] = await d
                data_reply = await data_d
            except BaseException:
                for d in (mail_d, *(d for _, d in rcpt_ds), data_d):
                    d.addErrback(lambda _: None)  # failed with the session: nobody waits
                raise
            if not mail_reply.is_positive:
                self._check_closing(mail_reply)
                if data_reply.code == 354:
                    await self._finish_data(b"", t.data_end)
                    self.needs_reset = False
                return TransactionResult({r: mail_reply for r in tx.recipients}, mail_reply)
        else:
            mail_reply = await p.command(mail, "mail", t.mail)
            if not mail_reply.is_positive:
                self._check_closing(mail_reply)
                return TransactionResult({r: mail_reply for r in tx.recipients}, mail_reply)
            for r in tx.recipients:
                replies[r] = await p.command(f"RCPT TO:<{r}>", "rcpt", t.rcpt)
                if replies[r].code == 421:  # the server is closing: the transaction is over
                    closing = replies[r]
                    self._check_closing(closing)
                    return TransactionResult({x: closing for x in tx.recipients}, closing)
            if not any(reply.is_positive for reply in replies.values()):
                return TransactionResult(replies, None)
            data_reply = await p.command("DATA", "data", t.data_init)
        accepted = [r for r in tx.recipients if replies[r].is_positive]
        if data_reply.code != 354:
            self._check_closing(data_reply)
            if accepted:
                for r in accepted:
                    replies[r] = data_reply
            return TransactionResult(replies, data_reply if accepted else None)
        if not accepted:  # RFC 2920: 354 after all RCPTs failed: send an empty body
            final = await self._finish_data(b"", t.data_end)
            self.needs_reset = False
            return TransactionResult(replies, None)
        more: list[Deferred[Reply]] = []
        try:
            final = await self._stream(tx, more, len(accepted) - 1 if self.options.lmtp else 0)
        except BaseException:
            for d in more:  # failed with the session: nobody waits for them
                d.addErrback(lambda _: None)
            raise
        self._check_closing(final)
        self.needs_reset = False  # a final reply to the data ends the transaction
        if self.options.lmtp:  # RFC 2033 4.2: one reply per accepted recipient, in order
            replies[accepted[0]] = final
            try:
                for r, d in zip(accepted[1:], more, strict=True):
                    replies[r] = await d
                    self._check_closing(replies[r])
            except BaseException:
                for d in more:
                    d.addErrback(lambda _: None)
                raise
            final = replies[accepted[-1]]
            return TransactionResult(replies, final)
        for r in accepted:
            replies[r] = final
        return TransactionResult(replies, final)

    def _check_closing(self, reply: Reply) -> None:
        if reply.code == 421:
            self.protocol.unsolicited.append(reply)  # the server is closing: not reusable

    async def _finish_data(self, tail: bytes, timeout: float) -> Reply:
        d = self.protocol.expect("data-end", timeout)
        self.protocol.transport.write(tail + b".\r\n")  # type: ignore[union-attr]
        return await d

    async def _stream(
        self, tx: Transaction, more: list[Deferred[Reply]] | None = None, extra: int = 0
    ) -> Reply:
        """Send the content and the final dot; the first reply after it (and, for LMTP,
        ``extra`` more replies' Deferreds appended to ``more``, registered in time)."""
        t = self.options.timeouts
        encoder = DataEncoder()
        transport = self.protocol.transport
        assert transport is not None
        self.content_sent = True

        def expect_more() -> None:
            for _ in range(extra):
                d = self.protocol.expect("data-end", t.data_end)
                if more is not None:
                    more.append(d)

        if tx.data is not None:  # in memory: the whole DATA and its end in one write
            d = self.protocol.expect("data-end", t.data_end)
            expect_more()
            transport.write(encoder.encode(tx.prefix + tx.data) + encoder.finish())
            return await d
        timer = self.reactor.callLater(t.data_block, self._data_stalled, t.data_block)

        def transform(chunk: bytes) -> bytes:
            timer.reset(t.data_block)
            return encoder.encode(chunk)

        try:
            if tx.prefix:
                transport.write(encoder.encode(tx.prefix))
            with open(tx.path, "rb") as f:
                f.seek(tx.offset)
                await _ChunkSender().beginFileTransfer(f, transport, transform)
        except SMTPClientError:
            raise
        except Exception as e:  # the transport stopped the producer: connection lost
            raise self.protocol._error or ConnectionClosed(f"lost in DATA: {e}", "data") from None
        finally:
            if timer.active():
                timer.cancel()
        if not self.protocol.alive:
            raise self.protocol._error or ConnectionClosed("connection lost in DATA", "data")
        d = self.protocol.expect("data-end", t.data_end)
        expect_more()
        transport.write(encoder.finish())
        return await d

    def _data_stalled(self, timeout: float) -> None:
        self.protocol.abort(SMTPTimeout(f"could not send data for {timeout:g}s", "data"))

    def reset(self) -> Deferred[Reply]:
        """RSET: fires with the reply (250 expected)."""
        return self.protocol.command("RSET", "rset", self.options.timeouts.rset)

    def quit(self) -> Deferred[None]:
        """QUIT politely and close; never fails."""
        d: Deferred[None] = Deferred()
        if not self.protocol.alive:
            d.callback(None)
            return d
        q = self.protocol.command("QUIT", "quit", self.options.timeouts.quit)

        def done(_: object) -> None:
            self.close()

        q.addBoth(done)
        return q.addCallback(lambda _: None)

    def close(self) -> None:
        """Drop the connection without QUIT."""
        transport = self.protocol.transport
        if transport is not None and self.protocol.alive:
            self.protocol.alive = False
            transport.loseConnection()


class _ChunkSender(FileSender):
    CHUNK_SIZE = 2**16


# -- pool --------------------------------------------------------------------------------------


class ConnectionPool:
    """Idle SMTP sessions for reuse (Postfix's connection cache), keyed by the caller (e.g.
    (channel, source, address, port)) and by the session's identity (``session_identity``:
    TLS policy and name, AUTH, HELO, protocol), so a session is only reused for mail that
    would have opened the same one.

    ``give`` keeps a session at once after a completed transaction; only one left in the
    middle (MAIL or every RCPT refused, DATA refused) is checked with RSET first. Sessions
    are closed (QUIT) after ``idle_timeout`` seconds unused, after ``max_reuse``
    transactions, once older than ``max_age`` seconds (checked when given back and when
    taken: a session in use is never cut), or when the server drops them. ``take`` returns a
    live idle session or None.
    """

    def __init__(
        self,
        reactor: Any,
        idle_timeout: float = 30.0,
        max_reuse: int = 1000,
        max_age: float = 300.0,
    ) -> None:
        self.reactor = reactor
        self.idle_timeout = idle_timeout
        self.max_reuse = max_reuse
        self.max_age = max_age
        self.idle: dict[Any, list[tuple[SMTPConnection, Any]]] = {}
        self.opened = 0
        """Sessions handed out fresh by ``deliver`` (for status and tests)."""

    def _expired(self, conn: SMTPConnection) -> bool:
        return (
            conn.transactions >= self.max_reuse
            or self.reactor.seconds() - conn.opened_at >= self.max_age
        )

    def take(self, key: Any, identity: Any = None) -> SMTPConnection | None:
        """The most recently used live session under ``key`` whose identity matches (any
        identity when ``identity`` is None); dead or too old ones met on the way are closed."""
        entries = self.idle.get(key)
        if not entries:
            return None
        for index in range(len(entries) - 1, -1, -1):
            conn, timer = entries[index]
            if identity is not None and conn.identity != identity:
                continue
            del entries[index]
            if timer.active():
                timer.cancel()
            if conn.alive and not self._expired(conn):
                if not entries:
                    self.idle.pop(key, None)
                return conn
            if conn.alive:
                conn.quit()
            else:
                conn.close()
        if not entries:
            self.idle.pop(key, None)
        return None

    def give(self, key: Any, conn: SMTPConnection) -> Deferred[None]:
        """Keep ``conn`` for reuse (after an RSET only if its last transaction was left
        unfinished); fires when it is kept or closed."""
        if not conn.alive or self._expired(conn):
            return conn.quit()
        if not conn.needs_reset:
            self._keep(key, conn)
            return succeed(None)

        def reset(reply: Reply) -> Deferred[None] | None:
            if reply.code != 250:
                return conn.quit()
            conn.needs_reset = False
            self._keep(key, conn)
            return None

        return conn.reset().addCallbacks(reset, lambda _: conn.close())

    def _keep(self, key: Any, conn: SMTPConnection) -> None:
        if not conn.alive:
            return
        timer = self.reactor.callLater(self.idle_timeout, self._expire, key, conn)
        self.idle.setdefault(key, []).append((conn, timer))
        if not conn.pooled:
            conn.pooled = True
            conn.protocol.on_lost.append(lambda: self._forget(key, conn))

    def _forget(self, key: Any, conn: SMTPConnection) -> None:
        entries = self.idle.get(key, [])
        for entry in list(entries):
            if entry[0] is conn:
                entries.remove(entry)
                if entry[1].active():
                    entry[1].cancel()
        if not entries:
            self.idle.pop(key, None)

    def _expire(self, key: Any, conn: SMTPConnection) -> None:
        self._forget(key, conn)
        conn.quit()

    def count(self, key: Any = None) -> int:
        if key is not None:
            return len(self.idle.get(key, []))
        return sum(len(v) for v in self.idle.values())

    def close_all(self) -> Deferred[Any]:
        """QUIT every idle session."""
        conns = [conn for entries in self.idle.values() for conn, _ in entries]
        for entries in self.idle.values():
            for _, timer in entries:
                if timer.active():
                    timer.cancel()
        self.idle.clear()
        return DeferredList([c.quit() for c in conns]) if conns else succeed(None)


# -- delivery over a list of targets -----------------------------------------------------------


def deliver(
    reactor: Any,
    tx: Transaction,
    targets: Sequence[Target],
    options: ClientOptions,
    pool: ConnectionPool | None = None,
    pool_key: Any = "",
    max_targets: int = 5,
) -> Deferred[DeliveryResult]:
    """Send ``tx`` to the first target that takes it (RFC 5321 5.1: try the next MX address
    on connection failures and on transient session/transaction failures).

    Reused sessions come from ``pool`` under the key ``(pool_key, address, port)`` and go
    back to it afterwards. Never fails: errors are in the ``DeliveryResult``.
    """
    return Deferred.fromCoroutine(
        _deliver(reactor, tx, targets, options, pool, pool_key, max_targets)
    )


async def _open(
    reactor: Any, target: Target, options: ClientOptions, result: DeliveryResult
) -> SMTPConnection:
    try:
        return await SMTPConnection.connect(reactor, target, options)
    except TLSFailure as e:
        if options.tls != "may":
            raise
        # Opportunistic TLS: a failed handshake is retried once in plain text (as Postfix does).
        result.attempts.append(
            f"{target.name}[{target.address}]:{target.port}: {e}; retry without TLS"
        )
        conn = await SMTPConnection.connect(reactor, target, replace(options, tls="none"))
        conn.identity = session_identity(options)  # reused for the same policy
        return conn


def _stale(e: SMTPClientError, conn: SMTPConnection | None) -> bool:
    """A reused session failed before any of the message's content was written."""
    if isinstance(e, SMTPTimeout):
        return False  # a server that hangs is not a stale cache entry
    return conn is None or not conn.content_sent


async def _deliver(
    reactor: Any,
    tx: Transaction,
    targets: Sequence[Target],
    options: ClientOptions,
    pool: ConnectionPool | None,
    pool_key: Any,
    max_targets: int,
) -> DeliveryResult:
    result = DeliveryResult()
    tried = list(targets[:max_targets])
    if not tried:
        result.error = ConnectFailed("no target to connect to", "connect")
        return result
    identity = session_identity(options)
    for index, target in enumerate(tried):
        last = index == len(tried) - 1
        key = (pool_key, target.address, target.port)
        result = DeliveryResult(attempts=result.attempts)
        result.mx, result.address, result.port = target.name, target.address, target.port
        where = f"{target.name}[{target.address}]:{target.port}"
        conn = pool.take(key, identity) if pool is not None else None
        result.reused = conn is not None
        outcome: TransactionResult | None = None
        for _fresh_try in range(2):
            try:
                if conn is None:
                    conn = await _open(reactor, target, options, result)
                    result.reused = False
                    if pool is not None:
                        pool.opened += 1
                result.connected, result.tls = True, conn.tls
                result.source_address = conn.source_address
                outcome = await conn.send(tx)
            except SMTPClientError as e:
                if conn is not None:
                    conn.close()
                if result.reused and _stale(e, conn):
                    # A cached session the server dropped meanwhile, found before any of
                    # the content went out: the same transaction on a fresh session, at once.
                    conn, result.reused = None, False
                    continue
                result.error, result.reply = e, e.reply
                result.connected = not isinstance(e, ConnectFailed)
                result.attempts.append(f"{where}: {e}")
                break
            if result.reused and _closing_at_mail(outcome, conn):
                # 421 to MAIL on a cached session: the server was closing it (idle timeout).
                conn.close()
                conn, result.reused, outcome = None, False, None
                continue
            break
        if outcome is None or conn is None:
            continue
        result.recipients, result.reply = outcome.recipients, outcome.reply
        status = (
            outcome.reply.format().replace("\r\n", " ")
            if outcome.reply
            else "no recipient accepted"
        )
        result.attempts.append(f"{where}: {status}")
        transient = (
            outcome.reply is not None and outcome.reply.is_transient and not outcome.accepted
        )
        if pool is not None:
            await pool.give(key, conn)
        else:
            await conn.quit()
        if transient and not last:
            continue
        return result
    return result


def _closing_at_mail(outcome: TransactionResult, conn: SMTPConnection) -> bool:
    reply = outcome.reply
    return (
        reply is not None
        and reply.code == 421
        and not conn.content_sent
        and not outcome.accepted
        and all(r == reply for r in outcome.recipients.values())
    )
