"""SPF, DKIM, DMARC and DNSBL evaluation against the tests' DNS server, and the bands."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
from twisted.internet.defer import Deferred

from mailgw.model.verdict import Disposition, Verdict
from mailgw.policy.inbound_auth import (
    DNS,
    Authenticator,
    AuthResults,
    Scores,
    decide,
    dnsbl_name,
    parse_nameserver,
)
from tests.policy.authzone import Keys, auth_zone, make_key, message, signed
from tests.policy.dnsthread import ThreadedDNS
from tests.relay.dnsserver import Zone


@pytest.fixture(scope="module")
def keys() -> Keys:
    return make_key()


@pytest.fixture(scope="module")
def zone(keys: Keys) -> Zone:
    return auth_zone(keys)


@pytest.fixture(scope="module")
def dns_server(zone: Zone) -> Iterator[ThreadedDNS]:
    server = ThreadedDNS(zone).start()
    yield server
    server.stop()


@pytest.fixture
def auth(dns_server: ThreadedDNS) -> Authenticator:
    return Authenticator(DNS([dns_server.address], 5), "mx.example.test")


def evaluate(auth: Authenticator, msg: bytes, sender: str, ip: str = "127.0.0.1") -> AuthResults:
    return auth.evaluate(msg, ip, sender, "client.test")


# -- SPF ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("sender", "expected"),
    [
        ("x@good.example.com", "pass"),
        ("x@hard.example.com", "fail"),
        ("x@soft.example.com", "softfail"),
        ("x@nospf.example.com", "none"),
    ],
)
def test_spf(auth: Authenticator, sender: str, expected: str) -> None:
    r = evaluate(auth, message("nospf.example.com"), sender)
    assert r.spf == expected
    assert f"spf={expected} " in r.header and f"smtp.mailfrom={sender}" in r.header


def test_spf_of_the_null_sender_uses_helo(auth: Authenticator) -> None:
    assert auth.spf("127.0.0.1", "", "good.example.com")[0] == "pass"
    assert auth.spf("127.0.0.1", "", "hard.example.com")[0] == "fail"


# -- DKIM --------------------------------------------------------------------------------


def test_dkim_valid_invalid_missing(auth: Authenticator, keys: Keys) -> None:
    good = signed(message("other.example.net"), "other.example.net", keys)
    r = evaluate(auth, good, "x@nospf.example.com")
    assert (r.dkim, r.dkim_domain) == ("pass", "other.example.net")
    assert "dkim=pass header.d=other.example.net" in r.header
    tampered = good.replace(b"Hello.", b"Hullo.")
    assert evaluate(auth, tampered, "x@nospf.example.com").dkim == "fail"
    assert evaluate(auth, message("other.example.net"), "x@nospf.example.com").dkim == "none"
    unknown_selector = signed(message("nospf.example.com"), "nospf.example.com", keys)
    assert evaluate(auth, unknown_selector, "x@nospf.example.com").dkim == "fail"


# -- DMARC -------------------------------------------------------------------------------


def test_dmarc_reject_fails_without_aligned_identity(auth: Authenticator, keys: Keys) -> None:
    # SPF passes for other.example.net, DKIM passes for other.example.net: neither aligns with good.example.com.
    msg = signed(message("good.example.com"), "other.example.net", keys)
    r = evaluate(auth, msg, "x@other.example.net")
    assert (r.spf, r.dkim, r.dmarc, r.dmarc_policy) == ("pass", "pass", "fail", "reject")
    assert "dmarc=fail" in r.header and "header.from=good.example.com" in r.header
    verdict = decide(r, Scores())
    assert verdict.disposition is Disposition.REJECT
    assert verdict.reply is not None and (verdict.reply.code, verdict.reply.enhanced) == (
        550,
        "5.7.1",
    )
    assert "DMARC policy of good.example.com" in verdict.reply.text


def test_dmarc_passes_with_aligned_spf_or_dkim(auth: Authenticator, keys: Keys) -> None:
    spf_aligned = evaluate(auth, message("good.example.com"), "x@good.example.com")
    assert (spf_aligned.spf, spf_aligned.dkim, spf_aligned.dmarc) == ("pass", "none", "pass")
    dkim_aligned = evaluate(
        auth, signed(message("good.example.com"), "good.example.com", keys), "x@hard.example.com"
    )
    assert (dkim_aligned.spf, dkim_aligned.dkim, dkim_aligned.dmarc) == ("fail", "pass", "pass")
    verdict = decide(dkim_aligned, Scores())  # spf fail scores 3: Junk, not refused
    assert verdict.disposition is Disposition.ACCEPT and verdict.folder == "Junk"


def test_dmarc_quarantine_failure_goes_to_junk(auth: Authenticator, keys: Keys) -> None:
    r = evaluate(
        auth, signed(message("quar.example.com"), "other.example.net", keys), "x@other.example.net"
    )
    assert (r.dmarc, r.dmarc_policy) == ("fail", "quarantine")
    verdict = decide(r, Scores(dmarc_fail=0))
    assert verdict.disposition is Disposition.ACCEPT and verdict.folder == "Junk"
    assert verdict.headers[0][0] == "Authentication-Results"


def test_dmarc_none_failure_is_only_scored(auth: Authenticator, keys: Keys) -> None:
    r = evaluate(
        auth, signed(message("none.example.com"), "other.example.net", keys), "x@other.example.net"
    )
    assert (r.dmarc, r.dmarc_policy) == ("fail", "none")
    assert decide(r, Scores(dmarc_fail=1)).folder is None
    assert decide(r, Scores()).folder == "Junk"  # dmarc_fail 3 reaches junk 3


def test_no_dmarc_record_is_none(auth: Authenticator) -> None:
    r = evaluate(auth, message("other.example.net"), "x@other.example.net")
    assert r.dmarc == "none" and "dmarc=none" in r.header


# -- DNSBL and bands ---------------------------------------------------------------------


def test_dnsbl_listing_and_bands(dns_server: ThreadedDNS) -> None:
    zones = ["clean-bl.test", "refusing-bl.test", "bl.test"]
    auth = Authenticator(DNS([dns_server.address], 5), "mx.example.test", zones)
    r = evaluate(auth, message("other.example.net"), "x@other.example.net")
    assert r.dnsbl == ["bl.test"]  # 127.255.255.254 from refusing-bl.test is an error code
    assert ("1.0.0.127.refusing-bl.test", "A") in dns_server.zone.queries
    assert decide(r, Scores()).folder == "Junk"  # 5: from junk (3), under quarantine (6)
    assert decide(r, Scores(dnsbl=6)).is_quarantined
    assert not evaluate(
        auth, message("other.example.net"), "x@other.example.net", "192.0.2.7"
    ).dnsbl


def test_header_is_one_line_with_the_authserv_id(auth: Authenticator) -> None:
    r = evaluate(auth, message("good.example.com"), "x@good.example.com")
    assert r.header.startswith("mx.example.test;")
    assert "\n" not in r.header and "\r" not in r.header


def test_dns_down_is_temperror_and_never_refused() -> None:
    from tests.relay.dnsserver import free_udp_tcp_port

    dead = Authenticator(DNS([f"127.0.0.1:{free_udp_tcp_port()}"], 0.3), "mx", ["bl.test"])
    r = dead.evaluate(message("good.example.com"), "127.0.0.1", "x@good.example.com", "client.test")
    assert r.spf == "temperror" and r.dnsbl == []
    assert r.dmarc == "temperror"
    assert decide(r, Scores()).disposition is Disposition.ACCEPT


def test_helpers() -> None:
    assert dnsbl_name("192.0.2.5", "bl.test") == "5.2.0.192.bl.test"
    assert dnsbl_name("2001:db8::1", "z").startswith("1.0.0.0.") and dnsbl_name("x", "z") is None
    assert parse_nameserver("127.0.0.1:5353") == ("127.0.0.1", 5353)
    assert parse_nameserver("[::1]:53") == ("::1", 53)
    assert parse_nameserver("::1") == ("::1", 53)


def test_scores_and_bands() -> None:
    r: Any = AuthResults(spf="fail", dkim="fail", header="mx; spf=fail")
    assert r.score(Scores()) == (5, ["spf=fail", "dkim=fail"])
    assert decide(r, Scores()).folder == "Junk"
    q = decide(AuthResults(spf="fail", dnsbl=["z"], header="h"), Scores())
    assert q.is_quarantined and "listed in z" in q.reason
    rej = decide(AuthResults(spf="fail", dkim="fail", dnsbl=["z"], header="h"), Scores())
    assert rej.disposition is Disposition.REJECT
    off = Scores(junk=0, quarantine=0, reject=0)
    assert decide(AuthResults(spf="fail", dnsbl=["a", "b"], header="h"), off).headers == (
        ("Authentication-Results", "h"),
    )


def test_the_check_skips_authenticated_users_and_runs_in_the_runner(
    auth: Authenticator,
) -> None:
    from mailgw.policy.inbound_auth import InboundAuthCheck
    from mailgw.policy.pipeline import CheckContext
    from mailgw.runtime.threads import run_inline
    from tests.policy.test_antivirus import Received

    calls: list[object] = []

    def run(f: Any, *args: Any) -> Any:
        calls.append(f)
        return run_inline(f, *args)

    check = InboundAuthCheck(auth, run)
    user = CheckContext(user="alice@example.test", message=Received(message("hard.example.com")))
    assert check.check(user) == Verdict.accept() and not calls
    anon = CheckContext(
        client_ip="127.0.0.1",
        helo="client.test",
        sender="x@hard.example.com",
        message=Received(message("hard.example.com")),
    )
    results: list[Verdict] = []
    d = check.check(anon)
    assert isinstance(d, Deferred)
    d.addCallback(results.append)
    assert calls and results[0].disposition is Disposition.REJECT  # SPF fail under p=reject


def test_every_signature_is_verified_and_any_aligned_one_passes_dmarc(
    auth: Authenticator, keys: Keys
) -> None:
    """An ESP's signature first, the author domain's second: DMARC passes on the second."""
    msg = signed(
        signed(message("good.example.com"), "good.example.com", keys), "other.example.net", keys
    )
    assert msg.startswith(b"DKIM-Signature: v=1; a=rsa-sha256; c=relaxed/simple; d=other")
    r = evaluate(auth, msg, "x@other.example.net")
    assert (r.dkim, r.dkim_domain, r.dmarc) == ("pass", "other.example.net", "pass")
    assert "dkim=pass header.d=other.example.net" in r.header
    assert "dkim=pass header.d=good.example.com" in r.header
    assert auth.dkim(msg.replace(b"Hello.", b"Bye.")) == [
        ("fail", "other.example.net"),
        ("fail", "good.example.com"),
    ]


def test_org_domain_is_parsed_once_and_used_by_authheaders() -> None:
    import authheaders
    import authheaders.dmarc_lookup

    from mailgw.policy.inbound_auth import org_domain

    assert org_domain("a.b.example.com") == "example.com"
    assert org_domain("mail.example.co.uk") == "example.co.uk"
    assert authheaders.get_org_domain is org_domain
    assert authheaders.dmarc_lookup.get_org_domain is org_domain


HOSTILE = [
    b"",
    b"\r\n",
    b"no header at all",
    b"\x00\xff\xfe binary\r\n\r\nx",
    b"From: \r\n\r\n",
    b"From: a@\r\n\r\n",
    b"From: <@>\r\n\r\n",
    b"From: x@" + b"a" * 300 + b".com\r\n\r\n",
    b"DKIM-Signature: garbage\r\nFrom: a@good.example.com\r\n\r\nx",
    b"DKIM-Signature: v=1; d=good.example.com; s=sel; b=; bh=; h=from\r\n"
    b"From: a@good.example.com\r\n\r\nx",
    b" folded first\r\nFrom: a@b.example\r\n\r\n",
    b"From: a@b.example\nSubject: lf only\n\nbody\n",
    b"From: a@[127.0.0.1]\r\n\r\n",
    b"From: a@b..example\r\n\r\n",
    b"From: a@good.example.com, b@none.example.com\r\n\r\n",
]


@pytest.mark.parametrize("data", HOSTILE)
@pytest.mark.parametrize(
    ("ip", "sender", "helo"),
    [("127.0.0.1", "x@good.example.com", "h"), ("not-an-ip", "", ""), ("::1", "bad", "[1.2.3.4]")],
)
def test_hostile_input_gives_results_not_exceptions(
    auth: Authenticator, data: bytes, ip: str, sender: str, helo: str
) -> None:
    r = auth.evaluate(data, ip, sender, helo)
    assert r.header.startswith("mx.example.test;") and "spf=" in r.header
    assert decide(r, Scores()).disposition in set(Disposition)


def test_unparsable_header_with_a_signature_is_dkim_permerror(auth: Authenticator) -> None:
    assert auth.dkim(b"DKIM-Signature: v=1\r\nno colon here\r\n\r\nbody") == [("permerror", "")]
    assert auth.dkim(b"no colon here\r\n\r\nbody") == []
    r = evaluate(auth, HOSTILE[-1], "x@good.example.com")
    assert r.dmarc == "permerror"  # two From domains


def test_outcome_for_the_log() -> None:
    from mailgw.policy.inbound_auth import outcome

    h = AuthResults(header="h")
    assert outcome(decide(h, Scores())) == "delivered"
    assert outcome(decide(AuthResults(spf="fail", header="h"), Scores())) == "filed into Junk"
    q = outcome(decide(AuthResults(spf="fail", dnsbl=["z"], header="h"), Scores()))
    assert q.startswith("quarantined: sender authentication: score 8")
    r = outcome(
        decide(
            AuthResults(dmarc="fail", dmarc_policy="reject", from_domain="d", header="h"), Scores()
        )
    )
    assert r.startswith("550 5.7.1 Message rejected: DMARC policy of d")
