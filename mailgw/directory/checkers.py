"""twisted.cred checker authenticating user name and password against the directory."""

from __future__ import annotations

from typing import Any

from twisted.cred.checkers import ICredentialsChecker
from twisted.cred.credentials import IUsernamePassword
from twisted.cred.error import UnauthorizedLogin
from twisted.internet import defer
from zope.interface import implementer

from mailgw.directory.database import Directory, User


@implementer(ICredentialsChecker)
class DirectoryChecker:
    """Checks ``IUsernamePassword`` credentials; the avatar ID is the canonical user name
    (``alice@example.test``, a str). Used by POP3, IMAP and submission through a Portal."""

    credentialInterfaces = (IUsernamePassword,)

    def __init__(self, directory: Directory) -> None:
        self.directory = directory

    def requestAvatarId(self, credentials: Any) -> defer.Deferred[Any]:
        # Fires with a str (Twisted's interface says bytes; our realms take the str name).
        username = credentials.username
        if isinstance(username, bytes):
            try:
                username = username.decode("utf-8")
            except UnicodeDecodeError:
                # Not a name we can hold; still spend the work of a check.
                username = ""
        if not username or "\x00" in username:
            username = "\x00unknown"
        d = self.directory.check_password(username, credentials.password)

        def avatar_id(user: User) -> str:
            return user.name

        return d.addCallback(avatar_id)


__all__ = ["DirectoryChecker", "UnauthorizedLogin"]
