"""A POP3 maildrop: the INBOX snapshot taken at login, numbered 1..n, with deletion marks."""

from __future__ import annotations

import re
from typing import Any

from mailgw.interfaces import IMailbox, IMessageStore

_NUMBER_RE = re.compile(r"[0-9]{1,10}")


class NoSuchMessage(Exception):
    """The argument names no visible message; ``str()`` is the text for ``-ERR``."""


def parse_number(text: str) -> int | None:
    """A POP3 decimal argument (ASCII digits only, bounded), or None if it is not one."""
    if not _NUMBER_RE.fullmatch(text):
        return None
    return int(text)


class Maildrop:
    """Messages of one mailbox as of login; deletions take effect only in ``commit``."""

    def __init__(self, mailbox: IMailbox, messages: list[Any]) -> None:
        self.mailbox = mailbox
        self._messages = list(messages)
        self._deleted: set[int] = set()

    @classmethod
    def open(cls, store: IMessageStore, user: str) -> Maildrop:
        """Open ``user``'s INBOX and take the snapshot."""
        mailbox = store.open_mailbox(user, "INBOX")
        return cls(mailbox, mailbox.messages())

    @property
    def count(self) -> int:
        """Messages not marked deleted."""
        return len(self._messages) - len(self._deleted)

    @property
    def size(self) -> int:
        """Octets of the messages not marked deleted."""
        return sum(int(m.size) for n, m in self.visible())

    def visible(self) -> list[tuple[int, Any]]:
        """(number, MessageInfo) of every message not marked deleted."""
        return [(n, m) for n, m in enumerate(self._messages, start=1) if n not in self._deleted]

    def lookup(self, text: str) -> tuple[int, Any]:
        """The (number, MessageInfo) named by ``text``; NoSuchMessage otherwise."""
        number = parse_number(text)
        if number is None:
            raise NoSuchMessage("Invalid message number")
        if not 1 <= number <= len(self._messages):
            raise NoSuchMessage("No such message")
        if number in self._deleted:
            raise NoSuchMessage(f"Message {number} already deleted")
        return number, self._messages[number - 1]

    def unique_id(self, info: Any) -> str:
        """The UIDL of a message: stable across sessions and restarts, never reused."""
        return f"{self.mailbox.uidvalidity}.{info.uid}"

    def delete(self, number: int) -> None:
        """Mark message ``number`` (already validated by ``lookup``) deleted."""
        self._deleted.add(number)

    def reset(self) -> None:
        """Unmark every message (RSET)."""
        self._deleted.clear()

    def commit(self) -> int:
        """Expunge the messages marked deleted (UPDATE state); returns how many were removed.

        A message already gone (expunged by another session) counts as removed."""
        if not self._deleted:
            return 0
        uids = [int(self._messages[n - 1].uid) for n in sorted(self._deleted)]
        self.mailbox.expunge(uids)
        return len(uids)
