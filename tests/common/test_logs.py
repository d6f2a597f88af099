"""Log lines: one per record whatever the values hold, and JSON fields from the log call."""

from __future__ import annotations

import io
import json
import logging
import sys
from collections.abc import Iterator
from typing import Any

import pytest

from common import logs


@pytest.fixture(autouse=True)
def clean_context() -> Iterator[None]:
    # From nothing: a test elsewhere that ran `volt` in this process named it.
    saved = dict(logs._CONTEXT)
    logs._CONTEXT.clear()
    yield
    logs._CONTEXT.clear()
    logs._CONTEXT.update(saved)


def record(message: str, *args: object, extra: dict[str, Any] | None = None, exc: bool = False) -> logging.LogRecord:
    rec = logging.LogRecord("runner.service", logging.INFO, __file__, 1, message, args, None)
    for key, value in (extra or {}).items():
        setattr(rec, key, value)
    if exc:
        try:
            raise ValueError("boom\n2026-01-01 00:00:00,000 INFO    forged: line")
        except ValueError:
            rec.exc_info = sys.exc_info()
    return rec


def json_line(message: str, *args: object, **kwargs: Any) -> dict[str, Any]:
    text = logs.JsonFormatter().format(record(message, *args, **kwargs))
    assert "\n" not in text
    return json.loads(text)


def plain_lines(message: str, *args: object, **kwargs: Any) -> list[str]:
    text = logs.PlainFormatter("%(levelname)s %(name)s: %(message)s").format(record(message, *args, **kwargs))
    return text.split("\n")


HOSTILE = [
    "main\n2026-01-01 00:00:00,000 INFO    dispatcher.service: job=feed recorded: passed",
    "https://example.com/repo\r2026-01-01 forged",
    "fix \x1b[2J\x1b[31mred\x1b[0m",
    "sep\u2028arated\u2029para",
    "nul\x00bell\x07del\x7fc1\x85",
    "lone \udc80 surrogate",
]


@pytest.mark.parametrize("value", HOSTILE)
def test_no_value_can_forge_a_plain_line(value: str) -> None:
    (line,) = plain_lines("job=%s branch=%s queued", "feed", value)
    assert line.startswith("INFO runner.service: job=feed branch=")
    for char in "\n\r\x1b\x00\x07\x7f\x85\u2028\u2029\udc80":
        assert char not in line
    line.encode("utf-8")  # writable as UTF-8


@pytest.mark.parametrize("value", HOSTILE)
def test_no_value_can_forge_a_json_line_or_field(value: str) -> None:
    data = json_line("job=%s branch=%s queued", "feed", value, extra=logs.ids(job="feed", branch=value))
    assert set(data) == {"time", "level", "logger", "job", "branch", "message"}
    assert data["job"] == "feed"
    for char in "\n\r\x1b\x00\u2028\udc80":
        assert char not in data["message"] and char not in data["branch"]


def test_escapes_are_readable() -> None:
    assert logs.escape("a\nb\rc\td\x1b[0m\x7f\u2028") == "a\\nb\\rc\\td\\x1b[0m\\x7f\\u2028"
    assert logs.escape("plain text, ünïcode ✓ and 𝄞") == "plain text, ünïcode ✓ and 𝄞"


def test_a_traceback_is_indented_under_its_line() -> None:
    first, *rest = plain_lines("handling a message failed", exc=True)
    assert first == "INFO runner.service: handling a message failed"
    assert rest and all(line.startswith("    ") for line in rest)
    # The exception's own message spans two lines: the second stays indented too.
    assert "    2026-01-01 00:00:00,000 INFO    forged: line" in rest


def test_json_fields_come_from_the_call_not_the_message() -> None:
    logs.set_context(worker="runner", runner="r1")
    extra = logs.ids(runner="r1", job="0429b57d", attempt=2, commit="11a8167de45b", repo="https://u:pw@h/x.git")
    # The message says other things entirely; the fields are the call's.
    data = json_line("cloning https://example.com/app.git job=fake", extra=extra)
    assert data["worker"] == "runner"
    assert (data["runner"], data["job"], data["attempt"], data["commit"]) == ("r1", "0429b57d", 2, "11a8167de45b")
    assert data["repo"] == "https://u:***@h/x.git"
    assert data["message"] == "cloning https://example.com/app.git job=fake"
    assert data["level"] == "INFO" and data["time"].endswith("Z")


def test_a_url_in_the_message_is_not_a_repo_field() -> None:
    data = json_line("fetching repo=https://example.com/app.git branch=main")
    assert "repo" not in data and "branch" not in data


def test_ids_refuses_unknown_fields_and_drops_none() -> None:
    with pytest.raises(TypeError, match="not a log id field: message"):
        logs.ids(message="x")
    assert logs.ids(job="j", commit=None) == {"volt_ids": {"job": "j"}}


def test_a_line_without_ids_still_names_its_process_and_keeps_tracebacks() -> None:
    logs.set_context(worker="dispatcher")
    data = json_line("dispatcher ready", exc=True)
    assert data["worker"] == "dispatcher" and "job" not in data
    assert "ValueError: boom" in data["exc"]


def test_configure_writes_one_escaped_line_per_call(monkeypatch: pytest.MonkeyPatch) -> None:
    out = io.StringIO()
    monkeypatch.setattr(sys, "stderr", out)
    root = logging.getLogger()
    saved = root.handlers[:], root.level
    try:
        logs.configure("INFO", "plain")
        logging.getLogger("dispatcher.service").info("branch=%s queued", "x\nFAKE", extra=logs.ids(branch="x\nFAKE"))
        logs.configure("INFO", "json")
        logging.getLogger("dispatcher.service").info("branch=%s queued", "x\nFAKE", extra=logs.ids(branch="x\nFAKE"))
    finally:
        root.handlers[:], level = saved
        root.setLevel(level)
    plain, js = out.getvalue().splitlines()
    assert plain.endswith("dispatcher.service: branch=x\\nFAKE queued")
    assert json.loads(js)["branch"] == "x\\nFAKE"
