"""The observer loop: poll each watched branch, publish every new commit in order.

A commit's CommitSeen is confirmed by the broker before the cursor records
it, so a crash can repeat a commit (the dispatcher folds repeats into one
job) but never skip one. What is new on a branch is every commit reachable
from its head that the observer never published there, down to the commits
it knows: after a merge that is the merged side too, after a force push the
rewritten commits.

Nothing a repository holds stops the loop: each repository and each branch
is polled on its own, and whatever goes wrong with one is one line in the
log (and in the health file) while the others go on.

With `--listen`, a webhook or a local hook (observer/webhook.py) makes the
loop look at one branch at once rather than at the next poll. The receiver's
threads only queue what they were told (`submit`) and wake the loop through
the broker's one thread-safe call; the loop's own thread fetches, walks and
publishes, through the same cursor as a poll, so each commit is published
once whoever noticed it first.
"""

from __future__ import annotations

import argparse
import logging
import signal
import threading
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from common.broker import Broker, BrokerError
from common.gitutil import one_line
from common.health import write_health
from common.settings import BrokerSettings
from observer.cursor import Cursor
from observer.publish import publish_commit
from observer.repos import DEFAULT_GIT_TIMEOUT, BranchMissing, RepoError, WatchedRepo

if TYPE_CHECKING:
    from observer.webhook import Outcome, Push, Receiver

log = logging.getLogger(__name__)

# Commits published between two syncs of the cursor: a long push costs one
# fsync per page, and a crash repeats at most what the kernel had not written.
PAGE = 256
# Branches waiting for the loop at most; a request past it is told to come back.
MAX_PENDING = 1000


@dataclass(frozen=True)
class ObserverSettings:
    broker: BrokerSettings
    repos: tuple[str, ...]
    branches: tuple[str, ...] = ()
    poll: float = 5.0
    state_dir: Path = Path(".volt/observer")
    git_timeout: float = DEFAULT_GIT_TIMEOUT
    listen: str = ""  # HOST:PORT of the webhook receiver; "" for none
    webhook_secret_file: Path | None = None

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> ObserverSettings:
        """Defaults, then VOLT_* (spelled in observer/cli.py: `volt notify` reads
        that module, and must start without loading this one)."""
        return cls.from_args(None, environ)

    @classmethod
    def from_args(cls, args: argparse.Namespace | None, environ: Mapping[str, str] | None = None) -> ObserverSettings:
        """Defaults, then VOLT_*, then the flags given in `args`."""
        from observer.cli import settings_from

        return settings_from(args, environ)


class Watch:
    """One repository and what the loop knows about it between polls."""

    def __init__(self, repo: WatchedRepo, branches: tuple[str, ...]) -> None:
        from observer.webhook import repo_key

        self.repo = repo
        # Empty until the repository can be read: then its HEAD's branch.
        self.branches = list(branches)
        self.problem: str | None = None  # why the last poll could not read it
        self.missing: set[str] = set()  # branches already reported missing
        self.key = repo_key(repo.url)  # what webhooks and hooks are matched by


class Pending:
    """Branches the receiver was told about, waiting for the loop's thread; a
    branch told twice before the loop gets to it is looked at once."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._pushes: dict[tuple[int, str], tuple[Watch, Push]] = {}

    def add(self, index: int, watch: Watch, push: Push) -> bool:
        """Queue it; False when too many branches wait already."""
        with self._lock:
            key = (index, push.branch)
            if key not in self._pushes and len(self._pushes) >= MAX_PENDING:
                return False
            self._pushes[key] = (watch, push)
            return True

    def take(self) -> list[tuple[Watch, Push]]:
        with self._lock:
            taken, self._pushes = list(self._pushes.values()), {}
            return taken


class Observer:
    def __init__(self, settings: ObserverSettings, broker: Broker | None = None) -> None:
        self.s = settings
        self.broker = broker or Broker(settings.broker, "volt-observer")
        self.cursor = Cursor(settings.state_dir / "cursor.json")
        self.watches = [
            Watch(WatchedRepo(url, settings.state_dir, settings.git_timeout), settings.branches)
            for url in settings.repos
        ]
        self.stopping = False
        self.pending = Pending()
        self.receiver: Receiver | None = None

    def request_stop(self, *_: object) -> None:
        self.stopping = True

    def install_signal_handlers(self) -> None:
        signal.signal(signal.SIGTERM, self.request_stop)
        signal.signal(signal.SIGINT, self.request_stop)

    def open_repos(self) -> None:
        """Open every repository once before the first poll.

        A local path that is not a git repository is a typo: RepoError, and the
        command says so in one line. A server that does not answer, or a branch
        that is not there (yet), is a warning, and is tried again every poll.
        """
        for watch in self.watches:
            try:
                watch.repo.open()
            except RepoError as exc:
                if watch.repo.local:
                    raise
                self._repo_failed(watch, str(exc))
                continue
            if not watch.branches:
                watch.branches = [watch.repo.default_branch()]
            for branch in watch.branches:
                try:
                    watch.repo.head(branch)
                except BranchMissing:
                    self._branch_missing(watch, branch)
            log.info("watching repo=%s branches=%s", watch.repo.url, ",".join(watch.branches))

    def listen(self) -> str | None:
        """Bind the webhook receiver when --listen asks for one; its address.
        ValueError or OSError (an address in use, a secret unreadable) in one line."""
        if not self.s.listen:
            return None
        from observer.cli import split_listen
        from observer.notify import read_secret
        from observer.webhook import Receiver

        secret = None
        if self.s.webhook_secret_file is not None:
            secret = read_secret(str(self.s.webhook_secret_file), "--webhook-secret-file")
        host, port = split_listen(self.s.listen)
        try:
            self.receiver = Receiver(host, port, secret, self.submit)
        except OSError as exc:
            raise OSError(f"--listen {self.s.listen}: {exc.strerror or exc}") from None
        return self.receiver.address

    def submit(self, push: Push) -> Outcome:
        """Queue a push the receiver took, for the loop's thread; called on the
        receiver's threads, so it reads the watches and touches nothing else."""
        from observer.webhook import Outcome, repo_key

        keys = {key for key in map(repo_key, push.repos) if key}
        found = next(((i, w) for i, w in enumerate(self.watches) if w.key in keys), None)
        if found is None:
            named = normalized_name(push.repos[0])
            return Outcome(404, f"{push.source}: {named} is not a watched repository; nothing published")
        index, watch = found
        notice = push.source == "notify"
        details = [f"{'commit' if notice else 'after'} {push.after[:12]}"] if push.after else []
        details += [f"delivery {push.delivery}"] if push.delivery else []
        branch = f"branch {push.branch}" if push.branch else "every branch watched"
        told = f"{'a hook on' if notice else push.source + ' push to'} {branch} of {watch.repo.url}"
        told += f" ({', '.join(details)})" if details else ""
        branches = watch.branches  # one read: the loop may replace the list
        if branches and push.branch and push.branch not in branches:
            return Outcome(202, f"nothing to do: {told}, a branch not watched")
        if not self.pending.add(index, watch, push):
            return Outcome(503, "too many branches wait for the observer already; send it again")
        self._wake()
        return Outcome(202, f"queued: {told}")

    def _wake(self) -> None:
        try:
            self.broker.call_threadsafe(lambda: None)
        except BrokerError:
            pass  # not connected: the loop takes the queue once it is, after a full poll

    def run(self) -> int:
        def poll() -> bool:
            started = time.monotonic()
            try:
                self.poll_once()
            except BrokerError:
                raise  # the broker's loop reconnects; the cursor says where to go on
            except Exception as exc:  # noqa: BLE001 - a poll that fails is followed by the next one
                log.error("poll failed: %s", _unexpected(exc))
            # Keep the connection serviced while waiting for the next poll,
            # and take what the receiver was told as soon as it wakes us.
            while not self.stopping:
                self.handle_pushes()
                left = self.s.poll - (time.monotonic() - started)
                if left <= 0:
                    return False
                self.broker.process(min(left, 0.5))
            return True

        if self.receiver is not None:
            self.receiver.start()
        try:
            self.broker.run(self.broker.declare_commit_path, poll, stopping=lambda: self.stopping)
        finally:
            if self.receiver is not None:
                self.receiver.close()
            self.cursor.close()
            for watch in self.watches:
                watch.repo.close()
            self.broker.close()
        return 0

    def poll_once(self) -> int:
        """Fetch each repository once and publish what is new; returns how many were published.

        Broker errors leave (the caller reconnects and polls again, and the
        cursor says where to go on); anything else is this repository's or
        this branch's problem, logged, and the loop goes on with the next.
        """
        published = 0
        failing: dict[str, str] = {}
        try:
            for watch in self.watches:
                if self.stopping:
                    break
                # A push told meanwhile does not wait for the rest of a long poll.
                published += self.handle_pushes()
                url = watch.repo.url
                try:
                    watch.repo.fetch()
                    if not watch.branches:
                        watch.branches = [watch.repo.default_branch()]
                except RepoError as exc:
                    failing[f"repo {url}"] = self._repo_failed(watch, str(exc))
                    continue
                except Exception as exc:  # noqa: BLE001 - one repository must not stop the others
                    failing[f"repo {url}"] = self._repo_failed(watch, _unexpected(exc))
                    continue
                if watch.problem is not None:
                    log.info("repo=%s readable again", url)
                    watch.problem = None
                for branch in watch.branches:
                    if self.stopping:
                        break
                    try:
                        published += self._poll_branch(watch, branch)
                    except BrokerError:
                        raise
                    except BranchMissing:
                        self._branch_missing(watch, branch)
                    except Exception as exc:  # noqa: BLE001 - nor one branch the others
                        reason = str(exc) if isinstance(exc, RepoError) else _unexpected(exc)
                        log.error("repo=%s branch=%s skipped this poll: %s", url, branch, reason)
                        failing[f"branch {branch} of {url}"] = reason
        finally:
            self._sync_cursor()
        try:
            write_health(self.s.state_dir, self.s.poll, failing)
        except OSError as exc:
            log.warning("cannot write the health file in %s: %s", self.s.state_dir, exc)
        return published

    def handle_pushes(self) -> int:
        """Look at each branch the receiver queued, as a poll would (a fetch
        first, once per repository); how many commits were published.

        Broker errors leave, and what was still queued is dropped: after
        reconnecting the loop polls everything. Anything else is one line.
        """
        pushes = self.pending.take()
        if not pushes:
            return 0
        published, fetched, unreadable = 0, set(), set()
        try:
            for watch, push in pushes:
                if self.stopping:
                    break
                url = watch.repo.url
                if id(watch) in unreadable:
                    continue
                if id(watch) not in fetched:
                    try:
                        watch.repo.fetch()
                        if not watch.branches:
                            watch.branches = [watch.repo.default_branch()]
                    except Exception as exc:  # noqa: BLE001 - the next poll tries again
                        reason = str(exc) if isinstance(exc, RepoError) else _unexpected(exc)
                        log.warning("repo=%s cannot be read for a %s push: %s", url, push.source, reason)
                        unreadable.add(id(watch))
                        continue
                    fetched.add(id(watch))
                # A hook that named no branch asks for every branch watched.
                for branch in [push.branch] if push.branch else list(watch.branches):
                    published += self._push_branch(watch, branch, push.source)
        finally:
            self._sync_cursor()
        return published

    def _push_branch(self, watch: Watch, branch: str, source: str) -> int:
        url = watch.repo.url
        if branch not in watch.branches:
            log.info("repo=%s branch=%s not watched; %s push ignored", url, branch, source)
            return 0
        try:
            count = self._poll_branch(watch, branch, source)
        except BrokerError:
            raise
        except BranchMissing:
            self._branch_missing(watch, branch)
            return 0
        except Exception as exc:  # noqa: BLE001 - one branch must not stop the others
            reason = str(exc) if isinstance(exc, RepoError) else _unexpected(exc)
            log.error("repo=%s branch=%s %s push not acted on: %s", url, branch, source, reason)
            return 0
        if count == 0:
            log.info("repo=%s branch=%s %s push: nothing new", url, branch, source)
        return count

    def _poll_branch(self, watch: Watch, branch: str, source: str = "poll") -> int:
        repo, url = watch.repo, watch.repo.url
        head = repo.head(branch)
        if branch in watch.missing:
            watch.missing.discard(branch)
            log.info("repo=%s branch=%s found at commit=%s", url, branch, head[:12])
        last = self.cursor.get(url, branch)
        if last == head:
            return 0
        if last is None:
            # First sight of a branch: its head only, not its whole history.
            return self._publish(watch, branch, head, iter([head]), source)
        if not self.cursor.knows(url, branch, head) and all(
            self.cursor.knows(url, branch, parent) for parent in repo.parents(head)
        ):
            # The usual case, one commit on top of published ones: everything
            # below the head is known, so the head is all that is new. Spares
            # the two git processes below, a good part of a push's latency.
            return self._publish(watch, branch, head, iter([head]), source)
        known = repo.existing(self.cursor.published(url, branch))
        if not known:
            log.warning(
                "repo=%s branch=%s none of the commits published before is in the repository any more "
                "(history rewritten and pruned); publishing the head only: commit=%s",
                url,
                branch,
                head[:12],
            )
            return self._publish(watch, branch, head, iter([head]), source)
        with repo.walk(head, known) as commits:
            return self._publish(watch, branch, head, commits, source)

    def _publish(self, watch: Watch, branch: str, head: str, commits: Iterator[str], source: str = "poll") -> int:
        url, count = watch.repo.url, 0
        for commit in commits:
            if self.stopping:
                return count  # the cursor has what was published; the rest waits for the next start
            asks, about = watch.repo.asks_at(commit), watch.repo.about_at(commit)
            publish_commit(self.broker, url, branch, commit, source=source, asks=asks, about=about)
            self.cursor.record(url, branch, commit)
            count += 1
            log.info("repo=%s branch=%s commit=%s published", url, branch, commit[:12])
            if count % PAGE == 0:
                self.cursor.sync()
        self.cursor.set(url, branch, head)  # all of it is published: nothing to walk next time
        if count > PAGE:
            log.info("repo=%s branch=%s published %d commits up to commit=%s", url, branch, count, head[:12])
        return count

    def _sync_cursor(self) -> None:
        try:
            self.cursor.sync()
        except OSError as exc:
            # What was published is published; at worst it is published again.
            log.error("cannot write the observer's cursor in %s: %s", self.s.state_dir, exc)

    def _repo_failed(self, watch: Watch, reason: str) -> str:
        if reason != watch.problem:  # once per cause, not once per poll
            log.warning("repo=%s cannot be read (tried again every poll): %s", watch.repo.url, reason)
            watch.problem = reason
        return reason

    def _branch_missing(self, watch: Watch, branch: str) -> None:
        if branch not in watch.missing:
            log.warning("repo=%s branch=%s not found; watching for it to appear", watch.repo.url, branch)
            watch.missing.add(branch)


def normalized_name(repo: str) -> str:
    """A repository as a request named it, fit for a log line (no password)."""
    from common.naming import normalize_repo

    try:
        return normalize_repo(repo)[:200]
    except ValueError:
        return "an unusable repository name"


def _unexpected(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {one_line(exc)}"
