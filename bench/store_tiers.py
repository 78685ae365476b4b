"""Tier-1 vs tier-2 storage benchmark: bytes on disk and read latency for a realistic mix.

It delivers a mix of mail into a tier-1 store (``MessageStore.deliver``, the call local
delivery makes, with per-copy trace headers as an SMTP delivery adds them): plain text, HTML,
multipart messages with attachments of random bytes (so compression is honest) and
announcements sent to every user (duplicates whose bodies are identical). The store is then
copied twice and each copy migrated to tier 2 (``Migrator``, the code of ``mailgw store
migrate``): once with every blob a loose file (``tier2_pack_max = 0``, the layout before pack
files) and once with blobs up to ``--pack-max`` bytes in pack files.

Figures: bytes on disk (du-style: allocated blocks of files and directories) of the tier-1
tree and of each migrated tree plus its blob tree, and the apparent bytes of the blob tree
(what the blobs hold: compressed, deduplicated); ``Mailbox.read_message`` latency (p50,
p99; what IMAP FETCH BODY[] and POP3 RETR call) from each tier, with the page cache warm and
with the message's bytes evicted first (``posix_fadvise(DONTNEED)`` on the file or the pack
record, "cold"; the pack index stays cached). Read rounds alternate tier 1, loose tier 2 and
packed tier 2; the table shows medians over rounds. JSON goes to
bench/results/store_tiers-<timestamp>.json.

Run: .venv/bin/python bench/store_tiers.py [--users 100] [--own 30] [--rounds 3]
[--pack-max 16384]
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import random
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
sys.path.insert(0, str(REPO))

from mailgw.store import Mailbox, MessageStore  # noqa: E402
from mailgw.store.blobs import PACK_MAX, FileBlobStore, split_ref  # noqa: E402
from mailgw.store.migration import MigrationPolicy, Migrator, stats  # noqa: E402

DOMAIN = "bench.test"


# -- the mix ------------------------------------------------------------------------------------


class Mix:
    """Deterministic generator of realistic messages (seeded)."""

    def __init__(self, seed: int) -> None:
        self.rnd = random.Random(seed)
        syllables = ["ka", "lo", "mi", "ne", "ra", "tu", "se", "vo", "pi", "den", "mar", "ol"]
        self.words = [
            "".join(self.rnd.choice(syllables) for _ in range(self.rnd.randint(1, 4)))
            for _ in range(3000)
        ]
        self.counter = 0

    def sentence(self) -> str:
        words = self.rnd.choices(self.words, k=self.rnd.randint(6, 18))
        return " ".join(words).capitalize() + "."

    def paragraphs(self, size: int) -> list[str]:
        out: list[str] = []
        total = 0
        while total < size:
            para = " ".join(self.sentence() for _ in range(self.rnd.randint(2, 6)))
            out.append(para)
            total += len(para) + 2
        return out

    def wrap(self, text: str, width: int = 76) -> str:
        lines, line = [], ""
        for word in text.split():
            if line and len(line) + 1 + len(word) > width:
                lines.append(line)
                line = word
            else:
                line = f"{line} {word}" if line else word
        lines.append(line)
        return "\r\n".join(lines)

    def header(self, sender: str, subject: str, extra: str = "") -> str:
        self.counter += 1
        return (
            f"From: {sender}\r\nTo: staff@{DOMAIN}\r\nSubject: {subject}\r\n"
            f"Date: Mon, 2 Nov 2026 10:{self.counter % 60:02d}:00 +0000\r\n"
            f"Message-ID: <{self.counter}.{self.rnd.getrandbits(48):x}@sender.test>\r\n"
            f"MIME-Version: 1.0\r\n{extra}"
        )

    def plain(self, size: int) -> bytes:
        body = "\r\n\r\n".join(self.wrap(p) for p in self.paragraphs(size))
        head = self.header("bob@sender.test", self.sentence()[:60])
        return (head + "Content-Type: text/plain; charset=utf-8\r\n\r\n" + body + "\r\n").encode()

    def html_text(self, size: int) -> str:
        parts = [
            '<html><head><meta charset="utf-8"><style>p{font-family:Arial;color:#333}</style>'
            "</head><body>"
        ]
        for p in self.paragraphs(size // 2):
            parts.append(f'<p style="margin:0 0 12px 0;line-height:1.4">{p}</p>')
        parts.append("</body></html>")
        return self.wrap(" ".join(parts))

    def html(self, size: int) -> bytes:
        boundary = f"alt{self.rnd.getrandbits(40):x}"
        text = "\r\n\r\n".join(self.wrap(p) for p in self.paragraphs(size // 3))
        head = self.header(
            "news@sender.test",
            self.sentence()[:60],
            f'Content-Type: multipart/alternative; boundary="{boundary}"\r\n',
        )
        return (
            f"{head}\r\n--{boundary}\r\nContent-Type: text/plain; charset=utf-8\r\n\r\n{text}\r\n"
            f"--{boundary}\r\nContent-Type: text/html; charset=utf-8\r\n\r\n"
            f"{self.html_text(size)}\r\n--{boundary}--\r\n"
        ).encode()

    def attachment(self, text_size: int, attachment_size: int) -> bytes:
        import base64

        boundary = f"mix{self.rnd.getrandbits(40):x}"
        text = "\r\n\r\n".join(self.wrap(p) for p in self.paragraphs(text_size))
        data = base64.encodebytes(self.rnd.randbytes(attachment_size)).replace(b"\n", b"\r\n")
        head = self.header(
            "carol@sender.test",
            self.sentence()[:60],
            f'Content-Type: multipart/mixed; boundary="{boundary}"\r\n',
        )
        return (
            (
                f"{head}\r\n--{boundary}\r\nContent-Type: text/plain; charset=utf-8\r\n\r\n{text}\r\n"
                f"--{boundary}\r\nContent-Type: application/pdf; name=report.pdf\r\n"
                "Content-Disposition: attachment; filename=report.pdf\r\n"
                "Content-Transfer-Encoding: base64\r\n\r\n"
            ).encode()
            + data
            + f"--{boundary}--\r\n".encode()
        )

    def own_message(self) -> tuple[str, bytes]:
        roll = self.rnd.random()
        if roll < 0.5:
            return "text", self.plain(self.rnd.randint(800, 8000))
        if roll < 0.8:
            return "html", self.html(self.rnd.randint(4000, 30000))
        size = int(2 ** self.rnd.uniform(14, 18))  # 16 KiB .. 256 KiB of random bytes
        return "attachment", self.attachment(self.rnd.randint(300, 3000), size)

    def announcements(self) -> list[tuple[str, bytes]]:
        return [
            ("announcement", self.plain(4096)),
            ("announcement", self.html(20000)),
            ("announcement", self.html(12000)),
            ("announcement", self.attachment(2000, 200 * 1024)),
            ("announcement", self.attachment(1000, 60 * 1024)),
        ]


def trace(user: str, n: int) -> bytes:
    """The header lines an SMTP delivery adds to each copy (as the MX role and local delivery)."""
    return (
        f"Return-Path: <sender@sender.test>\r\nDelivered-To: {user}\r\n"
        f"Received: from mail.sender.test (unknown [192.0.2.7])\r\n"
        f"\tby mx.{DOMAIN} (mailgw) with ESMTP id {n:012X}\r\n"
        f"\tfor <{user}>; Mon, 2 Nov 2026 10:00:{n % 60:02d} +0000\r\n"
    ).encode()


# -- measuring ----------------------------------------------------------------------------------


def du(path: str, messages_only: bool = False) -> tuple[int, int, int]:
    """(allocated bytes of files and directories as du counts them, apparent bytes of files,
    number of files) under ``path``; with ``messages_only`` the Maildir message files alone."""
    blocks = apparent = files = 0
    for top, _dirs, names in os.walk(path):
        if messages_only:
            if os.path.basename(top) not in ("new", "cur"):
                continue
        else:
            blocks += os.lstat(top).st_blocks
        for name in names:
            st = os.lstat(os.path.join(top, name))
            blocks += st.st_blocks
            apparent += st.st_size
            files += 1
    return blocks * 512, apparent, files


def message_files(store: MessageStore, box: Mailbox, uid: int) -> list[tuple[str, int, int]]:
    """(file, offset, length) of each piece of the message's bytes (length 0: all)."""
    info = {m.uid: m for m in box.messages()}[uid]
    if info.blob is None:
        return [(os.path.join(box._folder.path, info.filename), 0, 0)]
    assert isinstance(store.tier2, FileBlobStore)
    return [store.tier2.where(d) for d in split_ref(info.blob)]


def evict(pieces: list[tuple[str, int, int]]) -> None:
    for path, offset, length in pieces:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, offset, length, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def read_latencies(
    store: MessageStore, sample: list[tuple[str, int]], cold: bool
) -> tuple[list[float], int]:
    """Seconds per ``read_message`` of each sampled (user, uid), and the bytes read."""
    boxes: dict[str, Mailbox] = {}
    out: list[float] = []
    total = 0
    for user, uid in sample:
        box = boxes.get(user) or boxes.setdefault(user, store.open_mailbox(user))
        if cold:
            evict(message_files(store, box, uid))
        started = time.perf_counter()
        data = box.read_message(uid)
        out.append(time.perf_counter() - started)
        total += len(data)
    return out, total


def percentile(values: list[float], p: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(p / 100 * (len(ordered) - 1))))]


def deliver_mix(store: MessageStore, users: list[str], own: int, seed: int) -> dict[str, Any]:
    mix = Mix(seed)
    counts: dict[str, int] = {}
    logical = 0
    n = 0
    tmp = tempfile.NamedTemporaryFile(delete=False)  # noqa: SIM115 - removed below
    tmp.close()

    def deliver(user: str, kind: str, data: bytes) -> None:
        nonlocal n, logical
        with open(tmp.name, "wb") as fh:
            fh.write(data)
        prefix = trace(user, n)
        n += 1
        store.deliver(user, tmp.name, prefix=prefix)
        counts[kind] = counts.get(kind, 0) + 1
        logical += len(prefix) + len(data)

    try:
        announcements = mix.announcements()
        for i in range(own):
            for user in users:
                kind, data = mix.own_message()
                deliver(user, kind, data)
            if i % max(1, own // len(announcements)) == 0 and announcements:
                kind, data = announcements.pop(0)
                for user in users:
                    deliver(user, kind, data)
        for kind, data in announcements:
            for user in users:
                deliver(user, kind, data)
    finally:
        os.unlink(tmp.name)
    return {"messages": n, "logical_bytes": logical, "by_kind": counts}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--users", type=int, default=100)
    parser.add_argument("--own", type=int, default=30, help="own messages per user")
    parser.add_argument("--sample", type=int, default=1000, help="messages read per round")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seed", type=int, default=5)
    parser.add_argument("--base-dir", default=None, help="where the stores go (default $TMPDIR)")
    parser.add_argument("--keep", action="store_true", help="keep the stores")
    parser.add_argument(
        "--pack-max", type=int, default=PACK_MAX, help="packed tier 2: blobs up to this size"
    )
    args = parser.parse_args()

    work = tempfile.mkdtemp(prefix="store-tiers-", dir=args.base_dir)
    try:
        result = run(args, work)
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
        else:
            print(f"kept {work}")
    out_dir = BENCH / "results"
    out_dir.mkdir(exist_ok=True)
    stamp = dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    out = out_dir / f"store_tiers-{stamp}.json"
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"\nJSON: {out}")


def run(args: argparse.Namespace, work: str) -> dict[str, Any]:
    users = [f"user{i:03d}@{DOMAIN}" for i in range(args.users)]
    root1 = os.path.join(work, "tier1", "mail")
    started = time.perf_counter()
    store1 = MessageStore(root1, lambda user: None, hostname=f"mx.{DOMAIN}")
    mix = deliver_mix(store1, users, args.own, args.seed)
    deliver_s = time.perf_counter() - started
    store1.close()
    print(
        f"delivered {mix['messages']} messages ({mix['logical_bytes']:,} bytes) "
        f"in {deliver_s:.1f}s: {mix['by_kind']}"
    )

    t1_blocks, t1_apparent, t1_files = du(root1, messages_only=True)
    t1_tree, _a, _f = du(root1)
    disk: dict[str, Any] = {
        "tier1_messages": {
            "du_bytes": t1_blocks,
            "apparent_bytes": t1_apparent,
            "files": t1_files,
        },
        "tier1_tree": {"du_bytes": t1_tree},
    }
    tier_stats: dict[str, Any] = {}
    migrate_s: dict[str, float] = {}
    stores: dict[str, MessageStore] = {}
    for name, pack_max in (("tier2-loose", 0), ("tier2-packed", args.pack_max)):
        root2 = os.path.join(work, name, "mail")
        shutil.copytree(root1, root2)
        blobs = FileBlobStore(os.path.join(work, name, "blobs"), pack_max=pack_max)
        store2 = MessageStore(root2, lambda user: None, hostname=f"mx.{DOMAIN}", tier2=blobs)
        started = time.perf_counter()
        report = Migrator(store2, MigrationPolicy(after=1.0), clock=lambda: 4e9).run()
        migrate_s[name] = time.perf_counter() - started
        assert report.moved == mix["messages"] and report.failed == 0, report
        print(
            f"{name}: migrated {report.moved} messages in {migrate_s[name]:.1f}s "
            f"({report.moved / migrate_s[name]:.0f} msg/s)"
        )
        tier_stats[name] = {
            k: vars(v) | {"dedup_ratio": v.dedup_ratio} for k, v in stats(store2, blobs).items()
        }
        store2.close()  # checkpoint the indexes' WAL files before measuring
        blobs.close()
        t2_index_blocks, _a, _f = du(root2)
        t2_blob_blocks, t2_blob_apparent, t2_blob_files = du(blobs.root)
        disk[name] = {
            "du_bytes": t2_blob_blocks,
            "apparent_bytes": t2_blob_apparent,
            "files": t2_blob_files,
            "indexes_left_on_tier1_du_bytes": t2_index_blocks,
        }
        blobs = FileBlobStore(blobs.root, pack_max=pack_max)
        stores[name] = MessageStore(root2, lambda user: None, hostname=f"mx.{DOMAIN}", tier2=blobs)

    store1 = MessageStore(root1, lambda user: None, hostname=f"mx.{DOMAIN}")
    rnd = random.Random(args.seed + 1)
    everything = [(u, m.uid) for u in users for m in store1.open_mailbox(u).messages()]
    sample = rnd.sample(everything, min(args.sample, len(everything)))
    rounds: dict[str, list[dict[str, float]]] = {}
    for r in range(args.rounds):
        for cold in (False, True):
            for name, store in (("tier1", store1), *stores.items()):
                if r == 0 and not cold:  # open every index once, warm the page cache
                    read_latencies(store, sample, cold=False)
                lat, nbytes = read_latencies(store, sample, cold)
                key = f"{name}-{'cold' if cold else 'warm'}"
                rounds.setdefault(key, []).append(
                    {
                        "p50_ms": percentile(lat, 50) * 1e3,
                        "p99_ms": percentile(lat, 99) * 1e3,
                        "mean_ms": statistics.fmean(lat) * 1e3,
                        "mb_per_s": nbytes / sum(lat) / 1e6,
                    }
                )
    store1.close()
    for store in stores.values():
        store.close()
        assert isinstance(store.tier2, FileBlobStore)
        store.tier2.close()
    reads = {
        key: {f: statistics.median(x[f] for x in values) for f in values[0]}
        for key, values in rounds.items()
    }

    logical = mix["logical_bytes"]
    print()
    cols = ("tier1", "tier2-loose", "tier2-packed")
    print(f"{'':30}" + "".join(f"{c:>16}" for c in cols))
    print(f"{'logical bytes':30}" + f"{logical:>16,}" * 3)
    data_du = [t1_blocks, disk[cols[1]]["du_bytes"], disk[cols[2]]["du_bytes"]]
    apparent = [t1_apparent, disk[cols[1]]["apparent_bytes"], disk[cols[2]]["apparent_bytes"]]
    print(f"{'message data (du)':30}" + "".join(f"{x:>16,}" for x in data_du))
    print(f"{'message data (apparent)':30}" + "".join(f"{x:>16,}" for x in apparent))
    print(
        f"{'du / apparent':30}"
        + "".join(f"{a / b:>16.2f}" for a, b in zip(data_du, apparent, strict=True))
    )
    print(f"{'du / tier-1 du':30}" + "".join(f"{a / t1_blocks:>16.2f}" for a in data_du))
    trees = [t1_tree] + [
        disk[c]["du_bytes"] + disk[c]["indexes_left_on_tier1_du_bytes"] for c in cols[1:]
    ]
    print(f"{'with indexes, dirs (du)':30}" + "".join(f"{x:>16,}" for x in trees))
    files = [t1_files, disk[cols[1]]["files"], disk[cols[2]]["files"]]
    print(f"{'files':30}" + "".join(f"{x:>16,}" for x in files))
    for kind in ("headers", "bodies"):
        s = tier_stats["tier2-packed"][f"tier2-{kind}"]
        print(f"{'tier-2 ' + kind + ' dedup':30}{'':>16}{'':>16}{s['dedup_ratio']:>16.2f}")
    for temp in ("warm", "cold"):
        for f in ("p50_ms", "p99_ms"):
            values = [reads[f"{c}-{temp}"][f] for c in cols]
            print(f"{f'read_message {f} ({temp})':30}" + "".join(f"{v:>16.3f}" for v in values))
    print(f"(reads: medians of {args.rounds} rounds of {len(sample)} messages)")
    return {
        "benchmark": "store_tiers",
        "when": dt.datetime.now().isoformat(timespec="seconds"),
        "machine": {
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
            "platform": platform.platform(),
        },
        "args": vars(args),
        "mix": mix,
        "deliver_seconds": deliver_s,
        "migrate_seconds": migrate_s,
        "load_average": os.getloadavg(),
        "disk": disk,
        "stats": tier_stats,
        "reads": reads,
        "read_rounds": rounds,
    }


if __name__ == "__main__":
    main()
