"""The JSON log format: one object per line, with the ids a shipper indexes."""

from __future__ import annotations

import json
import logging

import pytest

from common import logs


@pytest.fixture(autouse=True)
def clean_context():
    saved = dict(logs._CONTEXT)
    yield
    logs._CONTEXT.clear()
    logs._CONTEXT.update(saved)


def line(message: str, *args: object, exc: bool = False) -> dict:
    record = logging.LogRecord("runner.service", logging.INFO, __file__, 1, message, args, None)
    if exc:
        try:
            raise ValueError("boom")
        except ValueError:
            import sys

            record.exc_info = sys.exc_info()
    return json.loads(logs.JsonFormatter().format(record))


def test_ids_in_the_message_become_fields() -> None:
    logs.set_context(worker="runner", runner="r1")
    data = line("runner=%s job=%s attempt=%d commit=%s finished: %s", "r1", "0429b57d", 2, "11a8167de45b", "passed")
    assert data["worker"] == "runner"
    assert (data["runner"], data["job"], data["attempt"], data["commit"]) == ("r1", "0429b57d", "2", "11a8167de45b")
    assert data["message"] == "runner=r1 job=0429b57d attempt=2 commit=11a8167de45b finished: passed"
    assert data["level"] == "INFO" and data["time"].endswith("Z")


def test_a_line_without_ids_still_names_its_process_and_keeps_tracebacks() -> None:
    logs.set_context(worker="dispatcher")
    data = line("dispatcher ready", exc=True)
    assert data["worker"] == "dispatcher" and "job" not in data
    assert "ValueError: boom" in data["exc"]
