"""The push path with real processes: forge webhooks and hooks over real HTTP
to a real observer, real git (a repository served over smart HTTP, as a forge
serves it) and a real RabbitMQ.

The observers here poll once an hour unless a test says otherwise, so what
is published after their start was published because of a request.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from forges import FORGES, github, gitlab, post, sign
from support import CommitTap, GitHttpServer, GitRepo, Volt, free_port

SECRET = b"s3cret-shared-with-the-forge"
PASS = "def test_one():\n    assert True\n"


class Commits(CommitTap):
    def wait_for(self, commit: str, timeout: float = 60) -> list[str]:
        self.volt.wait_for(f"commit {commit[:12]} published", lambda: commit in self.take(), timeout=timeout)
        return self.take()


class Forge:
    """A bare repository served over smart HTTP (what the observer fetches, as
    from a forge), and a clone that pushes to it."""

    def __init__(self, tmp_path: Path, name: str = "acme/app.git") -> None:
        self.root = tmp_path / "srv"
        bare = self.root / name
        bare.parent.mkdir(parents=True, exist_ok=True)
        subprocess.run(["git", "init", "-q", "--bare", "-b", "main", str(bare)], check=True)
        self.work = GitRepo(tmp_path / "work")
        self.work.git("remote", "add", "origin", str(bare))
        self.server = GitHttpServer(self.root)
        self.url = self.server.url(name)

    def commits(self, count: int, branch: str = "main") -> list[str]:
        """`count` new commits on `branch` (made from the current one if new), pushed; oldest first."""
        if self.work.git("branch", "--show-current") != branch:
            exists = self.work.git("branch", "--list", branch)
            self.work.git("checkout", "-q", *([] if exists else ["-b"]), branch)
        made = [self.work.commit({"f.txt": f"{branch} {time.monotonic()} {i}"}, f"change {i}") for i in range(count)]
        self.work.git("push", "-q", "--force", "origin", f"HEAD:refs/heads/{branch}")
        return made

    def close(self) -> None:
        self.server.close()


@pytest.fixture
def forge(tmp_path: Path) -> Iterator[Forge]:
    f = Forge(tmp_path)
    yield f
    f.close()


def listen(volt: Volt, repo: str, *extra: str, poll: float = 3600, secret: bytes | None = SECRET) -> str:
    """Start `volt observer --listen` on a free port of 127.0.0.1; the receiver's base URL."""
    port = free_port()
    flags = ["--listen", f"127.0.0.1:{port}"]
    if secret is not None:
        (volt.tmp / "webhook-secret").write_bytes(secret + b"\n")
        flags += ["--webhook-secret-file", str(volt.tmp / "webhook-secret")]
    state = str(volt.tmp / "observer")
    volt.start("observer", "observer", "--repo", repo, "--poll", str(poll), "--state-dir", state, *flags, *extra)
    volt.wait_for("the receiver", lambda: _answers(port))
    return f"http://127.0.0.1:{port}"


def _answers(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
        return True
    except OSError:
        return False


def refused_lines(volt: Volt, status: int) -> list[str]:
    return [line for line in volt.log_of("observer").splitlines() if f": {status} " in line and "WARNING" in line]


@pytest.mark.parametrize("name", sorted(FORGES))
def test_a_signed_push_of_three_commits_publishes_the_three_oldest_first(volt, forge, name):
    (first,) = forge.commits(1)
    commits = Commits(volt)
    base = listen(volt, forge.url)
    assert commits.wait_for(first) == [first]
    new = forge.commits(3)
    headers, body = FORGES[name](forge.url, "main", first, new[-1], new, SECRET)
    status, message = post(base, "/webhook", headers, body)
    assert status == 202, message
    assert message.startswith(f"queued: {name} push to branch main of {forge.url} (after {new[-1][:12]}")
    assert commits.wait_for(new[-1]) == [first, *new]
    assert [m.source for m in commits.seen] == ["poll", name, name, name]
    assert "Traceback" not in volt.log_of("observer")


def test_a_push_of_more_commits_than_the_payload_lists_and_a_force_push_publish_them_all(volt, forge):
    (first,) = forge.commits(1)
    commits = Commits(volt)
    base = listen(volt, forge.url)
    commits.wait_for(first)
    many = forge.commits(25)
    headers, body = gitlab(forge.url, "main", first, many[-1], many, SECRET)
    assert len(json.loads(body)["commits"]) == 20  # as GitLab sends it
    assert post(base, "/webhook", headers, body)[0] == 202
    assert commits.wait_for(many[-1]) == [first, *many]
    forge.work.git("reset", "-q", "--hard", many[19])
    rewritten = forge.commits(2)
    headers, body = github(forge.url, "main", many[-1], rewritten[-1], rewritten, SECRET)
    assert post(base, "/webhook", headers, body)[0] == 202
    assert commits.wait_for(rewritten[-1]) == [first, *many, *rewritten]


def test_bad_requests_publish_nothing_and_say_why_in_one_line_each(volt, forge, tmp_path):
    (first,) = forge.commits(1)
    (barrier_head,) = forge.commits(1, branch="barrier")
    commits = Commits(volt)
    base = listen(volt, forge.url, "--branch", "main", "--branch", "barrier")
    volt.wait_for("both heads", lambda: {first, barrier_head} <= set(commits.take()))
    (taken,) = forge.commits(1)
    good = github(forge.url, "main", first, taken, [taken], SECRET, delivery="72d3162e-cc78-11e3-81ab-4c9367dc0958")
    assert post(base, "/webhook", *good)[0] == 202
    commits.wait_for(taken)

    # A commit no request below may publish: had one been taken, it would be.
    (pending,) = forge.commits(1)
    forged = github(forge.url, "main", taken, pending, [pending], b"not the secret")
    assert post(base, "/webhook", *forged) == (401, "bad X-Hub-Signature-256 signature")
    token = gitlab(forge.url, "main", taken, pending, [pending], b"a guess")
    assert post(base, "/webhook", *token) == (401, "wrong X-Gitlab-Token")
    assert post(base, "/webhook", *good) == (
        409,
        "a replay of delivery 72d3162e-cc78-11e3-81ab-4c9367dc0958: already taken",
    )
    renamed = dict(good[0], **{"X-GitHub-Delivery": "a-fresh-id"})
    assert post(base, "/webhook", renamed, good[1])[0] == 409
    elsewhere = forge.url.replace("127.0.0.1", "git.example.com")  # the same name on another host
    status, message = post(base, "/webhook", *github(elsewhere, "main", taken, pending, [pending], SECRET))
    assert (status, message) == (404, f"github: {elsewhere} is not a watched repository; nothing published")
    headers, body = github(forge.url, "main", taken, pending, [pending], SECRET)
    payload = json.loads(body)
    payload["padding"] = "BODY-MARKER " * (6 * 1024 * 1024 // 12)
    big = json.dumps(payload).encode()
    assert len(big) > 6 * 1024 * 1024
    status, message = post(base, "/webhook", dict(headers, **{"X-Hub-Signature-256": "sha256=" + _sign(big)}), big)
    assert status == 413 and "over 5 MB" in message
    broken = b'{"ref": "refs/heads/main", "after": "' + pending.encode() + b'", BODY-MARKER'
    status, message = post(
        base, "/webhook", dict(headers, **{"X-Hub-Signature-256": "sha256=" + _sign(broken)}), broken
    )
    assert (status, message) == (400, "the body is not JSON (nor a form with payload=JSON)")

    # The barrier: a good push on the other branch, taken after all of the above.
    (barrier,) = forge.commits(1, branch="barrier")
    assert (
        post(base, "/webhook", *FORGES["gitea"](forge.url, "barrier", barrier_head, barrier, [barrier], SECRET))[0]
        == 202
    )
    published = commits.wait_for(barrier)
    assert pending not in published
    assert sorted(published) == sorted([first, barrier_head, taken, barrier])
    assert len(refused_lines(volt, 401)) == 2
    assert len(refused_lines(volt, 409)) == 2
    assert len(refused_lines(volt, 404)) == 1
    assert len(refused_lines(volt, 413)) == 1
    assert len(refused_lines(volt, 400)) == 1
    log = volt.log_of("observer")
    assert "BODY-MARKER" not in log and SECRET.decode() not in log and "Traceback" not in log
    assert volt.procs["observer"].poll() is None


def _sign(body: bytes) -> str:
    return sign(SECRET, body)


def test_webhooks_hooks_and_polls_racing_publish_each_commit_once(volt, forge):
    (first,) = forge.commits(1)
    commits = Commits(volt)
    base = listen(volt, forge.url, poll=0.2)  # about as often as the requests come: either may be first
    commits.wait_for(first)
    made = [first]
    token = {"X-Volt-Token": SECRET.decode(), "Content-Type": "application/x-www-form-urlencoded"}
    for round_ in range(6):
        new = forge.commits(3)
        # As if each commit had been pushed on its own, told by whichever forge.
        requests = [
            FORGES[name](forge.url, "main", made[-1], new[i % 3], new[: i % 3 + 1], SECRET)
            for i, name in enumerate(sorted(FORGES))
        ]
        form = f"repo={forge.url}&branch=main&commit={new[-1]}".encode()
        requests += [(token, form), (token, form)]
        answers: list[int] = []

        def send(headers: dict[str, str], body: bytes, answers: list[int] = answers) -> None:
            answers.append(post(base, "/notify" if "X-Volt-Token" in headers else "/webhook", headers, body)[0])

        threads = [threading.Thread(target=send, args=r) for r in requests]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert answers == [202] * len(requests), (round_, answers)
        made += new
    published = commits.wait_for(made[-1])
    # More requests and polls: nothing is published twice.
    for _ in range(5):
        assert post(base, "/notify", token, f"repo={forge.url}&branch=main".encode())[0] == 202
    since = time.time()
    volt.wait_for("more polls", lambda: _health_at(volt) > since + 0.5)
    assert commits.take() == made
    assert published == made


def _health_at(volt: Volt) -> float:
    try:
        return float(json.loads((volt.tmp / "observer" / "health.json").read_text())["at"])
    except (OSError, ValueError, KeyError):
        return 0.0


def test_volt_notify_tells_the_receiver_and_gives_up_at_once_when_it_is_down(volt, repo, tmp_path):
    head = repo.commit({"f.txt": "0"})
    commits = Commits(volt)
    base = listen(volt, str(repo.path), secret=None)  # on loopback, a hook needs no token
    commits.wait_for(head)
    told = repo.commit({"f.txt": "1"})
    env = {"VOLT_NOTIFY_URL": base}
    done = run_notify(volt, repo, told, env)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == (
        f"told the observer at {base}: queued: a hook on branch main of {repo.path} (commit {told[:12]})"
    )
    assert commits.wait_for(told) == [head, told]
    assert commits.seen[-1].source == "notify"

    volt.kill("observer")
    missed = repo.commit({"f.txt": "2"})
    started = time.monotonic()
    done = run_notify(volt, repo, missed, {**env, "VOLT_NOTIFY_TIMEOUT": "2"})
    assert time.monotonic() - started < 2.0  # refused: at once, not after the timeout
    assert done.returncode == 3
    assert done.stderr.splitlines() == [
        f"volt notify: cannot reach the observer at {base} (Connection refused); its next poll finds the commit"
    ]
    volt.observer(repo.path, poll=0.2)  # back, on the same state folder
    assert commits.wait_for(missed) == [head, told, missed]


def test_volt_notify_straight_to_rabbitmq_gives_up_on_a_broker_down_and_the_poll_finds_the_commit(volt, repo):
    head = repo.commit({"f.txt": "0"})
    commits = Commits(volt)
    volt.observer(repo.path, poll=0.3)
    commits.wait_for(head)
    first, second = repo.commit({"f.txt": "1"}), repo.commit({"f.txt": "2"})
    down = f"amqp://guest:guest@127.0.0.1:{free_port()}/%2F"
    started = time.monotonic()
    done = run_notify(volt, repo, first, {}, amqp_url=down, timeout=5)
    assert time.monotonic() - started < 4.0  # refused: at once
    assert done.returncode == 3 and len(done.stderr.splitlines()) == 1, done.stderr
    assert "cannot reach RabbitMQ at amqp://guest:***@127.0.0.1" in done.stderr and "Traceback" not in done.stderr
    with socket.socket() as silent:  # takes the connection and never answers
        silent.bind(("127.0.0.1", 0))
        silent.listen()
        started = time.monotonic()
        done = run_notify(volt, repo, second, {}, amqp_url=f"amqp://127.0.0.1:{silent.getsockname()[1]}/%2F", timeout=1)
        took = time.monotonic() - started
    assert done.returncode == 3 and len(done.stderr.splitlines()) == 1, done.stderr
    assert 1.0 <= took < 4.0, took
    assert commits.wait_for(second) == [head, first, second]


def run_notify(
    volt: Volt, repo: GitRepo, commit: str, env: dict[str, str], amqp_url: str = "", timeout: float = 0
) -> subprocess.CompletedProcess[str]:
    argv = [sys.executable, "-m", "common.cli", "notify", "--repo", str(repo.path), "--branch", "main"]
    argv += ["--commit", commit, "--amqp-url", amqp_url or volt.amqp_url, "--namespace", volt.ns]
    argv += ["--timeout", str(timeout)] if timeout else []
    return subprocess.run(argv, capture_output=True, text=True, timeout=60, env={**os.environ, **env}, cwd=volt.tmp)


def test_a_bad_receiver_setting_stops_the_observer_at_start_with_one_line(volt, repo, tmp_path):
    repo.commit({"f.txt": "0"})
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        in_use = volt.run("observer", "--repo", str(repo.path), "--listen", f"127.0.0.1:{port}")
    empty = tmp_path / "empty-secret"
    empty.write_text("\n")
    cases = [
        (in_use, f"--listen 127.0.0.1:{port}: Address already in use"),
        (volt.run("observer", "--repo", str(repo.path), "--listen", "0.0.0.0:1"), "give --webhook-secret-file"),
        (volt.run("observer", "--repo", str(repo.path), "--listen", "8089"), "must be HOST:PORT"),
        (
            volt.run(
                "observer", "--repo", str(repo.path), "--listen", "127.0.0.1:0", "--webhook-secret-file", str(empty)
            ),
            "must hold the secret on one line",
        ),
    ]
    for done, why in cases:
        assert done.returncode == 2, done.stderr
        lines = done.stderr.strip().splitlines()
        assert len(lines) == 1 and why in lines[0], done.stderr


def test_a_github_push_of_three_commits_gives_three_jobs_that_pass_oldest_first(volt, forge):
    (first,) = forge.commits(1)
    forge.work.commit({"tests/test_one.py": PASS})
    forge.work.git("push", "-q", "origin", "main")
    volt.dispatcher()
    volt.runner("push-1")
    base = listen(volt, forge.url)
    volt.wait_results(1)
    before = forge.work.git("rev-parse", "HEAD")
    new = forge.commits(3)
    assert post(base, "/webhook", *github(forge.url, "main", before, new[-1], new, SECRET))[0] == 202
    rows = [r for r in volt.wait_results(4) if r["commit"] in new]
    assert sorted(r["commit"] for r in rows) == sorted(new) and all(r["status"] == "passed" for r in rows)
    assert [r["commit"] for r in sorted(rows, key=lambda r: r["seen_at"])] == new
    assert len(volt.results(done_only=False)) == 4
    assert first not in {r["commit"] for r in volt.results()}  # first sight: the head only
