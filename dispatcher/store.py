"""Job state in SQLite: the dispatcher's source of truth.

A job moves pending -> queued -> assigned -> running -> done. `pending` means
"needs a message in the backlog queue"; it becomes `queued` once that publish
is confirmed, so a crash in between is repaired by re-publishing the pending
jobs at start-up. A job that no free runner can take (its labels, a runner
that refused it, a runner queue that vanished) leaves the backlog queue and
waits here as `parked`, so it does not block the jobs behind it. Each
assignment gets a lease token; only messages that carry it can start, finish
or hand back that assignment. Every change is one transaction, or one
savepoint of a batch that commits a round of changes at once.

Errors of the store itself (a full disk, a locked or broken file) are raised
as StoreError: they say nothing about the message being handled, so the
caller must not treat it as a bad message.
"""

from __future__ import annotations

import base64
import fcntl
import functools
import hashlib
import json
import os
import secrets
import sqlite3
import time
import uuid
import zlib
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

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
    labels      TEXT NOT NULL DEFAULT '[]',
    lease       TEXT,
    parked_at   REAL
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
CREATE TABLE IF NOT EXISTS meta (
    key   TEXT PRIMARY KEY,
    value TEXT NOT NULL
);
"""


class StoreError(Exception):
    """The store cannot be read or written (full disk, locked, I/O error, a
    broken file): retry later; the message being handled is not at fault."""


class StoreGone(StoreError):
    """The store file was deleted or replaced under us: stop rather than write
    into a file nobody reads."""


def is_store_trouble(exc: BaseException) -> bool:
    """Whether a sqlite3 error is the store's (disk, lock, I/O, corruption)
    rather than the data's (a constraint, a value SQLite cannot take)."""
    return isinstance(exc, (sqlite3.OperationalError, sqlite3.InternalError)) or type(exc) is sqlite3.DatabaseError


_F = TypeVar("_F", bound=Callable[..., Any])


def _store_op(fn: _F) -> _F:
    """Raise the store's own trouble as StoreError."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except sqlite3.Error as exc:
            if is_store_trouble(exc):
                raise StoreError(f"store {args[0].path}: {exc}") from None
            raise

    return wrapper  # type: ignore[return-value]


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
    lease: str | None
    parked_at: float | None

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
        self._lock_file: Any = None
        if readonly:
            # A reader for another thread (the web page): WAL lets it read while
            # the owner writes; it creates and changes nothing.
            self.db = sqlite3.connect(f"{Path(path).resolve().as_uri()}?mode=ro", uri=True, isolation_level=None)
            self.db.execute("PRAGMA busy_timeout=5000")
            return
        try:
            self.db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
            self.db.execute("PRAGMA journal_mode=WAL")
            # FULL: a job or result we acked to RabbitMQ must survive a power cut,
            # not only a process crash.
            self.db.execute(f"PRAGMA synchronous={'FULL' if durable else 'NORMAL'}")
            self.db.execute("PRAGMA busy_timeout=5000")
            self.db.executescript(SCHEMA)
            self._migrate()
            # Made once, when the store is: what says, on the broker, which
            # store a namespace's dispatcher keeps its jobs in.
            # (Read first: a write would wait on the dispatcher that has it open.)
            row = self.db.execute("SELECT value FROM meta WHERE key = 'store_id'").fetchone()
            if row is None:
                self.db.execute("INSERT OR IGNORE INTO meta (key, value) VALUES ('store_id', ?)", (uuid.uuid4().hex,))
                row = self.db.execute("SELECT value FROM meta WHERE key = 'store_id'").fetchone()
            self.store_id = str(row[0])
        except sqlite3.Error as exc:
            raise StoreError(f"cannot open the store {self.path}: {exc}") from None
        self._identity = _file_identity(self.path)

    def lock(self) -> None:
        """Hold the store for this process (one writer per file): StoreError if
        another process holds it."""
        try:
            self._lock_file = open(f"{self.path}.lock", "w")  # noqa: SIM115 - held for the process's life
            fcntl.flock(self._lock_file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise StoreError(f"another dispatcher is using the store {self.path}") from None
        except OSError as exc:
            raise StoreError(f"cannot lock the store {self.path}: {exc}") from None

    def _migrate(self) -> None:
        """Bring a store written by an older Volt CI up to this schema."""
        columns = {r[1] for r in self.db.execute("PRAGMA table_info(jobs)")}
        for name, kind in (("labels", "TEXT NOT NULL DEFAULT '[]'"), ("lease", "TEXT"), ("parked_at", "REAL")):
            if name not in columns:
                self.db.execute(f"ALTER TABLE jobs ADD COLUMN {name} {kind}")

    def check_identity(self) -> None:
        """StoreGone if the file this store opened was deleted or replaced."""
        if _file_identity(self.path) != self._identity:
            raise StoreGone(f"the store {self.path} was deleted or replaced while the dispatcher ran")

    def close(self) -> None:
        try:
            self.commit_batch()
        except (StoreError, sqlite3.Error):
            self.rollback_batch()
        self.db.close()

    # -- group commit ----------------------------------------------------
    #
    # Outside a batch every change is its own transaction. Inside one (the
    # dispatcher opens a batch per round of messages) each change is a
    # savepoint, and one COMMIT, one fsync, makes the whole round durable.
    # The caller acks the round's messages only after that commit.

    @_store_op
    def begin_batch(self) -> None:
        if not self._batch:
            self.db.execute("BEGIN IMMEDIATE")
            self._batch = True

    @_store_op
    def commit_batch(self) -> None:
        if self._batch:
            self._batch = False
            try:
                self.db.execute("COMMIT")
            except sqlite3.Error:
                self._rollback()
                raise

    @_store_op
    def checkpoint(self) -> None:
        """Make the batch so far durable and go on batching."""
        if self._batch:
            try:
                self.db.execute("COMMIT")
            except sqlite3.Error:
                self._batch = False
                self._rollback()
                raise
            self.db.execute("BEGIN IMMEDIATE")

    def rollback_batch(self) -> None:
        """Drop the batch's changes (a round that failed); never raises."""
        self._batch = False
        self._rollback()

    def _rollback(self) -> None:
        # SQLite may have rolled back by itself (a full disk does that), and
        # then ROLLBACK says "no transaction is active": either way none is now.
        try:
            if self.db.in_transaction:
                self.db.execute("ROLLBACK")
        except sqlite3.Error:
            pass

    @contextmanager
    def _tx(self) -> Iterator[sqlite3.Connection]:
        if self._batch:
            self.db.execute("SAVEPOINT change")
            try:
                yield self.db
            except BaseException:
                if self.db.in_transaction:  # a full disk may have rolled it all back already
                    self.db.execute("ROLLBACK TO change")
                    self.db.execute("RELEASE change")
                raise
            self.db.execute("RELEASE change")
            return
        self.db.execute("BEGIN IMMEDIATE")
        try:
            yield self.db
            self.db.execute("COMMIT")
        except BaseException:
            self._rollback()
            raise

    # -- reads ------------------------------------------------------------

    @_store_op
    def get(self, job_id: str) -> JobRow | None:
        row = self.db.execute(f"SELECT {_ROW_COLUMNS} FROM jobs WHERE job_id = ?", (job_id,)).fetchone()
        return JobRow(*row) if row else None

    @_store_op
    def in_state(self, *states: str) -> list[JobRow]:
        marks = ",".join("?" * len(states))
        rows = self.db.execute(
            f"SELECT {_ROW_COLUMNS} FROM jobs WHERE state IN ({marks}) ORDER BY seen_at", states
        ).fetchall()
        return [JobRow(*r) for r in rows]

    @_store_op
    def busy_runners(self) -> set[str]:
        rows = self.db.execute("SELECT runner FROM jobs WHERE state IN ('assigned', 'running')")
        return {r[0] for r in rows}

    @_store_op
    def count_by_state(self) -> dict[str, int]:
        return dict(self.db.execute("SELECT state, COUNT(*) FROM jobs GROUP BY state").fetchall())

    @_store_op
    def count_by_status(self) -> dict[str, int]:
        rows = self.db.execute("SELECT status, COUNT(*) FROM jobs WHERE state = 'done' GROUP BY status")
        return dict(rows.fetchall())

    @_store_op
    def events(self, job_id: str) -> list[dict[str, Any]]:
        rows = self.db.execute(
            "SELECT attempt, runner, kind, status, reason, at FROM events WHERE job_id = ? ORDER BY id",
            (job_id,),
        )
        keys = ("attempt", "runner", "kind", "status", "reason", "at")
        return [dict(zip(keys, r, strict=True)) for r in rows]

    @_store_op
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

    @_store_op
    def count(
        self, repo: str | None = None, branch: str | None = None, commit: str | None = None, done_only: bool = False
    ) -> int:
        """How many jobs find() would return without a limit."""
        clause, args = _filters(repo, branch, commit, done_only)
        return int(self.db.execute(f"SELECT COUNT(*) FROM jobs {clause}", args).fetchone()[0])

    @_store_op
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

    @_store_op
    def log_compressed(self, job_id: str) -> bytes | None:
        """The whole log as stored (zlib), for a reader that inflates it a piece at a time."""
        row = self.db.execute("SELECT log_full FROM jobs WHERE job_id = ?", (job_id,)).fetchone()
        return bytes(row[0]) if row and row[0] else None

    # -- changes ----------------------------------------------------------

    @_store_op
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

    @_store_op
    def adopt(self, job: Job, now: float) -> JobRow:
        """Take in a backlog job this store has never seen (a store started
        empty on a namespace that has a backlog): queued, at its attempt."""
        with self._tx() as db:
            db.execute(
                "INSERT OR IGNORE INTO jobs (job_id, repo, branch, commit_sha, state, attempt, seen_at, queued_at, labels)"
                " VALUES (?, ?, ?, ?, 'queued', ?, ?, ?, ?)",
                (job.job_id, job.repo, job.branch, job.commit, job.attempt, now, now, json.dumps(sorted(job.labels))),
            )
            self._event(db, job.job_id, job.attempt, None, "adopted", now, reason="found in the backlog")
        row = self.get(job.job_id)
        assert row is not None
        return row

    @_store_op
    def mark_queued(self, job_id: str, attempt: int, now: float) -> None:
        with self._tx() as db:
            db.execute(
                "UPDATE jobs SET state = 'queued', queued_at = ? WHERE job_id = ? AND attempt = ? AND state = 'pending'",
                (now, job_id, attempt),
            )

    @_store_op
    def assign(self, job_id: str, attempt: int, runner: str, now: float) -> str | None:
        """Give a waiting job to a runner; returns the new lease token, or None."""
        lease = secrets.token_hex(16)
        with self._tx() as db:
            cur = db.execute(
                "UPDATE jobs SET state = 'assigned', runner = ?, assigned_at = ?, session = NULL, lease = ?"
                " WHERE job_id = ? AND attempt = ? AND state IN ('queued', 'parked')",
                (runner, now, lease, job_id, attempt),
            )
            if cur.rowcount:
                self._event(db, job_id, attempt, runner, "assigned", now)
        return lease if cur.rowcount == 1 else None

    @_store_op
    def unassign(self, job_id: str, lease: str, kind: str, reason: str, now: float) -> bool:
        """Back to waiting, same attempt: the assignment never ran (refused by
        its runner, or its queue was gone)."""
        with self._tx() as db:
            row = db.execute(
                "SELECT attempt, runner FROM jobs WHERE job_id = ? AND lease = ? AND state = 'assigned'",
                (job_id, lease),
            ).fetchone()
            if row is None:
                return False
            db.execute(
                "UPDATE jobs SET state = 'parked', runner = NULL, session = NULL, lease = NULL, parked_at = ?,"
                " reason = ? WHERE job_id = ?",
                (now, reason, job_id),
            )
            self._event(db, job_id, row[0], row[1], kind, now, reason=reason)
        return True

    @_store_op
    def park(self, job_id: str, attempt: int, reason: str, now: float) -> bool:
        """Take a job out of the backlog queue to wait in the store for a runner
        that can take it, so it does not block the jobs behind it."""
        with self._tx() as db:
            cur = db.execute(
                "UPDATE jobs SET state = 'parked', reason = ?, parked_at = ?"
                " WHERE job_id = ? AND attempt = ? AND state = 'queued'",
                (reason, now, job_id, attempt),
            )
        return cur.rowcount == 1

    @_store_op
    def start(self, job_id: str, lease: str, runner: str, session: str, started_at: float, now: float) -> bool:
        with self._tx() as db:
            cur = db.execute(
                "UPDATE jobs SET state = 'running', session = ?, started_at = ?"
                " WHERE job_id = ? AND lease = ? AND runner = ? AND state = 'assigned'",
                (session, started_at, job_id, lease, runner),
            )
            if cur.rowcount:
                row = db.execute("SELECT attempt FROM jobs WHERE job_id = ?", (job_id,)).fetchone()
                self._event(db, job_id, row[0], runner, "started", now)
        return cur.rowcount == 1

    @_store_op
    def requeue(self, job_id: str, lease: str, reason: str, now: float, *, failure: bool, max_failures: int) -> str:
        """Take an active job back from its runner.

        Returns 'pending' (it needs a new backlog message, attempt + 1),
        'error' (retry limit reached: the job ended), or 'stale' (the lease is
        not the job's current one).
        """
        with self._tx() as db:
            row = db.execute(
                "SELECT state, attempt, failures, runner, lease FROM jobs WHERE job_id = ?", (job_id,)
            ).fetchone()
            if row is None or row[0] not in ACTIVE or row[4] != lease:
                return "stale"
            attempt = row[1]
            failures = row[2] + (1 if failure else 0)
            runner = row[3]
            self._event(db, job_id, attempt, runner, "lost" if failure else "returned", now, reason=reason)
            if failures >= max_failures:
                final = f"gave up after {failures} lost attempt(s); last: {reason}"
                db.execute(
                    "UPDATE jobs SET state = 'done', status = 'error', reason = ?, failures = ?, finished_at = ?,"
                    " lease = NULL WHERE job_id = ?",
                    (final, failures, now, job_id),
                )
                self._event(db, job_id, attempt, runner, "result", now, status="error", reason=final)
                return "error"
            db.execute(
                "UPDATE jobs SET state = 'pending', attempt = attempt + 1, failures = ?, runner = NULL,"
                " session = NULL, lease = NULL, assigned_at = NULL, started_at = NULL, reason = ? WHERE job_id = ?",
                (failures, f"attempt {attempt}: {reason}", job_id),
            )
            return "pending"

    @_store_op
    def note(self, job_id: str, attempt: int, runner: str | None, kind: str, reason: str, now: float) -> None:
        """Keep something that happened to a job as history only."""
        with self._tx() as db:
            self._event(db, job_id, attempt, runner, kind, now, reason=reason)

    @_store_op
    def expire_parked(self, job_id: str, reason: str, now: float) -> bool:
        """End a job that waited too long for a runner that can take it, as error."""
        with self._tx() as db:
            cur = db.execute(
                "UPDATE jobs SET state = 'done', status = 'error', reason = ?, finished_at = ?"
                " WHERE job_id = ? AND state = 'parked'",
                (reason, now, job_id),
            )
            if cur.rowcount:
                row = db.execute("SELECT attempt FROM jobs WHERE job_id = ?", (job_id,)).fetchone()
                self._event(db, job_id, row[0], None, "result", now, status="error", reason=reason)
        return cur.rowcount == 1

    @_store_op
    def finish(self, result: JobResult, now: float) -> bool:
        """Record a result. Only the first terminal result of the job's current
        assignment (its lease) wins; any other (late, duplicate, from an
        assignment given away, or forged) is kept as history."""
        try:
            full = base64.b64decode(result.log_full, validate=True) if result.log_full else None
        except ValueError:  # binascii.Error: a broken log must not make the result undeliverable
            full = None
        with self._tx() as db:
            cur = db.execute(
                "UPDATE jobs SET state = 'done', status = ?, exit_code = ?, passed = ?, failed = ?,"
                " errors = ?, skipped = ?, duration_s = ?, reason = ?, finished_at = ?,"
                " started_at = COALESCE(started_at, ?), log_head = ?, log_tail = ?, log_bytes = ?, log_full = ?,"
                " lease = NULL"
                " WHERE job_id = ? AND lease = ? AND runner = ? AND state IN ('assigned', 'running')",
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
                    result.lease,
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


def _file_identity(path: str) -> tuple[int, int] | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_dev, st.st_ino


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
