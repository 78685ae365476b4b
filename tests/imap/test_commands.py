"""parse_command: the typed form of every supported command, and its syntax errors."""

from __future__ import annotations

import datetime

import pytest

from mailgw.imap.parser import (
    AgeKey,
    All,
    And,
    Append,
    AppendMessage,
    Authenticate,
    CancelUpdate,
    Command,
    CommandError,
    CommandReader,
    Copy,
    Create,
    DateKey,
    Delete,
    Enable,
    Expunge,
    Fetch,
    FetchAtt,
    FlagKey,
    GetQuota,
    GetQuotaRoot,
    HeaderKey,
    Id,
    ListMailboxes,
    Login,
    Lsub,
    ModSeqKey,
    Move,
    Not,
    Or,
    Qresync,
    Rename,
    Search,
    SectionSpec,
    Select,
    SeqKey,
    Simple,
    SizeKey,
    Sort,
    Status,
    Store,
    Subscribe,
    TextKey,
    Thread,
    TypedCommand,
    Unsubscribe,
    decode_mailbox,
    parse_command,
    parse_date,
    parse_date_time,
)
from mailgw.imap.sequence import parse_sequence_set as seq


def parse(data: bytes, utf8: bool = False) -> TypedCommand:
    reader = CommandReader()
    events = reader.feed(data)
    assert len(events) == 1 and isinstance(events[0], Command), events
    return parse_command(events[0], utf8)


def error(data: bytes) -> CommandError:
    with pytest.raises(CommandError) as info:
        parse(data)
    return info.value


@pytest.mark.parametrize(
    "name",
    ["CAPABILITY", "NOOP", "LOGOUT", "STARTTLS", "CHECK", "CLOSE", "UNSELECT", "IDLE", "NAMESPACE"],
)
def test_no_argument_commands(name: str) -> None:
    assert parse(b"a %s\r\n" % name.lower().encode()) == Simple(name)
    assert error(b"a %s x\r\n" % name.encode()).text == "Too many arguments"


def test_unknown_and_bad_uid_commands() -> None:
    assert error(b"a FROB\r\n").text == "Unknown command"
    assert error(b"a UID NOOP\r\n").text == "UID NOOP is not a command"


def test_login() -> None:
    assert parse(b'a LOGIN joe "p a\\"ss"\r\n') == Login(b"joe", b'p a"ss')
    assert parse(b"a LOGIN {3+}\r\nj\xc3\xa9 {1+}\r\n\xff\r\n") == Login(b"j\xc3\xa9", b"\xff")
    assert error(b"a LOGIN joe\r\n").text == "Missing password"
    assert error(b"a LOGIN joe (x)\r\n").text == "Expected password"
    assert error(b"a LOGIN a b c\r\n").text == "Too many arguments"


def test_authenticate() -> None:
    assert parse(b"a AUTHENTICATE plain\r\n") == Authenticate("PLAIN")
    assert parse(b"a AUTHENTICATE PLAIN AGpvZQBwdw==\r\n") == Authenticate("PLAIN", b"AGpvZQBwdw==")
    assert parse(b"a AUTHENTICATE PLAIN =\r\n") == Authenticate("PLAIN", b"=")
    assert error(b'a AUTHENTICATE "PLAIN"\r\n').text == "Invalid mechanism"


def test_select_examine_condstore_qresync() -> None:
    assert parse(b"a SELECT inbox\r\n") == Select("INBOX")
    assert parse(b'a EXAMINE "Sent"\r\n') == Select("Sent", readonly=True)
    assert parse(b"a SELECT x (CONDSTORE)\r\n") == Select("x", condstore=True)
    assert parse(b"a SELECT x (QRESYNC (67890007 20050715194045000 41,43:211,214:541))\r\n") == (
        Select("x", qresync=Qresync(67890007, 20050715194045000, seq("41,43:211,214:541")))
    )
    cmd = parse(b"a SELECT x (QRESYNC (1 2 1:10 (1,5 100,500)))\r\n")
    assert cmd == Select("x", qresync=Qresync(1, 2, seq("1:10"), (seq("1,5"), seq("100,500"))))
    assert parse(b"a SELECT x (QRESYNC (1 2 (1 5)))\r\n") == Select(
        "x", qresync=Qresync(1, 2, None, (seq("1"), seq("5")))
    )
    assert error(b"a SELECT x (FOO)\r\n").text == "Unknown SELECT parameter"
    assert error(b"a SELECT x (QRESYNC (0 2))\r\n").text == "Number out of range for UIDVALIDITY"
    assert error(b"a SELECT x (QRESYNC (1))\r\n").text == "Missing mod-sequence"
    assert error(b"a SELECT x y\r\n").text == "Expected a parenthesised list for SELECT parameters"


def test_mailbox_name_decoding() -> None:
    assert parse(b"a CREATE Entw&APw-rfe\r\n") == Create("Entwürfe")
    assert parse('a CREATE "Entwürfe"\r\n'.encode(), utf8=True) == Create("Entwürfe")
    assert parse(b"a DELETE inbox/Sub\r\n") == Delete("INBOX/Sub")
    err = error(b'a CREATE "Entw\xc3\xbcrfe"\r\n')
    assert (err.status, err.text) == ("NO", "Mailbox name is not valid mUTF-7 (8-bit data sent)")
    err = error(b"a CREATE A&B\r\n")
    assert (err.status, err.text) == ("NO", "Mailbox name is not valid mUTF-7")
    assert error(b'a CREATE "\xff"\r\n').status == "NO"
    assert decode_mailbox(b"&-") == "&"


def test_create_special_use() -> None:
    assert parse(b"a CREATE Sent (USE (\\sent \\Archive))\r\n") == Create(
        "Sent", ("\\Sent", "\\Archive")
    )
    err = error(b"a CREATE x (USE (\\Bogus))\r\n")
    assert (err.status, err.code) == ("NO", "USEATTR")
    assert error(b"a CREATE x (FOO (\\Sent))\r\n").text == "Unknown CREATE parameter"


def test_mailbox_commands() -> None:
    assert parse(b"a RENAME INBOX Old\r\n") == Rename("INBOX", "Old")
    assert parse(b"a SUBSCRIBE x\r\n") == Subscribe("x")
    assert parse(b"a UNSUBSCRIBE {1+}\r\ny\r\n") == Unsubscribe("y")
    assert parse(b'a GETQUOTA ""\r\n') == GetQuota("")
    assert parse(b"a GETQUOTAROOT INBOX\r\n") == GetQuotaRoot("INBOX")
    assert error(b"a RENAME x\r\n").text == "Missing mailbox name"


def test_list_basic_and_extended() -> None:
    assert parse(b'a LIST "" *\r\n') == ListMailboxes("", ("*",))
    assert parse(b"a LIST ~/Mail/ %\r\n") == ListMailboxes("~/Mail/", ("%",))
    assert parse(b'a LIST "" "&AMk-t&AOk-/%"\r\n') == ListMailboxes("", ("Été/%",))
    cmd = parse(
        b'a LIST (SUBSCRIBED) "" "*" RETURN (CHILDREN SPECIAL-USE STATUS (MESSAGES UNSEEN))\r\n'
    )
    assert cmd == ListMailboxes(
        "",
        ("*",),
        frozenset({"SUBSCRIBED"}),
        frozenset({"CHILDREN", "SPECIAL-USE", "STATUS"}),
        ("MESSAGES", "UNSEEN"),
        True,
    )
    assert parse(b'a LIST "" ("INBOX" Sent%)\r\n') == ListMailboxes(
        "", ("INBOX", "Sent%"), extended=True
    )
    assert parse(b'a LIST () "" x RETURN ()\r\n') == ListMailboxes("", ("x",), extended=True)
    assert error(b'a LIST (RECURSIVEMATCH) "" *\r\n').text.startswith("RECURSIVEMATCH")
    assert error(b'a LIST (FOO) "" *\r\n').text.startswith("Unknown LIST selection")
    assert error(b'a LIST "" * FOO (X)\r\n').text == "Expected RETURN"
    assert error(b'a LIST "" * RETURN (BAR)\r\n').text == "Unknown LIST return option"
    assert error(b'a LIST "" ()\r\n').text == "Empty pattern list"
    assert parse(b'a LSUB "" Sent/*\r\n') == Lsub("", "Sent/*")


def test_status() -> None:
    assert parse(b"a STATUS INBOX (messages UIDNEXT uidvalidity UNSEEN HIGHESTMODSEQ)\r\n") == (
        Status("INBOX", ("MESSAGES", "UIDNEXT", "UIDVALIDITY", "UNSEEN", "HIGHESTMODSEQ"))
    )
    assert error(b"a STATUS INBOX ()\r\n").text == "Empty status item list"
    assert error(b"a STATUS INBOX (FOO)\r\n").text == "Unknown status item FOO"
    assert error(b"a STATUS INBOX MESSAGES\r\n").text.startswith("Expected a parenthesised")


def test_append_forms() -> None:
    assert parse(b"a APPEND INBOX {5+}\r\nhello\r\n") == Append(
        "INBOX", (AppendMessage((), None, b"hello"),)
    )
    cmd = parse(b'a APPEND x (\\Seen $Work) " 5-Jul-2024 10:11:12 -0230" {2+}\r\nhi\r\n')
    when = datetime.datetime(
        2024, 7, 5, 10, 11, 12, tzinfo=datetime.timezone(-datetime.timedelta(hours=2, minutes=30))
    )
    assert cmd == Append("x", (AppendMessage(("\\Seen", "$Work"), when, b"hi"),))
    multi = parse(b"a APPEND x () {1+}\r\n1 (\\Draft) ~{1+}\r\n\x00\r\n")
    assert multi == Append(
        "x", (AppendMessage((), None, b"1"), AppendMessage(("\\Draft",), None, b"\x00", True))
    )
    assert error(b'a APPEND x "hello"\r\n').text.startswith("Invalid date-time")
    assert error(b'a APPEND x "5-Jul-2024 10:11:12 +0000" "m"\r\n').text.startswith(
        "The message must be sent as a literal"
    )
    assert error(b"a APPEND x (\\Recent) {1+}\r\nm\r\n").text == "Invalid system flag \\Recent"
    assert error(b"a APPEND x\r\n").text == "Missing message literal"


@pytest.mark.parametrize(
    "text",
    ["31-Feb-2024 10:00:00 +0000", "01-Foo-2024 10:00:00 +0000", "01-Jan-2024 24:00:00 +0000",
     "01-Jan-2024 10:60:00 +0000", "01-Jan-2024 10:00:00 +2400", "01-Jan-2024 10:00:00 +0060",
     "01-Jan-2024 10:00:00", "1-Jan-24 10:00:00 +0000", "01-Jan-2024  10:00:00 +0000",
     "  -Jan-2024 10:00:00 +0000"],
)  # fmt: skip
def test_invalid_date_times(text: str) -> None:
    with pytest.raises(ValueError):
        parse_date_time(text)


def test_dates() -> None:
    assert parse_date("1-feb-1999") == datetime.date(1999, 2, 1)
    assert parse_date_time("01-Jan-2024 00:00:00 +0000").tzinfo == datetime.UTC
    for bad in ("31-Apr-2024", "1-Febr-1999", "1-Feb-99", "001-Feb-1999", "1/Feb/1999", "x"):
        with pytest.raises(ValueError):
            parse_date(bad)


def test_expunge() -> None:
    assert parse(b"a EXPUNGE\r\n") == Expunge()
    assert parse(b"a UID EXPUNGE 3:5,9\r\n") == Expunge(seq("3:5,9"))
    assert error(b"a UID EXPUNGE\r\n").text == "Missing UID set"
    assert error(b"a UID EXPUNGE 0\r\n").text.startswith("Invalid sequence set")


def test_search_every_key() -> None:
    cmd = parse(
        b"a SEARCH ALL ANSWERED BCC b BEFORE 1-Feb-2024 BODY x CC c DELETED DRAFT FLAGGED"
        b' FROM "f" HEADER X-Spam yes KEYWORD $Junk LARGER 100 NEW NOT SEEN OLD ON 2-Feb-2024'
        b" OR RECENT UNSEEN SENTBEFORE 3-Mar-2024 SENTON 4-Mar-2024 SENTSINCE 5-Mar-2024"
        b" SINCE 6-Mar-2024 SMALLER 5 SUBJECT s TEXT t TO t UID 1:* UNANSWERED UNDELETED"
        b" UNDRAFT UNFLAGGED UNKEYWORD foo UNSEEN 1,2:* (SEEN DELETED) MODSEQ 5"
        b' MODSEQ "/flags/\\\\draft" all 7 OLDER 60 YOUNGER 30 $\r\n'
    )
    assert isinstance(cmd, Search)
    d = datetime.date
    assert cmd.key == And(
        (
            All(),
            FlagKey("\\Answered"),
            HeaderKey("Bcc", "b"),
            DateKey("INTERNAL", "BEFORE", d(2024, 2, 1)),
            TextKey("BODY", "x"),
            HeaderKey("Cc", "c"),
            FlagKey("\\Deleted"),
            FlagKey("\\Draft"),
            FlagKey("\\Flagged"),
            HeaderKey("From", "f"),
            HeaderKey("X-Spam", "yes"),
            FlagKey("$Junk"),
            SizeKey(True, 100),
            And((FlagKey("\\Recent"), FlagKey("\\Seen", False))),
            Not(FlagKey("\\Seen")),
            FlagKey("\\Recent", False),
            DateKey("INTERNAL", "ON", d(2024, 2, 2)),
            Or(FlagKey("\\Recent"), FlagKey("\\Seen", False)),
            DateKey("SENT", "BEFORE", d(2024, 3, 3)),
            DateKey("SENT", "ON", d(2024, 3, 4)),
            DateKey("SENT", "SINCE", d(2024, 3, 5)),
            DateKey("INTERNAL", "SINCE", d(2024, 3, 6)),
            SizeKey(False, 5),
            HeaderKey("Subject", "s"),
            TextKey("TEXT", "t"),
            HeaderKey("To", "t"),
            SeqKey(seq("1:*"), uid=True),
            FlagKey("\\Answered", False),
            FlagKey("\\Deleted", False),
            FlagKey("\\Draft", False),
            FlagKey("\\Flagged", False),
            FlagKey("foo", False),
            FlagKey("\\Seen", False),
            SeqKey(seq("1,2:*")),
            And((FlagKey("\\Seen"), FlagKey("\\Deleted"))),
            ModSeqKey(5),
            ModSeqKey(7, "/flags/\\draft", "ALL"),
            AgeKey(True, 60),
            AgeKey(False, 30),
            SeqKey(seq("$")),
        )
    )
    assert cmd.charset is None and cmd.returns is None and not cmd.uid


def test_search_charset_return_uid() -> None:
    cmd = parse("a UID SEARCH CHARSET utf-8 SUBJECT {5+}\r\nCafé\r\n".encode())
    assert cmd == Search(HeaderKey("Subject", "Café"), "UTF-8", None, uid=True)
    cmd = parse(b"a SEARCH RETURN (MIN MAX COUNT SAVE) 5\r\n")
    assert cmd == Search(SeqKey(seq("5")), None, ("MIN", "MAX", "COUNT", "SAVE"))
    assert parse(b"a SEARCH RETURN () ALL\r\n") == Search(All(), None, ("ALL",))
    cmd = parse(b'a SEARCH HEADER Subject ""\r\n')
    assert cmd == Search(HeaderKey("Subject", ""))
    err = error(b"a SEARCH CHARSET KOI8-R ALL\r\n")
    assert (err.status, err.code) == ("NO", "BADCHARSET (US-ASCII UTF-8)")
    assert error(b"a SEARCH RETURN (FOO) ALL\r\n").text == "Unknown SEARCH return option FOO"
    assert error(b'a SEARCH CHARSET US-ASCII TEXT "\xc3\xa9"\r\n').text.startswith("Search string")


@pytest.mark.parametrize(
    ("line", "text"),
    [
        (b"a SEARCH\r\n", "Missing search criteria"),
        (b"a SEARCH ()\r\n", "Missing search criteria"),
        (b"a SEARCH FOO\r\n", "Unknown search key FOO"),
        (b"a SEARCH BEFORE 31-Feb-2024\r\n", "Invalid date: day is out of range for month"),
        (b"a SEARCH LARGER x\r\n", "Expected a number for LARGER"),
        (b"a SEARCH OR SEEN\r\n", "Missing search key"),
        (b"a SEARCH 0\r\n", "Invalid sequence set: sequence numbers start at 1: '0'"),
        (
            b"a SEARCH 4294967296\r\n",
            "Invalid sequence set: sequence number too large: '4294967296'",
        ),
        (b'a SEARCH "x"\r\n', "Invalid search key"),
        (b'a SEARCH HEADER "a b" x\r\n', "Invalid header field name"),
        (b'a SEARCH MODSEQ "/flags/x" bogus 5\r\n', "Invalid MODSEQ entry type"),
        (b"a SEARCH KEYWORD \\Recent\r\n", "Invalid system flag \\Recent"),
        (b"a SEARCH 5x\r\n", "Invalid sequence set: invalid sequence set: '5x'"),
    ],
)
def test_search_errors(line: bytes, text: str) -> None:
    assert error(line).text == text


def test_search_deep_not_chain_is_bounded() -> None:
    reader = CommandReader(max_args=100_000, max_line=1_000_000)
    (cmd,) = reader.feed(b"a SEARCH " + b"NOT " * 10_000 + b"ALL\r\n")
    assert isinstance(cmd, Command)
    with pytest.raises(CommandError, match="nested too deeply"):
        parse_command(cmd)


def test_sort_and_thread() -> None:
    cmd = parse(b"a UID SORT (REVERSE ARRIVAL subject) UTF-8 SINCE 1-Feb-1994\r\n")
    assert cmd == Sort(
        (("ARRIVAL", True), ("SUBJECT", False)),
        "UTF-8",
        DateKey("INTERNAL", "SINCE", datetime.date(1994, 2, 1)),
        uid=True,
    )
    assert error(b"a SORT () UTF-8 ALL\r\n").text == "Invalid sort criteria"
    assert error(b"a SORT (REVERSE) UTF-8 ALL\r\n").text == "Invalid sort criteria"
    assert error(b"a SORT (SIZE FOO) UTF-8 ALL\r\n").text == "Unknown sort criterion FOO"
    assert error(b"a SORT (SIZE) ALL\r\n").code == "BADCHARSET (US-ASCII UTF-8)"
    assert parse(b"a THREAD references US-ASCII ALL\r\n") == Thread("REFERENCES", "US-ASCII", All())
    assert parse(b"a UID THREAD ORDEREDSUBJECT UTF-8 SEEN\r\n") == Thread(
        "ORDEREDSUBJECT", "UTF-8", FlagKey("\\Seen"), uid=True
    )
    assert error(b"a THREAD FOO UTF-8 ALL\r\n").text == "Unknown threading algorithm"


def test_fetch_macros_and_items() -> None:
    assert parse(b"a FETCH 1:* ALL\r\n") == Fetch(
        seq("1:*"), tuple(FetchAtt(n) for n in ("FLAGS", "INTERNALDATE", "RFC822.SIZE", "ENVELOPE"))
    )
    assert parse(b"a FETCH 1 fast\r\n").items == tuple(  # type: ignore[union-attr]
        FetchAtt(n) for n in ("FLAGS", "INTERNALDATE", "RFC822.SIZE")
    )
    assert parse(b"a FETCH 1 FULL\r\n").items[-1] == FetchAtt("BODY")  # type: ignore[union-attr]
    cmd = parse(
        b"a UID FETCH 1:5 (UID FLAGS RFC822.SIZE BODY.PEEK[HEADER.FIELDS (From Subject)]"
        b" BODY[1.2.MIME] BODY[]<0.1024> BODY[TEXT] BODY[1.HEADER.FIELDS.NOT (X-A)]"
        b" BINARY.PEEK[1] BINARY.SIZE[2] BODYSTRUCTURE ENVELOPE INTERNALDATE RFC822"
        b" RFC822.HEADER RFC822.TEXT MODSEQ BODY flags)"
        b" (CHANGEDSINCE 12345 VANISHED)\r\n"
    )
    assert isinstance(cmd, Fetch)
    assert cmd.uid and cmd.changed_since == 12345 and cmd.vanished
    items = cmd.items
    assert items[3] == FetchAtt(
        "BODY", SectionSpec((), "HEADER.FIELDS", ("From", "Subject")), peek=True
    )
    assert items[4] == FetchAtt("BODY", SectionSpec((1, 2), "MIME"))
    assert items[5] == FetchAtt("BODY", SectionSpec(), (0, 1024))
    assert items[7] == FetchAtt("BODY", SectionSpec((1,), "HEADER.FIELDS.NOT", ("X-A",)))
    assert items[8] == FetchAtt("BINARY", SectionSpec((1,)), peek=True)
    assert items[9] == FetchAtt("BINARY.SIZE", SectionSpec((2,)))
    assert items[-1] == FetchAtt("BODY")  # FLAGS appeared twice: kept once
    labels = [i.response_label() for i in items[3:10]]
    assert labels == [
        "BODY[HEADER.FIELDS (From Subject)]", "BODY[1.2.MIME]", "BODY[]<0>", "BODY[TEXT]",
        "BODY[1.HEADER.FIELDS.NOT (X-A)]", "BINARY[1]", "BINARY.SIZE[2]",
    ]  # fmt: skip
    assert str(SectionSpec((), "HEADER.FIELDS", ('a"b',))) == 'HEADER.FIELDS ("a\\"b")'


@pytest.mark.parametrize(
    ("line", "text"),
    [
        (b"a FETCH 1 ()\r\n", "Empty FETCH item list"),
        (b"a FETCH 1 (FOO)\r\n", "Unknown FETCH item FOO"),
        (b"a FETCH 1 (ALL)\r\n", "Unknown FETCH item ALL"),
        (b"a FETCH 1 BODY[MIME]\r\n", "Invalid section"),
        (b"a FETCH 1 BODY[0]\r\n", "Invalid section part number"),
        (b"a FETCH 1 BODY[1.FOO]\r\n", "Invalid section"),
        (b"a FETCH 1 BODY[HEADER.FIELDS]\r\n", "HEADER.FIELDS needs a list of field names"),
        (b"a FETCH 1 BODY[HEADER.FIELDS ()]\r\n", "Invalid header field names"),
        (b"a FETCH 1 BODY[TEXT (x)]\r\n", "Invalid section"),
        (b'a FETCH 1 BODY["x"]\r\n', "Invalid section"),
        (b"a FETCH 1 BINARY.SIZE[1]<0.5>\r\n", "BINARY.SIZE takes no partial"),
        (b'a FETCH 1 "FLAGS"\r\n', "Invalid FETCH item"),
        (b"a FETCH 1 FLAGS (VANISHED)\r\n", "VANISHED needs UID FETCH with CHANGEDSINCE"),
        (b"a FETCH 1 FLAGS (FOO 1)\r\n", "Unknown FETCH modifier"),
        (b"a FETCH 0 FLAGS\r\n", "Invalid sequence set: sequence numbers start at 1: '0'"),
        (b"a FETCH 1\r\n", "Missing FETCH items"),
        (b"a FETCH (1) FLAGS\r\n", "Expected a sequence set"),
    ],
)
def test_fetch_errors(line: bytes, text: str) -> None:
    assert error(line).text == text


def test_store() -> None:
    assert parse(b"a STORE 1:3 +FLAGS.SILENT (\\Deleted \\seen)\r\n") == Store(
        seq("1:3"), "+", True, ("\\Deleted", "\\Seen")
    )
    assert parse(b"a UID STORE 5 (UNCHANGEDSINCE 320162338) -FLAGS \\Seen $Junk\r\n") == Store(
        seq("5"), "-", False, ("\\Seen", "$Junk"), 320162338, uid=True
    )
    assert parse(b"a STORE 1 FLAGS ()\r\n") == Store(seq("1"), "", False, ())
    assert error(b"a STORE 1 +FLAGZ (\\Seen)\r\n").text == "Expected FLAGS, +FLAGS or -FLAGS"
    assert error(b"a STORE 1 FLAGS\r\n").text == "Missing flags"
    assert error(b"a STORE 1 FLAGS (\\Bogus)\r\n").text == "Invalid system flag \\Bogus"
    assert error(b"a STORE 1 FLAGS (a[b)\r\n").text == "Invalid keyword a[b"
    assert error(b'a STORE 1 FLAGS ("x")\r\n').text == "Invalid flag"
    assert parse(b"a STORE 1 FLAGS (\\Seen \\SEEN)\r\n") == Store(seq("1"), "", False, ("\\Seen",))
    assert error(b"a STORE 1 (FOO 1) FLAGS ()\r\n").text == "Unknown STORE modifier"


def test_copy_move() -> None:
    assert parse(b"a COPY 2:4 MEETING\r\n") == Copy(seq("2:4"), "MEETING")
    assert parse(b"a UID MOVE 42 Trash\r\n") == Move(seq("42"), "Trash", uid=True)
    assert error(b"a MOVE 1\r\n").text == "Missing mailbox name"


def test_enable_and_id() -> None:
    assert parse(b"a ENABLE condstore qresync\r\n") == Enable(("CONDSTORE", "QRESYNC"))
    assert error(b"a ENABLE\r\n").text == "Missing capabilities"
    assert parse(b"a ID NIL\r\n") == Id(None)
    assert parse(b'a ID ("name" "mutt" "version" NIL)\r\n') == Id(
        (("name", "mutt"), ("version", None))
    )
    assert parse(b"a ID ()\r\n") == Id(())
    assert error(b'a ID ("name")\r\n').text == "ID needs up to 30 field/value pairs"
    assert error(b"a ID (name x)\r\n").text == "Invalid ID field"
    assert error(b'a ID ("name" x)\r\n').text == "Invalid ID value"
    assert error(b'a ID ("%s" "x")\r\n' % (b"n" * 31)).text == "Invalid ID field"


def test_section_shaped_mailbox_name_and_plain_labels() -> None:
    assert parse(b"a SELECT body[x]\r\n") == Select("body[x]")
    assert error(b"a SELECT body[x]<0.1>\r\n").text == "Expected mailbox name"
    assert FetchAtt("FLAGS").response_label() == "FLAGS"


def test_non_atoms_where_atoms_are_needed() -> None:
    assert error(b'a STATUS x ("MESSAGES")\r\n').text == "Expected an atom in status items"
    assert error(b'a ID ("name" "\xff")\r\n').text == "Invalid UTF-8 in ID value"
    assert error(b'a SEARCH CHARSET "\xff" ALL\r\n').text == "Invalid ASCII in charset"
    assert parse(b'a LOGIN "\xff" x\r\n') == Login(b"\xff", b"x")
    assert error(b'a SEARCH HEADER "\xc3\xa9" x\r\n').text == "Invalid ASCII in header field name"


def test_nil_is_a_flag_atom() -> None:
    """As in Dovecot: ``NIL`` in a flag position is the keyword NIL, not a missing list."""
    assert parse(b"a STORE 1 +FLAGS NIL\r\n") == Store(seq("1"), "+", False, ("NIL",))
    assert parse(b"a STORE 1 FLAGS (nil \\Seen)\r\n") == Store(
        seq("1"), "", False, ("nil", "\\Seen")
    )
    assert parse(b"a SEARCH KEYWORD NIL\r\n") == Search(FlagKey("NIL"))


def test_invalid_names_are_no_and_match_nothing_in_list() -> None:
    for line in (b"a SELECT &Jjo\r\n", b"a STATUS &Jjo (MESSAGES)\r\n", b"a UID COPY 1 &Jjo\r\n"):
        assert error(line).status == "NO", line
    assert parse(b'a LIST "" (&Jjo INBOX)\r\n') == ListMailboxes("", ("INBOX",), extended=True)
    assert parse(b"a LIST &Jjo *\r\n") == ListMailboxes("", ())
    assert parse(b"a LSUB x &Jjo\r\n") == Lsub("", None)
    assert error(b"a LIST &Jjo\r\n").status == "BAD"  # a syntax error stays BAD


def test_return_options_for_search_and_sort() -> None:
    cmd = parse(b"a SEARCH RETURN (PARTIAL 10:1 COUNT UPDATE) ALL\r\n")
    assert cmd == Search(All(), None, ("PARTIAL", "COUNT", "UPDATE"), partial=(1, 10))
    assert parse(b"a SEARCH RETURN (UPDATE) ALL\r\n") == Search(All(), None, ("UPDATE",))
    assert parse(b"a SEARCH RETURN (CONTEXT) ALL\r\n") == Search(All(), None, ("CONTEXT", "ALL"))
    cmd = parse(b"a UID SORT RETURN (MIN MAX) (DATE) UTF-8 ALL\r\n")
    assert cmd == Sort((("DATE", False),), "UTF-8", All(), True, ("MIN", "MAX"))
    assert parse(b"a SORT RETURN () (DATE) UTF-8 ALL\r\n") == Sort(
        (("DATE", False),), "UTF-8", All(), False, ("ALL",)
    )
    assert error(b"a SEARCH RETURN (PARTIAL 1:2 ALL) ALL\r\n").text == "PARTIAL conflicts with ALL"
    assert error(b"a SORT RETURN (PARTIAL 0:2) (DATE) UTF-8 ALL\r\n").text == "PARTIAL range broken"


def test_cancelupdate() -> None:
    assert parse(b'a CANCELUPDATE "t1" "t2"\r\n') == CancelUpdate(("t1", "t2"))
    assert error(b"a CANCELUPDATE\r\n").text == "Missing tag"
    assert error(b"a CANCELUPDATE t1\r\n").text == "CANCELUPDATE takes quoted tags"


def test_append_utf8_data() -> None:
    data = b"a APPEND INBOX (\\Seen) UTF8 (~{5+}\r\nhello)\r\n"
    cmd = parse(data, utf8=True)
    assert cmd == Append("INBOX", (AppendMessage(("\\Seen",), None, b"hello", True),))
    assert error(data).text == "APPEND UTF8 needs ENABLE UTF8=ACCEPT"
    with pytest.raises(CommandError, match="literal8 is allowed only"):
        parse(b"a APPEND INBOX (~{5+}\r\nhello)\r\n", utf8=True)
