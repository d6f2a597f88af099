"""`volt dispatcher`: argument parsing only."""

from __future__ import annotations

import argparse
from pathlib import Path

from common.settings import BrokerSettings, SettingsError, env, env_float


def add_parsers(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:  # type: ignore[type-arg]
    p = sub.add_parser("dispatcher", help="own job state: route commits to runners, record results")
    p.add_argument("--db", default=env("DB", ".volt/dispatcher.db"), help="SQLite store (env VOLT_DB)")
    p.add_argument("--max-attempts", type=int, default=3, help="attempts before a job whose runners die ends as error")
    p.add_argument("--heartbeat-misses", type=int, default=3, help="missed heartbeats before a runner is lost")
    p.add_argument(
        "--park-timeout",
        type=float,
        default=env_float("PARK_TIMEOUT", 3600.0),
        help="seconds a job may wait while no live runner has its labels, before it ends as error "
        "(env VOLT_PARK_TIMEOUT; default 3600)",
    )
    p.add_argument(
        "--http-port",
        type=int,
        default=env("HTTP_PORT", "0"),
        help="serve the results page and /metrics on this port; 0: off (env VOLT_HTTP_PORT)",
    )
    p.add_argument(
        "--http-host", default=env("HTTP_HOST", "127.0.0.1"), help="address to serve it on (env VOLT_HTTP_HOST)"
    )
    p.add_argument(
        "--operator",
        action="append",
        default=[u for u in env("OPERATORS", "").replace(",", " ").split() if u],
        metavar="USER",
        help="RabbitMQ user allowed to pause, resume or drain runners (repeatable; env VOLT_OPERATORS, "
        "comma-separated; default: anyone who may ask the dispatcher)",
    )
    p.set_defaults(func=main)
    return p


def main(args: argparse.Namespace) -> int:
    from dispatcher.service import Dispatcher, DispatcherSettings
    from dispatcher.store import StoreError

    if not 0 <= args.http_port <= 65535:
        raise SettingsError(f"--http-port must be from 0 (off) to 65535, got {args.http_port}")
    if args.park_timeout <= 0:
        raise SettingsError("--park-timeout must be a positive number of seconds")
    db = Path(args.db).resolve()
    try:
        db.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise SettingsError(f"cannot create the folder of --db {db}: {exc.strerror}") from None
    settings = DispatcherSettings(
        broker=BrokerSettings.from_args(args),
        db=db,
        max_attempts=max(1, args.max_attempts),
        heartbeat_misses=max(1, args.heartbeat_misses),
        http_port=args.http_port,
        http_host=args.http_host,
        operators=tuple(args.operator),
        park_timeout=args.park_timeout,
    )
    try:
        dispatcher = Dispatcher(settings)
    except StoreError as exc:
        raise SettingsError(str(exc)) from None
    if settings.http_port:
        from dispatcher import web

        web.serve(dispatcher)
    dispatcher.install_signal_handlers()
    return dispatcher.run()
