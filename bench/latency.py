"""Commit-to-result latency and the system's own overhead per job.

One runner, a one-test pytest suite. For each commit:
  overhead  = result recorded - commit published - the test process's own wall time
  notify    = result recorded - the moment a git hook starts `volt notify` (its start-up included)
  poll 1 s  = result recorded - the moment of the commit, with `volt observer --poll 1`
Prints medians; asserts nothing.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time

from harness import Repo, System, epoch, median

ONE_TEST = "def test_one():\n    assert True\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--runs", type=int, default=15)
    args = parser.parse_args()
    system = System(tag="bench-latency")
    try:
        repo = Repo(system.tmp / "repo")
        repo.commit({"tests/test_one.py": ONE_TEST})
        system.dispatcher()
        system.runners(1)
        # Warm the runner's clone, as a runner in service would be.
        system.publish(repo.path, repo.git("rev-parse", "HEAD"))
        system.result_for(repo.git("rev-parse", "HEAD"))

        overhead, notify_extra, notify_total, test_times = [], [], [], []
        for _ in range(args.runs):
            sha = repo.commit()
            started = time.time()
            subprocess.run(
                [sys.executable, "-m", "common.cli", "notify", "--repo", str(repo.path), "--branch", "main",
                 "--commit", sha, "--amqp-url", system.amqp_url, "--namespace", system.ns],
                check=True, capture_output=True,
            )  # fmt: skip
            row = system.result_for(sha)
            recorded = epoch(row["finished_at"])
            test_times.append(row["duration_s"])
            overhead.append(recorded - epoch(row["seen_at"]) - row["duration_s"])
            notify_total.append(recorded - started)
            notify_extra.append(recorded - started - row["duration_s"])

        system.observer(repo.path, poll=1.0)
        time.sleep(2)
        poll_total, poll_extra = [], []
        for _ in range(max(5, args.runs // 2)):
            sha = repo.commit()
            committed = time.time()
            row = system.result_for(sha)
            recorded = epoch(row["finished_at"])
            poll_total.append(recorded - committed)
            poll_extra.append(recorded - committed - row["duration_s"])
            time.sleep(0.37)  # land commits at different points of the poll cycle

        t = median(test_times)
        print(f"runs: {args.runs} (notify), {len(poll_total)} (poll 1 s); test process median {t * 1000:.0f} ms")
        print(f"system overhead per job (recorded - published - test time): median {median(overhead) * 1000:.0f} ms")
        print(
            f"commit-to-result with volt notify: median {median(notify_total) * 1000:.0f} ms, "
            f"{median(notify_extra) * 1000:.0f} ms beyond the test process"
        )
        print(
            f"commit-to-result with --poll 1:    median {median(poll_total) * 1000:.0f} ms, "
            f"{median(poll_extra) * 1000:.0f} ms beyond the test process"
        )
    finally:
        system.close()


if __name__ == "__main__":
    main()
