"""A box with the outside world's network but none of the host's own services.

`python -m runner.netbox BWRAP_ARGV...` runs bwrap (whose argv runner/sandbox.py
built, with a network namespace of its own, which holds only loopback), and
plugs slirp4netns into that namespace before the command starts: a user-mode
network, NAT'd through the runner's sockets, that reaches the index, git
hosts and the internet, and refuses the host's loopback (RabbitMQ's guest
login, PostgreSQL's trust, the results page and the observer's receiver all
listen there). The box's /etc/resolv.conf names slirp4netns' DNS forwarder.

It runs in the job's process group, so a time limit's SIGTERM and SIGKILL
reach it as they reach bwrap; bwrap dies with it (--die-with-parent), and
slirp4netns once its exit pipe closes. It exits as bwrap did.
"""

from __future__ import annotations

import fcntl
import json
import os
import select
import signal
import subprocess
import sys
import time
from pathlib import Path

SLIRP = "slirp4netns"
# slirp4netns' defaults: the box's address is 10.0.2.100, its DNS forwarder 10.0.2.3.
RESOLV_CONF = b"nameserver 10.0.2.3\n"
# ioctl(2) on a namespace's file: a file descriptor of the user namespace that owns it.
NS_GET_USERNS = 0xB701
# How many times to try to set a box up before its command begins.
ATTEMPTS = 3
# How long the network may take to come up.
READY_WITHIN = 20.0
# The box's first program: it says bwrap is done setting the box up (its
# loopback too: slirp4netns, started before that, tripped it up now and then:
# "Failed RTM_NEWADDR"), waits for the network, then becomes the command. Not bwrap's --block-fd:
# bwrap's child goes on when that pipe closes unwritten (this process killed,
# or giving up), and would run the command with nobody watching, outside the
# job's process group. The gate gives up instead.
GATE = (
    "import os, sys\n"
    "os.write(int(sys.argv[1]), b'1')\n"
    "os.close(int(sys.argv[1]))\n"
    "fd = int(sys.argv[2])\n"
    "go = os.read(fd, 2)\n"
    "os.close(fd)\n"
    "if go != b'go':\n"
    "    sys.exit(125)\n"
    "try:\n"
    "    os.execvp(sys.argv[3], sys.argv[3:])\n"
    "except OSError as exc:\n"
    "    sys.exit(f'volt: cannot run {sys.argv[3]}: {exc.strerror}')\n"
)
# The exit code when the box could not be given its network (bwrap uses 1; 125 is the
# convention of tools that run commands, such as env and timeout, for their own failure).
NO_NETWORK = 125


def main(argv: list[str]) -> int:
    if "--" not in argv:
        print("usage: python -m runner.netbox BWRAP [OPTION...] -- COMMAND...", file=sys.stderr)
        return 2
    for attempt in range(1, ATTEMPTS + 1):
        code = _attempt(argv, last=attempt == ATTEMPTS)
        if code is not None:
            return code
        # Nothing of the command ran yet: bwrap failed to set the box up, or slirp4netns the network.
        print(f"volt: the box did not come up (attempt {attempt}); again", file=sys.stderr, flush=True)
    return NO_NETWORK


def _attempt(argv: list[str], last: bool) -> int | None:
    """The command's exit code; None when the box failed before the command began."""
    cut = argv.index("--")
    info_r, info_w = os.pipe()  # bwrap says its child's pid
    set_r, set_w = os.pipe()  # the gate says the box is set up
    gate_r, gate_w = os.pipe()  # the gate waits on it before the command
    resolv_r, resolv_w = os.pipe()  # what /etc/resolv.conf holds in the box
    exit_r, exit_w = os.pipe()  # slirp4netns ends when this closes
    os.write(resolv_w, RESOLV_CONF)
    os.close(resolv_w)
    options = ["--info-fd", str(info_w), "--ro-bind-data", str(resolv_r), _resolv_conf()]
    gate = ["--", sys.executable, "-I", "-S", "-c", GATE, str(set_w), str(gate_r)]
    passed = (info_w, set_w, gate_r, resolv_r)
    box = subprocess.Popen([*argv[:cut], *options, *gate, *argv[cut + 1 :]], pass_fds=passed)
    for fd in passed:
        os.close(fd)
    slirp: subprocess.Popen[bytes] | None = None
    try:
        pid = _child_pid(info_r)
        set_up = _said(set_r, box)
        if pid is None or not set_up:
            try:
                box.wait(timeout=5)  # bwrap failed before the gate began (it said why), and ends
            except subprocess.TimeoutExpired:
                return _fail(box, "bwrap did not set the box up in time", last)
            return _given_up(box, last)
        try:
            net, owner = _namespaces(pid)
        except OSError as exc:
            return _fail(box, f"cannot open the box's network namespace: {exc.strerror or exc}", last)
        ready_r, ready_w = os.pipe()
        try:
            slirp = subprocess.Popen(
                [SLIRP, "--configure", "--mtu=65520", "--disable-host-loopback", "--ready-fd", str(ready_w)]
                + ["--exit-fd", str(exit_r), "--netns-type=path", "--userns-path", f"/proc/self/fd/{owner}"]
                + [f"/proc/self/fd/{net}", "tap0"],
                pass_fds=(ready_w, exit_r, net, owner),
                stdout=subprocess.DEVNULL,
                stderr=subprocess.PIPE,
            )
        except OSError as exc:
            return _fail(box, f"cannot start {SLIRP} ({exc.strerror or exc}): is it installed?", last=True)
        finally:
            for fd in (ready_w, exit_r, net, owner):
                os.close(fd)
        if not _said(ready_r, slirp):
            why = (slirp.stderr.read() if slirp.poll() is not None and slirp.stderr else b"").decode(errors="replace")
            return _fail(box, f"{SLIRP} did not bring it up: {' '.join(why.split())[-300:] or 'no word'}", last)
        try:
            os.write(gate_w, b"go")
        except BrokenPipeError:  # bwrap gave up before the command began (it said why)
            return _given_up(box, last)
        return _exit_code(box.wait())
    finally:
        os.close(gate_w)  # a gate still waiting gives up
        os.close(exit_w)  # slirp4netns ends
        if slirp is not None:
            try:
                slirp.wait(timeout=5)
            except subprocess.TimeoutExpired:
                slirp.kill()
                slirp.wait()


def _resolv_conf() -> str:
    # Often a link into /run (systemd-resolved), which the box hides under a
    # tmpfs: the file goes where the link leads, and the link still works.
    return os.path.realpath("/etc/resolv.conf") if Path("/etc/resolv.conf").exists() else "/etc/resolv.conf"


def _child_pid(fd: int) -> int | None:
    """The pid bwrap writes (JSON) once its child, the box's first process, exists."""
    data = b""
    with os.fdopen(fd, "rb") as f:
        while b"}" not in data:
            chunk = f.read1(4096)
            if not chunk:
                return None
            data += chunk
    return int(json.loads(data[: data.index(b"}") + 1])["child-pid"])


def _namespaces(pid: int) -> tuple[int, int]:
    """File descriptors of the box's network namespace and of the user namespace
    that owns it, which slirp4netns must join to configure it. Asked of the
    network namespace itself (NS_GET_USERNS): the box's first process moves on
    into a user namespace nested in that one (--disable-userns), and the one in
    /proc/PID/ns/user depends on when it is read."""
    net = os.open(f"/proc/{pid}/ns/net", os.O_RDONLY | os.O_CLOEXEC)
    try:
        owner = fcntl.ioctl(net, NS_GET_USERNS)
    except OSError:
        os.close(net)
        raise
    os.set_inheritable(owner, False)
    return net, owner


def _said(fd: int, proc: subprocess.Popen[bytes]) -> bool:
    """Whether a byte came on `fd` (the gate: set up; slirp4netns: the network
    is up) in time, and not the end of it, nor `proc`'s."""
    deadline = time.monotonic() + READY_WITHIN
    try:
        while time.monotonic() < deadline:
            readable, _, _ = select.select([fd], [], [], 0.1)
            if readable:
                return os.read(fd, 1) == b"1"
            if proc.poll() is not None:
                return False
        return False
    finally:
        os.close(fd)


def _fail(box: subprocess.Popen[bytes], why: str, last: bool) -> int | None:
    if last:
        print(f"volt: the box's network: {why}", file=sys.stderr, flush=True)
    _gone(box)
    return NO_NETWORK if last else None


def _given_up(box: subprocess.Popen[bytes], last: bool) -> int | None:
    """bwrap gave up before the command began: its exit code, the last time."""
    code = box.wait()
    return _exit_code(code) if last else None


def _gone(box: subprocess.Popen[bytes]) -> None:
    """Make sure a box that never began its command is gone."""
    box.kill()
    box.wait()


def _exit_code(code: int) -> int:
    """Exit as bwrap did: by its code, or, killed, by the same signal."""
    if code < 0:
        signal.signal(-code, signal.SIG_DFL)
        os.kill(os.getpid(), -code)
        return 128 - code
    return code


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
