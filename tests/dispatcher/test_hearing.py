"""The marks by which the dispatcher knows up to when it heard its runners."""

from __future__ import annotations

import math

from dispatcher.hearing import MARK_PATIENCE, Hearing


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_a_mark_that_comes_back_late_still_counts_and_the_next_goes_out_meanwhile() -> None:
    # A control queue always some seconds behind: each mark takes longer than
    # MARK_PATIENCE to come back, and still every one tells up to when it was heard.
    clock = Clock()
    hearing = Hearing(clock)
    assert hearing.mark_due() and hearing.heard_up_to == -math.inf
    first = hearing.sent()
    clock.now += MARK_PATIENCE / 2
    assert not hearing.mark_due()
    clock.now += MARK_PATIENCE
    assert hearing.mark_due()
    second = hearing.sent()
    clock.now += 1
    assert hearing.came_back(first) and hearing.heard_up_to == 100.0
    assert not hearing.came_back(first)  # once
    clock.now += MARK_PATIENCE
    assert hearing.came_back(second) and hearing.heard_up_to == 100.0 + 1.5 * MARK_PATIENCE


def test_forged_marks_and_those_from_before_a_reconnect_say_nothing() -> None:
    clock = Clock()
    hearing = Hearing(clock)
    old = hearing.sent()
    hearing.forget()
    assert not hearing.came_back(old) and not hearing.came_back("0123456789ab")
    assert hearing.heard_up_to == -math.inf


def test_one_mark_back_makes_the_earlier_ones_moot() -> None:
    clock = Clock()
    hearing = Hearing(clock)
    early = hearing.sent()
    clock.now += MARK_PATIENCE + 1
    late = hearing.sent()
    assert hearing.came_back(late) and not hearing.came_back(early)  # early was lost (a restart)
    assert hearing.heard_up_to == clock.now
