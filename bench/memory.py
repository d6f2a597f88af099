"""Memory of each worker after many jobs, and whether it grows.

A real dispatcher, one real runner and an observer (watching the repository,
--poll 1). The repository has N commits (default 1,000, made with fast-import)
whose suite is `.volt.toml` command ["true"]; every commit is published
directly. The resident size (VmRSS) of each worker is read when the 10th
percent of jobs is recorded (job 100 of 1,000) and again after the last; the
result is the largest size at the end and the largest growth between the two.
"""

from __future__ import annotations

import argparse
import time

from harness import Repo, System, progress, report, rss_mb, wait

TARGET_MB = 80.0
FLAT_MB = 2.0  # growth from the first reading to the last that still counts as flat
WORKERS = ("dispatcher", "r1", "observer")
NAMES = {"dispatcher": "dispatcher", "r1": "runner", "observer": "observer"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="200 jobs instead of 1,000")
    parser.add_argument("--jobs", type=int)
    args = parser.parse_args()
    jobs = args.jobs or (200 if args.quick else 1000)
    early = max(1, jobs // 10)
    system = System(tag="bench-memory")
    try:
        repo = Repo(system.tmp / "repo")
        repo.import_commits(jobs, first_files={".volt.toml": '[test]\ncommand = ["true"]\n'})
        shas = repo.commits()
        system.dispatcher()
        system.runners(1)
        system.observer([repo.path], poll=1.0)
        progress(f"publishing {jobs} commits")
        began = time.monotonic()
        for sha in shas:
            system.publish(repo.path, sha)
        readings: dict[int, dict[str, float]] = {}
        for mark in (early, jobs):
            wait(lambda m=mark: system.done_count() >= m, timeout=jobs * 2 + 60, every=0.1, what=f"{mark} results")
            readings[mark] = {w: rss_mb(system.pid(w)) for w in WORKERS}
            progress(
                f"job {mark} after {time.monotonic() - began:.0f}s: "
                + ", ".join(f"{NAMES[w]} {mb:.1f} MB" for w, mb in readings[mark].items())
            )
        statuses = {r["status"] for r in system.done_rows()}
        print(f"{jobs} jobs ({statuses}) in {time.monotonic() - began:.0f}s; VmRSS in MB (10^6 bytes)")
        print(f"{'worker':>10} {f'job {early}':>10} {f'job {jobs}':>10} {'growth':>8}")
        for w in WORKERS:
            a, b = readings[early][w], readings[jobs][w]
            print(f"{NAMES[w]:>10} {a:>10.1f} {b:>10.1f} {b - a:>+8.1f}")
        biggest = max(readings[jobs].values())
        growth = max(readings[jobs][w] - readings[early][w] for w in WORKERS)
        report(
            "memory",
            f"memory (VmRSS) after {jobs} jobs: dispatcher / runner / observer",
            " / ".join(f"{readings[jobs][w]:.0f}" for w in WORKERS)
            + f" MB; growth since job {early} <= {growth:+.1f} MB",
            f"< {TARGET_MB:.0f} MB, growth < {FLAT_MB:g} MB",
            biggest < TARGET_MB and growth < FLAT_MB,
            readings={str(k): v for k, v in readings.items()},
            jobs_per_s=jobs / (time.monotonic() - began),
        )
    finally:
        system.close()


if __name__ == "__main__":
    main()
