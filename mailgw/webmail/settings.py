"""Per-user webmail settings (the signature), one JSON file per user under
``data_dir/webmail/``, replaced atomically."""

from __future__ import annotations

import hashlib
import json
import os
from typing import Any

MAX_SIGNATURE = 4000
"""Characters kept of a signature."""


class UserSettings:
    """Settings files in ``folder`` (created on the first save)."""

    def __init__(self, folder: str) -> None:
        self.folder = folder

    def _path(self, user: str) -> str:
        name = hashlib.sha256(user.lower().encode("utf-8")).hexdigest()
        return os.path.join(self.folder, name + ".json")

    def load(self, user: str) -> dict[str, Any]:
        """The user's settings ({} when none are saved or the file is unreadable)."""
        try:
            with open(self._path(user), encoding="utf-8") as f:
                data = json.load(f)
        except (OSError, ValueError):
            return {}
        return data if isinstance(data, dict) else {}

    def signature(self, user: str) -> str:
        """The user's signature ("" when none)."""
        value = self.load(user).get("signature", "")
        return value if isinstance(value, str) else ""

    def save(self, user: str, **values: Any) -> None:
        """Merge ``values`` into the user's settings and write them (write, fsync, rename)."""
        data = self.load(user)
        data.update(values)
        os.makedirs(self.folder, mode=0o700, exist_ok=True)
        path = self._path(user)
        tmp = path + ".tmp"
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(data, f, ensure_ascii=False)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
