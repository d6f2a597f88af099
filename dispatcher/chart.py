"""A branch's recent jobs as a small inline SVG: how long each took and how
long it waited for a runner, failed ones in red. Drawn on the server, with
presentation attributes only (the page's CSP allows no inline style)."""

from __future__ import annotations

import math
from collections.abc import Sequence

from dispatcher.render import e
from dispatcher.store import JobRow

JOBS = 50  # jobs a chart shows, the newest on the right
WIDTH, HEIGHT = 640, 180
LEFT, RIGHT, TOP, BOTTOM = 56, 14, 24, 34
DURATION, WAIT, FAILED, GRID = "#0969da", "#bc4c00", "#cf222e", "#e4e4e4"
RED = ("failed", "error", "timeout")


def seconds_label(s: float) -> str:
    """'45 s', '2.5 min', '1.2 h': what an axis shows."""
    if s < 60:
        return f"{s:g} s"
    if s < 3600:
        return f"{s / 60:.3g} min"
    return f"{s / 3600:.3g} h"


def nice_top(most: float) -> float:
    """The axis' top in seconds: in the unit its label is in (seconds_label), the
    smallest 1, 2 or 5 times a power of ten at or above `most`, so that it and
    its half read as round numbers."""
    if most <= 0:
        return 1.0
    for unit in (1, 60, 3600):
        power = 10 ** math.floor(math.log10(most / unit))
        top = unit * next(step * power for step in (1, 2, 5, 10) if step * power >= most / unit)
        if top <= 60 * unit:
            break
    return top


def chart(rows: Sequence[JobRow], label: str) -> str:
    """The SVG for `rows` (finished jobs, newest first, as the store finds them)."""
    jobs = list(reversed(rows[:JOBS]))
    if len(jobs) < 2:
        return ""  # one point says nothing a table row does not
    waits = [wait_of(j) for j in jobs]
    top = nice_top(max([j.duration_s or 0.0 for j in jobs] + [w or 0.0 for w in waits]))
    plot_w, plot_h = WIDTH - LEFT - RIGHT, HEIGHT - TOP - BOTTOM

    def x(i: int) -> float:
        return round(LEFT + (i + 0.5) * plot_w / len(jobs), 1)

    def y(s: float) -> float:
        return round(TOP + plot_h - min(s, top) / top * plot_h, 1)

    out = [
        f'<svg class="chart" viewBox="0 0 {WIDTH} {HEIGHT}" width="{WIDTH}" height="{HEIGHT}" role="img"'
        f' aria-label="{e(label)}" xmlns="http://www.w3.org/2000/svg">',
        f"<title>{e(label)}</title>",
    ]
    for frac in (0, 0.5, 1):
        at = y(top * frac)
        out.append(f'<line x1="{LEFT}" x2="{WIDTH - RIGHT}" y1="{at}" y2="{at}" stroke="{GRID}"/>')
        out.append(
            f'<text x="{LEFT - 6}" y="{at + 4}" text-anchor="end" font-size="11" fill="#555">'
            f"{e(seconds_label(top * frac))}</text>"
        )
    out.append(f'<line x1="{LEFT}" x2="{LEFT}" y1="{TOP}" y2="{TOP + plot_h}" stroke="#999"/>')
    out.append(
        f'<text x="{LEFT + plot_w / 2}" y="{HEIGHT - 8}" text-anchor="middle" font-size="11" fill="#555">'
        f"last {len(jobs)} finished jobs, oldest to newest</text>"
    )
    for i, (color, name) in enumerate(((DURATION, "duration"), (WAIT, "queue wait"), (FAILED, "failed"))):
        lx = LEFT + 6 + i * 110
        out.append(f'<circle cx="{lx}" cy="11" r="4" fill="{color}"/>')
        out.append(f'<text x="{lx + 8}" y="15" font-size="11" fill="#333">{name}</text>')
    out.append(_line([(x(i), y(w)) for i, w in enumerate(waits) if w is not None], WAIT, dashed=True))
    out.append(_line([(x(i), y(j.duration_s)) for i, j in enumerate(jobs) if j.duration_s is not None], DURATION))
    for i, (job, wait) in enumerate(zip(jobs, waits, strict=True)):
        if wait is not None:
            out.append(f'<circle class="wait" cx="{x(i)}" cy="{y(wait)}" r="2" fill="{WAIT}"/>')
        if job.duration_s is None:
            continue
        red = job.status in RED
        tip = (
            f"{job.commit_sha[:12]} {job.status}: took {job.duration_s:.1f} s"
            + (f", waited {wait:.1f} s" if wait is not None else "")
            + (f"; {job.subject}" if job.subject else "")
        )
        out.append(
            f'<a href="/jobs/{e(job.job_id)}"><circle class="{"failed" if red else "job"}" cx="{x(i)}"'
            f' cy="{y(job.duration_s)}" r="{4 if red else 3}" fill="{FAILED if red else DURATION}">'
            f"<title>{e(tip)}</title></circle></a>"
        )
    out.append("</svg>")
    return "\n".join(out)


def wait_of(job: JobRow) -> float | None:
    """How long the job waited for a runner: queued to started."""
    if job.queued_at is None or job.started_at is None:
        return None
    return max(0.0, job.started_at - job.queued_at)


def _line(points: list[tuple[float, float]], color: str, dashed: bool = False) -> str:
    if len(points) < 2:
        return ""
    dash = ' stroke-dasharray="4 3"' if dashed else ""
    coords = " ".join(f"{px},{py}" for px, py in points)
    return f'<polyline points="{coords}" fill="none" stroke="{color}" stroke-width="1.5"{dash}/>'
