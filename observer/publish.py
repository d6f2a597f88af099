"""Publishing a commit: shared by the poll loop and `volt notify`.

Kept apart from the poller so `volt notify`, run by git hooks, starts
without importing GitPython.
"""

from __future__ import annotations

import time

from common import naming
from common.broker import Broker
from common.messages import CommitSeen


def publish_commit(broker: Broker, repo: str, branch: str, commit: str, source: str) -> None:
    """Publish one CommitSeen and wait for the broker's confirm."""
    seen = CommitSeen(repo=repo, branch=branch, commit=commit, seen_at=time.time(), source=source)
    broker.publish(naming.commits_exchange(broker.ns), "", seen)
