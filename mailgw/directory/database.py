"""The embedded directory: domains, users and aliases in SQLite (WAL), resolving recipients."""

from __future__ import annotations

import os
import sqlite3
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

from twisted.cred.error import UnauthorizedLogin
from twisted.internet import defer
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger
from zope.interface import implementer

from mailgw.directory.names import check_local_part, group_name
from mailgw.directory.passwords import PasswordHashing, check_new_password
from mailgw.interfaces import IDirectory
from mailgw.journal.sequencer import Sequencer
from mailgw.journal.writer import TABLE as JOURNAL_TABLE
from mailgw.journal.writer import DBJournal
from mailgw.model import change
from mailgw.model.address import Address, AddressError, normalise_domain, quote_local
from mailgw.model.user import User

log = Logger()

MAX_DEPTH = 10
SCHEMA_VERSION = 2
"""1: domains, users, aliases; 2: groups and their members (added by ``CREATE ... IF NOT
EXISTS`` on the first open of a version-1 database)."""
CACHE_ENTRIES = 10_000
"""Answers kept by a ``Directory``'s lookup cache before it is emptied (unknown recipients
of a dictionary attack are cached too: the bound keeps them from growing it without end)."""

_SCHEMA = """
CREATE TABLE IF NOT EXISTS domains (
    name TEXT PRIMARY KEY
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS users (
    name TEXT PRIMARY KEY,
    domain TEXT NOT NULL REFERENCES domains(name),
    password TEXT NOT NULL,
    quota INTEGER,
    enabled INTEGER NOT NULL DEFAULT 1
);
CREATE INDEX IF NOT EXISTS users_domain ON users(domain);
CREATE TABLE IF NOT EXISTS aliases (
    id INTEGER PRIMARY KEY,
    source TEXT NOT NULL,
    destination TEXT NOT NULL,
    domain TEXT NOT NULL REFERENCES domains(name),
    UNIQUE (source, destination)
);
CREATE INDEX IF NOT EXISTS aliases_domain ON aliases(domain);
CREATE TABLE IF NOT EXISTS groups (
    name TEXT PRIMARY KEY
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS group_members (
    user TEXT NOT NULL,
    grp TEXT NOT NULL REFERENCES groups(name) ON DELETE CASCADE,
    PRIMARY KEY (user, grp)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS group_members_grp ON group_members(grp);
"""
# group_members.user has no foreign key: the replica replaces a domain's user rows on every
# directory entry (``mailgw.replication.apply``); memberships go with ``remove_user`` and
# ``remove_domain`` here.


def _split(key: str) -> tuple[str, str]:
    local, _, domain = key.rpartition("@")
    return local, domain


@implementer(IDirectory)
class Directory:
    """Domains, users, aliases and groups stored in ``path`` (``data_dir/directory.sqlite``).

    One SQLite connection in autocommit mode, WAL journal. Safe to call from several threads
    (a lock serialises use of the connection).

    The lookups of the mail path (``is_local_domain``, ``resolve``, ``get_user`` and so
    ``quota_for``) are answered from a cache that is never stale: each lookup first reads
    SQLite's ``PRAGMA data_version``, which changes when another connection (the ``mailgw``
    command, another process) has committed a change, and empties the cache when it did;
    this object's own changes and ``reconfigure`` empty it too. A change is therefore seen
    by the next lookup, as without the cache; a hit costs one ``PRAGMA`` instead of up to
    five queries. At most ``CACHE_ENTRIES`` answers are kept.
    """

    def __init__(
        self,
        path: str,
        recipient_delimiter: str = "+",
        argon2_time_cost: int = 2,
        argon2_memory_kib: int = 19456,
        default_quota: int | None = None,
        reactor: Any = None,
        postmaster: str = "",
    ) -> None:
        if default_quota is not None and default_quota < 0:
            raise ValueError("the default quota must not be negative")
        self.path = path
        self.postmaster = _destination_key(self._address(postmaster)) if postmaster else ""
        """``[server] postmaster``: where ``postmaster@`` a local domain goes when the
        domain has no user, alias or catch-all for it; empty: the first user created."""
        self.recipient_delimiter = recipient_delimiter
        self.default_quota = default_quota or None
        self._hashing = PasswordHashing(argon2_time_cost, argon2_memory_kib)
        self._reactor = reactor
        self._lock = threading.RLock()
        # Lookup cache (see the class docstring): (kind, key) -> answer, valid while the
        # database's data_version is ``_cache_version``.
        self._cache: dict[tuple[str, str], Any] = {}
        self._cache_version = -1
        parent = os.path.dirname(os.path.abspath(path))
        os.makedirs(parent, mode=0o750, exist_ok=True)
        if not os.path.exists(path):
            # Password hashes live here: create the file private before SQLite opens it.
            os.close(os.open(path, os.O_CREAT | os.O_WRONLY, 0o600))
        self._db = sqlite3.connect(path, isolation_level=None, check_same_thread=False, timeout=10)
        try:
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA foreign_keys=ON")
            self._db.execute("PRAGMA synchronous=NORMAL")
            version = self._db.execute("PRAGMA user_version").fetchone()[0]
            if version > SCHEMA_VERSION:
                raise ValueError(
                    f"{path}: directory schema version {version} is newer than this program"
                )
            if version < SCHEMA_VERSION:
                self._db.executescript(
                    f"BEGIN IMMEDIATE;{_SCHEMA}PRAGMA user_version={SCHEMA_VERSION};COMMIT;"
                )
            self._db.execute(JOURNAL_TABLE)
        except BaseException:
            self._db.close()
            raise
        # Each change is journaled in its own transaction (``mailgw.journal``).
        self._journal = DBJournal(
            Sequencer.for_dir(os.path.join(parent, "journal")), os.path.abspath(path)
        )
        self._closed = False

    # -- plumbing ------------------------------------------------------------------------

    def reconfigure(self, config: Any) -> None:
        """A reloaded config (``mailgw.config.reload``): ``[directory]`` recipient delimiter
        and hashing cost of new hashes, ``[store] default_quota``, ``[server] postmaster``."""
        postmaster = config.server.postmaster
        self.postmaster = _destination_key(self._address(postmaster)) if postmaster else ""
        self.recipient_delimiter = config.directory.recipient_delimiter
        self.default_quota = config.store.default_quota or None
        self._hashing = PasswordHashing(
            config.directory.argon2_time_cost, config.directory.argon2_memory_kib
        )
        with self._lock:
            self._cache.clear()

    def close(self) -> None:
        """Close the database connection and let go of the journal's sequencer."""
        with self._lock:
            self._db.close()
            if not self._closed:
                self._closed = True
                Sequencer.release(self._journal.sequencer)

    def __enter__(self) -> Directory:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @contextmanager
    def _transaction(self) -> Iterator[sqlite3.Connection]:
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                yield self._db
                self._journal.flush(self._db)
                self._db.execute("COMMIT")
            except BaseException:
                self._cache.clear()
                if self._db.in_transaction:
                    self._db.execute("ROLLBACK")
                self._journal.end(False)
                raise
            # This connection's own commits do not change its data_version.
            self._cache.clear()
            self._journal.end(True)

    def _record(self, kind: str, name: str, **payload: Any) -> None:
        """Journal a change of the open transaction (``mailgw.model.change``)."""
        self._journal.record(kind, name, "", payload)

    def _query(self, sql: str, args: tuple[Any, ...] = ()) -> list[Any]:
        with self._lock:
            return self._db.execute(sql, args).fetchall()

    def _cached(self, kind: str, key: str, compute: Callable[[], Any]) -> Any:
        """The cached answer for (``kind``, ``key``), computed by ``compute`` when missing;
        the cache is emptied first when another connection committed since it was filled.
        The version is read before ``compute`` queries, so an answer is never older than
        the version it is filed under."""
        with self._lock:
            version = self._db.execute("PRAGMA data_version").fetchone()[0]
            if version != self._cache_version:
                self._cache.clear()
                self._cache_version = version
            try:
                return self._cache[kind, key]
            except KeyError:
                pass
            answer = compute()
            if len(self._cache) >= CACHE_ENTRIES:
                self._cache.clear()
            self._cache[kind, key] = answer
            return answer

    # -- name parsing --------------------------------------------------------------------

    @staticmethod
    def _domain(name: str) -> str:
        name = name.strip()
        if name.startswith("[") or not name:
            raise ValueError(f"invalid domain {name!r}")
        try:
            return normalise_domain(name)
        except AddressError as e:
            raise ValueError(f"invalid domain {name!r}: {e}") from None

    @staticmethod
    def _address(text: str) -> Address:
        try:
            address = Address.parse(text)
        except AddressError as e:
            raise ValueError(f"invalid address {text.strip()!r}: {e}") from None
        if address.domain.startswith("["):
            raise ValueError(f"invalid address {text.strip()!r}: address literals are not allowed")
        return address

    def _local_name(self, text: str) -> str:
        """A user or alias-source address: a plain local part in one of our domains."""
        address = self._address(text)
        if quote_local(address.local) != address.local:
            raise ValueError(
                f"invalid address {text.strip()!r}: quoted local parts are not allowed"
            )
        try:
            check_local_part(address.local)
        except ValueError as e:
            raise ValueError(f"invalid address {text.strip()!r}: {e}") from None
        if not self.is_local_domain(address.domain):
            raise ValueError(f"{address.domain} is not a local domain (add it first)")
        return address.key

    @staticmethod
    def _canonical(name: str) -> str:
        """Best-effort canonical ``local@domain`` for lookups; never raises."""
        if name.isascii() and '"' not in name:
            return name.strip().lower()
        try:
            return Address.parse(name).key
        except AddressError:
            return name.strip().lower()

    # -- domains -------------------------------------------------------------------------

    def add_domain(self, name: str) -> str:
        """Make ``name`` a local domain; returns its normalised form. ValueError if present."""
        domain = self._domain(name)
        try:
            with self._transaction() as db:
                db.execute("INSERT INTO domains(name) VALUES (?)", (domain,))
                self._record(change.DOMAIN_ADDED, "", domain=domain)
        except sqlite3.IntegrityError:
            raise ValueError(f"domain {domain} already exists") from None
        return domain

    def remove_domain(self, name: str, force: bool = False) -> None:
        """Remove a domain; refused while it has users or aliases unless ``force``
        (which removes them too; mailbox files are left on disk)."""
        domain = self._domain(name)
        with self._transaction() as db:
            if not db.execute("SELECT 1 FROM domains WHERE name=?", (domain,)).fetchone():
                raise ValueError(f"no such domain {domain}")
            users = db.execute("SELECT count(*) FROM users WHERE domain=?", (domain,)).fetchone()[0]
            aliases = db.execute(
                "SELECT count(*) FROM aliases WHERE domain=?", (domain,)
            ).fetchone()[0]
            if (users or aliases) and not force:
                raise ValueError(
                    f"domain {domain} still has {users} user(s) and {aliases} alias(es); "
                    "remove them first or force"
                )
            db.execute("DELETE FROM aliases WHERE domain=?", (domain,))
            db.execute(
                "DELETE FROM group_members WHERE user IN (SELECT name FROM users WHERE domain=?)",
                (domain,),
            )
            db.execute("DELETE FROM users WHERE domain=?", (domain,))
            db.execute("DELETE FROM domains WHERE name=?", (domain,))
            self._record(change.DOMAIN_REMOVED, "", domain=domain, users=users, aliases=aliases)

    def list_domains(self) -> list[str]:
        """All local domains, sorted."""
        return [row[0] for row in self._query("SELECT name FROM domains ORDER BY name")]

    def is_local_domain(self, domain: str) -> bool:
        """True when ``domain`` (lower-case A-labels) is one of ours."""
        name = domain.lower()
        return bool(
            self._cached(
                "domain",
                name,
                lambda: bool(self._query("SELECT 1 FROM domains WHERE name=?", (name,))),
            )
        )

    # -- users ---------------------------------------------------------------------------

    def add_user(self, address: str, password: str, quota: int | None = None) -> User:
        """Create a user in an existing domain. ValueError on bad input or duplicates."""
        name = self._local_name(address)
        check_new_password(password)
        _check_quota(quota)
        hashed = self._hashing.hash(password)
        try:
            with self._transaction() as db:
                db.execute(
                    "INSERT INTO users(name, domain, password, quota, enabled) VALUES (?,?,?,?,1)",
                    (name, _split(name)[1], hashed, quota),
                )
                self._record(change.USER_CREATED, name, quota=quota)
        except sqlite3.IntegrityError:
            raise ValueError(f"user {name} already exists") from None
        return User(name, quota, True)

    def remove_user(self, address: str) -> None:
        """Delete a user (aliases pointing to it stay and resolve to nothing; it leaves its
        groups)."""
        name = self._existing_user(address)
        with self._transaction() as db:
            db.execute("DELETE FROM group_members WHERE user=?", (name,))
            db.execute("DELETE FROM users WHERE name=?", (name,))
            self._record(change.USER_DELETED, name)

    def set_password(self, address: str, password: str) -> None:
        """Replace the user's password."""
        name = self._existing_user(address)
        check_new_password(password)
        hashed = self._hashing.hash(password)
        with self._transaction() as db:
            db.execute("UPDATE users SET password=? WHERE name=?", (hashed, name))
            self._record(change.USER_CHANGED, name, password=True)

    def set_quota(self, address: str, quota: int | None) -> None:
        """Set the quota in bytes (None: the default applies; 0: unlimited)."""
        name = self._existing_user(address)
        _check_quota(quota)
        with self._transaction() as db:
            db.execute("UPDATE users SET quota=? WHERE name=?", (quota, name))
            self._record(change.QUOTA_CHANGED, name, quota=quota)

    def set_enabled(self, address: str, enabled: bool) -> None:
        """Enable or disable a user (a disabled user cannot log in; mail is still accepted)."""
        name = self._existing_user(address)
        with self._transaction() as db:
            db.execute("UPDATE users SET enabled=? WHERE name=?", (int(enabled), name))
            self._record(change.USER_CHANGED, name, enabled=enabled)

    def list_users(self, domain: str | None = None) -> list[User]:
        """Users of ``domain`` (or all), sorted by name. ValueError for an unknown domain."""
        if domain is None:
            rows = self._query("SELECT name, quota, enabled FROM users ORDER BY name")
        else:
            d = self._domain(domain)
            if not self.is_local_domain(d):
                raise ValueError(f"no such domain {d}")
            rows = self._query(
                "SELECT name, quota, enabled FROM users WHERE domain=? ORDER BY name", (d,)
            )
        return [User(n, q, bool(e)) for n, q, e in rows]

    def get_user(self, name: str) -> User | None:
        """The ``User`` for ``name`` (canonical ``local@domain``) or None."""
        key = self._canonical(name)

        def lookup() -> User | None:
            rows = self._query("SELECT name, quota, enabled FROM users WHERE name=?", (key,))
            return User(rows[0][0], rows[0][1], bool(rows[0][2])) if rows else None

        user: User | None = self._cached("user", key, lookup)
        return user

    def quota_for(self, name: str) -> int | None:
        """Storage quota in bytes for the user (None: unlimited)."""
        user = self.get_user(name)
        quota = user.quota if user is not None and user.quota is not None else self.default_quota
        return quota or None

    def _existing_user(self, address: str) -> str:
        name = self._address(address).key
        if not self._query("SELECT 1 FROM users WHERE name=?", (name,)):
            raise ValueError(f"no such user {name}")
        return name

    # -- groups --------------------------------------------------------------------------

    def add_group(self, name: str) -> str:
        """Create an empty group; returns its name. ValueError if it exists."""
        group = group_name(name)
        try:
            with self._transaction() as db:
                db.execute("INSERT INTO groups(name) VALUES (?)", (group,))
                self._record(change.GROUP_ADDED, "", group=group)
        except sqlite3.IntegrityError:
            raise ValueError(f"group {group} already exists") from None
        return group

    def remove_group(self, name: str) -> int:
        """Delete a group and its memberships (the users stay); returns how many members it
        had. ValueError if there is no such group."""
        group = group_name(name)
        with self._transaction() as db:
            if not db.execute("SELECT 1 FROM groups WHERE name=?", (group,)).fetchone():
                raise ValueError(f"no such group {group}")
            count = db.execute(
                "SELECT count(*) FROM group_members WHERE grp=?", (group,)
            ).fetchone()[0]
            db.execute("DELETE FROM groups WHERE name=?", (group,))  # members: ON DELETE CASCADE
            self._record(change.GROUP_REMOVED, "", group=group, members=count)
        return int(count)

    def list_groups(self) -> list[tuple[str, int]]:
        """Every group with its number of members, sorted by name."""
        rows = self._query(
            "SELECT g.name, count(m.user) FROM groups g LEFT JOIN group_members m"
            " ON m.grp = g.name GROUP BY g.name ORDER BY g.name"
        )
        return [(str(n), int(c)) for n, c in rows]

    def group_members(self, name: str) -> list[str]:
        """The users of group ``name``, sorted. ValueError if there is no such group."""
        group = self._existing_group(name)
        rows = self._query("SELECT user FROM group_members WHERE grp=? ORDER BY user", (group,))
        return [str(r[0]) for r in rows]

    def add_to_group(self, name: str, address: str) -> tuple[str, str]:
        """Make user ``address`` a member of group ``name``; returns (group, user).
        ValueError when either does not exist or the user is a member already."""
        group = self._existing_group(name)
        user = self._existing_user(address)
        try:
            with self._transaction() as db:
                db.execute("INSERT INTO group_members(user, grp) VALUES (?, ?)", (user, group))
                self._record(change.GROUP_MEMBER_ADDED, "", group=group, member=user)
        except sqlite3.IntegrityError:
            raise ValueError(f"{user} is already in group {group}") from None
        return group, user

    def remove_from_group(self, name: str, address: str) -> tuple[str, str]:
        """Take user ``address`` out of group ``name``; returns (group, user). ValueError
        when the user is not a member (the user need not exist any more)."""
        group = self._existing_group(name)
        user = self._address(address).key
        with self._transaction() as db:
            gone = db.execute(
                "DELETE FROM group_members WHERE user=? AND grp=?", (user, group)
            ).rowcount
            if not gone:
                raise ValueError(f"{user} is not in group {group}")
            self._record(change.GROUP_MEMBER_REMOVED, "", group=group, member=user)
        return group, user

    def groups_of(self, name: str) -> list[str]:
        """The groups user ``name`` is in, sorted (none for an unknown user)."""
        rows = self._query(
            "SELECT grp FROM group_members WHERE user=? ORDER BY grp", (self._canonical(name),)
        )
        return [str(r[0]) for r in rows]

    def in_group(self, name: str, groups: tuple[str, ...]) -> bool:
        """True when user ``name`` (canonical ``local@domain``) is in one of ``groups``
        (lower-case names). One lookup on the membership table's primary key, no cache: a
        change made by ``mailgw group adduser`` in another process counts at once."""
        if not groups:
            return False
        marks = ",".join("?" * len(groups))
        return bool(
            self._query(
                f"SELECT 1 FROM group_members WHERE user=? AND grp IN ({marks}) LIMIT 1",
                (self._canonical(name), *groups),
            )
        )

    def _existing_group(self, name: str) -> str:
        group = group_name(name)
        if not self._query("SELECT 1 FROM groups WHERE name=?", (group,)):
            raise ValueError(f"no such group {group}")
        return group

    # -- passwords -----------------------------------------------------------------------

    def _credentials(self, name: str) -> tuple[User | None, str | None]:
        rows = self._query(
            "SELECT name, quota, enabled, password FROM users WHERE name=?",
            (self._canonical(name),),
        )
        if not rows:
            return None, None
        n, q, e, hashed = rows[0]
        return User(n, q, bool(e)), hashed

    def _finish_check(
        self, result: tuple[bool, str | None], user: User | None, stored: str | None
    ) -> User:
        matches, new_hash = result
        if not matches or user is None or not user.enabled:
            raise UnauthorizedLogin("invalid user name or password")
        if new_hash is not None:
            # Only replace the hash we verified: a concurrent `user passwd` wins.
            with self._transaction() as db:
                if db.execute(
                    "UPDATE users SET password=? WHERE name=? AND password=?",
                    (new_hash, user.name, stored),
                ).rowcount:
                    self._record(change.USER_CHANGED, user.name, password=True, rehash=True)
        return user

    def authenticate(self, name: str, password: str | bytes) -> User:
        """Blocking password check: the ``User`` or UnauthorizedLogin (unknown user, disabled
        user and wrong password all cost one argon2 verification). Rehashes the stored
        password when the argon2 parameters changed."""
        user, stored = self._credentials(name)
        return self._finish_check(self._hashing.verify(stored, password), user, stored)

    def check_password(self, name: str, password: str | bytes) -> defer.Deferred[User]:
        """Deferred firing with the ``User`` or failing with UnauthorizedLogin; argon2 runs
        in the reactor's thread pool, the database is used in the calling thread."""
        try:
            user, stored = self._credentials(name)
        except Exception:
            return defer.fail()
        reactor = self._reactor
        if reactor is None:
            from twisted.internet import reactor as global_reactor

            reactor = global_reactor
        d = deferToThreadPool(
            reactor, reactor.getThreadPool(), self._hashing.verify, stored, password
        )
        return d.addCallback(self._finish_check, user, stored)

    # -- aliases -------------------------------------------------------------------------

    def _alias_source(self, text: str) -> str:
        text = text.strip()
        if text.startswith("@"):
            domain = self._domain(text[1:])
            if not self.is_local_domain(domain):
                raise ValueError(f"{domain} is not a local domain (add it first)")
            return "@" + domain
        return self._local_name(text)

    def add_alias(self, source: str, destination: str) -> tuple[str, str]:
        """Add ``source`` (``local@domain`` or catch-all ``@domain``, in a local domain) ->
        ``destination`` (a local user or alias, or an external address). A destination in a
        local domain must resolve to someone. Returns the normalised pair."""
        src = self._alias_source(source)
        if destination.strip().startswith("@"):
            raise ValueError("an alias destination must be a full address, not a catch-all")
        dest_address = self._address(destination)
        dest = _destination_key(dest_address)
        if dest == src:
            if not self._is_user(src):
                raise ValueError(f"{src} can point to itself only when it is also a user")
        elif self.is_local_domain(dest_address.domain) and not self.resolve(dest):
            raise ValueError(f"{dest} is not a local user or alias")
        try:
            with self._transaction() as db:
                db.execute(
                    "INSERT INTO aliases(source, destination, domain) VALUES (?,?,?)",
                    (src, dest, _split(src)[1]),
                )
                self._record(change.ALIAS_ADDED, src, destination=dest)
        except sqlite3.IntegrityError:
            raise ValueError(f"alias {src} -> {dest} already exists") from None
        return src, dest

    def remove_alias(self, source: str, destination: str | None = None) -> int:
        """Remove one destination of ``source`` (or all of them); returns how many went.
        ValueError when nothing matched."""
        text = source.strip()
        src = "@" + self._domain(text[1:]) if text.startswith("@") else self._address(text).key
        with self._transaction() as db:
            if destination is None:
                count = db.execute("DELETE FROM aliases WHERE source=?", (src,)).rowcount
                dest = None
            else:
                dest = _destination_key(self._address(destination))
                count = db.execute(
                    "DELETE FROM aliases WHERE source=? AND destination=?", (src, dest)
                ).rowcount
            if count:
                self._record(change.ALIAS_REMOVED, src, destination=dest, count=count)
        if not count:
            what = src if destination is None else f"{src} -> {destination.strip()}"
            raise ValueError(f"no such alias {what}")
        return count

    def list_aliases(self) -> list[tuple[str, str]]:
        """(source, destination) pairs, by source then in the order they were added."""
        return [
            (s, d)
            for s, d in self._query("SELECT source, destination FROM aliases ORDER BY source, id")
        ]

    # -- resolution ----------------------------------------------------------------------

    def resolve(self, address: str) -> list[str]:
        """Expand a recipient to canonical user names (and external alias targets).

        Order for an address in a local domain: its aliases (they take precedence, list the
        user itself among the destinations to keep a copy), the user, the same two for the
        address without its ``+detail``, then the domain's catch-all ``@domain``; for
        ``postmaster`` (RFC 5321 4.5.1: every domain has one) then ``postmaster_target``. An
        address met again on its own expansion path delivers to the user of that name, if
        any, instead of looping; branches deeper than 10 levels are dropped. A destination
        in a local domain that matches nothing is dropped.
        """
        return list(self._cached("resolve", address, lambda: tuple(self._resolve(address))))

    def _resolve(self, address: str) -> list[str]:
        try:
            key = Address.parse(address).key
        except AddressError:
            return []
        if not self.is_local_domain(_split(key)[1]):
            return []
        out: list[str] = []
        with self._lock:
            self._expand(key, 0, (), out)
        return out

    def _expand(self, key: str, depth: int, path: tuple[str, ...], out: list[str]) -> None:
        local, domain = _split(key)
        if not self._query("SELECT 1 FROM domains WHERE name=?", (domain,)):
            if key not in out:
                out.append(key)  # an external target, returned as it is
            return
        if key in path:
            if self._is_user(key) and key not in out:
                out.append(key)
            elif not self._is_user(key):
                log.warn("alias loop through {address} dropped", address=key)
            return
        if depth > MAX_DEPTH:
            log.warn(
                "alias expansion of {address} deeper than {n} dropped", address=path[0], n=MAX_DEPTH
            )
            return
        candidates = [key]
        base = self._strip_delimiter(local)
        if base:
            candidates.append(f"{base}@{domain}")
        for candidate in candidates:
            if self._expand_exact(candidate, depth, path + (key,), out):
                return
        catch_all = self._destinations("@" + domain)
        for dest in catch_all:
            self._expand(dest, depth + 1, path + (key,), out)
        if not catch_all and (local == "postmaster" or base == "postmaster"):
            target = self.postmaster_target()
            if target is not None:
                self._expand(target, depth + 1, path + (key,), out)

    def postmaster_target(self) -> str | None:
        """Where a ``postmaster@`` with no user, alias or catch-all of its own goes: the
        configured ``[server] postmaster``, else the first user created on this node (the
        administrator's account, as a Debian install aliases postmaster to root); None on a
        node with no user yet."""
        if self.postmaster:
            return self.postmaster
        rows = self._query("SELECT name FROM users ORDER BY rowid LIMIT 1")
        return str(rows[0][0]) if rows else None

    def _expand_exact(self, key: str, depth: int, path: tuple[str, ...], out: list[str]) -> bool:
        destinations = self._destinations(key)
        if destinations:
            for dest in destinations:
                if dest == key and self._is_user(key):
                    if key not in out:
                        out.append(key)
                    continue
                self._expand(dest, depth + 1, path, out)
            return True
        if self._is_user(key):
            if key not in out:
                out.append(key)
            return True
        return False

    def _strip_delimiter(self, local: str) -> str:
        if not self.recipient_delimiter:
            return ""
        cut = min((i for i, c in enumerate(local) if c in self.recipient_delimiter), default=-1)
        return local[:cut] if cut > 0 else ""

    def _destinations(self, source: str) -> list[str]:
        rows = self._query("SELECT destination FROM aliases WHERE source=? ORDER BY id", (source,))
        return [row[0] for row in rows]

    def _is_user(self, key: str) -> bool:
        return bool(self._query("SELECT 1 FROM users WHERE name=?", (key,)))


def _destination_key(address: Address) -> str:
    """Lower-case ``local@domain``, the local part quoted when it is not a dot-string."""
    return f"{quote_local(address.local.lower())}@{address.domain}"


def _check_quota(quota: int | None) -> None:
    if quota is not None and (not isinstance(quota, int) or isinstance(quota, bool) or quota < 0):
        raise ValueError(f"invalid quota {quota!r}: expected bytes >= 0 or None")
