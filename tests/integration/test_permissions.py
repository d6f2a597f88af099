"""deploy/rabbitmq/definitions.json on a real RabbitMQ: each role can do its work, and no more.

Each deployment is the file itself, imported with `rabbitmqctl import_definitions`
into a throwaway vhost, with the users renamed (a unique suffix) and given fresh
random passwords. The roles then act through the project's own Broker, and at
the end through the real `volt` processes. The vhost and the users are deleted
afterwards.

rabbitmqctl must manage the broker the integration tests use; without it these
tests fail (they are never skipped).
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import secrets
import shlex
import shutil
import signal
import subprocess
import sys
import threading
import time
import urllib.parse
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from common import naming
from common.broker import Broker, BrokerUnavailable, Delivery, _translated
from common.messages import CommitSeen, Heartbeat, Hello, Job, JobResult, JobStarted, Reply, Request
from common.settings import BrokerSettings
from dispatcher.client import QueryFailed, ask

ROOT = Path(__file__).resolve().parents[2]
DEFINITIONS = ROOT / "deploy" / "rabbitmq" / "definitions.json"
NS = "volt"  # the permissions are written for this namespace; the vhost isolates the test
ROLES = ("dispatcher", "observer", "runner", "viewer")
CTL_TIMEOUT = 120
SHA = "a" * 40
PASS = "def test_one():\n    assert True\n"


# -- rabbitmqctl and the deployment ---------------------------------------------


def rabbitmqctl_argv() -> list[str]:
    """The rabbitmqctl command; the test fails (never skips) without one."""
    argv = shlex.split(os.environ.get("VOLT_TEST_RABBITMQCTL", "rabbitmqctl"))
    if not argv or shutil.which(argv[0]) is None:
        pytest.fail(
            f"{argv[0] if argv else 'rabbitmqctl'} is not on PATH: the permission tests import "
            "deploy/rabbitmq/definitions.json with rabbitmqctl into a throwaway vhost. Run them where "
            "rabbitmqctl manages the test broker, or set VOLT_TEST_RABBITMQCTL to a command that runs it "
            "(e.g. 'docker exec -i <container> rabbitmqctl')."
        )
    return argv


def rabbitmqctl(*args: str, stdin: str | None = None, ok_if: str | None = None) -> str:
    """Run rabbitmqctl; fail the test on any error (but one whose output has ok_if)."""
    try:
        done = subprocess.run(
            [*rabbitmqctl_argv(), *args], input=stdin, capture_output=True, text=True, timeout=CTL_TIMEOUT
        )
    except subprocess.TimeoutExpired:
        pytest.fail(f"rabbitmqctl {' '.join(args)} did not finish within {CTL_TIMEOUT}s")
    if done.returncode != 0 and not (ok_if and ok_if in done.stdout + done.stderr):
        pytest.fail(f"rabbitmqctl {' '.join(args)} failed ({done.returncode}):\n{done.stdout}\n{done.stderr}")
    return done.stdout


def password_hash(password: str) -> str:
    """RabbitMQ's rabbit_password_hashing_sha256: base64(salt + sha256(salt + password))."""
    salt = secrets.token_bytes(4)
    return base64.b64encode(salt + hashlib.sha256(salt + password.encode()).digest()).decode()


@dataclass
class Deployment:
    """definitions.json imported into its own vhost, with a known password per role."""

    vhost: str
    suffix: str
    host: str
    port: int
    passwords: dict[str, str] = field(default_factory=dict)

    def user(self, role: str) -> str:
        return f"volt-{role}-{self.suffix}"

    def url(self, role: str) -> str:
        user, password = self.user(role), self.passwords[role]
        return f"amqp://{user}:{password}@{self.host}:{self.port}/{urllib.parse.quote(self.vhost, safe='')}"

    def settings(self, role: str) -> BrokerSettings:
        return BrokerSettings(amqp_url=self.url(role), namespace=NS)

    def broker(self, role: str) -> Broker:
        broker = Broker(self.settings(role), f"volt-test-{role}")
        try:
            broker.connect(give_up_after=10)
        except BrokerUnavailable as exc:
            pytest.fail(
                f"{role} cannot connect to vhost {self.vhost!r} at {self.host}:{self.port} ({exc}); "
                "does rabbitmqctl manage the same broker the tests use?"
            )
        return broker


def rewritten_definitions(
    original: dict[str, Any], vhost: str, suffix: str, passwords: dict[str, str]
) -> dict[str, Any]:
    """The file as shipped, for one vhost and the four role users with known passwords.

    volt-admin is left out: it is not under test, and an administrator made on
    a shared broker, even for a moment, is not worth having.
    """

    def in_vhost(value: Any) -> Any:
        if isinstance(value, dict):
            return {k: (vhost if k == "vhost" else in_vhost(v)) for k, v in value.items()}
        if isinstance(value, list):
            return [in_vhost(v) for v in value]
        return value

    roles = {f"volt-{role}": role for role in ROLES}
    defs = in_vhost(original)
    assert [v["name"] for v in original["vhosts"]] == ["/"]
    defs["vhosts"] = [{"name": vhost}]
    defs["users"] = [
        {**u, "name": f"{u['name']}-{suffix}", "password_hash": password_hash(passwords[roles[u["name"]]])}
        for u in defs["users"]
        if u["name"] in roles
    ]
    assert len(defs["users"]) == len(ROLES), "definitions.json has one user per role"
    defs["permissions"] = [{**p, "user": f"{p['user']}-{suffix}"} for p in defs["permissions"] if p["user"] in roles]
    assert not defs.get("topic_permissions"), "topic permissions would need renaming too"
    return defs


def _wait_for_import(deployment: Deployment, defs: dict[str, Any], timeout: float = 30) -> None:
    """import_definitions returns before the import is done: wait for the last part (bindings)."""
    want_users = {p["user"] for p in defs["permissions"]}
    want_bindings = {(b["source"], b["destination"], b["routing_key"]) for b in defs["bindings"]}
    deadline = time.monotonic() + timeout
    while True:
        perms = json.loads(rabbitmqctl("-q", "list_permissions", "-p", deployment.vhost, "--formatter", "json"))
        bindings = json.loads(
            rabbitmqctl(
                "-q",
                "list_bindings",
                "-p",
                deployment.vhost,
                "source_name",
                "destination_name",
                "routing_key",
                "--formatter",
                "json",
            )
        )
        got = {(b["source_name"], b["destination_name"], b["routing_key"]) for b in bindings}
        if want_users <= {p["user"] for p in perms} and want_bindings <= got:
            return
        if time.monotonic() > deadline:
            pytest.fail(f"definitions not imported after {timeout}s: permissions {perms}, bindings {sorted(got)}")
        time.sleep(0.2)


@contextmanager
def deployed(amqp_url: str) -> Iterator[Deployment]:
    rabbitmqctl_argv()
    parsed = urllib.parse.urlsplit(amqp_url)
    suffix = uuid.uuid4().hex[:10]
    deployment = Deployment(
        vhost=f"volt-perm-{suffix}",
        suffix=suffix,
        host=parsed.hostname or "127.0.0.1",
        port=parsed.port or 5672,
        passwords={role: secrets.token_hex(16) for role in ROLES},
    )
    defs = rewritten_definitions(json.loads(DEFINITIONS.read_text()), deployment.vhost, suffix, deployment.passwords)
    try:
        # From standard input: rabbitmqctl may run as another user (the
        # rabbitmq one) that cannot read our temporary files, or in a container.
        rabbitmqctl("import_definitions", stdin=json.dumps(defs))
        _wait_for_import(deployment, defs)
        yield deployment
    finally:
        rabbitmqctl("-q", "delete_vhost", deployment.vhost, ok_if="does not exist")
        for role in ROLES:
            rabbitmqctl("-q", "delete_user", deployment.user(role), ok_if="does not exist")


@pytest.fixture(scope="module")
def deployment(amqp_url: str) -> Iterator[Deployment]:
    with deployed(amqp_url) as d:
        yield d


# -- helpers ---------------------------------------------------------------------


def assert_refused(deployment: Deployment, role: str, action: Callable[..., object], *args: Any) -> str:
    """action(broker, *args) as role fails with RabbitMQ's access-refused (403); returns the error text."""
    broker = deployment.broker(role)
    try:
        with pytest.raises(BrokerUnavailable) as info:
            action(broker, *args)
    finally:
        broker.close()
    text = str(info.value)
    assert "ACCESS_REFUSED" in text and "403" in text, text
    assert deployment.user(role) in text, text
    return text


def ready(deployment: Deployment, queue: str) -> int | None:
    """Ready messages in a queue, asked with a passive declare as the dispatcher does."""
    broker = deployment.broker("dispatcher")
    try:
        depth = broker.queue_depth(queue)
        return None if depth is None else depth[0]
    finally:
        broker.close()


def wait(broker: Broker, what: str, done: Callable[[], bool], timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while not done():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting for {what}")
        broker.process(0.1)


def drain(broker: Broker, queue: str) -> list[Delivery]:
    """Take what `queue` holds. By consuming: a quorum queue with a single active
    consumer (the dispatcher's inputs) refuses basic.get."""
    got: list[Delivery] = []
    tag = broker.consume(queue, got.append, prefetch=1000)
    quiet_since = time.monotonic()
    seen = 0
    while time.monotonic() - quiet_since < 0.5:
        broker.process(0.1)
        if len(got) != seen:
            seen, quiet_since = len(got), time.monotonic()
    for d in got:
        d.ack()
    broker.cancel(tag)  # its own consumer only: the broker may consume other queues
    return got


def ignore(delivery: Delivery) -> None:
    """A consumer that never gets to run."""


def bind(broker: Broker, queue: str, exchange: str, key: str) -> None:
    """A bare queue.bind: no Broker method binds an arbitrary queue."""
    with _translated():
        broker._channel().queue_bind(queue, exchange, routing_key=key)


def declare_exchange(broker: Broker, exchange: str, kind: str) -> None:
    """A bare exchange.declare: no Broker method declares one exchange alone."""
    with _translated():
        broker._channel().exchange_declare(exchange, exchange_type=kind, durable=True)


def commit_seen() -> CommitSeen:
    return CommitSeen(repo="/srv/git/project", branch="main", commit=SHA, seen_at=time.time())


def job(job_id: str) -> Job:
    return Job(job_id=job_id, attempt=1, repo="/srv/git/project", branch="main", commit=SHA)


# -- each role can do its work ---------------------------------------------------


def test_each_role_can_do_its_work(deployment: Deployment) -> None:
    ns = NS
    received: dict[str, list[Delivery]] = {}

    def keep(d: Delivery) -> None:
        received.setdefault(d.queue, []).append(d)
        if d.queue != naming.dispatcher_commits_queue(ns):
            d.ack()  # the commit is dead-lettered below, which acks it

    # The dispatcher owns the topology and consumes its queues (rpc: see the viewer test).
    dispatcher = deployment.broker("dispatcher")
    observer = deployment.broker("observer")
    runner = deployment.broker("runner")
    try:
        dispatcher.declare_topology()
        for queue in (
            naming.dispatcher_commits_queue(ns),
            naming.dispatcher_control_queue(ns),
            naming.dispatcher_results_queue(ns),
        ):
            dispatcher.consume(queue, keep)

        # The observer: its commit path, then a commit.
        observer.declare_commit_path()
        observer.publish(naming.commits_exchange(ns), "", commit_seen())
        wait(dispatcher, "the CommitSeen", lambda: naming.dispatcher_commits_queue(ns) in received)

        # The runner: its exchanges, its queue, consuming it, hello and heartbeat.
        runner.declare_runner_exchanges()
        queue = runner.declare_runner_queue("r1")
        assert queue == naming.runner_queue(ns, "r1")
        jobs: list[Delivery] = []
        runner.consume(queue, jobs.append)
        runner.publish(naming.control_exchange(ns), "", Hello(runner_id="r1", session="s1"))
        runner.publish(naming.control_exchange(ns), "", Heartbeat(runner_id="r1", session="s1"))
        wait(dispatcher, "hello and heartbeat", lambda: len(received.get(naming.dispatcher_control_queue(ns), [])) == 2)

        # The dispatcher: a job to the backlog, basic.get it, then to the runner's
        # queue, whose depth it can see with a passive declare.
        dispatcher.publish(naming.jobs_exchange(ns), naming.BACKLOG_ROUTING_KEY, job("j1"))
        backlog = drain(dispatcher, naming.backlog_queue(ns))
        assert [Job.from_json(d.body) for d in backlog] == [job("j1")]
        assert dispatcher.queue_depth(queue) is not None
        dispatcher.publish(naming.jobs_exchange(ns), naming.runner_routing_key("r1"), job("j1"))
        wait(runner, "the job at the runner", lambda: bool(jobs))
        assert Job.from_json(jobs[0].body) == job("j1")

        # The runner: started, a dead letter (which acks the job), the result.
        dead_before = dispatcher.queue_depth(naming.dead_letter_queue(ns))
        assert dead_before is not None
        runner.publish(
            naming.results_exchange(ns),
            "",
            JobStarted(job_id="j1", attempt=1, runner_id="r1", session="s1", started_at=time.time()),
        )
        runner.dead_letter(jobs[0], "a test of the dead-letter path")
        runner.publish(
            naming.results_exchange(ns), "", JobResult(job_id="j1", attempt=1, runner_id="r1", status="passed")
        )
        wait(
            dispatcher,
            "JobStarted and JobResult",
            lambda: len(received.get(naming.dispatcher_results_queue(ns), [])) == 2,
        )
        # The dispatcher dead-letters too.
        dispatcher.dead_letter(received[naming.dispatcher_commits_queue(ns)][0], "a test of the dead-letter path")
        dispatcher.process(0.2)
        assert dispatcher.queue_depth(naming.dead_letter_queue(ns)) == (dead_before[0] + 2, 0)
    finally:
        for broker in (dispatcher, observer, runner):
            broker.close()


def test_viewer_can_ask_and_the_dispatcher_can_answer(deployment: Deployment) -> None:
    dispatcher = deployment.broker("dispatcher")
    viewer = deployment.broker("viewer")
    try:
        dispatcher.declare_topology()

        def answer(d: Delivery) -> None:
            request = Request.from_json(d.body)
            assert isinstance(request, Request)
            dispatcher.reply(d, Reply(ok=True, data={"echo": request.method}))
            d.ack()

        dispatcher.consume(naming.dispatcher_rpc_queue(NS), answer)

        # The dispatcher's connection must be serviced while the viewer waits.
        stop = threading.Event()

        def serve() -> None:
            while not stop.is_set():
                dispatcher.process(0.05)

        server = threading.Thread(target=serve)
        server.start()
        try:
            body = viewer.request(Request(method="status"), timeout=10)
        finally:
            stop.set()
            server.join()
        assert json.loads(body)["data"] == {"echo": "status"}
    finally:
        viewer.close()
        dispatcher.close()


def test_observer_can_create_its_queue_when_it_is_missing(deployment: Deployment) -> None:
    """A new queue with a dead-letter exchange needs read on the queue and write
    on the exchange besides configure: the observer has them for its own queue."""
    admin = deployment.broker("dispatcher")
    try:
        admin.declare_topology()
        admin.delete_queue(naming.dispatcher_commits_queue(NS))
    finally:
        admin.close()
    observer = deployment.broker("observer")
    try:
        observer.declare_commit_path()
        observer.publish(naming.commits_exchange(NS), "", commit_seen())
    finally:
        observer.close()
    dispatcher = deployment.broker("dispatcher")
    try:
        dispatcher.declare_topology()  # the queue the observer made is the dispatcher's, arguments and all
        assert len(drain(dispatcher, naming.dispatcher_commits_queue(NS))) == 1
    finally:
        dispatcher.close()


# -- and no more -------------------------------------------------------------------


def test_runner_cannot_forge_commits_or_jobs(deployment: Deployment) -> None:
    commits = naming.dispatcher_commits_queue(NS)
    backlog = naming.backlog_queue(NS)
    before = ready(deployment, commits), ready(deployment, backlog)
    assert_refused(deployment, "runner", lambda b: b.publish(naming.commits_exchange(NS), "", commit_seen()))
    assert_refused(
        deployment,
        "runner",
        lambda b: b.publish(naming.jobs_exchange(NS), naming.BACKLOG_ROUTING_KEY, job("forged")),
    )
    assert_refused(
        deployment,
        "runner",
        lambda b: b.publish(naming.jobs_exchange(NS), naming.runner_routing_key("r2"), job("forged")),
    )
    # Nor through the default exchange, straight into a queue.
    assert_refused(deployment, "runner", lambda b: b.publish("", commits, commit_seen()))
    assert (ready(deployment, commits), ready(deployment, backlog)) == before


@pytest.mark.parametrize(
    "queue",
    [
        naming.dispatcher_results_queue(NS),
        naming.dispatcher_commits_queue(NS),
        naming.dispatcher_control_queue(NS),
        naming.dispatcher_rpc_queue(NS),
        naming.backlog_queue(NS),
        naming.dead_letter_queue(NS),
    ],
)
def test_runner_cannot_take_bind_or_purge_the_dispatchers_queues(deployment: Deployment, queue: str) -> None:
    assert_refused(deployment, "runner", Broker.consume, queue, ignore)
    assert_refused(deployment, "runner", lambda b: b.get(queue))
    assert_refused(deployment, "runner", lambda b: b.purge_queue(queue))
    assert_refused(deployment, "runner", lambda b: b.delete_queue(queue))
    # Nor bind it to an exchange the runner may read (say, to divert jobs into it).
    assert_refused(deployment, "runner", lambda b: bind(b, queue, naming.jobs_exchange(NS), "x"))


def test_runner_cannot_redeclare_the_commit_path(deployment: Deployment) -> None:
    assert_refused(deployment, "runner", lambda b: b.declare_commit_path())
    assert_refused(deployment, "runner", lambda b: b.declare_topology())


def test_observer_only_has_its_commit_path(deployment: Deployment) -> None:
    for exchange in (naming.jobs_exchange(NS), naming.control_exchange(NS), naming.results_exchange(NS), ""):
        assert_refused(deployment, "observer", Broker.publish, exchange, "backlog", job("forged"))
    for queue in (
        naming.dispatcher_results_queue(NS),
        naming.dispatcher_control_queue(NS),
        naming.dispatcher_rpc_queue(NS),
        naming.backlog_queue(NS),
        naming.dead_letter_queue(NS),
    ):
        assert_refused(deployment, "observer", Broker.consume, queue, ignore)
    assert_refused(deployment, "observer", lambda b: b.declare_runner_exchanges())
    assert_refused(deployment, "observer", lambda b: b.declare_runner_queue("r9"))


@pytest.mark.parametrize("queue", [*naming.shared_queues(NS), naming.runner_queue(NS, "r1")])
def test_viewer_cannot_take_from_any_queue(deployment: Deployment, queue: str) -> None:
    runner = deployment.broker("runner")
    try:
        runner.declare_runner_exchanges()
        runner.declare_runner_queue("r1")
    finally:
        runner.close()
    assert_refused(deployment, "viewer", Broker.consume, queue, ignore)
    assert_refused(deployment, "viewer", lambda b: b.get(queue))


def test_viewer_cannot_declare_or_publish_to_an_exchange_but_its_own(deployment: Deployment) -> None:
    assert_refused(deployment, "viewer", lambda b: b.declare_commit_path())
    assert_refused(deployment, "viewer", lambda b: b.declare_runner_exchanges())
    assert_refused(deployment, "viewer", lambda b: b.declare_topology())
    for exchange in naming.exchanges(NS):
        if exchange != naming.rpc_exchange(NS):
            assert_refused(deployment, "viewer", Broker.publish, exchange, "", commit_seen())


def test_viewer_cannot_publish_to_the_default_exchange(deployment: Deployment) -> None:
    """No message straight into a queue, whatever the queue: write on amq.default is refused."""
    runner = deployment.broker("runner")
    try:
        runner.declare_runner_exchanges()
        runner.declare_runner_queue("r1")
    finally:
        runner.close()
    queues = [*naming.shared_queues(NS), naming.runner_queue(NS, "r1"), "amq.rabbitmq.reply-to", "nowhere"]
    before = {q: ready(deployment, q) for q in queues[:-2]}
    for queue in queues:
        text = assert_refused(deployment, "viewer", Broker.publish, "", queue, commit_seen())
        assert "amq.default" in text, text
    assert {q: ready(deployment, q) for q in queues[:-2]} == before


def test_viewer_cannot_put_a_commit_in_the_dispatchers_queue(deployment: Deployment) -> None:
    commits = naming.dispatcher_commits_queue(NS)
    before = ready(deployment, commits)
    try:
        assert_refused(deployment, "viewer", lambda b: b.publish("", commits, commit_seen()))
        assert_refused(deployment, "viewer", lambda b: b.publish(naming.commits_exchange(NS), "", commit_seen()))
        assert ready(deployment, commits) == before
    finally:
        # Leave nothing behind for the other tests, should it have got through.
        dispatcher = deployment.broker("dispatcher")
        try:
            drain(dispatcher, commits)
        finally:
            dispatcher.close()


def test_viewer_cannot_put_a_job_anywhere(deployment: Deployment) -> None:
    runner = deployment.broker("runner")
    try:
        runner.declare_runner_exchanges()
        runner.declare_runner_queue("r1")
    finally:
        runner.close()
    backlog, runner_queue = naming.backlog_queue(NS), naming.runner_queue(NS, "r1")
    before = ready(deployment, backlog), ready(deployment, runner_queue)
    for key in (naming.BACKLOG_ROUTING_KEY, naming.runner_routing_key("r1")):
        assert_refused(deployment, "viewer", Broker.publish, naming.jobs_exchange(NS), key, job("forged"))
    for queue in (backlog, runner_queue):
        assert_refused(deployment, "viewer", Broker.publish, "", queue, job("forged"))
    assert (ready(deployment, backlog), ready(deployment, runner_queue)) == before


def test_what_the_viewer_sends_reaches_only_the_dispatchers_rpc_queue(deployment: Deployment) -> None:
    """The rpc exchange is a fanout with one queue: a routing key naming another
    queue changes nothing."""
    rpc, commits = naming.dispatcher_rpc_queue(NS), naming.dispatcher_commits_queue(NS)
    forged = commit_seen()
    dispatcher = deployment.broker("dispatcher")
    viewer = deployment.broker("viewer")
    try:
        dispatcher.declare_topology()
        drain(dispatcher, rpc)
        before = ready(deployment, commits)
        viewer.publish(naming.rpc_exchange(NS), commits, forged, persistent=False)
        assert [CommitSeen.from_json(d.body) for d in drain(dispatcher, rpc)] == [forged]
        assert ready(deployment, commits) == before
    finally:
        viewer.close()
        dispatcher.close()


def test_nobody_but_the_dispatcher_can_listen_to_requests(deployment: Deployment) -> None:
    """Binding a queue to the rpc exchange (to read the requests) needs read on it,
    and re-declaring or deleting it needs configure: the dispatcher's alone."""
    rpc_exchange = naming.rpc_exchange(NS)
    runner = deployment.broker("runner")
    try:
        runner.declare_runner_exchanges()
        runner.declare_runner_queue("r1")
    finally:
        runner.close()
    assert_refused(deployment, "runner", lambda b: bind(b, naming.runner_queue(NS, "r1"), rpc_exchange, ""))
    for role in ("runner", "observer", "viewer"):
        assert_refused(deployment, role, declare_exchange, rpc_exchange, "fanout")
        assert_refused(deployment, role, lambda b: bind(b, naming.dispatcher_rpc_queue(NS), rpc_exchange, ""))
        assert_refused(deployment, role, Broker.consume, naming.dispatcher_rpc_queue(NS), ignore)


def test_the_dispatchers_topology_is_the_files(deployment: Deployment) -> None:
    """declare_topology on the imported definitions adds no binding (and fails on
    no argument): the file declares what the code declares."""

    def bindings() -> list[tuple[str, str, str]]:
        rows = json.loads(
            rabbitmqctl(
                "-q",
                "list_bindings",
                "-p",
                deployment.vhost,
                "source_name",
                "destination_name",
                "routing_key",
                "--formatter",
                "json",
            )
        )
        # Leave out the default exchange's implicit bindings (one per queue).
        return sorted((b["source_name"], b["destination_name"], b["routing_key"]) for b in rows if b["source_name"])

    file_bindings = sorted(
        (b["source"], b["destination"], b["routing_key"]) for b in json.loads(DEFINITIONS.read_text())["bindings"]
    )
    before = [b for b in bindings() if not b[1].startswith(naming.runner_queue(NS, ""))]
    assert before == file_bindings
    dispatcher = deployment.broker("dispatcher")
    try:
        dispatcher.declare_topology()
    finally:
        dispatcher.close()
    assert [b for b in bindings() if not b[1].startswith(naming.runner_queue(NS, ""))] == file_bindings


# -- the real processes on these credentials ---------------------------------------


class Processes:
    def __init__(self, deployment: Deployment, tmp: Path) -> None:
        self.deployment = deployment
        self.tmp = tmp
        self.procs: dict[str, subprocess.Popen[bytes]] = {}

    def env(self, role: str) -> dict[str, str]:
        # Credentials through the environment, not the command line.
        return {**os.environ, "VOLT_AMQP_URL": self.deployment.url(role), "VOLT_NAMESPACE": NS}

    def argv(self, *args: str) -> list[str]:
        return [sys.executable, "-m", "common.cli", *args, "--log-level", "DEBUG"]

    def start(self, name: str, role: str, *args: str) -> None:
        with open(self.tmp / f"{name}.log", "ab") as log:
            self.procs[name] = subprocess.Popen(
                self.argv(*args), stdout=log, stderr=subprocess.STDOUT, cwd=self.tmp, env=self.env(role)
            )

    def run(self, role: str, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            self.argv(*args), capture_output=True, text=True, timeout=60, cwd=self.tmp, env=self.env(role)
        )

    def logs(self) -> str:
        return "\n".join(
            f"--- {n} ---\n{(self.tmp / f'{n}.log').read_text(errors='replace')[-4000:]}" for n in self.procs
        )

    def stop(self) -> None:
        for proc in self.procs.values():
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in self.procs.values():
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=15)


def test_commits_are_tested_with_each_role_on_its_own_user(amqp_url: str, repo, tmp_path: Path) -> None:
    first = repo.commit({"tests/test_main.py": PASS}, "initial")
    with deployed(amqp_url) as deployment:
        system = Processes(deployment, tmp_path)
        viewer = deployment.settings("viewer")

        def wait_passed(sha: str) -> dict[str, Any]:
            deadline = time.monotonic() + 90
            while True:
                try:
                    rows = ask(viewer, "results", {"commit": sha}, timeout=5)
                except QueryFailed:
                    rows = []
                if any(r["status"] == "passed" for r in rows):
                    [row] = rows  # one job per commit
                    return row
                for name, proc in system.procs.items():
                    assert proc.poll() is None, f"{name} exited ({proc.returncode})\n{system.logs()}"
                if time.monotonic() > deadline:
                    pytest.fail(f"no passed result for {sha[:12]} within 90s: {rows}\n{system.logs()}")
                time.sleep(0.3)

        try:
            system.start(
                "dispatcher",
                "dispatcher",
                "dispatcher",
                "--db",
                str(tmp_path / "dispatcher.db"),
                "--operator",
                deployment.user("dispatcher"),
            )
            system.start(
                "runner",
                "runner",
                "runner",
                "--id",
                "perm-r1",
                "--workdir",
                str(tmp_path / "perm-r1"),
                "--heartbeat-interval",
                "0.5",
                "--job-timeout",
                "60",
                "--allow-repo",
                str(repo.path),
            )
            # A git hook's `volt notify`, as the observer user.
            notify = system.run("observer", "notify", "--repo", str(repo.path), "--branch", "main")
            assert notify.returncode == 0, f"{notify.stdout}\n{notify.stderr}\n{system.logs()}"
            row = wait_passed(first)
            assert (row["runner"], row["passed"], row["attempts"]) == ("perm-r1", 1, 1), row

            # The polling observer, as the same user.
            system.start(
                "observer",
                "observer",
                "observer",
                "--repo",
                str(repo.path),
                "--poll",
                "0.2",
                "--state-dir",
                str(tmp_path / "observer"),
            )
            second = repo.commit({"tests/test_more.py": PASS}, "second")
            row = wait_passed(second)
            assert (row["runner"], row["passed"], row["attempts"]) == ("perm-r1", 2, 1), row

            # The viewer's status shows the runner and, through the dispatcher's
            # passive declares, every shared queue (runner queues are not looked at).
            status = ask(viewer, "status", timeout=10)
            [live] = [r for r in status["runners"] if r["runner_id"] == "perm-r1"]
            assert live["queue"] == {"name": naming.runner_queue(NS, "perm-r1")}, live
            assert all(status["queues"][q] is not None for q in naming.shared_queues(NS)), status["queues"]
            check = system.run("viewer", "check", "--min-runners", "1")
            assert check.returncode == 0, check.stdout + check.stderr
            # The dispatcher's health check (compose, k8s probes) runs `volt check`
            # in its own container, on its own user.
            check = system.run("dispatcher", "check", "--min-runners", "1")
            assert check.returncode == 0, check.stdout + check.stderr

            # Only an operator may pause a runner: RabbitMQ vouches for who asks.
            refused = system.run("viewer", "runner-ctl", "pause", "perm-r1")
            assert refused.returncode == 1
            assert f"user '{deployment.user('viewer')}' may not control runners" in refused.stderr
            assert ask(viewer, "status", timeout=10)["runners"][0]["state"] != "paused"
            for action in ("pause", "resume"):
                done = system.run("dispatcher", "runner-ctl", action, "perm-r1")
                assert done.returncode == 0, done.stdout + done.stderr

            # Nobody was refused anything along the way.
            assert "ACCESS_REFUSED" not in system.logs() + notify.stderr
        finally:
            system.stop()
