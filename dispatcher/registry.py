"""Live runners, kept alive by heartbeats.

Liveness is a deadline: each heartbeat moves a runner's deadline to
`now + interval * misses`, where the interval is the one the runner reports,
and `expire()` removes the runners whose deadline passed. Time comes from an
injected clock so tests control it.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from common.messages import Hello


@dataclass
class RunnerInfo:
    runner_id: str
    session: str
    host: str
    pid: int
    state: str
    job_id: str
    attempt: int
    interval: float
    labels: list[str]
    first_seen: float
    last_seen: float
    deadline: float
    last_assigned: float = 0.0
    wall_last_seen: float = field(default_factory=time.time)
    lease: str = ""  # of the job its last heartbeat says it runs
    # It refused a job since its last heartbeat: send it nothing more until
    # it says again how it is, so a refusal cannot turn into a loop.
    refusing: bool = False


@dataclass(frozen=True)
class Seen:
    info: RunnerInfo
    new: bool  # first heartbeat from this runner id (or after it was lost)
    restarted_from: str | None  # the previous session, when the runner restarted under its id
    changed: bool = True  # new, restarted, or in another state than its last heartbeat said


class Registry:
    def __init__(self, clock: Callable[[], float] = time.monotonic, misses: int = 3) -> None:
        self.clock = clock
        self.misses = misses
        self.runners: dict[str, RunnerInfo] = {}

    def heartbeat(self, msg: Hello) -> Seen:
        now = self.clock()
        interval = min(max(msg.interval, 0.05), 3600.0)
        old = self.runners.get(msg.runner_id)
        info = RunnerInfo(
            runner_id=msg.runner_id,
            session=msg.session,
            host=msg.host,
            pid=msg.pid,
            state=msg.state,
            job_id=msg.job_id,
            attempt=msg.attempt,
            interval=interval,
            labels=list(msg.labels),
            first_seen=old.first_seen if old and old.session == msg.session else now,
            last_seen=now,
            deadline=now + interval * self.misses,
            last_assigned=old.last_assigned if old else 0.0,
            lease=msg.lease,
        )
        self.runners[msg.runner_id] = info
        restarted = old.session if old and old.session != msg.session else None
        changed = old is None or restarted is not None or old.state != info.state
        return Seen(info, new=old is None, restarted_from=restarted, changed=changed)

    def forgive(self, grace: float = 0.0) -> None:
        """Restart every deadline, giving at least `grace` seconds: after a broker
        outage nobody could be heard, and runners reconnect at their own pace."""
        now = self.clock()
        for r in self.runners.values():
            r.deadline = now + max(r.interval * self.misses, grace)

    def remove(self, runner_id: str) -> RunnerInfo | None:
        return self.runners.pop(runner_id, None)

    def expire(self, as_of: float | None = None) -> list[RunnerInfo]:
        """Remove and return the runners whose heartbeats stopped: whose deadline
        had passed at `as_of` (by default now)."""
        limit = self.clock() if as_of is None else as_of
        lost = [r for r in self.runners.values() if r.deadline < limit]
        for r in lost:
            del self.runners[r.runner_id]
        return lost

    def alive(self, runner_id: str) -> bool:
        return runner_id in self.runners

    def get(self, runner_id: str) -> RunnerInfo | None:
        return self.runners.get(runner_id)

    def available(self, busy: set[str]) -> list[RunnerInfo]:
        """Runners that can take a job now, the longest-unused first: idle by their
        own word (a heartbeat that carries no job) and by the store's."""
        free = [r for r in self.runners.values() if r.runner_id not in busy and is_free(r)]
        return sorted(free, key=lambda r: r.last_assigned)

    def able(self, labels: Iterable[str]) -> list[RunnerInfo]:
        """Live runners that carry every one of `labels`, whatever they are doing."""
        return [r for r in self.runners.values() if has_labels(r, labels)]


# The states in which a runner reports it would take a job (not paused, not draining).
TAKES_JOBS = ("idle", "busy")


def is_free(runner: RunnerInfo) -> bool:
    """A runner is free only when its heartbeat carries no job: one still running
    an attempt the dispatcher took from it (say, after a freeze) is not."""
    return runner.state == "idle" and not runner.job_id and not runner.refusing


def has_labels(runner: RunnerInfo, labels: Iterable[str]) -> bool:
    return set(labels).issubset(runner.labels)


def first_able(runners: list[RunnerInfo], labels: Iterable[str]) -> RunnerInfo | None:
    """The first of `runners` that carries every one of `labels`."""
    return next((r for r in runners if has_labels(r, labels)), None)
