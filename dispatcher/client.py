"""`volt status`, `results`, `tests`, `log`, `runner-ctl`, `check`: questions to the dispatcher.

One-shot commands: they print their answer and nothing else (no INFO lines
unless --log-level asks), fail with one line, and keep to their --timeout:
a refused connection or login fails at once, a namespace without a
dispatcher is said at once, and a broker that blocks publishers (a memory
or disk alarm) costs the timeout, not pika's minute.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

from common import exits, naming
from common.broker import (
    Broker,
    BrokerUnavailable,
    RpcTimeout,
    Unroutable,
    connect_once,
    exchange_exists,
    was_blocked,
)
from common.logs import escape
from common.messages import DecodeError, Reply, Request, RunnerCommand, one_line
from common.settings import BrokerSettings
from dispatcher.history import trend_line
from dispatcher.queries import TESTS_MAX, log_text

DEFAULT_TIMEOUT = 10.0
RESULTS_LIMIT = 50
RESULTS_MAX = 10000  # what the dispatcher answers at most (queries.results)
# Past the command's own timeout, the backstop that ends it whatever pika is doing.
DEADLINE_SLACK = 1.5
# Failing and flaky tests shown per job by `volt results` (all of them with --json).
SHOWN_TESTS = 5
BLOCKED = "RabbitMQ is blocking publishers (a memory or disk alarm? see `rabbitmqctl status`)"


class QueryFailed(exits.CommandFailed):
    """The dispatcher answered with an error, or not at all; one line for the user."""


def no_dispatcher(ns: str) -> str:
    return f"no dispatcher is running in namespace {ns!r} (start `volt dispatcher --namespace {ns}`)"


def ask(
    settings: BrokerSettings,
    method: str,
    params: dict[str, Any] | None = None,
    timeout: float = DEFAULT_TIMEOUT,
    wait_for_dispatcher: bool = True,
) -> Any:
    """Ask the dispatcher and return its answer's data; QueryFailed with one line otherwise.

    With wait_for_dispatcher (a script that has just started one), a namespace
    without a dispatcher is waited on up to `timeout`; without (a user's
    command), it is said at once.
    """
    broker = Broker(settings, f"volt-{method}")
    ns = settings.namespace
    until = time.monotonic() + timeout
    try:
        connect_once(broker, timeout)
        # Looked at before asking: a request to a namespace nobody serves would
        # wait out the timeout, or fail with the broker's NOT_FOUND.
        while not _dispatcher_listens(broker, ns):
            if not wait_for_dispatcher or time.monotonic() >= until:
                raise QueryFailed(no_dispatcher(ns))
            time.sleep(0.1)
        body = broker.request(Request(method=method, params=params or {}), max(0.1, until - time.monotonic()))
    except RpcTimeout:
        raise QueryFailed(f"the dispatcher of namespace {ns!r} did not answer within {timeout:g}s") from None
    except Unroutable:
        raise QueryFailed(no_dispatcher(ns)) from None
    except BrokerUnavailable as exc:
        if was_blocked(exc):
            raise QueryFailed(f"no answer within {timeout:g}s: {BLOCKED}") from None
        raise QueryFailed(str(exc)) from None
    finally:
        broker.close()
    try:
        reply = Reply.from_json(body)
    except DecodeError as exc:
        raise QueryFailed(f"unreadable reply from the dispatcher: {exc}") from None
    if not isinstance(reply, Reply) or not reply.ok:
        raise QueryFailed(getattr(reply, "error", "") or "the dispatcher refused the request")
    return reply.data


def _dispatcher_listens(broker: Broker, ns: str) -> bool:
    """Whether the namespace's request exchange exists and its queue has a consumer."""
    if not exchange_exists(broker, naming.rpc_exchange(ns)):
        return False
    depth = broker.queue_depth(naming.dispatcher_rpc_queue(ns))
    return depth is not None and depth[1] > 0


@contextmanager
def deadline(seconds: float, expire: Callable[[], None]) -> Iterator[None]:
    """Call expire() (which ends the process) if the block is still running after
    `seconds`: a backstop for a broker that stops answering inside a pika call,
    where no timeout of ours can reach."""
    timer = threading.Timer(seconds, expire)
    timer.daemon = True
    timer.start()
    try:
        yield
    finally:
        timer.cancel()


def _give_up(out: Any, line: str, code: int) -> Callable[[], None]:
    def expire() -> None:
        out.write(line + "\n")
        out.flush()
        os._exit(code)  # the main thread is stuck in a broker call; nothing else to clean

    return expire


def _ask(args: argparse.Namespace, method: str, params: dict[str, Any] | None = None) -> Any:
    """ask(), for a command: its flags, its timeout, and the backstop around both."""
    settings = BrokerSettings.from_args(args)
    line = f"volt {args.command}: no answer within {args.timeout:g}s; {BLOCKED}, or the network is down"
    with deadline(args.timeout + DEADLINE_SLACK, _give_up(sys.stderr, line, exits.BROKER_UNAVAILABLE)):
        return ask(settings, method, params, timeout=args.timeout, wait_for_dispatcher=False)


def _positive(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number of seconds: {text!r}") from None
    if not 0 < value < 3600:
        raise argparse.ArgumentTypeError("must be more than 0 and less than 3600 seconds")
    return value


def _limit(text: str, most: int = RESULTS_MAX) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a whole number: {text!r}") from None
    if not 1 <= value <= most:
        raise argparse.ArgumentTypeError(f"must be from 1 to {most}")
    return value


def add_timeout(p: argparse.ArgumentParser, default: float = DEFAULT_TIMEOUT) -> None:
    p.add_argument(
        "--timeout",
        type=_positive,
        default=default,
        metavar="S",
        help=f"give up after this many seconds, also while RabbitMQ blocks publishers (default {default:g})",
    )


def add_parsers(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser("status", help="live runners, queue depths, jobs waiting and running")
    p.add_argument("--json", action="store_true", help="print the dispatcher's answer as JSON (default: tables)")
    add_timeout(p)
    p.set_defaults(func=status_main)

    p = sub.add_parser("results", help="recorded results, newest first")
    p.add_argument("--repo", type=naming.normalize_repo, help="only this repository, however written (default: all)")
    p.add_argument("--branch", help="only this branch (default: all)")
    p.add_argument("--commit", metavar="SHA", help="only this commit, or commits with this prefix (default: all)")
    p.add_argument(
        "--limit",
        type=_limit,
        default=RESULTS_LIMIT,
        metavar="N",
        help=f"show at most N, newest first; says when there are more (default {RESULTS_LIMIT}, at most {RESULTS_MAX})",
    )
    p.add_argument(
        "--all",
        action="store_true",
        help="all states: also jobs not finished yet, waiting or running (default: finished jobs only)",
    )
    p.add_argument("--json", action="store_true", help="print the results as a JSON list (default: one line each)")
    add_timeout(p)
    p.set_defaults(func=results_main)

    p = sub.add_parser("tests", help="a test's history on a branch, the tests failing now, or the flaky ones")
    p.add_argument(
        "--repo",
        type=naming.normalize_repo,
        required=True,
        help="the repository, however written (required: no default)",
    )
    p.add_argument("--branch", help="the branch (default: the branch of the repository's latest finished job)")
    p.add_argument(
        "--test",
        metavar="NODEID",
        help="this test's runs, newest first, since when it fails and its duration trend "
        "(default: the tests failing on the branch's latest finished job)",
    )
    p.add_argument(
        "--flaky",
        action="store_true",
        help="the tests flaky in any of the last 100 jobs (on --branch, if given), most often first (default: off)",
    )
    p.add_argument(
        "--limit",
        type=lambda text: _limit(text, TESTS_MAX),
        default=RESULTS_LIMIT,
        metavar="N",
        help=f"show at most N lines (default {RESULTS_LIMIT}, at most {TESTS_MAX})",
    )
    p.add_argument("--json", action="store_true", help="print the dispatcher's answer as JSON (default: lines)")
    add_timeout(p)
    p.set_defaults(func=tests_main)

    p = sub.add_parser("log", help="a job's test log")
    p.add_argument("id", metavar="JOB_ID_OR_COMMIT", help="a job id, or a commit id or prefix")
    add_timeout(p)
    p.set_defaults(func=log_main)

    p = sub.add_parser("runner-ctl", help="pause, resume or drain a runner")
    p.add_argument("action", choices=RunnerCommand.ACTIONS, help="what the runner is told")
    p.add_argument("runner_id", metavar="RUNNER_ID", help="the runner's --id")
    p.add_argument("--reason", default="", help="said in the runner's log (default: none)")
    add_timeout(p)
    p.set_defaults(func=runner_ctl_main)

    p = sub.add_parser("check", help="exit 0 if the worker (or the system) is healthy, else 1 with the reason")
    p.add_argument(
        "--min-runners", type=int, default=0, metavar="N", help="also require this many live runners (default 0)"
    )
    target = p.add_mutually_exclusive_group()
    target.add_argument(
        "--runner",
        metavar="ID",
        help="check this runner: the dispatcher hears its heartbeats (default: check the dispatcher)",
    )
    target.add_argument(
        "--runner-workdir",
        metavar="DIR",
        help="check the runner with this --workdir on this machine: its heartbeats reach the broker (default: none)",
    )
    target.add_argument(
        "--observer",
        metavar="STATE_DIR",
        help="check the observer with this --state-dir: it polls, repos answer (default: none)",
    )
    add_timeout(p, default=5.0)
    p.set_defaults(func=check_main)


def status_main(args: argparse.Namespace) -> int:
    data = _ask(args, "status")
    if args.json:
        print(json.dumps(data, indent=2))
        return exits.OK
    print(f"namespace {data['namespace']}  {data['time']}")
    print(f"\nRUNNERS ({len(data['runners'])})")
    for r in data["runners"]:
        job = f"job {r['job_id']} ({r['commit'][:12]})" if r["job_id"] else ""
        print(
            f"  {r['runner_id']:<20} {r['host']:<16} {r['state']:<9} heartbeat {r['seconds_since_heartbeat']:>5.1f}s ago  {job}"
        )
    print("\nQUEUES")
    for name, q in data["queues"].items():
        print(f"  {name:<36} " + (f"ready {q['ready']:<6} consumers {q['consumers']}" if q else "missing"))
    print(f"\nJOBS  {' '.join(f'{k}={v}' for k, v in sorted(data['jobs'].items())) or 'none'}")
    print(f"RESULTS  {' '.join(f'{k}={v}' for k, v in sorted(data['results'].items())) or 'none'}")
    if data["running"]:
        print("\nRUNNING")
        for j in data["running"]:
            print(f"  {j['job_id']}  {j['commit'][:12]}  {j['branch']:<12} on {j['runner']}  attempt {j['attempts']}")
    if data.get("split_runs"):
        print("\nSPLIT RUNS")
        for j in data["split_runs"]:
            shards = ", ".join(f"{k.rsplit('.', 1)[1]} {v}" for k, v in j["shards"].items())
            progress = f"chunks {j['chunks_done']}/{j['chunks']}" if j["chunks"] else "collecting"
            print(f"  {j['job_id']}  {j['commit'][:12]}  {j['branch']:<12} {progress}  shards: {shards}")
    if data["waiting_count"]:
        print(f"\nWAITING ({data['waiting_count']})")
        for j in data["waiting"]:
            print(f"  {j['job_id']}  {j['commit'][:12]}  {j['branch']:<12} {j['repo']}  ({j['why']})")
    return exits.OK


def results_main(args: argparse.Namespace) -> int:
    params = {
        "repo": args.repo,
        "branch": args.branch,
        "commit": args.commit,
        "limit": args.limit,
        "done_only": not args.all,
        "with_total": True,
    }
    data = _ask(args, "results", {k: v for k, v in params.items() if v is not None})
    # An older dispatcher answers a plain list, without the total.
    rows, total = (data["results"], data["total"]) if isinstance(data, dict) else (data, len(data))
    more = f"showing {len(rows)} of {total}; --limit N shows more" if total > len(rows) else ""
    if args.json:
        print(json.dumps(rows, indent=2))
        if more:
            print(f"volt results: {more}", file=sys.stderr)
        return exits.OK
    if not rows:
        print("no results yet" if not args.all else "no jobs yet")
    for r in rows:
        status = r["status"] or r["state"]
        counts = f"{r['passed']} passed, {r['failed']} failed, {r['errors']} errors, {r['skipped']} skipped"
        dur = f"{r['duration_s']:.2f}s" if r["duration_s"] is not None else "-"
        where = r["runner"] or (f"split {r['split']}" if r.get("split", 1) > 1 else "-")
        print(
            f"{r['commit'][:12]}  {status:<9} {counts:<48} {dur:>8}  {r['branch']:<12} attempt {r['attempts']}  {where}  {r['job_id']}"
        )
        if r["reason"] and status != "passed":
            print(f"              {r['reason']}")
        for kind, key in (("FAILED", "failing_tests"), ("FLAKY", "flaky")):
            names = r.get(key, [])
            for name in names[:SHOWN_TESTS]:
                print(f"              {kind} {name}")
            if len(names) > SHOWN_TESTS:
                print(f"              ... and {len(names) - SHOWN_TESTS} more (--json has them all)")
    if more:
        print(more)
    return exits.OK


def tests_main(args: argparse.Namespace) -> int:
    if args.flaky and args.test:
        raise QueryFailed("--flaky and --test do not go together")
    params = {"repo": args.repo, "branch": args.branch, "test": args.test, "flaky": args.flaky, "limit": args.limit}
    data = _ask(args, "tests", {k: v for k, v in params.items() if v is not None})
    if args.json:
        print(json.dumps(data, indent=2))
        return exits.OK
    lines = _flaky_lines(data) if args.flaky else _history_lines(data) if args.test else _failing_lines(data)
    shown = len(data.get("flaky", data.get("runs", data.get("failing", []))))
    if data.get("total", 0) > shown:
        lines.append(f"showing {shown} of {data['total']}; --limit N shows more")
    print("\n".join(lines))
    return exits.OK


def _clean(text: str | None, limit: int = 200) -> str:
    # Node ids come from the tested commit's suite: no escape sequences for the terminal.
    return one_line(text or "", limit)


def _commit(ref: dict[str, Any]) -> str:
    return f"{ref['commit'][:12]} ({_clean(ref['subject'], 72) or 'no subject'})"


def _streak(item: dict[str, Any]) -> str:
    since, before = item["failing_since"], item["passed_before"]
    if since is None:
        return "not failing"
    line = f"failing since {_commit(since)}"
    return line + (f"; passed before on {_commit(before)}" if before else "; failed in every run kept")


def _where(data: dict[str, Any]) -> str:
    return f"on {_clean(data['branch'])} of {_clean(data['repo'])}" if data["branch"] else f"in {_clean(data['repo'])}"


def _history_lines(data: dict[str, Any]) -> list[str]:
    if not data["runs"]:
        return [f"no runs of {_clean(data['test'], 1000)} {_where(data)}"]
    lines = [f"{_clean(data['test'], 1000)} {_where(data)}", _streak(data), f"duration: {trend_line(data['trend'])}"]
    for r in data["runs"]:
        lines.append(
            f"{r['commit'][:12]}  {r['outcome']:<8} {r['duration_s']:>8.2f}s  {_clean(r['subject'], 60):<60}  job {r['job_id']}"
        )
    return lines


def _failing_lines(data: dict[str, Any]) -> list[str]:
    job = data["job"]
    if job is None:
        return [f"no finished job {_where(data)}"]
    head = f"latest finished job {_where(data)}: {_commit(job)} {job['status']}, job {job['job_id']}"
    if not data["failing"]:
        return [head, "no failing tests"]
    lines = [head, f"{data['total']} failing:"]
    for item in data["failing"]:
        lines.append(f"  {_clean(item['test'], 1000)}")
        lines.append(f"      {_streak(item)}")
    return lines


def _flaky_lines(data: dict[str, Any]) -> list[str]:
    lines = [f"flaky tests in the last {data['jobs']} finished jobs {_where(data)}:"]
    if not data["flaky"]:
        return [*lines, "  none"]
    return lines + [f"  {f['flaky_runs']:>4}  {_clean(f['test'], 1000)}" for f in data["flaky"]]


def log_main(args: argparse.Namespace) -> int:
    data = _ask(args, "log", {"id": args.id})
    job = data["job"]
    print(
        f"# job {job['job_id']} commit {job['commit']} {job['status'] or job['state']}: {job['reason']}",
        file=sys.stderr,
    )
    cut = data.get("cut", "")
    if cut:
        print(f"# {cut}", file=sys.stderr)
    dropped = "not in this reply" if cut else "not kept"
    text = log_text(data["head"], data["tail"], data["bytes"], data["full"], dropped)
    # The tested commit wrote it: to a terminal, colours only, no other escape
    # sequence (one can move the cursor over earlier lines, set the clipboard,
    # or retitle the window). Piped, it goes out as it was.
    sys.stdout.write(terminal_safe(text) if sys.stdout.isatty() else text)
    return exits.OK


# A colour (SGR) sequence, or any other control character but newline and tab.
_TERMINAL = re.compile(r"(\x1b\[[0-9;]*m)|[\x00-\x08\x0b-\x1f\x7f-\x9f]")


def terminal_safe(text: str) -> str:
    """`text` with every control character shown as an escape (`\\x1b`), but for
    newlines, tabs and colour sequences."""
    return _TERMINAL.sub(lambda m: m.group(1) or escape(m.group()), text)


def runner_ctl_main(args: argparse.Namespace) -> int:
    params = {"runner": args.runner_id, "action": args.action, "reason": args.reason}
    data = _ask(args, "runner_ctl", params)
    print(f"runner {data['runner']}: {data['action']} sent; now {data['state']}")
    return exits.OK


def check_main(args: argparse.Namespace) -> int:
    """One line, healthy or unhealthy and why; exit 0 or 1."""
    line = f"unhealthy: no answer within {args.timeout:g}s; {BLOCKED}, or the network is down"
    with deadline(args.timeout + DEADLINE_SLACK, _give_up(sys.stdout, line, exits.UNHEALTHY)):
        problem, fine = _check(args)
    print(f"unhealthy: {problem}" if problem else f"healthy: {fine}")
    return exits.UNHEALTHY if problem else exits.OK


def _check(args: argparse.Namespace) -> tuple[str | None, str]:
    if args.observer or args.runner_workdir:
        from pathlib import Path

        from common.health import read_health

        if args.observer:
            problem = read_health(Path(args.observer), time.time(), "poll")
            return problem, f"observer polled lately and every repository answered ({args.observer})"
        problem = read_health(Path(args.runner_workdir), time.time(), "heartbeat")
        return problem, f"runner heartbeats reach the broker ({args.runner_workdir})"
    try:
        if args.runner:
            status = ask(BrokerSettings.from_args(args), "status", timeout=args.timeout, wait_for_dispatcher=False)
            runner = next((r for r in status["runners"] if r["runner_id"] == args.runner), None)
            if runner is None:
                return f"runner {args.runner} is not live (the dispatcher has no heartbeat from it)", ""
            return None, (
                f"runner {args.runner} {runner['state']}, last heartbeat {runner['seconds_since_heartbeat']:.1f}s ago"
            )
        data = ask(BrokerSettings.from_args(args), "ping", timeout=args.timeout, wait_for_dispatcher=False)
    except QueryFailed as exc:
        return str(exc), ""
    if data["runners"] < args.min_runners:
        return f"{data['runners']} live runner(s), need {args.min_runners}", ""
    return None, f"dispatcher answers, {data['runners']} live runner(s)"
