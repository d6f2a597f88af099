"""The dispatcher's loop, driven round by round on an in-memory broker with an
injected clock: each delivery rule broken on purpose, deterministically."""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fakebroker import FakeRabbit, Queue

from common import naming
from common.broker import Broker, InUse
from common.messages import (
    CancelJob,
    Chunk,
    ChunkRequest,
    CommitSeen,
    Goodbye,
    Heartbeat,
    Hello,
    Job,
    JobAbandoned,
    JobRejected,
    JobResult,
    JobStarted,
    Message,
    decode,
)
from common.settings import BrokerSettings, SettingsError
from dispatcher import queries
from dispatcher.service import Dispatcher, DispatcherSettings
from dispatcher.store import Store, StoreError

NS = "unit"
REPO = "/srv/git/app"


def sha(i: int) -> str:
    return f"{i:040x}"


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


@pytest.fixture
def rabbit(monkeypatch: pytest.MonkeyPatch) -> FakeRabbit:
    r = FakeRabbit()
    monkeypatch.setattr(Broker, "connection_factory", r.connect)
    return r


@pytest.fixture
def clock() -> Clock:
    return Clock()


def settings(tmp_path: Path, **kw: Any) -> DispatcherSettings:
    return DispatcherSettings(broker=BrokerSettings(namespace=NS), db=tmp_path / "dispatcher.db", **kw)


def start(tmp_path: Path, clock: Clock, **kw: Any) -> Dispatcher:
    """A dispatcher connected and set up as its run() would, ready for run_once()."""
    tmp_path.mkdir(parents=True, exist_ok=True)
    d = Dispatcher(
        settings(tmp_path, **kw), store=Store(tmp_path / "dispatcher.db", durable=False), clock=clock, wall=clock
    )
    d.broker.hold_acks()
    d.broker.on_blocked = d._on_blocked
    d.broker.connect()
    d.setup()
    return d


def kill(d: Dispatcher) -> None:
    """kill -9: nothing more is committed or acked; the broker takes back what was unacked."""
    d.store.rollback_batch()
    assert d.broker._conn is not None
    d.broker._conn.close()


class Killed(BaseException):
    pass


class Peer:
    """A client of the fake broker speaking for runners and observers."""

    def __init__(self) -> None:
        self.b = Broker(BrokerSettings(namespace=NS), "peer")
        self.b.connect()
        self.b.declare_runner_exchanges()
        self.b.declare_commit_path()

    def commit(self, i: int, labels: tuple[str, ...] = ()) -> None:
        msg = CommitSeen(repo=REPO, branch="main", commit=sha(i), seen_at=float(i), labels=list(labels))
        self.b.publish(naming.commits_exchange(NS), "", msg)

    def send(self, msg: Message) -> None:
        exchange = naming.control_exchange(NS) if isinstance(msg, (Hello, Goodbye)) else naming.results_exchange(NS)
        self.b.publish(exchange, "", msg)

    def hello(self, runner: str, job: Job | None = None, session: str = "s1", interval: float = 1.0, **kw: Any) -> None:
        self.send(
            Heartbeat(
                runner_id=runner,
                session=session,
                state="busy" if job else kw.pop("state", "idle"),
                job_id=job.job_id if job else "",
                attempt=job.attempt if job else 0,
                lease=job.lease if job else "",
                interval=interval,
                **kw,
            )
        )


def runner_queue(rabbit: FakeRabbit, runner: str) -> list[Message]:
    """What the dispatcher sent a runner (taken off its queue)."""
    name = naming.runner_queue(NS, runner)
    if name not in rabbit.queues:
        rabbit.queues[name] = Queue(name, {})
        rabbit.bindings.append((name, naming.jobs_exchange(NS), naming.runner_routing_key(runner)))
        return []
    return [decode(m.body) for m in rabbit.take_all(name)]


def jobs_for(rabbit: FakeRabbit, runner: str) -> list[Job]:
    return [m for m in runner_queue(rabbit, runner) if isinstance(m, Job)]


def rounds(d: Dispatcher, clock: Clock, n: int = 4, step: float = 0.3) -> None:
    for _ in range(n):
        d.run_once()
        clock.advance(step)


@pytest.fixture
def peer(rabbit: FakeRabbit) -> Peer:
    return Peer()


# -- rule 2: acks cover only what is handled and stored ------------------------


def test_acks_never_cover_a_delivery_not_yet_handled_and_a_kill_loses_nothing(
    rabbit: FakeRabbit, peer: Peer, tmp_path: Path, clock: Clock
) -> None:
    d = start(tmp_path, clock)
    runner_queue(rabbit, "r1")
    peer.hello("r1")
    rounds(d, clock, 1)
    for i in range(200):
        peer.commit(i)
    handled = 0
    real = d.on_commit

    def on_commit(delivery: Any) -> None:
        nonlocal handled
        handled += 1
        real(delivery)
        if handled == 150:
            kill(d)  # mid-round, with commits handled, held and buffered behind a basic.get
            raise Killed

    d.on_commit = on_commit  # type: ignore[method-assign]
    d.broker.close()
    d.broker.connect()
    d.setup()  # consume again with the patched handler
    with pytest.raises(Killed):
        for _ in range(10):
            d.run_once()
            # The runner takes its job, so the next commit's assign() reads the backlog again.
            for job in jobs_for(rabbit, "r1"):
                peer.send(
                    JobResult(job_id=job.job_id, attempt=job.attempt, runner_id="r1", status="passed", lease=job.lease)
                )
            peer.hello("r1")
    assert rabbit.acked_unhandled == 0

    again = start(tmp_path, clock)
    for _ in range(400):
        again.run_once()
        for job in jobs_for(rabbit, "r1"):
            peer.send(
                JobResult(job_id=job.job_id, attempt=job.attempt, runner_id="r1", status="passed", lease=job.lease)
            )
        peer.hello("r1")
        clock.advance(0.3)
        if again.store.count_by_status() == {"passed": 200}:
            break
    assert rabbit.acked_unhandled == 0
    assert again.store.count_by_state() == {"done": 200}  # none lost, and one job per commit
    assert len(again.store.find(limit=1000)) == 200


def test_a_store_error_is_not_a_bad_message_nothing_is_acked_and_it_is_retried(
    rabbit: FakeRabbit, peer: Peer, tmp_path: Path, clock: Clock
) -> None:
    d = start(tmp_path, clock)
    failing = _FailingDb(d.store.db, lambda sql: "INSERT INTO jobs" in sql, times=2)
    d.store.db = failing  # type: ignore[assignment]
    for i in range(5):
        peer.commit(i)
    steps = 0

    def step() -> bool:
        nonlocal steps
        steps += 1
        d.run_once()
        return len(d.store.find(limit=100)) == 5 or steps > 20

    d.broker.close()
    d.broker.run(d.setup, step, stopping=lambda: False, retry_on=(StoreError,))
    assert failing.failures == 2
    assert len(d.store.find(limit=100)) == 5
    assert rabbit.depth(naming.dead_letter_queue(NS)) == 0  # a full disk dead-letters nothing
    assert rabbit.depth(naming.dispatcher_commits_queue(NS)) == 0


class _FailingDb:
    """A sqlite3 connection whose statements matching `when` fail `times` times, as on a full disk."""

    def __init__(self, db: sqlite3.Connection, when: Any, times: int = 1) -> None:
        self._db, self._when, self._left, self.failures = db, when, times, 0

    def execute(self, sql: str, *args: Any) -> Any:
        if self._left and self._when(sql):
            self._left -= 1
            self.failures += 1
            raise sqlite3.OperationalError("database or disk is full")
        return self._db.execute(sql, *args)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._db, name)


def test_results_are_logged_as_recorded_only_after_the_commit(
    rabbit: FakeRabbit, peer: Peer, tmp_path: Path, clock: Clock, caplog: pytest.LogCaptureFixture
) -> None:
    d = start(tmp_path, clock)
    runner_queue(rabbit, "r1")
    peer.hello("r1")
    peer.commit(1)
    rounds(d, clock, 2)
    (job,) = jobs_for(rabbit, "r1")
    peer.send(JobResult(job_id=job.job_id, attempt=1, runner_id="r1", status="passed", lease=job.lease))
    d.store.db = _FailingDb(d.store.db, lambda sql: sql == "COMMIT", 1)  # type: ignore[assignment]
    caplog.set_level("INFO")
    with pytest.raises(StoreError):
        d.run_once()
    assert "recorded" not in caplog.text
    assert d.store.get(job.job_id).state == "assigned"  # type: ignore[union-attr]
    d.broker.close()
    d.broker.connect()
    d.setup()
    rounds(d, clock, 2)
    assert "recorded: passed" in caplog.text
    assert d.store.get(job.job_id).status == "passed"  # type: ignore[union-attr]


def test_a_deleted_store_stops_the_dispatcher(peer: Peer, tmp_path: Path, clock: Clock) -> None:
    d = start(tmp_path, clock)
    (tmp_path / "dispatcher.db").unlink()
    with pytest.raises(StoreError, match="deleted or replaced"):
        rounds(d, clock, 2)


def test_an_empty_store_adopts_the_jobs_waiting_in_the_backlog(
    rabbit: FakeRabbit, peer: Peer, tmp_path: Path, clock: Clock
) -> None:
    d = start(tmp_path / "first", clock)
    for i in range(3):
        peer.commit(i)
    rounds(d, clock, 2)  # no runner: the jobs wait in the backlog queue
    assert rabbit.depth(naming.backlog_queue(NS)) == 3
    kill(d)
    # Another store on the namespace: refused, unless told its owner is gone for good.
    with pytest.raises(SettingsError, match="belongs to another dispatcher's store"):
        start(tmp_path / "second", clock)
    fresh = start(tmp_path / "second", clock, take_over=True)
    runner_queue(rabbit, "r1")
    done = 0
    for _ in range(20):
        peer.hello("r1")
        rounds(fresh, clock, 1)
        for job in jobs_for(rabbit, "r1"):
            peer.send(JobResult(job_id=job.job_id, attempt=1, runner_id="r1", status="passed", lease=job.lease))
            done += 1
    assert done == 3
    assert fresh.store.count_by_status() == {"passed": 3}
    assert all("adopted" in [e["kind"] for e in fresh.store.events(r.job_id)] for r in fresh.store.find())


# -- one owner ----------------------------------------------------------------


def test_a_dispatcher_with_another_store_cannot_take_the_namespace_while_its_owner_is_away(
    rabbit: FakeRabbit, peer: Peer, tmp_path: Path, clock: Clock
) -> None:
    first = start(tmp_path / "a", clock)
    assert first.broker._conn is not None
    first.broker._conn.close()  # a network blip: its exclusive consumers are gone
    peer.commit(1)
    with pytest.raises(SettingsError, match="belongs to another dispatcher's store"):
        start(tmp_path / "b", clock)
    assert rabbit.depth(naming.dispatcher_commits_queue(NS)) == 1  # the other took nothing
    first.broker.connect()
    first.setup()  # back: the namespace is still its own
    rounds(first, clock, 1)
    assert len(first.store.find()) == 1


def test_a_second_dispatcher_on_the_namespace_is_refused_before_it_takes_anything(
    rabbit: FakeRabbit, peer: Peer, tmp_path: Path, clock: Clock
) -> None:
    start(tmp_path / "a", clock)
    peer.commit(1)
    with pytest.raises(InUse):
        start(tmp_path / "b", clock)
    assert rabbit.depth(naming.dispatcher_commits_queue(NS)) == 1  # still there for the first one


# -- rules 4 and 5: leases, fencing, reconciliation ----------------------------


def assigned(rabbit: FakeRabbit, peer: Peer, d: Dispatcher, clock: Clock, runner: str = "r1") -> Job:
    runner_queue(rabbit, runner)
    peer.hello(runner)
    peer.commit(1)
    rounds(d, clock, 2, step=0.1)
    (job,) = jobs_for(rabbit, runner)
    assert job.lease and job.lease_s == 3.0  # interval 1 s x 3 misses
    return job


def running(rabbit: FakeRabbit, peer: Peer, d: Dispatcher, clock: Clock, runner: str = "r1") -> Job:
    """A job assigned to `runner`, which says it started it."""
    job = assigned(rabbit, peer, d, clock, runner)
    peer.send(JobStarted(job_id=job.job_id, attempt=1, runner_id=runner, session="s1", started_at=1.0, lease=job.lease))
    return job


def test_a_job_whose_runner_stops_echoing_its_lease_is_taken_back_with_the_reason(
    rabbit: FakeRabbit, peer: Peer, tmp_path: Path, clock: Clock
) -> None:
    d = start(tmp_path, clock)
    job = running(rabbit, peer, d, clock)
    rounds(d, clock, 1)
    # The runner lives on but its job thread died: its heartbeats say no job.
    for _ in range(20):
        peer.hello("r1")
        rounds(d, clock, 1)
    row = d.store.get(job.job_id)
    assert row is not None and row.attempt == 2
    lost = [e for e in d.store.events(job.job_id) if e["kind"] == "lost"]
    assert lost[0]["reason"] == "runner r1 is not running it (its heartbeats say no job)"


def test_heartbeats_that_echo_the_lease_keep_a_long_job(
    rabbit: FakeRabbit, peer: Peer, tmp_path: Path, clock: Clock
) -> None:
    d = start(tmp_path, clock)
    job = running(rabbit, peer, d, clock)
    for _ in range(100):  # 30 s, ten lease windows
        peer.hello("r1", job)
        rounds(d, clock, 1)
    row = d.store.get(job.job_id)
    assert row is not None and (row.state, row.attempt) == ("running", 1)


def test_forged_messages_without_the_lease_change_nothing(
    rabbit: FakeRabbit, peer: Peer, tmp_path: Path, clock: Clock
) -> None:
    d = start(tmp_path, clock)
    job = running(rabbit, peer, d, clock)
    rounds(d, clock, 1)
    forged = "f" * 32
    peer.send(JobResult(job_id=job.job_id, attempt=1, runner_id="r1", status="passed", lease=forged))
    peer.send(JobRejected(job_id=job.job_id, attempt=1, runner_id="r1", reason="x", lease=forged))
    peer.send(JobAbandoned(job_id=job.job_id, attempt=1, runner_id="r1", reason="x", lease=forged))
    peer.send(Goodbye(runner_id="r1", session="s1", job_id=job.job_id, attempt=1, lease=forged))
    peer.hello("r1", session="forger")  # a "restart" under its id
    for _ in range(5):
        peer.hello("r1", job)
        rounds(d, clock, 1)
    row = d.store.get(job.job_id)
    assert row is not None and (row.state, row.attempt, row.runner, row.lease) == ("running", 1, "r1", job.lease)
    kinds = [e["kind"] for e in d.store.events(job.job_id)]
    assert "late_result" in kinds and "result" not in kinds


def test_a_runner_still_running_a_taken_back_attempt_is_not_free_and_is_told_to_cancel(
    rabbit: FakeRabbit, peer: Peer, tmp_path: Path, clock: Clock
) -> None:
    d = start(tmp_path, clock)
    job = running(rabbit, peer, d, clock)
    rounds(d, clock, 1)
    rounds(d, clock, 30)  # frozen: no heartbeat for longer than its lease
    assert d.store.get(job.job_id).attempt == 2  # type: ignore[union-attr]
    # Thawed, it still runs attempt 1 and says so: it is not free, and is told to stop.
    runner_queue(rabbit, "r1")
    for _ in range(5):
        peer.hello("r1", job)
        rounds(d, clock, 1)
    sent = runner_queue(rabbit, "r1")
    assert not [m for m in sent if isinstance(m, Job)]
    cancels = [m for m in sent if isinstance(m, CancelJob)]
    assert cancels and {(c.job_id, c.lease) for c in cancels} == {(job.job_id, job.lease)}
    assert len(cancels) <= 2  # at most once a second, not per heartbeat
    # Another runner takes attempt 2.
    runner_queue(rabbit, "r2")
    peer.hello("r2")
    rounds(d, clock, 2)
    (again,) = jobs_for(rabbit, "r2")
    assert (again.job_id, again.attempt) == (job.job_id, 2) and again.lease != job.lease


def test_a_refusal_does_not_count_as_an_attempt_and_cannot_loop(
    rabbit: FakeRabbit, peer: Peer, tmp_path: Path, clock: Clock
) -> None:
    d = start(tmp_path, clock)
    job = assigned(rabbit, peer, d, clock)
    peer.send(JobRejected(job_id=job.job_id, attempt=1, runner_id="r1", reason="paused", lease=job.lease))
    rounds(d, clock, 3, step=0.05)
    assert jobs_for(rabbit, "r1") == []  # nothing more until it says how it is
    row = d.store.get(job.job_id)
    assert row is not None and (row.state, row.attempt, row.failures) == ("parked", 1, 0)
    peer.hello("r1")
    rounds(d, clock, 2)
    (again,) = jobs_for(rabbit, "r1")
    assert (again.attempt, again.lease != job.lease) == (1, True)


def test_no_runner_is_declared_lost_while_the_broker_blocks_publishers(
    rabbit: FakeRabbit, peer: Peer, tmp_path: Path, clock: Clock
) -> None:
    d = start(tmp_path, clock)
    job = running(rabbit, peer, d, clock)
    rounds(d, clock, 1)
    rabbit.blocked = True  # a memory alarm: the runner's heartbeats cannot get through
    rounds(d, clock, 60)  # 18 s
    assert d.registry.get("r1") is not None
    assert d.store.get(job.job_id).attempt == 1  # type: ignore[union-attr]
    rabbit.blocked = False
    rounds(d, clock, 20)  # 6 s: within the fresh grace after the alarm
    assert d.store.get(job.job_id).attempt == 1  # type: ignore[union-attr]
    rounds(d, clock, 30)  # and then, with no heartbeat at all, it is lost
    assert d.store.get(job.job_id).attempt == 2  # type: ignore[union-attr]


def test_a_stalled_dispatcher_gives_runners_a_fresh_lease(
    rabbit: FakeRabbit, peer: Peer, tmp_path: Path, clock: Clock
) -> None:
    d = start(tmp_path, clock)
    job = running(rabbit, peer, d, clock)
    rounds(d, clock, 1)
    clock.advance(30)  # the dispatcher was paused; heartbeats wait in its queue
    peer.hello("r1", job)
    rounds(d, clock, 3)
    row = d.store.get(job.job_id)
    assert row is not None and (row.state, row.attempt) == ("running", 1)


def assert_still_running(d: Dispatcher, job: Job) -> None:
    """r1 still counts as live and keeps its job, at its first attempt."""
    assert d.registry.get("r1") is not None
    row = d.store.get(job.job_id)
    assert row is not None and (row.state, row.attempt) == ("running", 1)
    assert not [e for e in d.store.events(job.job_id) if e["kind"] == "lost"]


def test_heartbeats_the_broker_pushed_but_not_yet_handled_are_heard_before_anyone_is_declared_lost(
    rabbit: FakeRabbit, peer: Peer, tmp_path: Path, clock: Clock
) -> None:
    # The dispatcher was held up (a pause, a slow round): the runners' heartbeats
    # came meanwhile, and the broker pushed them to it (prefetch), so the control
    # queue shows none ready; they wait in the client's buffer when the sweep looks.
    d = start(tmp_path, clock)
    job = running(rabbit, peer, d, clock)
    rounds(d, clock, 1)
    for _ in range(8):  # 6 s, every heartbeat echoing the job, none handled yet
        clock.advance(0.75)
        peer.hello("r1", job)
        rabbit.pump()
        d.sweep()
    assert_still_running(d, job)


def test_a_round_held_up_in_the_middle_declares_nobody_lost(
    rabbit: FakeRabbit, peer: Peer, tmp_path: Path, clock: Clock
) -> None:
    d = start(tmp_path, clock)
    job = running(rabbit, peer, d, clock)
    for _ in range(4):
        peer.hello("r1", job)
        rounds(d, clock, 1)
    process = d.broker.process

    def frozen(time_limit: float) -> None:  # SIGSTOP while it waited for input
        d.broker.process = process  # type: ignore[method-assign]
        for _ in range(5):  # the runner goes on heartbeating; the broker pushes them to us
            clock.advance(1.0)
            peer.hello("r1", job)
            rabbit.pump()

    d.broker.process = frozen  # type: ignore[method-assign]
    d._next_sweep = 0.0
    d.run_once(0.25)  # its sweep sees every deadline passed, and heard nothing since
    for _ in range(3):
        peer.hello("r1", job)
        rounds(d, clock, 1)
    assert_still_running(d, job)


def test_a_runner_that_really_went_silent_is_lost_once_a_mark_came_back(
    rabbit: FakeRabbit, peer: Peer, tmp_path: Path, clock: Clock
) -> None:
    d = start(tmp_path, clock)
    job = running(rabbit, peer, d, clock)
    rounds(d, clock, 1)
    rounds(d, clock, 12)  # 3.6 s without a heartbeat: more than its 3 s window
    row = d.store.get(job.job_id)
    assert row is not None and row.attempt == 2
    (lost,) = [e for e in d.store.events(job.job_id) if e["kind"] == "lost"]
    assert lost["reason"].startswith("runner r1 lost (no heartbeat for")
    assert d.hearing.heard_up_to > 1000.0  # a mark went round


def test_queued_jobs_whose_backlog_message_is_gone_are_published_again(
    rabbit: FakeRabbit, peer: Peer, tmp_path: Path, clock: Clock
) -> None:
    d = start(tmp_path, clock)
    for i in range(3):
        peer.commit(i)
    rounds(d, clock, 2)
    assert d.store.count_by_state() == {"queued": 3}
    rabbit.queues[naming.backlog_queue(NS)].messages.clear()  # a purge, a lost node
    runner_queue(rabbit, "r1")
    done = 0
    for _ in range(20):
        peer.hello("r1")
        rounds(d, clock, 1)
        for job in jobs_for(rabbit, "r1"):
            peer.send(JobResult(job_id=job.job_id, attempt=1, runner_id="r1", status="passed", lease=job.lease))
            done += 1
    assert done == 3 and d.store.count_by_status() == {"passed": 3}


def test_a_round_sends_its_jobs_together_and_one_to_a_vanished_runner_waits_for_another(
    rabbit: FakeRabbit, peer: Peer, tmp_path: Path, clock: Clock
) -> None:
    d = start(tmp_path, clock)
    for r in ("r1", "r2", "r3"):
        runner_queue(rabbit, r)
        peer.hello(r)
    rounds(d, clock, 1)
    del rabbit.queues[naming.runner_queue(NS, "r2")]  # r2's queue expired: r2 is gone
    for i in range(4):
        peer.commit(i)
    d.run_once()  # one round: four jobs to the backlog, then three assignments sent at once
    sent = {r: jobs_for(rabbit, r) for r in ("r1", "r3")}
    assert [len(jobs) for jobs in sent.values()] == [1, 1]
    assert d.registry.get("r2") is None
    states = d.store.count_by_state()
    assert states == {"assigned": 2, "parked": 1, "queued": 1}, states
    (parked,) = d.store.in_state("parked")
    assert [e["kind"] for e in d.store.events(parked.job_id)] == ["assigned", "unroutable"]
    # The next free runner takes the parked job first, at the same attempt.
    job = sent["r1"][0]
    peer.send(JobResult(job_id=job.job_id, attempt=1, runner_id="r1", status="passed", lease=job.lease))
    peer.hello("r1")
    rounds(d, clock, 1)
    (again,) = jobs_for(rabbit, "r1")
    assert (again.job_id, again.attempt) == (parked.job_id, 1)


def test_a_parked_job_whose_labels_no_runner_has_ends_as_error_after_the_park_timeout(
    rabbit: FakeRabbit, peer: Peer, tmp_path: Path, clock: Clock
) -> None:
    d = start(tmp_path, clock, park_timeout=60.0)
    runner_queue(rabbit, "r1")
    peer.hello("r1")
    peer.commit(1, labels=("gpu",))
    rounds(d, clock, 2)
    (row,) = d.store.find()
    assert row.state == "parked"
    for _ in range(30):
        peer.hello("r1")
        rounds(d, clock, 1, step=3.0)
    row = d.store.get(row.job_id)  # type: ignore[assignment]
    assert row is not None and (row.state, row.status) == ("done", "error")
    assert "no live runner has had labels gpu" in row.reason


def test_guarded_handlers_dead_letter_what_they_choke_on_but_not_store_errors(
    rabbit: FakeRabbit, peer: Peer, tmp_path: Path, clock: Clock, monkeypatch: pytest.MonkeyPatch
) -> None:
    d = start(tmp_path, clock)

    def boom(*args: Any, **kwargs: Any) -> None:
        raise ValueError("a bug this message trips")

    monkeypatch.setattr(d.store, "add_job", boom)
    peer.commit(1)
    rounds(d, clock, 1)
    (dead,) = rabbit.take_all(naming.dead_letter_queue(NS))
    assert "dispatcher error: ValueError" in dead.props.headers["x-volt-reason"]


@pytest.fixture(autouse=True)
def _no_sleep(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    # Broker.run's back-off sleeps; the rounds here run on the fake clock.
    monkeypatch.setattr("common.broker.random.uniform", lambda a, b: 0.0)
    yield


# -- split runs (dispatcher/runs.py) ---------------------------------------------


def split_commit(peer: Peer, i: int, split: int, reruns: int = 0) -> None:
    msg = CommitSeen(repo=REPO, branch="main", commit=sha(i), seen_at=float(i), split=split, rerun_failures=reruns)
    peer.b.publish(naming.commits_exchange(NS), "", msg)


class Shard:
    """A runner's side of one shard: takes its job, starts it, asks for chunks."""

    def __init__(self, rabbit: FakeRabbit, peer: Peer, runner: str) -> None:
        self.rabbit, self.peer, self.runner = rabbit, peer, runner
        self.job: Job | None = None
        self.seq = 0
        self.answers: list[Chunk] = []

    def take(self) -> Job:
        for msg in runner_queue(self.rabbit, self.runner):
            if isinstance(msg, Job):
                self.job = msg
            elif isinstance(msg, Chunk):
                self.answers.append(msg)
        assert self.job is not None and self.job.run, f"no shard for {self.runner}"
        self.peer.send(
            JobStarted(
                job_id=self.job.job_id,
                attempt=self.job.attempt,
                runner_id=self.runner,
                session="s1",
                started_at=1.0,
                lease=self.job.lease,
            )
        )
        return self.job

    def ask(self, d: Dispatcher, *, collected: list[str] | None = None, results=(), more=True, seq=None) -> Chunk:
        assert self.job is not None
        if seq is None:
            self.seq += 1
        self.peer.send(
            ChunkRequest(
                job_id=self.job.job_id,
                attempt=self.job.attempt,
                runner_id=self.runner,
                lease=self.job.lease,
                seq=self.seq if seq is None else seq,
                collected=collected,
                results=[list(r) for r in results],
                more=more,
            )
        )
        d.run_once()
        answers = [m for m in runner_queue(self.rabbit, self.runner) if isinstance(m, Chunk)]
        assert answers, "no answer"
        return answers[-1]

    def finish(self, d: Dispatcher, status: str = "passed") -> None:
        assert self.job is not None
        self.peer.send(
            JobResult(
                job_id=self.job.job_id,
                attempt=self.job.attempt,
                runner_id=self.runner,
                status=status,
                lease=self.job.lease,
            )
        )
        d.run_once()


TESTS = [f"tests/test_{f}.py::test_{t}" for f in "abcd" for t in range(2)]


def split_start(
    rabbit: FakeRabbit, peer: Peer, tmp_path: Path, clock: Clock, runners: int, split: int, reruns: int = 0
):
    d = start(tmp_path, clock)
    shards = [Shard(rabbit, peer, f"r{i}") for i in range(runners)]
    for s in shards:
        runner_queue(rabbit, s.runner)
        peer.hello(s.runner)
    rounds(d, clock, 1)
    split_commit(peer, 1, split, reruns)
    rounds(d, clock, 2)
    for s in shards:
        s.take()
    rounds(d, clock, 1)
    return d, shards


def run_row(d: Dispatcher) -> Any:
    (row,) = d.store.find(limit=10, done_only=False)
    return row


def test_a_split_run_hands_each_test_out_once_and_records_one_result(
    rabbit: FakeRabbit, peer: Peer, tmp_path: Path, clock: Clock
) -> None:
    d, (a, b) = split_start(rabbit, peer, tmp_path, clock, runners=2, split=3)
    assert run_row(d).state == "split" and len(d.store.shards(run_row(d).job_id)) == 3
    first = a.ask(d, collected=TESTS)
    second = b.ask(d, collected=list(reversed(TESTS)))  # the same tests, in another order: the same collection
    assert first.tests and second.tests and not set(first.tests) & set(second.tests)
    under_way = queries.split_run(d.store, run_row(d))  # what `volt status` shows of it
    assert under_way["chunks_done"] == 0 < under_way["chunks"] and len(under_way["shards"]) == 3
    assert sorted(under_way["shards"].values()) == ["queued", "running", "running"]
    handed = [*first.tests, *second.tests]
    for shard, chunk in ((a, first), (b, second)):
        while chunk.tests:
            chunk = shard.ask(d, results=[(n, "passed", 0.1) for n in chunk.tests])
            handed += chunk.tests
    assert sorted(handed) == sorted(TESTS)
    row = run_row(d)
    assert (row.state, row.status, row.passed, row.failed) == ("done", "passed", 8, 0)
    third = d.store.shards(row.job_id, "done")
    assert any(s.status == "cancelled" for s in third)  # the shard no runner took is not needed


def test_an_ask_sent_twice_gets_the_same_answer_and_takes_nothing_more(
    rabbit: FakeRabbit, peer: Peer, tmp_path: Path, clock: Clock
) -> None:
    d, (a,) = split_start(rabbit, peer, tmp_path, clock, runners=1, split=2)
    first = a.ask(d, collected=TESTS)
    again = a.ask(d, collected=TESTS, seq=a.seq)
    assert again.tests == first.tests
    taken = d.store.chunks(run_row(d).job_id, "taken")
    assert len(taken) == 1


def test_shards_that_collect_different_tests_end_the_run_and_the_others_are_told_to_stop(
    rabbit: FakeRabbit, peer: Peer, tmp_path: Path, clock: Clock
) -> None:
    d, (a, b) = split_start(rabbit, peer, tmp_path, clock, runners=2, split=2)
    a.ask(d, collected=TESTS)
    answer = b.ask(d, collected=[*TESTS, "tests/test_e.py::test_extra"])
    assert answer.stop and not answer.tests
    row = run_row(d)
    assert row.status == "error" and "tests/test_e.py::test_extra" in row.reason
    rounds(d, clock, 1)
    assert any(isinstance(m, CancelJob) for m in runner_queue(rabbit, "r0"))


def test_a_lost_shard_gives_its_chunk_back_and_each_test_is_recorded_once(
    rabbit: FakeRabbit, peer: Peer, tmp_path: Path, clock: Clock
) -> None:
    d, (a, b) = split_start(rabbit, peer, tmp_path, clock, runners=2, split=2)
    lost = a.ask(d, collected=TESTS).tests
    chunk = b.ask(d, collected=TESTS)
    # r0 falls silent; r1 keeps heartbeating and working.
    for _ in range(30):
        clock.advance(0.5)
        assert b.job is not None
        peer.hello("r1", job=b.job)
        d.run_once()
    handed = list(chunk.tests)
    while chunk.tests:
        chunk = b.ask(d, results=[(n, "passed", 0.1) for n in chunk.tests])
        handed += chunk.tests
    assert set(lost) <= set(handed)  # the lost chunk went to the shard still at work
    row = run_row(d)
    assert (row.status, row.passed) == ("passed", 8)
    assert [t.runs for t in d.store.tests(row.job_id)] == [1] * 8


def test_a_failing_test_runs_again_on_another_shard_and_failed_then_passed_is_flaky(
    rabbit: FakeRabbit, peer: Peer, tmp_path: Path, clock: Clock
) -> None:
    d, (a, b) = split_start(rabbit, peer, tmp_path, clock, runners=2, split=2, reruns=1)
    mine = a.ask(d, collected=TESTS).tests
    theirs = b.ask(d, collected=TESTS).tests
    flaky = mine[0]
    nxt = a.ask(d, results=[(n, "failed" if n == flaky else "passed", 0.1) for n in mine])
    while flaky not in theirs:
        assert flaky not in nxt.tests  # never back to the runner it failed on while another asks
        theirs = b.ask(d, results=[(n, "passed", 0.1) for n in theirs]).tests
        if nxt.tests:
            nxt = a.ask(d, results=[(n, "passed", 0.1) for n in nxt.tests])
    rest = b.ask(d, results=[(n, "passed", 0.1) for n in theirs])
    while rest.tests:
        rest = b.ask(d, results=[(n, "passed", 0.1) for n in rest.tests])
    while nxt.tests:
        nxt = a.ask(d, results=[(n, "passed", 0.1) for n in nxt.tests])
    row = run_row(d)
    assert (row.status, row.passed, row.failed) == ("passed", 8, 0)
    assert d.store.test_summary([row.job_id]) == {row.job_id: {"failing_tests": [], "flaky": [flaky]}}


def test_a_shard_that_stops_in_the_middle_of_a_chunk_ends_the_run_with_its_status(
    rabbit: FakeRabbit, peer: Peer, tmp_path: Path, clock: Clock
) -> None:
    d, (a,) = split_start(rabbit, peer, tmp_path, clock, runners=1, split=2)
    a.ask(d, collected=TESTS)
    a.finish(d, status="timeout")
    row = run_row(d)
    assert row.status == "timeout" and "stopped in the middle of its tests" in row.reason


def test_a_shard_that_leaves_with_tests_still_waiting_gets_a_successor(
    rabbit: FakeRabbit, peer: Peer, tmp_path: Path, clock: Clock
) -> None:
    d, (a,) = split_start(rabbit, peer, tmp_path, clock, runners=1, split=1, reruns=1)
    chunk = a.ask(d, collected=TESTS)
    # Its runner drains: it reports what it ran and wants nothing more.
    a.ask(d, results=[(n, "passed", 0.1) for n in chunk.tests], more=False)
    a.finish(d)
    run = run_row(d)
    assert run.state == "split"
    b = Shard(rabbit, peer, "r0")  # the same runner, come back: the new shard is in the backlog
    peer.hello("r0")
    rounds(d, clock, 2)
    job = b.take()
    assert job.job_id == f"{run.job_id}.2"
    rounds(d, clock, 1)
    nxt = b.ask(d, collected=TESTS)
    while nxt.tests:
        nxt = b.ask(d, results=[(n, "passed", 0.1) for n in nxt.tests])
    assert (run_row(d).status, run_row(d).passed) == ("passed", 8)
