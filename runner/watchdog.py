"""A runner's watchdog: kills the test run whose lease ran out, whatever the runner does.

One small process per runner, started with it. The runner tells it over a
pipe which process group runs the current job and until when the job's lease
holds, on time.monotonic() (CLOCK_MONOTONIC: one clock for every process on
the machine). Each heartbeat the broker confirms moves the deadline on. If
the runner is frozen (SIGSTOP), wedged, or cut off from the broker, nobody
moves it, and the watchdog kills the group before the dispatcher gives the
job to another runner: a job never runs twice at the same time. If the runner
dies, the pipe closes and the group goes at once.

Lines it reads:
    run PGID DEADLINE   a job's process group started
    until DEADLINE      the lease was renewed
    hold                the broker blocks publishers; the dispatcher takes
                        nothing away meanwhile, so neither do we
    done                the group ended; forget it
"""

from __future__ import annotations

import math
import os
import select
import signal
import sys
import time


class Watch:
    """The watchdog's state; pure, so it is tested without processes."""

    def __init__(self) -> None:
        self.pgid: int | None = None
        self.deadline = math.inf

    def feed(self, line: str) -> None:
        parts = line.split()
        if not parts:
            return
        if parts[0] == "run" and len(parts) == 3:
            self.pgid, self.deadline = int(parts[1]), float(parts[2])
        elif parts[0] == "until" and len(parts) == 2:
            self.deadline = float(parts[1])
        elif parts[0] == "hold":
            self.deadline = math.inf
        elif parts[0] == "done":
            self.pgid, self.deadline = None, math.inf

    def wait_for(self, now: float) -> float | None:
        """Seconds until the deadline (None: nothing to watch)."""
        if self.pgid is None or self.deadline == math.inf:
            return None
        return max(0.0, self.deadline - now)


def _kill(pgid: int | None, why: str) -> None:
    if pgid is None:
        return
    try:
        os.killpg(pgid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        return
    print(f"volt watchdog: killed the test process group {pgid}: {why}", file=sys.stderr, flush=True)


def main() -> int:
    # Ctrl-C in the runner's terminal is the runner's to handle, not ours.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    watch = Watch()
    fd = sys.stdin.fileno()
    buf = b""
    while True:
        ready, _, _ = select.select([fd], [], [], watch.wait_for(time.monotonic()))
        if not ready:
            _kill(watch.pgid, "its lease ran out (the runner stopped renewing it)")
            watch.feed("done")
            continue
        chunk = os.read(fd, 4096)
        if not chunk:
            _kill(watch.pgid, "the runner is gone")
            return 0
        buf += chunk
        *lines, buf = buf.split(b"\n")
        for line in lines:
            try:
                watch.feed(line.decode())
            except ValueError:
                pass  # only the runner writes here; a broken line is not worth dying for


if __name__ == "__main__":
    sys.exit(main())
