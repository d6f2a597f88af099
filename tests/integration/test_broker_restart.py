"""A RabbitMQ node of the test's own, stopped and started under a running system."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from support import GitRepo, Node, Volt, alive, overlaps, pids, rabbit_node, suite


@pytest.fixture
def node() -> Iterator[Node]:
    with rabbit_node() as n:
        yield n


def test_every_worker_survives_a_broker_restart_and_loses_nothing(node, tmp_path):
    volt = Volt(node.url, "restart", tmp_path)
    repo = GitRepo(tmp_path / "repo")
    try:
        first = repo.commit({"a.txt": "0", ".volt.toml": '[test]\ncommand = ["true"]\n'})
        volt.dispatcher()
        # Its lease (3 heartbeats) outlasts the slow suite, so the suite may
        # finish while the broker is down; see the next test for one that does not.
        volt.runner("rs-a", heartbeat=3.0)
        volt.observer(repo.path, poll=0.2)
        volt.wait_results(1, commit=first)

        marker = tmp_path / "runs"
        slow = repo.commit(suite(marker, first_sleep=3))
        volt.wait_for("the slow run to start", lambda: len(pids(marker)) == 1)
        volt.broker.close()
        node.stop()
        # While the broker is down: the running job finishes into the outbox,
        # and a new commit waits for the observer to reach the broker.
        outbox = tmp_path / "rs-a" / "outbox"
        volt.wait_for("the result to wait in the outbox", lambda: list(outbox.glob("*.json")), timeout=30)
        during = repo.commit({"a.txt": "2", ".volt.toml": '[test]\ncommand = ["true"]\n'})
        volt.wait_for(
            "every worker to notice the broker is gone",
            lambda: all("lost the broker" in volt.log_of(name) for name in volt.procs),
            timeout=30,
        )
        assert all(p.poll() is None for p in volt.procs.values()), "a worker died with the broker"
        node.start()

        rows = volt.wait_results(3, timeout=90)
        assert sorted(r["commit"] for r in rows) == sorted([first, slow, during])
        for row in rows:
            assert row["status"] == "passed" and row["attempts"] == 1, row
            assert [e["kind"] for e in row["history"]].count("result") == 1
        assert not list(outbox.glob("*.json"))
        assert len(pids(marker)) == 1  # the slow suite ran once
        for name in ("dispatcher", "rs-a", "observer"):
            assert "reconnecting" in volt.log_of(name) or "lost the broker" in volt.log_of(name), name
    finally:
        volt.stop_all()


def test_a_job_whose_lease_runs_out_in_an_outage_is_stopped_then_run_again_never_twice_at_once(node, tmp_path):
    volt = Volt(node.url, "outage", tmp_path)
    repo = GitRepo(tmp_path / "repo")
    try:
        marker = tmp_path / "runs"
        sha = repo.commit(suite(marker, first_sleep=120, later_sleep=0))
        volt.dispatcher()
        volt.runner("out-a", heartbeat=0.5)
        volt.wait_for("the runner", lambda: volt.ask("status")["runners"])
        volt.run("notify", "--repo", str(repo.path), "--branch", "main", "--commit", sha)
        volt.wait_for("the run to start", lambda: len(pids(marker)) == 1)
        first = pids(marker)[0]
        volt.broker.close()
        node.stop()
        # Cut off from the broker, the runner cannot renew its lease: for all it
        # knows the dispatcher gives the job away, so it stops the run itself.
        volt.wait_for("the cut-off run to be stopped", lambda: not alive(first), timeout=10)
        node.start()
        (row,) = volt.wait_results(1, timeout=90)
        assert row["status"] == "passed" and row["attempts"] == 2, row
        assert "runner out-a gave it up: lease lost" in row["reason"]
        assert overlaps(marker) == [] and len(pids(marker)) == 2
        assert [e["kind"] for e in row["history"]].count("result") == 1
    finally:
        volt.stop_all()
