"""Cost of the antivirus and inbound-authentication checks per inbound message.

A real ``twistd mailgw`` node takes the same DKIM-signed 2 KB message over and over on one
SMTP connection (smtplib, sequential: each message waits for its 250), with the checks off,
with ``[antivirus]`` on (a real clamd with the tests' EICAR database), with
``[inbound_auth]`` on (SPF, DKIM, DMARC against the tests' loopback DNS server; no DNSBL)
and with both. Rounds alternate the four configurations; the table shows the median msgs/s
over rounds. Latency is dominated by the per-message work, not by concurrency: this is the
cost a sender sees, not the node's throughput under many connections.

Run: .venv/bin/python bench/policy_checks.py [--messages 200] [--rounds 3]
"""

from __future__ import annotations

import argparse
import smtplib
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
sys.path.insert(0, str(REPO))

from mailgw.testing.clamd import Clamd  # noqa: E402
from tests.integration.conftest import make_server  # noqa: E402
from tests.policy.authzone import auth_zone, make_key, message, signed  # noqa: E402
from tests.policy.dnsthread import ThreadedDNS  # noqa: E402


def configs(clamd: Clamd, dns: ThreadedDNS) -> dict[str, dict[str, Any]]:
    av = {"enabled": "yes", "servers": clamd.address}
    auth = {"enabled": "yes", "resolvers": dns.address}
    return {
        "off": {},
        "antivirus": {"antivirus": av},
        "inbound_auth": {"inbound_auth": auth},
        "both": {"antivirus": av, "inbound_auth": auth},
    }


def run(overrides: dict[str, Any], data: bytes, count: int) -> float:
    node = make_server(Path(tempfile.mkdtemp(prefix="bench-policy-")), overrides)
    try:
        with smtplib.SMTP("127.0.0.1", node.ports["mx"], local_hostname="client.test") as s:
            for _ in range(10):  # warm up (imports, PSL, connections)
                s.sendmail("x@good.example.com", ["alice@example.test"], data)
            start = time.perf_counter()
            for _ in range(count):
                s.sendmail("x@good.example.com", ["alice@example.test"], data)
            return count / (time.perf_counter() - start)
    finally:
        node.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--messages", type=int, default=200)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    keys = make_key()
    dns = ThreadedDNS(auth_zone(keys)).start()
    clamd = Clamd(Path(tempfile.mkdtemp(prefix="bench-clamd-"))).start()
    data = signed(message("good.example.com", body=b"x" * 2000 + b"\r\n"), "good.example.com", keys)
    rates: dict[str, list[float]] = {}
    try:
        for _ in range(args.rounds):
            for name, overrides in configs(clamd, dns).items():
                rates.setdefault(name, []).append(run(overrides, data, args.messages))
    finally:
        clamd.stop()
        dns.stop()
    print(f"{'checks':<14}{'msgs/s':>8}{'ms/msg':>8}")
    for name, values in rates.items():
        rate = statistics.median(values)
        print(f"{name:<14}{rate:>8.0f}{1000 / rate:>8.1f}")


if __name__ == "__main__":
    main()
