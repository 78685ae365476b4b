"""FETCH: one ``* n FETCH (...)`` response per message, built from the stored bytes.

Every body item is a slice of the stored message (``mailgw.mime`` parses it,
``mailgw.imap.render`` slices and renders), so ``BODY[]`` is the
stored bytes and its length is ``RFC822.SIZE``; ENVELOPE and BODYSTRUCTURE come from the
cached structure and need the message bytes only on a cache miss.
"""

from __future__ import annotations

import datetime
from collections.abc import Iterator
from typing import Any

from mailgw.imap import wire
from mailgw.imap.parser import FetchAtt
from mailgw.imap.render import Section as MimeSection
from mailgw.imap.render import (
    UnknownTransferEncoding,
    binary_section,
    binary_text,
    body_structure,
    envelope,
    partial,
)
from mailgw.imap.render import section as mime_section
from mailgw.imap.selected import RECENT, SelectedMailbox, flag_order
from mailgw.mime import StructureCache

_MONTHS = ("Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec")
# Items answered from the index alone.
_CHEAP = frozenset({"FLAGS", "UID", "INTERNALDATE", "RFC822.SIZE", "MODSEQ"})
_STRUCTURE = frozenset({"ENVELOPE", "BODYSTRUCTURE"})
# Sections of the top-level header: sliced from the message's header block alone.
_HEADER_SECTIONS = frozenset({"HEADER", "HEADER.FIELDS", "HEADER.FIELDS.NOT"})


class MessageGone(Exception):
    """The message was expunged by another session before it could be read."""


def internaldate(ts: float, tz: int = 0) -> bytes:
    """``"17-Jul-1996 02:44:25 -0700"``: the instant ``ts`` in the zone ``tz`` (minutes east
    of UTC) it was stored with (RFC 3501 keeps an APPEND's zone)."""
    d = datetime.datetime.fromtimestamp(ts + tz * 60, datetime.UTC)
    hours, minutes = divmod(abs(tz), 60)
    return b'"%02d-%s-%04d %02d:%02d:%02d %c%02d%02d"' % (
        d.day,
        _MONTHS[d.month - 1].encode("ascii"),
        d.year,
        d.hour,
        d.minute,
        d.second,
        45 if tz < 0 else 43,  # - / +
        hours,
        minutes,
    )


def sets_seen(items: tuple[FetchAtt, ...]) -> bool:
    """Whether fetching ``items`` implicitly sets \\Seen (BODY[...] and BINARY[...] without
    PEEK, RFC822, RFC822.TEXT)."""
    for item in items:
        if item.name in ("RFC822", "RFC822.TEXT"):
            return True
        if item.name in ("BODY", "BINARY") and item.section is not None and not item.peek:
            return True
    return False


def needs_bytes(items: tuple[FetchAtt, ...]) -> bool:
    return any(i.name not in _CHEAP and i.name not in _STRUCTURE for i in items)


def needs_structure(items: tuple[FetchAtt, ...]) -> bool:
    return any(i.name not in _CHEAP for i in items)


def wants(items: tuple[FetchAtt, ...]) -> tuple[bool, bool, bool]:
    """``needs_bytes``, ``needs_structure`` and ``header_only`` of ``items``: what
    ``Fetcher.load`` is asked for, worked out once per FETCH command."""
    return needs_bytes(items), needs_structure(items), header_only(items)


def header_only(items: tuple[FetchAtt, ...]) -> bool:
    """Whether ``items`` need no byte of the message beyond its top-level header block
    (``BODY[HEADER]``, ``BODY[HEADER.FIELDS (...)]``, ``RFC822.HEADER``, ENVELOPE, BODY,
    BODYSTRUCTURE, index items): what a mail client's message list asks for."""
    for item in items:
        name = item.name
        if name in _CHEAP or name in _STRUCTURE or name == "RFC822.HEADER":
            continue
        section = item.section
        if name == "BODY" and (
            section is None or (not section.part and section.text in _HEADER_SECTIONS)
        ):
            continue
        return False
    return True


class Fetcher:
    """Renders FETCH responses for one selected mailbox; ``cache`` is shared by the server
    (keys name immutable bytes: user, folder, UIDVALIDITY, UID)."""

    def __init__(self, user: str, selected: SelectedMailbox, cache: StructureCache) -> None:
        self.user = user
        self.selected = selected
        self.cache = cache

    def _key(self, uid: int) -> tuple[str, str, int, int]:
        sel = self.selected
        return (self.user, sel.name, int(sel.mailbox.uidvalidity), uid)

    def forget(self, uid: int) -> None:
        """Drop the cached structure of an expunged message."""
        self.cache.discard(self._key(uid))

    def load(
        self, uid: int, want_bytes: bool, want_structure: bool, header: bool = False
    ) -> tuple[bytes, Any]:
        """The stored bytes (b"" unless wanted) and the structure (None unless wanted).
        With ``header`` (the bytes wanted are the top-level header's alone: ``header_only``)
        the bytes may be just the header block, kept by the cache with the structure."""
        raw = b""
        structure = None
        key = self._key(uid)
        if want_structure and not want_bytes:
            structure = self.cache.get(key)
            if structure is not None:
                return raw, structure
        if header and want_bytes and want_structure:
            cached = self.cache.get_header(key)
            if cached is not None:
                structure, raw = cached
                return raw, structure
        if want_bytes or want_structure:
            try:
                raw = self.selected.mailbox.read_message(uid)
            except KeyError:
                self.cache.discard(key)
                raise MessageGone(uid) from None
        if want_structure:
            structure = self.cache.get_or_parse(key, raw, keep_header=header and want_bytes)
        return raw, structure

    def response(
        self,
        seq: int,
        uid: int,
        items: tuple[FetchAtt, ...],
        with_uid: bool,
        with_flags: bool = False,
        with_modseq: bool = False,
        wanted: tuple[bool, bool, bool] | None = None,
    ) -> bytes:
        """``* seq FETCH (...)`` for ``items`` (``wanted``: their ``wants``, when the caller
        worked it out already); MessageGone when the bytes are gone."""
        sel = self.selected
        info = sel.infos[uid]
        raw, structure = self.load(uid, *(wanted or wants(items)))
        out: list[bytes] = []
        names = {i.name for i in items}
        if with_uid and "UID" not in names:
            out.append(b"UID %d" % uid)
        for item in items:
            out.append(self._item(item, uid, info, raw, structure))
        if with_flags and "FLAGS" not in names:
            out.append(b"FLAGS " + wire.flag_list(sel.flags_of(uid)))
        if with_modseq and "MODSEQ" not in names:
            out.append(b"MODSEQ (%d)" % info.modseq)
        return b"* %d FETCH (" % seq + b" ".join(out) + b")\r\n"

    def _item(self, item: FetchAtt, uid: int, info: Any, raw: bytes, structure: Any) -> bytes:
        name = item.name
        if name == "FLAGS":
            return b"FLAGS " + wire.flag_list(self.selected.flags_of(uid))
        if name == "UID":
            return b"UID %d" % uid
        if name == "INTERNALDATE":
            return b"INTERNALDATE " + internaldate(info.internaldate, info.internaldate_tz)
        if name == "RFC822.SIZE":
            return b"RFC822.SIZE %d" % info.size
        if name == "MODSEQ":
            return b"MODSEQ (%d)" % info.modseq
        if name == "ENVELOPE":
            return b"ENVELOPE " + envelope(structure)
        if name == "BODYSTRUCTURE":
            return b"BODYSTRUCTURE " + body_structure(structure, extended=True)
        if name == "BODY" and item.section is None:
            return b"BODY " + body_structure(structure, extended=False)
        if name == "RFC822":
            return b"RFC822 " + wire.literal(raw)
        if name == "RFC822.HEADER":
            return b"RFC822.HEADER " + wire.literal(mime_section(structure, raw, "HEADER"))
        if name == "RFC822.TEXT":
            return b"RFC822.TEXT " + wire.literal(mime_section(structure, raw, "TEXT"))
        spec = item.section
        assert spec is not None
        if name in ("BINARY", "BINARY.SIZE"):
            # RFC 3516: the decoded part; UnknownTransferEncoding fails the FETCH. Beyond
            # its grammar (as Dovecot): TEXT is the decoded body, header sections and MIME
            # are the bytes BODY[...] gives (headers carry no transfer encoding).
            if spec.text is None:
                decoded = binary_section(structure, raw, spec.part)
            elif spec.text == "TEXT":
                decoded = binary_text(structure, raw, spec.part)
            else:
                decoded = mime_section(
                    structure,
                    raw,
                    MimeSection(
                        spec.part,
                        spec.text,
                        tuple(f.encode("ascii", "replace") for f in spec.fields),
                    ),
                )
            if name == "BINARY.SIZE":
                return b"BINARY.SIZE[%s] %d" % (str(spec).encode("ascii"), len(decoded))
            if item.partial is not None:
                decoded = partial(decoded, item.partial[0], item.partial[1])
            # NUL octets travel only in a literal8 (RFC 3516 4.2).
            return (
                item.response_label().encode("ascii")
                + b" "
                + wire.literal(decoded, binary=b"\0" in decoded)
            )
        # BODY[section]<partial>
        mime_spec = MimeSection(
            spec.part, spec.text or "", tuple(f.encode("ascii", "replace") for f in spec.fields)
        )
        data = mime_section(structure, raw, mime_spec)
        if item.partial is not None:
            data = partial(data, item.partial[0], item.partial[1])
        return item.response_label().encode("ascii") + b" " + wire.literal(data)


# Items a FETCH answers from the flags alone (``flag_responses``).
_FLAG_ITEMS = frozenset({"FLAGS", "UID", "MODSEQ"})
_FIELD_FORMAT = {"UID": b"UID %d", "FLAGS": b"FLAGS %s", "MODSEQ": b"MODSEQ (%d)"}
# ``(flags, recent)`` -> the FLAGS list as sent: flag sets are few.
_FLAG_LISTS: dict[tuple[frozenset[str], bool], bytes] = {}
_FLAG_LISTS_MAX = 4096
FLAG_CHUNK = 2048  # responses joined into one write


def flags_only(items: tuple[FetchAtt, ...]) -> bool:
    """Whether ``items`` ask only for FLAGS, UID and MODSEQ (``flag_responses``)."""
    return all(i.name in _FLAG_ITEMS for i in items)


def _flag_list(flags: frozenset[str], recent: bool) -> bytes:
    key = (flags, recent)
    text = _FLAG_LISTS.get(key)
    if text is None:
        ordered = sorted(flags, key=flag_order)
        if recent:
            ordered.append(RECENT)
        if len(_FLAG_LISTS) >= _FLAG_LISTS_MAX:
            _FLAG_LISTS.clear()
        text = _FLAG_LISTS[key] = wire.flag_list(ordered)
    return text


def flag_responses(
    selected: SelectedMailbox,
    uids: list[int],
    items: tuple[FetchAtt, ...],
    with_uid: bool,
    with_modseq: bool,
) -> Iterator[bytes]:
    """What :func:`fetch_responses` gives for items that :func:`flags_only` accepts (and no
    flag changed by the FETCH itself), byte for byte: the responses of ``FLAG_CHUNK``
    messages per chunk (each chunk as the client knows the messages when it is made), each
    FLAGS list formatted once per distinct flag set."""
    names = [i.name for i in items]
    fields = (["UID"] if with_uid and "UID" not in names else []) + names
    if with_modseq and "MODSEQ" not in names:
        fields.append("MODSEQ")
    line = b"* %d FETCH (" + b" ".join(_FIELD_FORMAT[f] for f in fields) + b")\r\n"
    recent = set() if selected.rev2 else selected.recent
    for start in range(0, len(uids), FLAG_CHUNK):
        chunk = uids[start : start + FLAG_CHUNK]
        seqs, known, infos = selected.known(chunk)
        if fields == ["UID", "FLAGS"]:
            # UID FETCH n:m (FLAGS), the common one: one dict lookup per message.
            flag_sets = [info.flags for info in infos]
            distinct = set(flag_sets)
            plain = {flags: _flag_list(flags, False) for flags in distinct}
            if recent.isdisjoint(chunk):
                lines = [
                    line % (seq, uid, plain[flags])
                    for seq, uid, flags in zip(seqs, known, flag_sets, strict=True)
                ]
            else:
                marked = {flags: _flag_list(flags, True) for flags in distinct}
                lines = [
                    line % (seq, uid, (marked if uid in recent else plain)[flags])
                    for seq, uid, flags in zip(seqs, known, flag_sets, strict=True)
                ]
            yield b"".join(lines)
            continue
        out = []
        for seq, uid, info in zip(seqs, known, infos, strict=True):
            values: list[int | bytes] = [seq]
            for f in fields:
                if f == "UID":
                    values.append(uid)
                elif f == "FLAGS":
                    values.append(_flag_list(info.flags, uid in recent))
                else:
                    values.append(info.modseq)
            out.append(line % tuple(values))
        yield b"".join(out)


def fetch_responses(
    fetcher: Fetcher,
    uids: list[int],
    items: tuple[FetchAtt, ...],
    with_uid: bool,
    flags_changed: set[int],
    with_modseq: bool,
    gone: list[int],
    undecodable: list[int] | None = None,
) -> Iterator[bytes]:
    """One response per UID in ``uids`` (expunged ones skipped and added to ``gone``; those
    whose BINARY part has an unknown transfer encoding skipped and added to
    ``undecodable``)."""
    sel = fetcher.selected
    wanted = wants(items)
    for uid in uids:
        seq = sel.seq_of(uid)
        if not seq or uid not in sel.infos:
            continue
        try:
            yield fetcher.response(
                seq, uid, items, with_uid, uid in flags_changed, with_modseq, wanted
            )
        except MessageGone:
            gone.append(uid)
        except UnknownTransferEncoding:
            if undecodable is None:
                raise
            undecodable.append(uid)
