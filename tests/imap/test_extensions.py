"""Session-level extensions: SORT / THREAD (RFC 5256), QRESYNC (RFC 7162), AUTH=LOGIN,
UNAUTHENTICATE (RFC 8437), SEARCHRES (RFC 5182) and COPY/MOVE through the store."""

from __future__ import annotations

import base64
import re

from tests.imap.imap_env import Client, Env

ALICE = "alice@example.test"


def _deliver(env: Env, subject: str, extra: str = "", flags: tuple[str, ...] = ()) -> int:
    data = f"Subject: {subject}\r\nFrom: x@y.test\r\n{extra}\r\nbody\r\n".encode()
    return env.deliver(data, flags=flags)


def _selected(env: Env, mailbox: str = "INBOX", enable: str = "") -> Client:
    c = env.connect(login=ALICE)
    if enable:
        c.cmd(f"ENABLE {enable}")
    c.cmd(f"SELECT {mailbox}")
    return c


def _highest(out: bytes) -> int:
    m = re.search(rb"HIGHESTMODSEQ (\d+)", out)
    assert m, out
    return int(m.group(1))


def test_capabilities(env: Env) -> None:
    c = env.connect()
    assert b"AUTH=LOGIN" in c.greeting
    out = c.login()
    for cap in (b"SORT", b"SORT=DISPLAY", b"THREAD=REFERENCES", b"THREAD=ORDEREDSUBJECT",
                b"QRESYNC", b"SEARCHRES", b"UNAUTHENTICATE"):  # fmt: skip
        assert b" " + cap + b" " in out or b" " + cap + b"]" in out, cap


def test_sort_and_uid_sort(env: Env) -> None:
    _deliver(env, "Re: beta", "Date: 3 Jan 2024 00:00:00 +0000\r\n")
    _deliver(env, "alpha", "Date: 2 Jan 2024 00:00:00 +0000\r\n")
    _deliver(env, "[list] Gamma (fwd)", "Date: 1 Jan 2024 00:00:00 +0000\r\n")
    c = _selected(env)
    c.cmd("STORE 1 +FLAGS (\\Deleted)")
    c.cmd("EXPUNGE")  # UIDs 2, 3 are now sequence numbers 1, 2
    _deliver(env, "ALPHA", "Date: 4 Jan 2024 00:00:00 +0000\r\n")
    c.cmd("NOOP")
    assert c.cmd("SORT (SUBJECT) UTF-8 ALL").startswith(b"* SORT 1 3 2\r\n")
    assert c.cmd("UID SORT (SUBJECT) UTF-8 ALL").startswith(b"* SORT 2 4 3\r\n")
    assert c.cmd("SORT (REVERSE DATE) US-ASCII ALL").startswith(b"* SORT 3 1 2\r\n")
    assert c.cmd("SORT (ARRIVAL) UTF-8 SUBJECT alpha").startswith(b"* SORT 1 3\r\n")
    assert c.cmd("SORT (SIZE) UTF-8 SUBJECT nothing").startswith(b"* SORT\r\n")
    assert b"NO [BADCHARSET" in c.cmd("SORT (SIZE) KOI8-R ALL")
    assert b"BAD" in c.cmd("SORT (COLOR) UTF-8 ALL")
    c.cmd("ENABLE CONDSTORE")
    out = c.cmd("SORT (SUBJECT) UTF-8 MODSEQ 1")
    assert re.match(rb"\* SORT 1 3 2 \(MODSEQ \d+\)\r\n", out), out
    assert b"BAD" in env.connect(login=ALICE).cmd("SORT (SIZE) UTF-8 ALL")  # not selected


def test_thread_commands(env: Env) -> None:
    _deliver(env, "topic", "Message-ID: <a@x>\r\nDate: 1 Jan 2024 00:00:00 +0000\r\n")
    _deliver(env, "Re: topic", "Message-ID: <b@x>\r\nIn-Reply-To: <a@x>\r\n"
             "Date: 2 Jan 2024 00:00:00 +0000\r\n")  # fmt: skip
    _deliver(env, "other", "Message-ID: <c@x>\r\nDate: 3 Jan 2024 00:00:00 +0000\r\n")
    _deliver(env, "Re: topic", "Message-ID: <d@x>\r\nReferences: <a@x> <b@x>\r\n"
             "Date: 4 Jan 2024 00:00:00 +0000\r\n")  # fmt: skip
    c = _selected(env)
    assert c.cmd("THREAD REFERENCES UTF-8 ALL").startswith(b"* THREAD (1 2 4)(3)\r\n")
    assert c.cmd("THREAD ORDEREDSUBJECT UTF-8 ALL").startswith(b"* THREAD (1 (2)(4))(3)\r\n")
    assert c.cmd("UID THREAD REFERENCES UTF-8 3:4").startswith(b"* THREAD (3)(4)\r\n")
    assert c.cmd("THREAD REFERENCES UTF-8 SUBJECT nothing").startswith(b"* THREAD\r\n")
    assert b"BAD" in c.cmd("THREAD FOO UTF-8 ALL")


def test_enable_qresync_vanished_instead_of_expunge(env: Env) -> None:
    for i in range(4):
        _deliver(env, f"m{i}")
    c = env.connect(login=ALICE)
    assert b"* ENABLED QRESYNC\r\n" in c.cmd("ENABLE QRESYNC")
    assert b"* ENABLED\r\n" in c.cmd("ENABLE QRESYNC CONDSTORE")  # both already on
    c.cmd("SELECT INBOX")
    c.cmd("STORE 2:3 +FLAGS.SILENT (\\Deleted)")
    out = c.cmd("EXPUNGE")
    assert b"* VANISHED 2:3\r\n" in out and b"EXPUNGE\r\n" not in out
    assert re.search(rb"OK \[HIGHESTMODSEQ \d+\] EXPUNGE completed", out)
    other = _selected(env)
    other.cmd("STORE 1 +FLAGS (\\Seen)")
    out = c.cmd("NOOP")
    assert re.search(rb"\* 1 FETCH \(FLAGS \(\\Seen \\Recent\) UID 1 MODSEQ \(\d+\)\)", out), out
    out = c.cmd("UID MOVE 4 Trash")
    assert b"* OK [COPYUID " in out and b"* VANISHED 4\r\n" in out
    assert b"[HIGHESTMODSEQ " in out


def test_qresync_select(env: Env) -> None:
    for i in range(6):
        _deliver(env, f"m{i}")
    c = _selected(env, enable="QRESYNC")
    validity = env.store.open_mailbox(ALICE).uidvalidity
    modseq = _highest(c.cmd("SELECT INBOX"))
    c.cmd("STORE 2 +FLAGS (\\Deleted)")
    c.cmd("STORE 4:5 +FLAGS (\\Deleted)")
    c.cmd("EXPUNGE")  # UIDs 2, 4, 5 gone; 1, 3, 6 left
    c.cmd("UID STORE 3 +FLAGS (\\Flagged)")
    c.cmd("UNSELECT")
    out = c.cmd(f"SELECT INBOX (QRESYNC ({validity} {modseq}))")
    assert b"* VANISHED (EARLIER) 2,4:5\r\n" in out
    assert re.search(rb"\* 2 FETCH \(FLAGS \(\\Flagged\) UID 3 MODSEQ \(\d+\)\)", out), out
    assert b"* 1 FETCH" not in out and b"* 3 FETCH" not in out
    assert out.index(b"VANISHED") < out.index(b"* 2 FETCH") < out.index(b"OK [READ-WRITE]")
    # known UIDs limit both VANISHED and FETCH; switching mailboxes says [CLOSED]
    out = c.cmd(f"EXAMINE INBOX (QRESYNC ({validity} {modseq} 1:2 (1:2 1:2)))")
    assert out.startswith(b"* OK [CLOSED]")
    assert b"* VANISHED (EARLIER) 2\r\n" in out and b"FETCH" not in out
    # a stale UIDVALIDITY: a plain SELECT
    out = c.cmd(f"SELECT INBOX (QRESYNC ({validity + 1} {modseq}))")
    assert b"VANISHED" not in out and b"FETCH" not in out and b"OK [READ-WRITE]" in out
    # QRESYNC parameter without ENABLE QRESYNC
    assert b"BAD" in env.connect(login=ALICE).cmd(f"SELECT INBOX (QRESYNC ({validity} 1))")


def test_uid_fetch_changedsince_vanished(env: Env) -> None:
    for i in range(5):
        _deliver(env, f"m{i}")
    c = _selected(env, enable="QRESYNC")
    modseq = _highest(c.cmd("SELECT INBOX"))
    other = _selected(env)
    other.cmd("STORE 1,4 +FLAGS (\\Deleted)")
    other.cmd("EXPUNGE")
    other.cmd("UID STORE 2 +FLAGS (\\Answered)")
    c.cmd("NOOP")  # learns about the expunges (VANISHED 1,4)
    out = c.cmd(f"UID FETCH 1:* (FLAGS) (CHANGEDSINCE {modseq} VANISHED)")
    assert out.startswith(b"* VANISHED (EARLIER) 1,4\r\n"), out
    assert re.search(rb"\* 1 FETCH \(UID 2 FLAGS \(\\Answered\) MODSEQ \(\d+\)\)", out), out
    assert b"UID 3" not in out and b"UID 5" not in out
    out = c.cmd(f"UID FETCH 2:3 (FLAGS) (CHANGEDSINCE {modseq} VANISHED)")
    assert b"VANISHED" not in out and b"UID 2" in out
    plain = _selected(env, enable="CONDSTORE")
    assert b"BAD" in plain.cmd(f"UID FETCH 1:* (FLAGS) (CHANGEDSINCE {modseq} VANISHED)")
    assert b"BAD" in plain.cmd(f"FETCH 1:* (FLAGS) (CHANGEDSINCE {modseq} VANISHED)")


def test_authenticate_login(env: Env) -> None:
    user = base64.b64encode(ALICE.encode())
    password = base64.b64encode(b"secret")
    c = env.connect()
    assert c.send(b"x AUTHENTICATE LOGIN\r\n") == b"+ VXNlcm5hbWU6\r\n"
    assert c.send(user + b"\r\n") == b"+ UGFzc3dvcmQ6\r\n"
    assert c.send(password + b"\r\n").startswith(b"x OK [CAPABILITY ")
    assert c.server.state == "authenticated"
    ir = env.connect()
    assert ir.send(b"y AUTHENTICATE LOGIN " + user + b"\r\n") == b"+ UGFzc3dvcmQ6\r\n"
    assert b"y OK" in ir.send(password + b"\r\n")
    cancel = env.connect()
    cancel.send(b"z AUTHENTICATE LOGIN\r\n")
    cancel.send(user + b"\r\n")
    assert cancel.send(b"*\r\n") == b"z BAD Authentication cancelled\r\n"
    cancel.send(b"w AUTHENTICATE LOGIN\r\n")
    assert cancel.send(b"*\r\n") == b"w BAD Authentication cancelled\r\n"
    assert b"BAD" in cancel.cmd("AUTHENTICATE LOGIN @@@")
    assert cancel.server.state == "not authenticated"
    wrong = env.connect()
    wrong.send(b"v AUTHENTICATE LOGIN " + user + b"\r\n")
    assert wrong.send(base64.b64encode(b"nope") + b"\r\n") == b""
    env.clock.advance(2.0)
    assert b"v NO [AUTHENTICATIONFAILED]" in wrong.take()
    bad_utf8 = env.connect()
    bad_utf8.send(b"u AUTHENTICATE LOGIN " + base64.b64encode(b"\xff") + b"\r\n")
    bad_utf8.send(password + b"\r\n")
    env.clock.advance(2.0)
    assert b"u NO [AUTHENTICATIONFAILED]" in bad_utf8.take()


def test_unauthenticate(env: Env) -> None:
    c = _selected(env, enable="QRESYNC")
    assert c.cmd("UNAUTHENTICATE").endswith(b"OK UNAUTHENTICATE completed\r\n")
    assert c.server.state == "not authenticated" and c.server.selected is None
    assert not c.server.qresync and env.factory.sessions_of(ALICE) == set()
    assert b"BAD" in c.cmd("SELECT INBOX")
    assert b"BAD" in c.cmd("UNAUTHENTICATE")
    c.login("bob@example.test")
    assert c.server.user == "bob@example.test"


def test_searchres(env: Env) -> None:
    for i in range(5):
        _deliver(env, f"m{i}", flags=("\\Flagged",) if i in (1, 3, 4) else ())
    c = _selected(env)
    assert b"* SEARCH\r\n" in c.cmd("SEARCH $")  # nothing saved yet: empty
    out = c.cmd("SEARCH RETURN (SAVE) FLAGGED")
    assert b"* " not in out
    assert b"* SEARCH 2 4 5\r\n" in c.cmd("SEARCH $")
    assert b"* SEARCH 2 4\r\n" in c.cmd("SEARCH $ 1:4")
    out = c.cmd("FETCH $ (UID)")
    assert b"* 2 FETCH (UID 2)" in out and b"* 5 FETCH (UID 5)" in out and b"* 1 FETCH" not in out
    c.cmd("STORE 2 +FLAGS (\\Deleted)")
    c.cmd("EXPUNGE")  # UID 2 leaves the saved result
    assert b"* SEARCH 4 5\r\n" in c.cmd("UID SEARCH UID $")
    assert b"* SEARCH 3 4\r\n" in c.cmd("SEARCH $")
    out = c.cmd("UID COPY $ Archive")
    assert b"[COPYUID " in out and b" 4:5 1:2]" in out
    out = c.cmd("SEARCH RETURN (SAVE MIN) FLAGGED")  # only MIN: only the minimum is saved
    assert b"MIN 3" in out
    assert b"* SEARCH 3\r\n" in c.cmd("SEARCH $")
    c.cmd("SEARCH RETURN (SAVE MIN MAX) ALL")
    assert b"* SEARCH 1 4\r\n" in c.cmd("SEARCH $")
    out = c.cmd("SEARCH RETURN (SAVE COUNT) UNFLAGGED")
    assert b"COUNT 2" in out and b"* SEARCH 1 2\r\n" in c.cmd("SEARCH $")
    assert b"BAD" in c.cmd("SEARCH RETURN (SAVE) BOGUS")  # a failed SAVE empties $
    assert b"* SEARCH\r\n" in c.cmd("SEARCH $")
    c.cmd("SEARCH RETURN (SAVE) ALL")
    c.cmd("SELECT INBOX")  # a new selection starts without a saved result
    assert b"* SEARCH\r\n" in c.cmd("SEARCH $")


def test_copy_and_move_through_the_store(env: Env) -> None:
    _deliver(env, "a", flags=("\\Flagged",))
    _deliver(env, "b")
    _deliver(env, "c")
    env.store.open_mailbox(ALICE, "Archive").append(b"Subject: old\r\n\r\nx\r\n")
    c = _selected(env)
    validity = env.store.open_mailbox(ALICE, "Archive").uidvalidity
    out = c.cmd("COPY 1,3 Archive")
    assert f"OK [COPYUID {validity} 1,3 2:3] COPY completed".encode() in out
    archived = env.store.open_mailbox(ALICE, "Archive").messages()
    assert [m.flags for m in archived][1:] == [frozenset({"\\Flagged"}), frozenset()]
    out = c.cmd("MOVE 2:3 Trash")
    trash = env.store.open_mailbox(ALICE, "Trash").uidvalidity
    assert f"* OK [COPYUID {trash} 2:3 1:2] Moved".encode() in out
    assert b"* 3 EXPUNGE\r\n* 2 EXPUNGE\r\n" in out and out.endswith(b"OK MOVE completed\r\n")
    assert [m.uid for m in env.store.open_mailbox(ALICE).messages()] == [1]
    out = c.cmd("MOVE 1 INBOX")  # into itself: a new UID, the old one expunged
    inbox = env.store.open_mailbox(ALICE).uidvalidity
    assert f"[COPYUID {inbox} 1 4]".encode() in out and b"* 1 EXPUNGE" in out
    assert b"* 1 EXISTS" in out
    assert b"NO [TRYCREATE]" in c.cmd("MOVE 1 Nope")
    assert b"NO [TRYCREATE]" in c.cmd("COPY 1 Nope")
    out = c.cmd("UID COPY 99 Archive")
    assert b"COPYUID" not in out and b"OK COPY completed" in out
    env.directory.quotas[ALICE] = 10
    assert b"NO [OVERQUOTA]" in c.cmd("COPY 1 Archive")
    ro = env.connect(login=ALICE)
    ro.cmd("EXAMINE INBOX")
    assert b"NO [READ-ONLY]" in ro.cmd("MOVE 1 Trash")


def test_copy_move_destination_deleted_meanwhile(env: Env, monkeypatch: object) -> None:
    from mailgw.interfaces import MailboxNotFound

    _deliver(env, "a")
    c = _selected(env)
    mailbox = c.server.selected.mailbox  # type: ignore[union-attr]

    def vanished(*args: object) -> list[tuple[int, int]]:
        raise MailboxNotFound("Archive")

    monkeypatch.setattr(mailbox, "copy_to", vanished)  # type: ignore[attr-defined]
    monkeypatch.setattr(mailbox, "move_to", vanished)  # type: ignore[attr-defined]
    assert b"NO [TRYCREATE]" in c.cmd("COPY 1 Archive")
    assert b"NO [TRYCREATE]" in c.cmd("MOVE 1 Archive")
