"""`volt up`: a dispatcher, N runners and an observer in the foreground on one machine.

Each is its own process, exactly as when started by hand. Ctrl-C stops them
all cleanly: runners finish their current job first; a second Ctrl-C stops
the jobs too.
"""

from __future__ import annotations

import argparse
import logging
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

from common import exits
from common.settings import SettingsError, env

log = logging.getLogger(__name__)


def add_parsers(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser("up", help="run a dispatcher, N runners and an observer on this machine")
    p.add_argument("--repo", action="append", required=True, help="repository to watch (repeatable)")
    p.add_argument("--branch", action="append", default=[], help="branch to watch (repeatable)")
    p.add_argument("--runners", type=int, default=2)
    p.add_argument("--poll", type=float, default=5.0)
    p.add_argument("--job-timeout", type=float, default=600.0)
    p.add_argument("--heartbeat-interval", type=float, default=2.0)
    p.add_argument("--state-dir", default=".volt", help="store, cursor and runner workspaces")
    p.add_argument(
        "--http-port",
        type=int,
        default=env("HTTP_PORT", "0"),
        help="serve the results page and /metrics on 127.0.0.1:PORT; 0: off (env VOLT_HTTP_PORT)",
    )
    p.set_defaults(func=main)


def commands(args: argparse.Namespace) -> list[tuple[str, list[str]]]:
    """The (name, argv) of every process `volt up` starts."""
    from common.naming import normalize_repo

    state = Path(args.state_dir).resolve()
    common = [
        "--amqp-url",
        args.amqp_url,
        "--namespace",
        args.namespace,
        "--log-level",
        args.log_level,
        "--log-format",
        args.log_format,
    ]
    volt = [sys.executable, "-m", "common.cli"]
    host = socket.gethostname().split(".")[0]
    repos = [normalize_repo(r) for r in args.repo]
    web = ["--http-port", str(args.http_port)] if args.http_port else []
    procs = [("dispatcher", [*volt, "dispatcher", "--db", str(state / "dispatcher.db"), *web, *common])]
    for i in range(1, args.runners + 1):
        allow = [flag for repo in repos for flag in ("--allow-repo", repo)]
        procs.append(
            (
                f"runner-{i}",
                [
                    *volt,
                    "runner",
                    "--id",
                    f"{host}-{i}",
                    "--workdir",
                    str(state / f"runner-{i}"),
                    "--job-timeout",
                    str(args.job_timeout),
                    "--heartbeat-interval",
                    str(args.heartbeat_interval),
                    *allow,
                    *common,
                ],
            )
        )
    watch = [flag for repo in repos for flag in ("--repo", repo)]
    branches = [flag for b in args.branch for flag in ("--branch", b)]
    procs.append(
        (
            "observer",
            [
                *volt,
                "observer",
                *watch,
                *branches,
                "--poll",
                str(args.poll),
                "--state-dir",
                str(state / "observer"),
                *common,
            ],
        )
    )
    return procs


def main(args: argparse.Namespace) -> int:
    if args.runners < 1:
        raise SettingsError("--runners must be at least 1")
    # Check the repositories here, so a typo is one line and not four tracebacks.
    from observer.repos import RepoError, WatchedRepo

    for repo in args.repo:
        try:
            watched = WatchedRepo(repo, Path(args.state_dir).resolve() / "observer")
            watched.open()
            for branch in args.branch or [watched.default_branch()]:
                watched.head(branch)
        except RepoError as exc:
            raise SettingsError(str(exc)) from None
    stops = 0

    def on_signal(signum: int, frame: object) -> None:
        nonlocal stops
        stops += 1

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
    children: list[tuple[str, subprocess.Popen[bytes]]] = []
    for name, argv in commands(args):
        children.append((name, subprocess.Popen(argv)))
        if name == "dispatcher":
            time.sleep(0.3)  # let it declare the topology first; not needed for correctness
    print(f"volt up: {len(children)} processes running; Ctrl-C stops them", file=sys.stderr, flush=True)
    forwarded = 0
    while True:
        if stops > forwarded:
            forwarded = stops
            for _, proc in children:
                if proc.poll() is None:
                    proc.send_signal(signal.SIGTERM)
        alive = [(n, p) for n, p in children if p.poll() is None]
        if not alive:
            break
        if forwarded == 0:
            for name, proc in children:
                if proc.poll() is not None:
                    print(f"volt up: {name} exited with {proc.returncode}; stopping the rest", file=sys.stderr)
                    stops += 1
                    break
        time.sleep(0.1)
    return exits.OK if all(p.returncode in (0, -signal.SIGTERM) for _, p in children) else 1
