"""The parsed-message cache of an IMAP process forgets expunged messages (by this session or
another) and a user's messages when their last session ends (issue 10)."""

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


def test_last_logout_of_a_user_drops_their_structures(env: Env) -> None:
    env.deliver(MSG)
    env.deliver(MSG, user="bob@example.test")
    a1 = env.connect(login="alice@example.test")
    a2 = env.connect(login="alice@example.test")
    b = env.connect(login="bob@example.test")
    for client in (a1, a2, b):
        client.cmd("SELECT INBOX")
        client.cmd("FETCH 1 ENVELOPE")
    assert keys(env) == {1} and keys(env, "bob@example.test") == {1}
    a1.cmd("LOGOUT")
    a1.close()
    assert keys(env) == {1}  # alice still has a session
    a2.close()  # connection dropped without LOGOUT
    assert keys(env) == set()
    assert keys(env, "bob@example.test") == {1}
    assert env.factory.cache.bytes > 0
    b.cmd("LOGOUT")
    b.close()
    assert env.factory.cache.bytes == 0
