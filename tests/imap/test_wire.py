"""Response formatting and the LIST pattern matcher."""

from __future__ import annotations

import time

import pytest

from mailgw.imap import wire


def test_quote_chooses_form() -> None:
    assert wire.quote("hello world") == b'"hello world"'
    assert wire.quote(b"") == b'""'
    assert wire.quote('a"b\\c') == b'"a\\"b\\\\c"'
    assert wire.quote(b"a\r\nb") == b"{4}\r\na\r\nb"
    assert wire.quote(b"a\nb") == b"{3}\r\na\nb"
    assert wire.quote(b"a\x00b") == b"{3}\r\na\x80b"  # no NUL in a plain literal
    assert wire.quote("café") == b"{5}\r\ncaf\xc3\xa9"
    assert wire.quote("café", utf8=True) == b'"caf\xc3\xa9"'
    assert wire.quote(b"\xff", utf8=True) == b"{1}\r\n\xff"
    assert wire.quote(b"\xc3\xa9\r\n", utf8=True) == b"{4}\r\n\xc3\xa9\r\n"
    assert wire.quote(b"x" * 2000) == b"{2000}\r\n" + b"x" * 2000
    assert wire.literal(b"\x00\x01", binary=True) == b"~{2}\r\n\x00\x01"


def test_astring_and_nil() -> None:
    assert wire.astring("Sent") == b"Sent"
    assert wire.astring("NIL") == b'"NIL"'
    assert wire.astring("nil") == b'"nil"'
    assert wire.astring("") == b'""'
    for special in ("a b", "a(b", "a)", "a{", "a%", "a*", 'a"', "a\\", "a]"):
        assert wire.astring(special).startswith(b'"'), special
    assert wire.astring("[Gmail]/Sent") == b'"[Gmail]/Sent"'
    assert wire.nil_or_string(None) == b"NIL"
    assert wire.nil_or_string("NIL") == b'"NIL"'
    assert wire.nil_or_string(b"x\r\n") == b"{3}\r\nx\r\n"


def test_lists_flags_mailbox_names() -> None:
    assert wire.plist([b"a", wire.number(5)]) == b"(a 5)"
    assert wire.plist([]) == b"()"
    assert wire.flag_list(["\\Seen", "$Label"]) == b"(\\Seen $Label)"
    assert wire.mailbox_name("Entwürfe") == b"Entw&APw-rfe"
    assert wire.mailbox_name("Entwürfe", utf8=True) == b'"Entw\xc3\xbcrfe"'
    assert wire.mailbox_name("inbox") == b"INBOX"
    assert wire.mailbox_name("A & B") == b'"A &- B"'
    assert wire.mailbox_name("Sent Items") == b'"Sent Items"'


def test_responses() -> None:
    assert wire.untagged("5", "EXISTS") == b"* 5 EXISTS\r\n"
    assert wire.untagged(b"FLAGS", wire.flag_list(["\\Seen"])) == b"* FLAGS (\\Seen)\r\n"
    assert wire.tagged("a1", "OK", "done") == b"a1 OK done\r\n"
    assert (
        wire.tagged("a1", "NO", "bad\r\nthing", wire.TRYCREATE)
        == b"a1 NO [TRYCREATE] bad thing\r\n"
    )
    assert wire.tagged("a1", "BAD", "") == b"a1 BAD bad\r\n"
    assert wire.untagged_status("OK", "x", wire.code_uidnext(7)) == b"* OK [UIDNEXT 7] x\r\n"
    assert wire.continuation() == b"+ Ready for literal data\r\n"
    assert wire.continuation("idling") == b"+ idling\r\n"


def test_response_codes() -> None:
    assert wire.code_uidvalidity(3857529045) == b"UIDVALIDITY 3857529045"
    assert wire.code_unseen(4) == b"UNSEEN 4"
    assert wire.code_highestmodseq(90060115205545359) == b"HIGHESTMODSEQ 90060115205545359"
    assert (
        wire.code_permanentflags(["\\Seen", "\\Deleted"])
        == b"PERMANENTFLAGS (\\Seen \\Deleted \\*)"
    )
    assert wire.code_permanentflags([], new_keywords=False) == b"PERMANENTFLAGS ()"
    assert wire.code_appenduid(38505, [3955]) == b"APPENDUID 38505 3955"
    assert wire.code_appenduid(1, [4, 5, 6, 9]) == b"APPENDUID 1 4:6,9"
    assert wire.code_copyuid(38505, [304, 319, 320], [3956, 3957, 3958]) == (
        b"COPYUID 38505 304,319:320 3956:3958"
    )
    assert wire.code_modified([7, 9]) == b"MODIFIED 7,9"
    assert wire.code_capability(["IMAP4rev1", "IDLE"]) == b"CAPABILITY IMAP4rev1 IDLE"
    assert wire.code_badcharset() == b"BADCHARSET (US-ASCII UTF-8)"
    assert wire.code_badcharset() == wire.BADCHARSET
    for code in (wire.TOOBIG, wire.ALERT, wire.NONEXISTENT, wire.ALREADYEXISTS,
                 wire.AUTHENTICATIONFAILED, wire.CANNOT, wire.LIMIT, wire.OVERQUOTA):  # fmt: skip
        assert code.isupper()


NAMES = ["INBOX", "INBOX/Sub", "Sent", "Sent/2024", "Sent/2024/Jan", "a.b", "a+b", "axb", "[x]"]


@pytest.mark.parametrize(
    ("reference", "pattern", "expected"),
    [
        ("", "*", NAMES),
        ("", "%", ["INBOX", "Sent", "a.b", "a+b", "axb", "[x]"]),
        ("", "Sent/%", ["Sent/2024"]),
        ("", "Sent/*", ["Sent/2024", "Sent/2024/Jan"]),
        ("Sent/", "%", ["Sent/2024"]),
        ("Sent", "/2024", ["Sent/2024"]),
        ("", "inbox", ["INBOX"]),
        ("", "inbox/%", ["INBOX/Sub"]),
        ("", "a.b", ["a.b"]),
        ("", "a+b", ["a+b"]),
        ("", "a.*", ["a.b"]),
        ("", "[x]", ["[x]"]),
        ("", "%/%/%", ["Sent/2024/Jan"]),
        ("", "*%", NAMES),
        ("", "%%", ["INBOX", "Sent", "a.b", "a+b", "axb", "[x]"]),
        ("", "", []),
        ("", "S*4", ["Sent/2024"]),
    ],
)
def test_list_patterns(reference: str, pattern: str, expected: list[str]) -> None:
    match = wire.compile_list_pattern(reference, pattern)
    assert [n for n in NAMES if match(n)] == expected


def test_list_pattern_reference_with_trailing_delimiter_and_absolute_pattern() -> None:
    match = wire.compile_list_pattern("Sent/", "/2024")
    assert match("Sent/2024")


@pytest.mark.parametrize("meta", list(".*+?()[]{}|\\^$"))
def test_regex_metacharacters_are_literal(meta: str) -> None:
    match = wire.compile_list_pattern("", f"a{meta}b")
    assert match(f"a{meta}b")
    if meta != "*":
        assert not match("axb")
        assert not match("ab")


def test_pathological_pattern_is_linear() -> None:
    match = wire.compile_list_pattern("", "*" * 5000 + "a" + "%*" * 2000 + "b")
    name = "a" * 255
    start = time.perf_counter()
    assert not match(name)
    assert match("x" * 200 + "a" + "y" * 50 + "b")
    match2 = wire.compile_list_pattern("", "*a*a*a*a*a*a*a*a*a*a*a*a*c")
    assert not match2("a" * 255)
    assert time.perf_counter() - start < 1.0


def test_other_delimiter() -> None:
    match = wire.compile_list_pattern("", "a.%", delimiter=".")
    assert match("a.b") and not match("a.b.c")


def test_plain_literals_never_carry_nul() -> None:
    assert wire.literal(b"a\0b") == b"{3}\r\na\x80b"  # one for one: the size stays true
    assert wire.literal(b"a\0b", binary=True) == b"~{3}\r\na\0b"
    assert wire.literal("plain") == b"{5}\r\nplain"
