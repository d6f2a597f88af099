"""`volt dispatcher`: argument parsing only."""

from __future__ import annotations

import argparse
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING

from common.settings import (
    BrokerSettings,
    Option,
    SettingsError,
    add_options,
    gather,
    path,
    port,
    positive_float,
    positive_int,
    writable_dir,
)

if TYPE_CHECKING:
    from dispatcher.service import DispatcherSettings


def store_location(raw: str) -> Path | str:
    """--db: a postgresql:// URL as given, else a SQLite file's absolute path."""
    from dispatcher.store import is_url

    if is_url(raw):
        import urllib.parse

        parsed = urllib.parse.urlsplit(raw)
        if not parsed.hostname and not parsed.path.strip("/"):
            raise ValueError("a PostgreSQL URL needs a host or a database: postgresql://USER@HOST:PORT/DB")
        return raw
    return path(raw)


def _user(raw: str) -> str:
    if not raw or any(c.isspace() or c in ",\0" for c in raw):
        raise ValueError(f"not a RabbitMQ user name: {raw!r:.80}")
    return raw


# The dispatcher's settings as flags and VOLT_* variables (DispatcherSettings.from_args reads them).
OPTIONS = (
    Option(
        "db",
        "--db",
        "DB",
        "the store: a SQLite file, or postgresql://USER@HOST:PORT/DB (where standby dispatchers may run)",
        Path(".volt/dispatcher.db"),
        store_location,
        metavar="PATH|URL",
    ),
    Option(
        "max_attempts",
        "--max-attempts",
        "MAX_ATTEMPTS",
        "attempts before a job whose runners keep dying ends as error",
        3,
        positive_int,
        metavar="N",
    ),
    Option(
        "heartbeat_misses",
        "--heartbeat-misses",
        "HEARTBEAT_MISSES",
        "heartbeat intervals a runner may stay silent before it is lost",
        3,
        positive_int,
        metavar="N",
    ),
    Option(
        "park_timeout",
        "--park-timeout",
        "PARK_TIMEOUT",
        "seconds a job may wait while no live runner has its labels, before it ends as error",
        3600.0,
        positive_float,
        metavar="S",
    ),
    Option(
        "http_port",
        "--http-port",
        "HTTP_PORT",
        "serve the results page and /metrics on this port",
        0,
        port,
        metavar="PORT",
        shown="0: off",
    ),
    Option("http_host", "--http-host", "HTTP_HOST", "address to serve them on", "127.0.0.1", metavar="HOST"),
    Option(
        "operators",
        "--operator",
        "OPERATORS",
        "a RabbitMQ user allowed to pause, resume or drain runners",
        (),
        _user,
        many="names",
        metavar="USER",
        shown="anyone who may ask the dispatcher",
    ),
    Option(
        "take_over",
        "--take-over",
        "TAKE_OVER",
        "take the namespace over from the store that owns it, when that store is gone for good "
        "(this one adopts the jobs waiting in the backlog); use it once, not in a service file",
        False,
        switch=True,
    ),
)


def add_parsers(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:  # type: ignore[type-arg]
    p = sub.add_parser("dispatcher", help="own job state: route commits to runners, record results")
    add_options(p, OPTIONS)
    p.set_defaults(func=main)
    return p


def settings_from(args: argparse.Namespace | None, environ: Mapping[str, str] | None = None) -> DispatcherSettings:
    """DispatcherSettings from defaults, then VOLT_*, then the flags given in `args`."""
    from dispatcher.service import DispatcherSettings

    values = gather(OPTIONS, args, environ)
    if isinstance(values["db"], Path):
        values["db"] = values["db"].resolve()
    return DispatcherSettings(broker=BrokerSettings.from_args(args, environ), **values)


def main(args: argparse.Namespace) -> int:
    from dispatcher.service import Dispatcher, DispatcherSettings
    from dispatcher.store import StoreError

    settings = DispatcherSettings.from_args(args)
    if isinstance(settings.db, Path):
        writable_dir(settings.db.parent, "--db")
    try:
        dispatcher = Dispatcher(settings)
    except StoreError as exc:
        raise SettingsError(str(exc)) from None
    if settings.http_port:
        from dispatcher import web

        web.serve(dispatcher)
    dispatcher.install_signal_handlers()
    return dispatcher.run()
