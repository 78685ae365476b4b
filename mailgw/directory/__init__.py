"""Domains, users, aliases, password hashing and the twisted.cred checker (embedded SQLite)."""

from mailgw.directory.checkers import DirectoryChecker
from mailgw.directory.database import MAX_DEPTH, Directory, User

__all__ = ["MAX_DEPTH", "Directory", "DirectoryChecker", "User"]
