"""The `volt` command: one entry point, a sub-command per job.

Each worker's own cli module adds its sub-commands; this only ties them
together and turns user mistakes into one line and an exit code.
"""

from __future__ import annotations

import argparse
import sys

from common import exits, logs
from common.settings import SettingsError, add_common_flags


def build_parser() -> argparse.ArgumentParser:
    from common import demo, up
    from dispatcher import cli as dispatcher_cli
    from dispatcher import client
    from observer import cli as observer_cli
    from runner import cli as runner_cli

    parser = argparse.ArgumentParser(prog="volt", description="Volt CI: test every commit on a fleet of runners.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    observer_cli.add_parsers(sub)
    dispatcher_cli.add_parser(sub)
    runner_cli.add_parser(sub)
    up.add_parser(sub)
    client.add_parsers(sub)
    demo.add_parser(sub)
    for p in sub.choices.values():
        add_common_flags(p)
    return parser


def main(argv: list[str] | None = None) -> int:
    from common.broker import BrokerUnavailable
    from dispatcher.client import QueryFailed

    args = build_parser().parse_args(argv)
    logs.configure(args.log_level, args.log_format)
    try:
        return int(args.func(args) or 0)
    except SettingsError as exc:
        print(f"volt {args.command}: {exc}", file=sys.stderr)
        return exits.USAGE
    except BrokerUnavailable as exc:
        print(f"volt {args.command}: {exc}", file=sys.stderr)
        return exits.BROKER_UNAVAILABLE
    except QueryFailed as exc:
        print(f"volt {args.command}: {exc}", file=sys.stderr)
        return exits.UNHEALTHY
    except KeyboardInterrupt:
        return exits.INTERRUPTED


if __name__ == "__main__":
    sys.exit(main())
