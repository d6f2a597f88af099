"""The whole system with real processes: a dispatcher, two runners and an observer."""

from __future__ import annotations

import json

import pytest

from common import naming

PASS = "def test_one():\n    assert True\n"
PASS3 = "def test_a():\n    pass\n\ndef test_b():\n    pass\n\ndef test_c():\n    pass\n"
FAIL = "def test_ok():\n    pass\n\ndef test_bad():\n    assert 1 == 2\n"
FAIL2 = "def test_x():\n    assert 0\n\ndef test_y():\n    assert 0\n\ndef test_z():\n    pass\n"
SYNTAX = "def test_broken(:\n    pass\n"
HANG = "import time\n\ndef test_hangs():\n    time.sleep(120)\n"
SKIP = "import pytest\n\ndef test_a():\n    pass\n\n@pytest.mark.skip(reason='later')\ndef test_b():\n    pass\n"
SHORT_TIMEOUT = "[test]\ntimeout = 2\n"
MISSING_COMMAND = '[test]\ncommand = "volt-no-such-command --all"\n'

# (test file, .volt.toml, status, passed, failed, errors, skipped)
BURST = [
    (PASS, None, "passed", 1, 0, 0, 0),
    (FAIL, None, "failed", 1, 1, 0, 0),
    (PASS3, None, "passed", 3, 0, 0, 0),
    (SYNTAX, None, "error", 0, 0, 1, 0),
    (HANG, SHORT_TIMEOUT, "timeout", 0, 0, 0, 0),
    (SKIP, None, "passed", 1, 0, 0, 1),
    (FAIL2, None, "failed", 1, 2, 0, 0),
    (PASS, MISSING_COMMAND, "error", 0, 0, 0, 0),
    (PASS3, None, "passed", 3, 0, 0, 0),
    (FAIL, None, "failed", 1, 1, 0, 0),
]


def test_burst_of_commits_each_gets_exactly_one_right_result(volt, repo):
    first = repo.commit({"tests/test_main.py": PASS}, "initial")
    volt.dispatcher()
    for rid in ("e2e-a", "e2e-b"):
        volt.runner(rid, "--job-timeout", "60", "--kill-grace", "1", "--allow-repo", str(repo.path))
    volt.observer(repo.path)
    volt.wait_results(1, commit=first)

    expected = {}
    for i, (test, config, *outcome) in enumerate(BURST):
        sha = repo.commit({"tests/test_main.py": test, ".volt.toml": config}, f"burst {i}")
        expected[sha] = tuple(outcome)

    rows = volt.wait_results(11, timeout=120)
    by_commit: dict[str, list[dict]] = {}
    for row in rows:
        by_commit.setdefault(row["commit"], []).append(row)
    assert set(by_commit) == {first, *expected}
    for sha, (status, passed, failed, errors, skipped) in expected.items():
        (row,) = by_commit[sha]  # exactly one job per commit
        got = (row["status"], row["passed"], row["failed"], row["errors"], row["skipped"])
        assert got == (status, passed, failed, errors, skipped), f"{sha[:12]}: {row}"
        assert row["attempts"] == 1
        assert [e["kind"] for e in row["history"]].count("result") == 1
        assert row["finished_at"] >= row["started_at"] >= row["seen_at"]
    assert {row["runner"] for row in rows} == {"e2e-a", "e2e-b"}

    timed_out = next(r for r in rows if r["status"] == "timeout")
    assert 2 <= timed_out["duration_s"] < 10
    assert "time limit" in timed_out["reason"]
    missing = next(r for r in rows if r["status"] == "error" and r["errors"] == 0)
    assert "not found: volt-no-such-command" in missing["reason"]

    # The same through the command line, as an operator sees it.
    cli = volt.run("results", "--json")
    assert cli.returncode == 0, cli.stderr
    items = json.loads(cli.stdout)
    assert len(items) == 11
    keys = {"job_id", "repo", "branch", "commit", "status", "attempts", "runner", "passed", "failed",
            "errors", "skipped", "duration_s", "seen_at", "started_at", "finished_at"}  # fmt: skip
    assert all(keys <= set(item) for item in items)
    assert all(item["finished_at"].endswith("Z") for item in items)

    failing = next(sha for sha, outcome in expected.items() if outcome[0] == "failed")
    log = volt.run("log", failing)
    assert log.returncode == 0, log.stderr
    assert "test_bad" in log.stdout and "assert 1 == 2" in log.stdout

    job = by_commit[first][0]["job_id"]
    log = volt.run("log", job)
    assert log.returncode == 0 and "1 passed" in log.stdout


def test_status_shows_runners_queues_and_waiting_jobs(volt, repo):
    volt.dispatcher()
    volt.runner("st-1")
    volt.wait_for("runner to register", lambda: volt.ask("status")["runners"])
    status = volt.run("status")
    assert status.returncode == 0, status.stderr
    assert "st-1" in status.stdout and f"{volt.ns}.jobs.backlog" in status.stdout
    data = json.loads(volt.run("status", "--json").stdout)
    (runner,) = data["runners"]
    assert runner["runner_id"] == "st-1" and runner["state"] == "idle"
    assert runner["seconds_since_heartbeat"] < 5
    assert data["queues"][f"{volt.ns}.jobs.backlog"] == {"ready": 0, "consumers": 0}
    assert "guest:guest" not in json.dumps(data)


def test_volt_up_runs_everything_serves_the_page_and_stops_cleanly_on_ctrl_c(volt, repo, tmp_path):
    import signal
    import urllib.request

    from support import free_port

    repo.commit({"tests/test_one.py": PASS})
    port = free_port()
    up = volt.start(
        "up", "up", "--repo", str(repo.path), "--runners", "2", "--poll", "0.2",
        "--state-dir", str(tmp_path / "state"), "--http-port", str(port),
    )  # fmt: skip
    volt.wait_for("two runners", lambda: len(volt.ask("status")["runners"]) == 2)
    sha = repo.commit({"tests/test_two.py": PASS3})
    (row,) = volt.wait_results(1, commit=sha)
    assert (row["status"], row["passed"]) == ("passed", 4)  # test_one and test_two
    # volt up runs the runners with --allow-repo set to the watched repository.
    assert "accepts jobs for any repository" not in volt.log_of("up")
    page = urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=10).read().decode()
    assert sha[:12] in page

    up.send_signal(signal.SIGINT)
    assert up.wait(timeout=60) == 0
    # Every process it started is gone: no dispatcher answers, no page, no consumers.
    check = volt.run("check", "--timeout", "3")
    assert check.returncode == 1 and "unhealthy" in check.stdout
    with pytest.raises(OSError):
        urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=3)
    assert volt.broker.queue_depth(naming.dispatcher_commits_queue(volt.ns)) == (0, 0)


def test_json_logs_carry_the_ids_of_what_each_line_is_about(volt, repo):
    sha = repo.commit({"tests/test_one.py": "def test_one():\n    pass\n"})
    volt.dispatcher("--log-format", "json")
    volt.runner("json-a", "--log-format", "json")
    volt.wait_for("runner", lambda: volt.ask("status")["runners"])
    volt.run("notify", "--repo", str(repo.path), "--branch", "main", "--commit", sha)
    (row,) = volt.wait_results(1)
    lines = {
        name: [json.loads(line) for line in volt.log_of(name).splitlines() if line.startswith("{")]
        for name in ("dispatcher", "json-a")
    }
    recorded = next(line for line in lines["dispatcher"] if "recorded" in line["message"])
    assert (recorded["job"], recorded["runner"], recorded["attempt"]) == (row["job_id"], "json-a", 1)
    queued = next(line for line in lines["dispatcher"] if line["message"].endswith("queued"))
    assert (queued["commit"], queued["repo"], queued["branch"]) == (sha, str(repo.path), "main")
    started = next(line for line in lines["json-a"] if line["message"].endswith("started"))
    assert (started["runner"], started["job"], started["commit"]) == ("json-a", row["job_id"], sha)
