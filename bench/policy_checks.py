"""Cost of the policy checks per inbound message: each check alone, and all of them together.

A real ``twistd mailgw`` node takes the same DKIM-signed 2 KB message over and over, with the
checks off, with ``[antivirus]`` on (a real clamd with the tests' EICAR database), with
``[inbound_auth]`` on (SPF, DKIM, DMARC against the tests' loopback DNS server; no DNSBL),
with both, and with ``all``: those two plus a realistic rules file of 20 rules of mixed types
(``RULES``: sender / recipient / client CIDR / header regex / subject and body keyword regexes /
DLP / attachment name, extension and type / size / recipient count / rate) and
``[reputation]`` on (the heuristics, a URL blocklist, the volume bookkeeping without spike
points, and a real rspamd, offline, from ``tests/integration/rspamd_peer.py``).

Two clients: ``seq`` is one smtplib connection, each message waiting for its 250 (the
latency a sender sees); ``par`` is ``--threads`` smtplib connections at once (the node's
throughput with many senders: the checks that wait on clamd / rspamd / DNS overlap). Rounds
alternate the configurations; the table shows the median msgs/s over rounds, then the CPU
each process spent per message during the timed part (the node with its children, clamd,
rspamd, and this process: the clients and the loopback DNS server).
``--profile FILE`` runs ``all`` once more under twistd's cProfile (sequential client; the
reactor thread only, not the I/O thread pool) and prints the top functions.

Run: .venv/bin/python bench/policy_checks.py [--messages 200] [--rounds 3] [--threads 20]
     [--only off,all] [--par-only off,all] [--profile /tmp/all.prof]
"""

from __future__ import annotations

import argparse
import os
import pstats
import shutil
import smtplib
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
sys.path.insert(0, str(REPO))

from bench.smtp_inbound import tree_cpu_seconds  # noqa: E402
from mailgw.policy.rules import parse_rules  # noqa: E402
from mailgw.testing.clamd import Clamd  # noqa: E402
from mailgw.testing.server import MailgwServer  # noqa: E402
from tests.integration.conftest import make_server  # noqa: E402
from tests.integration.helpers import provision  # noqa: E402
from tests.integration.rspamd_peer import Rspamd  # noqa: E402
from tests.policy.authzone import auth_zone, make_key, message, signed  # noqa: E402
from tests.policy.dnsthread import ThreadedDNS  # noqa: E402

SENDER = "x@good.example.com"
RECIPIENT = "alice@example.test"

# 20 rules as a site might have them; the bench message is hit by two `continue` rules (a
# header added, a rate counted) and none of the others, so every rule is evaluated.
RULES = r"""
rule blocked-senders
    match sender @spam.example .bulk.example *@*.xyz /^(noreply|bounce)-[0-9]+@/
    action reject 554 5.7.1 "Sender refused by policy"
rule blocked-networks
    match client-ip 192.0.2.0/24 198.51.100.0/24 203.0.113.0/24 2001:db8::/32
    action reject 554 5.7.1 "Network refused by policy"
rule partner-tag
    match sender @good.example.com @partner.example
    action add-header X-Partner: yes
    action continue
rule ceo-archive
    match recipient ceo@example.test board@example.test
    match not sender @example.test
    action bcc archive@example.test
    action continue
rule too-many-recipients
    match recipients > 200
    action tempfail 452 4.5.3 "Too many recipients"
rule too-big
    match size > 30M
    action reject 552 5.3.4 "Message too big"
rule executables
    match attachment-type exe elf macho script
    action reject 554 5.7.1 "Executable attachments are not accepted"
rule risky-extensions
    match attachment-ext exe scr bat cmd com pif vbs js jse wsf hta msi lnk
    action reject 554 5.7.1 "Attachment type refused"
rule macro-documents
    match attachment-name *.docm *.xlsm *.pptm invoice*.zip
    action quarantine macro document
rule encrypted-archives
    match attachment-type encrypted
    action quarantine encrypted archive
rule mime-bombs
    match mime-error
    action quarantine message not scanned whole
rule mass-mailers
    match header X-Mailer /(mass|bulk) ?mail|sendblaster/i
    action folder Junk
rule forged-priority
    match header * /\bunsubscribe\s+now\b/i
    action add-header X-Policy: list-like
    action continue
rule spam-subjects
    match subject /\b(viagra|cialis|lottery|casino|bitcoin giveaway)\b/i "cheap pills" "act now"
    action tag-subject [SPAM?]
    action folder Junk
rule confidential-outside
    match body /\b(strictly confidential|internal use only)\b/i
    match external-recipient
    action quarantine confidential text to outside
rule ssn-like
    match body /\b[0-9]{3}-[0-9]{2}-[0-9]{4}\b/
    action add-header X-DLP: ssn-like
    action continue
rule cn-id-numbers
    match dlp cn-id 2
    action quarantine identity numbers
rule card-numbers
    match dlp card-number 3
    action quarantine card numbers
rule per-ip-rate
    match rate 1000000/1h per ip
    action tempfail 451 4.7.1 "Too many messages from your address, slow down"
rule per-domain-rate
    match rate 1000000/1h per sender-domain
    action tempfail 451 4.7.1 "Too many messages from your domain, slow down"
"""


def configs(
    clamd: Clamd, dns: ThreadedDNS, rspamd: Rspamd, rules_file: Path
) -> dict[str, dict[str, Any]]:
    av = {"enabled": "yes", "servers": clamd.address}
    auth = {"enabled": "yes", "resolvers": dns.address}
    reputation = {
        "enabled": "yes",
        "rspamd": rspamd.address,
        "rspamd_timeout": "5s",
        "url_blocklist": "bad-links.example http://phish.example/login",
        # The bench is a volume spike from one sender domain by design: its volume is counted
        # (that cost stays) but earns no bad points, or the domain is refused mid-run.
        "spike_points": "0",
    }
    return {
        "off": {},
        "antivirus": {"antivirus": av},
        "inbound_auth": {"inbound_auth": auth},
        "both": {"antivirus": av, "inbound_auth": auth},
        "all": {
            "antivirus": av,
            "inbound_auth": auth,
            "reputation": reputation,
            "policy": {"rules_file": str(rules_file)},
        },
    }


def send_many(port: int, data: bytes, count: int) -> None:
    with smtplib.SMTP("127.0.0.1", port, local_hostname="client.test", timeout=60) as s:
        for _ in range(count):
            s.sendmail(SENDER, [RECIPIENT], data)


Probe = Callable[[], dict[str, float]]


def drive(port: int, data: bytes, count: int, threads: int, probe: Probe) -> tuple[float, dict]:
    """(msgs/s, CPU seconds per process over the timed part) of ``count`` messages: one
    connection (``threads`` 1) or ``threads`` at once."""
    send_many(port, data, 10)  # warm up (imports, PSL, connections to clamd / rspamd)
    errors: list[BaseException] = []

    def worker(n: int) -> None:
        try:
            send_many(port, data, n)
        except BaseException as e:  # reported below: a refused message spoils the run
            errors.append(e)

    share = [count // threads + (1 if i < count % threads else 0) for i in range(threads)]
    workers = [threading.Thread(target=worker, args=(n,)) for n in share]
    before = probe()
    start = time.perf_counter()
    if threads <= 1:
        send_many(port, data, count)
    else:
        for w in workers:
            w.start()
        for w in workers:
            w.join()
    elapsed = time.perf_counter() - start
    after = probe()
    if errors:
        raise RuntimeError(f"{len(errors)} client(s) failed: {errors[0]!r}")
    return count / elapsed, {k: after[k] - before[k] for k in after}


def cpu_probe(peers: dict[str, int]) -> Probe:
    """CPU seconds (user + system) of each process tree in ``peers`` and of this process
    (the smtplib clients and the loopback DNS server's thread)."""

    def probe() -> dict[str, float]:
        out = {name: sum(tree_cpu_seconds(pid)) for name, pid in peers.items()}
        t = os.times()
        out["client+dns"] = t.user + t.system
        return out

    return probe


def run(
    overrides: dict[str, Any], data: bytes, count: int, threads: int, peers: dict[str, int]
) -> tuple[float, dict[str, float]]:
    folder = Path(tempfile.mkdtemp(prefix="bench-policy-"))
    node = make_server(folder, overrides)
    assert node.proc is not None
    try:
        probe = cpu_probe({"mailgw": node.proc.pid, **peers})
        return drive(node.ports["mx"], data, count, threads, probe)
    finally:
        node.stop()
        shutil.rmtree(folder, ignore_errors=True)


def profile(overrides: dict[str, Any], data: bytes, count: int, path: Path) -> None:
    node = MailgwServer(
        Path(tempfile.mkdtemp(prefix="bench-policy-prof-")),
        overrides,
        twistd_args=[f"--profile={path}", "--profiler=cprofile", "--savestats"],
    )
    provision(node)
    node.start()
    try:
        drive(node.ports["mx"], data, count, 1, dict)
    finally:
        node.stop(60)
    st = pstats.Stats(str(path))
    print(f"\ncProfile of the node under `all` ({count} messages, sequential): top 30")
    st.sort_stats("cumulative").print_stats(30)
    st.sort_stats("tottime").print_stats(25)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--messages", type=int, default=200)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=20, help="connections of the par client")
    parser.add_argument("--only", default="", help="comma-separated configurations (default all)")
    parser.add_argument("--clients", default="seq,par", help="seq, par or both")
    parser.add_argument(
        "--par-only", default="off,all", help="configurations the par client runs (off,all)"
    )
    parser.add_argument("--profile", type=Path, default=None, help="cProfile `all` into FILE")
    args = parser.parse_args()
    folder = Path(tempfile.mkdtemp(prefix="bench-policy-peers-"))
    rules_file = folder / "rules.conf"
    rules_file.write_text(RULES)
    assert len(parse_rules(RULES)) == 20
    keys = make_key()
    dns = ThreadedDNS(auth_zone(keys)).start()
    clamd = Clamd(folder / "clamd").start()
    rspamd = Rspamd(folder / "rspamd")
    rspamd.start()
    body = b"Hello,\r\n\r\nthe report is attached below.\r\n" + b"x" * 2000 + b"\r\n"
    data = signed(message("good.example.com", body=body), "good.example.com", keys)
    load = os.getloadavg()
    every = configs(clamd, dns, rspamd, rules_file)
    chosen = [c for c in args.only.split(",") if c] or list(every)
    clients = {"seq": 1, "par": args.threads}
    chosen_clients = [c for c in args.clients.split(",") if c]
    rates: dict[tuple[str, str], list[float]] = {}
    cpu: dict[tuple[str, str], list[dict[str, float]]] = {}
    assert clamd.proc is not None and rspamd.proc is not None
    peers = {"clamd": clamd.proc.pid, "rspamd": rspamd.proc.pid}
    try:
        for _ in range(args.rounds):
            for client in chosen_clients:
                for name in chosen:
                    if client == "par" and name not in args.par_only.split(","):
                        continue
                    rate, used = run(every[name], data, args.messages, clients[client], peers)
                    rates.setdefault((name, client), []).append(rate)
                    cpu.setdefault((name, client), []).append(used)
                    print(f"  {name} {client}: {rate:.0f} msgs/s", file=sys.stderr, flush=True)
        if args.profile is not None:
            profile(every["all"], data, args.messages, args.profile)
    finally:
        rspamd.stop()
        clamd.stop()
        dns.stop()
        shutil.rmtree(folder, ignore_errors=True)
    print(f"load average at start {load[0]:.2f} {load[1]:.2f}, at end {os.getloadavg()[0]:.2f}")
    print(f"{'checks':<14}{'client':<8}{'msgs/s':>8}{'ms/msg':>8}{'vs off':>8}   rounds")
    for (name, client), values in rates.items():
        rate = statistics.median(values)
        off = rates.get(("off", client))
        ratio = f"{rate / statistics.median(off):.2f}" if off else "-"
        each = " ".join(f"{v:.0f}" for v in values)
        print(f"{name:<14}{client:<8}{rate:>8.0f}{1000 / rate:>8.1f}{ratio:>8}   {each}")
    print("\nCPU ms per message, by process (median over rounds; the machine has 2 CPUs):")
    names = ["mailgw", "clamd", "rspamd", "client+dns"]
    print(f"{'checks':<14}{'client':<8}" + "".join(f"{n:>12}" for n in names) + f"{'total':>10}")
    for (name, client), runs in cpu.items():
        per = {n: statistics.median(r[n] for r in runs) * 1000 / args.messages for n in names}
        cells = "".join(f"{per[n]:>12.1f}" for n in names)
        print(f"{name:<14}{client:<8}{cells}{sum(per.values()):>10.1f}")


if __name__ == "__main__":
    main()
