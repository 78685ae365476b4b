"""Target MX servers and their DNS for the relay integration tests, as a separate process.

``python -m tests.integration.relay_peers SPEC.json`` serves, on its own reactor:

- a DNS server on ``127.0.0.1:<dns_port>`` with the spec's ``zone`` (``"name TYPE": [values]``);
- one SMTP server per ``servers`` entry on ``host:<smtp_port>``. How each behaves is read
  from ``behaviour.json`` (in ``out_dir``) at every connection, so a test can change it while
  running: ``{"127.0.0.12": {"refuse_from": ["127.0.0.2"], "greeting_by_peer": {...},
  "rcpt_by_peer": {...}, "rcpt_replies": {...}, "data_delay": 3}}``.

Every accepted message is written to ``out_dir/msg-*.json`` (server, peer, MAIL FROM, RCPTs,
data); every connection is appended to ``out_dir/connections.log``. It prints ``ready`` when
listening and runs until killed.
"""

from __future__ import annotations

import itertools
import json
import os
import sys
from typing import Any

from twisted.internet import reactor as _reactor
from twisted.internet.protocol import Factory, Protocol

from tests.relay.dnsserver import _TCP, _UDP, Zone

reactor: Any = _reactor
_counter = itertools.count(1)


class Target(Protocol):
    def __init__(self, host: str, out_dir: str) -> None:
        self.host = host
        self.out_dir = out_dir
        self.buffer = b""
        self.in_data = False
        self.mail_from = ""
        self.rcpts: list[str] = []

    def behaviour(self) -> dict[str, Any]:
        try:
            with open(os.path.join(self.out_dir, "behaviour.json"), encoding="utf-8") as f:
                data: dict[str, Any] = json.load(f).get(self.host, {})
                return data
        except (OSError, ValueError):
            return {}

    def send(self, line: str) -> None:
        self.transport.write(line.encode() + b"\r\n")

    def connectionMade(self) -> None:
        self.peer = self.transport.getPeer().host
        self.b = self.behaviour()
        with open(os.path.join(self.out_dir, "connections.log"), "a", encoding="utf-8") as f:
            f.write(f"{self.host} {self.peer}\n")
        if self.peer in self.b.get("refuse_from", []):
            self.send(f"554 5.7.1 Client host [{self.peer}] blocked by policy")
            self.transport.loseConnection()
            return
        greeting = self.b.get("greeting_by_peer", {}).get(self.peer)
        if greeting:
            self.send(greeting)
            self.transport.loseConnection()
            return
        self.send(f"220 {self.host} ESMTP test target")

    def dataReceived(self, data: bytes) -> None:
        self.buffer += data
        while True:
            if self.in_data:
                end = self.buffer.find(b"\r\n.\r\n")
                if end < 0:
                    return
                body, self.buffer = self.buffer[: end + 2], self.buffer[end + 5 :]
                self.in_data = False
                delay = float(self.b.get("data_delay", 0))
                reactor.callLater(delay, self.accept, body)
                continue
            line, sep, rest = self.buffer.partition(b"\r\n")
            if not sep:
                return
            self.buffer = rest
            self.command(line.decode("utf-8", "replace"))

    def accept(self, body: bytes) -> None:
        record = {
            "server": self.host,
            "peer": self.peer,
            "mail_from": self.mail_from,
            "rcpts": self.rcpts,
            "data": body.decode("utf-8", "replace"),
        }
        name = f"msg-{os.getpid()}-{next(_counter):06d}.json"
        tmp = os.path.join(self.out_dir, name + ".tmp")
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(record, f)
        os.rename(tmp, os.path.join(self.out_dir, name))
        self.rcpts = []
        if self.transport is not None:
            self.send("250 2.0.0 accepted")

    def command(self, line: str) -> None:
        verb = line.split(" ", 1)[0].upper()
        if verb == "EHLO":
            self.send(f"250-{self.host}\r\n250-PIPELINING\r\n250 8BITMIME")
        elif verb == "HELO":
            self.send(f"250 {self.host}")
        elif verb == "MAIL":
            self.mail_from = line[line.index("<") + 1 : line.rindex(">")]
            self.rcpts = []
            self.send("250 2.1.0 ok")
        elif verb == "RCPT":
            rcpt = line[line.index("<") + 1 : line.rindex(">")]
            reply = self.b.get("rcpt_replies", {}).get(rcpt) or self.b.get("rcpt_by_peer", {}).get(
                self.peer
            )
            if reply:
                self.send(reply)
            else:
                self.rcpts.append(rcpt)
                self.send("250 2.1.5 ok")
        elif verb == "DATA":
            if self.rcpts:
                self.in_data = True
                self.send("354 go ahead")
            else:
                self.send("554 5.5.1 no valid recipients")
        elif verb == "RSET":
            self.rcpts = []
            self.send("250 2.0.0 ok")
        elif verb == "QUIT":
            self.send("221 2.0.0 bye")
            self.transport.loseConnection()
        else:
            self.send("502 5.5.1 unknown")


class LiveZone(Zone):
    """The spec's zone plus ``zone-extra.json`` (in ``out_dir``), re-read at every query."""

    def __init__(self, extra_path: str) -> None:
        super().__init__()
        self.extra_path = extra_path
        self.base: dict[tuple[str, str], list[str]] = {}

    def answer(self, wire: bytes) -> bytes | None:
        self.records = {k: list(v) for k, v in self.base.items()}
        try:
            with open(self.extra_path, encoding="utf-8") as f:
                extra = json.load(f)
        except (OSError, ValueError):
            extra = {}
        for key, values in extra.items():
            name, rdtype = key.split()
            self.add(name, rdtype, *values)
        return super().answer(wire)


def main(spec_path: str) -> None:
    with open(spec_path, encoding="utf-8") as f:
        spec = json.load(f)
    zone = LiveZone(os.path.join(spec["out_dir"], "zone-extra.json"))
    for key, values in spec["zone"].items():
        name, rdtype = key.split()
        zone.add(name, rdtype, *values)
    zone.base = zone.records
    port = spec["dns_port"]
    reactor.listenUDP(port, _UDP(zone), interface="127.0.0.1")
    reactor.listenTCP(port, Factory.forProtocol(lambda: _TCP(zone)), interface="127.0.0.1")
    out_dir = spec["out_dir"]
    for host in spec["servers"]:
        factory = Factory.forProtocol(lambda h=host: Target(h, out_dir))
        reactor.listenTCP(spec["smtp_port"], factory, interface=host)
    print("ready", flush=True)
    reactor.run()


if __name__ == "__main__":
    main(sys.argv[1])
