"""Publishing a commit: shared by the poll loop and `volt notify`.

Kept apart from the poller so `volt notify`, run by git hooks, starts
without importing GitPython.
"""

from __future__ import annotations

import subprocess
import time
from collections.abc import Iterable

from common import naming
from common.broker import Broker
from common.messages import CommitSeen
from common.voltfile import CONFIG_FILE, required_labels


def publish_commit(
    broker: Broker, repo: str, branch: str, commit: str, source: str, labels: Iterable[str] = ()
) -> None:
    """Publish one CommitSeen and wait for the broker's confirm."""
    seen = CommitSeen(
        repo=repo, branch=branch, commit=commit, seen_at=time.time(), source=source, labels=sorted(set(labels))
    )
    broker.publish(naming.commits_exchange(broker.ns), "", seen)


def labels_in(repo_path: str, commit: str) -> list[str]:
    """The runner labels the .volt.toml at `commit` of a local repository asks for."""
    try:
        shown = subprocess.run(
            ["git", "-C", repo_path, "show", f"{commit}:{CONFIG_FILE}"],
            capture_output=True,
            timeout=30,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired):
        return []
    if shown.returncode != 0:
        return []  # no .volt.toml there (or no such commit: the runner will say so)
    return required_labels(shown.stdout.decode("utf-8", "replace"))
