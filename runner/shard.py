"""The runner's end of a shard of a split run (dispatcher/runs.py).

The shard's pytest process loads runner/volt_shard.py, which talks over one
end of a socket pair it inherits (through the sandbox: no path, no network,
nothing another job could reach). This relays each of its asks to the dispatcher as a
ChunkRequest and hands back the Chunk that answers it. What comes over the
socket is written by the code under test: it is bounded, checked, and can
only ever speak for its own shard.
"""

from __future__ import annotations

import json
import logging
import queue
import shutil
import socket
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from common.messages import TEST_OUTCOMES, Chunk, ChunkRequest, Job

log = logging.getLogger(__name__)

PLUGIN = "volt_shard"
# One line from the plugin at most (a collection of 100,000 long node ids fits).
MAX_LINE = 12 * 1024 * 1024
MAX_TESTS = 100_000
# An ask not answered in this long is sent again (the dispatcher answers a repeat the same).
RESEND_AFTER = 5.0


def plugin_dir(folder: Path) -> Path:
    """A folder holding only the plugin, for the job's PYTHONPATH."""
    where = folder / "plugin"
    where.mkdir(exist_ok=True)
    shutil.copyfile(Path(__file__).with_name(f"{PLUGIN}.py"), where / f"{PLUGIN}.py")
    return where


class ShardLink:
    """Serves the plugin's asks on a socket pair until closed; `fd` is the
    plugin's end, for the test command to inherit (VOLT_SHARD_FD).

    `send` hands a ChunkRequest to the runner's main thread to publish;
    answers come back through `answers` (the runner puts every Chunk for this
    assignment there); `stopped` says why to give up (cancelled, lease lost);
    while `draining` is true the shard asks for nothing new: it finishes what
    it holds and hands the rest of the run to the other shards.
    """

    def __init__(
        self,
        job: Job,
        runner_id: str,
        send: Callable[[ChunkRequest], None],
        answers: queue.Queue[Chunk],
        stopped: Callable[[], str | None],
        draining: Callable[[], bool] = lambda: False,
    ) -> None:
        self.job, self.runner_id = job, runner_id
        self.send, self.answers, self.stopped, self.draining = send, answers, stopped, draining
        self.sock, self.theirs = socket.socketpair()
        self.fd = self.theirs.fileno()
        self.seq = 0
        self.asked = 0
        self.chunks = 0
        # Why the shard was told to stop (by the dispatcher, or here for what
        # its plugin sent): the shard's result is then an error saying so.
        self.failure = ""
        self._closed = False
        self.thread = threading.Thread(target=self._serve, name=f"shard-{job.job_id}", daemon=True)
        self.thread.start()

    def started(self) -> None:
        """The test command has its end: close ours of it, so its exit ends the link."""
        self.theirs.close()

    def close(self) -> None:
        self._closed = True
        self.theirs.close()
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self.thread.join(timeout=5)
        self.sock.close()

    def _serve(self) -> None:
        with self.sock.makefile("rwb") as f:
            while not self._closed:
                try:
                    line = f.readline(MAX_LINE + 1)
                except OSError:
                    return
                if not line or len(line) > MAX_LINE:
                    return
                answer = self._answer(line)
                if answer.get("stop") and not self.failure:
                    self.failure = str(answer["stop"])
                try:
                    f.write(json.dumps(answer).encode() + b"\n")
                    f.flush()
                except OSError:
                    return

    def _answer(self, line: bytes) -> dict[str, Any]:
        try:
            ask = json.loads(line)
        except ValueError:
            return {"stop": "the shard's plugin sent something that is not JSON"}
        if not isinstance(ask, dict):
            return {"stop": "the shard's plugin sent something that is not a JSON object"}
        collected = ask.get("collected")
        if collected is not None:
            if not isinstance(collected, list) or not all(isinstance(n, str) for n in collected):
                return {"stop": "the shard's collection is not a list of node ids"}
            if len(collected) > MAX_TESTS:
                return {"stop": f"more than {MAX_TESTS} tests collected: a split run takes at most that many"}
        results = [
            [r[0], r[1], r[2]]
            for r in (ask.get("results") or [])[:MAX_TESTS]
            if isinstance(r, list)
            and len(r) == 3
            and isinstance(r[0], str)
            and r[1] in TEST_OUTCOMES
            and isinstance(r[2], (int, float))
        ]
        self.seq += 1
        request = ChunkRequest(
            job_id=self.job.job_id,
            attempt=self.job.attempt,
            runner_id=self.runner_id,
            lease=self.job.lease,
            seq=self.seq,
            collected=collected,
            results=results,
            more=bool(ask.get("more", True)) and not self.draining(),
        )
        chunk = self._ask(request)
        if chunk is None:
            return {"stop": self.stopped() or "stopped"}
        if chunk.tests:
            self.chunks += 1
        return {"tests": chunk.tests, "stop": chunk.stop}

    def _ask(self, request: ChunkRequest) -> Chunk | None:
        """Send the request until its answer comes; None if the job is stopped first."""
        while not self.stopped() and not self._closed:
            self.send(request)
            self.asked += 1
            deadline = time.monotonic() + RESEND_AFTER
            while time.monotonic() < deadline:
                try:
                    chunk = self.answers.get(timeout=0.1)
                except queue.Empty:
                    if self.stopped() or self._closed:
                        return None
                    continue
                if chunk.seq == request.seq:
                    return chunk
            log.info(
                "job=%s chunk request %d not answered in %.0fs; asking again",
                self.job.job_id,
                request.seq,
                RESEND_AFTER,
            )
        return None
