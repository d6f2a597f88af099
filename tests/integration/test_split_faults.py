"""Split runs under hostile commits and unlucky operators, on real processes.

Every test here counts what actually ran (marker lines the tests write
themselves, with their pid and start/end times) as well as what was recorded,
and checks the promises of README's "Splitting a suite over runners": one
result per commit, every test counted once, no shard running twice at once, a
failing-then-passing test reported as flaky.
"""

from __future__ import annotations

import signal
import sqlite3
import time
from pathlib import Path
from typing import Any

from observer.publish import AsksRead, publish_commit


def result_of(volt, sha: str, timeout: float) -> dict:
    return volt.wait_results(1, commit=sha, timeout=timeout)[0]


def publish(volt, repo, sha: str) -> float:
    """Publish a commit with what its .volt.toml asks for, as the observer and `volt notify` do."""
    asks = AsksRead(str(repo.path), sha).result()
    publish_commit(volt.broker, str(repo.path), "main", sha, source="test", asks=asks)
    return time.monotonic()


def marked_test(name: str, marks: Path, body: str = "", sleep: float = 0.0, node: str = "") -> list[str]:
    """The lines of a test function that leaves `node pid start end` in `marks`."""
    node = node or name
    return [
        f"def {name}():",
        "    import os, time",
        "    _t0 = time.time()",
        *(["    " + line for line in body.splitlines()] if body else []),
        f"    time.sleep({sleep})",
        f"    open({str(marks)!r}, 'a').write({node + ' '!r} + str(os.getpid()) + ' '"
        " + repr(_t0) + ' ' + repr(time.time()) + chr(10))",
        "",
    ]


def ran(marks: Path) -> list[tuple[str, int, float, float]]:
    """(test, pid, start, end) of every test run that got to its end."""
    if not marks.exists():
        return []
    out = []
    for line in marks.read_text().splitlines():
        name, pid, t0, t1 = line.split()
        out.append((name, int(pid), float(t0), float(t1)))
    return out


def brief(result: dict) -> dict:
    keys = ("status", "reason", "passed", "failed", "errors", "skipped", "failing_tests", "flaky")
    return {k: result.get(k) for k in keys}


def store_rows(db: Path, sql: str, *args: Any) -> list[tuple[Any, ...]]:
    conn = sqlite3.connect(f"{db.resolve().as_uri()}?mode=ro", uri=True)
    try:
        return list(conn.execute(sql, args))
    finally:
        conn.close()


def warm(volt, repo, split: int = 2) -> None:
    """A first commit, so that every runner has built the job environment."""
    sha = repo.commit(
        {"tests/test_warm.py": "def test_warm():\n    pass\n", ".volt.toml": f"[test]\nsplit = {split}\n"}
    )
    publish(volt, repo, sha)
    assert result_of(volt, sha, 120)["status"] == "passed"


def start(volt, runners: int, prefix: str = "r") -> list[str]:
    volt.dispatcher()
    names = [f"{prefix}-{i}" for i in range(runners)]
    for name in names:
        volt.runner(name)
    volt.wait_for(f"{runners} runners", lambda: len(volt.ask("status")["runners"]) == runners)
    return names


# -- flaky tests over several shards ------------------------------------------


def test_a_flaky_test_rerun_by_another_shard_while_its_chunk_is_open_is_flaky_not_an_error(volt, repo, tmp_path):
    """A failing test is run again by the other shard (rerun_failures = 1). Its
    first chunk is still open on the first shard (its last test is held back and
    slow) when the rerun's report comes in. Expected: the run passes, the test is
    flaky, every test once."""
    marks = tmp_path / "ran"
    counter = tmp_path / "flaky-count"
    start(volt, 2)
    warm(volt, repo)
    files: dict[str, str | None] = {"tests/test_warm.py": None}
    for f in range(10):
        lines = []
        for t in range(2):
            body, sleep = "", 0.0
            if (f, t) == (0, 0):  # fails the first time it runs, passes the second
                body = (
                    f"n = len(open({str(counter)!r}).read()) if os.path.exists({str(counter)!r}) else 0\n"
                    f"open({str(counter)!r}, 'a').write('x')\n"
                    "assert n >= 1, 'fails once'"
                )
            if (f, t) == (2, 1):  # the last test of the first chunk: slow
                sleep = 6.0
            lines += marked_test(f"test_{t}", marks, body, sleep, node=f"tests/test_{f:02d}.py::test_{t}")
        files[f"tests/test_{f:02d}.py"] = "\n".join(lines)
    files[".volt.toml"] = "[test]\nsplit = 2\nrerun_failures = 1\n"
    sha = repo.commit(files)
    publish(volt, repo, sha)
    result = result_of(volt, sha, 120)
    assert counter.read_text() == "xx"  # ran twice: failed, then passed
    assert (result["status"], result["passed"], result["failed"], result["errors"]) == ("passed", 20, 0, 0), brief(
        result
    )
    assert result["flaky"] == ["tests/test_00.py::test_0"], brief(result)


# -- what pytest collects -----------------------------------------------------


def test_a_test_whose_node_id_is_over_1000_characters_runs_and_is_counted_once(volt, repo, tmp_path):
    """Three parametrized tests with ids of 1,100 characters (two share their
    first 1,000) pass, and so does a plain one. Expected as without split: passed, 4 tests, each ran once."""
    marks = tmp_path / "ran"
    start(volt, 2)
    long_a, long_b = "a" * 1100 + "1", "a" * 1100 + "2"
    code = "\n".join(
        [
            "import os, time, pytest",
            "",
            f"@pytest.mark.parametrize('s', [1, 2, 3], ids=[{'x' * 1100!r}, {long_a!r}, {long_b!r}])",
            *marked_test("test_long", marks, node="tests/test_long.py::test_long[...]").__iter__(),
        ]
    ).replace("def test_long():", "def test_long(s):")
    code += "\n" + "\n".join(marked_test("test_plain", marks, node="tests/test_long.py::test_plain"))
    sha = repo.commit({"tests/test_long.py": code, ".volt.toml": "[test]\nsplit = 2\n"})
    publish(volt, repo, sha)
    result = result_of(volt, sha, 120)
    assert (result["status"], result["passed"], result["errors"], len(ran(marks))) == ("passed", 4, 0, 4), brief(
        result
    ) | {"ran": len(ran(marks))}


def test_a_suite_with_no_tests_ends_as_error_at_once(volt, repo):
    start(volt, 2)
    sha = repo.commit({"tests/test_none.py": "X = 1\n", ".volt.toml": "[test]\nsplit = 2\n"})
    publish(volt, repo, sha)
    result = result_of(volt, sha, 120)
    assert result["status"] == "error" and "no tests" in result["reason"], brief(result)


def test_a_collection_error_ends_the_run_as_error_with_the_reason(volt, repo):
    start(volt, 2)
    files = {
        "tests/test_ok.py": "def test_ok():\n    pass\n",
        "tests/test_broken.py": "import no_such_module_here\n\ndef test_x():\n    pass\n",
        ".volt.toml": "[test]\nsplit = 2\n",
    }
    sha = repo.commit(files)
    publish(volt, repo, sha)
    result = result_of(volt, sha, 120)
    assert result["status"] == "error", brief(result)
    shards = [volt.ask("log", {"id": f"{result['job_id']}.{k}"}) for k in (1, 2)]
    assert any("no_such_module_here" in str(s) for s in shards), shards[0]


# -- hostile tests ------------------------------------------------------------


def hostile_suite(marks: Path, hostile_body: str, files: int = 6) -> dict[str, str | None]:
    """`files` files of one marked test each; tests/test_03.py's test runs `hostile_body` first."""
    out: dict[str, str | None] = {}
    for f in range(files):
        body = hostile_body if f == 3 else ""
        out[f"tests/test_{f:02d}.py"] = "\n".join(
            marked_test("test_it", marks, body, sleep=0.3, node=f"tests/test_{f:02d}.py::test_it")
        )
    out[".volt.toml"] = "[test]\nsplit = 2\ntimeout = 30\n"
    return out


def test_a_test_that_calls_os_exit_0_in_the_middle_of_a_chunk_ends_the_run_not_as_passed(volt, repo, tmp_path):
    marks = tmp_path / "ran"
    start(volt, 2)
    sha = repo.commit(hostile_suite(marks, "os._exit(0)"))
    publish(volt, repo, sha)
    result = result_of(volt, sha, 90)
    assert result["status"] == "error" and "stopped in the middle" in result["reason"], brief(result)


def test_a_test_that_closes_the_shard_socket_ends_the_run(volt, repo, tmp_path):
    marks = tmp_path / "ran"
    start(volt, 2)
    sha = repo.commit(hostile_suite(marks, "os.close(int(os.environ['VOLT_SHARD_FD']))"))
    publish(volt, repo, sha)
    result = result_of(volt, sha, 90)
    assert result["status"] in ("error", "timeout"), brief(result)


def test_forged_results_for_tests_of_other_chunks_are_ignored(volt, repo, tmp_path):
    """tests/test_03.py speaks on the inherited socket itself: every test of the
    suite passed (tests/test_00.py fails), and no more chunks for this shard."""
    marks = tmp_path / "ran"
    start(volt, 2)
    forge = (
        "import json, socket\n"
        "s = socket.socket(fileno=os.dup(int(os.environ['VOLT_SHARD_FD'])))\n"
        "f = s.makefile('rwb')\n"
        "allnodes = [f'tests/test_{i:02d}.py::test_it' for i in range(6)] + ['tests/test_99.py::test_ghost']\n"
        "f.write(json.dumps({'results': [[n, 'passed', 0.1] for n in allnodes], 'more': False}).encode() + b'\\n')\n"
        "f.flush(); f.readline()"
    )
    files = hostile_suite(marks, forge)
    files["tests/test_00.py"] = "def test_it():\n    assert False, 'really fails'\n"
    sha = repo.commit(files)
    publish(volt, repo, sha)
    result = result_of(volt, sha, 90)
    assert "tests/test_99.py::test_ghost" not in result["failing_tests"] + result["flaky"]
    assert result["status"] in ("failed", "error"), brief(result)
    if result["status"] == "failed":
        assert result["failing_tests"] == ["tests/test_00.py::test_it"], brief(result)
        assert result["passed"] + result["failed"] == 6, brief(result)


def test_a_pytest_ini_that_disables_the_shard_plugin_does_not_pass_the_run(volt, repo, tmp_path):
    """`addopts = -p no:volt_shard`: each shard would run the whole suite on its own."""
    marks = tmp_path / "ran"
    start(volt, 2)
    files = hostile_suite(marks, "")
    files["tests/test_00.py"] = "def test_it():\n    assert False, 'really fails'\n"
    files["pytest.ini"] = "[pytest]\naddopts = -p no:volt_shard\n"
    sha = repo.commit(files)
    publish(volt, repo, sha)
    result = result_of(volt, sha, 90)
    assert result["status"] in ("failed", "error"), brief(result)
    names = [r[0] for r in ran(marks)]
    assert sorted(names) == sorted(set(names)), names  # none ran twice


def test_a_conftest_that_unregisters_the_shard_plugin_does_not_pass_the_run(volt, repo, tmp_path):
    marks = tmp_path / "ran"
    start(volt, 2)
    files = hostile_suite(marks, "")
    files["tests/test_00.py"] = "def test_it():\n    assert False, 'really fails'\n"
    files["conftest.py"] = (
        "def pytest_configure(config):\n"
        "    p = config.pluginmanager.get_plugin('volt_shard')\n"
        "    if p is not None:\n"
        "        config.pluginmanager.unregister(p)\n"
    )
    sha = repo.commit(files)
    publish(volt, repo, sha)
    result = result_of(volt, sha, 90)
    assert result["status"] in ("failed", "error"), brief(result)


# -- faults -------------------------------------------------------------------


def sleepy(marks: Path, files: int, tests: int, seconds: float, split: int, extra: str = "") -> dict[str, str | None]:
    out: dict[str, str | None] = {}
    for f in range(files):
        lines: list[str] = []
        for t in range(tests):
            lines += marked_test(f"test_{t}", marks, sleep=seconds, node=f"tests/test_{f:02d}.py::test_{t}")
        out[f"tests/test_{f:02d}.py"] = "\n".join(lines)
    out[".volt.toml"] = f"[test]\nsplit = {split}\n{extra}"
    return out


def every_test(files: int, tests: int) -> set[str]:
    return {f"tests/test_{f:02d}.py::test_{t}" for f in range(files) for t in range(tests)}


def parent_of(pid: int) -> int:
    return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])


def runner_of_last_test(volt, marks: Path) -> str:
    last = ran(marks)[-1][1]
    parent = parent_of(last)
    return next(name for name, proc in volt.procs.items() if proc.pid == parent)


def concurrent_runs(marks: Path) -> list[tuple[str, int, int]]:
    """Tests that ran in two processes at the same time."""
    by: dict[str, list[tuple[int, float, float]]] = {}
    for name, pid, t0, t1 in ran(marks):
        by.setdefault(name, []).append((pid, t0, t1))
    out = []
    for name, runs in by.items():
        for i, (p1, a0, a1) in enumerate(runs):
            for p2, b0, b1 in runs[i + 1 :]:
                if p1 != p2 and a0 < b1 and b0 < a1:
                    out.append((name, p1, p2))
    return out


def test_a_runner_frozen_past_its_lease_runs_no_test_that_another_shard_runs(volt, repo, tmp_path):
    """SIGSTOP a runner in the middle of its chunk for longer than its lease (1.5 s
    here), then SIGCONT it. Its pytest must not go on running the chunk that
    went back to the queue; the run gets one result, each test counted once."""
    marks = tmp_path / "ran"
    start(volt, 3)
    warm(volt, repo)
    sha = repo.commit(sleepy(marks, 8, 3, 0.4, split=2) | {"tests/test_warm.py": None})
    publish(volt, repo, sha)
    volt.wait_for("the run under way", lambda: len(ran(marks)) >= 4)
    victim = runner_of_last_test(volt, marks)
    frozen_pytest = ran(marks)[-1][1]
    volt.procs[victim].send_signal(signal.SIGSTOP)
    stopped_at = time.time()
    # Frozen until the dispatcher has given the runner up (its lease is long gone).
    volt.wait_for(f"{victim} declared lost", lambda: f"runner {victim} lost" in volt.log_of("dispatcher"), every=0.1)
    volt.procs[victim].send_signal(signal.SIGCONT)
    result = result_of(volt, sha, 120)
    assert (result["status"], result["passed"], result["failed"]) == ("passed", 24, 0), brief(result)
    names = {r[0] for r in ran(marks)}
    assert names == every_test(8, 3)
    assert concurrent_runs(marks) == []
    late = [r for r in ran(marks) if r[1] == frozen_pytest and r[3] > stopped_at + 3.0]
    assert late == [], late  # the frozen runner's pytest ran on after its lease was gone


def test_the_dispatcher_killed_in_the_middle_of_a_split_run_and_restarted(volt, repo, tmp_path):
    marks = tmp_path / "ran"
    start(volt, 2)
    warm(volt, repo)
    sha = repo.commit(sleepy(marks, 10, 3, 0.3, split=2) | {"tests/test_warm.py": None})
    publish(volt, repo, sha)
    volt.wait_for("the run under way", lambda: len(ran(marks)) >= 6)
    volt.kill("dispatcher")
    # Down until a shard has asked and, unanswered, asked again.
    volt.wait_for(
        "a shard asking a dispatcher that is gone",
        lambda: any("asking again" in volt.log_of(name) for name in volt.procs if name != "dispatcher"),
        every=0.1,
    )
    volt.dispatcher()
    result = result_of(volt, sha, 120)
    assert (result["status"], result["passed"], result["failed"]) == ("passed", 30, 0), brief(result)
    names = [r[0] for r in ran(marks)]
    assert set(names) == every_test(10, 3)
    assert concurrent_runs(marks) == []
    assert len(names) == 30, sorted(n for n in set(names) if names.count(n) > 1)  # none ran twice
    results = [r for r in volt.results(done_only=False) if r["commit"] == sha]
    assert len(results) == 1


def kill_the_runner_of(volt, pids: Path, what: str) -> None:
    """Once a shard's pytest has written its pid to `pids`, kill -9 the runner it runs under."""
    volt.wait_for(what, lambda: pids.exists() and pids.read_text().strip())
    pid = int(pids.read_text().split()[0])
    victim = next(name for name, proc in volt.procs.items() if proc.pid == parent_of(pid))
    volt.kill(victim)


def test_a_runner_killed_while_its_shard_collects(volt, repo, tmp_path):
    marks = tmp_path / "ran"
    collecting = tmp_path / "collecting"
    start(volt, 3)
    warm(volt, repo)
    files = sleepy(marks, 6, 2, 0.2, split=2) | {"tests/test_warm.py": None}
    files["conftest.py"] = (
        f"import os, time\nopen({str(collecting)!r}, 'a').write(str(os.getpid()) + chr(10))\ntime.sleep(3)\n"
    )
    sha = repo.commit(files)
    publish(volt, repo, sha)
    kill_the_runner_of(volt, collecting, "a shard collecting")
    result = result_of(volt, sha, 120)
    assert (result["status"], result["passed"]) == ("passed", 12), brief(result)
    names = [r[0] for r in ran(marks)]
    assert sorted(names) == sorted(every_test(6, 2)), names


def test_a_runner_killed_after_its_last_chunk_before_its_result(volt, repo, tmp_path):
    """Both shards' pytest linger after their last ask (a slow pytest_unconfigure);
    one runner dies then. The run's one result stands, and is not recorded twice."""
    marks = tmp_path / "ran"
    lingering = tmp_path / "lingering"
    start(volt, 2)
    warm(volt, repo)
    files = sleepy(marks, 6, 2, 0.2, split=2) | {"tests/test_warm.py": None}
    files["conftest.py"] = (
        "import os, time\n"
        "def pytest_unconfigure(config):\n"
        f"    open({str(lingering)!r}, 'a').write(str(os.getpid()) + chr(10))\n"
        "    time.sleep(4)\n"
    )
    sha = repo.commit(files)
    publish(volt, repo, sha)
    kill_the_runner_of(volt, lingering, "a shard lingering")
    result = result_of(volt, sha, 120)
    assert (result["status"], result["passed"]) == ("passed", 12), brief(result)
    # Once every shard has ended (the survivor's result, the victim's taken back),
    # the run's one result is still the same one.
    volt.wait_for(
        "both shards to end",
        lambda: all(volt.ask("log", {"id": f"{result['job_id']}.{k}"})["job"]["state"] == "done" for k in (1, 2)),
        timeout=60,
    )
    again = [r for r in volt.results(done_only=False) if r["commit"] == sha]
    assert len(again) == 1 and (again[0]["status"], again[0]["passed"]) == ("passed", 12), again


# -- sharing the fleet --------------------------------------------------------


def times(db: Path, job_id: str) -> tuple[float | None, float | None]:
    rows = store_rows(db, "SELECT started_at, finished_at FROM jobs WHERE job_id = ?", job_id)
    return rows[0] if rows else (None, None)


def test_a_plain_commit_behind_a_split_run_starts_once_the_runs_chunks_run_out(volt, repo, tmp_path):
    """split = 6 on 2 runners; a plain commit right behind it. Collecting the
    suite takes 4 s (a slow conftest); the last test file has a 14 s test, so
    one shard is still at work long after the other ran out of chunks. README: "a shard gives its runner back the
    moment the queue has no chunk for it ... the commits behind it get the rest
    of the fleet, and every runner once the chunks run out". Expected: the
    plain job starts within about a second of the first runner the run lets go
    of."""
    marks = tmp_path / "ran"
    collected = tmp_path / "collected"
    db = tmp_path / "dispatcher.db"
    start(volt, 2)
    warm(volt, repo)
    files = sleepy(marks, 8, 2, 0.5, split=6) | {"tests/test_warm.py": None}
    files["tests/test_07.py"] = "\n".join(marked_test("test_0", marks, sleep=14, node="tests/test_07.py::test_0"))
    files["conftest.py"] = (
        "import os, time\n"
        "time.sleep(4)\n"
        f"open({str(collected)!r}, 'a').write(os.environ.get('VOLT_JOB_ID', '?') + chr(10))\n"
    )
    split_sha = repo.commit(files, "split 6 ways")
    publish(volt, repo, split_sha)
    plain_sha = repo.commit(
        {".volt.toml": None, "conftest.py": None, "tests/test_plain.py": "def test_p():\n    pass\n"}
        | {f"tests/test_{f:02d}.py": None for f in range(8)},
        "plain",
    )
    publish(volt, repo, plain_sha)
    run = result_of(volt, split_sha, 120)
    plain = result_of(volt, plain_sha, 120)
    assert (run["status"], run["passed"]) == ("passed", 15), brief(run)
    assert plain["status"] == "passed", brief(plain)
    shards = store_rows(
        db,
        "SELECT job_id, state, status, started_at, finished_at FROM jobs WHERE parent = ? ORDER BY job_id",
        run["job_id"],
    )
    worked = [s for s in shards if s[3] is not None]
    last_chunk_end = max(r[3] for r in ran(marks))
    print(f"\nshards: {shards}")
    first_free = min(s[4] for s in worked if s[4] is not None)
    plain_started, _ = times(db, plain["job_id"])
    print(f"\nshards: {shards}\ncollections: {collected.read_text().split()}")
    print(f"first shard done {first_free:.2f}, last test ended {last_chunk_end:.2f}, plain started {plain_started:.2f}")
    assert plain_started - first_free < 1.5, (plain_started - first_free, shards, collected.read_text().split())


def test_two_split_runs_and_a_plain_commit_on_two_runners_all_end_each_test_once(volt, repo, tmp_path):
    marks_a, marks_b = tmp_path / "ran-a", tmp_path / "ran-b"
    start(volt, 2)
    warm(volt, repo)
    a = repo.commit(sleepy(marks_a, 6, 2, 0.3, split=4) | {"tests/test_warm.py": None}, "a")
    b = repo.commit(sleepy(marks_b, 6, 2, 0.3, split=3, extra="rerun_failures = 2\n"), "b")
    c = repo.commit(
        {".volt.toml": None, "tests/test_zz.py": "def test_zz():\n    pass\n"}
        | {f"tests/test_{f:02d}.py": None for f in range(6)},
        "c",
    )
    for sha in (a, b, c):
        publish(volt, repo, sha)
    ra, rb, rc = (result_of(volt, sha, 180) for sha in (a, b, c))
    assert (ra["status"], ra["passed"]) == ("passed", 12), brief(ra)
    assert (rb["status"], rb["passed"]) == ("passed", 12), brief(rb)
    assert (rc["status"], rc["passed"]) == ("passed", 1), brief(rc)
    for marks in (marks_a, marks_b):
        names = [r[0] for r in ran(marks)]
        assert sorted(names) == sorted(every_test(6, 2)), names


def test_a_split_run_that_no_runner_has_the_labels_for_ends_as_error(volt, repo, tmp_path):
    volt.dispatcher("--park-timeout", "3")
    volt.runner("plain-0")
    volt.wait_for("1 runner", lambda: len(volt.ask("status")["runners"]) == 1)
    sha = repo.commit(
        {"tests/test_a.py": "def test_a():\n    pass\n", ".volt.toml": "[test]\nsplit = 2\nlabels = ['gpu']\n"}
    )
    publish(volt, repo, sha)
    result = result_of(volt, sha, 60)
    assert result["status"] == "error" and "gpu" in result["reason"], brief(result)


def test_a_test_that_fails_twice_with_one_rerun_by_another_shard_is_failed_not_error(volt, repo, tmp_path):
    """As the flaky test above, but the test fails on its rerun too: the run is
    `failed` with that test in failing_tests (as without split)."""
    marks = tmp_path / "ran"
    start(volt, 2)
    warm(volt, repo)
    files: dict[str, str | None] = {"tests/test_warm.py": None}
    for f in range(10):
        lines = []
        for t in range(2):
            body = "assert False, 'always fails'" if (f, t) == (0, 0) else ""
            sleep = 6.0 if (f, t) == (2, 1) else 0.0
            lines += marked_test(f"test_{t}", marks, body, sleep, node=f"tests/test_{f:02d}.py::test_{t}")
        files[f"tests/test_{f:02d}.py"] = "\n".join(lines)
    files[".volt.toml"] = "[test]\nsplit = 2\nrerun_failures = 1\n"
    sha = repo.commit(files)
    publish(volt, repo, sha)
    result = result_of(volt, sha, 120)
    assert (result["status"], result["passed"], result["failed"]) == ("failed", 19, 1), brief(result)
    assert result["failing_tests"] == ["tests/test_00.py::test_0"], brief(result)


def test_a_test_that_hangs_past_the_time_limit_in_a_chunk_ends_the_run_as_timeout(volt, repo, tmp_path):
    marks = tmp_path / "ran"
    start(volt, 2)
    files = sleepy(marks, 6, 2, 0.2, split=2, extra="timeout = 8\n")
    files["tests/test_03.py"] = "import time\n\ndef test_0():\n    time.sleep(120)\n"
    sha = repo.commit(files)
    began = time.monotonic()
    publish(volt, repo, sha)
    result = result_of(volt, sha, 90)
    assert result["status"] == "timeout", brief(result)
    assert time.monotonic() - began < 40
    status = volt.ask("status")
    volt.wait_for("both runners idle", lambda: all(r["state"] == "idle" for r in volt.ask("status")["runners"]))
    assert status is not None


def test_twenty_thousand_tests_split_two_ways_are_each_counted_once(volt, repo, tmp_path):
    start(volt, 2)
    files: dict[str, str | None] = {}
    for f in range(20):
        files[f"tests/test_{f:02d}.py"] = (
            "import pytest\n\n@pytest.mark.parametrize('i', range(1000))\ndef test_many(i):\n"
            f"    assert {f} != 13 or i != 7\n"
        )
    files[".volt.toml"] = "[test]\nsplit = 2\n"
    sha = repo.commit(files)
    began = time.monotonic()
    publish(volt, repo, sha)
    result = result_of(volt, sha, 400)
    took = time.monotonic() - began
    print(f"\n20,000 tests split 2 ways: {took:.1f}s")
    assert (result["status"], result["passed"], result["failed"]) == ("failed", 19999, 1), brief(result)
    assert result["failing_tests"] == ["tests/test_13.py::test_many[7]"]


def test_the_broker_restarted_in_the_middle_of_a_split_run(tmp_path):
    """A private RabbitMQ node, stopped and started while two shards pull chunks."""
    from support import GitRepo, Volt, rabbit_node

    marks = tmp_path / "ran"
    with rabbit_node() as node:
        volt = Volt(node.url, "splitrestart", tmp_path)
        repo = GitRepo(tmp_path / "repo")
        try:
            start(volt, 2)
            warm(volt, repo)
            sha = repo.commit(sleepy(marks, 10, 3, 0.4, split=2) | {"tests/test_warm.py": None})
            publish(volt, repo, sha)
            volt.wait_for("the run under way", lambda: len(ran(marks)) >= 6)
            volt.broker.close()
            node.stop()
            # Down until the workers have noticed and gone to reconnecting.
            volt.wait_for(
                "the workers to lose the broker",
                lambda: all("reconnecting in" in volt.log_of(name) for name in volt.procs),
                every=0.1,
            )
            node.start()
            result = result_of(volt, sha, 180)
            assert (result["status"], result["passed"], result["failed"]) == ("passed", 30, 0), brief(result)
            assert {r[0] for r in ran(marks)} == every_test(10, 3)
            assert concurrent_runs(marks) == []
            assert len([r for r in volt.results(done_only=False) if r["commit"] == sha]) == 1
        finally:
            volt.stop_all()


def test_a_suite_of_more_than_100000_tests_ends_as_error_saying_why(volt, repo):
    """shard.py refuses a collection of more than MAX_TESTS: the run's result
    should say so (not only a shard's log)."""
    start(volt, 2)
    files: dict[str, str | None] = {
        "tests/test_huge.py": "import pytest\n\n@pytest.mark.parametrize('i', range(100001))\ndef test_h(i):\n    pass\n",
        ".volt.toml": "[test]\nsplit = 2\ntimeout = 300\n",
    }
    sha = repo.commit(files)
    publish(volt, repo, sha)
    result = result_of(volt, sha, 400)
    assert result["status"] == "error", brief(result)
    assert "100000" in result["reason"], brief(result)


def test_a_split_run_on_a_fleet_where_one_runner_has_its_labels_finishes_there(volt, repo, tmp_path):
    marks = tmp_path / "ran"
    volt.dispatcher()
    volt.runner("gpu-0", "--label", "gpu")
    volt.runner("cpu-0")
    volt.wait_for("2 runners", lambda: len(volt.ask("status")["runners"]) == 2)
    sha = repo.commit(sleepy(marks, 4, 2, 0.2, split=2, extra="labels = ['gpu']\n"))
    publish(volt, repo, sha)
    result = result_of(volt, sha, 120)
    assert (result["status"], result["passed"]) == ("passed", 8), brief(result)
    assert sorted(r[0] for r in ran(marks)) == sorted(every_test(4, 2))
