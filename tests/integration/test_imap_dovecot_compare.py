"""mailgw's IMAP side by side with Dovecot: the same raw command script against the real
`twistd mailgw` and a private Dovecot, responses compared after normalisation
(``dovecot_peer.py``): keyword announcements (RFC 3501 7.2.6), NIL as a flag, mailbox names
that are not modified UTF-7, ESEARCH / ESORT results with PARTIAL, and search contexts
(RFC 5267 UPDATE / CANCELUPDATE)."""

from __future__ import annotations

import re
from collections.abc import Iterator

import pytest

from mailgw.testing.server import MailgwServer
from tests.integration.conftest import make_server
from tests.integration.dovecot_peer import (
    DEFAULT_IGNORE,
    DOVECOT_PASSWORD,
    DOVECOT_USER,
    RawSession,
    Step,
    dovecot,
    normalise,
    report,
    requires_dovecot,
    run_script,
)
from tests.integration.helpers import PASSWORD

pytestmark = requires_dovecot

ALICE = "alice@example.test"


@pytest.fixture(scope="module")
def servers(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[int, int]]:
    """(mailgw IMAP port, Dovecot IMAP port), shared by this module's tests (each test works
    in folders of its own)."""
    server: MailgwServer = make_server(tmp_path_factory.mktemp("mailgw"))
    try:
        with dovecot() as peer:
            yield server.ports["imap"], peer.port
    finally:
        server.stop()


def sessions(
    ports: tuple[int, int], *names: str
) -> tuple[dict[str, RawSession], dict[str, RawSession]]:
    ours = {n: RawSession(ports[0], ALICE, PASSWORD) for n in names}
    theirs = {n: RawSession(ports[1], DOVECOT_USER, DOVECOT_PASSWORD) for n in names}
    return ours, theirs


def close(*groups: dict[str, RawSession]) -> None:
    for group in groups:
        for session in group.values():
            session.close()


def append(mailbox: str, subject: str, flags: str = "", date: str = "") -> bytes:
    """An APPEND command line with its message as a non-synchronising literal."""
    data = f"Subject: {subject}\r\nFrom: a@b.test\r\n\r\n{subject} body\r\n".encode()
    head = f"APPEND {mailbox}"
    if flags:
        head += f" ({flags})"
    if date:
        head += f' "{date}"'
    return head.encode() + b" {%d+}\r\n" % len(data) + data


def compare(
    ports: tuple[int, int], names: tuple[str, ...], steps: list[Step], **kw: object
) -> list[list[str]]:
    ours, theirs = sessions(ports, *names)
    try:
        mine, peer = run_script(steps, ours, theirs, **kw)  # type: ignore[arg-type]
    finally:
        close(ours, theirs)
    assert mine == peer, report(steps, mine, peer)
    return mine


@pytest.mark.timeout(120)
def test_new_keywords_are_announced_as_dovecot_does(servers: tuple[int, int]) -> None:
    """STORE and APPEND of a new keyword: ``* FLAGS`` and ``* OK [PERMANENTFLAGS]`` reach the
    storing session and every other session on the mailbox (read-only ones with
    ``PERMANENTFLAGS ()``) before any FETCH shows the keyword, .SILENT included."""
    steps: list[Step] = [
        ("a", b"CREATE Kw"),
        ("a", append("Kw", "one")),
        ("a", b"SELECT Kw"),
        ("c", b"EXAMINE Kw"),
        ("b", b"SELECT Kw"),
        ("b", b"STORE 1 +FLAGS (zkw)"),
        ("a", b"NOOP"),
        ("c", b"NOOP"),
        ("b", append("Kw", "two", "akw")),
        ("a", b"NOOP"),
        ("c", b"NOOP"),
        ("a", b"STORE 1 +FLAGS.SILENT (skw)"),
        ("a", b"FETCH 1:* FLAGS"),
        ("b", b"NOOP"),
        ("c", b"NOOP"),
        ("a", b"UID STORE 2 +FLAGS ($Forwarded)"),
        ("b", b"NOOP"),
    ]
    out = compare(servers, ("a", "b", "c"), steps)
    assert out[5][:2] == [
        "* FLAGS (\\Answered \\Deleted \\Draft \\Flagged \\Seen zkw)",
        "* OK [PERMANENTFLAGS (\\* \\Answered \\Deleted \\Draft \\Flagged \\Seen zkw)]",
    ], out[5]
    assert out[7][1] == "* OK [PERMANENTFLAGS ()]", out[7]


@pytest.mark.timeout(120)
def test_nil_is_a_keyword_as_in_dovecot(servers: tuple[int, int]) -> None:
    steps: list[Step] = [
        ("a", b"CREATE NilKw"),
        ("a", append("NilKw", "one")),
        ("a", b"SELECT NilKw"),
        ("a", b"STORE 1 +FLAGS NIL"),
        ("a", b"STORE 1 -FLAGS NIL"),
        ("a", b"STORE 1 FLAGS NIL"),
        ("a", b"STORE 1 -FLAGS (NIL)"),
        ("a", b"STORE 1 +FLAGS (NIL \\Seen)"),
        ("a", b"SEARCH KEYWORD NIL"),
        ("a", b"FETCH 1 FLAGS"),
    ]
    out = compare(servers, ("a",), steps)
    assert out[3][-2:] == ["* 1 FETCH (FLAGS (NIL \\Recent))", "a4 OK"], out[3]


@pytest.mark.timeout(120)
def test_invalid_mailbox_names_as_dovecot(servers: tuple[int, int]) -> None:
    """Names that are not valid modified UTF-7 (or 8-bit without UTF8=ACCEPT): NO for every
    mailbox command, an empty OK for LIST and LSUB; a failed SELECT closes the previous
    mailbox."""
    steps: list[Step] = [
        ("a", b"CREATE Valid"),
        ("a", append("Valid", "one")),
        ("a", b"SELECT Valid"),
        ("a", b"COPY 1 &Jjo"),
        ("a", b"MOVE 1 &Jjo"),
        ("a", b"SELECT &Jjo"),
        ("a", b"EXAMINE &Jjo"),
        ("a", b'SELECT "f\xc3\xa9"'),
        ("a", b"CREATE &Jjo"),
        ("a", b"CREATE A&B"),
        ("a", b"DELETE &Jjo"),
        ("a", b"RENAME &Jjo foo"),
        ("a", b"RENAME Valid &Jjo"),
        ("a", b"SUBSCRIBE &Jjo"),
        ("a", b"UNSUBSCRIBE &Jjo"),
        ("a", b"STATUS &Jjo (MESSAGES)"),
        ("a", append("&Jjo", "two")),
        ("a", b'LIST "" &Jjo'),
        ("a", b'LIST "" "&Jjo*"'),
        ("a", b"LIST &Jjo *"),
        ("a", b'LIST "" "f\xc3\xa9"'),
        ("a", b'LSUB "" &Jjo'),
        ("a", b'LIST (SUBSCRIBED) "" &Jjo'),
    ]
    out = compare(servers, ("a",), steps)
    assert out[5] == ["* OK [CLOSED]", "a6 NO"], out[5]
    assert out[17] == ["a18 OK"], out[17]


@pytest.mark.timeout(120)
def test_esort_and_partial_results_as_dovecot(servers: tuple[int, int]) -> None:
    """ESORT (RETURN MIN MAX COUNT ALL in sort order, SAVE), ESEARCH PARTIAL windows, their
    errors, CONTEXT as a hint and UPDATE alone."""
    subjects = ["delta", "alpha", "charlie", "bravo", "echo"]
    steps: list[Step] = [("a", b"CREATE Sorted")]
    for i, subject in enumerate(subjects):
        date = f"0{i + 1}-Jan-2024 10:00:00 +0000"
        steps.append(("a", append("Sorted", subject + "x" * i, date=date)))
    steps += [
        ("a", b"SELECT Sorted"),
        ("a", b"SORT RETURN (MIN MAX COUNT ALL) (SUBJECT) UTF-8 ALL"),
        ("a", b"SORT RETURN () (SUBJECT) UTF-8 ALL"),
        ("a", b"UID SORT RETURN (MIN MAX COUNT ALL) (REVERSE SIZE) UTF-8 ALL"),
        ("a", b"SORT RETURN (ALL) (REVERSE ARRIVAL) UTF-8 2:4"),
        ("a", b"SORT RETURN (PARTIAL 1:2) (SUBJECT) UTF-8 ALL"),
        ("a", b"SORT RETURN (PARTIAL 4:10 COUNT) (SUBJECT) UTF-8 ALL"),
        ("a", b"SORT RETURN (MAX MIN) (SUBJECT) UTF-8 ALL"),
        ("a", b"SORT RETURN (COUNT) (ARRIVAL) UTF-8 SUBJECT nothing"),
        ("a", b"SORT RETURN (MIN) (ARRIVAL) UTF-8 SUBJECT nothing"),
        ("a", b"SORT RETURN (SAVE MIN) (SUBJECT) UTF-8 ALL"),
        ("a", b"FETCH $ UID"),
        ("a", b"SEARCH RETURN (PARTIAL 2:3) ALL"),
        ("a", b"SEARCH RETURN (PARTIAL 3:1) ALL"),
        ("a", b"UID SEARCH RETURN (PARTIAL 4:10) ALL"),
        ("a", b"SEARCH RETURN (PARTIAL 6:10) ALL"),
        ("a", b"SEARCH RETURN (PARTIAL 1:2 COUNT) ALL"),
        ("a", b"SEARCH RETURN (PARTIAL 1:2 ALL) ALL"),
        ("a", b"SEARCH RETURN (PARTIAL 0:1) ALL"),
        ("a", b"SEARCH RETURN (PARTIAL -1:-2) ALL"),
        ("a", b"SEARCH RETURN (CONTEXT) ALL"),
        ("a", b"SEARCH RETURN (UPDATE) ALL"),
        ("a", b"SORT RETURN (MODSEQ) (SUBJECT) UTF-8 ALL"),
    ]
    out = compare(servers, ("a",), steps)
    assert out[7][0] == '* ESEARCH (TAG "a8") MIN 2 MAX 5 ALL 2,4,3,1,5 COUNT 5', out[7]


@pytest.mark.timeout(120)
def test_search_context_updates_as_dovecot(servers: tuple[int, int]) -> None:
    """SEARCH RETURN (UPDATE): another session's flag changes, appends and expunges come as
    ``ESEARCH ... REMOVEFROM (0 ...)`` / ``ADDTO (0 ...)``; CANCELUPDATE ends them. The two
    servers order unrelated untagged responses differently, so each step's responses are
    compared as a set (the REMOVEFROM-before-EXPUNGE order is checked below)."""
    steps: list[Step] = [("a", b"CREATE Ctx")]
    steps += [("a", append("Ctx", s)) for s in ("one", "two", "three", "four")]
    steps += [
        ("a", b"SELECT Ctx"),
        ("b", b"SELECT Ctx"),
        ("a", b"SEARCH RETURN (UPDATE) UNSEEN"),
        ("a", b"UID SEARCH RETURN (UPDATE COUNT) UNDELETED"),
        ("b", b"STORE 1 +FLAGS (\\Seen)"),
        ("b", append("Ctx", "five")),
        ("a", b"NOOP"),
        ("b", b"STORE 1 -FLAGS (\\Seen)"),
        ("b", b"STORE 2 +FLAGS (\\Deleted)"),
        ("b", b"EXPUNGE"),
        ("a", b"NOOP"),
        ("a", b'CANCELUPDATE "a8"'),
        ("a", b'CANCELUPDATE "a8"'),
        ("b", append("Ctx", "six")),
        ("a", b"NOOP"),
    ]
    ours, theirs = sessions(servers, "a", "b")
    try:
        mine, peer = run_script(steps, ours, theirs, ignore=DEFAULT_IGNORE)
    finally:
        close(ours, theirs)
    assert [sorted(x) for x in mine] == [sorted(x) for x in peer], report(steps, mine, peer)
    expunged = mine[15]
    assert expunged.index('* ESEARCH (TAG "a8") REMOVEFROM (0 2)') < expunged.index(
        "* 2 EXPUNGE"
    ), expunged
    assert '* ESEARCH (TAG "a9") UID ADDTO (0 6)' in mine[19], mine[19]
    assert not any(line.startswith('* ESEARCH (TAG "a8")') for line in mine[19]), mine[19]


def test_normalise_keeps_what_matters() -> None:
    """The comparison itself: texts and volatile numbers go, statuses, codes and data stay."""
    out = normalise(
        [
            b"* OK [UIDVALIDITY 1796461923] UIDs valid",
            b"* OK [HIGHESTMODSEQ 12] Highest",
            b"* FLAGS (zkw \\Seen \\Answered)",
            b"* 1 FETCH (FLAGS (b a) MODSEQ (7) UID 4)",
            b"A1 NO [TRYCREATE] Mailbox doesn't exist: x (0.001 + 0.000 secs).",
        ]
    )
    assert out == [
        "* OK [UIDVALIDITY #]",
        "* FLAGS (\\Answered \\Seen zkw)",
        "* 1 FETCH (UID 4 FLAGS (a b) MODSEQ #)",
        "A1 NO [TRYCREATE]",
    ]
    assert normalise([b"A1 OK done"], ignore=[re.compile(rb"^A1")]) == []
