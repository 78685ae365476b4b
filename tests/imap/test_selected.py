"""IMAP mailbox commands: SELECT, FETCH, SEARCH, STORE, COPY/MOVE, EXPUNGE, APPEND, IDLE and
the untagged updates several sessions on one mailbox see."""

from __future__ import annotations

import re

from mailgw.imap.selected import SYSTEM_FLAGS
from tests.imap.imap_env import Env

ALICE = "alice@example.test"
UTF8_MSG = (
    "From: Jörg Müller <jorg@x.test>\r\nsubject: Grüße aus Köln\r\nTO: b@y.test\r\n"
    "Date: Mon, 01 Jan 2024 10:00:00 +0000\r\nX-Odd-Case: KeepMe\r\n\r\nHällo Welt\r\n"
).encode()
MULTI = (
    b"From: a@x.test\r\nSubject: =?utf-8?q?Anhang_f=C3=BCr_dich?=\r\n"
    b'Content-Type: multipart/mixed; boundary="XX"\r\n\r\n'
    b"--XX\r\nContent-Type: text/plain; charset=utf-8\r\n\r\nsee attachment\r\n"
    b"--XX\r\nContent-Type: application/pdf; name=a.pdf\r\nContent-Transfer-Encoding: base64\r\n"
    b"\r\nJVBERi0xLjQK\r\n--XX--\r\n"
)


def literal_after(out: bytes, label: bytes) -> bytes:
    m = re.search(re.escape(label) + rb" \{(\d+)\}\r\n", out)
    assert m, out
    start = m.end()
    return out[start : start + int(m.group(1))]


def selected(env: Env, mailbox: str = "INBOX") -> object:
    c = env.connect(login=ALICE)
    c.cmd(f"SELECT {mailbox}")
    return c


def test_select_reports_state(env: Env) -> None:
    env.deliver(b"Subject: a\r\n\r\nx\r\n", flags=("\\Seen", "$Work"))
    env.deliver(b"Subject: b\r\n\r\nx\r\n")
    c = env.connect(login=ALICE)
    out = c.cmd("SELECT inbox")
    assert b"* 2 EXISTS\r\n" in out and b"* 2 RECENT\r\n" in out
    assert b"[UNSEEN 2]" in out and b"[UIDNEXT 3]" in out and b"[UIDVALIDITY " in out
    assert b"$Work" in out and b"\\*)]" in out and b"[HIGHESTMODSEQ " in out
    assert out.endswith(b"OK [READ-WRITE] SELECT completed\r\n")
    ro = env.connect(login=ALICE).cmd("EXAMINE INBOX")
    assert b"[READ-ONLY]" in ro and b"PERMANENTFLAGS ()" in ro
    assert b"NO [NONEXISTENT]" in c.cmd("SELECT Nope")
    assert c.server.state == "authenticated"


def test_recent_in_at_most_one_session(env: Env) -> None:
    env.deliver(b"Subject: a\r\n\r\nx\r\n")
    a = selected(env)
    b = env.connect(login=ALICE)
    assert b"* 0 RECENT" in b.cmd("SELECT INBOX")
    env.deliver(b"Subject: b\r\n\r\nx\r\n")
    out_a = a.cmd("NOOP")
    out_b = b.cmd("NOOP")
    # An unchanged count is not repeated (as Dovecot): b learns of no recent message.
    assert b"* 2 RECENT" in out_a and b"RECENT" not in out_b
    assert b"\\Recent" in a.cmd("FETCH 2 FLAGS") and b"\\Recent" not in b.cmd("FETCH 2 FLAGS")
    assert b"* SEARCH 1 2" in a.cmd("SEARCH RECENT") and b"* SEARCH\r\n" in b.cmd("SEARCH NEW")


def test_fetch_bytes_are_the_stored_bytes(env: Env) -> None:
    env.deliver(UTF8_MSG)
    c = selected(env)
    out = c.cmd("FETCH 1 (RFC822.SIZE BODY.PEEK[])")
    body = literal_after(out, b"BODY[]")
    assert body == UTF8_MSG
    assert b"RFC822.SIZE %d" % len(UTF8_MSG) in out
    assert literal_after(c.cmd("FETCH 1 RFC822.HEADER"), b"RFC822.HEADER").startswith(
        "From: Jörg".encode()
    )
    hdr = literal_after(c.cmd("FETCH 1 BODY.PEEK[HEADER.FIELDS (SUBJECT x-odd-case)]"), b"")
    assert hdr == "subject: Grüße aus Köln\r\nX-Odd-Case: KeepMe\r\n\r\n".encode()
    out = c.cmd("FETCH 1 BODY.PEEK[HEADER.FIELDS.NOT (From Subject To Date)]")
    assert b"X-Odd-Case: KeepMe\r\n\r\n" in out
    assert (
        literal_after(c.cmd("FETCH 1 BODY.PEEK[TEXT]<1.4>"), b"BODY[TEXT]<1>")
        == ("Hällo Welt".encode()[1:5])
    )
    out = c.cmd("FETCH 1 (ENVELOPE INTERNALDATE UID)")
    assert b"ENVELOPE (" in out and b'INTERNALDATE "' in out and b"UID 1" in out


def test_body_fetch_sets_seen_unless_peek_or_examine(env: Env) -> None:
    env.deliver(MULTI)
    env.deliver(MULTI)
    c = selected(env)
    assert b"\\Seen" not in c.cmd("FETCH 1 BODY.PEEK[1]")
    out = c.cmd("FETCH 1 BODY[1]")
    assert b"FLAGS (\\Seen \\Recent)" in out
    assert literal_after(out, b"BODY[1]") == b"see attachment"
    assert literal_after(c.cmd("FETCH 1 BODY.PEEK[2.MIME]"), b"BODY[2.MIME]").startswith(
        b"Content-Type: application/pdf"
    )
    assert b"\\Seen" in c.cmd("FETCH 2 RFC822.TEXT")
    ro = env.connect(login=ALICE)
    ro.cmd("EXAMINE INBOX")
    env.store.open_mailbox(ALICE).set_flags([1, 2], ["\\Seen"], "remove")
    ro.cmd("FETCH 1:2 BODY[]")
    assert all("\\Seen" not in m.flags for m in env.store.open_mailbox(ALICE).messages())
    assert literal_after(c.cmd("FETCH 1 BINARY.PEEK[1]"), b"BINARY[1]") == b"see attachment"
    bs = c.cmd("FETCH 1 (BODYSTRUCTURE BODY)")
    assert b'"mixed"' in bs and b'"application" "pdf"' in bs


def test_search_keys(env: Env) -> None:
    env.deliver(UTF8_MSG)
    env.deliver(MULTI, flags=("\\Flagged",))
    env.deliver(b"From: c@z.test\r\nSubject: plain\r\n\r\n" + b"y" * 5000 + b"\r\n")
    c = selected(env)

    def search(criteria: str) -> bytes:
        out = c.cmd(f"SEARCH {criteria}")
        return out.split(b"\r\n")[0]

    out = c.cmd("SEARCH CHARSET UTF-8 SUBJECT {7+}\r\ngrüße".encode())
    assert out.startswith(b"* SEARCH 1\r\n")
    assert search("FROM MULLER") == b"* SEARCH"
    assert search("FROM jorg") == b"* SEARCH 1"
    assert search("SUBJECT anhang") == b"* SEARCH 2"
    assert search('BODY "see ATTACHMENT"') == b"* SEARCH 2"
    assert search("TEXT plain") == b"* SEARCH 3"
    assert search("HEADER X-Odd-Case keepme") == b"* SEARCH 1"
    assert search('HEADER X-Odd-Case ""') == b"* SEARCH 1"
    assert search("FLAGGED") == b"* SEARCH 2"
    assert search("OR FLAGGED LARGER 4000") == b"* SEARCH 2 3"
    assert search("NOT (OR FLAGGED OR 1 3)") == b"* SEARCH"
    assert search("SENTON 1-Jan-2024") == b"* SEARCH 1"
    assert search("SENTBEFORE 1-Jan-2024") == b"* SEARCH"
    assert search("SINCE 1-Jan-2000 SMALLER 1000") == b"* SEARCH 1 2"
    assert search("BEFORE 1-Jan-2000") == b"* SEARCH"
    assert search("UID 2:*") == b"* SEARCH 2 3"
    assert search("2:* UNSEEN") == b"* SEARCH 2 3"
    assert search("YOUNGER 100000") == b"* SEARCH 1 2 3"
    assert search("OLDER 1") == b"* SEARCH"
    assert c.cmd("UID SEARCH FLAGGED").startswith(b"* SEARCH 2\r\n")
    out = c.cmd("SEARCH RETURN (MIN MAX COUNT ALL) NOT FLAGGED")
    assert out.startswith(b'* ESEARCH (TAG "a') and b"MIN 1 MAX 3 ALL 1,3 COUNT 2" in out
    assert b"COUNT 0" in c.cmd("UID SEARCH RETURN (COUNT) DELETED")
    assert b"NO [BADCHARSET" in c.cmd("SEARCH CHARSET KOI8-R ALL")
    out = c.cmd("SEARCH RETURN (SAVE) ALL")  # SEARCHRES: only SAVE, so no ESEARCH
    assert b"* " not in out and b"OK SEARCH" in out
    assert b"* SEARCH 1 2 3 (MODSEQ" in c.cmd("SEARCH MODSEQ 1")


def test_store_flags(env: Env) -> None:
    env.deliver(b"Subject: a\r\n\r\nx\r\n")
    env.deliver(b"Subject: b\r\n\r\nx\r\n")
    c = selected(env)
    out = c.cmd("STORE 1:2 +FLAGS (\\Flagged $Label)")
    assert out.count(b"FETCH (FLAGS (\\Flagged $Label \\Recent))") == 2
    assert c.cmd("STORE 1 -FLAGS.SILENT ($Label)").startswith(b"a")
    assert b"UID 2" in c.cmd("UID STORE 2 FLAGS (\\Seen)")
    flags = {m.uid: m.flags for m in env.store.open_mailbox(ALICE).messages()}
    assert flags == {1: frozenset({"\\Flagged"}), 2: frozenset({"\\Seen"})}
    assert b"BAD" in c.cmd("STORE 1 +FLAGS (\\Bogus)")
    ro = env.connect(login=ALICE)
    ro.cmd("EXAMINE INBOX")
    assert b"NO [READ-ONLY]" in ro.cmd("STORE 1 +FLAGS (\\Seen)")


def test_condstore(env: Env) -> None:
    env.deliver(b"Subject: a\r\n\r\nx\r\n")
    c = env.connect(login=ALICE)
    assert b"* ENABLED CONDSTORE" in c.cmd("ENABLE CONDSTORE")
    c.cmd("SELECT INBOX")
    out = c.cmd("STORE 1 +FLAGS (\\Seen)")
    modseq = int(re.search(rb"MODSEQ \((\d+)\)", out).group(1))  # type: ignore[union-attr]
    assert b"* 1 FETCH" not in c.cmd(f"FETCH 1 FLAGS (CHANGEDSINCE {modseq})")
    assert b"MODSEQ" in c.cmd(f"FETCH 1 FLAGS (CHANGEDSINCE {modseq - 1})")
    out = c.cmd(f"STORE 1 (UNCHANGEDSINCE {modseq - 1}) +FLAGS (\\Answered)")
    assert b"OK [MODIFIED 1]" in out
    assert b"OK STORE" in c.cmd(f"STORE 1 (UNCHANGEDSINCE {modseq}) +FLAGS (\\Answered)")


def test_expunge_held_back_during_fetch_store_search(env: Env) -> None:
    for _ in range(3):
        env.deliver(b"Subject: a\r\n\r\nx\r\n")
    a = selected(env)
    b = selected(env)
    b.cmd("STORE 2 +FLAGS (\\Deleted)")
    b.cmd("EXPUNGE")
    out = a.cmd("FETCH 1:3 FLAGS")
    assert b"EXPUNGE" not in out and b"* 3 FETCH" in out
    assert b"EXPUNGE" not in a.cmd("SEARCH ALL")
    assert b"EXPUNGE" not in a.cmd("STORE 1 +FLAGS (\\Seen)")
    out = a.cmd("FETCH 2 BODY[]")
    assert b"NO [EXPUNGEISSUED]" in out
    out = a.cmd("UID FETCH 1:* FLAGS")
    assert b"* 2 EXPUNGE" in out
    assert b"UID 2" not in out
    assert a.server.selected is not None and list(a.server.selected.uids) == [1, 3]


def test_flag_updates_during_uid_commands_carry_the_uid(env: Env) -> None:
    # RFC 3501 6.4.8: a client using UID commands may not track sequence numbers; another
    # session's flag change reported during UID STORE / UID SEARCH / UID COPY names its UID.
    for _ in range(3):
        env.deliver(b"Subject: a\r\n\r\nx\r\n")
    a = selected(env)
    b = selected(env)
    commands = ("UID STORE 3 +FLAGS (\\Seen)", "UID SEARCH ALL", "UID COPY 3 Archive")
    for flag, command in zip(("\\Flagged", "\\Draft", "$Mark"), commands, strict=True):
        b.cmd(f"STORE 1 FLAGS ({flag})")
        out = a.cmd(command)
        assert re.search(rb"\* 1 FETCH \(FLAGS \([^)]*\) UID 1\)", out), (command, out)
    b.cmd("STORE 2 +FLAGS (\\Answered)")
    assert b"* 2 FETCH (FLAGS (\\Answered \\Recent))\r\n" in a.cmd("NOOP")


def test_silent_store_still_reports_a_concurrent_change(env: Env) -> None:
    # A STORE .SILENT is not echoed, so the client takes its change as applied to the flags
    # it knew; another session's change made meanwhile must still reach it.
    env.deliver(b"Subject: a\r\n\r\nx\r\n")
    env.deliver(b"Subject: b\r\n\r\nx\r\n")
    a = selected(env)
    b = selected(env)
    b.cmd("STORE 1:2 +FLAGS (\\Flagged)")
    out = a.cmd("STORE 1 +FLAGS.SILENT (\\Seen)")
    assert b"* 1 FETCH (FLAGS (\\Flagged \\Seen \\Recent))\r\n" in out
    b.cmd("STORE 2 +FLAGS ($Mark)")
    out = a.cmd("UID STORE 2 -FLAGS.SILENT (\\Flagged)")
    assert b"* 2 FETCH (FLAGS ($Mark \\Recent) UID 2)\r\n" in out
    b.cmd("STORE 1 +FLAGS (\\Draft)")
    assert b"* 1 FETCH" not in a.cmd("STORE 1 FLAGS.SILENT (\\Answered)")
    assert b"FETCH" not in a.cmd("STORE 1 +FLAGS.SILENT (\\Seen)") + a.cmd("NOOP")


def test_expunge_close_unselect(env: Env) -> None:
    for _ in range(4):
        env.deliver(b"Subject: a\r\n\r\nx\r\n")
    c = selected(env)
    c.cmd("STORE 1,3:4 +FLAGS (\\Deleted)")
    out = c.cmd("UID EXPUNGE 3")
    assert out.startswith(b"* 3 EXPUNGE\r\n")
    out = c.cmd("EXPUNGE")
    assert b"* 3 EXPUNGE\r\n* 1 EXPUNGE\r\n" in out
    c.cmd("STORE 1 +FLAGS (\\Deleted)")
    assert c.cmd("UNSELECT").endswith(b"OK UNSELECT completed\r\n")
    assert len(env.store.open_mailbox(ALICE).messages()) == 1
    c.cmd("SELECT INBOX")
    c.cmd("CLOSE")
    assert env.store.open_mailbox(ALICE).messages() == []
    assert c.server.state == "authenticated"


def test_append(env: Env) -> None:
    c = env.connect(login=ALICE)
    out = c.cmd(b"APPEND Drafts {12+}\r\nSubject: x\r\n")
    assert b"OK [APPENDUID " in out and out.rstrip().endswith(b"APPEND completed")
    out = c.cmd(b'APPEND Drafts (\\Draft \\Seen) "05-Mar-2021 10:00:00 +0100" {5+}\r\nhello')
    assert b" 2] APPEND completed" in out
    infos = env.store.open_mailbox(ALICE, "Drafts").messages()
    assert infos[1].flags == frozenset({"\\Draft", "\\Seen"})
    assert infos[1].internaldate == 1614934800.0
    assert b"NO [TRYCREATE]" in c.cmd(b"APPEND Nope {1+}\r\nx")
    assert b"NO" in c.cmd(b"APPEND Drafts {0+}\r\n")
    env.directory.quotas[ALICE] = 20
    assert b"NO [OVERQUOTA]" in c.cmd(b"APPEND Drafts {30+}\r\n" + b"x" * 30)
    out = c.cmd("GETQUOTAROOT INBOX")
    assert b'* QUOTAROOT INBOX ""' in out and b'* QUOTA "" (STORAGE 1 0)' in out
    assert b"NO" in c.cmd('GETQUOTA "other"')


def test_copy_and_move(env: Env) -> None:
    env.deliver(b"Subject: a\r\n\r\nx\r\n", flags=("\\Flagged",))
    env.deliver(b"Subject: b\r\n\r\ny\r\n")
    c = selected(env)
    out = c.cmd("COPY 1:2 Archive")
    assert b"OK [COPYUID " in out and b" 1:2 1:2] COPY completed" in out
    archived = env.store.open_mailbox(ALICE, "Archive").messages()
    assert [m.flags for m in archived] == [frozenset({"\\Flagged"}), frozenset()]
    out = c.cmd("UID MOVE 2 Trash")
    assert b"* OK [COPYUID " in out and b"* 2 EXPUNGE" in out and b"OK MOVE completed" in out
    assert len(env.store.open_mailbox(ALICE).messages()) == 1
    assert b"NO [TRYCREATE]" in c.cmd("COPY 1 Nope")


def test_idle_pushes_changes_from_other_sessions_and_deliveries(env: Env) -> None:
    env.deliver(b"Subject: a\r\n\r\nx\r\n")
    a = selected(env)
    b = selected(env)
    assert a.send(b"i IDLE\r\n") == b"+ idling\r\n"
    env.deliver(b"Subject: b\r\n\r\nx\r\n")
    assert a.take() == b"* 2 EXISTS\r\n* 2 RECENT\r\n"
    b.cmd("STORE 1 +FLAGS (\\Seen)")
    assert a.take() == b"* 1 FETCH (FLAGS (\\Seen \\Recent))\r\n"
    b.cmd("STORE 1 +FLAGS (\\Deleted)")
    b.cmd("EXPUNGE")
    # the expunged message was recent here: RECENT follows, as from Dovecot
    assert a.take().endswith(b"* 1 EXPUNGE\r\n* 1 RECENT\r\n")
    assert a.send(b"DONE\r\n") == b"i OK IDLE terminated\r\n"
    a.send(b"j IDLE\r\n")
    assert b"j BAD" in a.send(b"NOPE\r\n")


def test_list_lsub_create_delete_rename_status(env: Env) -> None:
    c = env.connect(login=ALICE)
    out = c.cmd('LIST "" *')
    for name, use in (("Sent", b"\\Sent"), ("Trash", b"\\Trash"), ("Junk", b"\\Junk")):
        assert use + b') "/" ' + name.encode() in out
    assert b'* LIST (\\Noselect) "/" ""' in c.cmd('LIST "" ""')
    assert b"OK" in c.cmd("CREATE Work/2024/")
    out = c.cmd('LIST "" %')
    assert b'(\\Noselect \\HasChildren) "/" Work' in out
    assert b'* LIST (\\HasNoChildren) "/" Work/2024' in c.cmd('LIST "" Work/*')
    assert b"NO [ALREADYEXISTS]" in c.cmd("CREATE Work/2024")
    assert b"NO [ALREADYEXISTS]" in c.cmd("CREATE inbox")
    assert b"OK" in c.cmd("CREATE &AMQ-rger")
    assert b'"/" &AMQ-rger' in c.cmd('LIST "" &AMQ-*')
    out = c.cmd("STATUS Sent (MESSAGES RECENT UIDNEXT UIDVALIDITY UNSEEN HIGHESTMODSEQ SIZE)")
    assert b"* STATUS Sent (MESSAGES 0 RECENT 0 UIDNEXT 1 UIDVALIDITY " in out
    assert b"NO [NONEXISTENT]" in c.cmd("STATUS Nope (MESSAGES)")
    assert b"OK" in c.cmd("RENAME Work/2024 Work/2025")
    assert b"Work/2025" in c.cmd('LIST "" *')
    assert b"NO [NONEXISTENT]" in c.cmd("RENAME Nope Other")
    assert b"NO [ALREADYEXISTS]" in c.cmd("RENAME Sent Trash")
    assert b"OK" in c.cmd("UNSUBSCRIBE Trash")
    assert b'"/" Trash' not in c.cmd('LSUB "" *')
    assert b"\\Subscribed" in c.cmd('LIST (SUBSCRIBED) "" Sent')
    assert b"OK" in c.cmd("SUBSCRIBE Trash")
    assert b"OK" in c.cmd("DELETE Work/2025")
    assert b"NO" in c.cmd("DELETE INBOX")
    assert b"NO [NONEXISTENT]" in c.cmd("DELETE Nope")
    out = c.cmd('LIST (SPECIAL-USE) "" * RETURN (STATUS (MESSAGES))')
    assert b"* STATUS Sent (MESSAGES 0)" in out and b"INBOX" not in out


def test_flags_constant() -> None:
    assert SYSTEM_FLAGS[0] == "\\Answered"
