"""The shared folder snapshot across sessions: what one session (or a delivery, or another
process) changes reaches the others exactly, also when the snapshot was kept loaded with no
session holding the folder; and the bulk FLAGS-only FETCH gives the general path's bytes."""

from __future__ import annotations

import gc
import re
from pathlib import Path

import pytest

from mailgw.imap import parser as p
from mailgw.imap.commands import fetch as fetch_command
from mailgw.imap.fetch import fetch_responses, flag_responses, flags_only
from mailgw.store import MessageStore
from tests.imap.imap_env import Client, Env

ALICE = "alice@example.test"


def msg(i: int) -> bytes:
    return b"From: bob@example.org\r\nSubject: m%d\r\n\r\nbody %d\r\n" % (i, i)


def fill(env: Env, n: int) -> None:
    box = env.store.open_mailbox(ALICE)
    for i in range(1, n + 1):
        box.append(msg(i), ["\\Seen"] if i % 2 else ["$Work"] if i % 3 == 0 else [])
    box.claim_recent(range(1, n + 1))  # \\Recent aside: claimed already


def selected(env: Env, command: str = "SELECT INBOX") -> Client:
    c = env.connect(login=ALICE)
    assert b" OK [READ-" in c.cmd(command)
    return c


def flag_lines(c: Client, recent: bool = True) -> list[bytes]:
    """The responses of ``UID FETCH 1:* (FLAGS)``; without ``recent``, \\Recent left out
    (a new message is recent in one session only)."""
    out = c.cmd("UID FETCH 1:* (FLAGS)")
    lines = [line for line in out.split(b"\r\n") if line.startswith(b"* ")]
    if not recent:
        lines = [x.replace(b" \\Recent", b"").replace(b"(\\Recent)", b"()") for x in lines]
    return lines


def test_store_expunge_append_of_one_session_reach_the_other(env: Env) -> None:
    fill(env, 6)
    a, b = selected(env), selected(env)
    assert b"* 2 FETCH (FLAGS (\\Flagged))" in a.cmd("STORE 2 +FLAGS (\\Flagged)")
    out = b.cmd("NOOP")
    assert b"* 2 FETCH (FLAGS (\\Flagged))\r\n" in out
    a.cmd("STORE 1 +FLAGS.SILENT (\\Deleted)")
    a.cmd("EXPUNGE")
    a.send(b"x APPEND INBOX (\\Answered) {%d+}\r\n%s\r\n" % (len(msg(7)), msg(7)))
    out = b.cmd("NOOP")
    assert b"* 1 EXPUNGE\r\n" in out and b"* 6 EXISTS\r\n" in out, out
    assert out.index(b"* 1 EXPUNGE") < out.index(b"* 6 EXISTS")
    # Both sessions now number and flag the messages alike, through the bulk FETCH.
    assert flag_lines(a, recent=False) == flag_lines(b, recent=False)
    assert flag_lines(b, recent=False)[-1] == b"* 6 FETCH (UID 7 FLAGS (\\Answered))"
    # While FETCH runs, an expunge by another session is held back (RFC 3501 7.4.1).
    a.cmd("STORE 1 +FLAGS.SILENT (\\Deleted)")
    a.cmd("EXPUNGE")
    out = b.cmd("FETCH 1:* (FLAGS)")
    assert out.startswith(b"* 1 FETCH (FLAGS (\\Flagged))\r\n")  # as b knows it
    assert out.count(b" FETCH (") == 6 and b"EXPUNGE" not in out
    assert b"* 1 EXPUNGE\r\n" in b.cmd("NOOP")
    assert flag_lines(a, recent=False) == flag_lines(b, recent=False)


def test_a_new_session_sees_changes_made_while_nobody_held_the_folder(
    env: Env, tmp_path: Path
) -> None:
    fill(env, 8)
    a = selected(env)
    before = flag_lines(a)
    a.cmd("LOGOUT")
    a.close()
    gc.collect()
    assert len(env.store._retained) == 1  # kept loaded, no session holds it
    # Another process changes the folder (a second store on the same directory), and the
    # delivery path (private snapshot) adds a message.
    other = MessageStore(env.store.root, quota_for=env.directory.quota_for)
    box = other.open_mailbox(ALICE)
    box.set_flags([3], ["\\Flagged"], "add")
    box.expunge([1, 5])
    content = tmp_path / "spooled"
    content.write_bytes(msg(9))
    assert env.store.deliver(ALICE, str(content)) == 9
    b = selected(env)
    fresh = Env(tmp_path / "fresh")  # the expected view, loaded from the index alone
    fresh.store = other
    fresh.factory.store = other
    c = selected(fresh)
    assert flag_lines(b, recent=False) == flag_lines(c, recent=False) != before
    assert flag_lines(b)[1] == b"* 2 FETCH (UID 3 FLAGS (\\Flagged \\Seen))"
    assert flag_lines(b)[-1] == b"* 7 FETCH (UID 9 FLAGS (\\Recent))"
    assert b.cmd("UID SEARCH ALL").startswith(b"* SEARCH 2 3 4 6 7 8 9\r\n")
    other.close()


def test_delivery_reaches_an_idle_session(env: Env, tmp_path: Path) -> None:
    fill(env, 3)
    c = selected(env)
    c.send(b"i IDLE\r\n")
    content = tmp_path / "spooled"
    content.write_bytes(msg(4))
    env.store.deliver(ALICE, str(content))
    env.clock.advance(5)
    out = c.take() + c.send(b"DONE\r\n")
    assert b"* 4 EXISTS\r\n" in out, out
    assert flag_lines(c)[-1] == b"* 4 FETCH (UID 4 FLAGS (\\Recent))"


FLAG_ITEMS = [
    "FLAGS",
    "(UID FLAGS)",
    "(FLAGS UID)",
    "(FLAGS MODSEQ)",
    "(MODSEQ FLAGS UID)",
    "UID",
    "MODSEQ",
    "(FLAGS FLAGS)",
]


@pytest.mark.parametrize("items", FLAG_ITEMS)
@pytest.mark.parametrize("uid", [False, True])
@pytest.mark.parametrize("condstore", [False, True])
def test_bulk_flags_fetch_equals_the_general_path(
    env: Env, monkeypatch: pytest.MonkeyPatch, items: str, uid: bool, condstore: bool
) -> None:
    fill(env, 40)
    env.store.open_mailbox(ALICE).set_flags([4, 5], ["\\Draft", "$Other"], "add")
    c = selected(env, "SELECT INBOX (CONDSTORE)" if condstore else "SELECT INBOX")
    other = selected(env)
    other.cmd("STORE 7 +FLAGS (\\Answered)")  # known to c only after its next sync
    other.cmd("STORE 9 +FLAGS.SILENT (\\Deleted)")
    other.cmd("EXPUNGE")  # held for c: 9 keeps its number and info
    c.server.selected.sync(allow_expunge=False)
    sel = c.server.selected
    assert sel is not None and 9 in sel.gone
    fetcher = c.server.fetcher
    command = _fetch(c, f"FETCH 1:* {items}", uid)
    assert flags_only(command.items)
    uids = sel.resolve(command.sequence, command.uid)
    for with_modseq in (False, True):
        general = b"".join(
            fetch_responses(fetcher, uids, command.items, uid, set(), with_modseq, [])
        )
        bulk = b"".join(flag_responses(sel, uids, command.items, uid, with_modseq))
        assert bulk == general
        assert bulk.count(b"\r\n") == 40
    # And through the session (a UID command leaves out 9, expunged meanwhile): the same
    # bytes as with the general path.
    text = f"{'UID ' if uid else ''}FETCH 1:* {items}"
    out = c.cmd(text)
    assert len(re.findall(rb"^\* \d+ FETCH ", out, re.M)) == 40 - uid
    c.cmd("NOOP")
    bulk = c.cmd(text)
    monkeypatch.setattr(fetch_command, "flags_only", lambda items: False)
    assert c.cmd(text).replace(b"a6 OK", b"a5 OK") == bulk


def _fetch(c: Client, text: str, uid: bool) -> p.Fetch:
    """The parsed FETCH command ``text`` (``UID FETCH`` with ``uid``)."""
    events = p.CommandReader().feed(b"t " + (b"UID " if uid else b"") + text.encode() + b"\r\n")
    event = events[0]
    assert isinstance(event, p.Command)
    parsed = p.parse_command(event, False)
    assert isinstance(parsed, p.Fetch)
    return parsed
