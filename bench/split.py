"""Split runs: one commit's suite over 2, 4 and 6 runners, against linear.

The suite is 24 test files of 5 tests that sleep 0.4 s each (48 s on one
runner). Runners come from a plain install (bench/harness.plain_install),
unsandboxed: the sandbox's cost is latency.py's. Each commit is timed from its
publish to its one result recorded (the store's finished_at); the baseline is
the same suite unsplit on one runner, run in the same session. A warm-up
commit first lets every runner build the job environment (cached after).

Per-chunk overhead: on one runner of its own, a suite of 200 test files that
do nothing, with `split = 64` (its first shard pulls every chunk, each a
1/128 share of what is left, so over a hundred of them) against the same
suite unsplit, divided by the chunks handed out.
Prints numbers; asserts nothing.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from harness import Repo, System, median, plain_install, progress, report

TARGET = 0.85  # of linear speedup at 4 runners


def sleepy_suite(files: int, tests: int, seconds: float, split: int) -> dict[str, str]:
    out = {
        f"tests/test_{f:02d}.py": "".join(
            f"import time\n\n\ndef test_{t}():\n    time.sleep({seconds})\n" if t == 0 else
            f"\n\ndef test_{t}():\n    time.sleep({seconds})\n"
            for t in range(tests)
        )
        for f in range(files)
    }  # fmt: skip
    out[".volt.toml"] = f"[test]\nsplit = {split}\n" if split > 1 else ""
    return out


def timed(system: System, repo: Repo, files: dict[str, str]) -> tuple[float, dict]:
    sha = repo.commit(files)
    began = time.time()
    system.publish(repo.path, sha, read_asks=True)
    row = system.result_for(sha, timeout=600)
    if row["status"] != "passed":
        progress(f"warning: {sha[:12]} ended {row['status']}: {row['reason']}")
    return row["finished_at"] - began, row


def chunk_overhead(python: Path) -> tuple[float, int]:
    """Seconds each chunk handed out adds, and how many there were."""
    system = System(tag="bench-chunks")
    try:
        repo = Repo(system.tmp / "repo")
        system.dispatcher()
        system.runners(1, "--sandbox", "none", python=python)
        flat = {f"tests/test_{i:03d}.py": "def test_nothing():\n    pass\n" for i in range(200)}
        timed(system, repo, {**flat, ".volt.toml": ""})  # the environment, and past timings
        plain, _ = timed(system, repo, {**flat, ".volt.toml": "", "tests/again.txt": "1"})
        pulled, row = timed(system, repo, {**flat, ".volt.toml": "[test]\nsplit = 64\n"})
        chunks = system.query("SELECT COUNT(*) AS n FROM chunks WHERE job_id = ?", (row["job_id"],))[0]["n"]
        progress(f"{chunks} chunks: {pulled:.2f}s pulled vs {plain:.2f}s unsplit")
        return (pulled - plain) / max(1, chunks), chunks
    finally:
        system.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="a 12 s suite (0.1 s tests), 4 runners only")
    parser.add_argument("--runners", help="comma-separated runner counts (default 2,4,6)")
    parser.add_argument("--runs", type=int, help="runs per count, the median counts (default 1)")
    args = parser.parse_args()
    counts = [int(c) for c in (args.runners or ("4" if args.quick else "2,4,6")).split(",")]
    seconds = 0.1 if args.quick else 0.4
    runs = args.runs or 1
    progress("installing Volt CI into a plain venv")
    python = plain_install()
    system = System(tag="bench-split")
    try:
        repo = Repo(system.tmp / "repo")
        system.dispatcher()
        system.runners(max(counts), "--sandbox", "none", python=python)
        timed(system, repo, {"tests/test_warm.py": "def test_warm():\n    pass\n", ".volt.toml": f"[test]\nsplit = {max(counts)}\n"})  # fmt: skip
        unsplit = median(timed(system, repo, sleepy_suite(24, 5, seconds, 1))[0] for _ in range(runs))
        progress(f"unsplit on one runner: {unsplit:.2f}s")
        times = {}
        for n in counts:
            times[n] = median(timed(system, repo, sleepy_suite(24, 5, seconds, n))[0] for _ in range(runs))
            progress(f"split {n}: {times[n]:.2f}s")
    finally:
        system.close()
    per_chunk, chunks = chunk_overhead(python)
    suite_s = 24 * 5 * seconds
    print(f"24 files x 5 tests x {seconds:g}s ({suite_s:g}s of tests); unsplit on one runner {unsplit:.2f}s")
    print(f"{'runners':>8} {'seconds':>8} {'ideal':>7} {'speedup':>8} {'of linear':>10}")
    for n, t in times.items():
        print(f"{n:>8} {t:>8.2f} {unsplit / n:>7.2f} {unsplit / t:>8.2f} {unsplit / t / n:>9.0%}")
    print(f"per-chunk overhead: {per_chunk * 1000:.1f} ms (over {chunks} chunks)")
    at = 4 if 4 in times else max(times)
    share = unsplit / times[at] / at
    report(
        "split",
        f"split run: share of linear speedup at {at} runners ({suite_s:g}s suite)",
        f"{share:.0%}",
        f">= {TARGET:.0%}",
        share >= TARGET,
        share=share,
        unsplit=unsplit,
        times={str(n): t for n, t in times.items()},
    )
    report(
        "split_chunk",
        "split run: overhead per chunk handed out",
        f"{per_chunk * 1000:.1f} ms",
        "report",
        None,
        per_chunk_s=per_chunk,
        chunks=chunks,
    )


if __name__ == "__main__":
    main()
