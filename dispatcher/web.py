"""The dispatcher's HTTP side: a read-only results page, its JSON, and /metrics.

Standard library only: http.server's ThreadingHTTPServer on a daemon thread,
and HTML from string templates with every value through html.escape. The
server's threads never touch the broker or the main thread's SQLite
connection: each request opens its own read-only connection to the store
(WAL lets it read while the main thread writes), and runners and queue depths
come from the snapshot the main thread swaps in (dispatcher/snapshot.py).

    /                      recent jobs per repository and branch, live runners, queues
    /jobs/<job_id>         a job: status, counts, reason, failing and flaky tests, shards, history, its log
    /tests?repo=&branch=   a branch's failing tests (since when) and, with &test=, one test's history;
                           &flaky=1: the tests flaky in its last 100 jobs
    /jobs/<job_id>/log.txt the whole log, streamed (or head, a marker and tail when it was not kept)
    /api/status            the `volt status` answer
    /api/results           the `volt results` answer (?repo= &branch= &commit= &limit= &done_only=0)
    /api/jobs/<job_id>     a job with its history and its log's head and tail
    /metrics               Prometheus metrics
"""

from __future__ import annotations

import base64
import hashlib
import json
import logging
import re
import socket
import sqlite3
import threading
import time
import urllib.parse
import zlib
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from string import Template
from typing import TYPE_CHECKING, Any

from common.settings import SettingsError
from dispatcher import history, queries
from dispatcher.chart import chart
from dispatcher.metrics import CONTENT_TYPE as METRICS_CONTENT_TYPE
from dispatcher.metrics import Live, Metrics
from dispatcher.render import (
    TESTS_SHOWN,
    badge,
    counts,
    duration,
    e,
    job_link,
    job_tests,
    shards,
    subject,
    tests_href,
    tests_page,
    when,
)
from dispatcher.snapshot import Snapshot
from dispatcher.store import LOG_FULL_MAX_BYTES, Store, StoreError, is_url

if TYPE_CHECKING:
    from dispatcher.service import Dispatcher

log = logging.getLogger(__name__)

# Requests served at once; one more is answered 503 at once. Each holds a
# thread and a store connection, and a client that sends nothing holds its
# slot for up to _Handler.timeout.
MAX_REQUESTS = 16
LOG_CHUNK = 256 * 1024  # bytes of a log inflated and sent at a time
RECENT_JOBS = 200  # jobs the results page reads, newest first
JOBS_CHARTED = 50  # finished jobs in a branch's chart
PER_BRANCH = 20  # of those, shown per repository and branch
REFRESH_MS = 2000
JOB_PATH = re.compile(rf"(/jobs/|/api/jobs/)({queries.JOB_ID})(/log\.txt)?")
CHARTS = 20  # branches of the results page that get a chart, the most recently active first

# Refreshes the part of the page marked #live in place, by fetching the same
# page's fragment (one renderer for both), while it says data-refresh="1".
# Without JavaScript the page is still whole, only not live.
SCRIPT = f"""
(function () {{
  function tick() {{
    var live = document.getElementById("live");
    if (!live || live.getAttribute("data-refresh") !== "1") return;
    fetch(location.pathname + "?fragment=1", {{cache: "no-store"}})
      .then(function (r) {{ if (!r.ok) throw new Error("HTTP " + r.status); return r.text(); }})
      .then(function (text) {{
        var t = document.createElement("template");
        t.innerHTML = text;
        var fresh = t.content.getElementById("live");
        if (fresh) live.replaceWith(fresh);
        document.getElementById("offline").hidden = true;
      }})
      .catch(function () {{ document.getElementById("offline").hidden = false; }})
      .finally(function () {{ setTimeout(tick, {REFRESH_MS}); }});
  }}
  setTimeout(tick, {REFRESH_MS});
}})();
"""

STYLE = """
body { font: 14px/1.4 system-ui, sans-serif; margin: 1.5em; color: #222; background: #fafafa; }
h1 { font-size: 1.4em; margin: 0 0 .3em; } h2 { font-size: 1.15em; margin: 1.4em 0 .4em; }
h3 { font-size: 1em; margin: 1.2em 0 .3em; font-weight: 600; }
a { color: #0550ae; text-decoration: none; } a:hover { text-decoration: underline; }
table { border-collapse: collapse; background: #fff; }
th, td { text-align: left; padding: .25em .7em; border-bottom: 1px solid #e4e4e4; vertical-align: top; }
th { font-weight: 600; background: #f0f0f0; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
code, pre, .sha { font-family: ui-monospace, SFMono-Regular, Menlo, monospace; }
pre { background: #fff; border: 1px solid #ddd; padding: .7em; overflow-x: auto; white-space: pre-wrap; }
.muted { color: #777; } .reason { color: #555; font-size: .9em; }
.badge { display: inline-block; padding: .05em .55em; border-radius: .8em; font-size: .85em;
         font-weight: 600; color: #fff; background: #888; }
.s-passed, .r-idle { background: #1a7f37; } .s-failed { background: #cf222e; } .s-error { background: #8250df; }
.s-timeout, .r-draining { background: #bc4c00; } .s-cancelled, .r-paused { background: #6e7781; }
.s-running, .s-assigned, .r-busy { background: #0969da; }
.s-pending, .s-queued, .s-parked { background: #9a6700; }
.stale { color: #cf222e; font-weight: 600; }
#offline { background: #ffebe9; border: 1px solid #cf222e; padding: .4em .8em; margin-bottom: 1em; }
.marker { color: #9a6700; font-style: italic; margin: .5em 0; }
dl { display: grid; grid-template-columns: max-content auto; gap: .2em 1em; }
dt { font-weight: 600; } dd { margin: 0; }
.subject { color: #333; } .author { color: #777; font-size: .85em; }
table.jobs td:last-child, #runs td:last-child { white-space: nowrap; }
h3 .tests-link { font-weight: normal; font-size: .85em; margin-left: .6em; }
svg.chart { display: block; background: #fff; border: 1px solid #e4e4e4; margin: .2em 0 .6em; font-family: system-ui, sans-serif; }
#failing-tests code, #flaky-tests code, #flaky code, #test-name { word-break: break-all; }
.since { color: #cf222e; } .before { color: #1a7f37; }
"""


def _hash(text: str) -> str:
    return "'sha256-" + base64.b64encode(hashlib.sha256(text.encode()).digest()).decode() + "'"


# Only our own inline script and style may run: a log line that got past the
# escaping still could not execute anything.
CSP = (
    f"default-src 'none'; script-src {_hash(SCRIPT)}; style-src {_hash(STYLE)}; connect-src 'self'; "
    "img-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
)

PAGE = Template("""<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>$title</title>
<style>$style</style>
</head>
<body>
<div id="offline" hidden>The dispatcher is not answering; showing what it last said.</div>
$body
<script>$script</script>
</body>
</html>
""")


@dataclass(frozen=True)
class Response:
    status: int
    content_type: str
    body: bytes
    headers: dict[str, str] = field(default_factory=dict)
    # When set, the body is these chunks instead, sent as they come (no Content-Length).
    stream: Iterator[bytes] | None = None

    def content(self) -> bytes:
        """The whole body, streamed or not (for tests and small bodies)."""
        return b"".join(self.stream) if self.stream is not None else self.body


def _text(status: int, message: str) -> Response:
    return Response(status, "text/plain; charset=utf-8", (message + "\n").encode())


def _json(data: Any, status: int = 200) -> Response:
    return Response(status, "application/json", json.dumps(data, indent=1).encode())


def _html(title: str, body: str) -> Response:
    page = PAGE.substitute(title=e(title), style=STYLE, body=body, script=SCRIPT)
    return Response(200, "text/html; charset=utf-8", page.encode(), {"Content-Security-Policy": CSP})


class Web:
    """The pages and their routes, on a store path and a snapshot source; no sockets
    (see `serve`), so tests call `get` directly."""

    def __init__(
        self,
        db: Path | str,
        ns: str,
        metrics: Metrics,
        snapshot: Callable[[], Snapshot],
        wall: Callable[[], float] = time.time,
    ) -> None:
        # A SQLite file's path, or a PostgreSQL URL as given.
        self.db: Path | str = db if is_url(db) else Path(db)
        self.ns = ns
        self.metrics = metrics
        self.snapshot = snapshot
        self.wall = wall
        metrics.live = self.live_numbers

    @contextmanager
    def reader(self) -> Iterator[Store]:
        """A read-only store connection of this request's own."""
        store = Store(self.db, readonly=True)
        try:
            yield store
        finally:
            store.close()

    # -- routing ----------------------------------------------------------

    def get(self, target: str) -> Response:
        """The response to GET `target` (path and query string)."""
        url = urllib.parse.urlsplit(target)
        path = url.path.rstrip("/") or "/"
        query = urllib.parse.parse_qs(url.query)
        fragment = query.get("fragment", [""])[0] == "1"
        try:
            if path == "/":
                return self.results_page(fragment)
            if path == "/metrics":
                return Response(200, METRICS_CONTENT_TYPE, self.metrics.render())
            if path == "/api/status":
                return self.api_status()
            if path == "/api/results":
                return self.api_results(query)
            if path == "/tests":
                return self.tests(query)
            found = JOB_PATH.fullmatch(path)
            if found:
                prefix, job_id, suffix = found.groups()
                if prefix == "/api/jobs/" and not suffix:
                    return self.api_job(job_id)
                if prefix == "/jobs/" and not suffix:
                    return self.job_page(job_id, fragment)
                if prefix == "/jobs/" and suffix == "/log.txt":
                    return self.log_txt(job_id)
            return _text(404, "not found")
        except (sqlite3.OperationalError, StoreError) as exc:
            log.warning("web: the store cannot be read: %s", exc)
            return _text(503, "the store cannot be read right now")

    # -- JSON ---------------------------------------------------------------

    def api_status(self) -> Response:
        snap = self.snapshot()
        with self.reader() as store:
            return _json(queries.status(store, self.ns, snap.runners, snap.now(self.wall()), snap.depth))

    def api_results(self, query: dict[str, list[str]]) -> Response:
        params: dict[str, Any] = {k: query[k][0] for k in ("repo", "branch", "commit") if k in query}
        if "limit" in query:
            try:
                params["limit"] = int(query["limit"][0])
            except ValueError:
                return _json({"error": "limit must be a whole number from 1 to 10000"}, 400)
        if "done_only" in query:
            params["done_only"] = query["done_only"][0].lower() not in ("0", "false", "no")
        try:
            with self.reader() as store:
                return _json(queries.results(store, params))
        except queries.QueryError as exc:
            return _json({"error": str(exc)}, 400)

    def api_job(self, job_id: str) -> Response:
        with self.reader() as store:
            row = store.get(job_id)
            if row is None:
                return _json({"error": f"no job {job_id}"}, 404)
            job = queries.job_dict(row, store.events(job_id))
            stored = store.log(job_id) or {}
        return _json(
            {
                "job": job,
                "log": {
                    "head": stored.get("head", ""),
                    "tail": stored.get("tail", ""),
                    "bytes": stored.get("bytes", 0),
                    "full_kept": stored.get("full") is not None,
                    "url": f"/jobs/{job_id}/log.txt",
                },
            }
        )

    def log_txt(self, job_id: str) -> Response:
        """The whole log, inflated and sent a chunk at a time, so a big log costs
        the server its compressed size, not its size; head, marker and tail when
        only those were kept."""
        with self.reader() as store:
            row = store.get(job_id)
            # Head, tail and size only (max_full_bytes=0): the whole log comes from its blob.
            stored = store.log(job_id, max_full_bytes=0)
            blob = store.log_compressed(job_id)
        if row is None or stored is None:
            return _text(404, f"no job {job_id}")
        headers = {"Content-Disposition": f'attachment; filename="volt-{row.commit_sha[:12]}-{job_id}.log"'}
        if blob is None:
            text = queries.log_text(stored["head"], stored["tail"], stored["bytes"], None)
            return Response(200, "text/plain; charset=utf-8", text.encode(), headers)
        return Response(200, "text/plain; charset=utf-8", b"", headers, stream=_inflated(blob, stored["tail"]))

    # -- metrics ------------------------------------------------------------

    def live_numbers(self) -> Live:
        """The gauges' numbers, at scrape time, on this (the web's) thread."""
        snap = self.snapshot()
        now = snap.now(self.wall())
        with self.reader() as store:
            busy = store.busy_runners()
            by_state = store.count_by_state()
            by_status = store.count_by_status()
        runners = [
            (r.runner_id, queries.runner_state(r, r.runner_id in busy), round(max(0.0, now - r.last_seen), 3))
            for r in snap.runners
        ]
        return Live(runners=runners, jobs_by_state=by_state, jobs_by_status=by_status, queues=snap.queues)

    # -- pages ----------------------------------------------------------------

    def results_page(self, fragment: bool) -> Response:
        snap = self.snapshot()
        with self.reader() as store:
            status = queries.status(store, self.ns, snap.runners, snap.now(self.wall()), snap.depth)
            jobs = queries.results(store, {"limit": RECENT_JOBS, "done_only": False})
            branches = list(dict.fromkeys((j["repo"], j["branch"]) for j in jobs))[:CHARTS]
            charts = {
                (repo, branch): chart(
                    store.find(repo=repo, branch=branch, limit=JOBS_CHARTED, done_only=True),
                    f"duration and queue wait of the last jobs on {branch}",
                )
                for repo, branch in branches
            }
        live = (
            f'<div id="live" data-refresh="1">{_summary(status)}{_runners(status)}{_waiting(status)}'
            f"{_jobs(jobs, charts)}{_queues(status)}</div>"
        )
        if fragment:
            return Response(200, "text/html; charset=utf-8", live.encode())
        return _html(f"Volt CI ({self.ns})", f"<h1>Volt CI <span class=muted>{e(self.ns)}</span></h1>\n{live}")

    def job_page(self, job_id: str, fragment: bool) -> Response:
        with self.reader() as store:
            row = store.get(job_id)
            if row is None:
                return _text(404, f"no job {job_id}")
            job = queries.job_dict(row, store.events(job_id))
            stored = store.log(job_id) or {}
            tests = "" if row.parent else self._job_tests(store, job)
            parts = shards([queries.job_dict(s) for s in store.shards(job_id)]) if row.is_run else ""
        if row.parent:
            parts = f'<p id="run-link">a shard of the split run {job_link(row.parent, row.commit_sha)}</p>'
        live = _job(job, stored, tests + parts)
        if fragment:
            return Response(200, "text/html; charset=utf-8", live.encode())
        title = f"{job['status'] or job['state']} {job['commit'][:12]} {job['branch']}"
        body = f'<p><a href="/">&larr; all results</a></p>\n<h1>Job <span class=sha>{e(job_id)}</span></h1>\n{live}'
        return _html(title, body)

    @staticmethod
    def _job_tests(store: Store, job: dict[str, Any]) -> str:
        """The job's failing tests, each with since when it fails as of this job, and its flaky ones."""
        kept = store.tests(job["job_id"])
        failing = [t.node_id for t in kept if t.outcome in history.FAILING]
        flaky = [t.node_id for t in kept if t.outcome == "flaky"]
        found = store.test_runs(job["repo"], job["branch"], failing[:TESTS_SHOWN])
        items = [
            {"test": node, **history.streak_dict(history.failing_streak(history.from_job(runs, job["job_id"])))}
            for node, runs in found.items()
        ]
        flakes: tuple[int, dict[str, int]] = (0, {})
        if flaky:  # how often each flaked lately, on this branch
            looked, counted = store.flaky_tests(job["repo"], job["branch"], queries.FLAKY_JOBS)
            flakes = (looked, dict(counted))
        return job_tests(job, items, flaky, len(failing), flakes)

    def tests(self, query: dict[str, list[str]]) -> Response:
        params: dict[str, Any] = {k: query[k][0] for k in ("repo", "branch", "test") if k in query}
        params["flaky"] = query.get("flaky", [""])[0] == "1"
        try:
            with self.reader() as store:
                data = queries.tests(store, params)
        except queries.QueryError as exc:
            return _text(400, str(exc))
        title = f"{data.get('test') or 'tests'} {data['branch'] or ''}".strip()
        return _html(title, tests_page(data))


# -- rendering: every value goes through e() -----------------------------------


def _summary(status: dict[str, Any]) -> str:
    results = " ".join(f"{badge(k)} {e(v)}" for k, v in sorted(status["results"].items())) or "none yet"
    jobs = ", ".join(f"{e(k)} {e(v)}" for k, v in sorted(status["jobs"].items())) or "none"
    return f'<p>Results: {results}</p>\n<p>Jobs: {jobs} <span class="muted">(as of {when(status["time"])} UTC)</span></p>\n'


def _runners(status: dict[str, Any]) -> str:
    out = [f"<h2>Runners ({len(status['runners'])})</h2>"]
    if not status["runners"]:
        return out[0] + '\n<p class="muted">No live runners.</p>\n'
    out.append(
        '<table id="runners"><tr><th>runner</th><th>host</th><th>state</th><th>job</th><th>labels</th><th>last heartbeat</th></tr>'
    )
    for r in status["runners"]:
        age = r["seconds_since_heartbeat"]
        stale = ' class="stale"' if age > 2 * r["heartbeat_interval_s"] else ""
        out.append(
            f"<tr><td>{e(r['runner_id'])}</td><td>{e(r['host'])}</td><td>{badge(r['state'], 'r')}</td>"
            f"<td>{job_link(r['job_id'], r['commit'])}</td><td>{e(', '.join(r['labels']) or '-')}</td>"
            f'<td class="num"><span{stale}>{age:.1f} s ago</span></td></tr>'
        )
    out.append("</table>\n")
    return "\n".join(out)


def _waiting(status: dict[str, Any]) -> str:
    """Jobs not yet on a runner, each with what it waits for."""
    if not status["waiting_count"]:
        return ""
    out = [
        f"<h2>Waiting ({e(status['waiting_count'])})</h2>",
        '<table id="waiting"><tr><th>commit</th><th>branch</th><th>repository</th><th>waits for</th></tr>',
    ]
    for job in status["waiting"]:
        out.append(
            f'<tr data-commit="{e(job["commit"])}"><td>{job_link(job["job_id"], job["commit"])}</td>'
            f"<td>{e(job['branch'])}</td><td>{e(job['repo'])}</td><td>{e(job['why'])}</td></tr>"
        )
    out.append("</table>\n")
    return "\n".join(out)


def _jobs(jobs: list[dict[str, Any]], charts: dict[tuple[str, str], str]) -> str:
    out = ["<h2>Recent jobs</h2>"]
    if not jobs:
        return (
            out[0]
            + '\n<p class="muted">No jobs yet: commit to a watched branch, or run <code>volt notify</code>.</p>\n'
        )
    groups: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for job in jobs:  # newest first, so the most recently active branch comes first
        groups.setdefault((job["repo"], job["branch"]), []).append(job)
    for (repo, branch), rows in groups.items():
        tests = f' <a class="tests-link" href="{tests_href(repo, branch)}">tests</a>'
        out.append(f'<h3>{e(repo)} <span class="muted">on</span> {e(branch)}{tests}</h3>')
        out.append(charts.get((repo, branch), ""))
        out.append(
            '<table class="jobs"><tr><th>status</th><th>commit</th><th>change</th><th>tests</th><th>duration</th>'
            "<th>attempts</th><th>runner</th><th>finished</th></tr>"
        )
        for job in rows[:PER_BRANCH]:
            word = job["status"] or job["state"]
            reason = f'<div class="reason">{e(job["reason"][:300])}</div>' if job["reason"] and word != "passed" else ""
            out.append(
                f'<tr data-commit="{e(job["commit"])}" data-status="{e(word)}"><td>{badge(word, title=job["reason"])}</td>'
                f"<td>{job_link(job['job_id'], job['commit'])}</td><td>{subject(job['subject'], job['author'])}</td>"
                f"<td>{counts(job)}{reason}</td>"
                f'<td class="num">{duration(job["duration_s"])}</td><td class="num">{e(job["attempts"])}</td>'
                f"<td>{e(job['runner'])}</td><td>{when(job['finished_at'])}</td></tr>"
            )
        out.append("</table>")
        if len(rows) > PER_BRANCH:
            out.append(f'<p class="muted">and {len(rows) - PER_BRANCH} older (see /api/results)</p>')
    return "\n".join(out) + "\n"


def _queues(status: dict[str, Any]) -> str:
    if not any(status["queues"].values()):
        return ""  # not looked at yet
    out = ['<h2>Queues</h2>\n<table id="queues"><tr><th>queue</th><th>ready</th><th>consumers</th></tr>']
    for name, q in status["queues"].items():
        cells = (
            f'<td class="num">{e(q["ready"])}</td><td class="num">{e(q["consumers"])}</td>'
            if q
            else "<td colspan=2>missing</td>"
        )
        out.append(f"<tr><td><code>{e(name)}</code></td>{cells}</tr>")
    out.append("</table>\n")
    return "\n".join(out)


def _job(job: dict[str, Any], stored: dict[str, Any], extra: str = "") -> str:
    word = job["status"] or job["state"]
    facts = [
        ("status", badge(word)),
        ("state", e(job["state"])),
        ("repository", e(job["repo"])),
        ("branch", e(job["branch"])),
        ("commit", f'<span class="sha">{e(job["commit"])}</span>'),
        ("subject", e(job["subject"] or None)),
        ("author", e(job["author"] or None)),
        ("tests", counts(job)),
        ("duration", duration(job["duration_s"])),
        ("exit code", e(job["exit_code"])),
        ("attempts", e(job["attempts"])),
        ("runner", e(job["runner"])),
        ("reason", e(job["reason"] or None)),
        ("seen", when(job["seen_at"])),
        ("queued", when(job["queued_at"])),
        ("started", when(job["started_at"])),
        ("finished", when(job["finished_at"])),
    ]
    out = [f'<div id="live" data-refresh="{0 if job["state"] == "done" else 1}">']
    out.append("<dl>" + "".join(f"<dt>{k}</dt><dd>{v}</dd>" for k, v in facts) + "</dl>")
    out.append(extra)
    out.append(
        '<h2>History</h2>\n<table id="history"><tr><th>at</th><th>attempt</th><th>event</th><th>runner</th><th>status</th><th>reason</th></tr>'
    )
    for ev in job.get("history", []):
        out.append(
            f'<tr><td>{when(ev["at"])}</td><td class="num">{e(ev["attempt"])}</td><td>{e(ev["kind"])}</td>'
            f"<td>{e(ev['runner'])}</td><td>{badge(ev['status']) if ev['status'] else '-'}</td><td>{e(ev['reason'] or None)}</td></tr>"
        )
    out.append("</table>")
    out.append(_log(job["job_id"], stored))
    out.append("</div>")
    return "\n".join(out)


def _log(job_id: str, stored: dict[str, Any]) -> str:
    head, tail, size = stored.get("head", ""), stored.get("tail", ""), stored.get("bytes", 0)
    if not size and not head and not tail:
        return '<h2>Log</h2>\n<p class="muted">No log yet.</p>'
    kept = stored.get("full") is not None
    link = f'<a id="log-link" href="/jobs/{e(job_id)}/log.txt" download>download the whole log (log.txt)</a>'
    note = f"{size} bytes; {link}" + ("" if kept else ": only its head and tail were kept")
    out = [f"<h2>Log</h2>\n<p>{note}</p>", f'<pre id="log-head">{e(head)}</pre>']
    if tail:
        skipped = size - len(head.encode()) - len(tail.encode())
        if skipped > 0:
            why = "not shown here" if kept else "not kept"
            out.append(f'<p class="marker">[... {skipped} bytes {why} ...]</p>')
        out.append(f'<pre id="log-tail">{e(tail)}</pre>')
    return "\n".join(out)


def _inflated(blob: bytes, tail: str, limit: int | None = None) -> Iterator[bytes]:
    """A stored (zlib) log, a chunk at a time; past `limit` bytes (LOG_FULL_MAX_BYTES:
    a few MB of compressed zeros hold gigabytes) a marker and the kept tail instead."""
    most = LOG_FULL_MAX_BYTES if limit is None else limit
    z = zlib.decompressobj()
    pending, sent = blob, 0
    try:
        while not z.eof:
            chunk = z.decompress(pending, LOG_CHUNK)
            pending = z.unconsumed_tail
            if not chunk and not pending:
                break  # the stored stream ends early
            if sent + len(chunk) > most:
                yield chunk[: most - sent]
                yield f"\n[... cut at {most} bytes; its last part follows ...]\n".encode() + tail.encode()
                return
            sent += len(chunk)
            yield chunk
    except zlib.error:
        pass
    if not z.eof:
        yield b"\n[... the rest of the stored log is unreadable ...]\n"


# -- the server -----------------------------------------------------------------


class _Handler(BaseHTTPRequestHandler):
    server: _Server
    server_version = "volt-dispatcher"
    timeout = 30  # a client that sends nothing does not hold a thread for ever

    def do_GET(self) -> None:
        self._respond(with_body=True)

    def do_HEAD(self) -> None:
        self._respond(with_body=False)

    def _respond(self, with_body: bool) -> None:
        try:
            resp = self.server.web.get(self.path)
        except Exception:
            log.exception("web: GET %s failed", self.path[:200])
            resp = _text(500, "internal error")
        self.send_response(resp.status)
        self.send_header("Content-Type", resp.content_type)
        if resp.stream is None:
            self.send_header("Content-Length", str(len(resp.body)))
        else:
            self.send_header("Connection", "close")  # the end of the body is the end of the connection
        self.send_header("Cache-Control", "no-store")
        self.send_header("X-Content-Type-Options", "nosniff")
        self.send_header("Referrer-Policy", "no-referrer")
        for key, value in resp.headers.items():
            self.send_header(key, value)
        self.end_headers()
        if not with_body:
            return
        if resp.stream is None:
            self.wfile.write(resp.body)
            return
        for chunk in resp.stream:
            self.wfile.write(chunk)

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - the base class's name
        log.debug("web: %s " + format, self.address_string(), *args)


_BUSY = (
    b"HTTP/1.0 503 Service Unavailable\r\nContent-Type: text/plain; charset=utf-8\r\nRetry-After: 2\r\n"
    b"Content-Length: 29\r\nConnection: close\r\n\r\ntoo many requests; try again\n"
)


class _Server(ThreadingHTTPServer):
    """One thread per request, at most max_requests at once: one more is told 503
    on the listening thread, so a crowd of clients costs a bounded number of threads."""

    daemon_threads = True

    def __init__(self, host: str, port: int, web: Web, max_requests: int = MAX_REQUESTS) -> None:
        self.web = web
        self.slots = threading.BoundedSemaphore(max_requests)
        self.address_family = socket.AF_INET6 if ":" in host else socket.AF_INET
        super().__init__((host, port), _Handler)

    def process_request(self, request: Any, client_address: Any) -> None:
        if not self.slots.acquire(blocking=False):
            self._refuse(request)
            return
        try:
            super().process_request(request, client_address)
        except BaseException:
            self.slots.release()
            raise

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self.slots.release()

    def _refuse(self, request: socket.socket) -> None:
        try:
            # Read the request first: closing on unread bytes resets the
            # connection, and the client would see that instead of the 503.
            request.settimeout(0.2)
            request.recv(65536)
            request.sendall(_BUSY)
        except OSError:
            pass
        finally:
            self.shutdown_request(request)

    def handle_error(self, request: Any, client_address: Any) -> None:
        log.debug("web: connection from %s failed", client_address, exc_info=True)  # e.g. the browser went away


def serve(d: Dispatcher, max_requests: int = MAX_REQUESTS) -> ThreadingHTTPServer:
    """Start the web server of dispatcher `d` on a daemon thread; SettingsError if it cannot listen."""
    web = Web(d.s.db, d.ns, d.metrics, lambda: d.snapshot)
    host, port = d.s.http_host, d.s.http_port
    try:
        server = _Server(host, port, web, max_requests)
    except OSError as exc:
        raise SettingsError(f"cannot serve HTTP on {host}:{port}: {exc.strerror or exc}") from None
    threading.Thread(target=server.serve_forever, name="volt-web", daemon=True).start()
    log.info("results page on http://%s:%d/ (metrics on /metrics)", host, server.server_address[1])
    return server
