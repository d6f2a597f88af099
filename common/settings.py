"""Settings: defaults, then VOLT_* environment, then command-line flags.

Each setting is spelled once, as an `Option`: its field in a settings class,
its flag, its VOLT_* variable, how a value is read and checked, its default
and its help. `add_options` puts the flags on a parser with no argparse
default, so that `gather` alone decides what wins, by construction:

    a flag given > a non-empty VOLT_* variable > the default

A repeatable flag given once or more replaces its variable's whole list; it
never adds to it. A bad value is one SettingsError line that names the flag
or the variable it came from.
"""

from __future__ import annotations

import argparse
import math
import os
import urllib.parse
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from common.naming import normalize_repo

DEFAULT_AMQP_URL = "amqp://guest:guest@localhost:5672/%2F"
DEFAULT_NAMESPACE = "volt"
# Quorum queues are replicated over a cluster's nodes; classic ones live on one node.
QUEUE_TYPES = ("quorum", "classic")
DEFAULT_QUEUE_TYPE = "quorum"


class SettingsError(ValueError):
    """A user mistake in configuration; main() prints it as one line."""


def _split_lines(raw: str) -> list[str]:
    # Repository URLs never hold a space, but a local path may: one per line
    # keeps such a path whole.
    if "\n" in raw:
        return [line.strip() for line in raw.splitlines() if line.strip()]
    return raw.split()


# How a repeatable setting's VOLT_* value splits into items, and how help says so.
SPLITS: dict[str, tuple[Callable[[str], list[str]], str]] = {
    "names": (lambda raw: raw.replace(",", " ").split(), "comma-separated"),
    "paths": (lambda raw: [p for p in raw.split(":") if p.strip()], "colon-separated"),
    "lines": (_split_lines, "space-separated, or one per line"),
}
_TRUE = ("1", "true", "yes", "on")
_FALSE = ("0", "false", "no", "off")


@dataclass(frozen=True)
class Option:
    """One setting as the outside world spells it."""

    field: str  # the settings field, and the argparse dest
    flag: str  # "--job-timeout"
    env: str  # "JOB_TIMEOUT": read from VOLT_JOB_TIMEOUT
    help: str
    default: Any = None
    parse: Callable[[str], Any] = str  # one value (one item of a list); ValueError says what is wrong
    many: str = ""  # repeatable: how its VOLT_* value splits (a key of SPLITS)
    switch: bool = False  # --x / --no-x; VOLT_X is 1/0, true/false, yes/no or on/off
    metavar: str | None = None
    shown: str | None = None  # the default as help says it, when not the value itself

    @property
    def variable(self) -> str:
        return f"VOLT_{self.env}"

    def help_text(self) -> str:
        """The help, with the variable and the default."""
        env = self.variable + (f", {SPLITS[self.many][1]}" if self.many else "")
        where = ("repeatable; " if self.many else "") + f"env {env}"
        return f"{self.help} ({where}; default: {self.shown if self.shown is not None else _show(self.default)})"


def _show(value: Any) -> str:
    if isinstance(value, bool):
        return "on" if value else "off"
    if isinstance(value, float):
        return f"{value:g}"
    if value is None or value == ():
        return "none"
    return str(value)


def add_options(parser: argparse.ArgumentParser, options: Iterable[Option]) -> None:
    """The options' flags, each with its help, and none with a default: see `gather`."""
    for o in options:
        kwargs: dict[str, Any] = {"dest": o.field, "default": None, "help": o.help_text().replace("%", "%%")}
        if o.switch:
            kwargs["action"] = argparse.BooleanOptionalAction
        else:
            kwargs["metavar"] = o.metavar or o.flag.lstrip("-").upper().replace("-", "_")
            if o.many:
                kwargs["action"] = "append"
        parser.add_argument(o.flag, **kwargs)


def gather(
    options: Iterable[Option],
    args: argparse.Namespace | None = None,
    environ: Mapping[str, str] | None = None,
    defaults: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """Each option's value: the flag in `args` when given, else its non-empty
    VOLT_* variable in `environ` (default: this process's), else its default
    (or the one `defaults` names). SettingsError for a value that is wrong."""
    environ = os.environ if environ is None else environ
    values: dict[str, Any] = {}
    for o in options:
        given = getattr(args, o.field, None) if args is not None else None
        raw = environ.get(o.variable, "").strip()
        if given is not None:
            values[o.field] = _read_flag(o, given)
        elif raw:
            values[o.field] = _read_env(o, raw)
        else:
            values[o.field] = (defaults or {}).get(o.field, o.default)
    return values


def _read_flag(o: Option, given: Any) -> Any:
    if o.switch:
        return bool(given)
    if o.many:
        return tuple(_parse(o, o.flag, item) for item in given)
    return _parse(o, o.flag, given)


def _read_env(o: Option, raw: str) -> Any:
    if o.switch:
        if raw.lower() in _TRUE:
            return True
        if raw.lower() in _FALSE:
            return False
        raise SettingsError(f"{o.variable}: must be 1 or 0 (true or false), got {raw!r:.80}")
    if o.many:
        split, _ = SPLITS[o.many]
        return tuple(_parse(o, o.variable, item.strip()) for item in split(raw))
    return _parse(o, o.variable, raw)


def _parse(o: Option, source: str, raw: str) -> Any:
    try:
        return o.parse(raw)
    except ValueError as exc:
        raise SettingsError(f"{source}: {exc}") from None


# -- reading one value: each raises ValueError saying what is wrong ------------


def positive_float(raw: str) -> float:
    try:
        value = float(raw)
    except ValueError:
        value = math.nan
    if not (math.isfinite(value) and value > 0):
        raise ValueError(f"must be a positive number of seconds, got {raw!r:.80}")
    return value


def positive_int(raw: str) -> int:
    try:
        value = int(raw)
    except ValueError:
        value = 0
    if value < 1:
        raise ValueError(f"must be a whole number of at least 1, got {raw!r:.80}")
    return value


def port(raw: str) -> int:
    try:
        value = int(raw)
    except ValueError:
        value = -1
    if not 0 <= value <= 65535:
        raise ValueError(f"must be a port from 0 (off) to 65535, got {raw!r:.80}")
    return value


def choice(*allowed: str, upper: bool = False) -> Callable[[str], str]:
    def parse(raw: str) -> str:
        value = raw.upper() if upper else raw
        if value not in allowed:
            raise ValueError(f"must be one of {', '.join(allowed)}, got {raw!r:.80}")
        return value

    return parse


def path(raw: str) -> Path:
    """An absolute path (a relative one is taken from the current directory)."""
    if not raw or "\0" in raw:
        raise ValueError("must be a path")
    return Path(raw).expanduser().resolve()


def existing_file(raw: str) -> Path:
    found = path(raw)
    if not found.is_file():
        raise ValueError(f"no such file: {found}")
    return found


def repo_url(raw: str) -> str:
    """A repository as given (its password is needed to fetch), once it is known to be one."""
    normalize_repo(raw)
    return raw


def repo_pattern(raw: str) -> str:
    """An --allow-repo glob in the form of the identities it is matched against
    (naming.normalize_repo): `file:///srv/*` matches `/srv/x`, and
    `https://ci:TOKEN@Git.Example.com/*` matches `https://git.example.com/app`.
    One that starts with a wildcard (say `*`) has no form and stays as it is."""
    if raw[:1] in ("*", "?", "["):
        return raw
    return normalize_repo(raw)


def amqp_url(raw: str) -> str:
    """One URL, or a comma-separated list of a cluster's nodes (whitespace around
    the commas is dropped)."""
    urls = split_urls(raw)
    check_amqp_urls(urls)
    return ",".join(urls)


def split_urls(raw: str) -> list[str]:
    """The URLs of a comma-separated --amqp-url (a comma inside a password is
    written %2C, as any URL writes it)."""
    urls = [u.strip() for u in raw.split(",") if u.strip()]
    if not urls:
        raise SettingsError("not an AMQP URL: none given")
    return urls


def namespace(raw: str) -> str:
    if not raw or not all(c.isalnum() or c in "-_" for c in raw):
        raise ValueError(f"must be letters, digits, '-' or '_', got {raw!r:.80}")
    return raw


# -- the broker: every command's settings ---------------------------------------

COMMON_OPTIONS = (
    # The default's password is the well-known guest one.
    Option(
        "amqp_url",
        "--amqp-url",
        "AMQP_URL",
        "RabbitMQ URL, or a comma-separated list of a cluster's nodes (tried in random order, failed over)",
        DEFAULT_AMQP_URL,
        amqp_url,
        metavar="URL[,URL...]",
    ),
    Option(
        "namespace",
        "--namespace",
        "NAMESPACE",
        "prefix of every exchange and queue name, so several instances share a broker",
        DEFAULT_NAMESPACE,
        namespace,
        metavar="NAME",
    ),
    Option(
        "queue_type",
        "--queue-type",
        "QUEUE_TYPE",
        "type of every durable queue Volt CI declares: quorum (replicated over a cluster) or classic",
        DEFAULT_QUEUE_TYPE,
        choice(*QUEUE_TYPES),
        metavar="{quorum,classic}",
    ),
    Option(
        "log_level",
        "--log-level",
        "LOG_LEVEL",
        "how much to log: DEBUG, INFO, WARNING or ERROR",
        "INFO",
        choice("DEBUG", "INFO", "WARNING", "ERROR", upper=True),
        metavar="LEVEL",
        shown="INFO, WARNING for commands that answer and end",
    ),
    Option(
        "log_format",
        "--log-format",
        "LOG_FORMAT",
        "plain for people, json for log shippers",
        "plain",
        choice("plain", "json"),
        metavar="{plain,json}",
    ),
)


# The options BrokerSettings reads; the rest of COMMON_OPTIONS are the logs'.
BROKER_FIELDS = ("amqp_url", "namespace", "queue_type")


@dataclass(frozen=True)
class BrokerSettings:
    amqp_url: str = DEFAULT_AMQP_URL  # one URL, or several separated by commas
    namespace: str = DEFAULT_NAMESPACE
    queue_type: str = DEFAULT_QUEUE_TYPE

    def __post_init__(self) -> None:
        check_amqp_urls(split_urls(self.amqp_url))
        try:
            namespace(self.namespace)
        except ValueError as exc:
            raise SettingsError(f"namespace {exc}") from None
        if self.queue_type not in QUEUE_TYPES:
            raise SettingsError(f"queue type must be one of {', '.join(QUEUE_TYPES)}, got {self.queue_type!r:.80}")

    @property
    def amqp_urls(self) -> list[str]:
        """The broker's nodes. A URL after the first that names no user takes the
        first one's user and password, so a cluster's login is written once:
        `amqp://ci:SECRET@mq-1/%2F,amqp://mq-2/%2F,amqp://mq-3/%2F`."""
        urls = split_urls(self.amqp_url)
        first = urllib.parse.urlsplit(urls[0])
        login, at, _ = first.netloc.rpartition("@")
        if not at:
            return urls
        out = [urls[0]]
        for url in urls[1:]:
            parsed = urllib.parse.urlsplit(url)
            out.append(
                url
                if "@" in parsed.netloc
                else urllib.parse.urlunsplit(parsed._replace(netloc=f"{login}@{parsed.netloc}"))
            )
        return out

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> BrokerSettings:
        """Defaults, then VOLT_AMQP_URL, VOLT_NAMESPACE and VOLT_QUEUE_TYPE."""
        return cls.from_args(None, environ)

    @classmethod
    def from_args(cls, args: argparse.Namespace | None, environ: Mapping[str, str] | None = None) -> BrokerSettings:
        """Defaults, then VOLT_*, then --amqp-url, --namespace and --queue-type as given in `args`."""
        values = gather([o for o in COMMON_OPTIONS if o.field in BROKER_FIELDS], args, environ)
        return cls(**values)


def add_common_flags(parser: argparse.ArgumentParser) -> None:
    """Flags every `volt` sub-command takes."""
    add_options(parser, COMMON_OPTIONS)


def resolve_common(args: argparse.Namespace, quiet: bool = False, environ: Mapping[str, str] | None = None) -> None:
    """Put the common settings' values into `args` (flag, else VOLT_*, else
    default); `quiet` commands log only warnings by default."""
    for key, value in gather(COMMON_OPTIONS, args, environ, {"log_level": "WARNING"} if quiet else None).items():
        setattr(args, key, value)


def check_amqp_url(url: str) -> None:
    try:
        parsed = urllib.parse.urlsplit(url)
        _ = parsed.port  # raises ValueError unless the port is a number from 0 to 65535
    except ValueError:
        raise SettingsError(f"not an AMQP URL: {redact_url(url)}") from None
    if parsed.scheme not in ("amqp", "amqps") or not parsed.hostname:
        raise SettingsError(f"not an AMQP URL: {redact_url(url)}")


def check_amqp_urls(urls: list[str]) -> None:
    if len(urls) == 1:
        check_amqp_url(urls[0])
        return
    for n, url in enumerate(urls, 1):
        try:
            check_amqp_url(url)
        except SettingsError:
            # Not echoed: a piece of a list cut at a comma may be half a password.
            raise SettingsError(
                f"URL {n} of {len(urls)} is not an AMQP URL (a comma inside a password is written %2C)"
            ) from None


def redact_url(url: str) -> str:
    """The URL (or comma-separated URLs) with any password replaced, fit for logs
    and status output."""
    if "," in url:
        return ",".join(redact_url(u.strip()) for u in url.split(","))
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


# -- folders a worker writes -----------------------------------------------------


def writable_dir(folder: Path, flag: str) -> Path:
    """Make `folder` if needed and check that this process can write in it;
    SettingsError in one line otherwise (no traceback at the first write)."""
    import tempfile  # here: `volt notify`, run by git hooks, never needs it

    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise SettingsError(f"{flag} {folder}: cannot create it: {exc.strerror or exc}") from None
    try:
        # A real write, not os.access: that says yes to root on a read-only mount.
        with tempfile.TemporaryFile(dir=folder, prefix=".volt-probe-"):
            pass
    except OSError as exc:
        raise SettingsError(f"{flag} {folder}: cannot write in it: {exc.strerror or exc}") from None
    return folder
