"""Webmail page times on a 10,000-message folder: list (first and cached), sorted, threaded,
page 100, open a message, search by subject and by body, with the store reader and the IMAP
reader. Run: ``PYTHONPATH=. python bench/webmail_pages.py [--messages N] [--repeat R]``."""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from email.message import EmailMessage
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from mailgw.testing.server import MailgwServer, free_port, wait_for_port  # noqa: E402
from tests.webmail.client import Browser  # noqa: E402

PASSWORD = "bench password"


def messages(n: int) -> list[bytes]:
    """``n`` messages: threads of 5, Chinese and English subjects, 97 senders."""
    out = []
    for i in range(n):
        m = EmailMessage()
        m["From"] = f"Sender {i % 97} <s{i % 97}@outside.test>"
        m["To"] = "alice@bench.test"
        m["Subject"] = f"{'Re: ' if i % 5 else ''}{'报告' if i % 2 else 'report'} {i // 5}"
        m["Date"] = time.strftime("%a, %d %b %Y %H:%M:%S +0000", time.gmtime(1.7e9 + i * 60))
        m["Message-ID"] = f"<m{i}@bench>"
        if i % 5:
            m["In-Reply-To"] = f"<m{i - i % 5}@bench>"
        m.set_content(f"body of message {i}\n" + "lorem ipsum 中文正文\n" * 20)
        out.append(m.as_bytes())
    return out


def fill(server: MailgwServer, n: int) -> float:
    """Store ``n`` messages in alice's folder ``Big`` through the store API (batches of 1,000,
    one transaction each), before the server starts."""
    from mailgw.store import MessageStore

    started = time.perf_counter()
    store = MessageStore(
        root=str(server.data_dir / "mail"),
        quota_for=lambda name: None,
        default_folders=(),
        hostname="bench",
    )
    store.create_mailbox("alice@bench.test", "Big")
    data = messages(n)
    for i in range(0, n, 1000):
        batch = [(d, ["\\Seen"], 1.7e9 + (i + k) * 60) for k, d in enumerate(data[i : i + 1000])]
        store.append_messages("alice@bench.test", "Big", batch)
    store.close()
    return time.perf_counter() - started


def timed(b: Browser, path: str, repeat: int) -> dict[str, float]:
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        answer = b.get(path)
        times.append((time.perf_counter() - t) * 1000)
        assert answer.status == 200, (path, answer.status)
    return {"first_ms": round(times[0], 1), "median_ms": round(statistics.median(times), 1)}


def run(reader: str, n: int, repeat: int) -> dict[str, object]:
    tmp = Path(tempfile.mkdtemp(prefix=f"bench-webmail-{reader}-"))
    port, imap_port = free_port(), free_port()
    server = MailgwServer(
        tmp,
        {
            "http": {"enabled": "yes", "listen": f"tcp:{port}:interface=127.0.0.1"},
            "imap": {"listen": f"tcp:{imap_port}:interface=127.0.0.1", "workers": "0"},
            "webmail": {"enabled": "yes", "reader": reader, "imap_port": str(imap_port)},
        },
    )
    server.cli("domain", "add", "bench.test")
    server.cli("user", "add", "alice@bench.test", "--password", PASSWORD)
    fill_s = fill(server, n)
    server.start()
    try:
        wait_for_port("127.0.0.1", port, proc=server.proc)
        b = Browser(f"http://127.0.0.1:{port}")
        assert b.login("alice@bench.test", PASSWORD).status == 200
        figures: dict[str, object] = {"reader": reader, "messages": n, "fill_s": round(fill_s, 1)}
        figures["list (newest first)"] = timed(b, "/mail?folder=Big", repeat)
        figures["list sorted by subject"] = timed(
            b, "/mail?folder=Big&sort=subject&order=asc", repeat
        )
        figures["conversations"] = timed(b, "/mail?folder=Big&thread=1", repeat)
        figures["page 100"] = timed(b, "/mail?folder=Big&page=100", repeat)
        figures["open a message"] = timed(b, f"/read?folder=Big&uid={n // 2}", repeat)
        figures["search subject"] = timed(b, "/mail?folder=Big&q=report+17&field=subject", repeat)
        figures["search body"] = timed(
            b, "/mail?folder=Big&q=message+4242&field=body", max(1, repeat // 3)
        )
        return figures
    finally:
        server.stop()
        shutil.rmtree(tmp, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--messages", type=int, default=10_000)
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args()
    results = [run(reader, args.messages, args.repeat) for reader in ("store", "imap")]
    os.makedirs("bench/results", exist_ok=True)
    with open("bench/results/webmail_pages.json", "w") as f:
        json.dump(results, f, indent=2, ensure_ascii=False)
    for r in results:
        print(json.dumps(r, ensure_ascii=False))


if __name__ == "__main__":
    main()
