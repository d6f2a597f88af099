"""Python projects and wheels made on the spot, so environment tests need no package index.

A project here builds with `voltbuild`, a PEP 517 backend that lives in the
project's own tree (`backend-path`) and needs nothing installed: uv can build
it with no index at all. Its dependencies are wheels written into a folder that
uv reads through UV_FIND_LINKS, with UV_OFFLINE set.
"""

from __future__ import annotations

import base64
import hashlib
import zipfile
from pathlib import Path

# A build backend of the standard library only. `[tool.voltbuild] editable =
# false` leaves out build_editable, as some real backends do.
BACKEND = """\
import base64, hashlib, os, tomllib, zipfile

def _project():
    with open("pyproject.toml", "rb") as f:
        data = tomllib.load(f)
    return data["project"], data.get("tool", {}).get("voltbuild", {})

def _metadata(p):
    lines = ["Metadata-Version: 2.1", "Name: " + p["name"], "Version: " + p["version"]]
    lines += ["Requires-Dist: " + r for r in p.get("dependencies", [])]
    for extra, reqs in p.get("optional-dependencies", {}).items():
        lines.append("Provides-Extra: " + extra)
        lines += ["Requires-Dist: %s ; extra == '%s'" % (r, extra) for r in reqs]
    return "\\n".join(lines) + "\\n"

def _wheel(directory, files):
    p, _ = _project()
    dist, version = p["name"].replace("-", "_"), p["version"]
    info = "%s-%s.dist-info" % (dist, version)
    files = dict(files)
    files[info + "/METADATA"] = _metadata(p)
    files[info + "/WHEEL"] = "Wheel-Version: 1.0\\nGenerator: voltbuild\\nRoot-Is-Purelib: true\\nTag: py3-none-any\\n"
    name = "%s-%s-py3-none-any.whl" % (dist, version)
    record = []
    with zipfile.ZipFile(os.path.join(directory, name), "w") as z:
        for path, text in files.items():
            data = text.encode()
            z.writestr(path, data)
            digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
            record.append("%s,sha256=%s,%d" % (path, digest, len(data)))
        record.append(info + "/RECORD,,")
        z.writestr(info + "/RECORD", "\\n".join(record) + "\\n")
    return name

def build_wheel(wheel_directory, config_settings=None, metadata_directory=None):
    files = {}
    for root, _, names in os.walk("src"):
        for n in names:
            if n.endswith(".py"):
                full = os.path.join(root, n)
                files[os.path.relpath(full, "src")] = open(full).read()
    return _wheel(wheel_directory, files)

def _build_editable(wheel_directory, config_settings=None, metadata_directory=None):
    p, _ = _project()
    return _wheel(wheel_directory, {"_%s_editable.pth" % p["name"].replace("-", "_"): os.path.abspath("src") + "\\n"})

if _project()[1].get("editable", True):
    build_editable = _build_editable
"""


def wheel(folder: Path, name: str, version: str, files: dict[str, str], requires: tuple[str, ...] = ()) -> Path:
    """Write a pure-Python wheel of `files` (path -> text) into `folder`."""
    folder.mkdir(parents=True, exist_ok=True)
    dist = name.replace("-", "_")
    info = f"{dist}-{version}.dist-info"
    content = dict(files)
    content[f"{info}/METADATA"] = "\n".join(
        ["Metadata-Version: 2.1", f"Name: {name}", f"Version: {version}", *[f"Requires-Dist: {r}" for r in requires]]
    )
    content[f"{info}/WHEEL"] = "Wheel-Version: 1.0\nGenerator: volt-test\nRoot-Is-Purelib: true\nTag: py3-none-any\n"
    path = folder / f"{dist}-{version}-py3-none-any.whl"
    record = []
    with zipfile.ZipFile(path, "w") as z:
        for member, text in content.items():
            data = text.encode()
            z.writestr(member, data)
            digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
            record.append(f"{member},sha256={digest},{len(data)}")
        record.append(f"{info}/RECORD,,")
        z.writestr(f"{info}/RECORD", "\n".join(record) + "\n")
    return path


def project(
    name: str = "app",
    dependencies: tuple[str, ...] = (),
    *,
    extras: dict[str, list[str]] | None = None,
    groups: dict[str, list[str]] | None = None,
    editable_backend: bool = True,
    code: str = "from depone import VALUE\n",
    tests: dict[str, str] | None = None,
) -> dict[str, str]:
    """The files of a project that builds with voltbuild: pyproject.toml, src/<name>, tests."""
    lines = [
        "[build-system]",
        "requires = []",
        'build-backend = "voltbuild"',
        'backend-path = ["_build"]',
        "",
        "[project]",
        f'name = "{name}"',
        'version = "0.1"',
        f"dependencies = {list(dependencies)!r}",
    ]
    if extras:
        lines += ["", "[project.optional-dependencies]", *[f"{k} = {v!r}" for k, v in extras.items()]]
    if groups:
        lines += ["", "[dependency-groups]", *[f"{k} = {v!r}" for k, v in groups.items()]]
    if not editable_backend:
        lines += ["", "[tool.voltbuild]", "editable = false"]
    files = {
        "pyproject.toml": "\n".join(lines) + "\n",
        "_build/voltbuild.py": BACKEND,
        f"src/{name}/__init__.py": code,
    }
    files.update(
        tests
        if tests is not None
        else {"tests/test_app.py": f"from {name} import VALUE\n\ndef test_value():\n    assert VALUE == 42\n"}
    )
    return files


def dependency_wheels(folder: Path) -> Path:
    """A wheelhouse with `depone` (VALUE = 42) and `deptwo` (which needs depone)."""
    wheel(folder, "depone", "1.0", {"depone/__init__.py": "VALUE = 42\n"})
    wheel(folder, "deptwo", "1.0", {"deptwo/__init__.py": "from depone import VALUE as V\n"}, requires=("depone>=1",))
    return folder
