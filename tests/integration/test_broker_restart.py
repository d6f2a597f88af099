"""A RabbitMQ node of the test's own, stopped and started under a running system."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from support import GitRepo, Volt, pids, suite


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _listening(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
        return True
    except OSError:
        return False


class Node:
    """A second RabbitMQ node on its own ports and data folder."""

    def __init__(self, base: Path) -> None:
        if shutil.which("rabbitmq-server") is None or shutil.which("rabbitmqctl") is None:
            pytest.fail("the broker-restart test needs rabbitmq-server and rabbitmqctl installed locally")
        self.base = base
        self.name = f"volt{uuid.uuid4().hex[:8]}@localhost"
        self.port = _free_port()
        self.url = f"amqp://guest:guest@127.0.0.1:{self.port}/%2F"
        for sub in ("mnesia", "log"):
            (base / sub).mkdir(parents=True, exist_ok=True)
        (base / "enabled_plugins").write_text("[].\n")
        (base / "rabbitmq.conf").write_text(f"listeners.tcp.default = {self.port}\nloopback_users = none\n")
        # Run as root, rabbitmq-server drops to the rabbitmq user, which must own the folder.
        subprocess.run(["chown", "-R", "rabbitmq:rabbitmq", str(base)], check=False, capture_output=True)
        self.env = {
            **os.environ,
            "RABBITMQ_NODENAME": self.name,
            "RABBITMQ_NODE_PORT": str(self.port),
            "RABBITMQ_DIST_PORT": str(_free_port()),
            "RABBITMQ_MNESIA_BASE": str(base / "mnesia"),
            "RABBITMQ_LOG_BASE": str(base / "log"),
            "RABBITMQ_ENABLED_PLUGINS_FILE": str(base / "enabled_plugins"),
            "RABBITMQ_CONFIG_FILE": str(base / "rabbitmq"),
        }
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        out = open(self.base / "server.out", "ab")  # noqa: SIM115 - lives with the node
        self.proc = subprocess.Popen(
            ["rabbitmq-server"], env=self.env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )
        deadline = time.monotonic() + 90
        while not _listening(self.port):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"second RabbitMQ node did not start:\n{(self.base / 'server.out').read_text()[-2000:]}")
            time.sleep(0.2)

    def stop(self) -> None:
        subprocess.run(["rabbitmqctl", "-n", self.name, "stop"], capture_output=True, timeout=60, check=False)
        if self.proc is not None:
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, 9)
        assert not _listening(self.port)


@pytest.fixture
def node() -> Iterator[Node]:
    # Not under tmp_path: the rabbitmq user must be able to reach the folder.
    base = Path(tempfile.mkdtemp(prefix="volt-rabbit-"))
    n = Node(base)
    n.start()
    try:
        yield n
    finally:
        n.stop()
        shutil.rmtree(base, ignore_errors=True)


def test_every_worker_survives_a_broker_restart_and_loses_nothing(node, tmp_path):
    volt = Volt(node.url, "restart", tmp_path)
    repo = GitRepo(tmp_path / "repo")
    try:
        first = repo.commit({"a.txt": "0", ".volt.toml": '[test]\ncommand = ["true"]\n'})
        volt.dispatcher()
        volt.runner("rs-a", heartbeat=0.5)
        volt.observer(repo.path, poll=0.2)
        volt.wait_results(1, commit=first)

        marker = tmp_path / "runs"
        slow = repo.commit(suite(marker, first_sleep=3))
        volt.wait_for("the slow run to start", lambda: len(pids(marker)) == 1)
        volt.broker.close()
        node.stop()
        # While the broker is down: the running job finishes into the outbox,
        # and a new commit waits for the observer to reach the broker.
        outbox = tmp_path / "rs-a" / "outbox"
        volt.wait_for("the result to wait in the outbox", lambda: list(outbox.glob("*.json")), timeout=30)
        during = repo.commit({"a.txt": "2", ".volt.toml": '[test]\ncommand = ["true"]\n'})
        time.sleep(1.0)
        assert all(p.poll() is None for p in volt.procs.values()), "a worker died with the broker"
        node.start()

        rows = volt.wait_results(3, timeout=90)
        assert sorted(r["commit"] for r in rows) == sorted([first, slow, during])
        for row in rows:
            assert row["status"] == "passed" and row["attempts"] == 1, row
            assert [e["kind"] for e in row["history"]].count("result") == 1
        assert not list(outbox.glob("*.json"))
        assert len(pids(marker)) == 1  # the slow suite ran once
        for name in ("dispatcher", "rs-a", "observer"):
            assert "reconnecting" in volt.log_of(name) or "lost the broker" in volt.log_of(name), name
    finally:
        volt.stop_all()
