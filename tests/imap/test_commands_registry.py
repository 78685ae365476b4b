"""The command table (issue 11): the session core dispatches every command through
``mailgw.imap.commands.COMMANDS``; each family module declares its commands there."""

from __future__ import annotations

import importlib
from collections.abc import Generator
from dataclasses import replace

import pytest

from mailgw.imap import parser as p
from mailgw.imap import wire
from mailgw.imap.commands import COMMANDS, NO_EXPUNGE
from mailgw.imap.commands.registry import Command, table
from mailgw.imap.session import IMAPServer
from mailgw.imap.states import ANY, AUTH, NOT_AUTH, SELECTED_ONLY
from tests.imap.imap_env import Env

FAMILIES = ("auth", "mailbox", "select", "fetch", "store", "search", "append", "quota")


def test_the_table_holds_every_command_the_parser_knows() -> None:
    assert set(COMMANDS) == set(p.COMMAND_NAMES)
    for name, command in COMMANDS.items():
        assert command.name == name
        module = command.handler.__module__
        assert module.startswith("mailgw.imap.commands."), (name, module)


def test_each_family_module_declares_its_own_commands() -> None:
    seen: set[str] = set()
    for family in FAMILIES:
        module = importlib.import_module(f"mailgw.imap.commands.{family}")
        names = {c.name for c in module.COMMANDS}
        assert names and not names & seen, family
        assert all(c.handler.__module__ == module.__name__ for c in module.COMMANDS), family
        seen |= names
    assert seen == set(COMMANDS)


def test_states_and_expunge_rules_as_rfc_3501() -> None:
    assert {"FETCH", "STORE", "SEARCH", "SORT", "THREAD"} == NO_EXPUNGE
    by_states: dict[frozenset[str], set[str]] = {}
    for name, command in COMMANDS.items():
        by_states.setdefault(command.states, set()).add(name)
    assert by_states[ANY] == {"CAPABILITY", "NOOP", "LOGOUT", "ID"}
    assert by_states[NOT_AUTH] == {"STARTTLS", "LOGIN", "AUTHENTICATE"}
    assert "SELECT" in by_states[AUTH] and "APPEND" in by_states[AUTH]
    assert "FETCH" in by_states[SELECTED_ONLY] and "CLOSE" in by_states[SELECTED_ONLY]
    assert set(by_states) == {ANY, NOT_AUTH, AUTH, SELECTED_ONLY}


def test_a_name_declared_twice_is_refused() -> None:
    def handler(session: IMAPServer, tag: str, command: object) -> None:
        return None

    with pytest.raises(ValueError, match="NOOP"):
        table([(Command("NOOP", handler, ANY),), (Command("NOOP", handler, AUTH),)])


def test_the_core_dispatches_through_the_table(env: Env, monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[tuple[str, object]] = []

    def handler(session: IMAPServer, tag: str, command: object) -> None:
        calls.append((tag, command))
        session.write(wire.untagged(b"HELLO"))
        session.ok(tag, "replaced")

    monkeypatch.setitem(COMMANDS, "NAMESPACE", replace(COMMANDS["NAMESPACE"], handler=handler))
    c = env.connect(login="alice@example.test")
    out = c.cmd("NAMESPACE")
    assert out.startswith(b"* HELLO\r\n") and out.endswith(b"OK replaced\r\n")
    assert len(calls) == 1 and isinstance(calls[0][1], p.Simple)


def test_the_state_check_reads_the_table(env: Env, monkeypatch: pytest.MonkeyPatch) -> None:
    c = env.connect(login="alice@example.test")
    assert c.cmd("NAMESPACE").endswith(b"OK NAMESPACE completed\r\n")
    monkeypatch.setitem(COMMANDS, "NAMESPACE", replace(COMMANDS["NAMESPACE"], states=NOT_AUTH))
    out = c.cmd("NAMESPACE")
    assert b"BAD NAMESPACE is not allowed in the authenticated state" in out


def test_a_generator_handler_runs_in_slices(env: Env, monkeypatch: pytest.MonkeyPatch) -> None:
    def handler(session: IMAPServer, tag: str, command: object) -> Generator[None, None, None]:
        for n in range(3):
            session.write(wire.untagged(b"STEP %d" % n))
            yield
        session.ok(tag, "sliced")

    monkeypatch.setattr("mailgw.imap.session.SLICE_STEPS", 1)
    monkeypatch.setitem(COMMANDS, "NOOP", replace(COMMANDS["NOOP"], handler=handler))
    c = env.connect(login="alice@example.test")
    out = c.send(b"t1 NOOP\r\nt2 CAPABILITY\r\n")
    assert out == b"* STEP 0\r\n"  # one step, then back to the reactor; t2 waits
    for _ in range(10):
        env.clock.advance(0)
        out += c.take()
    assert out.startswith(b"* STEP 0\r\n* STEP 1\r\n* STEP 2\r\nt1 OK sliced\r\n")
    assert out.endswith(b"t2 OK CAPABILITY completed\r\n")


def test_rejected_hook_runs_before_the_answer(env: Env, monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list[tuple[str, str]] = []

    def rejected(session: IMAPServer, raw: p.Command, error: p.CommandError) -> None:
        seen.append((raw.name, error.status))
        session.write(wire.untagged(b"REJECTED"))

    monkeypatch.setitem(COMMANDS, "STATUS", replace(COMMANDS["STATUS"], rejected=rejected))
    c = env.connect(login="alice@example.test")
    out = c.cmd("STATUS INBOX (NOSUCHITEM)")
    assert seen == [("STATUS", "BAD")]
    assert out.startswith(b"* REJECTED\r\n") and b" BAD " in out
