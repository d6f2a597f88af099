"""Many simulated runners in one process, speaking the runners' real protocol.

  --mode answer     declare a queue per runner, send Hello then a Heartbeat every
                    interval for each, consume every queue and answer each Job at
                    once: JobStarted (then ack the Job), then JobResult `passed`.
  --mode heartbeat  send Hello, then a Heartbeat every interval for each runner,
                    spread evenly over the interval; no queues, no jobs.

Uses common.broker.Broker like a real runner (confirmed, persistent publishes).
Started by harness.System.simulated_runners; stops on SIGTERM.
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import sys
import time
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from common import naming  # noqa: E402
from common.broker import Broker, Delivery  # noqa: E402
from common.messages import CancelJob, Heartbeat, Hello, Job, JobResult, JobStarted, decode  # noqa: E402
from common.settings import BrokerSettings  # noqa: E402


class Simulated:
    def __init__(self, broker: Broker, ids: list[str], interval: float) -> None:
        self.broker = broker
        self.ids = ids
        self.interval = interval
        self.sessions = {rid: uuid.uuid4().hex[:12] for rid in ids}
        self.host = socket.gethostname()
        self.stopping = False
        self.jobs = 0

    def status(self, kind: type[Hello], rid: str) -> None:
        msg = kind(
            runner_id=rid,
            session=self.sessions[rid],
            host=self.host,
            pid=os.getpid(),
            state="idle",
            interval=self.interval,
            sent_at=time.time(),
        )
        self.broker.publish(naming.control_exchange(self.broker.ns), "", msg)

    def on_job(self, rid: str, d: Delivery) -> None:
        msg = decode(d.body)
        if isinstance(msg, CancelJob):
            d.ack()
            return
        assert isinstance(msg, Job), msg
        results = naming.results_exchange(self.broker.ns)
        started = time.time()
        self.broker.publish(
            results,
            "",
            JobStarted(
                job_id=msg.job_id,
                attempt=msg.attempt,
                runner_id=rid,
                session=self.sessions[rid],
                started_at=started,
                lease=msg.lease,
            ),
        )
        d.ack()
        self.broker.publish(
            results,
            "",
            JobResult(
                job_id=msg.job_id,
                attempt=msg.attempt,
                runner_id=rid,
                status="passed",
                exit_code=0,
                passed=1,
                duration_s=0.0,
                started_at=started,
                finished_at=time.time(),
                lease=msg.lease,  # only the assignment's own lease counts
            ),
        )
        self.jobs += 1

    def serve(self, consume: bool) -> None:
        if consume:
            for rid in self.ids:
                queue = self.broker.declare_runner_queue(rid)
                self.broker.consume(queue, lambda d, rid=rid: self.on_job(rid, d), prefetch=1)
        for rid in self.ids:
            self.status(Hello, rid)
        print(f"simulating {len(self.ids)} runners", file=sys.stderr, flush=True)
        # Heartbeats spread evenly over the interval, as independent runners' would be.
        step = self.interval / len(self.ids)
        due = time.monotonic() + step
        turn = 0
        while not self.stopping:
            now = time.monotonic()
            while now >= due and not self.stopping:
                self.status(Heartbeat, self.ids[turn % len(self.ids)])
                turn += 1
                due += step
                now = time.monotonic()
            self.broker.process(max(0.0, min(0.2, due - time.monotonic())))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--count", type=int, required=True)
    p.add_argument("--mode", choices=["answer", "heartbeat"], required=True)
    p.add_argument("--prefix", default="sim-")
    p.add_argument("--interval", type=float, default=2.0)
    p.add_argument("--amqp-url", required=True)
    p.add_argument("--namespace", required=True)
    args = p.parse_args()
    settings = BrokerSettings(
        amqp_url=args.amqp_url, namespace=args.namespace, queue_type=os.environ.get("VOLT_QUEUE_TYPE", "quorum")
    )
    broker = Broker(settings, "volt-bench-simrunners")
    broker.connect(give_up_after=10)
    sim = Simulated(broker, [f"{args.prefix}{i}" for i in range(args.count)], args.interval)

    def stop(*_: object) -> None:
        sim.stopping = True

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    try:
        sim.serve(consume=args.mode == "answer")
    finally:
        broker.close()
        print(f"answered {sim.jobs} jobs", file=sys.stderr, flush=True)


if __name__ == "__main__":
    main()
