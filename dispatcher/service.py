"""The dispatcher loop: commits in, jobs out to runners, results recorded.

One thread owns the broker connection and the store. Every handler is
idempotent, and acks only once what it received is safe in the store
(delivery rules 2 and 4), so a crash anywhere is repaired by redelivery.
"""

from __future__ import annotations

import logging
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from common import naming
from common.broker import Broker, BrokerError, Delivery, Unroutable
from common.messages import (
    CancelJob,
    CommitSeen,
    DecodeError,
    Goodbye,
    Hello,
    Job,
    JobRejected,
    JobResult,
    JobStarted,
    Reply,
    Request,
    RunnerCommand,
    decode,
)
from common.settings import BrokerSettings
from dispatcher import queries
from dispatcher.metrics import Metrics
from dispatcher.registry import Registry, RunnerInfo, first_able
from dispatcher.snapshot import Snapshot, take_snapshot
from dispatcher.store import Store

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class DispatcherSettings:
    broker: BrokerSettings
    db: Path
    heartbeat_misses: int = 3
    max_attempts: int = 3
    # After a restart, how long runners get to report in before their jobs
    # count as lost.
    restart_grace: float = 10.0
    # How long a job may sit assigned but not started before it is taken back.
    start_timeout: float = 10.0
    prefetch: int = 100
    # The results page and /metrics (dispatcher/web.py); port 0: off.
    http_port: int = 0
    http_host: str = "127.0.0.1"
    # RabbitMQ users allowed to pause, resume or drain runners; empty: anyone
    # who may ask the dispatcher at all.
    operators: tuple[str, ...] = ()


class Dispatcher:
    def __init__(
        self,
        settings: DispatcherSettings,
        broker: Broker | None = None,
        store: Store | None = None,
        clock: Callable[[], float] = time.monotonic,
        wall: Callable[[], float] = time.time,
    ) -> None:
        self.s = settings
        self.ns = settings.broker.namespace
        self.broker = broker or Broker(settings.broker, "volt-dispatcher")
        self.store = store or Store(settings.db)
        self.clock = clock
        self.wall = wall
        self.registry = Registry(clock, misses=settings.heartbeat_misses)
        self.started = clock()
        self.stopping = False
        self._next_sweep = 0.0
        self._next_snapshot = 0.0
        # Whether the backlog queue or the store may hold jobs waiting for a
        # runner; lets a heartbeat skip a basic.get on an empty backlog. Only
        # this dispatcher puts jobs in the backlog, so the flag is exact; it is
        # set again at every (re)connect in case someone else did.
        self._backlog_maybe = True
        self._parked_maybe = True
        self._lost_reasons: dict[str, str] = {}
        self.metrics = Metrics()
        # What the web server's threads may read: swapped in whole by this thread.
        self.snapshot = Snapshot()

    # -- lifecycle --------------------------------------------------------

    def request_stop(self, *_: object) -> None:
        self.stopping = True

    def install_signal_handlers(self) -> None:
        signal.signal(signal.SIGTERM, self.request_stop)
        signal.signal(signal.SIGINT, self.request_stop)

    def run(self) -> int:
        def serve() -> bool:
            while not self.stopping:
                self.run_once(0.25)
            return True

        if self.s.operators:
            log.info("runner-ctl allowed for %s", ", ".join(self.s.operators))
        else:
            log.info("runner-ctl allowed for anyone who may ask the dispatcher (no --operator set)")
        self.broker.hold_acks()
        self.broker.run(self.setup, serve, stopping=lambda: self.stopping)
        self.broker.close()
        self.store.close()
        log.info("dispatcher stopped")
        return 0

    def setup(self) -> None:
        """Declare the topology, start consuming, and repair what a crash left."""
        b = self.broker
        b.declare_topology()
        for queue, handler in (
            (naming.dispatcher_commits_queue(self.ns), self.on_commit),
            (naming.dispatcher_control_queue(self.ns), self.on_control),
            (naming.dispatcher_results_queue(self.ns), self.on_result),
            (naming.dispatcher_rpc_queue(self.ns), self.on_request),
        ):
            b.consume(queue, self._guarded(handler), prefetch=self.s.prefetch)
        # Runners could not be heard while we were disconnected: give them a
        # full heartbeat timeout (and the restart grace) to report in.
        self.registry.forgive(self.s.restart_grace)
        self.started = self.clock()
        self._backlog_maybe = self._parked_maybe = True
        for row in self.store.in_state("pending"):
            self._enqueue(row.as_job())
        log.info("dispatcher ready: namespace=%s store=%s", self.ns, self.s.db)

    def run_once(self, time_limit: float = 0.0) -> None:
        """Process what arrived (waiting up to time_limit), then sweep and assign.

        Group commit: the round's store changes become durable in one COMMIT,
        and only then are its messages acked (delivery rules 2 and 4 hold per
        round instead of per message, at one fsync per round).
        """
        self.store.begin_batch()
        try:
            self.broker.process(time_limit)
            if self.clock() >= self._next_sweep:
                self.sweep()
                self.assign()
                self._next_sweep = self.clock() + 0.25
        finally:
            self.store.commit_batch()
            self.broker.release_acks()
        # The page and the RPC answers read the snapshot, never the broker.
        if self.clock() >= self._next_snapshot:
            self.snapshot = take_snapshot(self, self.snapshot)
            self._next_snapshot = self.clock() + 0.25

    def _make_durable(self) -> None:
        """Commit the round so far, then ack what it handled; the round goes on."""
        self.store.checkpoint()
        self.broker.release_acks()

    # -- commits ----------------------------------------------------------

    def on_commit(self, d: Delivery) -> None:
        msg = self._decode(d, CommitSeen)
        if msg is None:
            return
        row = self.store.add_job(msg, now=self.wall())
        if row.state == "pending":
            self._enqueue(row.as_job())
            log.info("job=%s commit=%s repo=%s branch=%s queued", row.job_id, row.commit_sha[:12], row.repo, row.branch)
            if row.labels and not self.registry.able(row.labels):
                log.warning("job=%s needs labels %s: no live runner has them", row.job_id, ", ".join(row.labels))
        d.ack()
        self.assign()

    def _enqueue(self, job: Job) -> None:
        """Put a pending job in the backlog queue; queued once confirmed."""
        self.broker.publish(naming.jobs_exchange(self.ns), naming.BACKLOG_ROUTING_KEY, job)
        self.store.mark_queued(job.job_id, job.attempt, self.wall())
        self._backlog_maybe = True

    # -- assignment -------------------------------------------------------

    def assign(self) -> None:
        """Give waiting jobs to idle runners until one or the other runs out.

        Parked jobs (waiting for a runner with their labels) go first, then the
        backlog queue, read with basic.get only while a runner is free, so
        waiting work stays visible as the queue's ready count. A backlog job no
        free runner can take is parked, so it does not block the ones behind it.
        The assignments are made durable together before any job is sent.
        """
        if not (self._backlog_maybe or self._parked_maybe):
            return
        free = self.registry.available(self.store.busy_runners())
        if not free:
            return
        picked: list[tuple[Job, RunnerInfo]] = []

        def pick(job: Job) -> bool:
            runner = first_able(free, job.labels)
            if runner is None or not self.store.assign(job.job_id, job.attempt, runner.runner_id, self.wall()):
                return False
            picked.append((job, runner))
            free.remove(runner)
            return True

        if self._parked_maybe:
            parked = self.store.in_state("parked")
            self._parked_maybe = bool(parked)
            for row in parked:
                if free:
                    pick(row.as_job())
        while free and self._backlog_maybe:
            d = self.broker.get(naming.backlog_queue(self.ns))
            if d is None:
                self._backlog_maybe = False
                break
            job = self._decode(d, Job)
            if job is None:
                continue
            stored = self.store.get(job.job_id)
            if stored is not None and stored.state == "queued" and stored.attempt == job.attempt and not pick(job):
                self._park(job)
            # Held until the round is durable: the store now has the job assigned or
            # parked (or knows better than this copy, left by a crash or a re-queue).
            d.ack()
        if picked:
            self._make_durable()  # no runner gets a job the store could forget
            for job, runner in picked:
                self._send(job, runner)

    def _send(self, job: Job, runner: RunnerInfo) -> None:
        """Publish an assigned job to its runner's queue."""
        try:
            self.broker.publish(naming.jobs_exchange(self.ns), naming.runner_routing_key(runner.runner_id), job)
        except Unroutable:
            # Its queue is gone, so is the runner: the job waits for the next one.
            log.warning("runner=%s has no queue; job=%s waits for another runner", runner.runner_id, job.job_id)
            self.registry.remove(runner.runner_id)
            self.store.unassign(job.job_id, job.attempt, f"runner {runner.runner_id} queue missing", self.wall())
            self._parked_maybe = True
            return
        runner.last_assigned = self.clock()
        log.info(
            "job=%s attempt=%d commit=%s assigned to runner=%s",
            job.job_id,
            job.attempt,
            job.commit[:12],
            runner.runner_id,
        )

    def _park(self, job: Job) -> None:
        able = self.registry.able(job.labels)
        if able:
            why = f"needs labels {', '.join(job.labels)}; its {len(able)} runner(s) are busy or paused"
            log.info("job=%s commit=%s parked: %s", job.job_id, job.commit[:12], why)
        else:
            why = f"no live runner has labels {', '.join(job.labels)}"
            log.warning("job=%s commit=%s waits: %s", job.job_id, job.commit[:12], why)
        self.store.park(job.job_id, job.attempt, why, self.wall())
        self._parked_maybe = True

    def command_runner(self, runner_id: str, action: str, reason: str = "", asker: str | None = None) -> dict[str, Any]:
        """Pause, resume or drain a live runner (`volt runner-ctl`), if `asker` may."""
        if self.s.operators and asker not in self.s.operators:
            who = f"user {asker!r}" if asker else "a request that names no user"
            raise queries.QueryError(f"{who} may not control runners (the dispatcher's --operator list)")
        info = self.registry.get(runner_id)
        if info is None:
            raise queries.QueryError(f"no live runner {runner_id!r}")
        cmd = RunnerCommand(action=action, reason=reason)
        try:
            self.broker.publish(naming.jobs_exchange(self.ns), naming.runner_routing_key(runner_id), cmd)
        except Unroutable:
            raise queries.QueryError(f"runner {runner_id!r} has no queue") from None
        # Until its next heartbeat says so itself: no new work for a paused or draining runner.
        info.state = {"pause": "paused", "drain": "draining"}.get(action, "idle")
        log.info("runner=%s told to %s by %s%s", runner_id, action, asker or "?", f": {reason}" if reason else "")
        if action == "resume":
            self.assign()
        return {"runner": runner_id, "action": action, "state": info.state}

    # -- runners ----------------------------------------------------------

    def on_control(self, d: Delivery) -> None:
        msg = self._decode(d, Hello, Goodbye)
        if msg is None:
            return
        if isinstance(msg, Hello):  # Heartbeat is a Hello
            seen = self.registry.heartbeat(msg)
            if seen.new:
                log.info("runner=%s host=%s joined (session %s)", msg.runner_id, msg.host, msg.session)
            if seen.restarted_from:
                log.warning("runner=%s restarted (session %s -> %s)", msg.runner_id, seen.restarted_from, msg.session)
                self._take_back_jobs_of(msg.runner_id, "runner restarted", keep_session=msg.session)
            d.ack()
            if seen.changed:  # a runner that heartbeats as before has not become free
                self.assign()
            return
        log.info("runner=%s left: %s", msg.runner_id, msg.reason or "goodbye")
        info = self.registry.get(msg.runner_id)
        if info is None or info.session == msg.session:
            self.registry.remove(msg.runner_id)
            self._take_back_jobs_of(msg.runner_id, f"runner left ({msg.reason or 'goodbye'})", failure=False)
        d.ack()
        self.assign()

    def sweep(self) -> None:
        """Declare lost the runners whose heartbeats stopped; take their jobs back."""
        for info in self.registry.expire():
            silent = self.clock() - info.last_seen
            reason = f"runner {info.runner_id} lost (no heartbeat for {silent:.1f}s)"
            log.warning("%s", reason)
            self._lost_reasons[info.runner_id] = reason
        now = self.clock()
        in_grace = now - self.started < self.s.restart_grace
        for row in self.store.in_state("assigned", "running"):
            runner = row.runner or ""
            owner = self.registry.get(runner)
            if owner is None:
                lost = self._lost_reasons.get(runner)
                if lost is None and in_grace:
                    continue  # it may not have reported in since our restart
                lost = lost or f"runner {runner} not seen since the dispatcher started"
                self._requeue(row.job_id, row.attempt, lost, failure=True)
                continue
            if row.state == "assigned" and row.assigned_at is not None:
                waited = self.wall() - row.assigned_at
                if waited > max(self.s.start_timeout, 3 * owner.interval) and owner.job_id != row.job_id:
                    self._requeue(row.job_id, row.attempt, f"runner {runner} never started it", failure=False)

    def _take_back_jobs_of(self, runner_id: str, reason: str, failure: bool = True, keep_session: str = "") -> None:
        for row in self.store.in_state("assigned", "running"):
            if row.runner != runner_id:
                continue
            if keep_session and row.session == keep_session:
                continue
            self._requeue(row.job_id, row.attempt, reason, failure=failure)

    def _requeue(self, job_id: str, attempt: int, reason: str, failure: bool) -> None:
        outcome = self.store.requeue(
            job_id, attempt, reason, self.wall(), failure=failure, max_failures=self.s.max_attempts
        )
        if outcome == "pending":
            self.metrics.redeliveries.inc()
            row = self.store.get(job_id)
            assert row is not None
            log.warning(
                "job=%s attempt=%d taken back (%s); retrying as attempt %d", job_id, attempt, reason, row.attempt
            )
            self._enqueue(row.as_job())
        elif outcome == "error":
            log.error("job=%s ended as error after attempt %d: %s", job_id, attempt, reason)

    # -- results ----------------------------------------------------------

    def on_result(self, d: Delivery) -> None:
        msg = self._decode(d, JobStarted, JobResult, JobRejected)
        if msg is None:
            return
        ids = f"runner={msg.runner_id} job={msg.job_id} attempt={msg.attempt}"
        if isinstance(msg, JobStarted):
            if not self.store.start(msg.job_id, msg.attempt, msg.runner_id, msg.session, msg.started_at, self.wall()):
                row = self.store.get(msg.job_id)
                duplicate = (
                    row is not None
                    and row.state == "running"
                    and row.attempt == msg.attempt
                    and row.runner == msg.runner_id
                )
                if not duplicate:
                    log.warning("%s started an attempt that is not its own; cancelling it", ids)
                    self._cancel(msg.runner_id, msg.job_id, msg.attempt, "this attempt was given to another runner")
            else:
                self.metrics.job_started(self.store.get(msg.job_id), self.wall())
        elif isinstance(msg, JobResult):
            if self.store.finish(msg, self.wall()):
                self.metrics.job_finished(msg.duration_s)
                log.info("%s recorded: %s passed=%d failed=%d", ids, msg.status, msg.passed, msg.failed)
            else:
                log.info("%s late result (%s) kept as history", ids, msg.status)
        else:
            row = self.store.get(msg.job_id)
            if row is not None and row.runner == msg.runner_id:
                self._requeue(
                    msg.job_id, msg.attempt, f"runner {msg.runner_id} refused it: {msg.reason}", failure=False
                )
        d.ack()
        self.assign()

    def _cancel(self, runner_id: str, job_id: str, attempt: int, reason: str) -> None:
        try:
            self.broker.publish(
                naming.jobs_exchange(self.ns),
                naming.runner_routing_key(runner_id),
                CancelJob(job_id=job_id, attempt=attempt, reason=reason),
            )
        except Unroutable:
            pass  # no queue, no runner: nothing left to cancel

    # -- queries ----------------------------------------------------------

    def on_request(self, d: Delivery) -> None:
        msg = self._decode(d, Request)
        if msg is None:
            return
        # Runners as they are now; queue depths as last looked at (no broker call).
        self.snapshot = take_snapshot(self, self.snapshot, look_at_queues=False)
        try:
            reply = Reply(ok=True, data=queries.answer(self, msg, asker=d.user_id))
        except queries.QueryError as exc:
            reply = Reply(ok=False, error=str(exc))
        self.broker.reply(d, reply)
        d.ack()

    # -- helpers ----------------------------------------------------------

    def _guarded(self, handler: Callable[[Delivery], None]) -> Callable[[Delivery], None]:
        """A handler that a message it chokes on cannot kill: the message is
        dead-lettered with the error, so its redelivery cannot crash-loop us."""

        def guarded(d: Delivery) -> None:
            try:
                handler(d)
            except BrokerError:
                raise  # the connection's problem, not the message's
            except Exception as exc:
                log.exception("handling a message from %s failed", d.queue)
                self.broker.dead_letter(d, f"dispatcher error: {type(exc).__name__}: {exc}")
                self.metrics.dead_letters.inc()

        return guarded

    def _decode(self, d: Delivery, *kinds: type) -> Any:
        """The message if it is one of `kinds`; otherwise dead-letter it and return None."""
        try:
            msg = decode(d.body)
        except DecodeError as exc:
            self.broker.dead_letter(d, str(exc))
            self.metrics.dead_letters.inc()
            return None
        if not isinstance(msg, kinds):
            self.broker.dead_letter(d, f"{msg.TYPE} does not belong on {d.queue}")
            self.metrics.dead_letters.inc()
            return None
        return msg
