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
    existing_file,
    gather,
    path,
    positive_float,
    repo_url,
    writable_dir,
)
from observer import notify

if TYPE_CHECKING:
    from observer.service import ObserverSettings


def _branch(raw: str) -> str:
    from common.messages import check_branch

    return check_branch(raw)


def listen_address(raw: str) -> str:
    """HOST:PORT for the webhook receiver (`[::1]:8089` for IPv6; port 0 takes a free one)."""
    host, colon, port = raw.strip().rpartition(":")
    host = host.removeprefix("[").removesuffix("]")
    if not colon or not host or not port.isdigit() or int(port) > 65535:
        raise ValueError(f"must be HOST:PORT, such as 127.0.0.1:8089 (0.0.0.0:8089 for every address), got {raw!r:.80}")
    return f"[{host}]:{int(port)}" if ":" in host else f"{host}:{int(port)}"


def split_listen(address: str) -> tuple[str, int]:
    """A listen_address() as (host, port)."""
    host, _, port = address.rpartition(":")
    return host.removeprefix("[").removesuffix("]"), int(port)


def loopback(host: str) -> bool:
    """Whether only this machine can reach an address."""
    import ipaddress

    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


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
    Option(
        "listen",
        "--listen",
        "LISTEN",
        "serve forge push webhooks (POST /webhook) and local hooks (POST /notify) on HOST:PORT",
        "",
        listen_address,
        metavar="HOST:PORT",
        shown="off",
    ),
    Option(
        "webhook_secret_file",
        "--webhook-secret-file",
        "WEBHOOK_SECRET_FILE",
        "the secret shared with the forges' webhooks (and asked of POST /notify) on its one line",
        None,
        existing_file,
        metavar="FILE",
        shown="none; needed unless --listen is on a loopback address",
    ),
)


def add_parsers(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser("observer", help="watch repositories and publish every new commit")
    add_options(p, OPTIONS)
    p.set_defaults(func=observer_main)

    p = sub.add_parser("notify", help="publish a commit now (for a git post-commit / post-receive hook)")
    notify.add_arguments(p)
    p.set_defaults(func=notify_main)


def settings_from(args: argparse.Namespace | None, environ: Mapping[str, str] | None = None) -> ObserverSettings:
    """ObserverSettings from defaults, then VOLT_*, then the flags given in `args`."""
    from observer.service import ObserverSettings

    values = gather(OPTIONS, args, environ)
    if not values["repos"]:
        raise SettingsError("no repository to watch: give --repo (or VOLT_REPOS)")
    values["state_dir"] = Path(values["state_dir"]).resolve()
    if values["listen"] and values["webhook_secret_file"] is None:
        host, _ = split_listen(values["listen"])
        if not loopback(host):
            # Without a secret nothing can be verified: only this machine's hooks may talk to it.
            raise SettingsError(
                f"--listen {values['listen']} takes requests from other machines: give --webhook-secret-file "
                "(only a loopback address such as 127.0.0.1 may go without)"
            )
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
        # Bound first, so an address in use or a secret that cannot be read is
        # one line at start rather than a surprise later.
        observer.listen()
        observer.open_repos()
    except (RepoError, CursorBusy, ValueError, OSError) as exc:
        raise SettingsError(str(exc)) from None
    observer.install_signal_handlers()
    return observer.run()


def notify_main(args: argparse.Namespace) -> int:
    if notify.receiver_url(args):
        return notify.tell_receiver(notify.Notice.from_args(args))  # as the lean path does
    from common.broker import Broker, BrokerUnavailable, Unroutable, connect_within
    from common.messages import check_commit, check_labels
    from common.naming import is_local, normalize_repo
    from common.voltfile import Asks
    from observer.publish import AboutRead, AsksRead, publish_commit

    try:
        repo = normalize_repo(args.repo)
        timeout = notify.timeout_of(args)
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
    # Both read by git while the broker connects: a hook pays for neither.
    reading = AsksRead(repo, commit) if is_local(repo) else None
    reading_about = AboutRead(repo, commit) if is_local(repo) else None
    broker = Broker(BrokerSettings.from_args(args), "volt-notify")
    # A refused connection fails at once, anything else within the timeout:
    # a hook never holds up a commit for long, and the next poll finds it.
    connect_within(broker, timeout)
    asks = reading.result() if reading is not None else Asks()
    about = reading_about.result() if reading_about is not None else ("", "")
    try:
        try:
            publish_commit(broker, repo, branch, commit, source="notify", labels=labels, asks=asks, about=about)
        except (BrokerUnavailable, Unroutable):
            # Declaring costs round trips a hook should not pay every time:
            # only when the topology is not there yet.
            broker.close()
            connect_within(broker, timeout)
            broker.declare_commit_path()
            publish_commit(broker, repo, branch, commit, source="notify", labels=labels, asks=asks, about=about)
    finally:
        broker.close()
    print(f"published {commit[:12]} on {branch} of {repo}")
    return exits.OK
