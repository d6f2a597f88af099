"""Broker.publish_all on a real RabbitMQ: many publishes, one wait for their
confirms, and every confirm, return and nack counted against its own publish."""

from __future__ import annotations

import pytest
from support import Volt

from common import naming
from common.broker import Broker, BrokerUnavailable, Delivery
from common.messages import Job, decode


def job(i: int) -> Job:
    return Job(job_id=f"job{i:05d}", attempt=1, repo="/srv/app", branch="main", commit=f"{i:040x}")


def to(volt: Volt, runner_id: str, i: int) -> tuple[str, str, Job]:
    return naming.jobs_exchange(volt.ns), naming.runner_routing_key(runner_id), job(i)


def drain(broker: Broker, queue: str) -> list[str]:
    """The job ids in `queue`, in order, taken off it."""
    ids = []
    while (d := broker.get(queue)) is not None:
        msg = decode(d.body)
        assert isinstance(msg, Job)
        ids.append(msg.job_id)
        d.ack()
    return ids


@pytest.fixture
def broker(volt: Volt) -> Broker:
    b = volt.broker
    for runner_id in ("r1", "r2"):
        volt.runner_ids.add(runner_id)  # deleted with the namespace
        b.declare_runner_queue(runner_id)
    return b


def test_a_batch_arrives_whole_once_each_and_in_order(volt: Volt, broker: Broker) -> None:
    assert broker.publish_all([to(volt, "r1", i) for i in range(500)]) == [True] * 500
    assert drain(broker, naming.runner_queue(volt.ns, "r1")) == [f"job{i:05d}" for i in range(500)]


def test_each_unroutable_publish_is_told_apart_from_the_routed_ones_around_it(volt: Volt, broker: Broker) -> None:
    targets = ["r1", "gone-a", "r2", "r2", "gone-b", "gone-a", "r1"] * 30
    routed = broker.publish_all([to(volt, t, i) for i, t in enumerate(targets)])
    assert routed == [not t.startswith("gone") for t in targets]
    for runner_id in ("r1", "r2"):
        expected = [f"job{i:05d}" for i, t in enumerate(targets) if t == runner_id]
        assert drain(broker, naming.runner_queue(volt.ns, runner_id)) == expected
    # The next batch's bookkeeping starts clean.
    assert broker.publish_all([to(volt, "r1", 0), to(volt, "gone-c", 1)]) == [True, False]


def test_a_nacked_publish_fails_the_batch_and_the_next_batch_is_counted_afresh(volt: Volt, broker: Broker) -> None:
    # A queue that refuses what does not fit: the broker nacks those publishes.
    full = f"{volt.ns}.test-full"
    volt.runner_ids.add("test-full")
    ch = broker._channel()
    ch.queue_declare(full, durable=True, arguments={"x-max-length": 1, "x-overflow": "reject-publish"})
    ch.queue_bind(full, naming.jobs_exchange(volt.ns), "full")
    items = [(naming.jobs_exchange(volt.ns), "full", job(i)) for i in range(3)]
    with pytest.raises(BrokerUnavailable, match="nacked"):
        broker.publish_all(items)
    broker.delete_queue(full)
    assert broker.publish_all([to(volt, "r1", 7), to(volt, "r2", 8)]) == [True, True]
    assert drain(broker, naming.runner_queue(volt.ns, "r1")) == ["job00007"]


def test_a_missing_exchange_is_broker_unavailable_and_the_next_batch_gets_a_new_channel(
    volt: Volt, broker: Broker
) -> None:
    with pytest.raises(BrokerUnavailable):
        broker.publish_all([(f"{volt.ns}.no-such-exchange", "x", job(1)), to(volt, "r1", 2)])
    assert broker.connected
    assert broker.publish_all([to(volt, "r1", 3)]) == [True]
    assert drain(broker, naming.runner_queue(volt.ns, "r1")) == ["job00003"]


def test_no_consumer_is_called_while_it_waits_for_confirms(volt: Volt, broker: Broker) -> None:
    # The dispatcher calls it in the middle of a round: a delivery handled from
    # inside it would be handled out of turn.
    control = naming.dispatcher_control_queue(volt.ns)
    for i in range(5):
        broker.publish("", control, job(i))
    handled: list[Delivery] = []
    broker.consume(control, handled.append, prefetch=10)
    assert broker.publish_all([to(volt, "r1", i) for i in range(50)]) == [True] * 50
    assert handled == []
    broker.process(1.0)
    assert len(handled) == 5
    for d in handled:
        d.ack()
