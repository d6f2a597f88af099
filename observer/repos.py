"""Reading branch heads and new commits.

A local repository is read in place (reading a ref is a file read, no
process); any other URL is mirrored into the state folder and fetched once
per poll. Credentials in a URL go to git through its environment only
(`common.gitauth`): the mirror's config, the logs and the messages see the
repository's identity.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path

import git

from common import gitauth
from common.gitutil import one_line
from common.messages import check_branch
from common.naming import is_local
from common.voltfile import CONFIG_FILE, MAX_CONFIG_BYTES, Asks, ConfigError, needed_asks
from observer.publish import MAX_COMMIT_BYTES, commit_about

log = logging.getLogger(__name__)

DEFAULT_GIT_TIMEOUT = 300.0


class RepoError(Exception):
    """A repository or branch that cannot be read; the message is one line."""


class BranchMissing(RepoError):
    """The repository is readable but has no such branch (yet, or any more)."""


class WatchedRepo:
    def __init__(self, repo: str, state_dir: Path, git_timeout: float = DEFAULT_GIT_TIMEOUT) -> None:
        if repo.startswith("-"):
            raise RepoError(f"not a repository: {repo!r:.80}")
        try:
            self.url, self._credentials = gitauth.split_url(repo)
        except ValueError as exc:
            raise RepoError(str(exc)) from None
        self.local = is_local(self.url)
        self.git_timeout = git_timeout
        mirrors = state_dir / "mirrors"
        self.mirror_path = mirrors / _slug(self.url)
        # Earlier versions named a mirror after the URL as given, password and all.
        self._old_mirror = mirrors / _slug(repo) if repo != self.url else None
        self._repo: git.Repo | None = None

    # -- opening and fetching -------------------------------------------------

    def open(self) -> None:
        """Open (or mirror) the repository; RepoError if it is not there."""
        self.close()
        if self.local:
            path = Path(self.url)
            if not path.exists():
                raise RepoError(f"repository not found: {self.url}")
            try:
                self._repo = git.Repo(path)
            except (git.InvalidGitRepositoryError, git.NoSuchPathError):
                raise RepoError(f"not a git repository: {self.url}") from None
            return
        if not (self.mirror_path / "HEAD").exists() and not self._adopt_old_mirror():
            tmp = self.mirror_path.with_name(self.mirror_path.name + ".tmp")
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.parent.mkdir(parents=True, exist_ok=True)
            try:
                self._git("clone", "--mirror", "--quiet", "--", self.url, str(tmp), what="clone")
            except RepoError:
                shutil.rmtree(tmp, ignore_errors=True)
                raise
            tmp.rename(self.mirror_path)
        self._repo = git.Repo(self.mirror_path)

    def close(self) -> None:
        """Let go of the repository (and GitPython's helper processes)."""
        if self._repo is not None:
            self._repo.close()
            self._repo = None

    @property
    def repo(self) -> git.Repo:
        if self._repo is None:
            self.open()
        assert self._repo is not None
        return self._repo

    def fetch(self) -> None:
        """Bring the repository up to date: fetch a mirror; check that a local
        repository is still there. RepoError, in one line, when neither works."""
        if self._repo is None:
            self.open()  # a mirror is fetched by its clone
            return
        if self.local:
            if not Path(self._repo.git_dir, "HEAD").exists():
                self.open()  # says why it cannot, the way it would at start
            return
        self._git("fetch", "--prune", "--quiet", "--", self.url, "+refs/heads/*:refs/heads/*", what="fetch")

    # -- reading --------------------------------------------------------------

    def default_branch(self) -> str:
        try:
            name = self.repo.head.reference.name
        except (TypeError, ValueError):
            raise RepoError(f"{self.url} has a detached HEAD; name a --branch") from None
        try:
            return check_branch(name)
        except ValueError as exc:
            raise RepoError(f"{self.url}: HEAD names no usable branch: {exc}") from None

    def head(self, branch: str) -> str:
        try:
            return self.repo.commit(f"refs/heads/{branch}").hexsha
        except (git.BadName, ValueError):
            raise BranchMissing(f"branch {branch!r} not found in {self.url}") from None

    def parents(self, commit: str) -> list[str]:
        """The commit's parents, read through GitPython's running cat-file (no new process)."""
        try:
            return [parent.hexsha for parent in self.repo.commit(commit).parents]
        except (git.BadName, ValueError) as exc:
            raise RepoError(f"cannot read commit {commit[:12]} of {self.url}: {one_line(exc)}") from None

    def labels_at(self, commit: str) -> list[str]:
        return list(self.asks_at(commit).labels)

    def asks_at(self, commit: str) -> Asks:
        """What the commit's .volt.toml asks for (labels, split): nothing without
        one, and nothing (with a line saying why) when it is broken; the runner
        that takes the job ends it as `error` with the same reason."""
        try:
            text = self._config_text(commit)
            return needed_asks(text) if text else Asks()
        except ConfigError as exc:
            log.warning("repo=%s commit=%s published without labels: %s", self.url, commit[:12], exc)
        except Exception as exc:  # noqa: BLE001 - whatever the commit holds, it is still published
            log.warning(
                "repo=%s commit=%s published without labels: cannot read %s (%s)",
                self.url,
                commit[:12],
                CONFIG_FILE,
                one_line(exc),
            )
        return Asks()

    def about_at(self, commit: str) -> tuple[str, str]:
        """The commit's (subject, author), read as its labels are, through the
        cat-file GitPython keeps running; empty when it cannot be read."""
        try:
            _, kind, size = self.repo.git.get_object_header(commit)
            if kind != b"commit" or size > MAX_COMMIT_BYTES:
                return "", ""
            return commit_about(self.repo.git.get_object_data(commit)[3])
        except Exception as exc:  # noqa: BLE001 - a commit is published whatever its text holds
            log.warning("repo=%s commit=%s published without its subject: %s", self.url, commit[:12], one_line(exc))
            return "", ""

    def _config_text(self, commit: str) -> str | None:
        # git's own cat-file reads the blob (GitPython keeps one running), and
        # its size is asked first so a huge file is never read.
        spec = f"{commit}:{CONFIG_FILE}"
        try:
            _, kind, size = self.repo.git.get_object_header(spec)
        except ValueError:  # no such file in that commit
            return None
        if kind != b"blob":
            raise ConfigError(f"{CONFIG_FILE} is not a file")
        if size > MAX_CONFIG_BYTES:
            raise ConfigError(f"{CONFIG_FILE} is larger than {MAX_CONFIG_BYTES // 1024} KiB")
        return self.repo.git.get_object_data(spec)[3].decode("utf-8", "replace")

    def existing(self, commits: Iterable[str]) -> list[str]:
        """Those of `commits` that are still commits in the repository (gc, rewrites)."""
        wanted = "".join(f"{c}\n" for c in commits)
        if not wanted:
            return []
        out = self._git("cat-file", "--batch-check=%(objectname) %(objecttype)", what="read", stdin=wanted)
        return [name for name, _, kind in (line.partition(" ") for line in out.splitlines()) if kind == "commit"]

    @contextmanager
    def walk(self, head: str, known: Iterable[str]) -> Iterator[Iterator[str]]:
        """The commits reachable from `head` and from none of `known` (which
        must exist), oldest first (parents before children), read from git as
        they are used rather than held in a list."""
        with tempfile.TemporaryFile() as errors:
            proc = subprocess.Popen(
                ["git", "--git-dir", self.repo.git_dir, "rev-list", "--topo-order", "--reverse", "--stdin"],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=errors,
                env=gitauth.git_env(None),
                text=True,
            )
            assert proc.stdin is not None and proc.stdout is not None
            stdout = proc.stdout
            finished = False

            def commits() -> Iterator[str]:
                nonlocal finished
                for line in stdout:
                    if line.strip():
                        yield line.strip()
                finished = True

            try:
                # rev-list reads all of its input before it writes anything.
                try:
                    proc.stdin.write(head + "\n" + "".join(f"^{c}\n" for c in known))
                    proc.stdin.close()
                except BrokenPipeError:
                    pass  # git stopped early; its exit status and stderr say why
                yield commits()
                # A caller that stopped early (say, on SIGTERM) wants no more: not an error.
                if finished and proc.wait(timeout=self.git_timeout) != 0:
                    errors.seek(0)
                    reason = _git_reason(errors.read().decode("utf-8", "replace"), None)
                    raise RepoError(f"cannot list the new commits of {self.url}: {reason}")
            finally:
                stdout.close()
                if proc.poll() is None:
                    proc.kill()
                    proc.wait()

    # -- inside ---------------------------------------------------------------

    def _git(self, *args: str, what: str, stdin: str | None = None) -> str:
        """Run one git command on this repository (or, for a clone, anywhere) with
        the credentials in its environment only; RepoError in one line."""
        where = [] if args[0] == "clone" else ["--git-dir", self.repo.git_dir]
        try:
            done = subprocess.run(
                ["git", *where, *args],
                input=stdin,
                capture_output=True,
                text=True,
                env=gitauth.git_env(self._credentials),
                timeout=self.git_timeout,
                check=False,
            )
        except subprocess.TimeoutExpired:
            raise RepoError(f"cannot {what} {self.url}: git took longer than {self.git_timeout:g}s") from None
        except OSError as exc:
            raise RepoError(f"cannot {what} {self.url}: {exc}") from None
        if done.returncode != 0:
            raise RepoError(f"cannot {what} {self.url}: {_git_reason(done.stderr, self._credentials)}")
        return done.stdout

    def _adopt_old_mirror(self) -> bool:
        """Move a mirror an earlier version made under the URL as given to its
        identity's name, with the credentials taken out of its config."""
        old = self._old_mirror
        if old is None or not (old / "HEAD").exists():
            return False
        config = git.Repo(old)
        try:
            with config.config_writer() as writer:
                writer.set_value('remote "origin"', "url", self.url)
        finally:
            config.close()
        os.replace(old, self.mirror_path)
        log.info("repo=%s mirror renamed after the repository's identity", self.url)
        return True


def _slug(url: str) -> str:
    return hashlib.sha1(url.encode()).hexdigest()[:12]


def _git_reason(stderr: str, credentials: gitauth.Credentials | None) -> str:
    """git's own `fatal:` (or last) line, without anything secret."""
    lines = [line.strip() for line in stderr.splitlines() if line.strip()]
    fatal = [line for line in lines if line.startswith(("fatal:", "error:"))]
    line = (fatal or lines or ["git failed without a word"])[-1]
    return " ".join(gitauth.scrub(line.removeprefix("fatal: "), credentials).split())[:300]
