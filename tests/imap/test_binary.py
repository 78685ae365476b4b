"""The BINARY extension (RFC 3516) in the session: FETCH BINARY/BINARY.PEEK/BINARY.SIZE,
literal8 both ways, [UNKNOWN-CTE], and NUL octets refused outside a literal8."""

from __future__ import annotations

import base64
import re

from tests.imap.imap_env import Client, Env

ALICE = "alice@example.test"

MESSAGE = (
    b'MIME-Version: 1.0\r\nContent-Type: multipart/mixed; boundary="b"\r\n\r\n'
    b"--b\r\nContent-Transfer-Encoding: base64\r\n\r\n"
    + base64.encodebytes(b"abc\x00def")
    + b"\r\n--b\r\nContent-Transfer-Encoding: quoted-printable\r\n\r\nfoo=3Dbar=\r\nbaz\r\n"
    b"--b\r\nContent-Transfer-Encoding: x-uuencode\r\n\r\nbegin\r\n--b--\r\n"
)


def _selected(env: Env, data: bytes = MESSAGE) -> Client:
    env.deliver(data)
    c = env.connect(login=ALICE)
    c.cmd("SELECT INBOX")
    return c


def test_binary_is_advertised_after_login(env: Env) -> None:
    c = env.connect(login=ALICE)
    assert re.search(rb"\* CAPABILITY .* BINARY\b", c.cmd("CAPABILITY"))


def test_fetch_binary_decodes_and_uses_literal8_for_nul(env: Env) -> None:
    c = _selected(env)
    out = c.cmd("FETCH 1 (BINARY.PEEK[1] BINARY.SIZE[1] BINARY.PEEK[2] BINARY.SIZE[2])")
    assert b"BINARY[1] ~{7}\r\nabc\x00def BINARY.SIZE[1] 7" in out, out
    assert b"BINARY[2] {10}\r\nfoo=barbaz BINARY.SIZE[2] 10" in out, out
    assert b"\\Seen" not in c.cmd("FETCH 1 FLAGS")
    # A partial slice: the label carries the origin, literal8 only when the slice has NUL.
    assert b"BINARY[1]<2> ~{3}\r\nc\x00d)" in c.cmd("FETCH 1 BINARY.PEEK[1]<2.3>")
    assert b"BINARY[1]<4> {3}\r\ndef)" in c.cmd("FETCH 1 BINARY.PEEK[1]<4.9>")
    assert b"BINARY[1]<20> {0}\r\n)" in c.cmd("FETCH 1 BINARY.PEEK[1]<20.5>")


def test_fetch_binary_without_peek_sets_seen(env: Env) -> None:
    c = _selected(env)
    out = c.cmd("FETCH 1 BINARY[2]")
    assert re.search(rb"FLAGS \([^)]*\\Seen", out), out
    # BINARY.SIZE alone does not.
    env.deliver(MESSAGE)
    c.cmd("NOOP")
    assert b"\\Seen" not in c.cmd("FETCH 2 BINARY.SIZE[1]")
    assert b"\\Seen" not in c.cmd("FETCH 2 FLAGS")


def test_unknown_transfer_encoding_fails_with_unknown_cte(env: Env) -> None:
    c = _selected(env)
    out = c.cmd("FETCH 1 (BINARY.PEEK[3])")
    assert out.endswith(b"a3 NO [UNKNOWN-CTE] Unknown Content-Transfer-Encoding\r\n"), out
    out = c.cmd("FETCH 1 BINARY.SIZE[3]")
    assert b"NO [UNKNOWN-CTE]" in out
    # BODY[3] is still the stored bytes.
    assert b"BODY[3] {5}\r\nbegin" in c.cmd("FETCH 1 BODY.PEEK[3]")


def test_binary_syntax_errors(env: Env) -> None:
    c = _selected(env)
    assert b"a3 BAD" in c.cmd("FETCH 1 BINARY.SIZE[1]<0.2>")  # BINARY.SIZE has no partial
    assert b"a4 BAD" in c.cmd("FETCH 1 BINARY[1.NOPE]")


def test_binary_text_mime_and_header_sections(env: Env) -> None:
    """Beyond RFC 3516's part-number grammar, as Dovecot (and imaptest) do: TEXT is the
    decoded body, MIME and header sections are the stored header bytes."""
    single = (
        b"Subject: one\r\nContent-Transfer-Encoding: quoted-printable\r\n\r\nfoo=3Dbar=\r\nbaz\r\n"
    )
    c = _selected(env, single)
    out = c.cmd("FETCH 1 (BINARY.PEEK[TEXT] BINARY.SIZE[TEXT])")
    assert b"BINARY[TEXT] {12}\r\nfoo=barbaz\r\n" in out and b"BINARY.SIZE[TEXT] 12" in out, out
    env.deliver(MESSAGE)
    c.cmd("NOOP")
    out = c.cmd("FETCH 2 (BINARY.PEEK[1.MIME] BINARY.PEEK[HEADER.FIELDS (MIME-Version)])")
    assert b"BINARY[1.MIME] {37}\r\nContent-Transfer-Encoding: base64\r\n\r\n" in out, out
    assert b"BINARY[HEADER.FIELDS (MIME-Version)] {21}\r\nMIME-Version: 1.0\r\n\r\n" in out, out
    # TEXT of a multipart is its body as stored (a container has no encoding of its own).
    body = MESSAGE.split(b"\r\n\r\n", 1)[1]
    assert b"BINARY[TEXT] {%d}\r\n" % len(body) in c.cmd("FETCH 2 BINARY.PEEK[TEXT]")
    assert b"BINARY[1.TEXT] {0}\r\n" in c.cmd("FETCH 2 BINARY.PEEK[1.TEXT]")  # not a message


def test_partial_without_a_length_runs_to_the_end(env: Env) -> None:
    c = _selected(env, b"Subject: p\r\n\r\n0123456789\r\n")
    out = c.cmd("FETCH 1 (BODY.PEEK[TEXT]<4> BINARY.PEEK[TEXT]<8>)")
    assert b"BODY[TEXT]<4> {8}\r\n456789\r\n" in out, out
    assert b"BINARY[TEXT]<8> {4}\r\n89\r\n" in out, out
    assert b"BAD" in c.cmd("FETCH 1 BODY.PEEK[TEXT]<4.0>")


def test_append_literal8_keeps_nul_octets(env: Env) -> None:
    c = env.connect(login=ALICE)
    data = b"Subject: raw\r\nContent-Transfer-Encoding: binary\r\n\r\nhello\x00world\r\n"
    out = c.send(b"a1 APPEND INBOX ~{%d}\r\n" % len(data))
    assert out.startswith(b"+ "), out
    assert b"a1 OK [APPENDUID" in c.send(data + b"\r\n")
    out = c.send(b"a2 APPEND INBOX (\\Seen) ~{%d+}\r\n" % len(data) + data + b"\r\n")
    assert b"a2 OK [APPENDUID" in out, out
    c.cmd("SELECT INBOX")
    out = c.cmd("FETCH 1:2 (BINARY.PEEK[1] RFC822.SIZE)")
    assert out.count(b"BINARY[1] ~{13}\r\nhello\x00world\r\n") == 2, out
    assert out.count(b"RFC822.SIZE %d" % len(data)) == 2


def test_nul_needs_literal8_and_literal8_needs_append(env: Env) -> None:
    c = env.connect(login=ALICE)
    out = c.send(b"a1 APPEND INBOX {7+}\r\nS: x\r\n\x00\r\n")
    assert out == b"a1 BAD NUL octets need a literal8 (~{n})\r\n", out
    out = c.send(b"a2 SELECT ~{5+}\r\nINBOX\r\n")
    assert out.startswith(b"a2 BAD A literal8 is allowed only"), out
    out = c.send(b"a3 APPEND ~{5+}\r\nINBOX {3+}\r\nS:x\r\n")
    assert out.startswith(b"a3 BAD A literal8 is allowed only"), out
    c.cmd("SELECT INBOX")
    out = c.send(b"a5 SEARCH TEXT ~{1+}\r\nx\r\n")
    assert out.startswith(b"a5 BAD A literal8"), out
    out = c.send(b"a6 SEARCH TEXT {1+}\r\n\x00\r\n")
    assert out.startswith(b"a6 BAD NUL"), out


def test_body_of_a_message_with_nul_has_no_nul_on_the_wire(env: Env) -> None:
    c = env.connect(login=ALICE)
    data = b"Subject: raw\r\nContent-Transfer-Encoding: binary\r\n\r\nhello\x00world\r\n"
    assert b"OK" in c.send(b"a1 APPEND INBOX ~{%d+}\r\n" % len(data) + data + b"\r\n")
    c.cmd("SELECT INBOX")
    out = c.cmd("FETCH 1 (RFC822.SIZE BODY.PEEK[] BODY.PEEK[TEXT]<5.3>)")
    assert b"\0" not in out, out
    assert b"RFC822.SIZE %d" % len(data) in out
    assert b"BODY[] {%d}\r\n" % len(data) + data.replace(b"\0", b"\x80") in out
    assert b"BODY[TEXT]<5> {3}\r\n\x80wo" in out
    assert b"BINARY[1] ~{13}\r\nhello\x00world\r\n" in c.cmd("FETCH 1 BINARY.PEEK[1]")
