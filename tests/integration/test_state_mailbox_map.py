"""Two gateways sharing a real redis-server and no directory file (``[state] backend =
redis``): the user -> backend node map is in Redis (``mailgw.cluster.statemap``), so both
route a user's mail to the same backend, ``mailgw user node`` on one gateway changes where
the other delivers, ``mailgw user move`` moves the mailbox and the route, and with Redis
stopped the gateways keep the route they last read (the command fails cleanly)."""

from __future__ import annotations

import os
import signal
import smtplib
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from mailgw.cluster.nodemap import hashed_node
from mailgw.testing.redis import RedisServer, redis_path
from mailgw.testing.server import MailgwServer, free_port
from tests.integration.helpers import PASSWORD, mailbox_files, wait_until

pytestmark = pytest.mark.skipif(redis_path() is None, reason="redis-server not installed")

ALICE = "alice@example.test"
BACKENDS = ("be1", "be2")
IMAP_PORTS = {"be1": 10143, "be2": 20143}  # only answered by auth_http, never connected to
IMAP_SERVERS = " ".join(f"{name}=127.0.0.1:{port}" for name, port in IMAP_PORTS.items())


@pytest.fixture
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    server = RedisServer(tmp_path_factory.mktemp("redis"))
    server.start()
    yield server
    server.stop()


def send(gateway: MailgwServer, subject: str) -> None:
    with smtplib.SMTP("127.0.0.1", gateway.ports["mx"], timeout=30) as smtp:
        smtp.sendmail(
            "someone@remote.test",
            [ALICE],
            f"From: <someone@remote.test>\r\nSubject: {subject}\r\n\r\nhi\r\n",
        )


def auth_http_port(port: int) -> int:
    """The IMAP port nginx's ``auth_http`` is told for alice by the gateway on ``port``."""
    request = urllib.request.Request(
        f"http://127.0.0.1:{port}/auth/nginx",
        headers={
            "Auth-Protocol": "imap",
            "Auth-Method": "plain",
            "Auth-User": ALICE,
            "Auth-Pass": urllib.parse.quote(PASSWORD),
            "Client-IP": "127.0.0.1",
        },
    )
    with urllib.request.urlopen(request, timeout=30) as reply:
        assert reply.headers["Auth-Status"] == "OK"
        return int(reply.headers["Auth-Port"])


def subjects(server: MailgwServer) -> set[str]:
    out = set()
    for path in mailbox_files(server):
        for line in path.read_bytes().decode(errors="replace").splitlines():
            if line.startswith("Subject: "):
                out.add(line[len("Subject: ") :])
    return out


def test_two_gateways_share_the_mailbox_map_through_redis(
    server_factory: Callable[..., MailgwServer], redis_server: RedisServer, tmp_path: Path
) -> None:
    lmtp = {name: free_port() for name in BACKENDS}
    http = {name: free_port() for name in ("gw1", "gw2")}
    nodes = " ".join(f"{name}=127.0.0.1:{lmtp[name]}" for name in BACKENDS)
    backends = {
        name: server_factory(
            {
                "server": {"hostname": f"{name}.example.test"},
                "lmtp": {"enabled": "yes", "listen": f"tcp:{lmtp[name]}:interface=127.0.0.1"},
                "state": {"backend": "redis", "redis": redis_server.address, "timeout": "1s"},
                "cluster": {"node_name": name, "mailbox_nodes": nodes},
                "imap": {"workers": "0"},
            },
            name=name,
        )
        for name in BACKENDS
    }
    gateways = [
        server_factory(
            {
                "server": {"hostname": f"{name}.example.test"},
                "state": {"backend": "redis", "redis": redis_server.address, "timeout": "1s"},
                "relay": {"enabled": "yes", "retry_schedule": "1s", "scan_interval": "1s"},
                "cluster": {
                    "node_name": name,
                    "mailbox_nodes": nodes,
                    "imap_servers": IMAP_SERVERS,
                },
                "http": {"enabled": "yes", "listen": f"tcp:{http[name]}:interface=127.0.0.1"},
                "imap": {"workers": "0"},
            },
            name=name,
        )
        for name in ("gw1", "gw2")
    ]
    for gw in gateways:  # each its own directory: nothing shared but Redis
        assert not (Path(str(gw.data_dir)) / ".." / "shared").exists()
    first = hashed_node(ALICE, BACKENDS)
    other = next(name for name in BACKENDS if name != first)

    send(gateways[0], "via-gw1")
    send(gateways[1], "via-gw2")
    wait_until(lambda: {"via-gw1", "via-gw2"} <= subjects(backends[first]), what="both on first")
    assert subjects(backends[other]) == set()
    # Pinned at first use, in Redis (the hash the gateway state keeps).
    reply = redis_server.call("HGET", "mailgw:mailbox-nodes", ALICE)
    assert reply == f"${len(first)}\r\n{first}\r\n".encode()
    shown = gateways[1].cli("user", "node", ALICE).stdout.split()
    assert shown == [ALICE, first]

    # Set on gw1: gw2 delivers to the other node from now on (no shared file).
    out = gateways[0].cli("user", "node", ALICE, other).stdout.split()
    assert out == [ALICE, other]
    assert gateways[1].cli("user", "node", ALICE).stdout.split() == [ALICE, other]
    send(gateways[1], "after-move")
    wait_until(lambda: "after-move" in subjects(backends[other]), what="delivered to the other")
    assert "after-move" not in subjects(backends[first])
    # nginx's auth_http on gw1 (which read the first node before) sends IMAP there too.
    assert auth_http_port(http["gw1"]) == IMAP_PORTS[other]

    bad = gateways[1].cli("user", "node", ALICE, "nowhere", check=False)
    assert bad.returncode != 0 and "unknown node" in (bad.stderr + bad.stdout)

    # Redis not answering (stopped with SIGSTOP): gw2 routes by what it last read (the
    # other node; the hash would say the first), and the command says why it fails.
    assert redis_server.proc is not None
    os.kill(redis_server.proc.pid, signal.SIGSTOP)
    try:
        send(gateways[1], "redis-away")
        wait_until(lambda: "redis-away" in subjects(backends[other]), what="delivered, Redis away")
        # (the same node: a write Redis reads once it runs again changes nothing)
        away = gateways[1].cli("user", "node", ALICE, other, check=False)
        assert away.returncode == 1 and "no answer from the gateway state" in away.stderr
    finally:
        os.kill(redis_server.proc.pid, signal.SIGCONT)
    assert "redis-away" not in subjects(backends[first])
    gateways[1].wait_for_log("answers again")

    # Move back with the mailbox (run with the source node's config): the map in Redis
    # follows, so gw2 (which last read the other node) delivers to the first node again.
    moved = backends[other].cli(
        "user",
        "move",
        ALICE,
        first,
        "--target-config",
        str(backends[first].config_path),
        "--settle",
        "0.2",
        check=False,
    )
    assert moved.returncode == 0, moved.stderr
    assert f"moved {ALICE} from {other} to {first}" in moved.stdout
    assert {"after-move", "redis-away"} <= subjects(backends[first])
    assert subjects(backends[other]) == set()
    send(gateways[1], "after-user-move")
    wait_until(lambda: "after-user-move" in subjects(backends[first]), what="moved back")
    assert gateways[0].cli("user", "node", ALICE).stdout.split() == [ALICE, first]
