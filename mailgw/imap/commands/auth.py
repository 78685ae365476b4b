"""CAPABILITY, ID, LOGOUT, STARTTLS, LOGIN, AUTHENTICATE, ENABLE, NAMESPACE, UNAUTHENTICATE:
the commands of the not-authenticated state and of any state, and the session-wide
settings (RFC 3501 6.1-6.2, RFC 2971 ID, RFC 5161 ENABLE, RFC 2342 NAMESPACE, RFC 8437)."""

from __future__ import annotations

import base64
import binascii
from collections.abc import Callable
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
from mailgw.model import Address, AddressError

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
    if command.mechanism not in ("PLAIN", "LOGIN"):
        session.tagged(tag, "NO", "Unsupported authentication mechanism", wire.CANNOT)
        return
    if not session.plaintext_allowed():
        session.tagged(tag, "NO", "Use STARTTLS first", wire.PRIVACYREQUIRED)
        return
    if command.mechanism == "LOGIN":
        if command.initial_response is not None:
            _auth_login_user(session, tag, command.initial_response, initial=True)
        else:
            _challenge(session, b"Username:", lambda line: _auth_login_user(session, tag, line))
        return
    if command.initial_response is not None:
        _auth_plain(session, tag, command.initial_response, initial=True)
        return
    _challenge(session, b"", lambda line: _auth_plain(session, tag, line))


def _challenge(session: IMAPServer, text: bytes, handler: Callable[[bytes], None]) -> None:
    """A SASL continuation (``+ base64``); the client's answer goes to ``handler``."""
    session.write(b"+ " + base64.b64encode(text) + b"\r\n")
    session.expect_line(handler)


def _sasl_decode(session: IMAPServer, tag: str, response: bytes, initial: bool) -> bytes | None:
    """A client SASL response decoded; None (after answering BAD) when cancelled with
    ``*`` (RFC 3501 6.2.2) or not base64."""
    if response.strip() == b"*":
        session.bad(tag, "Authentication cancelled")
        return None
    if initial and response == b"=":
        return b""
    try:
        return base64.b64decode(response.strip(), validate=True)
    except (binascii.Error, ValueError):
        session.bad(tag, "Invalid base64 data")
        return None


def _auth_login_user(session: IMAPServer, tag: str, response: bytes, initial: bool = False) -> None:
    raw = _sasl_decode(session, tag, response, initial)
    if raw is None:
        return
    _challenge(session, b"Password:", lambda line: _auth_login_password(session, tag, raw, line))


def _auth_login_password(session: IMAPServer, tag: str, user: bytes, response: bytes) -> None:
    password = _sasl_decode(session, tag, response, False)
    if password is None:
        return
    try:
        name, secret = user.decode("utf-8"), password.decode("utf-8")
    except UnicodeDecodeError:
        session.suspend()
        _fail_later(session, tag)
        return
    _authenticate(session, tag, name, secret)


def _auth_plain(session: IMAPServer, tag: str, response: bytes, initial: bool = False) -> None:
    raw = _sasl_decode(session, tag, response, initial)
    if raw is None:
        return
    parts = raw.split(b"\0")
    if len(parts) != 3:
        session.bad(tag, "Invalid PLAIN response")
        return
    try:
        authzid, authcid, password = (x.decode("utf-8") for x in parts)
    except UnicodeDecodeError:
        session.bad(tag, "Invalid PLAIN response")
        return
    if authzid and _normalise(authzid) != _normalise(authcid):
        session.suspend()
        _fail_later(session, tag)
        return
    _authenticate(session, tag, authcid, password)


def _authenticate(session: IMAPServer, tag: str, name: str, password: str) -> None:
    key = _normalise(name)
    session.suspend()
    if key is None:
        _fail_later(session, tag)
        return
    d = session.factory.auth.check_password(key, password, session.peer)
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


def _normalise(name: str) -> str | None:
    """The directory key of a login name (an address), or None if it is not an address."""
    try:
        return Address.parse(name).key
    except AddressError:
        return None


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
