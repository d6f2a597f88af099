"""The observer loop: poll each watched branch, publish every new commit in order.

A commit's CommitSeen is confirmed by the broker before the cursor moves past
it, so a crash can repeat a commit (the dispatcher folds repeats into one
job) but never skip one.
"""

from __future__ import annotations

import logging
import signal
import time
from dataclasses import dataclass
from pathlib import Path

from common.broker import Broker
from common.health import write_health
from common.settings import BrokerSettings
from observer.cursor import Cursor
from observer.publish import publish_commit
from observer.repos import RepoError, WatchedRepo

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ObserverSettings:
    broker: BrokerSettings
    repos: tuple[str, ...]
    branches: tuple[str, ...] = ()
    poll: float = 5.0
    state_dir: Path = Path(".volt/observer")


class Observer:
    def __init__(self, settings: ObserverSettings, broker: Broker | None = None) -> None:
        self.s = settings
        self.broker = broker or Broker(settings.broker, "volt-observer")
        self.cursor = Cursor(settings.state_dir / "cursor.json")
        self.watched: list[tuple[WatchedRepo, list[str]]] = []
        self.stopping = False

    def request_stop(self, *_: object) -> None:
        self.stopping = True

    def install_signal_handlers(self) -> None:
        signal.signal(signal.SIGTERM, self.request_stop)
        signal.signal(signal.SIGINT, self.request_stop)

    def open_repos(self) -> None:
        """Open every repository and check its branches; RepoError names the first problem."""
        for url in self.s.repos:
            watched = WatchedRepo(url, self.s.state_dir)
            watched.open()
            branches = list(self.s.branches) or [watched.default_branch()]
            for branch in branches:
                watched.head(branch)
            self.watched.append((watched, branches))
            log.info("watching repo=%s branches=%s", watched.url, ",".join(branches))

    def run(self) -> int:
        def poll() -> bool:
            started = time.monotonic()
            self.poll_once()
            # Keep the connection serviced while waiting for the next poll.
            while not self.stopping:
                left = self.s.poll - (time.monotonic() - started)
                if left <= 0:
                    return False
                self.broker.process(min(left, 0.5))
            return True

        self.broker.run(self.broker.declare_commit_path, poll, stopping=lambda: self.stopping)
        self.broker.close()
        return 0

    def poll_once(self) -> int:
        """Fetch each repository once and publish what is new; returns how many were published."""
        published = 0
        failing: dict[str, str] = {}
        for watched, branches in self.watched:
            try:
                watched.fetch()
                for branch in branches:
                    published += self._publish_new(watched, branch)
            except RepoError as exc:
                log.warning("repo=%s skipped this poll: %s", watched.url, exc)
                failing[f"repo {watched.url}"] = str(exc)
        try:
            write_health(self.s.state_dir, self.s.poll, failing)
        except OSError as exc:
            log.warning("cannot write the health file in %s: %s", self.s.state_dir, exc)
        return published

    def _publish_new(self, watched: WatchedRepo, branch: str) -> int:
        head = watched.head(branch)
        last = self.cursor.get(watched.url, branch)
        if last == head:
            return 0
        # First sight of a branch: its head only, not its whole history.
        commits = [head] if last is None else watched.new_commits(head, last)
        for commit in commits:
            labels = watched.labels_at(commit)
            publish_commit(self.broker, watched.url, branch, commit, source="poll", labels=labels)
            self.cursor.set(watched.url, branch, commit)
            log.info("repo=%s branch=%s commit=%s published", watched.url, branch, commit[:12])
        return len(commits)
