"""The tests' DNS server (``tests.relay.dnsserver.Zone``) served from threads, not the reactor.

The inbound-authentication tests run blocking clients (smtplib against a real twistd) and
blocking lookups (dnspython): ``ThreadedDNS`` answers ``zone`` on loopback UDP and TCP from
threads of the test process, so no reactor needs to run. Large answers (DKIM keys) come
truncated over UDP and whole over TCP, as from a real server without EDNS.
"""

from __future__ import annotations

import socketserver
import struct
import threading

import dns.flags
import dns.message

from tests.relay.dnsserver import Zone, free_udp_tcp_port


class ThreadedDNS:
    """``zone`` on ``127.0.0.1:port`` (``address``) until ``stop``."""

    def __init__(self, zone: Zone) -> None:
        self.zone = zone
        self.port = 0
        self._servers: list[socketserver.BaseServer] = []
        self._threads: list[threading.Thread] = []

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self) -> ThreadedDNS:
        zone = self.zone

        class UDP(socketserver.BaseRequestHandler):
            def handle(self) -> None:
                data, sock = self.request
                reply = zone.answer(data)
                if reply is None:
                    return
                if len(reply) > 512:
                    msg = dns.message.from_wire(reply)
                    msg.answer = []
                    msg.flags |= dns.flags.TC
                    reply = msg.to_wire()
                sock.sendto(reply, self.client_address)

        class TCP(socketserver.StreamRequestHandler):
            def handle(self) -> None:
                while len(head := self.rfile.read(2)) == 2:
                    (length,) = struct.unpack("!H", head)
                    reply = zone.answer(self.rfile.read(length))
                    if reply is not None:
                        self.wfile.write(struct.pack("!H", len(reply)) + reply)

        for _ in range(20):
            self.port = free_udp_tcp_port()
            try:
                udp = socketserver.ThreadingUDPServer(("127.0.0.1", self.port), UDP)
            except OSError:
                continue
            try:
                tcp = socketserver.ThreadingTCPServer(("127.0.0.1", self.port), TCP)
            except OSError:
                udp.server_close()
                continue
            break
        else:
            raise OSError("no free UDP+TCP port")
        for server in (udp, tcp):
            server.daemon_threads = True
            thread = threading.Thread(target=server.serve_forever, daemon=True)
            thread.start()
            self._servers.append(server)
            self._threads.append(thread)
        return self

    def stop(self) -> None:
        for server in self._servers:
            server.shutdown()
            server.server_close()
        for thread in self._threads:
            thread.join(5)
