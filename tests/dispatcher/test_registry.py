"""The live-runner registry, driven by a fake clock: no sleeping."""

from __future__ import annotations

import pytest

from common.messages import Heartbeat, Hello
from dispatcher.registry import Registry, first_able


class Clock:
    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def registry(clock: Clock) -> Registry:
    return Registry(clock=clock, misses=3)


def beat(runner_id: str = "r1", session: str = "s1", **fields: object) -> Heartbeat:
    return Heartbeat(runner_id=runner_id, session=session, **fields)  # type: ignore[arg-type]


def test_first_heartbeat_registers_the_runner(registry: Registry, clock: Clock) -> None:
    seen = registry.heartbeat(
        Hello(runner_id="r1", session="s1", host="box", pid=7, labels=["linux"], state="idle", interval=2.0)
    )
    assert seen.new
    assert seen.restarted_from is None
    assert registry.alive("r1")
    info = registry.get("r1")
    assert info is seen.info
    assert (info.host, info.pid, info.labels, info.state) == ("box", 7, ["linux"], "idle")
    assert info.first_seen == info.last_seen == clock.now


def test_later_heartbeats_update_but_are_not_new(registry: Registry, clock: Clock) -> None:
    registry.heartbeat(beat())
    clock.advance(1)
    seen = registry.heartbeat(beat(state="busy", job_id="j1", attempt=2))
    assert not seen.new
    assert seen.restarted_from is None
    assert (seen.info.state, seen.info.job_id, seen.info.attempt) == ("busy", "j1", 2)
    assert seen.info.first_seen == 1000.0
    assert seen.info.last_seen == 1001.0


@pytest.mark.parametrize("interval", [0.5, 2.0, 30.0])
def test_deadline_is_the_runners_own_interval_times_misses(registry: Registry, clock: Clock, interval: float) -> None:
    info = registry.heartbeat(beat(interval=interval)).info
    assert info.interval == interval
    assert info.deadline == clock.now + interval * 3


def test_misses_setting_scales_the_deadline(clock: Clock) -> None:
    registry = Registry(clock=clock, misses=5)
    assert registry.heartbeat(beat(interval=2.0)).info.deadline == clock.now + 10.0


@pytest.mark.parametrize(("reported", "used"), [(0.0, 0.05), (-5.0, 0.05), (1e9, 3600.0)])
def test_absurd_intervals_are_clamped(registry: Registry, reported: float, used: float) -> None:
    assert registry.heartbeat(beat(interval=reported)).info.interval == used


def test_each_heartbeat_moves_the_deadline(registry: Registry, clock: Clock) -> None:
    registry.heartbeat(beat(interval=1.0))
    for _ in range(10):
        clock.advance(2.9)  # just under 3 missed beats each time
        registry.heartbeat(beat(interval=1.0))
        assert registry.expire() == []
    assert registry.alive("r1")


def test_expire_removes_only_overdue_runners(registry: Registry, clock: Clock) -> None:
    registry.heartbeat(beat("fast", interval=1.0))  # deadline 1003
    registry.heartbeat(beat("slow", interval=10.0))  # deadline 1030
    clock.advance(3.0)
    assert registry.expire() == []  # exactly at the deadline is not past it
    clock.advance(0.01)
    lost = registry.expire()
    assert [r.runner_id for r in lost] == ["fast"]
    assert not registry.alive("fast")
    assert registry.alive("slow")
    assert registry.expire() == []  # reported once
    clock.advance(27.0)
    assert [r.runner_id for r in registry.expire()] == ["slow"]
    assert registry.runners == {}


def test_a_runner_that_comes_back_after_expiry_is_new_again(registry: Registry, clock: Clock) -> None:
    registry.heartbeat(beat(interval=1.0))
    clock.advance(10)
    assert len(registry.expire()) == 1
    seen = registry.heartbeat(beat(interval=1.0))
    assert seen.new
    assert seen.restarted_from is None


def test_a_new_session_under_the_same_id_is_a_restart(registry: Registry, clock: Clock) -> None:
    registry.heartbeat(beat(session="old"))
    clock.advance(1)
    seen = registry.heartbeat(beat(session="new"))
    assert seen.restarted_from == "old"
    assert not seen.new
    assert seen.info.session == "new"
    assert seen.info.first_seen == clock.now  # a new process is seen for the first time
    assert registry.heartbeat(beat(session="new")).restarted_from is None


def test_remove(registry: Registry) -> None:
    registry.heartbeat(beat("r1"))
    removed = registry.remove("r1")
    assert removed is not None and removed.runner_id == "r1"
    assert registry.remove("r1") is None
    assert not registry.alive("r1")


def test_available_excludes_busy_paused_and_draining_runners(registry: Registry) -> None:
    registry.heartbeat(beat("idle"))
    registry.heartbeat(beat("working"))
    registry.heartbeat(beat("leaving", state="draining"))
    registry.heartbeat(beat("resting", state="paused"))
    assert [r.runner_id for r in registry.available(busy={"working"})] == ["idle"]
    assert {r.runner_id for r in registry.available(busy=set())} == {"idle", "working"}
    assert registry.available(busy={"idle", "working"}) == []


def test_available_puts_the_longest_unused_runner_first(registry: Registry, clock: Clock) -> None:
    for runner_id in ("a", "b", "c", "d"):
        registry.heartbeat(beat(runner_id))
    infos = {r: registry.get(r) for r in "abcd"}
    infos["a"].last_assigned = 30.0  # type: ignore[union-attr]
    infos["b"].last_assigned = 10.0  # type: ignore[union-attr]
    infos["c"].last_assigned = 20.0  # type: ignore[union-attr]
    # d was never given a job: 0.0
    assert [r.runner_id for r in registry.available(busy=set())] == ["d", "b", "c", "a"]


def test_last_assigned_survives_heartbeats_and_restarts(registry: Registry, clock: Clock) -> None:
    registry.heartbeat(beat("a"))
    registry.heartbeat(beat("b"))
    registry.get("a").last_assigned = 5.0  # type: ignore[union-attr]
    clock.advance(1)
    registry.heartbeat(beat("a"))
    registry.heartbeat(beat("a", session="s2"))
    assert registry.get("a").last_assigned == 5.0  # type: ignore[union-attr]
    assert [r.runner_id for r in registry.available(busy=set())] == ["b", "a"]


def test_forgive_restarts_every_deadline(registry: Registry, clock: Clock) -> None:
    registry.heartbeat(beat("a", interval=1.0))
    registry.heartbeat(beat("b", interval=10.0))
    clock.advance(60)  # a broker outage: nobody could be heard
    registry.forgive()
    assert registry.expire() == []
    assert registry.get("a").deadline == clock.now + 3.0  # type: ignore[union-attr]
    clock.advance(3.5)
    assert [r.runner_id for r in registry.expire()] == ["a"]
    assert registry.alive("b")


def test_labels_pick_the_runners_that_have_every_one(registry: Registry) -> None:
    registry.heartbeat(beat("plain"))
    registry.heartbeat(beat("linux", labels=["linux"]))
    registry.heartbeat(beat("gpu", labels=["gpu", "linux"], state="paused"))
    assert {r.runner_id for r in registry.able([])} == {"plain", "linux", "gpu"}
    assert {r.runner_id for r in registry.able(["linux"])} == {"linux", "gpu"}
    assert [r.runner_id for r in registry.able(["gpu", "linux"])] == ["gpu"]
    assert registry.able(["arm64"]) == []
    free = registry.available(busy=set())
    assert first_able(free, ["gpu"]) is None  # it has them, but it is paused
    found = first_able(free, ["linux"])
    assert found is not None and found.runner_id == "linux"
