"""The runner loop.

The main thread owns the broker connection and never does slow work: it
takes jobs, acks them once JobStarted is confirmed (delivery rule 3), sends
heartbeats, and publishes results. Checkout and the test run happen on a
worker thread, which hands its result back through an on-disk outbox (so a
result finished while the broker is down survives) and wakes the main thread
with call_threadsafe.
"""

from __future__ import annotations

import fnmatch
import json
import logging
import os
import signal
import socket
import threading
import time
import uuid
from base64 import b64encode
from dataclasses import dataclass, field
from pathlib import Path

from common import naming
from common.broker import Broker, BrokerUnavailable, Delivery, Unroutable
from common.health import write_health
from common.messages import (
    CancelJob,
    DecodeError,
    Goodbye,
    Heartbeat,
    Hello,
    Job,
    JobRejected,
    JobResult,
    JobStarted,
    RunnerCommand,
    decode,
)
from common.settings import BrokerSettings
from runner.execute import ConfigError, Outcome, load_config, run_command, test_env
from runner.workspace import CheckoutError, Workspace

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RunnerSettings:
    broker: BrokerSettings
    runner_id: str
    workdir: Path
    job_timeout: float = 600.0
    heartbeat_interval: float = 2.0
    allow_repos: tuple[str, ...] = ()
    labels: tuple[str, ...] = ()
    kill_grace: float = 5.0


@dataclass
class Current:
    job: Job
    cancel: threading.Event = field(default_factory=threading.Event)
    thread: threading.Thread | None = None


class Runner:
    def __init__(self, settings: RunnerSettings, broker: Broker | None = None) -> None:
        self.s = settings
        self.broker = broker or Broker(settings.broker, f"volt-runner-{settings.runner_id}")
        self.session = uuid.uuid4().hex[:12]
        self.workspace = Workspace(settings.workdir)
        self.outbox = settings.workdir / "outbox"
        self.outbox.mkdir(parents=True, exist_ok=True)
        self.pgid_file = settings.workdir / "current-job.json"
        self.current: Current | None = None
        self._lock = threading.Lock()
        self.draining = False
        self.paused = False
        self.abandon = False
        self._consuming = False
        self._next_heartbeat = 0.0
        self._warned: set[str] = set()

    # -- lifecycle --------------------------------------------------------

    def request_stop(self, *_: object) -> None:
        """First call: finish the current job, then exit. Second: abandon it now."""
        if not self.draining:
            log.info("runner=%s draining: finishing the current job, then exiting", self.s.runner_id)
            self.draining = True
        else:
            log.info("runner=%s stopping now: abandoning the current job", self.s.runner_id)
            self.abandon = True
            current = self.current
            if current is not None:
                current.cancel.set()

    def install_signal_handlers(self) -> None:
        signal.signal(signal.SIGTERM, self.request_stop)
        signal.signal(signal.SIGINT, self.request_stop)

    def run(self) -> int:
        """Serve until drained; reconnect whenever the broker goes away."""
        self.reap_orphans()
        if not self.s.allow_repos:
            log.warning("runner=%s accepts jobs for any repository (no --allow-repo set)", self.s.runner_id)
        try:
            self.broker.run(self._setup, self._serve, stopping=lambda: False, on_lost=self._on_lost)
        finally:
            self.workspace.close()
        return 0

    def _on_lost(self) -> bool:
        self._consuming = False
        # Told to stop now, with nothing running: no need to wait for the broker.
        return self.abandon and self.current is None

    def _setup(self) -> None:
        self.broker.declare_runner_exchanges()
        queue = self.broker.declare_runner_queue(self.s.runner_id)
        if not self.draining:
            self.broker.consume(queue, self.on_delivery, prefetch=1)
            self._consuming = True
        self._send_status(Hello)
        self.flush_outbox()

    def _serve(self) -> bool:
        """Process events until it is time to exit (True)."""
        while True:
            if self.draining and self._consuming:
                self.broker.stop_consuming()
                self._consuming = False
            self._finish_thread()
            self.flush_outbox()
            if self.draining and self.current is None and not self._outbox_files():
                self._goodbye("", 0, "drained")
                self.broker.close()
                log.info("runner=%s drained and stopped", self.s.runner_id)
                return True
            if self.abandon and self.current is not None and self.current.thread is not None:
                # The worker thread stops the process group; wait for it, then
                # hand the job back rather than report a result for it.
                self.current.thread.join(timeout=self.s.kill_grace + 5)
                job = self.current.job
                self._clear_outbox_for(job)
                self._goodbye(job.job_id, job.attempt, "stopped by a second signal")
                self.broker.close()
                return True
            now = time.monotonic()
            if now >= self._next_heartbeat:
                self._send_status(Heartbeat)
            self.broker.process(min(0.2, max(0.0, self._next_heartbeat - time.monotonic())))

    # -- messages in ------------------------------------------------------

    def on_delivery(self, delivery: Delivery) -> None:
        try:
            msg = decode(delivery.body)
        except DecodeError as exc:
            self.broker.dead_letter(delivery, str(exc))
            return
        if isinstance(msg, Job):
            self._take(msg, delivery)
        elif isinstance(msg, RunnerCommand):
            self._command(msg)
            delivery.ack()
        elif isinstance(msg, CancelJob):
            current = self.current
            if current and (current.job.job_id, current.job.attempt) == (msg.job_id, msg.attempt):
                log.info(
                    "runner=%s job=%s attempt=%d cancelled: %s",
                    self.s.runner_id,
                    msg.job_id,
                    msg.attempt,
                    msg.reason,
                )
                current.cancel.set()
            delivery.ack()
        else:
            self.broker.dead_letter(delivery, f"a runner queue takes jobs, not {msg.TYPE}")

    def _command(self, cmd: RunnerCommand) -> None:
        log.info("runner=%s told to %s%s", self.s.runner_id, cmd.action, f": {cmd.reason}" if cmd.reason else "")
        if cmd.action == "drain":
            if not self.draining:
                self.request_stop()
        else:
            self.paused = cmd.action == "pause"
        self._send_status(Heartbeat)

    def _take(self, job: Job, delivery: Delivery) -> None:
        ids = f"runner={self.s.runner_id} job={job.job_id} attempt={job.attempt} commit={job.commit[:12]}"
        missing = sorted(set(job.labels) - set(self.s.labels))
        if self.current is not None or self.draining or self.paused or missing:
            if self.current is not None:
                reason = f"busy with job {self.current.job.job_id}"
            elif missing:
                reason = f"lacks labels {', '.join(missing)}"
            else:
                reason = "draining" if self.draining else "paused"
            log.info("%s rejected: %s", ids, reason)
            self._publish_result_like(
                JobRejected(job_id=job.job_id, attempt=job.attempt, runner_id=self.s.runner_id, reason=reason)
            )
            delivery.ack()
            return
        if not self.allowed(job.repo):
            log.warning("%s refused: repository %s is not allowed on this runner", ids, job.repo)
            self._write_outbox(
                job,
                JobResult(
                    job_id=job.job_id,
                    attempt=job.attempt,
                    runner_id=self.s.runner_id,
                    status="error",
                    reason=f"repository not allowed on runner {self.s.runner_id}: {job.repo}",
                    started_at=time.time(),
                    finished_at=time.time(),
                ),
            )
            delivery.ack()
            self.flush_outbox()
            return
        started = JobStarted(
            job_id=job.job_id,
            attempt=job.attempt,
            runner_id=self.s.runner_id,
            session=self.session,
            started_at=time.time(),
        )
        try:
            self.broker.publish(naming.results_exchange(self.s.broker.namespace), "", started)
        except Unroutable:
            # No results queue: reconnect and let the job come again.
            raise BrokerUnavailable("the dispatcher's results queue is missing") from None
        # From here the dispatcher's lease owns the job (delivery rule 3).
        delivery.ack()
        log.info("%s started", ids)
        current = Current(job)
        current.thread = threading.Thread(target=self._work, args=(current,), name=f"job-{job.job_id}", daemon=True)
        self.current = current
        current.thread.start()
        self._send_status(Heartbeat)

    def allowed(self, repo: str) -> bool:
        return not self.s.allow_repos or any(fnmatch.fnmatchcase(repo, p) for p in self.s.allow_repos)

    # -- the worker thread ------------------------------------------------

    def _work(self, current: Current) -> None:
        job = current.job
        started_at = time.time()
        try:
            outcome = self._run_job(current)
        except Exception as exc:  # a runner never dies of a job
            log.exception("runner=%s job=%s crashed the worker", self.s.runner_id, job.job_id)
            outcome = Outcome("error", None, 0.0, reason=f"runner error: {type(exc).__name__}: {exc}")
        result = _result_from(job, self.s.runner_id, outcome, started_at)
        self._write_outbox(job, result)
        log.info(
            "runner=%s job=%s attempt=%d commit=%s finished: %s %s",
            self.s.runner_id,
            job.job_id,
            job.attempt,
            job.commit[:12],
            outcome.status,
            outcome.reason,
        )
        try:
            self.broker.call_threadsafe(lambda: None)
        except BrokerUnavailable:
            pass  # the main loop flushes the outbox once it reconnects

    def _run_job(self, current: Current) -> Outcome:
        job = current.job
        began = time.monotonic()
        try:
            tree = self.workspace.checkout(job.repo, job.commit)
        except CheckoutError as exc:
            return Outcome("error", None, 0.0, reason=str(exc))
        log.debug(
            "runner=%s job=%s checkout took %.1f ms", self.s.runner_id, job.job_id, (time.monotonic() - began) * 1000
        )
        junit = self.s.workdir / "junit" / f"{job.job_id}-{job.attempt}.xml"
        junit.parent.mkdir(exist_ok=True)
        junit.unlink(missing_ok=True)
        try:
            config = load_config(tree, junit, self.s.job_timeout)
        except ConfigError as exc:
            return Outcome("error", None, 0.0, reason=str(exc))
        env = test_env(
            {
                "VOLT_JUNIT_XML": str(junit),
                "VOLT_JOB_ID": job.job_id,
                "VOLT_COMMIT": job.commit,
                "VOLT_BRANCH": job.branch,
            }
        )
        try:
            return run_command(
                config,
                tree,
                env,
                junit,
                current.cancel,
                grace=self.s.kill_grace,
                on_start=lambda pid: self._note_pgid(pid, job),
            )
        finally:
            self.pgid_file.unlink(missing_ok=True)
            junit.unlink(missing_ok=True)

    def _note_pgid(self, pgid: int, job: Job) -> None:
        # If this runner is killed, its restart kills the orphaned test group.
        self.pgid_file.write_text(json.dumps({"pgid": pgid, "job_id": job.job_id}))

    def reap_orphans(self) -> None:
        """Kill the test process group a killed predecessor left running."""
        try:
            data = json.loads(self.pgid_file.read_text())
            pgid = int(data["pgid"])
        except (OSError, ValueError, KeyError, TypeError):
            return
        try:
            os.killpg(pgid, signal.SIGKILL)
            log.warning(
                "runner=%s killed orphaned test process group %d of job %s", self.s.runner_id, pgid, data.get("job_id")
            )
        except (ProcessLookupError, PermissionError):
            pass
        self.pgid_file.unlink(missing_ok=True)

    def _finish_thread(self) -> None:
        """Free the runner once its worker has left the result in the outbox.

        Done here, on the main thread and before the result is published, so
        the next job the dispatcher sends is never refused as busy.
        """
        current = self.current
        if current is None or current.thread is None or self.abandon:
            return
        done = (self.outbox / _outbox_name(current.job)).exists() or not current.thread.is_alive()
        if done:
            current.thread.join()
            self.current = None

    # -- messages out -----------------------------------------------------

    def _outbox_files(self) -> list[Path]:
        return sorted(self.outbox.glob("*.json"))

    def _write_outbox(self, job: Job, result: JobResult) -> None:
        path = self.outbox / _outbox_name(job)
        tmp = path.with_suffix(".tmp")
        tmp.write_bytes(result.to_json())
        os.replace(tmp, path)

    def _clear_outbox_for(self, job: Job) -> None:
        (self.outbox / _outbox_name(job)).unlink(missing_ok=True)

    def flush_outbox(self) -> None:
        """Publish every finished result; each file goes only once confirmed."""
        if self.abandon:
            return
        for path in self._outbox_files():
            try:
                body = path.read_bytes()
                result = decode(body)
            except (OSError, DecodeError) as exc:
                log.error("runner=%s dropping unreadable outbox file %s: %s", self.s.runner_id, path, exc)
                path.unlink(missing_ok=True)
                continue
            try:
                self.broker.publish(naming.results_exchange(self.s.broker.namespace), "", result)
            except Unroutable:
                # The dispatcher has never run here: keep it and try again later.
                self._warn_once("no results queue yet (has the dispatcher run?); results wait in the outbox")
                return
            path.unlink(missing_ok=True)

    def _publish_result_like(self, msg: JobRejected) -> None:
        self.broker.publish(naming.results_exchange(self.s.broker.namespace), "", msg)

    def _send_status(self, kind: type[Hello]) -> None:
        current = self.current
        if self.draining:
            state = "draining"
        elif self.paused:
            state = "paused"  # even while a job finishes: no new work
        else:
            state = "busy" if current else "idle"
        msg = kind(
            runner_id=self.s.runner_id,
            session=self.session,
            host=socket.gethostname(),
            pid=os.getpid(),
            state=state,
            job_id=current.job.job_id if current else "",
            attempt=current.job.attempt if current else 0,
            interval=self.s.heartbeat_interval,
            labels=list(self.s.labels),
            sent_at=time.time(),
        )
        self._next_heartbeat = time.monotonic() + self.s.heartbeat_interval
        try:
            self.broker.publish(naming.control_exchange(self.s.broker.namespace), "", msg)
        except Unroutable:
            self._warn_once("no control queue yet (has the dispatcher run?); heartbeats go nowhere")
            self._note_health({"control queue": "missing; has the dispatcher run?"})
            return
        self._note_health({})

    def _note_health(self, failing: dict[str, str]) -> None:
        """For `volt check --runner-workdir`: the broker took a heartbeat just now."""
        try:
            write_health(self.s.workdir, self.s.heartbeat_interval, failing)
        except OSError as exc:
            self._warn_once(f"cannot write the health file in {self.s.workdir}: {exc}")

    def _goodbye(self, job_id: str, attempt: int, reason: str) -> None:
        msg = Goodbye(runner_id=self.s.runner_id, session=self.session, job_id=job_id, attempt=attempt, reason=reason)
        try:
            self.broker.publish(naming.control_exchange(self.s.broker.namespace), "", msg)
        except (BrokerUnavailable, Unroutable):
            log.warning("runner=%s could not say goodbye; the dispatcher will notice it is gone", self.s.runner_id)

    def _warn_once(self, text: str) -> None:
        if text not in self._warned:
            self._warned.add(text)
            log.warning("runner=%s %s", self.s.runner_id, text)


def _outbox_name(job: Job) -> str:
    return f"{job.job_id}-{job.attempt}.json"


def _result_from(job: Job, runner_id: str, outcome: Outcome, started_at: float) -> JobResult:
    full = outcome.log.full_compressed()
    return JobResult(
        job_id=job.job_id,
        attempt=job.attempt,
        runner_id=runner_id,
        status=outcome.status,
        exit_code=outcome.exit_code,
        passed=outcome.passed,
        failed=outcome.failed,
        errors=outcome.errors,
        skipped=outcome.skipped,
        duration_s=round(outcome.duration_s, 4),
        started_at=started_at,
        finished_at=time.time(),
        reason=outcome.reason,
        log_head=outcome.log.head_text(),
        log_tail=outcome.log.tail_text(),
        log_bytes=outcome.log.total,
        log_full=b64encode(full).decode() if full else "",
    )
