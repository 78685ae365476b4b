"""SEARCH TEXT / BODY find text nested deeper than the MIME depth limit (issue 10, Low): such
containers are opaque leaves for the parser, and their stored text is searched as is."""

from __future__ import annotations

from mailgw.mime import parse
from tests.imap.imap_env import Env


def nested(depth: int, text: bytes) -> bytes:
    body = b"Content-Type: text/plain\r\n\r\n" + text + b"\r\n"
    for level in range(depth):
        boundary = b"b%d" % level
        body = (
            b"Content-Type: multipart/mixed; boundary=" + boundary + b"\r\n\r\n--" + boundary
            + b"\r\n" + body + b"\r\n--" + boundary + b"--\r\n"
        )  # fmt: skip
    return b"From: a@x.test\r\nSubject: deep\r\n" + body


def test_text_beyond_the_depth_limit_is_found(env: Env) -> None:
    deep = nested(60, b"the Hidden Needle is here")
    assert parse(deep).truncated  # the limit (50) cuts it: the leaf is inside an opaque part
    env.deliver(deep)
    env.deliver(nested(3, b"a shallow haystack"))
    env.deliver(nested(60, b"nothing to see"))
    client = env.connect(login="alice@example.test")
    client.cmd("SELECT INBOX")
    assert b"* SEARCH 1\r\n" in client.cmd('SEARCH TEXT "hidden needle"')
    assert b"* SEARCH 1\r\n" in client.cmd("SEARCH BODY needle")
    assert b"* SEARCH 2\r\n" in client.cmd("SEARCH BODY haystack")
    assert b"* SEARCH\r\n" in client.cmd("SEARCH BODY absent")
