"""A job's Python environment: built with uv from the project's own files, cached by what defines them.

What goes in is `runner/envplan.py`'s to say (the project, editable where it
can be; its test dependencies; its requirements.txt; `[env] install`), and
pytest: the runner's own version, from wheels made of the runner's copy
(`runner/pytestwheels.py`), unless the project brought its own. The build runs
in the caller's box (the runner's sandbox, with network), uv's steps one by
one, each with the job's deadline and cancel flag.

The cache, under the runner's workdir (`Environments`):

    envs/<repository>/uv-cache/    uv's downloads and builds, for this repository only
    envs/<repository>/<key>/       an environment; whole once COMPLETE is in it
    envs/<repository>/<key>.lock   held while the environment is built or used
    envs/.lock                     held while environments are counted and evicted

The key hashes the files that define the environment, the `[env]` table, the
interpreter, the platform, the runner's pytest and uv settings. Each
repository has its own environments and uv cache: a build runs the project's
own code (its build backend, its dependencies' setup.py) and may write there,
so what one repository's commit does to a cache reaches no other repository.
An environment is built where it will live (a virtual environment holds its
own path in scripts and records, so it is not renamed into place): the marker
written last says it is whole, and a folder without one is what a crash left.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import re
import select
import shutil
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from common.voltfile import EnvSpec
from runner.envplan import EnvError, Plan, is_python_project, plan
from runner.execute import LogCollector, die_with_parent
from runner.pytestwheels import runner_wheels
from runner.pythons import Interpreter, own_interpreter

log = logging.getLogger(__name__)

COMPLETE = ".volt-env.json"
# The tests see the environment read-only, where Python cannot write byte
# code: what is not compiled at build time is compiled again, in memory, by
# every job that imports it. Compiling costs a build a few hundred ms of
# process start-up alone, so it is done when that pays: for environments with
# more than this many modules besides pytest's (which come compiled).
COMPILE_ABOVE = 50
# The runner's environment that reaches uv: the operator's uv settings (an
# index, find-links, ...) and how to get out to it. Nothing else of the runner's.
_UV_PASSED_ON = ("PATH", "LANG", "LC_ALL", "LC_CTYPE", "SSL_CERT_FILE", "SSL_CERT_DIR")
_PROXIES = ("http_proxy", "https_proxy", "no_proxy", "all_proxy")


class Stopped(Exception):
    """The build was stopped on purpose: `reason` is "cancelled" or "lease lost"."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


# -- the cache ---------------------------------------------------------------


@dataclass(frozen=True)
class Ready:
    """An environment a job may use while it holds it."""

    path: Path
    python: Path
    reused: bool


# How a caller boxes uv: (argv, env, writable, shown) -> the argv that runs it in a sandbox.
Box = Callable[[list[str], dict[str, str], list[Path], list[Path]], list[str]]


class Environments:
    """The runner's environments under `root`, at most `size` of them kept."""

    def __init__(
        self, root: Path, *, size: int = 10, timeout: float = 900.0, uv: str | None = None, wheels: Path | None = None
    ) -> None:
        """`wheels`: where the wheels made of the runner's pytest are kept (see
        `runner_wheels`); by default in the user's cache, shared by the runners
        of this installation, else under `root`."""
        self.root = root
        self.size = size
        self.timeout = timeout
        self.uv = uv or find_uv()
        root.mkdir(parents=True, exist_ok=True)
        self.wheels = wheels or _wheel_cache(root)

    def home(self, repo: str) -> Path:
        from runner.workspace import _slug  # the same name its checkout has

        return self.root / _slug(repo)

    @contextlib.contextmanager
    def prepare(
        self,
        plan: Plan,
        tree: Path,
        log: LogCollector,
        *,
        stop: Callable[[], str | None] = lambda: None,
        box: Box | None = None,
        home: Path | None = None,
    ) -> Iterator[Ready]:
        """The environment `plan` describes, built unless a whole one is cached,
        held for the caller until the block ends. Whatever uv says goes to `log`.
        EnvError when it cannot be built; Stopped when `stop()` said so."""
        deadline = time.monotonic() + self.timeout
        where = self.home(plan.repo)
        where.mkdir(parents=True, exist_ok=True)
        env = where / plan.key
        lock = _hold(where / f"{plan.key}.lock", stop, deadline, self.timeout)
        try:
            run = _UvRun(self, plan, tree, log, stop, deadline, box, home)
            info = _complete(env)
            began = time.monotonic()
            if info is None:
                log.feed(
                    f"volt: environment {plan.key[:12]}: building with Python {plan.python.release}: {plan.describe()}\n".encode()
                )
                _remove(env)
                run.build(env)
                info = {
                    "key": plan.key,
                    "python": plan.python.release,
                    "built_at": time.time(),
                    "what": plan.describe(),
                }
                info["editable"] = run.editable
                info["seconds"] = round(time.monotonic() - began, 3)
                _write_complete(env, info)
                log.feed(f"volt: environment {plan.key[:12]}: built in {info['seconds']:.2f}s\n".encode())
                reused = False
            else:
                log.feed(
                    f"volt: environment {plan.key[:12]}: reused (Python {plan.python.release}; built "
                    f"{time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(info.get('built_at', 0)))})\n".encode()
                )
                if plan.project and not info.get("editable", plan.editable):
                    # The dependencies hold; the project is this commit's, not the one it was built for.
                    run.reinstall_project(env)
                _touch(env / COMPLETE)
                reused = True
            self._evict(keep=env)
            yield Ready(env, env / "bin" / "python", reused)
        finally:
            lock.close()

    def _evict(self, keep: Path) -> None:
        """Remove the least recently used environments past `size`, and what crashes left."""
        with open(self.root / ".lock", "w") as guard:
            fcntl.flock(guard, fcntl.LOCK_EX)
            found = []
            homes = [h for h in self.root.iterdir() if h.is_dir() and not h.name.startswith(".")]
            for trash in [t for home in homes for t in home.glob(".trash-*")]:
                if time.time() - trash.stat().st_mtime > 3600:  # left by a runner that stopped while deleting it
                    _remove(trash)
            for home in homes:
                for env in home.iterdir():
                    if env.is_dir() and env.name not in ("uv-cache",) and not env.name.startswith(".trash-"):
                        marker = env / COMPLETE
                        found.append((marker.stat().st_mtime if marker.exists() else 0.0, env))
            found.sort(reverse=True)
            whole = [env for mtime, env in found if mtime]
            doomed = whole[self.size :] + [env for mtime, env in found if not mtime]
            for env in doomed:
                if env == keep:
                    continue
                try:
                    with _try_hold(env.parent / f"{env.name}.lock"):
                        trash = env.parent / f".trash-{uuid.uuid4().hex[:8]}"
                        env.rename(trash)  # gone from its name at once; deleted at leisure
                        log.info("environment %s evicted", env.name)
                        # Deleting takes a while: not the job's time. A runner that stops
                        # first leaves it to the next sweep.
                        threading.Thread(target=_remove, args=(trash,), name="evict", daemon=True).start()
                except BlockingIOError:
                    continue  # in use, or being built
            for home in homes:
                if not any(e.is_dir() and e.name != "uv-cache" and ".trash-" not in e.name for e in home.iterdir()):
                    # No environment left for this repository: nor its uv cache.
                    with contextlib.suppress(BlockingIOError), _try_all(home.glob("*.lock")):
                        _remove(home)


def _wheel_cache(root: Path) -> Path:
    """The user's cache (they are made of this installation's files, the same
    for each of its runners, and take seconds to make), else `root`."""
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    folder = base / "volt" / "runner-wheels"
    try:
        folder.mkdir(parents=True, exist_ok=True)
        if os.access(folder, os.W_OK):
            return folder
    except (OSError, RuntimeError):  # no home, or one that cannot be written
        pass
    return root / ".runner-wheels"


def find_uv() -> str:
    """The uv the runner was installed with (the `uv` package), else one on PATH."""
    try:
        import uv

        return str(uv.find_uv_bin())
    except (ImportError, FileNotFoundError):
        found = shutil.which("uv")
        if found is None:
            raise EnvError("no uv here: install the runner with its dependencies (uv is one)") from None
        return found


def _complete(env: Path) -> dict[str, Any] | None:
    try:
        info = json.loads((env / COMPLETE).read_text())
    except (OSError, ValueError):
        return None
    return info if isinstance(info, dict) and (env / "bin" / "python").exists() else None


def _write_complete(env: Path, info: dict[str, Any]) -> None:
    tmp = env / f"{COMPLETE}.tmp"
    # Written whole and renamed: a runner killed at any point leaves either no
    # marker or a whole one. (No fsync: a crash of the runner loses nothing the
    # kernel holds; a power cut may, and fsyncing the marker alone would not help.)
    with open(tmp, "w") as out:
        json.dump(info, out)
    os.replace(tmp, env / COMPLETE)
    _touch(env / COMPLETE)


def _touch(marker: Path) -> None:
    """The environment's last use, for eviction: the clock's own time, since
    a file's times move only once per kernel tick (a few ms)."""
    now = time.time_ns()
    os.utime(marker, ns=(now, now))


def _hold(path: Path, stop: Callable[[], str | None], deadline: float, limit: float) -> Any:
    """`path` opened and flock'ed exclusively, waiting while `stop()` and the deadline allow."""
    handle = open(path, "a")  # noqa: SIM115 - the lock lives as long as the handle
    while True:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return handle
        except BlockingIOError:
            reason = stop()
            if reason or time.monotonic() >= deadline:
                handle.close()
                if reason:
                    raise Stopped(reason) from None
                raise EnvError(f"the environment stayed in use by another job past the {limit:g}s limit") from None
            time.sleep(0.05)


@contextlib.contextmanager
def _try_hold(path: Path) -> Iterator[None]:
    with open(path, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        yield


@contextlib.contextmanager
def _try_all(paths: Iterator[Path]) -> Iterator[None]:
    with contextlib.ExitStack() as stack:
        for path in paths:
            stack.enter_context(_try_hold(path))
        yield


def _remove(path: Path) -> None:
    if path.is_symlink() or path.is_file():
        path.unlink()
    elif path.exists():
        shutil.rmtree(path, ignore_errors=True)


# -- building ----------------------------------------------------------------


class _UvRun:
    """One job's uv calls: their environment, box, shared deadline, and log."""

    def __init__(
        self,
        cache: Environments,
        plan: Plan,
        tree: Path,
        log: LogCollector,
        stop: Callable[[], str | None],
        deadline: float,
        box: Box | None,
        home: Path | None,
    ) -> None:
        self.cache, self.plan, self.tree, self.log, self.stop, self.deadline, self.box = (
            cache,
            plan,
            tree,
            log,
            stop,
            deadline,
            box,
        )
        self.where = cache.home(plan.repo)
        (self.where / "uv-cache").mkdir(parents=True, exist_ok=True)
        self.env = uv_environment(self.where / "uv-cache", home or self.where)
        self.editable = plan.editable  # False once its backend turned an editable install down
        # The one environment this job's build may write (with the uv cache):
        # not the others of its repository, which other commits' keys name.
        self.target: Path | None = None

    def build(self, env: Path) -> None:
        p = self.plan
        python = str(p.python.executable)
        env.mkdir()
        self.target = env
        if p.locked:
            sync = ["sync", "--locked", "--python", python, "--no-default-groups"]
            sync += [f"--group={g}" for g in p.groups] + [f"--extra={e}" for e in p.extras]
            sync += [] if p.editable else ["--no-editable"]
            self.uv(sync, project_env=env)
        else:
            self.uv(["venv", "--python", python, "--no-project", "--no-config", str(env)])
        target = ["--python", str(env / "bin" / "python")]
        if self._install_args(p.editable):
            try:
                self.uv(["pip", "install", *target, *self._install_args(p.editable)])
            except EnvError as exc:
                if not (p.project and p.editable and not p.locked and "build_editable" in str(exc)):
                    raise
                # Its build backend has no editable installs: the project goes in as a wheel,
                # and is installed again for each commit that reuses the environment.
                self.log.feed(b"volt: environment: the build backend cannot install it editable; installing it whole\n")
                self.uv(["pip", "install", *target, *self._install_args(False)])
                self.editable = False
        self.compile(env)
        self.add_pytest(env)

    def compile(self, env: Path) -> None:
        """Byte code for what went in, when there is enough of it to pay (see COMPILE_ABOVE)."""
        site = _site_packages(env)
        modules = 0
        for _, _, names in os.walk(site):
            modules += sum(name.endswith(".py") for name in names)
            if modules > COMPILE_ABOVE:
                break
        if modules <= COMPILE_ABOVE:
            return
        python = str(env / "bin" / "python")
        began = time.monotonic()
        code, output = self.run([python, "-I", "-m", "compileall", "-q", "-j", "0", str(site)], dict(self.env), [])
        if code != 0:  # a module that does not compile is the tests' to find, not the build's
            self.log.feed(b"volt: environment: some modules did not compile to byte code\n")
        self.log.feed(f"volt: environment: byte code compiled in {time.monotonic() - began:.2f}s\n".encode())

    def _install_args(self, editable: bool) -> list[str]:
        p = self.plan
        args: list[str] = []
        if p.project and not p.locked:
            spec = "." + (f"[{','.join(p.extras)}]" if p.extras else "")
            args += ["-e", spec] if editable else [spec]
        if p.groups and not p.locked:
            args += [f"--group={g}" for g in p.groups]
        for name in p.requirements:
            args += ["-r", name]
        return args + list(p.install)

    def reinstall_project(self, env: Path) -> None:
        """This commit's project into an environment built for another commit's,
        its dependencies untouched. By name where it is known: --reinstall alone
        would also ask the index about the build backend again."""
        again = [f"--reinstall-package={self.plan.name}"] if self.plan.name else ["--reinstall"]
        self.target = env
        self.uv(["pip", "install", "--python", str(env / "bin" / "python"), "--no-deps", *again, "."])

    def add_pytest(self, env: Path) -> None:
        """pytest, the runner's version, unless the project installed a pytest of its own:
        from wheels made of the runner's own copy (no index needed), else from the index."""
        site = _site_packages(env)
        if any(_canonical(p.name.rsplit("-", 1)[0]) == "pytest" for p in site.glob("*.dist-info")):
            return
        target = ["--python", str(env / "bin" / "python"), f"pytest=={self.plan.pytest}"]
        wheels = runner_wheels(self.cache.wheels, "pytest", self.plan.python)
        if wheels is None:
            # The runner's own cannot serve this Python (it needs packages the runner lacks).
            self.uv(["pip", "install", "--compile-bytecode", *target])
            return
        self.uv(["pip", "install", "--no-index", "--find-links", str(wheels), *target], shown=[wheels])

    def uv(self, args: list[str], project_env: Path | None = None, shown: Sequence[Path] = ()) -> None:
        env = dict(self.env)
        if project_env is not None:
            env["UV_PROJECT_ENVIRONMENT"] = str(project_env)
        self.log.feed(f"volt: environment: $ uv {' '.join(args)}\n".encode())
        began = time.monotonic()
        code, output = self.run([self.cache.uv, *args], env, [Path(self.cache.uv), *local_sources(env), *shown])
        self.log.feed(f"volt: environment: uv {args[0]} took {time.monotonic() - began:.2f}s\n".encode())
        if code != 0:
            raise EnvError(f"uv {' '.join(args[:2])} failed: {_summary(output) or f'exit code {code}'}")

    def run(self, argv: list[str], env: dict[str, str], shown: Sequence[Path]) -> tuple[int, bytearray]:
        """One step of the build: in the box when there is one, writing only to the
        environment it builds and this repository's uv cache."""
        if self.box is not None:
            visible = [*shown, *([self.plan.python.prefix] if self.plan.python.prefix != Path("/") else [])]
            writable = [self.where / "uv-cache", *([self.target] if self.target else [])]
            argv = self.box(argv, env, writable, visible)
        output = bytearray()
        code = _run(argv, self.tree, env, self.log, output, self.stop, self.deadline, self.cache.timeout)
        return code, output


def uv_environment(cache: Path, home: Path, environ: Mapping[str, str] | None = None) -> dict[str, str]:
    """What uv gets: the operator's uv and proxy settings, this repository's cache, never a Python download."""
    environ = os.environ if environ is None else environ
    from runner.execute import runner_free_path

    env = {k: environ[k] for k in _UV_PASSED_ON if k in environ}
    env["PATH"] = os.pathsep.join(runner_free_path(env.get("PATH", os.defpath)))
    for key, value in environ.items():
        if key.startswith("UV_") or key.lower() in _PROXIES:
            env[key] = value
    for key in ("UV_PROJECT_ENVIRONMENT", "UV_SYSTEM_PYTHON", "UV_PYTHON", "UV_PROJECT", "UV_WORKING_DIR"):
        env.pop(key, None)  # where it installs and with what are the runner's to say
    env.update(UV_CACHE_DIR=str(cache), UV_PYTHON_DOWNLOADS="never", UV_NO_PROGRESS="1", HOME=str(home))
    # Copies, not hard links into the cache: a build that writes to a file of
    # its environment would otherwise write to every environment sharing it.
    env["UV_LINK_MODE"] = "copy"
    return env


def local_sources(env: Mapping[str, str]) -> list[Path]:
    """The folders on this machine the operator's uv settings take packages from
    (UV_FIND_LINKS, file:// indexes): the build's box shows them, read-only."""
    found = []
    for key in ("UV_FIND_LINKS", "UV_INDEX_URL", "UV_EXTRA_INDEX_URL", "UV_DEFAULT_INDEX", "UV_INDEX"):
        for item in re.split(r"[\s,]+", env.get(key, "")):
            item = item.split("=", 1)[1] if re.match(r"^[A-Za-z0-9_-]+=", item) else item  # UV_INDEX: name=url
            where = item.removeprefix("file://")
            if where.startswith("/") and os.path.exists(where):
                found.append(Path(where))
    return found


def uv_settings(environ: Mapping[str, str] | None = None) -> dict[str, str]:
    """The operator's uv settings, which change what an environment holds (part of its key)."""
    environ = os.environ if environ is None else environ
    return {k: v for k, v in environ.items() if k.startswith("UV_") and k != "UV_CACHE_DIR"}


def _run(
    argv: list[str],
    cwd: Path,
    env: dict[str, str],
    log: LogCollector,
    output: bytearray,
    stop: Callable[[], str | None],
    deadline: float,
    limit: float,
) -> int:
    """Run `argv` in its own process group, its output into `log` and `output`;
    killed (all of its group) at the deadline or when `stop()` says why."""
    proc = subprocess.Popen(
        argv,
        cwd=cwd,
        env=env,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        start_new_session=True,
        preexec_fn=die_with_parent,  # a runner killed mid-build takes its build with it
    )
    assert proc.stdout is not None
    fd = proc.stdout.fileno()
    try:
        while True:
            ready, _, _ = select.select([fd], [], [], 0.05)
            if ready:
                chunk = os.read(fd, 65536)
                if not chunk:
                    break
                log.feed(chunk)
                output += chunk[-65536:]
                del output[:-65536]
            reason = stop()
            if reason or time.monotonic() >= deadline:
                _kill(proc)
                if reason:
                    raise Stopped(reason)
                raise EnvError(f"the build ran past its {limit:g}s limit (--env-timeout)")
        _kill(proc)  # what it left behind holds nothing of ours
        return proc.wait()
    finally:
        proc.stdout.close()


def _kill(proc: subprocess.Popen[bytes]) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


def _summary(output: bytes | bytearray) -> str:
    """uv's error and its causes, on one line."""
    lines = [line.strip() for line in output.decode("utf-8", "replace").splitlines()]
    for i, line in enumerate(lines):
        if line.startswith("error:"):
            rest = [x for x in lines[i + 1 : i + 8] if x and not x.startswith(("hint:", "[stderr]"))]
            return " ".join([line.removeprefix("error:").strip(), *rest])[:500]
    tail = [x for x in lines if x]
    return tail[-1][:300] if tail else ""


def _site_packages(env: Path) -> Path:
    found = sorted((env / "lib").glob("python3.*/site-packages"))
    if not found:
        raise EnvError(f"the environment at {env} has no site-packages")
    return found[0]


def _canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


# -- a job's environment -----------------------------------------------------


@dataclass(frozen=True)
class JobEnv:
    """What a job's test command runs with."""

    python: Path  # the interpreter of the default command
    venv: Path | None = None  # the environment, first on PATH; None: no environment
    shown: tuple[Path, ...] = ()  # what the test's box must show read-only
    reused: bool = False


@contextlib.contextmanager
def for_job(
    spec: EnvSpec,
    tree: Path,
    *,
    repo: str,
    uses_default: bool,
    cache: Environments | None,
    pythons: Mapping[str, Interpreter],
    allow_system: bool,
    log: LogCollector,
    stop: Callable[[], str | None] = lambda: None,
    box: Box | None = None,
    home: Path | None = None,
) -> Iterator[JobEnv]:
    """The environment a job's tests run in, held until the block ends.

    `[env] system = true` (where allowed): the runner's own interpreter, as it
    is. A Python project, an `[env]` table, or the default pytest command: an
    environment from the cache. Else (a command of its own in a tree that is
    no Python project): none, and the runner's own packages still out of reach.
    EnvError says why there can be none; Stopped when `stop()` said so.
    """
    if spec.system:
        if not allow_system:
            raise EnvError("[env] system = true, but this runner does not allow it (--allow-system-python)")
        log.feed(b"volt: environment: none ([env] system = true): the runner's own Python and packages\n")
        yield JobEnv(python=Path(sys.executable), shown=(Path(sys.prefix),))
        return
    own = own_interpreter()
    version = spec.python or own.version
    python = pythons.get(version)
    if python is None:
        has = ", ".join(sorted(pythons)) or "none"
        raise EnvError(f"this runner has no Python {version} (it has {has}; see --python)")
    if not (uses_default or spec != EnvSpec() or is_python_project(tree)):
        yield JobEnv(python=python.executable, shown=(python.prefix,))
        return
    if cache is None:
        raise EnvError("this runner builds no environments")
    job_plan = plan(tree, spec, repo=repo, python=python, uv_settings=uv_settings())
    with cache.prepare(job_plan, tree, log, stop=stop, box=box, home=home) as ready:
        yield JobEnv(python=ready.python, venv=ready.path, shown=(ready.path, python.prefix), reused=ready.reused)
