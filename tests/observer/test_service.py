"""The observer's loop, one poll at a time, on real git repositories.

The broker is a fake that keeps what is published (and can fail on purpose);
tests/integration/test_observer.py runs the same things with real processes
and a real RabbitMQ.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from support import GitHttpServer, GitRepo, many_commits

from common.broker import BrokerUnavailable
from common.messages import CommitSeen
from common.settings import BrokerSettings
from observer import cursor as cursor_module
from observer import service as service_module
from observer.repos import RepoError, WatchedRepo
from observer.service import Observer, ObserverSettings

DEEP = "[test]\nlabels = " + "[" * 3000 + "]" * 3000 + "\n"


class FakeBroker:
    """What the observer needs of a Broker: publish, confirmed at once or refused."""

    def __init__(self, fail_on: int | None = None) -> None:
        self.ns = "t"
        self.published: list[CommitSeen] = []
        self.fail_on = fail_on  # the index of the publish that fails (once)
        self.on_publish: Any = None

    def publish(self, exchange: str, routing_key: str, message: CommitSeen) -> None:
        if self.fail_on is not None and len(self.published) == self.fail_on:
            self.fail_on = None
            raise BrokerUnavailable("connection lost")
        self.published.append(message)
        if self.on_publish:
            self.on_publish(message)

    def commits(self, branch: str | None = None) -> list[str]:
        return [m.commit for m in self.published if branch is None or m.branch == branch]


class Run:
    """An observer on a state folder, restartable like the real process."""

    def __init__(self, tmp_path: Path, repos: list[str], branches: tuple[str, ...] = ()) -> None:
        self.state = tmp_path / "observer"
        self.repos = repos
        self.branches = branches
        self.broker = FakeBroker()
        self.observer = self.start()

    def start(self) -> Observer:
        settings = ObserverSettings(
            broker=BrokerSettings(), repos=tuple(self.repos), branches=self.branches, poll=1.0, state_dir=self.state
        )
        observer = Observer(settings, broker=self.broker)  # type: ignore[arg-type]
        observer.open_repos()
        return observer

    def restart(self) -> Observer:
        self.observer.cursor.close()
        self.observer = self.start()
        return self.observer

    def poll(self) -> list[str]:
        """The commits published by one poll."""
        before = len(self.broker.published)
        self.observer.poll_once()
        return [m.commit for m in self.broker.published[before:]]

    def health(self) -> dict[str, Any]:
        return json.loads((self.state / "health.json").read_text())


@pytest.fixture
def run(repo: GitRepo, tmp_path: Path) -> Iterator[Run]:
    repo.commit({"f.txt": "0"}, "first")
    run = Run(tmp_path, [str(repo.path)])
    yield run
    run.observer.cursor.close()


# -- one bad commit never stops it ----------------------------------------------


def test_a_broken_config_is_published_without_labels_and_the_poll_goes_on(
    run: Run, repo: GitRepo, caplog: pytest.LogCaptureFixture
) -> None:
    run.poll()
    deep = repo.commit({".volt.toml": DEEP})
    string = repo.commit({".volt.toml": '[test]\nlabels = "linux"\n'})
    good = repo.commit({".volt.toml": '[test]\nlabels = ["gpu"]\n'})
    with caplog.at_level(logging.WARNING):
        assert run.poll() == [deep, string, good]
    assert [m.labels for m in run.broker.published[-3:]] == [[], [], ["gpu"]]
    reasons = [r.getMessage() for r in caplog.records]
    assert any(deep[:12] in line and "nested too deeply" in line for line in reasons)
    assert any(string[:12] in line and "must be a list of strings" in line for line in reasons)
    # And a restart goes on past them: the cursor moved.
    run.restart()
    assert run.poll() == []


def test_a_polled_commit_is_published_with_its_subject_and_author(run: Run, repo: GitRepo) -> None:
    run.poll()
    sha = repo.commit({"f.txt": "1"}, "Speed up the walk\x1b]0;title\x07\n\nwhy it is faster")
    assert run.poll() == [sha]
    seen = run.broker.published[-1]
    assert (seen.subject, seen.author) == ("Speed up the walk ]0;title", "Volt Test")


def test_a_surprise_in_one_branch_does_not_stop_the_others(
    repo: GitRepo, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    repo.commit({"f.txt": "0"})
    repo.git("branch", "dev")
    run = Run(tmp_path, [str(repo.path)], ("main", "dev"))
    run.poll()
    real_head = WatchedRepo.head

    def head(self: WatchedRepo, branch: str) -> str:
        if branch == "main":
            raise RuntimeError("something nobody planned for")
        return real_head(self, branch)

    monkeypatch.setattr(WatchedRepo, "head", head)
    repo.git("checkout", "-q", "dev")
    on_dev = repo.commit({"f.txt": "dev"})
    with caplog.at_level(logging.ERROR):
        assert run.poll() == [on_dev]
    (line,) = caplog.messages
    assert "branch=main skipped this poll: RuntimeError: something nobody planned for" in line
    assert run.health()["failing"] == {f"branch main of {repo.path}": "RuntimeError: something nobody planned for"}


def test_a_repository_that_fails_does_not_stop_the_others(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    one, two = GitRepo(tmp_path / "one"), GitRepo(tmp_path / "two")
    one.commit({"f": "1"})
    two.commit({"f": "2"})
    run = Run(tmp_path, [str(one.path), str(two.path)])
    run.poll()
    (one.path / ".git").rename(tmp_path / "moved")
    later = two.commit({"f": "3"})
    with caplog.at_level(logging.WARNING):
        assert run.poll() == [later]
        assert run.poll() == []
    (line,) = [r for r in caplog.messages if "cannot be read" in r]  # once, not every poll
    assert str(one.path) in line
    assert run.health()["failing"] == {f"repo {one.path}": f"not a git repository: {one.path}"}
    (tmp_path / "moved").rename(one.path / ".git")
    back = one.commit({"f": "4"})
    assert run.poll() == [back]
    assert run.health()["failing"] == {}


# -- branches come and go ---------------------------------------------------------


def test_a_deleted_branch_is_one_warning_and_the_others_go_on(
    repo: GitRepo, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    repo.commit({"f.txt": "0"})
    repo.git("branch", "feature")
    run = Run(tmp_path, [str(repo.path)], ("feature", "main"))
    run.poll()
    repo.git("branch", "-D", "feature")
    on_main = [repo.commit({"f.txt": str(i)}) for i in range(2)]
    with caplog.at_level(logging.WARNING):
        assert run.poll() == on_main
        assert run.poll() == []
        more = repo.commit({"f.txt": "more"})
        assert run.poll() == [more]
    assert [r for r in caplog.messages if "feature" in r] == [
        f"repo={repo.path} branch=feature not found; watching for it to appear"
    ]
    assert run.health()["failing"] == {}


def test_an_observer_started_before_its_branch_exists_waits_for_it(
    repo: GitRepo, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    repo.commit({"f.txt": "0"})
    with caplog.at_level(logging.INFO):
        run = Run(tmp_path, [str(repo.path)], ("release", "main"))
    assert any("branch=release not found" in m for m in caplog.messages)
    assert run.poll() == [repo.git("rev-parse", "main")]
    repo.git("checkout", "-q", "-b", "release")
    first = [repo.commit({"r.txt": str(i)}) for i in range(3)]
    assert run.poll() == [first[-1]]  # first sight: the head only
    later = repo.commit({"r.txt": "later"})
    assert run.poll() == [later]


def test_a_branch_that_comes_back_publishes_what_it_never_published(repo: GitRepo, run: Run) -> None:
    repo.git("checkout", "-q", "-b", "keep")  # the checkout must not be on the branch we delete
    run.poll()
    repo.git("branch", "-D", "main")
    run.poll()
    repo.git("checkout", "-q", "-b", "main")
    again = repo.commit({"f.txt": "again"})
    assert run.poll() == [again]


def test_an_unreachable_server_at_start_is_tried_again_every_poll(
    repo: GitRepo, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    head = repo.commit({"f.txt": "0"})
    server = GitHttpServer(tmp_path / "srv")
    try:
        with caplog.at_level(logging.WARNING):
            run = Run(tmp_path, [server.url("app.git")])
            assert run.poll() == []
        assert run.health()["failing"] == {f"repo {server.url('app.git')}": run.health()["failing"].popitem()[1]}
        subprocess.run(["git", "clone", "-q", "--bare", str(repo.path), str(tmp_path / "srv" / "app.git")], check=True)
        assert run.poll() == [head]
        assert run.health()["failing"] == {}
        assert len([m for m in caplog.messages if "cannot be read" in m]) == 1
    finally:
        server.close()


def test_a_local_path_that_is_no_repository_at_start_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(RepoError, match="repository not found"):
        Run(tmp_path, [str(tmp_path / "typo")])


# -- every commit, oldest first, no cap ----------------------------------------------


def test_a_long_push_is_published_whole_in_pages(run: Run, repo: GitRepo, monkeypatch: pytest.MonkeyPatch) -> None:
    run.poll()
    synced: list[int] = []
    real_fsync = os.fsync
    monkeypatch.setattr(cursor_module.os, "fsync", lambda fd: (synced.append(fd), real_fsync(fd)))
    pushed = many_commits(repo, 1500)
    started = time.perf_counter()
    assert run.poll() == pushed
    elapsed = time.perf_counter() - started
    assert len(synced) <= 1500 // service_module.PAGE + 1
    print(f"1500 commits: {elapsed:.2f}s in poll_once, {len(synced)} fsyncs")
    run.restart()
    assert run.poll() == []


def test_a_broker_failure_mid_push_repeats_nothing_and_skips_nothing(run: Run, repo: GitRepo) -> None:
    run.poll()
    pushed = many_commits(repo, 600)
    run.broker.fail_on = len(run.broker.published) + 400
    with pytest.raises(BrokerUnavailable):
        run.poll()
    run.poll()  # what the loop does after reconnecting
    assert run.broker.commits()[-600:] == pushed


def test_a_stop_mid_push_goes_on_at_the_next_start(run: Run, repo: GitRepo) -> None:
    run.poll()
    pushed = many_commits(repo, 700)
    count = 0

    def stop_after_300(_: CommitSeen) -> None:
        nonlocal count
        count += 1
        if count == 300:
            run.observer.request_stop()

    run.broker.on_publish = stop_after_300
    assert run.poll() == pushed[:300]
    run.broker.on_publish = None
    run.restart()  # killed, not only stopped, would do the same: the journal has every confirmed one
    assert run.poll() == pushed[300:]


def test_a_merge_publishes_the_merged_side_too(run: Run, repo: GitRepo) -> None:
    run.poll()
    repo.git("checkout", "-q", "-b", "side")
    side = [repo.commit({"side.txt": str(i)}) for i in range(2)]
    repo.git("checkout", "-q", "main")
    on_main = repo.commit({"main.txt": "m"})
    repo.git("merge", "-q", "--no-ff", "-m", "merge", "side")
    merge = repo.git("rev-parse", "HEAD")
    published = run.poll()
    assert sorted(published) == sorted([*side, on_main, merge]) and published[-1] == merge


# -- rewritten history ----------------------------------------------------------------


def _prune(repo: GitRepo) -> None:
    repo.git("reflog", "expire", "--expire=now", "--all")
    repo.git("gc", "-q", "--prune=now")


def test_a_force_push_publishes_every_rewritten_commit_once(run: Run, repo: GitRepo) -> None:
    base = repo.git("rev-parse", "HEAD")
    run.poll()
    old = [repo.commit({"f.txt": f"old {i}"}) for i in range(3)]
    assert run.poll() == old
    repo.git("reset", "-q", "--hard", base)
    new = [repo.commit({"f.txt": f"new {i}"}) for i in range(4)]
    _prune(repo)
    with pytest.raises(subprocess.CalledProcessError):
        repo.git("cat-file", "-e", old[-1])  # the old head is gone
    assert run.poll() == new
    assert run.poll() == []
    published = run.broker.commits()
    assert len(published) == len(set(published))


def test_a_branch_reset_to_a_commit_it_published_publishes_nothing(run: Run, repo: GitRepo) -> None:
    run.poll()
    commits = [repo.commit({"f.txt": str(i)}) for i in range(3)]
    run.poll()
    repo.git("reset", "-q", "--hard", commits[0])
    assert run.poll() == []
    again = repo.commit({"f.txt": "again"})
    assert run.poll() == [again]


def test_when_nothing_it_knows_is_left_it_publishes_the_head_with_a_warning(
    run: Run, repo: GitRepo, caplog: pytest.LogCaptureFixture
) -> None:
    run.poll()
    repo.git("checkout", "-q", "--orphan", "fresh")
    repo.git("rm", "-rq", "--cached", ".")
    fresh = [repo.commit({"g.txt": str(i)}) for i in range(3)]
    repo.git("branch", "-M", "fresh", "main")
    _prune(repo)
    with caplog.at_level(logging.WARNING):
        assert run.poll() == [fresh[-1]]
    assert any("publishing the head only" in m for m in caplog.messages)


# -- identities and credentials ------------------------------------------------------------


def test_every_name_of_one_repository_shares_one_memory(repo: GitRepo, tmp_path: Path) -> None:
    repo.commit({"f.txt": "0"})
    run = Run(tmp_path, [f"file://{repo.path}/"])
    assert len(run.poll()) == 1
    assert run.broker.published[0].repo == str(repo.path)
    run.repos = [f"{repo.path.parent}/x/../{repo.path.name}"]
    run.restart()
    assert run.poll() == []  # the same repository: nothing new


def test_a_password_reaches_git_and_nothing_else(repo: GitRepo, tmp_path: Path) -> None:
    password = "pa55-w0rd-s3cret"
    head = repo.commit({"f.txt": "0"})
    subprocess.run(["git", "clone", "-q", "--bare", str(repo.path), str(tmp_path / "srv" / "app.git")], check=True)
    server = GitHttpServer(tmp_path / "srv", "ci", password)
    try:
        run = Run(tmp_path, [server.url("app.git", "ci", password)])
        assert run.poll() == [head]
        (seen,) = run.broker.published
        assert seen.repo == server.url("app.git")
        assert password not in seen.to_json().decode()
        run.observer.cursor.compact()
        for path in run.state.rglob("*"):
            if path.is_file():
                assert password.encode() not in path.read_bytes(), path
    finally:
        server.close()
