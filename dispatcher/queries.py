"""Answers to `volt status`, `volt results` and `volt log`, asked over request/reply."""

from __future__ import annotations

import re
import time
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from common import naming
from common.messages import Request
from dispatcher.store import JobRow

if TYPE_CHECKING:
    from dispatcher.service import Dispatcher

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


def answer(d: Dispatcher, req: Request) -> Any:
    handler = _HANDLERS.get(req.method)
    if handler is None:
        raise QueryError(f"unknown request {req.method!r}")
    return handler(d, req.params)


def _status(d: Dispatcher, params: dict[str, Any]) -> dict[str, Any]:
    now = d.clock()
    busy = {row.runner: row for row in d.store.in_state("assigned", "running")}
    runners = []
    for info in sorted(d.registry.runners.values(), key=lambda r: r.runner_id):
        row = busy.get(info.runner_id)
        queue = d.broker.queue_depth(naming.runner_queue(d.ns, info.runner_id))
        runners.append(
            {
                "runner_id": info.runner_id,
                "host": info.host,
                "state": "busy" if row else ("draining" if info.state == "draining" else "idle"),
                "job_id": row.job_id if row else None,
                "commit": row.commit_sha if row else None,
                "labels": info.labels,
                "heartbeat_interval_s": info.interval,
                "seconds_since_heartbeat": round(now - info.last_seen, 2),
                "queue": {"name": naming.runner_queue(d.ns, info.runner_id), "ready": queue[0] if queue else None},
            }
        )
    queues = {}
    for name in naming.shared_queues(d.ns):
        depth = d.broker.queue_depth(name)
        queues[name] = {"ready": depth[0], "consumers": depth[1]} if depth else None
    waiting = d.store.in_state("pending", "queued")
    return {
        "namespace": d.ns,
        "time": iso(time.time()),
        "runners": runners,
        "queues": queues,
        "jobs": d.store.count_by_state(),
        "results": d.store.count_by_status(),
        "waiting": [job_dict(r) for r in waiting[:50]],
        "waiting_count": len(waiting),
        "running": [job_dict(r) for r in busy.values()],
    }


def _results(d: Dispatcher, params: dict[str, Any]) -> list[dict[str, Any]]:
    limit = params.get("limit", 50)
    if not isinstance(limit, int) or not 1 <= limit <= 10000:
        raise QueryError("limit must be a whole number from 1 to 10000")
    for key in ("repo", "branch"):
        if params.get(key) is not None and not isinstance(params[key], str):
            raise QueryError(f"{key} must be a string")
    commit = params.get("commit")
    if commit is not None and not re.fullmatch(r"[0-9a-fA-F]{4,64}", str(commit)):
        raise QueryError(f"not a commit id or prefix: {commit!r:.80}")
    rows = d.store.find(
        repo=params.get("repo"),
        branch=params.get("branch"),
        commit=commit,
        limit=limit,
        done_only=bool(params.get("done_only", True)),
    )
    return [job_dict(r, d.store.events(r.job_id)) for r in rows]


def _log(d: Dispatcher, params: dict[str, Any]) -> dict[str, Any]:
    key = str(params.get("id", "")).strip()
    if not re.fullmatch(r"[0-9a-fA-F]{4,64}", key):
        raise QueryError(f"not a job id or commit: {key!r:.80}")
    row = d.store.get(key)
    if row is None:
        matches = d.store.find(commit=key, limit=2)
        if not matches:
            raise QueryError(f"no job or commit {key}")
        if len(matches) > 1 and not all(m.commit_sha == matches[0].commit_sha for m in matches):
            raise QueryError(f"{key} matches more than one commit; give more of it or the job id")
        row = matches[0]
    log = d.store.log(row.job_id) or {}
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


def _ping(d: Dispatcher, params: dict[str, Any]) -> dict[str, Any]:
    return {"runners": len(d.registry.runners), "time": iso(time.time())}


_HANDLERS = {"status": _status, "results": _results, "log": _log, "ping": _ping}
