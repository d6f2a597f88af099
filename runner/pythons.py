"""The Pythons a runner offers its jobs: its own, and those it finds or is given.

A runner advertises each as a label (`python3.12`), so that the dispatcher sends
a job whose `.volt.toml` asks for `[env] python = "3.12"` only where it is.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import re
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Interpreter:
    version: str  # "3.12": what `[env] python` names and the runner's label says
    release: str  # "3.12.1"
    executable: Path  # the real interpreter: not a venv's link, not a pyenv shim
    prefix: Path  # its sys.base_prefix, which the box must show


_PROBE = (
    "import json, os, sys; print(json.dumps([list(sys.version_info[:3]), "
    "os.path.realpath(getattr(sys, '_base_executable', None) or sys.executable), sys.base_prefix]))"
)


def own_interpreter() -> Interpreter:
    """The interpreter the runner runs on (the base one, when the runner runs in a venv)."""
    major, minor, micro = sys.version_info[:3]
    base = getattr(sys, "_base_executable", None) or sys.executable
    return Interpreter(
        f"{major}.{minor}", f"{major}.{minor}.{micro}", Path(os.path.realpath(base)), Path(sys.base_prefix)
    )


def probe(*commands: str, timeout: float = 20.0) -> list[Interpreter | None]:
    """The interpreter each of `commands` starts, or None for one that does not
    (a pyenv shim for a version that is not active, say). All at once: a shim
    takes a good part of a second to say no."""
    procs: list[subprocess.Popen[str] | None] = []
    for command in commands:
        try:
            procs.append(
                subprocess.Popen(
                    [command, "-I", "-c", _PROBE],
                    stdin=subprocess.DEVNULL,
                    stdout=subprocess.PIPE,
                    stderr=subprocess.DEVNULL,
                    text=True,
                )
            )
        except OSError:
            procs.append(None)
    found: list[Interpreter | None] = []
    deadline = time.monotonic() + timeout
    for proc in procs:
        if proc is None:
            found.append(None)
            continue
        try:
            out, _ = proc.communicate(timeout=max(0.1, deadline - time.monotonic()))
            (major, minor, micro), executable, prefix = json.loads(out)
            ok = proc.returncode == 0
        except (subprocess.TimeoutExpired, ValueError, TypeError):
            proc.kill()
            proc.communicate()
            ok = False
        found.append(
            Interpreter(f"{major}.{minor}", f"{major}.{minor}.{micro}", Path(executable), Path(prefix)) if ok else None
        )
    return found


@functools.lru_cache(maxsize=8)
def find_pythons(wanted: tuple[str, ...] = (), path: str | None = None) -> dict[str, Interpreter]:
    """The Pythons this runner offers jobs, by version: its own, and either each
    of `wanted` (a version such as "3.12", found as python3.12 on PATH, or a
    path to an interpreter; ValueError for one that does not start) or, with
    none wanted, every python3.N program on PATH that starts and is 3.N."""
    found: dict[str, Interpreter] = {}
    search = os.environ.get("PATH", os.defpath) if path is None else path
    if wanted:
        commands = [
            (shutil.which(f"python{item}", path=search) or f"python{item}")
            if re.fullmatch(r"3\.\d{1,2}", item)
            else item
            for item in wanted
        ]
        for item, got in zip(wanted, probe(*commands), strict=True):
            if got is None or (re.fullmatch(r"3\.\d{1,2}", item) and got.version != item):
                what = f"no working python{item} on PATH; give its path instead" if "/" not in item else ""
                raise ValueError(what or f"{item} is not a Python interpreter that starts")
            found.setdefault(got.version, got)
    else:
        names: set[str] = set()
        for folder in search.split(os.pathsep):
            with contextlib.suppress(OSError):
                names.update(n for n in os.listdir(folder or ".") if re.fullmatch(r"python3\.\d{1,2}", n))
        # Programs only: a script of that name is a shim (pyenv's, asdf's) that
        # takes most of a second to start, or to say that version is not active.
        named = [n for n in sorted(names) if _is_program(shutil.which(n, path=search))]
        commands = [shutil.which(name, path=search) or name for name in named]
        for name, got in zip(named, probe(*commands), strict=True):
            if got is not None and f"python{got.version}" == name:
                found.setdefault(got.version, got)
    own = own_interpreter()
    found[own.version] = own  # the runner's own wins its version: it is known to work
    return dict(sorted(found.items(), key=lambda kv: [int(p) for p in kv[0].split(".")]))


def _is_program(command: str | None) -> bool:
    try:
        with open(os.path.realpath(command or ""), "rb") as f:
            return f.read(4) == b"\x7fELF"
    except OSError:
        return False
