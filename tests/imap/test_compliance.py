"""Protocol corner cases found by running a strict third-party compliance suite: ENVELOPE
source routes, SENT* dates in the message's own zone, INTERNALDATE in the zone it was
appended with, FROM/TO/CC/BCC on the envelope form, LSUB placeholders and LIST-EXTENDED
SUBSCRIBED/RECURSIVEMATCH (RFC 3501, RFC 5258)."""

from __future__ import annotations

import re

from mailgw.imap.fetch import internaldate
from tests.imap.imap_env import Client, Env

ALICE = "alice@example.test"


def _selected(env: Env, *messages: str) -> Client:
    for text in messages:
        env.deliver(text.replace("\n", "\r\n").encode())
    c = env.connect(login=ALICE)
    c.cmd("SELECT INBOX")
    return c


def _search(c: Client, criteria: str) -> list[int]:
    out = c.cmd(f"SEARCH {criteria}")
    m = re.search(rb"\* SEARCH([ 0-9]*)\r\n", out)
    assert m, out
    return [int(n) for n in m.group(1).split()]


def _listed(out: bytes) -> dict[str, bytes]:
    """Mailbox name -> the rest of its LIST/LSUB line (attributes and extended data)."""
    found = {}
    for line in out.split(b"\r\n"):
        m = re.match(rb'\* (?:LIST|LSUB) (\(.*?\)) "/" (\S+)(.*)', line)
        if m:
            found[m.group(2).decode().strip('"')] = m.group(1) + m.group(3)
    return found


def test_envelope_keeps_the_obsolete_source_route(env: Env) -> None:
    c = _selected(env, "Date: Sat, 01 Feb 2007 01:02:03 +0200\nFrom: <@route:user@domain>\n\nx\n")
    out = c.cmd("FETCH 1 ENVELOPE")
    # RFC 3501 7.4.2: the second address field is the at-domain-list (route) of a route-addr.
    assert b'((NIL "@route" "user" "domain")) ((NIL "@route" "user" "domain"))' in out, out


def test_sent_dates_use_the_date_as_written_not_utc(env: Env) -> None:
    c = _selected(
        env,
        "Date: Sat, 24 Mar 2007 23:00:00 +0200\n\n1\n",
        "Date: Sun, 25 Mar 2007 00:30:00 +0200\n\n2\n",  # 24 March in UTC
        "Date: Sun, 25 Mar 2007 23:30:00 -0500\n\n3\n",  # 26 March in UTC
        "Date: Mon, 26 Mar 2007 00:00:00 +0300\n\n4\n",
        "Subject: no date\n\n5\n",
    )
    # RFC 3501 6.4.4: SENTBEFORE/SENTON/SENTSINCE disregard time and timezone.
    assert _search(c, "SENTON 24-Mar-2007") == [1]
    assert _search(c, "SENTON 25-Mar-2007") == [2, 3]
    assert _search(c, "SENTBEFORE 25-Mar-2007") == [1]
    assert _search(c, "SENTBEFORE 26-Mar-2007") == [1, 2, 3]
    assert _search(c, "SENTSINCE 26-Mar-2007") == [4]
    assert _search(c, "NOT SENTSINCE 01-Jan-1990") == [5]


def test_address_keys_match_the_envelope_form(env: Env) -> None:
    c = _selected(
        env,
        "From: <user-from (comment)@ (comment) domain.org>\nTo: x@y\n\n1\n",
        "From: RealFrom <user-from@domain.org>\n\n2\n",
        "From: other@domain.org\nTo: group: g1@d1.org, g2@d2.org;\n\n3\n",
        "Subject: from user-from@domain.org\n\n4\n",
    )
    assert _search(c, "FROM user-from@domain.org") == [1, 2]
    assert _search(c, "FROM realfrom") == [2]
    assert _search(c, "TO g2@d2.org") == [3]
    assert _search(c, "TO group") == [3]
    assert _search(c, "CC nobody") == []
    # HEADER is a plain substring search of the field text, not of the parsed addresses.
    assert _search(c, 'HEADER From "user-from@domain.org"') == [2]
    assert _search(c, "SUBJECT user-from@domain.org") == [4]


def _tree(env: Env, c: Client, create: list[str], unsubscribe: list[str]) -> None:
    for name in create:  # CREATE does not subscribe: a client subscribes what it creates
        assert b"OK" in c.cmd(f"CREATE {name}").splitlines()[-1]
        assert b"OK" in c.cmd(f"SUBSCRIBE {name}").splitlines()[-1]
    for name in unsubscribe:
        c.cmd(f"UNSUBSCRIBE {name}")


def test_lsub_percent_shows_unsubscribed_parents_as_noselect(env: Env) -> None:
    c = env.connect(login=ALICE)
    _tree(env, c, ["box/a/child", "box/b", "box/c"], ["box/a", "box/a/child", "box/c"])
    c.cmd("SUBSCRIBE box/a/child")
    listed = _listed(c.cmd('LSUB "" box/%'))
    assert listed == {"box/a": b"(\\Noselect)", "box/b": b"()"}, listed
    # With * the subscribed child is itself listed, so no placeholder for its parent.
    listed = _listed(c.cmd('LSUB "" box/*'))
    assert listed == {"box/a/child": b"()", "box/b": b"()"}, listed


def test_subscribed_names_of_deleted_mailboxes_stay_listed(env: Env) -> None:
    c = env.connect(login=ALICE)
    _tree(env, c, ["gone", "kept"], [])
    c.cmd("SUBSCRIBE gone")
    assert b"OK" in c.cmd("DELETE gone").splitlines()[-1]
    assert "gone" in _listed(c.cmd('LSUB "" *'))  # RFC 3501 6.3.9
    listed = _listed(c.cmd('LIST (SUBSCRIBED) "" *'))
    assert listed["gone"] == b"(\\NonExistent \\HasNoChildren \\Subscribed)", listed
    assert listed["kept"] == b"(\\HasNoChildren \\Subscribed)"
    # A plain LIST only shows mailboxes that exist.
    assert "gone" not in _listed(c.cmd('LIST "" *'))


def test_list_recursivematch_reports_childinfo(env: Env) -> None:
    c = env.connect(login=ALICE)
    _tree(env, c, ["t8/t8", "t8/t9", "t7/t7", "t2/t1"], ["t8", "t7", "t2"])
    out = c.cmd('LIST (SUBSCRIBED RECURSIVEMATCH) "" *t8')
    listed = _listed(out)
    # t8 exists only as the parent of t8/t8 and t8/t9 (CREATE makes no intermediate level).
    assert listed["t8"] == b'(\\NonExistent \\HasChildren) ("CHILDINFO" ("SUBSCRIBED"))', out
    assert listed["t8/t8"] == b"(\\HasNoChildren \\Subscribed)"
    # Every subscribed child of t7 matches the pattern itself: no CHILDINFO entry for t7.
    assert set(_listed(c.cmd('LIST (SUBSCRIBED RECURSIVEMATCH) "" *t7'))) == {"t7/t7"}
    assert _listed(c.cmd('LIST (SUBSCRIBED RECURSIVEMATCH) "" t2 RETURN (CHILDREN)')) == {
        "t2": b'(\\NonExistent \\HasChildren) ("CHILDINFO" ("SUBSCRIBED"))'
    }
    # Without RECURSIVEMATCH an unsubscribed parent is not returned at all.
    assert _listed(c.cmd('LIST (SUBSCRIBED) "" t2')) == {}


def test_extended_list_shows_hierarchy_levels_as_noselect(env: Env) -> None:
    c = env.connect(login=ALICE)
    _tree(env, c, ["p/q"], [])
    listed = _listed(c.cmd('LIST "" (p p/q)'))
    assert listed == {"p": b"(\\Noselect \\HasChildren)", "p/q": b"(\\HasNoChildren)"}, listed


def test_internaldate_keeps_the_appended_zone(env: Env) -> None:
    c = env.connect(login=ALICE)
    for n, when in enumerate(
        (
            "01-Jan-2020 23:30:00 -0500",  # 2 January 04:30 UTC
            "02-Jan-2020 00:30:00 +0200",  # 1 January 22:30 UTC
            "02-Jan-2020 12:00:00 +0000",
            " 3-Jan-2020 00:15:00 +0545",  # 2 January 18:30 UTC
        ),
        start=1,
    ):
        data = b"Subject: %d\r\n\r\nx\r\n" % n
        out = c.send(b'a%d APPEND INBOX "%s" {%d+}\r\n' % (n, when.encode(), len(data)) + data)
        out += c.send(b"\r\n")
        assert b"OK [APPENDUID" in out, out
    c.cmd("SELECT INBOX")
    out = c.cmd("FETCH 1:4 INTERNALDATE")
    assert b'* 1 FETCH (INTERNALDATE "01-Jan-2020 23:30:00 -0500")' in out, out
    assert b'* 2 FETCH (INTERNALDATE "02-Jan-2020 00:30:00 +0200")' in out, out
    assert b'* 3 FETCH (INTERNALDATE "02-Jan-2020 12:00:00 +0000")' in out, out
    assert b'* 4 FETCH (INTERNALDATE "03-Jan-2020 00:15:00 +0545")' in out, out
    # RFC 3501 6.4.4: BEFORE/ON/SINCE take the date as it is in the message's own zone.
    assert _search(c, "ON 1-Jan-2020") == [1]
    assert _search(c, "ON 2-Jan-2020") == [2, 3]
    assert _search(c, "ON 3-Jan-2020") == [4]
    assert _search(c, "BEFORE 2-Jan-2020") == [1]
    assert _search(c, "SINCE 2-Jan-2020") == [2, 3, 4]
    assert _search(c, "SINCE 3-Jan-2020") == [4]
    # SORT ARRIVAL compares the instants (2 is 1 January 22:30 UTC), not the local times.
    out = c.cmd("SORT (ARRIVAL) UTF-8 ALL")
    assert b"* SORT 2 1 3 4\r\n" in out, out


def test_internaldate_format_in_a_zone() -> None:
    ts = 1_577_939_400.0  # 2020-01-02 04:30:00 UTC
    assert internaldate(ts) == b'"02-Jan-2020 04:30:00 +0000"'
    assert internaldate(ts, -210) == b'"02-Jan-2020 01:00:00 -0330"'
    assert internaldate(ts, -300) == b'"01-Jan-2020 23:30:00 -0500"'
    assert internaldate(ts, 840) == b'"02-Jan-2020 18:30:00 +1400"'
