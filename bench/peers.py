"""Private instances of real peer servers (Postfix) for side-by-side benchmarks, on loopback."""

from __future__ import annotations

import os
import pwd
import shutil
import subprocess
import time
from pathlib import Path

POSTFIX = "/usr/sbin/postfix"
POSTCONF = "/usr/sbin/postconf"

# master.cf of a private instance: no chroot (the chroot jail would need copies of /etc files),
# only the services an inbound-to-virtual-Maildir path uses. {listen} is replaced by 127.0.0.1:PORT.
MASTER_CF = """\
{listen}  inet  n       -       n       -       -       smtpd
pickup    unix  n       -       n       60      1       pickup
cleanup   unix  n       -       n       -       0       cleanup
qmgr      unix  n       -       n       300     1       qmgr
rewrite   unix  -       -       n       -       -       trivial-rewrite
bounce    unix  -       -       n       -       0       bounce
defer     unix  -       -       n       -       0       bounce
trace     unix  -       -       n       -       0       bounce
verify    unix  -       -       n       -       1       verify
flush     unix  n       -       n       1000?   0       flush
proxymap  unix  -       -       n       -       -       proxymap
proxywrite unix -       -       n       -       1       proxymap
showq     unix  n       -       n       -       -       showq
error     unix  -       -       n       -       -       error
retry     unix  -       -       n       -       -       error
discard   unix  -       -       n       -       -       discard
local     unix  -       n       n       -       -       local
virtual   unix  -       n       n       -       -       virtual
anvil     unix  -       -       n       -       1       anvil
scache    unix  -       -       n       -       1       scache
postlog   unix-dgram n  -       n       -       1       postlogd
"""


def postfix_version() -> str:
    """The installed Postfix version, e.g. ``3.7.11``."""
    out = subprocess.run(
        [POSTCONF, "-d", "-h", "mail_version"], capture_output=True, text=True, check=True
    )
    return out.stdout.strip()


class PostfixPeer:
    """A private Postfix in ``workdir`` that accepts SMTP on 127.0.0.1:``port`` and delivers the
    virtual ``domain`` into Maildir under ``workdir/mail`` (as the unprivileged ``user``)."""

    def __init__(
        self,
        workdir: Path,
        port: int,
        domain: str,
        locals_: list[str],
        user: str = "nobody",
        main_cf_extra: dict[str, str] | None = None,
    ) -> None:
        self.workdir = Path(workdir)
        self.port = port
        self.domain = domain
        self.locals = list(locals_)
        pw = pwd.getpwnam(user)
        self.uid, self.gid = pw.pw_uid, pw.pw_gid
        self.config_dir = self.workdir / "etc"
        self.queue_dir = self.workdir / "queue"
        self.data_dir = self.workdir / "data"
        self.log_dir = self.workdir / "log"
        self.mail_base = self.workdir / "mail"
        self.main_cf_extra = dict(main_cf_extra or {})
        self.started = False

    @property
    def log_path(self) -> Path:
        return self.log_dir / "postfix.log"

    def maildir(self, local: str) -> Path:
        """The Maildir of ``local@domain`` (holds new/, cur/, tmp/ once mail arrived)."""
        return self.mail_base / self.domain / local

    def main_cf(self) -> dict[str, str]:
        keys = {
            "compatibility_level": "3.6",
            "config_directory": str(self.config_dir),
            "queue_directory": str(self.queue_dir),
            "data_directory": str(self.data_dir),
            "command_directory": "/usr/sbin",
            "daemon_directory": "/usr/lib/postfix/sbin",
            "shlib_directory": "/usr/lib/postfix",
            "meta_directory": "/etc/postfix",
            "mail_owner": "postfix",
            "setgid_group": "postdrop",
            "maillog_file": str(self.log_path),
            "maillog_file_prefixes": str(self.log_dir),
            "syslog_name": "postfix-bench",
            "myhostname": "mx.postfix.test",
            "mydomain": "postfix.test",
            "myorigin": "$myhostname",
            "mydestination": "",
            "inet_interfaces": "127.0.0.1",
            "inet_protocols": "ipv4",
            "mynetworks": "127.0.0.0/8",
            "smtpd_relay_restrictions": "permit_mynetworks, reject_unauth_destination",
            "smtpd_recipient_restrictions": "",
            "smtpd_peername_lookup": "no",
            "smtp_host_lookup": "native",
            "lmtp_host_lookup": "native",
            "smtp_dns_support_level": "disabled",
            "smtpd_forbid_bare_newline": "no",
            "alias_maps": "",
            "alias_database": "",
            "local_recipient_maps": "",
            "relayhost": "",
            "biff": "no",
            "append_dot_mydomain": "no",
            "smtputf8_enable": "no",
            "virtual_mailbox_domains": self.domain,
            "virtual_mailbox_base": str(self.mail_base),
            "virtual_mailbox_maps": f"texthash:{self.config_dir / 'vmailbox'}",
            "virtual_uid_maps": f"static:{self.uid}",
            "virtual_gid_maps": f"static:{self.gid}",
            "virtual_minimum_uid": str(min(self.uid, 100)),
        }
        keys.update(self.main_cf_extra)
        return keys

    def write_config(self) -> None:
        for d in (self.config_dir, self.log_dir, self.data_dir, self.queue_dir):
            d.mkdir(parents=True, exist_ok=True)
        # The delivery agent runs as uid/gid; it must reach and write mail_base.
        self.workdir.chmod(0o755)
        self.mail_base.mkdir(parents=True, exist_ok=True)
        os.chown(self.mail_base, self.uid, self.gid)
        main = "".join(f"{k} = {v}\n" for k, v in self.main_cf().items())
        (self.config_dir / "main.cf").write_text(main)
        (self.config_dir / "master.cf").write_text(
            MASTER_CF.format(listen=f"127.0.0.1:{self.port}")
        )
        (self.config_dir / "vmailbox").write_text(
            "".join(f"{loc}@{self.domain} {self.domain}/{loc}/\n" for loc in self.locals)
        )

    def _postfix(self, *args: str, timeout: float = 60.0) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [POSTFIX, "-c", str(self.config_dir), *args],
            capture_output=True,
            text=True,
            timeout=timeout,
        )

    def start(self, timeout: float = 20.0) -> None:
        """Write the config, create the queue, start master and wait until SMTP answers 220."""
        self.write_config()
        res = self._postfix("set-permissions", "create-missing")
        if res.returncode != 0:
            raise RuntimeError(f"postfix set-permissions failed: {res.stderr}{self.log_tail()}")
        res = self._postfix("start")
        if res.returncode != 0:
            raise RuntimeError(
                f"postfix start failed ({res.returncode}): {res.stderr}{self.log_tail()}"
            )
        self.started = True
        self._wait_banner(timeout)

    def _wait_banner(self, timeout: float) -> None:
        import socket

        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=2) as s:
                    if s.recv(512).startswith(b"220"):
                        s.sendall(b"QUIT\r\n")
                        return
            except OSError:
                pass
            time.sleep(0.05)
        raise TimeoutError(f"postfix not answering on 127.0.0.1:{self.port}{self.log_tail()}")

    def master_pid(self) -> int | None:
        try:
            return int((self.data_dir / "master.lock").read_text().split()[0])
        except (OSError, ValueError, IndexError):
            return None

    def stop(self, timeout: float = 20.0) -> None:
        """``postfix stop``; if master survives, SIGKILL it by the PID in its lock file."""
        if not self.started:
            return
        self.started = False
        pid = self.master_pid()
        self._postfix("stop")
        if pid is None:
            return
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                return
            time.sleep(0.1)
        os.kill(pid, 9)

    def log_tail(self, chars: int = 3000) -> str:
        try:
            return "\n--- postfix log ---\n" + self.log_path.read_text(errors="replace")[-chars:]
        except OSError:
            return ""

    def cleanup(self) -> None:
        shutil.rmtree(self.workdir, ignore_errors=True)


# The relay variant adds the SMTP client (smtp, relay) to the private instance's master.cf.
RELAY_MASTER_CF_EXTRA = """\
smtp      unix  -       -       n       -       -       smtp
relay     unix  -       -       n       -       -       smtp
"""


class PostfixRelayPeer(PostfixPeer):
    """A private Postfix that relays everything to ``relayhost`` (e.g. ``[127.0.0.1]:PORT``)
    without DNS or TLS. With ``hold=True`` every message accepted over SMTP is put on hold
    (``check_client_access static:HOLD``) until ``release()``: the queue fills first, then
    the relay runs. ``default_destination_concurrency_limit`` keeps Postfix's default (20)."""

    def __init__(
        self,
        workdir: Path,
        port: int,
        relayhost: str,
        hold: bool = True,
        main_cf_extra: dict[str, str] | None = None,
    ) -> None:
        extra = {
            "relayhost": relayhost,
            "smtp_tls_security_level": "none",
            "smtp_sasl_auth_enable": "no",
            "default_destination_concurrency_limit": "20",
            "smtpd_recipient_restrictions": "check_client_access static:HOLD" if hold else "",
        }
        extra.update(main_cf_extra or {})
        super().__init__(workdir, port, "local.postfix.test", [], main_cf_extra=extra)

    def write_config(self) -> None:
        super().write_config()
        with open(self.config_dir / "master.cf", "a") as f:
            f.write(RELAY_MASTER_CF_EXTRA)

    def count_queue(self, queue: str) -> int:
        """Queue files in one of the queue directories (``hold``, ``deferred``, ``active``...),
        hashed subdirectories included."""
        n = 0
        for _root, _dirs, files in os.walk(self.queue_dir / queue):
            n += len(files)
        return n

    def release(self) -> None:
        """Move every held message to the deferred queue and flush it (``postsuper -H ALL``,
        ``postqueue -f``): the queue manager then schedules them all at once."""
        for cmd in (
            ["/usr/sbin/postsuper", "-c", str(self.config_dir), "-H", "ALL"],
            ["/usr/sbin/postqueue", "-c", str(self.config_dir), "-f"],
        ):
            res = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
            if res.returncode != 0:
                raise RuntimeError(f"{cmd[0]} failed ({res.returncode}): {res.stderr}")


# -- Dovecot (IMAP) -------------------------------------------------------------------------------

DOVECOT = "/usr/sbin/dovecot"


def dovecot_version() -> str:
    """The installed Dovecot version, e.g. ``2.3.19.1``."""
    out = subprocess.run([DOVECOT, "--version"], capture_output=True, text=True, check=True)
    return out.stdout.split()[0]


class DovecotPeer:
    """A private Dovecot in ``workdir`` serving IMAP on 127.0.0.1:``port`` (no TLS, plaintext
    auth allowed) for ``users`` {name: password hash or plain text}, Maildirs under
    ``workdir/mail/NAME`` owned by the unprivileged ``user``. Started in the foreground
    (``dovecot -F``) and stopped by PID."""

    def __init__(
        self,
        workdir: Path,
        port: int,
        users: dict[str, str],
        user: str = "nobody",
        extra: str = "",
    ) -> None:
        self.workdir = Path(workdir)
        self.port = port
        self.users = dict(users)
        pw = pwd.getpwnam(user)
        self.uid, self.gid = pw.pw_uid, pw.pw_gid
        self.base_dir = self.workdir / "run"
        self.mail_base = self.workdir / "mail"
        self.log_path = self.workdir / "dovecot.log"
        self.config_path = self.workdir / "dovecot.conf"
        self.extra = extra
        self.proc: subprocess.Popen[bytes] | None = None

    def config(self) -> str:
        w = self.workdir
        return f"""\
base_dir = {self.base_dir}
state_dir = {w / "state"}
log_path = {self.log_path}
info_log_path = {self.log_path}
protocols = imap
listen = 127.0.0.1
ssl = no
disable_plaintext_auth = no
auth_mechanisms = plain login
first_valid_uid = {min(self.uid, 500)}
first_valid_gid = {min(self.gid, 500)}
mail_location = maildir:{self.mail_base}/%n
mail_max_userip_connections = 5000
default_process_limit = 5000
default_client_limit = 10000
default_vsz_limit = 0
passdb {{
  driver = passwd-file
  args = username_format=%u {w / "passwd"}
}}
userdb {{
  driver = static
  args = uid={self.uid} gid={self.gid} home={self.mail_base}/%n
}}
service imap-login {{
  inet_listener imap {{
    address = 127.0.0.1
    port = {self.port}
  }}
  inet_listener imaps {{
    port = 0
  }}
}}
service imap {{
  process_limit = 5000
}}
service anvil {{
  client_limit = 20000
}}
service auth {{
  client_limit = 20000
}}
{self.extra}
"""

    def write_config(self) -> None:
        for d in (self.base_dir, self.workdir / "state", self.mail_base):
            d.mkdir(parents=True, exist_ok=True)
        self.workdir.chmod(0o755)
        os.chown(self.mail_base, self.uid, self.gid)
        self.config_path.write_text(self.config())
        (self.workdir / "passwd").write_text(
            "".join(f"{name}:{secret}\n" for name, secret in self.users.items())
        )

    def start(self, timeout: float = 20.0) -> None:
        """Write the config, run ``dovecot -F -c CONF`` and wait for the IMAP greeting."""
        import socket

        self.write_config()
        self.proc = subprocess.Popen(
            [DOVECOT, "-F", "-c", str(self.config_path)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"dovecot exited with {self.proc.returncode}{self.log_tail()}")
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=2) as s:
                    if s.recv(512).startswith(b"* OK"):
                        return
            except OSError:
                pass
            time.sleep(0.05)
        self.stop()
        raise TimeoutError(f"dovecot not answering on 127.0.0.1:{self.port}{self.log_tail()}")

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc is not None else None

    def stop(self, timeout: float = 20.0) -> None:
        """SIGTERM the master by PID (it stops its children), SIGKILL if it does not exit."""
        if self.proc is None:
            return
        proc, self.proc = self.proc, None
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()

    def log_tail(self, chars: int = 3000) -> str:
        try:
            return "\n--- dovecot log ---\n" + self.log_path.read_text(errors="replace")[-chars:]
        except OSError:
            return ""

    def cleanup(self) -> None:
        shutil.rmtree(self.workdir, ignore_errors=True)
