"""``IMAPReader``: the webmail's ``IMailReader`` over IMAP, for a webmail on a gateway in front
of remote backends (``[webmail] reader = imap``). It logs in as the user with the password
given at the webmail login, keeps one connection per user (Python's imaplib, run in the I/O
thread pool, one command at a time per user) and drops it at logout."""

from __future__ import annotations

import contextlib
import imaplib  # noqa: E402,I001 (stdlib, kept apart: the only client library used here)
import re
import ssl
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

from twisted.internet import defer
from zope.interface import implementer

from mailgw.interfaces import MailboxNotFound
from mailgw.model.mutf7 import mutf7_decode, mutf7_encode
from mailgw.webmail.reader import FolderInfo, IMailReader, Summary

_LIST = re.compile(rb'^\((?P<attrs>[^)]*)\) (?:"(?:[^"\\]|\\.)*"|NIL) (?P<name>.+)$')
_STATUS = re.compile(rb"MESSAGES (\d+).*?UNSEEN (\d+)|UNSEEN (\d+).*?MESSAGES (\d+)")
_UID = re.compile(rb"UID (\d+)")
_FLAGS = re.compile(rb"FLAGS \(([^)]*)\)")
_SIZE = re.compile(rb"RFC822\.SIZE (\d+)")
_DATE = re.compile(rb'INTERNALDATE "([^"]+)"')


class IMAPError(Exception):
    """The IMAP server refused a command or the connection failed."""


def _quote(name: str) -> str:
    encoded = mutf7_encode(name)
    return '"' + encoded.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _unquote(raw: bytes) -> str:
    text = raw.decode("utf-8", "replace").strip()
    if text.startswith('"') and text.endswith('"'):
        text = re.sub(r"\\(.)", r"\1", text[1:-1])
    return mutf7_decode(text)


def _ok(answer: tuple[str, Any], what: str) -> Any:
    typ, data = answer
    if typ != "OK":
        raise IMAPError(f"{what}: {typ} {data!r}")
    return data


def _uid_set(uids: Sequence[int]) -> str:
    return ",".join(str(int(u)) for u in uids)


class _Connection:
    """One user's logged-in IMAP connection and the folder it has selected."""

    def __init__(self, client: imaplib.IMAP4) -> None:
        self.client = client
        self.lock = threading.Lock()
        self.selected: str | None = None


@implementer(IMailReader)
class IMAPReader:
    """See the module docstring. ``run`` runs a blocking function in a thread (the node's
    ``run_io``); ``tls`` is ``no``, ``starttls`` or ``yes`` (implicit TLS)."""

    def __init__(
        self,
        host: str,
        port: int,
        tls: str,
        run: Callable[..., defer.Deferred[Any]],
        tls_context: ssl.SSLContext | None = None,
        timeout: float = 30.0,
    ) -> None:
        self.host = host
        self.port = port
        self.tls = tls
        self.run = run
        self.tls_context = tls_context or ssl.create_default_context()
        self.timeout = timeout
        self._passwords: dict[str, str] = {}
        self._connections: dict[str, _Connection] = {}
        self._guard = threading.Lock()

    # -- sessions -----------------------------------------------------------------------------

    def open_session(self, user: str, password: str) -> None:
        """Remember the password the user logged in with (to log in to the IMAP server)."""
        self._passwords[user] = password

    def close_session(self, user: str) -> defer.Deferred[None]:
        """Forget the password and log the connection out."""
        self._passwords.pop(user, None)
        with self._guard:
            conn = self._connections.pop(user, None)
        if conn is None:
            return defer.succeed(None)

        def logout() -> None:
            with conn.lock, contextlib.suppress(imaplib.IMAP4.error, OSError):
                conn.client.logout()

        return self.run(logout)

    def _connect(self, user: str) -> _Connection:
        password = self._passwords.get(user)
        if password is None:
            raise IMAPError("no IMAP credentials for this session: log in again")
        client: imaplib.IMAP4
        if self.tls == "yes":
            client = imaplib.IMAP4_SSL(
                self.host, self.port, ssl_context=self.tls_context, timeout=self.timeout
            )
        else:
            client = imaplib.IMAP4(self.host, self.port, timeout=self.timeout)
            if self.tls == "starttls":
                client.starttls(self.tls_context)
        try:
            client.login(user, password)
        except imaplib.IMAP4.error as e:
            raise IMAPError(f"IMAP login refused: {e}") from None
        return _Connection(client)

    def _call(self, user: str, work: Callable[[_Connection], Any]) -> defer.Deferred[Any]:
        """Run ``work(connection)`` in a thread on the user's connection (made or remade as
        needed; one retry on a new connection when the old one has gone)."""

        def job() -> Any:
            for attempt in (1, 2):
                with self._guard:
                    conn = self._connections.get(user)
                if conn is None:
                    conn = self._connect(user)
                    with self._guard:
                        self._connections[user] = conn
                with conn.lock:
                    try:
                        return work(conn)
                    except (imaplib.IMAP4.abort, OSError):
                        with self._guard:
                            if self._connections.get(user) is conn:
                                del self._connections[user]
                        if attempt == 2:
                            raise
            raise AssertionError("unreachable")

        return self.run(job)

    @staticmethod
    def _select(conn: _Connection, folder: str) -> None:
        if conn.selected == folder:
            conn.client.noop()  # picks up new messages and flag changes
            return
        typ, data = conn.client.select(_quote(folder))
        if typ != "OK":
            conn.selected = None
            raise MailboxNotFound(folder)
        conn.selected = folder

    # -- IMailReader ------------------------------------------------------------------------

    def folders(self, user: str) -> defer.Deferred[list[FolderInfo]]:
        def work(conn: _Connection) -> list[FolderInfo]:
            data = _ok(conn.client.list(), "LIST")
            names = []
            for line in data:
                if not isinstance(line, bytes):
                    continue
                m = _LIST.match(line)
                if m is None or b"\\noselect" in m.group("attrs").lower():
                    continue
                names.append(_unquote(m.group("name")))
            names.sort(key=lambda n: (n.upper() != "INBOX", n))
            out = []
            for name in names:
                typ, st = conn.client.status(_quote(name), "(MESSAGES UNSEEN)")
                total = unseen = 0
                if typ == "OK" and st and isinstance(st[0], bytes):
                    m = _STATUS.search(st[0])
                    if m is not None:
                        if m.group(1) is not None:
                            total, unseen = int(m.group(1)), int(m.group(2))
                        else:
                            unseen, total = int(m.group(3)), int(m.group(4))
                out.append(FolderInfo("INBOX" if name.upper() == "INBOX" else name, total, unseen))
            return out

        return self._call(user, work)

    def summaries(self, user: str, folder: str) -> defer.Deferred[list[Summary]]:
        def work(conn: _Connection) -> list[Summary]:
            self._select(conn, folder)
            typ, data = conn.client.uid("FETCH", "1:*", "(UID FLAGS RFC822.SIZE INTERNALDATE)")
            if typ != "OK":
                raise IMAPError(f"FETCH: {data!r}")
            out = []
            for item in data:
                meta = item[0] if isinstance(item, tuple) else item
                if not isinstance(meta, bytes):
                    continue
                uid = _UID.search(meta)
                if uid is None:
                    continue
                flags = _FLAGS.search(meta)
                size = _SIZE.search(meta)
                date = _DATE.search(meta)
                when = 0.0
                if date is not None:
                    parsed = imaplib.Internaldate2tuple(b'INTERNALDATE "' + date.group(1) + b'"')
                    if parsed is not None:
                        when = time.mktime(parsed)
                out.append(
                    Summary(
                        int(uid.group(1)),
                        frozenset(flags.group(1).decode().split()) if flags else frozenset(),
                        int(size.group(1)) if size else 0,
                        when,
                    )
                )
            out.sort(key=lambda s: s.uid)
            return out

        return self._call(user, work)

    def _fetch_literals(
        self, user: str, folder: str, uids: Sequence[int], item: str
    ) -> defer.Deferred[dict[int, bytes]]:
        """UID -> the literal of ``item`` (``BODY.PEEK[...]``) for each of ``uids`` that exists."""

        def work(conn: _Connection) -> dict[int, bytes]:
            out: dict[int, bytes] = {}
            if not uids:
                return out
            self._select(conn, folder)
            typ, data = conn.client.uid("FETCH", _uid_set(uids), f"(UID {item})")
            if typ != "OK":
                raise IMAPError(f"FETCH: {data!r}")
            for part in data:
                if isinstance(part, tuple):
                    uid = _UID.search(part[0])
                    if uid is not None:
                        out[int(uid.group(1))] = bytes(part[1])
            return out

        return self._call(user, work)

    def headers(
        self, user: str, folder: str, uids: Sequence[int]
    ) -> defer.Deferred[dict[int, bytes]]:
        return self._fetch_literals(user, folder, uids, "BODY.PEEK[HEADER]")

    def fetch(self, user: str, folder: str, uid: int) -> defer.Deferred[bytes]:
        def work(conn: _Connection) -> bytes:
            self._select(conn, folder)
            typ, data = conn.client.uid("FETCH", str(int(uid)), "(BODY.PEEK[])")
            for item in data or []:
                if isinstance(item, tuple):
                    return bytes(item[1])
            raise KeyError(uid)

        return self._call(user, work)

    def fetch_many(
        self, user: str, folder: str, uids: Sequence[int]
    ) -> defer.Deferred[dict[int, bytes]]:
        return self._fetch_literals(user, folder, uids, "BODY.PEEK[]")

    def set_flags(
        self, user: str, folder: str, uids: Sequence[int], flags: Sequence[str], add: bool
    ) -> defer.Deferred[None]:
        def work(conn: _Connection) -> None:
            self._select(conn, folder)
            op = "+FLAGS.SILENT" if add else "-FLAGS.SILENT"
            _ok(conn.client.uid("STORE", _uid_set(uids), op, "(" + " ".join(flags) + ")"), "STORE")

        return self._call(user, work)

    @staticmethod
    def _ensure(conn: _Connection, folder: str) -> None:
        if folder.upper() == "INBOX":
            return
        conn.client.create(_quote(folder))  # NO when it exists: fine

    def move(self, user: str, folder: str, uids: Sequence[int], dest: str) -> defer.Deferred[None]:
        def work(conn: _Connection) -> None:
            self._ensure(conn, dest)
            self._select(conn, folder)
            if "MOVE" in conn.client.capabilities:
                _ok(conn.client.uid("MOVE", _uid_set(uids), _quote(dest)), "MOVE")
                return
            _ok(conn.client.uid("COPY", _uid_set(uids), _quote(dest)), "COPY")
            self._expunge(conn, uids)

        return self._call(user, work)

    @staticmethod
    def _expunge(conn: _Connection, uids: Sequence[int]) -> None:
        _ok(conn.client.uid("STORE", _uid_set(uids), "+FLAGS.SILENT", "(\\Deleted)"), "STORE")
        if "UIDPLUS" in conn.client.capabilities:
            _ok(conn.client.uid("EXPUNGE", _uid_set(uids)), "UID EXPUNGE")
        else:
            _ok(conn.client.expunge(), "EXPUNGE")

    def expunge(self, user: str, folder: str, uids: Sequence[int]) -> defer.Deferred[None]:
        def work(conn: _Connection) -> None:
            self._select(conn, folder)
            self._expunge(conn, uids)

        return self._call(user, work)

    def append(
        self, user: str, folder: str, data: bytes, flags: Sequence[str]
    ) -> defer.Deferred[int]:
        def work(conn: _Connection) -> int:
            self._ensure(conn, folder)
            typ, answer = conn.client.append(
                _quote(folder),
                "(" + " ".join(flags) + ")",
                imaplib.Time2Internaldate(time.time()),
                data,
            )
            if typ != "OK":
                raise IMAPError(f"APPEND: {answer!r}")
            m = re.search(
                rb"APPENDUID \d+ (\d+)",
                answer[0] if answer and isinstance(answer[0], bytes) else b"",
            )
            conn.selected = None if conn.selected == folder else conn.selected
            return int(m.group(1)) if m else 0

        return self._call(user, work)
