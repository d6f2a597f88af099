"""What the benchmarks share: a real system in its own namespace, a real repository."""

from __future__ import annotations

import signal
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from datetime import datetime
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from common import naming  # noqa: E402
from common.broker import Broker  # noqa: E402
from common.settings import DEFAULT_AMQP_URL, BrokerSettings  # noqa: E402
from dispatcher.client import ask  # noqa: E402


def epoch(iso: str) -> float:
    return datetime.fromisoformat(iso.replace("Z", "+00:00")).timestamp()


def median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


class Repo:
    def __init__(self, path: Path) -> None:
        self.path = path
        path.mkdir(parents=True)
        self.git("init", "-q", "-b", "main")
        self.n = 0

    def git(self, *args: str) -> str:
        return subprocess.run(
            ["git", "-c", "user.name=bench", "-c", "user.email=bench@volt.invalid", *args],
            cwd=self.path,
            check=True,
            capture_output=True,
            text=True,
        ).stdout.strip()

    def commit(self, files: dict[str, str] | None = None) -> str:
        self.n += 1
        for name, content in (files or {}).items():
            (self.path / name).parent.mkdir(parents=True, exist_ok=True)
            (self.path / name).write_text(content)
        (self.path / "counter.txt").write_text(str(self.n))
        self.git("add", "-A")
        self.git("commit", "-q", "-m", f"change {self.n}")
        return self.git("rev-parse", "HEAD")


class System:
    """Dispatcher, runners and observer as real processes in a fresh namespace."""

    def __init__(self, amqp_url: str = DEFAULT_AMQP_URL, tag: str = "bench") -> None:
        self.tmp = Path(tempfile.mkdtemp(prefix=f"volt-{tag}-"))
        self.ns = f"{tag}-{uuid.uuid4().hex[:8]}"
        self.amqp_url = amqp_url
        self.settings = BrokerSettings(amqp_url=amqp_url, namespace=self.ns)
        self.procs: list[subprocess.Popen[bytes]] = []
        self.runner_ids: list[str] = []
        self.broker = Broker(self.settings, "volt-bench")
        self.broker.connect(give_up_after=10)
        self.broker.declare_topology()

    def start(self, name: str, *args: str) -> subprocess.Popen[bytes]:
        argv = [sys.executable, "-m", "common.cli", *args, "--amqp-url", self.amqp_url, "--namespace", self.ns]
        log = open(self.tmp / f"{name}.log", "ab")  # noqa: SIM115
        proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT)
        self.procs.append(proc)
        return proc

    def dispatcher(self, *extra: str) -> None:
        self.start("dispatcher", "dispatcher", "--db", str(self.tmp / "dispatcher.db"), *extra)

    def runners(self, count: int, *extra: str) -> None:
        for _ in range(count):
            rid = f"r{len(self.runner_ids) + 1}"
            self.runner_ids.append(rid)
            self.start(rid, "runner", "--id", rid, "--workdir", str(self.tmp / rid), *extra)
        self.wait(lambda: len(ask(self.settings, "status")["runners"]) >= len(self.runner_ids), 60)

    def observer(self, repo: Path, poll: float) -> None:
        self.start(
            "observer", "observer", "--repo", str(repo), "--poll", str(poll), "--state-dir", str(self.tmp / "obs")
        )

    def publish(self, repo: Path, commit: str) -> None:
        from observer.publish import publish_commit

        publish_commit(self.broker, str(repo), "main", commit, source="bench")

    def results(self) -> list[dict[str, Any]]:
        return ask(self.settings, "results", {"limit": 10000})

    def result_for(self, commit: str, timeout: float = 120) -> dict[str, Any]:
        found: dict[str, Any] = {}

        def done() -> bool:
            rows = ask(self.settings, "results", {"commit": commit, "limit": 1})
            if rows:
                found.update(rows[0])
            return bool(rows)

        self.wait(done, timeout, every=0.01)
        return found

    @staticmethod
    def wait(check: Any, timeout: float, every: float = 0.05) -> None:
        deadline = time.monotonic() + timeout
        while not check():
            if time.monotonic() > deadline:
                raise TimeoutError("benchmark waited too long")
            time.sleep(every)

    def close(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in self.procs:
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()
        for queue in naming.shared_queues(self.ns) + [naming.runner_queue(self.ns, r) for r in self.runner_ids]:
            self.broker.delete_queue(queue)
        for exchange in naming.exchanges(self.ns):
            self.broker.delete_exchange(exchange)
        self.broker.close()
