"""Observer CPU: many local repositories polled every second, nothing changing.

Starts `volt observer` with N --repo local paths (default 50) and --poll 1,
lets it publish each branch head once and settle, then samples its CPU time
(with any git processes it starts) over several windows; the median window
is the result, as a share of one core. No dispatcher is needed: the commits
wait in their queue.
"""

from __future__ import annotations

import argparse
import time

from harness import CpuMeter, Repo, System, add_window_args, median, progress, report, window_plan

TARGET = 0.20  # of one core


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    add_window_args(parser)
    parser.add_argument("--repos", type=int, default=50)
    parser.add_argument("--poll", type=float, default=1.0)
    args = parser.parse_args()
    windows, window = window_plan(args, quick_window=5.0)
    system = System(tag="bench-observer")
    try:
        repos = []
        for i in range(args.repos):
            repo = Repo(system.tmp / "repos" / f"repo{i:03d}")
            repo.import_commits(3, files=20)
            repos.append(repo.path)
        progress(f"{args.repos} repositories made; starting the observer")
        system.observer(repos, poll=args.poll)
        time.sleep(5)  # start-up, first sight of every branch, a few polls
        shares = CpuMeter(system.pid("observer")).windows(windows, window, "observer")
        share = median(shares)
        print(f"{args.repos} repositories, --poll {args.poll:g}; windows: {', '.join(f'{s:.1%}' for s in shares)}")
        report(
            "observer",
            f"observer CPU, {args.repos} repos polled every {args.poll:g}s, idle",
            f"{share:.1%} of a core",
            f"< {TARGET:.0%}",
            share < TARGET,
            share=share,
            windows=shares,
        )
    finally:
        system.close()


if __name__ == "__main__":
    main()
