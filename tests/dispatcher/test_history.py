"""Since when a test fails, when it last passed, and its duration trend: pure logic on made-up runs."""

from __future__ import annotations

import pytest

from dispatcher import history
from dispatcher.store import TestRun as Run  # not a test class to pytest


def runs(outcomes: str, seconds: list[float] | None = None) -> list[Run]:
    """Runs newest first, one letter an outcome: p passed, f failed, e error, s skipped, k flaky."""
    names = {"p": "passed", "f": "failed", "e": "error", "s": "skipped", "k": "flaky"}
    took = seconds or [1.0] * len(outcomes)
    return [
        Run("t::x", names[o], took[i], f"job{i}", f"{i:040x}", f"subject {i}", "Ada", None)
        for i, o in enumerate(outcomes)
    ]


@pytest.mark.parametrize(
    ("outcomes", "since", "before", "count"),
    [
        ("ffpf", 1, 2, 2),  # the newest two fail; the pass before them ends the streak
        ("fsefp", 3, 4, 3),  # a skip decides nothing; an error is a failure
        ("fkf", 0, 1, 1),  # flaky passed in the end
        ("fff", 2, None, 3),  # failing in every run kept
        ("sf", 1, None, 1),
    ],
)
def test_failing_since_is_the_oldest_of_the_current_failures(
    outcomes: str, since: int, before: int | None, count: int
) -> None:
    found = history.failing_streak(runs(outcomes))
    assert found is not None
    assert found.since.job_id == f"job{since}" and found.runs == count
    assert (found.passed_before.job_id if found.passed_before else None) == (None if before is None else f"job{before}")


@pytest.mark.parametrize("outcomes", ["", "p", "pff", "spf", "ss", "kf"])
def test_a_test_whose_latest_decided_run_passed_is_not_failing(outcomes: str) -> None:
    assert history.failing_streak(runs(outcomes)) is None
    assert history.streak_dict(None) == {"failing_since": None, "passed_before": None, "failing_runs": 0}


def test_the_streak_as_of_a_job_ignores_the_runs_after_it() -> None:
    all_runs = runs("ppfp")
    assert history.failing_streak(all_runs) is None
    then = history.from_job(all_runs, "job2")
    found = history.failing_streak(then)
    assert found is not None and found.since.job_id == "job2" and found.passed_before is not None
    assert history.from_job(all_runs, "nowhere") == []


def test_the_trend_is_the_median_of_the_last_ten_runs_against_the_ten_before() -> None:
    seconds = [2.0] * 10 + [1.0] * 9 + [50.0] + [9.0] * 5
    t = history.trend(runs("p" * 25, seconds))
    assert t == {"recent_median_s": 2.0, "recent_runs": 10, "before_median_s": 1.0, "before_runs": 10, "change": 1.0}
    assert history.trend_line(t) == "median 2.00 s over the last 10 runs, 1.00 s over the 10 before (+100%)"
    # Skipped runs took no time worth counting; too few runs have no "before".
    t = history.trend(runs("sps", [0.0, 3.0, 0.0]))
    assert t is not None and t["recent_median_s"] == 3.0 and t["before_median_s"] is None
    assert history.trend_line(t) == "median 3.00 s over the last 1 run"
    assert history.trend(runs("ss")) is None and history.trend_line(None) == "no timed runs"
