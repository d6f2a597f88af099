"""Bad input never stops a worker: it is dead-lettered with its reason, or refused in one line."""

from __future__ import annotations

import json

from common import naming

PASS = "def test_one():\n    assert True\n"


def _dead_letters(volt, expected: int) -> list[tuple[str, str, bytes]]:
    found: list[tuple[str, str, bytes]] = []

    def drain() -> bool:
        while (d := volt.broker.get(naming.dead_letter_queue(volt.ns))) is not None:
            found.append((d.headers["x-volt-queue"], d.headers["x-volt-reason"], d.body))
            d.ack()
        return len(found) >= expected

    volt.wait_for(f"{expected} dead letters", drain, timeout=30)
    return found


def test_malformed_messages_go_to_the_dead_letter_queue_and_workers_keep_going(volt, repo, tmp_path):
    pwned = tmp_path / "pwned"
    sha = repo.commit({"tests/test_main.py": PASS})
    volt.dispatcher()
    volt.runner("bad-1")
    volt.wait_for("runner to register", lambda: volt.ask("status")["runners"])
    ns, b = volt.ns, volt.broker
    hostile_job = {"type": "job", "schema_version": 1, "job_id": "j", "attempt": 1, "repo": "r",
                   "branch": "main", "commit": f"$(touch {pwned})"}  # fmt: skip
    b.publish(naming.commits_exchange(ns), "", b"\xff\xfe not json")
    b.publish(naming.control_exchange(ns), "", json.dumps({"type": "telepathy", "schema_version": 1}).encode())
    b.publish(naming.results_exchange(ns), "", json.dumps({"type": "job_result", "schema_version": 99}).encode())
    b.publish(naming.rpc_exchange(ns), "", json.dumps({"type": "request", "schema_version": 1, "method": 7}).encode())
    b.publish(naming.jobs_exchange(ns), naming.runner_routing_key("bad-1"), json.dumps(hostile_job).encode())
    b.publish(naming.jobs_exchange(ns), naming.runner_routing_key("bad-1"), b"[1, 2, 3]")

    letters = _dead_letters(volt, 6)
    by_queue = {queue: reason for queue, reason, _ in letters}
    assert "not UTF-8 JSON" in by_queue[naming.dispatcher_commits_queue(ns)]
    assert "unknown message type 'telepathy'" in by_queue[naming.dispatcher_control_queue(ns)]
    assert "unknown schema_version 99" in by_queue[naming.dispatcher_results_queue(ns)]
    assert "wrong type" in by_queue[naming.dispatcher_rpc_queue(ns)]
    runner_reasons = [r for q, r, _ in letters if q == naming.runner_queue(ns, "bad-1")]
    assert any("not a commit id" in r for r in runner_reasons)
    assert any("not a JSON object" in r for r in runner_reasons)
    assert not pwned.exists()

    # Both workers are alive and still do their job.
    assert volt.procs["dispatcher"].poll() is None and volt.procs["bad-1"].poll() is None
    notify = volt.run("notify", "--repo", str(repo.path), "--branch", "main")
    assert notify.returncode == 0, notify.stderr
    (row,) = volt.wait_results(1)
    assert row["commit"] == sha and row["status"] == "passed"


def _one_clear_line(proc) -> str:
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    return lines[0]


def test_bad_commit_repo_and_branch_are_one_clear_line(volt, repo, tmp_path):
    repo.commit({"tests/test_main.py": PASS})
    line = _one_clear_line(
        volt.run("notify", "--repo", str(repo.path), "--branch", "main", "--commit", "$(touch /tmp/x)")
    )
    assert "not a commit id" in line
    line = _one_clear_line(volt.run("notify", "--repo", str(repo.path), "--branch", "main", "--commit", "abc123"))
    assert "not a commit id" in line
    line = _one_clear_line(volt.run("observer", "--repo", str(tmp_path / "nowhere")))
    assert "repository not found" in line
    # A missing branch does not stop an observer (tests/integration/test_observer.py); a bad name does.
    line = _one_clear_line(volt.run("observer", "--repo", str(repo.path), "--branch", "main~3"))
    assert "not a branch name" in line
    line = _one_clear_line(volt.run("notify", "--repo", str(repo.path), "--branch", "no-such-branch"))
    assert "branch 'no-such-branch' not found" in line
    line = _one_clear_line(volt.run("up", "--repo", str(tmp_path / "nowhere")))
    assert "repository not found" in line
    line = _one_clear_line(volt.run("runner", "--id", "bad id!"))
    assert "runner id" in line


def test_unreachable_broker_is_one_clear_line(tmp_path):
    import subprocess
    import sys

    proc = subprocess.run(
        [sys.executable, "-m", "common.cli", "status", "--amqp-url", "amqp://guest:secret@127.0.0.1:1/%2F"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 1
    assert "Traceback" not in proc.stderr and "secret" not in proc.stderr
    assert "cannot reach RabbitMQ" in proc.stderr
