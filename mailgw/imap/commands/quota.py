"""GETQUOTA, GETQUOTAROOT (RFC 9208): one quota root, ``""``, the user's storage."""

from __future__ import annotations

from typing import TYPE_CHECKING

from mailgw.imap import parser as p
from mailgw.imap import wire
from mailgw.imap.commands.registry import Command
from mailgw.imap.states import AUTH

if TYPE_CHECKING:
    from mailgw.imap.session import IMAPServer


def getquotaroot(session: IMAPServer, tag: str, command: p.GetQuotaRoot) -> None:
    if command.mailbox not in session.factory.store.list_mailboxes(session.username()):
        session.no(tag, "No such mailbox", wire.NONEXISTENT)
        return
    name = wire.mailbox_name(command.mailbox, session.utf8_names)
    session.write(wire.untagged(b"QUOTAROOT", name, b'""'))
    session.write(_quota_line(session))
    session.ok(tag, "GETQUOTAROOT completed")


def getquota(session: IMAPServer, tag: str, command: p.GetQuota) -> None:
    if command.root != "":
        session.no(tag, "No such quota root", wire.NONEXISTENT)
        return
    session.write(_quota_line(session))
    session.ok(tag, "GETQUOTA completed")


def _quota_line(session: IMAPServer) -> bytes:
    used, limit = session.factory.store.quota_usage(session.username())
    if limit is None:
        return wire.untagged(b'QUOTA "" ()')
    return wire.untagged(b'QUOTA "" (STORAGE %d %d)' % ((used + 1023) // 1024, limit // 1024))


COMMANDS = (
    Command("GETQUOTAROOT", getquotaroot, AUTH),
    Command("GETQUOTA", getquota, AUTH),
)
