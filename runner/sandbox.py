"""The box a test command runs in: bubblewrap, built from the host read-only.

`wrap()` turns a command into the argv that runs it under bwrap; `probe()`
says at start-up whether bwrap works here. Inside the box:

- the job's tree is writable, at the same path; everything else is read-only;
- /tmp is an empty tmpfs of its own, HOME and TMPDIR point into it;
- the runner's workdir, the home directories, /run (unix sockets of local
  services), the host's /tmp and /var/tmp, and whatever the caller adds are
  hidden under empty tmpfs; the Python interpreter's prefix, and paths the
  caller names, are shown again read-only;
- fresh /dev and /proc, its own PID namespace: it sees no process outside,
  and when bwrap goes (the job ended, or the runner killed bwrap's process
  group) the kernel kills everything inside, daemons and double forks too;
- its own session (no TIOCSTI into the runner's terminal), no capabilities,
  no further user namespaces, no new privileges;
- an environment built only from what the caller passes;
- network: loopback only, unless the caller allows it.

It does not protect against kernel exploits, and a runner running as root
runs its jobs as a root without capabilities (it can still read root's
files that stay visible, such as /etc/shadow): run the runner as its own user.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

BWRAP = "bwrap"
HOME = "/tmp/home"
TMPDIR = "/tmp"


def hidden_paths(workdir: Path, extra: Iterable[Path] = ()) -> list[Path]:
    """What no job may see: the runner's workdir (clones, outbox, other jobs'
    trees), the homes (keys, tokens, cookies), /run (local services' unix
    sockets), the host's scratch space, and the operator's own additions."""
    homes = [Path("/root"), Path("/home"), Path(os.path.expanduser("~"))]
    return [workdir, *homes, Path("/run"), Path("/var/run"), Path(TMPDIR), Path("/var/tmp"), *extra]


def wrap(
    command: Sequence[str],
    tree: Path,
    env: Mapping[str, str],
    *,
    workdir: Path,
    hide: Iterable[Path] = (),
    expose: Iterable[Path] = (),
    writable: Iterable[Path] = (),
    network: bool = False,
    bwrap: str = BWRAP,
) -> list[str]:
    """The argv that runs `command` in `tree` under bwrap with exactly `env`
    (plus HOME and TMPDIR, which the box sets).

    `hidden_paths(workdir, hide)` are covered by empty tmpfs (one that does
    not exist is skipped); then `expose` is shown again read-only and `tree`
    and `writable` read-write, each at its own path (these must exist).
    """
    tree = _real(tree)
    # "/" (the home of some service users) would hide everything there is.
    hidden = sorted({_real(p) for p in hidden_paths(workdir, hide) if os.path.lexists(p)} - {Path("/")})
    shown = [_real(p) for p in expose]
    # The interpreter must keep working when it lives in a hidden place (here
    # ~/.pyenv, or a runner installed under /tmp): shown again read-only, as
    # visible as it would be anywhere else. A prefix outside every hidden path
    # is visible already, and binding it again would uncover what is hidden
    # beneath it.
    for prefix in {_real(Path(sys.base_prefix)), _real(Path(sys.prefix))}:
        if _inside_any(prefix, hidden):
            shown.append(prefix)
    if network:
        # /etc/resolv.conf is often a link into /run (systemd-resolved).
        resolv = _real(Path("/etc/resolv.conf"))
        if resolv.exists() and _inside_any(resolv, hidden):
            shown.append(resolv)
    bound = [tree, *map(_real, writable)]

    argv = [bwrap, "--die-with-parent", "--new-session", "--unshare-user", "--unshare-pid", "--unshare-ipc"]
    argv += ["--unshare-uts", "--unshare-cgroup-try", "--disable-userns", "--cap-drop", "ALL"]
    if not network:
        argv.append("--unshare-net")  # a network namespace of its own holds only loopback
    argv += ["--ro-bind", "/", "/", "--dev", "/dev", "--proc", "/proc"]
    for path in hidden:
        if not _inside_any(path, [p for p in hidden if p != path]):
            argv += ["--tmpfs", str(path)]
    for path in shown:
        argv += ["--ro-bind", str(path), str(path)]
    for path in bound:
        argv += ["--bind", str(path), str(path)]
    # A hidden path inside one shown again (a key inside an exposed folder) is hidden again.
    for path in hidden:
        if _inside_any(path, [p for p in [*shown, *bound] if p != path]):
            argv += ["--tmpfs", str(path)]
    argv += ["--dir", HOME, "--chdir", str(tree), "--clearenv"]
    for key, value in {**env, "HOME": HOME, "TMPDIR": TMPDIR}.items():
        argv += ["--setenv", key, value]
    return [*argv, "--", *command]


def probe(bwrap: str = BWRAP) -> str | None:
    """None when bwrap runs a command in its box here, else one line saying why."""
    opt_out = "start the runner with --sandbox none to run tests without a sandbox"
    found = shutil.which(bwrap)
    if found is None:
        return f"no {bwrap} on PATH (install bubblewrap), or {opt_out}"
    with tempfile.TemporaryDirectory(prefix="volt-probe-") as tree:
        argv = wrap(["true"], Path(tree), {}, workdir=Path(tree), bwrap=found)
        try:
            done = subprocess.run(argv, stdin=subprocess.DEVNULL, capture_output=True, timeout=30)
        except (OSError, subprocess.TimeoutExpired) as exc:
            return f"{found} cannot run here ({exc}); {opt_out}"
    if done.returncode != 0:
        why = " ".join(done.stderr.decode(errors="replace").split())[:200] or f"exit code {done.returncode}"
        return f"{found} cannot create its namespaces here ({why}); {opt_out}"
    return None


def _real(path: Path) -> Path:
    # Mount points must be real paths: bwrap mounts onto what a link points at.
    return Path(os.path.realpath(path))


def _inside_any(path: Path, outers: Iterable[Path]) -> bool:
    return any(path == outer or outer in path.parents for outer in outers)
