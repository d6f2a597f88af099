"""`volt observer` and `volt notify`: argument parsing only."""

from __future__ import annotations

import argparse
from pathlib import Path

from common import exits
from common.settings import BrokerSettings, SettingsError, env, env_float


def add_parsers(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser("observer", help="watch repositories and publish every new commit")
    p.add_argument("--repo", action="append", required=True, help="a local path or any URL git can fetch (repeatable)")
    p.add_argument(
        "--branch", action="append", default=[], help="branch to watch (repeatable; default: the repo's HEAD)"
    )
    p.add_argument("--poll", type=float, default=env_float("POLL", 5.0), help="seconds between polls (default 5)")
    p.add_argument("--state-dir", default=env("STATE_DIR", ".volt/observer"), help="where the cursor and mirrors live")
    p.add_argument(
        "--git-timeout",
        type=float,
        default=env_float("GIT_TIMEOUT", 300.0),
        help="seconds a clone or fetch may take (env VOLT_GIT_TIMEOUT; default 300)",
    )
    p.set_defaults(func=observer_main)

    p = sub.add_parser("notify", help="publish a commit now (for a git post-commit / post-receive hook)")
    p.add_argument("--repo", required=True)
    p.add_argument("--branch", required=True)
    p.add_argument("--commit", help="commit id (default: the branch's head in --repo)")
    p.add_argument(
        "--label",
        action="append",
        default=[],
        help="a runner label the job needs (repeatable; read from .volt.toml too when --repo is local)",
    )
    p.set_defaults(func=notify_main)


def _branches(names: list[str]) -> tuple[str, ...]:
    from common.messages import check_branch

    try:
        return tuple(check_branch(name) for name in names)
    except ValueError as exc:
        raise SettingsError(f"--branch: {exc}") from None


def observer_main(args: argparse.Namespace) -> int:
    from observer.cursor import CursorBusy
    from observer.repos import RepoError
    from observer.service import Observer, ObserverSettings

    if args.poll <= 0:
        raise SettingsError("--poll must be a positive number of seconds")
    if args.git_timeout <= 0:
        raise SettingsError("--git-timeout must be a positive number of seconds")
    settings = ObserverSettings(
        broker=BrokerSettings.from_args(args),
        repos=tuple(args.repo),
        branches=_branches(args.branch),
        poll=args.poll,
        state_dir=Path(args.state_dir).resolve(),
        git_timeout=args.git_timeout,
    )
    try:
        observer = Observer(settings)
        observer.open_repos()
    except (RepoError, CursorBusy, ValueError, OSError) as exc:
        raise SettingsError(str(exc)) from None
    observer.install_signal_handlers()
    return observer.run()


def notify_main(args: argparse.Namespace) -> int:
    from common.broker import Broker, BrokerUnavailable, Unroutable
    from common.messages import check_commit, check_labels
    from common.naming import is_local, normalize_repo
    from observer.publish import LabelsRead, publish_commit

    try:
        repo = normalize_repo(args.repo)
    except ValueError as exc:
        raise SettingsError(str(exc)) from None
    (branch,) = _branches([args.branch])
    if args.commit:
        try:
            commit = check_commit(args.commit.strip())
        except ValueError as exc:
            raise SettingsError(str(exc)) from None
    else:
        from observer.repos import RepoError, WatchedRepo

        try:
            watched = WatchedRepo(args.repo, Path(".volt/notify"))
            if not watched.local:
                raise RepoError("--commit is required for a remote repository")
            watched.open()
            commit = watched.head(branch)
        except RepoError as exc:
            raise SettingsError(str(exc)) from None
    try:
        labels = set(check_labels(args.label))
    except ValueError as exc:
        raise SettingsError(f"--label: {exc}") from None
    reading = LabelsRead(repo, commit) if is_local(repo) else None
    broker = Broker(BrokerSettings.from_args(args), "volt-notify")
    broker.connect(give_up_after=10)
    if reading is not None:
        labels.update(reading.result())
    try:
        try:
            publish_commit(broker, repo, branch, commit, source="notify", labels=labels)
        except (BrokerUnavailable, Unroutable):
            # Declaring costs round trips a hook should not pay every time:
            # only when the topology is not there yet.
            broker.close()
            broker.connect(give_up_after=10)
            broker.declare_commit_path()
            publish_commit(broker, repo, branch, commit, source="notify", labels=labels)
    finally:
        broker.close()
    print(f"published {commit[:12]} on {branch} of {repo}")
    return exits.OK
