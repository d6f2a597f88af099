"""The answers to `volt status`, `results`, `tests` and `log`: what they say, and what they cost."""

from __future__ import annotations

import base64
import zlib
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from support import finished_job, runner_info

from common import naming
from common.broker import Delivery
from common.messages import MAX_MESSAGE_BYTES, CommitSeen, Hello, JobResult, Reply, Request
from common.settings import BrokerSettings
from dispatcher import queries
from dispatcher.registry import RunnerInfo
from dispatcher.service import Dispatcher, DispatcherSettings
from dispatcher.store import MAX_NODE_ID, JobRow, Store

REPO = "/srv/git/app"


def runner(runner_id: str, state: str = "idle", labels: tuple[str, ...] = ()) -> RunnerInfo:
    return runner_info(runner_id, state, labels)


@pytest.fixture
def store(tmp_path: Path) -> Iterator[Store]:
    s = Store(tmp_path / "volt.db", durable=False)
    yield s
    s.close()


def waiting(store: Store, commit: str, labels: list[str]) -> JobRow:
    row = store.add_job(CommitSeen(repo=REPO, branch="main", commit=commit, seen_at=1.0, labels=labels))
    store.mark_queued(row.job_id, 1, 2.0)
    got = store.get(row.job_id)
    assert got is not None
    return got


def busy_with(store: Store, runner_id: str, commit: str) -> dict[str | None, JobRow]:
    row = waiting(store, commit, [])
    assert store.assign(row.job_id, 1, runner_id, 3.0)
    return {runner_id: row}


def test_a_job_says_why_it_waits(store: Store) -> None:
    gpu = waiting(store, "a" * 40, ["gpu"])
    plain = waiting(store, "b" * 40, [])
    assert queries.why_waiting(gpu, [], {}) == "no live runner has labels gpu"
    assert queries.why_waiting(plain, [], {}) == "no live runner"
    linux = runner("linux", labels=("linux",))
    assert queries.why_waiting(gpu, [linux], {}) == "no live runner has labels gpu"
    assert queries.why_waiting(plain, [linux], {}) == "about to be assigned"
    paused = runner("g1", state="paused", labels=("gpu",))
    assert queries.why_waiting(gpu, [linux, paused], {}) == "every runner with labels gpu is paused or draining"
    working = runner("g2", labels=("gpu", "linux"))
    busy = busy_with(store, "g2", "c" * 40)
    assert (
        queries.why_waiting(gpu, [linux, paused, working], busy) == "waiting for a free runner with labels gpu (1 busy)"
    )


def test_status_lists_parked_jobs_with_the_reason(store: Store) -> None:
    gpu = waiting(store, "a" * 40, ["gpu"])
    assert store.park(gpu.job_id, 1, "no live runner has labels gpu", 3.0)
    data = queries.status(store, "volt", [runner("r1")], now=10.0, depth=lambda name: (0, 1))
    assert data["waiting_count"] == 1
    (job,) = data["waiting"]
    assert (job["job_id"], job["state"], job["why"]) == (gpu.job_id, "parked", "no live runner has labels gpu")


@pytest.mark.parametrize(
    ("state", "has_job", "shown"),
    [
        ("idle", False, "idle"),
        ("busy", True, "busy"),
        ("idle", True, "busy"),
        ("paused", True, "paused"),
        ("draining", False, "draining"),
        ("busy", False, "idle"),
    ],
)
def test_runner_state(state: str, has_job: bool, shown: str) -> None:
    assert queries.runner_state(runner("r", state=state), has_job) == shown


# -- status from the snapshot, no broker calls ---------------------------------


def test_status_looks_at_no_runner_queue(store: Store) -> None:
    asked: list[str] = []

    def depth(name: str) -> tuple[int, int]:
        asked.append(name)
        return (0, 1)

    runners = [runner(f"r{i}") for i in range(5)]
    data = queries.status(store, "volt", runners, now=60.0, depth=depth)
    assert sorted(asked) == sorted(naming.shared_queues("volt"))  # once each, whatever the fleet
    assert [r["queue"] for r in data["runners"]] == [{"name": naming.runner_queue("volt", f"r{i}")} for i in range(5)]
    assert data["runners"][0]["seconds_since_heartbeat"] == 10.0


class NoCalls:
    """A broker that fails the test on any call but a reply."""

    def __init__(self) -> None:
        self.replies: list[Reply] = []

    def reply(self, request: Delivery, message: Reply) -> None:
        self.replies.append(message)

    def __getattr__(self, name: str) -> Any:
        raise AssertionError(f"a question made the dispatcher call broker.{name}")


def request(method: str, params: dict[str, Any] | None = None) -> Delivery:
    channel = SimpleNamespace(basic_ack=lambda tag: None)
    return Delivery(
        body=Request(method=method, params=params or {}).to_json(),
        queue="volt.dispatcher.rpc",
        headers={},
        redelivered=False,
        reply_to="amq.rabbitmq.reply-to.x",
        correlation_id="c1",
        _channel=channel,  # type: ignore[arg-type]
        _tag=1,
    )


def test_questions_cost_the_dispatchers_loop_no_broker_call(tmp_path: Path, store: Store) -> None:
    clock = [100.0]
    broker = NoCalls()
    d = Dispatcher(
        DispatcherSettings(broker=BrokerSettings(namespace="volt"), db=tmp_path / "volt.db"),
        broker=broker,  # type: ignore[arg-type]
        store=store,
        clock=lambda: clock[0],
        wall=lambda: 1_700_000_000.0 + clock[0],
    )
    for i in range(50):
        d.registry.heartbeat(Hello(runner_id=f"r{i}", session="s", host="h", interval=2.0))
    clock[0] += 1.5
    for method in ("status", "ping", "results"):
        d.on_request(request(method))
    status, ping, results = (r.data for r in broker.replies)
    assert all(r.ok for r in broker.replies)
    assert len(status["runners"]) == 50 and ping["runners"] == 50 and results == []
    assert status["runners"][0]["seconds_since_heartbeat"] == 1.5
    assert all(q is None for q in status["queues"].values())  # not looked at yet: said so, not asked


# -- results: the total --------------------------------------------------------


def done(store: Store, commit: str, branch: str = "main") -> None:
    row = store.add_job(CommitSeen(repo=REPO, branch=branch, commit=commit, seen_at=float(int(commit[:4], 16))))
    store.mark_queued(row.job_id, 1, 2.0)
    lease = store.assign(row.job_id, 1, "r1", 3.0)
    assert lease
    assert store.start(row.job_id, lease, "r1", "s", started_at=3.0, now=3.0)
    assert store.finish(JobResult(job_id=row.job_id, attempt=1, runner_id="r1", status="passed", lease=lease), 4.0)


def test_results_say_how_many_there_are_beyond_the_limit(store: Store) -> None:
    for i in range(7):
        done(store, f"{i + 1:04x}" + "a" * 36, branch="main" if i < 5 else "dev")
    waiting(store, "f" * 40, [])
    page = queries.results_with_total(store, {"limit": 3})
    assert (len(page["results"]), page["total"]) == (3, 7)  # finished ones only, as by default
    assert queries.results_with_total(store, {"limit": 3, "done_only": False})["total"] == 8
    assert queries.results_with_total(store, {"limit": 3, "branch": "dev"})["total"] == 2
    assert queries.results_with_total(store, {"limit": 100})["total"] == 7
    # Without with_total the answer stays the list older clients read.
    assert isinstance(queries.results(store, {"limit": 3}), list)


@pytest.mark.parametrize(
    "params",
    [{"limit": 0}, {"limit": 10001}, {"limit": True}, {"limit": "5"}, {"commit": 1234}, {"commit": "zz"}],
)
def test_results_refuse_bad_params(store: Store, params: dict[str, Any]) -> None:
    with pytest.raises(queries.QueryError):
        queries.results_with_total(store, params)


# -- volt tests ---------------------------------------------------------------

NODE = "tests/test_app.py::test_parse"


def branch_history(store: Store) -> list[JobRow]:
    """main: NODE passes twice, then fails three times (once in a split run); t::ok passes;
    t::flaky is flaky twice. dev: one later job where NODE passes."""
    plan = [("passed", "passed"), ("passed", "passed"), ("failed", "flaky"), ("error", "passed"), ("failed", "flaky")]
    rows = []
    for i, (outcome, other) in enumerate(plan):
        tests = [(NODE, outcome, 1.0 + i), ("t::ok", "passed", 0.1), ("t::flaky", other, 0.2)]
        status = "passed" if outcome == "passed" else "failed"
        subject = f"change {i}"
        rows.append(
            finished_job(store, REPO, "main", f"{i + 1:040x}", 10.0 * (i + 1), status, tests, subject, split=1 + i % 2)
        )
    finished_job(store, REPO, "dev", "d" * 40, 100.0, tests=[(NODE, "passed", 9.0)])
    return rows


def test_a_tests_history_says_since_when_it_fails_and_when_it_passed_before(store: Store) -> None:
    rows = branch_history(store)
    got = queries.tests(store, {"repo": REPO, "branch": "main", "test": NODE})
    assert [(r["commit"], r["outcome"], r["subject"]) for r in got["runs"]] == [
        (rows[i].commit_sha, outcome, f"change {i}")
        for i, outcome in ((4, "failed"), (3, "error"), (2, "failed"), (1, "passed"), (0, "passed"))
    ]
    assert got["runs"][0]["job_id"] == rows[4].job_id and got["runs"][0]["duration_s"] == 5.0
    assert got["failing_since"]["commit"] == rows[2].commit_sha and got["failing_since"]["subject"] == "change 2"
    assert got["passed_before"]["commit"] == rows[1].commit_sha and got["failing_runs"] == 3
    assert got["trend"]["recent_median_s"] == 3.0 and got["total"] == 5
    limited = queries.tests(store, {"repo": REPO, "branch": "main", "test": NODE, "limit": 2})
    assert len(limited["runs"]) == 2 and limited["total"] == 5 and limited["failing_since"] == got["failing_since"]
    # Without a branch: the branch of the repository's latest finished job.
    other = queries.tests(store, {"repo": REPO, "test": NODE})
    assert other["branch"] == "dev" and other["failing_since"] is None and len(other["runs"]) == 1


def test_the_tests_failing_now_each_with_its_failing_since(store: Store) -> None:
    rows = branch_history(store)
    got = queries.tests(store, {"repo": REPO, "branch": "main"})
    assert got["job"]["job_id"] == rows[4].job_id and got["total"] == 1
    (failing,) = got["failing"]
    assert failing["test"] == NODE and failing["failing_since"]["job_id"] == rows[2].job_id
    assert failing["passed_before"]["job_id"] == rows[1].job_id
    assert queries.tests(store, {"repo": REPO, "branch": "dev"})["failing"] == []
    assert queries.tests(store, {"repo": "/srv/git/none"}) == {
        "repo": "/srv/git/none",
        "branch": None,
        "job": None,
        "failing": [],
        "total": 0,
    }


def test_flaky_tests_with_how_often_they_flaked(store: Store) -> None:
    branch_history(store)
    got = queries.tests(store, {"repo": REPO, "flaky": True})
    assert got["flaky"] == [{"test": "t::flaky", "flaky_runs": 2}] and got["jobs"] == 6
    assert queries.tests(store, {"repo": REPO, "branch": "dev", "flaky": True})["flaky"] == []


def test_tests_are_asked_through_the_handler_table(store: Store) -> None:
    branch_history(store)
    d = SimpleNamespace(store=store)
    got = queries.answer(d, Request(method="tests", params={"repo": REPO, "flaky": True}))  # type: ignore[arg-type]
    assert got["flaky"][0]["test"] == "t::flaky"


@pytest.mark.parametrize(
    "params",
    [
        {},
        {"repo": 5},
        {"repo": REPO, "branch": 1},
        {"repo": REPO, "test": ""},
        {"repo": REPO, "test": "x" * (MAX_NODE_ID + 1)},
        {"repo": REPO, "limit": 0},
        {"repo": REPO, "limit": 1001},
        {"repo": REPO, "limit": False},
    ],
)
def test_tests_refuse_bad_params(store: Store, params: dict[str, Any]) -> None:
    with pytest.raises(queries.QueryError):
        queries.tests(store, params)


# -- log replies: bounded in bytes ---------------------------------------------


def with_log(store: Store, commit: str, text: str) -> JobRow:
    row = store.add_job(CommitSeen(repo=REPO, branch="main", commit=commit, seen_at=1.0))
    store.mark_queued(row.job_id, 1, 2.0)
    lease = store.assign(row.job_id, 1, "r1", 3.0)
    assert lease
    assert store.start(row.job_id, lease, "r1", "s", started_at=3.0, now=3.0)
    data = text.encode()
    result = JobResult(
        job_id=row.job_id,
        attempt=1,
        runner_id="r1",
        status="passed",
        log_head=data[:65536].decode(errors="replace"),
        log_tail=data[-65536:].decode(errors="replace"),
        log_bytes=len(data),
        log_full=base64.b64encode(zlib.compress(data, 9)).decode(),
        lease=lease,
    )
    assert store.finish(result, 4.0)
    return row


@pytest.mark.parametrize(
    "text",
    [
        "\U0001d11e" * (5 * 1024 * 1024),  # 5 Mi characters of 4 bytes each: 20 MiB
        "\x01" * (3 * 1024 * 1024),  # 3 MiB, but 18 MiB as JSON escapes
    ],
    ids=["4-byte characters", "control characters"],
)
def test_a_log_reply_stays_within_the_message_size_in_bytes(store: Store, text: str) -> None:
    row = with_log(store, "ab" * 20, text)
    data = queries.job_log(store, row.job_id)
    body = Reply(ok=True, data=data).to_json()
    assert len(body) <= queries.MAX_LOG_REPLY_BYTES < MAX_MESSAGE_BYTES
    assert data["full"] is None and "more than one reply holds" in data["cut"]
    assert f"/jobs/{row.job_id}/log.txt" in data["cut"]
    assert data["head"] and data["tail"] and data["bytes"] == len(text.encode())
    shown = queries.log_text(data["head"], data["tail"], data["bytes"], data["full"], "not in this reply")
    assert "bytes not in this reply ...]" in shown


def test_a_log_that_fits_comes_whole(store: Store) -> None:
    text = "".join(f"line {i} ✓\n" for i in range(100_000))
    row = with_log(store, "cd" * 20, text)
    data = queries.job_log(store, "cdcdcdcd")
    assert data["full"] == text and data["cut"] == ""
    small = queries.job_log(store, row.job_id, max_bytes=100_000)  # the same log, a smaller bound
    assert small["full"] is None and small["cut"]
    assert queries.encoded_size(small) <= 100_000 + 200_000  # head and tail are kept whatever the bound
