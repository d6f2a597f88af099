"""`volt runner`: argument parsing only."""

from __future__ import annotations

import argparse
import fcntl
import re
import socket
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING

from common import logs, naming, voltfile
from common.messages import check_labels
from common.settings import (
    BrokerSettings,
    Option,
    SettingsError,
    add_options,
    choice,
    existing_file,
    gather,
    path,
    positive_float,
    positive_int,
    repo_pattern,
    writable_dir,
)

if TYPE_CHECKING:
    from runner.service import RunnerSettings


def _runner_id(raw: str) -> str:
    if not naming.valid_runner_id(raw):
        raise ValueError(f"runner id must be letters, digits, '.', '_' or '-' (at most 64), got {raw!r:.80}")
    return raw


def _label(raw: str) -> str:
    return check_labels([raw])[0]


def _python(raw: str) -> str:
    if re.fullmatch(r"3\.\d{1,2}", raw):
        return raw
    if not raw.startswith("/"):
        raise ValueError(f"must be a version such as 3.12, or the absolute path of an interpreter, got {raw!r:.80}")
    return raw


# The runner's settings as flags and VOLT_* variables (RunnerSettings.from_args reads them).
OPTIONS = (
    Option("runner_id", "--id", "RUNNER_ID", "this runner's id", None, _runner_id, metavar="ID", shown="the host name"),
    Option(
        "workdir",
        "--workdir",
        "WORKDIR",
        "clones, job trees, outbox and health file",
        None,
        path,
        metavar="DIR",
        shown="./.volt/runner-ID",
    ),
    Option(
        "job_timeout",
        "--job-timeout",
        "JOB_TIMEOUT",
        "seconds a test command may run at most (its .volt.toml may ask for less)",
        600.0,
        positive_float,
        metavar="S",
    ),
    Option(
        "heartbeat_interval",
        "--heartbeat-interval",
        "HEARTBEAT_INTERVAL",
        "seconds between heartbeats",
        2.0,
        positive_float,
        metavar="S",
    ),
    Option(
        "allow_repos",
        "--allow-repo",
        "ALLOW_REPOS",
        "only test repositories that match this glob, written as --repo is: file:///srv/* matches /srv/app, "
        "and a password or a trailing slash makes no difference",
        (),
        repo_pattern,
        many="lines",
        metavar="PATTERN",
        shown="any repository",
    ),
    Option("labels", "--label", "LABELS", "a label jobs may require", (), _label, many="names", metavar="LABEL"),
    Option(
        "kill_grace",
        "--kill-grace",
        "KILL_GRACE",
        "seconds between SIGTERM and SIGKILL when a test run is stopped",
        5.0,
        positive_float,
        metavar="S",
    ),
    Option(
        "sandbox",
        "--sandbox",
        "SANDBOX",
        "the box each test command runs in; none: no sandbox at all",
        "bwrap",
        choice("bwrap", "none"),
        metavar="{bwrap,none}",
    ),
    Option(
        "sandbox_hide",
        "--sandbox-hide",
        "SANDBOX_HIDE",
        "also hide this path from test commands",
        (),
        path,
        many="paths",
        metavar="PATH",
    ),
    Option(
        "allow_network",
        "--allow-network",
        "ALLOW_NETWORK",
        "grant a repository's [test] network = true",
        False,
        switch=True,
        shown="off: loopback only",
    ),
    Option(
        "git_timeout",
        "--git-timeout",
        "GIT_TIMEOUT",
        "seconds a checkout's git (clone, fetch, checkout) may take",
        300.0,
        positive_float,
        metavar="S",
    ),
    Option(
        "git_credentials",
        "--git-credentials",
        "GIT_CREDENTIALS",
        "a git-credential-store style file: https://user:token@host[/path] lines, for the repositories they match",
        None,
        existing_file,
        metavar="FILE",
    ),
    Option(
        "pythons",
        "--python",
        "PYTHONS",
        "a Python jobs may ask for with [env] python: a version (python3.12 on PATH) or an interpreter's path; "
        "the runner's own is always there, and each is advertised as a label such as python3.12",
        (),
        _python,
        many="lines",
        metavar="VERSION_OR_PATH",
        shown="every python3.X on PATH that starts",
    ),
    Option(
        "env_cache_size",
        "--env-cache-size",
        "ENV_CACHE_SIZE",
        "job environments kept on disk; the least recently used go first",
        10,
        positive_int,
        metavar="N",
    ),
    Option(
        "env_timeout",
        "--env-timeout",
        "ENV_TIMEOUT",
        "seconds building a job's environment may take (uv's downloads and builds)",
        900.0,
        positive_float,
        metavar="S",
    ),
    Option(
        "allow_system_python",
        "--allow-system-python",
        "ALLOW_SYSTEM_PYTHON",
        "grant [env] system = true: such jobs run with the runner's own Python and packages, no environment "
        "(advertised as the label system-python)",
        False,
        switch=True,
        shown="off",
    ),
)


def add_parsers(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:  # type: ignore[type-arg]
    p = sub.add_parser("runner", help="take jobs from this runner's queue and run their tests")
    add_options(p, OPTIONS)
    p.set_defaults(func=main)
    return p


def settings_from(args: argparse.Namespace | None, environ: Mapping[str, str] | None = None) -> RunnerSettings:
    """RunnerSettings from defaults, then VOLT_*, then the flags given in `args`."""
    from runner.service import RunnerSettings

    values = gather(OPTIONS, args, environ)
    if values["runner_id"] is None:
        host = socket.gethostname().split(".")[0]
        if not naming.valid_runner_id(host):
            raise SettingsError(f"the host name {host!r} is no runner id; give one with --id")
        values["runner_id"] = host
    if values["workdir"] is None:
        values["workdir"] = (Path(".volt") / f"runner-{values['runner_id']}").resolve()
    try:
        check_labels(list(values["labels"]))
    except ValueError as exc:
        raise SettingsError(f"--label: {exc}") from None
    values["labels"] = (*values["labels"], *_have_labels(values["pythons"], values["allow_system_python"], environ))
    return RunnerSettings(broker=BrokerSettings.from_args(args, environ), **values)


def _have_labels(pythons: tuple[str, ...], allow_system: bool, environ: Mapping[str, str] | None) -> list[str]:
    """The labels for what this runner has: its Pythons (python3.12), and system-python where granted.
    They are labels so that the dispatcher's routing sends a job only where they are."""
    from runner import pythons as found_pythons

    try:
        # The same arguments as each job's look-up, which then finds them cached.
        found = found_pythons.find_pythons(pythons, environ.get("PATH") if environ is not None else None)
    except ValueError as exc:
        raise SettingsError(f"--python: {exc}") from None
    labels = [voltfile.python_label(version) for version in found]
    return labels + ([voltfile.SYSTEM_PYTHON_LABEL] if allow_system else [])


def main(args: argparse.Namespace) -> int:
    from runner.service import Runner, RunnerSettings

    settings = RunnerSettings.from_args(args)
    logs.set_context(runner=settings.runner_id)
    writable_dir(settings.workdir, "--workdir")
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
