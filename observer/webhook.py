"""The push path: forge webhooks and local hooks over HTTP, into the observer's loop.

`POST /webhook` takes push events from GitHub, GitLab and Gitea/Forgejo, each
checked with the shared secret the forge's own way; `POST /notify` takes
`repo`, `branch` (and `commit`) from a local hook.

Nothing here publishes. A request that passes its checks names a watched
repository and branch; the receiver hands that to the observer's loop (see
`Observer.submit`), which fetches and looks at that branch exactly as a poll
does. So the cursor stays the one record of what was published (a webhook
and a poll never publish a commit twice), pika is used by its own thread
only, and no payload can make the observer publish a commit that git does
not have on that branch. The payload's own commit list is not used at all:
every forge truncates it, and they do not agree on its order.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import socket
import sys
import threading
import time
import urllib.parse
from collections import OrderedDict
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from common.gitutil import one_line
from common.messages import check_branch, check_commit
from common.naming import is_local, normalize_repo
from observer.notify import NOTIFY_PATH, TOKEN_HEADER

log = logging.getLogger(__name__)

WEBHOOK_PATH = "/webhook"
MAX_BODY = 5 * 1024 * 1024
# A body a little over the limit is read and dropped, so the sender reads
# the 413 rather than a reset connection; a far larger one is cut off.
DRAIN_LIMIT = 4 * MAX_BODY
# Seconds a request may take to arrive whole: a slow sender cannot hold a thread.
REQUEST_TIMEOUT = 10.0
# Requests handled at once; more wait for none of them and get 503.
MAX_IN_FLIGHT = 16
# Deliveries remembered against replays (in memory: a replay after a restart
# only makes the observer look at a branch, which publishes nothing new).
REMEMBERED = 10_000
ZERO_COMMIT = frozenset("0")

# The header each forge names its event with, in the order they are told
# apart: Gitea and Forgejo also send GitHub's headers, Forgejo also Gitea's.
EVENT_HEADERS = (
    ("gitlab", "X-Gitlab-Event"),
    ("forgejo", "X-Forgejo-Event"),
    ("gitea", "X-Gitea-Event"),
    ("github", "X-GitHub-Event"),
)
# The signature headers each forge sends (hex HMAC-SHA256 of the body), the
# first one present is the one checked: a bad one is not saved by another.
SIGNATURE_HEADERS = {
    "github": ("X-Hub-Signature-256",),
    "gitea": ("X-Gitea-Signature", "X-Hub-Signature-256"),
    "forgejo": ("X-Forgejo-Signature", "X-Gitea-Signature", "X-Hub-Signature-256"),
}
DELIVERY_HEADERS = {
    "github": ("X-GitHub-Delivery",),
    "gitea": ("X-Gitea-Delivery", "X-GitHub-Delivery"),
    "forgejo": ("X-Forgejo-Delivery", "X-Gitea-Delivery"),
    # Idempotency-Key stays the same over GitLab's retries; older versions send
    # neither, and the body's hash stands in.
    "gitlab": ("Idempotency-Key", "X-Gitlab-Event-UUID"),
}
# Where each forge's push payload names the repository.
REPO_FIELDS = {
    "github": (("repository", ("clone_url", "ssh_url", "git_url", "html_url", "url", "svn_url")),),
    "gitlab": (
        ("project", ("git_http_url", "git_ssh_url", "http_url", "ssh_url", "web_url", "url")),
        ("repository", ("git_http_url", "git_ssh_url", "homepage", "url")),
    ),
}
REPO_FIELDS["gitea"] = REPO_FIELDS["forgejo"] = REPO_FIELDS["github"]

Headers = Any  # an email.message.Message as http.server parses it: .get(name) is case-blind


@dataclass(frozen=True)
class Push:
    """What a request asks of the loop: look at one branch of one repository now."""

    source: str  # github, gitlab, gitea, forgejo or notify
    repos: tuple[str, ...]  # how the request names the repository
    branch: str  # "" from a hook that named none: every branch watched
    after: str = ""  # the head the sender says the branch moved to; for the log
    delivery: str = ""


@dataclass(frozen=True)
class Outcome:
    """The answer to one request: its HTTP status and one line for people."""

    status: int
    message: str


class Refused(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


# -- what the forges send ---------------------------------------------------


def forge_of(headers: Headers) -> str | None:
    for forge, header in EVENT_HEADERS:
        if headers.get(header):
            return forge
    return None


def event_of(forge: str, headers: Headers) -> str:
    return str(headers.get(dict(EVENT_HEADERS)[forge], "")).strip()


def signature(secret: bytes, body: bytes) -> str:
    """The hex HMAC-SHA256 of the body that GitHub and Gitea/Forgejo send."""
    return hmac.new(secret, body, hashlib.sha256).hexdigest()


def verify(forge: str, headers: Headers, body: bytes, secret: bytes) -> None:
    """Refused(401) unless the request carries the secret the forge's way."""
    if forge == "gitlab":
        token = headers.get("X-Gitlab-Token")
        if token is None:
            raise Refused(401, "no X-Gitlab-Token header")
        # Headers arrive decoded as Latin-1: encoding back gives their bytes.
        if not hmac.compare_digest(token.encode("latin-1"), secret):
            raise Refused(401, "wrong X-Gitlab-Token")
        return
    names = SIGNATURE_HEADERS[forge]
    name = next((n for n in names if headers.get(n) is not None), None)
    if name is None:
        raise Refused(401, f"no {' or '.join(names)} header")
    given = headers[name].strip()
    if name == "X-Hub-Signature-256":
        if not given.startswith("sha256="):
            raise Refused(401, f"{name} is not sha256=HEX")
        given = given[len("sha256=") :]
    if not hmac.compare_digest(given.lower().encode("latin-1"), signature(secret, body).encode()):
        raise Refused(401, f"bad {name} signature")


def delivery_of(forge: str, headers: Headers) -> str:
    for name in DELIVERY_HEADERS[forge]:
        value = headers.get(name)
        if value:
            return " ".join(str(value).split())[:100]
    return ""


def decode(headers: Headers, body: bytes) -> dict[str, Any]:
    """The payload as a dict: JSON, or GitHub's and Gitea's form encoding (payload=JSON)."""
    try:
        text = body.decode("utf-8")
        if str(headers.get("Content-Type", "")).startswith("application/x-www-form-urlencoded"):
            text = urllib.parse.parse_qs(text, max_num_fields=100).get("payload", [""])[0]
        payload = json.loads(text)
    except (ValueError, RecursionError):
        raise Refused(400, "the body is not JSON (nor a form with payload=JSON)") from None
    if not isinstance(payload, dict):
        raise Refused(400, "the body is not a JSON object")
    return payload


def read_push(forge: str, event: str, payload: dict[str, Any], delivery: str) -> Push | str:
    """The push a forge's event reports, or why there is nothing to do (a
    string); Refused(400) for a payload that is not what a push looks like."""
    is_push = event == "push" if forge != "gitlab" else event == "Push Hook"
    if forge == "gitlab" and event == "System Hook":
        is_push = payload.get("event_name") == "push" or payload.get("object_kind") == "push"
    if not is_push:
        return f"a {event!r:.40} event: only pushes are acted on"
    ref, after = payload.get("ref"), payload.get("after")
    if not isinstance(ref, str) or not ref:
        raise Refused(400, "not a push payload: it has no ref")
    if not ref.startswith("refs/heads/"):
        return f"{ref:.120} is not a branch"
    try:
        branch = check_branch(ref[len("refs/heads/") :])
    except ValueError as exc:
        raise Refused(400, f"not a push payload: {exc}") from None
    if not isinstance(after, str) or not (set(after) == ZERO_COMMIT or _is_commit(after)):
        raise Refused(400, "not a push payload: after is not a commit id")
    if set(after) == ZERO_COMMIT or payload.get("deleted") is True:
        return f"branch {branch} was deleted"
    repos = tuple(_repo_names(forge, payload))
    if not repos:
        raise Refused(400, "not a push payload: it names no repository")
    return Push(source=forge, repos=repos, branch=branch, after=after, delivery=delivery)


def _repo_names(forge: str, payload: dict[str, Any]) -> Iterable[str]:
    for section, fields in REPO_FIELDS[forge]:
        where = payload.get(section)
        if isinstance(where, dict):
            for name in fields:
                value = where.get(name)
                if isinstance(value, str) and value and len(value) <= 2000:
                    yield value


def _is_commit(sha: str) -> bool:
    try:
        check_commit(sha)
        return True
    except ValueError:
        return False


def read_notify(headers: Headers, body: bytes) -> Push:
    """A local hook's `repo` (and `branch`, and `commit`), as a form or as JSON; without
    a branch, every branch watched in that repository is looked at."""
    if str(headers.get("Content-Type", "")).startswith("application/json"):
        fields = decode(headers, body)
    else:
        try:
            form = urllib.parse.parse_qs(body.decode("utf-8"), max_num_fields=10, strict_parsing=False)
        except (ValueError, UnicodeDecodeError):
            raise Refused(400, "the body is neither a form nor JSON") from None
        fields = {key: values[0] for key, values in form.items()}
    repo, branch, commit = fields.get("repo"), fields.get("branch") or "", fields.get("commit") or ""
    if not isinstance(repo, str) or not repo:
        raise Refused(400, "give repo (and branch, and commit)")
    if not isinstance(branch, str) or not isinstance(commit, str):
        raise Refused(400, "give repo (and branch, and commit) as strings")
    try:
        normalize_repo(repo)
        if branch:  # none: every branch the observer watches in that repository
            branch = check_branch(branch)
        if commit:
            check_commit(commit)
    except ValueError as exc:
        raise Refused(400, str(exc)) from None
    return Push(source="notify", repos=(repo,), branch=branch, after=commit)


def repo_key(name: str) -> str | None:
    """What a repository is matched by, however a forge or a hook spells it.

    A local path is its identity. A URL of any protocol is its host and path,
    without user, port, `.git` or case: a forge serves one repository as
    https://host/o/r.git, git@host:o/r.git and its page https://host/o/r.
    A looser match than a repository's identity costs nothing: a request only
    makes the observer look at a branch it watches anyway.
    """
    try:
        identity = normalize_repo(name)
    except ValueError:
        return None
    if is_local(identity):
        return identity
    if "://" in identity:
        parts = urllib.parse.urlsplit(identity)
        host, path = parts.hostname or "", parts.path
    else:  # git's scp-like [user@]host:path
        head, _, path = identity.partition(":")
        host = head.rpartition("@")[2]
    path = path.strip("/").removesuffix(".git").rstrip("/")
    return f"{host.lower()}/{path.lower()}"


class Deliveries:
    """The deliveries lately taken, by id and by body, against replays."""

    def __init__(self, keep: int = REMEMBERED) -> None:
        self.keep = keep
        self._seen: OrderedDict[str, None] = OrderedDict()
        self._lock = threading.Lock()

    def claim(self, keys: list[str]) -> bool:
        """Take these keys; False (and nothing taken) when one was taken before."""
        with self._lock:
            if any(key in self._seen for key in keys):
                return False
            for key in keys:
                self._seen[key] = None
            while len(self._seen) > self.keep:
                self._seen.popitem(last=False)
            return True

    def release(self, keys: list[str]) -> None:
        """Forget keys whose request came to nothing: the forge may send it again."""
        with self._lock:
            for key in keys:
                self._seen.pop(key, None)


# -- the receiver -----------------------------------------------------------


class Receiver:
    """The HTTP server and the checks; `submit` hands a push to the observer."""

    def __init__(self, host: str, port: int, secret: bytes | None, submit: Callable[[Push], Outcome]) -> None:
        self.secret = secret
        self.submit = submit
        self.deliveries = Deliveries()
        self.slots = threading.BoundedSemaphore(MAX_IN_FLIGHT)
        server = _Server6 if ":" in host else _Server
        self.server = server((host, port), _Handler)  # binds now: an address in use is an error at start
        self.server.receiver = self
        self._thread: threading.Thread | None = None

    @property
    def address(self) -> str:
        host, port = str(self.server.server_address[0]), self.server.server_address[1]
        return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"

    def start(self) -> None:
        self._thread = threading.Thread(target=self.server.serve_forever, name="webhook-receiver", daemon=True)
        self._thread.start()
        log.info("taking webhooks on http://%s%s and local hooks on %s", self.address, WEBHOOK_PATH, NOTIFY_PATH)

    def close(self) -> None:
        if self._thread is not None:
            self.server.shutdown()
            self._thread.join(timeout=5)
        self.server.server_close()

    def handle(self, path: str, headers: Headers, body: bytes) -> Outcome:
        """Answer one POST whose body has arrived whole (and within MAX_BODY)."""
        route = path.partition("?")[0].rstrip("/") or "/"
        try:
            if route == NOTIFY_PATH:
                return self._notify(headers, body)
            if route in (WEBHOOK_PATH, "/"):
                return self._webhook(headers, body)
            raise Refused(404, f"no such path; forges post to {WEBHOOK_PATH}, hooks to {NOTIFY_PATH}")
        except Refused as refused:
            return Outcome(refused.status, refused.message)

    def _webhook(self, headers: Headers, body: bytes) -> Outcome:
        forge = forge_of(headers)
        if forge is None:
            raise Refused(400, "not a forge's webhook: no X-GitHub-Event, X-Gitlab-Event, X-Gitea-Event "
                          "or X-Forgejo-Event header")  # fmt: skip
        delivery = delivery_of(forge, headers)
        if self.secret is None:
            raise Refused(401, "no --webhook-secret-file is set, so no webhook can be verified")
        verify(forge, headers, body, self.secret)
        event = event_of(forge, headers)
        if forge == "github" and event == "ping":
            return Outcome(200, "pong: the webhook reaches the observer and its signature holds")
        push = read_push(forge, event, decode(headers, body), delivery)
        if isinstance(push, str):
            return Outcome(202, f"nothing to do: {push}")
        keys = [f"body:{hashlib.sha256(body).hexdigest()}"] + ([f"{forge}:{delivery}"] if delivery else [])
        if not self.deliveries.claim(keys):
            raise Refused(409, f"a replay of delivery {delivery or '(the same body)'}: already taken")
        outcome = self.submit(push)
        if outcome.status >= 300:
            self.deliveries.release(keys)
        return outcome

    def _notify(self, headers: Headers, body: bytes) -> Outcome:
        if self.secret is not None:
            token = headers.get(TOKEN_HEADER)
            if token is None:
                raise Refused(401, f"no {TOKEN_HEADER} header")
            if not hmac.compare_digest(token.strip().encode("latin-1"), self.secret):
                raise Refused(401, f"wrong {TOKEN_HEADER}")
        return self.submit(read_notify(headers, body))


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    receiver: Receiver

    def handle_error(self, request: Any, client_address: Any) -> None:
        # One line, not the standard library's traceback on stderr; the receiver goes on.
        exc = sys.exc_info()[1]
        where = client_address[0] if client_address else "?"
        log.error("webhook request from %s failed: %s: %s", where, type(exc).__name__, one_line(exc) if exc else "?")


class _Server6(_Server):
    address_family = socket.AF_INET6


class _Handler(BaseHTTPRequestHandler):
    server: _Server
    server_version = "volt-observer"
    sys_version = ""
    protocol_version = "HTTP/1.1"  # for Expect: 100-continue (curl's, for large bodies)
    timeout = REQUEST_TIMEOUT

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - the base class's name
        log.debug("%s %s", self.address_string(), format % args)

    def do_GET(self) -> None:
        self._answer(Outcome(405, f"POST a push to {WEBHOOK_PATH}, or repo and branch to {NOTIFY_PATH}"))

    def handle_expect_100(self) -> bool:
        # Refused before the body is sent, when it says it is too large.
        if self._too_large(self._length()):
            self._refuse_size()
            return False
        return super().handle_expect_100()

    def do_POST(self) -> None:
        receiver = self.server.receiver
        length = self._length()
        if length is None:
            self._answer(self._logged(Outcome(411, "a body with a Content-Length is needed")))
            return
        if self._too_large(length):
            self._drain(length)
            self._refuse_size()
            return
        if not receiver.slots.acquire(blocking=False):
            self._answer(self._logged(Outcome(503, "too many requests at once; send it again")))
            return
        try:
            body = self._body(length)
            if body is None:
                self._answer(self._logged(Outcome(400, "the body did not arrive whole in time")))
                return
            try:
                outcome = receiver.handle(self.path, self.headers, body)
            except Exception as exc:  # noqa: BLE001 - one request must not stop the receiver
                log.error("POST %s from %s failed: %s: %s", self.path[:100], self.address_string(),
                          type(exc).__name__, one_line(exc))  # fmt: skip
                outcome = Outcome(500, "the observer failed on this request; its log says why")
            self._answer(outcome if outcome.status == 500 else self._logged(outcome))
        finally:
            receiver.slots.release()

    def _length(self) -> int | None:
        if self.headers.get("Transfer-Encoding"):
            return None
        raw = self.headers.get("Content-Length", "")
        return int(raw) if raw.isdigit() else None

    @staticmethod
    def _too_large(length: int | None) -> bool:
        return length is not None and length > MAX_BODY

    def _refuse_size(self) -> None:
        self._answer(self._logged(Outcome(413, f"the body is over {MAX_BODY // (1024 * 1024)} MB: nothing taken")))

    def _body(self, length: int) -> bytes | None:
        deadline = time.monotonic() + REQUEST_TIMEOUT
        chunks, size = [], 0
        try:
            while size < length:
                if time.monotonic() > deadline:
                    return None
                chunk = self.rfile.read1(min(65536, length - size))
                if not chunk:
                    return None
                chunks.append(chunk)
                size += len(chunk)
        except OSError:  # the socket's own timeout, or the sender went away
            return None
        return b"".join(chunks)

    def _drain(self, length: int) -> None:
        """Read and drop a body too large to take, so its sender gets to read the 413."""
        if length > DRAIN_LIMIT:
            return
        deadline, left = time.monotonic() + REQUEST_TIMEOUT, length
        try:
            while left > 0 and time.monotonic() < deadline:
                chunk = self.rfile.read1(min(65536, left))
                if not chunk:
                    return
                left -= len(chunk)
        except OSError:
            return

    def _logged(self, outcome: Outcome) -> Outcome:
        # One line per request, never its body: what was taken, or why not.
        log.log(
            logging.INFO if outcome.status < 300 else logging.WARNING,
            "%s %s from %s: %d %s",
            self.command,
            self.path[:100],
            self.address_string(),
            outcome.status,
            outcome.message,
        )
        return outcome

    def _answer(self, outcome: Outcome) -> None:
        body = json.dumps({"ok": outcome.status < 300, "message": outcome.message}).encode() + b"\n"
        self.close_connection = True  # one request per connection: nothing idles on a thread
        try:
            self.send_response(outcome.status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.send_header("Connection", "close")
            self.end_headers()
            self.wfile.write(body)
        except OSError:
            pass  # the sender went away; what it asked for stands (or was refused) all the same
