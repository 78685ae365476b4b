"""A node's replication state, ``data_dir/replication/state``: one word the store reads to
refuse writes (``MessageStore.write_refusal``) and the service reads for its role.

- ``replica``: applies what its primary ships; IMAP/POP3 read-only, SMTP 451.
- ``primary`` (or no file): accepts writes; ships when ``[replication] role = primary``.
- ``fenced``: was a primary, found its replica promoted: ships nothing and accepts no
  writes until ``mailgw dr demote --resync``.

The file overrides ``[replication] role`` once written: ``mailgw dr promote`` turns a
replica into a primary without a restart.
"""

from __future__ import annotations

import os

STATE_NAME = "state"
ROLES = ("primary", "replica", "fenced")


def state_path(data_dir: str) -> str:
    return os.path.join(data_dir, "replication", STATE_NAME)


def read_state(data_dir: str) -> str | None:
    """The state word, None when there is no (valid) file."""
    try:
        with open(state_path(data_dir), encoding="utf-8") as fh:
            words = fh.read().split()
    except OSError:
        return None
    return words[0] if words and words[0] in ROLES else None


def write_state(data_dir: str, state: str) -> None:
    """Replace the state durably (write, fsync, rename)."""
    if state not in ROLES:
        raise ValueError(f"unknown replication state {state!r}")
    path = state_path(data_dir)
    os.makedirs(os.path.dirname(path), mode=0o750, exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as fh:
        fh.write(state + "\n")
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)
    fd = os.open(os.path.dirname(path), os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def effective_role(data_dir: str, configured: str) -> str:
    """The role the node plays now: the state file's, else ``configured``."""
    return read_state(data_dir) or configured
