"""The shipped HAProxy and nginx configurations are valid for the real programs, and the
cluster example's mailgw configs load."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from mailgw.config import load

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("path", ["etc/haproxy/haproxy.cfg", "etc/cluster/haproxy.cfg"])
def test_haproxy_accepts(path: str) -> None:
    out = subprocess.run(
        ["haproxy", "-c", "-f", str(REPO / path)], capture_output=True, text=True, timeout=30
    )
    assert out.returncode == 0, out.stdout + out.stderr
    text = (REPO / path).read_text()
    assert "send-proxy-v2" in text and "option smtpchk" in text


def test_nginx_accepts_the_mail_proxy_configs(tmp_path: Path) -> None:
    out = subprocess.run(
        ["nginx", "-t", "-p", str(tmp_path), "-c", str(REPO / "etc/cluster/nginx.conf")],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert out.returncode == 0, out.stderr
    # The production file: syntax only (its addresses and certificates are placeholders).
    text = (REPO / "etc/nginx/mailgw.conf").read_text()
    assert "auth_http http://" in text and "xclient on;" in text and "protocol imap;" in text
    cert = tmp_path / "c.pem"
    key = tmp_path / "k.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256",
         "-nodes", "-keyout", str(key), "-out", str(cert), "-days", "1", "-subj", "/CN=t"],
        check=True, capture_output=True, timeout=30,
    )  # fmt: skip
    local = (
        text.replace("/etc/ssl/mail.example.com.crt", str(cert))
        .replace("/etc/ssl/private/mail.example.com.key", str(key))
        .replace("/run/nginx-mailgw.pid", str(tmp_path / "pid"))
        .replace("/var/log/nginx/", f"{tmp_path}/")
    )
    (tmp_path / "mailgw.conf").write_text(local)
    out = subprocess.run(
        ["nginx", "-t", "-p", str(tmp_path), "-c", str(tmp_path / "mailgw.conf")],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert "syntax is ok" in out.stderr, out.stderr  # (binding 10.0.0.5 then fails here)


@pytest.mark.parametrize("node", ["gw1", "gw2", "be1", "be2"])
def test_the_cluster_example_configs_load(
    node: str, tmp_path: Path, selfsigned: tuple[Path, Path]
) -> None:
    # A copy of the example with the certificate start.sh would make (in its run/ folder).
    example = tmp_path / "cluster"
    shutil.copytree(REPO / "etc" / "cluster", example, ignore=shutil.ignore_patterns("run"))
    (example / "run" / "tls").mkdir(parents=True)
    cert, key = selfsigned
    shutil.copy(cert, example / "run" / "tls" / "mailgw.crt")
    shutil.copy(key, example / "run" / "tls" / "mailgw.key")
    config = load(str(example / f"{node}.ini"))
    assert config.cluster.node_name == node
    assert [n for n, _, _ in config.cluster.mailbox_nodes] == ["be1", "be2"]
    assert config.lmtp.enabled == node.startswith("be")
    assert config.mx.enabled == node.startswith("gw")
