"""The dispatcher's Prometheus metrics, on a registry of its own (so one process,
or one test, can hold several dispatchers).

Counters and histograms are updated by the main thread where things happen;
the gauges of runners, jobs and queues are read at scrape time, on the web
server's thread, from the main thread's snapshot and the web's own read-only
store connection (see dispatcher/web.py). prometheus_client is thread-safe.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from common.messages import JOB_STATES, RUNNER_STATES, STATUSES
from dispatcher.store import JobRow

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
# Every state and status (common/messages.py) is always present, as 0 when
# none, so a dashboard's series never vanish.

# From "picked up at once" to "waited an hour for a runner".
WAIT_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800, 3600, float("inf"))
# From a one-second suite to a two-hour one.
DURATION_BUCKETS = (0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1200, 1800, 3600, 7200, float("inf"))


@dataclass(frozen=True)
class Live:
    """The state-derived numbers, gathered at scrape time."""

    runners: list[tuple[str, str, float]] = field(default_factory=list)  # (runner id, state, s since heartbeat)
    jobs_by_state: Mapping[str, int] = field(default_factory=dict)
    jobs_by_status: Mapping[str, int] = field(default_factory=dict)  # finished jobs only
    queues: Mapping[str, tuple[int, int] | None] = field(default_factory=dict)


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.queue_wait = Histogram(
            "volt_queue_wait_seconds",
            "Time from a job's (latest) queueing to its start on a runner, observed when it starts",
            buckets=WAIT_BUCKETS,
            registry=r,
        )
        self.job_duration = Histogram(
            "volt_job_duration_seconds",
            "Run time of a job's test command, observed when its result is recorded",
            buckets=DURATION_BUCKETS,
            registry=r,
        )
        self.redeliveries = Counter(
            "volt_redeliveries",
            "Jobs taken back from a runner (lost, restarted, left, refused, never started) and queued again",
            registry=r,
        )
        self.dead_letters = Counter(
            "volt_dead_lettered",
            "Messages the dispatcher could not use and sent to the dead-letter queue",
            registry=r,
        )
        # Set by the web server: where the gauges come from at scrape time.
        self.live: Callable[[], Live] | None = None
        r.register(_LiveCollector(self))

    def job_started(self, row: JobRow | None, now: float) -> None:
        """Observe the queue wait of a job that just started."""
        if row is None or row.queued_at is None:
            return
        started = row.started_at or now
        self.queue_waited(max(0.0, started - row.queued_at))

    def queue_waited(self, seconds: float | None) -> None:
        if seconds is not None:
            self.queue_wait.observe(seconds)

    def job_finished(self, duration_s: float | None) -> None:
        if duration_s is not None and duration_s >= 0:
            self.job_duration.observe(duration_s)

    def render(self) -> bytes:
        """The exposition text (on the caller's thread: the web server's)."""
        return generate_latest(self.registry)


class _LiveCollector(Collector):
    def __init__(self, metrics: Metrics) -> None:
        self.metrics = metrics

    def describe(self) -> Iterable[Metric]:
        return _families(Live())

    def collect(self) -> Iterable[Metric]:
        source = self.metrics.live
        return _families(source() if source else Live())


def _families(live: Live) -> list[Metric]:
    runners = GaugeMetricFamily("volt_runners", "Live runners by state", labels=["state"])
    by_state = dict.fromkeys(RUNNER_STATES, 0)
    for _, state, _ in live.runners:
        by_state[state] = by_state.get(state, 0) + 1
    for state, n in by_state.items():
        runners.add_metric([state], n)

    heartbeat = GaugeMetricFamily(
        "volt_runner_heartbeat_age_seconds", "Seconds since each live runner's last heartbeat", labels=["runner"]
    )
    for runner_id, _, age in live.runners:
        heartbeat.add_metric([runner_id], age)

    jobs = GaugeMetricFamily("volt_jobs_by_state", "Jobs in the store by state", labels=["state"])
    for state, n in {**dict.fromkeys(JOB_STATES, 0), **live.jobs_by_state}.items():
        jobs.add_metric([state], n)

    results = GaugeMetricFamily("volt_jobs_by_status", "Finished jobs in the store by status", labels=["status"])
    for status, n in {**dict.fromkeys(STATUSES, 0), **live.jobs_by_status}.items():
        results.add_metric([str(status)], n)

    ready = GaugeMetricFamily(
        "volt_queue_ready_messages",
        "Ready messages in each shared queue (looked at every few seconds)",
        labels=["queue"],
    )
    consumers = GaugeMetricFamily("volt_queue_consumers", "Consumers of each shared queue", labels=["queue"])
    for name, depth in sorted(live.queues.items()):
        if depth is not None:
            ready.add_metric([name], depth[0])
            consumers.add_metric([name], depth[1])
    return [runners, heartbeat, jobs, results, ready, consumers]
