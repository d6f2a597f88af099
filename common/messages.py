"""Message types: frozen dataclasses that travel as UTF-8 JSON.

Every message carries `type` and `schema_version`. Decoding ignores unknown
fields, fills defaults for optional ones, checks every field's type, and
raises DecodeError with a reason for anything else. Never pickle.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
import types
import typing
import unicodedata
from dataclasses import dataclass, field
from typing import Any, ClassVar

SCHEMA_VERSION = 1
# Far above any real message (a result's compressed log is capped well below
# this); anything larger is hostile or broken.
MAX_MESSAGE_BYTES = 16 * 1024 * 1024

_COMMIT = re.compile(r"^(?:[0-9a-f]{40}|[0-9a-f]{64})$")
# A finished job's status, and the states a job and a runner go through: the
# one home of these names (the store, the registry, metrics and page use them).
STATUSES = ("passed", "failed", "error", "timeout", "cancelled")
# "split": a job whose suite its shards run (dispatcher/runs.py).
JOB_STATES = ("pending", "queued", "parked", "assigned", "running", "split", "done")
# A test's outcome; "flaky": it failed, then passed when run again on the same commit.
TEST_OUTCOMES = ("passed", "failed", "error", "skipped", "flaky")
RUNNER_STATES = ("idle", "busy", "paused", "draining")


class DecodeError(ValueError):
    """A message that cannot be turned into one of our types; says why."""


def valid_commit(sha: str) -> bool:
    # fullmatch: `$` alone would also accept a trailing newline.
    return bool(_COMMIT.fullmatch(sha))


_LABEL = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.:=+-]{0,63}")
MAX_LABELS = 32


def check_labels(labels: list[str]) -> list[str]:
    """Return the runner labels, or raise ValueError saying which one is wrong."""
    if len(labels) > MAX_LABELS:
        raise ValueError(f"at most {MAX_LABELS} labels, not {len(labels)}")
    for label in labels:
        if not isinstance(label, str) or not _LABEL.fullmatch(label):
            raise ValueError(f"not a label (letters, digits and _.:=+-, at most 64): {label!r:.80}")
    return labels


MAX_SPLIT = 64
MAX_RERUNS = 5


def check_split(split: int, reruns: int) -> None:
    """Raise ValueError unless `[test] split` and `rerun_failures` are in range."""
    if isinstance(split, bool) or not isinstance(split, int) or not 1 <= split <= MAX_SPLIT:
        raise ValueError(f"split must be a whole number from 1 to {MAX_SPLIT}, not {split!r:.20}")
    if isinstance(reruns, bool) or not isinstance(reruns, int) or not 0 <= reruns <= MAX_RERUNS:
        raise ValueError(f"rerun_failures must be a whole number from 0 to {MAX_RERUNS}, not {reruns!r:.20}")


def check_commit(sha: str) -> str:
    """Return the commit id, or raise ValueError saying what is wrong with it."""
    if not isinstance(sha, str) or not valid_commit(sha):
        raise ValueError(f"not a commit id (40 or 64 lowercase hex characters): {sha!r:.80}")
    return sha


# What `git check-ref-format --branch` refuses, as characters and as substrings.
_BRANCH_CHARS = frozenset(" ~^:?*[\\\x7f")
_BRANCH_SUBSTRINGS = ("..", "@{", "//", "/.", ".lock/")
MAX_BRANCH_CHARS = 255


def check_branch(name: str) -> str:
    """Return the branch name, or raise ValueError saying why git would refuse it
    (the rules of `git check-ref-format --branch`; control, format and line
    separator characters refused too, so a name cannot forge a log line)."""
    if not isinstance(name, str) or not name:
        raise ValueError("branch must not be empty")
    problem = ""
    if len(name) > MAX_BRANCH_CHARS:
        problem = f"longer than {MAX_BRANCH_CHARS} characters"
    elif name in ("HEAD", "@") or name.startswith(("-", ".", "/")) or name.endswith(("/", ".", ".lock")):
        problem = "git refuses that name"
    elif any(part in name for part in _BRANCH_SUBSTRINGS):
        problem = "git refuses that name"
    elif any(c in _BRANCH_CHARS or unicodedata.category(c) in ("Cc", "Cf", "Cs", "Zl", "Zp") for c in name):
        problem = "no spaces, control characters or any of ~^:?*[\\"
    if problem:
        raise ValueError(f"not a branch name ({problem}): {name!r:.80}")
    return name


# C0 and C1 controls, and the bidi overrides that make a line read other than it is.
_UNPRINTABLE = re.compile("[\x00-\x1f\x7f-\x9f\u202a-\u202e\u2066-\u2069]")


def one_line(text: str, limit: int) -> str:
    """The first line of `text` (which a commit or a test suite wrote, so anyone),
    without control characters, its spaces folded, at most `limit` characters:
    fit for a terminal, a log line or a table cell."""
    line = text.strip().split("\n", 1)[0]
    return " ".join(_UNPRINTABLE.sub(" ", line).split())[:limit]


@dataclass(frozen=True)
class Message:
    TYPE: ClassVar[str] = ""

    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data["type"] = self.TYPE
        data["schema_version"] = SCHEMA_VERSION
        return data

    def to_json(self) -> bytes:
        return json.dumps(self.to_dict(), separators=(",", ":"), ensure_ascii=False).encode()

    @classmethod
    def from_json(cls, body: bytes) -> Message:
        msg = decode(body)
        if not isinstance(msg, cls):
            raise DecodeError(f"expected {cls.TYPE}, got {msg.TYPE}")
        return msg


@dataclass(frozen=True)
class CommitSeen(Message):
    """The observer (or a git hook) saw a new commit on a watched branch."""

    TYPE: ClassVar[str] = "commit_seen"
    repo: str
    branch: str
    commit: str
    seen_at: float
    source: str = "poll"
    # Runner labels the commit's .volt.toml requires ([test] labels).
    labels: list[str] = field(default_factory=list)
    # [test] split and rerun_failures of the commit's .volt.toml.
    split: int = 1
    rerun_failures: int = 0
    # The commit's first line and author, for people reading the results.
    subject: str = ""
    author: str = ""

    def __post_init__(self) -> None:
        check_commit(self.commit)
        check_labels(self.labels)
        _check_nonempty(repo=self.repo, branch=self.branch)
        check_branch(self.branch)
        check_split(self.split, self.rerun_failures)


@dataclass(frozen=True)
class Job(Message):
    """One attempt at testing one commit, sent to the backlog and then to one runner."""

    TYPE: ClassVar[str] = "job"
    job_id: str
    attempt: int
    repo: str
    branch: str
    commit: str
    labels: list[str] = field(default_factory=list)
    # Set when the dispatcher assigns it: the token that fences this
    # assignment (only the assigned runner learns it, and echoes it in every
    # message about the job), and how long the dispatcher keeps the job
    # without a heartbeat echoing it. Empty in the backlog.
    lease: str = ""
    lease_s: float = 0.0
    # A shard of a split run (dispatcher/runs.py): the run's job id. The
    # runner then runs the tests the dispatcher hands it, chunk by chunk.
    run: str = ""

    def __post_init__(self) -> None:
        check_commit(self.commit)
        check_labels(self.labels)
        _check_nonempty(job_id=self.job_id, repo=self.repo, branch=self.branch)
        check_branch(self.branch)
        if self.attempt < 1:
            raise ValueError(f"attempt must be at least 1, got {self.attempt}")


@dataclass(frozen=True)
class CancelJob(Message):
    """Dispatcher to runner: stop this attempt (it was given away or cancelled)."""

    TYPE: ClassVar[str] = "cancel_job"
    job_id: str
    attempt: int
    reason: str = ""
    lease: str = ""  # a runner cancels only the assignment this names


@dataclass(frozen=True)
class RunnerCommand(Message):
    """Dispatcher to runner, on an operator's word: pause, resume or drain."""

    TYPE: ClassVar[str] = "runner_command"
    ACTIONS: ClassVar[tuple[str, ...]] = ("pause", "resume", "drain")
    action: str
    reason: str = ""

    def __post_init__(self) -> None:
        if self.action not in self.ACTIONS:
            raise ValueError(f"unknown runner command {self.action!r}")


@dataclass(frozen=True)
class Hello(Message):
    """A runner's state. Sent at start (Hello) and then every interval (Heartbeat).

    Every heartbeat is a full snapshot, so a restarted dispatcher rebuilds its
    registry from the next round of heartbeats. `session` changes with every
    runner process, so a restart under the same id is told apart.
    """

    TYPE: ClassVar[str] = "hello"
    runner_id: str
    session: str
    host: str = ""
    pid: int = 0
    state: str = "idle"  # idle | busy | paused | draining
    job_id: str = ""
    attempt: int = 0
    interval: float = 2.0
    labels: list[str] = field(default_factory=list)
    sent_at: float = 0.0
    lease: str = ""  # of the job it runs: each heartbeat that echoes it renews the lease

    def __post_init__(self) -> None:
        check_labels(self.labels)
        if self.state not in RUNNER_STATES:
            raise ValueError(f"unknown runner state {self.state!r:.40}")


@dataclass(frozen=True)
class Heartbeat(Hello):
    TYPE: ClassVar[str] = "heartbeat"


@dataclass(frozen=True)
class Goodbye(Message):
    """A runner leaving on purpose; an abandoned job goes back to the backlog at once."""

    TYPE: ClassVar[str] = "goodbye"
    runner_id: str
    session: str
    job_id: str = ""
    attempt: int = 0
    reason: str = ""
    lease: str = ""  # of the job it hands back; without it the job waits for its lease to end


@dataclass(frozen=True)
class Mark(Message):
    """The dispatcher to itself, through its control queue: once it comes back,
    every heartbeat sent before it has been heard (dispatcher/hearing.py)."""

    TYPE: ClassVar[str] = "mark"
    token: str


@dataclass(frozen=True)
class JobStarted(Message):
    TYPE: ClassVar[str] = "job_started"
    job_id: str
    attempt: int
    runner_id: str
    session: str
    started_at: float
    lease: str = ""


@dataclass(frozen=True)
class JobRejected(Message):
    """A runner could not take a job it was sent (busy, draining); re-queue it."""

    TYPE: ClassVar[str] = "job_rejected"
    job_id: str
    attempt: int
    runner_id: str
    reason: str = ""
    lease: str = ""


@dataclass(frozen=True)
class JobAbandoned(Message):
    """A runner gave up an attempt it had started (its lease ran out while it
    could not heartbeat, or it failed inside); the job is tried again."""

    TYPE: ClassVar[str] = "job_abandoned"
    job_id: str
    attempt: int
    runner_id: str
    lease: str
    reason: str = ""


@dataclass(frozen=True)
class JobResult(Message):
    TYPE: ClassVar[str] = "job_result"
    job_id: str
    attempt: int
    runner_id: str
    status: str
    exit_code: int | None = None
    passed: int = 0
    failed: int = 0
    errors: int = 0
    skipped: int = 0
    duration_s: float = 0.0
    started_at: float = 0.0
    finished_at: float = 0.0
    reason: str = ""
    log_head: str = ""
    log_tail: str = ""
    log_bytes: int = 0
    # zlib-compressed, base64-encoded whole log; empty when it was too big to ship.
    log_full: str = ""
    lease: str = ""  # a result counts only with the lease of the job's current assignment
    # One [node id, outcome, seconds] per test, from the JUnit XML (runner/junit.py).
    tests: list[list[Any]] = field(default_factory=list)

    def __post_init__(self) -> None:
        if self.status not in STATUSES:
            raise ValueError(f"unknown status {self.status!r}")


@dataclass(frozen=True)
class ChunkRequest(Message):
    """A shard's runner to the dispatcher: what it collected (first), the tests
    it finished since it last asked, and whether it wants more. `seq` numbers
    the asks of one assignment, so one sent again is answered again, not twice."""

    TYPE: ClassVar[str] = "chunk_request"
    job_id: str  # the shard's
    attempt: int
    runner_id: str
    lease: str
    seq: int
    collected: list[str] | None = None  # node ids, sorted: only with the first ask
    results: list[list[Any]] = field(default_factory=list)  # [node id, outcome, seconds]
    more: bool = True


@dataclass(frozen=True)
class Chunk(Message):
    """The dispatcher's answer to a ChunkRequest: tests to run next (none: the
    run needs no more of this shard), or why the shard must stop."""

    TYPE: ClassVar[str] = "chunk"
    job_id: str
    lease: str
    seq: int
    tests: list[str] = field(default_factory=list)
    stop: str = ""


@dataclass(frozen=True)
class Request(Message):
    """A question to the dispatcher over request/reply (status, results, log)."""

    TYPE: ClassVar[str] = "request"
    method: str
    params: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Reply(Message):
    TYPE: ClassVar[str] = "reply"
    ok: bool
    data: Any = None
    error: str = ""


def _check_nonempty(**values: str) -> None:
    for name, value in values.items():
        if not value:
            raise ValueError(f"{name} must not be empty")


TYPES: dict[str, type[Message]] = {
    cls.TYPE: cls
    for cls in (
        CommitSeen,
        Job,
        CancelJob,
        RunnerCommand,
        Hello,
        Heartbeat,
        Goodbye,
        Mark,
        JobStarted,
        JobRejected,
        JobAbandoned,
        JobResult,
        ChunkRequest,
        Chunk,
        Request,
        Reply,
    )
}


def decode(body: bytes) -> Message:
    """Turn a message body into its type, or raise DecodeError with the reason."""
    if len(body) > MAX_MESSAGE_BYTES:
        raise DecodeError(f"message too large: {len(body)} bytes (limit {MAX_MESSAGE_BYTES})")
    try:
        data = json.loads(body.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:  # RecursionError: deep nesting
        raise DecodeError(f"not UTF-8 JSON: {exc}") from None
    if not isinstance(data, dict):
        raise DecodeError("not a JSON object")
    if _LONE_SURROGATE_ESCAPE.search(body) and _has_lone_surrogate(data):
        # json accepts "\ud800"; such a string cannot be encoded to UTF-8 again
        # (SQLite, logs, replies), so it would fail far from here.
        raise DecodeError("a string holds a lone UTF-16 surrogate")
    kind = data.get("type")
    cls = TYPES.get(kind) if isinstance(kind, str) else None
    if cls is None:
        raise DecodeError(f"unknown message type {kind!r:.60}")
    version = data.get("schema_version")
    if type(version) is not int or version != SCHEMA_VERSION:  # true and 1.0 equal 1 too
        raise DecodeError(f"unknown schema_version {version!r:.60} for {kind}")
    kwargs: dict[str, Any] = {}
    for f in dataclasses.fields(cls):
        if f.name in data:
            kwargs[f.name] = _check_type(cls, f.name, data[f.name])
    _check_sizes(cls.TYPE, kwargs)
    try:
        return cls(**kwargs)
    except TypeError as exc:  # a required field is missing
        raise DecodeError(f"{kind}: {exc}") from None
    except ValueError as exc:
        raise DecodeError(f"{kind}: {exc}") from None


# Ids (a job's, a runner's, a lease, a session) are short and plain wherever
# they are made; a repository is a URL or a path. Either is a key in the
# dispatcher's store, whose index entries have a size limit on PostgreSQL.
_ID = re.compile(r"[A-Za-z0-9_.:-]{0,128}")
_ID_FIELDS = ("job_id", "runner_id", "lease", "session", "run")
MAX_REPO_BYTES = 1000


def _check_sizes(kind: str, fields: dict[str, Any]) -> None:
    for name in _ID_FIELDS:
        value = fields.get(name)
        if isinstance(value, str) and not _ID.fullmatch(value):
            raise DecodeError(
                f"{kind}: field {name!r} is not an id (at most 128 letters, digits and _.:-): {value!r:.60}"
            )
    repo = fields.get("repo")
    if isinstance(repo, str) and len(repo.encode()) > MAX_REPO_BYTES:
        raise DecodeError(f"{kind}: field 'repo' is longer than {MAX_REPO_BYTES} bytes")


_LONE_SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89a-fA-F]")
_INT64 = range(-(2**63), 2**63)


def _has_lone_surrogate(data: Any) -> bool:
    stack = [data]
    while stack:
        item = stack.pop()
        if isinstance(item, str):
            if any("\ud800" <= c <= "\udfff" for c in item):
                return True
        elif isinstance(item, dict):
            stack.extend(item.keys())
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)
    return False


_HINTS: dict[type, dict[str, Any]] = {}


def _check_type(cls: type[Message], name: str, value: Any) -> Any:
    hints = _HINTS.get(cls)
    if hints is None:
        hints = _HINTS[cls] = typing.get_type_hints(cls)
    if not _matches(hints[name], value):
        if isinstance(value, (int, float)) and not isinstance(value, bool) and _matches(hints[name], type(value)(0)):
            raise DecodeError(f"{cls.TYPE}: field {name!r} is out of range ({value!r:.40})")
        raise DecodeError(f"{cls.TYPE}: field {name!r} has the wrong type ({type(value).__name__})")
    return value


def _matches(hint: Any, value: Any) -> bool:
    if hint is Any:
        return True
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        return any(_matches(arg, value) for arg in typing.get_args(hint))
    if hint is type(None):
        return value is None
    if origin is list:
        (item,) = typing.get_args(hint)
        return isinstance(value, list) and all(_matches(item, v) for v in value)
    if origin is dict:
        return isinstance(value, dict)
    # Numbers must also fit where they go: SQLite takes 64-bit integers, and
    # NaN (which json accepts) breaks every comparison, e.g. a liveness deadline.
    if isinstance(value, bool):
        return hint is bool
    if hint is float and isinstance(value, float):
        return math.isfinite(value)
    if hint in (int, float):
        return isinstance(value, int) and value in _INT64
    return isinstance(value, hint)
