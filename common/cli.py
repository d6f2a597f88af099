"""The `volt` command: one entry point, a sub-command per job.

Each worker's own cli module adds its sub-commands; this only ties them
together and turns user mistakes into one line and an exit code.
"""

from __future__ import annotations

import sys

from common import exits

# Not typing's TYPE_CHECKING: `volt notify` in a git hook would pay 5 ms for it.
TYPE_CHECKING = False
if TYPE_CHECKING:
    import argparse

# The module that adds each sub-command, in help order. A command imports only
# its own module: `volt notify`, run by git hooks, must start quickly.
COMMANDS = {
    "observer": "observer.cli",
    "notify": "observer.cli",
    "dispatcher": "dispatcher.cli",
    "runner": "runner.cli",
    "up": "common.up",
    "status": "dispatcher.client",
    "results": "dispatcher.client",
    "tests": "dispatcher.client",
    "log": "dispatcher.client",
    "runner-ctl": "dispatcher.client",
    "check": "dispatcher.client",
    "dead-letters": "dispatcher.deadletters",
    "migrate-queues": "dispatcher.migrate",
    "demo": "common.demo",
}
# Commands that answer and end: their output is the answer, so they log only
# warnings unless --log-level (or VOLT_LOG_LEVEL) asks for more.
ONE_SHOT = {"status", "results", "tests", "log", "runner-ctl", "check", "dead-letters", "migrate-queues"}


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The parser for one sub-command when it is a known one, else for them all."""
    import argparse
    import importlib

    from common.settings import add_common_flags

    modules = [COMMANDS[command]] if command in COMMANDS else list(dict.fromkeys(COMMANDS.values()))
    parser = argparse.ArgumentParser(prog="volt", description="Volt CI: test every commit on a fleet of runners.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in modules:
        importlib.import_module(name).add_parsers(sub)
    for p in sub.choices.values():
        add_common_flags(p)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["notify"]:
        # A git hook waits on this one: told to the observer's receiver, it
        # needs none of the imports below (observer/notify.py).
        from observer.notify import fast_main

        code = fast_main(argv[1:])
        if code is not None:
            return code
    import os

    from common import logs
    from common.settings import SettingsError, resolve_common

    args = build_parser(argv[0] if argv else None).parse_args(argv)
    try:
        resolve_common(args, quiet=args.command in ONE_SHOT)
    except SettingsError as exc:
        print(f"volt {args.command}: {exc}", file=sys.stderr)
        return exits.USAGE
    logs.configure(args.log_level, args.log_format)
    logs.set_context(worker=args.command)
    try:
        return int(args.func(args) or 0)
    except SettingsError as exc:
        print(f"volt {args.command}: {exc}", file=sys.stderr)
        return exits.USAGE
    except exits.CommandFailed as exc:
        print(f"volt {args.command}: {exc}", file=sys.stderr)
        return exc.code
    except KeyboardInterrupt:
        return exits.INTERRUPTED
    except BrokenPipeError:
        # `volt results | head`: the reader has all it wanted. Point stdout at
        # /dev/null so the interpreter's last flush does not complain either.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return exits.BROKEN_PIPE
    except Exception as exc:
        if not _broker_unavailable(exc):
            raise
        print(f"volt {args.command}: {exc}", file=sys.stderr)
        return exits.BROKER_UNAVAILABLE


def _broker_unavailable(exc: BaseException) -> bool:
    # Asked without importing the broker (and pika): a command that never
    # loaded it cannot have lost it.
    broker = sys.modules.get("common.broker")
    return broker is not None and isinstance(exc, broker.BrokerUnavailable)


if __name__ == "__main__":
    sys.exit(main())
