"""twistd Options and makeService for `twistd mailgw`, delegating to mailgw.service."""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

from twisted.application.service import IService
from twisted.python import usage

Builder = Callable[[Any, Any], IService]


def default_config_path() -> str:
    """``$MAILGW_CONFIG``, else ``./etc/local.ini`` or ``./etc/mailgw.ini`` (the first that
    exists), else ``/etc/mailgw/mailgw.ini``: as the ``mailgw`` command."""
    from mailgw.cli.context import default_config_path as same_as_the_admin_command

    return same_as_the_admin_command()


class Options(usage.Options):
    synopsis = "[--config PATH]"
    longdesc = "Run mailgw: the roles switched on in the config file (MX, POP3, ...)."
    optParameters = [
        [
            "config",
            "c",
            None,
            "Config file (default: $MAILGW_CONFIG, ./etc/local.ini, ./etc/mailgw.ini,"
            " /etc/mailgw/mailgw.ini).",
        ],
    ]

    def postOptions(self) -> None:
        if not self["config"]:
            self["config"] = default_config_path()


def makeService(options: Options) -> IService:
    from twisted.internet import reactor

    from mailgw.config import ConfigError, load
    from mailgw.service import build_service

    try:
        config = load(options["config"])
    except ConfigError as e:
        raise SystemExit(f"mailgw: {e}") from None
    parent = getattr(options, "parent", None)  # twistd's own options: --uid, --gid
    uid = parent.get("uid") if parent is not None else None
    gid = parent.get("gid") if parent is not None else None
    node = build_as(config, reactor, uid, gid, build_service)
    # twistd's own options (the parent of ours): the mail log filters Twisted's noise.
    setattr(node, "twistd_options", parent)  # noqa: B010
    return node


def build_as(
    config: Any, reactor: Any, uid: int | None, gid: int | None, build: Builder
) -> IService:
    """``build(config, reactor)`` as the user the process runs as once twistd has switched
    (``--uid``/``--gid`` as root), so that the files it creates belong to that user; one-line
    SystemExit when the data directory cannot be used by it (see mailgw.privileges)."""
    from mailgw import privileges

    data_dir = config.server.data_dir
    extra = [os.path.join(data_dir, config.store.tier2_dir)] if config.store.tier2_dir else []
    where = f"mailgw: {config.path}:server:data_dir:"
    try:
        who = privileges.switch_target(uid, gid)
        if who is None:
            if os.geteuid() != 0:  # run directly as the unprivileged user (systemd User=)
                privileges.check_usable(data_dir, privileges.current_identity(), extra)
            return build(config, reactor)
        privileges.prepare_data_dir(data_dir, who, extra)
        with privileges.acting_as(who):
            privileges.check_usable(data_dir, who, extra)
            try:
                with open(config.path, "rb"):
                    pass  # the IMAP workers read it again once running as the user
            except OSError as e:
                raise SystemExit(f"mailgw: {config.path}: {e.strerror} for {who}") from None
            return build(config, reactor)
    except privileges.OwnershipError as e:
        raise SystemExit(f"{where} {e}") from None
