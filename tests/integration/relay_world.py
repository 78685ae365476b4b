"""The relay's test world: target MX servers on 127.0.0.10-17 with their own DNS server (the
peers process, ``tests.integration.relay_peers``), the channels' settings that send to them,
and a node provisioned with aliases to each target. Shared by the relay, policy, reputation,
tracking and reload tests; the module-scoped ``peers`` fixture is in ``conftest.py``.

Channels: domestic binds 127.0.0.4, overseas 127.0.0.2, SDN 127.0.0.3 (all direct). Targets:
far.cn -> 127.0.0.10, rr.example -> .11, block.example -> .12 (refuses 127.0.0.2),
busy.example -> .13 (421 to 127.0.0.2), busy2.example -> .17 (451 on RCPT to 127.0.0.3),
down.example -> .14 (nothing listens), user.example -> .15 (550 5.1.1 for nobody@),
slow.example -> .16 (waits before accepting the data), null.example -> null MX.
"""

from __future__ import annotations

import json
import smtplib
import subprocess
import sys
from pathlib import Path
from typing import Any

from mailgw.testing.server import REPO, MailgwServer, free_port
from tests.integration.helpers import provision
from tests.relay.dnsserver import free_udp_tcp_port

TARGETS = {
    "far.cn": "127.0.0.10",
    "rr.example": "127.0.0.11",
    "block.example": "127.0.0.12",
    "busy.example": "127.0.0.13",
    "down.example": "127.0.0.14",
    "user.example": "127.0.0.15",
    "slow.example": "127.0.0.16",
    "busy2.example": "127.0.0.17",
}
LISTENING = [ip for d, ip in TARGETS.items() if d != "down.example"]
SOURCES = {"127.0.0.4": "domestic", "127.0.0.2": "overseas", "127.0.0.3": "sdn"}


class Peers:
    """The peers process and what it recorded."""

    def __init__(self, folder: Path) -> None:
        self.dir = folder
        folder.mkdir(parents=True, exist_ok=True)
        self.dns_port = free_udp_tcp_port()
        self.smtp_port = free_port()
        zone: dict[str, list[str]] = {}
        for domain, ip in TARGETS.items():
            zone[f"{domain} MX"] = [f"10 mx.{domain}."]
            zone[f"mx.{domain} A"] = [ip]
        zone["null.example MX"] = ["0 ."]
        self.zone = zone
        self.behaviour: dict[str, Any] = {
            TARGETS["block.example"]: {"refuse_from": ["127.0.0.2"]},
            TARGETS["busy.example"]: {
                "greeting_by_peer": {"127.0.0.2": "421 4.3.2 too busy, try later"}
            },
            TARGETS["busy2.example"]: {"rcpt_by_peer": {"127.0.0.3": "451 4.7.1 greylisted"}},
            TARGETS["user.example"]: {"rcpt_replies": {"nobody@user.example": "550 5.1.1 no"}},
            TARGETS["slow.example"]: {"data_delay": 3},
        }
        self.write_behaviour()
        self.proc: subprocess.Popen[str] | None = None

    def write_behaviour(self) -> None:
        (self.dir / "behaviour.json").write_text(json.dumps(self.behaviour))

    def start(self) -> None:
        spec = self.dir / "spec.json"
        spec.write_text(
            json.dumps(
                {
                    "dns_port": self.dns_port,
                    "smtp_port": self.smtp_port,
                    "zone": self.zone,
                    "servers": LISTENING,
                    "out_dir": str(self.dir),
                }
            )
        )
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "tests.integration.relay_peers", str(spec)],
            cwd=REPO,
            stdout=subprocess.PIPE,
            text=True,
        )
        assert self.proc.stdout is not None
        assert self.proc.stdout.readline().strip() == "ready"

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.terminate()
            self.proc.wait(10)
            if self.proc.stdout:
                self.proc.stdout.close()

    def messages(self, server_ip: str | None = None) -> list[dict[str, Any]]:
        out = []
        for path in sorted(self.dir.glob("msg-*.json")):
            record = json.loads(path.read_text())
            if server_ip is None or record["server"] == server_ip:
                out.append(record)
        return out

    def connections(self, server_ip: str) -> list[str]:
        try:
            lines = (self.dir / "connections.log").read_text().splitlines()
        except FileNotFoundError:
            return []
        return [line.split()[1] for line in lines if line.split()[0] == server_ip]


def relay_overrides(peers: Peers, **relay: str) -> dict[str, dict[str, str]]:
    settings = {
        "enabled": "yes",
        "resolvers": f"127.0.0.1:{peers.dns_port}",
        "mx_port": str(peers.smtp_port),
        "default_route": "overseas, sdn",
        "retry_schedule": "1s",
        "max_age": "1h",
        "failure_threshold": "1000",
        "scan_interval": "1s",
        "status_interval": "1s",
        "connect_timeout": "3s",
        "command_timeout": "10s",
    }
    settings.update(relay)
    return {
        "relay": settings,
        "channel:domestic": {"source_addresses": "127.0.0.4", "helo": "cn.example.test"},
        "channel:overseas": {"source_addresses": "127.0.0.2", "helo": "out.example.test"},
        "channel:sdn": {"source_addresses": "127.0.0.3", "helo": "sdn.example.test"},
        "route:domestic": {"recipient_domains": ".cn", "channels": "domestic; overseas, sdn"},
    }


TARGET_ALIASES = (
    *(("alias", "add", f"to-{d.split('.')[0]}@example.test", f"bob@{d}") for d in TARGETS),
    ("alias", "add", "to-null@example.test", "bob@null.example"),
    ("alias", "add", "to-nobody@example.test", "nobody@user.example"),
)
"""to-far@example.test -> bob@far.cn and so on for each target; to-nobody -> nobody@user.example."""


def start_node(
    folder: Path, overrides: dict[str, dict[str, str]], *commands: tuple[str, ...]
) -> MailgwServer:
    """A started node with the test users, ``TARGET_ALIASES`` and ``commands`` (admin
    commands run before the start, as by ``provision``)."""
    server = MailgwServer(folder, overrides)
    provision(server, *TARGET_ALIASES, *commands)
    server.start()
    return server


def send(server: MailgwServer, rcpt: str, subject: str, sender: str = "alice@example.test") -> None:
    with smtplib.SMTP("127.0.0.1", server.ports["mx"], timeout=10) as s:
        s.sendmail(sender, [rcpt], f"From: {sender}\r\nSubject: {subject}\r\n\r\nbody\r\n")


def with_subject(peers: Peers, subject: str, server_ip: str | None = None) -> list[dict[str, Any]]:
    return [m for m in peers.messages(server_ip) if f"Subject: {subject}\r\n" in m["data"]]
