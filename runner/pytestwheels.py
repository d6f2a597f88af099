"""Wheels made of the runner's own pytest, so every environment gets the runner's version without an index."""

from __future__ import annotations

import base64
import hashlib
import importlib.metadata
import re
import shutil
import subprocess
import uuid
import zipfile
from pathlib import Path

from runner.envplan import EnvError
from runner.pythons import Interpreter


def _canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _remove(path: Path) -> None:
    shutil.rmtree(path, ignore_errors=True)


def runner_wheels(root: Path, top: str, python: Interpreter) -> Path | None:
    """A folder of wheels made of the runner's own `top` and what it needs on
    `python`, made once per version; None when the runner cannot (something
    missing, or not pure Python). Wheels, not copies: uv installs them through
    the repository's cache like any other, and nothing links back to the
    runner's own files, which a build could otherwise write through.

    They carry their byte code, compiled by `python` and never checked against
    the sources (which cannot change in an environment the tests see read-only):
    pytest starts at full speed in every job, and no build compiles it again.
    """
    from packaging.markers import Marker
    from packaging.requirements import Requirement

    marker_env = {"python_version": python.version, "python_full_version": python.release, "extra": ""}
    todo, chosen = [top], {}
    while todo:
        name = _canonical(todo.pop())
        if name in chosen:
            continue
        try:
            dist = importlib.metadata.distribution(name)
        except importlib.metadata.PackageNotFoundError:
            return None
        if "Root-Is-Purelib: true" not in (dist.read_text("WHEEL") or "") or dist.files is None:
            return None
        chosen[name] = dist
        for text in dist.requires or []:
            req = Requirement(text)
            if req.marker is None or Marker(str(req.marker)).evaluate(marker_env):
                todo.append(req.name)
    label = "-".join([python.release, str(python.executable), *sorted(f"{n}{d.version}" for n, d in chosen.items())])
    folder = root / hashlib.sha256(label.encode()).hexdigest()[:16]
    if folder.is_dir():
        return folder
    root.mkdir(parents=True, exist_ok=True)
    tmp = root / f".new-{uuid.uuid4().hex[:8]}"
    try:
        for dist in chosen.values():
            _wheel_of(dist, tmp / "wheels", tmp / "stage" / _canonical(dist.metadata["Name"]), python)
        try:
            (tmp / "wheels").rename(folder)
        except OSError:  # another runner made it first
            if not folder.is_dir():
                raise
    finally:
        _remove(tmp)
    return folder


def _wheel_of(dist: importlib.metadata.Distribution, folder: Path, stage: Path, python: Interpreter) -> None:
    """An installed pure-Python distribution packed back into a wheel, with its byte code and a RECORD of its own."""
    name, version = dist.metadata["Name"], dist.version
    info = None
    for file in dist.files or []:
        parts = file.parts
        # Scripts are the installer's to make; the old byte code and records go.
        if parts[0] == ".." or "__pycache__" in parts or parts[-1] in ("RECORD", "INSTALLER", "REQUESTED"):
            continue
        if parts[-1] == "direct_url.json":
            continue
        target = stage.joinpath(*parts)
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(str(dist.locate_file(file)), target)
        if parts[0].endswith(".dist-info"):
            info = parts[0]
    if info is None:
        raise EnvError(f"the runner's {name} has no .dist-info to make a wheel of")
    compiled = subprocess.run(
        [
            str(python.executable),
            "-I",
            "-m",
            "compileall",
            "-q",
            "-j",
            "0",
            "--invalidation-mode",
            "unchecked-hash",
            str(stage),
        ],
        stdin=subprocess.DEVNULL,
        capture_output=True,
        timeout=300,
    )
    if compiled.returncode != 0:
        raise EnvError(f"cannot compile the runner's {name} for Python {python.release}")
    folder.mkdir(parents=True, exist_ok=True)
    record = []
    stem = f"{re.sub(r'[-_.]+', '_', name)}-{version}"
    with zipfile.ZipFile(folder / f"{stem}-py3-none-any.whl", "w", zipfile.ZIP_DEFLATED) as wheel:
        for path in sorted(p for p in stage.rglob("*") if p.is_file()):
            member = path.relative_to(stage).as_posix()
            data = path.read_bytes()
            wheel.writestr(member, data)
            digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
            record.append(f"{member},sha256={digest},{len(data)}")
        record.append(f"{info}/RECORD,,")
        wheel.writestr(f"{info}/RECORD", "\n".join(record) + "\n")
