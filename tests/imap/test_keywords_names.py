"""Keyword announcements (RFC 3501 7.2.6), NIL as a flag, mailbox names that are not modified
UTF-7, and the advertised capabilities; behaviour checked against Dovecot side by side in
tests/integration/test_imap_dovecot_compare.py."""

from __future__ import annotations

import pytest

from tests.imap.imap_env import Client, Env

ALICE = "alice@example.test"
FLAGS_KW = b"* FLAGS (\\Answered \\Flagged \\Deleted \\Seen \\Draft newkw)\r\n"
PERMANENT_KW = (
    b"* OK [PERMANENTFLAGS (\\Answered \\Flagged \\Deleted \\Seen \\Draft newkw \\*)]"
    b" Flags permitted\r\n"
)


def _selected(env: Env, command: str = "SELECT INBOX") -> Client:
    c = env.connect(login=ALICE)
    c.cmd(command)
    return c


def _lines(out: bytes) -> list[bytes]:
    return [line + b"\r\n" for line in out.split(b"\r\n") if line]


def test_store_announces_a_new_keyword_before_the_fetch(env: Env) -> None:
    env.deliver(b"Subject: a\r\n\r\nx\r\n")
    c = _selected(env)
    lines = _lines(c.cmd("STORE 1 +FLAGS (newkw)"))
    assert lines[:3] == [FLAGS_KW, PERMANENT_KW, b"* 1 FETCH (FLAGS (newkw \\Recent))\r\n"]
    # Known now: a second use announces nothing.
    assert b"* FLAGS" not in c.cmd("STORE 1 -FLAGS (newkw)")
    assert b"* FLAGS" not in c.cmd("STORE 1 +FLAGS (newkw)")


def test_silent_store_still_announces(env: Env) -> None:
    env.deliver(b"Subject: a\r\n\r\nx\r\n")
    c = _selected(env)
    out = c.cmd("STORE 1 +FLAGS.SILENT (newkw)")
    assert _lines(out)[:2] == [FLAGS_KW, PERMANENT_KW] and b"FETCH" not in out


def test_other_sessions_are_told_before_their_fetch(env: Env) -> None:
    env.deliver(b"Subject: a\r\n\r\nx\r\n")
    a = _selected(env)
    b = _selected(env)
    ro = _selected(env, "EXAMINE INBOX")
    a.cmd("STORE 1 +FLAGS (newkw)")
    assert _lines(b.cmd("NOOP"))[:3] == [
        FLAGS_KW,
        PERMANENT_KW,
        b"* 1 FETCH (FLAGS (newkw))\r\n",
    ]
    assert _lines(ro.cmd("NOOP"))[:3] == [
        FLAGS_KW,
        b"* OK [PERMANENTFLAGS ()] Read-only mailbox\r\n",
        b"* 1 FETCH (FLAGS (newkw))\r\n",
    ]


def test_append_with_a_new_keyword_announces_it(env: Env) -> None:
    a = _selected(env)
    b = _selected(env)
    msg = b"Subject: k\r\n\r\nx\r\n"
    out = a.cmd(b"APPEND INBOX (newkw) {%d+}\r\n" % len(msg) + msg)
    assert _lines(out)[:3] == [FLAGS_KW, PERMANENT_KW, b"* 1 EXISTS\r\n"], out
    assert _lines(b.cmd("NOOP"))[:3] == [FLAGS_KW, PERMANENT_KW, b"* 1 EXISTS\r\n"]


def test_nil_is_the_keyword_nil(env: Env) -> None:
    env.deliver(b"Subject: a\r\n\r\nx\r\n")
    c = _selected(env)
    out = c.cmd("STORE 1 +FLAGS NIL")
    assert b"* FLAGS (\\Answered \\Flagged \\Deleted \\Seen \\Draft NIL)" in out
    assert b"* 1 FETCH (FLAGS (NIL \\Recent))" in out and out.endswith(b"OK STORE completed\r\n")
    assert b"* 1 FETCH (FLAGS (\\Recent))" in c.cmd("STORE 1 -FLAGS NIL")
    assert b"* 1 FETCH (FLAGS (NIL \\Recent))" in c.cmd("STORE 1 FLAGS (NIL)")
    assert b"* SEARCH 1\r\n" in c.cmd("SEARCH KEYWORD NIL")
    msg = b"Subject: n\r\n\r\nx\r\n"
    assert b"OK [APPENDUID" in c.cmd(b"APPEND INBOX (NIL) {%d+}\r\n" % len(msg) + msg)


@pytest.mark.parametrize(
    "command",
    [
        "SELECT &Jjo",
        "EXAMINE &Jjo",
        'SELECT "f\xc3\xa9"',
        "CREATE &Jjo",
        "CREATE A&B",
        "DELETE &Jjo",
        "RENAME &Jjo x",
        "RENAME Sent &Jjo",
        "SUBSCRIBE &Jjo",
        "UNSUBSCRIBE &Jjo",
        "STATUS &Jjo (MESSAGES)",
        "GETQUOTAROOT &Jjo",
        "COPY 1 &Jjo",
        "MOVE 1 &Jjo",
        "APPEND &Jjo {3+}\r\nx\r\n",
    ],
)
def test_invalid_modified_utf7_names_get_no(env: Env, command: str) -> None:
    env.deliver(b"Subject: a\r\n\r\nx\r\n")
    c = _selected(env)
    out = c.cmd(command.encode("latin-1"))
    assert _lines(out)[-1].startswith(b"a3 NO Mailbox name is not valid mUTF-7"), out
    assert b"BAD" not in out


def test_a_failed_select_closes_the_selected_mailbox(env: Env) -> None:
    c = _selected(env)
    out = c.cmd("SELECT &Jjo")
    assert (
        out
        == b"* OK [CLOSED] Previous mailbox closed\r\na3 NO Mailbox name is not valid mUTF-7\r\n"
    )
    assert b"BAD" in c.cmd("FETCH 1 FLAGS")  # no mailbox selected any more


@pytest.mark.parametrize(
    "command",
    ['LIST "" &Jjo', 'LIST "" "&Jjo*"', "LIST &Jjo *", 'LIST "" "f\xc3\xa9"', 'LSUB "" &Jjo',
     "LSUB &Jjo *", "LSUB &Jjo INBOX", 'LIST (SUBSCRIBED) "" (&Jjo)', "LIST &Jjo (INBOX)"],
)  # fmt: skip
def test_list_with_invalid_names_is_an_empty_ok(env: Env, command: str) -> None:
    c = env.connect(login=ALICE)
    out = c.cmd(command.encode("latin-1"))
    assert out == b"a2 OK %s completed\r\n" % command.split()[0].encode(), out


def test_an_invalid_pattern_drops_out_of_a_list(env: Env) -> None:
    c = env.connect(login=ALICE)
    assert c.cmd('LIST "" (&Jjo INBOX "f\xc3\xa9")'.encode("latin-1")) == (
        b'* LIST (\\HasNoChildren) "/" INBOX\r\na2 OK LIST completed\r\n'
    )


def test_delete_of_a_level_with_children(env: Env) -> None:
    c = env.connect(login=ALICE)
    c.cmd("CREATE p/q")
    assert c.cmd("DELETE p") == b"a3 NO [NONEXISTENT] Mailbox has children\r\n"  # as Dovecot
    c.cmd("ENABLE IMAP4rev2")
    assert c.cmd("DELETE p") == b"a5 NO [HASCHILDREN] Mailbox has children\r\n"  # RFC 9051
    assert c.cmd("DELETE p/q").endswith(b"OK DELETE completed\r\n")


def test_capabilities_after_login(env: Env) -> None:
    c = env.connect()
    assert b" IMAP4rev2 " in c.greeting and b"MULTIAPPEND" not in c.greeting
    out = c.login()
    caps = out.split(b"[CAPABILITY ", 1)[1].split(b"]", 1)[0].split()
    for cap in (b"MULTIAPPEND", b"ESORT", b"CONTEXT=SEARCH", b"CONTEXT=SORT", b"UTF8=ACCEPT",
                b"IMAP4rev2", b"ESEARCH", b"STATUS=SIZE"):  # fmt: skip
        assert cap in caps, cap
    for absent in (b"CATENATE", b"URLAUTH", b"NOTIFY", b"UTF8=ONLY"):
        assert absent not in caps
    msg = b"Subject: m\r\n\r\nx\r\n"
    literal = b"{%d+}\r\n" % len(msg) + msg
    out = c.cmd(b"APPEND INBOX " + literal + b" (\\Seen) " + literal)
    assert b"OK [APPENDUID" in out and b":2]" in out  # MULTIAPPEND, as advertised
