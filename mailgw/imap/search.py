"""SEARCH evaluation: a parsed search-key tree against the messages of the selected mailbox.

Keys on flags, sizes, dates and sets come from the index; header keys parse the message
structure (cached); BODY and TEXT decode the text parts. Strings compare case-insensitively
on decoded text (RFC 2047 words and 8-bit UTF-8 headers alike), as RFC 3501 6.4.4 asks.
"""

from __future__ import annotations

import datetime
from collections.abc import Callable, Generator
from typing import Any

from mailgw.imap import parser as p
from mailgw.imap.fetch import Fetcher, MessageGone
from mailgw.imap.sequence import Ranges, contains, resolve
from mailgw.mime import (
    decode_bytes,
    decode_header_value,
    header_values,
    parse_date,
    text_parts,
)
from mailgw.mime.addresses import parse_address_list
from mailgw.mime.text import date_offset

MAX_TEXT_BYTES = 4 * 1024 * 1024  # decoded bytes searched per text part
MAX_ADDRESSES = 10_000  # parsed addresses searched per header field


class _Message:
    """Lazy access to one message's structure and bytes during a search."""

    def __init__(self, fetcher: Fetcher, uid: int) -> None:
        self.fetcher = fetcher
        self.uid = uid
        self._raw: bytes | None = None
        self._structure: Any = None

    @property
    def read(self) -> bool:
        """Whether the message's structure or bytes were needed."""
        return self._structure is not None or self._raw is not None

    def structure(self) -> Any:
        if self._structure is None:
            self._raw, self._structure = self.fetcher.load(self.uid, False, True)
            if not self._raw:
                self._raw = None
        return self._structure

    def raw(self) -> bytes:
        if self._raw is None:
            self._raw, self._structure = self.fetcher.load(self.uid, True, True)
        return self._raw


def _utc_date(ts: float) -> datetime.date:
    return datetime.datetime.fromtimestamp(ts, datetime.UTC).date()


def _sent_date(value: bytes) -> datetime.date | None:
    """The calendar date of a Date: header as written in its own zone: RFC 3501 6.4.4 has
    SENTBEFORE/SENTON/SENTSINCE disregard both time and timezone, so ``Sun, 25 Mar 2007
    00:30 +0200`` is on 25 March even though it is 24 March in UTC."""
    ts = parse_date(value)
    if ts is None:
        return None
    offset = date_offset(value)
    return _utc_date(ts + offset)


def _compare(day: datetime.date, relation: str, wanted: datetime.date) -> bool:
    if relation == "BEFORE":
        return day < wanted
    if relation == "ON":
        return day == wanted
    return day >= wanted


class Searcher:
    """Evaluates search keys; ``now`` is the clock (seconds) for OLDER/YOUNGER."""

    def __init__(self, fetcher: Fetcher, now: Callable[[], float]) -> None:
        self.fetcher = fetcher
        self.selected = fetcher.selected
        self.now = now
        self._sets: dict[tuple[int, bool], Ranges] = {}

    def search(self, key: p.SearchKey) -> list[int]:
        """The UIDs matching ``key``, ascending (expunged-elsewhere messages never match)."""
        steps = self.search_steps(key)
        while True:
            try:
                next(steps)
            except StopIteration as done:
                found: list[int] = done.value
                return found

    def search_steps(self, key: p.SearchKey) -> Generator[None, None, list[int]]:
        """:meth:`search` as a generator that yields after each message it had to read, so
        the session can let other sessions run during a long search (the list of UIDs is
        its result); index-only keys run without yielding."""
        sel = self.selected
        gone = sel.gone
        if isinstance(key, p.All):
            _seqs, known, _infos = sel.known(sel.uids.tolist())
            return [uid for uid in known if uid not in gone] if gone else known
        out = []
        uids = list(sel.uids)  # the session may not change it meanwhile, but be safe
        info_of = sel.info
        for seq, uid in enumerate(uids, 1):
            if uid in gone or info_of(uid) is None:
                continue
            msg = _Message(self.fetcher, uid)
            try:
                if self.match(key, seq, uid, msg):
                    out.append(uid)
            except MessageGone:
                continue
            if msg.read:
                yield
        return out

    def _ranges(self, key: p.SeqKey) -> Ranges:
        cache_key = (id(key), key.uid)
        ranges = self._sets.get(cache_key)
        if ranges is None:
            sel = self.selected
            top = (sel.uids[-1] if sel.uids else 0) if key.uid else len(sel.uids)
            saved = sel.saved_ranges(key.uid) if key.sequence.saved else None
            ranges = resolve(key.sequence, top, saved)
            self._sets[cache_key] = ranges
        return ranges

    def match(self, key: p.SearchKey, seq: int, uid: int, msg: _Message) -> bool:
        info = self.selected.info(uid)
        if info is None:
            raise KeyError(uid)
        if isinstance(key, p.All):
            return True
        if isinstance(key, p.And):
            return all(self.match(k, seq, uid, msg) for k in key.keys)
        if isinstance(key, p.Or):
            return self.match(key.left, seq, uid, msg) or self.match(key.right, seq, uid, msg)
        if isinstance(key, p.Not):
            return not self.match(key.key, seq, uid, msg)
        if isinstance(key, p.FlagKey):
            has = uid in self.selected.recent if key.flag == "\\Recent" else key.flag in info.flags
            return has == key.present
        if isinstance(key, p.SizeKey):
            return info.size > key.size if key.larger else info.size < key.size
        if isinstance(key, p.SeqKey):
            return contains(self._ranges(key), uid if key.uid else seq)
        if isinstance(key, p.ModSeqKey):
            return bool(info.modseq >= key.modseq)
        if isinstance(key, p.AgeKey):
            age = self.now() - info.internaldate
            return age >= key.seconds if key.older else age <= key.seconds
        if isinstance(key, p.DateKey):
            if key.field == "INTERNAL":
                # The date in the zone the internal date was given in (RFC 3501 6.4.4
                # "disregarding time and timezone"), like the SENT* keys below.
                local = _utc_date(info.internaldate + info.internaldate_tz * 60)
                return _compare(local, key.relation, key.date)
            values = header_values(msg.structure(), "Date")
            day = _sent_date(values[0]) if values else None
            return day is not None and _compare(day, key.relation, key.date)
        if isinstance(key, p.HeaderKey):
            return self._header(msg, key.name, key.value, key.addresses)
        if isinstance(key, p.TextKey):
            return self._text(msg, key.scope == "TEXT", key.value)
        raise TypeError(f"unknown search key {key!r}")

    @staticmethod
    def _header(msg: _Message, name: str, value: str, addresses: bool = False) -> bool:
        values = header_values(msg.structure(), name)
        if not value:
            return bool(values)
        needle = value.casefold()
        if any(needle in decode_header_value(raw).casefold() for raw in values):
            return True
        if addresses:
            for raw in values:
                for item in parse_address_list(raw, MAX_ADDRESSES):
                    if item.host is None:  # group markers: the group name only
                        text = item.mailbox.decode("utf-8", "replace") if item.mailbox else ""
                    else:
                        local = (item.mailbox or b"").decode("utf-8", "replace")
                        host = item.host.decode("utf-8", "replace")
                        name_text = decode_header_value(item.name) if item.name else ""
                        text = f"{name_text} {local}@{host}"
                    if needle in text.casefold():
                        return True
        return False

    @staticmethod
    def _text(msg: _Message, with_headers: bool, value: str) -> bool:
        needle = value.casefold()
        structure = msg.structure()
        if with_headers:
            for field in structure.fields:
                if needle in decode_header_value(field.unfolded()).casefold():
                    return True
                if needle in field.name.decode("latin-1").casefold():
                    return True
        raw = msg.raw()
        for _part, text in text_parts(structure, raw, MAX_TEXT_BYTES):
            if needle in text.casefold():
                return True
        if structure.truncated:
            # Containers nested beyond the parser's depth limit are opaque leaves: their
            # text is searched as stored (transfer encodings are not undone there).
            for part in structure.walk():
                if part.opaque:
                    data = raw[part.body_start : min(part.end, part.body_start + MAX_TEXT_BYTES)]
                    if needle in decode_bytes(data).casefold():
                        return True
        return False
