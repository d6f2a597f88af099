"""What a job's Python environment costs: warm (reused) and cold (built), on a runner from a plain install.

The runner is Volt CI as an operator installs it: `uv pip install .` into a
venv of its own under bench/out/plain (not the editable dev install), started
from that venv's `volt`, sandboxed as by default. The project is a small real
one: a pyproject.toml (hatchling) that depends on python-slugify (and so on
text-unidecode) from the package index, and one test.

  warm  = per-job time (result recorded - commit published, the test process
          included) of commits that reuse the environment, minus that of commits
          with `[env] system = true` (the runner's own interpreter, no
          environment: what jobs ran before), alternating with them.
  cold  = the build of a new environment (commits that change pyproject.toml;
          uv's cache warm), as the runner's log times it (and what it added to the
          job: its per-job time minus the warm one); against uv run by
          hand on the same tree and cache: `uv venv` + `uv pip install -e . pytest==V`,
          and the same with --compile-bytecode (an environment that, like the
          job's, runs at full speed where it cannot write its byte code).
Prints medians; asserts nothing.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

from harness import Repo, System, median, plain_install, progress, report

from dispatcher.client import ask

TARGET_WARM = 0.150  # s a reused environment may add to a job
TARGET_COLD = 1.2  # a cold build within this factor of uv run by hand

TEST = "from slugify import slugify\n\n\ndef test_slug():\n    assert slugify('Volt CI') == 'volt-ci'\n"


def pyproject(variant: int) -> str:
    return (
        '[build-system]\nrequires = ["hatchling"]\nbuild-backend = "hatchling.build"\n\n'
        f'[project]\nname = "benchapp"\nversion = "0.1"\ndescription = "variant {variant}"\n'
        'dependencies = ["python-slugify>=8"]\n\n[tool.hatch.build.targets.wheel]\npackages = ["src/benchapp"]\n'
    )


def job_time(system: System, sha: str) -> tuple[float, dict]:
    system.publish(system_repo_path(system), sha)
    row = system.result_for(sha, timeout=600)
    if row["status"] != "passed":
        log = ask(system.settings, "log", {"id": row["job_id"]})
        raise SystemExit(f"job of {sha[:12]} ended {row['status']}: {row['reason']}\n{log['head'][-3000:]}")
    return row["finished_at"] - row["seen_at"], row


def system_repo_path(system: System) -> Path:
    return system.tmp / "repo"


def by_hand(tree: Path, cache: Path, python: str, pytest_version: str, uv: str, compile_bytecode: bool) -> float:
    """`uv venv` and `uv pip install -e . pytest==V` on a copy of the tree: what a person would run;
    with `--compile-bytecode`, an environment as ready to run read-only as the runner's."""
    with tempfile.TemporaryDirectory(prefix="volt-bench-hand-", dir=cache.parent) as tmp:
        copy = Path(tmp) / "tree"
        shutil.copytree(tree, copy)
        env = {**os.environ, "UV_CACHE_DIR": str(cache), "UV_NO_PROGRESS": "1"}
        began = time.monotonic()
        subprocess.run([uv, "venv", "-q", "--python", python, str(Path(tmp) / "env")], check=True, env=env, cwd=copy)
        subprocess.run(
            [uv, "pip", "install", "-q", "--python", str(Path(tmp) / "env" / "bin" / "python"), "-e", ".",
             f"pytest=={pytest_version}", *(["--compile-bytecode"] if compile_bytecode else [])],
            check=True, env=env, cwd=copy,
        )  # fmt: skip
        return time.monotonic() - began


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="4 runs of each instead of 10")
    parser.add_argument("--runs", type=int)
    args = parser.parse_args()
    runs = args.runs or (4 if args.quick else 10)
    progress("installing Volt CI into a plain venv")
    python = plain_install()
    system = System(tag="bench-envs")
    try:
        repo = Repo(system_repo_path(system))
        files = {"pyproject.toml": pyproject(0), "src/benchapp/__init__.py": "", "tests/test_slug.py": TEST}
        repo.commit(files)
        system.dispatcher()
        workdir = system.tmp / "plain-runner"
        argv = [str(python.with_name("volt")), "runner", "--id", "plain", "--workdir", str(workdir)]
        argv += ["--allow-system-python", "--amqp-url", system.amqp_url, "--namespace", system.ns]
        # The runner's own venv lacks the project's dependency: a `system = true` job
        # that imports it would fail, so those commits' test needs nothing.
        log = open(system.tmp / "plain.log", "ab")  # noqa: SIM115
        system.procs["plain"] = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, cwd=system.tmp)
        system.runner_ids.append("plain")
        system.wait_for_runners(1)
        progress("first build (uv's cache empty: downloads from the index)")
        first, row = job_time(system, repo.head())
        progress(f"first job {first:.1f}s; {runs} warm and {runs} system-python jobs, alternating")

        warm, system_python = [], []
        plain_test = "def test_nothing():\n    pass\n"
        for i in range(runs):
            sha = repo.commit({"tests/test_slug.py": TEST, ".volt.toml": ""})
            took, row = job_time(system, sha)
            log_text = ask(system.settings, "log", {"id": row["job_id"]})["head"]
            if ": reused" not in log_text:
                raise SystemExit(f"commit {i} did not reuse the environment:\n{log_text[-2000:]}")
            warm.append(took)  # the test process too: it starts from the environment
            sha = repo.commit({"tests/test_slug.py": plain_test, ".volt.toml": "[env]\nsystem = true\n"})
            took, row = job_time(system, sha)
            system_python.append(took)
        added = median(warm) - median(system_python)

        progress(f"{runs} cold builds (pyproject.toml changed each time; uv's cache warm), and uv by hand")
        cold, cold_job, hand, hand_compiled = [], [], [], []
        uv = str(python.with_name("uv"))
        pytest_version = subprocess.run(
            [str(python), "-c", "import pytest; print(pytest.__version__)"], capture_output=True, text=True, check=True
        ).stdout.strip()
        base = subprocess.run(
            [str(python), "-c", "import sys, os; print(os.path.realpath(sys._base_executable))"],
            capture_output=True, text=True, check=True,
        ).stdout.strip()  # fmt: skip
        caches = list((workdir / "envs").glob("*/uv-cache"))
        for i in range(runs):
            sha = repo.commit({"pyproject.toml": pyproject(i + 1), ".volt.toml": "", "tests/test_slug.py": TEST})
            took, row = job_time(system, sha)
            cold_job.append(took - median(warm))
            built = re.search(r": built in ([0-9.]+)s", ask(system.settings, "log", {"id": row["job_id"]})["head"])
            if built is None:
                raise SystemExit(f"commit {i} did not build a new environment")
            cold.append(float(built.group(1)))
            hand.append(by_hand(repo.path, caches[0], base, pytest_version, uv, False))
            hand_compiled.append(by_hand(repo.path, caches[0], base, pytest_version, uv, True))
        ratio = median(cold) / median(hand)

        print(f"runs: {runs} of each; first job (empty uv cache) {first:.1f}s")
        print(
            f"per-job time (published to recorded): reused environment median {median(warm) * 1000:.0f} ms, "
            f"[env] system = true median {median(system_python) * 1000:.0f} ms"
        )
        print(f"warm environment adds {added * 1000:.0f} ms to a job")
        print(
            f"cold build as the runner logs it: median {median(cold) * 1000:.0f} ms (what it added to the job: "
            f"{median(cold_job) * 1000:.0f} ms); uv by hand: median {median(hand) * 1000:.0f} ms, "
            f"{median(hand_compiled) * 1000:.0f} ms with --compile-bytecode (ready to run read-only, as the job's is)"
        )
        report(
            "env_warm",
            "environment overhead per job, warm cache (vs no environment)",
            f"{added * 1000:+.0f} ms ({median(warm) * 1000:.0f} vs {median(system_python) * 1000:.0f} ms)",
            f"< {TARGET_WARM * 1000:.0f} ms",
            added < TARGET_WARM,
            added_s=added,
            runs=runs,
        )
        report(
            "env_cold",
            "cold environment build vs uv by hand (uv cache warm)",
            f"{median(cold) * 1000:.0f} vs {median(hand) * 1000:.0f} ms (x{ratio:.2f}); "
            f"{median(hand_compiled) * 1000:.0f} ms by hand with byte code (x{median(cold) / median(hand_compiled):.2f})",
            f"x <= {TARGET_COLD}",
            ratio <= TARGET_COLD,
            cold_s=median(cold),
            cold_job_s=median(cold_job),
            hand_s=median(hand),
            hand_compiled_s=median(hand_compiled),
            runs=runs,
        )
    finally:
        system.close()


if __name__ == "__main__":
    main()
