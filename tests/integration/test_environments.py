"""Real projects on real runners: each job in its own environment, built by uv from the project's files."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from typing import Any

from envsupport import dependency_wheels, project
from support import GitRepo, Volt

OWN = f"{sys.version_info[0]}.{sys.version_info[1]}"

TESTS = {
    "tests/test_app.py": (
        "import pytest\n"
        "from app import VALUE\n\n"
        "def test_the_dependency_is_there():\n"
        "    assert VALUE == 42\n\n"
        "@pytest.mark.parametrize('name', ['pika', 'git', 'common', 'runner', 'dispatcher', 'observer'])\n"
        "def test_the_runners_own_packages_are_out_of_reach(name):\n"
        "    with pytest.raises(ImportError):\n"
        "        __import__(name)\n"
    )
}


def notify(volt: Volt, repo: GitRepo, sha: str) -> None:
    done = volt.run("notify", "--repo", str(repo.path), "--branch", "main", "--commit", sha)
    assert done.returncode == 0, done.stderr


def result_of(volt: Volt, sha: str, timeout: float = 120) -> dict[str, Any]:
    return volt.wait_for(f"the result of {sha[:12]}", lambda: volt.results(commit=sha), timeout=timeout)[0]


def log_of(volt: Volt, row: dict[str, Any]) -> str:
    log = volt.ask("log", {"id": row["job_id"]})
    return log["full"] or log["head"] + log["tail"]


def test_a_project_gets_its_own_dependencies_reuses_them_and_names_one_it_cannot_have(
    volt: Volt, repo: GitRepo, tmp_path: Path
) -> None:
    # The runner's own environment (this one) lacks the project's dependency.
    assert importlib.util.find_spec("depone") is None
    wheels = dependency_wheels(tmp_path / "wheels")
    volt.dispatcher()
    volt.runner("envs", sandbox="bwrap", env={"UV_FIND_LINKS": str(wheels), "UV_OFFLINE": "1"})
    volt.wait_for("the runner", lambda: volt.ask("status")["runners"])

    first = repo.commit(project(dependencies=("depone>=1",), tests=TESTS), "a project that needs depone")
    notify(volt, repo, first)
    row = result_of(volt, first)
    assert (row["status"], row["passed"]) == ("passed", 7), (row, log_of(volt, row))
    assert ": built in" in log_of(volt, row)

    second = repo.commit({"tests/test_more.py": "def test_more():\n    pass\n"}, "tests only")
    notify(volt, repo, second)
    row = result_of(volt, second)
    assert (row["status"], row["passed"]) == ("passed", 8), row
    assert ": reused" in log_of(volt, row) and "building" not in log_of(volt, row)

    broken = project(dependencies=("depone>=1", "no-such-dist-volt>=1"))["pyproject.toml"]
    third = repo.commit({"pyproject.toml": broken}, "a dependency nobody has")
    notify(volt, repo, third)
    row = result_of(volt, third)
    assert row["status"] == "error" and row["reason"].startswith("environment: uv pip install failed"), row
    assert "no-such-dist-volt" in row["reason"] and "no-such-dist-volt" in log_of(volt, row)
    assert volt.procs["envs"].poll() is None


def test_a_commit_asks_for_a_python_and_waits_for_a_runner_that_has_it(volt: Volt, repo: GitRepo) -> None:
    volt.dispatcher()
    volt.runner("py")
    runners = volt.wait_for("the runner", lambda: volt.ask("status")["runners"])
    assert f"python{OWN}" in runners[0]["labels"]

    waits = repo.commit({".volt.toml": '[env]\npython = "3.99"\n', "tests/test_a.py": "def test_a():\n    pass\n"})
    notify(volt, repo, waits)
    volt.wait_for(
        "the job to wait for a runner with Python 3.99",
        lambda: [w["why"] for w in volt.ask("status")["waiting"]] == ["no live runner has labels python3.99"],
    )
    runs = repo.commit({".volt.toml": f'[env]\npython = "{OWN}"\n'}, "a Python the runner has")
    notify(volt, repo, runs)
    row = result_of(volt, runs)
    assert row["status"] == "passed", (row, log_of(volt, row))
    assert f"with Python {OWN}." in log_of(volt, row)
    assert [w["commit"] for w in volt.ask("status")["waiting"]] == [waits]


def test_submodules_are_there_for_the_tests_unless_the_commit_says_no(
    volt: Volt, repo: GitRepo, tmp_path: Path
) -> None:
    lib = GitRepo(tmp_path / "lib")
    lib_sha = lib.commit({"vendored.py": "LIB = 'from the submodule'\n"})
    repo.git("update-index", "--add", "--cacheinfo", f"160000,{lib_sha},vendor/lib")
    (repo.path / ".gitmodules").write_text('[submodule "lib"]\n\tpath = vendor/lib\n\turl = ../lib\n')
    repo.git("add", ".gitmodules")
    test = "import sys\nsys.path.insert(0, 'vendor/lib')\n\ndef test_lib():\n    import vendored\n"
    (repo.path / "tests").mkdir()
    (repo.path / "tests" / "test_lib.py").write_text(test)
    repo.git("add", "tests")
    repo.git("-c", "user.name=Volt Test", "-c", "user.email=test@volt.invalid", "commit", "-qm", "with lib")
    with_lib = repo.git("rev-parse", "HEAD")
    (repo.path / ".volt.toml").write_text("[checkout]\nsubmodules = false\n")
    (repo.path / "tests" / "test_lib.py").write_text(
        "import os\n\ndef test_no_lib():\n    assert os.path.isdir('vendor/lib') and not os.listdir('vendor/lib')\n"
    )
    repo.git("add", ".volt.toml", "tests")
    repo.git("-c", "user.name=Volt Test", "-c", "user.email=test@volt.invalid", "commit", "-qm", "without")
    without = repo.git("rev-parse", "HEAD")

    volt.dispatcher()
    volt.runner("subs", sandbox="bwrap")
    volt.wait_for("the runner", lambda: volt.ask("status")["runners"])
    notify(volt, repo, with_lib)
    row = result_of(volt, with_lib)
    assert row["status"] == "passed", (row, log_of(volt, row))
    assert "submodules checked out: vendor/lib" in log_of(volt, row)
    notify(volt, repo, without)
    row = result_of(volt, without)
    assert row["status"] == "passed", (row, log_of(volt, row))
