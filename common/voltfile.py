"""A repository's `.volt.toml`: the part read before any runner sees the commit.

    [test]
    command = "make test"     # read by the runner (runner/execute.py)
    timeout = 600
    labels = ["linux", "gpu"] # only runners with every one of these take the job

The observer reads `labels` at each commit so the dispatcher can route the job
to a runner that has them.
"""

from __future__ import annotations

import tomllib
from typing import Any

from common.messages import check_labels

CONFIG_FILE = ".volt.toml"


class ConfigError(ValueError):
    """The repository's .volt.toml is unreadable or says something impossible."""


# Far above any real .volt.toml; a bigger one is read no further.
MAX_CONFIG_BYTES = 64 * 1024


def parse(text: str) -> dict[str, Any]:
    """The `[test]` table of a .volt.toml; ConfigError when it is broken, however
    it is broken: the file comes with the commit, so anything may be in it."""
    if len(text) > MAX_CONFIG_BYTES:  # characters: never more than its bytes
        raise ConfigError(f"{CONFIG_FILE} is larger than {MAX_CONFIG_BYTES // 1024} KiB")
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{CONFIG_FILE} is not valid TOML: {exc}") from None
    except RecursionError:  # tomllib recurses once per nesting level
        raise ConfigError(f"{CONFIG_FILE} is nested too deeply to read") from None
    except Exception as exc:  # noqa: BLE001 - no content may escape as anything but ConfigError
        raise ConfigError(f"{CONFIG_FILE} cannot be read: {type(exc).__name__}: {exc}"[:300]) from None
    section = data.get("test", {})
    if not isinstance(section, dict):
        raise ConfigError(f"{CONFIG_FILE}: [test] must be a table")
    return section


def labels_of(section: dict[str, Any]) -> list[str]:
    """The `[test] labels` list, sorted; ConfigError unless it is a list of labels."""
    raw = section.get("labels", [])
    # A list, as documented; a lone string is the job's error, not a guess at
    # what was meant (one label? several, split how?).
    if not isinstance(raw, list) or not all(isinstance(label, str) for label in raw):
        raise ConfigError(f"{CONFIG_FILE}: test.labels must be a list of strings")
    try:
        return sorted(set(check_labels(raw)))
    except ValueError as exc:
        raise ConfigError(f"{CONFIG_FILE}: test.labels: {exc}") from None


def required_labels(text: str | None) -> list[str]:
    """The labels a commit's .volt.toml asks for; none when there is no file.

    A broken file needs no labels here: the runner that checks it out reports
    what is wrong with it as the job's error.
    """
    if not text:
        return []
    try:
        return labels_of(parse(text))
    except ConfigError:
        return []
