"""The runner's watchdog: its state, and the real process killing a real process group."""

from __future__ import annotations

import math
import subprocess
import sys
import time
from collections.abc import Iterator

import pytest
from support import alive

from runner.watchdog import Watch


def test_watch_follows_the_runners_lines() -> None:
    w = Watch()
    assert w.wait_for(0.0) is None
    w.feed("run 123 10.5")
    assert (w.pgid, w.wait_for(10.0)) == (123, 0.5)
    w.feed("until 20")
    assert w.wait_for(10.0) == 10.0
    w.feed("hold")
    assert w.wait_for(10.0) is None and w.deadline == math.inf
    w.feed("until 11")
    assert w.wait_for(12.0) == 0.0  # past: kill now
    w.feed("done")
    assert (w.pgid, w.wait_for(12.0)) == (None, None)
    w.feed("")


@pytest.fixture
def victim() -> Iterator[subprocess.Popen[bytes]]:
    """A test run in its own process group, as the runner starts one, with a child of its own."""
    proc = subprocess.Popen(["sh", "-c", "sleep 60 & sleep 60"], start_new_session=True)
    yield proc
    if proc.poll() is None:
        proc.kill()
    proc.wait()


def watchdog() -> subprocess.Popen[bytes]:
    return subprocess.Popen([sys.executable, "-m", "runner.watchdog"], stdin=subprocess.PIPE, stderr=subprocess.PIPE)


def tell(dog: subprocess.Popen[bytes], line: str) -> None:
    assert dog.stdin is not None
    dog.stdin.write(f"{line}\n".encode())
    dog.stdin.flush()


def wait_dead(proc: subprocess.Popen[bytes], timeout: float) -> float:
    started = time.monotonic()
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        pytest.fail(f"the group was not killed within {timeout}s")
    return time.monotonic() - started


def test_it_kills_the_group_when_the_lease_runs_out_unless_renewed(victim: subprocess.Popen[bytes]) -> None:
    dog = watchdog()
    try:
        tell(dog, f"run {victim.pid} {time.monotonic() + 0.5}")
        for _ in range(5):  # renewed, as heartbeats do: it lives on
            time.sleep(0.2)
            tell(dog, f"until {time.monotonic() + 0.5}")
        assert victim.poll() is None
        assert wait_dead(victim, 5) < 1.0  # the runner froze: no more renewals
        assert victim.returncode == -9
        time.sleep(0.2)
        assert dog.poll() is None  # and it waits for the next job
    finally:
        dog.kill()
        dog.wait()
    assert dog.stderr is not None
    assert b"its lease ran out" in dog.stderr.read()


def test_hold_keeps_the_group_while_the_broker_blocks_and_a_gone_runner_kills_at_once(
    victim: subprocess.Popen[bytes],
) -> None:
    dog = watchdog()
    tell(dog, f"run {victim.pid} {time.monotonic() + 0.3}")
    tell(dog, "hold")
    time.sleep(0.8)
    assert victim.poll() is None
    assert dog.stdin is not None
    dog.stdin.close()  # the runner died
    assert wait_dead(victim, 5) < 1.0
    assert dog.wait(timeout=5) == 0


def test_done_means_the_group_is_none_of_its_business(victim: subprocess.Popen[bytes]) -> None:
    dog = watchdog()
    try:
        tell(dog, f"run {victim.pid} {time.monotonic() + 0.3}")
        tell(dog, "done")
        time.sleep(0.6)
        assert alive(victim.pid)
    finally:
        dog.kill()
        dog.wait()
