"""Checkouts: one cached clone per repository, fetched when needed, clean per job."""

from __future__ import annotations

import hashlib
import logging
import re
import shutil
import tempfile
from pathlib import Path

import git

from common.gitutil import git_reason, one_line
from common.messages import valid_commit
from common.naming import is_local

log = logging.getLogger(__name__)


class CheckoutError(Exception):
    """The commit cannot be checked out; the message says why, in one line."""


def _slug(repo: str) -> str:
    tail = re.sub(r"[^A-Za-z0-9_.-]+", "-", repo.rstrip("/").rsplit("/", 1)[-1])[:40] or "repo"
    return f"{tail}-{hashlib.sha1(repo.encode()).hexdigest()[:10]}"


class Workspace:
    """Cached clones under `root/repos`; `checkout()` gives a clean tree at a commit."""

    def __init__(self, root: Path) -> None:
        self.root = root
        (root / "repos").mkdir(parents=True, exist_ok=True)
        # Open clones, kept between jobs: each keeps a `git cat-file` process
        # that answers "is this commit here?" without a new process per job.
        self._open: dict[Path, git.Repo] = {}

    def path_for(self, repo: str) -> Path:
        return self.root / "repos" / _slug(repo)

    def checkout(self, repo: str, commit: str) -> Path:
        """Check `commit` out, forced and cleaned; re-clone once if the cache is broken."""
        if repo.startswith("-"):
            raise CheckoutError(f"refusing repository name that looks like an option: {repo!r}")
        if not valid_commit(commit):  # it reaches git's command line: no options, no ref names
            raise CheckoutError(f"not a commit id: {commit!r:.80}")
        path = self.path_for(repo)
        try:
            return self._checkout(repo, commit, path)
        except CheckoutError:
            raise
        except (git.GitError, OSError, ValueError) as exc:
            # A test suite may delete or corrupt .git; a fresh clone repairs it.
            log.warning("workspace %s is broken (%s); cloning it again", path, one_line(exc))
            self._forget(path)
            shutil.rmtree(path, ignore_errors=True)
        try:
            return self._checkout(repo, commit, path)
        except CheckoutError:
            raise
        except (git.GitError, OSError, ValueError) as exc:
            self._forget(path)
            raise CheckoutError(f"cannot check out {commit[:12]} of {repo}: {one_line(exc)}") from None

    def close(self) -> None:
        for path in list(self._open):
            self._forget(path)

    def _forget(self, path: Path) -> None:
        clone = self._open.pop(path, None)
        if clone is not None:
            clone.close()

    def _checkout(self, repo: str, commit: str, path: Path) -> Path:
        clone = self._open_or_clone(repo, path)
        # The code under test can write into .git; hooks it plants there
        # (say, post-checkout) must not run as the runner on the next job.
        clone.git.set_persistent_git_options(c="core.hooksPath=/dev/null")
        if not _has_commit(clone, commit):
            # One incremental fetch of every branch; what the clone has is not fetched again.
            clone.git.fetch("origin", "--prune", "--quiet", "+refs/heads/*:refs/remotes/origin/*")
            if not _has_commit(clone, commit):
                try:  # servers that allow it can hand over an unadvertised commit
                    clone.git.fetch("origin", "--quiet", commit)
                except git.GitCommandError:
                    raise CheckoutError(f"commit {commit} not found in {repo}") from None
        clone.git.checkout("--force", "--detach", "--quiet", commit)
        clone.git.clean("-ffdxq")
        return path

    def _open_or_clone(self, repo: str, path: Path) -> git.Repo:
        if path.exists():
            clone = self._open.get(path)
            if clone is None or not (path / ".git").is_dir():
                self._forget(path)
                clone = git.Repo(path)
                if clone.bare or not (path / ".git").is_dir():
                    raise git.InvalidGitRepositoryError(str(path))
                self._open[path] = clone
            return clone
        # Clone beside the final place and rename, so a crash never leaves a
        # half-made clone that looks whole.
        tmp = Path(tempfile.mkdtemp(prefix=".clone-", dir=path.parent))
        try:
            try:
                # A repository on this machine is shared, not copied: the clone
                # reads its objects in place (git's alternates), so a new commit
                # there is checked out with no fetch at all.
                git.Repo.clone_from(repo, tmp / "c", no_checkout=True, quiet=True, shared=is_local(repo))
            except git.GitCommandError as exc:
                raise CheckoutError(f"cannot clone {repo}: {git_reason(exc)}") from None
            (tmp / "c").rename(path)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        clone = self._open[path] = git.Repo(path)
        return clone


def _has_commit(clone: git.Repo, commit: str) -> bool:
    """Whether the clone holds `commit` (and it is a commit), asked of the clone's
    long-lived `git cat-file --batch-check`, which sees what fetches add."""
    try:
        return bool(clone.odb.info(bytes.fromhex(commit)).type == b"commit")
    except ValueError:  # "<sha> missing"
        return False
