"""The mail log of the real `twistd -n mailgw`: one line per listener, none of Twisted's
internal noise, and one `grep` of a queue ID or Message-ID follows a message end to end
(received -> delivered, handed to the relay -> relayed, or bounced)."""

from __future__ import annotations

import re
import smtplib
from collections.abc import Callable
from pathlib import Path

from mailgw.testing.server import MailgwServer
from tests.integration.helpers import wait_until

NOISE = re.compile(r"Starting factory|Stopping factory|object at 0x|starting on \d|Port \d+ Closed")


def send(server: MailgwServer, to: str, message_id: str, sender: str = "carol@sender.test") -> str:
    body = (
        f"From: {sender}\r\nTo: {to}\r\nSubject: log test\r\nMessage-ID: {message_id}\r\n"
        "\r\nhello\r\n"
    )
    with smtplib.SMTP("127.0.0.1", server.ports["mx"], timeout=15) as smtp:
        code, reply = smtp.sendmail(sender, [to], body) or (250, b"")
    return reply.decode() if isinstance(reply, bytes) else str(reply)


def queue_id_of(log: str, message_id: str) -> str:
    [line] = [line for line in log.splitlines() if f"message-id={message_id}" in line]
    assert " accepted from=" in line, line
    return re.search(r" ([0-9A-Z]{16}): accepted", line).group(1)  # type: ignore[union-attr]


def grep(log: str, needle: str) -> list[str]:
    return [line for line in log.splitlines() if needle in line]


def test_listeners_and_no_twisted_noise(
    server_factory: Callable[..., MailgwServer], selfsigned: tuple[Path, Path]
) -> None:
    cert, key = selfsigned
    server = server_factory({"tls": {"certificate": str(cert), "private_key": str(key)}})
    send(server, "alice@example.test", "<noise-1@sender.test>")
    wait_until(lambda: "delivered" in server.log(), what="delivery")
    server.stop()  # the stop lines too
    log = server.log()
    assert not NOISE.search(log), [line for line in log.splitlines() if NOISE.search(line)]
    for role, key_ in (("mx", "mx"), ("pop3", "pop3"), ("pop3 TLS", "pop3s")):
        assert f"] {role} listening on 127.0.0.1:{server.ports[key_]}\n" in log, log
    assert f"] imap listening on 127.0.0.1:{server.ports['imap']}\n" in log, log
    assert f"] imap TLS listening on 127.0.0.1:{server.ports['imaps']}\n" in log, log
    assert "imap worker 0" in log  # the workers' lines are in the same log, also clean


def test_grep_follows_a_message_delivered_locally(server: MailgwServer) -> None:
    message_id = "<local-1.x@sender.test>"
    send(server, "alice@example.test", message_id)
    wait_until(lambda: " delivered: " in server.log(), what="delivery")
    log = server.log()
    qid = queue_id_of(log, message_id)
    stages = grep(log, qid)
    assert any(f"{qid}: accepted from=<carol@sender.test>" in s for s in stages), stages
    assert any(f"{qid} delivered: from=<carol@sender.test>" in s for s in stages), stages


def test_grep_follows_relayed_and_bounced_messages(
    server_factory: Callable[..., MailgwServer],
) -> None:
    """Node A forwards through a smarthost (node B, whose MX serves example.org): one message
    is relayed, one is refused by B and bounced back to its sender."""
    b = server_factory(name="b")
    b.cli("domain", "add", "example.org")
    b.cli("user", "add", "dave@example.org", "--password", "dave password")
    a = server_factory(
        {
            "relay": {"enabled": "yes", "retry_schedule": "1s", "scan_interval": "1s"},
            "channel:smarthost": {
                "kind": "smarthost",
                "hosts": f"127.0.0.1:{b.ports['mx']}",
                "tls": "none",
            },
        },
        name="a",
    )
    a.cli("alias", "add", "fwd@example.test", "dave@example.org")
    a.cli("alias", "add", "lost@example.test", "nobody@example.org")

    relayed_id = "<relayed-1@sender.test>"
    send(a, "fwd@example.test", relayed_id, sender="alice@example.test")
    wait_until(lambda: "result=ok" in a.log(), what="relay")
    log = a.log()
    qid = queue_id_of(log, relayed_id)
    stages = grep(log, qid)
    assert any(f"{qid} handed to the relay: to=<dave@example.org>" in s for s in stages), stages
    assert any(
        f"{qid} from=<alice@example.test> to=<dave@example.org> channel=smarthost" in s
        and "result=ok" in s
        for s in stages
    ), stages
    # ... and on node B, the same Message-ID names B's queue ID and its delivery.
    wait_until(lambda: " delivered: " in b.log(), what="delivery on B")
    b_qid = queue_id_of(b.log(), relayed_id)
    assert grep(b.log(), f"{b_qid} delivered: from=<alice@example.test>")

    bounced_id = "<bounced-1@sender.test>"
    send(a, "lost@example.test", bounced_id, sender="alice@example.test")
    wait_until(lambda: " bounced <nobody@example.org>" in a.log(), what="bounce")
    log = a.log()
    qid = queue_id_of(log, bounced_id)
    [bounce] = grep(log, f"{qid} bounced <nobody@example.org> to <alice@example.test> as ")
    dsn_id = bounce.rsplit(" as ", 1)[1].strip()
    # The bounce itself is a message with its own queue ID: delivered to the sender.
    wait_until(lambda: grep(a.log(), f"{dsn_id} delivered: from=<>"), what="bounce delivery")
