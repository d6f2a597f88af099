"""Leases: which runner holds which job, and until when (delivery rule 5).

Each assignment has a lease token that only its runner learns. The job stays
with that runner while heartbeats that echo the token arrive; when none has
come for the runner's lease window (its heartbeat interval times the misses
allowed), the job is due to be taken back. This module only keeps the
deadlines and says why a job's lease ran out; the dispatcher acts on it.
Time comes from the dispatcher's injected clock.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass

from dispatcher.registry import Registry
from dispatcher.store import JobRow

# A runner still running an attempt taken from it is told to stop at most this often.
CANCEL_EVERY = 1.0


@dataclass
class Watch:
    lease: str
    deadline: float


class Leases:
    def __init__(self, clock: Callable[[], float]) -> None:
        self.clock = clock
        self.watches: dict[str, Watch] = {}
        self._cancelled: dict[tuple[str, str], float] = {}  # (runner, lease) -> when last told

    def watch(self, job_id: str, lease: str, window: float) -> None:
        """A new assignment, or one seen for the first time: it holds for `window`."""
        self.watches[job_id] = Watch(lease, self.clock() + window)

    def renew(self, job_id: str, lease: str, window: float) -> bool:
        """A heartbeat echoed `lease`: True (and the lease holds for `window` more)
        when it is the job's current one."""
        watch = self.watches.get(job_id)
        if watch is None or not lease or watch.lease != lease:
            return False
        watch.deadline = max(watch.deadline, self.clock() + window)
        return True

    def drop(self, job_id: str) -> None:
        self.watches.pop(job_id, None)

    def forgive(self, window: float) -> None:
        """Nobody could be heard for a while: every lease holds for `window` from now."""
        until = self.clock() + window
        for watch in self.watches.values():
            watch.deadline = max(watch.deadline, until)

    def due(self, active: Iterable[JobRow], grace: float, as_of: float | None = None) -> list[JobRow]:
        """The active jobs whose lease had run out at `as_of` (by default now).
        One not watched yet (after a restart) gets `grace` to be echoed first."""
        now = self.clock()
        limit = now if as_of is None else as_of
        out, seen = [], set()
        for row in active:
            seen.add(row.job_id)
            watch = self.watches.get(row.job_id)
            if watch is None or watch.lease != row.lease:
                self.watches[row.job_id] = Watch(row.lease or "", now + grace)
            elif watch.deadline < limit:
                out.append(row)
        if len(self.watches) > 2 * len(seen) + 100:  # ended jobs nobody dropped
            self.watches = {k: v for k, v in self.watches.items() if k in seen}
        return out

    def may_cancel(self, runner_id: str, lease: str) -> bool:
        """Whether to tell `runner_id` now to stop its attempt under `lease`."""
        now = self.clock()
        key = (runner_id, lease)
        if now - self._cancelled.get(key, -1e9) < CANCEL_EVERY:
            return False
        if len(self._cancelled) > 10000:
            self._cancelled.clear()
        self._cancelled[key] = now
        return True


def why_gone(row: JobRow, registry: Registry, lost: dict[str, str]) -> tuple[str, bool]:
    """Why a job's lease ran out, and whether that counts as a failed attempt.
    `lost` has the reason each runner declared lost was lost for."""
    runner = row.runner or ""
    info = registry.get(runner)
    if info is None:
        return lost.get(runner) or f"runner {runner} not seen since the dispatcher started", True
    if row.state == "assigned":
        return f"runner {runner} never started it", False
    if row.session and info.session != row.session:
        return f"runner restarted (session {row.session} -> {info.session})", True
    says = f"job {info.job_id}" if info.job_id else "no job"
    return f"runner {runner} is not running it (its heartbeats say {says})", True
