"""The role registry's contract: every config section with a role is registered, a role the
config disables builds nothing, and the node's services are exactly those of its enabled
roles, in registry order."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import pytest
from twisted.application.service import Service
from twisted.internet.task import Clock

from mailgw.config import Config, ConfigError, load
from mailgw.config.schema import _SECTIONS
from mailgw.roles import ROLES, RoleRegistry, RoleSpec
from mailgw.service import Node, build_service

ALL_ON = (
    "[mx]\nlisten = tcp:0:interface=127.0.0.1\n"
    "[submission]\nenabled = yes\nlisten = tcp:0:interface=127.0.0.1\n"
    "listen_tls = tcp:0:interface=127.0.0.1\n"
    "[pop3]\nlisten = tcp:0:interface=127.0.0.1\nlisten_tls = tcp:0:interface=127.0.0.1\n"
    "[imap]\nworkers = 0\nlisten = tcp:0:interface=127.0.0.1\n"
    "listen_tls = tcp:0:interface=127.0.0.1\n"
    "[relay]\nenabled = yes\n"
    "[store]\ntier2_dir = tier2\n"
    "[http]\nenabled = yes\nlisten = tcp:0:interface=127.0.0.1\n"
    "listen_tls = tcp:0:interface=127.0.0.1\n"
    "[lmtp]\nenabled = yes\nlisten = tcp:0:interface=127.0.0.1\n"
    "[dns]\nenabled = yes\nlisten = udp:0:interface=127.0.0.1 tcp:0:interface=127.0.0.1\n"
    "zones = example.test\nnameservers = ns1.example.test=127.0.0.1\nregions = all\n"
    "[dns_region:all]\nmx = mx.example.test=192.0.2.1\n"
    "[replication]\nenabled = yes\nsecret_file = replication.secret\n"
)


def write_config(tmp_path: Path, text: str, tls: tuple[Path, Path] | None = None) -> Config:
    path = tmp_path / "mailgw.ini"
    head = f"[server]\ndata_dir = {tmp_path}/data\n"
    if tls is not None:
        head += f"[tls]\ncertificate = {tls[0]}\nprivate_key = {tls[1]}\n"
    path.write_text(head + text)
    (tmp_path / "replication.secret").write_text("a secret of sixteen bytes or more\n")
    return load(str(path))


def switch_off(text: str, section: str) -> str:
    """``text`` with ``[section] enabled = no`` (tier 2 off for the store)."""
    if section == "store":
        return text.replace("[store]\ntier2_dir = tier2\n", "")
    text = text.replace(f"[{section}]\nenabled = yes\n", f"[{section}]\n")
    if f"[{section}]\n" in text:
        return text.replace(f"[{section}]\n", f"[{section}]\nenabled = no\n")
    return text + f"[{section}]\nenabled = no\n"


def test_every_config_section_with_a_role_is_registered() -> None:
    """A section that can switch something on (``enabled``) has a registered role."""
    switchable = {
        name
        for name, cls in _SECTIONS.items()
        if "enabled" in {f.name for f in dataclasses.fields(cls)}
    }
    checks = {"antivirus", "inbound_auth", "reputation"}  # checks in roles' pipelines
    checks |= {"webmail"}  # mounted on the http role's site, not a role
    checks |= {"api"}  # the admin API, part of the http role
    roles = {
        "delivery",
        "mx",
        "pop3",
        "imap",
        "relay",
        "submission",
        "http",
        "replication",
        "dns",
        "lmtp",
    }
    assert switchable - checks == roles
    assert switchable - checks <= {role.section for role in ROLES}
    for role in ROLES:
        assert role.section in _SECTIONS, role.name  # a role's keys are in its section
        if role.listens:
            keys = {f.name for f in dataclasses.fields(_SECTIONS[role.section])}
            assert {"listen", "max_connections", "max_connections_per_ip"} <= keys


def test_the_registry_is_consistent() -> None:
    ROLES.check()
    assert [role.name for role in ROLES] == [
        "migration",
        "delivery",
        "relay",
        "mx",
        "submission",
        "lmtp",
        "pop3",
        "imap",
        "imap-workers",
        "dns",
        "replication",
        "http",
    ]


def test_the_node_runs_the_services_of_its_enabled_roles_in_registry_order(
    tmp_path: Path, selfsigned: tuple[Path, Path]
) -> None:
    node = Node(write_config(tmp_path, ALL_ON, selfsigned), Clock())
    enabled = [r.name for r in ROLES if r.name != "imap-workers"]
    assert list(node.role_services) == enabled
    assert set(node.parts) == set(enabled)
    roles = [s for services in node.role_services.values() for s in services]
    assert list(node) == [node.journal_tail, *roles]  # the journal's tail, then the roles
    counts = {name: len(services) for name, services in node.role_services.items()}
    assert counts == {
        "migration": 1,
        "delivery": 1,
        "relay": 1,
        "mx": 1,
        "submission": 2,  # STARTTLS and implicit TLS
        "pop3": 2,
        "imap": 2,
        "lmtp": 1,
        "replication": 1,
        "dns": 2,  # UDP and TCP
        "http": 3,  # the metrics collector's service, HTTP and HTTPS
    }
    assert node.delivery is node.parts["delivery"] and node.relay is node.parts["relay"]
    assert node.delivery.relay is node.relay  # delivery uses the relay: built after it
    assert node.submission_policy.can_send_outside
    assert set(node.counters) == {"mx", "submission", "pop3", "imap", "http", "dns", "lmtp"}
    assert node.parts["http"].collector.workers is None  # IMAP in this process


@pytest.mark.parametrize(
    "section, gone",
    [
        ("mx", {"mx"}),
        ("submission", {"submission"}),
        ("pop3", {"pop3"}),
        ("imap", {"imap"}),
        ("relay", {"relay"}),
        ("store", {"migration"}),
        ("http", {"http"}),
        ("dns", {"dns"}),
    ],
)
def test_a_role_disabled_in_the_config_builds_nothing(
    tmp_path: Path, section: str, gone: set[str]
) -> None:
    config = write_config(tmp_path, switch_off(ALL_ON, section))
    node = Node(config, Clock())
    everything = {r.name for r in ROLES} - {"imap-workers"}
    assert set(node.role_services) == set(node.parts) == everything - gone
    roles = [s for services in node.role_services.values() for s in services]
    assert list(node) == [node.journal_tail, *roles]
    wheres = {getattr(s, "where", "").split(":")[-2] for s in node if hasattr(s, "where")}
    if section != "store" and section != "relay":
        assert section not in wheres  # no listener of the role
        assert section not in node.counters  # nor a share of the connection total
    if section == "relay":
        assert node.relay is None and node.delivery.relay is None
        assert not node.submission_policy.can_send_outside


def test_imap_workers_replace_the_in_process_imap_role(tmp_path: Path) -> None:
    node = Node(write_config(tmp_path, "[imap]\nworkers = 2\n"), Clock())
    assert "imap" not in node.parts and "imap-workers" in node.parts
    assert node.role_services["imap-workers"] == [node.imap_workers]
    assert node.counters["imap"] is node.imap_workers.limits._ips
    assert "http" not in node.parts  # off by default


def test_a_required_role_must_be_enabled(tmp_path: Path) -> None:
    config = write_config(tmp_path, "[relay]\nenabled = yes\n[delivery]\nenabled = no\n")
    with pytest.raises(ConfigError, match=r"mailgw.ini:relay:enabled: needs \[delivery\] enabled"):
        ROLES.enabled(config)
    with pytest.raises(SystemExit, match=r"relay:enabled: needs \[delivery\] enabled"):
        build_service(config, Clock())


class Recorder(Service):
    def __init__(self, name: str) -> None:
        self.setName(name)


def fake_role(name: str, built: list[str], **kwargs: Any) -> RoleSpec:
    def build(node: Node) -> Recorder:
        built.append(name)
        for used in kwargs.get("uses", ()):
            assert used not in node.parts or node.parts[used].name == used
        return Recorder(name)

    return RoleSpec(name, "server", build, lambda node, part: [part], **kwargs)


def test_a_registered_role_plugs_into_the_node(tmp_path: Path) -> None:
    """A new role (the HTTP one) needs a RoleSpec only: the node builds it when its
    ``enabled`` says so, after the roles it uses, and starts it in registry order."""
    built: list[str] = []
    registry = RoleRegistry(
        [
            fake_role("first", built, uses=("second",), enabled=lambda c: True),
            fake_role("second", built, enabled=lambda c: True),
            fake_role("off", built, enabled=lambda c: False),
        ]
    )
    registry.check()
    node = Node(write_config(tmp_path, ""), Clock(), roles=registry)
    assert built == ["second", "first"]
    assert [s.name for s in node][1:] == ["first", "second"]  # after the journal's tail
    assert node.counters == {} and node.delivery is None and node.relay is None


def test_the_registry_refuses_what_it_cannot_build() -> None:
    built: list[str] = []
    registry = RoleRegistry([fake_role("a", built)])
    with pytest.raises(ValueError, match="registered already"):
        registry.register(fake_role("a", built))
    registry.register(fake_role("b", built, uses=("nowhere",)))
    with pytest.raises(ValueError, match="unknown role 'nowhere'"):
        registry.check()
    loop = RoleRegistry([fake_role("x", built, uses=("y",)), fake_role("y", built, uses=("x",))])
    with pytest.raises(ValueError, match="roles use each other: x -> y -> x"):
        loop.check()
