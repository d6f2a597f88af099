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
- network: a namespace of its own, which holds only loopback; where the
  caller allows network (an environment's build, a test granted it), a
  user-mode network in it (runner/netbox.py, slirp4netns) reaches the
  outside world but never the host's own loopback services.

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


# The folder Volt CI keeps its state in by default (./.volt: runners' work
# folders, the dispatcher's store, the observer's state; `volt up`'s too).
STATE_FOLDER = ".volt"


def hidden_paths(workdir: Path, extra: Iterable[Path] = ()) -> list[Path]:
    """What no job may see: the runner's workdir (clones, outbox, other jobs'
    trees) and, when it lies in a Volt CI state folder, all of that folder
    (other runners' work folders, the dispatcher's store), the homes (keys,
    tokens, cookies), /run (local services' unix sockets), the host's scratch
    space, and the operator's own additions."""
    homes = [Path("/root"), Path("/home"), Path(os.path.expanduser("~"))]
    state = [workdir.parent] if workdir.parent.name == STATE_FOLDER else []
    return [workdir, *state, *homes, Path("/run"), Path("/var/run"), Path(TMPDIR), Path("/var/tmp"), *extra]


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
    bound = [tree, *map(_real, writable)]

    argv = [bwrap, "--die-with-parent", "--new-session", "--unshare-user", "--unshare-pid", "--unshare-ipc"]
    argv += ["--unshare-uts", "--unshare-cgroup-try", "--disable-userns", "--cap-drop", "ALL"]
    # Never the host's network namespace: its loopback holds the broker, the
    # store and the runner's own services. Network, where allowed, is plugged in.
    argv.append("--unshare-net")
    argv += ["--ro-bind", "/", "/", "--dev", "/dev", "--proc", "/proc"]
    for path in hidden:
        if not _inside_any(path, [p for p in hidden if p != path]):
            argv += _cover(path)
    for path in shown:
        argv += ["--ro-bind", str(path), str(path)]
    for path in bound:
        argv += ["--bind", str(path), str(path)]
    # A hidden path inside one shown again (a key inside an exposed folder) is hidden again.
    for path in hidden:
        if _inside_any(path, [p for p in [*shown, *bound] if p != path]):
            argv += _cover(path)
    argv += ["--dir", HOME, "--chdir", str(tree), "--clearenv"]
    for key, value in {**env, "HOME": HOME, "TMPDIR": TMPDIR}.items():
        argv += ["--setenv", key, value]
    launcher = [sys.executable, "-m", "runner.netbox"] if network else []
    return [*launcher, *argv, "--", *command]


def probe(bwrap: str = BWRAP) -> str | None:
    """None when bwrap runs a command in its box here, else one line saying why."""
    opt_out = "start the runner with --sandbox none to run tests without a sandbox"
    found = shutil.which(bwrap)
    if found is None:
        return f"no {bwrap} on PATH (install bubblewrap), or {opt_out}"
    for network in (False, True):
        with tempfile.TemporaryDirectory(prefix="volt-probe-") as tree:
            argv = wrap(["true"], Path(tree), {}, workdir=Path(tree), bwrap=found, network=network)
            try:
                done = subprocess.run(argv, stdin=subprocess.DEVNULL, capture_output=True, timeout=60)
            except (OSError, subprocess.TimeoutExpired) as exc:
                return f"{found} cannot run here ({exc}); {opt_out}"
        why = " ".join(done.stderr.decode(errors="replace").split())[:200] or f"exit code {done.returncode}"
        if done.returncode != 0 and not network:
            return f"{found} cannot create its namespaces here ({why}); {opt_out}"
        if done.returncode != 0:
            return (
                f"the box cannot have a network here ({why}): environment builds, and tests granted network, "
                f"reach the outside world through slirp4netns (it needs /dev/net/tun); install it, or {opt_out}"
            )
    return None


def _cover(path: Path) -> list[str]:
    """bwrap's options that hide `path`: a folder under an empty tmpfs, a file
    (a credentials file, say) under /dev/null, which reads empty (a tmpfs
    cannot cover a file, and bwrap would refuse to start)."""
    if path.is_dir():
        return ["--tmpfs", str(path)]
    return ["--dev-bind", "/dev/null", str(path)]


def _real(path: Path) -> Path:
    # Mount points must be real paths: bwrap mounts onto what a link points at.
    return Path(os.path.realpath(path))


def _inside_any(path: Path, outers: Iterable[Path]) -> bool:
    return any(path == outer or outer in path.parents for outer in outers)
