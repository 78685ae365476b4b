"""Tests for the ``mailgw`` admin command (in-process ``main`` and the real entry point)."""

from __future__ import annotations

import io
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from OpenSSL import crypto

from mailgw.cli import main as cli_main
from mailgw.cli.main import default_config_path, main, parse_quota
from mailgw.cli.sizes import format_size, parse_size
from mailgw.directory import Directory

CONFIG = """\
[server]
data_dir = data
hostname = mx.example.test

[directory]
argon2_time_cost = 1
argon2_memory_kib = 8

[store]
default_quota = 1G
"""


@pytest.fixture
def config(tmp_path) -> str:
    path = tmp_path / "mailgw.ini"
    path.write_text(CONFIG)
    return str(path)


@pytest.fixture
def run(config, capsys):
    """Run ``mailgw --config CONFIG ARGS``; returns (exit code, stdout, stderr)."""

    def run(*args: str, stdin: str | None = None, tty: bool = False):
        if stdin is not None or tty:
            fake = io.StringIO(stdin or "")
            fake.isatty = lambda: tty  # type: ignore[method-assign]
            old, sys.stdin = sys.stdin, fake
        try:
            code = main(["--config", config, *args])
        finally:
            if stdin is not None or tty:
                sys.stdin = old
        out, err = capsys.readouterr()
        return code, out, err

    return run


def directory_of(config: str) -> Directory:
    data = os.path.join(os.path.dirname(config), "data")
    return Directory(
        os.path.join(data, "directory.sqlite"),
        argon2_time_cost=1,
        argon2_memory_kib=8,
        default_quota=1 << 30,
    )


# -- sizes ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "text,size",
    [
        ("1024", 1024),
        ("25M", 25 << 20),
        ("2G", 2 << 30),
        ("2g", 2 << 30),
        ("1.5K", 1536),
        ("10MB", 10 << 20),
        ("10MiB", 10 << 20),
        ("1T", 1 << 40),
        (" 7 ", 7),
    ],
)
def test_parse_size(text, size):
    assert parse_size(text) == size


@pytest.mark.parametrize("text", ["", "-1", "1X", "M", "1.5", "1 2"])
def test_parse_size_errors(text):
    with pytest.raises(ValueError):
        parse_size(text)


def test_format_size_and_quota_words():
    assert format_size(25 << 20) == "25M"
    assert format_size(1 << 30) == "1G"
    assert format_size(1536) == "1536"
    assert format_size(0) == "0"
    assert parse_quota("Default") is None
    assert parse_quota("unlimited") == 0
    assert parse_quota("2G") == 2 << 30


# -- config path ---------------------------------------------------------------------------


def test_default_config_path(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MAILGW_CONFIG", raising=False)
    assert default_config_path() == "/etc/mailgw/mailgw.ini"
    (tmp_path / "etc").mkdir()
    (tmp_path / "etc" / "mailgw.ini").write_text(CONFIG)
    assert default_config_path() == os.path.join("etc", "mailgw.ini")
    monkeypatch.setenv("MAILGW_CONFIG", "/somewhere/else.ini")
    assert default_config_path() == "/somewhere/else.ini"


def test_config_from_environment(config, monkeypatch, capsys):
    monkeypatch.setenv("MAILGW_CONFIG", config)
    assert main(["domain", "add", "example.test"]) == 0
    assert main(["domain", "list"]) == 0
    assert capsys.readouterr().out.splitlines()[-1] == "example.test"


def test_bad_config_is_one_line(tmp_path, capsys):
    bad = tmp_path / "bad.ini"
    bad.write_text("[server]\nnonsense = 1\n")
    assert main(["--config", str(bad), "domain", "list"]) == 1
    err = capsys.readouterr().err
    assert err == f"mailgw: error: {bad}:server:nonsense: unknown key\n"
    assert main(["--config", str(tmp_path / "missing.ini"), "domain", "list"]) == 1
    assert "cannot read config file" in capsys.readouterr().err


# -- usage errors --------------------------------------------------------------------------


@pytest.mark.parametrize(
    "args,fragment",
    [
        ([], "required: COMMAND"),
        (["user"], "user: the following arguments are required: ACTION"),
        (["user", "add"], "user add: the following arguments are required: ADDRESS"),
        (["frob"], "invalid choice"),
        (["user", "quota", "a@b.test", "lots"], "expected a size like 25M or 1G, got 'lots'"),
        (["user", "add", "a@b.test", "--password", "x", "--password-stdin"], "not allowed with"),
        (["cert", "selfsigned", "--days", "x"], "invalid int value"),
    ],
)
def test_usage_errors(run, args, fragment):
    code, out, err = run(*args)
    assert code == 2
    assert out == ""
    assert err.startswith("mailgw: error: ") and fragment in err
    assert err.count("\n") == 1


def test_help(run):
    code, out, _ = run("--help")
    assert code == 0 and "domain" in out and "cert" in out


# -- domains, users, aliases ---------------------------------------------------------------


def test_domain_commands(run):
    assert run("domain", "add", "Example.TEST")[:2] == (0, "added domain example.test\n")
    assert run("domain", "add", "bücher.example")[0] == 0
    assert run("domain", "list")[1] == "example.test\nxn--bcher-kva.example\n"
    code, _, err = run("domain", "add", "example.test")
    assert code == 1 and err == "mailgw: error: domain example.test already exists\n"
    assert run("user", "add", "alice@example.test", "--password", "pw")[0] == 0
    code, _, err = run("domain", "del", "example.test")
    assert code == 1 and "still has 1 user(s)" in err and "Traceback" not in err
    assert run("domain", "del", "example.test", "--force")[0] == 0
    assert run("domain", "list")[1] == "xn--bcher-kva.example\n"
    assert run("user", "list")[1] == ""


def test_user_commands(run, config):
    run("domain", "add", "example.test")
    assert run("user", "add", "Alice@example.test", "--password", "secret")[1] == (
        "added user alice@example.test\n"
    )
    assert run("user", "add", "bob@example.test", "--password", "pw", "--quota", "25M")[0] == 0
    assert run("user", "list")[1] == (
        "alice@example.test\t1G\tenabled\nbob@example.test\t25M\tenabled\n"
    )
    assert run("user", "list", "example.test")[1].count("\n") == 2
    code, _, err = run("user", "list", "nowhere.test")
    assert code == 1 and err == "mailgw: error: no such domain nowhere.test\n"
    code, _, err = run("user", "add", "alice@example.test", "--password", "x")
    assert code == 1 and "already exists" in err

    assert run("user", "quota", "alice@example.test", "unlimited")[1] == (
        "quota of alice@example.test: unlimited\n"
    )
    assert run("user", "quota", "bob@example.test", "default")[1] == (
        "quota of bob@example.test: 1G (the default)\n"
    )
    assert run("user", "disable", "bob@example.test")[0] == 0
    assert run("user", "list")[1] == (
        "alice@example.test\tunlimited\tenabled\nbob@example.test\t1G\tdisabled\n"
    )
    assert run("user", "enable", "bob@example.test")[0] == 0

    assert run("user", "passwd", "alice@example.test", "--password", "new")[0] == 0
    with directory_of(config) as d:
        assert d.authenticate("alice@example.test", "new").name == "alice@example.test"
        assert d.quota_for("bob@example.test") == 1 << 30
        assert d.get_user("bob@example.test").enabled
    code, _, err = run("user", "passwd", "nobody@example.test", "--password", "x")
    assert code == 1 and err == "mailgw: error: no such user nobody@example.test\n"

    assert run("user", "del", "bob@example.test")[0] == 0
    code, _, err = run("user", "del", "bob@example.test")
    assert code == 1 and "no such user" in err
    code, _, err = run("user", "add", "carol@nowhere.test", "--password", "x")
    assert code == 1 and "not a local domain" in err


def test_password_from_stdin_and_prompt(run, config, monkeypatch):
    run("domain", "add", "example.test")
    assert run("user", "add", "a@example.test", "--password-stdin", stdin="from stdin\r\n")[0] == 0
    code, _, err = run("user", "add", "b@example.test", "--password-stdin", stdin="")
    assert code == 1 and "no password on standard input" in err
    code, _, err = run("user", "add", "b@example.test", stdin="piped\n")
    assert code == 1 and "no password given" in err

    answers = iter(["typed", "typed", "one", "two"])
    prompts: list[str] = []

    def fake_getpass(prompt: str) -> str:
        prompts.append(prompt)
        return next(answers)

    monkeypatch.setattr(cli_main.getpass, "getpass", fake_getpass)
    assert run("user", "add", "b@example.test", tty=True)[0] == 0
    assert len(prompts) == 2
    code, _, err = run("user", "passwd", "b@example.test", tty=True)
    assert code == 1 and err == "mailgw: error: the passwords do not match\n"

    def interrupted(prompt: str) -> str:
        raise KeyboardInterrupt

    monkeypatch.setattr(cli_main.getpass, "getpass", interrupted)
    code, _, err = run("user", "passwd", "b@example.test", tty=True)
    assert code == 1 and err == "mailgw: error: interrupted\n"

    with directory_of(config) as d:
        assert d.authenticate("a@example.test", "from stdin")
        assert d.authenticate("b@example.test", "typed")


def test_group_commands_and_user_show(run, config):
    run("domain", "add", "example.test")
    run("user", "add", "alice@example.test", "--password", "pw")
    run("user", "add", "bob@example.test", "--password", "pw", "--quota", "25M")
    assert run("group", "add", "Finance") == (0, "added group finance\n", "")
    assert run("group", "add", "hr")[0] == 0
    code, _, err = run("group", "add", "finance")
    assert code == 1 and err == "mailgw: error: group finance already exists\n"
    code, _, err = run("group", "add", "a b")
    assert code == 1 and "bad group name 'a b'" in err
    assert run("group", "adduser", "finance", "Alice@Example.test") == (
        0,
        "added alice@example.test to group finance\n",
        "",
    )
    assert run("group", "adduser", "finance", "bob@example.test")[0] == 0
    assert run("group", "adduser", "hr", "alice@example.test")[0] == 0
    code, _, err = run("group", "adduser", "finance", "bob@example.test")
    assert code == 1 and "bob@example.test is already in group finance" in err
    code, _, err = run("group", "adduser", "sales", "bob@example.test")
    assert code == 1 and err == "mailgw: error: no such group sales\n"
    code, _, err = run("group", "adduser", "hr", "nobody@example.test")
    assert code == 1 and err == "mailgw: error: no such user nobody@example.test\n"
    assert run("group", "list")[1] == "finance\t2\nhr\t1\n"
    assert run("group", "members", "finance")[1] == "alice@example.test\nbob@example.test\n"
    code, _, err = run("group", "members", "sales")
    assert code == 1 and "no such group sales" in err
    assert run("user", "show", "alice@example.test")[1] == (
        "user: alice@example.test\nstate: enabled\nquota: 1G (the default)\ngroups: finance hr\n"
    )
    assert run("group", "deluser", "finance", "alice@example.test") == (
        0,
        "removed alice@example.test from group finance\n",
        "",
    )
    code, _, err = run("group", "deluser", "finance", "alice@example.test")
    assert code == 1 and "alice@example.test is not in group finance" in err
    assert run("group", "del", "hr") == (0, "removed group hr (1 member(s); the users stay)\n", "")
    assert run("user", "show", "alice@example.test")[1].endswith("groups: -\n")
    assert "quota: 25M\n" in run("user", "show", "bob@example.test")[1]
    code, _, err = run("user", "show", "nobody@example.test")
    assert code == 1 and err == "mailgw: error: no such user nobody@example.test\n"
    code, _, err = run("group", "del", "hr")
    assert code == 1 and "no such group hr" in err
    with directory_of(config) as d:
        assert d.in_group("bob@example.test", ("finance",))
        assert not d.in_group("alice@example.test", ("finance", "hr"))


def test_alias_commands(run, config):
    run("domain", "add", "example.test")
    run("user", "add", "alice@example.test", "--password", "pw")
    assert run("alias", "add", "Info@example.test", "alice@example.test")[1] == (
        "added alias info@example.test -> alice@example.test\n"
    )
    assert run("alias", "add", "info@example.test", "ext@elsewhere.test")[0] == 0
    code, _, err = run("alias", "add", "x@example.test", "nobody@example.test")
    assert code == 1 and "not a local user or alias" in err
    assert run("alias", "add", "@example.test", "alice@example.test")[0] == 0
    assert run("alias", "list")[1] == (
        "@example.test\talice@example.test\n"
        "info@example.test\talice@example.test\n"
        "info@example.test\text@elsewhere.test\n"
    )
    with directory_of(config) as d:
        assert d.resolve("info@example.test") == ["alice@example.test", "ext@elsewhere.test"]
        assert d.resolve("whoever@example.test") == ["alice@example.test"]
    assert run("alias", "del", "info@example.test", "ext@elsewhere.test")[0] == 0
    assert run("alias", "del", "@example.test")[0] == 0
    assert run("alias", "list")[1] == "info@example.test\talice@example.test\n"
    code, _, err = run("alias", "del", "nothing@example.test")
    assert code == 1 and err == "mailgw: error: no such alias nothing@example.test\n"


def test_unexpected_errors_are_one_line(run, monkeypatch):
    def boom(ctx, args):
        raise RuntimeError("kaput")

    monkeypatch.setattr(cli_main, "cmd_domain_list", boom)
    code, _, err = run("domain", "list")
    assert code == 1 and err == "mailgw: error: unexpected RuntimeError: kaput\n"


def test_unwritable_data_dir(tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("")
    cfg = tmp_path / "m.ini"
    cfg.write_text(CONFIG.replace("data_dir = data", "data_dir = file/data"))
    assert main(["--config", str(cfg), "domain", "list"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("mailgw: error: ") and err.count("\n") == 1


def test_corrupt_database(run, config):
    data = os.path.join(os.path.dirname(config), "data")
    os.makedirs(data)
    with open(os.path.join(data, "directory.sqlite"), "wb") as f:
        f.write(b"this is not a database" * 100)
    code, _, err = run("domain", "list")
    assert code == 1 and err.startswith("mailgw: error: directory database: ")


# -- store ---------------------------------------------------------------------------------


def test_store_reindex(run, config, tmp_path):
    from mailgw.store import MessageStore

    run("domain", "add", "example.test")
    run("user", "add", "alice@example.test", "--password", "pw")
    message = tmp_path / "msg"
    message.write_bytes(b"Subject: hi\r\n\r\nhello\r\n")
    with directory_of(config) as d:
        store = MessageStore(
            root=os.path.join(os.path.dirname(config), "data", "mail"), quota_for=d.quota_for
        )
        store.deliver("alice@example.test", str(message))
        store.deliver("alice@example.test", str(message))
    code, out, _ = run("store", "reindex", "ALICE@example.test")
    assert code == 0 and out == "reindexed 2 message(s) of alice@example.test\n"
    code, _, err = run("store", "reindex", "nobody@example.test")
    assert code == 1 and err == "mailgw: error: no such user nobody@example.test\n"


# -- certificates --------------------------------------------------------------------------


def load_cert(folder) -> tuple[x509.Certificate, bytes]:
    cert = x509.load_pem_x509_certificate((folder / "mailgw.crt").read_bytes())
    return cert, (folder / "mailgw.key").read_bytes()


def test_cert_selfsigned_defaults_from_config(run, config, tmp_path):
    code, out, _ = run("cert", "selfsigned")
    assert code == 0
    folder = tmp_path / "data" / "tls"
    assert f"certificate = {folder / 'mailgw.crt'}" in out
    assert f"private_key = {folder / 'mailgw.key'}" in out
    assert "[tls]" in out
    assert stat.S_IMODE(os.stat(folder / "mailgw.key").st_mode) == 0o600
    cert, key_pem = load_cert(folder)
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["mx.example.test", "localhost"]
    assert [str(ip) for ip in san.get_values_for_type(x509.IPAddress)] == ["127.0.0.1"]
    key = serialization.load_pem_private_key(key_pem, None)
    assert isinstance(key, ec.EllipticCurvePrivateKey)
    assert key.public_key().public_numbers() == cert.public_key().public_numbers()

    # The certificate verifies against itself as trust anchor (clients use it as CA file).
    store = crypto.X509Store()
    store.add_cert(crypto.X509.from_cryptography(cert))
    crypto.X509StoreContext(store, crypto.X509.from_cryptography(cert)).verify_certificate()

    # The lead's config loader accepts the printed lines.
    with open(config, "a") as f:
        f.write("\n" + out.split("\n", 1)[1])
    from mailgw.config import load

    assert load(config).tls.certificate == str(folder / "mailgw.crt")

    code, _, err = run("cert", "selfsigned")
    assert code == 1 and "already exists" in err and "--force" in err
    assert run("cert", "selfsigned", "--force")[0] == 0
    assert load_cert(folder)[0].serial_number != cert.serial_number


def test_cert_selfsigned_options_without_config(tmp_path, capsys):
    out_dir = tmp_path / "certs"
    args = ["--config", str(tmp_path / "missing.ini"), "cert", "selfsigned"]
    opts = ["--hostname", "192.0.2.7", "--out", str(out_dir), "--days", "10", "--key-type", "rsa"]
    assert main(args + opts) == 0
    cert, key_pem = load_cert(out_dir)
    key = serialization.load_pem_private_key(key_pem, None)
    assert isinstance(key, rsa.RSAPrivateKey) and key.key_size == 2048
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert [str(ip) for ip in san.get_values_for_type(x509.IPAddress)] == ["192.0.2.7", "127.0.0.1"]
    lifetime = cert.not_valid_after_utc - cert.not_valid_before_utc
    assert 10 * 86400 <= lifetime.total_seconds() <= 10 * 86400 + 600
    capsys.readouterr()
    assert main(args + ["--hostname", "h", "--out", str(tmp_path / "x"), "--days", "0"]) == 1
    assert "at least one day" in capsys.readouterr().err


def test_cert_write_failure_leaves_no_temp(tmp_path, monkeypatch):
    from mailgw.cli import certs

    def failing_fsync(fd: int) -> None:
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(certs.os, "fsync", failing_fsync)
    with pytest.raises(OSError):
        certs.write_file(str(tmp_path / "k"), b"data", 0o600, overwrite=False)
    assert os.listdir(tmp_path) == []
    (tmp_path / "k").write_bytes(b"old")
    with pytest.raises(FileExistsError):
        certs.write_file(str(tmp_path / "k"), b"data", 0o600, overwrite=False)
    with pytest.raises(ValueError):
        certs.make_selfsigned("h", key_type="dsa")


# -- the real entry point ------------------------------------------------------------------


def test_python_m_mailgw_cli(config, tmp_path):
    import mailgw

    root = os.path.dirname(os.path.dirname(os.path.abspath(mailgw.__file__)))
    env = {**os.environ, "PYTHONPATH": root}
    env.pop("MAILGW_CONFIG", None)

    def mailgw(*args: str, stdin: str = "") -> subprocess.CompletedProcess:
        return subprocess.run(
            [sys.executable, "-m", "mailgw.cli", "--config", config, *args],
            input=stdin,
            capture_output=True,
            text=True,
            env=env,
            timeout=60,
        )

    assert mailgw("domain", "add", "example.test").returncode == 0
    done = mailgw("user", "add", "alice@example.test", "--password-stdin", stdin="s3cret\n")
    assert done.returncode == 0, done.stderr
    done = mailgw("user", "list")
    assert done.stdout == "alice@example.test\t1G\tenabled\n"
    done = mailgw("user", "add", "bob@nowhere.test", "--password", "x")
    assert done.returncode == 1
    assert done.stderr == "mailgw: error: nowhere.test is not a local domain (add it first)\n"
    done = mailgw("user")
    assert done.returncode == 2 and done.stderr.count("\n") == 1
    with directory_of(config) as d:
        assert d.authenticate("alice@example.test", "s3cret").name == "alice@example.test"


# -- quota words as in the config file (one parser) ----------------------------------------


@pytest.mark.parametrize("word", ["none", "None", "unlimited", "0"])
def test_quota_none_means_unlimited_as_in_the_config_file(run, config, word):
    from mailgw.config import load

    run("domain", "add", "example.test")
    run("user", "add", "carol@example.test", "--password", "pw", "--quota", "5M")
    assert run("user", "quota", "carol@example.test", word)[1] == (
        "quota of carol@example.test: unlimited\n"
    )
    with directory_of(config) as d:
        assert d.quota_for("carol@example.test") is None  # no limit
        assert d.get_user("carol@example.test").quota == 0  # its own: unlimited
    # ... the same word as the config's default_quota: no limit either.
    path = Path(config)
    path.write_text(path.read_text().replace("default_quota = 1G", f"default_quota = {word}"))
    assert load(config).store.default_quota is None
    assert run("user", "add", "dan@example.test", "--password", "pw", "--quota", word)[0] == 0
    assert run("user", "list")[1].splitlines()[-1] == "dan@example.test\tunlimited\tenabled"


def test_quota_sizes_parse_alike_in_config_and_cli(tmp_path):
    from mailgw.config import load
    from mailgw.config.values import parse_quota as config_quota

    for text, size in (("2G", 2 << 30), ("1.5G", 3 << 29), ("10MiB", 10 << 20), ("4096", 4096)):
        assert parse_quota(text) == config_quota(text) == size
        path = tmp_path / "q.ini"
        path.write_text(f"[store]\ndefault_quota = {text}\n")
        assert load(str(path)).store.default_quota == size


def test_user_quota_default_follows_the_config(run, config):
    run("domain", "add", "example.test")
    run("user", "add", "erin@example.test", "--password", "pw", "--quota", "none")
    assert run("user", "quota", "erin@example.test", "default")[0] == 0
    with directory_of(config) as d:
        assert d.get_user("erin@example.test").quota is None
        assert d.quota_for("erin@example.test") == 1 << 30
