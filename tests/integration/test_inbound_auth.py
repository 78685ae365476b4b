"""End to end: the MX checks SPF, DKIM, DMARC and a DNSBL against the tests' own DNS server
(never the real DNS) and answers, files into Junk, quarantines or delivers with an
Authentication-Results header; read back over IMAP and from the quarantine store."""

from __future__ import annotations

import smtplib
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest

from mailgw.policy.quarantine import QuarantineStore
from mailgw.testing.server import MailgwServer, free_port
from tests.integration.conftest import make_server
from tests.integration.helpers import wait_until
from tests.integration.test_antivirus import imap_messages
from tests.policy.authzone import Keys, auth_zone, make_key, message, signed
from tests.policy.dnsthread import ThreadedDNS


@pytest.fixture(scope="module")
def keys() -> Keys:
    return make_key()


@pytest.fixture(scope="module")
def dns_server(keys: Keys) -> Iterator[ThreadedDNS]:
    server = ThreadedDNS(auth_zone(keys)).start()
    yield server
    server.stop()


def auth_node(
    workdir: Path, dns_server: ThreadedDNS, mx: dict[str, str] | None = None, **keys: str
) -> MailgwServer:
    section = {"enabled": "yes", "resolvers": dns_server.address, "dns_timeout": "5s"}
    return make_server(workdir, {"inbound_auth": {**section, **keys}, "mx": mx or {}})


@pytest.fixture(scope="module")
def node(
    tmp_path_factory: pytest.TempPathFactory, dns_server: ThreadedDNS
) -> Iterator[MailgwServer]:
    server = auth_node(tmp_path_factory.mktemp("auth"), dns_server)
    yield server
    server.stop()


def send(node: MailgwServer, sender: str, data: bytes, helo: str = "client.test") -> None:
    with smtplib.SMTP("127.0.0.1", node.ports["mx"], local_hostname=helo, timeout=30) as smtp:
        smtp.sendmail(sender, ["alice@example.test"], data)


def tagged(from_domain: str, tag: str) -> bytes:
    return message(from_domain, body=f"{tag}\r\n".encode())


def arrived(node: MailgwServer, tag: str, folder: str = "INBOX") -> bytes:
    found = wait_until(
        lambda: [m for m in imap_messages(node, folder) if tag.encode() in m],
        what=f"{tag} in {folder}",
    )
    return bytes(found[0])


def auth_results(data: bytes) -> str:
    head = data.partition(b"\r\n\r\n")[0].decode()
    (line,) = [h for h in head.split("\r\n") if h.startswith("Authentication-Results:")]
    return line


def test_aligned_spf_and_dkim_pass(node: MailgwServer, keys: Keys) -> None:
    send(
        node,
        "x@good.example.com",
        signed(tagged("good.example.com", "t-pass"), "good.example.com", keys),
    )
    line = auth_results(arrived(node, "t-pass"))
    assert line.startswith("Authentication-Results: mx.example.test;")
    for part in ("spf=pass", "smtp.mailfrom=x@good.example.com", "dkim=pass",
                 "header.d=good.example.com", "dmarc=pass", "header.from=good.example.com"):  # fmt: skip
        assert part in line, line


def test_dmarc_reject_with_unaligned_identities_is_refused(node: MailgwServer, keys: Keys) -> None:
    data = signed(tagged("good.example.com", "t-spoof"), "other.example.net", keys)
    with pytest.raises(smtplib.SMTPDataError) as info:
        send(node, "x@other.example.net", data)
    assert info.value.smtp_code == 550
    assert (
        info.value.smtp_error
        == b"5.7.1 Message rejected: DMARC policy of good.example.com (p=reject)"
    )


def test_spf_fail_without_dkim_under_p_reject_is_refused(node: MailgwServer) -> None:
    with pytest.raises(smtplib.SMTPDataError) as info:
        send(node, "x@hard.example.com", tagged("hard.example.com", "t-hard"))
    assert info.value.smtp_code == 550


def test_dmarc_quarantine_failure_is_filed_into_junk(node: MailgwServer, keys: Keys) -> None:
    send(
        node,
        "x@other.example.net",
        signed(tagged("quar.example.com", "t-quar"), "other.example.net", keys),
    )
    line = auth_results(arrived(node, "t-quar", "Junk"))
    assert "dmarc=fail" in line and "policy.dmarc=QUARANTINE" in line
    assert not [m for m in imap_messages(node) if b"t-quar" in m]


def test_dmarc_none_softfail_and_invalid_dkim_are_scored(node: MailgwServer, keys: Keys) -> None:
    """softfail (1) + DMARC fail under p=none (3) reach junk_score (3): Junk; a broken
    signature alone (dkim=fail: 2) stays under it: INBOX."""
    send(node, "x@soft.example.com", tagged("none.example.com", "t-soft"))
    line = auth_results(arrived(node, "t-soft", "Junk"))
    assert "spf=softfail" in line and "dkim=none" in line and "dmarc=fail" in line
    assert "policy.dmarc=NONE" in line
    tampered = signed(tagged("other.example.net", "t-tamper"), "other.example.net", keys)
    send(node, "x@nospf.example.com", tampered.replace(b"t-tamper", b"t-tampered"))
    line = auth_results(arrived(node, "t-tampered"))
    assert "spf=none" in line and "dkim=fail" in line and "dmarc=none" in line


def test_dnsbl_listing_quarantines_or_refuses(tmp_path: Path, dns_server: ThreadedDNS) -> None:
    """127.0.0.1 is listed in bl.test (``1.0.0.127.bl.test``): scored into the bands."""
    node = auth_node(tmp_path / "q", dns_server, dnsbl="clean-bl.test bl.test", dnsbl_score="6")
    try:
        send(node, "x@good.example.com", tagged("good.example.com", "t-listed"))
        store = QuarantineStore(str(node.data_dir / "quarantine"))
        (kept,) = wait_until(store.list, what="quarantined")
        assert "listed in bl.test" in kept.reason
        with open(store.content_path(kept.id), "rb") as f:
            assert "spf=pass" in auth_results(f.read())
        assert not imap_messages(node)
    finally:
        node.stop()
    node = auth_node(tmp_path / "r", dns_server, dnsbl="bl.test", dnsbl_score="10")
    try:
        with pytest.raises(smtplib.SMTPDataError) as info:
            send(node, "x@good.example.com", tagged("good.example.com", "t-refused"))
        assert info.value.smtp_code == 550 and b"listed in bl.test" in info.value.smtp_error
    finally:
        node.stop()


def test_dnsbl_and_spf_see_the_real_client_behind_the_proxy_protocol(
    tmp_path: Path, dns_server: ThreadedDNS, keys: Keys
) -> None:
    """A PROXY v1 header says the client is 192.0.2.10: that address is looked up in the
    DNSBL (``10.2.0.192.bl.test``) and checked by SPF (good.example.com allows 127.0.0.1
    only), not the proxy's 127.0.0.1: spf fail (3) + listed (5) = 8, quarantined (6); the
    aligned DKIM signature still makes DMARC pass (no p=reject refusal)."""
    dns_server.zone.add("10.2.0.192.bl.test", "A", "127.0.0.2")
    port = free_port()
    listen = {"listen": f"haproxy:tcp:{port}:interface=127.0.0.1"}
    node = auth_node(tmp_path, dns_server, listen, dnsbl="bl.test")
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
            sock.sendall(b"PROXY TCP4 192.0.2.10 127.0.0.1 40000 25\r\n")
            client = sock.makefile("rwb")

            def command(line: bytes | None) -> bytes:
                if line is not None:
                    client.write(line + b"\r\n")
                    client.flush()
                reply = client.readline()
                while reply[3:4] == b"-":
                    reply = client.readline()
                return reply

            assert command(None).startswith(b"220 ")
            assert command(b"EHLO client.test").startswith(b"250 ")
            assert command(b"MAIL FROM:<x@good.example.com>").startswith(b"250 ")
            assert command(b"RCPT TO:<alice@example.test>").startswith(b"250 ")
            assert command(b"DATA").startswith(b"354 ")
            data = signed(tagged("good.example.com", "t-proxied"), "good.example.com", keys)
            client.write(data + b".\r\n")
            client.flush()
            assert command(None).startswith(b"250 ")
            command(b"QUIT")
        store = QuarantineStore(str(node.data_dir / "quarantine"))
        (kept,) = wait_until(store.list, what="quarantined")
        assert "spf=fail" in kept.reason and "listed in bl.test" in kept.reason
        with open(store.content_path(kept.id), "rb") as f:
            line = auth_results(f.read())
        assert "spf=fail" in line and "dkim=pass" in line and "dmarc=pass" in line
        assert ("10.2.0.192.bl.test", "A") in dns_server.zone.queries
    finally:
        node.stop()
