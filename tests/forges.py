"""Push webhooks as GitHub, GitLab and Gitea/Forgejo send them: the shapes of
their documented payloads and headers, signed as each signs them, for the
receiver's tests. No forge runs here; these are what one would post.

The forges do not agree on much: GitHub lists a push's commits oldest first
(up to 2048), GitLab and Gitea newest first, GitLab at most 20 of them (with
`total_commits_count`); Gitea and Forgejo send GitHub's headers too, and
Forgejo Gitea's.
"""

from __future__ import annotations

import hashlib
import hmac
import http.client
import json
import urllib.parse
import uuid
from collections.abc import Callable
from typing import Any

ZERO = "0" * 40
# The header each forge names its event with.
EVENTS = {
    "github": "X-GitHub-Event",
    "gitlab": "X-Gitlab-Event",
    "gitea": "X-Gitea-Event",
    "forgejo": "X-Forgejo-Event",
}


def sign(secret: bytes, body: bytes) -> str:
    return hmac.new(secret, body, hashlib.sha256).hexdigest()


def _names(clone_url: str) -> dict[str, str]:
    """The ways a forge names one repository, from its clone URL."""
    parts = urllib.parse.urlsplit(clone_url)
    path = parts.path.strip("/")
    page = clone_url.removesuffix(".git")
    return {
        "clone": clone_url,
        "page": page,
        "ssh": f"git@{parts.hostname}:{path}",
        "full_name": path.removesuffix(".git"),
        "name": path.rsplit("/", 1)[-1].removesuffix(".git"),
        "api": f"{parts.scheme}://{parts.netloc}/api/v1/repos/{path.removesuffix('.git')}",
    }


def _commit(sha: str, page: str, i: int, style: str) -> dict[str, Any]:
    person = {"name": "Ada Dev", "email": "ada@example.com"}
    entry: dict[str, Any] = {
        "id": sha,
        "message": f"change {i}\n",
        "timestamp": f"2024-05-0{1 + i % 9}T10:0{i % 10}:00+02:00",
        "url": f"{page}/commit/{sha}",
        "author": dict(person, username="ada") if style != "gitlab" else person,
        "added": [],
        "removed": [],
        "modified": ["README.md"],
    }
    if style == "github":
        entry.update(tree_id="4b825dc642cb6eb9a060e54bf8d69288fbee4904", distinct=True, committer=entry["author"])
    elif style == "gitlab":
        entry["title"] = f"change {i}"
    else:
        entry.update(committer=entry["author"], verification=None)
    return entry


def github(
    clone_url: str, branch: str, before: str, after: str, commits: list[str], secret: bytes, delivery: str = ""
) -> tuple[dict[str, str], bytes]:
    """A GitHub `push` event (application/json), as a repository webhook sends it."""
    n = _names(clone_url)
    listed = [_commit(sha, n["page"], i, "github") for i, sha in enumerate(commits)]  # oldest first
    payload = {
        "ref": f"refs/heads/{branch}",
        "before": before,
        "after": after,
        "repository": {
            "id": 186853002,
            "node_id": "MDEwOlJlcG9zaXRvcnkxODY4NTMwMDI=",
            "name": n["name"],
            "full_name": n["full_name"],
            "private": False,
            "owner": {"name": "acme", "email": None, "login": "acme", "id": 21031067},
            "html_url": n["page"],
            "url": n["page"],
            "git_url": "git://" + n["page"].split("://", 1)[1] + ".git",
            "ssh_url": n["ssh"],
            "clone_url": n["clone"],
            "svn_url": n["page"],
            "default_branch": "main",
            "master_branch": "main",
            "pushed_at": 1714557600,
        },
        "pusher": {"name": "ada", "email": "ada@example.com"},
        "sender": {"login": "ada", "id": 583231, "type": "User"},
        "created": before == ZERO,
        "deleted": after == ZERO,
        "forced": False,
        "base_ref": None,
        "compare": f"{n['page']}/compare/{before[:12]}...{after[:12]}",
        "commits": listed,
        "head_commit": listed[-1] if listed else None,
    }
    body = json.dumps(payload).encode()
    delivery = delivery or str(uuid.uuid4())
    headers = {
        "Content-Type": "application/json",
        "User-Agent": "GitHub-Hookshot/7a5cbbd",
        "X-GitHub-Event": "push",
        "X-GitHub-Delivery": delivery,
        "X-GitHub-Hook-ID": "479611034",
        "X-GitHub-Hook-Installation-Target-Type": "repository",
        "X-GitHub-Hook-Installation-Target-ID": "186853002",
        "X-Hub-Signature": "sha1=" + hmac.new(secret, body, hashlib.sha1).hexdigest(),
        "X-Hub-Signature-256": "sha256=" + sign(secret, body),
    }
    return headers, body


def gitlab(
    clone_url: str, branch: str, before: str, after: str, commits: list[str], secret: bytes, delivery: str = ""
) -> tuple[dict[str, str], bytes]:
    """A GitLab `Push Hook`: at most 20 commits listed, newest first; the token in a header."""
    n = _names(clone_url)
    listed = [_commit(sha, n["page"], i, "gitlab") for i, sha in enumerate(commits)][::-1][:20]
    payload = {
        "object_kind": "push",
        "event_name": "push",
        "before": before,
        "after": after,
        "ref": f"refs/heads/{branch}",
        "ref_protected": True,
        "checkout_sha": after if after != ZERO else None,
        "message": None,
        "user_id": 4,
        "user_name": "Ada Dev",
        "user_username": "ada",
        "user_email": "",
        "user_avatar": "https://s.gravatar.com/avatar/d4c74594d841139328695756648b6bd6?s=80",
        "project_id": 15,
        "project": {
            "id": 15,
            "name": n["name"],
            "description": "",
            "web_url": n["page"],
            "avatar_url": None,
            "git_ssh_url": n["ssh"],
            "git_http_url": n["clone"],
            "namespace": "acme",
            "visibility_level": 0,
            "path_with_namespace": n["full_name"],
            "default_branch": "main",
            "ci_config_path": None,
            "homepage": n["page"],
            "url": n["ssh"],
            "ssh_url": n["ssh"],
            "http_url": n["clone"],
        },
        "commits": listed,
        "total_commits_count": len(commits),
        "push_options": {},
        "repository": {
            "name": n["name"],
            "url": n["ssh"],
            "description": "",
            "homepage": n["page"],
            "git_http_url": n["clone"],
            "git_ssh_url": n["ssh"],
            "visibility_level": 0,
        },
    }
    body = json.dumps(payload).encode()
    headers = {
        "Content-Type": "application/json",
        "User-Agent": "GitLab/16.11.0",
        "X-Gitlab-Event": "Push Hook",
        "X-Gitlab-Token": secret.decode(),
        "X-Gitlab-Instance": "https://gitlab.example.com",
        "X-Gitlab-Webhook-UUID": "13792a34-cac6-4fda-95a8-c58e00a3954e",
        "X-Gitlab-Event-UUID": delivery or str(uuid.uuid4()),
    }
    return headers, body


def gitea(
    clone_url: str,
    branch: str,
    before: str,
    after: str,
    commits: list[str],
    secret: bytes,
    delivery: str = "",
    forgejo: bool = False,
) -> tuple[dict[str, str], bytes]:
    """A Gitea (or Forgejo) `push` event: commits newest first, with GitHub's and Gogs' headers too."""
    n = _names(clone_url)
    listed = [_commit(sha, n["page"], i, "gitea") for i, sha in enumerate(commits)][::-1]
    owner = {"id": 1, "login": "acme", "full_name": "", "email": "acme@noreply.example.com", "username": "acme"}
    payload = {
        "ref": f"refs/heads/{branch}",
        "before": before,
        "after": after,
        "compare_url": f"{n['page']}/compare/{before}...{after}",
        "commits": listed,
        "total_commits": len(commits),
        "head_commit": listed[0] if listed else None,
        "repository": {
            "id": 140,
            "owner": owner,
            "name": n["name"],
            "full_name": n["full_name"],
            "description": "",
            "empty": False,
            "private": False,
            "fork": False,
            "mirror": False,
            "html_url": n["page"],
            "url": n["api"],
            "ssh_url": n["ssh"],
            "clone_url": n["clone"],
            "default_branch": "main",
            "archived": False,
            "created_at": "2024-04-30T09:12:00+02:00",
            "updated_at": "2024-05-01T10:00:00+02:00",
        },
        "pusher": owner,
        "sender": owner,
    }
    body = json.dumps(payload).encode()
    delivery = delivery or str(uuid.uuid4())
    signature = sign(secret, body)
    headers = {
        "Content-Type": "application/json",
        "User-Agent": "Go-http-client/1.1",
        "X-GitHub-Event": "push",
        "X-GitHub-Delivery": delivery,
        "X-Gogs-Event": "push",
        "X-Gogs-Delivery": delivery,
        "X-Gogs-Signature": signature,
        "X-Gitea-Event": "push",
        "X-Gitea-Event-Type": "push",
        "X-Gitea-Delivery": delivery,
        "X-Gitea-Signature": signature,
        "X-Hub-Signature-256": "sha256=" + signature,
    }
    if forgejo:
        headers.update(
            {
                "X-Forgejo-Event": "push",
                "X-Forgejo-Event-Type": "push",
                "X-Forgejo-Delivery": delivery,
                "X-Forgejo-Signature": signature,
            }
        )
    return headers, body


def forgejo(
    clone_url: str, branch: str, before: str, after: str, commits: list[str], secret: bytes, delivery: str = ""
) -> tuple[dict[str, str], bytes]:
    return gitea(clone_url, branch, before, after, commits, secret, delivery, forgejo=True)


Builder = Callable[..., tuple[dict[str, str], bytes]]
FORGES: dict[str, Builder] = {"github": github, "gitlab": gitlab, "gitea": gitea, "forgejo": forgejo}


def post(base: str, path: str, headers: dict[str, str], body: bytes, timeout: float = 30) -> tuple[int, str]:
    """POST as a forge does (one request, Content-Length); the status and the answer's message."""
    parts = urllib.parse.urlsplit(base)
    conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=timeout)
    try:
        conn.request("POST", path, body=body, headers=headers)
        reply = conn.getresponse()
        text = reply.read().decode("utf-8", "replace")
    finally:
        conn.close()
    try:
        return reply.status, json.loads(text)["message"]
    except (ValueError, KeyError, TypeError):
        return reply.status, text
