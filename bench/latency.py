"""Commit-to-result latency and the system's own overhead per job.

One runner, a one-test pytest suite. For each commit:
  overhead  = result recorded - commit published - the test process's own wall time
  notify    = result recorded - the moment a git hook starts `volt notify` (its start-up included),
              published to RabbitMQ by itself (bench/push.py has it told to the observer)
  poll 1 s  = result recorded - the moment of the commit, with `volt observer --poll 1`
The runner runs tests in its sandbox (the default); the overhead is measured
again on a runner with --sandbox none, to show what the sandbox costs.
Results are read from the dispatcher's store (read-only), so waiting for them
puts no load on the dispatcher. Prints medians; asserts nothing.
"""

from __future__ import annotations

import argparse
import signal
import subprocess
import sys
import time
from pathlib import Path

from harness import Repo, System, median, progress, report

ONE_TEST = "def test_one():\n    assert True\n"
TARGET_OVERHEAD = 0.100  # s beyond the test process, published to recorded
TARGET_NOTIFY = 0.150  # s beyond the test process, hook start to recorded
TARGET_POLL = 0.700  # s beyond the test process, commit to recorded with --poll 1
POLL = 1.0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="5 runs instead of 15")
    parser.add_argument("--runs", type=int)
    args = parser.parse_args()
    args.runs = args.runs or (5 if args.quick else 15)
    system = System(tag="bench-latency")
    try:
        repo = Repo(system.tmp / "repo")
        repo.commit({"tests/test_one.py": ONE_TEST})
        system.dispatcher()
        system.runners(1)
        # Warm the runner's clone, as a runner in service would be.
        system.publish(repo.path, repo.head())
        system.result_for(repo.head())
        progress(f"runner warm; {args.runs} commits through volt notify")

        # What a git hook runs: the installed `volt` command, its start-up included.
        volt = Path(sys.executable).with_name("volt")
        command = [str(volt)] if volt.exists() else [sys.executable, "-m", "common.cli"]
        overhead, notify_extra, notify_total, notify_startup, test_times = [], [], [], [], []
        for _ in range(args.runs):
            sha = repo.commit()
            started = time.time()
            subprocess.run(
                [*command, "notify", "--repo", str(repo.path), "--branch", "main",
                 "--commit", sha, "--amqp-url", system.amqp_url, "--namespace", system.ns],
                check=True, capture_output=True,
            )  # fmt: skip
            row = system.result_for(sha)
            recorded = row["finished_at"]
            test_times.append(row["duration_s"])
            overhead.append(recorded - row["seen_at"] - row["duration_s"])
            notify_startup.append(row["seen_at"] - started)  # seen_at: when notify built the message
            notify_total.append(recorded - started)
            notify_extra.append(recorded - started - row["duration_s"])

        system.observer([repo.path], poll=POLL)
        time.sleep(2)
        poll_runs = args.runs
        progress(f"{poll_runs} commits seen by volt observer --poll 1")
        poll_total, poll_extra, poll_seen = [], [], []
        for i in range(poll_runs):
            # Land the commits evenly over the poll cycle. A fixed pause would not:
            # each commit would follow the previous poll by the same time (a
            # result's latency plus the pause), so all would wait alike.
            time.sleep((i * 0.618034) % 1.0 * POLL)
            sha = repo.commit()
            committed = time.time()
            row = system.result_for(sha)
            recorded = row["finished_at"]
            poll_total.append(recorded - committed)
            poll_extra.append(recorded - committed - row["duration_s"])
            poll_seen.append(row["seen_at"] - committed)  # seen_at: when the observer published it

        # The same without the sandbox: what bwrap costs each job.
        runner = system.procs[system.runner_ids[0]]
        runner.send_signal(signal.SIGTERM)
        runner.wait(timeout=30)
        system.runner_ids.append("bare")
        system.start("bare", "runner", "--id", "bare", "--workdir", str(system.tmp / "bare"), "--sandbox", "none")
        system.wait_for_runners(1)
        warm = repo.commit()
        system.publish(repo.path, warm)
        system.result_for(warm)
        progress(f"{args.runs} commits on a runner with --sandbox none")
        bare = []
        for _ in range(args.runs):
            sha = repo.commit()
            system.publish(repo.path, sha)
            row = system.result_for(sha)
            bare.append(row["finished_at"] - row["seen_at"] - row["duration_s"])

        t = median(test_times)
        print(f"runs: {args.runs} (notify), {len(poll_total)} (poll 1 s); test process median {t * 1000:.0f} ms")
        print(f"system overhead per job (recorded - published - test time): median {median(overhead) * 1000:.0f} ms")
        print(
            f"commit-to-result with volt notify: median {median(notify_total) * 1000:.0f} ms, "
            f"{median(notify_extra) * 1000:.0f} ms beyond the test process "
            f"(of which volt notify's start-up to its publish: {median(notify_startup) * 1000:.0f} ms)"
        )
        print(
            f"commit-to-result with --poll 1:    median {median(poll_total) * 1000:.0f} ms, "
            f"{median(poll_extra) * 1000:.0f} ms beyond the test process "
            f"(of which commit to the observer's publish: {median(poll_seen) * 1000:.0f} ms)"
        )
        print(f"system overhead per job with --sandbox none: median {median(bare) * 1000:.0f} ms")
        over, notify, poll = median(overhead), median(notify_extra), median(poll_extra)
        report(
            "overhead",
            "system overhead per job (1 test, warm runner)",
            f"{over * 1000:.0f} ms",
            f"< {TARGET_OVERHEAD * 1000:.0f} ms",
            over < TARGET_OVERHEAD,
            median_s=over,
            test_s=t,
            runs=len(overhead),
        )
        report(
            "overhead_nosandbox",
            "system overhead per job without the sandbox (--sandbox none)",
            f"{median(bare) * 1000:.0f} ms (the sandbox adds {(over - median(bare)) * 1000:.0f} ms)",
            f"< {TARGET_OVERHEAD * 1000:.0f} ms with it",
            None,
            median_s=median(bare),
            runs=len(bare),
        )
        report(
            "notify",
            "commit-to-result with volt notify straight to RabbitMQ, beyond test time",
            f"+{notify * 1000:.0f} ms (total {median(notify_total) * 1000:.0f} ms)",
            f"< +{TARGET_NOTIFY * 1000:.0f} ms",
            notify < TARGET_NOTIFY,
            median_s=notify,
            total_s=median(notify_total),
            startup_s=median(notify_startup),
        )
        report(
            "poll",
            "commit-to-result with --poll 1, beyond test time",
            f"+{poll * 1000:.0f} ms (total {median(poll_total) * 1000:.0f} ms)",
            f"< +{TARGET_POLL * 1000:.0f} ms",
            poll < TARGET_POLL,
            median_s=poll,
            total_s=median(poll_total),
            seen_s=median(poll_seen),
        )
    finally:
        system.close()


if __name__ == "__main__":
    main()
