"""Shared fixtures: a real RabbitMQ, a namespace per test, real git repos, real processes.

The broker comes from VOLT_TEST_AMQP_URL if set, else a broker on localhost
if one answers, else testcontainers (needs Docker). With none, the run fails
with a clear message: integration tests are never silently skipped.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from support import GitRepo, Volt

from common.broker import Broker, BrokerUnavailable
from common.settings import BrokerSettings

LOCAL_BROKER = "amqp://guest:guest@localhost:5672/%2F"


def _answers(url: str) -> bool:
    broker = Broker(BrokerSettings(amqp_url=url), "volt-test-probe")
    try:
        broker.connect(give_up_after=2)
        return True
    except BrokerUnavailable:
        return False
    finally:
        broker.close()


@pytest.fixture(scope="session")
def amqp_url() -> Iterator[str]:
    url = os.environ.get("VOLT_TEST_AMQP_URL")
    if url:
        yield url
        return
    if _answers(LOCAL_BROKER):
        yield LOCAL_BROKER
        return
    try:
        from testcontainers.rabbitmq import RabbitMqContainer

        container = RabbitMqContainer("rabbitmq:3.13-management")
        container.start()
    except Exception as exc:  # noqa: BLE001 - any failure means "no broker"
        pytest.fail(
            "no RabbitMQ for the integration tests: set VOLT_TEST_AMQP_URL, start one on "
            f"localhost:5672, or install Docker for testcontainers ({type(exc).__name__}: {exc})"
        )
    host, port = container.get_container_host_ip(), container.get_exposed_port(5672)
    yield f"amqp://guest:guest@{host}:{port}/%2F"
    container.stop()


@pytest.fixture
def repo(tmp_path: Path) -> GitRepo:
    return GitRepo(tmp_path / "repo")


@pytest.fixture
def volt(amqp_url: str, tmp_path: Path) -> Iterator[Volt]:
    system = Volt(amqp_url, f"t{uuid.uuid4().hex[:10]}", tmp_path)
    try:
        yield system
    finally:
        system.stop_all()
        system.delete_topology()
