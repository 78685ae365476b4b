"""End to end: the running server's directory lookups (cached) follow the admin CLI at once."""

from __future__ import annotations

from mailgw.testing.server import MailgwServer
from tests.integration.helpers import Session


def rcpt(server: MailgwServer, address: str) -> bytes:
    """The reply to ``RCPT TO:<address>`` in a fresh MX session."""
    session = Session(server.ports["mx"])
    try:
        assert session.command(b"EHLO client.elsewhere.test").startswith(b"250")
        assert session.command(b"MAIL FROM:<bob@elsewhere.test>").startswith(b"250")
        return session.command(b"RCPT TO:<" + address.encode() + b">")
    finally:
        session.close()


def test_rcpt_follows_user_and_alias_changes_made_by_the_cli(server: MailgwServer) -> None:
    # Each answer is asked twice first, so the second comes from the server's cache.
    for _ in range(2):
        assert rcpt(server, "bob@example.test").startswith(b"250")
        assert rcpt(server, "carol@example.test").startswith(b"550 5.1.1")
        assert rcpt(server, "dave@other.test").startswith(b"550 5.7.1")

    server.cli("user", "del", "bob@example.test")
    assert rcpt(server, "bob@example.test").startswith(b"550 5.1.1")

    server.cli("user", "add", "carol@example.test", "--password", "carol password")
    assert rcpt(server, "carol@example.test").startswith(b"250")

    server.cli("alias", "add", "bob@example.test", "carol@example.test")
    assert rcpt(server, "bob@example.test").startswith(b"250")
    server.cli("alias", "del", "bob@example.test")
    assert rcpt(server, "bob@example.test").startswith(b"550 5.1.1")

    server.cli("domain", "add", "other.test")
    assert rcpt(server, "dave@other.test").startswith(b"550 5.1.1")
    server.cli("user", "add", "dave@other.test", "--password", "dave password")
    assert rcpt(server, "dave@other.test").startswith(b"250")
    server.cli("domain", "del", "other.test", "--force")
    assert rcpt(server, "dave@other.test").startswith(b"550 5.7.1")
