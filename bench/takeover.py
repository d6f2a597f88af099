"""Takeover time of a standby dispatcher (PostgreSQL store, quorum queues).

Two real dispatchers on one PostgreSQL database; the active one is killed
with SIGKILL, and the time is taken from the kill until a dispatcher answers
`volt check`'s question again (the standby, now active: it has the lease and
consumes). The killed one is started again as the new standby, and the next
run kills the other. Reports the median of the runs.
"""

from __future__ import annotations

import argparse
import signal
import time

from harness import System, median, progress, report, wait

from dispatcher.client import QueryFailed, ask

TARGET = 10.0  # seconds


def answered(system: System) -> bool:
    try:
        ask(system.settings, "ping", timeout=2)
        return True
    except QueryFailed:
        return False


def stood_by(system: System, name: str) -> bool:
    return "standing by" in (system.tmp / f"{name}.log").read_text(errors="replace")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="3 takeovers")
    parser.add_argument("--runs", type=int, help="takeovers to time (default 5)")
    args = parser.parse_args()
    runs = args.runs or (3 if args.quick else 5)
    system = System(tag="bench-takeover", store="postgresql", queue_type="quorum")
    times: list[float] = []
    try:
        names = ["dispatcher-a", "dispatcher-b"]
        system.dispatcher(name=names[0])
        system.dispatcher(name=names[1], wait_ready=False)
        wait(lambda: stood_by(system, names[1]), 30, what="the standby")
        active, standby = names
        for i in range(runs):
            proc = system.procs[active]
            killed = time.monotonic()
            proc.send_signal(signal.SIGKILL)
            proc.wait()
            wait(lambda: answered(system), 60, every=0.05, what="the standby to take over")
            took = time.monotonic() - killed
            times.append(took)
            progress(f"run {i + 1}/{runs}: {active} killed, {standby} answered after {took:.2f}s")
            # The killed one comes back as the standby of the next run.
            (system.tmp / f"{active}.log").write_text("")
            system.dispatcher(name=active, wait_ready=False)
            wait(lambda a=active: stood_by(system, a), 30, what="the new standby")
            active, standby = standby, active
    finally:
        system.close()
    took = median(times)
    print(f"takeover after kill -9, {runs} runs: {[round(t, 2) for t in times]} s; median {took:.2f}s")
    report(
        "takeover",
        f"standby dispatcher takeover after kill -9 (PostgreSQL, quorum queues; median of {runs})",
        f"{took:.1f} s",
        f"< {TARGET:.0f} s",
        took < TARGET,
        median=took,
        runs=times,
    )


if __name__ == "__main__":
    main()
