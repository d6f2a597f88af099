"""Stopping: a signal ends a worker promptly even with no broker to say goodbye
to, and `volt up`'s Ctrl-C lets the running job finish and be recorded."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time

from support import GitRepo, Volt, commit_suite, jobs_in_store, many_commits, rabbit_node, runs_per_commit

from common.health import HEALTH_FILE


def test_sigterm_ends_idle_workers_within_5s_while_the_broker_is_unreachable(tmp_path):
    repo = GitRepo(tmp_path / "repo")
    repo.commit({".volt.toml": "[test]\ncommand = ['true']\n"})
    with rabbit_node() as node:
        volt = Volt(node.url, "stopping", tmp_path)
        try:
            volt.dispatcher()
            volt.runner("stop-a")
            volt.observer(repo.path)
            volt.wait_for("the runner", lambda: volt.ask("status")["runners"])
            volt.wait_for("the observer's first poll", lambda: (tmp_path / "observer" / HEALTH_FILE).exists())
            volt.wait_results(1)
            volt.broker.close()
            node.stop()
            volt.wait_for(
                "every worker to notice the broker is gone",
                lambda: all("lost the broker" in volt.log_of(name) for name in volt.procs),
                timeout=30,
            )
            signalled = time.monotonic()
            for proc in volt.procs.values():
                proc.send_signal(signal.SIGTERM)
            took = {}
            for name, proc in volt.procs.items():
                try:
                    proc.wait(timeout=max(0.1, signalled + 5 - time.monotonic()))
                except subprocess.TimeoutExpired:
                    pass
                took[name] = time.monotonic() - signalled if proc.poll() is not None else None
            print(f"\nSIGTERM with the broker down: { ({n: t and round(t, 2) for n, t in took.items()}) } s")
            assert all(t is not None for t in took.values()), f"still running 5 s after SIGTERM: {took}"
            assert {name: proc.returncode for name, proc in volt.procs.items()} == dict.fromkeys(volt.procs, 0)
            for name in volt.procs:
                assert "Traceback" not in volt.log_of(name), name
        finally:
            volt.stop_all()


def test_ctrl_c_on_volt_up_drains_its_runners_the_running_job_is_recorded(volt, repo, tmp_path):
    runs = tmp_path / "runs"
    repo.commit(commit_suite(runs, sleep=3))
    (sha,) = many_commits(repo, 1)  # the head the observer first sees
    state = tmp_path / "up"
    volt.runner_ids.add(f"{socket.gethostname().split('.')[0]}-1")  # for the fixture's clean-up
    argv = [sys.executable, "-m", "common.cli", "up", "--repo", str(repo.path), "--runners", "1"]
    argv += ["--poll", "0.2", "--heartbeat-interval", "0.5", "--state-dir", str(state), *volt.common()]
    with open(tmp_path / "up.log", "wb") as out:
        # Its own process group, as a terminal gives it: Ctrl-C reaches every process in it.
        # No sandbox: the suite's run markers live on the host (see Volt.runner).
        env = {**os.environ, "VOLT_SANDBOX": "none"}
        up = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, cwd=tmp_path, start_new_session=True, env=env)
    try:
        volt.wait_for("the job to start", lambda: runs_per_commit(runs).get(sha) == 1, timeout=60)
        os.killpg(up.pid, signal.SIGINT)
        code = up.wait(timeout=30)
    finally:
        if up.poll() is None:
            os.killpg(up.pid, signal.SIGKILL)
            up.wait()
    log = (tmp_path / "up.log").read_text(errors="replace")
    assert jobs_in_store(state / "dispatcher.db") == [(sha, "done", "passed")], log[-3000:]
    assert runs_per_commit(runs) == {sha: 1}
    assert "abandoning the current job" not in log and "stopped by a second signal" not in log
    assert code == 0, log[-3000:]
