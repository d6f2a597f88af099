"""The dispatcher loop: commits in, jobs out to runners, results recorded.

One thread owns the broker connection and the store. Every handler is
idempotent, and acks only once what it received is safe in the store
(delivery rules 2 and 4), so a crash anywhere is repaired by redelivery.
A store that cannot be written is not a bad message: the round is rolled
back, nothing of it is acked, and the loop starts over after a back-off.

Each assignment carries a lease token that only its runner learns. The job
stays with that runner while heartbeats echoing the lease arrive; when they
stop for the runner's lease window, the job is taken back (delivery rule 5).
Messages about a job count only with its current lease, so a runner that
lost its job, or a forger, cannot start, finish or hand back someone else's.

One dispatcher acts on a namespace. With SQLite it holds the store's file
lock and its input queues' locks, so a second one refuses to start. With
PostgreSQL any number may run: each waits, connected, until it holds the
store's lease row (`Store.acquire_lease`), answering `volt check` meanwhile;
the holder consumes the inputs (single-active-consumer queues, so one that
registers while its paused predecessor still does waits behind it), and its
every round checks and renews the lease in the round's own transaction, so a
dispatcher that lost the lease commits, acks and assigns nothing more.
"""

from __future__ import annotations

import argparse
import functools
import logging
import os
import signal
import socket
import time
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from common import exits, naming
from common.broker import Broker, BrokerError, BrokerUnavailable, Delivery, InUse, Unroutable
from common.logs import ids
from common.messages import (
    CancelJob,
    ChunkRequest,
    CommitSeen,
    DecodeError,
    Goodbye,
    Hello,
    Job,
    JobAbandoned,
    JobRejected,
    JobResult,
    JobStarted,
    Mark,
    Reply,
    Request,
    RunnerCommand,
    decode,
)
from common.settings import BrokerSettings, SettingsError
from dispatcher import queries
from dispatcher.hearing import Hearing
from dispatcher.leases import Leases, why_gone
from dispatcher.metrics import Metrics
from dispatcher.registry import Registry, RunnerInfo, first_able
from dispatcher.runs import Runs
from dispatcher.snapshot import SNAPSHOT_EVERY, Snapshot, take_snapshot
from dispatcher.store import JobRow, LeaseLost, Store, StoreError, StoreGone, is_shard, run_of

log = logging.getLogger(__name__)

# A round that took longer than this means the dispatcher itself stalled
# (paused, swapped out, a slow disk): nobody was heard meanwhile.
STALL_AFTER = 2.0
# How often parked jobs are checked against --park-timeout.
PARK_CHECK_EVERY = 5.0
# Standby dispatchers (PostgreSQL): the lease holds this long after its last
# renewal (every round, a few times a second), and a standby asks for it this
# often. A killed dispatcher's successor takes over within about their sum.
LEASE_TTL = 5.0
LEASE_POLL = 0.5
# Beside standbys, the broker gives up on a silent dispatcher's connection
# (and so hands its input queues to the next one) this many seconds after its
# last word, give or take half of it, instead of pika's usual 30: a dispatcher
# cut off from the broker without a close (a network partition) still holds
# the queues until then. A round lasts about a quarter of a second.
STANDBY_HEARTBEAT = 2
# The active dispatcher takes requests before any standby does.
ACTIVE_PRIORITY, STANDBY_PRIORITY = 10, 0


@dataclass(frozen=True)
class DispatcherSettings:
    broker: BrokerSettings
    db: Path | str  # a SQLite file, or a postgresql:// URL
    heartbeat_misses: int = 3
    max_attempts: int = 3
    # After a restart, how long runners get to report in before their jobs
    # count as lost.
    restart_grace: float = 10.0
    # How long a job may sit assigned but not started before it is taken back.
    start_timeout: float = 10.0
    # How long a job may wait for a runner with its labels while no live
    # runner has them, before it ends as error.
    park_timeout: float = 3600.0
    prefetch: int = 100
    lease_ttl: float = LEASE_TTL
    # The results page and /metrics (dispatcher/web.py); port 0: off.
    http_port: int = 0
    http_host: str = "127.0.0.1"
    # RabbitMQ users allowed to pause, resume or drain runners; empty: anyone
    # who may ask the dispatcher at all.
    operators: tuple[str, ...] = ()
    # Take the namespace over from the store that owns it (that store is gone for good).
    take_over: bool = False

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> DispatcherSettings:
        """Defaults, then VOLT_* (spelled with the flags, in dispatcher/cli.py)."""
        return cls.from_args(None, environ)

    @classmethod
    def from_args(cls, args: argparse.Namespace | None, environ: Mapping[str, str] | None = None) -> DispatcherSettings:
        """Defaults, then VOLT_*, then the flags given in `args`."""
        from dispatcher.cli import settings_from

        return settings_from(args, environ)


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
        if self.store.shared:
            self.broker.heartbeat = STANDBY_HEARTBEAT
            self.store.silence = self.broker.silence
        self.clock = clock
        self.wall = wall
        self.registry = Registry(clock, misses=settings.heartbeat_misses)
        self.started = clock()
        self.stopping = False
        self._next_sweep = 0.0
        self._next_park_check = 0.0
        self._next_snapshot = 0.0
        self._last_round = clock()
        # Whether the backlog queue or the store may hold jobs waiting for a
        # runner; lets a heartbeat skip a basic.get on an empty backlog. Only
        # this dispatcher puts jobs in the backlog, so the flag is exact; it is
        # set again at every (re)connect in case someone else did.
        self._backlog_maybe = True
        self._parked_maybe = True
        # A handler freed a runner or brought a job: assign at the end of the round.
        self._assign_due = False
        # Jobs bound for the backlog queue, published together (one wait for
        # their confirms) before the round assigns or commits.
        self._to_backlog: list[Job] = []
        self._lost_reasons: dict[str, str] = {}
        self.leases = Leases(clock)
        # label set -> when a live runner last had all of them
        self._labels_seen: dict[tuple[str, ...], float] = {}
        self.hearing = Hearing(clock)
        # What to do once the round is durable (log lines that say "recorded",
        # metrics): never for a change that was rolled back.
        self._after_commit: list[Callable[[], None]] = []
        self.metrics = Metrics()
        # What the web server's threads may read: swapped in whole by this thread.
        self.snapshot = Snapshot()
        # Standby dispatchers: who this one is to the lease, and its term once it holds it.
        self.holder = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:6]}"
        self.term: int | None = None
        self.runs = Runs(self)

    # -- lifecycle --------------------------------------------------------

    def request_stop(self, *_: object) -> None:
        self.stopping = True

    def install_signal_handlers(self) -> None:
        signal.signal(signal.SIGTERM, self.request_stop)
        signal.signal(signal.SIGINT, self.request_stop)

    def run(self) -> int:
        def serve() -> bool:
            while not self.stopping:
                try:
                    self.run_once(0.25)
                except StoreGone as exc:
                    raise exits.CommandFailed(f"{exc}; stopping") from None
            return True

        if self.s.operators:
            log.info("runner-ctl allowed for %s", ", ".join(self.s.operators))
        else:
            log.info("runner-ctl allowed for anyone who may ask the dispatcher (no --operator set)")
        try:
            self.store.lock()
        except StoreError as exc:
            raise SettingsError(str(exc)) from None
        self.broker.hold_acks()
        self.broker.on_blocked = self._on_blocked
        try:
            self.broker.run(self.setup, serve, stopping=lambda: self.stopping, retry_on=(StoreError,))
        except InUse:
            raise SettingsError(self._in_use()) from None
        finally:
            self.broker.close()
            self._let_go()
            self.store.close()
        log.info("dispatcher stopped")
        return 0

    def _in_use(self) -> str:
        if self.store.shared:
            return (
                f"a dispatcher with a SQLite store runs in namespace {self.ns!r} (it holds the queues' locks); "
                "stop it, or give this one another --namespace"
            )
        return (
            f"another dispatcher is running in namespace {self.ns!r} (its queues are in exclusive use); "
            "stop it, or give this one another --namespace"
        )

    def _let_go(self) -> None:
        """Give the lease up on the way out, so a standby need not wait it out."""
        if self.term is None:
            return
        term, self.term, self.store.fence = self.term, None, None
        try:
            self.store.rollback_batch()
            self.store.release_lease(self.holder, term)
            log.info("dispatcher %s gave up the lease (term %d)", self.holder, term)
        except StoreError as exc:
            log.warning("could not give up the lease (%s); it expires by itself in %.0fs", exc, self.s.lease_ttl)

    def setup(self) -> None:
        """Declare the topology, (with a shared store) wait for the lease, start
        consuming, and repair what a crash left."""
        b = self.broker
        b.declare_topology()
        # Before anything is delivered: a store that cannot be written now would
        # send the deliveries back, and each return counts towards their
        # delivery limit.
        self.store.probe()
        shared = self.store.shared
        commits = naming.dispatcher_commits_queue(self.ns)
        if shared:
            if b.locked(commits):
                raise InUse(f"queue {commits} is locked by a dispatcher with a SQLite store")
            if not self._stand_by():
                return  # stopping
        else:
            depth = b.queue_depth(commits)
            if depth is not None and depth[1] > 0:
                raise InUse(f"queue {commits} has a consumer already")
        # SQLite: exclusive (locked) consumers, so a second dispatcher on this
        # namespace is refused here, before it has taken anything.
        for queue, handler in (
            (commits, self.on_commit),
            (naming.dispatcher_control_queue(self.ns), self.on_control),
            (naming.dispatcher_results_queue(self.ns), self.on_result),
        ):
            b.consume(queue, self._guarded(handler), prefetch=self.s.prefetch, exclusive=not shared)
        b.consume(
            naming.dispatcher_rpc_queue(self.ns),
            self._guarded(self.on_request),
            prefetch=self.s.prefetch,
            exclusive=not shared,
            priority=ACTIVE_PRIORITY if shared else None,
        )
        self._claim_namespace()
        # Runners could not be heard while we were disconnected: give them a
        # full heartbeat timeout (and the restart grace) to report in.
        self._forgive(self.s.restart_grace)
        self.hearing.forget()
        self.started = self._last_round = self.clock()  # the time away is forgiven above, not a stall
        self._backlog_maybe = self._parked_maybe = True
        self.store.begin_batch()
        try:
            for row in self.store.in_state("pending"):
                self._pend(row)
            backlog = b.queue_depth(naming.backlog_queue(self.ns))
            if backlog is not None and backlog[0] == 0:
                self._repair_backlog()
            self._publish_backlog()
            self.store.commit_batch()
        except BaseException:
            self._abort_round()
            raise
        self._after_durable()
        log.info("dispatcher ready: namespace=%s store=%s", self.ns, self.store.path)

    def _stand_by(self) -> bool:
        """Wait, connected, until this dispatcher holds the lease, answering
        requests that no active dispatcher takes; False if told to stop."""
        b = self.broker
        self.store.fence, self.term = None, None
        b.consume(naming.dispatcher_rpc_queue(self.ns), self._standby_request, prefetch=10, priority=STANDBY_PRIORITY)
        told = ""
        while not self.stopping:
            term = self.store.acquire_lease(self.holder, self.s.lease_ttl)
            if term is not None:
                b.stop_consuming()
                self.term = term
                self.store.fence, self.store.lease_ttl = (self.holder, term), self.s.lease_ttl
                log.warning("dispatcher %s is the active one now (lease term %d)", self.holder, term)
                return True
            lease = self.store.lease()
            if lease.holder != told:
                told = lease.holder
                log.info("standing by: dispatcher %s is active (lease term %d)", lease.holder, lease.term)
            b.process(LEASE_POLL)
            b.release_acks()
        return False

    def _standby_request(self, d: Delivery) -> None:
        """A request no active dispatcher took (there is none right now): say so."""
        msg = self._decode(d, Request)
        if msg is None:
            return
        try:
            lease = self.store.lease()
            why = (
                f"the lease of {lease.holder} (term {lease.term}) runs out in {lease.seconds_left:.1f}s"
                if lease.seconds_left > 0 and lease.holder
                else "the lease is free"
            )
        except StoreError as exc:
            why = f"the store cannot be read ({exc})"
        error = f"no active dispatcher in namespace {self.ns!r} right now ({why}); standby {self.holder} takes over"
        self.broker.reply(d, Reply(ok=False, error=error))
        d.ack()

    def _claim_namespace(self) -> None:
        """Make sure the namespace is this store's. The exclusive consumers keep a
        second dispatcher out while the first is connected; this keeps out one
        with another store while the first is away (a network blip, a pause),
        which would otherwise split the jobs between two stores."""
        queue = naming.dispatcher_owner_queue(self.ns)
        d = self.broker.get(queue)
        owner = d.body.decode(errors="replace") if d is not None else None
        if d is not None:
            d.requeue()
        if owner == self.store.store_id:
            return
        if owner is not None and not self.s.take_over:
            self.broker.close()
            raise SettingsError(
                f"namespace {self.ns!r} belongs to another dispatcher's store (id {owner[:12]}), not {self.s.db}; "
                "if that store is gone for good, start this one with --take-over "
                "(it adopts the jobs waiting in the backlog)"
            )
        if owner is not None:
            self.broker.purge_queue(queue)
            log.warning("namespace=%s taken over from store %s (--take-over)", self.ns, owner[:12])
        try:
            self.broker.publish("", queue, self.store.store_id.encode())
        except BrokerUnavailable:
            # Nacked: the queue holds one claim already, made since we looked.
            raise InUse(f"another dispatcher claimed namespace {self.ns!r} just now") from None
        log.info("namespace=%s belongs to store %s from now on", self.ns, self.store.store_id[:12])

    def run_once(self, time_limit: float = 0.0) -> None:
        """Process what arrived (waiting up to time_limit), then sweep and assign.

        Group commit: the round's store changes become durable in one COMMIT,
        and only then are its messages acked (delivery rules 2 and 4 hold per
        round instead of per message, at one fsync per round). A store error
        rolls the round back and acks none of it.
        """
        now = self.clock()
        self._stalled(now - self._last_round)
        self.store.begin_batch()
        try:
            self.broker.process(time_limit)
            if self._assign_due:
                # Once a round, for every runner the round freed and every job it
                # brought: one commit makes all of the round's assignments durable.
                self._assign_due = False
                self.assign()
            if self.clock() >= self._next_sweep:
                self.store.check_identity()
                self.sweep()
                self.assign()
                self._next_sweep = self.clock() + 0.25
            self._publish_backlog()
            self.store.commit_batch()
        except StoreError as exc:
            self._abort_round()
            if isinstance(exc, LeaseLost):
                log.error("%s; this dispatcher stands by", exc)
                self.store.fence, self.term = None, None
                raise
            if isinstance(exc, StoreGone):
                raise
            # Said once, by the loop that backs off and retries (Broker.run).
            raise StoreError(f"{exc}: nothing of this round is acked") from None
        except BaseException:
            # What was handled is whole (a savepoint per change): keep it. Jobs
            # not published yet stay pending, and setup() publishes them.
            self._to_backlog.clear()
            try:
                self.store.commit_batch()
            except StoreError:
                self._abort_round()
                raise
            self._after_durable()
            raise
        self._after_durable()
        self._last_round = self.clock()
        # The page and the RPC answers read the snapshot, never the broker.
        if self.clock() >= self._next_snapshot:
            self.snapshot = take_snapshot(self, self.snapshot)
            self._next_snapshot = self.clock() + SNAPSHOT_EVERY

    def _stalled(self, silent: float) -> None:
        """The dispatcher heard nothing for `silent` seconds of its own doing:
        past STALL_AFTER, every runner and lease gets a fresh window."""
        if silent > STALL_AFTER:
            log.warning("the dispatcher stalled for %.1fs; giving runners a fresh lease", silent)
            self._forgive(0.0)

    def _make_durable(self) -> None:
        """Commit the round so far (before jobs go to runners); the round goes on.
        Its acks wait for the round's end: later than durable is as safe, and
        one multiple-ack a round costs the broker less than one per job."""
        self.store.checkpoint()
        self._after_durable(acks=False)

    def _after_durable(self, acks: bool = True) -> None:
        if acks:
            self.broker.release_acks()
        todo, self._after_commit = self._after_commit, []
        for fn in todo:
            fn()

    def _abort_round(self) -> None:
        self.store.rollback_batch()
        self.broker.drop_held_acks()
        self._after_commit.clear()
        self._to_backlog.clear()
        self._backlog_maybe = self._parked_maybe = True

    def _later(self, level: int, fmt: str, *args: Any, extra: dict[str, Any] | None = None) -> None:
        """Log once the round is durable: a line must not claim what a rollback undid."""
        self._after_commit.append(lambda: log.log(level, fmt, *args, extra=extra))

    def _forgive(self, grace: float) -> None:
        """Nobody could be heard for a while (our outage, a stall, a blocking
        broker): restart every runner's deadline and every lease's."""
        self.registry.forgive(grace)
        longest = max((self._lease_window(r) for r in self.registry.runners.values()), default=0.0)
        self.leases.forgive(max(grace, longest))

    def _on_blocked(self, blocked: bool) -> None:
        if not blocked:
            # Heartbeats could not be published meanwhile: start over.
            self._forgive(self.s.restart_grace)

    # -- commits ----------------------------------------------------------

    def on_commit(self, d: Delivery) -> None:
        msg = self._decode(d, CommitSeen)
        if msg is None:
            return
        row = self.store.add_job(msg, now=self.wall())
        if row.state == "pending":
            self._pend(row)
            self._later(
                logging.INFO,
                "job=%s commit=%s repo=%s branch=%s queued",
                row.job_id,
                row.commit_sha[:12],
                row.repo,
                row.branch,
                extra=ids(job=row.job_id, commit=row.commit_sha, repo=row.repo, branch=row.branch),
            )
            if row.labels and not self.registry.able(row.labels):
                log.warning(
                    "job=%s needs labels %s: no live runner has them",
                    row.job_id,
                    ", ".join(row.labels),
                    extra=ids(job=row.job_id),
                )
        d.ack()
        self._assign_due = True

    def _pend(self, row: JobRow) -> None:
        """A pending job to the backlog; a split run's shards in its stead."""
        if not row.is_run:
            self._enqueue(row.as_job())
            return
        for shard in self.store.make_run(row.job_id, self.wall()):
            self._enqueue(shard.as_job())

    def _enqueue(self, job: Job) -> None:
        """Put a pending job in the backlog queue (_publish_backlog, before the
        round assigns or commits); it is queued once its publish is confirmed."""
        self._to_backlog.append(job)

    def _publish_backlog(self) -> None:
        """Publish the round's jobs for the backlog, all before waiting for
        their confirms, then mark them queued."""
        jobs, self._to_backlog = self._to_backlog, []
        if not jobs:
            return
        self._to_backlog_queue(jobs)
        self.store.mark_all_queued([(job.job_id, job.attempt) for job in jobs], self.wall())

    def _to_backlog_queue(self, jobs: list[Job]) -> None:
        key = naming.BACKLOG_ROUTING_KEY
        routed = self.broker.publish_all([(naming.jobs_exchange(self.ns), key, job) for job in jobs])
        if not all(routed):
            # The backlog queue is gone: declaring the topology again (on reconnecting) brings it back.
            raise Unroutable(f"the backlog queue {naming.backlog_queue(self.ns)} is missing")
        self._backlog_maybe = True

    def _repair_backlog(self) -> None:
        """The backlog queue is empty, so every job the store has as queued lost
        its message (a purge, a lost node): publish them again. A copy too many
        is harmless: only the first one finds the job still queued."""
        orphans = self.store.in_state("queued")
        if orphans:
            self._to_backlog_queue([row.as_job() for row in orphans])
            log.warning("%d queued job(s) had no backlog message; published them again", len(orphans))

    # -- assignment -------------------------------------------------------

    def assign(self) -> None:
        """Give waiting jobs to idle runners until one or the other runs out.

        Parked jobs (waiting for a runner with their labels) go first, then the
        backlog queue, read with basic.get only while a runner is free, so
        waiting work stays visible as the queue's ready count. A backlog job no
        free runner can take is parked, so it does not block the ones behind it.
        The assignments are made durable together before any job is sent.
        """
        self._publish_backlog()
        if not (self._backlog_maybe or self._parked_maybe):
            return
        # The store is asked only when some runner says it is free.
        if not self.registry.available(set()):
            return
        free = self.registry.available(self.store.busy_runners())
        if not free:
            return
        picked: list[tuple[Job, RunnerInfo]] = []

        def pick(job: Job) -> bool:
            runner = first_able(free, job.labels)
            if runner is None:
                return False
            lease = self.store.assign(job.job_id, job.attempt, runner.runner_id, self.wall())
            if lease is None:
                return False
            picked.append((replace(job, lease=lease, lease_s=self._lease_window(runner)), runner))
            free.remove(runner)
            return True

        if self._parked_maybe:
            parked = self.store.in_state("parked")
            self._parked_maybe = bool(parked)
            for row in parked:
                if free and self._wanted(row.as_job()):
                    pick(row.as_job())
        while free and self._backlog_maybe:
            d = self.broker.get(naming.backlog_queue(self.ns))
            if d is None:
                self._backlog_maybe = False
                self._repair_backlog()
                break
            job = self._decode(d, Job)
            if job is None:
                continue
            if not job.run and pick(job):
                # The store had it waiting at this attempt (its assign says so): no need to read it first.
                d.ack()
                continue
            stored = self.store.get(job.job_id)
            if stored is None:
                # A store that started empty on a namespace with a backlog.
                stored = self.store.adopt(job, self.wall())
                self._later(
                    logging.WARNING,
                    "job=%s commit=%s adopted from the backlog",
                    job.job_id,
                    job.commit[:12],
                    extra=ids(job=job.job_id, commit=job.commit),
                )
            if stored.state == "queued" and stored.attempt == job.attempt and self._wanted(job) and not pick(job):
                self._park(job)
            # Held until the round is durable: the store now has the job assigned or
            # parked (or knows better than this copy, left by a crash or a re-queue).
            d.ack()
        if picked:
            for job, _ in picked:
                self.leases.watch(job.job_id, job.lease, max(self.s.start_timeout, job.lease_s))
            self._make_durable()  # no runner gets a job the store could forget
            self._send(picked)

    def _wanted(self, job: Job) -> bool:
        """Whether a waiting job still needs a runner: a split run's shard does
        not once the run's work queue is empty (it ends, cancelled, here)."""
        if not job.run or self.runs.wants_shards(job.run):
            return True
        self.store.end_shard(job.job_id, "not needed: no tests were left for it", self.wall())
        return False

    def _lease_window(self, runner: RunnerInfo) -> float:
        """How long a job stays with `runner` after the last heartbeat that echoed its lease."""
        return runner.interval * self.registry.misses

    def _send(self, picked: list[tuple[Job, RunnerInfo]]) -> None:
        """Publish assigned jobs to their runners' queues, all before waiting for the confirms."""
        exchange = naming.jobs_exchange(self.ns)
        routed = self.broker.publish_all([(exchange, naming.runner_routing_key(r.runner_id), j) for j, r in picked])
        for (job, runner), ok in zip(picked, routed, strict=True):
            self._sent(job, runner, ok)

    def _sent(self, job: Job, runner: RunnerInfo, routed: bool) -> None:
        if not routed:
            # Its queue is gone, so is the runner: the job waits for the next one.
            log.warning(
                "runner=%s has no queue; job=%s waits for another runner",
                runner.runner_id,
                job.job_id,
                extra=ids(runner=runner.runner_id, job=job.job_id),
            )
            self.registry.remove(runner.runner_id)
            self.leases.drop(job.job_id)
            self.store.unassign(
                job.job_id, job.lease, "unroutable", f"runner {runner.runner_id} queue missing", self.wall()
            )
            self._parked_maybe = True
            return
        runner.last_assigned = self.clock()
        log.info(
            "job=%s attempt=%d commit=%s assigned to runner=%s",
            job.job_id,
            job.attempt,
            job.commit[:12],
            runner.runner_id,
            extra=ids(job=job.job_id, attempt=job.attempt, commit=job.commit, runner=runner.runner_id),
        )

    def _park(self, job: Job) -> None:
        able = self.registry.able(job.labels)
        if able:
            why = f"needs labels {', '.join(job.labels)}; its {len(able)} runner(s) are busy or paused"
            log.info("job=%s commit=%s parked: %s", job.job_id, job.commit[:12], why, extra=ids(job=job.job_id))
        else:
            why = f"no live runner has labels {', '.join(job.labels)}"
            log.warning("job=%s commit=%s waits: %s", job.job_id, job.commit[:12], why, extra=ids(job=job.job_id))
        self.store.park(job.job_id, job.attempt, why, self.wall())
        self._parked_maybe = True

    def _expire_parked(self) -> None:
        """End as error the parked jobs whose labels no live runner has had for park_timeout."""
        now = self.clock()
        for row in self.store.in_state("parked"):
            if not row.labels:
                continue
            key = tuple(row.labels)
            if self.registry.able(row.labels):
                self._labels_seen[key] = now
                continue
            since = self._labels_seen.setdefault(key, self.started)
            if now - since >= self.s.park_timeout:
                reason = f"no live runner has had labels {', '.join(row.labels)} for {now - since:.0f}s"
                if self.store.expire_parked(row.job_id, reason, self.wall()):
                    if row.parent:
                        self.runs.shard_expired(row, reason)
                    self._later(
                        logging.ERROR,
                        "job=%s commit=%s ended as error: %s",
                        row.job_id,
                        row.commit_sha[:12],
                        reason,
                        extra=ids(job=row.job_id, commit=row.commit_sha),
                    )

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
        log.info(
            "runner=%s told to %s by %s%s",
            runner_id,
            action,
            asker or "?",
            f": {reason}" if reason else "",
            extra=ids(runner=runner_id),
        )
        if action == "resume":
            self.assign()
        return {"runner": runner_id, "action": action, "state": info.state}

    # -- runners ----------------------------------------------------------

    def on_control(self, d: Delivery) -> None:
        msg = self._decode(d, Hello, Goodbye, Mark)
        if msg is None:
            return
        if isinstance(msg, Mark):
            if self.hearing.came_back(msg.token):
                self._next_sweep = 0.0  # what it tells is worth acting on now
            d.ack()
            return
        if isinstance(msg, Hello):  # Heartbeat is a Hello
            seen = self.registry.heartbeat(msg)
            if seen.new:
                log.info(
                    "runner=%s host=%s joined (session %s)",
                    msg.runner_id,
                    msg.host,
                    msg.session,
                    extra=ids(runner=msg.runner_id),
                )
            if seen.restarted_from:
                log.warning(
                    "runner=%s restarted (session %s -> %s)",
                    msg.runner_id,
                    seen.restarted_from,
                    msg.session,
                    extra=ids(runner=msg.runner_id),
                )
            if msg.job_id:
                self._echoed(msg, seen.info)
            d.ack()
            if seen.changed:  # a runner that heartbeats as before has not become free
                self._assign_due = True
            return
        log.info("runner=%s left: %s", msg.runner_id, msg.reason or "goodbye", extra=ids(runner=msg.runner_id))
        info = self.registry.get(msg.runner_id)
        if info is None or info.session == msg.session:
            self.registry.remove(msg.runner_id)
            why = f"runner left ({msg.reason or 'goodbye'})"
            for row in self.store.in_state("assigned", "running"):
                if row.runner != msg.runner_id or row.lease is None:
                    continue
                if row.state == "assigned":  # sent, never started: same attempt, to the next runner
                    self.leases.drop(row.job_id)
                    self.store.unassign(row.job_id, row.lease, "returned", why, self.wall())
                    self._parked_maybe = True
                elif msg.lease and row.lease == msg.lease:
                    self._requeue(row.job_id, row.lease, why, failure=False)
        d.ack()
        self._assign_due = True

    def _echoed(self, msg: Hello, info: RunnerInfo) -> None:
        """A heartbeat says its runner runs a job: renew the lease it echoes, or
        tell the runner to stop an attempt that is no longer its own."""
        if self.leases.renew(msg.job_id, msg.lease, self._lease_window(info)):
            return
        row = self.store.get(msg.job_id)
        if row is not None and row.lease and row.lease == msg.lease and row.runner == msg.runner_id:
            # The job is its own, but this dispatcher has not watched it yet (a restart).
            self.leases.watch(msg.job_id, row.lease, self._lease_window(info))
            return
        self._cancel(msg.runner_id, msg.job_id, msg.attempt, msg.lease, "this attempt is no longer yours")

    def sweep(self) -> None:
        """Take back the jobs whose lease ran out, and forget the runners whose
        heartbeats stopped: by the runners' silence only, never the dispatcher's
        own deafness (a pause, a backlog of heartbeats, a predecessor that still
        holds the control queue, a broker that blocks publishers). A deadline
        counts once it had passed when a mark went through the control queue
        and came back (dispatcher/hearing.py); for one that passed since, a mark
        goes out now."""
        now = self.clock()
        if now >= self._next_park_check:
            self._expire_parked()
            self._next_park_check = now + PARK_CHECK_EVERY
        # A job not watched yet (after a restart) gives its runner the grace to echo it.
        grace = self.s.restart_grace if now - self.started < self.s.restart_grace else self.s.start_timeout
        overdue = self.leases.due(self.store.in_state("assigned", "running"), grace)
        late = sum(r.deadline < now for r in self.registry.runners.values())
        if not (overdue or late) or self.broker.blocked_since is not None:
            return
        heard = self.hearing.heard_up_to
        lost = self.registry.expire(as_of=heard)
        for info in lost:
            silent = self.clock() - info.last_seen
            reason = f"runner {info.runner_id} lost (no heartbeat for {silent:.1f}s)"
            log.warning("%s", reason, extra=ids(runner=info.runner_id))
            self._lost_reasons[info.runner_id] = reason
        gone = [row for row in overdue if self.leases.watches[row.job_id].deadline < heard]
        for row in gone:
            reason, failure = why_gone(row, self.registry, self._lost_reasons)
            self._requeue(row.job_id, row.lease or "", reason, failure=failure)
        if (len(gone) < len(overdue) or len(lost) < late) and self.hearing.mark_due():
            # Unconfirmed: a broker that blocks publishers keeps it, and nobody is judged meanwhile.
            mark = Mark(token=self.hearing.sent())
            self.broker.publish(naming.control_exchange(self.ns), "", mark, persistent=False, confirm=False)

    def _requeue(self, job_id: str, lease: str, reason: str, failure: bool) -> bool:
        """Take a job back from its current assignment; False if `lease` is not it."""
        outcome = self.store.requeue(
            job_id, lease, reason, self.wall(), failure=failure, max_failures=self.s.max_attempts
        )
        if outcome == "stale":
            return False
        self.leases.drop(job_id)
        if is_shard(job_id) and not self.runs.shard_taken_back(job_id, lease, outcome, reason):
            return True
        if outcome == "pending":
            row = self.store.get(job_id)
            assert row is not None
            self._after_commit.append(self.metrics.redeliveries.inc)
            self._later(
                logging.WARNING,
                "job=%s taken back (%s); retrying as attempt %d",
                job_id,
                reason,
                row.attempt,
                extra=ids(job=job_id, attempt=row.attempt),
            )
            self._enqueue(row.as_job())
        else:
            self._later(logging.ERROR, "job=%s ended as error: %s", job_id, reason, extra=ids(job=job_id))
        return True

    # -- results ----------------------------------------------------------

    def on_result(self, d: Delivery) -> None:
        msg = self._decode(d, JobStarted, JobResult, JobRejected, JobAbandoned, ChunkRequest)
        if msg is None:
            return
        if isinstance(msg, ChunkRequest):
            self.runs.on_request(msg)
            d.ack()
            return
        who = f"runner={msg.runner_id} job={msg.job_id} attempt={msg.attempt}"
        fields = ids(runner=msg.runner_id, job=msg.job_id, attempt=msg.attempt)
        if isinstance(msg, JobStarted):
            self._started(msg, who)
        elif isinstance(msg, JobResult):
            shard = self.store.get(msg.job_id) if is_shard(msg.job_id) else None
            if self.store.finish(msg, self.wall()):
                self.leases.drop(msg.job_id)
                if shard is not None and shard.parent:
                    self.runs.shard_ended(shard, msg.lease, msg.status, msg.reason)
                self._after_commit.append(functools.partial(self.metrics.job_finished, msg.duration_s))
                self._later(
                    logging.INFO,
                    "%s recorded: %s passed=%d failed=%d",
                    who,
                    msg.status,
                    msg.passed,
                    msg.failed,
                    extra=fields,
                )
            else:
                self._later(logging.INFO, "%s late result (%s) kept as history", who, msg.status, extra=fields)
        elif isinstance(msg, JobRejected):
            # Refused before it ran: the same attempt goes to another runner.
            if msg.lease and self.store.unassign(
                msg.job_id, msg.lease, "refused", f"runner {msg.runner_id} refused it: {msg.reason}", self.wall()
            ):
                self.leases.drop(msg.job_id)
                self._parked_maybe = True
                info = self.registry.get(msg.runner_id)
                if info is not None:
                    info.refusing = True
                log.info("%s refused: %s", who, msg.reason, extra=fields)
        else:
            why = f"runner {msg.runner_id} gave it up: {msg.reason}"
            if not self._requeue(msg.job_id, msg.lease, why, failure=True):
                self.store.note(msg.job_id, msg.attempt, msg.runner_id, "late_abandoned", msg.reason, self.wall())
        d.ack()
        self._assign_due = True

    def _started(self, msg: JobStarted, who: str) -> None:
        queued_at = (
            self.store.start(msg.job_id, msg.lease, msg.runner_id, msg.session, msg.started_at, self.wall())
            if msg.lease
            else None
        )
        if queued_at is not None:
            if is_shard(msg.job_id):
                self.store.run_started(run_of(msg.job_id), msg.started_at)
            info = self.registry.get(msg.runner_id)
            if info is not None:
                self.leases.watch(msg.job_id, msg.lease, self._lease_window(info))
            wait = max(0.0, msg.started_at - queued_at) if queued_at else None
            self._after_commit.append(functools.partial(self.metrics.queue_waited, wait))
            return
        row = self.store.get(msg.job_id)
        duplicate = row is not None and row.state == "running" and row.lease == msg.lease and bool(msg.lease)
        if not duplicate:
            log.warning(
                "%s started an attempt that is not its own; cancelling it",
                who,
                extra=ids(runner=msg.runner_id, job=msg.job_id, attempt=msg.attempt),
            )
            self._cancel(msg.runner_id, msg.job_id, msg.attempt, msg.lease, "this attempt was given to another runner")

    def _cancel(self, runner_id: str, job_id: str, attempt: int, lease: str, reason: str) -> None:
        """Tell a runner to stop an attempt (at most once a second per attempt)."""
        if not self.leases.may_cancel(runner_id, lease):
            return
        try:
            self.broker.publish(
                naming.jobs_exchange(self.ns),
                naming.runner_routing_key(runner_id),
                CancelJob(job_id=job_id, attempt=attempt, reason=reason, lease=lease),
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
        dead-lettered with the error, so its redelivery cannot crash-loop us.
        Broker and store errors are not the message's: they end the round."""

        def guarded(d: Delivery) -> None:
            try:
                handler(d)
            except (BrokerError, StoreError):
                raise
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
