"""ENABLE IMAP4rev2 (RFC 9051) and ENABLE UTF8=ACCEPT (RFC 6855) in the session."""

from __future__ import annotations

from tests.imap.imap_env import Client, Env

ALICE = "alice@example.test"


def _client(env: Env, enable: str = "") -> Client:
    c = env.connect(login=ALICE)
    if enable:
        out = c.cmd(f"ENABLE {enable}")
        assert out.startswith(b"* ENABLED "), out
    return c


def test_enable_reports_what_it_enabled(env: Env) -> None:
    c = _client(env)
    assert c.cmd("ENABLE imap4rev2 UTF8=Accept FOO").startswith(
        b"* ENABLED IMAP4rev2 UTF8=ACCEPT\r\n"
    )
    assert c.cmd("ENABLE IMAP4rev2").startswith(b"* ENABLED\r\n")  # already on


def test_rev2_select_has_no_recent_and_sends_list(env: Env) -> None:
    env.deliver(b"Subject: a\r\n\r\nx\r\n")
    env.store.create_mailbox(ALICE, "Sent/2024")
    c = _client(env, "IMAP4rev2")
    out = c.cmd("SELECT INBOX")
    assert b"RECENT" not in out and b"[UNSEEN" not in out, out
    assert b'* LIST (\\HasNoChildren) "/" INBOX\r\n' in out
    assert b"* 1 EXISTS\r\n" in out and b"OK [UIDNEXT 2]" in out and b"[PERMANENTFLAGS" in out
    out = c.cmd("EXAMINE Sent")
    assert b'* LIST (\\HasChildren \\Sent) "/" Sent\r\n' in out, out
    c.cmd("SELECT INBOX")
    assert b"\\Recent" not in c.cmd("FETCH 1 FLAGS")
    env.deliver(b"Subject: b\r\n\r\nx\r\n")
    out = c.cmd("NOOP")
    assert b"* 2 EXISTS\r\n" in out and b"RECENT" not in out, out


def test_rev2_search_answers_with_esearch(env: Env) -> None:
    env.deliver(b"Subject: a\r\n\r\nx\r\n")
    env.deliver(b"Subject: b\r\n\r\nx\r\n")
    c = _client(env, "IMAP4rev2")
    c.cmd("SELECT INBOX")
    assert c.cmd("SEARCH ALL").startswith(b'* ESEARCH (TAG "a4") ALL 1:2\r\na4 OK')
    assert c.cmd("UID SEARCH SUBJECT b").startswith(b'* ESEARCH (TAG "a5") UID ALL 2\r\n')
    assert c.cmd("SEARCH SUBJECT zzz").startswith(b'* ESEARCH (TAG "a6")\r\n')
    assert c.cmd("SEARCH RETURN (COUNT) ALL").startswith(b'* ESEARCH (TAG "a7") COUNT 2\r\n')
    assert c.cmd("SEARCH RETURN (SAVE) ALL") == b"a8 OK SEARCH completed\r\n"
    # SORT is no part of IMAP4rev2: unchanged
    assert c.cmd("SORT (SUBJECT) UTF-8 ALL").startswith(b"* SORT 1 2\r\n")


def test_rev2_mailbox_names_are_utf8(env: Env) -> None:
    c = _client(env, "IMAP4rev2")
    assert c.cmd('CREATE "Entwürfe/Brief"').endswith(b"OK CREATE completed\r\n")
    out = c.cmd('LIST "" "Entw*"')
    assert '* LIST (\\HasNoChildren) "/" "Entwürfe/Brief"\r\n'.encode() in out, out
    assert env.store.list_mailboxes(ALICE).count("Entwürfe/Brief") == 1
    out = c.cmd('STATUS "Entwürfe/Brief" (MESSAGES)')
    assert out.startswith('* STATUS "Entwürfe/Brief" (MESSAGES 0)\r\n'.encode()), out
    # a de-normalised name (e + combining diaeresis... here u + U+0308) is taken in NFC
    assert c.cmd('SELECT "Entwu\u0308rfe/Brief"').endswith(b"OK [READ-WRITE] SELECT completed\r\n")
    # modified UTF-7 is no longer decoded: "&APw-" is a literal name now
    assert b"NO [NONEXISTENT]" in c.cmd("SELECT Entw&APw-rfe/Brief")


def test_utf8_accept_names_and_append(env: Env) -> None:
    c = _client(env)
    msg = "Subject: Grüße\r\n\r\nx\r\n".encode()
    # APPEND UTF8 is refused until UTF8=ACCEPT is enabled
    out = c.cmd(b"APPEND INBOX UTF8 (~{%d+}\r\n" % len(msg) + msg + b")")
    assert out == b"a2 BAD APPEND UTF8 needs ENABLE UTF8=ACCEPT\r\n"
    c.cmd("ENABLE UTF8=ACCEPT")
    out = c.cmd(b"APPEND INBOX (\\Seen) UTF8 (~{%d+}\r\n" % len(msg) + msg + b")")
    assert b"OK [APPENDUID" in out, out
    out = c.cmd(b"APPEND INBOX UTF8 ({%d+}\r\n" % len(msg) + msg + b")")
    assert out == b"a5 BAD APPEND UTF8 takes a literal8 (~{n})\r\n"
    literal = b"UTF8 (~{%d+}\r\n" % len(msg) + msg + b")"
    out = c.cmd(b"APPEND INBOX " + literal + b" " + literal)  # MULTIAPPEND
    assert b":3]" in out, out
    c.cmd("SELECT INBOX")
    out = c.cmd("FETCH 1 (FLAGS BODY.PEEK[])")
    assert msg in out and b"\\Seen" in out
    assert c.cmd('CREATE "Café"').endswith(b"OK CREATE completed\r\n")
    assert '"/" "Café"\r\n'.encode() in c.cmd('LIST "" *')
    # without UTF8=ACCEPT another session sees the modified UTF-7 form
    other = _client(env)
    assert b'"/" Caf&AOk-\r\n' in other.cmd('LIST "" *')
    out = other.cmd(b"APPEND INBOX UTF8 (~{%d+}\r\n" % len(msg) + msg + b")")
    assert out == b"a3 BAD APPEND UTF8 needs ENABLE UTF8=ACCEPT\r\n"


def test_unauthenticate_resets_utf8_and_rev2(env: Env) -> None:
    c = _client(env, "IMAP4rev2 UTF8=ACCEPT")
    c.cmd("UNAUTHENTICATE")
    c.login()
    out = c.cmd('CREATE "Café"')
    assert out.startswith(b"a5 NO Mailbox name is not valid mUTF-7"), out
