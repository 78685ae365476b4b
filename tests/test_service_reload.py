"""Node.reload (in process, no sockets): what each part takes from a reloaded config (limits,
directory, auth penalty, SMTP/POP3/IMAP factories, relay, delivery, TLS renewed in place), a
refused file changing nothing, the reload outcome file, the pid file and SIGHUP."""

from __future__ import annotations

import json
import os
import shutil
import signal
from pathlib import Path
from typing import Any

from twisted.internet.task import Clock

from mailgw.config import load
from mailgw.roles import Endpoint
from mailgw.service import Node
from mailgw.testing.server import render_config


def config_text(tmp_path: Path, extra: str = "", **sections: dict[str, str]) -> str:
    """A node's config: MX, POP3, IMAP (in process), submission and relay on; ``sections``
    merged in (a key each), ``extra`` appended (other sections)."""
    listen = "tcp:0:interface=127.0.0.1"
    base: dict[str, dict[str, str]] = {
        "server": {"data_dir": f"{tmp_path}/data", "hostname": "mx.example.test"},
        "mx": {"listen": listen},
        "pop3": {"listen": listen, "listen_tls": listen},
        "imap": {"workers": "0", "listen": listen, "listen_tls": listen},
        "submission": {"enabled": "yes", "listen": listen, "listen_tls": listen},
        "relay": {"enabled": "yes", "resolvers": "127.0.0.1:53"},
    }
    for name, keys in sections.items():
        base.setdefault(name, {}).update(keys)
    return render_config(base) + extra


def factories(node: Node, role: str) -> list[Any]:
    part = node.parts[role]
    return [e.factory for e in part if isinstance(e, Endpoint)]


def status(node: Node) -> dict[str, Any]:
    path = os.path.join(node.config.server.data_dir, "reload.json")
    with open(path, encoding="utf-8") as f:
        value: dict[str, Any] = json.load(f)
    return value


def test_reload_reaches_every_part(tmp_path: Path) -> None:
    path = tmp_path / "mailgw.ini"
    path.write_text(config_text(tmp_path, "[channel:a]\n[channel:b]\n"))
    node = Node(load(str(path)), Clock())
    mx = factories(node, "mx")[0]
    pop3 = factories(node, "pop3")[0]
    imap = factories(node, "imap")[0]
    submission = factories(node, "submission")[0]
    relay = node.relay
    assert node.counters["mx"].max_per_ip == 50

    path.write_text(
        config_text(
            tmp_path,
            "[channel:a]\n[channel:b]\nweight = 4\n[channel:c]\n",
            directory={"auth_failure_delay": "7s", "recipient_delimiter": "-"},
            store={"default_quota": "5M"},
            delivery={"retry_interval": "42s"},
            pop3={"idle_timeout": "1m", "max_connections_per_ip": "4"},
            imap={"max_connections_per_user": "3", "idle_timeout": "31m"},
            submission={"max_recipients": "9"},
            relay={
                "default_route": "b",
                "retry_schedule": "1m",
                "window": "7",
                "resolvers": "127.0.0.1:5353",
                "dns_timeout": "3s",
                "connection_reuse": "5",
            },
            server={"max_connections": "100"},
            mx={"max_connections_per_ip": "2", "max_message_size": "1M"},
        )
    )
    result = node.reload()
    assert result.ok, result.error
    assert result.restart == []
    assert node.config is node.settings.current
    # Connection limits: per address, and the total fitted to the descriptors as at start.
    assert node.counters["mx"].max_per_ip == 2 and node.counters["pop3"].max_per_ip == 4
    assert node.connections.limit is not None and node.connections.limit <= 100
    # Directory, auth penalty, delivery.
    assert node.directory.default_quota == 5 * 1024 * 1024
    assert node.directory.recipient_delimiter == "-"
    assert node.auth_penalty.policy.base_delay == 7.0
    assert node.delivery.retry_interval == 42.0
    # Factories of new sessions.
    assert mx.limits.max_message_size == 1024 * 1024 and mx.config.max_connections_per_ip == 2
    assert pop3.config.idle_timeout == 60.0 and pop3.auth_failure_delay == 7.0
    assert imap.config.idle_timeout == 31 * 60.0
    assert imap.admission.limits.max_per_user == 3
    assert submission.policy.max_recipients == 9
    assert submission.submission_role.auth_failure_delay == 7.0
    # Relay: channels and routes, schedule, settings.
    assert set(relay.selector.channels) == {"a", "b", "c"}
    assert relay.selector.channels["b"].weight == 4
    assert relay.selector.router.default == (("b",),)
    assert relay.settings.window == 7 and relay.schedule.delays[0] == 60.0
    assert relay.pool.max_reuse == 5 and relay.resolver.timeout == 3.0
    assert [ns.port for ns in relay.resolver.resolver.nameservers] == [5353]
    assert status(node)["ok"] is True
    assert "[mx] max_connections_per_ip: 50 -> 2" in status(node)["applied"]


def test_refused_file_changes_nothing(tmp_path: Path) -> None:
    path = tmp_path / "mailgw.ini"
    path.write_text(config_text(tmp_path))
    node = Node(load(str(path)), Clock())
    before = node.config
    path.write_text(config_text(tmp_path, mx={"max_connections_per_ip": "many"}))
    result = node.reload()
    assert not result.ok and node.config is before
    assert node.counters["mx"].max_per_ip == 50
    assert status(node)["ok"] is False and "max_connections_per_ip" in status(node)["error"]


def test_restart_keys_are_reported_and_kept(tmp_path: Path) -> None:
    path = tmp_path / "mailgw.ini"
    path.write_text(config_text(tmp_path))
    node = Node(load(str(path)), Clock())
    path.write_text(config_text(tmp_path, imap={"workers": "2"}))
    result = node.reload()
    assert [c.where for c in result.restart] == ["[imap] workers"]
    assert node.config.imap.workers == 0
    assert status(node)["restart_needed"] == ["[imap] workers"]


def test_relay_check_refuses_an_unreadable_password_file(tmp_path: Path) -> None:
    path = tmp_path / "mailgw.ini"
    path.write_text(config_text(tmp_path))
    node = Node(load(str(path)), Clock())
    channels = set(node.relay.selector.channels)
    path.write_text(
        config_text(
            tmp_path,
            "[channel:smart]\nkind = smarthost\nhosts = 127.0.0.1\nauth_user = u\n"
            "auth_password_file = missing.txt\n",
        )
    )
    result = node.reload()
    assert not result.ok and "auth_password_file: cannot read" in result.error
    assert set(node.relay.selector.channels) == channels


def test_tls_is_renewed_in_place(tmp_path: Path, selfsigned: tuple[Path, Path]) -> None:
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    shutil.copy(selfsigned[0], cert)
    shutil.copy(selfsigned[1], key)
    tls = f"[tls]\ncertificate = {cert}\nprivate_key = {key}\n"
    path = tmp_path / "mailgw.ini"
    path.write_text(config_text(tmp_path, tls))
    node = Node(load(str(path)), Clock())
    smtp, pop3, imap = node.tls.get("smtp"), node.tls.get("pop3"), node.tls.get("imap")
    assert smtp is node.tls_options and smtp is not None and pop3 is not None and imap is not None
    contexts = [smtp.context, pop3.context, imap.context]
    assert factories(node, "pop3")[0].tls_options is pop3
    assert node.reload().ok
    renewed = [smtp.context, pop3.context, imap.context]
    assert all(a is not b for a, b in zip(contexts, renewed, strict=True))  # new contexts ...
    assert node.tls.get("pop3") is pop3  # ... in the same objects the listeners hold
    # A key that does not belong to the certificate: refused, the contexts stay.
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    other = ec.generate_private_key(ec.SECP256R1()).private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    key.write_bytes(other)
    kept = [smtp.context, pop3.context, imap.context]
    result = node.reload()
    assert not result.ok and "does not match" in result.error
    assert [smtp.context, pop3.context, imap.context] == kept


def test_pid_file_and_sighup(tmp_path: Path) -> None:
    path = tmp_path / "mailgw.ini"
    path.write_text(config_text(tmp_path))

    class Reactor(Clock):
        def callFromThread(self, f: Any, *args: Any) -> None:  # noqa: N802 (Twisted)
            self.callLater(0, f, *args)

    reactor = Reactor()
    node = Node(load(str(path)), reactor)
    node._write_pid_file()
    pid_file = Path(node.pid_file)
    assert pid_file.read_text() == f"{os.getpid()}\n"
    node._sighup(signal.SIGHUP, None)
    assert node.settings.reloads == 0  # not inside the signal handler ...
    reactor.advance(0)
    assert node.settings.reloads == 1  # ... but from the reactor's loop
    node._remove_pid_file()
    assert not pid_file.exists()
    pid_file.write_text("1\n")  # another process's file is left alone
    node._remove_pid_file()
    assert pid_file.exists()
