"""The runner loop.

The main thread owns the broker connection and never does slow work: it
takes jobs, acks them once JobStarted is confirmed (delivery rule 3), sends
heartbeats, and publishes results. Checkout and the test run happen on a
worker thread, which hands its result back through an on-disk outbox (so a
result finished while the broker is down survives) and wakes the main thread
with call_threadsafe.

Each job comes with a lease: it is ours while the dispatcher hears
heartbeats that echo it. Each heartbeat the broker confirms renews it here
too; when renewals stop for nearly the dispatcher's window (we are frozen or
cut off), the test run is killed, by the worker thread or, if this process
cannot run at all, by the watchdog process (runner/watchdog.py), so that the
job never runs here and on its next runner at the same time.
"""

from __future__ import annotations

import argparse
import dataclasses
import fnmatch
import json
import logging
import math
import os
import queue
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from base64 import b64encode
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

from common import gitauth, naming
from common.broker import Broker, BrokerUnavailable, Delivery, InUse, Unroutable
from common.health import write_health
from common.logs import ids
from common.messages import (
    CancelJob,
    Chunk,
    ChunkRequest,
    DecodeError,
    Goodbye,
    Heartbeat,
    Hello,
    Job,
    JobAbandoned,
    JobRejected,
    JobResult,
    JobStarted,
    Mark,
    Message,
    RunnerCommand,
    decode,
)
from common.settings import BrokerSettings, SettingsError
from runner import environments, pythons, sandbox, shard
from runner.execute import (
    ConfigError,
    LogCollector,
    Outcome,
    load_config,
    run_command,
    test_env,
    with_default_command,
)
from runner.workspace import GIT_TIMEOUT, CheckoutError, Workspace

log = logging.getLogger(__name__)

# Results kept after they were confirmed, to answer a job delivered again
# (after a broker crash) with its result instead of running it twice.
SENT_KEPT = 100
# A listen that took this much longer than its time limit was held up (the
# runner was frozen): what comes within as long after it may have waited all along.
HELD_UP = 1.0


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
    # The box each test command runs in: "bwrap" (runner/sandbox.py) or "none".
    sandbox: str = "bwrap"
    sandbox_hide: tuple[Path, ...] = ()
    # Whether a repository's `[test] network = true` is granted.
    allow_network: bool = False
    git_timeout: float = GIT_TIMEOUT
    # A git-credential-store style file: credentials for the repositories it names.
    git_credentials: Path | None = None
    # The Pythons jobs may ask for ([env] python), besides the runner's own:
    # versions found as python3.X on PATH, or paths; none given: all on PATH.
    pythons: tuple[str, ...] = ()
    env_cache_size: int = 10  # environments kept, least recently used evicted
    env_timeout: float = 900.0  # seconds an environment's build may take
    # Whether `[env] system = true` (the runner's own interpreter and packages) is granted.
    allow_system_python: bool = False

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> RunnerSettings:
        """Defaults, then VOLT_* (spelled with the flags, in runner/cli.py)."""
        return cls.from_args(None, environ)

    @classmethod
    def from_args(cls, args: argparse.Namespace | None, environ: Mapping[str, str] | None = None) -> RunnerSettings:
        """Defaults, then VOLT_*, then the flags given in `args`."""
        from runner.cli import settings_from

        return settings_from(args, environ)


@dataclass
class Current:
    job: Job
    cancel: threading.Event = field(default_factory=threading.Event)
    thread: threading.Thread | None = None
    done: threading.Event = field(default_factory=threading.Event)
    # Set by the worker thread when it ends: the result (also in the outbox,
    # unless writing it failed), or why it gave the attempt up.
    result: JobResult | None = None
    in_outbox: bool = False  # the result was written to the outbox (which publishes it)
    abandoned: str = ""
    # The lease holds until this (time.monotonic()); renewed by each confirmed
    # heartbeat, suspended while the broker blocks publishers.
    lease_until: float = math.inf
    held: bool = False
    # A shard of a split run: the dispatcher's answers to its chunk requests.
    chunks: queue.Queue[Chunk] = field(default_factory=queue.Queue)

    def lease_lost(self) -> bool:
        return not self.held and time.monotonic() > self.lease_until


class Watchdog:
    """The runner's end of the pipe to runner/watchdog.py."""

    def __init__(self) -> None:
        self._proc: subprocess.Popen[bytes] | None = None
        self._lock = threading.Lock()

    def tell(self, line: str) -> None:
        with self._lock:
            for _ in range(2):
                try:
                    if self._proc is None or self._proc.poll() is not None:
                        self._proc = subprocess.Popen(
                            [sys.executable, "-m", "runner.watchdog"],
                            stdin=subprocess.PIPE,
                            start_new_session=True,  # a Ctrl-Z or SIGSTOP for the runner is not for it
                        )
                    stdin: IO[bytes] | None = self._proc.stdin
                    assert stdin is not None
                    stdin.write(f"{line}\n".encode())
                    stdin.flush()
                    return
                except OSError as exc:  # it died (a broken pipe), or cannot start
                    self._proc = None
                    error = exc
            log.error("cannot reach the watchdog (%s): a frozen runner's test would not be stopped", error)

    def close(self) -> None:
        with self._lock:
            if self._proc is not None and self._proc.stdin is not None:
                self._proc.stdin.close()
                self._proc.wait(timeout=5)


class Runner:
    def __init__(self, settings: RunnerSettings, broker: Broker | None = None) -> None:
        self.s = settings
        self.broker = broker or Broker(settings.broker, f"volt-runner-{settings.runner_id}")
        self.session = uuid.uuid4().hex[:12]
        self.credentials: list[tuple[str, gitauth.Credentials]] = []
        if settings.git_credentials is not None:
            try:
                self.credentials = gitauth.read_credentials(settings.git_credentials)
            except (OSError, ValueError) as exc:
                raise SettingsError(f"--git-credentials: {exc}") from None
        self.workspace = Workspace(settings.workdir, git_timeout=settings.git_timeout, git_env=self._git_env)
        self.jobs = settings.workdir / "jobs"
        self.outbox = settings.workdir / "outbox"
        self.sent = settings.workdir / "sent"
        for folder in (self.outbox, self.sent):
            folder.mkdir(parents=True, exist_ok=True)
        self.pgid_file = settings.workdir / "current-job.json"
        self.current: Current | None = None
        self.watchdog = Watchdog()
        self.draining = False
        self.paused = False
        self.abandon = False
        self._next_heartbeat = 0.0
        # When this runner last finished listening to its queue (time.monotonic()):
        # a job handed over long after that waited while the runner could not
        # hear, nor heartbeat (a freeze), and may have gone to another runner.
        self._listened_at = time.monotonic()
        # The last time a listen was held up far past its limit (a freeze inside
        # it, as an idle runner's freeze mostly is): (began, ended).
        self._held_up = (0.0, 0.0)
        # After a reconnect, what waits in the queue ahead of this mark (sent to
        # ourselves then) came while we could not hear; what comes behind it is new.
        self._fence = ""
        self._heard_before_fence = 0.0
        self._warned: set[str] = set()
        # Results and hand-backs that could not go to the outbox or the broker yet.
        self._unsent: list[Message] = []
        # A shard's chunk requests, from its job thread, for the main thread to publish.
        self._asks: deque[ChunkRequest] = deque()

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

    def check_sandbox(self) -> None:
        """Refuse to start without the sandbox it was told to use; say so when told to use none."""
        if self.s.sandbox == "none":
            log.warning(
                "runner=%s runs test commands WITHOUT a sandbox (--sandbox none): the code under test can read "
                "and change everything this user can",
                self.s.runner_id,
            )
            return
        why = sandbox.probe()
        if why:
            raise SettingsError(f"the sandbox cannot start: {why}")

    def run(self) -> int:
        """Serve until drained; reconnect whenever the broker goes away."""
        self.check_sandbox()
        self.reap_orphans()
        if not self.s.allow_repos:
            log.warning("runner=%s accepts jobs for any repository (no --allow-repo set)", self.s.runner_id)
        self.broker.on_blocked = self._on_blocked
        self._listened_at = time.monotonic()  # the checks above took their time, deaf to nothing
        try:
            self.broker.run(self._setup, self._serve, stopping=self._stopping, on_lost=self._on_lost)
        except InUse:
            raise SettingsError(
                f"another runner with id {self.s.runner_id!r} is running in namespace "
                f"{self.s.broker.namespace!r} (its queue is in exclusive use); give this one another --id"
            ) from None
        finally:
            self.workspace.close()
            self.watchdog.close()
        return 0

    def _stopping(self) -> bool:
        """Told to stop while the broker is out of reach: once no test runs, what
        is left to send waits in the outbox for the next start."""
        if not (self.draining or self.abandon) or self.broker.connected:
            return False
        current = self.current
        if current is not None and not current.done.is_set():
            return False  # draining waits for the job; a second signal is stopping it
        if current is not None and self.abandon:
            self._clear_outbox_for(current.job)
        else:
            self._spill_unsent()
        return True

    def _spill_unsent(self) -> None:
        for msg in self._unsent:
            try:
                lease = getattr(msg, "lease", "") or "x"
                (self.outbox / f"{getattr(msg, 'job_id', 'msg')}-{lease}.json").write_bytes(msg.to_json())
            except OSError as exc:
                log.error("runner=%s cannot keep an unsent %s: %s", self.s.runner_id, msg.TYPE, exc)
        self._unsent.clear()

    def _on_lost(self) -> bool:
        return self._stopping()

    def _setup(self) -> None:
        self.broker.declare_runner_exchanges()
        queue = self.broker.declare_runner_queue(self.s.runner_id)
        if not self._fence:  # else the last outage is not over: still from before it
            self._heard_before_fence = self._listened_at
        self._fence = uuid.uuid4().hex
        self.broker.publish(queue, "", Mark(token=self._fence))  # through its own exchange
        # Exclusive: a second process with this id is refused here. Kept while
        # draining too (it rejects what it gets), so it still hears cancels.
        self.broker.consume(queue, self.on_delivery, prefetch=1, exclusive=True)
        self._send_status(Hello)
        self.flush_outbox()

    def _serve(self) -> bool:
        """Process events until it is time to exit (True)."""
        while True:
            self._finish_thread()
            self._send_asks()
            self.flush_outbox()
            nothing_left = self.current is None and not self._outbox_files() and not self._unsent
            if self.draining and nothing_left:
                self._goodbye(None, "drained")
                self.broker.close()
                log.info("runner=%s drained and stopped", self.s.runner_id)
                return True
            if self.abandon and self.current is not None and self.current.thread is not None:
                # The worker thread stops the process group; wait for it, then
                # hand the job back rather than report a result for it.
                self.current.thread.join(timeout=self.s.kill_grace + 5)
                job = self.current.job
                self._clear_outbox_for(job)
                self._goodbye(job, "stopped by a second signal")
                self.broker.close()
                return True
            now = time.monotonic()
            if now >= self._next_heartbeat:
                self._send_status(Heartbeat)
            self.listen(min(0.2, max(0.0, self._next_heartbeat - time.monotonic())))

    def listen(self, time_limit: float) -> None:
        """Take what the broker has for this runner, waiting up to time_limit."""
        began = time.monotonic()
        self.broker.process(time_limit)
        self._listened_at = time.monotonic()
        if self._listened_at - began > time_limit + HELD_UP:
            self._held_up = (began, self._listened_at)

    def _deaf_for(self) -> float:
        """How long this runner could not hear before what it is handed now: since
        its last listen ended (before a reconnect, until its mark comes back: the
        last listen on the lost connection), or, just after a listen that was
        held up (what that one left behind comes in the next), that listen's
        whole length."""
        now = time.monotonic()
        deaf = now - (self._heard_before_fence if self._fence else self._listened_at) - 0.2  # less the longest wait
        began, ended = self._held_up
        if now - ended < HELD_UP:
            deaf = max(deaf, ended - began)
        return deaf

    def _on_blocked(self, blocked: bool) -> None:
        """While the broker blocks publishers no heartbeat gets through, and the
        dispatcher declares nobody lost: hold the lease until it lets go."""
        current = self.current
        if current is None:
            return
        current.held = blocked
        if blocked:
            self.watchdog.tell("hold")
        else:
            self._renew(current)

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
        elif isinstance(msg, Chunk):
            current = self.current
            if current and current.job.job_id == msg.job_id and current.job.lease == msg.lease:
                current.chunks.put(msg)
            delivery.ack()
        elif isinstance(msg, CancelJob):
            current = self.current
            if current and current.job.job_id == msg.job_id and current.job.lease == msg.lease:
                log.info(
                    "runner=%s job=%s attempt=%d cancelled: %s",
                    self.s.runner_id,
                    msg.job_id,
                    msg.attempt,
                    msg.reason,
                )
                current.cancel.set()
            delivery.ack()
        elif isinstance(msg, Mark):
            if msg.token == self._fence:
                self._fence = ""  # what comes from here on was sent while we hear
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
        who = f"runner={self.s.runner_id} job={job.job_id} attempt={job.attempt} commit={job.commit[:12]}"
        fields = ids(job=job.job_id, attempt=job.attempt, commit=job.commit)
        current = self.current
        if current is not None and current.job.job_id == job.job_id and current.job.lease == job.lease:
            log.info("%s delivered again while it runs; running it once", who, extra=fields)
            delivery.ack()
            return
        if (self.outbox / _outbox_name(job)).exists():
            log.info("%s delivered again after it ran; its result is on its way", who, extra=fields)
            delivery.ack()
            return
        done = self._finished_result(job)
        if done is not None:
            # A job delivered again after it ran (a broker crash lost our ack):
            # its result, not a second run.
            log.info("%s delivered again after it ran; sending its result again", who, extra=fields)
            self._publish(done)
            delivery.ack()
            return
        missing = sorted(set(job.labels) - set(self.s.labels))
        # Deaf for longer than the job's lease window: the dispatcher may have
        # taken the job back and given it to another runner meanwhile, and its
        # cancel could come only after this run began.
        deaf = self._deaf_for()
        stale = job.lease_s > 0 and deaf > job.lease_s - self.s.heartbeat_interval / 2
        if current is not None or self.draining or self.paused or missing or stale:
            if current is not None:
                reason = f"busy with job {current.job.job_id}"
            elif missing:
                reason = f"lacks labels {', '.join(missing)}"
            elif stale:
                reason = f"it came after this runner heard nothing for {deaf:.1f}s (frozen?); it may be another's now"
            else:
                reason = "draining" if self.draining else "paused"
            log.info("%s rejected: %s", who, reason, extra=fields)
            self._publish(
                JobRejected(
                    job_id=job.job_id, attempt=job.attempt, runner_id=self.s.runner_id, reason=reason, lease=job.lease
                )
            )
            delivery.ack()
            return
        if not self.allowed(job.repo):
            log.warning("%s refused: repository %s is not allowed on this runner", who, job.repo, extra=fields)
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
                    lease=job.lease,
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
            lease=job.lease,
        )
        try:
            self.broker.publish(naming.results_exchange(self.s.broker.namespace), "", started)
        except Unroutable:
            # No results queue: reconnect and let the job come again.
            raise BrokerUnavailable("the dispatcher's results queue is missing") from None
        # From here the dispatcher's lease owns the job (delivery rule 3).
        delivery.ack()
        log.info("%s started", who, extra=fields)
        current = Current(job)
        self._renew(current)
        current.thread = threading.Thread(target=self._work, args=(current,), name=f"job-{job.job_id}", daemon=True)
        self.current = current
        current.thread.start()
        self._send_status(Heartbeat)

    def allowed(self, repo: str) -> bool:
        return not self.s.allow_repos or any(fnmatch.fnmatchcase(repo, p) for p in self.s.allow_repos)

    # -- the lease --------------------------------------------------------

    def _renew(self, current: Current) -> None:
        """The broker took a heartbeat naming the job: the dispatcher keeps it ours
        for `lease_s` from about now. Stop half an interval before that."""
        lease_s = current.job.lease_s
        if lease_s <= 0:
            return  # a dispatcher that gives no window: nothing to keep to
        current.lease_until = time.monotonic() + max(lease_s - self.s.heartbeat_interval / 2, 0.1)
        if not current.held:
            self.watchdog.tell(f"until {current.lease_until}")

    # -- the worker thread ------------------------------------------------

    def _work(self, current: Current) -> None:
        job = current.job
        started_at = time.time()
        try:
            outcome = self._run_job(current)
        except BaseException as exc:  # a runner never dies of a job, and a job never ends without a word
            log.exception(
                "runner=%s job=%s crashed the worker", self.s.runner_id, job.job_id, extra=ids(job=job.job_id)
            )
            outcome = Outcome("error", None, 0.0, reason=f"runner error: {type(exc).__name__}: {exc}")
        if outcome.abandoned:
            current.abandoned = outcome.reason
        else:
            try:
                current.result = _result_from(job, self.s.runner_id, outcome, started_at)
            except Exception as exc:  # noqa: BLE001 - say what failed rather than nothing
                current.result = JobResult(
                    job_id=job.job_id,
                    attempt=job.attempt,
                    runner_id=self.s.runner_id,
                    status="error",
                    reason=f"runner error: cannot build the result: {type(exc).__name__}: {exc}",
                    lease=job.lease,
                )
            try:
                self._write_outbox(job, current.result)
                current.in_outbox = True
            except OSError as exc:
                log.error(
                    "runner=%s job=%s cannot write the outbox (%s); sending the result from memory",
                    self.s.runner_id,
                    job.job_id,
                    exc,
                )
        log.info(
            "runner=%s job=%s attempt=%d commit=%s finished: %s %s",
            self.s.runner_id,
            job.job_id,
            job.attempt,
            job.commit[:12],
            outcome.status if not outcome.abandoned else "abandoned",
            outcome.reason,
            extra=ids(job=job.job_id, attempt=job.attempt, commit=job.commit),
        )
        current.done.set()
        try:
            self.broker.call_threadsafe(lambda: None)
        except BrokerUnavailable:
            pass  # the main loop flushes the outbox once it reconnects

    def _git_env(self, repo: str) -> dict[str, str]:
        """What git needs for `repo` from --git-credentials (only its environment holds them)."""
        return gitauth.git_env(gitauth.credentials_for(repo, self.credentials), base={})

    def _run_job(self, current: Current) -> Outcome:
        job = current.job
        began = time.monotonic()
        try:
            tree = self.workspace.checkout(job.repo, job.commit, cancel=current.cancel)
        except CheckoutError as exc:
            return Outcome("error", None, 0.0, reason=str(exc))
        log.debug(
            "runner=%s job=%s checkout took %.1f ms", self.s.runner_id, job.job_id, (time.monotonic() - began) * 1000
        )
        if current.lease_lost():
            return Outcome("cancelled", None, 0.0, reason="lease lost", abandoned=True)
        # The job's own folder: its JUnit file (the one place outside its tree
        # the sandbox lets it write) and, without a sandbox, its HOME and TMPDIR.
        folder = self.jobs / f"{job.job_id}-{job.attempt}"
        shutil.rmtree(folder, ignore_errors=True)
        (folder / "home").mkdir(parents=True)
        junit = folder / "junit.xml"
        try:
            return self._test(current, tree, folder, junit)
        finally:
            self.watchdog.tell("done")
            self.pgid_file.unlink(missing_ok=True)
            shutil.rmtree(folder, ignore_errors=True)

    def _test(self, current: Current, tree: Path, folder: Path, junit: Path) -> Outcome:
        job = current.job
        try:
            config = load_config(tree, junit, self.s.job_timeout)
        except ConfigError as exc:
            return Outcome("error", None, 0.0, reason=str(exc))
        build_log = LogCollector()
        try:
            done = self.workspace.submodules(
                job.repo, job.commit, tree, allowed=self.allowed, cancel=current.cancel, check_out=config.submodules
            )
        except CheckoutError as exc:
            return Outcome("error", None, 0.0, reason=str(exc))
        if done:
            build_log.feed(f"volt: submodules checked out: {', '.join(done)}\n".encode())
        hide = [*self.s.sandbox_hide, *([self.s.git_credentials] if self.s.git_credentials else [])]
        network = config.network and self.s.allow_network
        notes = list(config.notes)
        if config.network and not network:
            notes.append("[test] network = true, but this runner does not grant it (--allow-network): loopback only")

        def stopped() -> str | None:
            return "lease lost" if current.lease_lost() else "cancelled" if current.cancel.is_set() else None

        def build_box(argv: list[str], env: dict[str, str], writable: list[Path], shown: list[Path]) -> list[str]:
            # The build runs the project's own code (its build backend, setup.py): in a box
            # like the tests', with the network it needs and its repository's cache writable.
            return sandbox.wrap(
                argv, tree, env, workdir=self.s.workdir, hide=hide, expose=shown, writable=writable, network=True
            )

        try:
            with environments.for_job(
                config.env,
                tree,
                repo=job.repo,
                uses_default=config.uses_default,
                cache=environments.Environments(
                    self.s.workdir / "envs", size=self.s.env_cache_size, timeout=self.s.env_timeout
                ),
                pythons=pythons.find_pythons(self.s.pythons),
                allow_system=self.s.allow_system_python,
                log=build_log,
                stop=stopped,
                box=build_box if self.s.sandbox == "bwrap" else None,
                home=folder / "home",
            ) as job_env:
                if config.uses_default:
                    config = with_default_command(config, junit, tree, job_env.python)
                facts = {
                    "VOLT_JUNIT_XML": str(junit),
                    "VOLT_JOB_ID": job.job_id,
                    "VOLT_COMMIT": job.commit,
                    "VOLT_BRANCH": job.branch,
                }
                link = None
                if job.run:
                    if not config.uses_default:
                        return Outcome("error", None, 0.0, reason="a split run needs pytest, not a test.command")
                    link = shard.ShardLink(
                        job, self.s.runner_id, self._ask, current.chunks, stopped, draining=lambda: self.draining
                    )
                    config = dataclasses.replace(config, command=[*config.command, "-p", shard.PLUGIN])
                    facts.update(VOLT_SHARD_FD=str(link.fd), PYTHONPATH=str(shard.plugin_dir(folder)))
                env = test_env(facts, venv=job_env.venv)
                wrap = None
                if self.s.sandbox == "bwrap":

                    def wrap(command: list[str]) -> list[str]:
                        return sandbox.wrap(
                            command,
                            tree,
                            env,
                            workdir=self.s.workdir,
                            hide=hide,
                            expose=list(job_env.shown),
                            writable=[folder],
                            network=network,
                        )

                else:
                    env.update(HOME=str(folder / "home"), TMPDIR=str(folder / "home"))

                def on_start(pid: int) -> None:
                    self._note_pgid(pid, current)
                    if link is not None:
                        link.started()

                try:
                    outcome = run_command(
                        config,
                        tree,
                        env,
                        junit,
                        current.cancel,
                        grace=self.s.kill_grace,
                        on_start=on_start,
                        lease_lost=current.lease_lost,
                        wrap=wrap,
                        notes=notes,
                        log_into=build_log,
                        pass_fds=[link.fd] if link is not None else [],
                    )
                finally:
                    if link is not None:
                        link.close()
                if link is not None:
                    outcome.tests = []  # the dispatcher has them, chunk by chunk
                    if link.failure and outcome.status in ("passed", "failed"):
                        outcome.status, outcome.reason = "error", f"split run: {link.failure}"
                    build_log.feed(f"volt: shard of run {job.run}: {link.chunks} chunk(s)\n".encode())
                return outcome
        except environments.EnvError as exc:
            return Outcome("error", None, 0.0, reason=f"environment: {exc}", log=build_log)
        except environments.Stopped as exc:
            lost = exc.reason == "lease lost"
            return Outcome("cancelled", None, 0.0, reason=exc.reason, log=build_log, abandoned=lost)

    def _note_pgid(self, pgid: int, current: Current) -> None:
        self.watchdog.tell(f"run {pgid} {current.lease_until if not current.held else math.inf}")
        # If the runner and its watchdog are both killed, its restart kills the orphaned group.
        self.pgid_file.write_text(json.dumps({"pgid": pgid, "job_id": current.job.job_id}))

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
        """Once the worker thread is done, send what it left and free the runner.

        The job stays ours (heartbeats echo it) until its result is confirmed;
        then a heartbeat says we are idle, so the dispatcher sends the next one.
        """
        current = self.current
        if current is None or current.thread is None or self.abandon or not current.done.is_set():
            return
        current.thread.join()
        job = current.job
        if current.abandoned:
            log.warning(
                "runner=%s job=%s attempt=%d given up: %s", self.s.runner_id, job.job_id, job.attempt, current.abandoned
            )
            self._unsent.append(
                JobAbandoned(
                    job_id=job.job_id,
                    attempt=job.attempt,
                    runner_id=self.s.runner_id,
                    lease=job.lease,
                    reason=current.abandoned,
                )
            )
        elif current.result is not None and not current.in_outbox:
            self._unsent.append(current.result)  # the outbox could not take it
        self.flush_outbox()
        if not self._outbox_files() and not self._unsent:
            self.current = None
            self._send_status(Heartbeat)

    # -- messages out -----------------------------------------------------

    def _ask(self, request: ChunkRequest) -> None:
        """From a shard's job thread: have the main thread publish `request`."""
        self._asks.append(request)
        try:
            self.broker.call_threadsafe(lambda: None)  # wake it
        except BrokerUnavailable:
            pass  # sent once it reconnects (and asked again if the answer does not come)

    def _send_asks(self) -> None:
        while self._asks and self.broker.connected:
            if not self._publish(self._asks[0]):
                return
            self._asks.popleft()

    def _outbox_files(self) -> list[Path]:
        return sorted(self.outbox.glob("*.json"))

    def _write_outbox(self, job: Job, result: JobResult) -> None:
        path = self.outbox / _outbox_name(job)
        tmp = path.with_suffix(".tmp")
        tmp.write_bytes(result.to_json())
        os.replace(tmp, path)

    def _clear_outbox_for(self, job: Job) -> None:
        (self.outbox / _outbox_name(job)).unlink(missing_ok=True)

    def _finished_result(self, job: Job) -> JobResult | None:
        """The result this runner already sent for this assignment, if any."""
        try:
            msg = decode((self.sent / _outbox_name(job)).read_bytes())
        except (OSError, DecodeError):
            return None
        return msg if isinstance(msg, JobResult) else None

    def flush_outbox(self) -> None:
        """Publish every finished result; each file goes only once confirmed."""
        if self.abandon or not self.broker.connected:
            return
        while self._unsent:
            if not self._publish(self._unsent[0]):
                return
            self._unsent.pop(0)
        for path in self._outbox_files():
            try:
                body = path.read_bytes()
                result = decode(body)
            except (OSError, DecodeError) as exc:
                log.error("runner=%s dropping unreadable outbox file %s: %s", self.s.runner_id, path, exc)
                path.unlink(missing_ok=True)
                continue
            if not self._publish(result):
                return
            self._keep_sent(path)

    def _keep_sent(self, path: Path) -> None:
        """Move a confirmed result to `sent/`, keeping the last SENT_KEPT."""
        try:
            os.replace(path, self.sent / path.name)
            kept = sorted(self.sent.glob("*.json"), key=lambda p: p.stat().st_mtime)
            for old in kept[:-SENT_KEPT]:
                old.unlink(missing_ok=True)
        except OSError:
            path.unlink(missing_ok=True)

    def _publish(self, msg: Message) -> bool:
        """Publish to the results exchange; False if it must wait (no queue yet)."""
        try:
            self.broker.publish(naming.results_exchange(self.s.broker.namespace), "", msg)
        except Unroutable:
            # The dispatcher has never run here: keep it and try again later.
            self._warn_once("no results queue yet (has the dispatcher run?); results wait in the outbox")
            return False
        return True

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
            lease=current.job.lease if current else "",
        )
        self._next_heartbeat = time.monotonic() + self.s.heartbeat_interval
        try:
            self.broker.publish(naming.control_exchange(self.s.broker.namespace), "", msg)
        except Unroutable:
            self._warn_once("no control queue yet (has the dispatcher run?); heartbeats go nowhere")
            self._note_health({"control queue": "missing; has the dispatcher run?"})
            return
        if current is not None:
            self._renew(current)
        self._note_health({})

    def _note_health(self, failing: dict[str, str]) -> None:
        """For `volt check --runner-workdir`: the broker took a heartbeat just now."""
        try:
            write_health(self.s.workdir, self.s.heartbeat_interval, failing)
        except OSError as exc:
            self._warn_once(f"cannot write the health file in {self.s.workdir}: {exc}")

    def _goodbye(self, job: Job | None, reason: str) -> None:
        msg = Goodbye(
            runner_id=self.s.runner_id,
            session=self.session,
            job_id=job.job_id if job else "",
            attempt=job.attempt if job else 0,
            reason=reason,
            lease=job.lease if job else "",
        )
        try:
            self.broker.publish(naming.control_exchange(self.s.broker.namespace), "", msg)
        except (BrokerUnavailable, Unroutable):
            log.warning("runner=%s could not say goodbye; the dispatcher will notice it is gone", self.s.runner_id)

    def _warn_once(self, text: str) -> None:
        if text not in self._warned:
            self._warned.add(text)
            log.warning("runner=%s %s", self.s.runner_id, text)


def _outbox_name(job: Job) -> str:
    return f"{job.job_id}-{job.lease or job.attempt}.json"


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
        lease=job.lease,
        tests=outcome.tests,
    )
