"""Mailbox names: users and alias sources that could not be stored are refused at creation."""

from __future__ import annotations

import pytest

from mailgw.cli.main import main
from mailgw.directory import Directory
from mailgw.directory.names import check_local_part


@pytest.fixture
def directory(tmp_path):
    d = Directory(str(tmp_path / "directory.sqlite"), argon2_time_cost=1, argon2_memory_kib=8)
    d.add_domain("example.test")
    yield d
    d.close()


@pytest.mark.parametrize(
    "bad",
    [
        "a/b@example.test",
        "/@example.test",
        "../x@example.test",
        "a..b@example.test",
        ".a@example.test",
        "a.@example.test",
        "a\x00b@example.test",
        "a\tb@example.test",
        "a\x7fb@example.test",
        '"a b"@example.test',
        "x" * 65 + "@example.test",
        "ü" * 33 + "@example.test",  # 66 octets of UTF-8
        "a@b@example.test",
    ],
)
def test_bad_user_names_are_refused(directory, bad):
    with pytest.raises(ValueError, match="invalid address"):
        directory.add_user(bad, "password")
    with pytest.raises(ValueError, match="invalid address"):
        directory.add_alias(bad, "someone@elsewhere.test")
    assert directory.list_users() == [] and directory.list_aliases() == []


@pytest.mark.parametrize(
    "good", ["alice", "a.b", "first.last+tag", "o'brien", "x" * 64, "jörg", "a!#$%&*=?^_`{|}~-"]
)
def test_dot_atoms_without_slash_are_accepted(directory, good):
    user = directory.add_user(f"{good}@example.test", "password")
    assert user.name == f"{good.lower()}@example.test"


def test_check_local_part_reasons():
    with pytest.raises(ValueError, match="'/' is not allowed"):
        check_local_part("a/b")
    with pytest.raises(ValueError, match="control characters"):
        check_local_part("a\x85b")
    with pytest.raises(ValueError, match="non-empty atoms"):
        check_local_part("a..b")
    with pytest.raises(ValueError, match="longer than 64"):
        check_local_part("y" * 65)
    with pytest.raises(ValueError, match="empty"):
        check_local_part("")
    check_local_part("ok.name")


@pytest.mark.parametrize("bad", ["a/b.test", "ex ample.test", "a..test", "a" * 64 + ".test"])
def test_bad_domains_are_refused(directory, bad):
    with pytest.raises(ValueError, match="invalid domain"):
        directory.add_domain(bad)


def test_cli_says_why(tmp_path, capsys):
    config = tmp_path / "mailgw.ini"
    config.write_text(
        "[server]\ndata_dir = data\n[directory]\nargon2_time_cost = 1\nargon2_memory_kib = 8\n"
    )
    run = ["--config", str(config)]
    assert main([*run, "domain", "add", "example.test"]) == 0
    assert main([*run, "user", "add", "a/b@example.test", "--password", "pw"]) == 1
    assert main([*run, "alias", "add", "x/y@example.test", "a@elsewhere.test"]) == 1
    assert main([*run, "domain", "add", "bad/domain.test"]) == 1
    out, err = capsys.readouterr()
    assert err.splitlines() == [
        "mailgw: error: invalid address 'a/b@example.test': '/' is not allowed in a mailbox name",
        "mailgw: error: invalid address 'x/y@example.test': '/' is not allowed in a mailbox name",
        "mailgw: error: invalid domain 'bad/domain.test': invalid domain 'bad/domain.test'",
    ]
    assert main([*run, "user", "list"]) == 0
    assert capsys.readouterr().out == ""
