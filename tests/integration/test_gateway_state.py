"""Two gateways sharing a real redis-server (``[state] backend = redis``): a ``rate`` rule
counts across both, a brute force spread over both is locked out on both, a pushed unified
config reaches both (and rolls back; an invalid one is refused), and with Redis stopped mail
still flows, the last-good config holds (even across a restart), and the shared counters
resume once Redis is back."""

from __future__ import annotations

import json
import re
import smtplib
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from mailgw.testing.redis import RedisServer, redis_path
from mailgw.testing.server import MailgwServer
from tests.integration.helpers import PASSWORD, imap_login, mailbox_files, pop3_login, wait_until

pytestmark = pytest.mark.skipif(redis_path() is None, reason="redis-server not installed")

ALICE = "alice@example.test"
RATE_RULES = """\
rule mx-rate
    match direction inbound
    match rate 3/1h per sender
    action tempfail 450 4.7.1 "Too many messages, slow down"
"""
PUSHED_RULES = """\
rule pushed-block
    match sender blocked@spam.test
    action reject 550 5.7.1 "Blocked by the pushed policy"
"""


@pytest.fixture(scope="module")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    server = RedisServer(tmp_path_factory.mktemp("redis"))
    server.start()
    yield server
    server.stop()


@pytest.fixture
def gateways(
    server_factory: Callable[..., MailgwServer], redis_server: RedisServer, tmp_path: Path
) -> list[MailgwServer]:
    redis_server.call("FLUSHALL")
    rules = tmp_path / "rules.txt"
    rules.write_text(RATE_RULES)
    nodes = []
    for name in ("gw1", "gw2"):
        nodes.append(
            server_factory(
                {
                    "state": {
                        "backend": "redis",
                        "redis": redis_server.address,
                        "timeout": "300ms",
                    },
                    "cluster": {"node_name": name},
                    "policy": {"rules_file": str(rules)},
                    "pop3": {"allow_plaintext_auth": "yes"},
                    "imap": {"workers": "1", "allow_plaintext_auth": "yes"},
                    "directory": {
                        "auth_failure_delay": "0.05s",
                        "auth_max_delay": "0.1s",
                        "auth_lockout_failures": "3",
                        "auth_lockout_time": "60s",
                    },
                },
                name=name,
            )
        )
    return nodes


def send(node: MailgwServer, sender: str, rcpt: str = ALICE) -> tuple[int, str]:
    """(code, text) of the first refusal, or (250, "") when the message was accepted."""
    with smtplib.SMTP("127.0.0.1", node.ports["mx"], timeout=30) as smtp:
        try:
            smtp.sendmail(sender, [rcpt], f"From: <{sender}>\r\nSubject: t\r\n\r\nhi\r\n")
        except smtplib.SMTPSenderRefused as e:
            return e.smtp_code, e.smtp_error.decode()
        except smtplib.SMTPRecipientsRefused as e:
            code, text = next(iter(e.recipients.values()))
            return code, text.decode()
        except smtplib.SMTPDataError as e:
            return e.smtp_code, e.smtp_error.decode()
    return 250, ""


def status(node: MailgwServer) -> dict[str, object]:
    result = node.cli("config", "status", "--json", check=False)
    loaded: dict[str, object] = json.loads(result.stdout)
    return loaded


def applied_everywhere(node: MailgwServer, version: int) -> bool:
    nodes = status(node)["nodes"]
    assert isinstance(nodes, dict)
    return all(nodes.get(n, {}).get("applied") == version for n in ("gw1", "gw2"))


def write_policy(folder: Path, rules: str, extra: str = "") -> Path:
    (folder / "pushed-rules.txt").write_text(rules)
    policy = folder / "policy.ini"
    policy.write_text(f"[policy]\nrules_file = pushed-rules.txt\n{extra}")
    return policy


def test_a_rate_rule_counts_across_both_gateways(gateways: list[MailgwServer]) -> None:
    gw1, gw2 = gateways
    sender = "bulk@sender.test"
    assert send(gw1, sender) == (250, "")
    assert send(gw2, sender) == (250, "")
    assert send(gw1, sender) == (250, "")
    # The fourth message in the hour, whichever gateway gets it, is over the limit of 3.
    assert send(gw2, sender) == (450, "4.7.1 Too many messages, slow down")
    assert send(gw1, sender) == (450, "4.7.1 Too many messages, slow down")
    assert send(gw1, "other@sender.test") == (250, "")


def test_a_brute_force_spread_over_both_gateways_is_locked_out_on_both(
    gateways: list[MailgwServer],
) -> None:
    gw1, gw2 = gateways
    assert pop3_login(gw1, "wrong 1") != "ok"
    assert "AUTHENTICATIONFAILED" in imap_login(gw2, "wrong 2")  # in an IMAP worker process
    assert pop3_login(gw1, "wrong 3") != "ok"
    # Three failures in all (none of the gateways saw three): the account is locked on both,
    # the right password fails as a wrong one does.
    assert pop3_login(gw1, PASSWORD) == "-ERR [AUTH] Authentication failed"
    assert pop3_login(gw2, PASSWORD) == "-ERR [AUTH] Authentication failed"
    assert "AUTHENTICATIONFAILED" in imap_login(gw1, PASSWORD)
    assert "auth lockout: account alice@example.test" in gw1.log() + gw2.log()


def test_push_reaches_both_gateways_rollback_and_invalid_push(
    gateways: list[MailgwServer], tmp_path: Path
) -> None:
    gw1, gw2 = gateways
    assert send(gw1, "blocked@spam.test") == (250, "")
    policy = write_policy(tmp_path, PUSHED_RULES)
    result = gw1.cli("config", "push", str(policy))
    assert "published v1" in result.stdout
    wait_until(lambda: applied_everywhere(gw1, 1), timeout=10, what="v1 on both gateways")
    # Each gateway logs how long after the push (the time written into the version) it had
    # applied it: the delay through Redis pub/sub, without the command's start-up.
    delays = []
    for node in gateways:
        found = re.search(r"applied pushed config v1 \(([0-9.]+)s after the push\)", node.log())
        assert found, node.log()[-2000:]
        delays.append(float(found.group(1)))
    print(f"config push v1 applied on the gateways {delays} s after the push")
    for node in gateways:
        assert send(node, "blocked@spam.test") == (550, "5.7.1 Blocked by the pushed policy")
        assert send(node, "fine@sender.test") == (250, "")
        assert "applied pushed config v1" in node.log()
    out = gw2.cli("config", "status").stdout
    assert "current version: v1" in out and "gw1: applied v1 (ok)" in out

    # An invalid file is never published: a rule with an error, a key that needs a restart.
    bad = write_policy(tmp_path, "rule broken\n    match nonsense\n    action reject\n")
    refused = gw1.cli("config", "push", str(bad), check=False)
    assert refused.returncode == 1 and "nothing published" in refused.stderr
    assert "pushed-rules.txt:2" in refused.stderr
    restart_key = tmp_path / "listen.ini"
    restart_key.write_text("[mx]\nlisten = tcp:2525\n")
    refused = gw1.cli("config", "push", str(restart_key), check=False)
    assert refused.returncode == 1 and "cannot be pushed" in refused.stderr
    assert status(gw1)["current"] == 1

    # v2 lifts the block; rollback returns to v1 on both.
    allow = write_policy(
        tmp_path, "rule nothing\n    match sender nobody@nowhere.test\n    action reject\n"
    )
    assert "published v2" in gw2.cli("config", "push", str(allow)).stdout
    wait_until(lambda: applied_everywhere(gw1, 2), timeout=10, what="v2 on both gateways")
    assert send(gw2, "blocked@spam.test") == (250, "")
    assert "v1 is current again" in gw1.cli("config", "rollback").stdout
    wait_until(lambda: applied_everywhere(gw1, 1), timeout=10, what="rollback on both")
    for node in gateways:
        assert send(node, "blocked@spam.test") == (550, "5.7.1 Blocked by the pushed policy")


def test_redis_down_mail_flows_last_good_config_holds_counters_resume(
    gateways: list[MailgwServer], redis_server: RedisServer, tmp_path: Path
) -> None:
    gw1, gw2 = gateways
    policy = write_policy(tmp_path, PUSHED_RULES + RATE_RULES)
    gw1.cli("config", "push", str(policy))
    wait_until(lambda: applied_everywhere(gw1, 1), timeout=10, what="v1 on both gateways")
    redis_server.stop()
    try:
        before = [len(mailbox_files(n)) for n in gateways]
        for node in gateways:
            assert send(node, "during@outage.test") == (250, "")  # counted locally
            assert send(node, "during@outage.test") == (250, "")
            assert send(node, "blocked@spam.test")[0] == 550  # the last-good config holds
        for node, n in zip(gateways, before, strict=True):
            wait_until(lambda node=node, n=n: len(mailbox_files(node)) == n + 2, what="delivery")
            log = node.log()
            assert log.count("gateway state: Redis 127.0.0.1") == 1, log[-3000:]
            assert "Scheduling retry" not in log
        # A gateway restarted while Redis is down starts with its last-good config.
        gw2.stop()
        gw2.start()
        assert send(gw2, "blocked@spam.test")[0] == 550
        assert send(gw2, "after@restart.test") == (250, "")
        assert "starting with pushed config v1 (last good)" in gw2.log()
    finally:
        redis_server.start()
    # Redis is back (empty: it keeps nothing on disk): the gateways count there again.
    gw1.wait_for_log("answers again: shared state resumed", timeout=20)
    assert send(gw1, "counted@again.test") == (250, "")
    keys = redis_server.call("KEYS", "mailgw:rate:*")
    assert b"counted@again.test" in keys, keys
    # ...and report again (this Redis came back empty: the nodes keep v1 until a new push).
    wait_until(lambda: applied_everywhere(gw1, 1), timeout=20, what="reports after the outage")
    assert status(gw1)["current"] == 0
