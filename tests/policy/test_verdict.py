"""The Verdict value: constructors, and the combining rules of its module docstring."""

from __future__ import annotations

import dataclasses

import pytest

from mailgw.model.reply import R
from mailgw.model.verdict import ACCEPT, Disposition, Verdict, combine

REJECT = Verdict.reject(R.UNKNOWN_USER)
TEMPFAIL = Verdict.tempfail(R.RATE_LIMITED)


def test_constructors() -> None:
    assert Verdict.accept() is ACCEPT and ACCEPT.disposition is Disposition.ACCEPT
    assert REJECT.disposition is Disposition.REJECT and REJECT.reply is R.UNKNOWN_USER
    assert TEMPFAIL.disposition is Disposition.TEMPFAIL and TEMPFAIL.reply is R.RATE_LIMITED
    assert Verdict.refuse(R.RATE_LIMITED) == TEMPFAIL
    assert Verdict.refuse(R.UNKNOWN_USER) == REJECT
    q = Verdict.quarantine("virus")
    assert q.is_quarantined and not q.is_final and q.reason == "virus"
    assert Verdict.add_headers(("X-A", "1"), ("X-B", "2")).headers == (("X-A", "1"), ("X-B", "2"))
    assert Verdict.set_class("spam").message_class == "spam"
    assert Verdict.reroute("sdn").channel == "sdn"
    assert REJECT.is_final and TEMPFAIL.is_final and not ACCEPT.is_final


@pytest.mark.parametrize(
    "make",
    [
        lambda: Verdict.reject(R.RATE_LIMITED),  # a 4xx is not a rejection
        lambda: Verdict.reject(R.OK),
        lambda: Verdict.tempfail(R.UNKNOWN_USER),
        lambda: Verdict.refuse(R.OK),
        lambda: Verdict.quarantine(""),
        lambda: Verdict.set_class(""),
        lambda: Verdict.reroute(""),
        lambda: Verdict.add_headers(("X Bad", "v")),
        lambda: Verdict.add_headers(("X-Bad:", "v")),
        lambda: Verdict.add_headers(("", "v")),
        lambda: Verdict.add_headers(("X-Ünicode", "v")),
        lambda: Verdict.add_headers(("X-Inject", "v\r\nBcc: evil@x")),
        lambda: Verdict.add_headers(("X-Inject", "v\nx")),
    ],
)
def test_invalid_verdicts_are_refused(make: object) -> None:
    with pytest.raises(ValueError):
        make()  # type: ignore[operator]


def test_verdicts_are_immutable() -> None:
    with pytest.raises(dataclasses.FrozenInstanceError):
        REJECT.reply = R.OK  # type: ignore[misc]


def test_the_first_final_verdict_wins_whole() -> None:
    tagged = Verdict.add_headers(("X-Tag", "1")).combine(Verdict.set_class("spam"))
    assert tagged.combine(REJECT) == REJECT  # annotations are dropped with a refusal
    assert REJECT.combine(TEMPFAIL) == REJECT
    assert TEMPFAIL.combine(REJECT) == TEMPFAIL
    assert REJECT.combine(Verdict.add_headers(("X-Late", "1"))) == REJECT
    assert Verdict.quarantine("virus").combine(REJECT) == REJECT  # refusal beats quarantine


def test_quarantine_keeps_the_first_reason_and_the_annotations() -> None:
    v = combine(
        [
            Verdict.add_headers(("X-A", "1")),
            Verdict.quarantine("first"),
            Verdict.quarantine("second"),
            Verdict.set_class("spam"),
        ]
    )
    assert v.disposition is Disposition.QUARANTINE and v.reason == "first"
    assert v.headers == (("X-A", "1"),) and v.message_class == "spam"
    assert not v.is_final


def test_headers_accumulate_class_and_channel_last_wins() -> None:
    v = combine(
        [
            Verdict.add_headers(("X-A", "1")),
            Verdict.set_class("bulk"),
            Verdict.reroute("domestic"),
            Verdict.add_headers(("X-B", "2"), ("X-C", "3")),
            Verdict.set_class("spam"),
            Verdict.reroute("spam-channel"),
        ]
    )
    assert v.disposition is Disposition.ACCEPT
    assert v.headers == (("X-A", "1"), ("X-B", "2"), ("X-C", "3"))
    assert v.message_class == "spam" and v.channel == "spam-channel"
    assert v.header_bytes() == b"X-A: 1\r\nX-B: 2\r\nX-C: 3\r\n"
    # a later verdict without a class keeps the earlier one
    assert Verdict.set_class("spam").combine(Verdict.reroute("x")).message_class == "spam"


@pytest.mark.parametrize(
    "v",
    [
        REJECT,
        TEMPFAIL,
        Verdict.quarantine("q"),
        Verdict.add_headers(("X-A", "1")),
        Verdict.set_class("spam"),
        Verdict.reroute("sdn"),
    ],
)
def test_accept_is_neutral(v: Verdict) -> None:
    assert ACCEPT.combine(v) == v
    assert v.combine(ACCEPT) == v
    assert combine([ACCEPT, v, ACCEPT]) == v


def test_combine_stops_at_the_first_final_verdict() -> None:
    seen: list[Verdict] = []

    def verdicts() -> object:
        for v in (Verdict.set_class("spam"), TEMPFAIL, REJECT):
            seen.append(v)
            yield v

    assert combine(verdicts()) == TEMPFAIL  # type: ignore[arg-type]
    assert REJECT not in seen
    assert combine([]) == ACCEPT


def test_header_bytes_are_utf8() -> None:
    v = Verdict.add_headers(("X-Note", "café"))
    assert v.header_bytes() == "X-Note: café\r\n".encode()


def test_the_policy_actions_of_the_rules() -> None:
    assert Verdict.file_into("Junk").folder == "Junk"
    assert Verdict.tag_subject("[SPAM]").subject_tags == ("[SPAM]",)
    assert Verdict.add_bcc("a@x.test").bcc == ("a@x.test",)
    assert Verdict.redirect_to("b@x.test", "c@x.test").redirect == ("b@x.test", "c@x.test")
    assert Verdict.quarantine("r", "rule1").rule == "rule1"
    for make in (
        lambda: Verdict.file_into(""),
        lambda: Verdict.file_into("a\nb"),
        lambda: Verdict.tag_subject(" "),
        lambda: Verdict.tag_subject("[a]\r\nBcc: x"),
        lambda: Verdict.add_bcc(),
        lambda: Verdict.add_bcc("no-at-sign"),
        lambda: Verdict.redirect_to("a@b> , <c@d"),
    ):
        with pytest.raises(ValueError):
            make()


def test_combining_the_new_annotations() -> None:
    v = combine(
        [
            Verdict.file_into("Junk"),
            Verdict.tag_subject("[A]"),
            Verdict.add_bcc("x@t.test"),
            Verdict.quarantine("first", "r1"),
            Verdict.tag_subject("[A]"),
            Verdict.tag_subject("[B]"),
            Verdict.add_bcc("x@t.test", "y@t.test"),
            Verdict.redirect_to("r@t.test"),
            Verdict.quarantine("second", "r2"),
            Verdict.file_into("Spam"),
        ]
    )
    assert v.is_quarantined and (v.reason, v.rule) == ("first", "r1")
    assert v.folder == "Spam" and v.subject_tags == ("[A]", "[B]")
    assert v.bcc == ("x@t.test", "y@t.test") and v.redirect == ("r@t.test",)
    assert v.combine(REJECT) == REJECT
