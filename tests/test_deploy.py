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
from common.broker import _RUNNER_EXCHANGES, DELIVERY_LIMIT, runner_queue_arguments, shared_queue_arguments
from runner.sandbox import hidden_paths

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
# The deployment runs quorum queues (the default --queue-type), whose
# arguments the code declares: definitions.json must say them exactly.
QUEUES = shared_queue_arguments(NS, "quorum")
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
RUNNER_QUEUE_ARGS = runner_queue_arguments(NS, "quorum")
RUNNER_EXCHANGES = ("volt.control", "volt.results", "volt.jobs", "volt.dead")
# Requests to the dispatcher (`volt status`, `results`, `log`, `check`).
RPC_EXCHANGE = "volt.rpc"
DISPATCHER_QUEUES = (
    "volt.dispatcher.commits",
    "volt.dispatcher.control",
    "volt.dispatcher.results",
    "volt.dispatcher.rpc",
)
# One message: which store owns the namespace (Dispatcher._claim_namespace).
OWNER_QUEUE = "volt.dispatcher.owner"


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


def unit_directives(name: str) -> dict[str, dict[str, list[str]]]:
    """Every value of every directive, per section, as systemd reads them: a
    directive may repeat (each adds), values are space-separated, and an empty
    assignment empties the list. Comments and blank lines are skipped."""
    sections: dict[str, dict[str, list[str]]] = {}
    section: dict[str, list[str]] = {}
    for raw in (DEPLOY / "systemd" / name).read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("["):
            section = sections.setdefault(line.strip("[]"), {})
            continue
        key, _, value = line.partition("=")
        values = section.setdefault(key.strip(), [])
        if value.strip():
            values += shlex.split(value) if key.strip() != "ExecStart" else [value.strip()]
        else:
            values.clear()
    return sections


def sandbox_mode(argv: list[str], env: dict[str, str]) -> str:
    """The runner's --sandbox as these arguments and environment set it."""
    for i, arg in enumerate(argv):
        if arg == "--sandbox":
            return argv[i + 1]
        if arg.startswith("--sandbox="):
            return arg.split("=", 1)[1]
    return env.get("VOLT_SANDBOX", "bwrap")


def hidden_from_tests(path: str | Path, workdir: str) -> bool:
    """Whether the sandbox hides `path` from every test command of a runner
    with this workdir (runner.sandbox decides what it hides)."""
    # "/" (the home of some service users) the sandbox never hides.
    hidden = [h for h in hidden_paths(Path(workdir)) if h != Path("/")]
    return any(Path(path).is_relative_to(h) for h in hidden)


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


def test_every_durable_queue_is_a_quorum_queue_with_a_poison_message_guard() -> None:
    assert all(args["x-queue-type"] == "quorum" for args in (*QUEUES.values(), RUNNER_QUEUE_ARGS))
    guarded = {q for q, args in QUEUES.items() if args.get("x-delivery-limit") == DELIVERY_LIMIT}
    # Not the requests (they expire), the dead letters (listing them takes and
    # returns them) nor the owner record (every start reads and returns it).
    assert guarded == {*DISPATCHER_QUEUES, "volt.jobs.backlog"} - {"volt.dispatcher.rpc"}
    assert RUNNER_QUEUE_ARGS["x-delivery-limit"] == DELIVERY_LIMIT
    assert RUNNER_QUEUE_ARGS["x-expires"] == 15 * 60 * 1000  # a retired runner's queue goes
    single = {q for q, args in QUEUES.items() if args.get("x-single-active-consumer")}
    assert single == {"volt.dispatcher.commits", "volt.dispatcher.control", "volt.dispatcher.results"}


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
    assert naming.dead_letter_exchange(NS) == QUEUES["volt.jobs.backlog"]["x-dead-letter-exchange"] == "volt.dead"
    assert (naming.jobs_exchange(NS), naming.backlog_queue(NS), naming.BACKLOG_ROUTING_KEY) in BINDINGS
    assert naming.runner_queue(NS, "host-1") == RUNNER_QUEUE
    assert set(RUNNER_EXCHANGES) == {name(NS) for name in _RUNNER_EXCHANGES}
    assert set(RUNNER_EXCHANGES) == set(naming.exchanges(NS)) - {naming.commits_exchange(NS), naming.rpc_exchange(NS)}
    assert naming.rpc_exchange(NS) == RPC_EXCHANGE
    assert (RPC_EXCHANGE, naming.dispatcher_rpc_queue(NS), naming.dispatcher_rpc_queue(NS)) in BINDINGS
    assert {*DISPATCHER_QUEUES, OWNER_QUEUE} == {q for q in naming.shared_queues(NS) if ".dispatcher." in q}


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
    assert allowed(perm, "configure", naming.lock_queue(RUNNER_QUEUE))  # one runner process per id
    assert can_bind(perm, RUNNER_QUEUE, "volt.jobs")
    assert can_consume(perm, RUNNER_QUEUE)
    for exchange in ("volt.control", "volt.results", "volt.dead"):
        assert can_publish(perm, exchange), exchange


def test_dispatcher_can_do_its_work_and_no_more(definitions: dict[str, Any]) -> None:
    perm = permissions_of(definitions, "volt-dispatcher")
    assert can_declare_topology(perm)
    # One dispatcher with SQLite: its consumers hold their queues' locks.
    for queue in DISPATCHER_QUEUES:
        assert allowed(perm, "configure", naming.lock_queue(queue)), queue
    assert not allowed(perm, "configure", naming.lock_queue(RUNNER_QUEUE))
    for queue in (*DISPATCHER_QUEUES, "volt.jobs.backlog", OWNER_QUEUE):
        assert can_consume(perm, queue), queue  # consume, and basic.get on the backlog and the owner record
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
    # The user it runs as is the one it creates (the uid the k8s manifests name).
    assert re.search(rf"useradd [^\n]*--uid {user.split()[1].split(':')[0]}\b", text)
    # The runner's sandbox, as Debian ships it: not setuid, so it works
    # through user namespaces as this user, under no-new-privileges too.
    [install] = [ln for ln in lines if "apt-get install" in ln]
    assert "bubblewrap" in install.split()
    assert not re.search(r"chmod\s+(u\+s|[0-7]*[4-7][0-7]{3}\b)", text)
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
    assert set(services) == {"rabbitmq", "dispatcher", "observer", "runner", *CLUSTER_PROFILE}
    assert {name for name, service in services.items() if service.get("profiles")} == CLUSTER_PROFILE
    rabbit = services["rabbitmq"]
    image, _, tag = rabbit["image"].partition(":")
    assert image == "rabbitmq" and "management" in tag and re.match(r"\d+\.\d+", tag), "pinned tag"
    ports = {str(p).rsplit(":", 1)[-1] for p in rabbit["ports"]}
    assert {"5672", "15672"} <= ports
    mounts = {v.split(":")[1]: v.split(":")[0] for v in rabbit["volumes"]}
    assert (DEPLOY / mounts["/etc/rabbitmq/definitions.json"]).resolve() == DEPLOY / "rabbitmq" / "definitions.json"
    assert (DEPLOY / mounts["/etc/rabbitmq/rabbitmq.conf"]).resolve() == DEPLOY / "rabbitmq" / "rabbitmq.conf"
    assert rabbit["healthcheck"]["test"] == ["CMD", "rabbitmq-diagnostics", "-q", "ping"]


CLUSTER_PROFILE = {"rabbitmq-2", "rabbitmq-3", "postgres", "dispatcher-standby"}


def test_compose_cluster_profile_is_three_nodes_postgresql_and_two_dispatchers(compose: dict[str, Any]) -> None:
    services = compose["services"]
    for name in CLUSTER_PROFILE:
        assert services[name]["profiles"] == ["cluster"], name
    nodes = ["rabbitmq", "rabbitmq-2", "rabbitmq-3"]
    assert [services[n]["hostname"] for n in nodes] == nodes
    assert len({services[n]["image"] for n in nodes}) == 1
    cookies = {interpolate(services[n]["environment"]["RABBITMQ_ERLANG_COOKIE"]) for n in nodes}
    assert len(cookies) == 1  # one cluster needs one cookie
    conf = dict(
        line.split(" = ", 1)
        for line in (DEPLOY / "rabbitmq" / "cluster.conf").read_text().splitlines()
        if " = " in line and not line.startswith("#")
    )
    assert conf["cluster_formation.peer_discovery_backend"] == "classic_config"
    assert {v for k, v in conf.items() if k.startswith("cluster_formation.classic_config.nodes.")} == {
        f"rabbit@{n}" for n in nodes
    }
    for name in ("rabbitmq-2", "rabbitmq-3"):
        mounts = {v.split(":")[1]: v.split(":")[0] for v in services[name]["volumes"]}
        assert (DEPLOY / mounts["/etc/rabbitmq/rabbitmq.conf"]).resolve() == DEPLOY / "rabbitmq" / "cluster.conf"
    # Both dispatchers on the one PostgreSQL database (the first once VOLT_DB says so).
    standby = services["dispatcher-standby"]
    assert standby["command"] == services["dispatcher"]["command"] == ["dispatcher"]
    db = urllib.parse.urlsplit(interpolate(standby["environment"]["VOLT_DB"]))
    pg = services["postgres"]["environment"]
    assert (db.scheme, db.hostname, db.username, db.path) == (
        "postgresql",
        "postgres",
        pg["POSTGRES_USER"],
        f"/{pg['POSTGRES_DB']}",
    )
    assert db.password == interpolate(pg["POSTGRES_PASSWORD"])
    assert "postgresql://" in (DEPLOY / "compose.yaml").read_text().split("name: volt-ci")[0]  # how to switch the first
    assert interpolate(services["dispatcher"]["environment"]["VOLT_DB"]) == "/var/lib/volt/dispatcher/volt.db"
    assert standby["environment"]["VOLT_AMQP_URL"] == services["dispatcher"]["environment"]["VOLT_AMQP_URL"]
    assert "postgres" in standby["depends_on"]


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
        first, *others = interpolate(service["environment"]["VOLT_AMQP_URL"]).split(",")
        url = urllib.parse.urlsplit(first)
        assert (url.scheme, url.username, url.password) == ("amqp", f"volt-{role}", f"change-me-{role}")
        assert (url.hostname, url.port, url.path) == ("rabbitmq", 5672, "/%2F")
        # The cluster's other nodes, which take the first URL's login.
        assert others == ["amqp://rabbitmq-2:5672/%2F", "amqp://rabbitmq-3:5672/%2F"]
        assert service["environment"]["VOLT_NAMESPACE"] == NS


# The security options bwrap needs in a container, and why: Docker's default
# seccomp profile refuses unshare and mount without CAP_SYS_ADMIN, its default
# AppArmor profile refuses mount, and with parts of /proc masked the kernel
# refuses the box a /proc of its own.
BWRAP_SECURITY_OPT = {"seccomp=unconfined", "apparmor=unconfined", "systempaths=unconfined"}


def test_compose_runner_gives_bwrap_what_it_needs_and_no_more(compose: dict[str, Any]) -> None:
    runner = compose["services"]["runner"]
    assert sandbox_mode(runner["command"], runner["environment"]) == "bwrap"
    security_opt = set(runner["security_opt"])
    assert BWRAP_SECURITY_OPT <= security_opt
    assert "no-new-privileges:true" in security_opt
    # Nothing beyond what bwrap needs: no capability, no root, not privileged.
    assert runner["cap_drop"] == ["ALL"]
    assert "cap_add" not in runner and "privileged" not in runner
    assert str(runner.get("user", "10001")).split(":")[0] not in ("root", "0")


def test_compose_other_workers_keep_dockers_confinement(compose: dict[str, Any]) -> None:
    for name in ("dispatcher", "observer"):
        service = compose["services"][name]
        assert service["security_opt"] == ["no-new-privileges:true"], name
        assert service["cap_drop"] == ["ALL"], name
        assert "cap_add" not in service and "privileged" not in service, name


# -- systemd -------------------------------------------------------------------

UNITS = {
    "dispatcher": "volt-dispatcher.service",
    "observer": "volt-observer.service",
    "runner": "volt-runner@.service",
}


def _service(role: str) -> dict[str, list[str]]:
    return unit_directives(UNITS[role])["Service"]


def _state_directory(role: str, instance: str = "1") -> Path:
    [state] = _service(role)["StateDirectory"]
    return Path("/var/lib") / state.replace("%i", instance)


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
    assert service["User"] == f"volt-{subcommand}"
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


def test_systemd_each_role_has_a_user_of_its_own() -> None:
    users = {role: (_service(role)["User"], _service(role)["Group"]) for role in UNITS}
    assert users == {role: ([f"volt-{role}"], [f"volt-{role}"]) for role in UNITS}
    for role in UNITS:
        assert "DynamicUser" not in _service(role), role


def test_systemd_runner_can_write_only_its_own_workdir() -> None:
    service = _service("runner")
    assert service["ProtectSystem"] == ["strict"]
    # Under strict, what a unit may write is its StateDirectory and these.
    for directive in (
        "ReadWritePaths",
        "CacheDirectory",
        "LogsDirectory",
        "RuntimeDirectory",
        "ConfigurationDirectory",
    ):
        assert directive not in service, directive
    argv = shlex.split(service["ExecStart"][0])
    assert argv[argv.index("--workdir") + 1] == "/var/lib/volt/runner-%i"
    assert _state_directory("runner", "%i") == Path("/var/lib/volt/runner-%i")
    assert service["PrivateTmp"] == ["yes"] and service["ProtectHome"] == ["yes"]
    # The store and the observer's state belong to other users, and are not
    # even there for the runner; nor is any role's broker password.
    assert _sqlite_store().parent == _state_directory("dispatcher")
    inaccessible = {Path(p.lstrip("-")) for p in service["InaccessiblePaths"]}
    assert {_state_directory("dispatcher"), _state_directory("observer"), Path("/etc/volt")} <= inaccessible
    for role in ("dispatcher", "observer"):
        assert not _state_directory(role).is_relative_to(_state_directory("runner")), role


def test_systemd_runners_on_one_host_hide_each_others_folders_from_their_tests() -> None:
    # runner@1 and runner@2 share /var/lib/volt: a job of one must not read the
    # other's clones, outbox (lease tokens, logs) or job trees.
    argv = shlex.split(_service("runner")["ExecStart"][0])
    hide = [argv[i + 1] for i, arg in enumerate(argv) if arg == "--sandbox-hide"]
    other = str(_state_directory("runner", "2"))
    assert any(Path(other).is_relative_to(h) for h in hide), hide


# What bwrap needs from the runner's unit, and what takes it away:
# ProtectKernelTunables and ProtectKernelLogs mount over parts of /proc (the
# kernel then refuses the box a /proc of its own); RestrictNamespaces forbids
# its namespaces; SystemCallFilter sets without @mount forbid its mounts;
# RestrictAddressFamilies without AF_NETLINK stops it setting up loopback.
BWRAP_BREAKERS = ("ProtectKernelTunables", "ProtectKernelLogs", "RestrictNamespaces", "SystemCallFilter")


def test_systemd_runner_leaves_bwrap_what_it_needs() -> None:
    service = _service("runner")
    argv = shlex.split(service["ExecStart"][0])
    env = dict(v.split("=", 1) for v in service.get("Environment", []))
    assert sandbox_mode(argv, env) == "bwrap"
    for directive in BWRAP_BREAKERS:
        assert service.get(directive, ["no"]) in (["no"], ["false"]), directive
    families = service.get("RestrictAddressFamilies")
    assert families is None or "AF_NETLINK" in families
    # Fine with a bwrap that is not setuid (Debian's): it needs no new privilege.
    assert service["NoNewPrivileges"] == ["yes"]
    assert service["CapabilityBoundingSet"] == []
    # What the host must allow is written next to it.
    text = (DEPLOY / "systemd" / UNITS["runner"]).read_text()
    for sysctl in ("kernel.unprivileged_userns_clone", "user.max_user_namespaces"):
        assert sysctl in text, sysctl


def test_systemd_credentials_reach_only_their_own_unit() -> None:
    for role in UNITS:
        service = _service(role)
        # The broker URL (with its password) comes from the role's own file,
        # which is root's (0600); never from the unit itself.
        assert service["EnvironmentFile"] == ["/etc/volt/volt.env", f"/etc/volt/volt-{role}.env"], role
        assert "amqp" not in (DEPLOY / "systemd" / UNITS[role]).read_text(), role
    # git credentials: copied by systemd for this unit alone, to a directory
    # under /run that the sandbox hides from every test command.
    service = _service("runner")
    assert service["LoadCredential"] == ["git-credentials:/etc/volt/volt-runner.git-credentials"]
    argv = shlex.split(service["ExecStart"][0])
    assert argv[argv.index("--git-credentials") + 1] == "%d/git-credentials"
    credentials_directory = "/run/credentials/volt-runner@1.service"  # what %d names
    assert hidden_from_tests(credentials_directory, "/var/lib/volt/runner-1")
    env_file = (DEPLOY / "systemd" / "volt.env").read_text()
    assert not re.search(r"^VOLT_AMQP_URL=", env_file, re.M), "volt.env is 0644: no password in it"
    for role in UNITS:
        assert f"/etc/volt/volt-{role}.env" in env_file, role
    assert "/etc/volt/volt-runner.git-credentials" in env_file


# The dispatcher and the observer run no repository's code: they get what a
# network service needs and nothing else.
LOCKED_DOWN = {
    "NoNewPrivileges": ["yes"],
    "CapabilityBoundingSet": [],
    "PrivateTmp": ["yes"],
    "PrivateDevices": ["yes"],
    "ProtectSystem": ["strict"],
    "ProtectHome": ["yes"],
    "ProtectKernelTunables": ["yes"],
    "ProtectKernelModules": ["yes"],
    "ProtectKernelLogs": ["yes"],
    "ProtectControlGroups": ["yes"],
    "RestrictNamespaces": ["yes"],
    "RestrictSUIDSGID": ["yes"],
    "LockPersonality": ["yes"],
    "SystemCallFilter": ["@system-service"],
    "RestrictAddressFamilies": ["AF_UNIX", "AF_INET", "AF_INET6"],
}


@pytest.mark.parametrize("role", ["dispatcher", "observer"])
def test_systemd_dispatcher_and_observer_are_locked_down(role: str) -> None:
    service = _service(role)
    for directive, value in LOCKED_DOWN.items():
        assert service.get(directive) == value, directive
    for directive in ("ReadWritePaths", "InaccessiblePaths"):
        assert directive not in service, directive
    argv = shlex.split(service["ExecStart"][0])
    state = _sqlite_store() if role == "dispatcher" else Path(argv[argv.index("--state-dir") + 1])
    assert state.is_relative_to(_state_directory(role))


def _sqlite_store() -> Path:
    """The dispatcher unit's store unless its env file names a PostgreSQL database."""
    [default] = [e for e in _service("dispatcher")["Environment"] if e.startswith("VOLT_DB=")]
    return Path(default.split("=", 1)[1])


def test_systemd_dispatcher_can_run_on_several_hosts_on_postgresql() -> None:
    unit = (DEPLOY / "systemd" / "volt-dispatcher.service").read_text()
    assert "Run exactly one" not in unit and "two or more hosts" in unit
    argv = shlex.split(_service("dispatcher")["ExecStart"][0])
    assert "--db" not in argv  # VOLT_DB: the default in the unit, or an env file's postgresql:// URL
    env_file = (DEPLOY / "systemd" / "volt.env").read_text()
    assert "VOLT_DB=postgresql://" in env_file
    assert "VOLT_QUEUE_TYPE=quorum" in env_file.splitlines()


def test_systemd_env_file_is_key_value() -> None:
    for line in (DEPLOY / "systemd" / "volt.env").read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            key, sep, _ = line.partition("=")
            assert sep and re.fullmatch(r"VOLT_[A-Z_]+", key), line


# -- Kubernetes ----------------------------------------------------------------


K8S_KINDS = {
    "namespace.yaml": ["Namespace"],
    "secret.example.yaml": ["Secret", "Secret", "Secret"],
    "config.yaml": ["ConfigMap"],
    "dispatcher.yaml": ["PersistentVolumeClaim", "Deployment", "Service"],
    "dispatcher-ha.yaml": ["Deployment"],
    "observer.yaml": ["PersistentVolumeClaim", "Deployment"],
    "runner.yaml": ["Deployment", "NetworkPolicy"],
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


def _secrets() -> dict[str, dict[str, Any]]:
    return {doc["metadata"]["name"]: doc for doc in k8s_docs("secret.example.yaml")}


def _sandbox_env(container: dict[str, Any]) -> dict[str, str]:
    """What the container's environment says, the ConfigMap included."""
    [config] = k8s_docs("config.yaml")
    env = dict(config["data"])
    env.update({name: e["value"] for name, e in _env(container).items() if "value" in e})
    return env


@pytest.mark.parametrize("role", ["dispatcher", "observer", "runner"])
def test_k8s_pods_get_no_service_account_token(role: str) -> None:
    deployment, _ = _deployment(f"{role}.yaml")
    pod = deployment["spec"]["template"]["spec"]
    assert pod["automountServiceAccountToken"] is False
    assert "serviceAccountName" not in pod


def test_k8s_runner_pod_gives_bwrap_what_it_needs_and_no_more() -> None:
    deployment, _ = _deployment("runner.yaml")
    pod = deployment["spec"]["template"]["spec"]
    [container] = pod["containers"]
    assert sandbox_mode(container["args"], _sandbox_env(container)) == "bwrap"
    context = container["securityContext"]
    # What the runtime's defaults take away and bwrap needs: see runner.yaml.
    assert context["seccompProfile"]["type"] in ("Unconfined", "Localhost")
    assert context["appArmorProfile"]["type"] in ("Unconfined", "Localhost")
    assert context["procMount"] == "Unmasked"
    # Kubernetes allows an unmasked /proc only in a pod with its own user namespace.
    assert pod["hostUsers"] is False
    # And nothing more: no capability, no escalation, no root.
    assert context["allowPrivilegeEscalation"] is False
    assert context["capabilities"] == {"drop": ["ALL"]}
    assert not context.get("privileged", False)
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["runAsUser"] != 0
    for field in ("hostNetwork", "hostPID", "hostIPC"):
        assert not pod.get(field, False), field


@pytest.mark.parametrize("role", ["dispatcher", "observer"])
def test_k8s_only_the_runner_loosens_the_runtimes_confinement(role: str) -> None:
    deployment, _ = _deployment(f"{role}.yaml")
    pod = deployment["spec"]["template"]["spec"]
    assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    [container] = pod["containers"]
    context = container["securityContext"]
    for field in ("seccompProfile", "appArmorProfile", "procMount", "privileged"):
        assert field not in context, field
    assert context["allowPrivilegeEscalation"] is False
    assert context["capabilities"] == {"drop": ["ALL"]}


def test_k8s_runner_git_credentials_are_hidden_from_tests() -> None:
    deployment, _ = _deployment("runner.yaml")
    pod = deployment["spec"]["template"]["spec"]
    [container] = pod["containers"]
    args = container["args"]
    path = Path(args[args.index("--git-credentials") + 1])
    [volume] = [v for v in pod["volumes"] if "secret" in v]
    [mount] = [m for m in container["volumeMounts"] if m["name"] == volume["name"]]
    assert path.parent == Path(mount["mountPath"]) and mount["readOnly"] is True
    assert path.name in _secrets()[volume["secret"]["secretName"]]["stringData"]
    assert hidden_from_tests(path, args[args.index("--workdir") + 1])


def test_k8s_runner_network_policy_allows_only_the_broker_dns_and_git() -> None:
    deployment, docs = _deployment("runner.yaml")
    [policy] = [d for d in docs if d["kind"] == "NetworkPolicy"]
    spec = policy["spec"]
    # It applies to the runner pods, all of them.
    selector = deployment["spec"]["selector"]["matchLabels"]
    assert spec["podSelector"] == {"matchLabels": selector}
    assert selector.items() <= deployment["spec"]["template"]["metadata"]["labels"].items()
    # Ingress: nothing may connect. Egress: only the rules below.
    assert set(spec["policyTypes"]) == {"Ingress", "Egress"}
    assert not spec.get("ingress")
    allowed_to: dict[tuple[str, int], list[dict[str, Any]]] = {}
    for rule in spec["egress"]:
        # A rule without "to" allows every destination; without "ports", every port.
        assert rule.get("to") and rule.get("ports"), rule
        for port in rule["ports"]:
            assert "endPort" not in port, port
            allowed_to.setdefault((port["protocol"], port["port"]), []).extend(rule["to"])
    assert set(allowed_to) == {("TCP", 5672), ("TCP", 5671), ("UDP", 53), ("TCP", 53), ("TCP", 443), ("TCP", 22)}
    # The broker: the pods of the RabbitmqCluster the runner's URL names.
    broker = urllib.parse.urlsplit(_secrets()["volt-amqp"]["stringData"]["runner-url"])
    assert broker.port in (5672, 5671)
    for port in (5672, 5671):
        assert allowed_to[("TCP", port)] == [
            {
                "podSelector": {
                    "matchLabels": {
                        "app.kubernetes.io/component": "rabbitmq",
                        "app.kubernetes.io/name": broker.hostname,
                    }
                }
            }
        ]
    # DNS: the cluster's resolver only.
    for protocol in ("UDP", "TCP"):
        [dns] = allowed_to[(protocol, 53)]
        assert dns["podSelector"] == {"matchLabels": {"k8s-app": "kube-dns"}}
        assert dns["namespaceSelector"] == {"matchLabels": {"kubernetes.io/metadata.name": "kube-system"}}
    # Git over HTTPS and SSH, to addresses (no pod or namespace selectors).
    for port in (443, 22):
        assert all(set(to) == {"ipBlock"} for to in allowed_to[("TCP", port)]), port


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
    # Scratch space, the git credentials, and the tun device the boxes' network needs, nothing else of the node.
    others = [v for v in pod["volumes"] if "emptyDir" not in v and v.get("secret", {}).get("secretName") != "volt-git"]
    assert others == [{"name": "tun", "hostPath": {"path": "/dev/net/tun", "type": "CharDevice"}}]
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
    secret = _secrets()["volt-amqp"]
    url = urllib.parse.urlsplit(secret["stringData"][f"{role}-url"])
    assert (url.username, url.hostname) == (f"volt-{role}", "rabbitmq")
    images = {containers(_deployment(f"{r}.yaml")[0])[0]["image"] for r in ("dispatcher", "observer", "runner")}
    assert len(images) == 1


def test_k8s_dispatcher_on_postgresql_runs_two_replicas_without_a_volume() -> None:
    deployment, _ = _deployment("dispatcher-ha.yaml")
    sqlite, _ = _deployment("dispatcher.yaml")
    assert deployment["spec"]["replicas"] == 2
    assert deployment["metadata"]["name"] == sqlite["metadata"]["name"]  # one or the other
    assert deployment["spec"]["selector"] == sqlite["spec"]["selector"]  # the Service finds either
    pod = deployment["spec"]["template"]["spec"]
    assert "volumes" not in pod
    [container] = pod["containers"]
    assert container["args"] == ["dispatcher"]
    assert _env(container)["VOLT_DB"]["valueFrom"]["secretKeyRef"] == {"name": "volt-db", "key": "url"}
    assert urllib.parse.urlsplit(_secrets()["volt-db"]["stringData"]["url"]).scheme == "postgresql"
    for probe in ("readinessProbe", "livenessProbe"):
        assert container[probe]["exec"]["command"] == ["volt", "check"]
    [kustomization] = k8s_docs("kustomization.yaml")
    assert "dispatcher.yaml" in kustomization["resources"] and "dispatcher-ha.yaml" not in kustomization["resources"]


def test_k8s_dispatcher_probes_use_volt_check() -> None:
    deployment, _ = _deployment("dispatcher.yaml")
    [container] = containers(deployment)
    for probe in ("readinessProbe", "livenessProbe"):
        assert container[probe]["exec"]["command"] == ["volt", "check"]


def test_keda_scales_runners_on_the_backlog() -> None:
    docs = {d["kind"]: d for d in k8s_docs("keda-scaledobject.yaml")}
    scaled = docs["ScaledObject"]
    assert scaled["spec"]["scaleTargetRef"]["name"] == "volt-runner"
    trigger, store = scaled["spec"]["triggers"]
    assert trigger["type"] == "rabbitmq"
    # Also the jobs waiting in the store (parked for labels, assigned, running).
    assert store["type"] == "prometheus"
    assert "volt_jobs_by_state" in store["metadata"]["query"] and "parked" in store["metadata"]["query"]
    assert store["metadata"]["query"].startswith("max(")  # standby replicas report the same store
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


# -- README --------------------------------------------------------------------


def test_readme_says_what_each_deployment_does_for_the_trust_boundary() -> None:
    text = (DEPLOY / "README.md").read_text()
    section = text.split("\n## Trust boundary\n", 1)[1].split("\n## ", 1)[0]
    for needed in (
        "**systemd.**",
        "**Compose.**",
        "**Kubernetes.**",
        "--sandbox none",
        "VOLT_SANDBOX=none",
        "user.max_user_namespaces",
        "kernel.unprivileged_userns_clone",
        "kernel.apparmor_restrict_unprivileged_userns",
        "procMount: Unmasked",
        "hostUsers: false",
        *sorted(BWRAP_SECURITY_OPT),
    ):
        assert needed in section, needed
