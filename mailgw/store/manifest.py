"""Tier-2 manifest: a per-folder append-only log from which a lost index gets its tier-2 rows back.

A tier-1 message is its Maildir file, so an index rebuilt from the files finds it again; a
tier-2 message is a blob reference that only the index held. Each folder holding tier-2
messages therefore keeps ``mailgw-tier2.log`` in its directory (next to ``cur/ new/ tmp/``,
so a folder rename carries it and a folder delete removes it). One line per record, each
``<crc32 hex> <json>\\n``:

- ``hdr``   first line: format version, ``gen`` (a random generation, new on each rewrite)
  and the folder's ``uidvalidity``;
- ``mark``  ``uidnext``/``modseq``: no UID at or above ``uidnext`` and no modseq above
  ``modseq`` has been handed out in the folder (reserved in blocks, see ``UID_RESERVE``);
- ``put``   a tier-2 message: ``uid``, ``blob``, ``size``, ``flags`` (keywords too),
  ``date`` (INTERNALDATE, epoch seconds) and ``tz`` (its zone), ``base``/``file`` (its
  Maildir name in tier 1);
- ``flags`` the new flags of ``uid``; ``del`` ``uid`` left tier 2 (expunged, moved out,
  promoted back to tier 1).

The store writes a transaction's records and fsyncs them just before the index COMMIT, and
records the log's generation and committed length in the folder's index row. While the index
exists it is the truth: a tail past the recorded length (a transaction that did not commit)
is cut off before the next append, and a log of another generation, shorter than recorded or
missing is rewritten from the index. The log is rewritten from the index (compacted) once it
has grown to twice its size after the last rewrite. When the index is lost, the log is read
back (``read``): a torn last line is ignored, a damaged line in the middle is skipped and
counted.
"""

from __future__ import annotations

import json
import secrets
import zlib
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

LOG_NAME = "mailgw-tier2.log"
VERSION = 1
# UIDs and modseqs are reserved this far ahead of the folder's UIDNEXT/HIGHESTMODSEQ in a
# ``mark`` record: one record per this many deliveries or flag changes, at most.
UID_RESERVE = 1024
MODSEQ_RESERVE = 4096
# A log is compacted when it has grown to this size and to twice its size after the last
# rewrite.
COMPACT_MIN = 256 * 1024
# A rebuilt folder keeps its UIDVALIDITY only if at most this many UIDs below its UIDNEXT are
# missing (each becomes a tombstone, so QRESYNC clients hear they vanished); else it gets a
# new UIDVALIDITY (every client resynchronises the folder).
GAP_MAX = 1_000_000


class ManifestError(ValueError):
    """A manifest line cannot be used."""


def encode(record: dict[str, Any]) -> bytes:
    """One log line: crc32 (8 hex digits) of the JSON text, a space, the JSON, LF."""
    text = json.dumps(record, separators=(",", ":"), ensure_ascii=True).encode("ascii")
    return b"%08x %s\n" % (zlib.crc32(text), text)


def decode(line: bytes) -> dict[str, Any]:
    """The record of one complete line (with its LF); ManifestError when damaged."""
    if not line.endswith(b"\n") or len(line) < 11 or line[8:9] != b" ":
        raise ManifestError("malformed line")
    text = line[9:-1]
    try:
        crc = int(line[:8], 16)
    except ValueError:
        raise ManifestError("malformed checksum") from None
    if zlib.crc32(text) != crc:
        raise ManifestError("checksum mismatch")
    try:
        record = json.loads(text)
    except ValueError:
        raise ManifestError("malformed JSON") from None
    if not isinstance(record, dict) or not isinstance(record.get("t"), str):
        raise ManifestError("not a record")
    return record


def header(uidvalidity: int, gen: str | None = None) -> dict[str, Any]:
    """A header record (a new random generation unless ``gen``)."""
    return {
        "t": "hdr",
        "v": VERSION,
        "gen": gen or secrets.token_hex(8),
        "uidvalidity": uidvalidity,
    }


def mark(uidnext: int, modseq: int) -> dict[str, Any]:
    """The reservation record for a folder at UIDNEXT ``uidnext``, HIGHESTMODSEQ ``modseq``."""
    return {"t": "mark", "uidnext": uidnext + UID_RESERVE, "modseq": modseq + MODSEQ_RESERVE}


def put(
    uid: int,
    blob: str,
    size: int,
    flags: str,
    internaldate: float,
    tz: int,
    base: str,
    filename: str,
) -> dict[str, Any]:
    """The record of a tier-2 message (``flags`` as the index's text)."""
    return {
        "t": "put",
        "uid": uid,
        "blob": blob,
        "size": size,
        "flags": flags,
        "date": internaldate,
        "tz": tz,
        "base": base,
        "file": filename,
    }


def set_flags(uid: int, flags: str) -> dict[str, Any]:
    return {"t": "flags", "uid": uid, "flags": flags}


def delete(uid: int) -> dict[str, Any]:
    return {"t": "del", "uid": uid}


def read_gen(fh: Any) -> str | None:
    """The generation of an open log (read from its first line), None when unreadable."""
    fh.seek(0)
    try:
        record = decode(fh.readline(4096))
    except ManifestError:
        return None
    gen = record.get("gen")
    return gen if record.get("t") == "hdr" and isinstance(gen, str) else None


@dataclass
class Manifest:
    """A log read back: the folder's UIDVALIDITY, the reservation marks, the tier-2
    messages by UID (``put`` records with later ``flags`` applied), ``size`` (bytes of
    complete lines read) and ``damaged`` (lines skipped)."""

    gen: str
    uidvalidity: int
    uidnext: int = 1
    modseq: int = 0
    messages: dict[int, dict[str, Any]] = field(default_factory=dict)
    size: int = 0
    damaged: int = 0


def _int(record: dict[str, Any], key: str) -> int:
    value = record.get(key)
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise ManifestError(f"bad {key}")
    return value


def _check_put(record: dict[str, Any]) -> dict[str, Any]:
    _int(record, "uid")
    _int(record, "size")
    if not isinstance(record.get("tz"), int):
        raise ManifestError("bad tz")
    if not isinstance(record.get("date"), (int, float)):
        raise ManifestError("bad date")
    for key in ("blob", "flags", "base", "file"):
        if not isinstance(record.get(key), str):
            raise ManifestError(f"bad {key}")
    return record


def parse(lines: Iterable[bytes]) -> Manifest | None:
    """Replay log lines; None when the first line is not a readable header."""
    manifest: Manifest | None = None
    size = 0
    for line in lines:
        if not line.endswith(b"\n"):
            break  # a torn last line
        try:
            record = decode(line)
            kind = record["t"]
            if manifest is None:
                if kind != "hdr" or not isinstance(record.get("gen"), str):
                    return None
                manifest = Manifest(str(record["gen"]), _int(record, "uidvalidity"))
            elif kind == "mark":
                manifest.uidnext = max(manifest.uidnext, _int(record, "uidnext"))
                manifest.modseq = max(manifest.modseq, _int(record, "modseq"))
            elif kind == "put":
                manifest.messages[_int(record, "uid")] = _check_put(record)
            elif kind == "flags":
                uid = _int(record, "uid")
                flags = record.get("flags")
                if not isinstance(flags, str):
                    raise ManifestError("bad flags")
                if uid in manifest.messages:
                    manifest.messages[uid] = {**manifest.messages[uid], "flags": flags}
            elif kind == "del":
                manifest.messages.pop(_int(record, "uid"), None)
            else:
                raise ManifestError(f"unknown record {kind!r}")
        except ManifestError:
            if manifest is None:
                return None
            manifest.damaged += 1
        size += len(line)
    if manifest is not None:
        manifest.size = size
    return manifest


def read(path: str) -> Manifest | None:
    """The manifest at ``path``; None when it does not exist or has no readable header.
    OSError when it cannot be read."""
    try:
        with open(path, "rb") as fh:
            return parse(fh)
    except FileNotFoundError:
        return None
