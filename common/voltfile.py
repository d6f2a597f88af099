"""A repository's `.volt.toml`: the part read before any runner sees the commit.

    [test]
    command = "make test"     # read by the runner (runner/execute.py)
    timeout = 600
    labels = ["linux", "gpu"] # only runners with every one of these take the job
    split = 4                 # run the pytest suite on up to 4 runners at once
    rerun_failures = 1        # run a failing test again; failed-then-passed is flaky

    [env]                     # the job's Python environment (runner/environments.py)
    python = "3.12"           # only runners that have Python 3.12 take the job
    extras = ["test"]         # instead of the test dependencies found by default
    groups = ["test"]
    requirements = ["ci/requirements.txt"]
    install = ["pytest-xdist"]  # more `uv pip install` arguments
    editable = true
    system = false            # true: the runner's own interpreter, no environment

    [checkout]
    submodules = true

The observer reads what the job asks of the dispatcher at each commit
(`required_asks`): the runner labels, so the job goes to a runner that has
them (`[test] labels`, plus `python3.12` for `[env] python = "3.12"` and
`system-python` for `system = true`), and `split` and `rerun_failures`, which
make the job a split run (dispatcher/runs.py).
"""

from __future__ import annotations

import json
import re
import tomllib
from dataclasses import asdict, dataclass
from typing import Any

from common.messages import check_labels, check_split

CONFIG_FILE = ".volt.toml"

# The labels a runner advertises for what it has, and a commit asks for.
SYSTEM_PYTHON_LABEL = "system-python"


def python_label(version: str) -> str:
    """`python3.12`: the label of a runner that has Python 3.12."""
    return f"python{version}"


class ConfigError(ValueError):
    """The repository's .volt.toml is unreadable or says something impossible."""


# Far above any real .volt.toml; a bigger one is read no further.
MAX_CONFIG_BYTES = 64 * 1024

_PYTHON = re.compile(r"3\.\d{1,2}")
# Extra and group names as PEP 685 and PEP 735 spell them.
_NAME = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9._-]{0,98}[A-Za-z0-9])?")
_ENV_KEYS = {"python", "install", "requirements", "extras", "groups", "editable", "system"}
_MAX_ITEMS = 100


@dataclass(frozen=True)
class EnvSpec:
    """`[env]`: what the job's environment is made of, beyond what the project declares."""

    python: str | None = None
    install: tuple[str, ...] = ()
    requirements: tuple[str, ...] = ()
    extras: tuple[str, ...] = ()
    groups: tuple[str, ...] = ()
    editable: bool = True
    system: bool = False

    def canonical(self) -> str:
        """One spelling of the table, for the environment's cache key."""
        return json.dumps(asdict(self), sort_keys=True)

    @property
    def chooses_test_deps(self) -> bool:
        """Whether it names the test dependencies itself (then none are looked for)."""
        return bool(self.requirements or self.extras or self.groups)


@dataclass(frozen=True)
class CheckoutSpec:
    """`[checkout]`: how the commit's tree is made."""

    submodules: bool = True


def tables(text: str) -> dict[str, Any]:
    """The whole .volt.toml; ConfigError when it is broken, however it is broken:
    the file comes with the commit, so anything may be in it."""
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
    for name in ("test", "env", "checkout"):
        if not isinstance(data.get(name, {}), dict):
            raise ConfigError(f"{CONFIG_FILE}: [{name}] must be a table")
    return data


def parse(text: str) -> dict[str, Any]:
    """The `[test]` table of a .volt.toml; ConfigError when the file is broken."""
    section: dict[str, Any] = tables(text).get("test", {})
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


def env_of(data: dict[str, Any]) -> EnvSpec:
    """The `[env]` table of the whole file (from `tables`), checked."""
    raw: dict[str, Any] = data.get("env", {})
    unknown = sorted(set(raw) - _ENV_KEYS)
    if unknown:
        raise ConfigError(f"{CONFIG_FILE}: [env] has no setting {unknown[0]!r} (it has {', '.join(sorted(_ENV_KEYS))})")
    python = raw.get("python")
    if python is not None and (not isinstance(python, str) or not _PYTHON.fullmatch(python)):
        raise ConfigError(f'{CONFIG_FILE}: env.python must be a version such as "3.12", got {python!r:.40}')
    for key in ("editable", "system"):
        if not isinstance(raw.get(key, False), bool):
            raise ConfigError(f"{CONFIG_FILE}: env.{key} must be true or false")
    spec = EnvSpec(
        python=python,
        install=_strings(raw, "install", _argument),
        requirements=_strings(raw, "requirements", _relative_path),
        extras=_strings(raw, "extras", _name),
        groups=_strings(raw, "groups", _name),
        editable=raw.get("editable", True),
        system=raw.get("system", False),
    )
    if spec.system and (spec.install or spec.chooses_test_deps or spec.python):
        raise ConfigError(
            f"{CONFIG_FILE}: env.system = true uses the runner's interpreter as it is: nothing to install"
        )
    return spec


def checkout_of(data: dict[str, Any]) -> CheckoutSpec:
    """The `[checkout]` table of the whole file (from `tables`), checked."""
    raw: dict[str, Any] = data.get("checkout", {})
    unknown = sorted(set(raw) - {"submodules"})
    if unknown:
        raise ConfigError(f"{CONFIG_FILE}: [checkout] has no setting {unknown[0]!r} (it has submodules)")
    submodules = raw.get("submodules", True)
    if not isinstance(submodules, bool):
        raise ConfigError(f"{CONFIG_FILE}: checkout.submodules must be true or false")
    return CheckoutSpec(submodules=submodules)


def env_labels(spec: EnvSpec) -> list[str]:
    """The runner labels an `[env]` table needs."""
    if spec.system:
        return [SYSTEM_PYTHON_LABEL]
    return [python_label(spec.python)] if spec.python else []


@dataclass(frozen=True)
class Asks:
    """What a commit's job asks of the dispatcher: runners with these labels,
    and how its suite is run (`[test] split`, `[test] rerun_failures`)."""

    labels: tuple[str, ...] = ()
    split: int = 1
    rerun_failures: int = 0

    @property
    def is_run(self) -> bool:
        """Whether the job runs as a split run (shards pulling chunks of tests)."""
        return self.split > 1 or self.rerun_failures > 0


def split_of(section: dict[str, Any]) -> tuple[int, int]:
    """`[test] split` and `rerun_failures`, checked; they need the default
    command (pytest), since only its tests can be handed out one by one."""
    split, reruns = section.get("split", 1), section.get("rerun_failures", 0)
    try:
        check_split(split, reruns)
    except ValueError as exc:
        raise ConfigError(f"{CONFIG_FILE}: test.{exc}") from None
    if (split > 1 or reruns > 0) and "command" in section:
        raise ConfigError(f"{CONFIG_FILE}: test.split and test.rerun_failures work with pytest, not a test.command")
    return split, reruns


def needed_asks(text: str) -> Asks:
    """What a .volt.toml asks for; ConfigError when it is broken."""
    data = tables(text)
    section = data.get("test", {})
    split, reruns = split_of(section)
    labels = sorted({*labels_of(section), *env_labels(env_of(data))})
    return Asks(tuple(labels), split, reruns)


def needed_labels(text: str) -> list[str]:
    """The labels a .volt.toml asks for, sorted; ConfigError when it is broken."""
    return list(needed_asks(text).labels)


def required_asks(text: str | None) -> Asks:
    """What a commit's .volt.toml asks for; nothing when there is no file.

    A broken file asks for nothing here: the runner that checks it out
    reports what is wrong with it as the job's error.
    """
    if not text:
        return Asks()
    try:
        return needed_asks(text)
    except ConfigError:
        return Asks()


def required_labels(text: str | None) -> list[str]:
    """The labels a commit's .volt.toml asks for; none when there is no file or it is broken."""
    return list(required_asks(text).labels)


def _strings(raw: dict[str, Any], key: str, check: Any) -> tuple[str, ...]:
    value = raw.get(key, [])
    if not isinstance(value, list) or not all(isinstance(item, str) for item in value):
        raise ConfigError(f"{CONFIG_FILE}: env.{key} must be a list of strings")
    if len(value) > _MAX_ITEMS:
        raise ConfigError(f"{CONFIG_FILE}: env.{key} has more than {_MAX_ITEMS} items")
    for item in value:
        why = check(item)
        if why:
            raise ConfigError(f"{CONFIG_FILE}: env.{key}: {why}: {item!r:.80}")
    return tuple(value)


def _argument(item: str) -> str | None:
    if not item or len(item) > 1000 or any(c in item for c in "\0\n\r"):
        return "not one argument"
    return None


def _relative_path(item: str) -> str | None:
    parts = item.replace("\\", "/").split("/")
    if not item or item.startswith("/") or "\0" in item or ".." in parts or item.startswith("-"):
        return "not a path inside the repository"
    return None


def _name(item: str) -> str | None:
    return None if _NAME.fullmatch(item) else "not an extra or group name"
