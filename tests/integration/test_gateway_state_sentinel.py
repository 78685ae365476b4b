"""Redis Sentinel behind two gateways (``[state] sentinels``): the master is killed by PID,
the gateways keep accepting mail meanwhile (local counters), and once Sentinel has promoted
the replica the shared rate counters are counted in the new master."""

from __future__ import annotations

import signal
import smtplib
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from mailgw.testing.redis import RedisSentinel, RedisServer, redis_path
from mailgw.testing.server import MailgwServer
from tests.integration.helpers import wait_until

pytestmark = pytest.mark.skipif(redis_path() is None, reason="redis-server not installed")

RULES = """\
rule mx-rate
    match direction inbound
    match rate 100/1h per sender
    action tempfail 450 4.7.1 "Too many messages, slow down"
"""


@pytest.fixture
def redis_pair(tmp_path: Path) -> Iterator[tuple[RedisServer, RedisServer, RedisSentinel]]:
    master = RedisServer(tmp_path / "r1", extra=["--repl-diskless-sync-delay", "0"])
    master.start()
    replica = RedisServer(
        tmp_path / "r2",
        extra=["--replicaof", "127.0.0.1", str(master.port), "--repl-diskless-sync-delay", "0"],
    )
    replica.start()
    sentinel = RedisSentinel(tmp_path / "s1", master)
    sentinel.start()
    yield master, replica, sentinel
    for server in (sentinel, replica, master):
        server.stop()


def send(node: MailgwServer, sender: str) -> int:
    with smtplib.SMTP("127.0.0.1", node.ports["mx"], timeout=30) as smtp:
        try:
            smtp.sendmail(sender, ["alice@example.test"], "Subject: t\r\n\r\nhi\r\n")
        except smtplib.SMTPResponseException as e:
            return e.smtp_code
        except smtplib.SMTPRecipientsRefused as e:
            return next(iter(e.recipients.values()))[0]
    return 250


def test_gateways_keep_serving_through_a_sentinel_failover(
    server_factory: Callable[..., MailgwServer],
    redis_pair: tuple[RedisServer, RedisServer, RedisSentinel],
    tmp_path: Path,
) -> None:
    master, replica, sentinel = redis_pair
    rules = tmp_path / "rules.txt"
    rules.write_text(RULES)
    gateways = [
        server_factory(
            {
                "state": {
                    "backend": "redis",
                    "sentinels": sentinel.address,
                    "master_name": "mailgw",
                    "timeout": "300ms",
                },
                "cluster": {"node_name": name},
                "policy": {"rules_file": str(rules)},
            },
            name=name,
        )
        for name in ("gw1", "gw2")
    ]
    for node in gateways:
        assert send(node, "before@failover.test") == 250
    assert b"before@failover.test" in master.call("KEYS", "mailgw:rate:*")
    wait_until(
        lambda: b"master_link_status:up" in replica.call("INFO", "replication"),
        what="the replica in sync",
    )
    master.kill(signal.SIGKILL)
    killed = time.monotonic()
    # Meanwhile every message is still accepted (counted locally while Redis is away).
    for node in gateways:
        assert send(node, "during@failover.test") == 250
    wait_until(
        lambda: b"role:master" in replica.call("INFO", "replication"),
        timeout=30,
        what="Sentinel promoting the replica",
    )

    def counted_in_new_master() -> bool:
        for node in gateways:
            assert send(node, "after@failover.test") == 250
        return b"after@failover.test" in replica.call("KEYS", "mailgw:rate:*")

    wait_until(counted_in_new_master, timeout=30, what="counters in the new master")
    print(f"shared counters resumed {time.monotonic() - killed:.1f}s after the master was killed")
    assert b"before@failover.test" in replica.call("KEYS", "mailgw:rate:*")  # replicated
    # The config channel follows the new master too: a push reaches both gateways.
    (tmp_path / "pushed.txt").write_text(
        "rule pushed\n    match sender blocked@spam.test\n    action reject\n"
    )
    policy = tmp_path / "policy.ini"
    policy.write_text("[policy]\nrules_file = pushed.txt\n")
    assert "published v1" in gateways[0].cli("config", "push", str(policy)).stdout
    for node in gateways:
        node.wait_for_log("applied pushed config v1", timeout=15)
        assert send(node, "blocked@spam.test") == 550
