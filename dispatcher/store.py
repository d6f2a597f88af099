"""Job state in SQLite or PostgreSQL: the dispatcher's source of truth.

A job moves pending -> queued -> assigned -> running -> done. `pending` means
"needs a message in the backlog queue"; it becomes `queued` once that publish
is confirmed, so a crash in between is repaired by re-publishing the pending
jobs at start-up. A job that no free runner can take (its labels, a runner
that refused it, a runner queue that vanished) leaves the backlog queue and
waits here as `parked`, so it does not block the jobs behind it. Each
assignment gets a lease token; only messages that carry it can start, finish
or hand back that assignment. Every change is one transaction, or one
savepoint of a batch that commits a round of changes at once; on PostgreSQL
a batch's change goes to the server as one pipeline (one round trip), so a
change reads what it must know after its statements, not between them.

Both databases run the same SQL, the same schema and the same migrations;
what differs between them (connecting, column types, placeholders, which
errors are the database's own trouble) is a `Dialect`. SQLite is a file for
one dispatcher; PostgreSQL is shared by standby dispatchers, of which the
one holding the lease row (`dispatcher_lease`, with a fencing term) writes:
with a fence set, every commit checks and renews the lease in the same
transaction, so a dispatcher that lost it (a long pause) commits nothing.

Errors of the store itself (a full disk, a locked or broken file, a database
that went away) are raised as StoreError: they say nothing about the message
being handled, so the caller must not treat it as a bad message.
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
from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from common.messages import TEST_OUTCOMES, CommitSeen, Job, JobResult
from common.settings import redact_url

ACTIVE = ("assigned", "running")
# Tests kept per job, and characters of a node id.
MAX_TESTS = 100_000
MAX_NODE_ID = 4000
# The most bytes of a node id kept whole as a key (node_key): far below what
# one index entry may hold on PostgreSQL (about 2,700 bytes).
NODE_KEY_BYTES = 1000
# Characters of a commit's subject and author kept.
MAX_SUBJECT = 200
# A test's history reaches back this many finished jobs of its branch.
HISTORY_JOBS = 1000
# The most a stored full log may inflate to when read back; above that only
# head and tail are shown.
LOG_FULL_MAX_BYTES = 64 * 1024 * 1024
# How long a PostgreSQL session may sit in an open transaction: a dispatcher
# paused mid-round would otherwise hold its rows (and block its successor) for
# as long as the pause lasts.
IDLE_IN_TRANSACTION_S = 10
# How long a dispatcher waits for a row another one holds before it gives up
# the statement (and retries it later): a standby asking for the lease must
# not hang on a paused predecessor.
LOCK_TIMEOUT_S = 2

# The schema, written once for both databases: {int} is a 64-bit integer,
# {real} a double, {blob} bytes, {id} an auto-numbered key, and {seq} the
# insertion order (SQLite's rowid; PostgreSQL needs a column for it).
SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    job_id      TEXT PRIMARY KEY,
    repo        TEXT NOT NULL,
    branch      TEXT NOT NULL,
    commit_sha  TEXT NOT NULL,
    state       TEXT NOT NULL,
    attempt     {int} NOT NULL DEFAULT 1,
    failures    {int} NOT NULL DEFAULT 0,
    runner      TEXT,
    session     TEXT,
    seen_at     {real} NOT NULL,
    queued_at   {real},
    assigned_at {real},
    started_at  {real},
    finished_at {real},
    status      TEXT,
    exit_code   {int},
    passed      {int} NOT NULL DEFAULT 0,
    failed      {int} NOT NULL DEFAULT 0,
    errors      {int} NOT NULL DEFAULT 0,
    skipped     {int} NOT NULL DEFAULT 0,
    duration_s  {real},
    reason      TEXT NOT NULL DEFAULT '',
    log_head    TEXT NOT NULL DEFAULT '',
    log_tail    TEXT NOT NULL DEFAULT '',
    log_bytes   {int} NOT NULL DEFAULT 0,
    log_full    {blob},
    labels      TEXT NOT NULL DEFAULT '[]',
    lease       TEXT,
    parked_at   {real}{seq}
);
CREATE INDEX IF NOT EXISTS jobs_state ON jobs(state);
CREATE INDEX IF NOT EXISTS jobs_seen ON jobs(seen_at);
CREATE INDEX IF NOT EXISTS jobs_commit ON jobs(commit_sha);
CREATE TABLE IF NOT EXISTS events (
    id       {id},
    job_id   TEXT NOT NULL,
    attempt  {int} NOT NULL,
    runner   TEXT,
    kind     TEXT NOT NULL,
    status   TEXT,
    reason   TEXT NOT NULL DEFAULT '',
    at       {real} NOT NULL,
    detail   TEXT
);
CREATE INDEX IF NOT EXISTS events_job ON events(job_id)
"""

# Each migration takes a store of the version before it to its own version.
# Version 1 is SCHEMA as it was before versions were kept (older SQLite
# files are brought to it by _catch_up_columns first).
MIGRATIONS: tuple[tuple[int, str], ...] = (
    (
        2,
        """
CREATE TABLE IF NOT EXISTS dispatcher_lease (
    id          {int} PRIMARY KEY,
    holder      TEXT NOT NULL DEFAULT '',
    term        {int} NOT NULL DEFAULT 0,
    expires_at  {real} NOT NULL DEFAULT 0,
    acquired_at {real} NOT NULL DEFAULT 0
);
INSERT INTO dispatcher_lease (id) VALUES (1) ON CONFLICT DO NOTHING
""",
    ),
    (
        # The store's own id, made once: what says, on the broker, which store
        # a namespace's dispatcher keeps its jobs in (Dispatcher._claim_namespace).
        3,
        """
CREATE TABLE IF NOT EXISTS meta (
    key   TEXT PRIMARY KEY,
    value TEXT NOT NULL
)
""",
    ),
    (
        # Per-test results, split runs (dispatcher/runs.py), and what a person
        # reading the results looks for first: the commit's subject and author
        # (the jobs table's new columns are in LATER_COLUMNS).
        4,
        """
CREATE INDEX IF NOT EXISTS jobs_parent ON jobs(parent);
CREATE INDEX IF NOT EXISTS jobs_branch ON jobs(repo, branch, seen_at);
CREATE TABLE IF NOT EXISTS test_results (
    job_id     TEXT NOT NULL,
    node_id    TEXT NOT NULL,
    outcome    TEXT NOT NULL,
    duration_s {real} NOT NULL DEFAULT 0,
    runs       {int} NOT NULL DEFAULT 1,
    chunk      {int} NOT NULL DEFAULT -1,
    runner     TEXT,
    PRIMARY KEY (job_id, node_id)
);
CREATE INDEX IF NOT EXISTS test_results_node ON test_results(node_id);
CREATE TABLE IF NOT EXISTS runs (
    job_id       TEXT PRIMARY KEY,
    digest       TEXT,
    collected    {int} NOT NULL DEFAULT 0,
    collected_by TEXT,
    quit         TEXT NOT NULL DEFAULT '[]'
);
CREATE TABLE IF NOT EXISTS chunk_results (
    job_id  TEXT NOT NULL,
    chunk   {int} NOT NULL,
    node_id TEXT NOT NULL,
    PRIMARY KEY (job_id, chunk, node_id)
);
CREATE TABLE IF NOT EXISTS chunk_asks (
    lease TEXT PRIMARY KEY,
    seq   {int} NOT NULL
);
CREATE TABLE IF NOT EXISTS chunks (
    job_id  TEXT NOT NULL,
    chunk   {int} NOT NULL,
    tests   TEXT NOT NULL,
    est_s   {real} NOT NULL DEFAULT 0,
    state   TEXT NOT NULL DEFAULT 'pending',
    lease   TEXT,
    seq     {int},
    avoid   TEXT,
    rerun   {int} NOT NULL DEFAULT 0,
    PRIMARY KEY (job_id, chunk)
)
""",
    ),
)
SCHEMA_VERSION = MIGRATIONS[-1][0]
# Columns added to the jobs table after SCHEMA was first written: added where
# missing (a column cannot be added twice, and SQLite has no IF NOT EXISTS).
LATER_COLUMNS = (
    ("labels", "TEXT NOT NULL DEFAULT '[]'"),
    ("lease", "TEXT"),
    ("parked_at", "{real}"),
    ("parent", "TEXT"),  # schema 4 on
    ("split", "{int} NOT NULL DEFAULT 1"),
    ("reruns", "{int} NOT NULL DEFAULT 0"),
    ("subject", "TEXT NOT NULL DEFAULT ''"),
    ("author", "TEXT NOT NULL DEFAULT ''"),
)


class StoreError(Exception):
    """The store cannot be read or written (full disk, locked, I/O error, a
    broken file, a database that went away): retry later; the message being
    handled is not at fault."""


class StoreGone(StoreError):
    """The store file was deleted or replaced under us: stop rather than write
    into a file nobody reads."""


class LeaseLost(StoreError):
    """Another dispatcher holds the lease now (this one paused, or was cut off
    for longer than the lease): the round is rolled back and this one stands by."""


def is_url(db: Path | str) -> bool:
    """Whether --db names a PostgreSQL database rather than a SQLite file."""
    return str(db).startswith(("postgresql://", "postgres://"))


class Dialect:
    """What SQLite and PostgreSQL do differently; the SQL is otherwise one."""

    name = ""
    types: dict[str, str] = {}
    errors: tuple[type[BaseException], ...] = ()
    # The database's own clock as seconds since the epoch: a lease is timed
    # by one clock, whichever machine the dispatchers run on.
    now = ""
    begin = "BEGIN"
    order = "rowid"  # insertion order in find()

    def connect(self, where: str, durable: bool, readonly: bool) -> Any:
        raise NotImplementedError

    def sql(self, text: str) -> str:
        return text

    def params(self, args: Sequence[Any]) -> Sequence[Any]:
        return args

    def trouble(self, exc: BaseException) -> bool:
        """Whether an error is the database's (disk, lock, I/O, connection)
        rather than the data's (a constraint, a value it cannot take)."""
        raise NotImplementedError

    def in_transaction(self, db: Any) -> bool:
        raise NotImplementedError

    def broken(self, db: Any) -> bool:
        """Whether the connection is gone and must be opened again."""
        return False

    def script(self, db: Any, text: str) -> None:
        for statement in text.format(**self.types).split(";"):
            if statement.strip():
                db.execute(statement)

    def columns(self, db: Any, table: str) -> set[str]:
        raise NotImplementedError

    def serialize(self, db: Any) -> None:
        """Keep two dispatchers starting at once from migrating at once (inside a transaction)."""

    def change(self, db: Any) -> AbstractContextManager[Any]:
        """Where one change of a batch runs: as it comes (SQLite, in-process),
        or a pipeline (see PostgreSQL.change)."""
        return nullcontext()


class SQLite(Dialect):
    name = "sqlite"
    types = {
        "int": "INTEGER",
        "real": "REAL",
        "blob": "BLOB",
        "id": "INTEGER PRIMARY KEY",
        "seq": "",
    }
    errors = (sqlite3.Error,)
    now = "((julianday('now') - 2440587.5) * 86400.0)"
    begin = "BEGIN IMMEDIATE"

    def connect(self, where: str, durable: bool, readonly: bool) -> Any:
        if readonly:
            # A reader for another thread (the web page): WAL lets it read while
            # the owner writes; it creates and changes nothing.
            db = sqlite3.connect(f"{Path(where).resolve().as_uri()}?mode=ro", uri=True, isolation_level=None)
            db.execute("PRAGMA busy_timeout=5000")
            return db
        db = sqlite3.connect(where, isolation_level=None, check_same_thread=False)
        db.execute("PRAGMA journal_mode=WAL")
        # FULL: a job or result we acked to RabbitMQ must survive a power cut,
        # not only a process crash.
        db.execute(f"PRAGMA synchronous={'FULL' if durable else 'NORMAL'}")
        db.execute("PRAGMA busy_timeout=5000")
        return db

    def trouble(self, exc: BaseException) -> bool:
        return isinstance(exc, (sqlite3.OperationalError, sqlite3.InternalError)) or type(exc) is sqlite3.DatabaseError

    def in_transaction(self, db: Any) -> bool:
        return bool(db.in_transaction)

    def columns(self, db: Any, table: str) -> set[str]:
        return {r[1] for r in db.execute(f"PRAGMA table_info({table})")}


# SQLSTATE classes that are the data's fault, not the database's: a value it
# cannot take (22), a constraint (23), a limit such as an index entry's size
# (54). Every other class is the store's trouble: the round is rolled back and
# tried again later, and no message is dead-lettered for it (a connection, a
# full disk, a lock timeout, a shutdown, a read-only database, a permission
# revoked, a bug of ours: nothing a message did).
PG_DATA_ERRORS = frozenset(("22", "23", "54"))


class PostgreSQL(Dialect):
    name = "postgresql"
    types = {
        "int": "BIGINT",
        "real": "DOUBLE PRECISION",
        "blob": "BYTEA",
        "id": "BIGINT GENERATED BY DEFAULT AS IDENTITY PRIMARY KEY",
        "seq": ",\n    seq         BIGINT GENERATED BY DEFAULT AS IDENTITY",
    }
    now = "EXTRACT(EPOCH FROM clock_timestamp())::DOUBLE PRECISION"
    order = "seq"

    def __init__(self) -> None:
        import psycopg  # only a dispatcher on PostgreSQL needs it

        self.psycopg = psycopg
        self.errors = (psycopg.Error,)

    def connect(self, where: str, durable: bool, readonly: bool) -> Any:
        options = [f"-c idle_in_transaction_session_timeout={IDLE_IN_TRANSACTION_S * 1000}"]
        if readonly:
            options.append("-c default_transaction_read_only=on")
        elif not durable:
            options.append("-c synchronous_commit=off")  # tests only: a commit need not wait for its fsync
        # Autocommit: this module says BEGIN and COMMIT itself, as with SQLite.
        # Every statement is prepared at its first use (the server parses and
        # plans it once per connection, not at every round). At once, not at
        # psycopg's default sixth use: a statement first prepared on a later use
        # inside a pipeline that an error aborts is taken for prepared although
        # the server skipped it, and every later use of it would then fail
        # ("prepared statement ... does not exist"); one prepared at its first
        # use is checked against its own answer, and forgotten if it was skipped.
        return self.psycopg.connect(
            where,
            autocommit=True,
            connect_timeout=5,
            options=" ".join(options),
            application_name="volt-dispatcher",
            prepare_threshold=0,
        )

    @functools.lru_cache(maxsize=512)  # noqa: B019 - the statements are this module's own, a bounded set
    def sql(self, text: str) -> str:
        # Every statement here is this module's own: no literal ? or % in them.
        return text.replace("?", "%s")

    def params(self, args: Sequence[Any]) -> Sequence[Any]:
        # PostgreSQL's text cannot hold NUL; a test's output may.
        return [a.replace("\0", "\ufffd") if isinstance(a, str) and "\0" in a else a for a in args]

    def trouble(self, exc: BaseException) -> bool:
        # By the error's SQLSTATE class, not psycopg's class: psycopg files some
        # errors of the data (an index entry over its size limit, class 54)
        # under OperationalError, and retrying those would stop every round.
        p = self.psycopg
        state = getattr(exc, "sqlstate", None)
        if state is None:  # the client's own: a connection that failed or went away
            return (
                isinstance(exc, (p.OperationalError, p.InternalError, p.InterfaceError)) or type(exc) is p.DatabaseError
            )
        return state[:2] not in PG_DATA_ERRORS

    def in_transaction(self, db: Any) -> bool:
        return db.info.transaction_status != self.psycopg.pq.TransactionStatus.IDLE

    def broken(self, db: Any) -> bool:
        return bool(db.closed or db.broken)

    def columns(self, db: Any, table: str) -> set[str]:
        rows = db.execute("SELECT column_name FROM information_schema.columns WHERE table_name = %s", (table,))
        return {r[0] for r in rows}

    def serialize(self, db: Any) -> None:
        db.execute("SELECT pg_advisory_xact_lock(7140)")  # any fixed number: Volt CI's migrations

    def change(self, db: Any) -> AbstractContextManager[Any]:
        # A change's statements (its savepoint and release included) go to the
        # server together and are answered together: one round trip for the
        # change instead of one per statement, and a statement's error still
        # surfaces within its own change (at a read of a result, or at the
        # pipeline's end), so it undoes that change only.
        return db.pipeline()


class _Conn:
    """A connection that speaks this module's SQL (? placeholders) on either database."""

    def __init__(self, dialect: Dialect, db: Any) -> None:
        self.dialect = dialect
        self.raw = db
        self.pipeline: Any = None  # PostgreSQL: the change's pipeline while it runs

    def execute(self, sql: str, args: Sequence[Any] = ()) -> _Result:
        return _Result(self.raw.execute(self.dialect.sql(sql), self.dialect.params(args)), self)

    def settle(self) -> None:
        """Have every statement sent so far answered (a round trip, in a pipeline)."""
        if self.pipeline is not None:
            self.pipeline.sync()

    def executemany(self, sql: str, rows: Sequence[Sequence[Any]]) -> None:
        if rows:  # one round trip for them all (psycopg pipelines them)
            # A cursor's: psycopg's connection has execute() but no executemany().
            cur = self.raw.cursor()
            try:
                cur.executemany(self.dialect.sql(sql), [self.dialect.params(r) for r in rows])
            finally:
                cur.close()


class _Result:
    """A statement's result. In a pipeline psycopg fetches rows when asked, but
    knows a row count only once the statement's answer is in, and says -1
    until then: the count waits for it here. A change reads a count after its
    `with` block, where it costs nothing."""

    def __init__(self, cur: Any, conn: _Conn) -> None:
        self._cur = cur
        self._conn = conn
        # Outside a pipeline the rows are read at once: SQLite cannot release a
        # savepoint while a statement still has rows to give.
        self._rows: list[Any] | None = None
        if conn.pipeline is None and cur.description is not None:
            self._rows = list(cur.fetchall())

    @property
    def rowcount(self) -> int:
        self._conn.settle()
        return int(self._cur.rowcount)

    def fetchone(self) -> Any:
        if self._rows is None:
            return self._cur.fetchone()
        return self._rows.pop(0) if self._rows else None

    def fetchall(self) -> list[Any]:
        if self._rows is None:
            return list(self._cur.fetchall())
        rows, self._rows = self._rows, []
        return rows


_F = TypeVar("_F", bound=Callable[..., Any])


def _store_op(fn: _F) -> _F:
    """Raise the store's own trouble as StoreError."""

    @functools.wraps(fn)
    def wrapper(self: Store, *args: Any, **kwargs: Any) -> Any:
        try:
            return fn(self, *args, **kwargs)
        except self.dialect.errors as exc:
            if self.dialect.trouble(exc):
                self._troubled = True
                raise StoreError(f"store {self.path}: {_one_line(exc)}") from None
            raise

    return wrapper  # type: ignore[return-value]


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split())[:500] or type(exc).__name__


def node_key(node_id: str) -> str:
    """How the store keys a test's node id: whole up to NODE_KEY_BYTES of UTF-8,
    else cut there and ended with a digest of the whole, so that two long ids
    that begin alike stay two. A key is its own key."""
    raw = node_id.encode()
    if len(raw) <= NODE_KEY_BYTES:
        return node_id
    mark = "~" + hashlib.sha256(raw).hexdigest()[:16]
    return raw[: NODE_KEY_BYTES - len(mark)].decode(errors="ignore") + mark


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
    parent: str | None = None  # the split run this job is a shard of
    split: int = 1
    reruns: int = 0
    subject: str = ""
    author: str = ""

    @property
    def labels(self) -> list[str]:
        return list(json.loads(self.labels_json))

    @property
    def is_run(self) -> bool:
        """Whether the job's suite runs as a split run (its shards pull chunks of tests)."""
        return self.parent is None and (self.split > 1 or self.reruns > 0)

    def as_job(self) -> Job:
        return Job(
            job_id=self.job_id,
            attempt=self.attempt,
            repo=self.repo,
            branch=self.branch,
            commit=self.commit_sha,
            labels=self.labels,
            run=self.parent or "",
        )


_ROW_COLUMNS = ", ".join(JobRow.__dataclass_fields__).replace("labels_json", "labels")


def shard_id(run: str, k: int) -> str:
    """The job id of a split run's k-th shard (from 1)."""
    return f"{run}.{k}"


def is_shard(job_id: str) -> bool:
    """Whether a job id is a shard's (a job's own id is hex, without a dot)."""
    return "." in job_id


def run_of(job_id: str) -> str:
    """The split run a shard's job id belongs to."""
    return job_id.rsplit(".", 1)[0]


@dataclass(frozen=True)
class RunInfo:
    """What a split run's shards agreed on: the digest of the node ids the first
    one collected (None until then), how many, and the shards that want no more."""

    digest: str | None
    collected: int
    collected_by: str | None
    quit: tuple[str, ...]


@dataclass(frozen=True)
class ChunkRow:
    chunk: int
    tests: tuple[str, ...]
    est_s: float
    state: str  # pending | taken | done
    lease: str | None
    seq: int | None
    avoid: str | None  # a rerun: the runner it failed on


@dataclass(frozen=True)
class TestRow:
    node_id: str
    outcome: str
    duration_s: float
    runs: int


@dataclass(frozen=True)
class TestRun:
    """One test in one finished job (a run's, never a shard's), for its history."""

    node_id: str
    outcome: str
    duration_s: float
    job_id: str
    commit_sha: str
    subject: str
    author: str
    finished_at: float | None


@dataclass(frozen=True)
class LeaseInfo:
    """Who holds the dispatcher lease, under which term, for how much longer."""

    holder: str
    term: int
    seconds_left: float


class Store:
    store_id = ""  # set when a writable store is opened

    def __init__(self, path: Path | str, durable: bool = True, readonly: bool = False) -> None:
        """A SQLite file, or a PostgreSQL database when `path` is a postgresql:// URL."""
        self.url = str(path) if is_url(path) else ""
        # What messages call the store: never with a password in it.
        self.path = redact_url(self.url) if self.url else str(path)
        self.dialect: Dialect = PostgreSQL() if self.url else SQLite()
        self._where = self.url or str(path)
        self._durable = durable
        self._readonly = readonly
        self._batch = False
        self._troubled = False  # the store's own trouble since the connection was opened
        self._lock_file: Any = None
        # (holder, term) while this store writes as the lease's holder: every
        # commit then checks and renews the lease first (see _commit).
        self.fence: tuple[str, int] | None = None
        self.lease_ttl = 5.0
        # Seconds the holder has not heard its broker: a renewal reaches only
        # lease_ttl past the broker's last word, so a holder cut off from the
        # broker (which can neither reach runners nor let go of the input
        # queues) loses the lease as soon as a killed one would, even while it
        # still reaches the database.
        self.silence: Callable[[], float] = lambda: 0.0
        self._identity: tuple[int, int] | None = None
        try:
            self.db = self.dialect.connect(self._where, durable, readonly)
            if readonly:
                return
            self._migrate()
        except self.dialect.errors as exc:
            raise StoreError(f"cannot open the store {self.path}: {_one_line(exc)}") from None
        if not self.url:
            self._identity = _file_identity(self.path)

    @property
    def shared(self) -> bool:
        """Whether several dispatchers may use this store (one writing at a time, by the lease)."""
        return bool(self.url)

    def _x(self, sql: str, args: Sequence[Any] = ()) -> Any:
        return self.db.execute(self.dialect.sql(sql), self.dialect.params(args))

    def lock(self) -> None:
        """Hold a SQLite store for this process (one writer per file): StoreError if
        another process holds it. A shared store is held by its lease instead."""
        if self.shared:
            return
        try:
            self._lock_file = open(f"{self.path}.lock", "w")  # noqa: SIM115 - held for the process's life
            fcntl.flock(self._lock_file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise StoreError(f"another dispatcher is using the store {self.path}") from None
        except OSError as exc:
            raise StoreError(f"cannot lock the store {self.path}: {exc}") from None

    # -- schema and migrations ---------------------------------------------

    def _migrate(self) -> None:
        """Create the schema, or bring a store written by an older Volt CI up to
        this one's version, in one transaction. A store up to date is only read:
        a write would wait for the dispatcher that has it open."""
        if self._up_to_date():
            return
        d = self.dialect
        self._x(d.begin)
        try:
            d.serialize(self.db)
            self._x("CREATE TABLE IF NOT EXISTS schema_version (version {int} NOT NULL)".format(**d.types))
            row = self._x("SELECT MAX(version) FROM schema_version").fetchone()
            version = row[0] if row and row[0] is not None else 0
            if version > SCHEMA_VERSION:
                raise StoreError(
                    f"the store {self.path} has schema version {version}, newer than this Volt CI's "
                    f"({SCHEMA_VERSION}): run a newer Volt CI on it"
                )
            if version == 0:
                d.script(self.db, SCHEMA)
                version = 1
            self._catch_up_columns()
            for target, script in MIGRATIONS:
                if target > version:
                    d.script(self.db, script)
                    version = target
            self._x("DELETE FROM schema_version")
            self._x("INSERT INTO schema_version (version) VALUES (?)", (version,))
            if self._x("SELECT value FROM meta WHERE key = 'store_id'").fetchone() is None:
                self._x("INSERT INTO meta (key, value) VALUES ('store_id', ?)", (uuid.uuid4().hex,))
            self._x("COMMIT")
        except BaseException:
            self._rollback()
            raise
        self._up_to_date()

    def _up_to_date(self) -> bool:
        """Whether the schema is this version's (and, if so, `store_id` is read)."""
        if "version" not in self.dialect.columns(self.db, "schema_version"):
            return False
        row = self._x("SELECT MAX(version) FROM schema_version").fetchone()
        if not row or row[0] != SCHEMA_VERSION:
            return False
        found = self._x("SELECT value FROM meta WHERE key = 'store_id'").fetchone()
        if found is None:
            return False
        self.store_id = str(found[0])
        if self.dialect.in_transaction(self.db):
            self._x("COMMIT")  # PostgreSQL opened one to read
        return True

    def _catch_up_columns(self) -> None:
        """A store from an older Volt CI lacks the later columns."""
        columns = self.dialect.columns(self.db, "jobs")
        for name, kind in LATER_COLUMNS:
            if name not in columns:
                self._x(f"ALTER TABLE jobs ADD COLUMN {name} {kind.format(**self.dialect.types)}")

    @_store_op
    def probe(self) -> None:
        """A write that changes nothing, committed: StoreError now if the store
        cannot take writes (a full disk, a database that is down or read-only)."""
        self._reopen_if_broken()
        self._x(self.dialect.begin)
        try:
            self._x("UPDATE schema_version SET version = version")
            self._x("COMMIT")
        except BaseException:
            self._rollback()
            raise

    @_store_op
    def schema_version(self) -> int:
        return int(self._x("SELECT MAX(version) FROM schema_version").fetchone()[0])

    def check_identity(self) -> None:
        """StoreGone if the file this store opened was deleted or replaced."""
        if self.shared:
            return
        if _file_identity(self.path) != self._identity:
            raise StoreGone(f"the store {self.path} was deleted or replaced while the dispatcher ran")

    def close(self) -> None:
        try:
            self.commit_batch()  # a StoreError: what the dialect raised, classified
        except Exception:
            self.rollback_batch()
        try:
            self.db.close()
        except self.dialect.errors:
            pass

    def _reopen_if_broken(self) -> None:
        """A PostgreSQL connection that went away (a restart, a failover, a
        session ended by the server) is opened again for the next round; so is
        one that failed for the store's own reasons, so that nothing its session
        held (a prepared statement the server no longer has, say) outlives the
        failure."""
        if not (self.dialect.broken(self.db) or (self._troubled and self.shared)):
            return
        self._troubled = False
        try:
            self.db.close()
        except self.dialect.errors:
            pass
        self.db = self.dialect.connect(self._where, self._durable, self._readonly)

    # -- the dispatcher lease (shared stores) ------------------------------

    @_store_op
    def acquire_lease(self, holder: str, ttl: float) -> int | None:
        """Take the lease if it is free, expired, or already `holder`'s: the new
        fencing term (one more than any before it), or None if another holds it."""
        self._reopen_if_broken()
        self._x(self.dialect.begin)
        try:
            if self.dialect.name == "postgresql":
                self._x(f"SET LOCAL lock_timeout = '{LOCK_TIMEOUT_S}s'")
            row = self._x(
                f"UPDATE dispatcher_lease SET holder = ?, term = term + 1, expires_at = {self.dialect.now} + ?,"
                f" acquired_at = {self.dialect.now} WHERE id = 1 AND (expires_at < {self.dialect.now} OR holder = ?)"
                " RETURNING term",
                (holder, ttl, holder),
            ).fetchone()
            self._x("COMMIT")
        except BaseException:
            self._rollback()
            raise
        return int(row[0]) if row else None

    @_store_op
    def release_lease(self, holder: str, term: int) -> None:
        """Give the lease up at once (a clean stop), so a standby need not wait it out."""
        self._reopen_if_broken()
        self._x(
            "UPDATE dispatcher_lease SET expires_at = 0 WHERE id = 1 AND holder = ? AND term = ?",
            (holder, term),
        )

    @_store_op
    def lease(self) -> LeaseInfo:
        self._reopen_if_broken()
        row = self._x(
            f"SELECT holder, term, expires_at - {self.dialect.now} FROM dispatcher_lease WHERE id = 1"
        ).fetchone()
        return LeaseInfo(row[0], int(row[1]), float(row[2]))

    def _check_fence(self) -> None:
        """Raise LeaseLost unless this store's holder still has its term."""
        if self.fence is None:
            return
        row = self._x("SELECT holder, term FROM dispatcher_lease WHERE id = 1").fetchone()
        if row is None or (row[0], int(row[1])) != self.fence:
            raise LeaseLost(
                f"the dispatcher lease is held by {row[0] if row else '?'} (term {row[1] if row else '?'}) now"
            )

    def _commit(self, then_begin: bool = False) -> None:
        """COMMIT (and, with then_begin, start the next transaction); with a
        fence, renew the lease in the same transaction first, so nothing is
        committed by a dispatcher that no longer holds it."""
        if self.fence is not None:
            holder, term = self.fence
            renewed = self._x(
                f"UPDATE dispatcher_lease SET expires_at = {self.dialect.now} + ? WHERE id = 1 AND holder = ? AND term = ?",
                (self.lease_ttl - self.silence(), holder, term),
            )
            if renewed.rowcount != 1:
                raise LeaseLost(f"the dispatcher lease (term {term}) was taken over; nothing of this round is kept")
        with self.dialect.change(self.db):  # both in one round trip on PostgreSQL
            self._x("COMMIT")
            if then_begin:
                self._x(self.dialect.begin)

    # -- group commit ----------------------------------------------------
    #
    # Outside a batch every change is its own transaction. Inside one (the
    # dispatcher opens a batch per round of messages) each change is a
    # savepoint, and one COMMIT, one fsync, makes the whole round durable.
    # The caller acks the round's messages only after that commit.

    @_store_op
    def begin_batch(self) -> None:
        if not self._batch:
            self._reopen_if_broken()
            self._x(self.dialect.begin)
            self._batch = True
            try:
                # Before anything of the round is handled: a dispatcher that lost
                # the lease must not act on it (publish, cancel) either.
                self._check_fence()
            except BaseException:
                self.rollback_batch()
                raise

    @_store_op
    def commit_batch(self) -> None:
        if self._batch:
            self._batch = False
            try:
                self._commit()
            except BaseException:
                self._rollback()
                raise

    @_store_op
    def checkpoint(self) -> None:
        """Make the batch so far durable and go on batching."""
        if self._batch:
            try:
                self._commit(then_begin=True)
            except BaseException:
                self._batch = False
                self._rollback()
                raise

    def rollback_batch(self) -> None:
        """Drop the batch's changes (a round that failed); never raises."""
        self._batch = False
        self._rollback()

    def _rollback(self) -> None:
        # SQLite may have rolled back by itself (a full disk does that), and
        # then ROLLBACK says "no transaction is active"; a PostgreSQL connection
        # may be gone: either way none is open now.
        try:
            if self.dialect.in_transaction(self.db):
                self._x("ROLLBACK")
        except self.dialect.errors:
            pass

    @contextmanager
    def _tx(self) -> Iterator[_Conn]:
        db = _Conn(self.dialect, self.db)
        if self._batch:
            try:
                with self.dialect.change(self.db) as db.pipeline:
                    self._x("SAVEPOINT change")
                    yield db
                    self._x("RELEASE change")
            except BaseException:
                db.pipeline = None
                if self.dialect.in_transaction(self.db):  # a full disk may have rolled it all back already
                    self._x("ROLLBACK TO change")
                    self._x("RELEASE change")
                raise
            db.pipeline = None
            return
        self._reopen_if_broken()
        db = _Conn(self.dialect, self.db)
        self._x(self.dialect.begin)
        try:
            self._check_fence()
            yield db
            self._commit()
        except BaseException:
            self._rollback()
            raise

    # -- reads ------------------------------------------------------------

    @_store_op
    def get(self, job_id: str) -> JobRow | None:
        row = self._x(f"SELECT {_ROW_COLUMNS} FROM jobs WHERE job_id = ?", (job_id,)).fetchone()
        return JobRow(*row) if row else None

    @_store_op
    def in_state(self, *states: str) -> list[JobRow]:
        marks = ",".join("?" * len(states))
        rows = self._x(f"SELECT {_ROW_COLUMNS} FROM jobs WHERE state IN ({marks}) ORDER BY seen_at", states).fetchall()
        return [JobRow(*r) for r in rows]

    @_store_op
    def busy_runners(self) -> set[str]:
        rows = self._x("SELECT runner FROM jobs WHERE state IN ('assigned', 'running')")
        return {r[0] for r in rows}

    @_store_op
    def count_by_state(self) -> dict[str, int]:
        return dict(self._x("SELECT state, COUNT(*) FROM jobs GROUP BY state").fetchall())

    @_store_op
    def count_by_status(self) -> dict[str, int]:
        rows = self._x("SELECT status, COUNT(*) FROM jobs WHERE state = 'done' AND parent IS NULL GROUP BY status")
        return dict(rows.fetchall())

    @_store_op
    def events(self, job_id: str) -> list[dict[str, Any]]:
        rows = self._x(
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
        rows = self._x(
            f"SELECT {_ROW_COLUMNS} FROM jobs {clause} ORDER BY seen_at DESC, {self.dialect.order} DESC LIMIT ?",
            (*args, limit),
        ).fetchall()
        return [JobRow(*r) for r in rows]

    @_store_op
    def count(
        self, repo: str | None = None, branch: str | None = None, commit: str | None = None, done_only: bool = False
    ) -> int:
        """How many jobs find() would return without a limit."""
        clause, args = _filters(repo, branch, commit, done_only)
        return int(self._x(f"SELECT COUNT(*) FROM jobs {clause}", args).fetchone()[0])

    @_store_op
    def log(self, job_id: str, max_full_bytes: int | None = None) -> dict[str, Any] | None:
        """head, tail, bytes, and full: the whole log when it was kept and inflates to at
        most max_full_bytes (default LOG_FULL_MAX_BYTES), else None."""
        row = self._x("SELECT log_head, log_tail, log_bytes, log_full FROM jobs WHERE job_id = ?", (job_id,)).fetchone()
        if row is None:
            return None
        head, tail, size, full = row
        return {"head": head, "tail": tail, "bytes": size, "full": _inflate(full, max_full_bytes) if full else None}

    @_store_op
    def log_compressed(self, job_id: str) -> bytes | None:
        """The whole log as stored (zlib), for a reader that inflates it a piece at a time."""
        row = self._x("SELECT log_full FROM jobs WHERE job_id = ?", (job_id,)).fetchone()
        return bytes(row[0]) if row and row[0] else None

    # -- changes ----------------------------------------------------------

    @_store_op
    def add_job(self, seen: CommitSeen, now: float | None = None) -> JobRow:
        """Insert the job for a commit unless it exists (idempotent, delivery rule 4)."""
        job_id = job_id_for(seen.repo, seen.branch, seen.commit)
        with self._tx() as db:
            inserted = db.execute(
                "INSERT INTO jobs (job_id, repo, branch, commit_sha, state, seen_at, labels, split, reruns,"
                " subject, author) VALUES (?, ?, ?, ?, 'pending', ?, ?, ?, ?, ?, ?) ON CONFLICT DO NOTHING"
                f" RETURNING {_ROW_COLUMNS}",
                (
                    job_id,
                    seen.repo,
                    seen.branch,
                    seen.commit,
                    seen.seen_at or now or time.time(),
                    json.dumps(sorted(set(seen.labels))),
                    seen.split,
                    seen.rerun_failures,
                    seen.subject[:MAX_SUBJECT],
                    seen.author[:MAX_SUBJECT],
                ),
            )
        new = inserted.fetchone()
        row = JobRow(*new) if new is not None else self.get(job_id)  # new, or the one there already
        assert row is not None
        return row

    @_store_op
    def adopt(self, job: Job, now: float) -> JobRow:
        """Take in a backlog job this store has never seen (a store started
        empty on a namespace that has a backlog): queued, at its attempt."""
        with self._tx() as db:
            db.execute(
                "INSERT INTO jobs (job_id, repo, branch, commit_sha, state, attempt, seen_at, queued_at, labels)"
                " VALUES (?, ?, ?, ?, 'queued', ?, ?, ?, ?) ON CONFLICT DO NOTHING",
                (job.job_id, job.repo, job.branch, job.commit, job.attempt, now, now, json.dumps(sorted(job.labels))),
            )
            self._event(db, job.job_id, job.attempt, None, "adopted", now, reason="found in the backlog")
        row = self.get(job.job_id)
        assert row is not None
        return row

    def mark_queued(self, job_id: str, attempt: int, now: float) -> None:
        self.mark_all_queued([(job_id, attempt)], now)

    @_store_op
    def mark_all_queued(self, jobs: Sequence[tuple[str, int]], now: float) -> None:
        """The pending jobs (job id, attempt) whose backlog publish was confirmed are queued."""
        with self._tx() as db:
            db.executemany(
                "UPDATE jobs SET state = 'queued', queued_at = ? WHERE job_id = ? AND attempt = ? AND state = 'pending'",
                [(now, job_id, attempt) for job_id, attempt in jobs],
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
            # Only the update just made can have given the job this new token.
            self._event_where(db, "assigned", now, "job_id = ? AND lease = ?", (job_id, lease))
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
    def start(self, job_id: str, lease: str, runner: str, session: str, started_at: float, now: float) -> float | None:
        """The assignment under `lease` started: returns when the job was queued
        (0.0 if it never was), or None if it is not that assignment any more."""
        with self._tx() as db:
            started = db.execute(
                "UPDATE jobs SET state = 'running', session = ?, started_at = ?"
                " WHERE job_id = ? AND lease = ? AND runner = ? AND state = 'assigned'"
                " RETURNING attempt, queued_at",
                (session, started_at, job_id, lease, runner),
            )
            # Sent with the update, not after reading it: an attempt starts once,
            # so a repeated JobStarted (the update finds it running) adds nothing.
            self._event_where(
                db,
                "started",
                now,
                "job_id = ? AND lease = ? AND runner = ? AND state = 'running' AND NOT EXISTS (SELECT 1 FROM events"
                " e WHERE e.job_id = jobs.job_id AND e.attempt = jobs.attempt AND e.kind = 'started')",
                (job_id, lease, runner),
            )
        row = started.fetchone()
        return None if row is None else float(row[1] or 0.0)

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
                " errors = ?, skipped = ?, duration_s = ?,"
                # Why earlier attempts were lost stays beside the final reason.
                " reason = CASE WHEN ? = '' THEN reason WHEN reason = '' THEN ? ELSE ? || ' (' || reason || ')' END,"
                " finished_at = ?,"
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
                    result.reason,
                    result.reason,
                    result.reason,
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
            if accepted and result.tests:
                self._record_tests(db, result.job_id, result.tests, chunk=-1, runner=result.runner_id)
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

    # -- test history (dispatcher/history.py) --------------------------------
    #
    # What tests did across a branch's commits. Only a job's own rows count:
    # a split run keeps its tests under its own id, and its shards' rows
    # (parent set) are the run's business, never results.

    @_store_op
    def test_runs(
        self, repo: str, branch: str, node_ids: Sequence[str], jobs: int = HISTORY_JOBS
    ) -> dict[str, list[TestRun]]:
        """Each of `node_ids` in the branch's last `jobs` finished jobs that ran it, newest first."""
        out: dict[str, list[TestRun]] = {node: [] for node in node_ids}
        asked = {node_key(node): node for node in node_ids}
        keys = list(asked)
        order = self.dialect.order
        for i in range(0, len(keys), 500):
            part = keys[i : i + 500]
            rows = self._x(
                "SELECT t.node_id, t.outcome, t.duration_s, j.job_id, j.commit_sha, j.subject, j.author,"
                " j.finished_at FROM test_results t JOIN jobs j ON j.job_id = t.job_id"
                " WHERE j.job_id IN (SELECT job_id FROM jobs WHERE repo = ? AND branch = ? AND parent IS NULL"
                f" AND state = 'done' ORDER BY seen_at DESC, {order} DESC LIMIT ?)"
                f" AND t.node_id IN ({','.join('?' * len(part))}) ORDER BY j.seen_at DESC, j.{order} DESC",
                (repo, branch, jobs, *part),
            ).fetchall()
            for r in rows:
                out[asked[r[0]]].append(TestRun(r[0], r[1], float(r[2]), r[3], r[4], r[5], r[6], r[7]))
        return out

    @_store_op
    def flaky_tests(self, repo: str, branch: str | None, jobs: int) -> tuple[int, list[tuple[str, int]]]:
        """How many finished jobs the last `jobs` of `repo` (on `branch`, if given)
        are, and each test that was flaky in any of them with how many, most first."""
        where, args = "repo = ? AND parent IS NULL AND state = 'done'", [repo]
        if branch is not None:
            where += " AND branch = ?"
            args.append(branch)
        recent = f"SELECT job_id FROM jobs WHERE {where} ORDER BY seen_at DESC, {self.dialect.order} DESC LIMIT ?"
        looked = self._x(f"SELECT COUNT(*) FROM ({recent}) recent", (*args, jobs)).fetchone()[0]
        rows = self._x(
            "SELECT node_id, COUNT(*) FROM test_results WHERE outcome = 'flaky'"
            f" AND job_id IN ({recent}) GROUP BY node_id ORDER BY COUNT(*) DESC, node_id",
            (*args, jobs),
        ).fetchall()
        return int(looked), [(r[0], int(r[1])) for r in rows]

    # -- split runs (dispatcher/runs.py) ------------------------------------
    #
    # A split run is a job in state `split` whose suite its shards run: jobs
    # of their own (`parent` names the run), each assigned, leased and taken
    # back like any other. `runs` keeps what the first shard collected,
    # `chunks` the work queue of tests, `test_results` each test once.

    @_store_op
    def make_run(self, job_id: str, now: float) -> list[JobRow]:
        """Turn a pending job into a split run: its shards, one per runner it may
        use, wait in the backlog for it; it waits as `split`. Returns the shards."""
        with self._tx() as db:
            row = db.execute(
                f"SELECT {_ROW_COLUMNS} FROM jobs WHERE job_id = ? AND state = 'pending'", (job_id,)
            ).fetchone()
            if row is None:
                return []
            run = JobRow(*row)
            db.execute("UPDATE jobs SET state = 'split', queued_at = ? WHERE job_id = ?", (now, job_id))
            db.execute("INSERT INTO runs (job_id) VALUES (?) ON CONFLICT DO NOTHING", (job_id,))
            self._insert_shards(db, run, range(1, run.split + 1))
            self._event(db, job_id, run.attempt, None, "split", now, reason=f"into {run.split} shard(s)")
        return self.shards(job_id, "pending")

    @_store_op
    def add_shard(self, job_id: str) -> JobRow | None:
        """One more shard for a split run (pending), numbered after the others."""
        with self._tx() as db:
            run = db.execute(
                f"SELECT {_ROW_COLUMNS} FROM jobs WHERE job_id = ? AND state = 'split'", (job_id,)
            ).fetchone()
            if run is None:
                return None
            row = JobRow(*run)
            count = int(db.execute("SELECT COUNT(*) FROM jobs WHERE parent = ?", (job_id,)).fetchone()[0])
            self._insert_shards(db, row, [count + 1])
        return self.get(shard_id(job_id, count + 1))

    @staticmethod
    def _insert_shards(db: _Conn, run: JobRow, numbers: Sequence[int]) -> None:
        db.executemany(
            "INSERT INTO jobs (job_id, repo, branch, commit_sha, state, seen_at, labels, parent, subject, author)"
            " VALUES (?, ?, ?, ?, 'pending', ?, ?, ?, ?, ?) ON CONFLICT DO NOTHING",
            [
                (shard_id(run.job_id, k), run.repo, run.branch, run.commit_sha, run.seen_at, run.labels_json)
                + (run.job_id, run.subject, run.author)
                for k in numbers
            ],
        )

    @_store_op
    def shards(self, job_id: str, *states: str) -> list[JobRow]:
        """The shards of a split run (in those states, if any are given), in order."""
        where, args = _in_states("parent = ?", [job_id], states)
        rows = self._x(f"SELECT {_ROW_COLUMNS} FROM jobs WHERE {where} ORDER BY job_id", args).fetchall()
        return [JobRow(*r) for r in rows]

    @_store_op
    def run_info(self, job_id: str) -> RunInfo | None:
        row = self._x("SELECT digest, collected, collected_by, quit FROM runs WHERE job_id = ?", (job_id,)).fetchone()
        return RunInfo(row[0], int(row[1]), row[2], tuple(json.loads(row[3]))) if row else None

    @_store_op
    def set_collection(self, job_id: str, digest: str, count: int, by: str) -> None:
        with self._tx() as db:
            db.execute(
                "UPDATE runs SET digest = ?, collected = ?, collected_by = ? WHERE job_id = ? AND digest IS NULL",
                (digest, count, by, job_id),
            )

    @_store_op
    def ask_seen(self, lease: str, seq: int) -> int:
        """Note that the shard under `lease` asked for the `seq`-th time; returns the
        highest `seq` it had asked before (0 for none): a repeat is not a new ask."""
        with self._tx() as db:
            row = db.execute("SELECT seq FROM chunk_asks WHERE lease = ?", (lease,)).fetchone()
            before = int(row[0]) if row else 0
            if seq > before:
                db.execute(
                    "INSERT INTO chunk_asks (lease, seq) VALUES (?, ?) ON CONFLICT (lease) DO UPDATE SET seq = ?",
                    (lease, seq, seq),
                )
        return before

    @_store_op
    def shard_quit(self, job_id: str, shard: str) -> None:
        """`shard` wants no more chunks of the run."""
        with self._tx() as db:
            row = db.execute("SELECT quit FROM runs WHERE job_id = ?", (job_id,)).fetchone()
            quit = set(json.loads(row[0])) if row else set()
            if row is not None and shard not in quit:
                db.execute("UPDATE runs SET quit = ? WHERE job_id = ?", (json.dumps(sorted(quit | {shard})), job_id))

    @_store_op
    def add_chunks(self, job_id: str, chunks: Sequence[tuple[Sequence[str], float]], avoid: str | None = None) -> None:
        """Put chunks of tests at the end of the run's work queue; `avoid`: a
        rerun, best taken by a runner other than the one that failed it."""
        with self._tx() as db:
            last = db.execute("SELECT MAX(chunk) FROM chunks WHERE job_id = ?", (job_id,)).fetchone()[0]
            first = -1 if last is None else int(last)
            db.executemany(
                "INSERT INTO chunks (job_id, chunk, tests, est_s, avoid, rerun) VALUES (?, ?, ?, ?, ?, ?)",
                [
                    (job_id, first + 1 + i, json.dumps(list(tests)), est, avoid, 1 if avoid else 0)
                    for i, (tests, est) in enumerate(chunks)
                ],
            )

    @_store_op
    def chunks(self, job_id: str, *states: str) -> list[ChunkRow]:
        where, args = _in_states("job_id = ?", [job_id], states)
        rows = self._x(
            f"SELECT chunk, tests, est_s, state, lease, seq, avoid FROM chunks WHERE {where} ORDER BY chunk", args
        ).fetchall()
        return [ChunkRow(int(r[0]), tuple(json.loads(r[1])), float(r[2]), r[3], r[4], r[5], r[6]) for r in rows]

    @_store_op
    def take_chunk(self, job_id: str, chunk: int, lease: str, seq: int) -> bool:
        with self._tx() as db:
            cur = db.execute(
                "UPDATE chunks SET state = 'taken', lease = ?, seq = ? WHERE job_id = ? AND chunk = ? AND state = 'pending'",
                (lease, seq, job_id, chunk),
            )
        return cur.rowcount == 1

    @_store_op
    def release_chunks(self, job_id: str, lease: str) -> int:
        """Put back the chunks an assignment took and did not finish (its runner was lost)."""
        with self._tx() as db:
            cur = db.execute(
                "UPDATE chunks SET state = 'pending', lease = NULL, seq = NULL"
                " WHERE job_id = ? AND lease = ? AND state = 'taken'",
                (job_id, lease),
            )
        return int(cur.rowcount)

    @_store_op
    def record_chunk(
        self, job_id: str, results: Sequence[tuple[str, str, float, int]], runner: str
    ) -> list[tuple[str, int]]:
        """Keep each (node id, outcome, seconds, chunk) once per chunk: the first
        report of a test from a chunk counts (`chunk_results` remembers which),
        one from a chunk run again after its runner was lost adds nothing, and a
        rerun chunk's updates its test (failed, then passed: flaky). Marks the
        chunks now complete done; returns the (node id, runs) that failed."""
        failing = []
        with self._tx() as db:
            touched = set()
            for node, outcome, seconds, chunk in results:
                key = node_key(node)
                first = db.execute(
                    "INSERT INTO chunk_results (job_id, chunk, node_id) VALUES (?, ?, ?) ON CONFLICT DO NOTHING",
                    (job_id, chunk, key),
                )
                if first.rowcount != 1:
                    continue  # this chunk's report of it counted already
                touched.add(chunk)
                old = db.execute(
                    "SELECT outcome, runs FROM test_results WHERE job_id = ? AND node_id = ?", (job_id, key)
                ).fetchone()
                if old is None:
                    db.execute(
                        "INSERT INTO test_results (job_id, node_id, outcome, duration_s, chunk, runner)"
                        " VALUES (?, ?, ?, ?, ?, ?)",
                        (job_id, key, outcome, seconds, chunk, runner),
                    )
                    runs = 1
                else:  # a rerun: every test is in one chunk of the plan, and in reruns
                    runs = int(old[1]) + 1
                    if outcome == "passed" and old[0] in ("failed", "error", "flaky"):
                        outcome = "flaky"
                    db.execute(
                        "UPDATE test_results SET outcome = ?, duration_s = ?, runs = ?, chunk = ?, runner = ?"
                        " WHERE job_id = ? AND node_id = ?",
                        (outcome, seconds, runs, chunk, runner, job_id, key),
                    )
                if outcome in ("failed", "error"):
                    failing.append((node, runs))
            for chunk in touched:
                row = db.execute(
                    "SELECT tests FROM chunks WHERE job_id = ? AND chunk = ? AND state = 'taken'", (job_id, chunk)
                ).fetchone()
                if row is None:
                    continue
                done = db.execute(
                    "SELECT COUNT(*) FROM chunk_results WHERE job_id = ? AND chunk = ?", (job_id, chunk)
                ).fetchone()[0]
                if int(done) >= len(json.loads(row[0])):
                    db.execute("UPDATE chunks SET state = 'done' WHERE job_id = ? AND chunk = ?", (job_id, chunk))
        return failing

    @_store_op
    def tests(self, job_id: str) -> list[TestRow]:
        """Each test of a job (a split run's: all its shards'), by node id."""
        rows = self._x(
            "SELECT node_id, outcome, duration_s, runs FROM test_results WHERE job_id = ? ORDER BY node_id", (job_id,)
        ).fetchall()
        return [TestRow(r[0], r[1], float(r[2]), int(r[3])) for r in rows]

    @_store_op
    def test_summary(self, job_ids: Sequence[str]) -> dict[str, dict[str, list[str]]]:
        """For each job that has any: its failing tests' node ids (failed or
        error) and its flaky ones, sorted."""
        out: dict[str, dict[str, list[str]]] = {}
        for i in range(0, len(job_ids), 500):
            part = list(job_ids[i : i + 500])
            rows = self._x(
                f"SELECT job_id, node_id, outcome FROM test_results WHERE job_id IN ({','.join('?' * len(part))})"
                " AND outcome IN ('failed', 'error', 'flaky') ORDER BY node_id",
                part,
            ).fetchall()
            for job_id, node, outcome in rows:
                entry = out.setdefault(job_id, {"failing_tests": [], "flaky": []})
                entry["flaky" if outcome == "flaky" else "failing_tests"].append(node)
        return out

    @_store_op
    def past_durations(self, repo: str, branch: str) -> dict[str, float]:
        """How long each test took in the last job of `repo` that kept its tests
        (on `branch` if it has one): what a split run's chunks are planned by."""
        rows = self._x(
            "SELECT node_id, duration_s FROM test_results WHERE job_id = ("
            " SELECT j.job_id FROM jobs j WHERE j.repo = ? AND j.state = 'done' AND j.parent IS NULL"
            " AND EXISTS (SELECT 1 FROM test_results t WHERE t.job_id = j.job_id)"
            " ORDER BY CASE WHEN j.branch = ? THEN 0 ELSE 1 END, j.finished_at DESC LIMIT 1)",
            (repo, branch),
        ).fetchall()
        return {r[0]: float(r[1]) for r in rows}

    @_store_op
    def end_shard(self, job_id: str, reason: str, now: float) -> None:
        """A shard no longer needed (its run has its result): done, cancelled."""
        with self._tx() as db:
            db.execute(
                "UPDATE jobs SET state = 'done', status = 'cancelled', reason = ?, finished_at = ?, lease = NULL"
                " WHERE job_id = ? AND state <> 'done'",
                (reason, now, job_id),
            )

    @_store_op
    def run_started(self, job_id: str, started_at: float) -> None:
        with self._tx() as db:
            db.execute(
                "UPDATE jobs SET started_at = COALESCE(started_at, ?) WHERE job_id = ? AND state = 'split'",
                (started_at, job_id),
            )

    @_store_op
    def finish_run(
        self, job_id: str, status: str, counts: Sequence[int], reason: str, log_head: str, now: float
    ) -> bool:
        """Record a split run's one result (counts: passed, failed, errors, skipped),
        and end its shards that never started (cancelled: not needed)."""
        with self._tx() as db:
            cur = db.execute(
                "UPDATE jobs SET state = 'done', status = ?, passed = ?, failed = ?, errors = ?, skipped = ?,"
                " reason = ?, log_head = ?, log_bytes = ?, finished_at = ?,"
                " duration_s = ? - COALESCE(started_at, queued_at, seen_at) WHERE job_id = ? AND state = 'split'",
                (status, *counts, reason, log_head, len(log_head.encode()), now, now, job_id),
            )
            if cur.rowcount != 1:
                return False
            db.execute(
                "UPDATE jobs SET state = 'done', status = 'cancelled', reason = 'not needed: the run ended',"
                " finished_at = ? WHERE parent = ? AND state IN ('pending', 'queued', 'parked')",
                (now, job_id),
            )
            db.execute("UPDATE chunks SET state = 'done' WHERE job_id = ? AND state <> 'done'", (job_id,))
            db.execute(
                "DELETE FROM chunk_asks WHERE lease IN (SELECT lease FROM chunks WHERE job_id = ? AND lease IS NOT NULL)",
                (job_id,),
            )
            self._event(db, job_id, 1, None, "result", now, status=status, reason=reason)
        return True

    @staticmethod
    def _record_tests(db: _Conn, job_id: str, tests: Sequence[Sequence[Any]], chunk: int, runner: str) -> None:
        """Keep the outcome of each well-formed [node id, outcome, seconds] once."""
        rows = []
        for test in tests[:MAX_TESTS]:
            if len(test) != 3 or not isinstance(test[0], str) or not test[0] or test[1] not in TEST_OUTCOMES:
                continue
            seconds = test[2] if isinstance(test[2], (int, float)) and 0 <= test[2] < 1e7 else 0.0
            rows.append((job_id, node_key(test[0]), test[1], float(seconds), chunk, runner))
        db.executemany(
            "INSERT INTO test_results (job_id, node_id, outcome, duration_s, chunk, runner)"
            " VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT DO NOTHING",
            rows,
        )

    @staticmethod
    def _event_where(db: _Conn, kind: str, now: float, where: str, args: Sequence[Any]) -> None:
        """Note `kind` for each job row `where` holds, at its attempt and runner: an event
        that depends on an update sent just before, without waiting for that update's answer."""
        db.execute(
            "INSERT INTO events (job_id, attempt, runner, kind, status, reason, at, detail)"
            f" SELECT job_id, attempt, runner, ?, NULL, '', ?, NULL FROM jobs WHERE {where}",
            (kind, now, *args),
        )

    @staticmethod
    def _event(
        db: _Conn,
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


def _in_states(where: str, args: list[str], states: Sequence[str]) -> tuple[str, list[str]]:
    """`where` and its `args`, narrowed to rows in one of `states` (all of them when none)."""
    if not states:
        return where, args
    return f"{where} AND state IN ({','.join('?' * len(states))})", [*args, *states]


def _filters(repo: str | None, branch: str | None, commit: str | None, done_only: bool) -> tuple[str, list[str]]:
    """The WHERE clause of find() and count()."""
    where, args = ["parent IS NULL"], []  # a split run's shards are its own business
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
    return f"WHERE {' AND '.join(where)}", args
