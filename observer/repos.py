"""Reading branch heads and new commits with GitPython.

A local repository is read in place (reading a ref is a file read, no
process); any other URL is mirrored into the state folder and fetched once
per poll.
"""

from __future__ import annotations

import hashlib
import logging
import shutil
from pathlib import Path

import git

from common.gitutil import git_reason
from common.naming import is_local, normalize_repo
from common.voltfile import CONFIG_FILE, required_labels

log = logging.getLogger(__name__)

# The most commits published for one branch in one poll: a push of a long
# history publishes its newest ones rather than flooding the runners.
MAX_NEW_COMMITS = 1000


class RepoError(Exception):
    """A repository or branch that cannot be read; the message is one line."""


class WatchedRepo:
    def __init__(self, repo: str, state_dir: Path) -> None:
        if repo.startswith("-"):
            raise RepoError(f"not a repository: {repo!r}")
        self.url = normalize_repo(repo)
        self.local = is_local(self.url)
        slug = hashlib.sha1(self.url.encode()).hexdigest()[:12]
        self.mirror_path = state_dir / "mirrors" / slug
        self._repo: git.Repo | None = None

    def open(self) -> None:
        """Open (or mirror) the repository; RepoError if it is not there."""
        if self.local:
            path = Path(self.url)
            if not path.exists():
                raise RepoError(f"repository not found: {self.url}")
            try:
                self._repo = git.Repo(path)
            except (git.InvalidGitRepositoryError, git.NoSuchPathError):
                raise RepoError(f"not a git repository: {self.url}") from None
            return
        if (self.mirror_path / "HEAD").exists():
            self._repo = git.Repo(self.mirror_path)
        else:
            tmp = self.mirror_path.with_name(self.mirror_path.name + ".tmp")
            shutil.rmtree(tmp, ignore_errors=True)
            try:
                git.Repo.clone_from(self.url, tmp, mirror=True, quiet=True)
            except git.GitCommandError as exc:
                shutil.rmtree(tmp, ignore_errors=True)
                raise RepoError(f"cannot fetch {self.url}: {git_reason(exc)}") from None
            tmp.rename(self.mirror_path)
            self._repo = git.Repo(self.mirror_path)

    @property
    def repo(self) -> git.Repo:
        if self._repo is None:
            self.open()
        assert self._repo is not None
        return self._repo

    def fetch(self) -> None:
        """Bring the mirror up to date (a no-op for a local repository)."""
        if self.local:
            return
        try:
            self.repo.git.fetch("--prune", "--quiet", "origin", "+refs/heads/*:refs/heads/*")
        except git.GitCommandError as exc:
            raise RepoError(f"cannot fetch {self.url}: {git_reason(exc)}") from None

    def default_branch(self) -> str:
        try:
            return self.repo.head.reference.name
        except (TypeError, ValueError):
            raise RepoError(f"{self.url} has a detached HEAD; name a --branch") from None

    def head(self, branch: str) -> str:
        try:
            return self.repo.commit(f"refs/heads/{branch}").hexsha
        except (git.BadName, ValueError):
            raise RepoError(f"branch {branch!r} not found in {self.url}") from None

    def labels_at(self, commit: str) -> list[str]:
        """The runner labels the commit's .volt.toml asks for (none without one)."""
        try:
            blob = self.repo.commit(commit).tree / CONFIG_FILE
            text = blob.data_stream.read().decode("utf-8", "replace")
        except (KeyError, ValueError, git.BadName):
            return []
        return required_labels(text)

    def new_commits(self, branch_head: str, since: str) -> list[str]:
        """Commits reachable from branch_head and not from since, oldest first."""
        try:
            out = self.repo.git.rev_list("--topo-order", f"--max-count={MAX_NEW_COMMITS}", branch_head, f"^{since}")
        except git.GitCommandError:
            # The old head is gone (history rewritten, mirror re-made): start over from the head.
            log.warning("repo=%s cannot walk from %s; publishing the head only", self.url, since[:12])
            return [branch_head]
        return list(reversed(out.split()))
