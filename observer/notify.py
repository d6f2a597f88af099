"""`volt notify` by way of the observer's receiver: the lean path a git hook runs.

With a receiver configured (`--url`, env VOLT_NOTIFY_URL) the command posts
repo, branch and commit to the observer's `POST /notify` and is done. It
imports neither pika nor GitPython nor the settings module: a hook's every
millisecond is the developer's, and a Python start alone costs 20-40 ms. The
observer then looks at that branch at once, through its cursor, as a poll
would. Without a receiver, observer/cli.py publishes to RabbitMQ itself.

What the receiver and this client share (the path, the token header) is
spelled here, so the receiver's module imports it from the lean side.
"""

from __future__ import annotations

import json
import os
import socket
import sys
import time

from common import exits

# Not typing's TYPE_CHECKING: importing typing costs a hook 5 ms for nothing.
TYPE_CHECKING = False
if TYPE_CHECKING:
    import argparse

NOTIFY_PATH = "/notify"
TOKEN_HEADER = "X-Volt-Token"
URL_VARIABLE = "VOLT_NOTIFY_URL"
SECRET_VARIABLE = "VOLT_WEBHOOK_SECRET_FILE"
TIMEOUT_VARIABLE = "VOLT_NOTIFY_TIMEOUT"
DEFAULT_TIMEOUT = 3.0
# The receiver's answers are a line of JSON; anything longer is not one of them.
MAX_REPLY = 64 * 1024
# The flags every `volt` command takes; the lean path accepts them and has no use for them.
COMMON_FLAGS = ("--amqp-url", "--namespace", "--log-level", "--log-format")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """notify's own flags: for the full `volt` parser and the lean one alike."""
    parser.add_argument("--repo", required=True, help="the repository: a local path or a URL (required)")
    parser.add_argument("--branch", required=True, help="the branch the commit is on (required)")
    parser.add_argument("--commit", metavar="SHA", help="commit id (default: the branch's head in --repo)")
    parser.add_argument(
        "--label",
        action="append",
        default=[],
        help="a runner label the job needs (repeatable; default none, and those in .volt.toml when --repo is local; "
        "not with --url: the observer reads .volt.toml itself)",
    )
    parser.add_argument(
        "--url",
        help="the observer's receiver (its --listen), e.g. http://127.0.0.1:8089: tell it instead of publishing "
        f"to RabbitMQ (env {URL_VARIABLE}; default none: publish to RabbitMQ)",
    )
    parser.add_argument(
        "--webhook-secret-file",
        metavar="FILE",
        help=f"the observer's webhook secret, sent to --url as the {TOKEN_HEADER} header "
        f"(env {SECRET_VARIABLE}; default none)",
    )
    parser.add_argument(
        "--timeout",
        metavar="S",
        help="seconds to wait for the receiver or RabbitMQ before giving up; the observer's next poll still "
        f"finds the commit (env {TIMEOUT_VARIABLE}; default {DEFAULT_TIMEOUT:g})",
    )


class Notice:
    """What `volt notify` is asked to tell the receiver, from either parser."""

    def __init__(
        self,
        repo: str,
        branch: str,
        commit: str | None = None,
        label: list[str] | None = None,
        url: str | None = None,
        webhook_secret_file: str | None = None,
        timeout: str | None = None,
    ) -> None:
        self.repo, self.branch, self.commit, self.label = repo, branch, commit, label or []
        self.url, self.webhook_secret_file, self.timeout = url, webhook_secret_file, timeout

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> Notice:
        return cls(args.repo, args.branch, args.commit, args.label, args.url, args.webhook_secret_file, args.timeout)


# The flags the lean path reads, each with one value; the common flags are
# taken and not used (they are for RabbitMQ).
LEAN_FLAGS = frozenset({"--repo", "--branch", "--commit", "--url", "--webhook-secret-file", "--timeout", *COMMON_FLAGS})


def fast_main(argv: list[str]) -> int | None:
    """`volt notify ARGV` on the lean path, or None when it is not for it (no
    receiver configured, or anything but `--flag value` / `--flag=value` of
    the flags above): then the full command, argparse and all, reads the
    arguments and answers as it always does, help and mistakes included."""
    given: dict[str, str] = {}
    at = 0
    while at < len(argv):
        flag, eq, value = argv[at].partition("=")
        if flag not in LEAN_FLAGS:
            return None
        if not eq:
            at += 1
            if at == len(argv) or argv[at].startswith("-"):
                return None  # argparse would refuse it, and says so better
            value = argv[at]
        given[flag] = value  # the last one wins, as with argparse
        at += 1
    if "--repo" not in given or "--branch" not in given:
        return None
    notice = Notice(
        given["--repo"],
        given["--branch"],
        given.get("--commit"),
        url=given.get("--url"),
        webhook_secret_file=given.get("--webhook-secret-file"),
        timeout=given.get("--timeout"),
    )
    if not receiver_url(notice):
        return None
    return tell_receiver(notice)


def receiver_url(args: Notice | argparse.Namespace) -> str:
    """The receiver to tell: --url, else VOLT_NOTIFY_URL, else "" (publish to RabbitMQ)."""
    return (args.url or os.environ.get(URL_VARIABLE, "")).strip()


def timeout_of(args: Notice | argparse.Namespace) -> float:
    """--timeout, else VOLT_NOTIFY_TIMEOUT, else the default; ValueError says what is wrong."""
    raw, source = args.timeout, "--timeout"
    if raw is None:
        raw, source = os.environ.get(TIMEOUT_VARIABLE, "").strip() or None, TIMEOUT_VARIABLE
    if raw is None:
        return DEFAULT_TIMEOUT
    try:
        value = float(raw)
    except ValueError:
        value = 0.0
    if not 0 < value < 3600:
        raise ValueError(f"{source}: must be a positive number of seconds, got {raw!r:.80}")
    return value


def read_secret(path: str, source: str) -> bytes:
    """The webhook secret in a file (surrounding blanks dropped); ValueError in one line."""
    try:
        with open(os.path.expanduser(path), "rb") as f:
            secret = f.read(4097).strip()
    except OSError as exc:
        raise ValueError(f"{source} {path}: cannot read it: {exc.strerror or exc}") from None
    if not secret or len(secret) > 4096 or b"\n" in secret:
        raise ValueError(f"{source} {path}: must hold the secret on one line (1 to 4096 bytes)")
    return secret


def tell_receiver(args: Notice) -> int:
    """Post repo, branch and commit to the observer's receiver; one line says how it went."""
    url = receiver_url(args)
    shown = _without_credentials(url)
    try:
        if args.label:
            raise ValueError("--label does not go with --url: the observer reads the labels from .volt.toml")
        timeout = timeout_of(args)
        secret_file = args.webhook_secret_file or os.environ.get(SECRET_VARIABLE, "").strip()
        flag = "--webhook-secret-file" if args.webhook_secret_file else SECRET_VARIABLE
        headers = {TOKEN_HEADER: read_secret(secret_file, flag).decode("latin-1")} if secret_file else {}
        body = json.dumps({"repo": _repo(args.repo), "branch": args.branch, "commit": args.commit or ""}).encode()
    except ValueError as exc:
        print(f"volt notify: {exc}", file=sys.stderr)
        return exits.USAGE
    try:
        status, reply = post(url, body, headers, timeout)
    except ValueError as exc:
        print(f"volt notify: --url {shown}: {exc}", file=sys.stderr)
        return exits.USAGE
    except OSError as exc:
        reason = (
            "no answer in time" if isinstance(exc, TimeoutError) else (exc.strerror or str(exc) or type(exc).__name__)
        )
        print(
            f"volt notify: cannot reach the observer at {shown} ({reason}); its next poll finds the commit",
            file=sys.stderr,
        )
        return exits.BROKER_UNAVAILABLE
    message = _message(reply)
    if 200 <= status < 300:
        print(f"told the observer at {shown}: {message}")
        return exits.OK
    print(f"volt notify: the observer at {shown} refused ({status}): {message}", file=sys.stderr)
    return exits.USAGE if status in (400, 404) else exits.UNHEALTHY


def post(url: str, body: bytes, headers: dict[str, str], timeout: float) -> tuple[int, str]:
    """POST `body` as JSON to the receiver's /notify; (status, reply body).

    Plain http is written on a socket, its URL read here: http.client and
    urllib.parse would cost a good part of a hook's budget in imports (an
    e-mail header parser, IP address classes) for one request of ours to a
    server of ours. https goes through http.client and ssl. OSError when the
    receiver cannot be reached in `timeout`; ValueError for a URL that is not
    http(s) or an answer that is not HTTP.
    """
    scheme, host, port, path = _split_url(url)
    if not path.split("?", 1)[0].rstrip("/").endswith(NOTIFY_PATH):
        where, mark, query = path.partition("?")
        path = where.rstrip("/") + NOTIFY_PATH + mark + query
    netloc = f"[{host}]" if ":" in host else host
    fields = {"Host": f"{netloc}:{port}", "Content-Type": "application/json", "Content-Length": str(len(body))}
    fields.update(headers)
    if scheme == "https":
        import http.client  # only here: the cost the plain path avoids

        conn = http.client.HTTPSConnection(host, port, timeout=timeout)
        try:
            conn.request("POST", path, body=body, headers=fields)
            reply = conn.getresponse()
            return reply.status, reply.read(MAX_REPLY).decode("utf-8", "replace")
        finally:
            conn.close()
    deadline = time.monotonic() + timeout
    head = f"POST {path} HTTP/1.1\r\n" + "".join(f"{k}: {v}\r\n" for k, v in fields.items())
    request = (head + "Connection: close\r\n\r\n").encode("latin-1") + body
    chunks: list[bytes] = []
    # An ASCII host as bytes: a str would make the resolver load the IDNA codec.
    address = host.encode("ascii") if host.isascii() else host
    with socket.create_connection((address, port), timeout=timeout) as sock:  # type: ignore[arg-type]
        sock.sendall(request)
        size = 0
        while size < MAX_REPLY:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError("no answer in time")
            sock.settimeout(left)
            chunk = sock.recv(MAX_REPLY)
            if not chunk:
                break
            chunks.append(chunk)
            size += len(chunk)
    raw = b"".join(chunks)
    status_line = raw.split(b"\r\n", 1)[0].split(None, 2)
    if len(status_line) < 2 or not status_line[0].startswith(b"HTTP/") or not status_line[1].isdigit():
        raise ValueError("the answer is not HTTP (is that the observer's --listen address?)")
    return int(status_line[1]), raw.partition(b"\r\n\r\n")[2].decode("utf-8", "replace")


def _split_url(url: str) -> tuple[str, str, int, str]:
    """An http(s) URL as (scheme, host, port, path and query); ValueError otherwise."""
    scheme, sep, rest = url.partition("://")
    scheme = scheme.lower()
    if not sep or scheme not in ("http", "https"):
        raise ValueError("must be an http:// or https:// URL, such as http://127.0.0.1:8089")
    cut = min((i for i in (rest.find("/"), rest.find("?"), rest.find("#")) if i >= 0), default=len(rest))
    netloc, path = rest[:cut], rest[cut:].partition("#")[0]
    hostport = netloc.rpartition("@")[2]
    if hostport.startswith("["):  # an IPv6 address
        host, _, after = hostport[1:].partition("]")
        port = after.removeprefix(":")
    else:
        host, _, port = hostport.partition(":")
    if not host or not (port == "" or (port.isdigit() and int(port) <= 65535)):
        raise ValueError("must be an http:// or https:// URL, such as http://127.0.0.1:8089")
    if not path.startswith("/"):
        path = "/" + path
    return scheme, host, int(port) if port else (443 if scheme == "https" else 80), path


def _repo(raw: str) -> str:
    """The repository as the observer will know it: a local path made absolute
    here (the observer's working folder is not the hook's), a URL without its
    user and password (the observer matches it without them)."""
    if "://" not in raw:
        if os.path.exists(raw) or raw.startswith(("/", ".", "~")):
            return os.path.realpath(os.path.expanduser(raw))
        return raw  # git's scp-like user@host:path
    return _without_credentials(raw)


def _without_credentials(url: str) -> str:
    scheme, sep, rest = url.partition("://")
    if not sep:
        return url
    cut = min((i for i in (rest.find("/"), rest.find("?"), rest.find("#")) if i >= 0), default=len(rest))
    if "@" not in rest[:cut]:
        return url
    return f"{scheme}://{rest[:cut].rpartition('@')[2]}{rest[cut:]}"


def _message(reply: str) -> str:
    try:
        message = json.loads(reply)["message"]
    except (ValueError, KeyError, TypeError):
        message = reply
    return " ".join(str(message).split())[:300] or "no reason given"
