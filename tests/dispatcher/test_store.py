"""The dispatcher's job store, each test on a real SQLite file and on a real
PostgreSQL database (one of its own, dropped afterwards): both stores keep the
same promises."""

from __future__ import annotations

import base64
import random
import sqlite3
import uuid
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from support import finished_job, pg_database

from common.messages import CommitSeen, Job, JobResult
from dispatcher import store as store_module
from dispatcher.store import NODE_KEY_BYTES, JobRow, LeaseLost, Store, StoreError, job_id_for, node_key

SHA_A = "a" * 40
SHA_B = "b" * 40
SHA_C = "c0ffee" + "0" * 34
REPO = "/srv/git/app"


@pytest.fixture(params=["sqlite", "postgresql"])
def db_path(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Path | str]:
    """Where the store lives: a SQLite file, or a PostgreSQL database's URL."""
    if request.param == "sqlite":
        yield tmp_path / "volt.db"
        return
    with pg_database() as url:
        yield url


@pytest.fixture
def sqlite_path(tmp_path: Path) -> Path:
    return tmp_path / "volt.db"


@pytest.fixture
def pg_url() -> Iterator[str]:
    with pg_database() as url:
        yield url


@pytest.fixture
def store(db_path: Path | str) -> Iterator[Store]:
    s = Store(db_path, durable=False)
    yield s
    s.close()


def seen(
    commit: str = SHA_A, branch: str = "main", repo: str = REPO, at: float = 100.0, labels: list[str] | None = None
) -> CommitSeen:
    return CommitSeen(repo=repo, branch=branch, commit=commit, seen_at=at, labels=labels or [])


def result(row: JobRow, runner: str = "r1", status: str = "passed", **fields: Any) -> JobResult:
    """A result for the row's assignment as it was when `row` was read (its lease)."""
    fields.setdefault("attempt", row.attempt)
    fields.setdefault("lease", row.lease or "")
    return JobResult(job_id=row.job_id, runner_id=runner, status=status, **fields)


def queued(store: Store, commit: str = SHA_A, **kw: Any) -> JobRow:
    row = store.add_job(seen(commit, **kw))
    store.mark_queued(row.job_id, row.attempt, now=101.0)
    return current(store, row)


def running(store: Store, commit: str = SHA_A, runner: str = "r1", **kw: Any) -> JobRow:
    row = queued(store, commit, **kw)
    lease = store.assign(row.job_id, row.attempt, runner, now=102.0)
    assert lease
    assert store.start(row.job_id, lease, runner, "sess-1", started_at=103.0, now=103.5)
    return current(store, row)


def current(store: Store, row: JobRow) -> JobRow:
    again = store.get(row.job_id)
    assert again is not None
    return again


def kinds(store: Store, row: JobRow) -> list[str]:
    return [e["kind"] for e in store.events(row.job_id)]


def packed_log(text: str) -> str:
    return base64.b64encode(zlib.compress(text.encode())).decode()


# -- adding jobs ----------------------------------------------------------


def test_add_job_is_idempotent(store: Store) -> None:
    first = store.add_job(seen(at=100.0))
    again = store.add_job(seen(at=200.0))  # the same CommitSeen, redelivered later
    assert again == first
    assert first.state == "pending"
    assert first.attempt == 1
    assert first.seen_at == 100.0
    assert store.count_by_state() == {"pending": 1}


def test_job_id_is_stable_and_per_repo_branch_commit(store: Store, db_path: Path | str) -> None:
    row = store.add_job(seen())
    assert row.job_id == job_id_for(REPO, "main", SHA_A)
    assert store.add_job(seen(branch="dev")).job_id != row.job_id
    assert store.add_job(seen(repo="/srv/git/other")).job_id != row.job_id
    assert store.add_job(seen(commit=SHA_B)).job_id != row.job_id
    reopened = Store(db_path, durable=False)
    try:
        assert reopened.add_job(seen()).job_id == row.job_id
        assert reopened.count_by_state() == {"pending": 4}
    finally:
        reopened.close()


def test_a_finished_job_is_not_reopened_by_a_duplicate_commit(store: Store) -> None:
    row = running(store)
    assert store.finish(result(row), now=110.0)
    again = store.add_job(seen())
    assert again.state == "done"
    assert again.status == "passed"


def test_seen_at_falls_back_to_now(store: Store) -> None:
    assert store.add_job(seen(at=0.0), now=555.0).seen_at == 555.0


# -- the state machine ----------------------------------------------------


def test_pending_queued_assigned_running_done(store: Store) -> None:
    row = store.add_job(seen())
    assert row.state == "pending"
    assert [r.job_id for r in store.in_state("pending")] == [row.job_id]

    store.mark_queued(row.job_id, 1, now=101.0)
    row = current(store, row)
    assert (row.state, row.queued_at) == ("queued", 101.0)

    lease = store.assign(row.job_id, 1, "r1", now=102.0)
    row = current(store, row)
    assert (row.state, row.runner, row.assigned_at, row.lease) == ("assigned", "r1", 102.0, lease)
    assert lease and len(lease) == 32  # a token nobody can guess
    assert store.busy_runners() == {"r1"}

    assert not store.start(row.job_id, "guessed", "r1", "sess-1", started_at=103.0, now=103.5)
    assert store.start(row.job_id, lease, "r1", "sess-1", started_at=103.0, now=103.5)
    row = current(store, row)
    assert (row.state, row.session, row.started_at) == ("running", "sess-1", 103.0)
    assert store.busy_runners() == {"r1"}

    done = result(row, status="failed", exit_code=1, passed=5, failed=2, errors=1, skipped=3, duration_s=4.5)
    assert store.finish(done, now=110.0)
    row = current(store, row)
    assert (row.state, row.status, row.exit_code, row.finished_at) == ("done", "failed", 1, 110.0)
    assert (row.passed, row.failed, row.errors, row.skipped, row.duration_s) == (5, 2, 1, 3, 4.5)
    assert store.busy_runners() == set()
    assert current(store, row).lease is None  # nothing can speak for it any more
    assert store.count_by_state() == {"done": 1}
    assert store.count_by_status() == {"failed": 1}
    assert kinds(store, row) == ["assigned", "started", "result"]


def test_steps_out_of_order_change_nothing(store: Store) -> None:
    row = store.add_job(seen())
    assert not store.assign(row.job_id, 1, "r1", now=1.0)  # still pending
    assert not store.start(row.job_id, "no-lease", "r1", "s", started_at=1.0, now=1.0)
    store.mark_queued(row.job_id, 2, now=1.0)  # wrong attempt
    assert current(store, row).state == "pending"
    store.mark_queued(row.job_id, 1, now=1.0)
    assert not store.assign(row.job_id, 2, "r1", now=2.0)  # wrong attempt
    lease = store.assign(row.job_id, 1, "r1", now=2.0)
    assert lease
    assert not store.assign(row.job_id, 1, "r2", now=2.0)  # already taken
    assert not store.start(row.job_id, lease, "r2", "s", started_at=3.0, now=3.0)  # not its job
    row = current(store, row)
    assert (row.state, row.runner) == ("assigned", "r1")
    assert kinds(store, row) == ["assigned"]


def test_a_result_before_job_started_is_accepted(store: Store) -> None:
    row = queued(store)
    assert store.assign(row.job_id, 1, "r1", now=102.0)
    assert store.finish(result(current(store, row), started_at=104.0), now=110.0)
    row = current(store, row)
    assert (row.state, row.status, row.started_at) == ("done", "passed", 104.0)


# -- results: the first one of the current attempt wins ---------------------


def test_a_result_from_another_runner_is_history_only(store: Store) -> None:
    row = running(store, runner="r1")
    assert not store.finish(result(row, runner="r2", status="failed"), now=110.0)
    row = current(store, row)
    assert (row.state, row.status, row.runner) == ("running", None, "r1")
    late = store.events(row.job_id)[-1]
    assert (late["kind"], late["runner"], late["status"]) == ("late_result", "r2", "failed")


def test_a_duplicate_result_never_overwrites_the_winner(store: Store) -> None:
    row = running(store)
    assert store.finish(result(row, status="passed", passed=7, log_head="first"), now=110.0)
    assert not store.finish(result(row, status="failed", failed=1, reason="again"), now=111.0)
    assert not store.finish(result(row, status="passed", passed=7, log_head="first"), now=112.0)
    row = current(store, row)
    assert (row.status, row.passed, row.failed, row.finished_at, row.reason) == ("passed", 7, 0, 110.0, "")
    assert store.log(row.job_id)["head"] == "first"  # type: ignore[index]
    assert kinds(store, row) == ["assigned", "started", "result", "late_result", "late_result"]
    assert store.events(row.job_id)[3]["reason"] == "again"


def test_a_result_from_an_attempt_that_was_given_away_is_history_only(store: Store) -> None:
    row = running(store, runner="r1")
    assert store.requeue(row.job_id, row.lease, "runner r1 lost", now=105.0, failure=True, max_failures=3) == "pending"
    store.mark_queued(row.job_id, 2, now=106.0)
    assert store.assign(row.job_id, 2, "r2", now=107.0)
    # r1 was only slow: its attempt-1 result arrives now.
    assert not store.finish(result(row, runner="r1", attempt=1, status="failed"), now=108.0)
    row = current(store, row)
    assert (row.state, row.attempt, row.runner, row.status) == ("assigned", 2, "r2", None)
    assert store.finish(result(row, runner="r2", attempt=2, status="passed", reason="ok"), now=109.0)
    row = current(store, row)
    assert (row.status, row.attempt) == ("passed", 2)
    assert row.reason == "ok (attempt 1: runner r1 lost)"  # why attempt 1 went is kept
    events = store.events(row.job_id)
    assert [(e["kind"], e["attempt"], e["runner"]) for e in events if "result" in e["kind"]] == [
        ("late_result", 1, "r1"),
        ("result", 2, "r2"),
    ]


def test_a_result_without_the_lease_is_history_only(store: Store) -> None:
    row = running(store, runner="r1")
    # The right runner, job and attempt, but not the lease: a forgery, or an older assignment.
    assert not store.finish(result(row, lease="forged", status="passed"), now=110.0)
    assert not store.finish(result(row, lease="", status="passed"), now=110.0)
    assert current(store, row).state == "running"
    assert kinds(store, row)[-2:] == ["late_result", "late_result"]
    assert store.finish(result(row, status="failed"), now=111.0)
    assert current(store, row).status == "failed"


def test_a_result_for_an_unknown_job_is_kept_as_history(store: Store) -> None:
    ghost = JobResult(job_id="nope", attempt=1, runner_id="r1", status="passed")
    assert not store.finish(ghost, now=1.0)
    assert [e["kind"] for e in store.events("nope")] == ["late_result"]


# -- taking jobs back -------------------------------------------------------


def test_requeue_starts_a_new_attempt(store: Store) -> None:
    row = running(store)
    assert store.requeue(row.job_id, row.lease, "runner r1 lost", now=105.0, failure=True, max_failures=3) == "pending"
    row = current(store, row)
    assert (row.state, row.attempt, row.failures, row.runner, row.session) == ("pending", 2, 1, None, None)
    assert row.lease is None
    assert (row.assigned_at, row.started_at) == (None, None)
    assert row.reason == "attempt 1: runner r1 lost"
    assert row.as_job() == Job(job_id=row.job_id, attempt=2, repo=REPO, branch="main", commit=SHA_A)
    assert store.busy_runners() == set()
    lost = store.events(row.job_id)[-1]
    assert (lost["kind"], lost["attempt"], lost["runner"], lost["reason"]) == ("lost", 1, "r1", "runner r1 lost")


def test_requeue_ends_as_error_after_max_failures(store: Store) -> None:
    row = store.add_job(seen())
    for attempt in (1, 2, 3):
        store.mark_queued(row.job_id, attempt, now=1.0)
        lease = store.assign(row.job_id, attempt, f"r{attempt}", now=2.0)
        assert lease
        outcome = store.requeue(row.job_id, lease, f"runner r{attempt} lost", now=3.0, failure=True, max_failures=3)
        assert outcome == ("error" if attempt == 3 else "pending")
    row = current(store, row)
    assert (row.state, row.status, row.attempt, row.failures) == ("done", "error", 3, 3)
    assert row.reason == "gave up after 3 lost attempt(s); last: runner r3 lost"
    assert row.finished_at == 3.0
    assert store.count_by_status() == {"error": 1}
    last = store.events(row.job_id)[-1]
    assert (last["kind"], last["status"]) == ("result", "error")
    # The last runner's result, if it ever comes, is history.
    assert not store.finish(result(row, runner="r3", attempt=3), now=4.0)
    assert current(store, row).status == "error"


def test_requeue_without_failure_does_not_count(store: Store) -> None:
    row = store.add_job(seen())
    for attempt in range(1, 6):  # more than max_failures
        store.mark_queued(row.job_id, attempt, now=1.0)
        lease = store.assign(row.job_id, attempt, "r1", now=2.0)
        assert lease
        assert store.requeue(row.job_id, lease, "runner left", now=3.0, failure=False, max_failures=2) == "pending"
    row = current(store, row)
    assert (row.attempt, row.failures, row.state) == (6, 0, "pending")
    assert kinds(store, row).count("returned") == 5
    store.mark_queued(row.job_id, 6, now=4.0)
    lease = store.assign(row.job_id, 6, "r1", now=5.0)
    assert lease
    assert store.requeue(row.job_id, lease, "lost", now=6.0, failure=True, max_failures=2) == "pending"
    store.mark_queued(row.job_id, 7, now=7.0)
    lease = store.assign(row.job_id, 7, "r1", now=8.0)
    assert lease
    assert store.requeue(row.job_id, lease, "lost", now=9.0, failure=True, max_failures=2) == "error"


def test_stale_requeue_changes_nothing(store: Store) -> None:
    assert store.requeue("nope", "x", "x", now=1.0, failure=True, max_failures=3) == "stale"
    row = store.add_job(seen())
    assert store.requeue(row.job_id, "x", "x", now=1.0, failure=True, max_failures=3) == "stale"  # pending
    store.mark_queued(row.job_id, 1, now=1.0)
    assert store.requeue(row.job_id, "x", "x", now=1.0, failure=True, max_failures=3) == "stale"  # queued
    row = running(store, SHA_B)
    assert store.requeue(row.job_id, "other", "x", now=1.0, failure=True, max_failures=3) == "stale"  # not its lease
    assert store.finish(result(row), now=2.0)
    assert store.requeue(row.job_id, row.lease, "x", now=3.0, failure=True, max_failures=3) == "stale"  # done
    row = current(store, row)
    assert (row.state, row.attempt, row.failures, row.status) == ("done", 1, 0, "passed")
    assert "lost" not in kinds(store, row)


def test_unassign_parks_the_same_attempt_for_the_next_runner(store: Store) -> None:
    row = queued(store)
    lease = store.assign(row.job_id, 1, "r1", now=2.0)
    assert lease
    assert not store.unassign(row.job_id, "other", "unroutable", "not its lease", now=3.0)
    assert store.unassign(row.job_id, lease, "unroutable", "runner r1 queue missing", now=3.0)
    row = current(store, row)
    assert (row.state, row.attempt, row.runner, row.failures, row.lease) == ("parked", 1, None, 0, None)
    event = store.events(row.job_id)[-1]
    assert (event["kind"], event["reason"]) == ("unroutable", "runner r1 queue missing")
    assert store.assign(row.job_id, 1, "r2", now=4.0)
    assert current(store, row).runner == "r2"


def test_labels_are_kept_sorted_and_travel_in_the_job(store: Store) -> None:
    row = queued(store, labels=["linux", "gpu", "linux"])
    assert row.labels == ["gpu", "linux"]
    assert row.as_job().labels == ["gpu", "linux"]
    assert queued(store, SHA_B).labels == []


def test_park_takes_a_queued_job_aside_until_a_runner_takes_it(store: Store) -> None:
    row = queued(store, labels=["gpu"])
    assert store.park(row.job_id, 1, "no live runner has labels gpu", now=102.0)
    parked = current(store, row)
    assert (parked.state, parked.reason) == ("parked", "no live runner has labels gpu")
    assert [r.job_id for r in store.in_state("parked")] == [row.job_id]
    assert not store.park(row.job_id, 1, "again", now=103.0)  # only a queued job parks
    assert not store.park(row.job_id, 2, "wrong attempt", now=103.0)
    assert store.assign(row.job_id, 1, "gpu-runner", now=104.0)
    assert current(store, row).state == "assigned"


def old_schema(without: str = "") -> str:
    """The SQLite schema as older Volt CI versions wrote it (no schema_version table)."""
    script = store_module.SCHEMA.format(**store_module.SQLite.types)
    return script.replace(without, "") if without else script


def test_a_store_from_before_labels_is_brought_up_to_date(sqlite_path: Path) -> None:
    old = sqlite3.connect(sqlite_path)
    old.executescript(old_schema(",\n    labels      TEXT NOT NULL DEFAULT '[]'"))
    old.execute(
        "INSERT INTO jobs (job_id, repo, branch, commit_sha, state, seen_at) VALUES ('j', ?, 'main', ?, 'done', 1)",
        (REPO, SHA_A),
    )
    old.commit()
    assert "labels" not in {r[1] for r in old.execute("PRAGMA table_info(jobs)")}
    old.close()
    s = Store(sqlite_path, durable=False)
    try:
        row = s.get("j")
        assert row is not None and row.labels == []
        assert s.add_job(seen(SHA_B, labels=["gpu"])).labels == ["gpu"]
        assert s.schema_version() == store_module.SCHEMA_VERSION
    finally:
        s.close()


def test_a_new_store_has_the_current_schema_version(store: Store, db_path: Path | str) -> None:
    assert store.schema_version() == store_module.SCHEMA_VERSION == 4
    assert len(store.store_id) == 32
    store.close()
    again = Store(db_path, durable=False)  # opening it again migrates nothing
    try:
        assert again.schema_version() == store_module.SCHEMA_VERSION
        assert again.store_id == store.store_id  # made once, kept
        assert again.lease().term == 0
    finally:
        again.close()


def test_a_version_1_store_gains_the_lease_table(db_path: Path | str) -> None:
    first = Store(db_path, durable=False)
    row = first.add_job(seen())
    # Back to version 1, as a store written before the lease and the store id existed.
    first._x("DROP TABLE dispatcher_lease")
    first._x("DROP TABLE meta")
    first._x("UPDATE schema_version SET version = 1")
    first.close()
    again = Store(db_path, durable=False)
    try:
        assert again.schema_version() == store_module.SCHEMA_VERSION
        assert again.lease().term == 0
        assert len(again.store_id) == 32
        assert again.get(row.job_id) is not None  # the jobs are kept
    finally:
        again.close()


def test_a_store_from_a_newer_volt_ci_is_refused(store: Store, db_path: Path | str) -> None:
    store._x("UPDATE schema_version SET version = 99")
    store.close()
    with pytest.raises(StoreError, match="schema version 99, newer than this Volt CI's"):
        Store(db_path, durable=False)


# -- the dispatcher lease ---------------------------------------------------


def test_the_lease_goes_to_one_holder_at_a_time_each_with_a_higher_term(store: Store) -> None:
    first = store.acquire_lease("a", ttl=30)
    assert first == 1
    assert store.acquire_lease("b", ttl=30) is None  # held, and not expired
    assert store.lease().holder == "a"
    assert 29 < store.lease().seconds_left <= 30
    store.release_lease("a", first)
    second = store.acquire_lease("b", ttl=30)
    assert second == 2
    assert store.acquire_lease("a", ttl=30) is None
    assert store.acquire_lease("b", ttl=30) == 3  # its own again: a new term all the same


def test_an_expired_lease_is_taken_over(store: Store) -> None:
    assert store.acquire_lease("a", ttl=-1) == 1  # already expired
    assert store.acquire_lease("b", ttl=30) == 2


def test_a_fenced_round_commits_and_renews_the_lease(store: Store) -> None:
    term = store.acquire_lease("a", ttl=0.5)
    assert term is not None
    store.fence, store.lease_ttl = ("a", term), 30.0
    store.begin_batch()
    row = queued(store)
    store.commit_batch()
    assert current(store, row).state == "queued"
    assert store.lease().seconds_left > 29  # the commit renewed it


def test_a_holder_that_has_not_heard_its_broker_renews_the_lease_only_to_the_broker_s_last_word_and_ttl(
    store: Store,
) -> None:
    term = store.acquire_lease("a", ttl=30)
    assert term is not None
    store.fence, store.lease_ttl = ("a", term), 30.0
    store.silence = lambda: 20.0
    store.begin_batch()
    store.commit_batch()
    assert 9 < store.lease().seconds_left <= 10
    store.silence = lambda: 45.0  # cut off for longer than the lease: the round commits, the lease ran out
    store.begin_batch()
    row = queued(store)
    store.commit_batch()
    assert current(store, row).state == "queued"
    assert -16 < store.lease().seconds_left < -14
    assert store.acquire_lease("b", ttl=30) == term + 1


def test_a_dispatcher_that_lost_the_lease_commits_nothing(pg_url: str) -> None:
    # PostgreSQL only: two dispatchers never write one SQLite file (the file lock).
    old, new = Store(pg_url, durable=False), Store(pg_url, durable=False)
    try:
        term = old.acquire_lease("old", ttl=-1)  # its lease has run out (a long pause) ...
        assert term is not None
        old.fence = ("old", term)
        old.begin_batch()
        row = old.add_job(seen())
        assert new.acquire_lease("new", ttl=30) == term + 1  # ... and a standby took over
        with pytest.raises(LeaseLost, match="taken over"):
            old.commit_batch()
        assert new.get(row.job_id) is None  # the old one's round left nothing
        with pytest.raises(LeaseLost, match="held by new"):
            old.begin_batch()  # and it acts on no later round either
        with pytest.raises(LeaseLost):
            old.add_job(seen())  # nor outside a batch
        assert new.count_by_state() == {}
    finally:
        old.close()
        new.close()


# -- PostgreSQL's own -------------------------------------------------------


@pytest.fixture
def pg_store(pg_url: str) -> Iterator[Store]:
    s = Store(pg_url, durable=False)
    yield s
    s.close()


def test_a_lost_database_connection_is_a_store_error_and_the_next_round_reconnects(pg_store: Store) -> None:
    row = pg_store.add_job(seen())
    pg_store.begin_batch()
    killer = Store(pg_store.url, durable=False)
    pid = pg_store.db.info.backend_pid
    killer._x("SELECT pg_terminate_backend(?)", (pid,))
    killer.close()
    with pytest.raises(StoreError, match="store postgresql://"):
        pg_store.mark_queued(row.job_id, 1, now=1.0)
    pg_store.rollback_batch()
    pg_store.begin_batch()  # a new connection
    pg_store.mark_queued(row.job_id, 1, now=1.0)
    pg_store.commit_batch()
    assert current(pg_store, row).state == "queued"


def test_a_server_that_forgot_the_prepared_statements_costs_one_round(pg_store: Store) -> None:
    # The server may lose what a session prepared (a DISCARD, a pooler between,
    # an operator's DEALLOCATE): the round that finds out fails as the store's
    # trouble, and the next one runs on a new session.
    row = running(pg_store)
    pg_store.begin_batch()
    pg_store.note(row.job_id, 1, "r1", "ok", "prepared", now=105.0)
    pg_store.commit_batch()
    pg_store.db.pgconn.exec_(b"DEALLOCATE ALL")  # behind psycopg's back
    with pytest.raises(StoreError, match="prepared statement"):
        pg_store.begin_batch()
        pg_store.note(row.job_id, 1, "r1", "ok", "lost", now=106.0)
    pg_store.rollback_batch()
    pid = pg_store.db.info.backend_pid
    pg_store.begin_batch()
    pg_store.note(row.job_id, 1, "r1", "ok", "again", now=107.0)
    assert pg_store.finish(result(row), now=108.0)
    pg_store.commit_batch()
    assert pg_store.db.info.backend_pid != pid
    assert kinds(pg_store, row).count("ok") == 2 and current(pg_store, row).status == "passed"


def test_an_error_in_the_data_is_not_the_stores_even_where_psycopg_calls_it_operational(pg_store: Store) -> None:
    # An index entry over PostgreSQL's size limit (SQLSTATE 54000) is the data's
    # fault: taken for the store's, it would roll back and retry every round for ever.
    row = running(pg_store)
    pg_store.begin_batch()
    with pytest.raises(psycopg_errors().ProgramLimitExceeded):
        pg_store.note(row.job_id + random_text(1500), 1, "r1", "odd", "too long a key", now=105.0)
    assert pg_store.finish(result(row), now=106.0)  # the round goes on
    pg_store.commit_batch()
    assert current(pg_store, row).status == "passed"


def test_a_permission_the_database_refuses_is_the_stores_trouble_not_the_messages(pg_store: Store) -> None:
    # A role that may read but no longer write (a grant revoked, say): every
    # message would otherwise be dead-lettered as if it were at fault.
    import psycopg

    role = f"volt_ro_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(pg_store.url, autocommit=True) as admin:
        admin.execute(f"CREATE ROLE {role} LOGIN")
        admin.execute(f"GRANT SELECT ON ALL TABLES IN SCHEMA public TO {role}")
    try:
        base = pg_store.url.replace("postgresql://postgres@", f"postgresql://{role}@", 1)
        assert base != pg_store.url
        reader = Store(base, durable=False)
        reader.begin_batch()
        with pytest.raises(StoreError, match="permission denied"):
            reader.add_job(seen())
        reader.rollback_batch()
        reader.close()
    finally:
        with psycopg.connect(pg_store.url, autocommit=True) as admin:
            admin.execute(f"DROP OWNED BY {role}")
            admin.execute(f"DROP ROLE {role}")


def test_a_change_that_fails_on_the_server_leaves_the_connection_sound(pg_store: Store) -> None:
    # In a pipeline that an error aborts, the statements after the error are
    # skipped, a PREPARE among them too. psycopg, left to prepare a statement at
    # its sixth use, took such a PREPARE as done: every later use of that
    # statement failed ("prepared statement ... does not exist"), and with it
    # every round. The store prepares each statement at its first use instead,
    # which psycopg checks against the statement's answer.
    row = running(pg_store)
    for _ in range(8):  # the same round, tried again and again
        pg_store.begin_batch()
        with pytest.raises(psycopg_errors().ProgramLimitExceeded):
            pg_store.note(row.job_id + random_text(1500), 1, "r1", "odd", "too long a key", now=105.0)
        pg_store.rollback_batch()
    pg_store.begin_batch()
    for i in range(3):
        pg_store.note(row.job_id, 1, "r1", "ok", f"after {i}", now=106.0)
    assert pg_store.finish(result(row), now=107.0)
    pg_store.commit_batch()
    assert kinds(pg_store, row).count("ok") == 3 and current(pg_store, row).status == "passed"


def random_text(n: int) -> str:
    """CJK characters, three bytes each: random, so they do not compress to fit an index entry."""
    rnd = random.Random(7)
    return "".join(chr(rnd.randrange(0x4E00, 0x9FFF)) for _ in range(n))


def psycopg_errors() -> Any:
    import psycopg

    return psycopg.errors


def test_a_password_in_the_database_url_is_never_shown() -> None:
    with pytest.raises(StoreError) as caught:
        Store("postgresql://volt:hunter2@127.0.0.1:1/volt")
    assert "hunter2" not in str(caught.value)
    assert "postgresql://volt:***@127.0.0.1:1/volt" in str(caught.value)


def test_a_nul_in_a_log_is_kept_as_a_replacement_character(store: Store) -> None:
    row = running(store)
    assert store.finish(result(row, log_head="a\0b", log_tail="t"), now=110.0)
    assert store.log(row.job_id)["head"] in ("a\0b", "a\ufffdb")  # type: ignore[index]


def test_unassign_leaves_a_started_job_alone(store: Store) -> None:
    row = running(store)
    assert not store.unassign(row.job_id, row.lease, "refused", "late", now=3.0)
    assert current(store, row).state == "running"


# -- logs -------------------------------------------------------------------


def test_log_round_trips_the_compressed_full_log(store: Store) -> None:
    text = "".join(f"line {i} ✓ ok\n" for i in range(20_000))
    row = running(store)
    done = result(
        row, log_head=text[:100], log_tail=text[-100:], log_bytes=len(text.encode()), log_full=packed_log(text)
    )
    assert store.finish(done, now=110.0)
    log = store.log(row.job_id)
    assert log == {"head": text[:100], "tail": text[-100:], "bytes": len(text.encode()), "full": text}


def test_log_without_full_log(store: Store) -> None:
    row = running(store)
    assert store.finish(result(row, log_head="h", log_tail="t", log_bytes=10**9), now=110.0)
    assert store.log(row.job_id) == {"head": "h", "tail": "t", "bytes": 10**9, "full": None}


def test_log_of_unknown_job(store: Store) -> None:
    assert store.log("nope") is None


def test_a_late_result_does_not_replace_the_log(store: Store) -> None:
    row = running(store)
    assert store.finish(result(row, log_full=packed_log("winner")), now=110.0)
    assert not store.finish(result(row, log_full=packed_log("loser")), now=111.0)
    assert store.log(row.job_id)["full"] == "winner"  # type: ignore[index]


@pytest.mark.parametrize("bad", ["abc", "!!!!", "eJzLSM3JyQcABiwCFQ==?"])
def test_a_result_with_a_broken_full_log_is_still_recorded(store: Store, bad: str) -> None:
    row = running(store)
    assert store.finish(result(row, log_head="h", log_full=bad), now=110.0)
    assert current(store, row).status == "passed"
    assert store.log(row.job_id) == {"head": "h", "tail": "", "bytes": 0, "full": None}


@pytest.mark.parametrize("blob", [b"not zlib at all", zlib.compress(b"x" * 1000)[:-6]])
def test_a_corrupt_stored_log_reads_as_missing(store: Store, blob: bytes) -> None:
    row = running(store)
    assert store.finish(result(row, log_full=base64.b64encode(blob).decode()), now=110.0)
    assert store.log(row.job_id)["full"] is None  # type: ignore[index]


def test_a_log_that_inflates_too_far_reads_as_missing(store: Store, monkeypatch: pytest.MonkeyPatch) -> None:
    # A few MB of compressed zeros can inflate to gigabytes in the dispatcher.
    monkeypatch.setattr(store_module, "LOG_FULL_MAX_BYTES", 1024 * 1024)
    bomb = base64.b64encode(zlib.compress(b"\0" * (2 * 1024 * 1024), 9)).decode()
    fits = packed_log("y" * (1024 * 1024))
    big, small = running(store, SHA_A), running(store, SHA_B)
    assert store.finish(result(big, log_full=bomb), now=110.0)
    assert store.finish(result(small, log_full=fits), now=110.0)
    assert store.log(big.job_id)["full"] is None  # type: ignore[index]
    assert store.log(small.job_id)["full"] == "y" * (1024 * 1024)  # type: ignore[index]


# -- queries ----------------------------------------------------------------


def test_find_filters_and_orders_newest_first(store: Store) -> None:
    old = store.add_job(seen(SHA_A, at=10.0))
    mid = store.add_job(seen(SHA_B, at=20.0, branch="dev"))
    new = store.add_job(seen(SHA_C, at=30.0))
    other = store.add_job(seen(SHA_A, at=40.0, repo="/srv/git/other"))

    def ids(rows: list[JobRow]) -> list[str]:
        return [r.job_id for r in rows]

    assert ids(store.find()) == [other.job_id, new.job_id, mid.job_id, old.job_id]
    assert ids(store.find(repo=REPO)) == [new.job_id, mid.job_id, old.job_id]
    assert ids(store.find(branch="dev")) == [mid.job_id]
    assert ids(store.find(repo=REPO, branch="main")) == [new.job_id, old.job_id]
    assert ids(store.find(commit="aaaa")) == [other.job_id, old.job_id]
    assert ids(store.find(commit="C0FFEE")) == [new.job_id]  # prefix, any case
    assert ids(store.find(commit=SHA_A, repo=REPO)) == [old.job_id]
    assert ids(store.find(commit="ffff")) == []
    assert ids(store.find(limit=2)) == [other.job_id, new.job_id]


def test_find_done_only(store: Store) -> None:
    store.add_job(seen(SHA_A))
    row = running(store, SHA_B)
    assert store.find(done_only=True) == []
    assert store.finish(result(row), now=110.0)
    assert [r.job_id for r in store.find(done_only=True)] == [row.job_id]


def test_in_state_is_oldest_first(store: Store) -> None:
    late = store.add_job(seen(SHA_A, at=50.0))
    early = store.add_job(seen(SHA_B, at=5.0))
    assert [r.job_id for r in store.in_state("pending")] == [early.job_id, late.job_id]
    assert store.in_state("running") == []


def test_everything_survives_reopening(store: Store, db_path: Path | str) -> None:
    row = running(store)
    assert store.finish(result(row, status="timeout", reason="slow", log_full=packed_log("log")), now=110.0)
    store.close()
    reopened = Store(db_path)
    try:
        again = reopened.get(row.job_id)
        assert again is not None
        assert (again.state, again.status, again.reason) == ("done", "timeout", "slow")
        assert reopened.log(row.job_id)["full"] == "log"  # type: ignore[index]
        assert kinds(reopened, row) == ["assigned", "started", "result"]
    finally:
        reopened.close()


# -- group commit -----------------------------------------------------------


def test_a_batch_is_durable_only_once_committed(store: Store, db_path: Path | str) -> None:
    reader = Store(db_path, readonly=True)
    try:
        store.begin_batch()
        first = queued(store)
        assert reader.get(first.job_id) is None  # not committed: another connection cannot see it
        store.checkpoint()
        assert reader.get(first.job_id) is not None
        second = queued(store, SHA_B)
        assert reader.get(second.job_id) is None
        store.commit_batch()
        assert reader.get(second.job_id) is not None
        store.commit_batch()  # nothing open: nothing to do
    finally:
        reader.close()


def test_a_failed_change_in_a_batch_undoes_only_itself(store: Store, monkeypatch: pytest.MonkeyPatch) -> None:
    store.begin_batch()
    kept = queued(store)

    def broken(*args: Any, **kwargs: Any) -> None:
        raise RuntimeError("disk on fire")

    monkeypatch.setattr(store, "_event_where", broken)
    with pytest.raises(RuntimeError):
        store.assign(kept.job_id, 1, "r1", now=2.0)  # its UPDATE ran, then its event failed
    monkeypatch.undo()
    store.commit_batch()
    assert current(store, kept).state == "queued"
    assert store.assign(kept.job_id, 1, "r1", now=3.0)


def test_a_batch_keeps_the_same_steps_answers_and_history_as_changes_on_their_own(store: Store) -> None:
    # In a batch each change is a savepoint (on PostgreSQL a pipeline, whose
    # statements are answered together): what each step returns, and what it
    # notes, must not depend on that.
    store.begin_batch()
    row = store.add_job(seen())
    assert store.add_job(seen()).job_id == row.job_id  # a duplicate commit: the same job
    store.mark_all_queued([(row.job_id, 1), ("no-such-job", 1)], now=101.0)
    assert not store.assign(row.job_id, 2, "r1", now=101.5)  # wrong attempt
    lease = store.assign(row.job_id, 1, "r1", now=102.0)
    assert lease and not store.assign(row.job_id, 1, "r2", now=102.5)
    assert store.start(row.job_id, lease, "r2", "s2", started_at=103.0, now=103.0) is None  # not its runner
    assert store.start(row.job_id, lease, "r1", "s1", started_at=103.0, now=103.5) == 101.0
    assert store.start(row.job_id, lease, "r1", "s1", started_at=103.0, now=103.6) is None  # said again
    done = current(store, row)
    assert store.finish(result(done), now=110.0)
    assert not store.finish(result(done, status="failed"), now=111.0)
    store.commit_batch()
    row = current(store, row)
    assert (row.state, row.status, row.runner, row.queued_at, row.started_at) == ("done", "passed", "r1", 101.0, 103.0)
    assert kinds(store, row) == ["assigned", "started", "result", "late_result"]
    assert [(e["attempt"], e["runner"]) for e in store.events(row.job_id)][:2] == [(1, "r1"), (1, "r1")]
    assert store.count_by_state() == {"done": 1}


def test_an_error_the_database_raises_in_a_batch_undoes_only_its_own_change(store: Store) -> None:
    store.begin_batch()
    before = queued(store, SHA_A)
    victim = running(store, SHA_B)
    # A count no 64-bit column holds: refused by the database itself on PostgreSQL
    # (on a statement already on its way), by the driver on SQLite. Either way it
    # is the message's fault, not the store's: not a StoreError.
    with pytest.raises(Exception) as caught:
        store.finish(result(victim, passed=2**70), now=110.0)
    assert not isinstance(caught.value, StoreError)
    after = store.add_job(seen(SHA_C))
    store.commit_batch()
    victim = current(store, victim)
    assert (victim.state, victim.status) == ("running", None)
    assert kinds(store, victim) == ["assigned", "started"]
    assert current(store, before).state == "queued"
    assert current(store, after).state == "pending"
    assert store.finish(result(victim), now=112.0)  # the next result of that job is taken


def test_a_results_tests_are_kept_on_both_databases(store: Store) -> None:
    row = running(store)
    tests = [["t::a", "passed", 0.5], ["t::b", "failed", 1.5], ["t::c", "bogus", 1.0]]
    assert store.finish(result(row, status="failed", tests=tests), now=104.0)
    assert [(t.node_id, t.outcome, t.duration_s) for t in store.tests(row.job_id)] == [
        ("t::a", "passed", 0.5),
        ("t::b", "failed", 1.5),
    ]


def test_node_ids_too_long_for_an_index_entry_are_kept_as_distinct_bounded_keys(store: Store) -> None:
    # 1000 CJK characters are 3000 bytes: more than one index entry takes on
    # PostgreSQL. The test is still recorded, and one that begins alike stays apart.
    long_a = "tests/test_x.py::test_" + random_text(1000)
    long_b = long_a + "_b"
    row = running(store)
    tests = [[long_a, "failed", 1.0], [long_b, "passed", 2.0], ["t::short", "passed", 0.1]]
    assert store.finish(result(row, status="failed", tests=tests), now=104.0)
    kept = {t.node_id: t.outcome for t in store.tests(row.job_id)}
    assert len(kept) == 3 and kept["t::short"] == "passed"
    assert kept[node_key(long_a)] == "failed" and kept[node_key(long_b)] == "passed"
    assert all(len(k.encode()) <= NODE_KEY_BYTES for k in kept)
    assert node_key(node_key(long_a)) == node_key(long_a) and node_key("t::short") == "t::short"
    assert node_key(long_a).startswith(long_a[:300])
    # Asked for by its whole id, its history is found.
    assert [r.outcome for r in store.test_runs(REPO, "main", [long_a])[long_a]] == ["failed"]


# -- test history ---------------------------------------------------------------

NODE = "tests/test_app.py::test_parse"


def sha(i: int) -> str:
    return f"{i:040x}"


def test_a_tests_runs_are_read_from_the_runs_newest_first_never_from_shards(store: Store) -> None:
    finished_job(store, REPO, "main", sha(1), 100.0, tests=[(NODE, "passed", 1.0)], subject="one")
    run = finished_job(store, REPO, "main", sha(2), 200.0, "failed", [(NODE, "failed", 2.0)], subject="two", split=2)
    finished_job(store, REPO, "main", sha(3), 300.0, "failed", [(NODE, "error", 3.0)], subject="three")
    finished_job(store, REPO, "dev", sha(4), 400.0, tests=[(NODE, "passed", 4.0)])  # another branch
    finished_job(store, "/srv/git/other", "main", sha(5), 500.0, tests=[(NODE, "passed", 5.0)])
    # A shard's own rows are not results: a stray one (a shard's result that carried tests) is not read.
    shard = store.shards(run.job_id)[0]  # the one that ran; the other ended, not needed
    assert shard.status == "passed" and shard.parent == run.job_id
    with store._tx() as db:
        store._record_tests(db, shard.job_id, [[NODE, "passed", 9.0]], chunk=-1, runner="r1")

    runs = store.test_runs(REPO, "main", [NODE, "tests/test_app.py::never_ran"])
    assert [(r.commit_sha, r.outcome, r.duration_s, r.subject) for r in runs[NODE]] == [
        (sha(3), "error", 3.0, "three"),
        (sha(2), "failed", 2.0, "two"),
        (sha(1), "passed", 1.0, "one"),
    ]
    assert runs[NODE][1].job_id == run.job_id
    assert runs["tests/test_app.py::never_ran"] == []
    assert [r.commit_sha for r in store.test_runs(REPO, "main", [NODE], jobs=2)[NODE]] == [sha(3), sha(2)]


def test_flaky_tests_are_counted_over_the_last_jobs_most_often_first(store: Store) -> None:
    for i in range(6):
        tests = [(NODE, "flaky" if i % 2 else "passed", 1.0), ("t::b", "flaky" if i < 3 else "passed", 1.0)]
        finished_job(store, REPO, "main" if i < 5 else "dev", sha(i), 100.0 + i, tests=tests, split=2 if i == 4 else 1)
    finished_job(store, "/srv/git/other", "main", sha(9), 900.0, tests=[(NODE, "flaky", 1.0)])
    running(store, sha(10))  # not finished: not one of the jobs looked at
    assert store.flaky_tests(REPO, None, 100) == (6, [("t::b", 3), (NODE, 3)])
    assert store.flaky_tests(REPO, "main", 100) == (5, [("t::b", 3), (NODE, 2)])
    # The last 3 of the repository: 5 (dev), 4 and 3.
    assert store.flaky_tests(REPO, None, 3) == (3, [(NODE, 2)])
