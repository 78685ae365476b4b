"""APPEND literals spooled to an unnamed temporary file as they arrive, instead of memory.

A MULTIAPPEND of eight 50 MB messages once held 400 MB per session until the command ended.
The reader (``CommandReader``) writes a large APPEND literal here chunk by chunk; the store
then copies it into the mailbox in chunks too, so a session holds at most one input chunk of
it in memory. The file is created with ``O_TMPFILE`` where the system has it (no name, so
nothing is left behind by a crash) and is gone when closed.
"""

from __future__ import annotations

import os
import tempfile
from typing import BinaryIO

__all__ = ["SpooledLiteral", "open_spool"]


class SpooledLiteral:
    """The bytes of one literal in a temporary file: ``write`` them as they arrive, then
    ``finish``; afterwards it reads like a binary file from the start (``read``), ``len()``
    is its size, and ``getvalue()`` gives all of it (for small uses and tests)."""

    def __init__(self, file: BinaryIO, size: int) -> None:
        self._file = file
        self.size = size  # announced size
        self.written = 0
        self.finished = False

    def write(self, data: bytes | bytearray | memoryview) -> None:
        """Append received bytes (never beyond the announced size)."""
        if self.finished or self.written + len(data) > self.size:
            raise ValueError("literal bytes beyond the announced size")
        self._file.write(data)
        self.written += len(data)

    def finish(self) -> None:
        """All bytes are in: flush and rewind for reading."""
        if self.written != self.size:
            raise ValueError(f"literal has {self.written} of {self.size} bytes")
        self._file.flush()
        self._file.seek(0)
        self.finished = True

    def __len__(self) -> int:
        return self.size

    def __bool__(self) -> bool:
        return self.size > 0

    def read(self, n: int = -1) -> bytes:
        return self._file.read(n)

    def seek(self, offset: int, whence: int = 0) -> int:
        return self._file.seek(offset, whence)

    def fileno(self) -> int:
        return self._file.fileno()

    def getvalue(self) -> bytes:
        """All the bytes (reads the file from the start)."""
        self._file.seek(0)
        data = self._file.read()
        self._file.seek(0)
        return data

    @property
    def closed(self) -> bool:
        return self._file.closed

    def close(self) -> None:
        """Delete the file (closing an unnamed file frees its space)."""
        self._file.close()


def open_spool(directory: str | None, size: int) -> SpooledLiteral:
    """A new spooled literal of ``size`` bytes in ``directory`` (created 0700 if needed; the
    system's temporary directory when None or unusable)."""
    if directory is not None:
        try:
            os.makedirs(directory, 0o700, exist_ok=True)
            return SpooledLiteral(tempfile.TemporaryFile(dir=directory), size)
        except OSError:
            pass  # e.g. not writable after a privilege drop: the system's temp dir will do
    return SpooledLiteral(tempfile.TemporaryFile(), size)
