"""Wall time for a burst of commits whose suite sleeps, on 1..N runners.

Each commit's suite is `python -c "time.sleep(S)"` (set in .volt.toml), so
the ideal time on R runners is commits * S / R. Times from the first publish
to the last result recorded (read from the store, so waiting costs the
dispatcher nothing). Prints the time, the speedup over one runner and the
share of linear speedup; asserts nothing.
"""

from __future__ import annotations

import argparse
import sys
import time

from harness import Repo, System, median, progress, report

TARGET = 0.90  # of linear speedup at 4 runners


def run(runners: int, commits: int, sleep: float) -> float:
    system = System(tag=f"bench-scale{runners}")
    try:
        repo = Repo(system.tmp / "repo")
        command = f'[test]\ncommand = ["{sys.executable}", "-c", "import time; time.sleep({sleep})"]\n'
        repo.commit({".volt.toml": command})
        system.dispatcher()
        system.runners(runners)
        shas = [repo.commit() for _ in range(commits)]
        started = time.time()
        for sha in shas:
            system.publish(repo.path, sha)
        system.wait(lambda: system.done_count() >= commits, timeout=commits * (sleep + 5))
        rows = system.done_rows()
        statuses = {r["status"] for r in rows}
        if statuses != {"passed"}:
            progress(f"warning: statuses {statuses}")
        took = max(r["finished_at"] for r in rows) - started
        progress(f"{runners} runner(s): {took:.2f}s")
        return took
    finally:
        system.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="1 and 4 runners, 12 commits of 1 s")
    parser.add_argument("--runners", help="comma-separated runner counts (default 1,2,4,6)")
    parser.add_argument("--commits", type=int)
    parser.add_argument("--sleep", type=float)
    parser.add_argument("--runs", type=int, help="runs per runner count, the median counts (default 2; quick 1)")
    args = parser.parse_args()
    runs = args.runs or (1 if args.quick else 2)
    counts = [int(c) for c in (args.runners or ("1,4" if args.quick else "1,2,4,6")).split(",")]
    commits = args.commits or (12 if args.quick else 24)
    sleep = args.sleep or (1.0 if args.quick else 2.0)
    times = {n: median(run(n, commits, sleep) for _ in range(runs)) for n in counts}
    base = times[counts[0]] * counts[0]
    print(f"{commits} commits, suite sleeps {sleep:g}s; median of {runs} run(s) per count")
    print(f"{'runners':>8} {'seconds':>8} {'ideal':>7} {'speedup':>8} {'of linear':>10}")
    for n, t in times.items():
        ideal = commits * sleep / n
        print(f"{n:>8} {t:>8.2f} {ideal:>7.2f} {base / t:>8.2f} {base / t / n:>9.0%}")
    at = 4 if 4 in times else max(times)
    share = base / times[at] / at
    report(
        "scaling",
        f"scaling: share of linear speedup at {at} runners ({commits} commits x {sleep:g}s)",
        f"{share:.0%}",
        f">= {TARGET:.0%}",
        share >= TARGET,
        share=share,
        times={str(n): t for n, t in times.items()},
    )


if __name__ == "__main__":
    main()
