"""The replication wire protocol: AMP commands over TLS, the shared-secret handshake and the
chunking of large values.

AMP frames every value with a 16-bit length: a message body is data, never parsed for
commands (a body full of ``_command`` or ``_ask`` keys arrives as bytes). Values above
``CHUNK`` (messages, blobs, batches of entries) travel as ``Put`` pieces of a named object.

The handshake (the primary connects, the replica listens): the primary sends ``Challenge``
with a fresh nonce; the replica answers its own nonce and a proof; the primary checks it and
sends its proof in ``Authenticate``. Each proof is an HMAC-SHA256 with the shared secret over
the two nonces, the side's name and the SHA-256 fingerprint of the replica's TLS certificate
(as each side sees it: a man in the middle with another certificate cannot relay the proofs).
The secret never travels; before ``Authenticate`` succeeds the replica answers nothing else.
"""

from __future__ import annotations

import hashlib
import hmac
import os
from typing import Any

from twisted.protocols import amp

_a: Any = amp  # Twisted's AMP argument types are untyped

CHUNK = 60000
"""Bytes per ``Put`` piece (AMP values are at most 65,535 bytes)."""
NONCE_BYTES = 32


class AuthFailed(Exception):
    """The peer's proof is wrong, or a command came before the handshake."""


class Conflict(Exception):
    """The peer refuses the stream (it is not a replica, or it is ahead of us)."""


class Challenge(amp.Command):
    """Primary -> replica: the start of the handshake."""

    arguments = [(b"nonce", _a.String())]
    response = [(b"nonce", _a.String()), (b"proof", _a.String())]
    errors = {AuthFailed: b"AUTH"}


class Authenticate(amp.Command):
    """Primary -> replica: the primary's proof; the answer is where the replica stands."""

    arguments = [(b"proof", _a.String()), (b"node", _a.Unicode(optional=True))]
    response = [(b"applied", _a.Integer()), (b"role", _a.Unicode())]
    errors = {AuthFailed: b"AUTH", Conflict: b"CONFLICT"}


RESYNC = -1
"""``Authenticate``'s ``applied`` when the replica needs a full resync (it followed another
primary, or was demoted from primary)."""


class ResyncBegin(amp.Command):
    """Primary -> replica: a full resync from primary ``node`` starts (positions reset)."""

    arguments = [(b"node", _a.Unicode())]
    response = []
    errors = {AuthFailed: b"AUTH", Conflict: b"CONFLICT"}


class ResyncEnd(amp.Command):
    """Primary -> replica: the resync is complete; stream from ``upto`` on."""

    arguments = [(b"upto", _a.Integer())]
    response = [(b"applied", _a.Integer())]
    errors = {AuthFailed: b"AUTH", Conflict: b"CONFLICT"}


class Missing(amp.Command):
    """Which of these tier-2 blob digests the replica lacks."""

    arguments = [(b"digests", _a.ListOf(_a.Unicode()))]
    response = [(b"digests", _a.ListOf(_a.Unicode()))]
    errors = {AuthFailed: b"AUTH"}


class Put(amp.Command):
    """One piece of the object ``key`` (``last``: the object is complete)."""

    arguments = [(b"key", _a.Unicode()), (b"data", _a.String()), (b"last", _a.Boolean())]
    response = []
    errors = {AuthFailed: b"AUTH", Conflict: b"CONFLICT"}


class Apply(amp.Command):
    """Apply the batch put as ``key`` (JSON); the answer is the replica's durable position."""

    arguments = [(b"key", _a.Unicode())]
    response = [(b"applied", _a.Integer())]
    errors = {AuthFailed: b"AUTH", Conflict: b"CONFLICT"}


class Digest(amp.Command):
    """Piece ``part`` of the replica's digest of ``user`` (empty: the directory), zlib JSON."""

    arguments = [(b"user", _a.Unicode()), (b"part", _a.Integer())]
    response = [(b"data", _a.String()), (b"more", _a.Boolean())]
    errors = {AuthFailed: b"AUTH"}


class Users(amp.Command):
    """The users whose mail the replica holds."""

    arguments = []
    response = [(b"users", _a.ListOf(_a.Unicode()))]
    errors = {AuthFailed: b"AUTH"}


def new_nonce() -> bytes:
    return os.urandom(NONCE_BYTES)


def proof(secret: bytes, side: str, primary_nonce: bytes, replica_nonce: bytes, cert: str) -> bytes:
    """The HMAC ``side`` (``primary`` or ``replica``) shows for this handshake."""
    message = b"\0".join(
        (b"mailgw-replication-1", side.encode(), primary_nonce, replica_nonce, cert.encode())
    )
    return hmac.new(secret, message, hashlib.sha256).digest()


def check(expected: bytes, given: bytes) -> bool:
    return hmac.compare_digest(expected, given)


def read_secret(path: str) -> bytes:
    """The shared secret: the file's bytes without surrounding whitespace. ValueError when it
    is shorter than 16 bytes; OSError when it cannot be read."""
    with open(path, "rb") as fh:
        secret = fh.read().strip()
    if len(secret) < 16:
        raise ValueError(f"{path}: the replication secret must be at least 16 bytes")
    return secret


def fingerprint(cert: object) -> str:
    """The SHA-256 fingerprint of a pyOpenSSL certificate ("" when there is none)."""
    if cert is None:
        return ""
    digest = cert.digest("sha256")  # type: ignore[attr-defined]
    return str(digest.decode() if isinstance(digest, bytes) else digest)


def pieces(data: bytes) -> list[bytes]:
    """``data`` cut into ``Put`` pieces (at least one)."""
    return [data[i : i + CHUNK] for i in range(0, len(data), CHUNK)] or [b""]


def call(proto: amp.AMP, command: type[amp.Command], **arguments: Any) -> Any:
    """``proto.callRemote(command, ...)``: a Deferred of the answer (a typed wrapper)."""
    remote: Any = proto
    return remote.callRemote(command, **arguments)
