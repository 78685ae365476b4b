"""SORT / THREAD building blocks (RFC 5256, RFC 5957): base subjects, the unicode-casemap
collation, sort keys and both threading algorithms, on parsed messages."""

from __future__ import annotations

import pytest

from mailgw.imap.sortthread import (
    SortMessage,
    ThreadNode,
    base_subject,
    casemap,
    format_threads,
    sort_messages,
    thread_orderedsubject,
    thread_references,
)
from mailgw.mime import parse


def msg(seq: int, headers: str = "", size: int = 100, arrival: float = 0.0) -> SortMessage:
    raw = headers.replace("\n", "\r\n").encode() + b"\r\nbody\r\n"
    return SortMessage(seq, seq, size, arrival or float(seq), parse(raw))


@pytest.mark.parametrize(
    ("subject", "base", "reply"),
    [
        ("hello", "hello", False),
        ("Re: hello", "hello", True),
        ("RE:re: Fwd:  hello  ", "hello", True),
        ("Fw: hello", "hello", True),
        ("re [list]: hello", "hello", True),
        ("[list] Re: hello", "hello", True),
        ("[list] hello", "hello", False),
        ("[list][other]  hello", "hello", False),
        ("[blob]", "[blob]", False),
        ("Re: [blob]", "[blob]", True),
        ("hello (fwd)", "hello", True),
        ("hello (FWD) (fwd)  ", "hello", True),
        ("[Fwd: Re: hello]", "hello", True),
        ("[fwd: [fwd: hello (fwd)]]", "hello", True),
        ("hello\tworld\r\n  again", "hello world again", False),
        ("Re:", "", True),
        ("", "", False),
        ("Reply: x", "Reply: x", False),
    ],
)
def test_base_subject(subject: str, base: str, reply: bool) -> None:
    assert base_subject(subject) == (base, reply)


def test_casemap_collation() -> None:
    assert casemap("hello") == casemap("HELLO") == casemap("Hello")
    assert casemap("Éclair") == casemap("éclair")
    assert casemap("ﬁ") == casemap("FI")  # compatibility decomposition
    assert casemap("ß") == "ß"  # no single-character titlecase: kept
    assert casemap("a") < casemap("B") < casemap("c")


def test_sort_keys_and_tie_break() -> None:
    a = msg(1, "Subject: Re: beta\nFrom: Zed <zed@x.test>\nDate: 2 Jan 2024 10:00:00 +0000\n"
               "To: bob@x.test\nCc: Carl <carl@x.test>\n", size=300, arrival=30)  # fmt: skip
    b = msg(2, "Subject: alpha\nFrom: anna@x.test\nDate: 1 Jan 2024 23:00:00 -0300\n"
               "To: =?utf-8?q?=C3=81lvaro?= <zz@x.test>\n", size=100, arrival=10)  # fmt: skip
    c = msg(3, "Subject: [list] BETA\nFrom: Bob <bob@x.test>\nDate: garbage\n", 200, arrival=20)
    d = msg(4, "Subject: alpha\n", size=100, arrival=40)
    every = [d, c, b, a]

    def order(*criteria: tuple[str, bool]) -> list[int]:
        return [m.seq for m in sort_messages(every, criteria)]

    assert order(("ARRIVAL", False)) == [2, 3, 1, 4]
    assert order(("SIZE", False)) == [2, 4, 3, 1]  # 2 and 4 tie: mailbox order
    assert order(("SIZE", True)) == [1, 3, 2, 4]  # REVERSE keeps ties in mailbox order
    # DATE in UTC: b is 2 Jan 02:00 UTC; c's Date is invalid so its arrival (20) counts
    assert order(("DATE", False)) == [3, 4, 2, 1]
    assert order(("SUBJECT", False), ("SIZE", True)) == [2, 4, 1, 3]
    assert order(("FROM", False)) == [4, 2, 3, 1]  # "", anna, bob, zed
    assert order(("TO", False)) == [3, 4, 1, 2]  # "", "", bob, zz
    assert order(("CC", True)) == [1, 2, 3, 4]
    assert order(("DISPLAYFROM", False)) == [4, 2, 3, 1]  # "", anna@x.test, Bob, Zed
    assert order(("DISPLAYTO", False)) == [3, 4, 2, 1]  # "", "", Álvaro, bob@x.test
    with pytest.raises(ValueError):
        order(("COLOR", False))


def _threads(nodes: list[ThreadNode]) -> str:
    return format_threads(nodes).decode()


def test_orderedsubject() -> None:
    messages = [
        msg(1, "Subject: b\nDate: 3 Jan 2024 00:00 +0000\n"),
        msg(2, "Subject: a\nDate: 2 Jan 2024 00:00 +0000\n"),
        msg(3, "Subject: Re: b\nDate: 1 Jan 2024 00:00 +0000\n"),
        msg(4, "Subject: Re: a\nDate: 5 Jan 2024 00:00 +0000\n"),
        msg(5, "Subject: RE: a\nDate: 4 Jan 2024 00:00 +0000\n"),
        msg(6, "Subject: c\nDate: 6 Jan 2024 00:00 +0000\n"),
        msg(7, "Subject: [x] c\nDate: 7 Jan 2024 00:00 +0000\n"),
    ]
    assert _threads(thread_orderedsubject(messages)) == "(3 1)(2 (5)(4))(6 7)"
    assert _threads(thread_orderedsubject([])) == ""


def _ref(
    seq: int, mid: str | None, refs: str = "", date: int = 0, subject: str = "s"
) -> SortMessage:
    headers = f"Subject: {subject}\nDate: {date or seq} Jan 2024 00:00:00 +0000\n"
    if mid is not None:
        headers += f"Message-ID: <{mid}>\n"
    if refs:
        headers += f"References: {refs}\n"
    return msg(seq, headers)


def test_references_links_and_dummies() -> None:
    messages = [
        _ref(1, "a@x", subject="one"),
        _ref(2, "b@x", "<a@x>", subject="Re: one"),
        _ref(3, "c@x", "<a@x> <b@x>", subject="Re: one"),
        _ref(4, "d@x", "<a@x>", subject="Re: one"),
        # 5 and 6 reply to a message we do not have: a dummy parent with two children
        _ref(5, "e@x", "<missing@x>", subject="two"),
        _ref(6, "f@x", "<missing@x>", subject="Re: two"),
        # 7 replies to a missing message alone: the dummy is dropped, 7 is promoted
        _ref(7, "g@x", "<gone@x>", subject="three"),
    ]
    assert _threads(thread_references(messages)) == "(1 (2 3)(4))((5)(6))(7)"


def test_references_in_reply_to_duplicates_and_loops() -> None:
    m1 = msg(1, "Subject: p\nMessage-ID: <p@x>\nDate: 1 Jan 2024 00:00 +0000\n")
    m2 = msg(2, "Subject: q\nMessage-ID: <q@x>\nIn-Reply-To: <p@x> (comment) <zz@x>\n"
                "Date: 2 Jan 2024 00:00 +0000\n")  # fmt: skip
    # duplicate Message-ID: the later message gets a unique one
    m3 = msg(3, "Subject: r\nMessage-ID: <p@x>\nDate: 3 Jan 2024 00:00 +0000\n")
    # a loop: 4 refers to 5, 5 refers to 4
    m4 = msg(
        4, "Subject: t\nMessage-ID: <l1@x>\nReferences: <l2@x>\nDate: 4 Jan 2024 00:00 +0000\n"
    )
    m5 = msg(
        5, "Subject: u\nMessage-ID: <l2@x>\nReferences: <l1@x>\nDate: 5 Jan 2024 00:00 +0000\n"
    )
    # a message referring to itself, and one without a Message-ID
    m6 = msg(
        6, "Subject: v\nMessage-ID: <self@x>\nReferences: <self@x>\nDate: 6 Jan 2024 00:00 +0000\n"
    )
    m7 = msg(7, "Subject: w\nDate: 7 Jan 2024 00:00 +0000\n")
    out = _threads(thread_references([m1, m2, m3, m4, m5, m6, m7]))
    assert out == "(1 2)(3)(5 4)(6)(7)"


def test_references_subject_merging() -> None:
    messages = [
        _ref(1, "a@x", subject="topic", date=1),
        _ref(2, "b@x", subject="Re: topic", date=2),  # reply: child of the original
        _ref(3, "c@x", subject="other", date=3),
        _ref(4, "d@x", subject="other", date=4),  # neither is a reply: a new dummy
        _ref(5, "e@x", "<m1@x>", subject="third", date=5),
        _ref(6, "f@x", "<m1@x>", subject="Re: third", date=6),
        _ref(7, "g@x", subject="third", date=7),  # joins the dummy of 5 and 6
        _ref(8, "h@x", "<m2@x>", subject="Re: fourth", date=8),
        _ref(9, "i@x", "<m2@x>", subject="fourth", date=9),
        _ref(10, "j@x", "<m3@x>", subject="fourth", date=10),
        _ref(11, "k@x", "<m3@x>", subject="fourth", date=11),  # two dummies merge
        _ref(12, "l@x", subject="", date=12),  # empty subjects are not merged
        _ref(13, "m@x", subject="", date=13),
    ]
    out = _threads(thread_references(messages))
    assert out == "(1 2)((3)(4))((5)(6)(7))((8)(9)(10)(11))(12)(13)"


def test_references_reply_to_reply_does_not_merge_into_reply() -> None:
    messages = [
        _ref(1, "a@x", subject="Re: x", date=1),
        _ref(2, "b@x", subject="x", date=2),  # the original replaces the reply in the table
        _ref(3, "c@x", subject="Re: x", date=3),
    ]
    assert _threads(thread_references(messages)) == "(2 (1)(3))"


def test_deep_chain_needs_no_recursion() -> None:
    n = 3000
    messages = [_ref(1, "m1@x", subject="deep")]
    for i in range(2, n + 1):
        messages.append(_ref(i, f"m{i}@x", f"<m{i - 1}@x>", date=1, subject="Re: deep"))
    out = _threads(thread_references(messages))
    assert out == "(" + " ".join(str(i) for i in range(1, n + 1)) + ")"


def test_first_message_of_empty_dummy() -> None:
    assert ThreadNode().first_message() is None


def test_references_reparenting_and_nested_dummies() -> None:
    messages = [
        # 1 is a reply to <m2@x>, which 1 says is a reply to <q@x>; 2 then arrives without
        # references: its link to <q@x> breaks and that dummy is left childless (dropped)
        _ref(1, "m1@x", "<q@x> <m2@x>", subject="one"),
        _ref(2, "m2@x", subject="two"),
        # two missing ancestors in a row: the nested dummy and then the top one go away
        _ref(3, "m3@x", "<gone1@x> <gone2@x>", subject="three"),
        # <m4@x> first hangs below 2 (from 4's References), then its own References move it
        _ref(4, "m5@x", "<m2@x> <m4@x>", subject="five"),
        _ref(5, "m4@x", "<m3@x>", subject="Re: three"),
    ]
    assert _threads(thread_references(messages)) == "(2 1)(3 5 4)"
