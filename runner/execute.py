"""Running a repository's test command: config, process group, time limit, log, counts."""

from __future__ import annotations

import ctypes
import ctypes.util
import dataclasses
import errno
import logging
import math
import os
import select
import shlex
import shutil
import signal
import stat
import subprocess
import sys
import threading
import time
import zlib
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from common import voltfile
from common.voltfile import CONFIG_FILE, ConfigError, EnvSpec
from runner.junit import Counts, read_junit

log = logging.getLogger(__name__)

LOG_HEAD_BYTES = 64 * 1024
LOG_TAIL_BYTES = 64 * 1024
# The compressed whole log travels in the result message; past this it is
# dropped and only head and tail are kept.
LOG_FULL_MAX_COMPRESSED = 4 * 1024 * 1024


@dataclass(frozen=True)
class TestConfig:
    command: list[str]
    timeout: float
    uses_default: bool = False
    network: bool = False  # [test] network = true: it asks for more than loopback
    env: EnvSpec = EnvSpec()  # [env]: the job's Python environment
    submodules: bool = True  # [checkout] submodules
    notes: tuple[str, ...] = ()  # said at the top of the job's log


def default_command(junit_path: Path, tree: Path, python: str | Path | None = None) -> list[str]:
    """pytest under `python` (the job's environment's; the runner's own when
    none is given); it also runs unittest-style tests."""
    command = [str(python or sys.executable), "-m", "pytest", "-q", "-p", "no:cacheprovider"]
    command.append(f"--junitxml={junit_path}")
    if not has_pytest_config(tree):
        # pytest looks for its settings from the tree upwards: a workdir inside
        # another project (the default is ./.volt/...) must not lend that
        # project's pytest settings to the repository under test.
        command += ["-c", os.devnull, f"--rootdir={tree}"]
    return command


def with_default_command(config: TestConfig, junit_path: Path, tree: Path, python: str | Path) -> TestConfig:
    """`config` with the default command run by `python` (the job environment's)."""
    return dataclasses.replace(config, command=default_command(junit_path, tree, python))


# Where pytest reads its settings from, and what marks its section there.
_PYTEST_CONFIGS = (
    ("pytest.ini", ""),
    (".pytest.ini", ""),
    ("pyproject.toml", "[tool.pytest.ini_options]"),
    ("tox.ini", "[pytest]"),
    ("setup.cfg", "[tool:pytest]"),
)


def has_pytest_config(tree: Path) -> bool:
    """Whether the checked-out tree carries pytest settings of its own at its root."""
    for name, section in _PYTEST_CONFIGS:
        try:
            text = read_tree_file(tree / name, 1024 * 1024)
        except (OSError, ConfigError):
            continue
        if text is not None and section in text:
            return True
    return False


def read_tree_file(path: Path, limit: int) -> str | None:
    """A file of the tested tree, read by the runner outside the sandbox: never
    through a link the commit planted (`.volt.toml -> /proc/self/environ`),
    never from a FIFO, never more than `limit` bytes. None when there is none."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    except FileNotFoundError:
        return None
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise ConfigError(f"{path.name} is a symbolic link; the runner does not follow it") from None
        raise
    with os.fdopen(fd, "rb") as f:
        if not stat.S_ISREG(os.fstat(f.fileno()).st_mode):
            raise ConfigError(f"{path.name} is not a regular file")
        data = f.read(limit + 1)
    if len(data) > limit:
        raise ConfigError(f"{path.name} is larger than {limit // 1024} KiB")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path.name} is not valid UTF-8 (so not valid TOML): {exc}") from None


def load_config(tree: Path, junit_path: Path, max_timeout: float) -> TestConfig:
    """Read `[test]`, `[env]` and `[checkout]` from .volt.toml; pytest when absent.
    The runner's time limit is the default and the most: a commit may ask for less."""
    data: dict[str, object] = {}
    try:
        text = read_tree_file(tree / CONFIG_FILE, voltfile.MAX_CONFIG_BYTES)
    except OSError as exc:
        raise ConfigError(f"cannot read {CONFIG_FILE}: {exc.strerror or exc}") from None
    if text is not None:
        data = voltfile.tables(text)
    section: dict[str, object] = data.get("test", {})  # type: ignore[assignment]
    voltfile.labels_of(section)  # a broken labels list is the job's error too
    voltfile.split_of(section)  # and so is a split the dispatcher could not read
    env, checkout = voltfile.env_of(data), voltfile.checkout_of(data)
    network = section.get("network", False)
    if not isinstance(network, bool):
        raise ConfigError(f"{CONFIG_FILE}: test.network must be true or false")
    timeout = section.get("timeout", max_timeout)
    # TOML has nan and inf; either would switch the time limit off.
    if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or not 0 < timeout < math.inf:
        raise ConfigError(f"{CONFIG_FILE}: test.timeout must be a positive number of seconds")
    notes: tuple[str, ...] = ()
    if timeout > max_timeout:
        # Else one commit could hold a runner for as long as it liked.
        notes = (f"test.timeout {timeout:g}s is more than this runner allows (--job-timeout): {max_timeout:g}s",)
        timeout = max_timeout
    raw = section.get("command")
    if raw is None:
        return TestConfig(
            default_command(junit_path, tree),
            float(timeout),
            uses_default=True,
            network=network,
            env=env,
            submodules=checkout.submodules,
            notes=notes,
        )
    if isinstance(raw, str):
        try:
            command = shlex.split(raw)
        except ValueError as exc:
            raise ConfigError(f"{CONFIG_FILE}: test.command cannot be split: {exc}") from None
    elif isinstance(raw, list) and all(isinstance(part, str) for part in raw):
        command = list(raw)
    else:
        raise ConfigError(f"{CONFIG_FILE}: test.command must be a string or a list of strings")
    if not command:
        raise ConfigError(f"{CONFIG_FILE}: test.command is empty")
    return TestConfig(command, float(timeout), network=network, env=env, submodules=checkout.submodules, notes=notes)


class LogCollector:
    """Keeps the head and tail of a log in bounded memory, and the whole of it compressed."""

    def __init__(self) -> None:
        self.head = bytearray()
        self.tail: deque[bytes] = deque()
        self.tail_size = 0
        self.total = 0
        self._zip = zlib.compressobj(6)
        self._compressed: list[bytes] = []
        self._compressed_size = 0
        self.full_dropped = False

    def feed(self, chunk: bytes) -> None:
        self.total += len(chunk)
        if len(self.head) < LOG_HEAD_BYTES:
            room = LOG_HEAD_BYTES - len(self.head)
            self.head += chunk[:room]
            chunk_for_tail = chunk[room:]
        else:
            chunk_for_tail = chunk
        if chunk_for_tail:
            self.tail.append(chunk_for_tail)
            self.tail_size += len(chunk_for_tail)
            while self.tail_size - len(self.tail[0]) >= LOG_TAIL_BYTES:
                self.tail_size -= len(self.tail.popleft())
        if not self.full_dropped:
            self._keep(self._zip.compress(chunk))

    def _keep(self, out: bytes) -> None:
        if out:
            self._compressed.append(out)
            self._compressed_size += len(out)
        if self._compressed_size > LOG_FULL_MAX_COMPRESSED:
            self.full_dropped = True
            self._compressed = []

    def head_text(self) -> str:
        return bytes(self.head).decode("utf-8", errors="replace")

    def tail_text(self) -> str:
        """The bytes after the head, at most LOG_TAIL_BYTES of them."""
        data = b"".join(self.tail)[-LOG_TAIL_BYTES:]
        return data.decode("utf-8", errors="replace")

    def full_compressed(self) -> bytes:
        """The whole log, zlib-compressed, or b'' when it grew too large to keep."""
        if self.full_dropped:
            return b""
        self._keep(self._zip.flush())
        self._zip = zlib.compressobj(6)  # flush() ended the stream
        return b"" if self.full_dropped else b"".join(self._compressed)


@dataclass
class Outcome:
    status: str
    exit_code: int | None
    duration_s: float
    passed: int = 0
    failed: int = 0
    errors: int = 0
    skipped: int = 0
    reason: str = ""
    log: LogCollector = field(default_factory=LogCollector)
    # Stopped because the runner's lease on the job ran out: not a result, the
    # dispatcher gives the job to another runner.
    abandoned: bool = False
    # [node id, outcome, seconds] of each test the JUnit XML names.
    tests: list[list[object]] = field(default_factory=list)


# All a test gets of the runner's environment: where programs are, and the
# locale. Nothing else (the broker URL holds a password; tokens, proxies and
# the operator's settings are none of the code under test's business).
_PASSED_ON = ("PATH", "LANG", "LANGUAGE", "LC_ALL", "LC_CTYPE", "TZ")


def test_env(extra: dict[str, str], venv: Path | None = None) -> dict[str, str]:
    """The environment a test command gets, built from scratch: PATH and the
    locale, CI=true, and the job's own facts in `extra` (VOLT_JOB_ID, ...).

    The runner's own virtual environment is taken off PATH (its `python` would
    import the runner's packages); the job's environment `venv`, when it has
    one, goes first, so `python` and `pytest` in a command are that one's.
    """
    env = {k: os.environ[k] for k in _PASSED_ON if k in os.environ}
    env["PATH"] = os.pathsep.join(runner_free_path(env.get("PATH", os.defpath)))
    if venv is not None:
        env["PATH"] = os.pathsep.join([str(venv / "bin"), env["PATH"]])
        env["VIRTUAL_ENV"] = str(venv)
    env.update(extra)
    env["CI"] = "true"
    return env


def runner_free_path(path: str) -> list[str]:
    """The folders of PATH `path` that are not inside the runner's own virtual environment."""
    if sys.prefix == sys.base_prefix:
        return [p for p in path.split(os.pathsep) if p]  # no venv: the runner's Python is the system's
    own = Path(os.path.realpath(sys.prefix))
    kept = []
    for folder in path.split(os.pathsep):
        real = Path(os.path.realpath(folder)) if folder else None
        if real is not None and real != own and own not in real.parents:
            kept.append(folder)
    return kept


def find_command(command: list[str], cwd: Path, env: dict[str, str]) -> str | None:
    """Why `command` cannot start (not found, not executable), or None. Asked
    before the sandbox starts, where the answer would be bwrap's exit code."""
    name = command[0]
    if "/" in name:
        path = cwd / name
        if not os.path.realpath(path).startswith(os.path.realpath(cwd) + os.sep):
            # Outside the tree: the host's answer would tell the commit which of
            # the paths the box hides exist. The box says itself if it cannot run it.
            return None
        if not path.exists():
            return f"test command not found: {name}"
        return None if os.access(path, os.X_OK) else f"test command not executable: {name}"
    return None if shutil.which(name, path=env.get("PATH")) else f"test command not found: {name}"


def run_command(
    config: TestConfig,
    cwd: Path,
    env: dict[str, str],
    junit_path: Path,
    cancel: threading.Event,
    grace: float = 5.0,
    on_start: Callable[[int], None] | None = None,
    lease_lost: Callable[[], bool] = lambda: False,
    wrap: Callable[[list[str]], list[str]] | None = None,
    notes: Sequence[str] = (),
    log_into: LogCollector | None = None,
    pass_fds: Sequence[int] = (),
) -> Outcome:
    """Run the test command in its own process group, bounded in time and log size.

    `wrap` turns the command into the one that runs it in the sandbox; `notes`
    are lines the runner puts at the head of the log, after what `log_into` holds
    already (the environment's build); `pass_fds` the descriptors the command
    inherits (a split run's shard link). On timeout or cancel the
    whole group gets SIGTERM, then SIGKILL after the grace period (in the
    sandbox everything inside dies with it at once); when `lease_lost()` turns
    true, SIGKILL at once (the job may already be someone else's). Whatever the
    command does, this returns an Outcome.
    """
    collector = log_into if log_into is not None else LogCollector()
    for note in notes:
        collector.feed(f"volt: {note}\n".encode())
    missing = find_command(config.command, cwd, env)
    if missing:
        return Outcome("error", None, 0.0, reason=missing, log=collector)
    started = time.monotonic()
    try:
        proc = subprocess.Popen(
            wrap(config.command) if wrap else config.command,
            cwd=cwd,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            preexec_fn=die_with_parent,
            pass_fds=tuple(pass_fds),
        )
    except FileNotFoundError:
        return Outcome("error", None, 0.0, reason=f"test command not found: {config.command[0]}", log=collector)
    except PermissionError:
        return Outcome("error", None, 0.0, reason=f"test command not executable: {config.command[0]}", log=collector)
    except OSError as exc:
        return Outcome("error", None, 0.0, reason=f"cannot start test command: {exc}", log=collector)
    if on_start is not None:
        on_start(proc.pid)
    assert proc.stdout is not None
    reader = threading.Thread(target=_pump, args=(proc.stdout, collector), daemon=True)
    reader.start()
    deadline = started + config.timeout
    stopped_for = ""
    # Wakes the moment the command exits (Popen.wait's sleeps would add up to
    # 50 ms to every job), and every 50 ms to look at cancel and the clock.
    watch = _ExitWatch(proc.pid)
    try:
        while proc.poll() is None:
            watch.wait(0.05)
            if lease_lost():
                stopped_for = "lease"
            elif cancel.is_set():
                stopped_for = "cancelled"
            elif time.monotonic() >= deadline:
                stopped_for = "timeout"
            if stopped_for and proc.poll() is None:
                _stop_group(proc, 0.0 if stopped_for == "lease" else grace)
                break
            stopped_for = ""
    finally:
        watch.close()
    duration = time.monotonic() - started
    # Children left behind (daemons, or ones that ignore SIGTERM) would hold the
    # log pipe open forever: the group goes with its leader.
    _kill_group(proc.pid, signal.SIGKILL)
    reader.join(timeout=5)
    if reader.is_alive():
        # A process that left the group (setsid) still holds the pipe. Closing
        # it under the blocked reader would let a later read hit whatever file
        # reuses the descriptor number; the reader closes nothing and ends at EOF.
        log.warning("a process outside the test's process group still holds its output; not waiting for it")
    else:
        proc.stdout.close()
    code = proc.returncode
    if stopped_for == "lease" or (code == -signal.SIGKILL and lease_lost()):
        # Stopped here, or by the watchdog while this runner was frozen.
        return Outcome("cancelled", code, duration, reason="lease lost", log=collector, abandoned=True)
    if stopped_for == "timeout":
        return Outcome("timeout", code, duration, reason=f"stopped after {config.timeout:g}s time limit", log=collector)
    if stopped_for == "cancelled":
        return Outcome("cancelled", code, duration, reason="cancelled", log=collector)
    junit = read_junit(junit_path)
    outcome = classify(code, junit.counts if junit else None, duration, collector)
    if junit is not None:
        outcome.tests = [[c.node_id, c.outcome, round(c.duration_s, 4)] for c in junit.cases]
    return outcome


def classify(code: int, counts: Counts | None, duration: float, collector: LogCollector) -> Outcome:
    """passed on exit 0; failed with failing tests; error for anything else."""
    counts = counts or Counts()
    outcome = Outcome(
        "passed",
        code,
        duration,
        passed=counts.passed,
        failed=counts.failures,
        errors=counts.errors,
        skipped=counts.skipped,
        log=collector,
    )
    if code == 0:
        return outcome
    if counts.failures > 0:
        outcome.status = "failed"
        outcome.reason = f"{counts.failures} failing test(s)"
    else:
        outcome.status = "error"
        if code < 0:
            outcome.reason = f"test command killed by signal {-code}"
        elif counts.errors:
            outcome.reason = f"exit code {code} with {counts.errors} error(s) and no failing test"
        else:
            outcome.reason = f"exit code {code} and no failing test (collection error?)"
    return outcome


_PR_SET_PDEATHSIG = 1
try:
    _libc: ctypes.CDLL | None = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
except OSError:  # not Linux: the restarted runner still reaps the group
    _libc = None


def die_with_parent() -> None:
    """In the child before exec: get SIGKILL if the runner's job thread dies.

    A runner killed with SIGKILL cannot stop its test run; this makes the
    kernel do it. (Grandchildren are reaped by the runner's next start.)
    """
    if _libc is not None:
        _libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)


def _pump(stream: object, collector: LogCollector) -> None:
    fd = stream.fileno()  # type: ignore[attr-defined]
    while True:
        try:
            chunk = os.read(fd, 65536)
        except OSError:
            return
        if not chunk:
            return
        collector.feed(chunk)


class _ExitWatch:
    """Waits that end the moment a process exits: a pidfd (Linux 5.3+), else sleeps."""

    def __init__(self, pid: int) -> None:
        self.fd: int | None = None
        self.poller: select.poll | None = None
        try:
            self.fd = os.pidfd_open(pid)
        except (AttributeError, OSError):
            return
        self.poller = select.poll()
        self.poller.register(self.fd, select.POLLIN)

    def wait(self, seconds: float) -> None:
        if self.poller is None:
            time.sleep(seconds)
        else:
            self.poller.poll(seconds * 1000)

    def close(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = self.poller = None


def _stop_group(proc: subprocess.Popen[bytes], grace: float) -> None:
    if grace > 0:
        _kill_group(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            pass
    _kill_group(proc.pid, signal.SIGKILL)
    proc.wait()


def _kill_group(pgid: int, sig: int) -> None:
    try:
        os.killpg(pgid, sig)
    except (ProcessLookupError, PermissionError):
        pass
