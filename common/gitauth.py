"""Credentials for git, kept out of repository configs, command lines and logs.

A repository URL may carry a user and password (`https://ci:TOKEN@host/app.git`).
Volt CI stores, logs and publishes only the URL without them, and gives them to
one git process at a time through its environment:

    identity, credentials = split_url(url_as_given)
    subprocess.run(["git", "fetch", identity], env=git_env(credentials), ...)

The environment names a credential helper (through GIT_CONFIG_COUNT, so no
config file is written) that answers git with the user and password from that
same environment, and only for the host and protocol of the URL they came with.
Every git process also gets GIT_TERMINAL_PROMPT=0, so a wrong password fails at
once instead of waiting for someone to type one.
"""

from __future__ import annotations

import os
import urllib.parse
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from common.naming import normalize_repo, split_netloc

# Read by the helper below; set only in the environment of the git process.
_ENV_USER = "VOLT_GIT_AUTH_USERNAME"
_ENV_PASSWORD = "VOLT_GIT_AUTH_PASSWORD"
_ENV_HOST = "VOLT_GIT_AUTH_HOST"
_ENV_PROTOCOL = "VOLT_GIT_AUTH_PROTOCOL"

# git runs a helper that starts with "!" through the shell, with "get", "store"
# or "erase" after it and the request on its stdin. It answers "get" only, and
# only for the host and protocol the credentials belong to, so a redirect to
# another server learns nothing. It never echoes the values into its command.
_HELPER = (
    '!f() { test "$1" = get || return 0; p=; h=; '
    'while IFS= read -r l && test -n "$l"; do case $l in '
    "protocol=*) p=${l#protocol=};; host=*) h=${l#host=};; esac; done; "
    f'test "$p" = "${_ENV_PROTOCOL}" && test "$h" = "${_ENV_HOST}" || return 0; '
    f"printf 'username=%s\\n' \"${_ENV_USER}\"; "
    f'test -z "${_ENV_PASSWORD}" || printf \'password=%s\\n\' "${_ENV_PASSWORD}"; }}; f'
)

# git over HTTP asks credential helpers; over ssh it uses keys and never asks
# them, so an ssh URL's password has nowhere to go and is dropped.
_HTTP = ("http", "https")


@dataclass(frozen=True)
class Credentials:
    """A user and password for one host; repr() never shows the password."""

    username: str
    password: str = field(repr=False)
    protocol: str
    host: str  # host[:port], as git names it to a credential helper

    def __post_init__(self) -> None:
        for value in (self.username, self.password):
            if any(c in value for c in "\n\r\0"):
                raise ValueError("credentials in a repository URL must not hold line breaks or NUL")


def split_url(url: str) -> tuple[str, Credentials | None]:
    """(identity, credentials): the repository's identity (`naming.normalize_repo`,
    never with credentials) and the user and password the URL carried over
    http(s), or None. ValueError for a URL git could not use."""
    identity = normalize_repo(url)
    parsed = urllib.parse.urlsplit(url)
    scheme = parsed.scheme.lower()
    if scheme not in _HTTP or "@" not in parsed.netloc:
        return identity, None
    user, password, _ = split_netloc(parsed.netloc)
    if not user and not password:
        return identity, None
    host = urllib.parse.urlsplit(identity).netloc
    return identity, Credentials(
        username=urllib.parse.unquote(user),
        password=urllib.parse.unquote(password or ""),
        protocol=scheme,
        host=host,
    )


def git_env(credentials: Credentials | None, base: Mapping[str, str] | None = None) -> dict[str, str]:
    """The whole environment for one git process: `base` (default: this process's
    environment) with prompts off and, when given, the credentials on offer to git.

    Pass it to that one process only (subprocess's `env=`): the password is in
    it, so never to a long-lived process or one that runs repository code.
    """
    env = dict(os.environ if base is None else base)
    env["GIT_TERMINAL_PROMPT"] = "0"
    env["GCM_INTERACTIVE"] = "never"  # Git Credential Manager, where it is installed
    if credentials is None:
        return env
    entries: list[tuple[str, str]] = []
    if credentials.password:
        # An empty value clears the helpers configured so far, so none of the
        # user's (say, `store`) is asked to keep this password once it worked.
        entries.append(("credential.helper", ""))
    entries.append(("credential.helper", _HELPER))
    try:
        count = int(env.get("GIT_CONFIG_COUNT", "0"))
    except ValueError:
        count = 0
    for i, (key, value) in enumerate(entries, start=count):
        env[f"GIT_CONFIG_KEY_{i}"] = key
        env[f"GIT_CONFIG_VALUE_{i}"] = value
    env["GIT_CONFIG_COUNT"] = str(count + len(entries))
    env[_ENV_USER] = credentials.username
    env[_ENV_PASSWORD] = credentials.password
    env[_ENV_HOST] = credentials.host
    env[_ENV_PROTOCOL] = credentials.protocol
    return env


def scrub(text: str, credentials: Credentials | None) -> str:
    """`text` (say, git's stderr) with the password, and its URL-encoded form, masked."""
    if credentials is None or not credentials.password:
        return text
    for secret in {credentials.password, urllib.parse.quote(credentials.password, safe="")}:
        text = text.replace(secret, "***")
    return text


def read_credentials(path: Path) -> list[tuple[str, Credentials]]:
    """The credentials in a git-credential-store style file (`--git-credentials`):
    one `https://user:token@host[/path]` per line; blank lines and `#` comments
    skipped. ValueError names a bad line by its number, never by its text."""
    known: list[tuple[str, Credentials]] = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        try:
            identity, credentials = split_url(line)
        except ValueError:
            credentials = None
        if credentials is None:
            raise ValueError(f"{path} line {number}: not an http(s) URL with a user and password")
        known.append((identity.rstrip("/"), credentials))
    return known


def credentials_for(repo: str, known: list[tuple[str, Credentials]]) -> Credentials | None:
    """The credentials whose URL is the longest prefix of the repository identity
    `repo` (a host, or a path on it), or None."""
    best: tuple[int, Credentials] | None = None
    for prefix, credentials in known:
        if repo == prefix or repo.startswith(prefix + "/"):
            if best is None or len(prefix) > best[0]:
                best = (len(prefix), credentials)
    return best[1] if best else None
