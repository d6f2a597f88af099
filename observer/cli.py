"""`volt observer` and `volt notify`: argument parsing only."""

from __future__ import annotations

import argparse
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING

from common import exits
from common.settings import (
    BrokerSettings,
    Option,
    SettingsError,
    add_options,
    gather,
    path,
    positive_float,
    repo_url,
    writable_dir,
)

if TYPE_CHECKING:
    from observer.service import ObserverSettings


def _branch(raw: str) -> str:
    from common.messages import check_branch

    return check_branch(raw)


# The observer's settings as flags and VOLT_* variables (ObserverSettings.from_args
# reads them). Here, not next to the class: `volt notify` shares this module
# and must start without loading the observer.
OPTIONS = (
    Option(
        "repos",
        "--repo",
        "REPOS",
        "a repository to watch: a local path or any URL git can fetch",
        (),
        repo_url,
        many="lines",
        metavar="REPO",
        shown="none; one at least is needed",
    ),
    Option(
        "branches",
        "--branch",
        "BRANCHES",
        "a branch to watch in every repository",
        (),
        _branch,
        many="names",
        metavar="BRANCH",
        shown="each repository's HEAD",
    ),
    Option("poll", "--poll", "POLL", "seconds between polls", 5.0, positive_float, metavar="S"),
    Option(
        "state_dir",
        "--state-dir",
        "STATE_DIR",
        "where the cursor and the mirrors of remote repositories live",
        Path(".volt/observer"),
        path,
        metavar="DIR",
    ),
    Option(
        "git_timeout",
        "--git-timeout",
        "GIT_TIMEOUT",
        "seconds a clone or fetch may take",
        300.0,
        positive_float,
        metavar="S",
    ),
)


def add_parsers(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser("observer", help="watch repositories and publish every new commit")
    add_options(p, OPTIONS)
    p.set_defaults(func=observer_main)

    p = sub.add_parser("notify", help="publish a commit now (for a git post-commit / post-receive hook)")
    p.add_argument("--repo", required=True, help="the repository: a local path or a URL (required)")
    p.add_argument("--branch", required=True, help="the branch the commit is on (required)")
    p.add_argument("--commit", metavar="SHA", help="commit id (default: the branch's head in --repo)")
    p.add_argument(
        "--label",
        action="append",
        default=[],
        help="a runner label the job needs (repeatable; default none, and those in .volt.toml when --repo is local)",
    )
    p.set_defaults(func=notify_main)


def settings_from(args: argparse.Namespace | None, environ: Mapping[str, str] | None = None) -> ObserverSettings:
    """ObserverSettings from defaults, then VOLT_*, then the flags given in `args`."""
    from observer.service import ObserverSettings

    values = gather(OPTIONS, args, environ)
    if not values["repos"]:
        raise SettingsError("no repository to watch: give --repo (or VOLT_REPOS)")
    values["state_dir"] = Path(values["state_dir"]).resolve()
    return ObserverSettings(broker=BrokerSettings.from_args(args, environ), **values)


def _branches(names: list[str]) -> tuple[str, ...]:
    try:
        return tuple(_branch(name) for name in names)
    except ValueError as exc:
        raise SettingsError(f"--branch: {exc}") from None


def observer_main(args: argparse.Namespace) -> int:
    from observer.cursor import CursorBusy
    from observer.repos import RepoError
    from observer.service import Observer, ObserverSettings

    settings = ObserverSettings.from_args(args)
    writable_dir(settings.state_dir, "--state-dir")
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
