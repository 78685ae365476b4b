"""Moving a user's mailbox to another backend node without losing mail (a locked copy).

Steps (``move_mailbox``):

1. **hold**: ``IMailboxMap.set_held(user, True)``. Gateways keep the user's new mail in
   their queue (the relay defers it, retrying every ``[cluster] move_hold_retry``) and do not
   send it to either node;
2. **settle**: wait ``settle`` seconds, so that an LMTP delivery already past the hold check
   when it was set finishes on the source node;
3. **copy**: every folder (created on the target when missing) and every message, with its
   flags and internal date, from the source store into the target store;
4. **switch**: ``set_node(user, target)``: new sessions (nginx ``auth_http``) and new
   deliveries go to the target node;
5. **catch up**: copy what reached the source during steps 2-4 (messages not copied yet);
6. **release**: ``set_held(user, False)``: the held mail is delivered, to the target;
7. the copied messages are expunged from the source (``keep_source`` leaves them).

A failure before the switch releases the hold and leaves the user on the source node
(copies already made on the target stay there, harmless: they are not reachable until a
later move copies again; re-running the move is safe). Both stores are opened through their
``MessageStore`` (the same machine or a shared mount): the files of each node, not IMAP.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from mailgw.interfaces import IMailboxMap

INBOX = "INBOX"


@dataclass
class MoveReport:
    """What a move did: messages copied per folder, and expunged from the source."""

    copied: dict[str, int] = field(default_factory=dict)
    expunged: int = 0

    @property
    def total(self) -> int:
        return sum(self.copied.values())


def _copy_pass(
    source: Any, target: Any, user: str, done: dict[str, set[int]], report: MoveReport
) -> None:
    """Copy the messages of every folder of ``user`` not in ``done`` (folder -> source
    UIDs copied), recording them there."""
    existing = set(target.list_mailboxes(user))
    for folder in source.list_mailboxes(user):
        if folder not in existing:
            target.create_mailbox(user, folder)
            existing.add(folder)
        box = source.open_mailbox(user, folder)
        box.refresh()
        copied = done.setdefault(folder, set())
        for info in box.messages():
            if info.uid in copied:
                continue
            data = box.read_message(info.uid)
            flags = [f for f in info.flags if f != "\\Recent"]
            target.append_messages(user, folder, [(data, flags, info.internaldate)])
            copied.add(info.uid)
            report.copied[folder] = report.copied.get(folder, 0) + 1


def move_mailbox(
    user: str,
    node: str,
    mailbox_map: IMailboxMap,
    source: Any,
    target: Any,
    settle: float = 2.0,
    keep_source: bool = False,
    sleep: Callable[[float], None] = time.sleep,
    say: Callable[[str], None] = lambda _: None,
) -> MoveReport:
    """Move ``user``'s mailbox from ``source`` to ``target`` (``MessageStore`` objects) and
    point the map at ``node`` (see the module docstring)."""
    current = mailbox_map.get(user)
    if current == node:
        raise ValueError(f"{user} is on {node} already")
    report = MoveReport()
    done: dict[str, set[int]] = {}
    mailbox_map.set_held(user, True)
    say(f"holding new mail for {user} on the gateways")
    try:
        sleep(settle)
        _copy_pass(source, target, user, done, report)
        mailbox_map.set_node(user, node)
    except BaseException:
        mailbox_map.set_held(user, False)
        raise
    say(f"{user} is on {node} now ({report.total} message(s) copied)")
    try:
        sleep(settle)
        _copy_pass(source, target, user, done, report)
    finally:
        mailbox_map.set_held(user, False)
    say(f"released held mail for {user}")
    if not keep_source:
        for folder, uids in done.items():
            box = source.open_mailbox(user, folder)
            report.expunged += len(box.expunge(sorted(uids)))
    return report
