"""What `volt status` says about runners and the jobs that wait."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from support import runner_info

from common.messages import CommitSeen
from dispatcher import queries
from dispatcher.registry import RunnerInfo
from dispatcher.store import JobRow, Store

REPO = "/srv/git/app"


def runner(runner_id: str, state: str = "idle", labels: tuple[str, ...] = ()) -> RunnerInfo:
    return runner_info(runner_id, state, labels)


@pytest.fixture
def store(tmp_path: Path) -> Iterator[Store]:
    s = Store(tmp_path / "volt.db", durable=False)
    yield s
    s.close()


def waiting(store: Store, commit: str, labels: list[str]) -> JobRow:
    row = store.add_job(CommitSeen(repo=REPO, branch="main", commit=commit, seen_at=1.0, labels=labels))
    store.mark_queued(row.job_id, 1, 2.0)
    got = store.get(row.job_id)
    assert got is not None
    return got


def busy_with(store: Store, runner_id: str, commit: str) -> dict[str | None, JobRow]:
    row = waiting(store, commit, [])
    assert store.assign(row.job_id, 1, runner_id, 3.0)
    return {runner_id: row}


def test_a_job_says_why_it_waits(store: Store) -> None:
    gpu = waiting(store, "a" * 40, ["gpu"])
    plain = waiting(store, "b" * 40, [])
    assert queries.why_waiting(gpu, [], {}) == "no live runner has labels gpu"
    assert queries.why_waiting(plain, [], {}) == "no live runner"
    linux = runner("linux", labels=("linux",))
    assert queries.why_waiting(gpu, [linux], {}) == "no live runner has labels gpu"
    assert queries.why_waiting(plain, [linux], {}) == "about to be assigned"
    paused = runner("g1", state="paused", labels=("gpu",))
    assert queries.why_waiting(gpu, [linux, paused], {}) == "every runner with labels gpu is paused or draining"
    working = runner("g2", labels=("gpu", "linux"))
    busy = busy_with(store, "g2", "c" * 40)
    assert (
        queries.why_waiting(gpu, [linux, paused, working], busy) == "waiting for a free runner with labels gpu (1 busy)"
    )


def test_status_lists_parked_jobs_with_the_reason(store: Store) -> None:
    gpu = waiting(store, "a" * 40, ["gpu"])
    assert store.park(gpu.job_id, 1, "no live runner has labels gpu", 3.0)
    data = queries.status(store, "volt", [runner("r1")], now=10.0, depth=lambda name: (0, 1))
    assert data["waiting_count"] == 1
    (job,) = data["waiting"]
    assert (job["job_id"], job["state"], job["why"]) == (gpu.job_id, "parked", "no live runner has labels gpu")


@pytest.mark.parametrize(
    ("state", "has_job", "shown"),
    [
        ("idle", False, "idle"),
        ("busy", True, "busy"),
        ("idle", True, "busy"),
        ("paused", True, "paused"),
        ("draining", False, "draining"),
        ("busy", False, "idle"),
    ],
)
def test_runner_state(state: str, has_job: bool, shown: str) -> None:
    assert queries.runner_state(runner("r", state=state), has_job) == shown
