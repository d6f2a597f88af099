"""The observer's durable memory: the last commit published per repository and branch."""

from __future__ import annotations

import json
import os
from pathlib import Path


class Cursor:
    """A small JSON file, replaced atomically on every change."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.data: dict[str, dict[str, str]] = {}
        if path.exists():
            try:
                loaded = json.loads(path.read_text())
            except (OSError, ValueError) as exc:
                raise ValueError(f"observer state {path} is unreadable: {exc}") from None
            if isinstance(loaded, dict):
                self.data = {str(k): dict(v) for k, v in loaded.items() if isinstance(v, dict)}

    def get(self, repo: str, branch: str) -> str | None:
        return self.data.get(repo, {}).get(branch)

    def set(self, repo: str, branch: str, commit: str) -> None:
        self.data.setdefault(repo, {})[branch] = commit
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(".tmp")
        with open(tmp, "w") as f:
            json.dump(self.data, f, indent=1, sort_keys=True)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.path)
        # The rename itself is only durable once the directory is synced.
        fd = os.open(self.path.parent, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
