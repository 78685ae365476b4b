"""IMAP response formatting: strings, lists, flags, mailbox names, response codes, LIST patterns.

Everything returns bytes ready for the transport (RFC 3501 9 / RFC 9051 9 syntax).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

from mailgw.imap.names import to_wire
from mailgw.imap.sequence import format_uid_set

CRLF = b"\r\n"
# ATOM-CHAR: CHAR except atom-specials ( ) { SP CTL % * " \ ]
_ATOM_SAFE = frozenset(range(0x21, 0x7F)) - frozenset(b'(){%*"\\]')
_QUOTED_SAFE = frozenset(range(0x01, 0x80)) - frozenset(b"\r\n")
_QUOTED_MAX = 1024  # longer strings go out as literals


def _as_bytes(value: bytes | str) -> bytes:
    return value.encode("utf-8") if isinstance(value, str) else value


def literal(value: bytes | str, binary: bool = False) -> bytes:
    """``{n}\\r\\n`` followed by the bytes (``~{n}`` literal8 when ``binary``). A plain
    literal cannot carry NUL (RFC 3501 CHAR8): like Dovecot, each NUL goes as 0x80 there, one
    for one, so sizes and partial offsets stay true (BINARY sends a literal8 instead)."""
    data = _as_bytes(value)
    if not binary and b"\0" in data:
        data = data.replace(b"\0", b"\x80")
    return (b"~{%d}\r\n" if binary else b"{%d}\r\n") % len(data) + data


def quote(value: bytes | str, atom_ok: bool = False, utf8: bool = False) -> bytes:
    """A string in the cheapest correct form: an atom when ``atom_ok`` (astring contexts) and
    the value is a non-empty atom other than NIL; a quoted string when it holds only 7-bit
    characters without CR, LF and NUL (8-bit UTF-8 too when ``utf8``, i.e. UTF8=ACCEPT), with
    ``"`` and ``\\`` escaped; a literal otherwise (CR, LF, NUL, 8-bit, long values)."""
    data = _as_bytes(value)
    if atom_ok and data and data.upper() != b"NIL" and all(c in _ATOM_SAFE for c in data):
        return data
    if len(data) <= _QUOTED_MAX:
        if all(c in _QUOTED_SAFE for c in data):
            return b'"' + data.replace(b"\\", b"\\\\").replace(b'"', b'\\"') + b'"'
        if utf8 and b"\x00" not in data and b"\r" not in data and b"\n" not in data:
            try:
                data.decode("utf-8")
            except UnicodeDecodeError:
                pass
            else:
                return b'"' + data.replace(b"\\", b"\\\\").replace(b'"', b'\\"') + b'"'
    return literal(data)


def astring(value: bytes | str, utf8: bool = False) -> bytes:
    """``quote`` for astring contexts (atoms allowed)."""
    return quote(value, atom_ok=True, utf8=utf8)


def nil_or_string(value: bytes | str | None, utf8: bool = False) -> bytes:
    """``NIL`` for None, else the quoted or literal string (nstring)."""
    return b"NIL" if value is None else quote(value, utf8=utf8)


def number(value: int) -> bytes:
    return b"%d" % value


def plist(items: Iterable[bytes]) -> bytes:
    """``(a b c)`` from already formatted items."""
    return b"(" + b" ".join(items) + b")"


def flag_list(flags: Iterable[str]) -> bytes:
    """``(\\Seen $Label1)``; flags are atoms by construction (validated by the parser)."""
    return plist(f.encode("ascii") for f in flags)


def mailbox_name(name: str, utf8: bool = False) -> bytes:
    """A mailbox name on the wire: modified UTF-7 (UTF-8 when UTF8=ACCEPT is enabled),
    as an atom when possible, else quoted or a literal."""
    if name.upper() == "INBOX":
        return b"INBOX"
    return astring(to_wire(name, utf8), utf8=utf8)


# -- responses --------------------------------------------------------------------------------


def untagged(*parts: bytes | str) -> bytes:
    """``* part part ...\\r\\n``."""
    return b"* " + b" ".join(_as_bytes(p) for p in parts) + CRLF


def tagged(tag: str, status: str, text: str, code: bytes | str | None = None) -> bytes:
    """``tag OK|NO|BAD [code] text\\r\\n``; ``code`` without brackets. The text is
    flattened to one line."""
    return _status(tag.encode("ascii"), status, text, code)


def untagged_status(status: str, text: str, code: bytes | str | None = None) -> bytes:
    """``* OK|NO|BAD|BYE|PREAUTH [code] text\\r\\n``."""
    return _status(b"*", status, text, code)


def _status(prefix: bytes, status: str, text: str, code: bytes | str | None) -> bytes:
    clean = " ".join(text.replace("\r", " ").replace("\n", " ").split()) or status.lower()
    parts = [prefix, status.encode("ascii")]
    if code is not None:
        parts.append(b"[" + _as_bytes(code) + b"]")
    parts.append(clean.encode("utf-8"))
    return b" ".join(parts) + CRLF


def continuation(text: str = "Ready for literal data") -> bytes:
    """``+ text\\r\\n``."""
    return b"+ " + text.encode("utf-8") + CRLF


# -- response codes (without brackets, for ``tagged``/``untagged_status``) -------------------

ALERT = b"ALERT"
TOOBIG = b"TOOBIG"
TRYCREATE = b"TRYCREATE"
NONEXISTENT = b"NONEXISTENT"
ALREADYEXISTS = b"ALREADYEXISTS"
AUTHENTICATIONFAILED = b"AUTHENTICATIONFAILED"
AUTHORIZATIONFAILED = b"AUTHORIZATIONFAILED"
UNAVAILABLE = b"UNAVAILABLE"
CANNOT = b"CANNOT"
LIMIT = b"LIMIT"
OVERQUOTA = b"OVERQUOTA"
INUSE = b"INUSE"
PRIVACYREQUIRED = b"PRIVACYREQUIRED"
SERVERBUG = b"SERVERBUG"
CLIENTBUG = b"CLIENTBUG"
NOPERM = b"NOPERM"
EXPUNGEISSUED = b"EXPUNGEISSUED"
UNKNOWN_CTE = b"UNKNOWN-CTE"  # RFC 3516
CLOSED = b"CLOSED"
READ_ONLY = b"READ-ONLY"
READ_WRITE = b"READ-WRITE"
NOMODSEQ = b"NOMODSEQ"
UIDNOTSTICKY = b"UIDNOTSTICKY"
USEATTR = b"USEATTR"
HASCHILDREN = b"HASCHILDREN"  # RFC 9051 7.1
BADCHARSET = b"BADCHARSET (US-ASCII UTF-8)"


def code_uidnext(n: int) -> bytes:
    return b"UIDNEXT %d" % n


def code_uidvalidity(n: int) -> bytes:
    return b"UIDVALIDITY %d" % n


def code_unseen(n: int) -> bytes:
    return b"UNSEEN %d" % n


def code_highestmodseq(n: int) -> bytes:
    return b"HIGHESTMODSEQ %d" % n


def code_permanentflags(flags: Iterable[str], new_keywords: bool = True) -> bytes:
    """``PERMANENTFLAGS (\\Seen ... \\*)``; ``\\*`` when clients may create keywords."""
    items = list(flags) + (["\\*"] if new_keywords else [])
    return b"PERMANENTFLAGS " + flag_list(items)


def code_capability(capabilities: Iterable[str]) -> bytes:
    return b"CAPABILITY " + " ".join(capabilities).encode("ascii")


def code_appenduid(uidvalidity: int, uids: Iterable[int]) -> bytes:
    """``APPENDUID v uid-set`` (RFC 4315; a set for MULTIAPPEND)."""
    return b"APPENDUID %d " % uidvalidity + format_uid_set(uids).encode("ascii")


def code_copyuid(uidvalidity: int, source: Iterable[int], target: Iterable[int]) -> bytes:
    """``COPYUID v src-set dst-set``; both in the same order, element by element."""
    return b"COPYUID %d %s %s" % (
        uidvalidity,
        format_uid_set(source).encode("ascii"),
        format_uid_set(target).encode("ascii"),
    )


def code_modified(uids: Iterable[int]) -> bytes:
    """``MODIFIED set`` (RFC 7162, STORE with UNCHANGEDSINCE)."""
    return b"MODIFIED " + format_uid_set(uids).encode("ascii")


def code_badcharset(charsets: Iterable[str] = ("US-ASCII", "UTF-8")) -> bytes:
    return b"BADCHARSET " + plist(astring(c) for c in charsets)


# -- LIST patterns ----------------------------------------------------------------------------


def compile_list_pattern(
    reference: str, pattern: str, delimiter: str = "/"
) -> Callable[[str], bool]:
    """A matcher for ``LIST reference pattern``: ``*`` matches anything, ``%`` anything but
    ``delimiter``, every other character only itself (no regular expressions involved).

    The reference is prefixed to the pattern (a pattern starting with the delimiter after a
    reference ending with it does not double it); a first level spelled ``inbox`` in any case
    matches ``INBOX``. Matching simulates the pattern as a set of positions, so it takes at
    most O(len(name) * len(pattern)) steps whatever the pattern (no backtracking)."""
    if reference and pattern.startswith(delimiter) and reference.endswith(delimiter):
        full = reference + pattern[len(delimiter) :]
    else:
        full = reference + pattern
    first, sep, rest = full.partition(delimiter) if delimiter else (full, "", "")
    if first.upper() == "INBOX":
        full = "INBOX" + sep + rest
    # collapse runs of wildcards: "**" = "*", "%*" = "*%" = "*", "%%" = "%"
    tokens: list[str] = []
    for ch in full:
        if ch in "*%" and tokens and tokens[-1] in ("*", "%"):
            if ch == "*":
                tokens[-1] = "*"
            continue
        tokens.append(ch)
    size = len(tokens)

    def closure(states: set[int]) -> set[int]:
        # a wildcard may match nothing: position i also stands for i + 1
        out = set(states)
        for i in sorted(states):
            j = i
            while j < size and tokens[j] in ("*", "%"):
                j += 1
                out.add(j)
        return out

    start = closure({0})

    def match(name: str) -> bool:
        states = start
        for ch in name:
            nxt: set[int] = set()
            for i in states:
                if i >= size:
                    continue
                tok = tokens[i]
                if tok == "*" or (tok == "%" and ch != delimiter):
                    nxt.add(i)
                elif tok == ch:
                    nxt.add(i + 1)
            if not nxt:
                return False
            states = closure(nxt)
        return size in states

    return match
