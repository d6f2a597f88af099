"""Every exchange, queue and routing-key name, in one place.

Names are prefixed with the namespace so several Volt CI instances (and
parallel tests) share one broker without touching each other.
"""

from __future__ import annotations

import re
import urllib.parse
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


def dispatcher_owner_queue(ns: str) -> str:
    """Holds one message: the id of the store that owns the namespace, so that a
    dispatcher with another store cannot take it over while the owner is away."""
    return f"{ns}.dispatcher.owner"


def backlog_queue(ns: str) -> str:
    """Jobs waiting for a free runner: its ready count is the backlog."""
    return f"{ns}.jobs.backlog"


def runner_queue(ns: str, runner_id: str) -> str:
    return f"{ns}.runner.{runner_id}"


def dead_letter_queue(ns: str) -> str:
    return f"{ns}.dead-letter"


def lock_queue(queue: str) -> str:
    """The exclusive queue whose holder alone may consume `queue`. Quorum queues
    ignore an exclusive consumer, so the lock is a queue of its own, which the
    broker lets one connection hold and drops with it. No runner id holds a ':'."""
    return f"{queue}:lock"


def migrating_queue(queue: str) -> str:
    """Where `volt migrate-queues` keeps a queue's messages while it declares it anew."""
    return f"{queue}:migrating"


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
        dispatcher_owner_queue(ns),
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


_URL = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*)://")
_DEFAULT_PORTS = {"http": "80", "https": "443", "ssh": "22", "git": "9418"}
# Over http(s) a user name is half of a credential; over ssh it says which
# account the key logs in to, so it is part of where the repository is.
_USER_IS_CREDENTIAL = ("http", "https")


def normalize_repo(repo: str) -> str:
    """A repository's identity: the one name it is stored, logged and published
    under, never with credentials.

    A local path or file:// URL becomes its absolute, resolved path (runners
    clone from it); any other URL loses its password (and, over http(s), its
    user name), its default port and trailing slashes, and has its scheme and
    host lower-cased. ValueError for a URL git could not use either.
    """
    if not repo or "\n" in repo or "\0" in repo:
        raise ValueError("a repository must be one non-empty line")
    match = _URL.match(repo)
    if match:
        scheme = match.group(1).lower()
        if scheme == "file":
            return _file_identity(repo)
        return _url_identity(repo, scheme)
    scp = _scp_identity(repo)
    if scp is not None:
        return scp
    return str(Path(repo).expanduser().resolve())


def split_netloc(netloc: str) -> tuple[str, str | None, str]:
    """A URL's `user:password@host:port` as (user, password or None, host:port),
    still percent-encoded."""
    userinfo, at, hostport = netloc.rpartition("@")
    if not at:
        return "", None, netloc
    user, colon, password = userinfo.partition(":")
    return user, (password if colon else None), hostport


def _url_identity(repo: str, scheme: str) -> str:
    parsed = urllib.parse.urlsplit(repo)
    user, _, hostport = split_netloc(parsed.netloc)
    host, port = _host_and_port(hostport)
    if port == _DEFAULT_PORTS.get(scheme):
        port = ""
    netloc = host + (f":{port}" if port else "")
    if user and scheme not in _USER_IS_CREDENTIAL:
        netloc = f"{user}@{netloc}"
    path = parsed.path.rstrip("/")
    return urllib.parse.urlunsplit((scheme, netloc, path, parsed.query, parsed.fragment))


def _host_and_port(hostport: str) -> tuple[str, str]:
    if hostport.startswith("["):  # an IPv6 address
        host, _, rest = hostport.partition("]")
        host, port = host + "]", rest.removeprefix(":")
    else:
        host, _, port = hostport.partition(":")
    if not host or not (port == "" or port.isdigit()):
        raise ValueError(f"not a repository URL (bad host or port): {hostport!r:.80}")
    return host.lower(), port


def _file_identity(repo: str) -> str:
    parsed = urllib.parse.urlsplit(repo)
    if parsed.netloc not in ("", "localhost"):
        # Another machine's file: only a name, nothing to resolve here.
        return urllib.parse.urlunsplit(("file", parsed.netloc.lower(), parsed.path.rstrip("/"), "", ""))
    return str(Path(urllib.parse.unquote(parsed.path) or "/").resolve())


def _scp_identity(repo: str) -> str | None:
    """git's scp-like `[user@]host:path`: a colon with no slash before it."""
    head, colon, path = repo.partition(":")
    if not colon or "/" in head or not head:
        return None
    user, at, host = head.rpartition("@")
    trimmed = path.rstrip("/") or path
    return f"{user}{at}{host.lower()}:{trimmed}"


def is_local(repo: str) -> bool:
    """Whether a normalized repository is a path on this machine rather than a URL."""
    return repo.startswith("/")
