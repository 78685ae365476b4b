"""Config loading: defaults, paths, and `file:section:key: what is wrong` errors."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from mailgw.config import ConfigError, load, schema

REPO = Path(__file__).resolve().parents[2]


def write(tmp_path: Path, text: str) -> str:
    path = tmp_path / "mailgw.ini"
    path.write_text(text)
    return str(path)


def test_shipped_config_loads_and_resolves_data_dir_against_its_folder() -> None:
    config = load(str(REPO / "etc" / "mailgw.ini"))
    assert config.server.data_dir == str(REPO / "var")
    assert config.mx.listen == ("tcp:8025:interface=127.0.0.1",)
    assert config.mx.max_message_size == 25 * 1024 * 1024
    assert config.pop3.allow_plaintext_auth == "loopback"
    assert not config.tls_enabled


def test_shipped_config_documents_every_key_with_its_default() -> None:
    text = (REPO / "etc" / "mailgw.ini").read_text()
    for section, keys in schema().items():
        block = re.search(rf"^\[{section}\]\n(.*?)(?=^\[|\Z)", text, re.S | re.M)
        assert block, f"section [{section}] missing"
        for name, default, _doc in keys:
            shown = default or "(empty)"
            pattern = rf"# default: {re.escape(shown)}\n{name} ="
            assert re.search(pattern, block.group(1)), f"[{section}] {name} undocumented"


def test_empty_file_gives_defaults(tmp_path: Path) -> None:
    config = load(write(tmp_path, ""))
    assert config.server.data_dir == "/var/lib/mailgw"
    assert config.server.hostname  # the machine's name
    assert config.delivery.retry_interval == 300.0
    assert config.store.default_quota == 1024**3
    assert config.store.default_folders == ("Sent", "Drafts", "Trash", "Junk", "Archive")


def test_relative_data_dir(tmp_path: Path) -> None:
    config = load(write(tmp_path, "[server]\ndata_dir = state\n"))
    assert config.server.data_dir == str(tmp_path / "state")


@pytest.mark.parametrize(
    ("text", "where", "message"),
    [
        ("[bogus]\n", "bogus", "unknown section"),
        ("[mx]\nlisten_on = tcp:25\n", "mx:listen_on", "unknown key"),
        ("[mx]\nmax_message_size = lots\n", "mx:max_message_size", "expected a size"),
        ("[mx]\nenabled = maybe\n", "mx:enabled", "expected yes or no"),
        ("[mx]\nmax_recipients = 0\n", "mx:max_recipients", "above 0"),
        ("[mx]\nidle_timeout = soon\n", "mx:idle_timeout", "expected a duration"),
        ("[mx]\nlisten = tcp:notaport\n", "mx:listen", "invalid endpoint"),
        ("[mx]\nproxy_trusted = 10.0.0.300/8\n", "mx:proxy_trusted", "not an IP network"),
        ("[pop3]\nallow_plaintext_auth = sometimes\n", "pop3:allow_plaintext_auth", "loopback"),
        ("[tls]\ncertificate = missing.pem\n", "tls:certificate", "cannot read"),
        ("[tls]\nprivate_key = k.pem\n", "tls:private_key", "without certificate"),
        ("[tls]\nmin_version = SSLv3\n", "tls:min_version", "TLSv1.2"),
        ("[directory]\nrecipient_delimiter = ab\n", "directory:recipient_delimiter", "punctuation"),
        ("[server]\npostmaster = not an address\n", "server:postmaster", "expected an address"),
        ("[mx\n", "-", "not a valid INI file"),
    ],
)
def test_errors_name_file_section_and_key(
    tmp_path: Path, text: str, where: str, message: str
) -> None:
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as info:
        load(path)
    assert str(info.value).startswith(f"{path}:{where}: ")
    assert message in str(info.value)


def test_unreadable_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read config file"):
        load(str(tmp_path / "nope.ini"))


def test_garbage_certificate(tmp_path: Path) -> None:
    (tmp_path / "bad.pem").write_text("not a certificate\n")
    path = write(tmp_path, "[tls]\ncertificate = bad.pem\n")
    with pytest.raises(ConfigError, match=r"tls:certificate: no PEM certificate"):
        load(path)


def test_valid_certificate(tmp_path: Path, selfsigned: tuple[Path, Path]) -> None:
    cert, key = selfsigned
    config = load(write(tmp_path, f"[tls]\ncertificate = {cert}\nprivate_key = {key}\n"))
    assert config.tls_enabled


def test_key_not_matching_certificate(tmp_path: Path, selfsigned: tuple[Path, Path]) -> None:
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    cert, _ = selfsigned
    other = ec.generate_private_key(ec.SECP256R1())
    (tmp_path / "other.key").write_bytes(
        other.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    path = write(tmp_path, f"[tls]\ncertificate = {cert}\nprivate_key = other.key\n")
    with pytest.raises(ConfigError, match="tls:private_key: key does not match"):
        load(path)
