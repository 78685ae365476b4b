"""A whole cluster on loopback for the integration tests: HAProxy in front of two gateway
twistd nodes, which forward over LMTP to two backend twistd nodes, and nginx's mail proxy
asking a gateway's ``auth_http`` endpoint. Every port is a free one; every process is
started and stopped by its PID."""

from __future__ import annotations

import shutil
import signal
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

from mailgw.testing.server import MailgwServer, free_port, wait_for_port

DOMAIN = "example.test"
NGINX_MAIL_MODULE = "/usr/lib/nginx/modules/ngx_mail_module.so"


def have_peers() -> bool:
    return (
        bool(shutil.which("haproxy") and shutil.which("nginx")) and Path(NGINX_MAIL_MODULE).exists()
    )


class Peer:
    """A real peer process (haproxy, nginx) started and stopped by PID."""

    def __init__(self, name: str, cmd: list[str], log: Path) -> None:
        self.name = name
        self.cmd = cmd
        self.log_path = log
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        out = open(self.log_path, "ab")  # noqa: SIM115 (the process keeps it)
        self.proc = subprocess.Popen(self.cmd, stdout=out, stderr=subprocess.STDOUT)
        out.close()

    def stop(self) -> None:
        if self.proc is None:
            return
        proc, self.proc = self.proc, None
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""


@dataclass
class Cluster:
    root: Path
    gateways: dict[str, MailgwServer] = field(default_factory=dict)
    backends: dict[str, MailgwServer] = field(default_factory=dict)
    ports: dict[str, int] = field(default_factory=dict)
    peers: list[Peer] = field(default_factory=list)

    def cli(self, *args: str) -> subprocess.CompletedProcess[str]:
        return next(iter(self.gateways.values())).cli(*args)

    def stop(self) -> None:
        for peer in self.peers:
            peer.stop()
        for server in [*self.gateways.values(), *self.backends.values()]:
            server.stop()


def backend_config(cluster: Cluster, name: str, nodes: str) -> dict[str, dict[str, str]]:
    lmtp = cluster.ports[f"{name}-lmtp"]
    return {
        "server": {"hostname": f"{name}.example.test"},
        "mx": {"enabled": "no"},
        "lmtp": {"enabled": "yes", "listen": f"tcp:{lmtp}:interface=127.0.0.1"},
        "cluster": {
            "node_name": name,
            "mailbox_nodes": nodes,
            "directory": str(cluster.root / "shared" / "directory.sqlite"),
        },
        "imap": {"workers": "0"},
    }


def gateway_config(cluster: Cluster, name: str, nodes: str) -> dict[str, dict[str, str]]:
    p = cluster.ports
    imap = " ".join(f"{b}=127.0.0.1:{s.ports['imap']}" for b, s in cluster.backends.items())
    pop3 = " ".join(f"{b}=127.0.0.1:{s.ports['pop3']}" for b, s in cluster.backends.items())
    return {
        "server": {"hostname": f"{name}.example.test"},
        "mx": {"listen": f"haproxy:tcp:{p[f'{name}-mx']}:interface=127.0.0.1"},
        "pop3": {"enabled": "no"},
        "imap": {"enabled": "no"},
        "relay": {"enabled": "yes", "retry_schedule": "1s", "scan_interval": "1s"},
        "submission": {
            "enabled": "yes",
            "listen": f"tcp:{p[f'{name}-submission']}:interface=127.0.0.1",
            "xclient_trusted": "127.0.0.0/8",
        },
        "http": {"enabled": "yes", "listen": f"tcp:{p[f'{name}-http']}:interface=127.0.0.1"},
        "cluster": {
            "node_name": name,
            "mailbox_nodes": nodes,
            "directory": str(cluster.root / "shared" / "directory.sqlite"),
            "imap_servers": imap,
            "pop3_servers": pop3,
            "move_hold_retry": "1s",
        },
    }


HAPROXY_CFG = """global
    maxconn 2000
defaults
    mode tcp
    timeout connect 2s
    timeout client 30s
    timeout server 30s
    retries 2
    option redispatch 1
frontend smtp_in
    bind 127.0.0.1:{front}
    default_backend gateways_mx
backend gateways_mx
    balance roundrobin
    option smtpchk EHLO check.local
    default-server send-proxy-v2 check inter 500ms fall 2 rise 2 observe layer4 error-limit 1 on-error mark-down
{servers}
"""

NGINX_CONF = """load_module {module};
error_log {dir}/error.log info;
pid {dir}/nginx.pid;
events {{ worker_connections 256; }}
mail {{
    auth_http http://127.0.0.1:{auth}/auth/nginx;
    proxy_pass_error_message on;
    server {{ listen 127.0.0.1:{imap}; protocol imap; }}
    server {{ listen 127.0.0.1:{pop3}; protocol pop3; }}
    server {{
        listen 127.0.0.1:{smtp}; protocol smtp;
        smtp_auth login plain; xclient on;
    }}
}}
"""


def start_cluster(root: Path) -> Cluster:
    cluster = Cluster(root)
    (root / "shared").mkdir(parents=True, exist_ok=True)
    p = cluster.ports
    for name in ("be1", "be2"):
        p[f"{name}-lmtp"] = free_port()
    for name in ("gw1", "gw2"):
        for what in ("mx", "submission", "http"):
            p[f"{name}-{what}"] = free_port()
    for what in ("haproxy", "nginx-imap", "nginx-pop3", "nginx-smtp"):
        p[what] = free_port()
    nodes = " ".join(f"{b}=127.0.0.1:{p[f'{b}-lmtp']}" for b in ("be1", "be2"))
    try:
        for name in ("be1", "be2"):
            server = MailgwServer(root / name, backend_config(cluster, name, nodes))
            cluster.backends[name] = server
        for name in ("gw1", "gw2"):
            server = MailgwServer(root / name, gateway_config(cluster, name, nodes))
            cluster.gateways[name] = server
        gw1 = cluster.gateways["gw1"]
        gw1.cli("domain", "add", DOMAIN)
        for user in ("alice", "bob", "carol"):
            gw1.cli("user", "add", f"{user}@{DOMAIN}", "--password", f"{user} password")
        gw1.cli("user", "node", f"alice@{DOMAIN}", "be1")
        gw1.cli("user", "node", f"bob@{DOMAIN}", "be2")
        gw1.cli("user", "node", f"carol@{DOMAIN}", "be1")
        for name, server in cluster.backends.items():
            server.start()
            wait_for_port("127.0.0.1", p[f"{name}-lmtp"], proc=server.proc)
        for name, server in cluster.gateways.items():
            server.start()
            wait_for_port("127.0.0.1", p[f"{name}-http"], proc=server.proc)
            wait_for_port("127.0.0.1", p[f"{name}-submission"], proc=server.proc)
        servers = "\n".join(f"    server {g} 127.0.0.1:{p[f'{g}-mx']}" for g in ("gw1", "gw2"))
        cfg = root / "haproxy.cfg"
        cfg.write_text(HAPROXY_CFG.format(front=p["haproxy"], servers=servers))
        haproxy = Peer("haproxy", ["haproxy", "-db", "-f", str(cfg)], root / "haproxy.log")
        haproxy.start()
        cluster.peers.append(haproxy)
        ndir = root / "nginx"
        ndir.mkdir(exist_ok=True)
        (ndir / "nginx.conf").write_text(
            NGINX_CONF.format(
                module=NGINX_MAIL_MODULE,
                dir=ndir,
                auth=p["gw1-http"],
                imap=p["nginx-imap"],
                pop3=p["nginx-pop3"],
                smtp=p["nginx-smtp"],
            )
        )
        nginx = Peer(
            "nginx",
            ["nginx", "-p", str(ndir), "-c", str(ndir / "nginx.conf"), "-g", "daemon off;"],
            root / "nginx.log",
        )
        nginx.start()
        cluster.peers.append(nginx)
        for what in ("haproxy", "nginx-imap", "nginx-pop3", "nginx-smtp"):
            wait_for_port("127.0.0.1", p[what])
        time.sleep(1.2)  # HAProxy's first health checks (inter 500ms, rise 2)
    except BaseException:
        cluster.stop()
        raise
    return cluster
