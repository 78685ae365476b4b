"""POP3 mailbox access (RFC 1939, 2449 CAPA, 2595 STLS, 5034 AUTH PLAIN) over IMessageStore."""

from mailgw.pop3.factory import POP3Factory
from mailgw.pop3.protocol import POP3Server

__all__ = ["POP3Factory", "POP3Server"]
