"""What a test's runs across a branch's commits say: since when it fails, when
it last passed, and whether it got slower. Pure functions on the store's
TestRun rows (newest first), shared by `volt tests` and the results page."""

from __future__ import annotations

import statistics
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from dispatcher.store import TestRun

FAILING = ("failed", "error")
# A flaky test failed and then passed when run again: the run passed.
PASSING = ("passed", "flaky")
# Runs on each side of the duration trend.
TREND_RUNS = 10


@dataclass(frozen=True)
class Streak:
    """The current unbroken run of failures (newest first): its oldest run, and
    the last pass before it (None when every run kept failed)."""

    since: TestRun
    passed_before: TestRun | None
    runs: int


def failing_streak(runs: Sequence[TestRun]) -> Streak | None:
    """The streak the newest runs are in; None when the newest run that
    decided anything passed. Skipped runs decide nothing."""
    since, count = None, 0
    for run in runs:
        if run.outcome in FAILING:
            since, count = run, count + 1
        elif run.outcome in PASSING:
            return Streak(since, run, count) if since else None
    return Streak(since, None, count) if since else None


def from_job(runs: Sequence[TestRun], job_id: str) -> list[TestRun]:
    """The runs as they stood when `job_id` ran: it and the ones before it."""
    for i, run in enumerate(runs):
        if run.job_id == job_id:
            return list(runs[i:])
    return []


def trend(runs: Sequence[TestRun], n: int = TREND_RUNS) -> dict[str, Any] | None:
    """The median duration of the last n runs that ran, against the n before."""
    seconds = [r.duration_s for r in runs if r.outcome != "skipped"]
    recent, before = seconds[:n], seconds[n : 2 * n]
    if not recent:
        return None
    now = statistics.median(recent)
    then = statistics.median(before) if before else None
    return {
        "recent_median_s": round(now, 4),
        "recent_runs": len(recent),
        "before_median_s": None if then is None else round(then, 4),
        "before_runs": len(before),
        "change": None if not then else round(now / then - 1, 3),
    }


def commit_ref(run: TestRun | None) -> dict[str, Any] | None:
    """A run's job and commit, as an answer names them."""
    if run is None:
        return None
    return {"job_id": run.job_id, "commit": run.commit_sha, "subject": run.subject, "author": run.author}


def streak_dict(streak: Streak | None) -> dict[str, Any]:
    return {
        "failing_since": commit_ref(streak.since) if streak else None,
        "passed_before": commit_ref(streak.passed_before) if streak else None,
        "failing_runs": streak.runs if streak else 0,
    }


def trend_line(t: dict[str, Any] | None) -> str:
    """The trend in a few words: 'median 1.20 s over the last 10 runs, 0.80 s over the 10 before (+50%)'."""
    if t is None:
        return "no timed runs"
    line = f"median {t['recent_median_s']:.2f} s over the last {runs_text(t['recent_runs'])}"
    if t["before_median_s"] is None:
        return line
    line += f", {t['before_median_s']:.2f} s over the {t['before_runs']} before"
    return line + (f" ({t['change']:+.0%})" if t["change"] is not None else "")


def runs_text(n: int) -> str:
    """ "1 run", "5 runs"."""
    return f"{n} run" if n == 1 else f"{n} runs"
