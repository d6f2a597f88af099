"""What a job's environment holds, decided from the commit's files and `[env]`, and the key it is cached under.

By default: the project itself (editable unless `[env] editable = false`),
its test dependencies from the first of these it has: a dependency group
`test`/`tests`/`dev`, an extra `test`/`tests`/`testing`,
`requirements-test.txt`, `requirements-dev.txt`, `test-requirements.txt`,
`requirements/test.txt` (or what `[env]` names instead), its
`requirements.txt`, and `[env] install`. With a `uv.lock` the project and its
groups come from the lock (`uv sync --locked`).

Nothing here runs anything: the files are read by the runner, never through a
link out of the tree, and a commit's file says only what it may (see
`_INSTALL_OPTIONS`).
"""

from __future__ import annotations

import configparser
import contextlib
import hashlib
import importlib.metadata
import json
import os
import platform
import re
import sys
import tomllib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from common.voltfile import ConfigError, EnvSpec
from runner.execute import read_tree_file
from runner.pythons import Interpreter

ENV_FORMAT = "1"  # bump when what an environment holds changes, so old ones are not reused
PROJECT_FILES = ("pyproject.toml", "setup.py", "setup.cfg")
TEST_GROUPS = ("test", "tests", "dev")
TEST_EXTRAS = ("test", "tests", "testing")
TEST_REQUIREMENTS = ("requirements-test.txt", "requirements-dev.txt", "test-requirements.txt", "requirements/test.txt")
MAX_FILE_BYTES = 16 * 1024 * 1024  # a uv.lock of a large project is a few MiB
MAX_FILES = 200
# `[env] install` options uv may get from a commit: what changes which
# packages are picked, never where uv writes or which Python it changes.
_INSTALL_OPTIONS = frozenset(
    {
        "--pre",
        "--prerelease",
        "--resolution",
        "--upgrade",
        "-U",
        "--upgrade-package",
        "-P",
        "--index",
        "--index-url",
        "-i",
        "--default-index",
        "--extra-index-url",
        "--index-strategy",
        "--find-links",
        "-f",
        "--no-binary",
        "--only-binary",
        "--no-build-isolation",
        "--no-build-isolation-package",
        "--config-settings",
        "-C",
        "--editable",
        "-e",
        "--requirement",
        "-r",
        "--constraint",
        "-c",
        "--override",
        "--no-sources",
    }
)
_TAKES_VALUE = _INSTALL_OPTIONS - {"--pre", "--upgrade", "-U", "--no-build-isolation", "--no-sources"}
_INCLUDE = re.compile(r"^\s*(?:-r|-c|--requirement|--constraint)(?:\s*=\s*|\s+)(\S+)", re.MULTILINE)


class EnvError(Exception):
    """The environment cannot be had; the message (after `environment: `) says why in one line."""


@dataclass(frozen=True)
class Plan:
    """What a job's environment is made of, and the key it is cached under."""

    key: str
    repo: str
    python: Interpreter
    project: bool  # the tree is a project to install
    editable: bool
    locked: bool  # from uv.lock, with `uv sync --locked`
    groups: tuple[str, ...]
    extras: tuple[str, ...]
    requirements: tuple[str, ...]  # files, relative to the tree
    install: tuple[str, ...]  # more `uv pip install` arguments
    pytest: str  # the runner's pytest version, put in unless the project brings its own
    name: str = ""  # the project's distribution name, when its files say it

    def describe(self) -> str:
        parts = []
        if self.project:
            parts.append(
                "the project" + (" (editable)" if self.editable else "") + (" from uv.lock" if self.locked else "")
            )
        parts += [f"group {g}" for g in self.groups] + [f"extra {e}" for e in self.extras]
        parts += list(self.requirements)
        if self.install:
            parts.append("install " + " ".join(self.install))
        parts.append(f"pytest (the project's, else the runner's {self.pytest})")
        return ", ".join(parts)


def is_python_project(tree: Path) -> bool:
    """Whether the tree's root has what marks a Python project."""
    return any((tree / name).exists() for name in PROJECT_FILES) or any(tree.glob("requirements*.txt"))


def plan(
    tree: Path,
    spec: EnvSpec,
    *,
    repo: str,
    python: Interpreter,
    uv_settings: Mapping[str, str] | None = None,
) -> Plan:
    """Decide what the environment of `tree` holds; EnvError when its files say something impossible."""
    files = _defining_files(tree, spec)
    pyproject = _toml(files.get("pyproject.toml"), "pyproject.toml")
    installable = "setup.py" in files or "project" in pyproject or "build-system" in pyproject
    if "setup.cfg" in files and "pyproject.toml" not in files and "setup.py" not in files:
        installable = "[metadata]" in files["setup.cfg"].decode("utf-8", "replace")
    groups, extras = spec.groups, spec.extras
    requirements = tuple(os.path.normpath(n) for n in spec.requirements)
    if not spec.chooses_test_deps:
        groups, extras, requirements = _test_dependencies(pyproject, files, installable)
    if "requirements.txt" in files and "requirements.txt" not in requirements:
        requirements = ("requirements.txt", *requirements)
    for name in requirements:
        if name not in files:
            raise EnvError(f"{name} (in [env] requirements) is not in the repository")
    if extras and not installable:
        raise EnvError(f"extra {extras[0]} asked for, but the repository is no project to install")
    declared = set(pyproject.get("dependency-groups", {}))
    missing = [g for g in groups if g not in declared]
    if missing:
        raise EnvError(f"dependency group {missing[0]} is not in pyproject.toml [dependency-groups]")
    _check_install(spec.install)
    pytest_version = importlib.metadata.version("pytest")
    digest = hashlib.sha256()
    for part in (
        ENV_FORMAT,
        repo,
        python.release,
        str(python.executable),
        sys.platform,
        platform.machine(),
        "-".join(platform.libc_ver()),
        pytest_version,
        spec.canonical(),
        json.dumps(sorted((uv_settings or {}).items())),
    ):
        digest.update(part.encode() + b"\0")
    for name in sorted(files):
        digest.update(name.encode() + b"\0" + hashlib.sha256(files[name]).digest())
    return Plan(
        key=digest.hexdigest()[:24],
        repo=repo,
        python=python,
        project=installable,
        editable=spec.editable and installable,
        locked=installable and "uv.lock" in files and "project" in pyproject,
        groups=groups,
        extras=extras,
        requirements=requirements,
        install=spec.install,
        pytest=pytest_version,
        name=_project_name(pyproject, files),
    )


def _project_name(pyproject: dict[str, Any], files: Mapping[str, bytes]) -> str:
    """The name in [project] or setup.cfg's [metadata]; "" when only setup.py knows it."""
    name = pyproject.get("project", {}).get("name", "")
    if not name and "setup.cfg" in files:
        cfg = configparser.ConfigParser(interpolation=None)
        with contextlib.suppress(configparser.Error, UnicodeDecodeError):
            cfg.read_string(files["setup.cfg"].decode())
            name = cfg.get("metadata", "name", fallback="")
    return name if isinstance(name, str) and re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", name) else ""


def _test_dependencies(
    pyproject: dict[str, Any], files: Mapping[str, bytes], installable: bool
) -> tuple[tuple[str, ...], tuple[str, ...], tuple[str, ...]]:
    """The first of: a test dependency group, a test extra, a test requirements file."""
    groups = pyproject.get("dependency-groups", {})
    for name in TEST_GROUPS:
        if name in groups:
            return (name,), (), ()
    if installable:
        extras = set(pyproject.get("project", {}).get("optional-dependencies", {}))
        if "setup.cfg" in files:
            cfg = configparser.ConfigParser(interpolation=None)
            with contextlib.suppress(configparser.Error, UnicodeDecodeError):
                cfg.read_string(files["setup.cfg"].decode())
                extras |= set(cfg["options.extras_require"]) if cfg.has_section("options.extras_require") else set()
        for name in TEST_EXTRAS:
            if name in extras:
                return (), (name,), ()
    for name in TEST_REQUIREMENTS:
        if name in files:
            return (), (), (name,)
    return (), (), ()


def _check_install(arguments: Sequence[str]) -> None:
    expect_value = False
    for arg in arguments:
        if expect_value:
            expect_value = False
            continue
        if arg.startswith("-"):
            option = arg.split("=", 1)[0]
            if option not in _INSTALL_OPTIONS:
                raise EnvError(f"[env] install: uv pip option {option} is not allowed here")
            expect_value = option in _TAKES_VALUE and "=" not in arg


def _defining_files(tree: Path, spec: EnvSpec) -> dict[str, bytes]:
    """The files that define the environment, by path in the tree, and what they hold."""
    names = [n for n in (*PROJECT_FILES, "uv.lock") if (tree / n).exists() or (tree / n).is_symlink()]
    names += sorted(p.name for p in tree.glob("requirements*.txt"))
    names += sorted(f"requirements/{p.name}" for p in tree.glob("requirements/*.txt"))
    names += [os.path.normpath(n) for n in spec.requirements]
    files: dict[str, bytes] = {}
    while names:
        name = names.pop(0)
        if name in files:
            continue
        if len(files) >= MAX_FILES:
            raise EnvError(f"more than {MAX_FILES} files define the environment")
        files[name] = data = _read(tree, name)
        if name not in (*PROJECT_FILES, "uv.lock"):
            # A requirements file may include others; they define the environment too.
            base = os.path.dirname(name)
            for include in _INCLUDE.findall(data.decode("utf-8", "replace")):
                if "://" not in include:
                    names.append(os.path.normpath(os.path.join(base, include)))
    return files


def _read(tree: Path, name: str) -> bytes:
    real_tree = Path(os.path.realpath(tree))
    path = Path(os.path.realpath(tree / name))
    if real_tree not in path.parents:
        raise EnvError(f"{name} is not a file inside the repository")
    try:
        text = read_tree_file(path, MAX_FILE_BYTES)
    except ConfigError as exc:
        raise EnvError(str(exc)) from None
    except OSError as exc:
        raise EnvError(f"cannot read {name}: {exc.strerror or exc}") from None
    if text is None:
        raise EnvError(f"{name} is not in the repository")
    return text.encode()


def _toml(data: bytes | None, name: str) -> dict[str, Any]:
    if data is None:
        return {}
    try:
        return tomllib.loads(data.decode())
    except (tomllib.TOMLDecodeError, UnicodeDecodeError, RecursionError) as exc:
        raise EnvError(f"{name} is not valid TOML: {' '.join(str(exc).split())[:200]}") from None
