"""Every exchange, queue and routing-key name, in one place.

Names are prefixed with the namespace so several Volt CI instances (and
parallel tests) share one broker without touching each other.
"""

from __future__ import annotations

import re
from pathlib import Path

_RUNNER_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")


def valid_runner_id(runner_id: str) -> bool:
    """A runner id becomes part of a queue name and a routing key, so keep it plain."""
    return bool(_RUNNER_ID.fullmatch(runner_id))


# Exchanges
def commits_exchange(ns: str) -> str:
    return f"{ns}.commits"


def control_exchange(ns: str) -> str:
    return f"{ns}.control"


def jobs_exchange(ns: str) -> str:
    return f"{ns}.jobs"


def results_exchange(ns: str) -> str:
    return f"{ns}.results"


def dead_letter_exchange(ns: str) -> str:
    return f"{ns}.dead"


def rpc_exchange(ns: str) -> str:
    """Requests to the dispatcher. An exchange of its own, not the default one,
    so a user allowed to ask cannot put a message in any other queue."""
    return f"{ns}.rpc"


# Queues
def dispatcher_commits_queue(ns: str) -> str:
    return f"{ns}.dispatcher.commits"


def dispatcher_control_queue(ns: str) -> str:
    return f"{ns}.dispatcher.control"


def dispatcher_results_queue(ns: str) -> str:
    return f"{ns}.dispatcher.results"


def dispatcher_rpc_queue(ns: str) -> str:
    return f"{ns}.dispatcher.rpc"


def backlog_queue(ns: str) -> str:
    """Jobs waiting for a free runner: its ready count is the backlog."""
    return f"{ns}.jobs.backlog"


def runner_queue(ns: str, runner_id: str) -> str:
    return f"{ns}.runner.{runner_id}"


def dead_letter_queue(ns: str) -> str:
    return f"{ns}.dead-letter"


# Routing keys on the jobs exchange. Runners and the backlog live under
# different prefixes so no runner id can collide with the backlog.
def runner_routing_key(runner_id: str) -> str:
    return f"runner.{runner_id}"


BACKLOG_ROUTING_KEY = "backlog"


def shared_queues(ns: str) -> list[str]:
    """The queues every namespace has, whoever runs."""
    return [
        dispatcher_commits_queue(ns),
        dispatcher_control_queue(ns),
        dispatcher_results_queue(ns),
        dispatcher_rpc_queue(ns),
        backlog_queue(ns),
        dead_letter_queue(ns),
    ]


def exchanges(ns: str) -> list[str]:
    return [
        commits_exchange(ns),
        control_exchange(ns),
        jobs_exchange(ns),
        results_exchange(ns),
        dead_letter_exchange(ns),
        rpc_exchange(ns),
    ]


def normalize_repo(repo: str) -> str:
    """A repository's identity: a local path made absolute (runners clone from
    it), any URL as given."""
    if re.match(r"^[A-Za-z][A-Za-z0-9+.-]*://", repo) or re.match(r"^[^/]+@[^/]+:", repo):
        return repo
    return str(Path(repo).expanduser().resolve())


def is_local(repo: str) -> bool:
    """Whether a normalized repository is a path on this machine rather than a URL."""
    return repo.startswith("/")
