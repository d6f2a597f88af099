"""Beyond one machine: standby dispatchers on PostgreSQL, quorum queues on a
3-node RabbitMQ cluster, and every commit still gets exactly one result.

PostgreSQL is the machine's (127.0.0.1:5432, or VOLT_TEST_PG_URL); each test
creates a database of its own and drops it. The cluster is three private
RabbitMQ nodes started for the test and stopped after it.
"""

from __future__ import annotations

import signal
import statistics
import time
import uuid
from pathlib import Path

import pytest
from support import (
    GitRepo,
    Node,
    Relay,
    Volt,
    many_commits,
    overlapping,
    per_commit_suite,
    pg_database,
    pids,
    rabbit_cluster,
)

from dispatcher.client import QueryFailed

ACTIVE = "is the active one now"
STOOD_DOWN = "this dispatcher stands by"


def active_one(volt: Volt, names: tuple[str, ...]) -> str:
    """The dispatcher that said last that it is the active one, and has not stood down since."""

    def which() -> str | None:
        for name in names:
            lines = [ln for ln in volt.log_of(name).splitlines() if ACTIVE in ln or STOOD_DOWN in ln]
            if lines and ACTIVE in lines[-1] and volt.procs[name].poll() is None:
                return name
        return None

    return volt.wait_for("an active dispatcher", which, timeout=30)


def two_dispatchers(volt: Volt, db: str, names: tuple[str, str]) -> str:
    """Start the first dispatcher on `db`, then, once it is active, the second as its standby."""
    volt.start(names[0], "dispatcher", "--db", db)
    active = active_one(volt, names[:1])
    volt.start(names[1], "dispatcher", "--db", db)
    volt.wait_for("the standby", lambda: "standing by" in volt.log_of(names[1]))
    return active


def node_of(volt: Volt, name: str, nodes: list[Node]) -> Node:
    """The node a worker connected to last (its log says so)."""
    line = [ln for ln in volt.log_of(name).splitlines() if "connected to amqp://" in ln][-1]
    return next(n for n in nodes if f":{n.port}/" in line)


def wait_answering(volt: Volt, since: float, timeout: float = 30) -> tuple[float, list[str]]:
    """Seconds from `since` until an active dispatcher answers, and what a
    standby said meanwhile."""
    said: list[str] = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            volt.ask("ping", timeout=2)
            return time.monotonic() - since, said
        except QueryFailed as exc:
            said.append(str(exc))
        time.sleep(0.1)
    pytest.fail(f"no dispatcher answered within {timeout}s: {said[-3:]}")


def exactly_one_result_each(volt: Volt, commits: list[str]) -> list[dict]:
    rows = volt.results()
    by_commit = {r["commit"]: r for r in rows}
    assert sorted(by_commit) == sorted(commits)
    assert len(rows) == len(commits)  # one job per commit
    for row in rows:
        kinds = [e["kind"] for e in row["history"]]
        assert kinds.count("result") == 1, row
        assert row["status"] == "passed", row
    return rows


def test_standby_dispatchers_take_over_from_a_killed_or_paused_one(amqp_url: str, tmp_path: Path) -> None:
    repo = GitRepo(tmp_path / "repo")
    runs = tmp_path / "runs"
    runs.mkdir()
    first = repo.commit(per_commit_suite(runs, sleep=0.2))
    names = ("dispatcher-a", "dispatcher-b")
    with pg_database() as db:
        volt = Volt(amqp_url, f"t{uuid.uuid4().hex[:10]}", tmp_path)
        try:
            active = two_dispatchers(volt, db, names)
            # A standby answers while the active one does too: the active one takes the question.
            assert volt.ask("ping")["runners"] == 0
            volt.runner("r1")
            volt.runner("r2")
            volt.observer(repo.path)
            volt.wait_results(1)
            commits = many_commits(repo, 10)

            # kill -9: the standby takes over once the lease runs out.
            volt.wait_results(2, timeout=60)
            killed = time.monotonic()
            volt.kill(active)
            took, said = wait_answering(volt, killed)
            standby = active_one(volt, names)
            assert standby != active
            assert any("no active dispatcher" in s and "takes over" in s for s in said), said
            print(f"takeover after kill -9: {took:.2f}s")
            assert took < 10
            volt.wait_results(11, timeout=90)
            exactly_one_result_each(volt, [first, *commits])

            # Paused past its lease: the other takes over, and the paused one,
            # woken, commits nothing more and stands by.
            volt.start(active, "dispatcher", "--db", db)
            volt.wait_for("the restarted one to stand by", lambda: "standing by" in volt.log_of(active))
            paused = volt.procs[standby]
            paused.send_signal(signal.SIGSTOP)
            volt.wait_for("the lease to move", lambda: volt.log_of(active).count(ACTIVE) >= 2, timeout=30)
            more = many_commits(repo, 5)
            woke_at = len(volt.log_of(standby))
            paused.send_signal(signal.SIGCONT)
            volt.wait_results(16, timeout=90)
            exactly_one_result_each(volt, [first, *commits, *more])
            # Woken, it finds the lease gone (its round fails) or its broker
            # connection gone (the broker gave a silent one up): either way it
            # stands by, having recorded and assigned nothing.
            volt.wait_for(
                "the woken one to stand by",
                lambda: any(s in volt.log_of(standby)[woke_at:] for s in (STOOD_DOWN, "standing by")),
            )
            woken = volt.log_of(standby)[woke_at:].split(ACTIVE, 1)[0]
            assert " recorded: " not in woken and "assigned to runner" not in woken, woken[-3000:]
            assert overlapping(runs) == []
        finally:
            volt.stop_all()
            volt.delete_topology()


@pytest.mark.parametrize("cut", ["hang", "drop"])
def test_a_standby_takes_over_from_a_dispatcher_cut_off_from_the_broker(
    amqp_url: str, tmp_path: Path, cut: str
) -> None:
    # "hang": a network partition, where neither end hears a close, so only
    # silence tells; "drop": its node gone, and no other node reachable. The
    # cut-off one still reaches PostgreSQL, and must let go anyway.
    repo = GitRepo(tmp_path / "repo")
    runs = tmp_path / "runs"
    runs.mkdir()
    first = repo.commit(per_commit_suite(runs, sleep=0.2))
    relay = Relay(amqp_url)
    with pg_database() as db:
        volt = Volt(amqp_url, f"t{uuid.uuid4().hex[:10]}", tmp_path)
        try:
            volt.start("dispatcher-a", "dispatcher", "--db", db, amqp_url=relay.url)
            active_one(volt, ("dispatcher-a",))
            volt.start("dispatcher-b", "dispatcher", "--db", db)
            volt.wait_for("the standby", lambda: "standing by" in volt.log_of("dispatcher-b"))
            volt.runner("r1")
            volt.runner("r2")
            volt.observer(repo.path)
            volt.wait_results(1)

            cut_at = time.monotonic()
            getattr(relay, cut)()
            commits = many_commits(repo, 3)
            volt.wait_results(4, timeout=60)
            took = time.monotonic() - cut_at
            print(f"{cut}: commits made after the cut recorded {took:.1f}s after it")
            assert took < 10
            assert ACTIVE in volt.log_of("dispatcher-b")

            relay.heal()  # it comes back, finds the lease gone, and stands by
            volt.wait_for(
                "the cut-off one to stand by",
                lambda: STOOD_DOWN in volt.log_of("dispatcher-a") or "standing by" in volt.log_of("dispatcher-a"),
                timeout=60,
            )
            more = many_commits(repo, 3)
            volt.wait_results(7, timeout=60)
            exactly_one_result_each(volt, [first, *commits, *more])
            assert overlapping(runs) == []
        finally:
            volt.stop_all()
            volt.delete_topology()
            relay.close()


def test_a_standby_that_takes_over_from_a_paused_dispatcher_takes_no_running_job_back(
    amqp_url: str, tmp_path: Path
) -> None:
    # The paused one still holds the input queues (a single active consumer)
    # and what they had pushed to it until the broker gives its silent
    # connection up: meanwhile the new active one hears no heartbeat, and must
    # not take that for the runners' silence.
    repo = GitRepo(tmp_path / "repo")
    runs = tmp_path / "runs"
    runs.mkdir()
    shas = [repo.commit(per_commit_suite(runs, sleep=30)), repo.commit({"two.txt": "2"})]
    names = ("dispatcher-a", "dispatcher-b")
    with pg_database() as db:
        volt = Volt(amqp_url, f"t{uuid.uuid4().hex[:10]}", tmp_path)
        try:
            active = two_dispatchers(volt, db, names)
            for r in ("r1", "r2", "r3"):  # r3 stays idle: where a job taken back would go
                volt.runner(r)
            volt.wait_for("three runners", lambda: len(volt.ask("status")["runners"]) == 3)
            for sha in shas:
                volt.run("notify", "--repo", str(repo.path), "--branch", "main", "--commit", sha)
            volt.wait_for("both jobs running", lambda: len(list(runs.iterdir())) == 2, timeout=30)
            paused = volt.procs[active]
            paused.send_signal(signal.SIGSTOP)
            since = time.monotonic()
            other = next(n for n in names if n != active)
            volt.wait_for("the other to take over", lambda: ACTIVE in volt.log_of(other), timeout=20)
            # Past the lease (5 s) and the new one's restart grace (10 s) for runners to report in.
            time.sleep(max(0.0, 20 - (time.monotonic() - since)))
            paused.send_signal(signal.SIGCONT)
            volt.wait_results(2, timeout=60)
            rows = exactly_one_result_each(volt, shas)
            for row in rows:
                kinds = [e["kind"] for e in row["history"]]
                assert row["attempts"] == 1 and "lost" not in kinds, row
            assert sorted(f.name for f in runs.iterdir()) == sorted(shas)
            assert [len(pids(f)) for f in runs.iterdir()] == [1, 1]
            assert overlapping(runs) == []
        finally:
            volt.stop_all()
            volt.delete_topology()


def test_a_cluster_loses_a_node_and_the_active_dispatcher_and_every_commit_gets_one_result(tmp_path: Path) -> None:
    repo = GitRepo(tmp_path / "repo")
    runs = tmp_path / "runs"
    runs.mkdir()
    first = repo.commit(per_commit_suite(runs, sleep=0.3))
    names = ("dispatcher-a", "dispatcher-b")
    started = time.monotonic()
    with rabbit_cluster(3) as nodes, pg_database() as db:
        print(f"3-node cluster up in {time.monotonic() - started:.1f}s")
        volt = Volt(",".join(n.url for n in nodes), f"t{uuid.uuid4().hex[:10]}", tmp_path)
        try:
            active = two_dispatchers(volt, db, names)
            volt.runner("r1")
            volt.runner("r2")
            volt.observer(repo.path)
            volt.wait_results(1, timeout=60)

            commits = many_commits(repo, 30)
            volt.wait_results(5, timeout=60)
            killed = time.monotonic()
            volt.kill(active)
            took, _ = wait_answering(volt, killed)
            print(f"takeover after kill -9 of the active dispatcher: {took:.2f}s")
            assert took < 10
            # Then a broker node goes, the one runner r1 is connected to, and comes back.
            victim = node_of(volt, "r1", nodes)
            victim.kill()
            volt.wait_results(15, timeout=90)
            victim.launch()
            volt.wait_results(31, timeout=120)
            victim.wait_listening()
            assert node_of(volt, "r1", nodes) is not victim  # r1 failed over to another node
            exactly_one_result_each(volt, [first, *commits])
            assert overlapping(runs) == []
            durations = [r["duration_s"] for r in volt.results() if r["duration_s"] is not None]
            print(f"31 results; median test run {statistics.median(durations):.2f}s")
        finally:
            volt.stop_all()


def test_a_namespace_of_classic_queues_says_how_to_migrate_and_migrate_queues_keeps_the_messages(volt: Volt) -> None:
    from common import naming
    from common.broker import Broker
    from common.messages import CommitSeen
    from common.settings import BrokerSettings

    old = Broker(BrokerSettings(amqp_url=volt.amqp_url, namespace=volt.ns, queue_type="classic"), "volt-test-old")
    old.connect(give_up_after=10)
    old.declare_topology()  # as a Volt CI of classic queues left it, with two commits waiting
    for i in range(2):
        seen = CommitSeen(repo="/srv/app", branch="main", commit=f"{i:040x}", seen_at=1.0)
        old.publish(naming.commits_exchange(volt.ns), "", seen)
    old.close()

    refused = volt.run("dispatcher", "--db", str(volt.tmp / "d.db"), timeout=60)
    assert refused.returncode == 2, refused.stderr
    line = refused.stderr.strip().splitlines()[-1]
    # RabbitMQ names the first argument that differs; which one depends on its version.
    assert "is a classic queue, but --queue-type is quorum" in line or "say, as a classic queue" in line, line
    assert f"volt migrate-queues --namespace {volt.ns} --queue-type quorum" in line
    assert "Traceback" not in refused.stderr

    moved = volt.run("migrate-queues")
    assert moved.returncode == 0, moved.stderr
    assert f"{naming.dispatcher_commits_queue(volt.ns)}: declared as a quorum queue, 2 message(s) kept" in moved.stdout
    again = volt.run("migrate-queues")
    assert again.stdout.count("already a quorum queue") == len(naming.shared_queues(volt.ns))

    volt.dispatcher()
    rows = volt.wait_for("the two jobs", lambda: len(r := volt.results(done_only=False)) == 2 and r)
    assert sorted(r["commit"] for r in rows) == [f"{i:040x}" for i in range(2)]
