"""Split runs: one commit's suite over several runners (`[test] split = N`).

Such a job becomes a run: N shards, each a job of its own (dispatcher/store.py)
that waits in the backlog, is assigned, leased and taken back like any other.
A shard's runner checks the commit out, collects the suite once and asks for
chunks of tests until none is left, running them all in one pytest process
(runner/shard.py). The first shard's collection makes the work queue: test
files, longest first by how long their tests took in the last job that kept
them (a test never seen counts as the mean), in chunks that shrink toward the
end so that the shards finish together (`plan`). A file longer than a fair
share is handed out test by test. Every other shard must collect the same
node ids, or the run ends as error.

What goes wrong costs little: a shard whose runner is lost gives its chunks
back (delivery rule 5 takes the shard back; its chunks go to the other
shards, or to the shard's next attempt); a shard whose test process stops in
the middle of a chunk ends the run with its status (a hang or a crash is the
suite's, not a runner's). Each test is recorded once, by the first report of
its chunk. A failing test is run again, up to `[test] rerun_failures` times,
by another shard when one is still asking; failed and then passed is `flaky`
and does not fail the run. The run gets one result: counts summed, failing
tests by name, each shard's log kept under its own job id.

No starvation: shards are backlog entries in commit order like every other
job, and a shard gives its runner back as soon as the queue has no chunk for
it. A split run holds at most N runners, and only while its chunks last.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from common import naming
from common.broker import Unroutable
from common.logs import ids
from common.messages import TEST_OUTCOMES, Chunk, ChunkRequest
from dispatcher.store import MAX_NODE_ID, MAX_TESTS, JobRow

if TYPE_CHECKING:
    from dispatcher.service import Dispatcher

log = logging.getLogger(__name__)

LIVE = ("pending", "queued", "parked", "assigned", "running")


def plan(tests: Sequence[str], past: dict[str, float], shards: int) -> list[tuple[list[str], float]]:
    """The work queue of a run: chunks of node ids with their estimated seconds.

    Units are test files (a file's tests share its module's fixtures), split
    into single tests when a file alone is more than half a shard's fair share.
    Longest first; each chunk takes units until it holds a 1/(2N) share of what
    is left, so chunks shrink toward the end and the last ones are one unit.
    """
    files: dict[str, list[str]] = {}
    for node in tests:
        files.setdefault(node.split("::", 1)[0], []).append(node)
    known = [past[n] for n in tests if n in past]
    mean = sum(known) / len(known) if known else 1.0
    seconds = {n: past.get(n, mean) for n in tests}
    total = sum(seconds.values())
    units: list[tuple[float, list[str]]] = []
    for nodes in files.values():
        cost = sum(seconds[n] for n in nodes)
        if len(nodes) > 1 and cost > total / (2 * shards):
            units += [(seconds[n], [n]) for n in nodes]
        else:
            units.append((cost, nodes))
    units.sort(key=lambda u: (-u[0], u[1][0]))
    chunks: list[tuple[list[str], float]] = []
    left, i = total, 0
    while i < len(units):
        target = left / (2 * shards)
        nodes, cost = [], 0.0
        while i < len(units) and (not nodes or cost < target):
            cost += units[i][0]
            nodes += units[i][1]
            i += 1
        chunks.append((nodes, round(cost, 3)))
        left -= cost
    return chunks


def digest(nodes: Sequence[str]) -> str:
    return hashlib.sha256("\n".join(nodes).encode()).hexdigest()


def counts(tests: Sequence[Any]) -> tuple[int, int, int, int]:
    """passed (flaky ones too), failed, errors, skipped of a run's tests."""
    by = dict.fromkeys(TEST_OUTCOMES, 0)
    for t in tests:
        by[t.outcome] += 1
    return by["passed"] + by["flaky"], by["failed"], by["error"], by["skipped"]


def verdict(tests: Sequence[Any]) -> tuple[str, str]:
    """The status of a run whose tests all ran, and the reason."""
    _, failed, errors, _ = counts(tests)
    flaky = sum(1 for t in tests if t.outcome == "flaky")
    note = f"; {flaky} flaky" if flaky else ""
    if failed:
        return "failed", f"{failed} failing test(s){note}"
    if errors:
        return "error", f"{errors} test(s) with errors and no failing test{note}"
    if not tests:
        return "error", "the suite has no tests"
    return "passed", note[2:]


def _results(raw: Sequence[Any]) -> list[tuple[str, str, float]]:
    out = []
    for r in raw[:MAX_TESTS]:
        if not isinstance(r, list) or len(r) != 3 or not isinstance(r[0], str) or r[1] not in TEST_OUTCOMES:
            continue
        seconds = r[2] if isinstance(r[2], (int, float)) and not isinstance(r[2], bool) and 0 <= r[2] < 1e7 else 0.0
        out.append((r[0], r[1], float(seconds)))
    return out


class Runs:
    """The dispatcher's side of split runs; called from its loop, in its rounds."""

    def __init__(self, dispatcher: Dispatcher) -> None:
        self.d = dispatcher

    # -- shards asking for work -------------------------------------------

    def on_request(self, msg: ChunkRequest) -> None:
        store = self.d.store
        shard = store.get(msg.job_id)
        if (
            shard is None
            or shard.parent is None
            or shard.state != "running"
            or shard.lease != msg.lease
            or shard.runner != msg.runner_id
        ):
            self._reply(msg, stop="this shard's assignment is not yours (any more)")
            return
        run = store.get(shard.parent)
        if run is None or run.state != "split":
            self._reply(msg, [])  # the run has its result: nothing more to do
            return
        before = store.ask_seen(msg.lease, msg.seq)
        if msg.seq < before:
            return  # an old copy of an ask answered since: the shard has moved on
        if msg.collected is not None and not self._collected(run, shard, msg.collected):
            self.d._make_durable()
            ended = store.get(run.job_id)
            self._reply(msg, stop=f"the run ended: {ended.reason if ended else 'its collection was refused'}")
            return
        held = [c for c in store.chunks(run.job_id) if c.lease == msg.lease]
        if msg.results:
            where = {node: c.chunk for c in held if c.state == "taken" for node in c.tests}
            results = [(n, o, s, where[n]) for n, o, s in _results(msg.results) if n in where]
            for node, runs in store.record_chunk(run.job_id, results, msg.runner_id):
                if runs <= run.reruns:
                    store.add_chunks(run.job_id, [([node], 0.0)], avoid=msg.runner_id)
        if msg.seq == before:  # asked again (the answer was late or lost): the same answer
            again = [c for c in held if c.seq == msg.seq]
            tests = list(again[0].tests) if again else []
        elif msg.more:
            tests = self._take(run, shard, msg)
            if not tests:
                # Nothing for it now: it is not counted on to take a rerun any more.
                store.shard_quit(run.job_id, shard.job_id)
        else:
            store.shard_quit(run.job_id, shard.job_id)
            tests = []
        if self._complete(run):
            self._finish(run)
        # The chunk is the shard's in the store before the runner hears of it.
        self.d._make_durable()
        self._reply(msg, tests)

    def _collected(self, run: JobRow, shard: JobRow, raw: Sequence[Any]) -> bool:
        """Check a shard's collection against the run's (the first one makes the
        work queue); False if it differs and the run ended."""
        store = self.d.store
        nodes = sorted({n for n in raw[:MAX_TESTS] if isinstance(n, str) and n})
        long = [n for n in nodes if len(n) > MAX_NODE_ID]
        if long:
            # Handed out whole, kept whole: one cut short would never be found again.
            self._end(run, "error", f"a test's node id is longer than {MAX_NODE_ID} characters: {long[0][:80]!r}...")
            return False
        info = store.run_info(run.job_id)
        found = digest(nodes)
        if info is None or info.digest is None:
            store.set_collection(run.job_id, found, len(nodes), shard.runner or "")
            store.add_chunks(run.job_id, plan(nodes, store.past_durations(run.repo, run.branch), run.split))
            self.d._later(
                logging.INFO,
                "job=%s split run: %d test(s) collected by runner=%s",
                run.job_id,
                len(nodes),
                shard.runner,
                extra=ids(job=run.job_id, runner=shard.runner or ""),
            )
            if not nodes:
                self._finish(run)
            return True
        if found == info.digest:
            return True
        first = {n for c in store.chunks(run.job_id) if not c.avoid for n in c.tests}
        mine = set(nodes)
        odd = sorted(mine - first)[:1] or sorted(first - mine)[:1]
        which = f"{odd[0]!r} is in one and not the other" if odd else "their order differs"
        self._end(
            run,
            "error",
            f"the shards collected different tests: runner {shard.runner} found {len(nodes)}, "
            f"runner {info.collected_by} {info.collected} ({which})",
        )
        return False

    def wants_shards(self, job_id: str) -> bool:
        """Whether a shard given a runner now could still help: the run is under
        way and collecting, or has chunks waiting."""
        store = self.d.store
        run = store.get(job_id)
        if run is None or run.state != "split":
            return False
        info = store.run_info(job_id)
        return info is None or info.digest is None or bool(store.chunks(job_id, "pending"))

    def _take(self, run: JobRow, shard: JobRow, msg: ChunkRequest) -> list[str]:
        """The next chunk for this shard: the first waiting one, but a rerun not on
        the runner it failed on while another shard still asks for work."""
        store = self.d.store
        quit = set((store.run_info(run.job_id) or _NO_INFO).quit)
        others = any(
            s.job_id != shard.job_id and s.runner != msg.runner_id and s.job_id not in quit
            for s in store.shards(run.job_id, "assigned", "running")
        )
        for chunk in store.chunks(run.job_id, "pending"):
            if chunk.avoid == msg.runner_id and others:
                continue
            if store.take_chunk(run.job_id, chunk.chunk, msg.lease, msg.seq):
                return list(chunk.tests)
        return []

    def _reply(self, msg: ChunkRequest, tests: Sequence[str] = (), stop: str = "") -> None:
        answer = Chunk(job_id=msg.job_id, lease=msg.lease, seq=msg.seq, tests=list(tests), stop=stop)
        try:
            self.d.broker.publish(naming.jobs_exchange(self.d.ns), naming.runner_routing_key(msg.runner_id), answer)
        except Unroutable:
            pass  # its runner is gone; the shard's lease runs out and its chunks come back

    # -- shards ending ----------------------------------------------------

    def shard_ended(self, shard: JobRow, lease: str, status: str, reason: str) -> None:
        """A shard's runner reported its result. A shard that stopped in the middle
        of a chunk (its test process hung, crashed or exited) ends the run."""
        store = self.d.store
        run = store.get(shard.parent or "")
        if run is None or run.state != "split":
            return
        held = store.chunks(run.job_id, "taken")
        if any(c.lease == lease for c in held) and status != "cancelled":
            self._end(
                run,
                status if status == "timeout" else "error",
                f"shard {shard.job_id} on runner {shard.runner} stopped in the middle of its tests "
                f"({status}{': ' + reason if reason else ''})",
            )
            return
        store.release_chunks(run.job_id, lease)
        why = f"{status}{': ' + reason if reason else ''}"
        if status in ("passed", "failed") and self._needs_shard(run):
            # It ran its chunks and left (its runner drains, or a rerun waited for
            # another runner): the tests left get a shard of their own.
            more = store.add_shard(run.job_id)
            if more is not None:
                self.d._enqueue(more.as_job())
                return
        self._stranded(run, why)

    def shard_taken_back(self, job_id: str, lease: str, outcome: str, reason: str) -> bool:
        """A shard's runner was lost (or gave it up): its chunks go back to the
        queue; the shard itself waits for its next attempt ('pending') or ended.
        False if the shard is not needed any more (it ended here)."""
        store = self.d.store
        shard = store.get(job_id)
        if shard is None or shard.parent is None:
            return True
        run = store.get(shard.parent)
        if run is None or run.state != "split":
            store.end_shard(job_id, "not needed: the run has its result", self.d.wall())
            return False
        if store.release_chunks(run.job_id, lease):
            self.d._later(
                logging.WARNING,
                "job=%s shard %s lost; its chunk goes back to the queue",
                run.job_id,
                job_id,
                extra=ids(job=run.job_id),
            )
        if outcome != "pending":
            self._stranded(run, reason)
        return True

    def shard_expired(self, shard: JobRow, reason: str) -> None:
        run = self.d.store.get(shard.parent or "")
        if run is not None and run.state == "split":
            self._stranded(run, reason)

    def _needs_shard(self, run: JobRow) -> bool:
        """Whether tests wait with no shard left to take them, and the run may
        have one more (at most three times its split in all: no endless loop)."""
        store = self.d.store
        if not store.chunks(run.job_id, "pending") or store.shards(run.job_id, *LIVE):
            return False
        return len(store.shards(run.job_id)) < 3 * run.split

    def _stranded(self, run: JobRow, why: str) -> None:
        """End a run whose shards have all ended: with its result if its tests all
        ran, else as error."""
        if self._complete(run):
            self._finish(run)
        elif not self.d.store.shards(run.job_id, *LIVE):
            self._end(run, "error", f"every shard ended before the run's tests had all run; last: {why}")

    # -- the run's one result ---------------------------------------------

    def _complete(self, run: JobRow) -> bool:
        info = self.d.store.run_info(run.job_id)
        return info is not None and info.digest is not None and not self.d.store.chunks(run.job_id, "pending", "taken")

    def _finish(self, run: JobRow) -> None:
        status, reason = verdict(self.d.store.tests(run.job_id))
        self._end(run, status, reason, early=False)

    def _end(self, run: JobRow, status: str, reason: str, early: bool = True) -> None:
        """Record the run's result; `early`: before its tests all ran, so its
        shards still at work are told to stop."""
        store, now = self.d.store, self.d.wall()
        tests = store.tests(run.job_id)
        summary = self._summary(run, tests)
        if not store.finish_run(run.job_id, status, counts(tests), reason, summary, now):
            return
        for shard in store.shards(run.job_id, "assigned", "running"):
            if early and shard.lease and shard.runner:
                self.d._cancel(shard.runner, shard.job_id, shard.attempt, shard.lease, "the run has its result")
        passed, failed, _, _ = counts(tests)
        self.d._later(
            logging.INFO,
            "job=%s recorded: %s passed=%d failed=%d (split run, %s)",
            run.job_id,
            status,
            passed,
            failed,
            reason or "all tests ran",
            extra=ids(job=run.job_id, commit=run.commit_sha),
        )
        ended = store.get(run.job_id)
        if ended is not None:
            self.d._after_commit.append(lambda: self.d.metrics.job_finished(ended.duration_s or 0.0))

    def _summary(self, run: JobRow, tests: Sequence[Any]) -> str:
        lines = [f"volt: split run over {run.split} shard(s); each shard's log: volt log <shard job id>"]
        for shard in self.d.store.shards(run.job_id):
            lines.append(f"volt:   {shard.job_id}  runner={shard.runner or '-'}  {shard.status or shard.state}")
        bad = [t for t in tests if t.outcome in ("failed", "error")]
        flaky = [t for t in tests if t.outcome == "flaky"]
        lines += [f"FAILED {t.node_id}" for t in bad[:200]] + [f"FLAKY {t.node_id}" for t in flaky[:200]]
        return "\n".join(lines) + "\n"


class _NoInfo:
    quit: tuple[str, ...] = ()


_NO_INFO = _NoInfo()
