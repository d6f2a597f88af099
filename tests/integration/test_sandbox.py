"""Hostile commands run through the sandbox's argv, as the runner runs a test command.

Each attack is also tried without the box where that shows the test can see
it succeed, so a box that stopped protecting would fail here.
"""

from __future__ import annotations

import os
import signal
import socket
import stat
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from runner import sandbox

PYTHON = os.path.realpath(sys._base_executable)  # the box shows the interpreter, not the venv


@pytest.fixture
def work(tmp_path: Path) -> Path:
    """A runner workdir: this job's tree, another job's tree, an outbox."""
    path = tmp_path / "work"
    for folder in ("trees/app", "trees/other", "outbox", "repos/app.git"):
        (path / folder).mkdir(parents=True)
    (path / "trees" / "other" / "test_other.py").write_text("def test(): pass\n")
    (path / "outbox" / "result.json").write_text('{"status": "failed"}')
    (path / "repos" / "app.git" / "config").write_text("[core]\n")
    return path


@pytest.fixture
def tree(work: Path) -> Path:
    return work / "trees" / "app"


def start(code: str, tree: Path, work: Path, boxed: bool = True, **kwargs: Any) -> subprocess.Popen[str]:
    """Start Python `code` the way the runner starts a test command: its own process group."""
    command = [PYTHON, "-c", code]
    env = {"PATH": "/usr/bin:/bin", "VOLT_JOB_ID": "job-1"}
    argv = sandbox.wrap(command, tree, env, workdir=work, **kwargs) if boxed else command
    return subprocess.Popen(
        argv,
        cwd=tree,
        env=env,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )


def run(code: str, tree: Path, work: Path, boxed: bool = True, **kwargs: Any) -> str:
    proc = start(code, tree, work, boxed, **kwargs)
    out, _ = proc.communicate(timeout=60)
    _kill_group(proc.pid, signal.SIGKILL)  # as the runner does after every job
    assert proc.returncode == 0, out
    return out


def _kill_group(pgid: int, sig: int) -> None:
    try:
        os.killpg(pgid, sig)
    except ProcessLookupError:
        pass


def processes_with(token: str) -> list[int]:
    """Host pids of live (not zombie) processes whose command line holds `token`."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            cmdline = Path(f"/proc/{entry}/cmdline").read_bytes()
            state = Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if token.encode() in cmdline and state != "Z":
            found.append(int(entry))
    return found


def wait_for(what: str, check: Any, timeout: float = 10.0) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.02)


READ_ALL_ENVIRON = (
    "import os\n"
    "for pid in os.listdir('/proc'):\n"
    "    if pid.isdigit():\n"
    "        for name in ('environ', 'cmdline'):\n"
    "            try:\n"
    "                print(pid, name, open(f'/proc/{pid}/{name}', 'rb').read())\n"
    "            except OSError as exc:\n"
    "                print(pid, name, exc)\n"
)


def test_the_box_cannot_read_the_environment_of_any_process_outside(tree: Path, work: Path) -> None:
    secret = f"SECRET-{uuid.uuid4().hex}"
    runner_like = subprocess.Popen(["sleep", "600"], env={"VOLT_AMQP_URL": f"amqp://volt:{secret}@broker/"})
    try:
        assert secret in run(READ_ALL_ENVIRON, tree, work, boxed=False)  # what the box must prevent
        inside = run(READ_ALL_ENVIRON, tree, work)
    finally:
        runner_like.kill()
        runner_like.wait()
    assert secret not in inside
    assert "VOLT_JOB_ID=job-1" in inside  # it did read its own processes' environment
    assert repr(Path("/proc/self/cmdline").read_bytes()) not in inside  # nor this process's command line
    assert len({line.split()[0] for line in inside.splitlines()}) <= 3  # bwrap's init, python, maybe one more


def test_writes_outside_the_tree_change_nothing_outside(tree: Path, work: Path, tmp_path: Path) -> None:
    name = f"volt-box-{uuid.uuid4().hex}"
    targets = [
        Path("/tmp") / name,
        Path("/var/tmp") / name,
        Path("/etc") / name,
        Path.home() / name,
        work / "outbox" / "result.json",
        work / "outbox" / f"{name}.json",
        work / "trees" / "other" / "test_other.py",
        work / "repos" / "app.git" / "config",
        tmp_path / name,
    ]
    code = (
        "import os, shutil, sys\n"
        f"for path in {[str(t) for t in targets]!r}:\n"
        "    try:\n"
        "        os.makedirs(os.path.dirname(path), exist_ok=True)\n"
        "        open(path, 'w').write('{\"status\": \"passed\"}')\n"
        "        print('wrote', path)\n"
        "    except OSError as exc:\n"
        "        print('refused', path, exc.strerror)\n"
        f"shutil.rmtree({str(work / 'trees' / 'other')!r}, ignore_errors=True)\n"
        "open('in-tree.txt', 'w').write('mine')\n"
    )
    before = {p: p.read_bytes() for p in work.rglob("*") if p.is_file()}
    out = run(code, tree, work)
    assert "refused /etc/" in out  # read-only; the rest land in the box's own tmpfs
    for target in targets:
        if target not in before:
            assert not target.exists(), target
    after = {p: p.read_bytes() for p in work.rglob("*") if p.is_file()}
    assert after == {**before, tree / "in-tree.txt": b"mine"}


def test_secrets_in_hidden_places_cannot_be_read(
    tree: Path, work: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    secret = f"SECRET-{uuid.uuid4().hex}"
    home = tmp_path / "runner-home"
    files = [home / ".ssh" / "id_ed25519", home / ".git-credentials", home / ".pgpass", home / ".erlang.cookie"]
    for path in files:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(f"{secret}\n")
    monkeypatch.setenv("HOME", str(home))  # the runner user's home: hidden by default
    code = (
        "import os\n"
        f"for path in {[str(f) for f in files]!r}:\n"
        "    try:\n"
        "        print(open(path).read())\n"
        "    except OSError as exc:\n"
        "        print(path, exc.strerror)\n"
        "print('/root holds', sorted(os.listdir('/root')))\n"
        "print('/home holds', sorted(os.listdir('/home')))\n"
        f"for root, dirs, names in os.walk({str(work)!r}):\n"
        "    print('workdir', root, dirs, names)\n"
    )
    assert secret in run(code, tree, work, boxed=False)
    out = run(code, tree, work)
    assert secret not in out
    assert out.count("No such file or directory") == len(files)
    # Of the homes, only the way to the interpreter's prefix (~/.pyenv here) shows.
    prefix = Path(os.path.realpath(sys.base_prefix))
    for top in ("/root", "/home"):
        shown = [part for part in prefix.parts[2:3] if prefix.is_relative_to(top)]
        assert f"{top} holds {shown}" in out
    assert "outbox" not in out and "other" not in out and "repos" not in out
    assert f"workdir {work / 'trees' / 'app'} [] []" in out


def test_the_hosts_network_services_are_out_of_reach(tree: Path, work: Path, tmp_path: Path) -> None:
    server = socket.create_server(("127.0.0.1", 0))
    abstract = socket.socket(socket.AF_UNIX)
    abstract.bind(f"\0volt-test-{uuid.uuid4().hex}")  # abstract unix sockets belong to a network namespace
    abstract.listen()
    port = server.getsockname()[1]
    code = (
        "import socket\n"
        f"for address in [('127.0.0.1', {port}), ('127.0.0.1', 5672), ('::1', 5672)]:\n"
        "    try:\n"
        "        socket.create_connection(address, timeout=2).close()\n"
        "        print('reached', address)\n"
        "    except OSError as exc:\n"
        "        print('refused', address, exc)\n"
        "s = socket.socket(socket.AF_UNIX)\n"
        "try:\n"
        f"    s.connect({abstract.getsockname()!r})\n"
        "    print('reached abstract')\n"
        "except OSError as exc:\n"
        "    print('refused abstract', exc)\n"
    )
    try:
        outside = run(code, tree, work, boxed=False)
        assert f"reached ('127.0.0.1', {port})" in outside and "reached abstract" in outside
        inside = run(code, tree, work)
        allowed = run(code, tree, work, network=True)
    finally:
        server.close()
        abstract.close()
    assert "reached" not in inside, inside
    assert [line.split()[0] for line in inside.splitlines()] == ["refused"] * 4
    # With network (an environment's build, a test granted it): the world, never the host's own services.
    assert "reached" not in allowed, allowed
    assert [line.split()[0] for line in allowed.splitlines()] == ["refused"] * 4


@pytest.fixture
def sockets_under_run() -> Iterator[list[Path]]:
    """Unix sockets local services listen on under /run (docker.sock, PostgreSQL's, ...),
    and one made here when /run is writable."""
    found = [p for p in Path("/run").rglob("*") if _is_socket(p)]
    listener = socket.socket(socket.AF_UNIX)
    ours = Path("/run") / f"volt-test-{uuid.uuid4().hex}.sock"
    if os.access("/run", os.W_OK):
        listener.bind(str(ours))
        listener.listen()
        found.append(ours)
    try:
        yield found
    finally:
        listener.close()
        ours.unlink(missing_ok=True)


def test_unix_sockets_of_local_services_are_out_of_reach(tree: Path, work: Path, sockets_under_run: list[Path]) -> None:
    code = (
        "import os, socket\n"
        f"for path in {[str(p) for p in sockets_under_run]!r}:\n"
        "    s = socket.socket(socket.AF_UNIX)\n"
        "    try:\n"
        "        s.connect(path)\n"
        "        print('reached', path)\n"
        "    except OSError as exc:\n"
        "        print('refused', path, exc.strerror)\n"
        "print('run holds', os.listdir('/run'), os.listdir('/var/run'))\n"
    )
    outside = run(code, tree, work, boxed=False)
    if "reached" not in outside:
        pytest.fail(f"no unix socket under /run answers here, and /run is not writable to make one: {outside}")
    inside = run(code, tree, work)
    assert "reached" not in inside, inside
    assert "run holds [] []" in inside


def _is_socket(path: Path) -> bool:
    try:
        return stat.S_ISSOCK(path.lstat().st_mode)
    except OSError:
        return False


def daemons_code(token: str, marker: Path, then: str) -> str:
    """Start a setsid daemon and a double-forked grandchild, note them, then `then`.

    `token` is in every command line (the code holds it; the daemon gets it as
    an argument), so the host finds them in /proc whatever their pid inside."""
    return (
        f"TOKEN = {token!r}\n"
        "import os, subprocess, sys, time\n"
        f"daemon = subprocess.Popen(['setsid', sys.executable, '-c', 'import time; time.sleep(600)', TOKEN],\n"
        "    stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)\n"
        "if os.fork() == 0:\n"
        "    os.setsid()\n"
        "    if os.fork() == 0:\n"
        "        os.closerange(0, 1024)\n"
        "        time.sleep(600)\n"
        "    os._exit(0)\n"
        f"open({str(marker)!r}, 'w').write(str(daemon.pid))\n"
        f"{then}\n"
    )


@pytest.mark.parametrize(
    "ending",
    ["exits", "killed-with-sigterm", "killed-with-sigkill"],
    ids=["job-exits", "runner-sends-sigterm", "runner-sends-sigkill"],
)
def test_everything_a_job_started_dies_with_it(tree: Path, work: Path, ending: str) -> None:
    token = f"volt-daemon-{uuid.uuid4().hex}"
    marker = tree / "started"
    then = "print('leaving them behind')" if ending == "exits" else "time.sleep(600)"
    proc = start(daemons_code(token, marker, then), tree, work)
    try:
        wait_for("the daemons to start", marker.exists)
        if ending == "exits":
            proc.communicate(timeout=30)
        else:
            # A hung test: main, its daemon and the grandchild all run, on the host too.
            wait_for("all three processes", lambda: len(processes_with(token)) >= 3)
            _kill_group(proc.pid, signal.SIGTERM if ending == "killed-with-sigterm" else signal.SIGKILL)
            proc.communicate(timeout=30)
        _kill_group(proc.pid, signal.SIGKILL)  # what the runner does after every job
        wait_for("every process of the job to be gone", lambda: processes_with(token) == [])
    finally:
        for pid in processes_with(token):
            os.kill(pid, signal.SIGKILL)


def test_without_the_box_the_daemons_would_outlive_the_job(tree: Path, work: Path) -> None:
    """The control for the test above: the process group alone does not catch them."""
    token = f"volt-daemon-{uuid.uuid4().hex}"
    proc = start(daemons_code(token, tree / "started", "print('leaving them behind')"), tree, work, boxed=False)
    try:
        proc.communicate(timeout=30)
        _kill_group(proc.pid, signal.SIGKILL)
        # The daemon and the grandchild, both still running after their job.
        wait_for("the two survivors", lambda: len(processes_with(token)) == 2)
    finally:
        for pid in processes_with(token):
            os.kill(pid, signal.SIGKILL)


def test_a_runner_that_dies_takes_the_box_with_it(tree: Path, work: Path) -> None:
    """bwrap's --die-with-parent: the runner killed with SIGKILL leaves no job behind."""
    token = f"volt-daemon-{uuid.uuid4().hex}"
    marker = tree / "started"
    argv = sandbox.wrap([PYTHON, "-c", daemons_code(token, marker, "time.sleep(600)")], tree, {}, workdir=work)
    # A stand-in runner: starts the box in a thread, as the runner's job thread does, then is killed.
    runner_code = (
        "import subprocess, sys, threading, time\n"
        f"threading.Thread(target=subprocess.run, args=({argv!r},), kwargs={{'start_new_session': True}}).start()\n"
        "time.sleep(600)\n"
    )
    runner = subprocess.Popen([PYTHON, "-c", runner_code], stdin=subprocess.DEVNULL)
    try:
        wait_for("the daemons to start", lambda: marker.exists() and len(processes_with(token)) >= 3)
        runner.kill()
        runner.wait()
        wait_for("every process of the job to be gone", lambda: processes_with(token) == [])
    finally:
        runner.kill()
        for pid in processes_with(token):
            os.kill(pid, signal.SIGKILL)
