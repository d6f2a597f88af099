"""Opening a connection: what pika raises for a broker that does not answer is retried."""

from __future__ import annotations

from typing import Any

import pytest
from fakebroker import FakeRabbit
from pika.adapters.utils.connection_workflow import AMQPConnectorStackTimeout

from common.broker import Broker, BrokerUnavailable
from common.settings import BrokerSettings


def test_a_handshake_cut_off_by_its_timeout_is_retried_not_fatal(monkeypatch: pytest.MonkeyPatch) -> None:
    rabbit = FakeRabbit()
    tries: list[int] = []

    def silent_then_up(params: Any) -> Any:
        tries.append(1)
        if len(tries) < 3:  # a port that accepts and never answers
            raise AMQPConnectorStackTimeout("Timeout during AMQP handshake")
        return rabbit.connect()

    monkeypatch.setattr(Broker, "connection_factory", silent_then_up)
    monkeypatch.setattr("common.broker.random.uniform", lambda a, b: 0.0)
    broker = Broker(BrokerSettings(), "volt-test")
    broker.connect()
    assert broker.connected and len(tries) == 3


def test_a_command_gives_up_on_a_silent_broker_with_one_line(monkeypatch: pytest.MonkeyPatch) -> None:
    def silent(params: Any) -> Any:
        raise AMQPConnectorStackTimeout("Timeout during AMQP handshake")

    monkeypatch.setattr(Broker, "connection_factory", silent)
    with pytest.raises(BrokerUnavailable, match="cannot reach RabbitMQ"):
        Broker(BrokerSettings(), "volt-test").connect(give_up_after=0.2)
