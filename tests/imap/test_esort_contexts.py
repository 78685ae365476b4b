"""ESORT and CONTEXT=SEARCH / CONTEXT=SORT (RFC 5267): RETURN options of SORT, PARTIAL
windows, live contexts (UPDATE, ADDTO / REMOVEFROM, CANCELUPDATE, NOUPDATE)."""

from __future__ import annotations

import re

import pytest

from mailgw.imap.contexts import MAX_CONTEXTS, SearchContext, esearch_line, update_lines
from mailgw.imap.parser import All
from tests.imap.imap_env import Client, Env

ALICE = "alice@example.test"


def _deliver(env: Env, subject: str, size: int = 0, flags: tuple[str, ...] = ()) -> int:
    return env.deliver(f"Subject: {subject}\r\n\r\n{'x' * size}\r\n".encode(), flags=flags)


def _selected(env: Env) -> Client:
    c = env.connect(login=ALICE)
    c.cmd("SELECT INBOX")
    return c


@pytest.fixture
def five(env: Env) -> Client:
    """INBOX with subjects delta alpha charlie bravo echo (sizes growing), selected."""
    for i, subject in enumerate(["delta", "alpha", "charlie", "bravo", "echo"]):
        _deliver(env, subject, i)
    return _selected(env)


def test_esort_return_options(five: Client) -> None:
    c = five
    assert c.cmd("SORT RETURN (MIN MAX COUNT ALL) (SUBJECT) UTF-8 ALL").startswith(
        b'* ESEARCH (TAG "a3") MIN 2 MAX 5 ALL 2,4,3,1,5 COUNT 5\r\n'
    )
    assert c.cmd("SORT RETURN () (SUBJECT) UTF-8 ALL").startswith(
        b'* ESEARCH (TAG "a4") ALL 2,4,3,1,5\r\n'
    )
    assert c.cmd("UID SORT RETURN (MIN MAX) (REVERSE SIZE) UTF-8 2:4").startswith(
        b'* ESEARCH (TAG "a5") UID MIN 3 MAX 2\r\n'  # sizes: 3 > 4 > 2
    )
    assert c.cmd("SORT RETURN (ALL) (ARRIVAL) UTF-8 ALL").startswith(
        b'* ESEARCH (TAG "a6") ALL 1:5\r\n'
    )
    assert c.cmd("SORT RETURN (COUNT MIN) (ARRIVAL) UTF-8 SUBJECT nothing").startswith(
        b'* ESEARCH (TAG "a7") COUNT 0\r\n'
    )
    # a plain SORT is unchanged
    assert c.cmd("SORT (SUBJECT) UTF-8 ALL").startswith(b"* SORT 2 4 3 1 5\r\n")


def test_esort_save_keeps_the_first_in_sort_order(five: Client) -> None:
    out = five.cmd("SORT RETURN (SAVE MIN) (SUBJECT) UTF-8 ALL")
    assert out.startswith(b'* ESEARCH (TAG "a3") MIN 2\r\n'), out
    assert five.cmd("FETCH $ UID").startswith(b"* 2 FETCH (UID 2)\r\n")
    assert five.cmd("SORT RETURN (SAVE) (REVERSE SUBJECT) UTF-8 ALL") == b"a5 OK SORT completed\r\n"
    assert five.cmd("SEARCH $").startswith(b"* SEARCH 1 2 3 4 5\r\n")


def test_esort_modseq(five: Client) -> None:
    out = five.cmd("SORT RETURN (MIN) (SUBJECT) UTF-8 MODSEQ 1")
    assert re.search(rb'\* ESEARCH \(TAG "a3"\) MIN 2 MODSEQ \d+\r\n', out), out


def test_partial_results(five: Client) -> None:
    c = five
    assert c.cmd("SORT RETURN (PARTIAL 2:3) (SUBJECT) UTF-8 ALL").startswith(
        b'* ESEARCH (TAG "a3") PARTIAL (2:3 4,3)\r\n'
    )
    assert c.cmd("SEARCH RETURN (PARTIAL 4:10 COUNT) ALL").startswith(
        b'* ESEARCH (TAG "a4") PARTIAL (4:10 4:5) COUNT 5\r\n'
    )
    assert c.cmd("UID SEARCH RETURN (PARTIAL 3:1) ALL").startswith(
        b'* ESEARCH (TAG "a5") UID PARTIAL (1:3 1:3)\r\n'
    )
    assert c.cmd("SEARCH RETURN (PARTIAL 6:9) ALL").startswith(
        b'* ESEARCH (TAG "a6") PARTIAL (6:9 NIL)\r\n'
    )
    for bad in ("PARTIAL 1:2 ALL", "PARTIAL 0:3", "PARTIAL -1:-2", "PARTIAL 5", "PARTIAL",
                "PARTIAL 1:2 PARTIAL 3:4", "PARTIAL 1:99999999999"):  # fmt: skip
        out = c.cmd(f"SEARCH RETURN ({bad}) ALL")
        assert re.match(rb"a\d+ BAD", out), (bad, out)
    # RETURN (CONTEXT) is a hint: ALL; RETURN (UPDATE) alone returns no data
    assert b'* ESEARCH (TAG "a14") ALL 1:5\r\n' in c.cmd("SEARCH RETURN (CONTEXT) ALL")
    assert c.cmd("SEARCH RETURN (UPDATE) ALL").startswith(b'* ESEARCH (TAG "a15")\r\n')


def test_search_context_updates(env: Env) -> None:
    for s in ("one", "two", "three", "four"):
        _deliver(env, s)
    a = _selected(env)
    b = _selected(env)
    assert a.cmd("SEARCH RETURN (UPDATE) UNSEEN").startswith(b'* ESEARCH (TAG "a3")\r\n')
    assert a.cmd("UID SEARCH RETURN (UPDATE COUNT) UNDELETED").startswith(
        b'* ESEARCH (TAG "a4") UID COUNT 4\r\n'
    )
    b.cmd("STORE 1 +FLAGS (\\Seen)")
    _deliver(env, "five")
    out = a.cmd("NOOP")
    assert b'* ESEARCH (TAG "a3") REMOVEFROM (0 1) ADDTO (0 5)\r\n' in out, out
    assert b'* ESEARCH (TAG "a4") UID ADDTO (0 5)\r\n' in out, out
    # nothing changed: nothing sent
    assert a.cmd("NOOP") == b"a6 OK NOOP completed\r\n"
    b.cmd("STORE 2 +FLAGS (\\Deleted)")
    b.cmd("EXPUNGE")
    out = a.cmd("NOOP")
    lines = out.split(b"\r\n")
    # the expunged message leaves the results before its EXPUNGE, numbered as it was
    assert lines.index(b'* ESEARCH (TAG "a3") REMOVEFROM (0 2)') < lines.index(b"* 2 EXPUNGE")
    assert b'* ESEARCH (TAG "a4") UID REMOVEFROM (0 2)' in lines
    # CANCELUPDATE stops them; an unknown tag is NO
    assert a.cmd('CANCELUPDATE "a3"') == b"a8 OK Updates cancelled\r\n"
    assert a.cmd('CANCELUPDATE "a3" "a4"') == b"a9 NO Unknown tag\r\n"
    _deliver(env, "six")
    assert b"ESEARCH" not in a.cmd("NOOP")


def test_sort_context_positions(env: Env) -> None:
    """CONTEXT=SORT: ADDTO / REMOVEFROM carry each message's position in the sorted result."""
    for s in ("b", "d", "f"):
        _deliver(env, s)
    a = _selected(env)
    out = a.cmd("SORT RETURN (UPDATE ALL) (SUBJECT) UTF-8 UNSEEN")
    assert out.startswith(b'* ESEARCH (TAG "a3") ALL 1:3\r\n')
    _deliver(env, "a")  # position 1
    _deliver(env, "e")  # position 4 (b d e f)
    out = a.cmd("NOOP")
    assert b'* ESEARCH (TAG "a3") ADDTO (1 4 4 5)\r\n' in out, out
    a.cmd("STORE 2 +FLAGS.SILENT (\\Seen)")  # d leaves: a b e f
    out = a.cmd("NOOP")
    assert b'* ESEARCH (TAG "a3") REMOVEFROM (3 2)\r\n' in out, out
    a.cmd("STORE 1,5 +FLAGS.SILENT (\\Deleted)")  # b (position 2) and e (position 3)
    out = a.cmd("EXPUNGE")
    assert b'* ESEARCH (TAG "a3") REMOVEFROM (3 5 2 1)\r\n' in out, out  # last first
    assert out.index(b"REMOVEFROM") < out.index(b"EXPUNGE\r\n")


def test_contexts_end_with_the_selection_and_are_limited(env: Env) -> None:
    _deliver(env, "one")
    a = _selected(env)
    for _ in range(MAX_CONTEXTS):
        a.cmd("SEARCH RETURN (UPDATE) ALL")
    out = a.cmd("SEARCH RETURN (UPDATE COUNT) ALL")
    assert b'* NO [NOUPDATE "a%d"] Too many search contexts\r\n' % (MAX_CONTEXTS + 3) in out
    assert b"COUNT 1" in out  # the search itself is answered
    a.cmd("SELECT INBOX")
    assert b"NO Unknown tag" in a.cmd('CANCELUPDATE "a3"')
    assert b"BAD" in a.cmd("CANCELUPDATE a3")  # tags are quoted strings


def test_context_helpers() -> None:
    assert esearch_line("t", False, ("ALL",), [3, 1, 2]) == b'* ESEARCH (TAG "t") ALL 3,1:2\r\n'
    assert esearch_line("t", True, ("PARTIAL",), [], partial=(1, 5)) == (
        b'* ESEARCH (TAG "t") UID PARTIAL (1:5 NIL)\r\n'
    )
    ctx = SearchContext("t", All(), True, (("SUBJECT", False),), [10, 20, 30])

    def same(n: int) -> int:
        return n

    first, then = update_lines(ctx, [5, 10, 30, 40], lambda u: u != 20, same, same)
    assert first == b'* ESEARCH (TAG "t") UID REMOVEFROM (2 20)\r\n'
    assert then == b'* ESEARCH (TAG "t") UID ADDTO (1 5 4 40)\r\n'
    assert ctx.uids == [5, 10, 30, 40]
    assert update_lines(ctx, [5, 10, 30, 40], lambda u: True, same, same) == (None, None)


def test_a_new_context_does_not_hide_changes_from_an_older_one(env: Env) -> None:
    _deliver(env, "one")
    a = _selected(env)
    a.cmd("SEARCH RETURN (UPDATE) ALL")  # a3
    _deliver(env, "two")
    # the session learns of the message during a FETCH, when no context update may be sent
    # (RFC 3501 7.4.1), then makes a second context: the first still has to hear of it
    out = a.cmd("FETCH 1 FLAGS")
    assert b"* 2 EXISTS" in out and b"ADDTO" not in out, out
    assert b"ADDTO" not in a.cmd("SEARCH RETURN (UPDATE) SUBJECT nothing")  # a5
    out = a.cmd("NOOP")
    assert b'* ESEARCH (TAG "a3") ADDTO (0 2)\r\n' in out, out
    assert b'TAG "a5"' not in out
