"""Dispatcher throughput: jobs routed and recorded per second.

A real dispatcher (durable SQLite store, publisher confirms) and 50 simulated
runners (bench/simrunners.py, one process) that answer every Job at once with
JobStarted and a passed JobResult. The benchmark publishes N CommitSeen
messages (fake commit ids; nothing is checked out) and times from the first
publish to the N-th result recorded (the store's finished_at).

With --profile PATH, py-spy records the dispatcher meanwhile (.svg: flame
graph; .txt: collapsed stacks for bench/hotspots.py; .json: speedscope).
"""

from __future__ import annotations

import argparse
import hashlib
import subprocess
import time
from pathlib import Path

from harness import OUT, System, median, progress, report, start_profiler, stop_profiler, wait

TARGET = 200.0  # jobs/s


def run(jobs: int, runners: int, sim_procs: int, profile: str | None, idle: bool) -> dict[str, float]:
    system = System(tag="bench-throughput")
    spy: subprocess.Popen[bytes] | None = None
    try:
        system.dispatcher()
        per = -(-runners // sim_procs)
        for i in range(sim_procs):
            system.simulated_runners(f"sim{i}", min(per, runners - i * per), "answer")
        system.wait_for_runners(runners)
        progress(f"{runners} simulated runners registered; publishing {jobs} commits")
        if profile:
            spy = start_profiler(system.pid("dispatcher"), Path(profile), idle)
        shas = [hashlib.sha1(f"bench commit {i}".encode()).hexdigest() for i in range(jobs)]
        first = time.time()
        for i, sha in enumerate(shas):
            system.publish("/bench/throughput-repo", sha)
            if (i + 1) % 1000 == 0:
                progress(f"published {i + 1}, recorded {system.done_count()}")
        published = time.time()
        wait(lambda: system.done_count() >= jobs, timeout=jobs / 5 + 60, every=0.25, what=f"{jobs} results")
        rows = system.done_rows()
        finished = sorted(r["finished_at"] for r in rows)
        total = finished[jobs - 1] - first
        # The steady part: from the 20% mark to the last result.
        k = jobs // 5
        steady = (jobs - 1 - k) / (finished[jobs - 1] - finished[k])
        statuses = {r["status"] for r in rows}
        progress(f"{jobs} recorded in {total:.1f}s (publishing took {published - first:.1f}s); statuses {statuses}")
        return {"rate": jobs / total, "steady": steady, "seconds": total, "publish_s": published - first}
    finally:
        if spy is not None:
            stop_profiler(spy)
        system.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="1,000 jobs, one run")
    parser.add_argument("--jobs", type=int)
    parser.add_argument("--runs", type=int)
    parser.add_argument("--runners", type=int, default=50)
    parser.add_argument("--sim-procs", type=int, default=1, help="processes the simulated runners are spread over")
    parser.add_argument("--profile", help=f"py-spy output, e.g. {OUT / 'dispatcher.svg'}")
    parser.add_argument("--idle", action="store_true", help="profile: count waiting (idle) samples too")
    args = parser.parse_args()
    jobs = args.jobs or (1000 if args.quick else 5000)
    runs = args.runs or (1 if args.quick or args.profile else 2)
    results = []
    for i in range(runs):
        progress(f"run {i + 1}/{runs}")
        results.append(run(jobs, args.runners, args.sim_procs, args.profile, args.idle))
    rate = median(r["rate"] for r in results)
    steady = median(r["steady"] for r in results)
    print(f"{jobs} jobs, {args.runners} simulated runners, {runs} run(s): {[round(r['rate']) for r in results]} jobs/s")
    print(f"steady rate (20% mark to the last result): median {steady:.0f} jobs/s")
    report(
        "throughput",
        f"dispatcher throughput ({args.runners} sim. runners, {jobs} jobs)",
        f"{rate:.0f} jobs/s",
        f">= {TARGET:.0f} jobs/s",
        rate >= TARGET,
        rate=rate,
        steady=steady,
        runs=[r["rate"] for r in results],
    )


if __name__ == "__main__":
    main()
