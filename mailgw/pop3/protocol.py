"""The POP3 server state machine: framing, pipelining, STLS, authentication, commands."""

from __future__ import annotations

import secrets
from collections.abc import Callable
from typing import IO, TYPE_CHECKING, Any, cast

from twisted.cred.error import LoginFailed
from twisted.internet.interfaces import IDelayedCall
from twisted.internet.protocol import Protocol, connectionDone
from twisted.logger import Logger
from twisted.python.failure import Failure

from mailgw.directory.penalty import failure_delay
from mailgw.net import sasl
from mailgw.net.commandloop import CommandLoop
from mailgw.net.limits import Refusal
from mailgw.net.progress import ProgressWatch
from mailgw.net.proxy import peer_ip
from mailgw.pop3 import responses as P
from mailgw.pop3.maildrop import Maildrop, NoSuchMessage, parse_number
from mailgw.pop3.transfer import MessageSender

if TYPE_CHECKING:
    from mailgw.pop3.factory import POP3Factory

log = Logger()

MAX_LINE = 1024  # RFC 2449 asks for 255 octets; be generous, but bounded
MAX_BUFFER = 64 * 1024  # unprocessed input kept while a command runs before reading pauses
IMPLEMENTATION = "mailgw"

AUTHORIZATION = "AUTHORIZATION"
TRANSACTION = "TRANSACTION"
UPDATE = "UPDATE"

_COMMANDS = {
    AUTHORIZATION: {"CAPA", "USER", "PASS", "AUTH", "STLS", "QUIT"},
    TRANSACTION: {"CAPA", "STAT", "LIST", "UIDL", "TOP", "RETR", "DELE", "RSET", "NOOP", "QUIT"},
}
_KNOWN = set().union(*_COMMANDS.values())


class POP3Server(Protocol):
    """One POP3 session. Commands are processed strictly in order (RFC 2449 PIPELINING):
    while one waits (authentication, a message being streamed) later input stays buffered."""

    factory: POP3Factory
    transport: Any  # ITransport, plus ITLSTransport/IConsumer/IProducer from real transports

    def __init__(self, factory: POP3Factory) -> None:
        self.factory = factory
        self.session_id = secrets.token_hex(6)
        self.state = AUTHORIZATION
        self.secure = factory.implicit_tls
        self.user: str | None = None
        self.maildrop: Maildrop | None = None
        self._buffer = bytearray()
        self._skip_line = False  # discarding the rest of an overlong line
        self._closing = False
        self._lost = False
        self._input = CommandLoop(
            self._next_line,
            self._handle_line,
            lambda: len(self._buffer),
            lambda: self._closing,
            lambda: self.transport.pauseProducing(),
            lambda: self.transport.resumeProducing(),
            MAX_BUFFER,
        )
        self._errors = 0
        self._pending_user: str | None = None
        self._continuation: Callable[[bytes], None] | None = None
        self._idle: IDelayedCall | None = None
        self._delay: IDelayedCall | None = None
        self._sender: MessageSender | None = None
        self._counted_ip: str | None = None
        self._login_timer: IDelayedCall | None = None
        self._progress = ProgressWatch(
            factory.reactor, factory.config.command_timeout, self._progress_expired
        )
        self.peer = "-"

    # -- connection ----------------------------------------------------------------------------

    def connectionMade(self) -> None:
        ip = peer_ip(self.transport.getPeer())
        self.peer = ip or "-"
        refusal = self.factory.connection_opened(ip)
        if refusal is not None:
            log.warn(
                "pop3 {session} refused: too many connections {where}",
                session=self.session_id,
                where="in all" if refusal is Refusal.TOTAL else f"from {self.peer}",
            )
            full = refusal is Refusal.TOTAL
            self._err(P.SERVER_FULL if full else P.TOO_MANY_CONNECTIONS, count=False)
            self._close()
            return
        self._counted_ip = ip
        self._idle = self.factory.reactor.callLater(self.factory.config.idle_timeout, self._timeout)
        if self.factory.config.login_timeout > 0:
            self._login_timer = self.factory.reactor.callLater(
                self.factory.config.login_timeout, self._login_expired
            )
        self._ok(P.GREETING.format(hostname=self.factory.hostname))

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self._lost = True
        self._closing = True
        for call in (self._idle, self._delay, self._login_timer):
            if call is not None and call.active():
                call.cancel()
        self._idle = self._delay = self._login_timer = None
        self._progress.cancel()
        if self._sender is not None:
            self._sender.stopProducing()
            self._sender = None
        self._release_lock()
        if self._counted_ip is not None:
            self.factory.connection_closed(self._counted_ip)
            self._counted_ip = None

    def dataReceived(self, data: bytes) -> None:
        if self._closing:
            return
        self._touch()
        self._buffer += data
        self._input.run()
        self._watch_progress(len(data))

    def _watch_progress(self, received: int) -> None:
        """A command line must be complete within ``command_timeout`` (slowloris defence);
        input buffered while the server is busy is the server's delay, not the client's."""
        if self._closing or self._input.busy or not (self._buffer or self._skip_line):
            self._progress.finished()
        else:
            self._progress.unfinished(received)

    def _progress_expired(self) -> None:
        log.info("pop3 {session} command not completed in time", session=self.session_id)
        self._err(P.COMMAND_TIMEOUT, count=False)
        self._close()

    def _login_expired(self) -> None:
        self._login_timer = None
        if self.state != AUTHORIZATION or self._closing:
            return
        log.info(
            "pop3 {session} no login in time from {peer}", session=self.session_id, peer=self.peer
        )
        self._err(P.LOGIN_TIMEOUT, count=False)
        self._close()

    def _touch(self) -> None:
        if self._idle is not None and self._idle.active():
            self._idle.reset(self.factory.config.idle_timeout)

    def _timeout(self) -> None:
        self._idle = None
        log.info(
            "pop3 {session} idle timeout (user {user})", session=self.session_id, user=self.user
        )
        if self._sender is not None:
            # A client that stopped reading mid-message: a graceful close would wait forever.
            self._abort()
            return
        self._err(P.IDLE_TIMEOUT, count=False)
        self._close()

    def _close(self) -> None:
        self._closing = True
        self._buffer.clear()
        self.transport.loseConnection()

    def _abort(self) -> None:
        self._closing = True
        self._buffer.clear()
        self.transport.abortConnection()

    def _release_lock(self) -> None:
        if self.user is not None:
            self.factory.unlock(self.user, self)

    # -- input framing and the command loop ---------------------------------------------------

    def _next_line(self) -> bytes | None:
        while not self._closing:
            nl = self._buffer.find(b"\n")
            if self._skip_line:
                if nl < 0:
                    self._buffer.clear()
                    return None
                del self._buffer[: nl + 1]
                self._skip_line = False
                continue
            if nl < 0:
                if len(self._buffer) > MAX_LINE:
                    self._buffer.clear()
                    self._skip_line = True
                    self._continuation = None
                    self._err(P.LINE_TOO_LONG)
                return None
            line = bytes(self._buffer[:nl])
            del self._buffer[: nl + 1]
            if line.endswith(b"\r"):
                line = line[:-1]
            if len(line) > MAX_LINE:
                self._continuation = None
                self._err(P.LINE_TOO_LONG)
                continue
            return line
        return None

    def _handle_line(self, line: bytes) -> None:
        try:
            if self._continuation is not None:
                continuation, self._continuation = self._continuation, None
                continuation(line)
                return
            self._command(line)
        except Exception:
            self._internal_error(Failure())

    def _command(self, line: bytes) -> None:
        try:
            text = line.decode("utf-8")
        except UnicodeDecodeError:
            self._err(P.BAD_ENCODING)
            return
        name, _, arg = text.partition(" ")
        name = name.upper()
        if name not in _KNOWN:
            self._err(P.UNKNOWN_COMMAND)
            return
        if self.state not in _COMMANDS or name not in _COMMANDS[self.state]:
            self._err(P.WRONG_STATE)
            return
        getattr(self, f"do_{name}")(arg)

    def _done(self) -> None:
        """An asynchronous command has answered: go on with buffered input."""
        self._input.busy = False
        self._touch()
        if not self._closing:
            self._input.run()
            self._watch_progress(0)

    def _internal_error(self, failure: Failure) -> None:
        log.failure(
            "pop3 {session} user {user}: internal error",
            failure,
            session=self.session_id,
            user=self.user,
        )
        self._continuation = None
        if not self._closing:
            self._err(P.INTERNAL, count=False)
        self._input.busy = False

    # -- output ---------------------------------------------------------------------------------

    def _write_line(self, text: str) -> None:
        self.transport.write(text.encode("utf-8") + b"\r\n")

    def _ok(self, text: str = "") -> None:
        self._write_line(f"+OK {text}" if text else "+OK")

    def _multiline(self, text: str, lines: list[str]) -> None:
        out = [f"+OK {text}" if text else "+OK"]
        out += [("." + line) if line.startswith(".") else line for line in lines]
        out.append(".")
        self.transport.write("\r\n".join(out).encode("utf-8") + b"\r\n")

    def _err(self, text: str, count: bool = True) -> None:
        self._write_line(f"-ERR {text}")
        if not count:
            return
        self._errors += 1
        if self._errors >= self.factory.config.max_errors and not self._closing:
            log.info(
                "pop3 {session} closed after {n} errors", session=self.session_id, n=self._errors
            )
            self._write_line(f"-ERR {P.TOO_MANY_ERRORS}")
            self._close()

    # -- authorization state --------------------------------------------------------------------

    def plaintext_allowed(self) -> bool:
        """May a password be sent in this state (TLS, or config yes/loopback)?"""
        policy = sasl.PlaintextPolicy(self.factory.config.allow_plaintext_auth)
        return policy.allows(self.secure, self.transport.getPeer)

    def capabilities(self) -> list[str]:
        caps = ["TOP"]
        if self.state == AUTHORIZATION and self.plaintext_allowed():
            caps.append("USER")
        caps += ["UIDL", "RESP-CODES", "AUTH-RESP-CODE", "PIPELINING"]
        if self.state == AUTHORIZATION:
            if self.plaintext_allowed():
                caps.append(" ".join(["SASL", *sasl.POP3.mechanisms]))
            if self.factory.tls_options is not None and not self.secure:
                caps.append("STLS")
        caps.append(f"IMPLEMENTATION {IMPLEMENTATION}")
        return caps

    def do_CAPA(self, arg: str) -> None:
        self._multiline(P.CAPA, self.capabilities())

    def do_USER(self, arg: str) -> None:
        if not self.plaintext_allowed():
            self._err(P.PLAINTEXT_DISALLOWED)
            return
        name = arg.strip()
        if not name:
            self._err(P.MISSING_USER)
            return
        self._pending_user = name
        self._ok(P.SEND_PASSWORD)

    def do_PASS(self, arg: str) -> None:
        name, self._pending_user = self._pending_user, None
        if name is None:
            self._err(P.USER_FIRST)
            return
        # USER was accepted, so plaintext is allowed: only STLS changes that, and it forgets USER.
        self._authenticate(name, arg)

    def do_AUTH(self, arg: str) -> None:
        args = arg.split()
        if not args:
            mechanisms = list(sasl.POP3.mechanisms) if self.plaintext_allowed() else []
            self._multiline(P.AUTH_MECHANISMS, mechanisms)
            return
        mechanism = args[0].upper()
        if not sasl.POP3.supports(mechanism):
            self._err(P.AUTH_UNSUPPORTED)
            return
        if not self.plaintext_allowed():
            self._err(P.PLAINTEXT_DISALLOWED)
            return
        if len(args) > 2:
            self._err(P.SYNTAX)
            return
        exchange = sasl.SaslExchange(mechanism, sasl.POP3)
        initial = args[1].encode("ascii", "replace") if len(args) == 2 else None
        self._sasl_step(exchange, exchange.start(initial))

    def _sasl_step(self, exchange: sasl.SaslExchange, step: sasl.Step) -> None:
        """A step of the SASL exchange (``net/sasl.py``): a continuation (``+ base64``) whose
        answer comes back here, an error, or credentials to check."""
        if isinstance(step, sasl.Challenge):
            self.transport.write(b"+ " + step.encoded + b"\r\n")
            self._continuation = lambda line: self._sasl_step(exchange, exchange.respond(line))
        elif isinstance(step, sasl.Refused):
            if step.reason is sasl.SaslError.CANCELLED:
                self._err(P.AUTH_CANCELLED, count=False)
            elif step.reason is sasl.SaslError.BAD_BASE64:
                self._err(P.AUTH_BAD_BASE64)
            else:  # MALFORMED (BAD_UTF8 is LOGIN's, which POP3 does not offer)
                self._err(P.AUTH_BAD_PLAIN)
        elif not sasl.acts_as_self(step):
            # Acting as another user is not supported: an ordinary failed login.
            log.info(
                "pop3 {session} authzid {authzid} refused for {authcid}",
                session=self.session_id,
                authzid=step.authzid,
                authcid=step.authcid,
            )
            self._input.busy = True
            self._fail_later()
        else:
            self._authenticate(step.authcid, step.password)

    def _authenticate(self, name: str, password: str) -> None:
        key = sasl.login_key(name)
        self._input.busy = True
        if key is None:
            log.info(
                "pop3 {session} login with invalid name {name!r} from {peer}",
                session=self.session_id,
                name=name,
                peer=self.peer,
            )
            self._fail_later()
            return
        d = self.factory.auth.check_password(key, password, self.peer, protocol="pop3")
        d.addCallbacks(
            self._authenticated, self._not_authenticated, callbackArgs=(key,), errbackArgs=(key,)
        )
        d.addErrback(self._async_error)

    def _authenticated(self, user: Any, key: str) -> None:
        if self._lost:
            return
        name = getattr(user, "name", None)
        canonical = name if isinstance(name, str) and name else key
        if not self.factory.lock(canonical, self):
            log.info(
                "pop3 {session} {user} refused: mailbox locked",
                session=self.session_id,
                user=canonical,
            )
            self._err(P.IN_USE, count=False)
            self._done()
            return
        try:
            maildrop = Maildrop.open(self.factory.store, canonical)
        except Exception:
            self.factory.unlock(canonical, self)
            log.failure(
                "pop3 {session} user {user}: cannot open INBOX",
                Failure(),
                session=self.session_id,
                user=canonical,
            )
            self._err(P.MAILBOX_UNAVAILABLE, count=False)
            self._done()
            return
        self.user = canonical
        self.maildrop = maildrop
        self.state = TRANSACTION
        log.info(
            "pop3 {session} login {user} from {peer} ({count} messages)",
            session=self.session_id,
            user=canonical,
            peer=self.peer,
            count=maildrop.count,
        )
        self._ok(P.LOGGED_IN.format(count=maildrop.count, size=maildrop.size))
        self._done()

    def _not_authenticated(self, failure: Failure, key: str) -> None:
        if self._lost:
            return
        if failure.check(LoginFailed):
            log.info(
                "pop3 {session} authentication failed for {user} from {peer}",
                session=self.session_id,
                user=key,
                peer=self.peer,
            )
            self._fail_later(failure_delay(failure, self.factory.auth_failure_delay))
            return
        log.failure(
            "pop3 {session} user {user}: directory error",
            failure,
            session=self.session_id,
            user=key,
        )
        self._err(P.AUTH_UNAVAILABLE, count=False)
        self._done()

    def _fail_later(self, delay: float | None = None) -> None:
        if delay is None:
            delay = self.factory.auth_failure_delay
        self._delay = self.factory.reactor.callLater(delay, self._failed_reply)

    def _failed_reply(self) -> None:
        self._delay = None
        self._err(P.AUTH_FAILED)
        self._done()

    def _async_error(self, failure: Failure) -> None:
        if self._lost:
            return
        self._internal_error(failure)
        self._done()

    def do_STLS(self, arg: str) -> None:
        if self.secure:
            self._err(P.TLS_ACTIVE)
            return
        if self.factory.tls_options is None:
            self._err(P.TLS_UNAVAILABLE)
            return
        self._ok(P.BEGIN_TLS)
        if self._buffer:
            # Plaintext pipelined after STLS must never run as if it came over TLS.
            log.warn(
                "pop3 {session} discarding {n} bytes sent after STLS from {peer}",
                session=self.session_id,
                n=len(self._buffer),
                peer=self.peer,
            )
        self._buffer.clear()
        self._skip_line = False
        self.transport.startTLS(self.factory.tls_options)
        self.secure = True
        self._pending_user = None
        self._continuation = None

    def do_QUIT(self, arg: str) -> None:
        hostname = self.factory.hostname
        if self.state == AUTHORIZATION or self.maildrop is None:
            self._ok(P.BYE.format(hostname=hostname))
            self._close()
            return
        self.state = UPDATE
        try:
            deleted = self.maildrop.commit()
        except Exception:
            log.failure(
                "pop3 {session} user {user}: expunge failed",
                Failure(),
                session=self.session_id,
                user=self.user,
            )
            self._err(P.NOT_EXPUNGED, count=False)
        else:
            if deleted:
                log.info(
                    "pop3 {session} {user} expunged {n} messages",
                    session=self.session_id,
                    user=self.user,
                    n=deleted,
                )
            self._ok(P.BYE_UPDATED.format(hostname=hostname, deleted=deleted))
        self._release_lock()
        self._close()

    # -- transaction state ----------------------------------------------------------------------

    def _drop(self) -> Maildrop:
        assert self.maildrop is not None
        return self.maildrop

    def _lookup(self, text: str) -> tuple[int, Any] | None:
        try:
            return self._drop().lookup(text)
        except NoSuchMessage as e:
            self._err(str(e))
            return None

    def do_STAT(self, arg: str) -> None:
        drop = self._drop()
        self._ok(f"{drop.count} {drop.size}")

    def do_LIST(self, arg: str) -> None:
        self._listing(arg, lambda n, info: str(info.size), P.SCAN_LISTING)

    def do_UIDL(self, arg: str) -> None:
        drop = self._drop()
        self._listing(arg, lambda n, info: drop.unique_id(info), P.UIDL_LISTING)

    def _listing(self, arg: str, value: Callable[[int, Any], str], header: str) -> None:
        drop = self._drop()
        args = arg.split()
        if len(args) > 1:
            self._err(P.SYNTAX)
            return
        if args:
            found = self._lookup(args[0])
            if found is not None:
                number, info = found
                self._ok(f"{number} {value(number, info)}")
            return
        lines = [f"{n} {value(n, info)}" for n, info in drop.visible()]
        self._multiline(header.format(count=drop.count, size=drop.size), lines)

    def do_RETR(self, arg: str) -> None:
        args = arg.split()
        if len(args) != 1:
            self._err(P.SYNTAX)
            return
        found = self._lookup(args[0])
        if found is not None:
            number, info = found
            self._send(info, P.RETR.format(size=info.size), None)

    def do_TOP(self, arg: str) -> None:
        args = arg.split()
        if len(args) != 2:
            self._err(P.SYNTAX)
            return
        lines = parse_number(args[1])
        if lines is None:
            self._err(P.SYNTAX)
            return
        found = self._lookup(args[0])
        if found is not None:
            self._send(found[1], P.TOP, lines)

    def _send(self, info: Any, header: str, body_lines: int | None) -> None:
        drop = self._drop()
        uid = int(info.uid)
        try:
            file = drop.mailbox.open_message(uid)
        except KeyError:
            self._err(P.MESSAGE_GONE, count=False)
            return
        self._ok(header)
        self._input.busy = True
        sender = MessageSender(
            cast(IO[bytes], file), self.transport, body_lines, on_progress=self._touch
        )
        self._sender = sender
        d = sender.start()
        d.addCallbacks(self._sent, self._send_failed, callbackArgs=(uid, body_lines is None))
        d.addErrback(self._async_error)

    def _sent(self, size: int, uid: int, retrieved: bool) -> None:
        self._sender = None
        if retrieved:
            try:
                self._drop().mailbox.set_flags([uid], ["\\Seen"], "add")
            except Exception:  # the message was sent; a flag we could not set is no error
                log.failure(
                    "pop3 {session} user {user}: cannot set \\Seen on {uid}",
                    Failure(),
                    session=self.session_id,
                    user=self.user,
                    uid=uid,
                )
        self._done()

    def _send_failed(self, failure: Failure) -> None:
        self._sender = None
        if self._lost:
            return
        # Part of the message is already on the wire: an -ERR now would be taken as content.
        log.failure(
            "pop3 {session} user {user}: reading a message failed",
            failure,
            session=self.session_id,
            user=self.user,
        )
        self._abort()

    def do_DELE(self, arg: str) -> None:
        args = arg.split()
        if len(args) != 1:
            self._err(P.SYNTAX)
            return
        refusal = self.factory.store.write_refusal()
        if refusal is not None:
            self._err(f"[SYS/TEMP] {refusal}")
            return
        found = self._lookup(args[0])
        if found is not None:
            self._drop().delete(found[0])
            self._ok(P.DELETED.format(number=found[0]))

    def do_RSET(self, arg: str) -> None:
        drop = self._drop()
        drop.reset()
        self._ok(P.RESET.format(count=drop.count, size=drop.size))

    def do_NOOP(self, arg: str) -> None:
        self._ok()
