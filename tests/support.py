"""Helpers the tests share: real git repositories, Volt CI's real processes, fault suites."""

from __future__ import annotations

import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

from common import naming
from common.broker import Broker
from common.settings import BrokerSettings
from dispatcher.client import QueryFailed, ask
from dispatcher.registry import RunnerInfo

if TYPE_CHECKING:
    from dispatcher.store import JobRow, Store

# PostgreSQL for the store's tests and the cluster test: a server that lets this
# user create databases (the machine's own on 127.0.0.1:5432 by default).
PG_ADMIN_URL = os.environ.get("VOLT_TEST_PG_URL", "postgresql://postgres@127.0.0.1:5432/postgres")


@contextmanager
def pg_database() -> Iterator[str]:
    """A new, empty PostgreSQL database; its URL. Dropped afterwards."""
    import psycopg

    name = f"volt_test_{uuid.uuid4().hex[:12]}"
    try:
        admin = psycopg.connect(PG_ADMIN_URL, autocommit=True, connect_timeout=5)
    except psycopg.OperationalError as exc:
        pytest.fail(
            f"no PostgreSQL for the tests at {PG_ADMIN_URL} (set VOLT_TEST_PG_URL, or start it: "
            f"`pg_ctlcluster --skip-systemctl-redirect VERSION main start`): {exc}"
        )
    try:
        admin.execute(f'CREATE DATABASE "{name}"')
        base, _, _ = PG_ADMIN_URL.rpartition("/")
        yield f"{base}/{name}"
    finally:
        # WITH (FORCE): a dispatcher a test killed may still hold a session.
        admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        admin.close()


def runner_info(
    runner_id: str, state: str = "idle", labels: tuple[str, ...] = ("linux",), last_seen: float = 50.0
) -> RunnerInfo:
    """A live runner as the dispatcher's registry holds it, for unit tests of what it shows."""
    return RunnerInfo(
        runner_id=runner_id,
        session="s",
        host="build-host",
        pid=1,
        state=state,
        job_id="",
        attempt=0,
        interval=2.0,
        labels=list(labels),
        first_seen=0.0,
        last_seen=last_seen,
        deadline=100.0,
    )


def finished_job(
    store: Store,
    repo: str,
    branch: str,
    commit: str,
    at: float,
    status: str = "passed",
    tests: Sequence[tuple[str, str, float]] = (),
    subject: str = "",
    author: str = "",
    split: int = 1,
    duration_s: float = 7.0,
    wait_s: float = 2.0,
) -> JobRow:
    """A job seen at `at` and taken to its result as the dispatcher records one:
    its (node id, outcome, seconds) reported by its runner, or with split > 1 a
    split run whose one shard reported them chunk by chunk under the run's id."""
    from common.messages import CommitSeen, JobResult

    seen = CommitSeen(repo=repo, branch=branch, commit=commit, seen_at=at, subject=subject, author=author, split=split)
    row = store.add_job(seen)
    job = row.job_id
    if split > 1:
        (first, *_) = store.make_run(job, at + 1)
        job = first.job_id
    store.mark_queued(job, 1, at + 1)
    lease = store.assign(job, 1, "r1", at + 1 + wait_s)
    assert lease and store.start(job, lease, "r1", "s", started_at=at + 1 + wait_s, now=at + 1 + wait_s)
    counts = {k: sum(1 for t in tests if t[1] == k) for k in ("passed", "failed")}
    if split > 1:
        store.run_started(row.job_id, at + 1 + wait_s)
        store.add_chunks(row.job_id, [([t[0] for t in tests], 1.0)])
        assert store.take_chunk(row.job_id, 0, lease, 1)
        store.record_chunk(row.job_id, [(node, outcome, secs, 0) for node, outcome, secs in tests], "r1")
        done = JobResult(job_id=job, attempt=1, runner_id="r1", status="passed", lease=lease)
        assert store.finish(done, at + 9 + wait_s)
        assert store.finish_run(
            row.job_id, status, (counts["passed"], counts["failed"], 0, 0), "", "", at + 10 + wait_s
        )
    else:
        done = JobResult(
            job_id=job,
            attempt=1,
            runner_id="r1",
            status=status,
            lease=lease,
            tests=[list(t) for t in tests],
            duration_s=duration_s,
            **counts,
        )
        assert store.finish(done, at + 10 + wait_s)
    got = store.get(row.job_id)
    assert got is not None
    return got


class GitRepo:
    """A real git repository in a temporary folder, committed to with plain git."""

    def __init__(self, path: Path) -> None:
        self.path = path
        path.mkdir(parents=True, exist_ok=True)
        self.git("init", "-q", "-b", "main")

    def git(self, *args: str) -> str:
        out = subprocess.run(
            ["git", "-c", "user.name=Volt Test", "-c", "user.email=test@volt.invalid", *args],
            cwd=self.path,
            check=True,
            capture_output=True,
            text=True,
        )
        return out.stdout.strip()

    def commit(self, files: dict[str, str | None], message: str = "change") -> str:
        """Write (or, with None, delete) files and commit them; returns the commit id."""
        for name, content in files.items():
            target = self.path / name
            if content is None:
                target.unlink(missing_ok=True)
            else:
                target.parent.mkdir(parents=True, exist_ok=True)
                target.write_text(content)
        self.git("add", "-A")
        self.git("commit", "-q", "--allow-empty", "-m", message)
        return self.git("rev-parse", "HEAD")


class Volt:
    """Volt CI's real processes in one test namespace, with helpers to drive and watch them."""

    def __init__(self, amqp_url: str, ns: str, tmp: Path) -> None:
        self.amqp_url = amqp_url
        self.ns = ns
        self.tmp = tmp
        self.settings = BrokerSettings(amqp_url=amqp_url, namespace=ns)
        self.procs: dict[str, subprocess.Popen[bytes]] = {}
        self.runner_ids: set[str] = set()
        self._broker: Broker | None = None

    def common(self, amqp_url: str | None = None) -> list[str]:
        return ["--amqp-url", amqp_url or self.amqp_url, "--namespace", self.ns, "--log-level", "DEBUG"]

    def argv(self, *args: str, amqp_url: str | None = None) -> list[str]:
        return [sys.executable, "-m", "common.cli", *args, *self.common(amqp_url)]

    def run(self, *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
        """Run one `volt` command to completion."""
        return subprocess.run(self.argv(*args), capture_output=True, text=True, timeout=timeout, cwd=self.tmp)

    def start(
        self, name: str, *args: str, env: dict[str, str] | None = None, amqp_url: str | None = None
    ) -> subprocess.Popen[bytes]:
        """Start `volt ARGS`; `env` is added to this process's environment; `amqp_url`
        is the broker it connects to, if not the namespace's own."""
        log = open(self.tmp / f"{name}.log", "ab")  # noqa: SIM115 - closed with the process
        full_env = {**os.environ, **env} if env else None
        proc = subprocess.Popen(
            self.argv(*args, amqp_url=amqp_url), stdout=log, stderr=subprocess.STDOUT, cwd=self.tmp, env=full_env
        )
        self.procs[name] = proc
        return proc

    def dispatcher(self, *extra: str) -> subprocess.Popen[bytes]:
        return self.start("dispatcher", "dispatcher", "--db", str(self.tmp / "dispatcher.db"), *extra)

    def runner(
        self,
        runner_id: str,
        *extra: str,
        heartbeat: float = 0.5,
        sandbox: str = "none",
        env: dict[str, str] | None = None,
    ) -> subprocess.Popen[bytes]:
        """A runner. Without a sandbox by default: these tests count a job's runs by
        pids and files on the host, which a sandbox would hide (it has tests of its own)."""
        self.runner_ids.add(runner_id)
        return self.start(
            runner_id,
            "runner",
            "--id",
            runner_id,
            "--workdir",
            str(self.tmp / runner_id),
            "--heartbeat-interval",
            str(heartbeat),
            "--sandbox",
            sandbox,
            *extra,
            env=env,
        )

    def observer(self, repo: Path, *extra: str, poll: float = 0.2) -> subprocess.Popen[bytes]:
        return self.start(
            "observer",
            "observer",
            "--repo",
            str(repo),
            "--poll",
            str(poll),
            "--state-dir",
            str(self.tmp / "observer"),
            *extra,
        )

    def log_of(self, name: str) -> str:
        return (self.tmp / f"{name}.log").read_text(errors="replace")

    def ask(self, method: str, params: dict[str, Any] | None = None, timeout: float = 10) -> Any:
        return ask(self.settings, method, params, timeout=timeout)

    def results(self, **params: Any) -> list[dict[str, Any]]:
        return self.ask("results", {"limit": 10000, **params})

    def wait_for(self, what: str, check: Callable[[], Any], timeout: float = 60, every: float = 0.2) -> Any:
        """Poll `check` until it returns something truthy; fail naming `what` otherwise."""
        deadline = time.monotonic() + timeout
        last_error: Exception | None = None
        while time.monotonic() < deadline:
            try:
                value = check()
                if value:
                    return value
            except QueryFailed as exc:  # the dispatcher may be restarting
                last_error = exc
            time.sleep(every)
        logs = "\n".join(f"--- {n} ---\n{self.log_of(n)[-3000:]}" for n in self.procs)
        pytest.fail(f"timed out after {timeout}s waiting for {what} (last error: {last_error})\n{logs}")

    def wait_results(self, count: int, timeout: float = 60, **params: Any) -> list[dict[str, Any]]:
        return self.wait_for(
            f"{count} results",
            lambda: (rows := self.results(**params)) and len(rows) >= count and rows,
            timeout=timeout,
        )

    @property
    def broker(self) -> Broker:
        if self._broker is None or not self._broker.connected:
            self._broker = Broker(self.settings, "volt-test")
            self._broker.connect(give_up_after=10)
            self._broker.declare_topology()
        return self._broker

    def kill(self, name: str, sig: int = signal.SIGKILL) -> None:
        proc = self.procs[name]
        if proc.poll() is None:
            proc.send_signal(sig)
            proc.wait(timeout=30)

    def stop_all(self) -> None:
        for proc in self.procs.values():
            if proc.poll() is None:
                proc.send_signal(signal.SIGKILL)
        for proc in self.procs.values():
            proc.wait(timeout=30)

    def delete_topology(self) -> None:
        broker = self.broker
        for queue in naming.shared_queues(self.ns) + [naming.runner_queue(self.ns, r) for r in self.runner_ids]:
            broker.delete_queue(queue)
        for exchange in naming.exchanges(self.ns):
            broker.delete_exchange(exchange)
        broker.close()


def _recording_suite(marker: str, then: str) -> dict[str, str]:
    """A .volt.toml whose command appends its pid to the file that the Python
    expression `marker` names, and `overlap <pid>` for each earlier run recorded
    there that still lives (a job that ran twice at the same time), then runs
    the code `then` (which may read `runs`: how many ran before)."""
    code = (
        "import os, time\n"
        f"m = {marker}\n"
        "prev = [p for p in open(m).read().splitlines() if p.isdigit()] if os.path.exists(m) else []\n"
        "def live(p):\n"
        "    try:\n"
        "        return open('/proc/' + p + '/stat').read().rsplit(')', 1)[1].split()[0] != 'Z'\n"
        "    except OSError:\n"
        "        return False\n"
        "clash = ''.join('overlap ' + p + chr(10) for p in prev if live(p))\n"
        "open(m, 'a').write(str(os.getpid()) + chr(10) + clash)\n"
        "runs = len(prev)\n"
        f"{then}\n"
    )
    return {".volt.toml": f"[test]\ncommand = [{sys.executable!r}, '-c', {code!r}]\n"}


def suite(marker: Path, first_sleep: float, later_sleep: float = 0.0, extra: str = "") -> dict[str, str]:
    """A .volt.toml whose command records each run's pid in `marker` and sleeps
    `first_sleep` on its first run, `later_sleep` after (so a retry is quick).

    A run that starts while an earlier run of the same suite still lives also
    writes `overlap <pid>`: `overlaps(marker)` says whether a job ran twice at once.
    """
    return _recording_suite(repr(str(marker)), f"{extra}\ntime.sleep({first_sleep} if runs == 0 else {later_sleep})")


def per_commit_suite(folder: Path, sleep: float) -> dict[str, str]:
    """A .volt.toml whose every run records its pid in `folder`/<commit>, and
    `overlap <pid>` when an earlier run of the same commit still lives: a job
    that ran twice at the same time shows as an overlap (`overlapping(folder)`)."""
    return _recording_suite(f"os.path.join({str(folder)!r}, os.environ['VOLT_COMMIT'])", f"time.sleep({sleep})")


def overlapping(folder: Path) -> list[str]:
    return [f"{f.name}: {line}" for f in folder.iterdir() for line in f.read_text().splitlines() if "overlap" in line]


def pids(marker: Path) -> list[int]:
    """The pid of each run a `suite` recorded (not the ones named by its overlap lines)."""
    return [int(p) for p in marker.read_text().splitlines() if p.isdigit()] if marker.exists() else []


def overlaps(marker: Path) -> list[str]:
    """The runs of a `suite` that started while an earlier one still ran."""
    return [line for line in marker.read_text().splitlines() if line.startswith("overlap")] if marker.exists() else []


def alive(pid: int) -> bool:
    """True while the process exists and is not a zombie."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, IndexError):
        return False
    return state != "Z"


def free_port() -> int:
    """A free TCP port below the kernel's ephemeral range, so that no outgoing
    connection can take it while a server that listens on it is restarted."""
    try:
        low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        low = 32768
    for port in random.sample(range(10000, max(low, 10001)), k=min(200, max(low - 10000, 1))):
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    pytest.fail("no free TCP port below the ephemeral range")


def _listening(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
        return True
    except OSError:
        return False


class Relay:
    """A TCP relay to the broker that a test can cut, as a network between a
    worker and its broker fails: `hang()` keeps the connections and passes
    nothing more (packets dropped: neither end hears a close), `drop()`
    closes them and refuses new ones (a node gone); `heal()` passes again."""

    def __init__(self, amqp_url: str) -> None:
        from urllib.parse import urlsplit

        parts = urlsplit(amqp_url)
        self.target = (parts.hostname or "127.0.0.1", parts.port or 5672)
        self.port = free_port()
        login = parts.netloc.rpartition("@")[0]
        # amqp_url (a single node's) through this relay.
        self.url = parts._replace(
            netloc=f"{login}@127.0.0.1:{self.port}" if login else f"127.0.0.1:{self.port}"
        ).geturl()
        self.mode = "pass"  # "pass", "hang" or "drop"
        self._socks: list[socket.socket] = []
        self._lock = threading.Lock()
        self._changed = threading.Condition()  # notified when the mode changes
        self._server = socket.create_server(("127.0.0.1", self.port))
        self._server.settimeout(0.2)
        self._closed = False
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while not self._closed:
            try:
                client, _ = self._server.accept()
            except OSError:
                continue
            if self.mode != "pass":
                client.close()
                continue
            try:
                upstream = socket.create_connection(self.target, timeout=5)
            except OSError:
                client.close()
                continue
            with self._lock:
                self._socks += [client, upstream]
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pump, args=(a, b), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket) -> None:
        src.settimeout(0.2)
        while not self._closed:
            try:
                data = src.recv(65536)
            except TimeoutError:
                continue
            except OSError:
                break
            if not data:
                break
            with self._changed:  # while hanging, held, as a dropped packet: never sent
                self._changed.wait_for(lambda: self.mode != "hang" or self._closed)
            if self.mode != "pass":
                break
            try:
                dst.sendall(data)
            except OSError:
                break
        for s in (src, dst):
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def _set(self, mode: str) -> None:
        with self._changed:
            self.mode = mode
            self._changed.notify_all()

    def hang(self) -> None:
        self._set("hang")

    def drop(self) -> None:
        self._set("drop")
        with self._lock:
            socks, self._socks = self._socks, []
        for s in socks:
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            s.close()

    def heal(self) -> None:
        if self.mode == "hang":  # what was held is gone, as after a partition
            self.drop()
        self._set("pass")

    def close(self) -> None:
        self._closed = True
        self.drop()
        self._server.close()


class Node:
    """A second RabbitMQ node on its own ports and data folder."""

    def __init__(self, base: Path, config: str = "", advanced: str = "") -> None:
        if shutil.which("rabbitmq-server") is None or shutil.which("rabbitmqctl") is None:
            pytest.fail("the broker-restart test needs rabbitmq-server and rabbitmqctl installed locally")
        self.base = base
        self.name = f"volt{uuid.uuid4().hex[:8]}@localhost"
        self.port = free_port()
        self.url = f"amqp://guest:guest@127.0.0.1:{self.port}/%2F"
        for sub in ("mnesia", "log"):
            (base / sub).mkdir(parents=True, exist_ok=True)
        (base / "enabled_plugins").write_text("[].\n")
        (base / "rabbitmq.conf").write_text(f"listeners.tcp.default = {self.port}\nloopback_users = none\n{config}")
        (base / "advanced.config").write_text(advanced or "[].\n")
        # Run as root, rabbitmq-server drops to the rabbitmq user, which must own the folder.
        subprocess.run(["chown", "-R", "rabbitmq:rabbitmq", str(base)], check=False, capture_output=True)
        self.env = {
            **os.environ,
            "RABBITMQ_NODENAME": self.name,
            "RABBITMQ_NODE_PORT": str(self.port),
            "RABBITMQ_DIST_PORT": str(free_port()),
            "RABBITMQ_MNESIA_BASE": str(base / "mnesia"),
            "RABBITMQ_LOG_BASE": str(base / "log"),
            "RABBITMQ_ENABLED_PLUGINS_FILE": str(base / "enabled_plugins"),
            "RABBITMQ_CONFIG_FILE": str(base / "rabbitmq"),
            "RABBITMQ_ADVANCED_CONFIG_FILE": str(base / "advanced.config"),
        }
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        self.launch()
        self.wait_listening()

    def launch(self) -> None:
        """Start the node's process without waiting for it (see wait_listening)."""
        out = open(self.base / "server.out", "ab")  # noqa: SIM115 - lives with the node
        self.proc = subprocess.Popen(
            ["rabbitmq-server"], env=self.env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )

    def wait_listening(self, timeout: float = 90) -> None:
        assert self.proc is not None
        deadline = time.monotonic() + timeout
        while not _listening(self.port):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                pytest.fail(
                    f"RabbitMQ node {self.name} did not start:\n{(self.base / 'server.out').read_text()[-2000:]}"
                )
            time.sleep(0.2)

    def ctl(self, *args: str, timeout: float = 120) -> str:
        """rabbitmqctl on this node; fails the test with its output if it fails."""
        out = subprocess.run(
            ["rabbitmqctl", "-n", self.name, *args], capture_output=True, text=True, timeout=timeout, check=False
        )
        if out.returncode != 0:
            pytest.fail(f"rabbitmqctl -n {self.name} {' '.join(args)} failed:\n{out.stdout}\n{out.stderr}")
        return out.stdout

    def kill(self) -> None:
        """kill -9 of the node's Erlang VM: what a crashed machine looks like. (It
        runs in a session of its own, under su, so it is found by asking it.)"""
        assert self.proc is not None
        beam = int("".join(c for c in self.ctl("eval", "os:getpid().") if c.isdigit()))
        os.kill(beam, signal.SIGKILL)
        self.proc.wait(timeout=30)
        deadline = time.monotonic() + 30
        while _listening(self.port):
            if time.monotonic() > deadline:
                pytest.fail(f"RabbitMQ node {self.name} still listens after kill -9")
            time.sleep(0.1)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is not None:
            return  # killed, or never came up
        subprocess.run(["rabbitmqctl", "-n", self.name, "stop"], capture_output=True, timeout=60, check=False)
        if self.proc is not None:
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, 9)
        assert not _listening(self.port)


@contextmanager
def rabbit_node(config: str = "", advanced: str = "") -> Iterator[Node]:
    """A started second node, stopped and removed afterwards."""
    # Not under tmp_path: the rabbitmq user must be able to reach the folder.
    base = Path(tempfile.mkdtemp(prefix="volt-rabbit-"))
    node = Node(base, config, advanced)
    node.start()
    try:
        yield node
    finally:
        node.stop()
        shutil.rmtree(base, ignore_errors=True)


@contextmanager
def rabbit_cluster(size: int = 3) -> Iterator[list[Node]]:
    """`size` private RabbitMQ nodes (own names, ports and data folders) joined
    into one cluster; all stopped and removed afterwards, whatever happens."""
    base = Path(tempfile.mkdtemp(prefix="volt-cluster-"))
    nodes = [Node(base / f"node{i}") for i in range(size)]
    # Started as root, each node drops to the rabbitmq user, which must own the folders.
    subprocess.run(["chown", "-R", "rabbitmq:rabbitmq", str(base)], check=False, capture_output=True)
    try:
        for node in nodes:
            node.launch()  # all at once: a node takes seconds to boot
        for node in nodes:
            node.wait_listening()
        for node in nodes[1:]:
            node.ctl("stop_app")
            node.ctl("join_cluster", nodes[0].name)
            node.ctl("start_app")
        nodes[0].ctl("await_online_nodes", str(size))
        yield nodes
    finally:
        for node in nodes:
            try:
                node.stop()
            except (subprocess.TimeoutExpired, AssertionError, OSError):
                if node.proc is not None and node.proc.poll() is None:
                    os.killpg(node.proc.pid, signal.SIGKILL)
        shutil.rmtree(base, ignore_errors=True)


class GitHttpServer:
    """Bare repositories under `root` served over smart HTTP by git's own
    `git http-backend` on 127.0.0.1, behind Basic auth when a user is given.
    Every request's path and whether its login was right are kept in `requests`."""

    def __init__(self, root: Path, user: str = "", password: str = "") -> None:
        import base64
        import http.server
        import threading

        self.root = root
        self.requests: list[tuple[str, bool]] = []
        expected = "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode() if user else None
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - the base class's name
                pass

            def do_GET(self) -> None:
                self._serve()

            def do_POST(self) -> None:
                self._serve()

            def _serve(self) -> None:
                authorized = expected is None or self.headers.get("Authorization") == expected
                server.requests.append((self.path, authorized))
                if not authorized:
                    self.send_response(401)
                    self.send_header("WWW-Authenticate", 'Basic realm="volt-test"')
                    self.end_headers()
                    return
                body = self._body()
                path, _, query = self.path.partition("?")
                env = {
                    "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
                    "GIT_PROJECT_ROOT": str(server.root),
                    "GIT_HTTP_EXPORT_ALL": "1",
                    "GATEWAY_INTERFACE": "CGI/1.1",
                    "SERVER_PROTOCOL": "HTTP/1.0",
                    "REQUEST_METHOD": self.command,
                    "PATH_INFO": path,
                    "QUERY_STRING": query,
                    "CONTENT_TYPE": self.headers.get("Content-Type", ""),
                    "CONTENT_LENGTH": str(len(body)),
                    "REMOTE_ADDR": "127.0.0.1",
                    "REMOTE_USER": user,
                }
                for header in ("Content-Encoding", "Git-Protocol"):
                    if self.headers.get(header):
                        env["HTTP_" + header.upper().replace("-", "_")] = self.headers[header]
                out = subprocess.run(
                    ["git", "http-backend"], input=body, env=env, capture_output=True, timeout=120, check=False
                ).stdout
                head, _, payload = out.partition(b"\r\n\r\n")
                if not _:
                    head, _, payload = out.partition(b"\n\n")
                status, headers = 200, []
                for line in head.decode("latin-1").splitlines():
                    name, _, value = line.partition(":")
                    if name.lower() == "status":
                        status = int(value.split()[0])
                    elif name:
                        headers.append((name, value.strip()))
                self.send_response(status)
                for name, value in headers:
                    self.send_header(name, value)
                self.end_headers()
                self.wfile.write(payload)

            def _body(self) -> bytes:
                if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
                    chunks = []
                    while size := int(self.rfile.readline().split(b";")[0], 16):
                        chunks.append(self.rfile.read(size))
                        self.rfile.readline()
                    self.rfile.readline()
                    return b"".join(chunks)
                return self.rfile.read(int(self.headers.get("Content-Length") or 0))

        self._httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self._httpd.server_address[1]
        self._thread = threading.Thread(target=self._httpd.serve_forever, daemon=True)
        self._thread.start()

    def url(self, name: str, user: str = "", password: str = "") -> str:
        """The URL of the repository `root/name`, with a login in it when given one."""
        login = f"{user}:{password}@" if user else ""
        return f"http://{login}127.0.0.1:{self.port}/{name}"

    def close(self) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()


def many_commits(repo: GitRepo, count: int, branch: str = "main") -> list[str]:
    """`count` empty commits on `branch` in one `git fast-import` (thousands a
    second, where `git commit` makes tens); returns them oldest first."""
    try:
        parent = repo.git("rev-parse", "--verify", "-q", f"refs/heads/{branch}")
    except subprocess.CalledProcessError:
        parent = ""
    start = int(time.time())
    lines = []
    for i in range(count):
        message = f"commit {i + 1} of {count}\n".encode()
        lines.append(
            f"commit refs/heads/{branch}\ncommitter Volt Test <test@volt.invalid> {start + i} +0000\n".encode()
        )
        lines.append(b"data %d\n%s" % (len(message), message))
        if i == 0 and parent:
            lines.append(f"from {parent}\n".encode())
        lines.append(b"\n")
    subprocess.run(["git", "fast-import", "--quiet"], input=b"".join(lines), cwd=repo.path, check=True)
    since = [f"^{parent}"] if parent else []
    return repo.git("rev-list", "--reverse", f"refs/heads/{branch}", *since).split()


def commit_suite(folder: Path, sleep: float = 0.0, slow: float = 0.0, slow_share: float = 0.0) -> dict[str, str]:
    """A .volt.toml whose command records each run's pid in `folder/<commit>`
    (from VOLT_COMMIT) and sleeps `sleep`: one marker per commit, so the runs
    of many jobs on many runners are counted each on its own. About
    `slow_share` of the commits (chosen by their id) sleep `slow` instead.

    A run that starts while an earlier run of the same commit still lives also
    writes `overlap <pid>` (see `suite`)."""
    code = (
        "import os, time\n"
        "c = os.environ['VOLT_COMMIT']\n"
        f"m = os.path.join({str(folder)!r}, c)\n"
        "prev = [p for p in open(m).read().split() if p.isdigit()] if os.path.exists(m) else []\n"
        "def live(p):\n"
        "    try:\n"
        "        return open('/proc/' + p + '/stat').read().rsplit(')', 1)[1].split()[0] != 'Z'\n"
        "    except OSError:\n"
        "        return False\n"
        "clash = ''.join('overlap ' + p + chr(10) for p in prev if live(p))\n"
        "open(m, 'a').write(str(os.getpid()) + chr(10) + clash)\n"
        f"time.sleep({slow} if int(c[:4], 16) < {int(slow_share * 65536)} else {sleep})\n"
    )
    folder.mkdir(parents=True, exist_ok=True)
    return {".volt.toml": f"[test]\ncommand = [{sys.executable!r}, '-c', {code!r}]\n"}


def runs_per_commit(folder: Path) -> dict[str, int]:
    """How many times each commit's `commit_suite` ran."""
    return {p.name: len(pids(p)) for p in folder.iterdir()} if folder.exists() else {}


def all_overlaps(folder: Path) -> dict[str, list[str]]:
    """The commits of a `commit_suite` folder that ran twice at once, with the overlap lines."""
    found = {p.name: overlaps(p) for p in folder.iterdir()} if folder.exists() else {}
    return {sha: lines for sha, lines in found.items() if lines}


def run_quiet(volt: Volt, *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    """Run one `volt` command to completion at log level WARNING, as a user would
    see it: a refusal must then be exactly one line."""
    argv = [sys.executable, "-m", "common.cli", *args, "--amqp-url", volt.amqp_url, "--namespace", volt.ns]
    return subprocess.run(
        [*argv, "--log-level", "WARNING"], capture_output=True, text=True, timeout=timeout, cwd=volt.tmp
    )


def jobs_in_store(db: Path) -> list[tuple[str, str, str | None]]:
    """(commit, state, status) of every job in a dispatcher's store file, read directly."""
    import sqlite3

    if not db.exists():
        return []
    conn = sqlite3.connect(f"{db.resolve().as_uri()}?mode=ro", uri=True)
    try:
        return list(conn.execute("SELECT commit_sha, state, status FROM jobs"))
    finally:
        conn.close()


class CommitTap:
    """Every CommitSeen published in a namespace where no dispatcher runs, taken off
    the dispatcher's queue as they come. By consuming: a quorum queue with a
    single active consumer refuses basic.get."""

    def __init__(self, volt: Volt) -> None:
        from common.messages import CommitSeen

        self.volt = volt
        self.queue = naming.dispatcher_commits_queue(volt.ns)
        self.seen: list[CommitSeen] = []
        self._on: Broker | None = None
        volt.broker.declare_topology()  # the queue exists before anything is published

    def take(self) -> list[str]:
        """The commits published so far, in order."""
        from common.messages import CommitSeen

        broker = self.volt.broker
        if self._on is not broker:  # first use, or the test's connection was made again

            def keep(delivery: Any) -> None:
                self.seen.append(CommitSeen.from_json(delivery.body))
                delivery.ack()

            broker.consume(self.queue, keep, prefetch=1000)
            self._on = broker
        broker.process(0.05)
        return [m.commit for m in self.seen]
