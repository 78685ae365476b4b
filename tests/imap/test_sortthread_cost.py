"""THREAD=REFERENCES on hostile input (issue 10) and SORT on group addresses (issue 9).

REFERENCES must stay near-linear in the message IDs it takes (a single References field of
100,000 IDs once took over a minute and froze every session of the IMAP worker), take at
most the last ``MAX_REFERENCES`` IDs of a message, keep RFC 5256's results (loops,
duplicate Message-IDs, dummies) and yield regularly so the session can run it in slices.
Costs are counted in steps (``Steps``), never timed.
"""

from __future__ import annotations

import random

from mailgw.imap import sortthread
from mailgw.imap.sortthread import (
    MAX_REFERENCES,
    SortMessage,
    Steps,
    ThreadNode,
    format_threads,
    run_steps,
    sort_messages,
    thread_references,
    thread_references_steps,
)
from mailgw.mime import parse


def msg(seq: int, headers: str, number: int | None = None) -> SortMessage:
    raw = headers.replace("\n", "\r\n").encode() + b"\r\nbody\r\n"
    return SortMessage(seq, number if number is not None else seq, 100, float(seq), parse(raw))


def dated(seq: int, minute: int, headers: str, number: int | None = None) -> SortMessage:
    return msg(seq, f"Date: Mon, 1 Jan 2024 10:{minute:02d}:00 +0000\n{headers}", number)


def threads(messages: list[SortMessage], **kw: int | None) -> str:
    return format_threads(thread_references(messages, **kw)).decode()  # type: ignore[arg-type]


def test_rfc5256_response_example() -> None:
    # RFC 5256 section 4: "* THREAD (2)(3 6 (4 23)(44 7 96))", built from the links it shows
    messages = [
        dated(1, 0, "Message-ID: <2@x>\nSubject: lonely", number=2),
        dated(2, 1, "Message-ID: <3@x>\nSubject: topic", number=3),
        dated(3, 2, "Message-ID: <6@x>\nReferences: <3@x>\nSubject: Re: topic", number=6),
        dated(4, 3, "Message-ID: <4@x>\nReferences: <3@x> <6@x>\nSubject: Re: topic", 4),
        dated(5, 4, "Message-ID: <23@x>\nReferences: <3@x> <6@x> <4@x>\nSubject: Re: x", 23),
        dated(6, 5, "Message-ID: <44@x>\nReferences: <3@x> <6@x>\nSubject: Re: topic", 44),
        dated(7, 6, "Message-ID: <7@x>\nReferences: <6@x> <44@x>\nSubject: Re: topic", 7),
        dated(8, 7, "Message-ID: <96@x>\nIn-Reply-To: <7@x>\nSubject: Re: topic", 96),
    ]
    assert threads(messages) == "(2)(3 6 (4 23)(44 7 96))"
    # the order of the messages in the mailbox does not change the threads
    assert threads(list(reversed(messages))) == "(2)(3 6 (4 23)(44 7 96))"


def test_loops_are_never_created() -> None:
    # mutual references: the first link (2 -> 1) stands, the second would close a loop
    mutual = [
        msg(1, "Message-ID: <a@x>\nReferences: <b@x>"),
        msg(2, "Message-ID: <b@x>\nReferences: <a@x>"),
    ]
    assert threads(mutual) == "(2 1)"
    # a message referencing itself, and a References field that goes round in a circle
    assert threads([msg(1, "Message-ID: <a@x>\nReferences: <a@x>")]) == "(1)"
    circle = msg(1, "Message-ID: <m@x>\nReferences: <a@x> <b@x> <c@x> <a@x> <b@x>")
    assert threads([circle]) == "(1)"  # a -> b -> c, c -> a refused; m under b
    # c's own message has no References: it leaves the parent the circle guessed for it
    assert threads([circle, msg(2, "Message-ID: <c@x>")]) == "(1)(2)"
    assert threads([circle, msg(2, "Message-ID: <b@x>\nReferences: <a@x>")]) == "(2 1)"
    # a long cycle through several messages
    ring = [msg(i + 1, f"Message-ID: <r{i}@x>\nReferences: <r{(i + 1) % 50}@x>") for i in range(50)]
    out = threads(ring)
    assert out.count("(") == out.count(")") and sorted(
        map(int, out.replace("(", " ").replace(")", " ").split())
    ) == list(range(1, 51))


def test_duplicate_message_ids() -> None:
    # the second message with an ID is threaded as if it had a unique one; replies attach
    # to the first
    messages = [
        msg(1, "Message-ID: <d@x>\nSubject: one"),
        msg(2, "Message-ID: <d@x>\nSubject: two"),
        msg(3, "Message-ID: <e@x>\nReferences: <d@x>\nSubject: three"),
    ]
    assert threads(messages) == "(1 3)(2)"


def test_only_the_last_references_are_taken() -> None:
    parent = msg(1, "Message-ID: <p@x>\nSubject: parent")
    refs = " ".join(["<p@x>"] + [f"<f{i}@x>" for i in range(MAX_REFERENCES)])
    child = msg(2, f"Message-ID: <c@x>\nSubject: child\nReferences: {refs}")
    # <p@x> is one beyond the last MAX_REFERENCES IDs: not taken
    assert threads([parent, child]) == "(1)(2)"
    assert threads([parent, child], max_references=None) == "(1 2)"
    shorter = " ".join(["<p@x>"] + [f"<f{i}@x>" for i in range(MAX_REFERENCES - 1)])
    child = msg(2, f"Message-ID: <c@x>\nSubject: child\nReferences: {shorter}")
    assert threads([parent, child]) == "(1 2)"


def _run(
    messages: list[SortMessage], max_references: int | None = MAX_REFERENCES
) -> tuple[str, Steps, int]:
    steps = Steps()
    gen = thread_references_steps(messages, max_references, steps)
    yields = 0
    while True:
        try:
            next(gen)
            yields += 1
        except StopIteration as done:
            return format_threads(done.value).decode(), steps, yields


def test_100k_references_cost_is_linear() -> None:
    n = 100_000
    refs = " ".join(f"<r{i}@x>" for i in range(n))
    big = msg(1, f"Message-ID: <big@x>\nSubject: s\nReferences: {refs}")
    out, steps, yields = _run([big], max_references=None)
    assert out == "(1)"
    # every ID: one container, one link attempt and a short root lookup, then prune and
    # sort each container once. The quadratic walk took n*n/2 = 5e9 steps.
    assert steps.count <= 10 * n, steps.count
    assert yields >= steps.count // (2 * steps.every)  # the session can interleave
    # with the default bound only the last MAX_REFERENCES count
    out, steps, _ = _run([big])
    assert out == "(1)"
    assert steps.count <= 10 * MAX_REFERENCES + 100, steps.count


def test_long_reply_chains_cost_is_linear() -> None:
    n = 5000
    chain = [
        msg(i + 1, f"Message-ID: <c{i}@x>" + (f"\nIn-Reply-To: <c{i - 1}@x>" if i else ""))
        for i in range(n)
    ]
    _out, steps, _ = _run(chain)
    assert steps.count <= 20 * n, steps.count
    # replies before the messages they answer (each message then leaves its guessed parent)
    _out, steps, _ = _run(list(reversed([msg(n - i, m_headers(i)) for i in range(n)])))
    assert steps.count <= 20 * n, steps.count
    # every message carrying the whole chain so far in References (a real long thread)
    full = [
        msg(
            i + 1,
            f"Message-ID: <t{i}@x>\nReferences: "
            + " ".join(f"<t{j}@x>" for j in range(max(0, i - 50), i)),
        )
        for i in range(2000)
    ]
    _out, steps, _ = _run(full)
    assert steps.count <= 20 * 2000 * 51, steps.count


def test_messages_leaving_guessed_parents_cost_n_log_n() -> None:
    # One message's References guesses a chain c0 -> c1 -> ... ; then each c_i arrives
    # naming the deepest one as its parent (a loop: refused), so it leaves its guessed parent
    # with the rest of the chain below it. Walking up to the root each time was n*n/2.
    n = 5000
    first = msg(1, "Message-ID: <z@x>\nReferences: " + " ".join(f"<c{i}@x>" for i in range(n)))
    rest = [msg(i + 1, f"Message-ID: <c{i}@x>\nReferences: <c{n - 1}@x>") for i in range(1, n)]
    out, steps, _ = _run([first, *rest], max_references=None)
    # each c_i leaves c_(i-1) and, its own reference looping, stays on top; the first
    # message ends below the last one, which it named last
    assert out == "".join(f"({i})" for i in range(2, n)) + f"({n} 1)"
    assert steps.count <= 40 * n, steps.count


def naive_threads(messages: list[SortMessage]) -> str:
    """RFC 5256 step 1 written as the RFC says (walking up for every loop check), then the
    module's own later steps: the reference the fast linking must agree with."""
    table: dict[str, ThreadNode] = {}

    def is_ancestor(node: ThreadNode, of: ThreadNode | None) -> bool:
        while of is not None:
            if of is node:
                return True
            of = of.parent
        return False

    def unlink(child: ThreadNode) -> None:
        if child.parent is not None:
            child.parent.children.remove(child)
            child.parent = None

    for m in sorted(messages, key=lambda m: m.seq):
        mid = m.message_id
        if mid is None or (mid in table and table[mid].message is not None):
            mid = f"unique {m.seq}"
        node = table.setdefault(mid, ThreadNode())
        node.message = m
        prev: ThreadNode | None = None
        for ref in m.references:
            ref_node = table.setdefault(ref, ThreadNode())
            if prev is not None and ref_node.parent is None and not is_ancestor(ref_node, prev):
                sortthread._link(prev, ref_node)
            prev = ref_node
        unlink(node)
        if prev is not None and not is_ancestor(node, prev):
            sortthread._link(prev, node)
    steps = Steps()
    roots = run_steps(sortthread._prune([n for n in table.values() if n.parent is None], steps))
    run_steps(sortthread._sort_siblings(roots, steps))
    return format_threads(run_steps(sortthread._merge_subjects(roots, steps))).decode()


def test_fast_linking_agrees_with_the_rfc_walk() -> None:
    rnd = random.Random(5256)
    for _ in range(400):
        ids = rnd.randint(3, 25)
        messages = []
        for seq in range(1, rnd.randint(2, 30)):
            headers = f"Subject: {rnd.choice(['a', 'Re: a', 'b', 'c'])}"
            headers += f"\nDate: Mon, 1 Jan 2024 10:{rnd.randint(0, 59):02d}:00 +0000"
            if rnd.random() < 0.95:
                headers += f"\nMessage-ID: <m{rnd.randint(1, ids)}@x>"
            refs = rnd.choice([0, 1, 1, 2, 3, 5, 8])
            if refs:
                headers += "\nReferences: " + " ".join(
                    f"<m{rnd.randint(1, ids)}@x>" for _ in range(refs)
                )
            messages.append(msg(seq, headers))
        assert threads(messages) == naive_threads(messages)


def m_headers(i: int) -> str:
    return f"Message-ID: <c{i}@x>" + (f"\nIn-Reply-To: <c{i - 1}@x>" if i else "")


def test_run_steps_matches_the_plain_call() -> None:
    messages = [msg(1, "Message-ID: <a@x>"), msg(2, "Message-ID: <b@x>\nReferences: <a@x>")]
    assert format_threads(run_steps(thread_references_steps(messages))) == b"(1 2)"


# -- SORT on addresses in group syntax (issue 9) ------------------------------------------------
# The To/Cc values below, one message each, in this mailbox order. The expected orders were
# read from Dovecot 2.3.19 (tests/integration/test_imap_sort_groups.py compares live): a
# field that starts with a group sorts on the group's name (quotes and comments removed,
# RFC 2047 words not decoded), for TO/CC and for DISPLAYTO alike.
GROUP_FIELDS = [
    "team: zz@x.org;",
    "mm@x.org",
    '"Display" <aa@x.org>',
    "empty:;",
    'grp: "Yy Name" <bb@x.org>, cc@x.org;',
    "ss@x.org, team2: dd@x.org;",
    "undisclosed-recipients:;, ee@x.org",
    '"Qq" <nn@x.org>',
    "Kappa: ;",
    'alpha: "Omega" <oo@x.org>;',
    '"Zeta" :  yy@x.org;',
    "=?utf-8?q?Beta?=: gg@x.org;",
    None,
    "!bang: a@b.org;",
    '"a b" c: d@e.org;',
    "(comment) cmt: r@s.org;",
    "=?utf-8?q?Zulu?= <zu@x.org>",
]
EXPECTED_TO = [13, 14, 12, 15, 3, 10, 16, 4, 5, 9, 2, 8, 6, 1, 7, 11, 17]
EXPECTED_DISPLAYTO = [13, 14, 12, 15, 10, 16, 3, 4, 5, 9, 2, 8, 6, 1, 7, 11, 17]


def group_message(seq: int, field: str | None, header: str = "To") -> bytes:
    line = f"{header}: {field}\r\n" if field is not None else ""
    return (
        f"From: f@x.org\r\nSubject: s{seq}\r\nDate: Mon, 1 Jan 2024 00:00:{seq:02d} +0000\r\n"
        f"{line}\r\nhi\r\n"
    ).encode()


def test_sort_to_cc_displayto_with_groups() -> None:
    for header, criterion, expected in (
        ("To", "TO", EXPECTED_TO),
        ("Cc", "CC", EXPECTED_TO),
        ("To", "DISPLAYTO", EXPECTED_DISPLAYTO),
    ):
        messages = [
            SortMessage(i, i, 10, 0.0, parse(group_message(i, f, header)))
            for i, f in enumerate(GROUP_FIELDS, 1)
        ]
        assert [m.number for m in sort_messages(messages, [(criterion, False)])] == expected
        reverse = [m.number for m in sort_messages(messages, [(criterion, True)])]
        assert reverse == list(reversed(expected))
