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
from common.voltfile import CONFIG_FILE, MAX_CONFIG_BYTES, Asks, required_asks


def publish_commit(
    broker: Broker,
    repo: str,
    branch: str,
    commit: str,
    source: str,
    labels: Iterable[str] = (),
    asks: Asks | None = None,
) -> None:
    """Publish one CommitSeen and wait for the broker's confirm."""
    asks = asks or Asks()
    seen = CommitSeen(
        repo=repo,
        branch=branch,
        commit=commit,
        seen_at=time.time(),
        source=source,
        labels=sorted({*labels, *asks.labels}),
        split=asks.split,
        rerun_failures=asks.rerun_failures,
    )
    broker.publish(naming.commits_exchange(broker.ns), "", seen)


class AsksRead:
    """What the .volt.toml at a commit of a local repository asks for (labels,
    split), read by a `git cat-file` that runs while the caller does other work.
    None when the file is missing or broken: the runner reports a broken one."""

    def __init__(self, repo_path: str, commit: str) -> None:
        try:
            self.proc: subprocess.Popen[bytes] | None = subprocess.Popen(
                ["git", "-C", repo_path, "cat-file", "blob", f"{commit}:{CONFIG_FILE}"],
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=subprocess.DEVNULL,
            )
        except OSError:
            self.proc = None

    def result(self) -> Asks:
        if self.proc is None or self.proc.stdout is None:
            return Asks()
        # Read no more than a .volt.toml may hold, whatever the commit put there.
        out = self.proc.stdout.read(MAX_CONFIG_BYTES + 1)
        self.proc.stdout.close()
        if len(out) > MAX_CONFIG_BYTES:
            self.proc.kill()
        try:
            code = self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            return Asks()
        if code != 0:
            return Asks()  # no .volt.toml there (or no such commit: the runner will say so)
        return required_asks(out.decode("utf-8", "replace"))
