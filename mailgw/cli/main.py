"""``mailgw [--config PATH] COMMAND``: manage domains, users, groups, aliases, the store and
dev certs; check, show and reload the configuration."""

from __future__ import annotations

import argparse
import getpass
import os
import sqlite3
import sys
from collections.abc import Callable
from typing import Any, NoReturn

from mailgw.cli.cluster import register_cluster_commands
from mailgw.cli.config import register_config_commands
from mailgw.cli.context import LOCAL_CONFIG, SYSTEM_CONFIG, Context, Failure
from mailgw.cli.context import default_config_path as default_config_path  # tap, tests
from mailgw.cli.dr import register_dr_commands
from mailgw.cli.policy import register_policy_commands
from mailgw.cli.queue import register_relay_commands
from mailgw.cli.reputation import register_reputation_commands
from mailgw.cli.sizes import format_size
from mailgw.cli.token import register_token_commands
from mailgw.cli.track import register_track_command
from mailgw.config import values


class UsageError(Exception):
    """The command line is wrong (exit code 2)."""


class _Parser(argparse.ArgumentParser):
    """argparse that reports errors as one line instead of printing usage and exiting."""

    def error(self, message: str) -> NoReturn:
        where = self.prog.partition(" ")[2]
        raise UsageError(f"{where}: {message}" if where else message)


def parse_quota(text: str) -> int | None:
    """A user's quota as ``Directory`` stores it: ``default`` -> None (``[store]
    default_quota`` applies); otherwise the config file's syntax
    (``mailgw.config.values.parse_quota``): a size like ``2G``, or ``none``, ``unlimited`` or
    ``0`` -> 0 (unlimited)."""
    if text.strip().lower() == "default":
        return None
    quota = values.parse_quota(text)
    return 0 if quota is None else quota


def _quota_arg(text: str) -> int | None:
    try:
        return parse_quota(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _say(text: str) -> None:
    print(text, file=sys.stdout)


# -- passwords ---------------------------------------------------------------------------


def read_password(args: argparse.Namespace) -> str:
    """The new password from ``--password``, ``--password-stdin`` or a terminal prompt."""
    if args.password is not None:
        return str(args.password)
    if args.password_stdin:
        line = sys.stdin.readline()
        password = line[:-1] if line.endswith("\n") else line
        password = password[:-1] if password.endswith("\r") else password
        if not password:
            raise Failure("no password on standard input")
        return password
    if not sys.stdin.isatty():
        raise Failure("no password given: use --password, --password-stdin or a terminal")
    first = getpass.getpass("New password: ")
    second = getpass.getpass("Repeat password: ")
    if first != second:
        raise Failure("the passwords do not match")
    return first


# -- commands ----------------------------------------------------------------------------


def cmd_domain_add(ctx: Context, args: argparse.Namespace) -> None:
    _say(f"added domain {ctx.directory.add_domain(args.name)}")


def cmd_domain_del(ctx: Context, args: argparse.Namespace) -> None:
    ctx.directory.remove_domain(args.name, force=args.force)
    _say(f"removed domain {args.name}")


def cmd_domain_list(ctx: Context, args: argparse.Namespace) -> None:
    for name in ctx.directory.list_domains():
        _say(name)


def cmd_user_add(ctx: Context, args: argparse.Namespace) -> None:
    directory = ctx.directory
    password = read_password(args)
    user = directory.add_user(args.address, password, quota=args.quota)
    _say(f"added user {user.name}")


def cmd_user_del(ctx: Context, args: argparse.Namespace) -> None:
    ctx.directory.remove_user(args.address)
    _say(f"removed user {args.address} (its mailbox files are kept)")


def cmd_user_passwd(ctx: Context, args: argparse.Namespace) -> None:
    directory = ctx.directory
    if directory.get_user(args.address) is None:
        raise Failure(f"no such user {args.address}")
    directory.set_password(args.address, read_password(args))
    _say(f"changed the password of {args.address}")


def cmd_user_quota(ctx: Context, args: argparse.Namespace) -> None:
    ctx.directory.set_quota(args.address, args.size)
    _say(f"quota of {args.address}: {_quota_text(ctx, args.size, say_default=True)}")


def cmd_user_enable(ctx: Context, args: argparse.Namespace) -> None:
    enabled = args.command == "enable"
    ctx.directory.set_enabled(args.address, enabled)
    _say(f"{'enabled' if enabled else 'disabled'} {args.address}")


def _quota_text(ctx: Context, quota: int | None, say_default: bool = False) -> str:
    """The quota in effect: ``2G``, ``unlimited``; ``1G (the default)`` if ``say_default``."""
    effective = ctx.directory.default_quota if quota is None else quota
    text = format_size(effective) if effective else "unlimited"
    return f"{text} (the default)" if quota is None and say_default else text


def cmd_user_list(ctx: Context, args: argparse.Namespace) -> None:
    for user in ctx.directory.list_users(args.domain):
        state = "enabled" if user.enabled else "disabled"
        _say(f"{user.name}\t{_quota_text(ctx, user.quota)}\t{state}")


def cmd_user_show(ctx: Context, args: argparse.Namespace) -> None:
    directory = ctx.directory
    user = directory.get_user(args.address)
    if user is None:
        raise Failure(f"no such user {args.address}")
    _say(f"user: {user.name}")
    _say(f"state: {'enabled' if user.enabled else 'disabled'}")
    _say(f"quota: {_quota_text(ctx, user.quota, say_default=True)}")
    _say(f"groups: {' '.join(directory.groups_of(user.name)) or '-'}")


def cmd_group_add(ctx: Context, args: argparse.Namespace) -> None:
    _say(f"added group {ctx.directory.add_group(args.name)}")


def cmd_group_del(ctx: Context, args: argparse.Namespace) -> None:
    count = ctx.directory.remove_group(args.name)
    _say(f"removed group {args.name.strip().lower()} ({count} member(s); the users stay)")


def cmd_group_list(ctx: Context, args: argparse.Namespace) -> None:
    for name, count in ctx.directory.list_groups():
        _say(f"{name}\t{count}")


def cmd_group_members(ctx: Context, args: argparse.Namespace) -> None:
    for user in ctx.directory.group_members(args.name):
        _say(user)


def cmd_group_adduser(ctx: Context, args: argparse.Namespace) -> None:
    group, user = ctx.directory.add_to_group(args.name, args.address)
    _say(f"added {user} to group {group}")


def cmd_group_deluser(ctx: Context, args: argparse.Namespace) -> None:
    group, user = ctx.directory.remove_from_group(args.name, args.address)
    _say(f"removed {user} from group {group}")


def cmd_alias_add(ctx: Context, args: argparse.Namespace) -> None:
    source, destination = ctx.directory.add_alias(args.source, args.destination)
    _say(f"added alias {source} -> {destination}")


def cmd_alias_del(ctx: Context, args: argparse.Namespace) -> None:
    count = ctx.directory.remove_alias(args.source, args.destination)
    _say(f"removed {count} alias destination(s) of {args.source}")


def cmd_alias_list(ctx: Context, args: argparse.Namespace) -> None:
    for source, destination in ctx.directory.list_aliases():
        _say(f"{source}\t{destination}")


def cmd_store_reindex(ctx: Context, args: argparse.Namespace) -> None:
    from mailgw.store import MessageStore  # only this command needs the store

    config, directory = ctx.config, ctx.directory
    user = directory.get_user(args.user)
    if user is None:
        raise Failure(f"no such user {args.user}")
    store = MessageStore(
        root=os.path.join(config.server.data_dir, "mail"),
        quota_for=directory.quota_for,
        default_folders=config.store.default_folders,
        hostname=config.server.hostname,
    )
    count = store.reindex(user.name)
    _say(f"reindexed {count} message(s) of {user.name}")


def _tier2_store(ctx: Context) -> tuple[Any, Any]:
    """(MessageStore with tier 2, its blob store); Failure when ``tier2_dir`` is not set."""
    store, blobs = _store(ctx)
    if blobs is None:
        store.close()
        raise Failure(f"{ctx.config_path}: [store] tier2_dir is not set")
    return store, blobs


def _store(ctx: Context) -> tuple[Any, Any]:
    """(MessageStore, its tier-2 blob store or None when ``tier2_dir`` is not set)."""
    from mailgw.store import MessageStore
    from mailgw.store.migration import tier2_from_config

    config = ctx.config
    blobs = tier2_from_config(config.server.data_dir, config.store)
    store = MessageStore(
        root=os.path.join(config.server.data_dir, "mail"),
        quota_for=ctx.directory.quota_for,
        default_folders=config.store.default_folders,
        hostname=config.server.hostname,
        tier2=blobs,
    )
    return store, blobs


def cmd_store_migrate(ctx: Context, args: argparse.Namespace) -> None:
    from mailgw.store.migration import MigrationPolicy, Migrator

    store, _blobs = _tier2_store(ctx)
    user = None
    if args.user:
        found = ctx.directory.get_user(args.user)
        if found is None:
            raise Failure(f"no such user {args.user}")
        user = found.name
    migrator = Migrator(store, MigrationPolicy.from_config(ctx.config.store))
    report = migrator.run(user, dry_run=args.dry_run, limit=args.limit)
    if args.dry_run:
        for c in report.candidates:
            _say(f"{c.user}\t{c.folder}\t{c.uid}\t{c.size}")
        total = sum(c.size for c in report.candidates)
        _say(f"would migrate {len(report.candidates)} message(s), {format_size(total)}")
    else:
        _say(
            f"migrated {report.moved} message(s), {format_size(report.bytes)}"
            f" ({report.skipped} skipped, {report.failed} failed)"
        )
    store.close()
    if report.failed:
        raise Failure(f"{report.failed} message(s) could not be migrated (see above)")


def cmd_store_verify(ctx: Context, args: argparse.Namespace) -> None:
    from mailgw.store import MessageStore
    from mailgw.store.migration import tier2_from_config, verify

    config = ctx.config
    blobs = tier2_from_config(config.server.data_dir, config.store)
    store = MessageStore(
        root=os.path.join(config.server.data_dir, "mail"),
        quota_for=ctx.directory.quota_for,
        default_folders=config.store.default_folders,
        hostname=config.server.hostname,
        tier2=blobs,
    )
    if args.user:
        found = ctx.directory.get_user(args.user)
        if found is None:
            raise Failure(f"no such user {args.user}")
        users = [found.name]
    else:
        users = store.users()
    problems = 0
    try:
        folders = messages = repaired = 0
        counts = [0, 0, 0, 0]
        for user in users:
            check = store.check(user, repair=args.repair)
            folders += check.folders
            messages += check.messages
            repaired += check.repaired
            for _u, name, uid, filename in check.missing:
                _say(f"missing\t{user}\t{name}\t{uid}\t{filename}")
            for _u, name, filename in check.unknown:
                _say(f"unknown\t{user}\t{name}\t{filename}")
            for _u, name, uid, indexed, on_disk in check.size:
                _say(f"size\t{user}\t{name}\t{uid}\t{indexed}\t{on_disk}")
            for _u, name in check.manifests:
                _say(f"manifest\t{user}\t{name}")
            counts[0] += len(check.missing)
            counts[1] += len(check.unknown)
            counts[2] += len(check.size)
            counts[3] += len(check.manifests)
        _say(
            f"checked {messages} message(s) in {folders} folder(s) of {len(users)} user(s):"
            f" {counts[0]} missing file(s), {counts[1]} unknown file(s),"
            f" {counts[2]} size mismatch(es), {counts[3]} tier-2 manifest(s) out of step"
            + (f"; repaired {repaired} folder(s)" if args.repair else "")
        )
        if not args.repair:
            problems += sum(counts)
        if blobs is not None:
            report = verify(store, blobs)
            for digest in report.corrupt:
                _say(f"corrupt\t{digest}")
            for digest, user, uid, folder in report.missing:
                _say(f"missing\t{digest}\t{user}\t{folder}\t{uid}")
            for digest in report.orphans:
                _say(f"orphan\t{digest}")
            _say(
                f"checked {report.checked} blob(s): {len(report.corrupt)} corrupt,"
                f" {len(report.missing)} missing reference(s), {len(report.orphans)} orphan(s)"
            )
            if not report.ok:
                raise Failure("tier 2 has damaged or missing blobs")
    finally:
        store.close()
    if problems:
        raise Failure("the index and the Maildir files disagree (mailgw store verify --repair)")


def cmd_store_gc(ctx: Context, args: argparse.Namespace) -> None:
    from mailgw.store.migration import gc

    store, blobs = _tier2_store(ctx)
    removed = gc(store, blobs, grace=args.grace, dry_run=args.dry_run)
    store.close()
    verb = "would remove" if args.dry_run else "removed"
    _say(f"{verb} {len(removed)} orphan blob(s)")


def cmd_store_pack(ctx: Context, args: argparse.Namespace) -> None:
    store, blobs = _tier2_store(ctx)
    store.close()
    if blobs.pack_max <= 0:
        blobs.close()
        raise Failure(f"{ctx.config_path}: [store] tier2_pack_max is 0 (packing is off)")
    moved, freed = blobs.pack_loose(limit=args.limit)
    removed, reclaimed = blobs.repack(args.min_live)
    blobs.close()
    _say(f"packed {moved} loose blob(s), {format_size(freed)} freed")
    _say(f"rewrote {removed} pack(s), {format_size(reclaimed)} reclaimed")


def cmd_store_stats(ctx: Context, args: argparse.Namespace) -> None:
    from mailgw.store.migration import stats

    store, blobs = _store(ctx)
    tiers = stats(store, blobs)
    store.close()
    if blobs is None:  # tier 1 only: no tier-2 lines, and say why
        tiers = {"tier1": tiers["tier1"]}
        _say(f"# tier 2 is off ({ctx.config_path}: [store] tier2_dir is not set)")
    _say("tier\tmessages\tlogical\tstored\tblobs\tdedup\tlogical/stored")
    for name, t in tiers.items():
        _say(
            f"{name}\t{t.messages}\t{t.logical}\t{t.stored}\t{t.blobs}"
            f"\t{t.dedup_ratio:.2f}\t{t.space_ratio:.2f}"
        )


def cmd_cert_selfsigned(ctx: Context, args: argparse.Namespace) -> None:
    from mailgw.cli.certs import make_selfsigned, write_file

    hostname = args.hostname or ctx.config.server.hostname
    out = args.out or os.path.join(ctx.config.server.data_dir, "tls")
    out = os.path.abspath(out)
    cert_path = os.path.join(out, "mailgw.crt")
    key_path = os.path.join(out, "mailgw.key")
    if not args.force:
        for path in (cert_path, key_path):
            if os.path.lexists(path):
                raise Failure(f"{path} already exists (use --force to replace it)")
    cert_pem, key_pem = make_selfsigned(hostname, days=args.days, key_type=args.key_type)
    os.makedirs(out, mode=0o755, exist_ok=True)
    write_file(key_path, key_pem, 0o600, overwrite=True)
    write_file(cert_path, cert_pem, 0o644, overwrite=True)
    # A config fragment: `>> etc/local.ini` appends it (see the README tour).
    _say(f"# self-signed certificate for {hostname}, valid {args.days} days")
    _say("[tls]")
    _say(f"certificate = {cert_path}")
    _say(f"private_key = {key_path}")


# -- parser ------------------------------------------------------------------------------

Command = Callable[[Context, argparse.Namespace], None]


def _password_options(parser: argparse.ArgumentParser) -> None:
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--password", metavar="P", help="the password (visible to `ps`)")
    group.add_argument(
        "--password-stdin", action="store_true", help="read the password from standard input"
    )


def build_parser() -> argparse.ArgumentParser:
    """The argparse parser of the ``mailgw`` command."""
    parser = _Parser(prog="mailgw", description="mailgw administration.")
    parser.add_argument(
        "--config",
        metavar="PATH",
        help=f"config file (default: $MAILGW_CONFIG, ./{LOCAL_CONFIG}, {SYSTEM_CONFIG})",
    )
    top = parser.add_subparsers(dest="area", metavar="COMMAND", required=True)

    def group(name: str, help_text: str) -> Any:
        p = top.add_parser(name, help=help_text)
        return p.add_subparsers(dest="command", metavar="ACTION", required=True)

    def command(sub: Any, name: str, func: Command, help_text: str) -> argparse.ArgumentParser:
        p: argparse.ArgumentParser = sub.add_parser(name, help=help_text)
        p.set_defaults(func=func)
        return p

    domain = group("domain", "local domains")
    command(domain, "add", cmd_domain_add, "add a domain").add_argument("name", metavar="NAME")
    p = command(domain, "del", cmd_domain_del, "remove a domain")
    p.add_argument("name", metavar="NAME")
    p.add_argument("--force", action="store_true", help="also remove its users and aliases")
    command(domain, "list", cmd_domain_list, "list domains")

    user = group("user", "users (mailboxes)")
    p = command(user, "add", cmd_user_add, "add a user")
    p.add_argument("address", metavar="ADDRESS")
    _password_options(p)
    p.add_argument(
        "--quota",
        type=_quota_arg,
        default=None,
        metavar="SIZE",
        help="e.g. 2G; none: unlimited; default (the default): [store] default_quota",
    )
    command(user, "del", cmd_user_del, "remove a user").add_argument("address", metavar="ADDRESS")
    p = command(user, "passwd", cmd_user_passwd, "change a password")
    p.add_argument("address", metavar="ADDRESS")
    _password_options(p)
    p = command(user, "quota", cmd_user_quota, "set the quota")
    p.add_argument("address", metavar="ADDRESS")
    p.add_argument(
        "size",
        type=_quota_arg,
        metavar="SIZE|none|default",
        help="e.g. 2G; none (or unlimited, 0): unlimited; default: [store] default_quota",
    )
    for name in ("enable", "disable"):
        command(user, name, cmd_user_enable, f"{name} logins").add_argument(
            "address", metavar="ADDRESS"
        )
    command(user, "list", cmd_user_list, "list users: name, quota, state").add_argument(
        "domain", nargs="?", metavar="DOMAIN"
    )
    command(user, "show", cmd_user_show, "a user's state, quota and groups").add_argument(
        "address", metavar="ADDRESS"
    )
    register_cluster_commands(user, command)

    groups = group("group", "groups of users (for the security rules' group match)")
    command(groups, "add", cmd_group_add, "add a group").add_argument("name", metavar="GROUP")
    command(groups, "del", cmd_group_del, "remove a group (its users stay)").add_argument(
        "name", metavar="GROUP"
    )
    command(groups, "list", cmd_group_list, "list groups: name, number of members")
    command(groups, "members", cmd_group_members, "list a group's users").add_argument(
        "name", metavar="GROUP"
    )
    for name, func, help_text in (
        ("adduser", cmd_group_adduser, "add a user to a group"),
        ("deluser", cmd_group_deluser, "take a user out of a group"),
    ):
        p = command(groups, name, func, help_text)
        p.add_argument("name", metavar="GROUP")
        p.add_argument("address", metavar="ADDRESS")

    alias = group("alias", "aliases (source -> destination; @domain is a catch-all)")
    p = command(alias, "add", cmd_alias_add, "add an alias destination")
    p.add_argument("source", metavar="SOURCE")
    p.add_argument("destination", metavar="DEST")
    p = command(alias, "del", cmd_alias_del, "remove an alias (all destinations or one)")
    p.add_argument("source", metavar="SOURCE")
    p.add_argument("destination", nargs="?", metavar="DEST")
    command(alias, "list", cmd_alias_list, "list aliases: source, destination")

    store = group("store", "mailbox store")
    command(store, "reindex", cmd_store_reindex, "rebuild a user's index").add_argument(
        "user", metavar="USER"
    )
    p = command(store, "migrate", cmd_store_migrate, "move messages to tier 2 by policy")
    p.add_argument("user", nargs="?", metavar="USER", help="only this user")
    p.add_argument("--dry-run", action="store_true", help="list the candidates only")
    p.add_argument("--limit", type=int, default=None, metavar="N", help="at most N messages")
    p = command(store, "verify", cmd_store_verify, "check index vs Maildir files and tier-2 blobs")
    p.add_argument("user", nargs="?", metavar="USER", help="only this user (tier 1)")
    p.add_argument("--repair", action="store_true", help="re-index folders whose files disagree")
    p = command(store, "gc", cmd_store_gc, "remove tier-2 blobs no index refers to")
    p.add_argument("--grace", type=float, default=3600.0, metavar="S", help="spare younger (3600)")
    p.add_argument("--dry-run", action="store_true", help="only count them")
    command(store, "stats", cmd_store_stats, "messages and bytes per tier, dedup ratio")
    p = command(store, "pack", cmd_store_pack, "move small loose tier-2 blobs into pack files")
    p.add_argument("--limit", type=int, default=None, metavar="N", help="at most N blobs")
    p.add_argument(
        "--min-live", type=float, default=0.5, metavar="F", help="repack packs below (0.5)"
    )

    cert = group("cert", "TLS certificates")
    p = command(cert, "selfsigned", cmd_cert_selfsigned, "make a self-signed dev certificate")
    p.add_argument("--hostname", metavar="H", help="default: [server] hostname")
    p.add_argument("--out", metavar="DIR", help="default: DATA_DIR/tls")
    p.add_argument("--days", type=int, default=365, metavar="N", help="validity (365)")
    p.add_argument("--key-type", choices=("ec", "rsa"), default="ec", help="ec (P-256) or rsa")
    p.add_argument("--force", action="store_true", help="replace existing files")
    register_relay_commands(group, command)
    register_track_command(top)
    register_config_commands(group, command, top)
    register_token_commands(group, command)
    register_policy_commands(group, command)
    register_dr_commands(group, command)
    register_reputation_commands(top, group, command)
    return parser


def _error(message: str) -> None:
    print(f"mailgw: error: {message}", file=sys.stderr)


def _become_data_owner(ctx: Context, args: argparse.Namespace) -> None:
    """Run by root on a data directory that belongs to another user (the one the server runs
    as), become that user first: what the command creates (SQLite journal, Maildirs, index
    files, spool entries) must stay writable by the server. ``cert`` with ``--out`` writes
    where it is told, as root."""
    if os.geteuid() != 0 or getattr(args, "out", None) is not None:
        return
    if not getattr(args, "as_data_owner", True) or getattr(args, "no_data_dir", False):
        # config check/show, reload, policy check FILE: they read, they create nothing
        return
    from mailgw import privileges

    owner = privileges.data_owner(ctx.config.server.data_dir)
    if owner is not None:
        privileges.become(owner)


def main(argv: list[str] | None = None) -> int:
    """Run the command; returns the exit code (0 ok, 1 failure, 2 usage)."""
    from mailgw.config import ConfigError

    try:
        args = build_parser().parse_args(argv)
    except UsageError as e:
        _error(f"{e} (see mailgw --help)")
        return 2
    except SystemExit as e:  # --help
        return e.code if isinstance(e.code, int) else 0
    ctx = Context(args.config)
    try:
        _become_data_owner(ctx, args)
        args.func(ctx, args)
    except (Failure, ConfigError, ValueError) as e:
        _error(str(e))
        return 1
    except OSError as e:
        _error(f"{e.filename + ': ' if e.filename else ''}{e.strerror or e}")
        return 1
    except sqlite3.Error as e:
        _error(f"directory database: {e}")
        return 1
    except (KeyboardInterrupt, EOFError):
        _error("interrupted")
        return 1
    except Exception as e:
        _error(f"unexpected {type(e).__name__}: {e}")
        return 1
    finally:
        ctx.close()
    return 0
