"""Pieces of the results page's HTML, every value through e(): the commits,
subjects, authors and node ids come from the commits tested, so from anyone.
dispatcher/web.py puts them together; the /tests page and the job page's
tests and shards are here whole."""

from __future__ import annotations

import html
import re
import urllib.parse
from typing import Any

from dispatcher.history import runs_text, trend_line

# Characters of a subject shown in a table cell (the whole one is its title).
SUBJECT_CHARS = 80
# Tests listed on a job page at most.
TESTS_SHOWN = 200


def e(value: object) -> str:
    """Escaped for HTML text and attribute values; None shows as a dash."""
    return "-" if value is None else html.escape(str(value), quote=True)


def badge(value: str | None, kind: str = "s", title: str = "") -> str:
    word = value or "-"
    css = word if re.fullmatch(r"[a-z]+", word) else "other"
    tip = f' title="{e(title)}"' if title else ""
    return f'<span class="badge {kind}-{css}"{tip}>{e(word)}</span>'


def when(stamp: str | None) -> str:
    """An ISO time from queries.iso as 'YYYY-MM-DD HH:MM:SS', in UTC."""
    if not stamp:
        return "-"
    return f'<span title="{e(stamp)}">{e(stamp[:19].replace("T", " "))}</span>'


def duration(seconds: float | None, places: int = 1) -> str:
    return "-" if seconds is None else f"{seconds:.{places}f} s"


def counts(job: dict[str, Any]) -> str:
    parts = [f"{job[k]} {k}" for k in ("passed", "failed", "errors", "skipped") if job[k]]
    return e(", ".join(parts)) if parts else '<span class="muted">-</span>'


def job_link(job_id: str | None, commit: str | None) -> str:
    if not job_id:
        return '<span class="muted">-</span>'
    return f'<a class="sha" href="/jobs/{e(job_id)}">{e((commit or job_id)[:12])}</a>'


def subject(text: str | None, author: str | None = None) -> str:
    """A commit's subject, cut to fit a cell, and its author under it."""
    if not text and not author:
        return '<span class="muted">-</span>'
    line = text or ""
    cut = line if len(line) <= SUBJECT_CHARS else line[: SUBJECT_CHARS - 1] + "\u2026"
    out = f'<span class="subject" title="{e(line)}">{e(cut)}</span>' if line else ""
    return out + (f'<div class="author">{e(author)}</div>' if author else "")


def tests_href(repo: str, branch: str | None, test: str | None = None, flaky: bool = False) -> str:
    """The /tests page of a branch, of one test on it, or of its flaky tests (escaped for an attribute)."""
    params = {"repo": repo, "branch": branch, "test": test, "flaky": "1" if flaky else None}
    return e("/tests?" + urllib.parse.urlencode({k: v for k, v in params.items() if v}))


def commit_ref(ref: dict[str, Any] | None) -> str:
    """A commit an answer names (history.commit_ref): its job's link and its subject."""
    if ref is None:
        return '<span class="muted">-</span>'
    words = f' (<span class="subject">{e(ref["subject"])}</span>)' if ref["subject"] else ""
    return job_link(ref["job_id"], ref["commit"]) + words


def streak(item: dict[str, Any]) -> str:
    """'failing since <commit>' and 'passed before on <commit>', for a test that fails."""
    if item["failing_since"] is None:  # a job older than the history kept
        return '<span class="muted">-</span>'
    out = f'<span class="since">failing since {commit_ref(item["failing_since"])}</span>'
    before = item["passed_before"]
    if before is None:
        return out + '; <span class="muted">failed in every run kept</span>'
    return out + f'; <span class="before">passed before on {commit_ref(before)}</span>'


def job_tests(
    job: dict[str, Any],
    failing: list[dict[str, Any]],
    flaky: list[str],
    total: int,
    flakes: tuple[int, dict[str, int]] = (0, {}),
) -> str:
    """A job page's failing tests, each with its streak as of this job and a link
    to its history, then its flaky ones."""
    repo, branch = job["repo"], job["branch"]
    out = []
    if total:
        out.append(
            f'<h2>Failing tests ({e(total)})</h2>\n<table id="failing-tests"><tr><th>test</th><th>since</th></tr>'
        )
        for item in failing:
            out.append(
                f'<tr><td><a class="test" href="{tests_href(repo, branch, item["test"])}"><code>{e(item["test"])}</code></a>'
                f"</td><td>{streak(item)}</td></tr>"
            )
        out.append("</table>")
        if total > len(failing):
            out.append(f'<p class="muted">and {e(total - len(failing))} more (see <code>volt tests</code>)</p>')
    if flaky:
        out.append(f'<h2>Flaky tests ({e(len(flaky))})</h2>\n<p class="muted">failed, then passed when run again</p>')
        out.append('<ul id="flaky-tests">')
        looked, counts = flakes
        for node in flaky[:TESTS_SHOWN]:
            often = (
                f' <span class="muted">flaky in {e(counts[node])} of the last {e(looked)} runs</span>'
                if node in counts
                else ""
            )
            out.append(
                f'<li><a class="test" href="{tests_href(repo, branch, node)}"><code>{e(node)}</code></a>{often}</li>'
            )
        out.append("</ul>")
    return "\n".join(out)


def shards(rows: list[dict[str, Any]]) -> str:
    """A split run's shards: where each ran, how it ended, and its log."""
    if not rows:
        return ""
    out = [
        f"<h2>Shards ({len(rows)})</h2>",
        '<table id="shards"><tr><th>shard</th><th>runner</th><th>status</th><th>duration</th><th>log</th></tr>',
    ]
    for s in rows:
        log = f'<a class="shard-log" href="/jobs/{e(s["job_id"])}/log.txt">log.txt</a>'
        out.append(
            f'<tr><td><a class="sha" href="/jobs/{e(s["job_id"])}">{e(s["job_id"])}</a></td><td>{e(s["runner"])}</td>'
            f'<td>{badge(s["status"] or s["state"], title=s["reason"])}</td><td class="num">{duration(s["duration_s"])}</td>'
            f"<td>{log}</td></tr>"
        )
    out.append("</table>")
    return "\n".join(out)


def tests_page(data: dict[str, Any]) -> str:
    """The body of /tests: one test's history, or a branch's failing and flaky tests."""
    repo, branch = data["repo"], data["branch"]
    where = f"{e(repo)} <span class=muted>on</span> {e(branch)}" if branch else e(repo)
    back = f'<p><a href="/">&larr; all results</a> &middot; <a href="{tests_href(repo, branch)}">tests of this branch</a></p>'
    if "test" in data:
        return back + _history(data, where)
    return back + _branch_tests(data, where)


def _history(data: dict[str, Any], where: str) -> str:
    out = [f'<h1>Test <code id="test-name">{e(data["test"])}</code></h1>', f"<p>{where}</p>"]
    if not data["runs"]:
        return "\n".join([*out, '<p class="muted">No runs of this test on this branch.</p>'])
    latest = data["runs"][0]
    summary = (
        streak(data)
        if data["failing_since"]
        else f"passing: its latest run {e(latest['outcome'])} on {job_link(latest['job_id'], latest['commit'])}"
    )
    out.append(f'<p id="streak">{summary}</p>')
    out.append(f'<p id="trend">duration: {e(trend_line(data["trend"]))}</p>')
    out.append(
        '<table id="runs"><tr><th>commit</th><th>change</th><th>outcome</th><th>duration</th><th>finished</th></tr>'
    )
    for r in data["runs"]:
        out.append(
            f'<tr data-commit="{e(r["commit"])}"><td>{job_link(r["job_id"], r["commit"])}</td>'
            f"<td>{subject(r['subject'], r['author'])}</td><td>{badge(r['outcome'])}</td>"
            f'<td class="num">{duration(r["duration_s"], 2)}</td><td>{when(r["finished_at"])}</td></tr>'
        )
    out.append("</table>")
    if data["total"] > len(data["runs"]):
        out.append(f'<p class="muted">the last {len(data["runs"])} of {e(data["total"])} runs</p>')
    return "\n".join(out)


def _branch_tests(data: dict[str, Any], where: str) -> str:
    out = [f"<h1>Tests <span class=muted>of</span> {where}</h1>"]
    job = data.get("job")
    if "flaky" in data:
        out.append(f"<h2>Flaky in the last {e(data['jobs'])} finished jobs</h2>")
        if not data["flaky"]:
            return "\n".join([*out, '<p class="muted">None.</p>'])
        out.append('<table id="flaky"><tr><th>test</th><th>flaky in</th></tr>')
        for f in data["flaky"]:
            href = tests_href(data["repo"], data["branch"], f["test"])
            out.append(
                f'<tr><td><a class="test" href="{href}"><code>{e(f["test"])}</code></a></td><td class="num">{e(runs_text(f["flaky_runs"]))}</td></tr>'
            )
        return "\n".join([*out, "</table>"])
    if job is None:
        return "\n".join([*out, '<p class="muted">No finished job yet.</p>'])
    out.append(
        f"<p>The latest finished job: {job_link(job['job_id'], job['commit'])} {badge(job['status'])} {subject(job['subject'])}</p>"
    )
    out.append(job_tests(job, data["failing"], [], data["total"]) or '<p class="muted">No failing tests.</p>')
    flaky_href = tests_href(data["repo"], data["branch"], flaky=True)
    out.append(f'<p><a id="flaky-link" href="{flaky_href}">the flaky tests of the last 100 jobs</a></p>')
    return "\n".join(out)
