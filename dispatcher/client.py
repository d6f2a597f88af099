"""`volt status`, `volt results`, `volt log`, `volt check`: questions to the dispatcher."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from common import exits
from common.broker import Broker, BrokerUnavailable, RpcTimeout, Unroutable
from common.messages import DecodeError, Reply, Request, RunnerCommand
from common.settings import BrokerSettings
from dispatcher.queries import log_text


class QueryFailed(exits.CommandFailed):
    """The dispatcher answered with an error, or not at all; one line for the user."""


def ask(settings: BrokerSettings, method: str, params: dict[str, Any] | None = None, timeout: float = 10.0) -> Any:
    broker = Broker(settings, f"volt-{method}")
    try:
        broker.connect(give_up_after=timeout)
        body = broker.request(Request(method=method, params=params or {}), timeout)
    except (BrokerUnavailable, RpcTimeout) as exc:
        raise QueryFailed(str(exc)) from None
    except Unroutable:
        raise QueryFailed(
            f"no dispatcher queue in namespace {settings.namespace!r}: has `volt dispatcher` run there?"
        ) from None
    finally:
        broker.close()
    try:
        reply = Reply.from_json(body)
    except DecodeError as exc:
        raise QueryFailed(f"unreadable reply from the dispatcher: {exc}") from None
    if not isinstance(reply, Reply) or not reply.ok:
        raise QueryFailed(getattr(reply, "error", "") or "the dispatcher refused the request")
    return reply.data


def add_parsers(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser("status", help="live runners, queue depths, jobs waiting and running")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=status_main)

    p = sub.add_parser("results", help="recorded results, newest first")
    p.add_argument("--repo")
    p.add_argument("--branch")
    p.add_argument("--commit")
    p.add_argument("--limit", type=int, default=50)
    p.add_argument("--all", action="store_true", help="also jobs not finished yet")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=results_main)

    p = sub.add_parser("log", help="a job's test log")
    p.add_argument("id", metavar="JOB_ID_OR_COMMIT")
    p.set_defaults(func=log_main)

    p = sub.add_parser("runner-ctl", help="pause, resume or drain a runner")
    p.add_argument("action", choices=RunnerCommand.ACTIONS)
    p.add_argument("runner_id", metavar="RUNNER_ID")
    p.add_argument("--reason", default="", help="said in the runner's log")
    p.set_defaults(func=runner_ctl_main)

    p = sub.add_parser("check", help="exit 0 if the worker (or the system) is healthy, else 1 with the reason")
    p.add_argument("--min-runners", type=int, default=0, help="also require this many live runners")
    target = p.add_mutually_exclusive_group()
    target.add_argument("--runner", metavar="ID", help="check this runner: the dispatcher hears its heartbeats")
    target.add_argument(
        "--runner-workdir",
        metavar="DIR",
        help="check the runner with this --workdir on this machine: its heartbeats reach the broker",
    )
    target.add_argument(
        "--observer", metavar="STATE_DIR", help="check the observer with this --state-dir: it polls, repos answer"
    )
    p.add_argument("--timeout", type=float, default=5.0)
    p.set_defaults(func=check_main)


def status_main(args: argparse.Namespace) -> int:
    data = ask(BrokerSettings.from_args(args), "status")
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
    }
    rows = ask(BrokerSettings.from_args(args), "results", {k: v for k, v in params.items() if v is not None})
    if args.json:
        print(json.dumps(rows, indent=2))
        return exits.OK
    if not rows:
        print("no results yet")
    for r in rows:
        status = r["status"] or r["state"]
        counts = f"{r['passed']} passed, {r['failed']} failed, {r['errors']} errors, {r['skipped']} skipped"
        dur = f"{r['duration_s']:.2f}s" if r["duration_s"] is not None else "-"
        print(
            f"{r['commit'][:12]}  {status:<9} {counts:<48} {dur:>8}  {r['branch']:<12} attempt {r['attempts']}  {r['runner'] or '-'}  {r['job_id']}"
        )
        if r["reason"] and status != "passed":
            print(f"              {r['reason']}")
    return exits.OK


def log_main(args: argparse.Namespace) -> int:
    data = ask(BrokerSettings.from_args(args), "log", {"id": args.id})
    job = data["job"]
    print(
        f"# job {job['job_id']} commit {job['commit']} {job['status'] or job['state']}: {job['reason']}",
        file=sys.stderr,
    )
    sys.stdout.write(log_text(data["head"], data["tail"], data["bytes"], data["full"]))
    return exits.OK


def runner_ctl_main(args: argparse.Namespace) -> int:
    params = {"runner": args.runner_id, "action": args.action, "reason": args.reason}
    data = ask(BrokerSettings.from_args(args), "runner_ctl", params)
    print(f"runner {data['runner']}: {data['action']} sent; now {data['state']}")
    return exits.OK


def check_main(args: argparse.Namespace) -> int:
    """One line, healthy or unhealthy and why; exit 0 or 1."""
    problem, fine = _check(args)
    print(f"unhealthy: {problem}" if problem else f"healthy: {fine}")
    return exits.UNHEALTHY if problem else exits.OK


def _check(args: argparse.Namespace) -> tuple[str | None, str]:
    if args.observer or args.runner_workdir:
        import time
        from pathlib import Path

        from common.health import read_health

        if args.observer:
            problem = read_health(Path(args.observer), time.time(), "poll")
            return problem, f"observer polled lately and every repository answered ({args.observer})"
        problem = read_health(Path(args.runner_workdir), time.time(), "heartbeat")
        return problem, f"runner heartbeats reach the broker ({args.runner_workdir})"
    try:
        if args.runner:
            status = ask(BrokerSettings.from_args(args), "status", timeout=args.timeout)
            runner = next((r for r in status["runners"] if r["runner_id"] == args.runner), None)
            if runner is None:
                return f"runner {args.runner} is not live (the dispatcher has no heartbeat from it)", ""
            return None, (
                f"runner {args.runner} {runner['state']}, last heartbeat {runner['seconds_since_heartbeat']:.1f}s ago"
            )
        data = ask(BrokerSettings.from_args(args), "ping", timeout=args.timeout)
    except QueryFailed as exc:
        return str(exc), ""
    if data["runners"] < args.min_runners:
        return f"{data['runners']} live runner(s), need {args.min_runners}", ""
    return None, f"dispatcher answers, {data['runners']} live runner(s)"
