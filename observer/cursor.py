"""The observer's durable memory, per repository and branch: the commits it
published (the last KEEP of them) and the head it last went through.

Two files in the state folder. `cursor.json` is a snapshot, replaced
atomically (written, synced, renamed, folder synced). `cursor.journal` gets
one line per change since that snapshot, appended (and flushed to the kernel)
the moment a publish is confirmed, and synced once per page, so a long push
costs one fsync per page, not two per commit. Loading reads the snapshot and
replays the journal; a torn last line is dropped. Whatever a crash loses is
only memory of a publish, so the worst it does is publish a commit again (the
dispatcher folds repeats into one job); it never makes the observer believe it
published what it did not.

The snapshot of earlier versions, `{repo: {branch: last_commit}}`, still reads.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
from pathlib import Path
from typing import IO, Any

from common.messages import valid_commit
from common.naming import normalize_repo

log = logging.getLogger(__name__)

# How many published commits each branch remembers: enough to find where a
# rewritten history leaves the old one, bounded so the file stays small.
KEEP = 10_000
# Journal lines that trigger a new snapshot, so loading never replays much.
COMPACT_AFTER = 20_000
VERSION = 2


class CursorBusy(Exception):
    """Another observer holds this state folder."""


class _Branch:
    __slots__ = ("last", "published")

    def __init__(self) -> None:
        self.last: str | None = None
        # A dict keeps insertion order: the oldest publish is the first evicted.
        self.published: dict[str, None] = {}


class Cursor:
    def __init__(self, path: Path, keep: int = KEEP) -> None:
        self.path = path
        self.journal_path = path.with_suffix(".journal")
        self.keep = keep
        self._branches: dict[tuple[str, str], _Branch] = {}
        self._journal: IO[str] | None = None
        self._lock: IO[bytes] | None = None
        self._journal_lines = 0
        self._unsynced = False
        # Held while this cursor lives: two observers on one state folder
        # would each replace what the other wrote.
        path.parent.mkdir(parents=True, exist_ok=True)
        self._take_lock()
        renamed = False
        if path.exists():
            try:
                loaded = json.loads(path.read_text())
            except (OSError, ValueError, RecursionError) as exc:
                raise ValueError(f"observer state {path} is unreadable: {exc}") from None
            renamed = self._load_snapshot(loaded)
        if self.journal_path.exists():
            self._replay_journal()
        if renamed:
            # Repositories stored under an old name (with a password, say) are
            # rewritten under their identity at once, not at the next snapshot.
            self.compact()

    # -- reading --------------------------------------------------------------

    def get(self, repo: str, branch: str) -> str | None:
        """The head the observer last went through on this branch (None: never seen)."""
        entry = self._branches.get((repo, branch))
        return entry.last if entry else None

    def published(self, repo: str, branch: str) -> list[str]:
        """The commits published on this branch that it still remembers, oldest first."""
        entry = self._branches.get((repo, branch))
        return list(entry.published) if entry else []

    def knows(self, repo: str, branch: str, commit: str) -> bool:
        entry = self._branches.get((repo, branch))
        return entry is not None and commit in entry.published

    # -- changing -------------------------------------------------------------

    def record(self, repo: str, branch: str, commit: str) -> None:
        """Note a publish the broker confirmed; survives this process dying at once."""
        self._apply(repo, branch, commit, published=True)
        self._append({"repo": repo, "branch": branch, "published": commit})

    def set(self, repo: str, branch: str, commit: str) -> None:
        """Note that the branch's head is `commit` with nothing left to publish below it."""
        if self.get(repo, branch) == commit:
            return
        self._apply(repo, branch, commit, published=False)
        self._append({"repo": repo, "branch": branch, "head": commit})

    def sync(self) -> None:
        """Make every change so far durable (one fsync), and take a new snapshot
        when the journal has grown long."""
        if self._journal is not None and self._unsynced:
            self._journal.flush()
            os.fsync(self._journal.fileno())
            self._unsynced = False
        if self._journal_lines >= COMPACT_AFTER:
            self.compact()

    def compact(self) -> None:
        """Write the whole memory as a new snapshot, then start an empty journal."""
        data: dict[str, Any] = {"version": VERSION, "repos": {}}
        for (repo, branch), entry in sorted(self._branches.items()):
            data["repos"].setdefault(repo, {})[branch] = {"last": entry.last, "published": list(entry.published)}
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(".tmp")
        with open(tmp, "w") as f:
            json.dump(data, f, separators=(",", ":"), sort_keys=True)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.path)
        _sync_folder(self.path.parent)
        # Only now may the journal go: until the rename is durable, a crash
        # still has the old snapshot and the journal to replay onto it.
        journal = self._open_journal()
        journal.truncate(0)
        journal.flush()
        os.fsync(journal.fileno())
        self._journal_lines = 0
        self._unsynced = False

    def close(self) -> None:
        if self._journal is not None:
            self.sync()
            self._journal.close()
            self._journal = None
        if self._lock is not None:
            self._lock.close()
            self._lock = None

    # -- inside ---------------------------------------------------------------

    def _apply(self, repo: str, branch: str, commit: str, published: bool) -> None:
        entry = self._branches.get((repo, branch))
        if entry is None:
            entry = self._branches[(repo, branch)] = _Branch()
        entry.last = commit
        if published:
            entry.published.pop(commit, None)  # re-published: now the newest
            entry.published[commit] = None
            while len(entry.published) > self.keep:
                del entry.published[next(iter(entry.published))]

    def _append(self, line: dict[str, str]) -> None:
        journal = self._open_journal()
        journal.write(json.dumps(line, separators=(",", ":")) + "\n")
        # Flushed to the kernel: a killed observer keeps it; only losing the
        # machine before the next sync() can, and that costs a repeat.
        journal.flush()
        self._journal_lines += 1
        self._unsynced = True

    def _open_journal(self) -> IO[str]:
        if self._journal is None:
            self._journal = open(self.journal_path, "a")  # noqa: SIM115 - lives with the cursor
        return self._journal

    def _take_lock(self) -> None:
        lock = open(self.path.with_suffix(".lock"), "ab")  # noqa: SIM115 - held while the cursor lives
        try:
            fcntl.flock(lock.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            lock.close()
            raise CursorBusy(f"another observer is using {self.path.parent}") from None
        self._lock = lock

    def _load_snapshot(self, loaded: Any) -> bool:
        """Fill memory from a snapshot of either version; True when a repository's
        name was not its identity."""
        renamed = False
        if not isinstance(loaded, dict):
            return False
        if loaded.get("version") == VERSION and isinstance(loaded.get("repos"), dict):
            repos = loaded["repos"]
        else:  # version 1: {repo: {branch: last_commit}}
            repos = {
                repo: {b: {"last": c, "published": [c]} for b, c in v.items()}
                for repo, v in loaded.items()
                if isinstance(v, dict)
            }
        for repo, branches in repos.items():
            identity = _identity(repo)
            if identity is None or not isinstance(branches, dict):
                continue
            renamed |= identity != repo
            for branch, state in branches.items():
                if not isinstance(state, dict):
                    continue
                published = state.get("published")
                for commit in published if isinstance(published, list) else []:
                    if isinstance(commit, str) and valid_commit(commit):
                        self._apply(identity, str(branch), commit, published=True)
                last = state.get("last")
                if isinstance(last, str) and valid_commit(last):
                    self._apply(identity, str(branch), last, published=False)
        return renamed

    def _replay_journal(self) -> None:
        with open(self.journal_path, "rb") as f:
            raw = f.read()
        complete = raw[: raw.rfind(b"\n") + 1]
        if len(complete) != len(raw):
            # A write torn by a crash: drop it, so the next line starts clean.
            with open(self.journal_path, "r+b") as f:
                f.truncate(len(complete))
        for line in complete.splitlines():
            try:
                entry = json.loads(line)
                repo, branch = entry["repo"], entry["branch"]
                commit = entry.get("published") or entry["head"]
            except (ValueError, KeyError, TypeError, AttributeError):
                log.warning("ignored an unreadable line in %s", self.journal_path)
                continue
            if all(isinstance(v, str) for v in (repo, branch, commit)) and valid_commit(commit):
                self._apply(repo, branch, commit, published="published" in entry)
            self._journal_lines += 1


def _identity(repo: Any) -> str | None:
    if not isinstance(repo, str):
        return None
    try:
        return normalize_repo(repo)
    except ValueError:
        return None


def _sync_folder(folder: Path) -> None:
    # The rename itself is only durable once the folder is synced.
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
