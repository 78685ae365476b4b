"""CAPABILITY, ID, LOGOUT, STARTTLS, LOGIN, AUTHENTICATE, ENABLE, NAMESPACE, UNAUTHENTICATE:
the commands of the not-authenticated state and of any state, and the session-wide
settings (RFC 3501 6.1-6.2, RFC 2971 ID, RFC 5161 ENABLE, RFC 2342 NAMESPACE, RFC 8437)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from twisted.cred.error import LoginFailed
from twisted.internet.defer import Deferred
from twisted.logger import Logger
from twisted.python.failure import Failure

from mailgw.directory.penalty import failure_delay
from mailgw.imap import parser as p
from mailgw.imap import wire
from mailgw.imap.commands.registry import Command
from mailgw.imap.states import ANY, AUTH, NOT_AUTH
from mailgw.net import sasl

if TYPE_CHECKING:
    from mailgw.imap.session import IMAPServer

log = Logger()


def capability(session: IMAPServer, tag: str, command: p.Simple) -> None:
    session.write(wire.untagged(b"CAPABILITY", " ".join(session.capabilities())))
    session.ok(tag, "CAPABILITY completed")


def logout(session: IMAPServer, tag: str, command: p.Simple) -> None:
    session.write(wire.untagged_status("BYE", "Logging out"))
    session.write(wire.tagged(tag, "OK", "LOGOUT completed"))
    session.close()


def id_(session: IMAPServer, tag: str, command: p.Id) -> None:
    session.write(wire.untagged(b'ID ("name" "mailgw" "vendor" "mailgw")'))
    session.ok(tag, "ID completed")


def starttls(session: IMAPServer, tag: str, command: p.Simple) -> None:
    if session.secure:
        session.tagged(tag, "BAD", "TLS is already active")
        return
    if session.factory.tls_options is None:
        session.tagged(tag, "NO", "TLS is not available", wire.UNAVAILABLE)
        return
    session.write(wire.tagged(tag, "OK", "Begin TLS negotiation now"))
    dropped = session.reader.discard_buffered()
    if dropped:
        # Plaintext pipelined after STARTTLS must never run as if it came over TLS.
        log.warn(
            "imap {session} discarding {n} bytes sent after STARTTLS from {peer}",
            session=session.session_id,
            n=dropped,
            peer=session.peer,
        )
    session.transport.startTLS(session.factory.tls_options)
    session.secure = True


def enable(session: IMAPServer, tag: str, command: p.Enable) -> None:
    enabled = []
    for cap in command.capabilities:
        if cap == "CONDSTORE" and not session.condstore:
            session.condstore = True
            enabled.append(cap)
        elif cap == "QRESYNC" and not session.qresync:
            session.qresync = session.condstore = True  # QRESYNC implies CONDSTORE (RFC 7162)
            enabled.append(cap)
        elif cap == "UTF8=ACCEPT" and not session.utf8_accept:
            session.utf8_accept = True
            enabled.append(cap)
        elif cap == "IMAP4REV2" and not session.rev2:
            session.rev2 = True
            enabled.append("IMAP4rev2")
    if session.selected is not None:
        session.selected.condstore = session.condstore
        session.selected.qresync = session.qresync
        session.selected.rev2 = session.rev2
    session.write(wire.untagged(b"ENABLED", " ".join(enabled)) if enabled else b"* ENABLED\r\n")
    session.ok(tag, "ENABLE completed")


def unauthenticate(session: IMAPServer, tag: str, command: p.Simple) -> None:
    """RFC 8437: back to the not-authenticated state, as after the greeting."""
    log.info("imap {session} unauthenticate {user}", session=session.session_id, user=session.user)
    session.logged_out()
    session.write(wire.tagged(tag, "OK", "UNAUTHENTICATE completed"))


def namespace(session: IMAPServer, tag: str, command: p.Simple) -> None:
    session.write(wire.untagged(b'NAMESPACE (("" "/")) NIL NIL'))
    session.ok(tag, "NAMESPACE completed")


# -- authentication ------------------------------------------------------------------------------


def login(session: IMAPServer, tag: str, command: p.Login) -> None:
    if not session.plaintext_allowed():
        session.tagged(tag, "NO", "Use STARTTLS first", wire.PRIVACYREQUIRED)
        return
    try:
        name = command.username.decode("utf-8")
        password = command.password.decode("utf-8")
    except UnicodeDecodeError:
        session.suspend()
        _fail_later(session, tag)
        return
    _authenticate(session, tag, name, password)


def authenticate(session: IMAPServer, tag: str, command: p.Authenticate) -> None:
    if not sasl.IMAP.supports(command.mechanism):
        session.tagged(tag, "NO", "Unsupported authentication mechanism", wire.CANNOT)
        return
    if not session.plaintext_allowed():
        session.tagged(tag, "NO", "Use STARTTLS first", wire.PRIVACYREQUIRED)
        return
    exchange = sasl.SaslExchange(command.mechanism, sasl.IMAP)
    _sasl_step(session, tag, exchange, exchange.start(command.initial_response))


def _sasl_step(session: IMAPServer, tag: str, exchange: sasl.SaslExchange, step: sasl.Step) -> None:
    """A step of the SASL exchange (``net/sasl.py``): a continuation (``+ base64``) whose
    answer comes back here, a BAD (cancelled with ``*``, RFC 3501 6.2.2, or malformed), a
    failed login, or credentials to check."""
    if isinstance(step, sasl.Challenge):
        session.write(b"+ " + step.encoded + b"\r\n")
        session.expect_line(lambda line: _sasl_step(session, tag, exchange, exchange.respond(line)))
    elif isinstance(step, sasl.Refused):
        if step.reason is sasl.SaslError.CANCELLED:
            session.bad(tag, "Authentication cancelled")
        elif step.reason is sasl.SaslError.BAD_BASE64:
            session.bad(tag, "Invalid base64 data")
        elif step.reason is sasl.SaslError.MALFORMED:
            session.bad(tag, "Invalid PLAIN response")
        else:  # a LOGIN name or password that is not UTF-8: an ordinary failed login
            session.suspend()
            _fail_later(session, tag)
    elif not sasl.acts_as_self(step):
        session.suspend()
        _fail_later(session, tag)
    else:
        _authenticate(session, tag, step.authcid, step.password)


def _authenticate(session: IMAPServer, tag: str, name: str, password: str) -> None:
    key = sasl.login_key(name)
    session.suspend()
    if key is None:
        _fail_later(session, tag)
        return
    d = session.factory.auth.check_password(key, password, session.peer, protocol="imap")
    d.addCallbacks(
        _authenticated,
        _not_authenticated,
        callbackArgs=(session, tag, key),
        errbackArgs=(session, tag, key),
    )
    d.addErrback(session.async_error, tag)


def _authenticated(user: Any, session: IMAPServer, tag: str, key: str) -> Deferred[None] | None:
    if session.lost:
        return None
    name = getattr(user, "name", None)
    canonical = name if isinstance(name, str) and name else key
    # The registration may be a round trip to the main process (IMAP workers); errors in
    # it reach _authenticate's errback (NO [SERVERBUG]).
    return session.factory.login(canonical, session).addCallback(
        _registered, session, tag, canonical
    )


def _registered(admitted: bool, session: IMAPServer, tag: str, canonical: str) -> None:
    if session.lost:
        if admitted:  # gone while waiting for the answer
            session.factory.logout(canonical, session)
        return
    if not admitted:
        log.info(
            "imap {session} {user}: too many sessions", session=session.session_id, user=canonical
        )
        session.tagged(tag, "NO", "Too many sessions for this user", wire.LIMIT)
        session.done()
        return
    session.logged_in(canonical)
    log.info(
        "imap {session} login {user} from {peer}",
        session=session.session_id,
        user=canonical,
        peer=session.peer,
    )
    session.write(wire.tagged(tag, "OK", "Logged in", wire.code_capability(session.capabilities())))
    session.done()


def _not_authenticated(failure: Failure, session: IMAPServer, tag: str, key: str) -> None:
    if session.lost:
        return
    if failure.check(LoginFailed):
        log.info(
            "imap {session} authentication failed for {user} from {peer}",
            session=session.session_id,
            user=key,
            peer=session.peer,
        )
        _fail_later(session, tag, failure_delay(failure, session.factory.auth_failure_delay))
        return
    log.failure("imap {session}: directory error", failure, session=session.session_id)
    session.tagged(tag, "NO", "Authentication temporarily unavailable", wire.UNAVAILABLE)
    session.done()


def _fail_later(session: IMAPServer, tag: str, delay: float | None = None) -> None:
    if delay is None:
        delay = session.factory.auth_failure_delay
    session.later(delay, _failed_reply, session, tag)


def _failed_reply(session: IMAPServer, tag: str) -> None:
    session.tagged(tag, "NO", "Authentication failed", wire.AUTHENTICATIONFAILED)
    session.done()


COMMANDS = (
    Command("CAPABILITY", capability, ANY),
    Command("ID", id_, ANY),
    Command("LOGOUT", logout, ANY),
    Command("STARTTLS", starttls, NOT_AUTH),
    Command("LOGIN", login, NOT_AUTH),
    Command("AUTHENTICATE", authenticate, NOT_AUTH),
    Command("ENABLE", enable, AUTH),
    Command("NAMESPACE", namespace, AUTH),
    Command("UNAUTHENTICATE", unauthenticate, AUTH),
)
