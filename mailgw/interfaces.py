"""zope.interface contracts between mailgw's layers; each method says what, args, result, errors.

Synchronous methods do local I/O (SQLite, files) and return plain values; methods that may
wait on another process or thread return a Deferred, as stated per method.
"""

from __future__ import annotations

import builtins
import datetime
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import IO, Any, BinaryIO

from twisted.internet.defer import Deferred
from zope.interface import Attribute, Interface

from mailgw.model.blob import BlobRef
from mailgw.model.envelope import Envelope
from mailgw.model.message import MailboxStatus, MessageInfo
from mailgw.model.queue import QueuedMessage
from mailgw.model.user import User

# ---------------------------------------------------------------------------------------------
# Directory: domains, users, aliases, authentication.


class IDirectory(Interface):
    """Domains, users and aliases (embedded: SQLite in ``data_dir/directory.sqlite``)."""

    def is_local_domain(domain: str) -> bool:
        """True when ``domain`` (lower-case A-labels) is one of ours."""

    def list_domains() -> builtins.list[str]:
        """The local domains, sorted."""

    def resolve(address: str) -> builtins.list[str]:
        """Expand a recipient ``local@domain`` to the list of local user names it delivers to.

        Follows aliases (recursively, loop-safe, bounded depth), the recipient delimiter
        (``alice+tag@d`` -> ``alice@d``) and a catch-all alias ``@domain`` if one exists.
        An alias may point to an external address: such targets are returned as they are
        (the caller tells local users from external ones with ``get_user``).
        Result: canonical user names (``alice@example.test``, lower-case), deduplicated, in
        order. Empty list: no such recipient. Errors: none for unknown input.
        """

    def get_user(name: str) -> User | None:
        """Return the ``mailgw.model.User`` for canonical ``name`` or None."""

    def check_password(name: str, password: str) -> Deferred[User]:
        """Deferred firing with the ``User`` when the password matches, else failing with
        ``twisted.cred.error.UnauthorizedLogin``. Hashing runs in a thread; an unknown user
        costs the same time as a wrong password."""

    def quota_for(name: str) -> int | None:
        """Storage quota in bytes for the user (None: unlimited)."""

    def in_group(name: str, groups: tuple[str, ...]) -> bool:
        """True when user ``name`` (canonical) is a member of one of ``groups`` (lower-case
        group names; unknown ones are simply not matched). Asked at check time by the rules'
        ``group`` match: cheap (one indexed lookup), and a membership change counts for the
        next call."""


class IAuthPenalty(Interface):
    """Failed-login bookkeeping shared by every role that checks passwords (SMTP AUTH, IMAP in
    any worker, POP3): counts failures per account and per client address within a window,
    answers how long to delay a failure's answer, and locks an account or an address out for
    a while after too many failures (Dovecot's auth penalty plus a fail2ban-style lockout).

    Embedded: ``mailgw.directory.penalty.MemoryAuthPenalty``, in the main process (IMAP
    workers reach it through their control pipe, ``mailgw.imap.worker_process.RemoteAuthPenalty``).
    A cluster implements the same three calls on the gateway state (``IGatewayState``, Redis:
    counters with a TTL of the window, a lock key with a TTL of the lockout), so that every
    node sees the same counts. ``user`` is the login name as given, lower-case (it need not
    exist: guesses at unknown accounts are counted the same), ``""`` when there is none;
    ``ip`` is the client address text (after PROXY), ``""`` when unknown.
    """

    def locked(user: str, ip: str) -> Deferred[bool]:
        """Deferred firing with True while the account ``user`` or the address ``ip`` is
        locked out: the caller then refuses the login exactly as a wrong password (same
        answer, same delay from ``failed``), without checking the password, so a lockout
        reveals nothing about the account and a correct password fails during it."""

    def failed(user: str, ip: str) -> Deferred[float]:
        """Count one failed login of ``user`` from ``ip``; this may start a lockout of the
        account or the address (logged with both). Deferred firing with the delay in seconds
        (float) to wait before answering the failure: growing with the failures counted in the
        window (doubling from the base delay up to a maximum)."""

    def succeeded(user: str, ip: str) -> Deferred[None]:
        """A successful login: forget the failures counted for the account ``user`` (the
        address keeps its count until the window forgets it). Deferred firing with None."""


# ---------------------------------------------------------------------------------------------
# Gateway state: what the gateways of a cluster share (mailgw.state).


class IMailboxNodes(Interface):
    """Where each user's mailbox lives: the name of its backend node (``[cluster]
    mailbox_nodes`` names the nodes' addresses). Implemented by the gateway state
    (``mailgw.state``: shared through Redis, or in SQLite on one node). Readers (gateway to
    backend forwarding, nginx ``auth_http``) call ``get``; ``mailgw user move`` calls ``set``.
    ``user`` is the full address, compared lower-case."""

    def get(user: str) -> Deferred[str | None]:
        """Deferred firing with the node name of ``user``'s mailbox, None when not recorded
        (then the reader's default node applies)."""

    def set(user: str, node: str | None) -> Deferred[None]:
        """Record ``user``'s node (None: forget it, back to the default)."""


class IGatewayState(Interface):
    """The gateway database: small shared values every gateway node reads and writes (rate
    counters, auth failures and lockouts, reputation counters, mailbox nodes, the unified
    configuration). Every call returns a Deferred; keys and hash names are text, values bytes.

    Implementations (``mailgw.state``): ``EmbeddedState`` (memory, plus SQLite under
    ``data_dir`` for what must survive a restart: mailbox nodes, config versions) and
    ``RedisState`` (txredisapi, shared by the gateways); ``FailoverState`` puts an embedded
    one behind a Redis one: a Redis call that fails or takes longer than ``[state] timeout``
    is answered locally until Redis answers again. The contract both implementations pass:
    ``tests/state/test_contract.py``.
    """

    nodes = Attribute("The ``IMailboxNodes`` of this state (user -> backend node).")

    def hit(key: str, window: float) -> Deferred[int]:
        """Count one event for ``key`` now; fires with the number of its events in the last
        ``window`` seconds, this one included (a sliding window, atomic across nodes)."""

    def incr(key: str, amount: int = 1, ttl: float = 0) -> Deferred[int]:
        """Add ``amount`` to the counter ``key`` (0 when missing); fires with the new value.
        ``ttl`` > 0: the counter expires ``ttl`` seconds after it was created."""

    def get(key: str) -> Deferred[bytes | None]:
        """The value set at ``key`` (None when missing or expired)."""

    def set(key: str, value: bytes, ttl: float = 0) -> Deferred[None]:
        """Set ``key`` to ``value``; ``ttl`` > 0: it expires after ``ttl`` seconds."""

    def delete(key: str) -> Deferred[None]:
        """Forget ``key`` (a value, a counter or a ``hit`` window)."""

    def hincr(name: str, field: str, amount: int = 1) -> Deferred[int]:
        """Add ``amount`` to ``field`` of the hash ``name``; fires with the new value."""

    def hset(name: str, field: str, value: bytes) -> Deferred[None]:
        """Set ``field`` of the hash ``name``."""

    def hgetall(name: str) -> Deferred[dict[str, bytes]]:
        """Every field of the hash ``name`` (empty when missing)."""

    def hdel(name: str, field: str) -> Deferred[None]:
        """Remove ``field`` from the hash ``name``."""

    def config_publish(blob: bytes) -> Deferred[int]:
        """Store ``blob`` as the next version of the unified config, make it current, tell
        every node; fires with its version number (1, 2, ...)."""

    def config_current() -> Deferred[tuple[int, bytes] | None]:
        """The current version and its blob (None: nothing published yet)."""

    def config_rollback() -> Deferred[int]:
        """Make the version before the current one current again (and tell every node);
        fires with it. ``LookupError`` when there is none."""

    def config_report(node: str, info: bytes) -> Deferred[None]:
        """Record what node ``node`` applied (JSON: version, time, error)."""

    def config_nodes() -> Deferred[dict[str, bytes]]:
        """Every node's last report."""


# ---------------------------------------------------------------------------------------------
# Spool: durable queue of accepted messages.


class IIncomingMessage(Interface):
    """A message being received into the spool; invisible to readers until ``commit``."""

    queue_id = Attribute("The queue ID assigned at ``ISpool.begin`` (str).")
    size = Attribute("Bytes written so far (int).")
    message_id = Attribute(
        "The Message-ID header field of what was written, unfolded (str; '' when there is none"
        " in the header section); for the log lines that follow a message."
    )

    def write(data: bytes) -> None:
        """Append message bytes (already dot-unstuffed, CRLF line ends)."""

    def open_content() -> IO[bytes]:
        """A readable binary file over the bytes written so far (``size`` of them, as they
        will be committed), for content checks before the message is acknowledged; later
        writes do not show in it. The caller closes it. ValueError once ``commit`` has
        started or after ``abort``; OSError when the bytes cannot be read back."""

    def rewrite_header(edit: Callable[[bytes], bytes]) -> None:
        """Replace the header section written so far (the bytes up to and including the
        CRLF before the first empty line; all of it when there is no empty line) with
        ``edit(section)``: how the policy adds header fields and tags the Subject after the
        end of DATA. ``size`` follows. ValueError once ``commit`` has started or after
        ``abort``; OSError when a spilled message cannot be rewritten."""

    def commit(envelope: Envelope) -> Deferred[str]:
        """Write the ``Envelope`` (its queue_id set to ours), fsync content, envelope and
        directories, and make the message visible in the ``incoming`` queue. Returns a
        ``Deferred[str]`` firing with the queue ID (in the reactor thread, after the spool's
        listeners ran); the file work may run in another thread meanwhile. Only after it
        fires may SMTP answer 250. It fails with OSError when the message could not be
        queued (nothing is left visible then)."""

    def abort() -> None:
        """Discard everything written; safe to call twice, after a failed commit, and while
        a commit is in progress (it then does nothing: the commit finishes or cleans up)."""


class ISpool(Interface):
    """Durable queue: states incoming/active/deferred/hold/corrupt, each state change a rename."""

    def begin() -> IIncomingMessage:
        """Start receiving a new message; assigns a fresh, unique, sortable queue ID."""

    def list(state: str) -> builtins.list[str]:
        """Queue IDs currently in ``state`` (oldest first)."""

    def load(queue_id: str, state: str | None = None) -> QueuedMessage:
        """Return the ``mailgw.model.QueuedMessage`` (state, envelope, content path and
        offset). ``state``: where the caller expects the message (looked in first).
        Raises KeyError if the queue ID is unknown."""

    def move(queue_id: str, to_state: str) -> None:
        """Rename the message into ``to_state`` (fsyncs the directories)."""

    def update(queue_id: str, envelope: Envelope, state: str | None = None) -> None:
        """Atomically replace the stored envelope (write temp, fsync, rename)."""

    def remove(queue_id: str) -> None:
        """Delete the message (envelope first, then content). Idempotent."""

    def recover() -> builtins.list[str]:
        """At start-up: move ``active`` back to ``incoming``, remove temp files and orphan
        contents, move unreadable envelopes to ``corrupt``. Returns queue IDs requeued."""

    def add_listener(callback: object) -> None:
        """``callback(queue_id)`` is called (in the reactor thread) after each commit, once
        the message is durable in ``incoming`` and before the commit's Deferred fires."""


# ---------------------------------------------------------------------------------------------
# Store: mailboxes.


class QuotaExceeded(Exception):
    """Storing the message would exceed the user's quota (delivery should defer)."""


class MailboxNotFound(KeyError):
    """No such mailbox for that user."""


class InvalidMailbox(ValueError):
    """The user's name cannot name a mailbox on disk (``/``, NUL, a hidden or over-long
    part): a permanent failure, never retried (delivery bounces it)."""


class IMailbox(Interface):
    """One folder of one user, as of the moment it was opened (refresh to see changes)."""

    name = Attribute("Mailbox name, IMAP style (``INBOX``, ``Sent``, ``Archive/2024``).")
    uidvalidity = Attribute("UIDVALIDITY (int), stable for the life of the folder.")
    uidnext = Attribute("Next UID to be assigned (int).")
    highestmodseq = Attribute("Highest modification sequence (int).")

    def messages() -> builtins.list[MessageInfo]:
        """``mailgw.model.MessageInfo`` of every message, ordered by UID."""

    def refresh() -> None:
        """Reload from the index, picking up changes from other sessions/processes."""

    def open_message(uid: int) -> BinaryIO:
        """A readable binary file object with the stored bytes (as delivered). KeyError if
        the UID is gone."""

    def read_message(uid: int) -> bytes:
        """The stored bytes of the message. KeyError if the UID is gone."""

    def set_flags(uids: Iterable[int], flags: Iterable[str], mode: str) -> dict[int, MessageInfo]:
        """mode ``set``/``add``/``remove``; returns updated ``MessageInfo`` by UID."""

    def expunge(uids: Iterable[int]) -> builtins.list[int]:
        """Remove the messages; returns the UIDs actually removed."""

    def append(
        data: bytes,
        flags: Iterable[str] = (),
        internaldate: datetime.datetime | float | None = None,
    ) -> int:
        """Store a new message in this folder; returns its UID. ``internaldate`` is an aware
        datetime (the store keeps its zone: FETCH INTERNALDATE shows it, SEARCH BEFORE/ON/SINCE
        take the date in it), a UTC epoch (zone +0000), or None for now in the server's zone.
        QuotaExceeded if over quota; ValueError for a naive datetime."""

    def changes_since(modseq: int) -> tuple[builtins.list[MessageInfo], builtins.list[int]]:
        """(``MessageInfo`` of messages whose modseq is above ``modseq``, UIDs expunged since
        ``modseq``), both ordered by UID and read from the index now (not the snapshot); the
        store keeps expunged UIDs with their modseq (tombstones) for CONDSTORE/QRESYNC
        VANISHED. MailboxNotFound if the folder was deleted."""

    def copy_to(uids: Sequence[int], dest_name: str) -> list[tuple[int, int]]:
        """Copy messages (bytes, flags, internal date) into another folder of the same user.
        Returns (source UID, new UID) pairs for the UIDs that exist, in UID order (UIDPLUS
        COPYUID). QuotaExceeded (nothing copied) if the copies do not fit; MailboxNotFound
        if ``dest_name`` does not exist."""

    def move_to(uids: Sequence[int], dest_name: str) -> list[tuple[int, int]]:
        """Move messages into another folder of the same user (RFC 6851: copy + expunge,
        atomic, no extra quota needed). Returns (source UID, new UID) pairs; the source UIDs
        are expunged here (tombstones). MailboxNotFound if ``dest_name`` does not exist,
        ValueError if it is this folder."""

    def claim_recent(uids: Sequence[int], ascending: bool = False) -> set[int]:
        """IMAP ``\\Recent``: the messages of ``uids`` no session has claimed yet, now claimed
        for the caller, atomically across sessions and processes (each message is recent in
        exactly one read-write session). ``ascending``: ``uids`` is in ascending order (the
        store may skip the UIDs below its claim mark). MailboxNotFound if the folder was
        deleted."""

    def unclaimed_recent(uids: Sequence[int], ascending: bool = False) -> set[int]:
        """The messages of ``uids`` no session has claimed yet, claiming nothing (EXAMINE);
        ``ascending`` as for ``claim_recent``. MailboxNotFound if the folder was deleted."""

    def recent_count() -> int:
        """How many messages of the folder no session has claimed yet (STATUS RECENT).
        MailboxNotFound if the folder was deleted."""


class IMessageStore(Interface):
    """The mailbox store facade: per-user folders, quota, change notifications.

    Backends (tier 1 Maildir++, later tier 2) sit behind it; callers never see which tier
    holds a message.
    """

    def deliver(
        user: str, content_path: str, prefix: bytes = b"", folder: str = "INBOX", offset: int = 0
    ) -> int:
        """Deliver a spooled message to ``user``'s folder: ``prefix`` (e.g. Return-Path and
        Delivered-To header lines) followed by the file's bytes from ``offset`` (a spool
        queue file holds its envelope first), written to tmp, fsynced,
        renamed into place, indexed. Returns the UID. Raises QuotaExceeded, OSError."""

    def open_mailbox(user: str, name: str = "INBOX", snapshot: bool = True) -> IMailbox:
        """Open a folder. With ``snapshot`` false the store may read only the folder's
        counters (UIDVALIDITY, UIDNEXT, HIGHESTMODSEQ) and load the messages on the first
        ``messages()``/``refresh()`` (an APPEND/COPY/MOVE target). MailboxNotFound if it
        does not exist, ValueError for an invalid name. INBOX always exists."""

    def append_messages(
        user: str,
        name: str,
        messages: Sequence[tuple[Any, Sequence[str], datetime.datetime | float | None]],
    ) -> tuple[int, list[int]]:
        """Store ``(data, flags, internaldate)`` messages in a folder, all or none (IMAP
        APPEND/MULTIAPPEND): (UIDVALIDITY, new UIDs); ``data`` is bytes, or a file read in
        chunks whose ``len()`` is its size (a spooled literal); ``internaldate`` as for
        ``IMailbox.append`` (an aware datetime keeps its zone). Callable from any thread.
        QuotaExceeded (nothing stored), MailboxNotFound, ValueError."""

    def list_mailboxes(user: str) -> list[str]:
        """Folder names of the user (INBOX first)."""

    def create_mailbox(user: str, name: str) -> None:
        """Create a folder (and its Maildir++ directory). ValueError if it exists/invalid."""

    def delete_mailbox(user: str, name: str) -> None:
        """Delete a folder with its messages (the quota usage goes down), its directory and
        index rows; child folders stay; its subscription stays. ValueError for INBOX or an
        invalid name; MailboxNotFound if it does not exist."""

    def rename_mailbox(user: str, old: str, new: str) -> None:
        """Rename a folder and all its children (``A`` -> ``B`` also moves ``A/x`` to
        ``B/x``), keeping UIDVALIDITY and UIDs. Renaming INBOX moves all its messages into
        the new folder (new UIDs there) and leaves INBOX empty (RFC 3501 6.3.5).
        ValueError if the target exists, is INBOX, lies below the source, or a name is
        invalid; MailboxNotFound if the source does not exist."""

    def set_subscribed(user: str, name: str, subscribed: bool) -> None:
        """Add or remove ``name`` in the user's subscriptions; the folder need not exist
        (RFC 3501 6.3.6). ValueError for an invalid name."""

    def list_subscribed(user: str) -> list[str]:
        """Subscribed folder names, INBOX first, existing or not (LSUB, LIST (SUBSCRIBED))."""

    def mailbox_status(user: str, name: str) -> MailboxStatus:
        """``mailgw.model.MailboxStatus`` (messages, recent, uidnext, uidvalidity, unseen,
        highestmodseq, size) computed from the index without opening message files (IMAP
        STATUS). MailboxNotFound if it does not exist, ValueError for an invalid name."""

    def quota_usage(user: str) -> tuple[int, int | None]:
        """(bytes used, limit or None)."""

    def write_refusal() -> str | None:
        """Why clients must not change mail on this node now (a read-only DR replica, a
        replaced primary), None when they may: IMAP answers ``NO [READ-ONLY]``, POP3 DELE
        ``-ERR``, the MX ``451``."""

    def reindex(user: str) -> int:
        """Rebuild the user's index from the Maildir files, keeping UIDs of known files.
        Returns the number of messages indexed."""

    def add_listener(callback: object) -> None:
        """``callback(user, folder)`` after any change (delivery, flags, expunge)."""


class IChangeLog(Interface):
    """The node's durable change journal (``mailgw.journal``): every store and directory
    mutation, by any process of the node, as a ``mailgw.model.change.ChangeEntry`` with a
    sequence number that grows in commit order, written in the mutation's own transaction."""

    def last_seq() -> int:
        """The highest sequence number handed out so far (committed or rolled back)."""

    def read(after_seq: int, limit: int = 1000) -> builtins.list[Any]:
        """Up to ``limit`` committed entries with ``seq > after_seq``, in order (gaps where a
        transaction rolled back; entries older than the retention may be gone)."""

    def subscribe(callback: object) -> None:
        """``callback(entries)`` for each batch of newly committed entries (this process's at
        once; other processes' while the log tails the journal). TypeError if not callable."""

    def wake() -> None:
        """A hint that another process committed something: look now, not at the next poll."""


class IBlobStore(Interface):
    """Tier-2 storage of message bodies: immutable, content-addressed blobs (sha256 of the
    bytes), small enough to sit on a file tree now and an object store later."""

    def put(data: bytes | BinaryIO) -> BlobRef:
        """Store ``bytes`` or a binary file's remaining bytes durably; returns a
        ``mailgw.model.BlobRef`` (digest, size). Storing bytes that exist already
        writes nothing (dedup). OSError when it cannot be written."""

    def get(ref: BlobRef | str) -> bytes:
        """The bytes of a blob, verified against its digest: BlobNotFound when missing,
        BlobCorrupt when damaged (never wrong bytes)."""

    def open(ref: BlobRef | str) -> BinaryIO:
        """A readable binary file of the verified bytes (errors as ``get``)."""

    def exists(ref: BlobRef | str) -> bool:
        """True when the blob is stored."""

    def delete(ref: BlobRef | str) -> bool:
        """Remove the blob; False when it was not there."""

    def iter_refs() -> Iterator[str]:
        """Iterator over the digests of every stored blob."""


class IMailboxMap(Interface):
    """Which backend node holds a user's mailbox (``[cluster] mailbox_nodes``): gateways
    forward a user's mail there over LMTP and nginx's ``auth_http`` sends the user's IMAP and
    POP3 sessions there. Implementations: ``mailgw.cluster.nodemap.DirectoryMailboxMap``
    (the directory database) and ``mailgw.cluster.statemap.StateMailboxMap`` (the gateway
    state: Redis). Blocking calls: run them in a thread from the reactor."""

    def get(user: str) -> str:
        """The node name holding the canonical user ``user``'s mailbox (one of the
        configured nodes; assigned and remembered on first use)."""

    def held(user: str) -> bool:
        """True while the user's mailbox is being moved: deliveries wait in the queue."""

    def set_node(user: str, node: str) -> None:
        """Record that ``user``'s mailbox is on ``node`` (ValueError for an unknown node)."""

    def set_held(user: str, held: bool) -> None:
        """Hold (or release) deliveries to ``user``."""
