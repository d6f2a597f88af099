"""Answers to `volt status`, `volt results`, `volt tests` and `volt log`, asked over request/reply.

Runners and queue depths come from the dispatcher's snapshot (dispatcher/snapshot.py),
never from the broker: a question costs the dispatcher's loop no round trip.
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Callable, Iterable
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from common import naming
from common.messages import MAX_MESSAGE_BYTES, Request, RunnerCommand
from dispatcher import history
from dispatcher.registry import TAKES_JOBS, RunnerInfo, has_labels
from dispatcher.store import MAX_NODE_ID, JobRow, Store

if TYPE_CHECKING:
    from dispatcher.service import Dispatcher

# (ready messages, consumers) of a queue by name; None when it does not exist
# (or, in the dispatcher's snapshot, was not looked at yet).
QueueDepth = Callable[[str], tuple[int, int] | None]

# A `log` reply is one message, so its encoded size counts, in bytes: our own
# decode refuses more than MAX_MESSAGE_BYTES (16 MiB), and RabbitMQ refuses
# more than its max_message_size (128 MiB by default on 3.10 to 3.13, 16 MiB
# from 4.0). Half of ours leaves room for the rest of the reply.
MAX_LOG_REPLY_BYTES = MAX_MESSAGE_BYTES // 2


class QueryError(Exception):
    """A request we understand but cannot answer; the message goes back to the asker."""


def iso(ts: float | None) -> str | None:
    """ISO 8601 UTC; None for no time or one no calendar holds (a hostile seen_at)."""
    if ts is None:
        return None
    try:
        return datetime.fromtimestamp(ts, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")
    except (OverflowError, OSError, ValueError):
        return None


def job_dict(row: JobRow, events: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    data: dict[str, Any] = {
        "job_id": row.job_id,
        "repo": row.repo,
        "branch": row.branch,
        "commit": row.commit_sha,
        "state": row.state,
        "status": row.status,
        "attempts": row.attempt,
        "runner": row.runner,
        "passed": row.passed,
        "failed": row.failed,
        "errors": row.errors,
        "skipped": row.skipped,
        "duration_s": row.duration_s,
        "exit_code": row.exit_code,
        "reason": row.reason,
        "seen_at": iso(row.seen_at),
        "queued_at": iso(row.queued_at),
        "started_at": iso(row.started_at),
        "finished_at": iso(row.finished_at),
        "subject": row.subject,
        "author": row.author,
        "split": row.split,
    }
    if row.parent:
        data["run"] = row.parent
    if events is not None:
        data["history"] = [{**e, "at": iso(e["at"])} for e in events]
    return data


def answer(d: Dispatcher, req: Request, asker: str | None = None) -> Any:
    """The reply to a request; `asker` is the RabbitMQ user who sent it, if it said."""
    if req.method == "runner_ctl":  # the one request that changes something: it needs the asker
        return _runner_ctl(d, req.params, asker)
    handler = _HANDLERS.get(req.method)
    if handler is None:
        raise QueryError(f"unknown request {req.method!r}")
    return handler(d, req.params)


def runner_state(info: RunnerInfo, has_job: bool) -> str:
    """paused or draining when it says so (a job it still runs is shown beside it),
    else busy when the store gives it a job, else idle."""
    if info.state in ("draining", "paused"):
        return info.state
    return "busy" if has_job else "idle"


def status(store: Store, ns: str, runners: Iterable[RunnerInfo], now: float, depth: QueueDepth) -> dict[str, Any]:
    """Live runners, shared queue depths, waiting and running jobs. `now` is on the clock
    of the runners' last_seen; `depth` answers queue depths (the snapshot's)."""
    busy = {row.runner: row for row in store.in_state("assigned", "running")}
    runner_list = []
    live = sorted(runners, key=lambda r: r.runner_id)
    for info in live:
        row = busy.get(info.runner_id)
        runner_list.append(
            {
                "runner_id": info.runner_id,
                "host": info.host,
                "state": runner_state(info, row is not None),
                "job_id": row.job_id if row else None,
                "commit": row.commit_sha if row else None,
                "labels": info.labels,
                "heartbeat_interval_s": info.interval,
                "seconds_since_heartbeat": round(now - info.last_seen, 2),
                # Its depth is not looked at: one broker call per runner per question is
                # what the snapshot exists to avoid, and it holds at most the job it was given.
                "queue": {"name": naming.runner_queue(ns, info.runner_id)},
            }
        )
    queues = {}
    for name in naming.shared_queues(ns):
        found = depth(name)
        queues[name] = {"ready": found[0], "consumers": found[1]} if found else None
    waiting = store.in_state("pending", "queued", "parked")
    return {
        "namespace": ns,
        "time": iso(time.time()),
        "runners": runner_list,
        "queues": queues,
        "jobs": store.count_by_state(),
        "results": store.count_by_status(),
        "waiting": [{**job_dict(r), "why": why_waiting(r, live, busy)} for r in waiting[:50]],
        "waiting_count": len(waiting),
        "running": [job_dict(r) for r in busy.values()],
        "split_runs": [split_run(store, r) for r in store.in_state("split")[:50]],
    }


def split_run(store: Store, row: JobRow) -> dict[str, Any]:
    """A split run under way: its shards' states and how far its work queue is."""
    chunks = store.chunks(row.job_id)
    shards = store.shards(row.job_id)
    return {
        **job_dict(row),
        "shards": {s.job_id: s.state for s in shards},
        "chunks": len(chunks),
        "chunks_done": sum(c.state == "done" for c in chunks),
    }


def why_waiting(row: JobRow, runners: list[RunnerInfo], busy: dict[str | None, JobRow]) -> str:
    """One line on what a waiting job waits for."""
    need = f"labels {', '.join(row.labels)}" if row.labels else ""
    able = [r for r in runners if has_labels(r, row.labels)]
    if not able:
        return f"no live runner has {need}" if need else "no live runner"
    takers = [r for r in able if r.state in TAKES_JOBS]
    if not takers:
        return f"every runner{' with ' + need if need else ''} is paused or draining"
    if all(r.runner_id in busy for r in takers):
        return f"waiting for a free runner{' with ' + need if need else ''} ({len(takers)} busy)"
    return "about to be assigned"


def results(store: Store, params: dict[str, Any]) -> list[dict[str, Any]]:
    """Jobs (by default only finished ones) with their history, newest first."""
    return _results_and_total(store, params, total=False)[0]


def results_with_total(store: Store, params: dict[str, Any]) -> dict[str, Any]:
    """results() as {"results": [...], "total": N}: N is how many match without the limit."""
    rows, total = _results_and_total(store, params, total=True)
    return {"results": rows, "total": total}


def _results_and_total(store: Store, params: dict[str, Any], total: bool) -> tuple[list[dict[str, Any]], int]:
    limit = params.get("limit", 50)
    if not isinstance(limit, int) or isinstance(limit, bool) or not 1 <= limit <= 10000:
        raise QueryError("limit must be a whole number from 1 to 10000")
    for key in ("repo", "branch"):
        if params.get(key) is not None and not isinstance(params[key], str):
            raise QueryError(f"{key} must be a string")
    commit = params.get("commit")
    if commit is not None:
        if not isinstance(commit, str) or not re.fullmatch(r"[0-9a-fA-F]{4,64}", commit):
            raise QueryError(f"not a commit id or prefix: {commit!r:.80}")
    repo, branch, done_only = params.get("repo"), params.get("branch"), bool(params.get("done_only", True))
    rows = store.find(repo=repo, branch=branch, commit=commit, limit=limit, done_only=done_only)
    tests = store.test_summary([r.job_id for r in rows])
    found = [{**job_dict(r, store.events(r.job_id)), **tests.get(r.job_id, _NO_TESTS)} for r in rows]
    if not total or len(found) < limit:
        return found, len(found)
    return found, store.count(repo=repo, branch=branch, commit=commit, done_only=done_only)


_NO_TESTS: dict[str, list[str]] = {"failing_tests": [], "flaky": []}
# A job's id: 16 hex digits, and a shard's .N after its run's.
JOB_ID = r"[0-9a-f]{16}(?:\.[0-9]{1,3})?"
# A job id, or a commit id or prefix.
_JOB_KEY = re.compile(rf"[0-9a-fA-F]{{4,64}}|{JOB_ID}")
# The runs of a repository `volt tests --flaky` looks at.
FLAKY_JOBS = 100
TESTS_MAX = 1000


def tests(store: Store, params: dict[str, Any]) -> dict[str, Any]:
    """`volt tests`: one test's history on a branch (`test`), the tests that fail
    on the branch's latest finished job, or (`flaky`) the tests flaky lately."""
    repo, branch, test = params.get("repo"), params.get("branch"), params.get("test")
    limit = params.get("limit", 50)
    if not isinstance(repo, str) or not repo:
        raise QueryError("tests needs a repo")
    if branch is not None and not isinstance(branch, str):
        raise QueryError("branch must be a string")
    if test is not None and (not isinstance(test, str) or not 0 < len(test) <= MAX_NODE_ID):
        raise QueryError(f"test must be a node id of 1 to {MAX_NODE_ID} characters")
    if not isinstance(limit, int) or isinstance(limit, bool) or not 1 <= limit <= TESTS_MAX:
        raise QueryError(f"limit must be a whole number from 1 to {TESTS_MAX}")
    if params.get("flaky"):
        looked, flaky = store.flaky_tests(repo, branch, FLAKY_JOBS)
        return {
            "repo": repo,
            "branch": branch,
            "jobs": looked,
            "flaky": [{"test": node, "flaky_runs": count} for node, count in flaky[:limit]],
            "total": len(flaky),
        }
    latest = store.find(repo=repo, branch=branch, limit=1, done_only=True)
    if branch is None:  # the branch of the repository's latest finished job
        branch = latest[0].branch if latest else None
    answer: dict[str, Any] = {"repo": repo, "branch": branch}
    if test is not None:
        runs = store.test_runs(repo, branch, [test])[test] if branch else []
        return {
            **answer,
            "test": test,
            "runs": [_test_run(r) for r in runs[:limit]],
            "total": len(runs),
            **history.streak_dict(history.failing_streak(runs)),
            "trend": history.trend(runs),
        }
    job = latest[0] if latest else None
    failing = [t.node_id for t in store.tests(job.job_id) if t.outcome in history.FAILING] if job else []
    found = store.test_runs(job.repo, job.branch, failing[:limit]) if job else {}
    return {
        **answer,
        "job": job_dict(job) if job else None,
        "failing": [{"test": node, **history.streak_dict(history.failing_streak(found[node]))} for node in found],
        "total": len(failing),
    }


def _test_run(run: history.TestRun) -> dict[str, Any]:
    return {
        "job_id": run.job_id,
        "commit": run.commit_sha,
        "subject": run.subject,
        "author": run.author,
        "outcome": run.outcome,
        "duration_s": run.duration_s,
        "finished_at": iso(run.finished_at),
    }


def job_log(store: Store, key: str, max_bytes: int | None = None) -> dict[str, Any]:
    """A job (by id, or by commit or commit prefix) and its log: head, tail, size and,
    when it was kept and the reply stays within max_bytes (MAX_LOG_REPLY_BYTES) encoded,
    the whole of it; `cut` says why the whole log is not in the reply when it was kept."""
    limit = MAX_LOG_REPLY_BYTES if max_bytes is None else max_bytes
    key = key.strip()
    if not _JOB_KEY.fullmatch(key):
        raise QueryError(f"not a job id or commit: {key!r:.80}")
    row = store.get(key)
    if row is None:
        matches = store.find(commit=key, limit=2)
        if not matches:
            raise QueryError(f"no job or commit {key}")
        if len(matches) > 1 and not all(m.commit_sha == matches[0].commit_sha for m in matches):
            raise QueryError(f"{key} matches more than one commit; give more of it or the job id")
        row = matches[0]
    reply: dict[str, Any] = {"job": job_dict(row), "head": "", "tail": "", "bytes": 0, "full": None, "cut": ""}
    # What the rest of the reply leaves for the whole log. Inflating no further
    # than that also keeps a hostile log's memory off the dispatcher.
    budget = limit - encoded_size(reply)
    log = store.log(row.job_id, max_full_bytes=max(0, budget)) or {}
    reply.update(head=log.get("head", ""), tail=log.get("tail", ""), bytes=log.get("bytes", 0))
    budget = limit - encoded_size(reply)
    full = log.get("full")
    if full is not None and encoded_size(full) <= budget:
        reply["full"] = full
    elif full is not None or store.log_compressed(row.job_id) is not None:
        reply["cut"] = (
            f"the whole log ({reply['bytes']} bytes) is more than one reply holds ({limit} bytes): "
            f"here are its head and tail; the results page's /jobs/{row.job_id}/log.txt has all of it"
        )
    return reply


def encoded_size(value: Any) -> int:
    """Bytes of `value` in a message (Message.to_json's encoding): a character may
    take up to 4 bytes, and a control character 6 as a JSON escape."""
    return len(json.dumps(value, separators=(",", ":"), ensure_ascii=False).encode())


def log_text(head: str, tail: str, size: int, full: str | None, dropped: str = "not kept") -> str:
    """The whole log when it was kept, else its head, a marker for what was dropped, and its tail."""
    if full is not None:
        return full
    if not tail:
        return head
    skipped = size - len(head.encode()) - len(tail.encode())
    marker = f"\n[... {skipped} bytes {dropped} ...]\n" if skipped > 0 else ""
    return head + marker + tail


def _status(d: Dispatcher, params: dict[str, Any]) -> dict[str, Any]:
    # From the snapshot: no broker call on the dispatcher's loop for a question.
    snap = d.snapshot
    return status(d.store, d.ns, snap.runners, snap.now(d.wall()), snap.depth)


def _results(d: Dispatcher, params: dict[str, Any]) -> list[dict[str, Any]] | dict[str, Any]:
    # A plain list unless the asker wants the total: older clients read a list.
    if params.get("with_total") is True:
        return results_with_total(d.store, params)
    return results(d.store, params)


def _tests(d: Dispatcher, params: dict[str, Any]) -> dict[str, Any]:
    return tests(d.store, params)


def _log(d: Dispatcher, params: dict[str, Any]) -> dict[str, Any]:
    return job_log(d.store, str(params.get("id", "")))


def _runner_ctl(d: Dispatcher, params: dict[str, Any], asker: str | None) -> dict[str, Any]:
    runner, action = params.get("runner"), params.get("action")
    if not isinstance(runner, str) or action not in RunnerCommand.ACTIONS:
        raise QueryError(f"runner_ctl needs a runner id and one of {', '.join(RunnerCommand.ACTIONS)}")
    return d.command_runner(runner, str(action), str(params.get("reason", ""))[:200], asker=asker)


def _ping(d: Dispatcher, params: dict[str, Any]) -> dict[str, Any]:
    return {"runners": len(d.snapshot.runners), "time": iso(time.time())}


_HANDLERS = {
    "status": _status,
    "results": _results,
    "tests": _tests,
    "log": _log,
    "ping": _ping,
}
