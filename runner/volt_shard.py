"""Volt CI's pytest plugin for a shard of a split run (`pytest -p volt_shard`).

It runs inside the job's sandbox, under the job's own Python, so it uses the
standard library and pytest only. After collection it tells the runner the
node ids it found, then runs the tests the runner hands it, chunk by chunk,
in this one process, and reports each test's outcome before it asks for the
next chunk. The runner (runner/shard.py) talks to the dispatcher; this side
talks only to the socket it inherits as file descriptor VOLT_SHARD_FD, one
JSON object per line each way.

The last test of a chunk is held back until the next chunk is known, so that
it runs with the right `nextitem` and module or session fixtures shared with
the next chunk are not torn down and set up again. When no chunk is left, the
held test runs and the plugin asks once more (a failure may be run again
here) before it says it wants no more.
"""

from __future__ import annotations

import json
import os
import socket
from typing import Any

import pytest

_outcomes: dict[str, list[Any]] = {}


class _Link:
    def __init__(self, fd: int) -> None:
        self.sock = socket.socket(fileno=fd)
        self.file = self.sock.makefile("rwb")

    def ask(self, **message: Any) -> dict[str, Any]:
        self.file.write(json.dumps(message).encode() + b"\n")
        self.file.flush()
        line = self.file.readline()
        if not line:
            return {"stop": "the runner closed the link"}
        answer = json.loads(line)
        return answer if isinstance(answer, dict) else {"stop": "a broken answer from the runner"}


def pytest_runtest_logreport(report: Any) -> None:
    entry = _outcomes.setdefault(report.nodeid, ["passed", 0.0])
    entry[1] += report.duration
    if report.failed:
        if entry[0] not in ("failed", "error"):
            entry[0] = "failed" if report.when == "call" else "error"
    elif report.skipped and entry[0] == "passed":
        entry[0] = "skipped"


def _report() -> list[list[Any]]:
    out = [[node, outcome, round(seconds, 4)] for node, (outcome, seconds) in _outcomes.items()]
    _outcomes.clear()
    return out


def _run(item: Any, nextitem: Any) -> None:
    _outcomes.pop(item.nodeid, None)  # run again (a rerun): reported afresh
    item.config.hook.pytest_runtest_protocol(item=item, nextitem=nextitem)


@pytest.hookimpl(tryfirst=True)
def pytest_runtestloop(session: Any) -> bool | None:
    fd = os.environ.get("VOLT_SHARD_FD", "")
    if not fd.isdigit() or session.config.option.collectonly:
        return None
    if session.testsfailed and not session.config.option.continue_on_collection_errors:
        raise session.Interrupted(f"{session.testsfailed} error(s) during collection")
    link = _Link(int(fd))
    items = {item.nodeid: item for item in session.items}
    answer = link.ask(collected=sorted(items))
    held = None
    while not answer.get("stop"):
        names = [n for n in answer.get("tests", []) if isinstance(n, str)]
        if not names:
            if held is None:
                break
            # Nothing more for now: run the held test, and ask again, since its
            # failure may be run again here (a rerun).
            _run(held, None)
            held = None
        for name in names:
            item = items.get(name)
            if item is None:  # not collected here: said so, never silently dropped
                _outcomes[name] = ["error", 0.0]
                continue
            if held is not None:
                _run(held, item)
            held = item
        answer = link.ask(results=_report(), more=True)
    if answer.get("stop"):
        session.shouldstop = f"volt: {answer['stop']}"
    link.ask(results=_report(), more=False)
    return True
