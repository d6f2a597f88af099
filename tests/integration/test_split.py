"""Split runs on real runners: one commit's suite over several of them.

A run's shards pull chunks of tests from the dispatcher; the commit still gets
one result, each test counted once, whatever happens to a runner meanwhile.
"""

from __future__ import annotations

import time
from pathlib import Path

from observer.publish import AsksRead, publish_commit

FAILING = "tests/test_07.py::test_3"


def sleepy_suite(files: int, tests: int, seconds: float, marks: Path | None = None, split: int = 1) -> dict[str, str]:
    """`files` test files of `tests` tests that sleep `seconds` each; FAILING fails.
    With `marks`, every test run leaves a line there (which test, which process)."""
    out: dict[str, str] = {}
    for f in range(files):
        lines = ["import os, time", ""]
        for t in range(tests):
            node = f"tests/test_{f:02d}.py::test_{t}"
            lines.append(f"def test_{t}():")
            if marks is not None:
                lines.append(f"    open({str(marks)!r}, 'a').write({node!r} + ' ' + str(os.getpid()) + chr(10))")
            lines.append(f"    time.sleep({seconds})")
            lines.append(f"    assert {node != FAILING}")
            lines.append("")
        out[f"tests/test_{f:02d}.py"] = "\n".join(lines)
    out[".volt.toml"] = f"[test]\nsplit = {split}\n" if split > 1 else None  # type: ignore[assignment]
    return out


def result_of(volt, sha: str, timeout: float) -> dict:
    return volt.wait_results(1, commit=sha, timeout=timeout)[0]


def publish(volt, repo, sha: str) -> float:
    """Publish a commit with what its .volt.toml asks for, as the observer and `volt notify` do."""
    asks = AsksRead(str(repo.path), sha).result()
    publish_commit(volt.broker, str(repo.path), "main", sha, source="test", asks=asks)
    return time.monotonic()


def test_a_split_suite_on_four_runners_takes_a_third_of_the_time_with_one_result(volt, repo):
    volt.dispatcher()
    for i in range(4):
        volt.runner(f"split-{i}")
    volt.wait_for("4 runners", lambda: len(volt.ask("status")["runners"]) == 4)
    # A warm-up commit: each runner builds the (cached) job environment once.
    warm = repo.commit({"tests/test_warm.py": "def test_warm():\n    pass\n", ".volt.toml": "[test]\nsplit = 4\n"})
    publish(volt, repo, warm)
    assert result_of(volt, warm, 120)["status"] == "passed"

    whole = repo.commit(sleepy_suite(24, 5, 0.4) | {"tests/test_warm.py": None}, "the suite, on one runner")
    began = publish(volt, repo, whole)
    unsplit = result_of(volt, whole, 180)
    unsplit_s = time.monotonic() - began

    split = repo.commit(sleepy_suite(24, 5, 0.4, split=4), "the same suite, split 4 ways")
    began = publish(volt, repo, split)
    run = result_of(volt, split, 120)
    split_s = time.monotonic() - began

    print(f"\n24 files x 5 tests x 0.4 s: {unsplit_s:.1f}s on one runner, {split_s:.1f}s split over 4 runners")
    for result in (unsplit, run):
        assert (result["status"], result["passed"], result["failed"]) == ("failed", 119, 1), result
        assert result["failing_tests"] == [FAILING]
    assert split_s <= 0.34 * unsplit_s, (split_s, unsplit_s)
    shards = [j for j in volt.ask("results", {"limit": 100, "done_only": False})]
    assert all("run" not in j for j in shards)  # the shards are not results of their own
    # Each shard is a job of its own with its own log; it ends soon after the run.
    shard = volt.wait_for(
        "the first shard to end",
        lambda: (job := volt.ask("log", {"id": f"{run['job_id']}.1"})["job"])["state"] == "done" and job,
    )
    assert shard["run"] == run["job_id"]


def test_a_runner_killed_in_the_middle_of_a_split_run_costs_only_its_chunk(volt, repo, tmp_path):
    marks = tmp_path / "ran"
    volt.dispatcher()
    for i in range(3):
        volt.runner(f"kill-{i}", heartbeat=0.5)
    volt.wait_for("3 runners", lambda: len(volt.ask("status")["runners"]) == 3)
    sha = repo.commit(sleepy_suite(12, 4, 0.3, marks=marks, split=3))
    publish(volt, repo, sha)
    volt.wait_for("the run under way", lambda: marks.exists() and len(marks.read_text().splitlines()) >= 8)
    # The runner whose pytest wrote the last line dies, as its machine would (its
    # pytest goes with it).
    last = int(marks.read_text().splitlines()[-1].split()[1])
    parent = int(Path(f"/proc/{last}/stat").read_text().rsplit(")", 1)[1].split()[1])
    victim = next(name for name, proc in volt.procs.items() if proc.pid == parent)
    volt.kill(victim)
    result = result_of(volt, sha, 120)
    assert (result["status"], result["passed"], result["failed"]) == ("failed", 47, 1), result
    assert result["failing_tests"] == [FAILING]
    ran = [line.split()[0] for line in marks.read_text().splitlines()]
    assert set(ran) == {f"tests/test_{f:02d}.py::test_{t}" for f in range(12) for t in range(4)}
    assert len(ran) > 48  # what the killed runner had begun ran again elsewhere, and counted once


def test_a_test_that_fails_every_other_run_is_flaky_and_does_not_fail_the_job(volt, repo, tmp_path):
    counter = tmp_path / "count"
    flaky = (
        "import os\n\n"
        "def test_sometimes():\n"
        f"    n = len(open({str(counter)!r}).read()) if os.path.exists({str(counter)!r}) else 0\n"
        f"    open({str(counter)!r}, 'a').write('x')\n"
        "    assert n % 2 == 1\n\n"
        "def test_always():\n    pass\n"
    )
    volt.dispatcher()
    volt.runner("flaky-a")
    volt.runner("flaky-b")
    sha = repo.commit({"tests/test_flaky.py": flaky, ".volt.toml": "[test]\nrerun_failures = 1\n"})
    publish(volt, repo, sha)
    result = result_of(volt, sha, 120)
    assert (result["status"], result["passed"], result["failed"]) == ("passed", 2, 0), result
    assert result["flaky"] == ["tests/test_flaky.py::test_sometimes"] and result["failing_tests"] == []
    assert counter.read_text() == "xx"


def test_shards_that_collect_different_tests_end_the_run_as_error(volt, repo):
    # Each shard has its own job id: the second one collects one test more.
    odd = (
        "import os\n\n"
        "if os.environ.get('VOLT_JOB_ID', '').endswith('.2'):\n\n"
        "    def test_only_on_the_second_shard():\n        pass\n\n\n"
        "def test_b():\n    pass\n"
    )
    files = {"tests/test_a.py": "import time\n\ndef test_a():\n    time.sleep(1)\n", "tests/test_b.py": odd}
    files[".volt.toml"] = "[test]\nsplit = 2\n"
    volt.dispatcher()
    volt.runner("odd-a")
    volt.runner("odd-b")
    sha = repo.commit(files)
    publish(volt, repo, sha)
    result = result_of(volt, sha, 120)
    assert result["status"] == "error", result
    assert "collected different tests" in result["reason"] and "test_only_on_the_second_shard" in result["reason"]


def test_a_split_run_in_the_sandbox_reaches_the_dispatcher_through_its_inherited_socket(volt, repo):
    volt.dispatcher()
    volt.runner("boxed-a", sandbox="bwrap")
    volt.runner("boxed-b", sandbox="bwrap")
    sha = repo.commit(sleepy_suite(8, 2, 0.2, split=2))
    publish(volt, repo, sha)
    result = result_of(volt, sha, 120)
    assert (result["status"], result["passed"], result["failed"], result["failing_tests"]) == ("passed", 16, 0, [])
    shards = [volt.ask("log", {"id": f"{result['job_id']}.{k}"})["job"] for k in (1, 2)]
    assert {s["runner"] for s in shards} <= {"boxed-a", "boxed-b"}
