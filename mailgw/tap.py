"""twistd Options and makeService for `twistd mailgw`, delegating to mailgw.service."""

from __future__ import annotations

from twisted.application.service import IService
from twisted.python import usage


def default_config_path() -> str:
    """``$MAILGW_CONFIG``, else ``./etc/local.ini`` or ``./etc/mailgw.ini`` (the first that
    exists), else ``/etc/mailgw/mailgw.ini``: as the ``mailgw`` command."""
    from mailgw.cli.main import default_config_path as same_as_the_admin_command

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
    node = build_service(config, reactor)
    # twistd's own options (the parent of ours): the mail log filters Twisted's noise.
    setattr(node, "twistd_options", getattr(options, "parent", None))  # noqa: B010
    return node
