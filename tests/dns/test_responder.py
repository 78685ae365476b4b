"""The responder, without sockets: every branch of the rules in its docstring, with queries
built and answers read by dnspython."""

from __future__ import annotations

import struct
from collections.abc import Callable
from typing import Any

import dns.edns
import dns.flags
import dns.message
import dns.opcode
import dns.rcode
import dns.rdatatype
import pytest
from prometheus_client import REGISTRY

from mailgw.config import Config
from mailgw.dns.regions import ZoneData
from mailgw.dns.responder import Malformed, Responder, parse_client_subnet, type_label
from tests.dns.conftest import ZONE_CONFIG


@pytest.fixture
def responder(make_config: Callable[[str], Config]) -> Responder:
    return Responder(ZoneData.from_config(make_config(ZONE_CONFIG)))


def ask(
    responder: Responder, q: dns.message.Message | bytes, peer: str = "127.0.0.1", udp: bool = True
) -> dns.message.Message:
    wire = q if isinstance(q, bytes) else q.to_wire()
    out = responder.respond(wire, peer, udp)
    assert out is not None
    return dns.message.from_wire(out)


def mx(answer: dns.message.Message) -> list[str]:
    return [f"{rr.preference} {rr.exchange}" for rrset in answer.answer for rr in rrset]


def query(name: str, rdtype: str = "MX", **kw: Any) -> dns.message.Message:
    return dns.message.make_query(name, rdtype, **kw)


def count(region: str, rtype: str, rcode: str) -> float:
    labels = {"region": region, "type": rtype, "rcode": rcode}
    return REGISTRY.get_sample_value("mailgw_dns_queries_total", labels) or 0.0


def test_region_by_querier(responder: Responder) -> None:
    assert mx(ask(responder, query("example.test"), "127.0.0.1")) == [
        "10 mx.example.test.",
        "20 cn2.example.test.",
    ]
    assert mx(ask(responder, query("example.test"), "127.0.0.2")) == [
        "10 mx.example.test.",
        "30 cn2.example.test.",
    ]
    assert mx(ask(responder, query("example.test"), "2001:db8:c::9"))[1] == "20 cn2.example.test."
    assert mx(ask(responder, query("example.test"), "203.0.113.7"))[1] == "30 cn2.example.test."


def test_case_of_the_question_is_kept_and_matched_without_case(responder: Responder) -> None:
    answer = ask(responder, query("ExAmPlE.TeSt"))
    assert answer.question[0].name.to_text() == "ExAmPlE.TeSt."
    assert answer.answer[0].name.to_text() == "ExAmPlE.TeSt."
    assert answer.flags & dns.flags.AA


def test_client_subnet_trusted_and_untrusted(responder: Responder) -> None:
    q = query("example.test", use_edns=0, options=[dns.edns.ECSOption("10.1.0.0", 16)])
    trusted = ask(responder, q, "127.0.0.4")
    assert mx(trusted)[1] == "20 cn2.example.test."
    assert trusted.options[0].scopelen == 16
    via_v6 = ask(responder, q, "::1")
    assert mx(via_v6)[1] == "20 cn2.example.test."
    untrusted = ask(responder, q, "127.0.0.3")
    assert mx(untrusted)[1] == "30 cn2.example.test." and untrusted.options[0].scopelen == 0
    # A type whose answer does not depend on the region: scope 0.
    soa = query("example.test", "SOA", use_edns=0, options=[dns.edns.ECSOption("10.1.0.0", 16)])
    assert ask(responder, soa, "127.0.0.4").options[0].scopelen == 0
    # An IPv6 client subnet.
    v6 = query("example.test", use_edns=0, options=[dns.edns.ECSOption("2001:db8:c::", 48)])
    assert mx(ask(responder, v6, "127.0.0.4"))[1] == "20 cn2.example.test."


@pytest.mark.parametrize(
    "data",
    [
        b"\x00\x01\x18",  # shorter than 4 bytes
        b"\x00\x03\x08\x00\x0a",  # unknown family
        b"\x00\x01\x21\x00\x0a\x00\x00\x00\x00",  # /33 for IPv4
        b"\x00\x01\x10\x00\x0a\x01\x05",  # more octets than /16 needs
        b"\x00\x01\x18\x00\x0a\x01",  # fewer octets than /24 needs
        b"\x00\x01\x0c\x00\x0a\x11",  # bits set beyond /12
    ],
)
def test_malformed_client_subnet(responder: Responder, data: bytes) -> None:
    with pytest.raises(Malformed):
        parse_client_subnet(data)
    q = query("example.test", use_edns=0)
    q.use_edns(0, options=[dns.edns.GenericOption(8, data)])
    assert ask(responder, q, "127.0.0.4").rcode() == dns.rcode.FORMERR


def test_client_subnet_parses() -> None:
    subnet = parse_client_subnet(b"\x00\x01\x0c\x00\x0a\x10")
    assert str(subnet.network) == "10.16.0.0/12"


def test_negative_answers(responder: Responder) -> None:
    nx = ask(responder, query("nothing.example.test", "A"))
    assert nx.rcode() == dns.rcode.NXDOMAIN and nx.flags & dns.flags.AA
    (soa,) = nx.authority
    assert soa.name.to_text() == "example.test." and soa.ttl == 30 and soa[0].minimum == 30
    # The child zone answers for its own names and its SOA.
    sub = ask(responder, query("nothing.sub.example.test", "A"))
    assert sub.authority[0].name.to_text() == "sub.example.test."
    nodata = ask(responder, query("mx.example.test", "TXT"))
    assert nodata.rcode() == 0 and not nodata.answer and nodata.authority[0].rdtype == 6
    ent = ask(responder, query("mx.sub.example.test", "A"))  # above lab.mx.sub.example.test
    assert ent.rcode() == 0 and not ent.answer
    mx_elsewhere = ask(responder, query("mx.example.test", "MX"))  # MX only at the apex
    assert mx_elsewhere.rcode() == 0 and not mx_elsewhere.answer


def test_refused(responder: Responder) -> None:
    for q in (
        query("example.org", "A"),
        query("test", "SOA"),
        query("badexample.test", "A"),
        query("example.test", "MX", rdclass="CH"),
        query("example.test", "AXFR"),
        query("example.test", "IXFR"),
    ):
        answer = ask(responder, q)
        assert answer.rcode() == dns.rcode.REFUSED, q
        assert not answer.flags & dns.flags.AA and not answer.answer


def test_soa_ns_any(responder: Responder) -> None:
    soa = ask(responder, query("example.test", "SOA")).answer[0]
    assert soa.ttl == 3600
    assert soa[0].mname.to_text() == "ns1.example.test."
    assert soa[0].rname.to_text() == "hostmaster.example.test."
    assert soa[0].expire == 14 * 86400
    ns = ask(responder, query("example.test", "NS"))
    assert sorted(str(rr.target) for rr in ns.answer[0]) == [
        "ns.other.example.",
        "ns1.example.test.",
    ]
    glue = {rr.address for rrset in ns.additional for rr in rrset}
    assert glue == {"192.0.2.53", "2001:db8::53"}
    a = ask(responder, query("ns1.example.test", "AAAA"))
    assert [rr.address for rr in a.answer[0]] == ["2001:db8::53"]
    any_ = ask(responder, query("example.test", "ANY"))
    (hinfo,) = any_.answer
    assert hinfo.rdtype == dns.rdatatype.HINFO and hinfo[0].cpu == b"RFC8482"


def test_hostmaster(make_config: Callable[[str], Config]) -> None:
    text = ZONE_CONFIG.replace("ttl = 60\n", "ttl = 60\nhostmaster = dns-admin@example.org\n")
    data = ZoneData.from_config(make_config(text))
    soa = ask(Responder(data), query("example.test", "SOA")).answer[0]
    assert soa[0].rname.to_text() == "dns-admin.example.org."


def test_flags_and_edns(responder: Responder) -> None:
    q = query("example.test", use_edns=0, want_dnssec=True, payload=4096)
    q.flags |= dns.flags.CD
    answer = ask(responder, q)
    assert answer.flags & dns.flags.QR and answer.flags & dns.flags.RD
    assert not answer.flags & dns.flags.RA
    assert answer.flags & dns.flags.CD
    assert answer.edns == 0 and answer.payload == 1232 and answer.ednsflags & dns.flags.DO
    q = query("example.test")
    q.flags &= ~dns.flags.RD
    assert not ask(responder, q).flags & dns.flags.RD
    assert ask(responder, query("example.test")).edns == -1  # no OPT in, none out


def test_badvers_notimp_formerr(responder: Responder) -> None:
    bad = ask(responder, query("example.test", use_edns=1))
    assert bad.rcode() == dns.rcode.BADVERS and bad.edns == 0
    notify = query("example.test", "SOA")
    notify.set_opcode(dns.opcode.NOTIFY)
    assert ask(responder, notify).rcode() == dns.rcode.NOTIMP
    # Two questions.
    wire = bytearray(query("example.test").to_wire())
    question = bytes(wire[12:])
    two = bytes(wire[:4]) + struct.pack("!HHHH", 2, 0, 0, 0) + question + question
    assert ask(responder, two).rcode() == dns.rcode.FORMERR
    zero = bytes(wire[:4]) + struct.pack("!HHHH", 0, 0, 0, 0)
    assert ask(responder, zero).rcode() == dns.rcode.FORMERR
    # Two OPT records.
    q = query("example.test", use_edns=0)
    opt = q.to_wire()[-11:]
    doubled = bytearray(q.to_wire() + opt)
    doubled[10:12] = struct.pack("!H", 2)
    assert ask(responder, bytes(doubled)).rcode() == dns.rcode.FORMERR
    # A body that does not parse: FORMERR, header only, same ID.
    junk = b"\xab\xcd\x01\x00\x00\x01\x00\x00\x00\x00\x00\x00\x05abc"
    out = responder.respond(junk, "127.0.0.1", True)
    assert out is not None and out[:2] == b"\xab\xcd" and out[3] & 0x0F == 1 and len(out) == 12


def test_no_answer_to_short_packets_or_responses(responder: Responder) -> None:
    assert responder.respond(b"", "127.0.0.1", True) is None
    assert responder.respond(b"\x00" * 11, "127.0.0.1", True) is None
    response = dns.message.make_response(query("example.test")).to_wire()
    assert responder.respond(response, "127.0.0.1", True) is None


def test_truncation(make_config: Callable[[str], Config]) -> None:
    hosts = " ".join(f"gw{i:02d}.example.test=198.18.0.{i}" for i in range(1, 31))
    text = ZONE_CONFIG.replace(
        "mx = mx.example.test=198.51.100.1 30:cn2.example.test", f"mx = {hosts}"
    )
    responder = Responder(ZoneData.from_config(make_config(text)))
    q = query("example.test")
    short = ask(responder, q, "127.0.0.2", udp=True)
    assert short.flags & dns.flags.TC and not short.answer and not short.additional
    assert short.question == q.question
    full = ask(responder, q, "127.0.0.2", udp=False)
    assert len(mx(full)) == 30 and not full.flags & dns.flags.TC
    # EDNS size below 512 counts as 512; above max_udp_size as max_udp_size.
    small = ask(responder, query("example.test", use_edns=0, payload=100), "127.0.0.2")
    assert small.flags & dns.flags.TC and small.edns == 0
    size = len(full.to_wire())
    assert 512 < size < 1232
    fits = ask(responder, query("example.test", use_edns=0, payload=1232), "127.0.0.2")
    assert len(mx(fits)) == 30


def test_unexpected_errors_are_servfail(responder: Responder) -> None:
    responder.data = None  # type: ignore[assignment]  # breaks every lookup
    out = responder.respond(query("example.test").to_wire(), "127.0.0.1", True)
    assert out is not None and out[3] & 0x0F == 2


def test_metrics(responder: Responder) -> None:
    before = count("domestic", "MX", "NOERROR"), count("none", "A", "REFUSED")
    before_nx = count("overseas", "AAAA", "NXDOMAIN")
    ask(responder, query("example.test"), "127.0.0.1")
    ask(responder, query("example.org", "A"))
    ask(responder, query("nothing.example.test", "AAAA"), "127.0.0.2")
    assert count("domestic", "MX", "NOERROR") == before[0] + 1
    assert count("none", "A", "REFUSED") == before[1] + 1
    assert count("overseas", "AAAA", "NXDOMAIN") == before_nx + 1
    assert type_label(255) == "ANY" and type_label(252) == "AXFR" and type_label(65000) == "other"


def test_compression_pointer_loops_are_formerr(responder: Responder) -> None:
    header = b"\x12\x34\x01\x00\x00\x01\x00\x00\x00\x00\x00\x00"
    for name in (b"\xc0\x0c", b"\xc0\x0e\xc0\x0c", b"\xc0\xff"):
        out = responder.respond(header + name + b"\x00\x01\x00\x01", "127.0.0.1", True)
        assert out is not None and out[:2] == b"\x12\x34" and out[3] & 0x0F == 1
