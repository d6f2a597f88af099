"""Answers to `volt status`, `volt results` and `volt log`, asked over request/reply."""

from __future__ import annotations

import re
import time
from collections.abc import Callable, Iterable
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from common import naming
from common.messages import Request, RunnerCommand
from dispatcher.registry import TAKES_JOBS, RunnerInfo, has_labels
from dispatcher.store import JobRow, Store

if TYPE_CHECKING:
    from dispatcher.service import Dispatcher

# (ready messages, consumers) of a queue by name; None when it does not exist
# (or, for the web page's snapshot, was not looked at).
QueueDepth = Callable[[str], tuple[int, int] | None]

MAX_LOG_CHARS = 8 * 1024 * 1024


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
    }
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
    """Live runners, queue depths, waiting and running jobs. `now` is on the clock of
    the runners' last_seen; `depth` answers queue depths (the broker, or a snapshot)."""
    busy = {row.runner: row for row in store.in_state("assigned", "running")}
    runner_list = []
    live = sorted(runners, key=lambda r: r.runner_id)
    for info in live:
        row = busy.get(info.runner_id)
        queue = depth(naming.runner_queue(ns, info.runner_id))
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
                "queue": {"name": naming.runner_queue(ns, info.runner_id), "ready": queue[0] if queue else None},
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
    limit = params.get("limit", 50)
    if not isinstance(limit, int) or not 1 <= limit <= 10000:
        raise QueryError("limit must be a whole number from 1 to 10000")
    for key in ("repo", "branch"):
        if params.get(key) is not None and not isinstance(params[key], str):
            raise QueryError(f"{key} must be a string")
    commit = params.get("commit")
    if commit is not None and not re.fullmatch(r"[0-9a-fA-F]{4,64}", str(commit)):
        raise QueryError(f"not a commit id or prefix: {commit!r:.80}")
    rows = store.find(
        repo=params.get("repo"),
        branch=params.get("branch"),
        commit=commit,
        limit=limit,
        done_only=bool(params.get("done_only", True)),
    )
    return [job_dict(r, store.events(r.job_id)) for r in rows]


def job_log(store: Store, key: str) -> dict[str, Any]:
    """A job (by id, or by commit or commit prefix) and its log: head, tail, size and,
    when it was kept and is not too big, the whole of it."""
    key = key.strip()
    if not re.fullmatch(r"[0-9a-fA-F]{4,64}", key):
        raise QueryError(f"not a job id or commit: {key!r:.80}")
    row = store.get(key)
    if row is None:
        matches = store.find(commit=key, limit=2)
        if not matches:
            raise QueryError(f"no job or commit {key}")
        if len(matches) > 1 and not all(m.commit_sha == matches[0].commit_sha for m in matches):
            raise QueryError(f"{key} matches more than one commit; give more of it or the job id")
        row = matches[0]
    log = store.log(row.job_id) or {}
    full = log.get("full")
    if full is not None and len(full) > MAX_LOG_CHARS:
        full = None
    return {
        "job": job_dict(row),
        "head": log.get("head", ""),
        "tail": log.get("tail", ""),
        "bytes": log.get("bytes", 0),
        "full": full,
    }


def log_text(head: str, tail: str, size: int, full: str | None) -> str:
    """The whole log when it was kept, else its head, a marker for what was dropped, and its tail."""
    if full is not None:
        return full
    if not tail:
        return head
    skipped = size - len(head.encode()) - len(tail.encode())
    marker = f"\n[... {skipped} bytes not kept ...]\n" if skipped > 0 else ""
    return head + marker + tail


def _status(d: Dispatcher, params: dict[str, Any]) -> dict[str, Any]:
    return status(d.store, d.ns, d.registry.runners.values(), d.clock(), d.broker.queue_depth)


def _results(d: Dispatcher, params: dict[str, Any]) -> list[dict[str, Any]]:
    return results(d.store, params)


def _log(d: Dispatcher, params: dict[str, Any]) -> dict[str, Any]:
    return job_log(d.store, str(params.get("id", "")))


def _runner_ctl(d: Dispatcher, params: dict[str, Any], asker: str | None) -> dict[str, Any]:
    runner, action = params.get("runner"), params.get("action")
    if not isinstance(runner, str) or action not in RunnerCommand.ACTIONS:
        raise QueryError(f"runner_ctl needs a runner id and one of {', '.join(RunnerCommand.ACTIONS)}")
    return d.command_runner(runner, str(action), str(params.get("reason", ""))[:200], asker=asker)


def _ping(d: Dispatcher, params: dict[str, Any]) -> dict[str, Any]:
    return {"runners": len(d.registry.runners), "time": iso(time.time())}


_HANDLERS = {
    "status": _status,
    "results": _results,
    "log": _log,
    "ping": _ping,
}
