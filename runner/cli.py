"""`volt runner`: argument parsing only."""

from __future__ import annotations

import argparse
import fcntl
import socket
from pathlib import Path

from common import logs, naming
from common.messages import check_labels
from common.settings import BrokerSettings, SettingsError, env, env_float


def add_parsers(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:  # type: ignore[type-arg]
    p = sub.add_parser("runner", help="take jobs from this runner's queue and run their tests")
    p.add_argument("--id", dest="runner_id", default=env("RUNNER_ID", ""), help="runner id (default: host name)")
    p.add_argument("--workdir", default=env("WORKDIR", ""), help="clones, outbox and logs (default: ./.volt/runner-ID)")
    p.add_argument(
        "--job-timeout",
        type=float,
        default=env_float("JOB_TIMEOUT", 600.0),
        help="seconds a test command may run unless .volt.toml says otherwise",
    )
    p.add_argument(
        "--heartbeat-interval",
        type=float,
        default=env_float("HEARTBEAT_INTERVAL", 2.0),
        help="seconds between heartbeats (env VOLT_HEARTBEAT_INTERVAL)",
    )
    p.add_argument(
        "--allow-repo",
        action="append",
        default=[],
        metavar="PATTERN",
        help="only test repositories matching this glob (repeatable; default: any)",
    )
    p.add_argument(
        "--label",
        action="append",
        default=env("LABELS", "").replace(",", " ").split(),
        help="a label jobs may require (repeatable; env VOLT_LABELS, comma-separated)",
    )
    p.add_argument(
        "--kill-grace", type=float, default=5.0, help="seconds between SIGTERM and SIGKILL when a test run is stopped"
    )
    p.add_argument(
        "--sandbox",
        choices=["bwrap", "none"],
        default=env("SANDBOX", "bwrap"),
        help="the box each test command runs in (env VOLT_SANDBOX; default bwrap; none: no sandbox at all)",
    )
    p.add_argument(
        "--sandbox-hide",
        action="append",
        default=[],
        metavar="PATH",
        help="also hide this path from test commands (repeatable)",
    )
    p.add_argument(
        "--allow-network",
        action="store_true",
        default=env("ALLOW_NETWORK", "") in ("1", "true", "yes"),
        help="grant a repository's [test] network = true (env VOLT_ALLOW_NETWORK; default: loopback only)",
    )
    p.add_argument(
        "--git-timeout",
        type=float,
        default=env_float("GIT_TIMEOUT", 300.0),
        help="seconds a checkout's git may take (env VOLT_GIT_TIMEOUT; default 300)",
    )
    p.add_argument(
        "--git-credentials",
        default=env("GIT_CREDENTIALS", ""),
        metavar="FILE",
        help="a git-credential-store style file of https://user:token@host[/path] lines (env VOLT_GIT_CREDENTIALS)",
    )
    p.set_defaults(func=main)
    return p


def settings_from(args: argparse.Namespace):  # type: ignore[no-untyped-def]
    from runner.service import RunnerSettings

    runner_id = args.runner_id or socket.gethostname().split(".")[0]
    if not naming.valid_runner_id(runner_id):
        raise SettingsError(f"runner id must be letters, digits, '.', '_' or '-' (at most 64): {runner_id!r}")
    if args.job_timeout <= 0 or args.heartbeat_interval <= 0:
        raise SettingsError("--job-timeout and --heartbeat-interval must be positive")
    try:
        check_labels(args.label)
    except ValueError as exc:
        raise SettingsError(f"--label: {exc}") from None
    workdir = Path(args.workdir or Path(".volt") / f"runner-{runner_id}").resolve()
    return RunnerSettings(
        broker=BrokerSettings.from_args(args),
        runner_id=runner_id,
        workdir=workdir,
        job_timeout=args.job_timeout,
        heartbeat_interval=args.heartbeat_interval,
        allow_repos=tuple(args.allow_repo),
        labels=tuple(args.label),
        kill_grace=args.kill_grace,
        sandbox=args.sandbox,
        sandbox_hide=tuple(Path(p).resolve() for p in args.sandbox_hide),
        allow_network=args.allow_network,
        git_timeout=args.git_timeout,
        git_credentials=Path(args.git_credentials).resolve() if args.git_credentials else None,
    )


def main(args: argparse.Namespace) -> int:
    from runner.service import Runner

    settings = settings_from(args)
    logs.set_context(runner=settings.runner_id)
    settings.workdir.mkdir(parents=True, exist_ok=True)
    # One runner per workdir: a second one (say, a restart while the old one
    # still lives) must not run jobs in the same checkout.
    lock = open(settings.workdir / "runner.lock", "w")  # noqa: SIM115 - held for the process's life
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        raise SettingsError(f"another runner is using {settings.workdir}") from None
    runner = Runner(settings)
    runner.install_signal_handlers()
    return runner.run()
