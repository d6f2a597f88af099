"""Job state in SQLite: the dispatcher's source of truth.

A job moves pending -> queued -> assigned -> running -> done. `pending` means
"needs a message in the backlog queue"; it becomes `queued` once that publish
is confirmed, so a crash in between is repaired by re-publishing the pending
jobs at start-up. A job that no free runner can take (its labels, or a runner
queue that vanished) leaves the backlog queue and waits here as `parked`, so
it does not block the jobs behind it. Every change is one transaction, or
one savepoint of a batch that commits a round of changes at once.
"""

from __future__ import annotations

import base64
import hashlib
import json
import sqlite3
import time
import zlib
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from common.messages import CommitSeen, Job, JobResult

ACTIVE = ("assigned", "running")
# The most a stored full log may inflate to when read back; above that only
# head and tail are shown.
LOG_FULL_MAX_BYTES = 64 * 1024 * 1024

SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    job_id      TEXT PRIMARY KEY,
    repo        TEXT NOT NULL,
    branch      TEXT NOT NULL,
    commit_sha  TEXT NOT NULL,
    state       TEXT NOT NULL,
    attempt     INTEGER NOT NULL DEFAULT 1,
    failures    INTEGER NOT NULL DEFAULT 0,
    runner      TEXT,
    session     TEXT,
    seen_at     REAL NOT NULL,
    queued_at   REAL,
    assigned_at REAL,
    started_at  REAL,
    finished_at REAL,
    status      TEXT,
    exit_code   INTEGER,
    passed      INTEGER NOT NULL DEFAULT 0,
    failed      INTEGER NOT NULL DEFAULT 0,
    errors      INTEGER NOT NULL DEFAULT 0,
    skipped     INTEGER NOT NULL DEFAULT 0,
    duration_s  REAL,
    reason      TEXT NOT NULL DEFAULT '',
    log_head    TEXT NOT NULL DEFAULT '',
    log_tail    TEXT NOT NULL DEFAULT '',
    log_bytes   INTEGER NOT NULL DEFAULT 0,
    log_full    BLOB,
    labels      TEXT NOT NULL DEFAULT '[]'
);
CREATE INDEX IF NOT EXISTS jobs_state ON jobs(state);
CREATE INDEX IF NOT EXISTS jobs_seen ON jobs(seen_at);
CREATE INDEX IF NOT EXISTS jobs_commit ON jobs(commit_sha);
CREATE TABLE IF NOT EXISTS events (
    id       INTEGER PRIMARY KEY,
    job_id   TEXT NOT NULL,
    attempt  INTEGER NOT NULL,
    runner   TEXT,
    kind     TEXT NOT NULL,
    status   TEXT,
    reason   TEXT NOT NULL DEFAULT '',
    at       REAL NOT NULL,
    detail   TEXT
);
CREATE INDEX IF NOT EXISTS events_job ON events(job_id);
"""


def job_id_for(repo: str, branch: str, commit: str) -> str:
    """Stable id: the same commit on the same branch of the same repo is one job."""
    return hashlib.sha1(f"{repo}\0{branch}\0{commit}".encode()).hexdigest()[:16]


@dataclass(frozen=True)
class JobRow:
    job_id: str
    repo: str
    branch: str
    commit_sha: str
    state: str
    attempt: int
    failures: int
    runner: str | None
    session: str | None
    seen_at: float
    queued_at: float | None
    assigned_at: float | None
    started_at: float | None
    finished_at: float | None
    status: str | None
    exit_code: int | None
    passed: int
    failed: int
    errors: int
    skipped: int
    duration_s: float | None
    reason: str
    labels_json: str

    @property
    def labels(self) -> list[str]:
        return list(json.loads(self.labels_json))

    def as_job(self) -> Job:
        return Job(
            job_id=self.job_id,
            attempt=self.attempt,
            repo=self.repo,
            branch=self.branch,
            commit=self.commit_sha,
            labels=self.labels,
        )


_ROW_COLUMNS = ", ".join(JobRow.__dataclass_fields__).replace("labels_json", "labels")


class Store:
    def __init__(self, path: Path | str, durable: bool = True, readonly: bool = False) -> None:
        self.path = str(path)
        self._batch = False
        if readonly:
            # A reader for another thread (the web page): WAL lets it read while
            # the owner writes; it creates and changes nothing.
            self.db = sqlite3.connect(f"{Path(path).resolve().as_uri()}?mode=ro", uri=True, isolation_level=None)
            self.db.execute("PRAGMA busy_timeout=5000")
            return
        self.db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        self.db.execute("PRAGMA journal_mode=WAL")
        # FULL: a job or result we acked to RabbitMQ must survive a power cut,
        # not only a process crash.
        self.db.execute(f"PRAGMA synchronous={'FULL' if durable else 'NORMAL'}")
        self.db.execute("PRAGMA busy_timeout=5000")
        self.db.executescript(SCHEMA)
        self._migrate()

    def _migrate(self) -> None:
        """Bring a store written by an older Volt CI up to this schema."""
        columns = {r[1] for r in self.db.execute("PRAGMA table_info(jobs)")}
        if "labels" not in columns:
            self.db.execute("ALTER TABLE jobs ADD COLUMN labels TEXT NOT NULL DEFAULT '[]'")

    def close(self) -> None:
        self.commit_batch()
        self.db.close()

    # -- group commit ----------------------------------------------------
    #
    # Outside a batch every change is its own transaction. Inside one (the
    # dispatcher opens a batch per round of messages) each change is a
    # savepoint, and one COMMIT, one fsync, makes the whole round durable.
    # The caller acks the round's messages only after that commit.

    def begin_batch(self) -> None:
        if not self._batch:
            self.db.execute("BEGIN IMMEDIATE")
            self._batch = True

    def commit_batch(self) -> None:
        if self._batch:
            self._batch = False
            self.db.execute("COMMIT")

    def checkpoint(self) -> None:
        """Make the batch so far durable and go on batching."""
        if self._batch:
            self.db.execute("COMMIT")
            self.db.execute("BEGIN IMMEDIATE")

    @contextmanager
    def _tx(self) -> Iterator[sqlite3.Connection]:
        if self._batch:
            self.db.execute("SAVEPOINT change")
            try:
                yield self.db
            except BaseException:
                self.db.execute("ROLLBACK TO change")
                self.db.execute("RELEASE change")
                raise
            self.db.execute("RELEASE change")
            return
        self.db.execute("BEGIN IMMEDIATE")
        try:
            yield self.db
        except BaseException:
            self.db.execute("ROLLBACK")
            raise
        self.db.execute("COMMIT")

    # -- reads ------------------------------------------------------------

    def get(self, job_id: str) -> JobRow | None:
        row = self.db.execute(f"SELECT {_ROW_COLUMNS} FROM jobs WHERE job_id = ?", (job_id,)).fetchone()
        return JobRow(*row) if row else None

    def in_state(self, *states: str) -> list[JobRow]:
        marks = ",".join("?" * len(states))
        rows = self.db.execute(
            f"SELECT {_ROW_COLUMNS} FROM jobs WHERE state IN ({marks}) ORDER BY seen_at", states
        ).fetchall()
        return [JobRow(*r) for r in rows]

    def busy_runners(self) -> set[str]:
        rows = self.db.execute("SELECT runner FROM jobs WHERE state IN ('assigned', 'running')")
        return {r[0] for r in rows}

    def count_by_state(self) -> dict[str, int]:
        return dict(self.db.execute("SELECT state, COUNT(*) FROM jobs GROUP BY state").fetchall())

    def count_by_status(self) -> dict[str, int]:
        rows = self.db.execute("SELECT status, COUNT(*) FROM jobs WHERE state = 'done' GROUP BY status")
        return dict(rows.fetchall())

    def events(self, job_id: str) -> list[dict[str, Any]]:
        rows = self.db.execute(
            "SELECT attempt, runner, kind, status, reason, at FROM events WHERE job_id = ? ORDER BY id",
            (job_id,),
        )
        keys = ("attempt", "runner", "kind", "status", "reason", "at")
        return [dict(zip(keys, r, strict=True)) for r in rows]

    def find(
        self,
        repo: str | None = None,
        branch: str | None = None,
        commit: str | None = None,
        limit: int = 50,
        done_only: bool = False,
    ) -> list[JobRow]:
        clause, args = _filters(repo, branch, commit, done_only)
        rows = self.db.execute(
            f"SELECT {_ROW_COLUMNS} FROM jobs {clause} ORDER BY seen_at DESC, rowid DESC LIMIT ?",
            (*args, limit),
        ).fetchall()
        return [JobRow(*r) for r in rows]

    def count(
        self, repo: str | None = None, branch: str | None = None, commit: str | None = None, done_only: bool = False
    ) -> int:
        """How many jobs find() would return without a limit."""
        clause, args = _filters(repo, branch, commit, done_only)
        return int(self.db.execute(f"SELECT COUNT(*) FROM jobs {clause}", args).fetchone()[0])

    def log(self, job_id: str, max_full_bytes: int | None = None) -> dict[str, Any] | None:
        """head, tail, bytes, and full: the whole log when it was kept and inflates to at
        most max_full_bytes (default LOG_FULL_MAX_BYTES), else None."""
        row = self.db.execute(
            "SELECT log_head, log_tail, log_bytes, log_full FROM jobs WHERE job_id = ?", (job_id,)
        ).fetchone()
        if row is None:
            return None
        head, tail, size, full = row
        return {"head": head, "tail": tail, "bytes": size, "full": _inflate(full, max_full_bytes) if full else None}

    def log_compressed(self, job_id: str) -> bytes | None:
        """The whole log as stored (zlib), for a reader that inflates it a piece at a time."""
        row = self.db.execute("SELECT log_full FROM jobs WHERE job_id = ?", (job_id,)).fetchone()
        return bytes(row[0]) if row and row[0] else None

    # -- changes ----------------------------------------------------------

    def add_job(self, seen: CommitSeen, now: float | None = None) -> JobRow:
        """Insert the job for a commit unless it exists (idempotent, delivery rule 4)."""
        job_id = job_id_for(seen.repo, seen.branch, seen.commit)
        with self._tx() as db:
            db.execute(
                "INSERT OR IGNORE INTO jobs (job_id, repo, branch, commit_sha, state, seen_at, labels)"
                " VALUES (?, ?, ?, ?, 'pending', ?, ?)",
                (
                    job_id,
                    seen.repo,
                    seen.branch,
                    seen.commit,
                    seen.seen_at or now or time.time(),
                    json.dumps(sorted(set(seen.labels))),
                ),
            )
        row = self.get(job_id)
        assert row is not None
        return row

    def mark_queued(self, job_id: str, attempt: int, now: float) -> None:
        with self._tx() as db:
            db.execute(
                "UPDATE jobs SET state = 'queued', queued_at = ? WHERE job_id = ? AND attempt = ? AND state = 'pending'",
                (now, job_id, attempt),
            )

    def assign(self, job_id: str, attempt: int, runner: str, now: float) -> bool:
        with self._tx() as db:
            cur = db.execute(
                "UPDATE jobs SET state = 'assigned', runner = ?, assigned_at = ?, session = NULL"
                " WHERE job_id = ? AND attempt = ? AND state IN ('queued', 'parked')",
                (runner, now, job_id, attempt),
            )
            if cur.rowcount:
                self._event(db, job_id, attempt, runner, "assigned", now)
        return cur.rowcount == 1

    def unassign(self, job_id: str, attempt: int, reason: str, now: float) -> None:
        """Back to waiting, same attempt: the job never reached a runner."""
        with self._tx() as db:
            db.execute(
                "UPDATE jobs SET state = 'parked', runner = NULL WHERE job_id = ? AND attempt = ? AND state = 'assigned'",
                (job_id, attempt),
            )
            self._event(db, job_id, attempt, None, "unroutable", now, reason=reason)

    def park(self, job_id: str, attempt: int, reason: str, now: float) -> bool:
        """Take a job out of the backlog queue to wait in the store for a runner
        that can take it, so it does not block the jobs behind it."""
        with self._tx() as db:
            cur = db.execute(
                "UPDATE jobs SET state = 'parked', reason = ? WHERE job_id = ? AND attempt = ? AND state = 'queued'",
                (reason, job_id, attempt),
            )
        return cur.rowcount == 1

    def start(self, job_id: str, attempt: int, runner: str, session: str, started_at: float, now: float) -> bool:
        with self._tx() as db:
            cur = db.execute(
                "UPDATE jobs SET state = 'running', session = ?, started_at = ?"
                " WHERE job_id = ? AND attempt = ? AND runner = ? AND state = 'assigned'",
                (session, started_at, job_id, attempt, runner),
            )
            if cur.rowcount:
                self._event(db, job_id, attempt, runner, "started", now)
        return cur.rowcount == 1

    def requeue(self, job_id: str, attempt: int, reason: str, now: float, *, failure: bool, max_failures: int) -> str:
        """Take an active job back from its runner.

        Returns 'pending' (it needs a new backlog message, attempt + 1),
        'error' (retry limit reached: the job ended), or 'stale'.
        """
        with self._tx() as db:
            row = db.execute("SELECT state, attempt, failures, runner FROM jobs WHERE job_id = ?", (job_id,)).fetchone()
            if row is None or row[0] not in ACTIVE or row[1] != attempt:
                return "stale"
            failures = row[2] + (1 if failure else 0)
            runner = row[3]
            self._event(db, job_id, attempt, runner, "lost" if failure else "returned", now, reason=reason)
            if failures >= max_failures:
                final = f"gave up after {failures} lost attempt(s); last: {reason}"
                db.execute(
                    "UPDATE jobs SET state = 'done', status = 'error', reason = ?, failures = ?, finished_at = ?"
                    " WHERE job_id = ?",
                    (final, failures, now, job_id),
                )
                self._event(db, job_id, attempt, runner, "result", now, status="error", reason=final)
                return "error"
            db.execute(
                "UPDATE jobs SET state = 'pending', attempt = attempt + 1, failures = ?, runner = NULL,"
                " session = NULL, assigned_at = NULL, started_at = NULL, reason = ? WHERE job_id = ?",
                (failures, f"attempt {attempt}: {reason}", job_id),
            )
            return "pending"

    def finish(self, result: JobResult, now: float) -> bool:
        """Record a result. The first terminal result of the current attempt wins;
        any other (late, duplicate, from an attempt given away) is kept as history."""
        try:
            full = base64.b64decode(result.log_full, validate=True) if result.log_full else None
        except ValueError:  # binascii.Error: a broken log must not make the result undeliverable
            full = None
        with self._tx() as db:
            cur = db.execute(
                "UPDATE jobs SET state = 'done', status = ?, exit_code = ?, passed = ?, failed = ?,"
                " errors = ?, skipped = ?, duration_s = ?, reason = ?, finished_at = ?,"
                " started_at = COALESCE(started_at, ?), log_head = ?, log_tail = ?, log_bytes = ?, log_full = ?"
                " WHERE job_id = ? AND attempt = ? AND runner = ? AND state IN ('assigned', 'running')",
                (
                    result.status,
                    result.exit_code,
                    result.passed,
                    result.failed,
                    result.errors,
                    result.skipped,
                    result.duration_s,
                    _join_reason(self._prior_reason(db, result.job_id), result.reason),
                    now,
                    result.started_at or None,
                    result.log_head,
                    result.log_tail,
                    result.log_bytes,
                    full,
                    result.job_id,
                    result.attempt,
                    result.runner_id,
                ),
            )
            accepted = cur.rowcount == 1
            detail = json.dumps(
                {k: getattr(result, k) for k in ("passed", "failed", "errors", "skipped", "duration_s", "exit_code")}
            )
            self._event(
                db,
                result.job_id,
                result.attempt,
                result.runner_id,
                "result" if accepted else "late_result",
                now,
                status=result.status,
                reason=result.reason,
                detail=detail,
            )
        return accepted

    @staticmethod
    def _prior_reason(db: sqlite3.Connection, job_id: str) -> str:
        row = db.execute("SELECT reason FROM jobs WHERE job_id = ?", (job_id,)).fetchone()
        return row[0] if row else ""

    @staticmethod
    def _event(
        db: sqlite3.Connection,
        job_id: str,
        attempt: int,
        runner: str | None,
        kind: str,
        now: float,
        *,
        status: str | None = None,
        reason: str = "",
        detail: str | None = None,
    ) -> None:
        db.execute(
            "INSERT INTO events (job_id, attempt, runner, kind, status, reason, at, detail)"
            " VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
            (job_id, attempt, runner, kind, status, reason, now, detail),
        )


def _inflate(blob: bytes, limit: int | None = None) -> str | None:
    """The stored full log as text; None when it is corrupt or inflates past `limit`
    bytes (LOG_FULL_MAX_BYTES by default; a few MB of compressed zeros can hold gigabytes)."""
    z = zlib.decompressobj()
    try:
        data = z.decompress(blob, max(1, LOG_FULL_MAX_BYTES if limit is None else limit))
    except zlib.error:
        return None
    if not z.eof:  # cut short, or more than the limit
        return None
    return data.decode("utf-8", errors="replace")


def _filters(repo: str | None, branch: str | None, commit: str | None, done_only: bool) -> tuple[str, list[str]]:
    """The WHERE clause of find() and count()."""
    where, args = [], []
    if repo:
        where.append("repo = ?")
        args.append(repo)
    if branch:
        where.append("branch = ?")
        args.append(branch)
    if commit:
        where.append("commit_sha LIKE ?")
        args.append(commit.lower() + "%")
    if done_only:
        where.append("state = 'done'")
    return (f"WHERE {' AND '.join(where)}" if where else ""), args


def _join_reason(prior: str, reason: str) -> str:
    """Keep why earlier attempts were lost beside the final reason."""
    if prior and reason:
        return f"{reason} ({prior})"
    return reason or prior
