"""CONDSTORE corner cases (RFC 7162): the first CONDSTORE enabling command issued in the
selected state reports HIGHESTMODSEQ and turns MODSEQ on in later untagged FETCH
responses; ESEARCH's MODSEQ is the highest of the messages returned."""

from __future__ import annotations

import re

from tests.imap.imap_env import Client, Env

ALICE = "alice@example.test"


def _selected(env: Env, count: int) -> Client:
    for n in range(count):
        env.deliver(b"Subject: %d\r\n\r\nbody %d\r\n" % (n, n))
    c = env.connect(login=ALICE)
    c.cmd("SELECT INBOX")
    return c


def _modseq(out: bytes, seq: int) -> int:
    m = re.search(rb"\* %d FETCH \(.*MODSEQ \((\d+)\)" % seq, out)
    assert m, out
    return int(m.group(1))


def test_fetch_modseq_enables_condstore_and_reports_highestmodseq_once(env: Env) -> None:
    c = _selected(env, 2)
    out = c.cmd("FETCH 1 MODSEQ")
    assert re.search(rb"\* OK \[HIGHESTMODSEQ \d+\]", out), out
    assert b"* 1 FETCH (MODSEQ (" in out
    # Only the first enabling command says it.
    assert b"HIGHESTMODSEQ" not in c.cmd("FETCH 2 MODSEQ")
    # From now on a STORE's untagged FETCH carries UID and MODSEQ (RFC 7162 3.1).
    out = c.cmd("STORE 1 +FLAGS (\\Seen)")
    assert re.search(rb"\* 1 FETCH \(FLAGS \(\\Seen[^)]*\) UID 1 MODSEQ \(\d+\)\)", out), out


def test_search_and_store_unchangedsince_are_enabling_commands(env: Env) -> None:
    c = _selected(env, 1)
    assert b"* OK [HIGHESTMODSEQ" in c.cmd("SEARCH MODSEQ 1")
    c2 = env.connect(login=ALICE)
    c2.cmd("SELECT INBOX")
    out = c2.cmd("STORE 1 (UNCHANGEDSINCE 100) +FLAGS (\\Flagged)")
    assert b"* OK [HIGHESTMODSEQ" in out
    assert re.search(rb"\* 1 FETCH \(.*MODSEQ \(\d+\)", out), out
    # SELECT (CONDSTORE) already reported it: no second untagged OK.
    c3 = env.connect(login=ALICE)
    c3.cmd("SELECT INBOX (CONDSTORE)")
    assert b"HIGHESTMODSEQ" not in c3.cmd("FETCH 1 MODSEQ")


def test_esearch_modseq_is_that_of_the_messages_returned(env: Env) -> None:
    c = _selected(env, 3)
    c.cmd("FETCH 1 MODSEQ")
    m1 = _modseq(c.cmd("STORE 1 +FLAGS (\\Seen)"), 1)
    m3 = _modseq(c.cmd("STORE 3 +FLAGS (\\Seen)"), 3)
    m2 = _modseq(c.cmd("STORE 2 +FLAGS (\\Seen)"), 2)
    assert m1 < m3 < m2
    out = c.cmd("SEARCH RETURN (MIN) MODSEQ 1")
    assert b"MIN 1 MODSEQ %d\r\n" % m1 in out, out
    out = c.cmd("SEARCH RETURN (MAX) MODSEQ 1")
    assert b"MAX 3 MODSEQ %d\r\n" % m3 in out, out
    out = c.cmd("SEARCH RETURN (MIN MAX) 1:3 MODSEQ 1")
    assert b"MIN 1 MAX 3 MODSEQ %d\r\n" % m3 in out, out
    # ALL and COUNT cover every match: the highest of all.
    assert b"ALL 1:3 MODSEQ %d\r\n" % m2 in c.cmd("SEARCH RETURN (ALL) MODSEQ 1")
    assert b"COUNT 3 MODSEQ %d\r\n" % m2 in c.cmd("SEARCH RETURN (MIN COUNT) MODSEQ 1")
    # No match, no MODSEQ.
    out = c.cmd(f"SEARCH RETURN (MIN) MODSEQ {m2 + 1}")
    assert b"MODSEQ" not in out.split(b"\r\n")[0], out


def test_status_highestmodseq_is_an_enabling_command(env: Env) -> None:
    c = _selected(env, 1)
    out = c.cmd("STATUS INBOX (HIGHESTMODSEQ)")
    assert re.search(rb"\* OK \[HIGHESTMODSEQ \d+\]", out), out
    out = c.cmd("STORE 1 +FLAGS (\\Seen)")
    assert re.search(rb"\* 1 FETCH \(FLAGS \(\\Seen[^)]*\) UID 1 MODSEQ \(\d+\)\)", out), out
