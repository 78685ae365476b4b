"""The ``dns`` role of the real ``twistd mailgw``: dnspython and dig query it over UDP and TCP
from different loopback source addresses (127.0.0.1 domestic, 127.0.0.2 overseas...) and get
each region's MX gateways; a trusted resolver's EDNS Client Subnet picks the region, an
untrusted one's does not; NXDOMAIN, REFUSED, SOA, NS, truncation over UDP, garbage over UDP
and TCP, a reload (SIGHUP) changing the answers, and the query counter on /metrics."""

from __future__ import annotations

import os
import random
import signal
import socket
import struct
import subprocess
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import dns.edns
import dns.flags
import dns.message
import dns.query
import dns.rcode
import dns.rdatatype
import pytest
from prometheus_client.parser import text_string_to_metric_families

from mailgw.testing.server import MailgwServer, free_port, render_config, wait_for_port
from tests.integration.helpers import wait_until

BULK = " ".join(f"{i}:gw{i:02d}.example.test=198.18.0.{i}" for i in range(1, 41))


def overrides(dns_port: int, http_port: int) -> dict[str, dict[str, str]]:
    return {
        "dns": {
            "enabled": "yes",
            "listen": (
                f"udp:{dns_port}:interface=127.0.0.1 tcp:{dns_port}:interface=127.0.0.1"
                f" udp:{dns_port}:interface=::1 tcp6:{dns_port}:interface=\\:\\:1"
            ),
            "zones": "example.test mail.example.net",
            "nameservers": "ns1.example.test=127.0.0.1 ns.elsewhere.example",
            "regions": "domestic overseas bulk",
            "default_region": "overseas",
            "ecs_trusted": "127.0.0.4/32",
            "ttl": "60",
            "ns_ttl": "2h",
            "negative_ttl": "90",
            "max_udp_size": "4096",
        },
        "dns_region:domestic": {
            "networks": "127.0.0.1/32 10.0.0.0/8 ::1/128",
            "mx": "mx.example.test=192.0.2.1 20:mx-cn2.example.test=192.0.2.2,2001:db8::2",
        },
        "dns_region:overseas": {
            "networks": "127.0.0.2/32 10.9.0.0/16",
            "mx": "mx.example.test=198.51.100.1",
        },
        "dns_region:bulk": {"networks": "127.0.0.5/32", "mx": BULK},
        "http": {"enabled": "yes", "listen": f"tcp:{http_port}:interface=127.0.0.1"},
    }


@pytest.fixture(scope="module")
def node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MailgwServer]:
    dns_port, http_port = free_port(), free_port()
    server = MailgwServer(tmp_path_factory.mktemp("dns"), overrides(dns_port, http_port))
    server.ports.update(dns=dns_port, http=http_port)
    server.start()
    wait_for_port("127.0.0.1", dns_port, proc=server.proc)
    try:
        yield server
    finally:
        server.stop()


def udp(
    server: MailgwServer, q: dns.message.Message, source: str = "127.0.0.1"
) -> dns.message.Message:
    return dns.query.udp(q, "127.0.0.1", port=server.ports["dns"], source=source, timeout=10)


def tcp(
    server: MailgwServer, q: dns.message.Message, source: str = "127.0.0.1"
) -> dns.message.Message:
    return dns.query.tcp(q, "127.0.0.1", port=server.ports["dns"], source=source, timeout=10)


def mx_of(answer: dns.message.Message) -> list[tuple[int, str]]:
    return sorted(
        (rr.preference, rr.exchange.to_text())
        for rrset in answer.answer
        if rrset.rdtype == dns.rdatatype.MX
        for rr in rrset
    )


def addresses(answer: dns.message.Message, section: str = "answer") -> set[str]:
    return {
        rr.address
        for rrset in getattr(answer, section)
        if rrset.rdtype in (dns.rdatatype.A, dns.rdatatype.AAAA)
        for rr in rrset
    }


def test_mx_and_a_depend_on_the_querier_address(node: MailgwServer) -> None:
    for send in (udp, tcp):
        domestic = send(node, dns.message.make_query("example.test", "MX"), "127.0.0.1")
        overseas = send(node, dns.message.make_query("example.test", "MX"), "127.0.0.2")
        default = send(node, dns.message.make_query("example.test", "MX"), "127.0.0.3")
        assert mx_of(domestic) == [(10, "mx.example.test."), (20, "mx-cn2.example.test.")]
        assert mx_of(overseas) == [(10, "mx.example.test.")]
        assert mx_of(default) == mx_of(overseas)  # no network matches: default_region
        # The gateways' addresses come along (additional section), per region.
        assert addresses(domestic, "additional") == {"192.0.2.1", "192.0.2.2", "2001:db8::2"}
        assert addresses(overseas, "additional") == {"198.51.100.1"}
        for answer in (domestic, overseas):
            assert answer.rcode() == dns.rcode.NOERROR
            assert answer.flags & dns.flags.AA
            assert not answer.flags & dns.flags.RA
            assert answer.answer[0].ttl == 60
    # The same gateway name has each region's address.
    a_cn = udp(node, dns.message.make_query("mx.example.test", "A"), "127.0.0.1")
    a_os = udp(node, dns.message.make_query("mx.example.test", "A"), "127.0.0.2")
    assert addresses(a_cn) == {"192.0.2.1"} and addresses(a_os) == {"198.51.100.1"}
    aaaa = udp(node, dns.message.make_query("mx-cn2.example.test", "AAAA"), "127.0.0.2")
    assert addresses(aaaa) == {"2001:db8::2"}  # only the domestic region has it: same answer


def test_ipv6_listeners_and_querier(node: MailgwServer) -> None:
    port = node.ports["dns"]
    q = dns.message.make_query("example.test", "MX")
    for answer in (
        dns.query.udp(q, "::1", port=port, timeout=10),
        dns.query.tcp(q, "::1", port=port, timeout=10),
    ):
        assert mx_of(answer) == [(10, "mx.example.test."), (20, "mx-cn2.example.test.")]


def test_client_subnet_from_a_trusted_resolver_chooses_the_region(node: MailgwServer) -> None:
    def query(subnet: str, prefix: int) -> dns.message.Message:
        option = dns.edns.ECSOption(subnet, prefix)
        return dns.message.make_query("example.test", "MX", use_edns=0, options=[option])

    # 127.0.0.4 (trusted, in no region: overseas by default) asks for a domestic client.
    answer = udp(node, query("10.1.0.0", 16), "127.0.0.4")
    assert mx_of(answer) == [(10, "mx.example.test."), (20, "mx-cn2.example.test.")]
    (option,) = answer.options
    assert isinstance(option, dns.edns.ECSOption)
    assert (option.address, option.srclen, option.scopelen) == ("10.1.0.0", 16, 16)
    # A longer overseas network inside the domestic /8 wins.
    assert mx_of(udp(node, query("10.9.3.0", 24), "127.0.0.4")) == [(10, "mx.example.test.")]
    # The same option from an untrusted resolver (127.0.0.2, overseas) changes nothing...
    untrusted = udp(node, query("10.1.0.0", 16), "127.0.0.2")
    assert mx_of(untrusted) == [(10, "mx.example.test.")]
    (option,) = untrusted.options
    assert option.scopelen == 0  # ...and says the answer does not depend on the subnet
    # A /0 subnet: the resolver's own address.
    assert mx_of(udp(node, query("0.0.0.0", 0), "127.0.0.4")) == [(10, "mx.example.test.")]
    # A malformed option (address bits beyond the prefix): FORMERR.
    bad = dns.message.make_query("example.test", "MX", use_edns=0)
    bad.use_edns(0, options=[dns.edns.GenericOption(8, b"\x00\x01\x10\x00\x0a\x01\x05")])
    assert udp(node, bad, "127.0.0.4").rcode() == dns.rcode.FORMERR


def test_nxdomain_refused_soa_ns(node: MailgwServer) -> None:
    nx = udp(node, dns.message.make_query("nobody.example.test", "MX"))
    assert nx.rcode() == dns.rcode.NXDOMAIN and nx.flags & dns.flags.AA and not nx.answer
    (soa,) = nx.authority
    assert soa.rdtype == dns.rdatatype.SOA and soa.name.to_text() == "example.test."
    assert soa.ttl == 90 and soa[0].minimum == 90
    # Our second zone is answered too; a name above it is not ours.
    assert udp(node, dns.message.make_query("x.mail.example.net", "A")).rcode() == 3
    refused = udp(node, dns.message.make_query("example.net", "MX"))
    assert refused.rcode() == dns.rcode.REFUSED and not refused.flags & dns.flags.AA
    assert udp(node, dns.message.make_query("www.google.com", "A")).rcode() == 5
    # Names that exist without the asked type: NODATA (NOERROR, SOA, no answer).
    nodata = udp(node, dns.message.make_query("mx.example.test", "TXT"))
    assert nodata.rcode() == dns.rcode.NOERROR and not nodata.answer and nodata.authority
    ent = udp(node, dns.message.make_query("example.test", "A"))
    assert ent.rcode() == dns.rcode.NOERROR and not ent.answer

    soa_answer = udp(node, dns.message.make_query("example.test", "SOA"))
    (rrset,) = soa_answer.answer
    assert rrset.ttl == 7200
    assert rrset[0].mname.to_text() == "ns1.example.test."
    assert rrset[0].rname.to_text() == "hostmaster.example.test."
    ns = udp(node, dns.message.make_query("example.test", "NS"))
    assert sorted(rr.target.to_text() for rr in ns.answer[0]) == [
        "ns.elsewhere.example.",
        "ns1.example.test.",
    ]
    assert addresses(ns, "additional") == {"127.0.0.1"}  # glue for the in-zone one only
    axfr = tcp(node, dns.message.make_query("example.test", "AXFR"))
    assert axfr.rcode() == dns.rcode.REFUSED
    chaos = udp(node, dns.message.make_query("version.bind", "TXT", "CH"))
    assert chaos.rcode() == dns.rcode.REFUSED


def test_udp_truncates_and_tcp_answers_in_full(node: MailgwServer) -> None:
    q = dns.message.make_query("example.test", "MX")  # no EDNS: 512 bytes at most
    short = udp(node, q, "127.0.0.5")
    assert short.flags & dns.flags.TC and not short.answer
    full = tcp(node, q, "127.0.0.5")
    assert not full.flags & dns.flags.TC and len(mx_of(full)) == 40
    assert len(full.to_wire()) > 512
    # With EDNS the querier's size (up to [dns] max_udp_size) counts.
    assert 1232 < len(full.to_wire()) < 4096
    for size, cut in ((1232, True), (4096, False), (65000, False)):
        q = dns.message.make_query("example.test", "MX", use_edns=0, payload=size)
        answer = udp(node, q, "127.0.0.5")
        assert bool(answer.flags & dns.flags.TC) == cut
        assert len(mx_of(answer)) == (0 if cut else 40)
        assert answer.payload == 4096  # ours, in the OPT record


def test_dig_sees_the_regions(node: MailgwServer) -> None:
    def dig(*args: str) -> str:
        cmd = ["dig", "@127.0.0.1", "-p", str(node.ports["dns"]), "+time=5", "+tries=1", *args]
        return subprocess.run(cmd, capture_output=True, text=True, timeout=30, check=True).stdout

    assert dig("-b", "127.0.0.1", "example.test", "MX", "+short").split("\n")[:2] == [
        "10 mx.example.test.",
        "20 mx-cn2.example.test.",
    ]
    assert dig("-b", "127.0.0.2", "example.test", "MX", "+short", "+tcp").strip() == (
        "10 mx.example.test."
    )
    assert dig("-b", "127.0.0.2", "mx.example.test", "A", "+short").strip() == "198.51.100.1"
    ecs = dig("-b", "127.0.0.4", "+subnet=10.2.0.0/16", "mx.example.test", "A")
    assert "192.0.2.1" in ecs and "CLIENT-SUBNET: 10.2.0.0/16/16" in ecs
    full = dig("-b", "127.0.0.1", "nobody.example.test", "A")
    assert "status: NXDOMAIN" in full and "flags: qr aa rd;" in full
    assert "status: REFUSED" in dig("example.org", "A")
    # dig retries a truncated answer over TCP on its own.
    bulk = dig("-b", "127.0.0.5", "+noedns", "example.test", "MX")
    assert "Truncated, retrying in TCP mode" in bulk and bulk.count("IN\tMX\t") == 40


def test_garbage_never_stops_the_server(node: MailgwServer) -> None:
    rng = random.Random(15)
    port = node.ports["dns"]
    packets = [b"", b"\x00", b"abc", bytes(12), b"\xff" * 12, b"\x12\x34\x81\x80" + bytes(8)]
    packets += [rng.randbytes(rng.randrange(1, 600)) for _ in range(200)]
    valid = dns.message.make_query("example.test", "MX").to_wire()
    packets += [valid[:n] for n in range(len(valid))]  # every truncation of a real query
    packets += [valid[:4] + b"\x00\x05" + valid[6:]]  # claims 5 questions
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.settimeout(5)
        for packet in packets:
            s.sendto(packet, ("127.0.0.1", port))
            if len(packet) < 12 or packet[2] & 0x80:
                continue  # not a query (too short, or a response): never answered
            reply, _ = s.recvfrom(65535)
            assert reply[:2] == packet[:2] and reply[2] & 0x80  # the answer to that query
            assert reply[3] & 0x0F in (0, 1, 3, 4, 5), (packet, reply)
        # Nothing answered the packets left unanswered: the next answer is the next query's.
        s.sendto(valid, ("127.0.0.1", port))
        reply, _ = s.recvfrom(65535)
        assert reply[:2] == valid[:2]
    # A header followed by junk: FORMERR, not silence.
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.settimeout(5)
        s.sendto(
            b"\xbe\xef\x01\x00\x00\x01\x00\x00\x00\x00\x00\x00\x07garbage", ("127.0.0.1", port)
        )
        reply, _ = s.recvfrom(65535)
        assert reply[:2] == b"\xbe\xef" and reply[3] & 0x0F == 1
    # TCP: junk framed and unframed, then a huge length prefix and a close.
    for junk in (b"\x00\x05hello", b"\x00\x02\x00\x00", struct.pack("!H", 40) + rng.randbytes(40)):
        with socket.create_connection(("127.0.0.1", port), timeout=5) as c:
            c.sendall(junk)
            c.recv(65535)  # an answer, or the close: either is fine
    with socket.create_connection(("127.0.0.1", port), timeout=5) as c:
        c.sendall(b"\xff\xff" + b"x" * 100)
    # Still answering, over both transports.
    assert mx_of(udp(node, dns.message.make_query("example.test", "MX"), "127.0.0.2"))
    assert mx_of(tcp(node, dns.message.make_query("example.test", "MX"), "127.0.0.2"))
    assert node.proc is not None and node.proc.poll() is None
    assert "Unhandled" not in node.log() and "Traceback" not in node.log()


def test_metrics_count_queries_by_region_type_and_rcode(node: MailgwServer) -> None:
    udp(node, dns.message.make_query("example.test", "MX"), "127.0.0.1")
    udp(node, dns.message.make_query("example.org", "A"), "127.0.0.1")
    url = f"http://127.0.0.1:{node.ports['http']}/metrics"
    with urllib.request.urlopen(url, timeout=10) as r:
        body = r.read().decode()
    samples = {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(body)
        for s in family.samples
    }
    mx = (
        "mailgw_dns_queries_total",
        (("rcode", "NOERROR"), ("region", "domestic"), ("type", "MX")),
    )
    refused = (
        "mailgw_dns_queries_total",
        (("rcode", "REFUSED"), ("region", "none"), ("type", "A")),
    )
    assert samples[mx] >= 1 and samples[refused] >= 1


def test_reload_changes_the_answers(tmp_path: Path) -> None:
    dns_port, http_port = free_port(), free_port()
    server = MailgwServer(tmp_path, overrides(dns_port, http_port))
    server.ports["dns"] = dns_port
    server.start()
    try:
        wait_for_port("127.0.0.1", dns_port, proc=server.proc)
        q = dns.message.make_query("example.test", "MX")
        assert mx_of(udp(server, q, "127.0.0.2")) == [(10, "mx.example.test.")]
        server.sections["dns_region:overseas"]["mx"] = "5:mx-eu.example.test=203.0.113.9"
        server.sections["dns"]["ttl"] = "30"
        server.config_path.write_text(render_config(server.sections))
        assert server.proc is not None
        os.kill(server.proc.pid, signal.SIGHUP)
        wait_until(
            lambda: mx_of(udp(server, q, "127.0.0.2")) == [(5, "mx-eu.example.test.")],
            what="the reloaded MX",
        )
        answer = udp(server, dns.message.make_query("mx-eu.example.test", "A"), "127.0.0.2")
        assert addresses(answer) == {"203.0.113.9"} and answer.answer[0].ttl == 30
        assert "restart needed" not in server.log()
    finally:
        server.stop()
