"""Publishing a commit: shared by the poll loop and `volt notify`.

Kept apart from the poller so `volt notify`, run by git hooks, starts
without importing GitPython.
"""

from __future__ import annotations

import subprocess
import time
from collections.abc import Iterable, Sequence

from common import naming
from common.broker import Broker
from common.messages import CommitSeen, one_line
from common.voltfile import CONFIG_FILE, MAX_CONFIG_BYTES, Asks, required_asks

# Characters of a commit's subject and author sent (the store keeps as many).
MAX_COMMIT_TEXT = 200
# Bytes of a commit object read for its subject and author: its headers (a
# signature takes a few KiB) and its message. A bigger one is published
# without them, rather than read into memory.
MAX_COMMIT_BYTES = 256 * 1024


def publish_commit(
    broker: Broker,
    repo: str,
    branch: str,
    commit: str,
    source: str,
    labels: Iterable[str] = (),
    asks: Asks | None = None,
    about: tuple[str, str] = ("", ""),
) -> None:
    """Publish one CommitSeen and wait for the broker's confirm; `about` is the
    commit's (subject, author), bounded and cleaned here."""
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
        subject=commit_line(about[0]),
        author=commit_line(about[1]),
    )
    broker.publish(naming.commits_exchange(broker.ns), "", seen)


def commit_line(text: str) -> str:
    """The first line of a commit's text, without control characters, at most
    MAX_COMMIT_TEXT characters: it comes from the commit, so from anyone."""
    return one_line(text, MAX_COMMIT_TEXT)


def commit_about(raw: bytes) -> tuple[str, str]:
    """(subject, author name) from a commit object as git stores it."""
    headers, _, message = raw.partition(b"\n\n")
    author = b""
    for line in headers.split(b"\n"):
        if line.startswith(b"author "):
            author = line[len(b"author ") :].split(b" <", 1)[0]
            break
    return commit_line(message.decode("utf-8", "replace")), commit_line(author.decode("utf-8", "replace"))


class _GitRead:
    """One git command's output, read while the caller does other work: at most
    `limit` bytes, else None (as for a failed command)."""

    def __init__(self, args: Sequence[str], limit: int) -> None:
        self.limit = limit
        try:
            self.proc: subprocess.Popen[bytes] | None = subprocess.Popen(
                ["git", *args], stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL
            )
        except OSError:
            self.proc = None

    def output(self) -> bytes | None:
        if self.proc is None or self.proc.stdout is None:
            return None
        # Read no more than the limit, whatever the commit put there.
        out = self.proc.stdout.read(self.limit + 1)
        self.proc.stdout.close()
        if len(out) > self.limit:
            self.proc.kill()
        try:
            code = self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            return None
        return out if code == 0 and len(out) <= self.limit else None


class AsksRead(_GitRead):
    """What the .volt.toml at a commit of a local repository asks for (labels,
    split), read by a `git cat-file` that runs while the caller does other work.
    None when the file is missing or broken: the runner reports a broken one."""

    def __init__(self, repo_path: str, commit: str) -> None:
        super().__init__(["-C", repo_path, "cat-file", "blob", f"{commit}:{CONFIG_FILE}"], MAX_CONFIG_BYTES)

    def result(self) -> Asks:
        out = self.output()
        if out is None:
            return Asks()  # no .volt.toml there (or no such commit: the runner will say so)
        return required_asks(out.decode("utf-8", "replace"))


class AboutRead(_GitRead):
    """A local commit's (subject, author), read by a `git cat-file` alongside."""

    def __init__(self, repo_path: str, commit: str) -> None:
        super().__init__(["-C", repo_path, "cat-file", "commit", commit], MAX_COMMIT_BYTES)

    def result(self) -> tuple[str, str]:
        out = self.output()
        return ("", "") if out is None else commit_about(out)
