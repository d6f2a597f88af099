"""The runner's loop on an in-memory broker, with real git and real test processes."""

from __future__ import annotations

import dataclasses
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from fakebroker import FakeRabbit
from support import GitRepo

from common import naming
from common.broker import Broker, InUse
from common.messages import Job, JobAbandoned, JobRejected, JobResult, JobStarted, Message, decode
from common.settings import BrokerSettings
from runner.service import Runner, RunnerSettings

NS = "unit"


@pytest.fixture
def rabbit(monkeypatch: pytest.MonkeyPatch) -> FakeRabbit:
    r = FakeRabbit()
    monkeypatch.setattr(Broker, "connection_factory", r.connect)
    return r


@pytest.fixture
def dispatcher_side(rabbit: FakeRabbit) -> Broker:
    """The queues a dispatcher declares, and a connection to publish jobs with."""
    b = Broker(BrokerSettings(namespace=NS), "dispatcher")
    b.connect()
    b.declare_topology()
    return b


@pytest.fixture
def runner(rabbit: FakeRabbit, dispatcher_side: Broker, tmp_path: Path) -> Iterator[Runner]:
    # No sandbox: these tests count runs in files on the host.
    r = Runner(
        RunnerSettings(broker=BrokerSettings(namespace=NS), runner_id="r1", workdir=tmp_path / "work", sandbox="none")
    )
    r.broker.on_blocked = r._on_blocked
    r.broker.connect()
    r._setup()
    r.listen(0)  # its mark comes back: from here it hears
    assert not r._fence
    yield r
    r.workspace.close()
    r.watchdog.close()


def step(r: Runner) -> None:
    """One turn of the runner's main loop."""
    r._finish_thread()
    r.flush_outbox()
    r.listen(0)


def spin(r: Runner, until: Callable[[], Any], timeout: float = 20) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        step(r)
        value = until()
        if value:
            return value
        time.sleep(0.02)
    pytest.fail("timed out")


class Results:
    """What the runner published to the dispatcher's results queue, in order."""

    def __init__(self, rabbit: FakeRabbit) -> None:
        self.rabbit = rabbit
        self.seen: list[Message] = []

    def __call__(self) -> list[Message]:
        self.seen += [decode(m.body) for m in self.rabbit.take_all(naming.dispatcher_results_queue(NS))]
        return self.seen

    def of(self, kind: type) -> list[Any]:
        return [m for m in self() if isinstance(m, kind)]


def job_for(repo: GitRepo, sha: str, lease: str = "L" * 32, lease_s: float = 6.0) -> Job:
    return Job(job_id="j1", attempt=1, repo=str(repo.path), branch="main", commit=sha, lease=lease, lease_s=lease_s)


def send(dispatcher_side: Broker, job: Job) -> None:
    dispatcher_side.publish(naming.jobs_exchange(NS), naming.runner_routing_key("r1"), job)


def counting_suite(repo: GitRepo, marker: Path, sleep: float = 0.0) -> str:
    code = f"import time; open({str(marker)!r}, 'a').write('1\\n'); time.sleep({sleep})"
    return repo.commit({".volt.toml": f"[test]\ncommand = [{sys.executable!r}, '-c', {code!r}]\n"})


def test_a_job_starts_before_its_ack_and_its_result_carries_the_lease(
    runner: Runner, rabbit: FakeRabbit, dispatcher_side: Broker, repo: GitRepo, tmp_path: Path
) -> None:
    sha = counting_suite(repo, tmp_path / "runs")
    results = Results(rabbit)
    send(dispatcher_side, job_for(repo, sha))
    step(runner)
    (started,) = results.of(JobStarted)
    assert started.lease == "L" * 32
    (result,) = spin(runner, lambda: results.of(JobResult))
    assert (result.status, result.lease, result.runner_id) == ("passed", "L" * 32, "r1")
    spin(runner, lambda: runner.current is None)  # free again once its result is out


def test_a_job_that_waited_while_the_runner_was_frozen_is_refused_not_run(
    runner: Runner, rabbit: FakeRabbit, dispatcher_side: Broker, repo: GitRepo, tmp_path: Path, monkeypatch: Any
) -> None:
    # Sent while the runner could hear nothing (SIGSTOP): by the time it wakes,
    # the dispatcher may have given the job to another runner.
    marker = tmp_path / "runs"
    sha = counting_suite(repo, marker)
    results = Results(rabbit)
    send(dispatcher_side, job_for(repo, sha, lease_s=6.0))
    woke = time.monotonic() + 8.0  # frozen for 8 s since it last listened
    monkeypatch.setattr("runner.service.time.monotonic", lambda: woke)
    step(runner)
    monkeypatch.undo()
    (rejected,) = results.of(JobRejected)
    assert "heard nothing for" in rejected.reason and rejected.lease == "L" * 32
    assert results.of(JobStarted) == [] and not marker.exists()
    # Listening again, the next job (the same one given back to it, say) runs.
    send(dispatcher_side, job_for(repo, sha, lease="M" * 32))
    step(runner)
    spin(runner, lambda: results.of(JobResult))
    assert marker.read_text().splitlines() == ["1"]


def test_a_job_left_behind_by_a_listen_that_was_held_up_is_refused_too(
    runner: Runner, rabbit: FakeRabbit, dispatcher_side: Broker, repo: GitRepo, tmp_path: Path
) -> None:
    # An idle runner is frozen inside a listen, mostly: that one returns late
    # and empty-handed, and the job sent meanwhile comes in the next one.
    marker = tmp_path / "runs"
    sha = counting_suite(repo, marker)
    results = Results(rabbit)
    process = runner.broker.process

    def frozen(time_limit: float) -> None:
        time.sleep(2.5)  # SIGSTOP while it waited

    runner.broker.process = frozen  # type: ignore[method-assign]
    runner.listen(0.2)
    runner.broker.process = process  # type: ignore[method-assign]
    send(dispatcher_side, job_for(repo, sha, lease_s=2.0))
    step(runner)
    (rejected,) = results.of(JobRejected)
    assert "heard nothing for 2." in rejected.reason
    assert results.of(JobStarted) == [] and not marker.exists()


@pytest.mark.parametrize("reconnects", [1, 2])
def test_after_a_reconnect_only_what_waited_ahead_of_its_mark_counts_as_sent_while_deaf(
    runner: Runner, rabbit: FakeRabbit, dispatcher_side: Broker, repo: GitRepo, tmp_path: Path, reconnects: int
) -> None:
    # Cut off for 8 s, then connected again: the jobs in its queue from then may
    # be others' by now, however many listens (and reconnects) it takes to get
    # them; one sent after the runner's mark (sent at the reconnect) is new.
    marker = tmp_path / "runs"
    sha = counting_suite(repo, marker)
    results = Results(rabbit)
    runner._listened_at -= 8.0
    for job_id in ("stale-1", "stale-2"):
        send(dispatcher_side, dataclasses.replace(job_for(repo, sha), job_id=job_id))
    runner.broker.close()
    runner.broker.connect()
    runner._setup()  # the reconnect: its mark goes in behind those
    if reconnects == 2:
        step(runner)  # the first one refused, then the connection is lost again
        runner.broker.close()
        runner.broker.connect()
        runner._setup()
    send(dispatcher_side, dataclasses.replace(job_for(repo, sha, lease="M" * 32), job_id="new"))
    spin(runner, lambda: results.of(JobResult))
    assert [(r.job_id, "heard nothing for 7." in r.reason) for r in results.of(JobRejected)] == [
        ("stale-1", True),
        ("stale-2", True),
    ]
    assert [r.job_id for r in results.of(JobStarted)] == ["new"] and not runner._fence
    assert marker.read_text().splitlines() == ["1"]


def test_a_job_delivered_again_runs_once(
    runner: Runner, rabbit: FakeRabbit, dispatcher_side: Broker, repo: GitRepo, tmp_path: Path
) -> None:
    marker = tmp_path / "runs"
    sha = counting_suite(repo, marker, sleep=0.5)
    results = Results(rabbit)
    job = job_for(repo, sha)
    send(dispatcher_side, job)
    step(runner)
    send(dispatcher_side, job)  # while it runs: not refused as busy, not run twice
    spin(runner, lambda: results.of(JobResult))
    assert results.of(JobRejected) == []
    send(dispatcher_side, job)  # after it ran (a broker crash lost our ack): its result again
    spin(runner, lambda: len(results.of(JobResult)) == 2)
    first, again = results.of(JobResult)
    assert first == again
    assert len(results.of(JobStarted)) == 1
    assert marker.read_text().splitlines() == ["1"]


def test_a_result_the_outbox_cannot_take_is_sent_from_memory(
    runner: Runner,
    rabbit: FakeRabbit,
    dispatcher_side: Broker,
    repo: GitRepo,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    sha = counting_suite(repo, tmp_path / "runs")

    def full_disk(*args: Any) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(runner, "_write_outbox", full_disk)
    results = Results(rabbit)
    send(dispatcher_side, job_for(repo, sha))
    (result,) = spin(runner, lambda: results.of(JobResult))
    assert result.status == "passed"
    assert runner.current is None


def test_an_exception_in_the_job_thread_ends_the_job_as_error_with_the_reason(
    runner: Runner,
    rabbit: FakeRabbit,
    dispatcher_side: Broker,
    repo: GitRepo,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    sha = counting_suite(repo, tmp_path / "runs")

    def broken(*args: Any, **kwargs: Any) -> None:
        raise RuntimeError("the workspace exploded")

    monkeypatch.setattr(runner.workspace, "checkout", broken)
    results = Results(rabbit)
    send(dispatcher_side, job_for(repo, sha))
    (result,) = spin(runner, lambda: results.of(JobResult))
    assert result.status == "error"
    assert result.reason == "runner error: RuntimeError: the workspace exploded"


def test_a_run_whose_lease_ran_out_is_stopped_and_given_up(
    runner: Runner, rabbit: FakeRabbit, dispatcher_side: Broker, repo: GitRepo, tmp_path: Path
) -> None:
    marker = tmp_path / "runs"
    sha = counting_suite(repo, marker, sleep=60)
    results = Results(rabbit)
    send(dispatcher_side, job_for(repo, sha, lease_s=1.5))
    step(runner)
    spin(runner, lambda: marker.exists())
    began = time.monotonic()
    # No heartbeat gets confirmed (we stop calling the loop's heartbeat): the run stops
    # half an interval before the dispatcher's window ends.
    (gave_up,) = spin(runner, lambda: results.of(JobAbandoned))
    assert time.monotonic() - began < 1.5
    assert (gave_up.lease, gave_up.reason) == ("L" * 32, "lease lost")
    assert results.of(JobResult) == []


def test_the_lease_holds_while_the_broker_blocks_publishers(
    runner: Runner, rabbit: FakeRabbit, dispatcher_side: Broker, repo: GitRepo, tmp_path: Path
) -> None:
    sha = counting_suite(repo, tmp_path / "runs", sleep=2)
    results = Results(rabbit)
    send(dispatcher_side, job_for(repo, sha, lease_s=1.0))
    step(runner)
    assert runner.current is not None
    rabbit.blocked = True
    runner._on_blocked(True)  # as pika calls it when a publish meets the alarm
    # Two seconds, twice the lease, without a heartbeat getting through: the run goes on,
    # since the dispatcher declares nobody lost while the broker blocks.
    assert runner.current.done.wait(10)
    rabbit.blocked = False
    runner._on_blocked(False)
    (result,) = spin(runner, lambda: results.of(JobResult))
    assert result.status == "passed"
    assert results.of(JobAbandoned) == []


def test_a_second_runner_with_the_same_id_is_refused(runner: Runner, tmp_path: Path) -> None:
    other = Runner(RunnerSettings(broker=BrokerSettings(namespace=NS), runner_id="r1", workdir=tmp_path / "elsewhere"))
    other.broker.connect()
    with pytest.raises(InUse):
        other._setup()
    other.watchdog.close()
