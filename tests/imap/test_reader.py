"""CommandReader: framing of lines and literals, limits, resynchronisation after errors."""

from __future__ import annotations

import time

import pytest

from mailgw.imap.parser import (
    Atom,
    BadCommand,
    Command,
    CommandReader,
    Event,
    Line,
    NeedContinuation,
    Nil,
    Number,
    PList,
    Section,
    String,
)


def feed_bytewise(reader: CommandReader, data: bytes) -> list[Event]:
    events: list[Event] = []
    for i in range(len(data)):
        events.extend(reader.feed(data[i : i + 1]))
    return events


def only(events: list[Event]) -> Event:
    assert len(events) == 1, events
    return events[0]


def test_simple_command_and_tree() -> None:
    r = CommandReader()
    ev = only(r.feed(b'a1 list "" (a "b c" NIL 12 (x)) foo\r\n'))
    assert ev == Command(
        "a1",
        "LIST",
        (
            String(b""),
            PList((Atom("a"), String(b"b c"), Nil("NIL"), Number(12, "12"), PList((Atom("x"),)))),
            Atom("foo"),
        ),
    )
    assert not r.in_command and r.buffered == 0


def test_quoted_escapes_and_8bit() -> None:
    r = CommandReader()
    ev = only(r.feed(b'a SEARCH SUBJECT "a\\"b\\\\c \xc3\xa9"\r\n'))
    assert isinstance(ev, Command)
    assert ev.args[1] == String(b'a"b\\c \xc3\xa9')


@pytest.mark.parametrize(
    ("line", "text"),
    [
        (b'a X "abc\r\n', "Unterminated quoted string"),
        (b'a X "a\\nb"\r\n', "Invalid escape in quoted string"),
        (b'a X "a\x00b"\r\n', "NUL in command line"),
        (b'a X "a\\"b\x00"\r\n', "NUL in command line"),
        (b"a X a\x00b\r\n", "NUL in command line"),
        (b"a X \x01\r\n", "Control character in command line"),
        (b"a X caf\xc3\xa9\r\n", "8-bit data outside a quoted string"),
        (b"a X (a))\r\n", "Unexpected )"),
        (b"a X {5\r\n", "Literal announcement must end the line"),
        (b"a X {5} x\r\n", "Literal announcement must end the line"),
        (b'a X "a"b\r\n', "Missing space between arguments"),
        (b"a X {-5}\r\n", "Invalid literal size"),
        (b"a X {abc}\r\n", "Invalid literal size"),
        (b"a X {}\r\n", "Invalid literal size"),
        (b"a X {5++}\r\n", "Invalid literal size"),
        (b"a X {99999999999999999999}\r\n", "Invalid literal size"),
        (b"a X {9999999999999999999}\r\n", "Invalid literal size"),
        (b"a X BODY[1]<0.0>\r\n", "Invalid <partial> specification"),
        (b"a X BODY[1]<5.>\r\n", "Invalid <partial> specification"),
        (b"a X BODY[1]<5.0>\r\n", "Invalid <partial> specification"),
    ],
)
def test_bad_lines(line: bytes, text: str) -> None:
    r = CommandReader()
    events = r.feed(line + b"b NOOP\r\n")
    assert events == [BadCommand("a", text), Command("b", "NOOP", ())]


def test_unbalanced_open_paren() -> None:
    r = CommandReader()
    assert r.feed(b"a X (a (b)\r\n") == [BadCommand("a", "Unbalanced parentheses or brackets")]


@pytest.mark.parametrize(
    ("line", "event"),
    [
        (b"\r\n", BadCommand(None, "Empty command line")),
        (b"* NOOP\r\n", BadCommand(None, "Invalid tag")),
        (b"a+b NOOP\r\n", BadCommand(None, "Invalid tag")),
        (b"(a NOOP\r\n", BadCommand(None, "Invalid tag")),
        (b"a1\r\n", BadCommand("a1", "Missing command name")),
        (b"a1 \r\n", BadCommand("a1", "Missing command name")),
        (b"a1 NOOP \r\n", BadCommand("a1", "Trailing space")),
        (b"a1 9X\r\n", BadCommand("a1", "Missing command name")),
        (b"a1 NO(OP\r\n", BadCommand("a1", "Invalid command name")),
        (b"a1 UID\r\n", BadCommand("a1", "UID needs a command")),
    ],
)
def test_bad_heads(line: bytes, event: BadCommand) -> None:
    assert CommandReader().feed(line) == [event]


def test_uid_prefix_and_bare_lf() -> None:
    r = CommandReader()
    assert r.feed(b"t uid fetch 1:* FLAGS\n") == [
        Command("t", "FETCH", (Atom("1:*"), Atom("FLAGS")), uid=True)
    ]
    assert r.feed(b"]tag] NOOP\r\n") == [Command("]tag]", "NOOP", ())]


def test_synchronising_literal_byte_by_byte() -> None:
    r = CommandReader()
    data = b"a1 LOGIN {4}\r\nuser {4}\r\np\x00ss\r\na2 NOOP\r\n"
    events = feed_bytewise(r, data)
    assert events == [
        NeedContinuation("a1", "LOGIN", 4),
        NeedContinuation("a1", "LOGIN", 4),
        Command("a1", "LOGIN", (String(b"user", literal=True), String(b"p\x00ss", literal=True))),
        Command("a2", "NOOP", ()),
    ]


def test_literal_containing_crlf_and_parens() -> None:
    r = CommandReader()
    body = b"Subject: x\r\n\r\n(unbalanced {5}\r\n"
    events = r.feed(b"a APPEND INBOX (\\Seen) {%d+}\r\n" % len(body) + body + b"\r\n")
    assert events == [
        Command(
            "a",
            "APPEND",
            (Atom("INBOX"), PList((Atom("\\Seen"),)), String(body, literal=True)),
        )
    ]


def test_literal_plus_needs_no_continuation_and_byte_by_byte() -> None:
    r = CommandReader()
    events = feed_bytewise(r, b"a LOGIN {4+}\r\nuser {4+}\r\npass\r\n")
    assert events == [
        Command("a", "LOGIN", (String(b"user", literal=True), String(b"pass", literal=True)))
    ]


def test_literal8_and_literal_inside_list_and_section() -> None:
    r = CommandReader()
    events = r.feed(b"a APPEND x ~{3+}\r\n\x00\x01\x02\r\n")
    assert events == [Command("a", "APPEND", (Atom("x"), String(b"\x00\x01\x02", True, True)))]
    events = r.feed(b"b FETCH 1 (BODY[HEADER.FIELDS ({4+}\r\nFrom To)])\r\n")
    ev = only(events)
    assert isinstance(ev, Command)
    section = ev.args[1].items[0]  # type: ignore[union-attr]
    assert section == Section(
        "BODY",
        (Atom("HEADER.FIELDS"), PList((String(b"From", literal=True), Atom("To")))),
        None,
        None,
    )


def test_literal_must_be_followed_by_space_or_end() -> None:
    r = CommandReader()
    events = r.feed(b"a LOGIN {4+}\r\nuserpass\r\nb NOOP\r\n")
    assert events == [BadCommand("a", "Missing space after literal"), Command("b", "NOOP", ())]


def test_literal_minus_limit() -> None:
    r = CommandReader(literal_minus=True)
    assert r.feed(b"a APPEND x {4096+}\r\n" + b"x" * 4096 + b"\r\n")[0].name == "APPEND"  # type: ignore[union-attr]
    events = r.feed(b"b APPEND x {4097+}\r\n" + b"y" * 4097 + b"\r\nc NOOP\r\n")
    assert events == [
        BadCommand("b", "Literal of 4097 octets is too large", "TOOBIG"),
        Command("c", "NOOP", ()),
    ]
    # synchronising literals above 4096 are still fine with LITERAL-
    assert r.feed(b"d APPEND x {5000}\r\n") == [NeedContinuation("d", "APPEND", 5000)]


def test_oversize_sync_literal_refused_before_reading() -> None:
    r = CommandReader(max_literal=100)
    events = r.feed(b"a APPEND x {101}\r\n")
    assert events == [BadCommand("a", "Literal of 101 octets is too large", "TOOBIG")]
    # the client does not send the literal after the refusal; next line is a command
    assert r.feed(b"b NOOP\r\n") == [Command("b", "NOOP", ())]


def test_oversize_nonsync_literal_discarded_without_buffering() -> None:
    r = CommandReader(max_literal=100)
    size = 50_000_000
    events = r.feed(b"a APPEND x {%d+}\r\n" % size)
    assert events == [BadCommand("a", f"Literal of {size} octets is too large", "TOOBIG")]
    chunk = b"z" * 1_000_000
    for _ in range(size // len(chunk)):
        assert r.feed(chunk) == []
        assert r.buffered == 0
    # the rest of the refused command (another literal) is skipped too
    assert r.feed(b" (\\Seen) {3+}\r\nabc\r\nb NOOP\r\n") == [Command("b", "NOOP", ())]


def test_impossible_nonsync_size_does_not_swallow_input() -> None:
    r = CommandReader()
    events = r.feed(b"a APPEND x {99999999999999999999+}\r\nb NOOP\r\n")
    assert events == [BadCommand("a", "Invalid literal size"), Command("b", "NOOP", ())]


def test_bad_line_with_nonsync_literal_skips_the_literal() -> None:
    r = CommandReader()
    events = r.feed(b'a APPEND "x {3+}\r\n)(\r\nb NOOP\r\n')
    assert events == [BadCommand("a", "Unterminated quoted string"), Command("b", "NOOP", ())]


def test_cancel_literal() -> None:
    r = CommandReader()
    assert r.feed(b"a APPEND x {10}\r\n") == [NeedContinuation("a", "APPEND", 10)]
    assert r.in_command
    r.cancel_literal()
    assert not r.in_command
    assert r.feed(b"b NOOP\r\n") == [Command("b", "NOOP", ())]


def test_overlong_line_skipped_without_buffering() -> None:
    r = CommandReader(max_line=100)
    events = r.feed(b"a1 SEARCH " + b"x" * 200)
    assert events == [BadCommand("a1", "Command line too long")]
    for _ in range(100):
        assert r.feed(b"y" * 10_000) == []
        assert r.buffered == 0
    assert r.feed(b"\r\nb NOOP\r\n") == [Command("b", "NOOP", ())]


def test_overlong_line_ending_with_nonsync_literal() -> None:
    r = CommandReader(max_line=50)
    events = r.feed(b"a1 APPEND " + b"x" * 100)
    assert events == [BadCommand("a1", "Command line too long")]
    assert r.feed(b" {5+}\r\nhello\r\nb NOOP\r\n") == [Command("b", "NOOP", ())]


def test_overlong_complete_line_and_garbage_tag() -> None:
    r = CommandReader(max_line=20)
    events = r.feed(b"(((" + b"x" * 30 + b"\r\nb NOOP\r\n")
    assert events == [BadCommand(None, "Command line too long"), Command("b", "NOOP", ())]


def test_nesting_depth_limit() -> None:
    r = CommandReader()
    ok = b"a X " + b"(" * 20 + b")" * 20 + b"\r\n"
    assert isinstance(only(r.feed(ok)), Command)
    deep = b"a X " + b"(" * 21 + b")" * 21 + b"\r\n"
    assert r.feed(deep) == [BadCommand("a", "Too deeply nested")]


def test_ten_thousand_parens_before_login() -> None:
    r = CommandReader(max_line=1_000_000)
    start = time.perf_counter()
    events = r.feed(b"a LOGIN " + b"(" * 10_000 + b")" * 10_000 + b"\r\nb NOOP\r\n")
    assert time.perf_counter() - start < 1.0
    assert events == [BadCommand("a", "Too deeply nested"), Command("b", "NOOP", ())]
    # with the default line limit the same input is refused as too long
    r = CommandReader()
    events = r.feed(b"a LOGIN " + b"(" * 10_000 + b"\r\nb NOOP\r\n")
    assert events == [BadCommand("a", "Command line too long"), Command("b", "NOOP", ())]


def test_nesting_limit_across_literals() -> None:
    r = CommandReader(max_depth=2)
    events = r.feed(b"a X ((({1+}\r\nx)))\r\n")
    assert events == [BadCommand("a", "Too deeply nested")]


def test_max_args() -> None:
    r = CommandReader(max_args=10)
    assert isinstance(only(r.feed(b"a X " + b"x " * 10 + b"\r\n")), Command)
    assert r.feed(b"a X " + b"x " * 11 + b"\r\n") == [BadCommand("a", "Too many arguments")]
    assert r.feed(b"a X " + b"x " * 10 + b"{1+}\r\nx\r\n") == [
        BadCommand("a", "Too many arguments")
    ]
    assert r.feed(b"b NOOP\r\n") == [Command("b", "NOOP", ())]


def test_expect_line_and_discard_buffered() -> None:
    r = CommandReader()
    r.receive(b"a IDLE\r\nDONE\r\nb NOOP\r\n")
    assert r.next_event() == Command("a", "IDLE", ())
    r.expect_line()
    assert r.next_event() == Line(b"DONE")
    assert r.next_event() == Command("b", "NOOP", ())
    assert r.next_event() is None
    r.receive(b"c STARTTLS\r\nd LOGIN x y\r\n")
    assert r.next_event() == Command("c", "STARTTLS", ())
    assert r.discard_buffered() == len(b"d LOGIN x y\r\n")
    assert r.next_event() is None


def test_expect_line_with_partial_input() -> None:
    r = CommandReader()
    r.expect_line()
    assert r.feed(b"dGVz") == []
    assert r.feed(b"dA==\r\n") == [Line(b"dGVzdA==")]


def test_sections_and_brackets_in_atoms() -> None:
    r = CommandReader()
    ev = only(r.feed(b"a FETCH 1 (BODY.PEEK[1.2.MIME] BINARY[] body[]<0.10>)\r\n"))
    assert isinstance(ev, Command)
    items = ev.args[1].items  # type: ignore[union-attr]
    assert items[0] == Section("BODY.PEEK", (Atom("1.2.MIME"),), None, "BODY.PEEK[1.2.MIME]")
    assert items[1] == Section("BINARY", (), None, "BINARY[]")
    assert items[2] == Section("BODY", (), (0, 10), "body[]<0.10>")
    ev = only(r.feed(b"a SELECT [Gmail]/Sent]x\r\n"))
    assert ev == Command("a", "SELECT", (Atom("[Gmail]/Sent]x"),))
    # an unterminated section is unbalanced
    assert r.feed(b"a FETCH 1 BODY[1\r\n") == [
        BadCommand("a", "Unbalanced parentheses or brackets")
    ]
    assert r.feed(b"a FETCH 1 BODY[1])\r\n") == [BadCommand("a", "Unexpected )")]


def test_cr_inside_quoted_string() -> None:
    assert CommandReader().feed(b'a X "a\rb"\r\n') == [
        BadCommand("a", "CR or LF in a quoted string")
    ]


def test_overlong_continuation_line_keeps_the_tag() -> None:
    r = CommandReader(max_line=30)
    assert r.feed(b"a1 LOGIN {4+}\r\nuser ") == []
    assert r.feed(b"x" * 40) == [BadCommand("a1", "Command line too long")]
    assert r.feed(b"\r\nb NOOP\r\n") == [Command("b", "NOOP", ())]


def test_overlong_raw_line_has_no_tag() -> None:
    r = CommandReader(max_line=10)
    r.expect_line()
    assert r.feed(b"abc " + b"x" * 20 + b"\r\n") == [BadCommand(None, "Command line too long")]
    r.expect_line()
    assert r.feed(b"abc " + b"x" * 20) == [BadCommand(None, "Command line too long")]
    assert r.feed(b"\r\nb NOOP\r\n") == [Command("b", "NOOP", ())]


def test_bracket_words_inside_sections() -> None:
    r = CommandReader()
    ev = only(r.feed(b"a FETCH 1 BODY[a[b]\r\n"))
    assert isinstance(ev, Command)
    assert ev.args[1] == Section("BODY", (Atom("a[b"),), None, "BODY[a[b]")
    deep = CommandReader(max_depth=1)
    assert deep.feed(b"a FETCH 1 (BODY[1])\r\n") == [BadCommand("a", "Too deeply nested")]
