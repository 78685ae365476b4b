"""The parsed-message cache of an IMAP process forgets expunged messages (by this session or
another) and puts a user's messages first in line for eviction when their last session ends
(issue 10), keeping them for a user who comes back before they are evicted."""

from __future__ import annotations

from tests.imap.imap_env import Env

MSG = b"From: a@x.test\r\nTo: b@x.test\r\nSubject: cached\r\n\r\nbody\r\n"


def keys(env: Env, user: str = "alice@example.test") -> set[int]:
    return {key[3] for key in env.factory.cache._entries if key[0] == user}  # type: ignore[index]


def test_expunge_drops_the_cached_structures(env: Env) -> None:
    for _ in range(3):
        env.deliver(MSG)
    a = env.connect(login="alice@example.test")
    a.cmd("SELECT INBOX")
    a.cmd("FETCH 1:* ENVELOPE")
    assert keys(env) == {1, 2, 3}
    a.cmd("STORE 1 +FLAGS (\\Deleted)")
    assert b"* 1 EXPUNGE" in a.cmd("EXPUNGE")
    assert keys(env) == {2, 3}
    # UID MOVE expunges from the source too
    a.cmd("UID MOVE 2 Archive")
    assert keys(env) == {3}


def test_expunge_by_another_session_drops_them_on_sync(env: Env) -> None:
    for _ in range(2):
        env.deliver(MSG)
    a = env.connect(login="alice@example.test")
    b = env.connect(login="alice@example.test")
    a.cmd("SELECT INBOX")
    a.cmd("FETCH 1:* BODYSTRUCTURE")
    b.cmd("SELECT INBOX")
    b.cmd("STORE 2 +FLAGS (\\Deleted)")
    b.cmd("CLOSE")
    assert b"* 2 EXPUNGE" in a.cmd("NOOP")
    assert keys(env) == {1}


def order(env: Env) -> list[tuple[str, int]]:
    """The cache's (user, UID) keys, least recently used first."""
    return [(key[0], key[3]) for key in env.factory.cache._entries]  # type: ignore[index]


def test_last_logout_of_a_user_puts_their_structures_first_in_line(env: Env) -> None:
    env.deliver(MSG)
    env.deliver(MSG, user="bob@example.test")
    a1 = env.connect(login="alice@example.test")
    a2 = env.connect(login="alice@example.test")
    b = env.connect(login="bob@example.test")
    for client in (a1, a2, b):
        client.cmd("SELECT INBOX")
        client.cmd("FETCH 1 ENVELOPE")
    assert order(env) == [("alice@example.test", 1), ("bob@example.test", 1)]
    b.cmd("LOGOUT")
    b.close()
    # Bob's last session ended: his structure is kept, but goes first when room is needed.
    assert order(env) == [("bob@example.test", 1), ("alice@example.test", 1)]
    a1.cmd("LOGOUT")
    a1.close()  # alice still has a session: nothing moves
    assert order(env) == [("bob@example.test", 1), ("alice@example.test", 1)]
    a2.close()  # connection dropped without LOGOUT: her last session
    assert order(env) == [("alice@example.test", 1), ("bob@example.test", 1)]
    # A user who comes back finds their messages parsed already.
    again = env.connect(login="bob@example.test")
    again.cmd("SELECT INBOX")
    hits = env.factory.cache.hits
    assert b"ENVELOPE" in again.cmd("FETCH 1 ENVELOPE")
    assert env.factory.cache.hits == hits + 1
