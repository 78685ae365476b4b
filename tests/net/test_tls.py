"""ALPN on the server side: the selection rule and a handshake over memory BIOs (no sockets)."""

from __future__ import annotations

from pathlib import Path

import pytest
from OpenSSL import SSL

from mailgw.net.tls import ALPN_IDS, ServerTLS, load_certificate_options, select_alpn, server_tls


@pytest.mark.parametrize(
    ("offered", "ours", "chosen"),
    [
        ([b"imap", b"h2"], (b"imap",), b"imap"),
        ([b"h2", b"imap"], (b"imap",), b"imap"),  # the client's order, among ours
        ([b"h2", b"http/1.1"], (b"imap",), None),
        ([b"h2", b"http/1.1"], (), None),  # SMTP: nothing to select, never an alert
        ([], (b"pop3",), None),
        ([b"pop3", b"imap"], (b"imap", b"pop3"), b"pop3"),
    ],
)
def test_select_alpn(offered: list[bytes], ours: tuple[bytes, ...], chosen: bytes | None) -> None:
    assert select_alpn(offered, ours) == chosen


def test_registered_ids() -> None:
    # IANA "ALPN Protocol IDs": imap and pop3 (RFC 2595); nothing for SMTP; HTTP/1.1 (RFC 7301).
    assert ALPN_IDS == {
        "imap": (b"imap",),
        "pop3": (b"pop3",),
        "smtp": (),
        "http": (b"http/1.1",),
    }


def handshake(server: SSL.Connection, alpn: list[bytes] | None) -> SSL.Connection:
    """Run a TLS handshake between a fresh client and ``server`` over memory BIOs; returns
    the client connection (raises SSL.Error if either side fails)."""
    context = SSL.Context(SSL.TLS_CLIENT_METHOD)
    context.set_verify(SSL.VERIFY_NONE)
    client = SSL.Connection(context, None)
    client.set_connect_state()
    if alpn is not None:
        client.set_alpn_protos(alpn)
    server.set_accept_state()
    done = {"client": False, "server": False}
    for _ in range(20):
        for name, side in (("client", client), ("server", server)):
            if not done[name]:
                try:
                    side.do_handshake()
                    done[name] = True
                except SSL.WantReadError:
                    pass
        for src, dst in ((client, server), (server, client)):
            try:
                data = src.bio_read(65536)
            except SSL.WantReadError:
                continue
            dst.bio_write(data)
        if all(done.values()):
            return client
    raise AssertionError("handshake did not finish")


@pytest.mark.parametrize(
    ("service", "offered", "selected"),
    [
        ("imap", [b"imap", b"h2"], b"imap"),
        ("imap", [b"h2"], None),
        ("imap", None, None),
        ("pop3", [b"h2", b"pop3"], b"pop3"),
        ("smtp", [b"h2", b"http/1.1"], None),
        ("smtp", [b"smtp"], None),
        ("smtp", None, None),
    ],
)
def test_handshake_selects_or_carries_on(
    selfsigned: tuple[Path, Path], service: str, offered: list[bytes] | None, selected: bytes | None
) -> None:
    cert, key = selfsigned
    tls = server_tls(str(cert), str(key), service=service)
    client = handshake(tls.serverConnectionForTLS(None), offered)
    assert (client.get_alpn_proto_negotiated() or None) == selected


def test_each_service_has_its_own_context(selfsigned: tuple[Path, Path]) -> None:
    cert, key = selfsigned
    imap = server_tls(str(cert), str(key), service="imap")
    pop3 = server_tls(str(cert), str(key), service="pop3")
    assert imap.context is not pop3.context
    client = handshake(imap.serverConnectionForTLS(None), [b"pop3", b"imap"])
    assert client.get_alpn_proto_negotiated() == b"imap"


def test_twisted_default_context_refuses_an_alpn_offer(selfsigned: tuple[Path, Path]) -> None:
    """Why ServerTLS exists: Twisted's own server context (no acceptableProtocols) answers any
    ALPN offer with a fatal alert. If Twisted fixes this, this test says so."""
    cert, key = selfsigned
    options = load_certificate_options(str(cert), str(key))
    twisted_side = options.serverConnectionForTLS(_FakeTLSProtocol())
    twisted_side.set_app_data(_FakeTLSProtocol())  # as Twisted's TLS layer does
    with pytest.raises(SSL.Error, match="internal error"):
        handshake(twisted_side, [b"imap"])
    # ... while ServerTLS over the same kind of options carries on.
    tls = ServerTLS(load_certificate_options(str(cert), str(key)), ())
    assert handshake(tls.serverConnectionForTLS(None), [b"imap"]).get_alpn_proto_negotiated() in (
        b"",
        None,
    )


class _FakeTLSProtocol:
    """What Twisted's ALPN callback looks at: the TLS protocol's factory's wrapped factory."""

    class factory:  # noqa: N801
        wrappedFactory = None
