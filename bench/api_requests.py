"""Admin API benchmark: requests per second and latency of ``/api/v1`` on a real node.

Starts ``twistd mailgw`` with the http role on a fresh data directory (100 users in one
domain), creates an admin token with the CLI, then for each endpoint in turn runs
``--clients`` threads, each on one keep-alive HTTP/1.1 connection, for ``--duration``
seconds: ``GET /api/v1/domains`` (token check + a directory read), ``GET /api/v1/users``
(100 rows), ``GET /api/v1/queue`` (an empty spool scan) and ``POST /api/v1/rules/validate``
(a JSON body validated against the schema, a rules file parsed). Every answer must be 200.
Prints requests/s and median / 99th percentile latency per endpoint.

Run: .venv/bin/python bench/api_requests.py [--clients 4] [--duration 5]
"""

from __future__ import annotations

import argparse
import http.client
import json
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from mailgw.testing.server import MailgwServer, free_port, wait_for_port  # noqa: E402

RULES = 'rule a\n    match subject spam\n    action reject 550 5.7.1 "no"\n'
ENDPOINTS = [
    ("GET", "/api/v1/domains", None),
    ("GET", "/api/v1/users", None),
    ("GET", "/api/v1/queue", None),
    ("POST", "/api/v1/rules/validate", json.dumps({"text": RULES}).encode()),
]


def worker(
    port: int,
    token: str,
    method: str,
    path: str,
    body: bytes | None,
    until: float,
    out: list[float],
) -> None:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    headers = {"Authorization": f"Bearer {token}", "Content-Type": "application/json"}
    while time.monotonic() < until:
        start = time.perf_counter()
        conn.request(method, path, body=body, headers=headers)
        response = conn.getresponse()
        response.read()
        if response.status != 200:
            raise SystemExit(f"{method} {path}: {response.status}")
        out.append(time.perf_counter() - start)
    conn.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("--duration", type=float, default=5.0)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        port = free_port()
        server = MailgwServer(
            Path(tmp),
            {
                "http": {
                    "enabled": "yes",
                    "listen": f"tcp:{port}:interface=127.0.0.1",
                    "listen_tls": f"tcp:{free_port()}:interface=127.0.0.1",
                },
                "imap": {"enabled": "no"},
                "pop3": {"enabled": "no"},
            },
        )
        server.cli("domain", "add", "example.test")
        for i in range(100):
            server.cli("user", "add", f"user{i}@example.test", "--password", "password 123")
        token = server.cli("token", "create", "--scope", "admin").stdout.split()[0]
        server.start()
        try:
            wait_for_port("127.0.0.1", port, proc=server.proc)
            print(f"{args.clients} client(s), {args.duration:g}s per endpoint")
            print(f"{'endpoint':<32} {'req/s':>8} {'p50 ms':>8} {'p99 ms':>8}")
            for method, path, body in ENDPOINTS:
                samples: list[list[float]] = [[] for _ in range(args.clients)]
                until = time.monotonic() + args.duration
                threads = [
                    threading.Thread(
                        target=worker, args=(port, token, method, path, body, until, s)
                    )
                    for s in samples
                ]
                began = time.monotonic()
                for t in threads:
                    t.start()
                for t in threads:
                    t.join()
                elapsed = time.monotonic() - began
                flat = sorted(x for s in samples for x in s)
                p99 = flat[min(len(flat) - 1, int(len(flat) * 0.99))]
                print(
                    f"{method + ' ' + path:<32} {len(flat) / elapsed:>8.0f}"
                    f" {statistics.median(flat) * 1000:>8.2f} {p99 * 1000:>8.2f}"
                )
        finally:
            server.stop()


if __name__ == "__main__":
    main()
