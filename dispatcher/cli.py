"""`volt dispatcher`: argument parsing only."""

from __future__ import annotations

import argparse
from pathlib import Path

from common.settings import BrokerSettings, env


def add_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:  # type: ignore[type-arg]
    p = sub.add_parser("dispatcher", help="own job state: route commits to runners, record results")
    p.add_argument("--db", default=env("DB", ".volt/dispatcher.db"), help="SQLite store (env VOLT_DB)")
    p.add_argument("--max-attempts", type=int, default=3, help="attempts before a job whose runners die ends as error")
    p.add_argument("--heartbeat-misses", type=int, default=3, help="missed heartbeats before a runner is lost")
    p.set_defaults(func=main)
    return p


def main(args: argparse.Namespace) -> int:
    from dispatcher.service import Dispatcher, DispatcherSettings

    db = Path(args.db).resolve()
    db.parent.mkdir(parents=True, exist_ok=True)
    settings = DispatcherSettings(
        broker=BrokerSettings.from_args(args),
        db=db,
        max_attempts=max(1, args.max_attempts),
        heartbeat_misses=max(1, args.heartbeat_misses),
    )
    dispatcher = Dispatcher(settings)
    dispatcher.install_signal_handlers()
    return dispatcher.run()
