"""Operating a fleet: runner labels, and pausing, resuming and draining a runner."""

from __future__ import annotations

import sys

from support import GitRepo, Volt

QUICK_TEST = {"test_ok.py": "def test_ok():\n    pass\n"}


def needs(*labels: str, sleep: float = 0.0) -> dict[str, str]:
    """A .volt.toml asking for runner labels, with a command that sleeps a little."""
    command = [sys.executable, "-c", f"import time; time.sleep({sleep})"]
    return {".volt.toml": f"[test]\ncommand = {command!r}\nlabels = {list(labels)!r}\n"}


def runner_row(volt: Volt, runner_id: str) -> dict | None:
    return next((r for r in volt.ask("status")["runners"] if r["runner_id"] == runner_id), None)


def notify(volt: Volt, repo: GitRepo, sha: str, *extra: str) -> None:
    done = volt.run("notify", "--repo", str(repo.path), "--branch", "main", "--commit", sha, *extra)
    assert done.returncode == 0, done.stderr


def test_jobs_go_only_to_runners_with_their_labels_and_say_why_they_wait(volt, repo):
    repo.commit(QUICK_TEST, "start")
    volt.dispatcher()
    volt.runner("plain")
    volt.wait_for("the runner", lambda: runner_row(volt, "plain"))
    volt.observer(repo.path)
    volt.wait_results(1)  # the observer's first sight: the head only

    gpu_sha = repo.commit(needs("gpu", "linux"), "needs a gpu runner")
    plain_sha = repo.commit({".volt.toml": None, **QUICK_TEST}, "runs anywhere")
    # The commit behind it is not blocked by the one no runner can take.
    (plain,) = volt.wait_results(1, commit=plain_sha)
    assert (plain["status"], plain["runner"]) == ("passed", "plain")
    # The waiting job is reported at once, with the reason.
    status = volt.ask("status")
    (waiting,) = status["waiting"]
    assert (waiting["commit"], waiting["state"]) == (gpu_sha, "parked")
    assert waiting["why"] == "no live runner has labels gpu, linux"
    assert "no live runner has labels gpu, linux" in volt.log_of("dispatcher")
    shown = volt.run("status")
    assert "(no live runner has labels gpu, linux)" in shown.stdout

    # A runner with only one of the labels does not get it; one with both does.
    volt.runner("half", "--label", "gpu")
    volt.runner("gpu-1", "--label", "gpu", "--label", "linux")
    (row,) = volt.wait_results(1, commit=gpu_sha)
    assert (row["status"], row["runner"], row["attempts"]) == ("passed", "gpu-1", 1)
    assert volt.ask("status")["waiting"] == []

    # `volt notify` reads the labels from the local repository too.
    volt.kill("gpu-1")
    again = repo.commit(needs("linux"), "needs linux")
    notify(volt, repo, again)
    volt.wait_for(
        "the notified job to wait for a linux runner",
        lambda: [w["why"] for w in volt.ask("status")["waiting"]] == ["no live runner has labels linux"],
        timeout=20,
    )


def test_pause_resume_and_drain_a_runner(volt, repo):
    volt.dispatcher()
    volt.runner("r1")
    volt.runner("r2")
    volt.wait_for("both runners", lambda: len(volt.ask("status")["runners"]) == 2)

    paused = volt.run("runner-ctl", "pause", "r1", "--reason", "disk swap")
    assert paused.returncode == 0, paused.stderr
    assert "runner r1: pause sent; now paused" in paused.stdout
    volt.wait_for("r1 to say it is paused", lambda: "told to pause: disk swap" in volt.log_of("r1"))
    shas = [repo.commit(QUICK_TEST | {f"f{i}": str(i)}, f"commit {i}") for i in range(3)]
    for sha in shas:
        notify(volt, repo, sha)
    rows = volt.wait_results(3)
    assert {r["runner"] for r in rows} == {"r2"}
    # A paused runner keeps heartbeating, and says it is paused.
    r1 = runner_row(volt, "r1")
    assert r1 is not None and r1["state"] == "paused" and r1["seconds_since_heartbeat"] < 1.5

    assert volt.run("runner-ctl", "resume", "r1").returncode == 0
    assert volt.run("runner-ctl", "pause", "r2").returncode == 0
    volt.wait_for("r1 to say it is idle", lambda: (runner_row(volt, "r1") or {}).get("state") == "idle")
    sha = repo.commit(QUICK_TEST | {"f": "resumed"}, "after resume")
    notify(volt, repo, sha)
    (row,) = volt.wait_results(1, commit=sha)
    assert row["runner"] == "r1"

    # Drain: the running job finishes and is recorded, then the runner leaves.
    slow = repo.commit(needs(sleep=3), "slow")
    notify(volt, repo, slow)
    volt.wait_for("the slow job to run on r1", lambda: (runner_row(volt, "r1") or {}).get("job_id"))
    drained = volt.run("runner-ctl", "drain", "r1")
    assert drained.returncode == 0 and "now draining" in drained.stdout
    assert volt.procs["r1"].wait(timeout=30) == 0
    (row,) = volt.wait_results(1, commit=slow)
    assert (row["status"], row["runner"], row["attempts"]) == ("passed", "r1", 1)
    volt.wait_for("r1 to leave", lambda: runner_row(volt, "r1") is None)

    unknown = volt.run("runner-ctl", "pause", "nobody")
    assert unknown.returncode == 1
    assert unknown.stderr.strip().splitlines()[-1] == "volt runner-ctl: no live runner 'nobody'"


def test_volt_check_targets_a_runner_an_observer_or_the_system(volt, repo, tmp_path):
    repo.commit(QUICK_TEST, "start")
    down = volt.run("check", "--timeout", "3")
    assert down.returncode == 1 and down.stdout.startswith("unhealthy: ")
    volt.dispatcher()
    volt.runner("hc-1")
    volt.wait_for("the runner", lambda: runner_row(volt, "hc-1"))
    ok = volt.run("check", "--min-runners", "1")
    assert (ok.returncode, ok.stdout.strip()) == (0, "healthy: dispatcher answers, 1 live runner(s)")
    assert volt.run("check", "--min-runners", "2").stdout.strip() == "unhealthy: 1 live runner(s), need 2"

    runner_ok = volt.run("check", "--runner", "hc-1")
    assert runner_ok.returncode == 0 and runner_ok.stdout.startswith("healthy: runner hc-1 idle, last heartbeat")
    local = volt.run("check", "--runner-workdir", str(tmp_path / "hc-1"))
    assert local.returncode == 0 and "heartbeats reach the broker" in local.stdout
    volt.kill("hc-1")
    volt.wait_for("the runner to be lost", lambda: runner_row(volt, "hc-1") is None, timeout=15)
    lost = volt.run("check", "--runner", "hc-1")
    assert lost.returncode == 1
    assert lost.stdout.strip() == "unhealthy: runner hc-1 is not live (the dispatcher has no heartbeat from it)"

    state = tmp_path / "observer"
    volt.observer(repo.path)
    volt.wait_for("the observer to poll", lambda: volt.run("check", "--observer", str(state)).returncode == 0)
    watching = volt.run("check", "--observer", str(state))
    assert watching.stdout.startswith("healthy: observer polled lately")
    # The repository vanishes: the next poll fails, and the check names it.
    (repo.path / ".git").rename(tmp_path / "moved-git")
    volt.wait_for(
        "the check to name the broken repository",
        lambda: (r := volt.run("check", "--observer", str(state))).returncode == 1 and f"repo {repo.path}:" in r.stdout,
        timeout=20,
    )
