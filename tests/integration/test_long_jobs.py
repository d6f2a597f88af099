"""A job longer than RabbitMQ's delivery-ack timeout is neither redelivered nor killed by it.

The test's own node sets consumer_timeout to 3 s (checked every second), so a
12 s suite stands for a suite of hours against the default 30 minutes.
"""

from __future__ import annotations

import time

import pytest
from support import GitRepo, Volt, pids, rabbit_node, suite

from common.broker import Broker, BrokerUnavailable
from common.settings import BrokerSettings

TIMEOUT_CONFIG = "consumer_timeout = 3000\n"
FAST_TICK = "[{rabbit, [{channel_tick_interval, 1000}]}].\n"


def test_long_job_outlives_the_delivery_ack_timeout_with_heartbeats_flowing(tmp_path):
    with rabbit_node(TIMEOUT_CONFIG, FAST_TICK) as node:
        # The control: a consumer that holds a delivery unacked is cut off.
        holder = Broker(BrokerSettings(amqp_url=node.url, namespace="hold"), "volt-test-holder")
        holder.connect(give_up_after=10)
        holder.declare_topology()
        holder.publish("", "hold.jobs.backlog", b"{}")
        holder.consume("hold.jobs.backlog", lambda d: None)
        with pytest.raises(BrokerUnavailable, match="delivery acknowledgement on channel 1 timed out"):
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline:
                holder.process(0.5)
        holder.close()

        volt = Volt(node.url, "long", tmp_path)
        repo = GitRepo(tmp_path / "repo")
        try:
            marker = tmp_path / "runs"
            sha = repo.commit(suite(marker, first_sleep=12))
            volt.dispatcher()
            volt.runner("long-a", heartbeat=0.5)
            volt.wait_for("runner", lambda: volt.ask("status")["runners"])
            volt.run("notify", "--repo", str(repo.path), "--branch", "main", "--commit", sha)
            volt.wait_for("the run to start", lambda: len(pids(marker)) == 1)
            gaps = []
            while not volt.results():
                (runner,) = volt.ask("status")["runners"]
                gaps.append(runner["seconds_since_heartbeat"])
                time.sleep(1.0)
            (row,) = volt.wait_results(1)
            assert row["status"] == "passed" and row["attempts"] == 1
            assert row["duration_s"] >= 12
            assert len(pids(marker)) == 1  # never redelivered, never run again
            assert len(gaps) >= 8 and max(gaps) < 1.5, gaps
            for name in ("dispatcher", "long-a"):
                assert "channel closed" not in volt.log_of(name)
        finally:
            volt.stop_all()
