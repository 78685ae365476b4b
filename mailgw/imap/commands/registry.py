"""The command table: what the session core knows about a command family's commands.

Each module of :mod:`mailgw.imap.commands` declares its commands as a tuple of
:class:`Command` (``COMMANDS``); :mod:`mailgw.imap.commands` joins them into one table by
name, which the session core dispatches through. A handler is a plain function
``handler(session, tag, parsed_command)``: it answers through the session's response
methods, or returns a generator, which the core runs in slices (long SEARCH / SORT /
THREAD), or calls ``session.suspend()`` and answers later (then ``session.done()``).
"""

from __future__ import annotations

from collections.abc import Callable, Generator, Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from mailgw.imap import parser as p
    from mailgw.imap.session import IMAPServer

# The parsed command's type depends on the command (``parser.Select``, ``parser.Fetch``,
# ...): a handler declares its own, so the table holds them as ``Any``.
Handler = Callable[["IMAPServer", str, Any], "Generator[None, None, None] | None"]
# Called when a command's arguments do not parse, before the BAD / NO answer.
Rejected = Callable[["IMAPServer", "p.Command", "p.CommandError"], None]


@dataclass(frozen=True, slots=True)
class Command:
    """One IMAP command: its name, handler and the session states it is allowed in."""

    name: str
    handler: Handler
    states: frozenset[str]
    # False for the commands during which EXPUNGE responses must not be sent unless it is
    # the UID form (RFC 3501 7.4.1): FETCH, STORE, SEARCH, SORT, THREAD.
    expunge_ok: bool = True
    rejected: Rejected | None = None


def table(families: Iterable[Iterable[Command]]) -> dict[str, Command]:
    """The commands of every family by name; a name declared twice is a programming error."""
    out: dict[str, Command] = {}
    for family in families:
        for command in family:
            if command.name in out:
                raise ValueError(f"IMAP command {command.name} declared twice")
            out[command.name] = command
    return out
