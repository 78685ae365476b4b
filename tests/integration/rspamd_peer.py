"""A real rspamd (Debian's package) on a free loopback port, offline: network modules off,
GTUBE test patterns on, a shared ``hs_cache_dir`` (the first start compiles, later ones are
fast). Started once per test session and stopped by PID."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import time
import urllib.request
from pathlib import Path

from mailgw.testing.server import free_port

RSPAMD = shutil.which("rspamd")
OFF = [
    "rbl",
    "surbl",
    "emails",
    "asn",
    "spf",
    "dkim",
    "dmarc",
    "arc",
    "hfilter",
    "fuzzy_check",
    "phishing",
    "multimap",
    "whitelist",
    "mid",
    "neural",
    "reputation",
    "ratelimit",
    "greylist",
    "history_redis",
    "replies",
    "url_redirector",
    "dkim_signing",
    "mx_check",
    "rspamd_update",
]
CACHE = Path("/tmp/mailgw-test-rspamd-hs-cache")


class Rspamd:
    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.port = free_port()
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def write_config(self) -> Path:
        f = self.folder
        for d in ("etc/local.d", "db", "run", "log"):
            (f / d).mkdir(parents=True, exist_ok=True)
        CACHE.mkdir(exist_ok=True)
        for module in OFF:
            (f / "etc/local.d" / f"{module}.conf").write_text("enabled = false;\n")
        (f / "etc/local.d/options.inc").write_text(
            f'enable_test_patterns = true;\nhs_cache_dir = "{CACHE}";\ndns {{ timeout = 1s; }}\n'
        )
        conf = f / "rspamd.conf"
        conf.write_text(
            '.include "/etc/rspamd/common.conf"\n'
            "options {\n"
            '    pidfile = "$RUNDIR/rspamd.pid";\n'
            '    .include "/etc/rspamd/options.inc"\n'
            '    .include(try=true; priority=1,duplicate=merge) "$LOCAL_CONFDIR/local.d/options.inc"\n'
            "}\n"
            'logging { type = "file"; filename = "$LOGDIR/rspamd.log"; level = "warning"; }\n'
            'worker "normal" {\n'
            f'    bind_socket = "127.0.0.1:{self.port}";\n'
            "    mime = true;\n    count = 1;\n"
            '    .include "/etc/rspamd/worker-normal.inc"\n'
            "}\n"
        )
        return conf

    def start(self, timeout: float = 60.0) -> None:
        assert RSPAMD is not None
        conf = self.write_config()
        f = self.folder
        self.proc = subprocess.Popen(
            [
                RSPAMD,
                "-f",
                "-i",
                "-c",
                str(conf),
                f"--var=LOCAL_CONFDIR={f / 'etc'}",
                f"--var=DBDIR={f / 'db'}",
                f"--var=RUNDIR={f / 'run'}",
                f"--var=LOGDIR={f / 'log'}",
            ],
            stdout=subprocess.DEVNULL,
            stderr=open(f / "stderr.log", "wb"),  # noqa: SIM115
            start_new_session=True,
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"rspamd exited: {(f / 'stderr.log').read_text()[-2000:]}")
            try:
                with urllib.request.urlopen(f"http://{self.address}/ping", timeout=1) as r:
                    if b"pong" in r.read():
                        return
            except OSError:
                time.sleep(0.2)
        self.stop()
        raise RuntimeError("rspamd did not answer /ping")

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        os.killpg(self.proc.pid, signal.SIGTERM)
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
