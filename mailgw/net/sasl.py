"""SASL (RFC 4422) for the line protocols, without I/O: the PLAIN (RFC 4616) and LOGIN
exchanges, the authorisation-identity rule and the plaintext-password policy.

SMTP (RFC 4954), POP3 (RFC 5034) and IMAP (RFC 3501 6.2.2) share one exchange: a session
starts a :class:`SaslExchange` with the mechanism and the initial response (if any), feeds
it each client response line, and gets back a :class:`Challenge` to send (framed its own way:
``334``, ``+``), :class:`Credentials` to check, or a :class:`Refused` whose
:class:`SaslError` it answers with its own reply. What differs between the three protocols
today (which mechanisms, whether ``=`` is an empty initial response, ...) is a
:class:`Dialect`; the protocols' dialects are defined here, beside each other.

Nothing here writes to a transport, reads a clock or checks a password.
"""

from __future__ import annotations

import base64
import binascii
import enum
from collections.abc import Callable
from dataclasses import dataclass

from twisted.internet.interfaces import IAddress

from mailgw.model import Address, AddressError
from mailgw.net.proxy import is_loopback

PLAIN = "PLAIN"
LOGIN = "LOGIN"
USERNAME_PROMPT = b"Username:"  # the LOGIN mechanism's challenges (draft-murchison-sasl-login)
PASSWORD_PROMPT = b"Password:"


class SaslError(enum.Enum):
    """Why an exchange ended without credentials."""

    CANCELLED = "cancelled"  # the client answered "*"
    BAD_BASE64 = "bad base64"  # a response that is not base64
    MALFORMED = "malformed"  # a PLAIN message that is not authzid NUL authcid NUL password
    BAD_UTF8 = "bad utf-8"  # a LOGIN name or password that is not UTF-8


@dataclass(frozen=True, slots=True)
class Dialect:
    """How one protocol runs the exchange. The fields record today's differences between the
    protocols, so that sharing the code changed no behaviour.

    ``mechanisms``: offered and accepted, in the order they are advertised.
    ``empty_initial``: the mechanisms whose initial response ``=`` stands for an empty one
    (RFC 4954 4, RFC 5034 4; SMTP never took it for LOGIN).
    ``strip``: whitespace around a response is ignored before base64 decoding (POP3: not).
    ``early_utf8``: LOGIN's user name must be UTF-8 before the password is asked for (SMTP);
    otherwise both are checked once the password has arrived (IMAP).
    ``plain_needs_authcid``: a PLAIN message with an empty authentication identity is
    malformed (SMTP); otherwise it is credentials that will not log in.
    """

    mechanisms: tuple[str, ...]
    empty_initial: frozenset[str] = frozenset({PLAIN, LOGIN})
    strip: bool = True
    early_utf8: bool = False
    plain_needs_authcid: bool = False

    def supports(self, mechanism: str) -> bool:
        """``mechanism`` (upper-case) is one this protocol accepts."""
        return mechanism in self.mechanisms


SMTP = Dialect(
    mechanisms=(PLAIN, LOGIN),
    empty_initial=frozenset({PLAIN}),
    early_utf8=True,
    plain_needs_authcid=True,
)
POP3 = Dialect(mechanisms=(PLAIN,), strip=False)
IMAP = Dialect(mechanisms=(PLAIN, LOGIN))


@dataclass(frozen=True, slots=True)
class Challenge:
    """A server challenge; the session sends ``encoded`` in its own framing."""

    data: bytes

    @property
    def encoded(self) -> bytes:
        return base64.b64encode(self.data)


@dataclass(frozen=True, slots=True)
class Credentials:
    """What the client sent; ``authzid`` is empty unless it asked to act as someone."""

    authzid: str
    authcid: str
    password: str


@dataclass(frozen=True, slots=True)
class Refused:
    reason: SaslError


Step = Challenge | Credentials | Refused


class SaslExchange:
    """One AUTH / AUTHENTICATE exchange: ``start`` once, then ``respond`` to each challenge,
    until a step other than a :class:`Challenge` ends it."""

    def __init__(self, mechanism: str, dialect: Dialect) -> None:
        if not dialect.supports(mechanism):
            raise ValueError(f"unsupported SASL mechanism {mechanism!r}")
        self.mechanism = mechanism
        self.dialect = dialect
        self.finished = False
        self._next: Callable[[bytes, bool], Step] | None = None
        self._user: bytes | None = None

    def start(self, initial: bytes | None) -> Step:
        """The first step: ``initial`` is the initial response as sent (base64 text, or ``=``
        for an empty one), None when the command had none."""
        if self._next is not None or self.finished:
            raise RuntimeError("SASL exchange already started")
        if self.mechanism == PLAIN:
            self._next = self._plain
            if initial is None:
                return Challenge(b"")
        else:
            self._next = self._login_user
            if initial is None:
                return Challenge(USERNAME_PROMPT)
        return self._step(initial, True)

    def respond(self, response: bytes) -> Step:
        """The client's answer to the last challenge (one line, without its line end)."""
        if self._next is None or self.finished:
            raise RuntimeError("SASL exchange not waiting for a response")
        return self._step(response, False)

    def _step(self, response: bytes, initial: bool) -> Step:
        assert self._next is not None
        if response.strip() == b"*":
            return self._end(Refused(SaslError.CANCELLED))
        if initial and response == b"=" and self.mechanism in self.dialect.empty_initial:
            raw = b""
        else:
            try:
                raw = base64.b64decode(
                    response.strip() if self.dialect.strip else response, validate=True
                )
            except (binascii.Error, ValueError):
                return self._end(Refused(SaslError.BAD_BASE64))
        step = self._next(raw, initial)
        if not isinstance(step, Challenge):
            self._end(step)
        return step

    def _end(self, step: Step) -> Step:
        self.finished = True
        self._next = None
        return step

    def _plain(self, raw: bytes, initial: bool) -> Step:
        parts = raw.split(b"\0")
        if len(parts) != 3:
            return Refused(SaslError.MALFORMED)
        try:
            authzid, authcid, password = (part.decode("utf-8") for part in parts)
        except UnicodeDecodeError:
            return Refused(SaslError.MALFORMED)
        if self.dialect.plain_needs_authcid and not authcid:
            return Refused(SaslError.MALFORMED)
        return Credentials(authzid, authcid, password)

    def _login_user(self, raw: bytes, initial: bool) -> Step:
        if self.dialect.early_utf8 and not _is_utf8(raw):
            return Refused(SaslError.BAD_UTF8)
        self._user = raw
        self._next = self._login_password
        return Challenge(PASSWORD_PROMPT)

    def _login_password(self, raw: bytes, initial: bool) -> Step:
        assert self._user is not None
        try:
            user, password = self._user.decode("utf-8"), raw.decode("utf-8")
        except UnicodeDecodeError:
            return Refused(SaslError.BAD_UTF8)
        return Credentials("", user, password)


def _is_utf8(data: bytes) -> bool:
    try:
        data.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


# -- identities ---------------------------------------------------------------------------------


def login_key(name: str) -> str | None:
    """The directory key of a login name (an address), or None if it is not an address."""
    try:
        return Address.parse(name).key
    except AddressError:
        return None


def acts_as_self(credentials: Credentials) -> bool:
    """Acting as another user is not supported: an authorisation identity, when given, must
    name the authenticated user (compared as addresses). POP3 and IMAP; the SMTP submission
    role compares the names itself."""
    authzid = credentials.authzid
    return not authzid or login_key(authzid) == login_key(credentials.authcid)


# -- when a password may be sent ----------------------------------------------------------------

PLAINTEXT_MODES = ("yes", "no", "loopback")


@dataclass(frozen=True, slots=True)
class PlaintextPolicy:
    """May a password travel on this connection? Always over TLS; without TLS as configured
    (``allow_plaintext_auth`` of ``[pop3]`` and ``[imap]``): ``yes``, ``no``, or ``loopback``
    (only from 127.0.0.0/8 and ::1). SMTP submission has no such setting: :data:`TLS_ONLY`.
    A refusal is the protocol's (STARTTLS first, 538, ``[PRIVACYREQUIRED]``, LOGINDISABLED);
    so is what it advertises."""

    mode: str = "no"

    def __post_init__(self) -> None:
        if self.mode not in PLAINTEXT_MODES:
            raise ValueError(f"allow_plaintext_auth: expected yes, no or loopback: {self.mode!r}")

    def allows(self, secure: bool, peer: Callable[[], IAddress] | None = None) -> bool:
        """``secure``: the connection is TLS; ``peer`` gives the client's address (asked only
        in ``loopback`` mode, e.g. ``transport.getPeer``; without it no peer is loopback)."""
        if secure or self.mode == "yes":
            return True
        return self.mode == "loopback" and peer is not None and is_loopback(peer())


TLS_ONLY = PlaintextPolicy("no")
