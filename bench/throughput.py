"""Dispatcher throughput: jobs routed and recorded per second.

A real dispatcher (durable SQLite store, publisher confirms) and 50 simulated
runners (bench/simrunners.py, one process) that answer every Job at once with
JobStarted and a passed JobResult. The benchmark publishes N CommitSeen
messages (fake commit ids; nothing is checked out) and times from the first
publish to the N-th result recorded (the store's finished_at).

It runs once per store and queue type: SQLite with classic queues (one
machine, as before), SQLite with quorum queues (the default), and PostgreSQL
with quorum queues (standby dispatchers' store). --store and --queue-type
pick one.

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


CONFIGS = (("sqlite", "classic"), ("sqlite", "quorum"), ("postgresql", "quorum"))


def run(
    jobs: int, runners: int, sim_procs: int, profile: str | None, idle: bool, store: str, queue_type: str
) -> dict[str, float]:
    system = System(tag="bench-throughput", store=store, queue_type=queue_type)
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
        progress(
            f"{store}+{queue_type}: {jobs} recorded in {total:.1f}s (publishing took {published - first:.1f}s); "
            f"statuses {statuses}"
        )
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
    parser.add_argument("--store", choices=("sqlite", "postgresql"), help="only this store (default: each)")
    parser.add_argument("--queue-type", choices=("quorum", "classic"), help="only this queue type (default: each)")
    parser.add_argument("--profile", help=f"py-spy output, e.g. {OUT / 'dispatcher.svg'}")
    parser.add_argument("--idle", action="store_true", help="profile: count waiting (idle) samples too")
    args = parser.parse_args()
    jobs = args.jobs or (1000 if args.quick else 5000)
    runs = args.runs or (1 if args.quick or args.profile else 2)
    configs = [
        (store, qt) for store, qt in CONFIGS if (args.store in (None, store)) and (args.queue_type in (None, qt))
    ] or [(args.store or "sqlite", args.queue_type or "quorum")]
    rates: dict[tuple[str, str], list[dict[str, float]]] = {}
    for store, queue_type in configs:
        for i in range(runs):
            progress(f"{store} + {queue_type} queues: run {i + 1}/{runs}")
            rates.setdefault((store, queue_type), []).append(
                run(jobs, args.runners, args.sim_procs, args.profile, args.idle, store, queue_type)
            )
    print(f"{jobs} jobs, {args.runners} simulated runners, {runs} run(s) each:")
    for (store, queue_type), results in rates.items():
        rate = median(r["rate"] for r in results)
        steady = median(r["steady"] for r in results)
        print(
            f"  {store:<10} {queue_type:<7} queues: {rate:5.0f} jobs/s (steady {steady:.0f}; runs "
            f"{[round(r['rate']) for r in results]})"
        )
    for (store, queue_type), results in rates.items():
        rate = median(r["rate"] for r in results)
        default = (store, queue_type) == ("sqlite", "quorum")
        report(
            "throughput" if default else f"throughput_{store}_{queue_type}",
            f"dispatcher throughput, {store} + {queue_type} queues ({args.runners} sim. runners, {jobs} jobs)",
            f"{rate:.0f} jobs/s",
            f">= {TARGET:.0f} jobs/s",
            rate >= TARGET,
            rate=rate,
            steady=median(r["steady"] for r in results),
            runs=[r["rate"] for r in results],
        )


if __name__ == "__main__":
    main()
