"""The files in deploy/ are well-formed and agree with the code and with each other.

No network and no Docker: every test reads and parses files. The permission
tests apply RabbitMQ's own rules (which operation needs which permission on
which name, with unanchored regex search) to the roles' regexes.
"""

from __future__ import annotations

import base64
import configparser
import hashlib
import json
import re
import shlex
import urllib.parse
from pathlib import Path
from typing import Any

import pytest
import yaml

from common import naming
from common.broker import _RUNNER_EXCHANGES, DEAD_LETTER_MAX_LENGTH, RUNNER_QUEUE_EXPIRES_MS

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"
NS = "volt"
VHOST = "/"
# The job timeout every deployment passes to `volt runner`; stop grace periods
# must leave room for a job that has just started.
JOB_TIMEOUT = 1800

ROLES = ("dispatcher", "observer", "runner", "viewer")
ADMIN = "volt-admin"

EXCHANGES = {
    "volt.commits": "fanout",
    "volt.control": "fanout",
    "volt.results": "fanout",
    "volt.jobs": "direct",
    "volt.dead": "fanout",
    "volt.rpc": "fanout",
}
DLX = {"x-dead-letter-exchange": "volt.dead"}
QUEUES = {
    "volt.dispatcher.commits": DLX,
    "volt.dispatcher.control": DLX,
    "volt.dispatcher.results": DLX,
    "volt.jobs.backlog": DLX,
    "volt.dispatcher.rpc": {},
    "volt.dead-letter": {"x-max-length": DEAD_LETTER_MAX_LENGTH},
}
# (exchange, queue, routing key). pika binds with routing key = queue name when
# given none, which is what the code does for the rpc queue (the dead-letter
# queue names it explicitly). Both exchanges are fanouts, so the key only has
# to match what the code declares, or the dispatcher would add a second binding.
BINDINGS = {
    ("volt.commits", "volt.dispatcher.commits", ""),
    ("volt.control", "volt.dispatcher.control", ""),
    ("volt.results", "volt.dispatcher.results", ""),
    ("volt.jobs", "volt.jobs.backlog", "backlog"),
    ("volt.rpc", "volt.dispatcher.rpc", "volt.dispatcher.rpc"),
    ("volt.dead", "volt.dead-letter", "volt.dead-letter"),
}
RUNNER_QUEUE = "volt.runner.host-1"
# A runner queue's arguments (Broker.declare_runner_queue).
RUNNER_QUEUE_ARGS = {**DLX, "x-expires": 900000}
RUNNER_EXCHANGES = ("volt.control", "volt.results", "volt.jobs", "volt.dead")
# Requests to the dispatcher (`volt status`, `results`, `log`, `check`).
RPC_EXCHANGE = "volt.rpc"
DISPATCHER_QUEUES = (
    "volt.dispatcher.commits",
    "volt.dispatcher.control",
    "volt.dispatcher.results",
    "volt.dispatcher.rpc",
)


# -- helpers -----------------------------------------------------------------


@pytest.fixture(scope="module")
def definitions() -> dict[str, Any]:
    return json.loads((DEPLOY / "rabbitmq" / "definitions.json").read_text())


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    return yaml.safe_load((DEPLOY / "compose.yaml").read_text())


def permissions_of(definitions: dict[str, Any], user: str) -> dict[str, str]:
    [perm] = [p for p in definitions["permissions"] if p["user"] == user and p["vhost"] == VHOST]
    return perm


def allowed(perm: dict[str, str], kind: str, name: str) -> bool:
    """RabbitMQ's check: the regex is searched (not anchored) in the name.

    The default exchange "" is checked as "amq.default".
    """
    return re.search(perm[kind], name or "amq.default") is not None


def can_publish(perm: dict[str, str], exchange: str) -> bool:
    return allowed(perm, "write", exchange)


def can_consume(perm: dict[str, str], queue: str) -> bool:
    """basic.consume, basic.get and queue.purge all need read on the queue."""
    return allowed(perm, "read", queue)


def can_bind(perm: dict[str, str], queue: str, exchange: str) -> bool:
    return allowed(perm, "write", queue) and allowed(perm, "read", exchange)


def can_create_queue(perm: dict[str, str], queue: str, arguments: dict[str, Any]) -> bool:
    """queue.declare of a queue that does not exist yet: configure on it and,
    with a dead-letter exchange, also read on the queue and write on that
    exchange. (Re-declaring an existing queue checks configure only; a passive
    declare checks nothing.)"""
    ok = allowed(perm, "configure", queue)
    dlx = arguments.get("x-dead-letter-exchange")
    if dlx is not None:
        ok = ok and allowed(perm, "read", queue) and allowed(perm, "write", dlx)
    return ok


def can_declare_topology(perm: dict[str, str]) -> bool:
    """What Broker.declare_topology (the dispatcher) does: declare every exchange
    (configure) and every shared queue, and bind the bound ones."""
    return (
        all(allowed(perm, "configure", x) for x in EXCHANGES)
        and all(can_create_queue(perm, q, args) for q, args in QUEUES.items())
        and all(can_bind(perm, queue, exchange) for exchange, queue, _ in BINDINGS)
    )


def can_declare_commit_path(perm: dict[str, str]) -> bool:
    """What Broker.declare_commit_path (observer, `volt notify`) does."""
    return (
        allowed(perm, "configure", "volt.commits")
        and can_create_queue(perm, "volt.dispatcher.commits", QUEUES["volt.dispatcher.commits"])
        and can_bind(perm, "volt.dispatcher.commits", "volt.commits")
    )


def can_declare_runner_exchanges(perm: dict[str, str]) -> bool:
    """What Broker.declare_runner_exchanges does: every exchange but commits and rpc."""
    return all(allowed(perm, "configure", x) for x in RUNNER_EXCHANGES)


def interpolate(value: str) -> str:
    """Compose variable interpolation with every variable unset: take defaults."""

    def sub(match: re.Match[str]) -> str:
        inner = match.group(1)
        if ":-" in inner:
            return inner.split(":-", 1)[1]
        if ":?" in inner:
            return "https://example.invalid/repo.git"
        return ""

    return re.sub(r"\$\{([^}]*)\}", sub, value)


def duration_seconds(text: str) -> int:
    """'35m', '30s', '1h' (compose) or '35min', '60s' (systemd)."""
    total = 0
    for number, unit in re.findall(r"(\d+)\s*(h|min|m|s)?", str(text)):
        total += int(number) * {"h": 3600, "min": 60, "m": 60, "s": 1, "": 1}[unit]
    return total


class _UnitParser(configparser.ConfigParser):
    def optionxform(self, optionstr: str) -> str:
        return optionstr  # systemd keys are case-sensitive


def systemd_unit(name: str) -> configparser.ConfigParser:
    parser = _UnitParser(interpolation=None, strict=False)
    parser.read_string((DEPLOY / "systemd" / name).read_text())
    return parser


def k8s_docs(name: str) -> list[dict[str, Any]]:
    return [doc for doc in yaml.safe_load_all((DEPLOY / "k8s" / name).read_text()) if doc]


def containers(doc: dict[str, Any]) -> list[dict[str, Any]]:
    return doc["spec"]["template"]["spec"]["containers"]


# -- RabbitMQ definitions ----------------------------------------------------


def test_exchanges_match_topology(definitions: dict[str, Any]) -> None:
    got = {x["name"]: x for x in definitions["exchanges"]}
    assert set(got) == set(EXCHANGES)
    for name, kind in EXCHANGES.items():
        x = got[name]
        assert (x["vhost"], x["type"], x["durable"], x["auto_delete"], x["internal"]) == (
            VHOST,
            kind,
            True,
            False,
            False,
        ), name
        assert x["arguments"] == {}, name


def test_queues_match_topology_including_arguments(definitions: dict[str, Any]) -> None:
    got = {q["name"]: q for q in definitions["queues"]}
    assert set(got) == set(QUEUES)
    for name, arguments in QUEUES.items():
        q = got[name]
        assert (q["vhost"], q["durable"], q["auto_delete"]) == (VHOST, True, False), name
        # RabbitMQ refuses a redeclare whose arguments differ, so exact equality.
        assert q["arguments"] == arguments, name


def test_bindings_match_topology(definitions: dict[str, Any]) -> None:
    got = {(b["source"], b["destination"], b["routing_key"]) for b in definitions["bindings"]}
    assert got == BINDINGS
    assert len(definitions["bindings"]) == len(BINDINGS)
    for b in definitions["bindings"]:
        assert (b["vhost"], b["destination_type"], b["arguments"]) == (VHOST, "queue", {})


def test_definitions_use_the_codes_names() -> None:
    """definitions.json names what common.naming names, for namespace volt."""
    assert set(naming.exchanges(NS)) == set(EXCHANGES)
    assert set(naming.shared_queues(NS)) == set(QUEUES)
    assert naming.dead_letter_exchange(NS) == DLX["x-dead-letter-exchange"]
    assert (naming.jobs_exchange(NS), naming.backlog_queue(NS), naming.BACKLOG_ROUTING_KEY) in BINDINGS
    assert naming.runner_queue(NS, "host-1") == RUNNER_QUEUE
    assert RUNNER_QUEUE_ARGS["x-expires"] == RUNNER_QUEUE_EXPIRES_MS
    assert set(RUNNER_EXCHANGES) == {name(NS) for name in _RUNNER_EXCHANGES}
    assert set(RUNNER_EXCHANGES) == set(naming.exchanges(NS)) - {naming.commits_exchange(NS), naming.rpc_exchange(NS)}
    assert naming.rpc_exchange(NS) == RPC_EXCHANGE
    assert (RPC_EXCHANGE, naming.dispatcher_rpc_queue(NS), naming.dispatcher_rpc_queue(NS)) in BINDINGS
    assert set(DISPATCHER_QUEUES) == {q for q in naming.shared_queues(NS) if ".dispatcher." in q}


def test_one_user_per_role_with_real_sha256_hashes(definitions: dict[str, Any]) -> None:
    users = {u["name"]: u for u in definitions["users"]}
    assert set(users) == {f"volt-{r}" for r in ROLES} | {ADMIN}
    for name, user in users.items():
        assert user["hashing_algorithm"] == "rabbit_password_hashing_sha256"
        raw = base64.b64decode(user["password_hash"], validate=True)
        salt, digest = raw[:4], raw[4:]
        assert len(raw) == 36, name
        # The documented placeholder: change-me-<role>.
        placeholder = "change-me-" + name.removeprefix("volt-")
        assert hashlib.sha256(salt + placeholder.encode()).digest() == digest, name
        assert user["tags"] == (["administrator"] if name == ADMIN else []), name
    assert definitions["vhosts"] == [{"name": VHOST}]


def test_every_user_has_valid_permissions(definitions: dict[str, Any]) -> None:
    users = {u["name"] for u in definitions["users"]}
    assert {p["user"] for p in definitions["permissions"]} == users
    assert len(definitions["permissions"]) == len(users)
    for perm in definitions["permissions"]:
        assert perm["vhost"] == VHOST
        for kind in ("configure", "write", "read"):
            re.compile(perm[kind])


def test_runner_cannot_publish_commits_or_jobs_nor_touch_dispatcher_queues(
    definitions: dict[str, Any],
) -> None:
    perm = permissions_of(definitions, "volt-runner")
    # No forged CommitSeen or Job, and nothing straight into a queue through
    # the default exchange (which checks only write on amq.default).
    for exchange in ("volt.commits", "volt.jobs", RPC_EXCHANGE, ""):
        assert not can_publish(perm, exchange), exchange
    for queue in (*DISPATCHER_QUEUES, "volt.jobs.backlog", "volt.dead-letter"):
        assert not can_consume(perm, queue), queue  # consume, get, purge
        assert not allowed(perm, "write", queue), queue  # bind
        assert not allowed(perm, "configure", queue), queue  # declare, delete
    assert not allowed(perm, "configure", "volt.commits")
    assert not allowed(perm, "configure", RPC_EXCHANGE)
    assert not can_declare_commit_path(perm)
    assert not can_declare_topology(perm)
    # Its queue may take only what the jobs exchange routes: no binding to the
    # exchanges of commits, heartbeats or results, to read them.
    for exchange in ("volt.commits", "volt.control", "volt.results", "volt.dead", RPC_EXCHANGE):
        assert not can_bind(perm, RUNNER_QUEUE, exchange), exchange


def test_runner_can_do_its_work(definitions: dict[str, Any]) -> None:
    perm = permissions_of(definitions, "volt-runner")
    assert can_declare_runner_exchanges(perm)
    # Its own queue: create (with a DLX), bind to the jobs exchange, consume.
    assert can_create_queue(perm, RUNNER_QUEUE, RUNNER_QUEUE_ARGS)
    assert can_bind(perm, RUNNER_QUEUE, "volt.jobs")
    assert can_consume(perm, RUNNER_QUEUE)
    for exchange in ("volt.control", "volt.results", "volt.dead"):
        assert can_publish(perm, exchange), exchange


def test_dispatcher_can_do_its_work_and_no_more(definitions: dict[str, Any]) -> None:
    perm = permissions_of(definitions, "volt-dispatcher")
    assert can_declare_topology(perm)
    for queue in (*DISPATCHER_QUEUES, "volt.jobs.backlog"):
        assert can_consume(perm, queue), queue  # consume, and basic.get on the backlog
    # Jobs (backlog and runner.* keys), dead letters, and replies through the
    # default exchange. Queue depths for `volt status` are passive declares,
    # which need no permission.
    for exchange in ("volt.jobs", "volt.dead", ""):
        assert can_publish(perm, exchange), exchange
    # Its health check (compose, k8s probes) runs `volt check` on its user,
    # a request like the viewer's.
    assert can_publish(perm, RPC_EXCHANGE)
    for exchange in ("volt.commits", "volt.control", "volt.results"):
        assert not can_publish(perm, exchange), exchange
    assert not can_consume(perm, RUNNER_QUEUE)
    assert not allowed(perm, "configure", RUNNER_QUEUE)


def test_observer_can_only_publish_commits(definitions: dict[str, Any]) -> None:
    perm = permissions_of(definitions, "volt-observer")
    assert can_declare_commit_path(perm)
    assert can_publish(perm, "volt.commits")
    for exchange in ("volt.jobs", "volt.control", "volt.results", RPC_EXCHANGE, ""):
        assert not can_publish(perm, exchange), exchange
    for name in (*EXCHANGES, *QUEUES, RUNNER_QUEUE):
        if name not in ("volt.commits", "volt.dispatcher.commits"):
            assert not allowed(perm, "configure", name), name
    # Read on its own queue comes with creating it (it has a DLX); configure
    # on it already lets the observer delete it, so this gives nothing more.
    for queue in (*QUEUES, RUNNER_QUEUE):
        if queue != "volt.dispatcher.commits":
            assert not can_consume(perm, queue), queue
    assert not can_declare_runner_exchanges(perm)
    assert not can_declare_topology(perm)


def test_viewer_can_only_ask_the_dispatcher(definitions: dict[str, Any]) -> None:
    perm = permissions_of(definitions, "volt-viewer")
    # Requests go to the rpc exchange, which routes only to the dispatcher's
    # rpc queue. Replies come on amq.rabbitmq.reply-to, which needs no permission.
    assert can_publish(perm, RPC_EXCHANGE)
    # Not the default exchange: with write on amq.default it could put any
    # message (a forged commit or job) in any queue by naming it.
    assert not can_publish(perm, "")
    for name in (*EXCHANGES, *QUEUES, RUNNER_QUEUE, "amq.default", "amq.rabbitmq.reply-to"):
        assert not allowed(perm, "configure", name), name
        assert not allowed(perm, "read", name), name
        if name != RPC_EXCHANGE:
            assert not allowed(perm, "write", name), name


def test_only_the_dispatcher_receives_requests_and_writes_to_the_default_exchange(
    definitions: dict[str, Any],
) -> None:
    """Nobody else can bind a queue to the rpc exchange (to read or divert the
    viewer's requests), re-declare or delete it, or bind to the rpc queue; and
    only the dispatcher (for its replies) can publish straight into a queue."""
    for role in ("observer", "runner", "viewer"):
        perm = permissions_of(definitions, f"volt-{role}")
        assert not allowed(perm, "read", RPC_EXCHANGE), role
        assert not allowed(perm, "configure", RPC_EXCHANGE), role
        assert not allowed(perm, "write", "volt.dispatcher.rpc"), role
        assert not can_publish(perm, ""), role
    dispatcher = permissions_of(definitions, "volt-dispatcher")
    assert can_bind(dispatcher, "volt.dispatcher.rpc", RPC_EXCHANGE)
    assert can_publish(dispatcher, "")


def test_admin_has_everything(definitions: dict[str, Any]) -> None:
    perm = permissions_of(definitions, ADMIN)
    assert (perm["configure"], perm["write"], perm["read"]) == (".*", ".*", ".*")


# -- rabbitmq.conf -------------------------------------------------------------


def test_rabbitmq_conf() -> None:
    conf: dict[str, str] = {}
    for line in (DEPLOY / "rabbitmq" / "rabbitmq.conf").read_text().splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            key, _, value = line.partition("=")
            conf[key.strip()] = value.strip()
    assert conf["load_definitions"] == "/etc/rabbitmq/definitions.json"
    assert conf["consumer_timeout"] == "1800000"
    assert conf["management.tcp.port"] == "15672"
    assert any(k.startswith("disk_free_limit.") for k in conf)
    assert any(k.startswith("vm_memory_high_watermark.") for k in conf)


# -- Dockerfile ----------------------------------------------------------------


def test_dockerfile() -> None:
    text = (DEPLOY / "Dockerfile").read_text()
    lines = [ln.strip() for ln in text.splitlines() if ln.strip() and not ln.lstrip().startswith("#")]
    froms = [ln for ln in lines if ln.upper().startswith("FROM ")]
    assert len(froms) >= 2, "multi-stage build"
    assert re.search(r"^ARG PYTHON_IMAGE=python:3\.11-slim$", text, re.M)
    assert "apt-get install" in text and re.search(r"\bgit\b", text)
    [user] = [ln for ln in lines if ln.upper().startswith("USER ")]
    assert user.split()[1].split(":")[0] not in ("root", "0")
    [entrypoint] = [ln for ln in lines if ln.upper().startswith("ENTRYPOINT ")]
    assert json.loads(entrypoint.split(None, 1)[1]) == ["volt"]
    # The build context is the repository root; the ignore file must not drop
    # what `pip install .` needs.
    ignored = (DEPLOY / "Dockerfile.dockerignore").read_text().split()
    for needed in ("pyproject.toml", "README.md", "common", "observer", "dispatcher", "runner"):
        assert needed not in ignored, needed


# -- compose.yaml --------------------------------------------------------------


def test_compose_services(compose: dict[str, Any]) -> None:
    services = compose["services"]
    assert set(services) == {"rabbitmq", "dispatcher", "observer", "runner"}
    rabbit = services["rabbitmq"]
    image, _, tag = rabbit["image"].partition(":")
    assert image == "rabbitmq" and "management" in tag and re.match(r"\d+\.\d+", tag), "pinned tag"
    ports = {str(p).rsplit(":", 1)[-1] for p in rabbit["ports"]}
    assert {"5672", "15672"} <= ports
    mounts = {v.split(":")[1]: v.split(":")[0] for v in rabbit["volumes"]}
    assert (DEPLOY / mounts["/etc/rabbitmq/definitions.json"]).resolve() == DEPLOY / "rabbitmq" / "definitions.json"
    assert (DEPLOY / mounts["/etc/rabbitmq/rabbitmq.conf"]).resolve() == DEPLOY / "rabbitmq" / "rabbitmq.conf"
    assert rabbit["healthcheck"]["test"] == ["CMD", "rabbitmq-diagnostics", "-q", "ping"]


def test_compose_workers_share_one_image_built_from_the_repo(compose: dict[str, Any]) -> None:
    workers = [compose["services"][n] for n in ("dispatcher", "observer", "runner")]
    assert len({w["image"] for w in workers}) == 1
    for w in workers:
        build = w["build"]
        assert (DEPLOY / build["context"]).resolve() == ROOT
        assert (ROOT / build["dockerfile"]).resolve() == DEPLOY / "Dockerfile"


def test_compose_runner_is_scalable(compose: dict[str, Any]) -> None:
    runner = compose["services"]["runner"]
    assert "container_name" not in runner
    assert "ports" not in runner
    assert "hostname" not in runner  # each replica's own hostname is its runner id
    assert "--id" not in runner["command"]
    job_timeout = int(runner["command"][runner["command"].index("--job-timeout") + 1])
    assert job_timeout == JOB_TIMEOUT
    assert duration_seconds(runner["stop_grace_period"]) > JOB_TIMEOUT


def test_compose_healthchecks_and_dependencies(compose: dict[str, Any]) -> None:
    services = compose["services"]
    # Each worker's health check is `volt check` aimed at that worker; the
    # folders the checks read are the ones the workers write.
    assert services["dispatcher"]["healthcheck"]["test"] == ["CMD", "volt", "check"]
    observer_state = services["observer"]["command"][services["observer"]["command"].index("--state-dir") + 1]
    assert services["observer"]["healthcheck"]["test"] == ["CMD", "volt", "check", "--observer", observer_state]
    workdir = services["runner"]["command"][services["runner"]["command"].index("--workdir") + 1]
    assert services["runner"]["healthcheck"]["test"] == ["CMD", "volt", "check", "--runner-workdir", workdir]
    for name, service in services.items():
        for dependency, how in service.get("depends_on", {}).items():
            assert how["condition"] == "service_healthy", (name, dependency)
            assert "healthcheck" in services[dependency], dependency
    for name in ("dispatcher", "observer", "runner"):
        assert "rabbitmq" in services[name]["depends_on"], name


def test_compose_workers_use_their_roles_user(compose: dict[str, Any]) -> None:
    for role in ("dispatcher", "observer", "runner"):
        service = compose["services"][role]
        assert service["command"][0] == role
        url = urllib.parse.urlsplit(interpolate(service["environment"]["VOLT_AMQP_URL"]))
        assert (url.scheme, url.username, url.password) == ("amqp", f"volt-{role}", f"change-me-{role}")
        assert (url.hostname, url.port, url.path) == ("rabbitmq", 5672, "/%2F")
        assert service["environment"]["VOLT_NAMESPACE"] == NS


# -- systemd -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("unit", "subcommand"),
    [
        ("volt-dispatcher.service", "dispatcher"),
        ("volt-observer.service", "observer"),
        ("volt-runner@.service", "runner"),
    ],
)
def test_systemd_units(unit: str, subcommand: str) -> None:
    parser = systemd_unit(unit)
    assert {"Unit", "Service", "Install"} <= set(parser.sections())
    service = parser["Service"]
    argv = shlex.split(service["ExecStart"])
    assert argv[0].startswith("/") and argv[0].endswith("/volt"), argv[0]
    assert argv[1] == subcommand
    assert service["User"] == "volt"
    assert service["Restart"] == "on-failure"
    assert service["KillSignal"] == "SIGTERM"
    assert service["KillMode"] == "mixed"
    assert "/etc/volt/volt.env" in (DEPLOY / "systemd" / unit).read_text()


def test_systemd_runner_template() -> None:
    service = systemd_unit("volt-runner@.service")["Service"]
    argv = shlex.split(service["ExecStart"])
    assert argv[argv.index("--id") + 1] == "%H-%i"
    assert argv[argv.index("--workdir") + 1] == "/var/lib/volt/runner-%i"
    assert int(argv[argv.index("--job-timeout") + 1]) == JOB_TIMEOUT
    # The runner drains on SIGTERM: systemd must wait for the job to finish.
    assert duration_seconds(service["TimeoutStopSec"]) > JOB_TIMEOUT


def test_systemd_env_file_is_key_value() -> None:
    for line in (DEPLOY / "systemd" / "volt.env").read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            key, sep, _ = line.partition("=")
            assert sep and re.fullmatch(r"VOLT_[A-Z_]+", key), line


# -- Kubernetes ----------------------------------------------------------------


K8S_KINDS = {
    "namespace.yaml": ["Namespace"],
    "secret.example.yaml": ["Secret"],
    "config.yaml": ["ConfigMap"],
    "dispatcher.yaml": ["PersistentVolumeClaim", "Deployment", "Service"],
    "observer.yaml": ["PersistentVolumeClaim", "Deployment"],
    "runner.yaml": ["Deployment"],
    "keda-scaledobject.yaml": ["TriggerAuthentication", "ScaledObject"],
    "kustomization.yaml": ["Kustomization"],
}


def test_k8s_files_parse_with_expected_kinds() -> None:
    assert {p.name for p in (DEPLOY / "k8s").glob("*.yaml")} == set(K8S_KINDS)
    for name, kinds in K8S_KINDS.items():
        docs = k8s_docs(name)
        assert [d["kind"] for d in docs] == kinds, name
        for doc in docs:
            if doc["kind"] not in ("Namespace", "Kustomization"):
                assert doc["metadata"]["namespace"] == "volt-ci", (name, doc["kind"])


def test_k8s_kustomization_lists_existing_files() -> None:
    [kustomization] = k8s_docs("kustomization.yaml")
    for resource in kustomization["resources"]:
        assert (DEPLOY / "k8s" / resource).is_file(), resource
    assert "secret.example.yaml" not in kustomization["resources"]


def _deployment(name: str) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    docs = k8s_docs(name)
    [deployment] = [d for d in docs if d["kind"] == "Deployment"]
    return deployment, docs


def _env(container: dict[str, Any]) -> dict[str, Any]:
    return {e["name"]: e for e in container.get("env", [])}


@pytest.mark.parametrize("role", ["dispatcher", "observer"])
def test_k8s_stateful_workers_keep_state_on_a_pvc(role: str) -> None:
    deployment, docs = _deployment(f"{role}.yaml")
    assert deployment["spec"]["replicas"] == 1
    assert deployment["spec"]["strategy"]["type"] == "Recreate"
    [pvc] = [d for d in docs if d["kind"] == "PersistentVolumeClaim"]
    volumes = deployment["spec"]["template"]["spec"]["volumes"]
    assert [v["persistentVolumeClaim"]["claimName"] for v in volumes] == [pvc["metadata"]["name"]]


def test_k8s_runner_deployment() -> None:
    deployment, _ = _deployment("runner.yaml")
    pod = deployment["spec"]["template"]["spec"]
    assert pod["terminationGracePeriodSeconds"] > JOB_TIMEOUT
    assert all("emptyDir" in v for v in pod["volumes"])
    [container] = pod["containers"]
    args = container["args"]
    assert args[0] == "runner"
    assert int(args[args.index("--job-timeout") + 1]) == JOB_TIMEOUT
    workdir = args[args.index("--workdir") + 1]
    assert workdir in {m["mountPath"] for m in container["volumeMounts"]}
    assert "ports" not in container


@pytest.mark.parametrize("role", ["dispatcher", "observer", "runner"])
def test_k8s_workers_use_their_roles_secret(role: str) -> None:
    deployment, _ = _deployment(f"{role}.yaml")
    [container] = containers(deployment)
    assert container["args"][0] == role
    ref = _env(container)["VOLT_AMQP_URL"]["valueFrom"]["secretKeyRef"]
    assert ref == {"name": "volt-amqp", "key": f"{role}-url"}
    [secret] = k8s_docs("secret.example.yaml")
    assert secret["metadata"]["name"] == "volt-amqp"
    url = urllib.parse.urlsplit(secret["stringData"][f"{role}-url"])
    assert (url.username, url.hostname) == (f"volt-{role}", "rabbitmq")
    images = {containers(_deployment(f"{r}.yaml")[0])[0]["image"] for r in ("dispatcher", "observer", "runner")}
    assert len(images) == 1


def test_k8s_dispatcher_probes_use_volt_check() -> None:
    deployment, _ = _deployment("dispatcher.yaml")
    [container] = containers(deployment)
    for probe in ("readinessProbe", "livenessProbe"):
        assert container[probe]["exec"]["command"] == ["volt", "check"]


def test_keda_scales_runners_on_the_backlog() -> None:
    docs = {d["kind"]: d for d in k8s_docs("keda-scaledobject.yaml")}
    scaled = docs["ScaledObject"]
    assert scaled["spec"]["scaleTargetRef"]["name"] == "volt-runner"
    [trigger] = scaled["spec"]["triggers"]
    assert trigger["type"] == "rabbitmq"
    assert trigger["metadata"]["queueName"] == naming.backlog_queue(NS)
    assert trigger["metadata"]["mode"] == "QueueLength"
    assert trigger["authenticationRef"]["name"] == docs["TriggerAuthentication"]["metadata"]["name"]
    [ref] = docs["TriggerAuthentication"]["spec"]["secretTargetRef"]
    assert (ref["parameter"], ref["name"]) == ("host", "volt-amqp")


def test_k8s_dispatcher_serves_the_page_and_metrics_through_its_service() -> None:
    _, deployment, service = k8s_docs("dispatcher.yaml")
    pod = deployment["spec"]["template"]
    (container,) = pod["spec"]["containers"]
    env = {e["name"]: e.get("value") for e in container["env"]}
    assert (env["VOLT_HTTP_PORT"], env["VOLT_HTTP_HOST"]) == ("8080", "0.0.0.0")
    assert container["ports"] == [{"name": "http", "containerPort": 8080}]
    assert pod["metadata"]["annotations"]["prometheus.io/port"] == "8080"
    assert service["spec"]["selector"] == deployment["spec"]["selector"]["matchLabels"]
    assert service["spec"]["ports"][0]["targetPort"] == "http"


def test_only_admin_and_dispatcher_users_may_control_runners(
    compose: dict[str, Any], definitions: dict[str, Any]
) -> None:
    users = {u["name"] for u in definitions["users"]}
    operators = compose["services"]["dispatcher"]["environment"]["VOLT_OPERATORS"].split(",")
    assert set(operators) == {"volt-admin", "volt-dispatcher"} <= users
    _, deployment, _ = k8s_docs("dispatcher.yaml")
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    assert {e["name"]: e.get("value") for e in container["env"]}["VOLT_OPERATORS"] == ",".join(operators)
    env_file = (DEPLOY / "systemd" / "volt.env").read_text()
    assert f"VOLT_OPERATORS={','.join(operators)}" in env_file.splitlines()
