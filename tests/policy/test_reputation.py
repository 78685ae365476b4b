"""Unit tests of the reputation arithmetic (decay, EWMA baseline, spikes, standing), the
content heuristics, header removal, the stores and rspamd answers."""

from __future__ import annotations

import email.utils
from pathlib import Path

import pytest

from mailgw.model.verdict import Verdict
from mailgw.policy.apply import header_edit, remove_fields
from mailgw.policy.pipeline import CheckContext
from mailgw.policy.reputation import heuristics as h
from mailgw.policy.reputation.rspamd import RspamdError, parse_address, parse_result
from mailgw.policy.reputation.service import queue_ids_in, report_event, subjects_of
from mailgw.policy.reputation.standing import (
    BLOCKED,
    LIMITED,
    OK,
    Limits,
    Record,
    apply_event,
    check_subject,
    decayed,
    ewma_fold,
    is_spike,
    roll,
    standing,
)
from mailgw.policy.reputation.store import (
    RECORD_TTL,
    MemoryReputationStore,
    SQLiteReputationStore,
)

H = 3600.0


# -- baseline math -----------------------------------------------------------------------------


def test_decay_halves_every_half_life() -> None:
    assert decayed(8, 0, 86400, 86400) == pytest.approx(4)
    assert decayed(8, 0, 2 * 86400, 86400) == pytest.approx(2)
    assert decayed(8, 100, 50, 86400) == 8  # clock going back: unchanged
    assert decayed(8, 0, 10**9, 0) == 8  # half_life 0: never
    assert decayed(-1, 0, 10, 10) == 0


def test_ewma_fold_first_hour_then_weighted_then_empty_hours() -> None:
    assert ewma_fold(0, 0, 10, 1, 0.5) == (10, 1)
    assert ewma_fold(10, 1, 20, 1, 0.5) == (15, 2)
    baseline, hours = ewma_fold(10, 1, 20, 3, 0.5)  # 2 empty hours after: 15 * 0.5 * 0.5
    assert baseline == pytest.approx(3.75) and hours == 4
    assert ewma_fold(10, 1, 20, 0, 0.5) == (10, 1)


def test_roll_and_spike() -> None:
    limits = Limits(alpha=0.5, spike_factor=3, min_volume=5)
    r = Record()
    t = 1000 * H
    for _ in range(4):
        apply_event(r, {"message": 1}, t, limits)
    assert r.hour_count == 4 and r.baseline == 0 and r.points == 0  # under min_volume
    apply_event(r, {"message": 1}, t + H, limits)  # next hour: 4 folded in
    assert r.baseline == 4 and r.hours == 1 and r.hour_count == 1
    for _ in range(11):
        apply_event(r, {"message": 1}, t + H + 1, limits)
    assert r.hour_count == 12 and not is_spike(r, limits) and r.points == 0  # 12 = 3 * 4
    apply_event(r, {"message": 1}, t + H + 2, limits)
    assert is_spike(r, limits) and r.points == limits.spike_points
    roll(r, t + 5 * H, limits.alpha)  # 13 folded, then 3 empty hours
    assert r.baseline == pytest.approx((0.5 * 13 + 0.5 * 4) * 0.125)


def test_points_counters_and_standing() -> None:
    limits = Limits(limit_score=3, block_score=9, half_life=0)
    r = Record()
    apply_event(r, {"message": 1, "spam": 1, "points": 2, "content": 8}, 10, limits)
    assert (r.sent, r.spam, r.points, r.content) == (1, 1, 2, 8)
    assert standing(r, limits) == OK
    apply_event(r, {"points": 2, "bounced": 2, "unknown": 1}, 11, limits)
    assert standing(r, limits) == LIMITED and r.bounce_rate == 2 and r.unknown_rate == 1
    apply_event(r, report_event("spam", limits), 12, limits)
    assert standing(r, limits) == BLOCKED and r.reports_spam == 1
    apply_event(r, report_event("ham", limits), 13, limits)
    apply_event(r, report_event("ham", limits), 13, limits)
    assert r.points == 0 and r.reports_ham == 2  # never below zero
    r.override = "block"
    assert standing(r, limits) == BLOCKED
    r.override, r.points = "allow", 100
    assert standing(r, limits) == OK
    with pytest.raises(ValueError):
        report_event("maybe", limits)


def test_subjects() -> None:
    assert check_subject(" User:Alice@Example.TEST ") == "user:alice@example.test"
    for bad in ("alice", "host:x", "ip:", ":x"):
        with pytest.raises(ValueError):
            check_subject(bad)
    out = subjects_of(CheckContext(user="a@x.test", sender="a@X.test", client_ip="10.0.0.1"))
    assert out == ["user:a@x.test", "domain:x.test"]
    inbound = subjects_of(CheckContext(sender="s@far.example", client_ip="10.0.0.1"))
    assert inbound == ["ip:10.0.0.1", "domain:far.example"]
    assert subjects_of(CheckContext(client_ip="10.0.0.1")) == ["ip:10.0.0.1"]


@pytest.mark.parametrize("kind", ["memory", "sqlite"])
def test_stores(kind: str, tmp_path: Path) -> None:
    limits = Limits(half_life=0)
    store = (
        MemoryReputationStore(limits)
        if kind == "memory"
        else SQLiteReputationStore(str(tmp_path / "r.sqlite"), limits)
    )
    store.event("user:a", {"message": 1, "points": 2}, 100)
    store.event("user:a", {"message": 1}, 100)
    assert store.get("user:a", 200).sent == 2
    assert store.get("user:b", 200) == Record()
    store.set_override("user:b", "block")
    assert store.subjects() == ["user:a", "user:b"]
    store.link("Q1", ["user:a", "domain:x"], 100)
    assert store.linked("Q1") == ["user:a", "domain:x"] and store.linked("Q2") == []
    store.reset("user:a")
    assert store.subjects() == ["user:b"]
    if kind == "sqlite":  # survives a restart
        again = SQLiteReputationStore(str(tmp_path / "r.sqlite"), limits)
        assert again.get("user:b", 0).override == "block" and again.linked("Q1")
        again.event("user:old", {"message": 1}, 100)
        again.event("user:new", {"message": 1}, 100 + RECORD_TTL)
        again.prune(101 + RECORD_TTL)  # user:b idle too, but its override is kept
        assert again.subjects() == ["user:b", "user:new"]


# -- heuristics ---------------------------------------------------------------------------------


def msg(headers: str, body: str = "hello") -> bytes:
    return (headers.replace("\n", "\r\n") + "\r\n" + body).encode()


GOOD = (
    f"From: Alice <a@x.test>\nTo: b@y.test\nDate: {email.utils.formatdate()}\nMessage-ID: <1@x>\n"
)


def test_clean_message_scores_zero() -> None:
    assert h.score_message(msg(GOOD), ["evil.example"]).total == 0


def test_missing_date_and_message_id() -> None:
    s = h.score_message(msg("From: a@x.test\nSubject: s\n"))
    assert s.total == h.MISSING_DATE + h.MISSING_MESSAGE_ID
    assert s.why == ["MISSING_DATE(1)", "MISSING_MESSAGE_ID(1)"]


def test_from_display_name_with_another_address() -> None:
    forged = GOOD.replace("Alice <a@x.test>", '"service@paypal.com" <a@x.test>')
    assert h.score_message(msg(forged)).why == ["FROM_NAME_ADDRESS(3)"]
    same = GOOD.replace("Alice <a@x.test>", '"a@x.test" <a@x.test>')
    assert h.score_message(msg(same)).total == 0


def test_reply_to_domain_mismatch() -> None:
    assert h.score_message(msg(GOOD + "Reply-To: c@other.example\n")).why == [
        "REPLY_TO_MISMATCH(1.5)"
    ]
    assert h.score_message(msg(GOOD + "Reply-To: c@x.test\n")).total == 0


def test_shortener_and_blocklist() -> None:
    body = "go https://bit.ly/abc and http://www.Evil.Example/x and https://t.co/1\n"
    s = h.score_message(msg(GOOD, body), ["evil.example", "https://ok.example/bad/"])
    assert s.why == ["URL_SHORTENER(2)", "BLOCKLISTED:evil.example(6)"]
    s = h.score_message(
        msg(GOOD, "https://ok.example/bad/1 https://ok.example/good"), ["https://ok.example/bad/"]
    )
    assert s.why == ["BLOCKLISTED:https://ok.example/bad/(6)"]
    sender = GOOD.replace("a@x.test", "a@mail.evil.example")
    assert h.score_message(msg(sender), ["*.evil.example"]).why == ["BLOCKLISTED:evil.example(6)"]
    assert h.score_message(msg(GOOD, "notevil.example.com"), ["evil.example"]).total == 0


def test_urls_in_encoded_parts_and_bad_mime() -> None:
    import base64

    b64 = base64.b64encode(b"click https://tinyurl.com/zz now").decode()
    mime = GOOD + 'MIME-Version: 1.0\nContent-Type: multipart/alternative; boundary="b"\n'
    body = f"--b\r\nContent-Type: text/html\r\nContent-Transfer-Encoding: base64\r\n\r\n{b64}\r\n--b--\r\n"
    assert h.score_message(msg(mime, body)).why == ["URL_SHORTENER(2)"]
    broken = GOOD + "Content-Type: text/plain; charset=no-such-charset\n"
    assert h.score_message(msg(broken, "https://bit.ly/a")).why == ["URL_SHORTENER(2)"]
    h.score_message(b"\x00\xff garbage without header end")  # never raises


# -- header removal -----------------------------------------------------------------------------


def test_remove_fields_with_folding_and_first_word() -> None:
    head = (
        b"Received: by us\r\n"
        b"Authentication-Results: mx.example.test; spf=pass\r\n"
        b"authentication-results: MX.example.test;\r\n\tdkim=pass\r\n"
        b"Authentication-Results: mx.example.test.evil; spf=pass\r\n"
        b"Authentication-Results: mx.example.test 1; none\r\n"
        b"X-Virus-Scanned: clamav\r\n"
        b"Subject: s\r\n"
    )
    removals = Verdict.remove_headers(
        ("Authentication-Results", "mx.example.test"), ("X-Virus-Scanned", "")
    ).removals
    assert remove_fields(head, removals) == (
        b"Received: by us\r\n"
        b"Authentication-Results: mx.example.test.evil; spf=pass\r\n"
        b"Subject: s\r\n"
    )
    edit = header_edit((("Authentication-Results", "mx.example.test; spf=fail"),), (), removals)
    assert edit is not None
    out = edit(head)
    assert out.startswith(b"Authentication-Results: mx.example.test; spf=fail\r\nReceived")
    assert header_edit((), (), ()) is None


def test_remove_headers_verdict_combines_and_validates() -> None:
    a = Verdict.remove_headers(("X-A", ""))
    b = Verdict.remove_headers(("x-a", ""), ("X-B", "id"))
    assert a.combine(b).removals == (("x-a", ""), ("x-b", "id"))
    for bad in [("", ""), ("X A", ""), ("X-A", "two words"), ("X-A", "a;b")]:
        with pytest.raises(ValueError):
            Verdict.remove_headers(bad)


# -- rspamd answers, queue IDs --------------------------------------------------------------------


def test_rspamd_result_parsing() -> None:
    gtube = b'{"score":0.0,"required_score":15.0,"action":"reject","symbols":{"GTUBE":{}}}'
    r = parse_result(gtube)
    assert (r.score, r.action, r.symbols) == (15.0, "reject", ["GTUBE"])
    r = parse_result(b'{"score":-0.1,"required_score":15,"action":"no action","symbols":{}}')
    assert r.score == -0.1
    for bad in (b"", b"[]", b'{"action":"x"}', b"<html>"):
        with pytest.raises(RspamdError):
            parse_result(bad)
    assert parse_address("127.0.0.1:11333") == ("127.0.0.1", 11333)
    assert parse_address("[::1]:1") == ("::1", 1)
    for bad in ("127.0.0.1", "::1:5", "h:0", "h:x"):
        with pytest.raises(ValueError):
            parse_address(bad)


def test_queue_ids_in_received_fields() -> None:
    data = (
        b"Received: from c ([127.0.0.1])\r\n\tby mx.example.test (mailgw) with ESMTPSA id"
        b" ABC123\r\n\tfor <b@y>; Sun, 6 Dec 2026\r\nReceived: by x with SMTP id Q2\r\n"
        b"Subject: id NOTME\r\n\r\nReceived: by body id BODY\r\n"
    )
    assert queue_ids_in(data) == ["ABC123", "Q2"]
