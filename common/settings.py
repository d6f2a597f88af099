"""Settings shared by every worker: defaults, then VOLT_* environment, then flags."""

from __future__ import annotations

import argparse
import os
import urllib.parse
from dataclasses import dataclass

DEFAULT_AMQP_URL = "amqp://guest:guest@localhost:5672/%2F"
DEFAULT_NAMESPACE = "volt"


class SettingsError(ValueError):
    """A user mistake in configuration; main() prints it as one line."""


def env(name: str, default: str) -> str:
    return os.environ.get(f"VOLT_{name}", default)


def env_float(name: str, default: float) -> float:
    raw = os.environ.get(f"VOLT_{name}")
    if raw is None or raw == "":
        return default
    try:
        return float(raw)
    except ValueError:
        raise SettingsError(f"VOLT_{name} must be a number, got {raw!r}") from None


@dataclass(frozen=True)
class BrokerSettings:
    amqp_url: str = DEFAULT_AMQP_URL
    namespace: str = DEFAULT_NAMESPACE

    def __post_init__(self) -> None:
        check_amqp_url(self.amqp_url)
        if not self.namespace or not all(c.isalnum() or c in "-_" for c in self.namespace):
            raise SettingsError(f"namespace must be letters, digits, '-' or '_', got {self.namespace!r}")

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> BrokerSettings:
        return cls(amqp_url=args.amqp_url, namespace=args.namespace)


def check_amqp_url(url: str) -> None:
    try:
        parsed = urllib.parse.urlsplit(url)
        _ = parsed.port  # raises ValueError unless the port is a number from 0 to 65535
    except ValueError:
        raise SettingsError(f"not an AMQP URL: {redact_url(url)}") from None
    if parsed.scheme not in ("amqp", "amqps") or not parsed.hostname:
        raise SettingsError(f"not an AMQP URL: {redact_url(url)}")


def redact_url(url: str) -> str:
    """The URL with any password replaced, fit for logs and status output."""
    try:
        parsed = urllib.parse.urlsplit(url)
    except ValueError:  # e.g. an unbalanced "[": say nothing about it rather than leak it
        return "<unparsable URL>"
    userinfo, at, hostport = parsed.netloc.rpartition("@")
    if not at or ":" not in userinfo:
        return url
    # Work on the raw netloc: parsed.port raises on a bad port, and
    # parsed.hostname drops an IPv6 address's brackets.
    netloc = f"{userinfo.split(':', 1)[0]}:***@{hostport}"
    return urllib.parse.urlunsplit(parsed._replace(netloc=netloc))


def add_common_flags(parser: argparse.ArgumentParser) -> None:
    """Flags every `volt` sub-command takes."""
    parser.add_argument(
        "--amqp-url",
        default=env("AMQP_URL", DEFAULT_AMQP_URL),
        # %% for argparse; the default's password is the well-known guest one.
        help=f"RabbitMQ URL (env VOLT_AMQP_URL; default {DEFAULT_AMQP_URL.replace('%', '%%')})",
    )
    parser.add_argument(
        "--namespace",
        default=env("NAMESPACE", DEFAULT_NAMESPACE),
        help=f"prefix of every exchange and queue name (env VOLT_NAMESPACE; default {DEFAULT_NAMESPACE})",
    )
    parser.add_argument(
        "--log-level",
        default=env("LOG_LEVEL", "INFO"),
        choices=["DEBUG", "INFO", "WARNING", "ERROR"],
        type=str.upper,
        help="how much to log (env VOLT_LOG_LEVEL; default INFO, WARNING for commands that answer and end)",
    )
    parser.add_argument(
        "--log-format",
        default=env("LOG_FORMAT", "plain"),
        choices=["plain", "json"],
        help="plain for people, json for log shippers (env VOLT_LOG_FORMAT; default plain)",
    )
