"""Checkouts that neither a repository's content nor the code under test can steer.

Per repository the runner keeps two things under its workdir:

- `repos/<slug>.git`, a git directory only the runner uses. Its config is a
  known-good file written fresh before every job (not edited: whatever was
  planted in it is gone), and so are its alternates; git runs with the
  system and global config ignored, hooks and fsmonitor switched off on the
  command line, no terminal prompts, and a time limit.
- `trees/<slug>`, the tree the job runs in, checked out from that git
  directory with `--git-dir`/`--work-tree`. It has no `.git`: the code under
  test has no git directory to write into the cache through, and one it
  plants in its tree is removed before the next job.

A repository on this machine is read in place through git's alternates (no
fetch, ever); a URL is fetched from incrementally, by URL, with no remote
configured. The git directories and trees stay between jobs, so a job
rewrites only what changed.

Submodules (`submodules()`) are checked out the same way, never by `git
submodule`: each at the commit its superproject records, from a git directory
of the runner's own (`repos/<slug>.modules/`, one per submodule path, so each
has one work tree), fetched from its `.gitmodules` URL (a relative one taken
from the superproject's) only when the caller allows that repository, with the
credentials the runner has for it.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import select
import shutil
import signal
import stat
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable, Mapping
from pathlib import Path

from common.messages import valid_commit
from common.naming import is_local, normalize_repo

log = logging.getLogger(__name__)

GIT_TIMEOUT = 300.0
HEADS = "+refs/heads/*:refs/remotes/origin/*"
# Submodules within submodules, this deep at most, and this many in all.
SUBMODULE_DEPTH = 8
MAX_SUBMODULES = 500

# On every command line: command-line settings beat every config file git
# might read, the cache's own included.
_OVERRIDES = ("core.hooksPath=/dev/null", "core.fsmonitor=false", "protocol.ext.allow=never")

# The cache's whole config. No filter, remote, include, hook, ssh command,
# credential helper, pager, editor or work tree: git has none of them to run.
_CONFIG = """\
[core]
\trepositoryformatversion = {version}
\tfilemode = true
\tbare = false
\tlogallrefupdates = false
\thooksPath = /dev/null
\tfsmonitor = false
\tattributesFile = /dev/null
[gc]
\tautoDetach = false
[maintenance]
\tautoDetach = false
"""

# Files of a git directory that point git at other places (another config,
# other objects, other attributes); the runner writes none of them.
_FOREIGN = ("commondir", "info/attributes", "info/grafts", "objects/info/http-alternates")

# Transport settings an operator may give the runner through its environment;
# every other GIT_* variable (GIT_DIR, GIT_CONFIG_*, ...) would redirect work.
_OPERATOR_GIT_ENV = frozenset(
    {"GIT_SSH", "GIT_SSH_COMMAND", "GIT_SSH_VARIANT", "GIT_ASKPASS", "GIT_SSL_CAINFO", "GIT_SSL_CAPATH"}
)


class CheckoutError(Exception):
    """The commit cannot be checked out; the message says why, in one line."""


class _GitFailed(Exception):
    """A git command failed in a way a fresh cache may repair."""


def _slug(repo: str) -> str:
    tail = re.sub(r"[^A-Za-z0-9_.-]+", "-", repo.rstrip("/").rsplit("/", 1)[-1])[:40] or "repo"
    return f"{tail}-{hashlib.sha1(repo.encode()).hexdigest()[:10]}"


class Workspace:
    """Runner-owned git directories under `root/repos`, job trees under `root/trees`."""

    def __init__(
        self,
        root: Path,
        *,
        git_timeout: float = GIT_TIMEOUT,
        git_env: Callable[[str], Mapping[str, str]] | None = None,
    ) -> None:
        """`git_env(repo)` gives extra environment for every git call on `repo`
        (credentials, say); it cannot switch off the settings that keep git
        from running programs."""
        self.root = root
        self.git_timeout = git_timeout
        self._git_env = git_env
        (root / "repos").mkdir(parents=True, exist_ok=True)
        (root / "trees").mkdir(parents=True, exist_ok=True)
        # One `git cat-file --batch-check` per git directory, kept between
        # jobs, answers "is this commit here?" without a new process per job.
        self._objects: dict[Path, _ObjectQuery] = {}

    def git_dir_for(self, repo: str) -> Path:
        """The runner's git directory for `repo`. Never give it to a job
        writable; a read-only view is the caller's choice (setuptools-scm)."""
        return self.root / "repos" / f"{_slug(repo)}.git"

    def tree_for(self, repo: str) -> Path:
        return self.root / "trees" / _slug(repo)

    def checkout(self, repo: str, commit: str, *, cancel: threading.Event | None = None) -> Path:
        """Check `commit` out into the repository's tree, forced and cleaned, and return the tree.

        All of it takes at most `git_timeout` seconds, and stops soon after
        `cancel` is set; either way CheckoutError says so. A cache that git
        cannot use is made again once.
        """
        if repo.startswith("-"):
            raise CheckoutError(f"refusing repository name that looks like an option: {repo!r}")
        if not valid_commit(commit):  # it reaches git's command line: no options, no ref names
            raise CheckoutError(f"not a commit id: {commit!r:.80}")
        run = _Run(repo, self._env(repo), time.monotonic() + self.git_timeout, self.git_timeout, cancel)
        try:
            return self._checkout(repo, commit, run)
        except (_GitFailed, OSError) as exc:
            log.warning("workspace for %s is broken (%s); making it again", repo, _one_line(exc))
            self._discard(repo)
        try:
            return self._checkout(repo, commit, run)
        except (_GitFailed, OSError) as exc:
            self._forget(self.git_dir_for(repo))
            raise CheckoutError(f"cannot check out {commit[:12]} of {repo}: {_one_line(exc)}") from None

    def close(self) -> None:
        for git_dir in list(self._objects):
            self._forget(git_dir)

    def submodules(
        self,
        repo: str,
        commit: str,
        tree: Path,
        *,
        allowed: Callable[[str], bool] = lambda repo: True,
        cancel: threading.Event | None = None,
        check_out: bool = True,
    ) -> list[str]:
        """Check out the submodules `commit` of `repo` records into its checked-out
        `tree`, each at its recorded commit, theirs too; return their paths.
        With `check_out` false, leave each one's folder empty instead, as a
        clone without submodules has it (an earlier job may have filled it).

        A submodule's repository must pass `allowed` (the runner's --allow-repo).
        All of it takes at most `git_timeout` seconds; CheckoutError names the
        submodule that could not be had, and why.
        """
        run = _Run(repo, self._env(repo), time.monotonic() + self.git_timeout, self.git_timeout, cancel)
        done: list[str] = []
        if check_out:
            self._submodules(repo, commit, self.git_dir_for(repo), tree, "", allowed, run, done)
            return done
        try:
            links = _gitlinks(run.git(self.git_dir_for(repo), "ls-tree", "-r", "-z", "--full-tree", commit))
        except _GitFailed as exc:
            raise CheckoutError(f"cannot read the submodules of {commit[:12]} of {repo}: {_one_line(exc)}") from None
        for path, _ in links:
            where = tree / path
            if (
                where.is_dir()
                and not where.is_symlink()
                and Path(os.path.realpath(where)) == Path(os.path.realpath(tree)) / path
            ):
                for child in where.iterdir():
                    _remove(child)
        return done

    def _submodules(
        self,
        repo: str,
        commit: str,
        git_dir: Path,
        tree: Path,
        prefix: str,
        allowed: Callable[[str], bool],
        run: _Run,
        done: list[str],
    ) -> None:
        if not (tree / ".gitmodules").is_file() or (tree / ".gitmodules").is_symlink():
            return  # git itself needs .gitmodules to know where a submodule comes from
        if prefix.count("/") >= SUBMODULE_DEPTH:
            raise CheckoutError(f"submodule {prefix.rstrip('/')}: submodules nested more than {SUBMODULE_DEPTH} deep")
        try:
            links = _gitlinks(run.git(git_dir, "ls-tree", "-r", "-z", "--full-tree", commit))
            urls = _module_urls(run.git(git_dir, "config", "-z", "--blob", f"{commit}:.gitmodules", "--list"))
        except _GitFailed as exc:
            raise CheckoutError(f"cannot read the submodules of {commit[:12]} of {repo}: {_one_line(exc)}") from None
        top = self.root / "repos" / f"{_slug(run.repo)}.modules"
        for path, sha in links:
            name = f"{prefix}{path}"
            if len(done) >= MAX_SUBMODULES:
                raise CheckoutError(f"more than {MAX_SUBMODULES} submodules")
            url = urls.get(path)
            if url is None:
                raise CheckoutError(f"submodule {name}: no url for it in .gitmodules")
            try:
                sub = normalize_repo(_resolve_url(repo, url))
            except ValueError as exc:
                raise CheckoutError(f"submodule {name}: {exc}") from None
            if sub.startswith("-") or "::" in sub.split("/", 1)[0]:
                raise CheckoutError(f"submodule {name}: refusing url {sub!r:.80}")
            if not allowed(sub):
                raise CheckoutError(f"submodule {name}: repository not allowed on this runner: {sub}")
            where = tree / path
            if Path(os.path.realpath(where)) != Path(os.path.realpath(tree)) / path:
                raise CheckoutError(f"submodule {name}: its path goes through a link")
            sub_dir = top / f"{_slug(sub)}-{hashlib.sha1(name.encode()).hexdigest()[:8]}.git"
            sub_run = _Run(sub, self._env(sub), run.deadline, run.limit, run.cancel)
            try:
                self._checkout_into(sub, sha, sub_run, sub_dir, where)
            except (_GitFailed, OSError) as exc:
                log.warning("submodule %s of %s is broken (%s); making it again", name, repo, _one_line(exc))
                self._forget(sub_dir)
                _remove(sub_dir)
                try:
                    self._checkout_into(sub, sha, sub_run, sub_dir, where)
                except (_GitFailed, OSError) as again:
                    raise CheckoutError(
                        f"submodule {name}: cannot check out {sha[:12]} of {sub}: {_one_line(again)}"
                    ) from None
            except CheckoutError as exc:
                raise CheckoutError(f"submodule {name}: {exc}") from None
            done.append(name)
            self._submodules(sub, sha, sub_dir, where, f"{name}/", allowed, sub_run, done)

    def _checkout(self, repo: str, commit: str, run: _Run) -> Path:
        return self._checkout_into(repo, commit, run, self.git_dir_for(repo), self.tree_for(repo))

    def _checkout_into(self, repo: str, commit: str, run: _Run, git_dir: Path, tree: Path) -> Path:
        fetched = False
        if not (git_dir / "HEAD").is_file():
            self._create(repo, commit, git_dir, run)
            fetched = not is_local(repo)
        _own(repo, commit, git_dir)
        if not self._has_commit(git_dir, commit, run):
            if is_local(repo):  # read in place: what its objects lack, it does not have
                raise CheckoutError(f"commit {commit} not found in {repo}")
            if not fetched:  # one incremental fetch of every branch
                run.git(git_dir, "fetch", "--quiet", "--prune", "--end-of-options", repo, HEADS)
            if not self._has_commit(git_dir, commit, run):
                try:  # servers that allow it can hand over an unadvertised commit
                    run.git(git_dir, "fetch", "--quiet", "--end-of-options", repo, commit)
                except _GitFailed:
                    raise CheckoutError(f"commit {commit} not found in {repo}") from None
        if tree.is_symlink() or (tree.exists() and not tree.is_dir()):
            tree.unlink()  # git must not check out into wherever a link points
        tree.mkdir(parents=True, exist_ok=True)
        run.git(git_dir, "checkout", "--force", "--detach", "--quiet", commit, tree=tree)
        run.git(git_dir, "clean", "-ffdxq", tree=tree)
        _strip(tree)
        return tree

    def _create(self, repo: str, commit: str, git_dir: Path, run: _Run) -> None:
        # Made beside its final place and renamed, so a crash never leaves a
        # half-made git directory that looks whole.
        git_dir.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=".new-", dir=git_dir.parent))
        try:
            new = tmp / "git"
            fmt = "sha256" if len(commit) == 64 else "sha1"
            run.git(None, "init", "--quiet", "--bare", "--template=", f"--object-format={fmt}", str(new))
            _own(repo, commit, new)
            if not is_local(repo):
                try:
                    run.git(new, "fetch", "--quiet", "--end-of-options", repo, HEADS)
                except _GitFailed as exc:
                    raise CheckoutError(f"cannot fetch {repo}: {exc}") from None
            new.rename(git_dir)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)

    def _has_commit(self, git_dir: Path, commit: str, run: _Run) -> bool:
        query = self._objects.get(git_dir)
        if query is None:
            query = self._objects[git_dir] = _ObjectQuery(git_dir, run.env)
        return query.is_commit(commit, run)

    def _discard(self, repo: str) -> None:
        git_dir = self.git_dir_for(repo)
        self._forget(git_dir)
        _remove(git_dir)
        _remove(self.tree_for(repo))

    def _forget(self, git_dir: Path) -> None:
        query = self._objects.pop(git_dir, None)
        if query is not None:
            query.close()

    def _env(self, repo: str) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith(("GIT_", "VOLT_")) or k in _OPERATOR_GIT_ENV}
        if self._git_env is not None:
            env.update(self._git_env(repo))
        env.update(
            GIT_CONFIG_NOSYSTEM="1",
            GIT_CONFIG_SYSTEM=os.devnull,
            GIT_CONFIG_GLOBAL=os.devnull,
            GIT_TERMINAL_PROMPT="0",
            LC_ALL="C",  # git's messages, read back for the reason, in English
        )
        return env


class _Run:
    """One checkout's git calls: their environment, shared deadline and cancel flag."""

    def __init__(self, repo: str, env: dict[str, str], deadline: float, limit: float, cancel: threading.Event | None):
        self.repo, self.env, self.deadline, self.limit = repo, env, deadline, limit
        self.cancel = cancel or threading.Event()

    def stop_reason(self) -> str | None:
        if self.cancel.is_set():
            return "was cancelled"
        if time.monotonic() >= self.deadline:
            return f"did not finish within {self.limit:g}s"
        return None

    def git(self, git_dir: Path | None, *args: str, tree: Path | None = None) -> str:
        """Run git to the end, or kill it (and what it started) at the deadline or on cancel."""
        proc = subprocess.Popen(
            _argv(git_dir, *args, tree=tree),
            cwd=tree or git_dir or None,
            env=self.env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            start_new_session=True,  # its own group: ssh and remote helpers go with it
        )
        out, err = self._wait(proc, args[0])
        if proc.returncode != 0:
            raise _GitFailed(f"git {args[0]}: {_reason(err)}")
        return out.decode(errors="replace")

    def _wait(self, proc: subprocess.Popen[bytes], what: str) -> tuple[bytes, bytes]:
        """Collect git's output until it exits; look at the clock and the cancel flag every 50 ms."""
        assert proc.stdout is not None and proc.stderr is not None
        output = {proc.stdout.fileno(): bytearray(), proc.stderr.fileno(): bytearray()}
        poller = select.poll()
        for fd in output:
            poller.register(fd, select.POLLIN)
        open_fds = set(output)
        try:
            while open_fds:  # git, and whatever it started, hold the pipes until they exit
                for fd, _ in poller.poll(50):
                    chunk = os.read(fd, 65536)
                    output[fd] += chunk
                    if not chunk:
                        open_fds.discard(fd)
                        poller.unregister(fd)
                reason = self.stop_reason()
                if reason is not None:
                    _kill(proc)
                    raise CheckoutError(f"git {what} of {self.repo} {reason}")
            if not _exited(proc, self.deadline - time.monotonic()):
                _kill(proc)
                raise CheckoutError(f"git {what} of {self.repo} did not finish within {self.limit:g}s")
            return bytes(output[proc.stdout.fileno()]), bytes(output[proc.stderr.fileno()])
        finally:
            proc.stdout.close()
            proc.stderr.close()


class _ObjectQuery:
    """A long-lived `git cat-file --batch-check`: it also sees what later fetches add."""

    def __init__(self, git_dir: Path, env: dict[str, str]) -> None:
        self.proc = subprocess.Popen(
            _argv(git_dir, "cat-file", "--batch-check"),
            cwd=git_dir,
            env=env,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            bufsize=0,
            start_new_session=True,
        )

    def is_commit(self, commit: str, run: _Run) -> bool:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        try:
            self.proc.stdin.write(f"{commit}\n".encode())
        except OSError as exc:
            raise _GitFailed(f"git cat-file: {exc}") from None
        line = b""
        while not line.endswith(b"\n"):
            if not select.select([self.proc.stdout], [], [], 0.05)[0]:
                reason = run.stop_reason()
                if reason is not None:
                    raise CheckoutError(f"git cat-file of {run.repo} {reason}")
                continue
            chunk = self.proc.stdout.read(4096)
            if not chunk:
                raise _GitFailed("git cat-file ended")
            line += chunk
        return line.split()[1:2] == [b"commit"]  # "<id> commit <size>", or "<id> missing"

    def close(self) -> None:
        _kill(self.proc)


def _gitlinks(listing: str) -> list[tuple[str, str]]:
    """The submodules in `git ls-tree -r -z` output: (path, recorded commit)."""
    links = []
    for entry in listing.split("\0"):
        meta, _, path = entry.partition("\t")
        parts = meta.split()
        if len(parts) == 3 and parts[0] == "160000" and valid_commit(parts[2]):
            links.append((path, parts[2]))
    return links


def _module_urls(listing: str) -> dict[str, str]:
    """Path to url, from `git config -z --list` of a .gitmodules."""
    paths: dict[str, str] = {}
    urls: dict[str, str] = {}
    for entry in listing.split("\0"):
        key, _, value = entry.partition("\n")
        if key.startswith("submodule.") and key.endswith((".path", ".url")):
            name, field = key[len("submodule.") :].rsplit(".", 1)
            (paths if field == "path" else urls)[name] = value
    return {path.strip("/"): urls[name] for name, path in paths.items() if name in urls}


def _resolve_url(base: str, url: str) -> str:
    """A .gitmodules url, a relative one (`../lib.git`) taken from the superproject's as git does."""
    if not url.startswith(("./", "../")):
        return url
    base = base.rstrip("/")
    while url.startswith(("./", "../")):
        if url.startswith("./"):
            url = url[2:]
            continue
        url = url[3:]
        head, sep, _ = base.rpartition("/")
        if sep and head and not head.endswith((":/", ":")):
            base = head
        elif "://" not in base and ":" in base and not base.startswith("/"):
            base = base.split(":", 1)[0] + ":"  # git@host:repo.git -> git@host:
        else:
            raise ValueError(f"relative url {url!r:.80} goes above {base!r:.80}")
    return f"{base}{'' if base.endswith(':') else '/'}{url}"


def _argv(git_dir: Path | None, *args: str, tree: Path | None = None) -> list[str]:
    argv = ["git"]
    for setting in _OVERRIDES:
        argv += ["-c", setting]
    if git_dir is not None:
        argv.append(f"--git-dir={git_dir}")
    if tree is not None:
        argv.append(f"--work-tree={tree}")
    return [*argv, *args]


def _own(repo: str, commit: str, git_dir: Path) -> None:
    """Make the git directory's config and alternates the runner's again."""
    version = 1 if len(commit) == 64 else 0
    config = _CONFIG.format(version=version)
    if version:
        config += "[extensions]\n\tobjectformat = sha256\n"
    _write(git_dir / "config", config)
    alternates = git_dir / "objects" / "info" / "alternates"
    if is_local(repo):
        alternates.parent.mkdir(parents=True, exist_ok=True)
        _write(alternates, f"{_objects_of(repo)}\n")
    else:
        alternates.unlink(missing_ok=True)
    for name in _FOREIGN:
        (git_dir / name).unlink(missing_ok=True)


def _objects_of(repo: str) -> Path:
    """The object directory of a repository on this machine, found without running git in it."""
    source = Path(repo)
    dot = source / ".git"
    git_dir = dot if dot.is_dir() else source
    if dot.is_file():  # a linked work tree: "gitdir: <path>"
        text = dot.read_text(errors="replace").strip()
        if text.startswith("gitdir:"):
            git_dir = source / text.removeprefix("gitdir:").strip()
    common = git_dir / "commondir"
    if common.is_file():
        git_dir = git_dir / common.read_text(errors="replace").strip()
    objects = git_dir / "objects"
    if not (objects.is_dir() and (git_dir / "HEAD").is_file()):
        raise CheckoutError(f"cannot check out from {repo}: not a git repository")
    return objects.resolve()


def _write(path: Path, text: str) -> None:
    """Make `path` a file of its own holding exactly `text`: replaced whole, so a
    link or a hard link planted in its place is replaced, not written through."""
    try:
        st = path.lstat()
        if stat.S_ISREG(st.st_mode) and st.st_nlink == 1 and path.read_text() == text:
            return  # the same as a fresh one, and cheaper than writing it
    except (OSError, UnicodeDecodeError):
        pass
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}-")
    with os.fdopen(fd, "w") as out:
        out.write(text)
    os.replace(tmp, path)


def _strip(tree: Path) -> None:
    """Remove from the tree every `.git` (git clean never touches that name,
    and a later job's own git would obey one a test planted) and anything that
    is not a file, folder or link (a FIFO left there would block a reader)."""
    pending = [str(tree)]
    while pending:
        with os.scandir(pending.pop()) as entries:
            for entry in entries:
                if entry.is_dir(follow_symlinks=False) and entry.name != ".git":
                    pending.append(entry.path)
                elif entry.name == ".git" or not (entry.is_file(follow_symlinks=False) or entry.is_symlink()):
                    _remove(Path(entry.path))


def _remove(path: Path) -> None:
    """Delete a file or a folder tree, even one a test made unwritable."""
    if path.is_symlink() or (path.exists() and not path.is_dir()):
        path.unlink()
        return
    if not path.exists():
        return
    os.chmod(path, 0o700)
    for root, dirs, _ in os.walk(path):
        for name in dirs:
            if not os.path.islink(os.path.join(root, name)):
                os.chmod(os.path.join(root, name), 0o700)
    shutil.rmtree(path)


def _exited(proc: subprocess.Popen[bytes], seconds: float) -> bool:
    """Whether `proc` exits within `seconds`, woken the moment it does (a pidfd;
    Popen.wait with a timeout sleeps in steps, a millisecond a call)."""
    if proc.poll() is None:
        fd = os.pidfd_open(proc.pid)
        try:
            select.select([fd], [], [], max(0.0, seconds))
        finally:
            os.close(fd)
    return proc.poll() is not None


def _kill_group(pgid: int) -> None:
    try:
        os.killpg(pgid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def _kill(proc: subprocess.Popen[bytes]) -> None:
    _kill_group(proc.pid)
    try:
        proc.communicate(timeout=5)
    except subprocess.TimeoutExpired:  # a grandchild that left the group holds a pipe
        log.warning("git process %d's output is still held open after it was killed", proc.pid)


def _reason(stderr: bytes) -> str:
    """git's own `fatal:` or `error:` line, else its last line."""
    lines = [line.strip() for line in stderr.decode(errors="replace").splitlines() if line.strip()]
    for line in lines:
        if line.startswith(("fatal:", "error:")):
            return line.split(":", 1)[1].strip().strip("'")[:300]
    return lines[-1][:300] if lines else "failed"


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split())[:300]
