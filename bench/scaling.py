"""Wall time for a burst of commits whose suite sleeps, on 1..N runners.

Each commit's suite is `python -c "time.sleep(S)"` (set in .volt.toml), so
the ideal time on R runners is commits * S / R. Prints the time, the speedup
over one runner and the share of linear speedup; asserts nothing.
"""

from __future__ import annotations

import argparse
import sys
import time

from harness import Repo, System, epoch


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
        system.wait(lambda: len(system.results()) >= commits, timeout=commits * (sleep + 5))
        rows = system.results()
        assert {r["status"] for r in rows} == {"passed"}, rows
        return max(epoch(r["finished_at"]) for r in rows) - started
    finally:
        system.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--runners", default="1,3", help="comma-separated runner counts")
    parser.add_argument("--commits", type=int, default=12)
    parser.add_argument("--sleep", type=float, default=2.0)
    args = parser.parse_args()
    counts = [int(c) for c in args.runners.split(",")]
    times = {n: run(n, args.commits, args.sleep) for n in counts}
    base = times[counts[0]] * counts[0]
    print(f"{args.commits} commits, suite sleeps {args.sleep:g}s")
    print(f"{'runners':>8} {'seconds':>8} {'ideal':>7} {'speedup':>8} {'of linear':>10}")
    for n, t in times.items():
        ideal = args.commits * args.sleep / n
        print(f"{n:>8} {t:>8.2f} {ideal:>7.2f} {base / t:>8.2f} {base / t / n:>9.0%}")


if __name__ == "__main__":
    main()
