"""`volt demo`: Volt CI's main job on a sample repository it makes, start to finish.

It creates a git repository with unittest-style tests (as the seed's), runs
`volt up` on it, makes a few commits (one of them failing), waits for every
result, prints them, and stops everything cleanly.
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

from common import exits
from common.settings import BrokerSettings, SettingsError

GOOD = """import unittest


class TestArithmetic(unittest.TestCase):
    def test_add(self):
        self.assertEqual(1 + 1, 2)

    def test_multiply(self):
        self.assertEqual(3 * 4, 12)
"""
BAD = (
    GOOD
    + """
    def test_divide(self):
        self.assertEqual(7 // 2, 3.5)
"""
)
FIXED = (
    GOOD
    + """
    def test_divide(self):
        self.assertEqual(7 / 2, 3.5)
"""
)


def add_parsers(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser("demo", help="run Volt CI on a sample repository it creates, and show the results")
    p.add_argument(
        "--dir",
        default=".volt/demo",
        help="where the sample repository and state go, remade each run (default .volt/demo)",
    )
    p.add_argument("--runners", type=int, default=2, metavar="N", help="runners to start (default 2)")
    p.set_defaults(func=main)


def _git(repo: Path, *args: str) -> str:
    out = subprocess.run(
        ["git", "-c", "user.name=Volt Demo", "-c", "user.email=demo@volt.invalid", *args],
        cwd=repo,
        check=True,
        capture_output=True,
        text=True,
    )
    return out.stdout.strip()


def _commit(repo: Path, content: str, message: str) -> str:
    (repo / "tests").mkdir(exist_ok=True)
    (repo / "tests" / "test_arithmetic.py").write_text(content)
    _git(repo, "add", "-A")
    _git(repo, "commit", "-q", "-m", message)
    sha = _git(repo, "rev-parse", "HEAD")
    print(f"demo: committed {sha[:12]} {message}", flush=True)
    return sha


def main(args: argparse.Namespace) -> int:
    from dispatcher.client import QueryFailed, ask

    if args.runners < 1:
        raise SettingsError("--runners must be at least 1")
    base = Path(args.dir).resolve()
    shutil.rmtree(base, ignore_errors=True)
    repo = base / "sample-repo"
    repo.mkdir(parents=True)
    _git(repo, "init", "-q", "-b", "main")
    commits = [_commit(repo, GOOD, "add arithmetic tests")]
    # A namespace of its own, so the demo never meets another instance's jobs.
    ns = f"{args.namespace}-demo-{uuid.uuid4().hex[:6]}"
    flags = ["--namespace", ns, "--log-level", "WARNING"]
    # The broker URL may hold a password: through the environment, not the command line.
    env = {**os.environ, "VOLT_AMQP_URL": args.amqp_url}
    up = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "common.cli",
            "up",
            "--repo",
            str(repo),
            "--runners",
            str(args.runners),
            "--poll",
            "0.5",
            "--state-dir",
            str(base / "state"),
            *flags,
        ],  # fmt: skip
        env=env,
    )
    settings = BrokerSettings(amqp_url=args.amqp_url, namespace=ns)
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                if ask(settings, "status", timeout=2)["runners"]:
                    break
            except QueryFailed:
                pass
            if time.monotonic() > deadline or up.poll() is not None:
                print("demo: the system did not come up", file=sys.stderr)
                return exits.UNHEALTHY
            time.sleep(0.3)
        time.sleep(1.0)  # let the observer see the first commit before the next ones
        commits.append(_commit(repo, BAD, "add a division test (wrong)"))
        commits.append(_commit(repo, FIXED, "fix the division test"))
        print("demo: waiting for every commit's result ...", flush=True)
        deadline = time.monotonic() + 120
        while True:
            rows = ask(settings, "results", {"limit": 100})
            if {r["commit"] for r in rows} >= set(commits):
                break
            if time.monotonic() > deadline:
                print("demo: timed out waiting for results", file=sys.stderr)
                return exits.UNHEALTHY
            time.sleep(0.3)
        subprocess.run([sys.executable, "-m", "common.cli", "status", *flags], check=False, env=env)
        print("\n$ volt results", flush=True)
        subprocess.run([sys.executable, "-m", "common.cli", "results", *flags], check=False, env=env)
        failed = next((r for r in rows if r["status"] == "failed"), None)
        if failed:
            print(f"\n$ volt log {failed['commit'][:12]}", flush=True)
            subprocess.run(
                [sys.executable, "-m", "common.cli", "log", failed["commit"][:12], *flags], check=False, env=env
            )
        statuses = {r["commit"]: r["status"] for r in rows}
        ok = [statuses[c] for c in commits] == ["passed", "failed", "passed"]
        print(f"\ndemo: {'all results as expected' if ok else 'UNEXPECTED results'}; stopping", flush=True)
        return exits.OK if ok else exits.UNHEALTHY
    finally:
        if up.poll() is None:
            up.send_signal(signal.SIGINT)
            try:
                up.wait(timeout=30)
            except subprocess.TimeoutExpired:
                up.kill()
        _remove_namespace(settings, args.runners)


def _remove_namespace(settings: BrokerSettings, runners: int) -> None:
    """Leave the broker as the demo found it."""
    import socket

    from common import naming
    from common.broker import Broker, BrokerUnavailable

    host = socket.gethostname().split(".")[0]
    ns = settings.namespace
    broker = Broker(settings, "volt-demo")
    try:
        broker.connect(give_up_after=5)
        queues = naming.shared_queues(ns) + [naming.runner_queue(ns, f"{host}-{i}") for i in range(1, runners + 1)]
        for queue in queues:
            broker.delete_queue(queue)
        for exchange in naming.exchanges(ns):
            broker.delete_exchange(exchange)
    except BrokerUnavailable:
        pass
    finally:
        broker.close()
