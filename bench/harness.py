"""What the benchmarks share: a real system in its own namespace, real repositories,
and the means to measure processes (CPU time, resident size) and report a result.

A benchmark script prints what it measured for people, and one `@result {json}`
line per measure for `bench/run`, which collects them into one table.
Progress goes to stderr. Nothing here asserts anything.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import signal
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterable, Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / "bench"
OUT = BENCH / "out"  # gitignored: generated repositories, profiles, logs
sys.path.insert(0, str(ROOT))

from common import naming  # noqa: E402
from common.broker import Broker  # noqa: E402
from common.settings import DEFAULT_AMQP_URL, BrokerSettings  # noqa: E402
from dispatcher.client import ask  # noqa: E402

AMQP_URL = os.environ.get("VOLT_BENCH_AMQP_URL", DEFAULT_AMQP_URL)
_T0 = time.monotonic()


def _stop_on_sigterm(*_: object) -> None:
    # `bench/run` stops a script that overruns with SIGTERM: leave through the
    # `finally` blocks, so its processes and its namespace are cleaned up.
    raise SystemExit(143)


signal.signal(signal.SIGTERM, _stop_on_sigterm)


# -- small helpers ----------------------------------------------------------


def epoch(iso: str) -> float:
    return datetime.fromisoformat(iso.replace("Z", "+00:00")).timestamp()


def median(values: Iterable[float]) -> float:
    values = list(values)
    return statistics.median(values) if values else float("nan")


def progress(text: str) -> None:
    """A progress line on stderr (stdout carries the numbers)."""
    print(f"[{Path(sys.argv[0]).stem} {time.monotonic() - _T0:6.1f}s] {text}", file=sys.stderr, flush=True)


def report(key: str, measure: str, measured: str, target: str, met: bool | None, **numbers: Any) -> None:
    """One row of the results table: printed for people and as `@result {json}` for bench/run."""
    verdict = "n/a" if met is None else ("yes" if met else "NO")
    print(f"{measure}: {measured} (target {target}: {verdict})", flush=True)
    row = {"key": key, "measure": measure, "measured": measured, "target": target, "met": met, "numbers": numbers}
    print("@result " + json.dumps(row), flush=True)


def wait(check: Callable[[], Any], timeout: float, every: float = 0.05, what: str = "the benchmark") -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what}: waited more than {timeout:g}s")
        time.sleep(every)


# -- the machine ------------------------------------------------------------


def machine_info(amqp_url: str = AMQP_URL) -> dict[str, str]:
    """Core count, CPU model, Python, git and RabbitMQ versions, date, and the code's revision."""
    model = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass

    def out(*argv: str) -> str:
        try:
            return subprocess.run(argv, capture_output=True, text=True, timeout=30, cwd=ROOT).stdout.strip()
        except (OSError, subprocess.TimeoutExpired):
            return ""

    dirty = out(
        "git", "status", "--porcelain", "--untracked-files=no", "--", "common", "dispatcher", "runner", "observer"
    )
    return {
        "date": datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z"),
        "cores": str(os.cpu_count()),
        "cpu": model,
        "python": platform.python_version(),
        "rabbitmq": rabbitmq_version(amqp_url),
        "git": out("git", "--version").removeprefix("git version "),
        "kernel": platform.release(),
        "revision": out("git", "rev-parse", "--short", "HEAD") + (" + uncommitted changes" if dirty else ""),
    }


def rabbitmq_version(amqp_url: str = AMQP_URL) -> str:
    """The broker's own version, as it announces itself on connecting."""
    import pika  # only to read the server's properties; the workers never do this

    try:
        conn = pika.BlockingConnection(pika.URLParameters(amqp_url))
    except Exception as exc:  # noqa: BLE001 - a version is nice to have, never worth failing for
        return f"unknown ({type(exc).__name__})"
    try:
        props = conn._impl.server_properties or {}  # noqa: SLF001 - pika keeps them only here
        version = props.get("version", b"?")
        return version.decode() if isinstance(version, bytes) else str(version)
    finally:
        conn.close()


# -- processes: CPU time and resident size -----------------------------------

_CLK_TCK = os.sysconf("SC_CLK_TCK")


def _stat(pid: int) -> list[str]:
    raw = Path(f"/proc/{pid}/stat").read_text()
    # The command name (field 2) may hold spaces; everything after its ")" is fixed.
    return raw[raw.rindex(")") + 2 :].split()


def process_tree(pid: int) -> list[int]:
    """pid and all its living descendants."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                ppid = int(_stat(int(entry.name))[1])
            except (OSError, ValueError, IndexError):
                continue
            children.setdefault(ppid, []).append(int(entry.name))
    tree, todo = [], [pid]
    while todo:
        p = todo.pop()
        tree.append(p)
        todo.extend(children.get(p, []))
    return tree


def cpu_seconds(pid: int, with_children: bool = True) -> float:
    """User + system CPU time of a process; with its children (living, and those it reaped)."""
    pids = process_tree(pid) if with_children else [pid]
    total = 0
    for p in pids:
        try:
            fields = _stat(p)
        except OSError:
            continue  # gone between the listing and now
        # utime, stime, cutime, cstime are fields 14-17 of stat (11-14 after the name);
        # a reaped child's time lands in its parent's cutime/cstime.
        total += sum(int(f) for f in fields[11 : 15 if with_children else 13])
    return total / _CLK_TCK


def add_window_args(parser: argparse.ArgumentParser) -> None:
    """--quick, --windows and --window: how long a CPU benchmark samples."""
    parser.add_argument("--quick", action="store_true", help="fewer and shorter windows")
    parser.add_argument("--windows", type=int, help="how many windows (default 3; 2 with --quick)")
    parser.add_argument("--window", type=float, help="seconds per window (default 10; shorter with --quick)")


def window_plan(args: argparse.Namespace, quick_window: float) -> tuple[int, float]:
    """(windows, seconds each) from add_window_args' flags."""
    return args.windows or (2 if args.quick else 3), args.window or (quick_window if args.quick else 10.0)


class CpuMeter:
    """CPU used by a process (and its children) over wall-clock windows, as a share of one core."""

    def __init__(self, pid: int) -> None:
        self.pid = pid

    def share(self, seconds: float) -> float:
        cpu0, wall0 = cpu_seconds(self.pid), time.monotonic()
        time.sleep(seconds)
        cpu1, wall1 = cpu_seconds(self.pid), time.monotonic()
        return (cpu1 - cpu0) / (wall1 - wall0)

    def windows(self, count: int, seconds: float, label: str = "") -> list[float]:
        shares = []
        for i in range(count):
            shares.append(self.share(seconds))
            progress(f"{label} window {i + 1}/{count}: {shares[-1]:.1%} of one core")
        return shares


def rss_mb(pid: int) -> float:
    """Resident set size (VmRSS) in MB (10^6 bytes)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024 / 1e6
    raise ValueError(f"no VmRSS for pid {pid}")


def start_profiler(pid: int, path: Path, idle: bool = False) -> subprocess.Popen[bytes]:
    """py-spy recording a process until stop_profiler: .svg flame graph, .txt collapsed stacks
    (for bench/hotspots.py), .json speedscope. Non-blocking, so it barely slows the process."""
    fmt = {".svg": "flamegraph", ".txt": "raw", ".json": "speedscope"}[path.suffix]
    path.parent.mkdir(parents=True, exist_ok=True)
    py_spy = Path(sys.executable).with_name("py-spy")
    argv = [
        str(py_spy),
        "record",
        "--nonblocking",
        "--rate",
        "200",
        "--format",
        fmt,
        "-o",
        str(path),
        "--pid",
        str(pid),
    ]
    progress(f"profiling pid {pid} into {path}")
    return subprocess.Popen(argv + (["--idle"] if idle else []), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def stop_profiler(spy: subprocess.Popen[bytes]) -> None:
    spy.send_signal(signal.SIGINT)  # py-spy writes its output on SIGINT
    try:
        _, err = spy.communicate(timeout=60)
        if spy.returncode:
            progress(f"py-spy failed: {err.decode().strip()[-300:]}")
    except subprocess.TimeoutExpired:
        spy.kill()


# -- repositories -------------------------------------------------------------


def plain_install() -> Path:
    """Volt CI installed as an operator would, in a venv of its own (no test
    extras, not editable, bytecode compiled); its python. A runner under a
    benchmark runs from it: the dev venv's pytest plugins are not the user's."""
    venv = OUT / "plain" / "venv"
    shutil.rmtree(venv, ignore_errors=True)
    uv = Path(sys.executable).with_name("uv")
    subprocess.run([str(uv), "venv", "-q", "--python", sys.executable, str(venv)], check=True)
    subprocess.run(
        # Byte code compiled, as pip does by default: the runner's own packages are
        # read-only to the jobs that use them ([env] system = true).
        [str(uv), "pip", "install", "-q", "--compile-bytecode", "--python", str(venv / "bin" / "python"), str(ROOT)],
        check=True,
        env={**os.environ, "UV_CACHE_DIR": str(OUT / "plain" / "uv-cache")},
    )
    return venv / "bin" / "python"


def tree_path(i: int) -> str:
    """Where file number i lives in a generated tree: 100 files to a folder."""
    return f"src/d{i // 100:03d}/f{i % 100:02d}.txt"


class Repo:
    """A git repository the benchmark owns: small commits through the CLI,
    long histories through `git fast-import` (tens of thousands of commits in seconds)."""

    def __init__(self, path: Path, bare: bool = False, create: bool = True) -> None:
        self.path = path
        self.n = 0
        if create:
            path.mkdir(parents=True)
            self.git("init", "-q", "-b", "main", *(["--bare"] if bare else []))

    @classmethod
    def open(cls, path: Path) -> Repo:
        return cls(path, create=False)

    def git(self, *args: str, stdin: bytes | None = None) -> str:
        return (
            subprocess.run(
                ["git", "-c", "user.name=bench", "-c", "user.email=bench@volt.invalid", *args],
                cwd=self.path,
                check=True,
                capture_output=True,
                input=stdin,
            )
            .stdout.decode()
            .strip()
        )

    def commit(self, files: dict[str, str] | None = None) -> str:
        self.n += 1
        for name, content in (files or {}).items():
            (self.path / name).parent.mkdir(parents=True, exist_ok=True)
            (self.path / name).write_text(content)
        (self.path / "counter.txt").write_text(str(self.n))
        self.git("add", "-A")
        self.git("commit", "-q", "-m", f"change {self.n}")
        return self.git("rev-parse", "HEAD")

    def head(self) -> str:
        return self.git("rev-parse", "refs/heads/main")

    def commits(self) -> list[str]:
        """Every commit of main, oldest first."""
        return self.git("rev-list", "--reverse", "refs/heads/main").split()

    def import_commits(
        self, count: int, files: int = 0, touch: int = 1, first_files: dict[str, str] | None = None
    ) -> str:
        """Add `count` commits to main with fast-import and return the new head.

        On an empty repository the first commit holds `files` generated files
        (100 to a folder) plus `first_files`; every later commit changes
        `touch` of them, round the tree. Works on bare and non-bare repositories
        (a non-bare one's work tree is not updated).
        """
        try:
            parent: str | None = self.head()
        except subprocess.CalledProcessError:
            parent = None
        if parent is not None and not files:
            files = _count_files(self)
        proc = subprocess.Popen(
            ["git", "fast-import", "--quiet", "--done"], cwd=self.path, stdin=subprocess.PIPE, stdout=subprocess.DEVNULL
        )
        assert proc.stdin is not None
        try:
            for chunk in _fast_import_stream(count, files, touch, parent, first_files or {}, salt=uuid.uuid4().hex):
                proc.stdin.write(chunk)
        finally:
            proc.stdin.close()
        if proc.wait() != 0:
            raise RuntimeError(f"git fast-import failed in {self.path}")
        return self.head()


def _count_files(repo: Repo) -> int:
    return sum(
        1 for p in repo.git("ls-tree", "-r", "--name-only", "refs/heads/main").splitlines() if p.startswith("src/")
    )


def _data(payload: bytes) -> bytes:
    return b"data %d\n%s\n" % (len(payload), payload)


def _fast_import_stream(
    count: int, files: int, touch: int, parent: str | None, first_files: dict[str, str], salt: str
) -> Iterator[bytes]:
    when = int(time.time()) - count
    position = int(salt[:6], 16)  # where later commits start changing files: differs per call
    for i in range(count):
        lines = [
            b"commit refs/heads/main\n",
            b"committer bench <bench@volt.invalid> %d +0000\n" % (when + i),
            _data(f"change {i} ({salt[:8]})".encode()),
        ]
        if i == 0 and parent is not None:
            lines.append(f"from {parent}\n".encode())
        if i == 0 and parent is None:
            for name, content in first_files.items():
                lines.append(f"M 100644 inline {name}\n".encode() + _data(content.encode()))
            for j in range(files):
                lines.append(f"M 100644 inline {tree_path(j)}\n".encode() + _data(b"file %d\n" % j * 4))
        else:
            for _ in range(max(1, touch) if files else 0):
                j = position % files
                position += 1
                lines.append(f"M 100644 inline {tree_path(j)}\n".encode() + _data(f"file {j} v{i} {salt}\n".encode()))
            if not files:
                lines.append(b"M 100644 inline counter.txt\n" + _data(f"{i} {salt}\n".encode()))
        yield b"".join(lines)
    yield b"done\n"


# -- the system under test ----------------------------------------------------

PG_ADMIN_URL = os.environ.get("VOLT_BENCH_PG_URL", "postgresql://postgres@127.0.0.1:5432/postgres")


def _create_pg_database(ns: str) -> str:
    import psycopg

    name = "volt_" + ns.replace("-", "_")
    with psycopg.connect(PG_ADMIN_URL, autocommit=True) as admin:
        admin.execute(f'CREATE DATABASE "{name}"')
    return f"{PG_ADMIN_URL.rpartition('/')[0]}/{name}"


def _drop_pg_database(url: str) -> None:
    import psycopg

    with psycopg.connect(PG_ADMIN_URL, autocommit=True) as admin:
        admin.execute(f'DROP DATABASE IF EXISTS "{url.rpartition("/")[2]}" WITH (FORCE)')


class System:
    """Dispatcher, runners and observer as real processes in a fresh namespace."""

    def __init__(
        self, amqp_url: str = AMQP_URL, tag: str = "bench", store: str = "sqlite", queue_type: str = "quorum"
    ) -> None:
        """store: sqlite (a file in the run's folder) or postgresql (a database of
        the run's own on VOLT_BENCH_PG_URL's server, dropped at the end)."""
        self.tmp = Path(tempfile.mkdtemp(prefix=f"volt-{tag}-"))
        self.ns = f"{tag}-{uuid.uuid4().hex[:8]}"
        self.amqp_url = amqp_url
        self.queue_type = queue_type
        self.settings = BrokerSettings(amqp_url=amqp_url, namespace=self.ns, queue_type=queue_type)
        self.procs: dict[str, subprocess.Popen[bytes]] = {}
        self.runner_ids: list[str] = []
        self.db_path = self.tmp / "dispatcher.db"
        self.pg_url = _create_pg_database(self.ns) if store == "postgresql" else ""
        self._db: Any = None
        self.broker = Broker(self.settings, "volt-bench")
        self.broker.connect(give_up_after=10)
        self.broker.declare_topology()

    # -- processes

    def start(
        self,
        name: str,
        *args: str,
        python_args: tuple[str, ...] = ("-m", "common.cli"),
        program: str = sys.executable,
    ) -> subprocess.Popen[bytes]:
        argv = [program, *python_args, *args, "--amqp-url", self.amqp_url, "--namespace", self.ns]
        log = open(self.tmp / f"{name}.log", "ab")  # noqa: SIM115
        env = {**os.environ, "VOLT_QUEUE_TYPE": self.queue_type}
        proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT, env=env)
        self.procs[name] = proc
        return proc

    def pid(self, name: str) -> int:
        return self.procs[name].pid

    @property
    def store(self) -> str:
        """The dispatcher's --db."""
        return self.pg_url or str(self.db_path)

    def dispatcher(self, *extra: str, name: str = "dispatcher", wait_ready: bool = True) -> None:
        self.start(name, "dispatcher", "--db", self.store, *extra)
        if wait_ready:
            ask(self.settings, "ping", timeout=30)  # answers once it consumes

    def runners(self, count: int, *extra: str, python: Path | None = None) -> None:
        """`count` runners; with `python` (a plain install's, see plain_install) its `volt`."""
        for _ in range(count):
            rid = f"r{len(self.runner_ids) + 1}"
            self.runner_ids.append(rid)
            args = ("runner", "--id", rid, "--workdir", str(self.tmp / rid), *extra)
            if python is None:
                self.start(rid, *args)
            else:
                self.start(rid, *args, python_args=(), program=str(python.with_name("volt")))
        self.wait_for_runners(len(self.runner_ids))

    def simulated_runners(self, name: str, count: int, mode: str, *extra: str) -> None:
        """`count` fake runners in one process (bench/simrunners.py); see that file for the modes."""
        prefix = f"{name}-"
        self.start(
            name,
            "--count",
            str(count),
            "--mode",
            mode,
            "--prefix",
            prefix,
            *extra,
            python_args=(str(BENCH / "simrunners.py"),),
        )
        if mode == "answer":  # it declares a queue for each
            self.runner_ids.extend(f"{prefix}{i}" for i in range(count))

    def wait_for_runners(self, count: int, timeout: float = 60) -> None:
        wait(lambda: ask(self.settings, "ping")["runners"] >= count, timeout, every=0.2, what=f"{count} runners")

    def observer(self, repos: list[Path], poll: float) -> None:
        args = [a for r in repos for a in ("--repo", str(r))]
        self.start("observer", "observer", *args, "--poll", str(poll), "--state-dir", str(self.tmp / "obs"))

    def publish(self, repo: Path | str, commit: str, read_asks: bool = False) -> None:
        """Publish a commit; with `read_asks`, with what its .volt.toml asks for
        (labels, split), as the observer would."""
        from observer.publish import AsksRead, publish_commit

        asks = AsksRead(str(repo), commit).result() if read_asks else None
        publish_commit(self.broker, str(repo), "main", commit, source="bench", asks=asks)

    # -- results, read from the dispatcher's store (read-only: no load on the dispatcher)

    def db(self) -> Any:
        if self._db is None:
            if self.pg_url:
                import psycopg
                from psycopg.rows import dict_row

                self._db = psycopg.connect(self.pg_url, autocommit=True, row_factory=dict_row)
            else:
                self._db = sqlite3.connect(f"file:{self.db_path}?mode=ro", uri=True, isolation_level=None)
                self._db.row_factory = sqlite3.Row
        return self._db

    def query(self, sql: str, args: tuple[Any, ...] = ()) -> list[dict[str, Any]]:
        """Rows of the store (sql with ? marks) as dicts, on either database."""
        if self.pg_url:
            sql = sql.replace("?", "%s")
        return [dict(r) for r in self.db().execute(sql, args).fetchall()]

    def done_count(self) -> int:
        return int(next(iter(self.query("SELECT COUNT(*) AS n FROM jobs WHERE state = 'done'")[0].values())))

    def done_rows(self) -> list[dict[str, Any]]:
        return self.query("SELECT * FROM jobs WHERE state = 'done' ORDER BY finished_at")

    def result_for(self, commit: str, timeout: float = 120) -> dict[str, Any]:
        """The recorded result of a commit (times as epoch seconds), once it is there."""
        found: dict[str, Any] = {}

        def done() -> bool:
            rows = self.query("SELECT * FROM jobs WHERE commit_sha = ? AND state = 'done'", (commit,))
            if rows:
                found.update(rows[0])
            return bool(rows)

        wait(done, timeout, every=0.01, what=f"result of {commit[:12]}")
        return found

    def results(self) -> list[dict[str, Any]]:
        """Finished results through the dispatcher's own query (as `volt results` sees them)."""
        return ask(self.settings, "results", {"limit": 10000})

    @staticmethod
    def wait(check: Callable[[], Any], timeout: float, every: float = 0.05) -> None:
        wait(check, timeout, every)

    def close(self) -> None:
        if self._db is not None:
            self._db.close()
        # Runners first: one that drains finishes its job (a split run's shard
        # asks the dispatcher for more) while the dispatcher still answers.
        for last in (False, True):
            group = [proc for name, proc in self.procs.items() if name.startswith("dispatcher") == last]
            for proc in group:
                if proc.poll() is None:
                    proc.send_signal(signal.SIGTERM)
            for proc in group:
                try:
                    proc.wait(timeout=20)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
        # A fresh connection: the old one may have sat unserviced past its
        # heartbeat timeout during a long run, and the broker dropped it.
        self.broker.close()
        self.broker.connect(give_up_after=10)
        for queue in naming.shared_queues(self.ns) + [naming.runner_queue(self.ns, r) for r in self.runner_ids]:
            self.broker.delete_queue(queue)
        for exchange in naming.exchanges(self.ns):
            self.broker.delete_exchange(exchange)
        self.broker.close()
        if self.pg_url:
            _drop_pg_database(self.pg_url)
        if os.environ.get("VOLT_BENCH_KEEP"):
            progress(f"kept {self.tmp} (logs of every process)")
        else:
            shutil.rmtree(self.tmp, ignore_errors=True)
