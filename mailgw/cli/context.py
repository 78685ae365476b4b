"""What every ``mailgw`` command shares: where the config is, the lazily loaded config and
directory (``Context``), and the error a command raises when it cannot be done (``Failure``).

``mailgw.cli.main`` (the parser and the commands) and the command groups it registers
(``mailgw.cli.queue``) import this module; it imports neither of them.
"""

from __future__ import annotations

import os
from typing import Any

SYSTEM_CONFIG = "/etc/mailgw/mailgw.ini"
LOCAL_CONFIG = os.path.join("etc", "mailgw.ini")
OWN_CONFIG = os.path.join("etc", "local.ini")
"""A checkout's own config (git ignores it): ``make run``, twistd and this command prefer it."""


class Failure(Exception):
    """The command could not be done (exit code 1)."""


def default_config_path() -> str:
    """``$MAILGW_CONFIG``, else ``./etc/local.ini`` or ``./etc/mailgw.ini`` (the first that
    exists), else the system file. Also twistd's default (``mailgw.tap``)."""
    env = os.environ.get("MAILGW_CONFIG")
    if env:
        return env
    for path in (OWN_CONFIG, LOCAL_CONFIG):
        if os.path.isfile(path):
            return path
    return SYSTEM_CONFIG


class Context:
    """What a command needs, loaded on first use: the config and the directory."""

    def __init__(self, config_path: str | None) -> None:
        self.config_path = config_path or default_config_path()
        self._config: Any = None
        self._directory: Any = None

    @property
    def config(self) -> Any:
        if self._config is None:
            from mailgw.config import load

            self._config = load(self.config_path)
        return self._config

    @property
    def directory(self) -> Any:
        if self._directory is None:
            from mailgw.runtime.process import build_directory

            # The same directory as the server's (no reactor: the command blocks).
            self._directory = build_directory(self.config, None)
        return self._directory

    def close(self) -> None:
        if self._directory is not None:
            self._directory.close()
            self._directory = None
