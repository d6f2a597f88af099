"""Nothing lost, nothing doubled: each delivery rule proven by breaking something on purpose."""

from __future__ import annotations

import json
import signal
import time
from datetime import datetime

from support import alive, overlapping, overlaps, per_commit_suite, pids, suite

from common import naming
from common.health import HEALTH_FILE
from observer.publish import publish_commit


def _epoch(iso: str) -> float:
    return datetime.fromisoformat(iso.replace("Z", "+00:00")).timestamp()


def last_poll(state_dir) -> float:
    """When the observer with this state dir last finished a poll (its health file)."""
    try:
        return float(json.loads((state_dir / HEALTH_FILE).read_text())["at"])
    except (OSError, ValueError, KeyError):
        return 0.0


def kinds(row: dict) -> list[str]:
    return [e["kind"] for e in row["history"]]


def runner_of(volt, job_id: str) -> str | None:
    for r in volt.ask("status")["runners"]:
        if r["job_id"] == job_id:
            return r["runner_id"]
    return None


def test_runner_killed_mid_job_is_lost_and_its_job_reassigned(volt, repo, tmp_path):
    marker = tmp_path / "runs"
    sha = repo.commit(suite(marker, first_sleep=120))
    volt.dispatcher()
    volt.runner("kill-a", heartbeat=1.0)
    volt.runner("kill-b", heartbeat=1.0)
    volt.wait_for("both runners", lambda: len(volt.ask("status")["runners"]) == 2)
    volt.run("notify", "--repo", str(repo.path), "--branch", "main", "--commit", sha)
    volt.wait_for("the first run to start", lambda: len(pids(marker)) == 1)
    (job,) = volt.ask("status")["running"]
    victim = volt.wait_for("the job's runner", lambda: runner_of(volt, job["job_id"]))
    test_pid = pids(marker)[0]

    killed_at = time.time()
    volt.kill(victim, signal.SIGKILL)
    (row,) = volt.wait_results(1, timeout=30)

    assert row["status"] == "passed" and row["attempts"] == 2
    assert row["runner"] != victim
    lost = next(e for e in row["history"] if e["kind"] == "lost")
    assert f"runner {victim} lost (no heartbeat" in lost["reason"]
    assert f"runner {victim} lost" in row["reason"]
    assert kinds(row).count("result") == 1
    reassigned = next(e for e in row["history"] if e["kind"] == "assigned" and e["attempt"] == 2)
    recovery = _epoch(reassigned["at"]) - killed_at
    print(f"kill to re-assignment: {recovery:.2f}s with a 1s heartbeat")
    assert recovery < 5
    # The killed runner's test process died with it.
    volt.wait_for("the orphaned test process to die", lambda: not alive(test_pid), timeout=5)


def test_runner_restarted_with_its_id_runs_nothing_twice_and_late_results_stay_history(volt, repo, tmp_path):
    marker = tmp_path / "runs"
    sha = repo.commit(suite(marker, first_sleep=4, later_sleep=0))
    volt.dispatcher()
    volt.runner("same-a", heartbeat=0.5)
    volt.wait_for("runner", lambda: volt.ask("status")["runners"])
    volt.run("notify", "--repo", str(repo.path), "--branch", "main", "--commit", sha)
    volt.wait_for("the first run to start", lambda: len(pids(marker)) == 1)

    # A second process on the same id is refused while the first lives: on the
    # same workspace (its lock), and on another one (its queue is in exclusive use).
    clash = volt.run("runner", "--id", "same-a", "--workdir", str(tmp_path / "same-a"))
    assert clash.returncode == 2 and "another runner is using" in clash.stderr
    clash = volt.run("runner", "--id", "same-a", "--workdir", str(tmp_path / "elsewhere"))
    assert clash.returncode == 2, clash.stderr
    last = clash.stderr.strip().splitlines()[-1]
    assert last.startswith("volt runner: another runner with id 'same-a' is running"), clash.stderr
    assert "Traceback" not in clash.stderr

    # Freeze the runner past its heartbeat timeout: its attempt is given to
    # another, and its watchdog kills the frozen attempt's test before that.
    first_pid = pids(marker)[0]
    volt.procs["same-a"].send_signal(signal.SIGSTOP)
    volt.runner("same-b", heartbeat=0.5)
    (row,) = volt.wait_results(1, timeout=30)
    assert row["runner"] == "same-b" and row["attempts"] == 2
    assert not alive(first_pid)
    assert overlaps(marker) == [] and len(pids(marker)) == 2
    # Thawed, the first runner finds its lease gone: it gives the attempt up, kept as history only.
    volt.procs["same-a"].send_signal(signal.SIGCONT)

    def given_up() -> dict | None:
        (r,) = volt.results()
        return r if "late_abandoned" in kinds(r) else None

    row = volt.wait_for("the thawed runner to give its attempt up", given_up, timeout=30)
    assert row["runner"] == "same-b" and row["attempts"] == 2 and row["status"] == "passed"
    assert kinds(row).count("result") == 1 and "late_result" not in kinds(row)
    late_event = next(e for e in row["history"] if e["kind"] == "late_abandoned")
    assert late_event["attempt"] == 1 and late_event["runner"] == "same-a"
    assert late_event["reason"] == "lease lost"

    # Killed and restarted under its id: the new session takes nothing of the old.
    marker2 = tmp_path / "runs2"
    sha2 = repo.commit(suite(marker2, first_sleep=120))
    volt.kill("same-b")
    volt.wait_for("same-b to be lost", lambda: [r["runner_id"] for r in volt.ask("status")["runners"]] == ["same-a"])
    volt.run("notify", "--repo", str(repo.path), "--branch", "main", "--commit", sha2)
    volt.wait_for("the long run to start", lambda: len(pids(marker2)) == 1)
    first_pid = pids(marker2)[0]
    volt.kill("same-a")
    volt.runner("same-a", heartbeat=0.5)
    rows = volt.wait_results(2, timeout=30)
    row2 = next(r for r in rows if r["commit"] == sha2)
    assert row2["status"] == "passed" and row2["attempts"] == 2
    assert "runner restarted" in row2["reason"]
    assert not alive(first_pid)
    assert kinds(row2).count("result") == 1


def test_a_job_whose_runners_keep_dying_ends_as_error_after_the_retry_limit(volt, repo, tmp_path):
    marker = tmp_path / "runs"
    # The suite kills the runner that runs it (its parent), every time.
    murder = "import signal; os.kill(os.getppid(), signal.SIGKILL)"
    sha = repo.commit(suite(marker, first_sleep=30, later_sleep=30, extra=murder))
    volt.dispatcher()
    for i in range(4):
        volt.runner(f"doomed-{i}", heartbeat=0.5)
    volt.wait_for("four runners", lambda: len(volt.ask("status")["runners"]) == 4)
    volt.run("notify", "--repo", str(repo.path), "--branch", "main", "--commit", sha)
    (row,) = volt.wait_results(1, timeout=60)
    assert row["status"] == "error" and row["attempts"] == 3
    assert "gave up after 3 lost attempt(s)" in row["reason"]
    assert kinds(row).count("lost") == 3 and kinds(row).count("result") == 1
    assert len(pids(marker)) == 3
    survivors = [r["runner_id"] for r in volt.ask("status")["runners"]]
    assert len(survivors) == 1  # the fourth runner never got the job


def test_a_job_for_a_runner_whose_queue_vanished_goes_to_the_next_runner_at_once(volt, repo, tmp_path):
    sha = repo.commit({"tests/test_one.py": "def test_one():\n    pass\n"})
    volt.dispatcher()
    # A runner that still counts as live (a slow heartbeat) but whose queue is gone.
    volt.runner("vanished", heartbeat=10.0)
    volt.wait_for("the runner", lambda: volt.ask("status")["runners"])
    volt.procs["vanished"].send_signal(signal.SIGSTOP)
    volt.broker.delete_queue(naming.runner_queue(volt.ns, "vanished"))
    volt.run("notify", "--repo", str(repo.path), "--branch", "main", "--commit", sha)
    volt.wait_for(
        "the publish to the missing queue to be refused",
        lambda: any(e["kind"] == "unroutable" for r in volt.results(done_only=False) for e in r["history"]),
        timeout=15,
    )
    # The runner is dropped at once, not after its heartbeat timeout (30 s here).
    assert volt.ask("status")["runners"] == []
    volt.runner("next", heartbeat=0.5)
    (row,) = volt.wait_results(1, timeout=30)
    assert (row["status"], row["runner"], row["attempts"]) == ("passed", "next", 1)
    unroutable = next(e for e in row["history"] if e["kind"] == "unroutable")
    assert unroutable["reason"] == "runner vanished queue missing"
    volt.procs["vanished"].send_signal(signal.SIGCONT)


def test_runners_whose_queues_are_deleted_declare_them_again_and_take_jobs(volt, repo, tmp_path):
    runs = tmp_path / "runs"
    runs.mkdir()
    shas = [repo.commit(per_commit_suite(runs, sleep=0.2))]
    volt.dispatcher()
    for r in ("qa", "qb"):
        volt.runner(r, heartbeat=0.5)
    volt.wait_for("two runners", lambda: len(volt.ask("status")["runners"]) == 2)
    for r in ("qa", "qb"):  # an operator, or a policy, deletes them
        volt.broker.delete_queue(naming.runner_queue(volt.ns, r))
    for r in ("qa", "qb"):
        volt.wait_for(f"{r} to notice", lambda r=r: "cancelled our consumer" in volt.log_of(r), timeout=15)
        volt.wait_for(
            f"{r}'s queue again, consumed",
            lambda r=r: (depth := volt.broker.queue_depth(naming.runner_queue(volt.ns, r))) and depth[1] == 1,
            timeout=30,
        )
    shas += [repo.commit({"n.txt": str(i)}) for i in range(5)]
    for sha in shas:
        volt.run("notify", "--repo", str(repo.path), "--branch", "main", "--commit", sha)
    rows = volt.wait_results(6, timeout=60)
    assert sorted(r["commit"] for r in rows) == sorted(shas)
    assert {r["status"] for r in rows} == {"passed"}
    assert sorted(f.name for f in runs.iterdir()) == sorted(shas)
    assert all(len(pids(f)) == 1 for f in runs.iterdir()) and not overlapping(runs)
    bounced = [e for r in rows for e in r["history"] if e["kind"] == "unroutable"]
    assert len(bounced) <= 2, bounced  # at most the one sent to each before it noticed


def test_dispatcher_killed_mid_stream_loses_nothing_and_records_each_result_once(volt, repo, tmp_path):
    volt.dispatcher()
    volt.runner("dk-a")
    volt.runner("dk-b")
    volt.wait_for("two runners", lambda: len(volt.ask("status")["runners"]) == 2)
    shas = []
    for i in range(12):
        shas.append(repo.commit(suite(tmp_path / f"runs{i}", first_sleep=0.6), f"c{i}"))
    for sha in shas:  # published at once: the kill must land while jobs still run
        publish_commit(volt.broker, str(repo.path), "main", sha, source="test")
    volt.wait_results(3, timeout=60)
    volt.kill("dispatcher")
    # Runners keep working while it is down; their results wait in the queue.
    down_since = time.monotonic()
    volt.wait_for(
        "results to pile up while the dispatcher is down",
        lambda: volt.broker.queue_depth(naming.dispatcher_results_queue(volt.ns))[0] >= 2,  # type: ignore[index]
        timeout=30,
    )
    assert time.monotonic() - down_since < 30
    volt.dispatcher()
    rows = volt.wait_results(12, timeout=90)
    assert sorted(r["commit"] for r in rows) == sorted(shas)
    for row in rows:
        assert row["status"] == "passed", row
        assert kinds(row).count("result") == 1, row
    # Nothing ran twice. (A result may still arrive twice, as history: a kill
    # between the store's commit and the ack delivers it again.)
    total_runs = sum(len(pids(tmp_path / f"runs{i}")) for i in range(12))
    assert total_runs == 12
    assert all(overlaps(tmp_path / f"runs{i}") == [] for i in range(12))


def test_observer_killed_and_restarted_neither_skips_nor_repeats(volt, repo):
    first = repo.commit({"a.txt": "0", ".volt.toml": '[test]\ncommand = ["true"]\n'})
    volt.dispatcher()
    volt.runner("obs-a")
    volt.observer(repo.path)
    volt.wait_results(1, commit=first)
    during = [repo.commit({"a.txt": str(i)}) for i in range(1, 4)]
    volt.wait_results(4)
    volt.kill("observer")
    while_down = [repo.commit({"a.txt": str(i)}) for i in range(4, 9)]
    volt.observer(repo.path)
    rows = volt.wait_results(9, timeout=60)
    assert sorted(r["commit"] for r in rows) == sorted([first, *during, *while_down])
    assert all(r["status"] == "passed" and kinds(r).count("result") == 1 for r in rows)
    # Published oldest first: the jobs were seen in commit order.
    by_seen = [r["commit"] for r in sorted(rows, key=lambda r: r["seen_at"])]
    assert by_seen[-5:] == while_down
    # Let the observer poll a few more times: nothing new must appear.
    polled_before = time.time()
    volt.wait_for("three more polls", lambda: last_poll(volt.tmp / "observer") > polled_before + 0.6)
    assert len(volt.results(done_only=False)) == 9


def test_runner_drains_on_first_sigterm_and_hands_back_on_the_second(volt, repo, tmp_path):
    marker = tmp_path / "runs"
    sha = repo.commit(suite(marker, first_sleep=3))
    volt.dispatcher()
    volt.runner("drain-a")
    volt.wait_for("runner", lambda: volt.ask("status")["runners"])
    volt.run("notify", "--repo", str(repo.path), "--branch", "main", "--commit", sha)
    volt.wait_for("the run to start", lambda: len(pids(marker)) == 1)
    volt.procs["drain-a"].send_signal(signal.SIGTERM)
    assert volt.procs["drain-a"].wait(timeout=30) == 0
    (row,) = volt.results()
    assert row["status"] == "passed" and row["attempts"] == 1 and row["runner"] == "drain-a"
    assert not volt.ask("status")["runners"]  # it said goodbye

    marker2 = tmp_path / "runs2"
    sha2 = repo.commit(suite(marker2, first_sleep=120))
    volt.runner("drain-b")
    volt.wait_for("runner", lambda: volt.ask("status")["runners"])
    volt.run("notify", "--repo", str(repo.path), "--branch", "main", "--commit", sha2)
    volt.wait_for("the long run to start", lambda: len(pids(marker2)) == 1)
    volt.procs["drain-b"].send_signal(signal.SIGTERM)
    volt.wait_for("the first SIGTERM to be taken", lambda: "draining: finishing" in volt.log_of("drain-b"))
    volt.procs["drain-b"].send_signal(signal.SIGTERM)
    assert volt.procs["drain-b"].wait(timeout=30) == 0
    volt.wait_for("the test process to stop", lambda: not alive(pids(marker2)[0]), timeout=10)
    # The job was handed back, not lost: the next runner finishes it.
    volt.runner("drain-c")
    rows = volt.wait_results(2, timeout=30)
    row2 = next(r for r in rows if r["commit"] == sha2)
    assert row2["status"] == "passed" and row2["attempts"] == 2 and row2["runner"] == "drain-c"
    assert "runner left" in row2["reason"]
