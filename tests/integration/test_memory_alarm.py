"""A memory alarm on the broker holds every publish; it must not cost a running job its run."""

from __future__ import annotations

import subprocess

from support import GitRepo, Volt, alive, commit_suite, many_commits, pids, rabbit_node, runs_per_commit


def test_a_run_that_spans_a_memory_alarm_is_neither_stopped_nor_taken_away(tmp_path):
    repo = GitRepo(tmp_path / "repo")
    runs = tmp_path / "runs"
    repo.commit(commit_suite(runs, sleep=4))
    (sha,) = many_commits(repo, 1)
    with rabbit_node() as node:
        volt = Volt(node.url, "alarm", tmp_path)

        def ctl(*args: str) -> None:
            done = subprocess.run(["rabbitmqctl", "-n", node.name, *args], capture_output=True, text=True, timeout=60)
            assert done.returncode == 0, done.stderr

        try:
            volt.dispatcher()
            volt.runner("alarm-a", heartbeat=0.5)  # its lease: 1.5 s without a heartbeat
            volt.wait_for("the runner", lambda: volt.ask("status")["runners"])
            volt.run("notify", "--repo", str(repo.path), "--branch", "main", "--commit", sha)
            volt.wait_for("the run to start", lambda: runs_per_commit(runs).get(sha) == 1)
            (pid,) = pids(runs / sha)
            ctl("set_vm_memory_high_watermark", "absolute", "1")
            try:
                # The runner's next heartbeat meets the alarm, and it must hear so at once.
                volt.wait_for(
                    "the runner to be told it is blocked",
                    lambda: "volt-runner-alarm-a: RabbitMQ blocks publishers" in volt.log_of("alarm-a"),
                    timeout=10,
                )
                # No heartbeat gets through for the rest of the run, over twice the lease.
                volt.wait_for("the run to end", lambda: not alive(pid), timeout=15)
            finally:
                ctl("set_vm_memory_high_watermark", "0.4")
            (row,) = volt.wait_results(1, timeout=30)
        finally:
            volt.stop_all()
    assert (row["status"], row["attempts"]) == ("passed", 1), row
    assert [e["kind"] for e in row["history"]].count("result") == 1
    assert runs_per_commit(runs) == {sha: 1}
    assert "its lease ran out" not in volt.log_of("alarm-a")
    assert "lost (no heartbeat" not in volt.log_of("dispatcher")
