"""A scriptable SMTP server for the client tests, on a loopback port of the real reactor.

``Script`` says how to answer; ``ScriptedSMTP`` records what it saw: commands, the raw DATA
bytes as they came off the wire (still dot-stuffed), chunks, peers, whether TLS was on.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from twisted.internet.protocol import Factory, Protocol


@dataclass
class Script:
    greeting: str | None = "220 mx.test ESMTP ready"
    refuse_connection: bool = False
    extensions: list[str] = field(
        default_factory=lambda: ["PIPELINING", "SIZE 10000000", "8BITMIME"]
    )
    ehlo_reply: str | None = None  # e.g. "502 5.5.1 no EHLO" to force HELO
    helo_reply: str = "250 mx.test"
    starttls_reply: str = "220 2.0.0 go ahead"
    tls_options: Any = None  # server CertificateOptions: STARTTLS is advertised when set
    tls_garbage: bytes = b""  # sent right after the STARTTLS reply (injection test)
    tls_break: bool = False  # answer STARTTLS with 220 then close (handshake failure)
    auth: tuple[str, str] | None = None
    auth_mechanisms: str = "PLAIN LOGIN"
    mail_reply: str = "250 2.1.0 ok"
    rcpt_replies: dict[str, str] = field(default_factory=dict)
    data_reply: str = "354 go"
    end_reply: str = "250 2.0.0 queued"
    rset_reply: str = "250 2.0.0 ok"
    silent_on: set[str] = field(default_factory=set)  # command verbs never answered
    close_after_end: bool = False
    close_on_data: bool = False  # answer DATA with 354, then drop the connection
    close_after_messages: int = 0  # close right after the end reply of the Nth message
    mail_421_after: int = 0  # after N messages, answer the next MAIL with 421 and close
    drop_before_end_reply_after: int = 0  # after N messages, take the next one's data and drop


class Recorder:
    def __init__(self) -> None:
        self.commands: list[str] = []
        self.messages: list[bytes] = []
        self.chunks: list[bytes] = []
        self.peers: list[str] = []
        self.tls_sessions = 0
        self.connections = 0
        self.protocols: list[ScriptedSMTP] = []
        self.unanswered: list[bytes] = []  # data taken, connection dropped before the reply
        self.open_now = 0
        self.max_open = 0  # most sessions open at once


class ScriptedSMTP(Protocol):
    def __init__(self, script: Script, rec: Recorder) -> None:
        self.script = script
        self.rec = rec
        self.buffer = b""
        self.in_data = False
        self.data = b""
        self.tls = False
        self.mails = 0  # MAIL commands on this connection
        self.messages = 0  # messages taken (end of data answered) on this connection
        self.closing = False  # hung up: what the client pipelined after is ignored

    def connectionMade(self) -> None:
        self.rec.connections += 1
        self.rec.open_now += 1
        self.rec.max_open = max(self.rec.max_open, self.rec.open_now)
        self.rec.protocols.append(self)
        self.rec.peers.append(self.transport.getPeer().host)
        if self.script.refuse_connection:
            self.transport.loseConnection()
            return
        if self.script.greeting is not None:
            self.send(self.script.greeting)

    def connectionLost(self, reason: Any = None) -> None:
        self.rec.open_now -= 1

    def hang_up(self) -> None:
        self.closing = True
        self.transport.loseConnection()

    def send(self, text: str) -> None:
        self.transport.write(text.replace("\n", "\r\n").encode() + b"\r\n")

    def dataReceived(self, data: bytes) -> None:
        self.rec.chunks.append(data)
        self.buffer += data
        while not self.closing:
            if self.in_data:
                end = self.buffer.find(b"\r\n.\r\n")
                if self.data == b"" and self.buffer.startswith(b".\r\n"):
                    end = -2
                if end == -1:
                    return
                self.data = self.buffer[: end + 2] if end >= 0 else b""
                self.buffer = self.buffer[end + 5 :]
                self.in_data = False
                self.data, message = b"", self.data
                drop = self.script.drop_before_end_reply_after
                if drop and self.messages >= drop:
                    self.rec.unanswered.append(message)
                    self.hang_up()  # took the data, never answered
                    return
                self.rec.messages.append(message)
                self.messages += 1
                self.send(self.script.end_reply)
                close = self.script.close_after_messages
                if self.script.close_after_end or (close and self.messages >= close):
                    self.hang_up()
                    return
                continue
            line, sep, rest = self.buffer.partition(b"\r\n")
            if not sep:
                return
            self.buffer = rest
            self.command(line.decode())

    def command(self, line: str) -> None:
        self.rec.commands.append(line)
        verb = line.split(" ", 1)[0].upper()
        s = self.script
        if verb in s.silent_on:
            return
        if verb == "EHLO":
            if s.ehlo_reply:
                self.send(s.ehlo_reply)
                return
            ext = list(s.extensions)
            if s.tls_options is not None and not self.tls:
                ext.append("STARTTLS")
            if s.auth:
                ext.append(f"AUTH {s.auth_mechanisms}")
            lines = ["mx.test hello", *ext]
            self.send(
                "\n".join(
                    f"250{'-' if i < len(lines) - 1 else ' '}{t}" for i, t in enumerate(lines)
                )
            )
        elif verb == "HELO":
            self.send(s.helo_reply)
        elif verb == "STARTTLS":
            self.transport.write(s.starttls_reply.encode() + b"\r\n" + s.tls_garbage)
            if s.starttls_reply.startswith("220"):
                if s.tls_break:
                    self.transport.loseConnection()
                    return
                self.transport.startTLS(s.tls_options)
                self.tls = True
                self.rec.tls_sessions += 1
        elif verb == "AUTH":
            import base64

            parts = line.split()
            assert s.auth is not None
            if parts[1].upper() == "PLAIN":
                ok = base64.b64decode(parts[2]) == f"\0{s.auth[0]}\0{s.auth[1]}".encode()
                self.send("235 2.7.0 ok" if ok else "535 5.7.8 bad credentials")
            else:
                self.login_state = []
                self.send("334 VXNlcm5hbWU6")
        elif verb == "MAIL":
            self.mails += 1
            if s.mail_421_after and self.messages >= s.mail_421_after:
                self.send("421 4.4.2 mx.test idle too long, closing")
                self.hang_up()
                return
            self.send(s.mail_reply)
        elif verb == "RCPT":
            address = line[line.index("<") + 1 : line.index(">")]
            self.send(s.rcpt_replies.get(address, "250 2.1.5 ok"))
        elif verb == "DATA":
            self.send(s.data_reply)
            if s.close_on_data:
                self.transport.loseConnection()
            elif s.data_reply.startswith("354"):
                self.in_data = True
        elif verb == "RSET":
            self.send(s.rset_reply)
        elif verb == "QUIT":
            self.send("221 2.0.0 bye")
            self.transport.loseConnection()
        elif hasattr(self, "login_state"):  # AUTH LOGIN continuation
            import base64

            self.login_state.append(base64.b64decode(line).decode())
            if len(self.login_state) == 1:
                self.send("334 UGFzc3dvcmQ6")
            else:
                ok = tuple(self.login_state) == s.auth
                del self.login_state
                self.send("235 2.7.0 ok" if ok else "535 5.7.8 bad credentials")
        else:
            self.send("502 5.5.1 unknown")


def start_smtp(reactor: Any, script: Script, host: str = "127.0.0.1") -> tuple[Any, Recorder]:
    """Listen on a free port of ``host``; returns the listening port and the recorder."""
    rec = Recorder()
    port = reactor.listenTCP(
        0, Factory.forProtocol(lambda: ScriptedSMTP(script, rec)), interface=host
    )
    return port, rec
