"""The backlog queue purged while jobs wait in it: the store still has them
as queued, so the dispatcher publishes them again, and each ends with one result."""

from __future__ import annotations

import subprocess
from collections import Counter

from support import all_overlaps, commit_suite, many_commits, runs_per_commit

from common import naming
from common.broker import purge_counted
from observer.publish import publish_commit

WAITING = 10


def backlog_ready(volt) -> int:
    depth = volt.broker.queue_depth(naming.backlog_queue(volt.ns))
    return depth[0] if depth else 0


def test_jobs_purged_from_the_backlog_are_published_again_and_each_ends_with_one_result(volt, repo, tmp_path):
    runs = tmp_path / "runs"
    volt.dispatcher()
    volt.runner("purge-a")
    volt.wait_for("the runner", lambda: volt.ask("status")["runners"])
    broker = volt.broker
    backlog = naming.backlog_queue(volt.ns)
    expected: list[str] = []

    # 1. Under a running dispatcher, while its only runner is busy: purged
    # through the broker's API.
    hog = repo.commit(commit_suite(runs, sleep=2), "hog")
    publish_commit(broker, str(repo.path), "main", hog, source="purge")
    volt.wait_for("the hog to run", lambda: (runs / hog).exists())
    repo.commit(commit_suite(runs), "fast")
    waiting = many_commits(repo, WAITING)
    for sha in waiting:
        publish_commit(broker, str(repo.path), "main", sha, source="purge")
    volt.wait_for("the jobs to wait in the backlog", lambda: backlog_ready(volt) == WAITING, timeout=30)
    assert purge_counted(broker, backlog) == WAITING
    expected += [hog, *waiting]
    volt.wait_results(len(expected), timeout=60)
    assert "queued job(s) had no backlog message; published them again" in volt.log_of("dispatcher")

    # 2. While the dispatcher is down, by the operator's tool: the dispatcher
    # that starts finds the backlog empty and its store full of queued jobs.
    hog2 = repo.commit(commit_suite(runs, sleep=2), "hog 2")
    publish_commit(broker, str(repo.path), "main", hog2, source="purge")
    volt.wait_for("the second hog to run", lambda: (runs / hog2).exists())
    repo.commit(commit_suite(runs), "fast 2")
    waiting2 = many_commits(repo, WAITING)
    for sha in waiting2:
        publish_commit(broker, str(repo.path), "main", sha, source="purge")
    volt.wait_for("the jobs to wait in the backlog", lambda: backlog_ready(volt) == WAITING, timeout=30)
    volt.kill("dispatcher")
    purged = subprocess.run(["rabbitmqctl", "purge_queue", backlog], capture_output=True, text=True, timeout=60)
    assert purged.returncode == 0, purged.stderr
    assert backlog_ready(volt) == 0
    volt.dispatcher()
    expected += [hog2, *waiting2]
    rows = volt.wait_results(len(expected), timeout=60)

    assert sorted(r["commit"] for r in rows) == sorted(expected)
    assert len(volt.results(done_only=False)) == len(expected)
    assert Counter(sum(e["kind"] == "result" for e in r["history"]) for r in rows) == {1: len(expected)}
    assert Counter(r["status"] for r in rows) == {"passed": len(expected)}
    assert all(r["attempts"] == 1 for r in rows)
    assert all_overlaps(runs) == {} and Counter(runs_per_commit(runs).values()) == {1: len(expected)}
    assert volt.log_of("dispatcher").count("published them again") == 2
