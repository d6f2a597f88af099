"""Health files: a worker notes each time it did its periodic job (an observer's
poll, a runner's heartbeat) and what failed; `volt check --observer DIR` and
`volt check --runner-workdir DIR` read them. Container health checks use these,
so they work without broker credentials and import nothing heavy.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

HEALTH_FILE = "health.json"


def write_health(folder: Path, every: float, failing: dict[str, str] | None = None) -> None:
    """Note that the periodic job (done every `every` seconds) just ran; `failing`
    maps what failed in it to why."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / HEALTH_FILE
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps({"at": time.time(), "every_s": every, "failing": failing or {}}))
    os.replace(tmp, path)


def read_health(folder: Path, now: float, event: str) -> str | None:
    """None when the `event` happened lately and nothing failed in it, else why not."""
    try:
        data = json.loads((folder / HEALTH_FILE).read_text())
        age = now - float(data["at"])
        every = float(data["every_s"])
        failing = dict(data["failing"])
    except FileNotFoundError:
        return f"no {event} noted in {folder} yet"
    except (OSError, ValueError, KeyError, TypeError) as exc:
        return f"unreadable {folder / HEALTH_FILE}: {exc}"
    if age > max(3 * every, 30.0):
        return f"the last {event} was {age:.0f}s ago (every {every:g}s)"
    if failing:
        what, reason = next(iter(failing.items()))
        more = f" (and {len(failing) - 1} more)" if len(failing) > 1 else ""
        return f"{what}: {reason}{more}"
    return None
