"""`volt up`: a dispatcher, N runners and an observer in the foreground on one machine.

Each is its own process, exactly as when started by hand, in a session of
its own: a terminal's Ctrl-C reaches `volt up` alone, which tells each child
once. The first Ctrl-C stops the observer and drains the runners (each
finishes its job), then stops the dispatcher once it has recorded their
results; a second one stops the jobs too (each child's second SIGTERM); a
third kills what is left.

The broker URL (it may hold a password) and the repositories as given (their
URLs may too) reach the children through their environment, never their
command lines, which any user of the machine can read.
"""

from __future__ import annotations

import argparse
import ctypes
import dataclasses
import glob
import logging
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from common import exits
from common.settings import (
    COMMON_OPTIONS,
    BrokerSettings,
    Option,
    SettingsError,
    add_options,
    gather,
    path,
    positive_int,
    writable_dir,
)

log = logging.getLogger(__name__)

# After the runners are gone, how long the dispatcher gets to record what
# they reported before it is stopped anyway (a runner that died mid-job
# leaves a job it will never finish).
RECORD_WAIT = 10.0
PR_SET_PDEATHSIG = 1  # linux/prctl.h


def options() -> tuple[Option, ...]:
    """The settings of `volt up`: the workers' own spellings, where they mean the same."""
    from dispatcher.cli import OPTIONS as DISPATCHER
    from observer.cli import OPTIONS as OBSERVER
    from runner.cli import OPTIONS as RUNNER

    def pick(options: tuple[Option, ...], field: str, **changes: Any) -> Option:
        return dataclasses.replace(next(o for o in options if o.field == field), **changes)

    return (
        pick(OBSERVER, "repos"),
        pick(OBSERVER, "branches"),
        Option("runners", "--runners", "RUNNERS", "runners to start", 2, positive_int, metavar="N"),
        pick(OBSERVER, "poll"),
        pick(RUNNER, "job_timeout"),
        pick(RUNNER, "heartbeat_interval"),
        # Not VOLT_STATE_DIR: that is the observer's own folder, one level down.
        Option(
            "state_dir",
            "--state-dir",
            "UP_STATE_DIR",
            "the store, the observer's cursor and each runner's workdir",
            Path(".volt"),
            path,
            metavar="DIR",
        ),
        pick(DISPATCHER, "http_port", help="serve the results page and /metrics on 127.0.0.1:PORT"),
    )


@dataclass(frozen=True)
class UpSettings:
    broker: BrokerSettings
    repos: tuple[str, ...]
    branches: tuple[str, ...] = ()
    runners: int = 2
    poll: float = 5.0
    job_timeout: float = 600.0
    heartbeat_interval: float = 2.0
    state_dir: Path = Path(".volt")
    http_port: int = 0
    log_level: str = "INFO"
    log_format: str = "plain"

    @classmethod
    def from_args(cls, args: argparse.Namespace | None, environ: Mapping[str, str] | None = None) -> UpSettings:
        """Defaults, then VOLT_*, then the flags given in `args`."""
        values = gather(options(), args, environ)
        if not values["repos"]:
            raise SettingsError("no repository to watch: give --repo (or VOLT_REPOS)")
        values["state_dir"] = Path(values["state_dir"]).resolve()
        logs = gather([o for o in COMMON_OPTIONS if o.field in ("log_level", "log_format")], args, environ)
        return cls(broker=BrokerSettings.from_args(args, environ), **values, **logs)


def add_parsers(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser(
        "up",
        help="run a dispatcher, N runners and an observer on this machine",
        description="Run a dispatcher, N runners and an observer in the foreground; Ctrl-C stops them, "
        "letting running jobs finish (a second Ctrl-C stops the jobs). The workers read their other "
        "settings from the environment as usual (VOLT_LABELS, VOLT_SANDBOX, ...).",
    )
    add_options(p, options())
    p.set_defaults(func=main)


def commands(s: UpSettings) -> list[tuple[str, list[str], dict[str, str]]]:
    """The (name, argv, environment) of every process `volt up` starts."""
    from common.naming import normalize_repo

    state = s.state_dir
    flags = ["--namespace", s.broker.namespace, "--log-level", s.log_level, "--log-format", s.log_format]
    volt = [sys.executable, "-m", "common.cli"]
    host = socket.gethostname().split(".")[0]
    env = {k: v for k, v in os.environ.items() if k != "VOLT_REPOS"}
    env["VOLT_AMQP_URL"] = s.broker.amqp_url
    web = ["--http-port", str(s.http_port)] if s.http_port else []
    procs = [("dispatcher", [*volt, "dispatcher", "--db", str(state / "dispatcher.db"), *web, *flags], env)]
    # Jobs carry a repository's identity, so that is what runners allow,
    # escaped: a path may hold a glob's special characters.
    allow = [flag for repo in s.repos for flag in ("--allow-repo", glob.escape(normalize_repo(repo)))]
    for i in range(1, s.runners + 1):
        argv = [*volt, "runner", "--id", f"{host}-{i}", "--workdir", str(state / f"runner-{i}")]
        argv += ["--job-timeout", str(s.job_timeout), "--heartbeat-interval", str(s.heartbeat_interval)]
        # The whole state folder, not only the runner's own workdir: the store and
        # the other runners' clones are none of a test's business either.
        argv += ["--sandbox-hide", str(state)]
        procs.append((f"runner-{i}", [*argv, *allow, *flags], env))
    branches = [flag for b in s.branches for flag in ("--branch", b)]
    observer = [*volt, "observer", *branches, "--poll", str(s.poll), "--state-dir", str(state / "observer")]
    # The repositories as given: the observer needs a URL's password to fetch.
    procs.append(("observer", [*observer, *flags], {**env, "VOLT_REPOS": "\n".join(s.repos)}))
    return procs


def _check_repos(s: UpSettings) -> None:
    """A typo is one line here, not one from each child."""
    from observer.repos import RepoError, WatchedRepo

    for repo in s.repos:
        try:
            watched = WatchedRepo(repo, s.state_dir / "observer")
        except RepoError as exc:
            raise SettingsError(str(exc)) from None
        try:
            watched.open()
            for branch in s.branches or (watched.default_branch(),):
                watched.head(branch)
        except RepoError as exc:
            raise SettingsError(str(exc)) from None
        finally:
            watched.close()  # its git processes would live on as volt up's


def _recorded(s: UpSettings) -> bool:
    """Whether the dispatcher holds no job as running any more (or cannot say)."""
    from dispatcher.client import QueryFailed, ask

    try:
        return not ask(s.broker, "status", timeout=1, wait_for_dispatcher=False)["running"]
    except QueryFailed:
        return True


def _stop_with_parent() -> Callable[[], None] | None:
    """What a child runs before exec so that it gets a SIGTERM when volt up dies
    (say, of a SIGKILL): in a session of its own, no terminal's Ctrl-C reaches it.
    Looked up here, before any fork; None where there is no prctl (not Linux)."""
    try:
        prctl = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None
    return lambda: prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


def main(args: argparse.Namespace) -> int:
    s = UpSettings.from_args(args)
    writable_dir(s.state_dir, "--state-dir")
    _check_repos(s)
    stops = 0

    def on_signal(signum: int, frame: object) -> None:
        nonlocal stops
        stops += 1

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
    children: dict[str, subprocess.Popen[bytes]] = {}
    orphaned = _stop_with_parent()
    for name, argv, env in commands(s):
        # A session of its own: the terminal's Ctrl-C goes to volt up's
        # process group only, and volt up tells each child exactly once.
        children[name] = subprocess.Popen(argv, env=env, start_new_session=True, preexec_fn=orphaned)
        if name == "dispatcher":
            time.sleep(0.3)  # let it declare the topology first; not needed for correctness
    print(f"volt up: {len(children)} processes running; Ctrl-C stops them", file=sys.stderr, flush=True)
    told = dict.fromkeys(children, 0)

    def tell(name: str, sig: int = signal.SIGTERM) -> None:
        if children[name].poll() is None:
            children[name].send_signal(sig)
            told[name] += 1

    acted = 0
    workers_gone_at: float | None = None
    while True:
        while acted < stops:
            acted += 1
            if acted == 1:
                print("volt up: stopping; running jobs finish first (Ctrl-C again stops them)", file=sys.stderr)
                for name in children:
                    if name != "dispatcher":
                        tell(name)
            elif acted == 2:
                print("volt up: stopping the running jobs", file=sys.stderr)
                for name in children:
                    tell(name)
            else:
                for name in children:
                    tell(name, signal.SIGKILL)
        if all(p.poll() is not None for p in children.values()):
            break
        workers_alive = any(p.poll() is None for n, p in children.items() if n != "dispatcher")
        if acted and not told["dispatcher"] and not workers_alive:
            # The runners are gone; their last results may still be on their
            # way into the store. Stop the dispatcher once they are in.
            workers_gone_at = workers_gone_at or time.monotonic()
            if _recorded(s) or time.monotonic() - workers_gone_at > RECORD_WAIT:
                tell("dispatcher")
        if not acted:
            for name, proc in children.items():
                if proc.poll() is not None:
                    print(f"volt up: {name} exited with {proc.returncode}; stopping the rest", file=sys.stderr)
                    stops += 1
                    break
        time.sleep(0.1)
    return exits.OK if all(p.returncode in (0, -signal.SIGTERM) for p in children.values()) else 1
