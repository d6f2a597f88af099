"""Heartbeat load: the dispatcher's CPU while many runners heartbeat.

A real dispatcher and N simulated runners (bench/simrunners.py, one process,
its own CPU not counted) heartbeating at the default 2 s interval, spread
evenly. After a warm-up, the dispatcher's CPU time (utime + stime from
/proc/PID/stat) is sampled over several windows; the median window is the
result, as a share of one core. Also checks the dispatcher keeps up: its
control queue stays short and every runner stays registered. With --profile,
py-spy records the dispatcher during the windows.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from harness import (
    CpuMeter,
    System,
    add_window_args,
    ask,
    median,
    progress,
    report,
    start_profiler,
    stop_profiler,
    window_plan,
)

from common import naming

TARGET = 0.15  # of one core


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    add_window_args(parser)
    parser.add_argument("--runners", type=int, default=500)
    parser.add_argument("--interval", type=float, default=2.0)
    parser.add_argument("--profile", type=Path, help="py-spy the dispatcher meanwhile (.svg, .txt or .json)")
    args = parser.parse_args()
    windows, window = window_plan(args, quick_window=6.0)
    system = System(tag="bench-heartbeats")
    try:
        system.dispatcher()
        idle = CpuMeter(system.pid("dispatcher")).share(2.0)
        progress(f"idle dispatcher: {idle:.1%} of one core")
        system.simulated_runners("hb", args.runners, "heartbeat", "--interval", str(args.interval))
        system.wait_for_runners(args.runners)
        time.sleep(2 * args.interval)  # every runner has heartbeated at least once more
        progress(f"{args.runners} runners registered; measuring {windows} x {window:g}s")
        spy = start_profiler(system.pid("dispatcher"), args.profile) if args.profile else None
        try:
            shares = CpuMeter(system.pid("dispatcher")).windows(windows, window, "dispatcher")
        finally:
            if spy is not None:
                stop_profiler(spy)
        backlog = system.broker.queue_depth(naming.dispatcher_control_queue(system.ns))
        live = ask(system.settings, "ping")["runners"]
        share = median(shares)
        print(f"{args.runners} runners every {args.interval:g}s; idle dispatcher {idle:.1%} of one core")
        print(f"windows: {', '.join(f'{s:.1%}' for s in shares)}; control queue ready={backlog and backlog[0]}")
        print(f"live runners at the end: {live}")
        report(
            "heartbeats",
            f"heartbeat load ({args.runners} runners, {args.interval:g}s): dispatcher CPU",
            f"{share:.1%} of a core",
            f"< {TARGET:.0%}",
            share < TARGET and live >= args.runners,
            share=share,
            windows=shares,
            idle=idle,
            live=live,
        )
    finally:
        system.close()


if __name__ == "__main__":
    main()
