"""One owner per identity: a second dispatcher on a namespace, or a second
runner with an id, refuses to start with one line and takes nothing."""

from __future__ import annotations

import signal
import subprocess
from collections import Counter

from support import (
    GitRepo,
    Volt,
    all_overlaps,
    commit_suite,
    jobs_in_store,
    many_commits,
    pg_database,
    rabbit_node,
    run_quiet,
    runs_per_commit,
)

from observer.publish import publish_commit

COMMITS = 20


def test_a_second_dispatcher_on_the_namespace_exits_2_with_one_line_and_takes_nothing(volt, repo, tmp_path):
    runs = tmp_path / "runs"
    repo.commit(commit_suite(runs, sleep=0.2))
    shas = many_commits(repo, COMMITS)
    first = volt.dispatcher()
    volt.runner("own-a")
    volt.runner("own-b")
    volt.wait_for("two runners", lambda: len(volt.ask("status")["runners"]) == 2)
    for sha in shas:
        publish_commit(volt.broker, str(repo.path), "main", sha, source="owner")
    volt.wait_results(2)  # work is flowing: commits, heartbeats and results all waiting to be taken

    other_db = tmp_path / "other" / "dispatcher.db"
    second = run_quiet(volt, "dispatcher", "--db", str(other_db), timeout=30)
    assert second.returncode == 2, second.stderr
    assert second.stderr.splitlines() == [
        f"volt dispatcher: another dispatcher is running in namespace {volt.ns!r} (its queues are in exclusive use); "
        "stop it, or give this one another --namespace"
    ], second.stderr
    # The same store file is refused before the broker is even asked.
    same = run_quiet(volt, "dispatcher", "--db", str(tmp_path / "dispatcher.db"), timeout=30)
    assert same.returncode == 2
    assert same.stderr.splitlines() == [
        f"volt dispatcher: another dispatcher is using the store {tmp_path / 'dispatcher.db'}"
    ], same.stderr

    # Nor does a dispatcher on PostgreSQL (those stand by for each other, not for this one).
    with pg_database() as db:
        on_pg = run_quiet(volt, "dispatcher", "--db", db, timeout=30)
    assert on_pg.returncode == 2, on_pg.stderr
    assert on_pg.stderr.splitlines() == [
        f"volt dispatcher: a dispatcher with a SQLite store runs in namespace {volt.ns!r} (it holds the queues' "
        "locks); stop it, or give this one another --namespace"
    ], on_pg.stderr

    rows = volt.wait_results(COMMITS, timeout=60)
    assert jobs_in_store(other_db) == []  # it took nothing
    assert first.poll() is None
    assert sorted(r["commit"] for r in rows) == sorted(shas)
    assert Counter(sum(e["kind"] == "result" for e in r["history"]) for r in rows) == {1: COMMITS}
    assert Counter(r["status"] for r in rows) == {"passed": COMMITS}
    assert all_overlaps(runs) == {} and set(runs_per_commit(runs).values()) == {1}
    # And one dispatcher answers, the same way every time.
    assert len(volt.results()) == len(volt.results()) == COMMITS


def test_a_second_runner_with_the_same_id_exits_2_with_one_line_and_the_first_runs_on(volt, repo, tmp_path):
    runs = tmp_path / "runs"
    repo.commit(commit_suite(runs, sleep=2))
    (sha,) = many_commits(repo, 1)
    volt.dispatcher()
    first = volt.runner("twin")
    volt.wait_for("the runner", lambda: volt.ask("status")["runners"])
    publish_commit(volt.broker, str(repo.path), "main", sha, source="owner")
    volt.wait_for("the run to start", lambda: runs_per_commit(runs).get(sha) == 1)

    elsewhere = str(tmp_path / "elsewhere")
    # --allow-repo: without it the runner rightly warns first that it takes any repository.
    second = run_quiet(volt, "runner", "--id", "twin", "--workdir", elsewhere, "--allow-repo", str(repo.path))
    assert second.returncode == 2, second.stderr
    assert second.stderr.splitlines() == [
        f"volt runner: another runner with id 'twin' is running in namespace {volt.ns!r} "
        "(its queue is in exclusive use); give this one another --id"
    ], second.stderr

    (row,) = volt.wait_results(1, timeout=30)
    assert (row["status"], row["runner"], row["attempts"]) == ("passed", "twin", 1)
    assert [e["kind"] for e in row["history"]].count("result") == 1
    assert runs_per_commit(runs) == {sha: 1}
    assert first.poll() is None
    (live,) = volt.ask("status")["runners"]
    assert live["runner_id"] == "twin"
    # The dispatcher never heard from the second one: no session flip, nobody left.
    log = volt.log_of("dispatcher")
    assert "restarted (session" not in log and "runner=twin left" not in log


def test_a_second_dispatcher_started_while_the_first_is_cut_off_does_not_take_its_namespace(tmp_path):
    """Exclusive consumers keep a second dispatcher out only while the first is
    connected. Frozen (a VM pause, swap) while the broker drops its connection,
    the first leaves the queues free for a moment; one started then must still
    not take over a namespace whose jobs live in another store."""
    repo = GitRepo(tmp_path / "repo")
    runs = tmp_path / "runs"
    repo.commit(commit_suite(runs, sleep=4))
    (sha,) = many_commits(repo, 1)
    with rabbit_node() as node:
        volt = Volt(node.url, "owner", tmp_path)
        try:
            first = volt.dispatcher()
            volt.runner("cut-a")
            volt.wait_for("the runner", lambda: volt.ask("status")["runners"])
            publish_commit(volt.broker, str(repo.path), "main", sha, source="owner")
            volt.wait_for("the run to start", lambda: runs_per_commit(runs).get(sha) == 1)
            volt.broker.close()
            first.send_signal(signal.SIGSTOP)
            try:
                closed = subprocess.run(
                    ["rabbitmqctl", "-n", node.name, "close_all_connections", "test"], capture_output=True, timeout=60
                )
                assert closed.returncode == 0, closed.stderr
                second = volt.start("second", "dispatcher", "--db", str(tmp_path / "other" / "dispatcher.db"))
                volt.wait_for(
                    "the second dispatcher to start or refuse",
                    lambda: second.poll() is not None or "dispatcher ready" in volt.log_of("second"),
                    timeout=30,
                )
            finally:
                first.send_signal(signal.SIGCONT)
            (row,) = volt.wait_results(1, timeout=30)
            assert second.wait(timeout=30) == 2, volt.log_of("second")[-2000:]
        finally:
            volt.stop_all()
    assert (row["status"], row["attempts"]) == ("passed", 1), row
    assert runs_per_commit(runs) == {sha: 1}
    assert jobs_in_store(tmp_path / "other" / "dispatcher.db") == []
    assert "this attempt is no longer yours" not in volt.log_of("cut-a")
