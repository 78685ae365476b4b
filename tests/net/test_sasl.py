"""The shared SASL exchange (``mailgw.net.sasl``), socket-free: PLAIN and LOGIN with and
without an initial response, ``*`` cancel, ``=`` for an empty initial response, base64 and
UTF-8 errors as each protocol's dialect has them, the authzid rule, the plaintext policy."""

from __future__ import annotations

import base64

import pytest
from twisted.internet.address import IPv4Address, IPv6Address, UNIXAddress

from mailgw.net import sasl
from mailgw.net.sasl import (
    Challenge,
    Credentials,
    PlaintextPolicy,
    Refused,
    SaslError,
    SaslExchange,
)


def b64(data: bytes) -> bytes:
    return base64.b64encode(data)


PLAIN_MSG = b64(b"\0joe@example.org\0s3cret")
ALL = [sasl.SMTP, sasl.POP3, sasl.IMAP]


# -- PLAIN ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("dialect", ALL)
def test_plain_with_initial_response(dialect: sasl.Dialect) -> None:
    exchange = SaslExchange("PLAIN", dialect)
    step = exchange.start(PLAIN_MSG)
    assert step == Credentials("", "joe@example.org", "s3cret")
    assert exchange.finished
    with pytest.raises(RuntimeError):
        exchange.respond(PLAIN_MSG)


@pytest.mark.parametrize("dialect", ALL)
def test_plain_with_continuation(dialect: sasl.Dialect) -> None:
    exchange = SaslExchange("PLAIN", dialect)
    step = exchange.start(None)
    assert step == Challenge(b"")
    assert step.encoded == b""
    assert not exchange.finished
    assert exchange.respond(b64(b"admin@example.org\0joe@example.org\0pw")) == Credentials(
        "admin@example.org", "joe@example.org", "pw"
    )
    assert exchange.finished


@pytest.mark.parametrize("dialect", ALL)
@pytest.mark.parametrize("answer", [b"*", b" * ", b"*\t"])
def test_star_cancels_at_any_step(dialect: sasl.Dialect, answer: bytes) -> None:
    exchange = SaslExchange("PLAIN", dialect)
    assert exchange.start(answer) == Refused(SaslError.CANCELLED)
    exchange = SaslExchange("PLAIN", dialect)
    exchange.start(None)
    assert exchange.respond(answer) == Refused(SaslError.CANCELLED)
    assert exchange.finished


@pytest.mark.parametrize("dialect", ALL)
@pytest.mark.parametrize("answer", [b"not base64!", b"AA", b"=", b"\xff\xfe"])
def test_bad_base64(dialect: sasl.Dialect, answer: bytes) -> None:
    exchange = SaslExchange("PLAIN", dialect)
    exchange.start(None)
    assert exchange.respond(answer) == Refused(SaslError.BAD_BASE64)
    assert exchange.finished


@pytest.mark.parametrize("dialect", ALL)
@pytest.mark.parametrize(
    "message", [b"joe\0pw", b"a\0b\0c\0d", b"", b"\0joe@example.org\0\xff", b"\xc3\0joe\0pw"]
)
def test_plain_malformed(dialect: sasl.Dialect, message: bytes) -> None:
    exchange = SaslExchange("PLAIN", dialect)
    assert exchange.start(b64(message) if message else b"=") == Refused(SaslError.MALFORMED)


def test_equals_is_an_empty_initial_response_only() -> None:
    # IMAP and POP3: "=" as the initial response is empty (a malformed PLAIN message) ...
    for dialect in (sasl.IMAP, sasl.POP3, sasl.SMTP):
        exchange = SaslExchange("PLAIN", dialect)
        assert exchange.start(b"=") == Refused(SaslError.MALFORMED)
    # ... but as a later response it is not base64
    exchange = SaslExchange("PLAIN", sasl.IMAP)
    exchange.start(None)
    assert exchange.respond(b"=") == Refused(SaslError.BAD_BASE64)
    # IMAP takes it for LOGIN too (an empty user name), SMTP does not
    imap = SaslExchange("LOGIN", sasl.IMAP)
    assert imap.start(b"=") == Challenge(b"Password:")
    assert imap.respond(b64(b"pw")) == Credentials("", "", "pw")
    smtp = SaslExchange("LOGIN", sasl.SMTP)
    assert smtp.start(b"=") == Refused(SaslError.BAD_BASE64)


def test_whitespace_around_a_response() -> None:
    padded = b"  " + PLAIN_MSG + b" "
    for dialect in (sasl.IMAP, sasl.SMTP):
        exchange = SaslExchange("PLAIN", dialect)
        exchange.start(None)
        assert isinstance(exchange.respond(padded), Credentials)
    # POP3 never stripped a response before decoding it
    exchange = SaslExchange("PLAIN", sasl.POP3)
    exchange.start(None)
    assert exchange.respond(padded) == Refused(SaslError.BAD_BASE64)


def test_empty_authcid() -> None:
    message = b64(b"\0\0pw")
    assert SaslExchange("PLAIN", sasl.SMTP).start(message) == Refused(SaslError.MALFORMED)
    for dialect in (sasl.IMAP, sasl.POP3):
        assert SaslExchange("PLAIN", dialect).start(message) == Credentials("", "", "pw")


# -- LOGIN ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("dialect", [sasl.SMTP, sasl.IMAP])
def test_login_with_prompts(dialect: sasl.Dialect) -> None:
    exchange = SaslExchange("LOGIN", dialect)
    first = exchange.start(None)
    assert first == Challenge(b"Username:")
    assert isinstance(first, Challenge) and first.encoded == b"VXNlcm5hbWU6"
    second = exchange.respond(b64("jöe@example.org".encode()))
    assert isinstance(second, Challenge) and second.encoded == b"UGFzc3dvcmQ6"
    assert exchange.respond(b64(b"pw")) == Credentials("", "jöe@example.org", "pw")
    assert exchange.finished


@pytest.mark.parametrize("dialect", [sasl.SMTP, sasl.IMAP])
def test_login_with_initial_response_and_cancel(dialect: sasl.Dialect) -> None:
    exchange = SaslExchange("LOGIN", dialect)
    assert exchange.start(b64(b"joe@example.org")) == Challenge(b"Password:")
    assert exchange.respond(b"*") == Refused(SaslError.CANCELLED)
    exchange = SaslExchange("LOGIN", dialect)
    exchange.start(None)
    assert exchange.respond(b"???") == Refused(SaslError.BAD_BASE64)


def test_login_utf8_checked_early_in_smtp_late_in_imap() -> None:
    smtp = SaslExchange("LOGIN", sasl.SMTP)
    smtp.start(None)
    assert smtp.respond(b64(b"\xff")) == Refused(SaslError.BAD_UTF8)
    imap = SaslExchange("LOGIN", sasl.IMAP)
    imap.start(None)
    assert imap.respond(b64(b"\xff")) == Challenge(b"Password:")
    assert imap.respond(b64(b"pw")) == Refused(SaslError.BAD_UTF8)
    for dialect in (sasl.SMTP, sasl.IMAP):
        exchange = SaslExchange("LOGIN", dialect)
        exchange.start(b64(b"joe"))
        assert exchange.respond(b64(b"\xc3")) == Refused(SaslError.BAD_UTF8)


# -- mechanisms, misuse ---------------------------------------------------------------------------


def test_mechanisms_per_protocol() -> None:
    assert sasl.SMTP.mechanisms == ("PLAIN", "LOGIN")
    assert sasl.IMAP.mechanisms == ("PLAIN", "LOGIN")
    assert sasl.POP3.mechanisms == ("PLAIN",)
    assert not sasl.POP3.supports("LOGIN")
    assert not sasl.IMAP.supports("plain")  # the sessions upper-case the name
    with pytest.raises(ValueError):
        SaslExchange("LOGIN", sasl.POP3)
    with pytest.raises(ValueError):
        SaslExchange("CRAM-MD5", sasl.IMAP)


def test_exchange_misuse() -> None:
    exchange = SaslExchange("PLAIN", sasl.IMAP)
    with pytest.raises(RuntimeError):
        exchange.respond(PLAIN_MSG)
    exchange.start(None)
    with pytest.raises(RuntimeError):
        exchange.start(None)


# -- identities -----------------------------------------------------------------------------------


def test_login_key_and_acts_as_self() -> None:
    assert sasl.login_key("Joe@Example.ORG") == sasl.login_key("joe@example.org")
    assert sasl.login_key("joe@example.org") is not None
    assert sasl.login_key("not an address") is None
    assert sasl.login_key("") is None
    assert sasl.acts_as_self(Credentials("", "joe@example.org", "pw"))
    assert sasl.acts_as_self(Credentials("JOE@example.org", "joe@EXAMPLE.org", "pw"))
    assert not sasl.acts_as_self(Credentials("root@example.org", "joe@example.org", "pw"))


# -- plaintext policy -----------------------------------------------------------------------------

LOOPBACK = IPv4Address("TCP", "127.0.0.1", 4000)
LOOPBACK6 = IPv6Address("TCP", "::1", 4000)
MAPPED = IPv6Address("TCP", "::ffff:127.0.0.1", 4000)
REMOTE = IPv4Address("TCP", "192.0.2.7", 4000)


def test_plaintext_policy() -> None:
    yes, no, loopback = PlaintextPolicy("yes"), PlaintextPolicy("no"), PlaintextPolicy("loopback")
    for policy in (yes, no, loopback):
        assert policy.allows(True, lambda: REMOTE)  # TLS: always
    assert yes.allows(False, lambda: REMOTE)
    assert not no.allows(False, lambda: LOOPBACK)
    assert loopback.allows(False, lambda: LOOPBACK)
    assert loopback.allows(False, lambda: LOOPBACK6)
    assert loopback.allows(False, lambda: MAPPED)
    assert not loopback.allows(False, lambda: REMOTE)
    assert not loopback.allows(False, lambda: UNIXAddress(None))
    assert no == sasl.TLS_ONLY
    assert sasl.TLS_ONLY.allows(True) and not sasl.TLS_ONLY.allows(False)
    assert yes.allows(False) and not loopback.allows(False)  # no peer given: not loopback


def test_plaintext_policy_asks_for_the_peer_only_when_needed() -> None:
    def peer() -> IPv4Address:
        raise AssertionError("peer asked for")

    assert PlaintextPolicy("yes").allows(False, peer)
    assert not PlaintextPolicy("no").allows(False, peer)
    assert PlaintextPolicy("loopback").allows(True, peer)


def test_plaintext_policy_rejects_unknown_modes() -> None:
    with pytest.raises(ValueError):
        PlaintextPolicy("maybe")
    assert PlaintextPolicy().mode == "no"
