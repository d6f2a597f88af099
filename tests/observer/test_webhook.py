"""The push path's checks and its hand-off to the observer's loop.

The forges' requests are built from their documented shapes (tests/forges.py);
the receiver answers real HTTP on 127.0.0.1 with a recording `submit`, and
the observer's own `submit` and `handle_pushes` run on real git repositories
with a broker that only records. tests/integration/test_webhook.py runs the
same with a real observer process and a real RabbitMQ.
"""

from __future__ import annotations

import email.message
import json
import logging
import socket
import subprocess
import sys
import threading
import urllib.parse
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import forges
import pytest
from support import GitRepo, many_commits

from common.broker import BrokerUnavailable
from common.cli import main as cli_main
from common.messages import CommitSeen
from common.settings import BrokerSettings
from observer import notify
from observer.service import Observer, ObserverSettings
from observer.webhook import (
    MAX_BODY,
    Deliveries,
    Outcome,
    Push,
    Receiver,
    Refused,
    decode,
    forge_of,
    read_notify,
    read_push,
    repo_key,
    verify,
)

SECRET = b"It's a Secret to Everybody"
SHA_A, SHA_B, SHA_C = "a" * 40, "b" * 40, "c" * 40
CLONE = "https://git.example.com/acme/app.git"


def headers_of(fields: dict[str, str]) -> email.message.Message:
    """Headers as http.server hands them over: looked up without regard to case."""
    message = email.message.Message()
    for name, value in fields.items():
        message[name] = value
    return message


def parsed(forge: str, headers: dict[str, str], body: bytes) -> Push | str:
    h = headers_of(headers)
    found = forge_of(h)
    assert found == forge
    verify(found, h, body, SECRET)
    return read_push(found, h.get(forges.EVENTS[forge]), decode(h, body), "")


# -- what each forge sends ------------------------------------------------------


@pytest.mark.parametrize("forge", sorted(forges.FORGES))
def test_each_forges_signed_push_is_read_as_its_branch_and_repository(forge: str) -> None:
    headers, body = forges.FORGES[forge](CLONE, "release/2.x", SHA_A, SHA_C, [SHA_B, SHA_C], SECRET)
    push = parsed(forge, headers, body)
    assert isinstance(push, Push)
    assert (push.source, push.branch, push.after) == (forge, "release/2.x", SHA_C)
    assert repo_key(CLONE) in {repo_key(name) for name in push.repos}


@pytest.mark.parametrize("forge", sorted(forges.FORGES))
def test_a_wrong_secret_or_a_changed_body_is_refused(forge: str) -> None:
    headers, body = forges.FORGES[forge](CLONE, "main", SHA_A, SHA_B, [SHA_B], b"another secret")
    h = headers_of(headers)
    with pytest.raises(Refused) as wrong:
        verify(forge, h, body, SECRET)
    assert wrong.value.status == 401
    headers, body = forges.FORGES[forge](CLONE, "main", SHA_A, SHA_B, [SHA_B], SECRET)
    tampered = body.replace(b'"main"', b'"evil"')
    if forge == "gitlab":  # a token, not a signature: the body is not covered
        verify(forge, headers_of(headers), tampered, SECRET)
    else:
        with pytest.raises(Refused, match="bad X-.*signature"):
            verify(forge, headers_of(headers), tampered, SECRET)


@pytest.mark.parametrize("forge", sorted(forges.FORGES))
def test_a_missing_signature_is_refused(forge: str) -> None:
    headers, body = forges.FORGES[forge](CLONE, "main", SHA_A, SHA_B, [SHA_B], SECRET)
    unsigned = {k: v for k, v in headers.items() if "Signature" not in k and k != "X-Gitlab-Token"}
    with pytest.raises(Refused, match="^no X-") as refused:
        verify(forge, headers_of(unsigned), body, SECRET)
    assert refused.value.status == 401


@pytest.mark.parametrize(
    ("forge", "first"),
    [("forgejo", "X-Forgejo-Signature"), ("gitea", "X-Gitea-Signature"), ("github", "X-Hub-Signature-256")],
)
def test_the_first_signature_present_is_the_one_checked(forge: str, first: str) -> None:
    headers, body = forges.FORGES[forge](CLONE, "main", SHA_A, SHA_B, [SHA_B], SECRET)
    # A bad one is not saved by a good one further down the list.
    forged = dict(headers, **{first: ("sha256=" if first.startswith("X-Hub") else "") + "0" * 64})
    with pytest.raises(Refused, match=f"bad {first} signature"):
        verify(forge, headers_of(forged), body, SECRET)


def test_github_form_encoded_payloads_and_pings_are_understood() -> None:
    headers, body = forges.github(CLONE, "main", SHA_A, SHA_B, [SHA_B], SECRET)
    form = b"payload=" + urllib.parse.quote_plus(body).encode()
    h = headers_of(dict(headers, **{"Content-Type": "application/x-www-form-urlencoded"}))
    push = read_push("github", "push", decode(h, form), "d-1")
    assert isinstance(push, Push) and push.branch == "main" and push.delivery == "d-1"


@pytest.mark.parametrize(
    ("change", "why"),
    [
        ({"ref": "refs/tags/v1.0"}, "refs/tags/v1.0 is not a branch"),
        ({"after": "0" * 40}, "branch main was deleted"),
    ],
)
@pytest.mark.parametrize("forge", sorted(forges.FORGES))
def test_tags_and_deleted_branches_are_nothing_to_do(forge: str, change: dict[str, str], why: str) -> None:
    headers, body = forges.FORGES[forge](CLONE, "main", SHA_A, SHA_B, [SHA_B], SECRET)
    payload = {**json.loads(body), **change}
    assert read_push(forge, headers_of(headers).get(forges.EVENTS[forge]), payload, "") == why


def test_events_other_than_pushes_are_nothing_to_do() -> None:
    assert read_push("github", "issues", {"ref": "refs/heads/main"}, "").startswith("a 'issues' event")
    assert read_push("gitlab", "Tag Push Hook", {}, "").startswith("a 'Tag Push Hook' event")
    system = {"event_name": "push", "ref": "refs/heads/main", "after": SHA_B, "project": {"git_http_url": CLONE}}
    assert isinstance(read_push("gitlab", "System Hook", system, ""), Push)


@pytest.mark.parametrize(
    ("body", "why"),
    [
        (b"{not json", "not JSON"),
        (b"[1, 2]", "not a JSON object"),
        (b"[" * 100_000 + b"]" * 100_000, "not JSON"),
        (b"\xff\xfe", "not JSON"),
        (json.dumps({"after": SHA_B}).encode(), "has no ref"),
        (json.dumps({"ref": "refs/heads/a..b", "after": SHA_B}).encode(), "git refuses that name"),
        (json.dumps({"ref": "refs/heads/main", "after": "$(reboot)"}).encode(), "after is not a commit id"),
        (json.dumps({"ref": "refs/heads/main", "after": SHA_B, "repository": {"clone_url": 7}}).encode(), "names no"),
    ],
)
def test_malformed_payloads_are_refused_with_the_reason(body: bytes, why: str) -> None:
    h = headers_of({"Content-Type": "application/json"})
    with pytest.raises(Refused, match=why) as refused:
        read_push("github", "push", decode(h, body), "")
    assert refused.value.status == 400


@pytest.mark.parametrize(
    "name",
    [
        "https://git.example.com/acme/app.git",
        "https://git.example.com/acme/app",
        "https://ci:token@Git.Example.com:443/acme/app.git/",
        "http://git.example.com:8080/Acme/App.git",
        "git@git.example.com:acme/app.git",
        "ssh://git@git.example.com:2222/acme/app.git",
        "git://git.example.com/acme/app.git",
    ],
)
def test_every_way_a_forge_names_a_repository_is_one_key(name: str) -> None:
    assert repo_key(name) == repo_key(CLONE)


@pytest.mark.parametrize(
    "name",
    ["https://evil.example.com/acme/app.git", "https://git.example.com/acme/app2.git", "https://git.example.com/app"],
)
def test_another_repository_is_another_key(name: str) -> None:
    assert repo_key(name) != repo_key(CLONE)


def test_local_paths_match_by_identity(tmp_path: Path) -> None:
    assert repo_key(f"file://{tmp_path}/x/../r") == repo_key(str(tmp_path / "r")) == str(tmp_path / "r")
    assert repo_key(str(tmp_path / "R")) != repo_key(str(tmp_path / "r"))


def test_a_delivery_is_taken_once_until_released_and_the_memory_is_bounded() -> None:
    seen = Deliveries(keep=3)
    assert seen.claim(["a", "b"])
    assert not seen.claim(["c", "b"])  # one key known: nothing taken
    assert seen.claim(["c"])
    seen.release(["c"])
    assert seen.claim(["c"])
    assert seen.claim(["d", "e"])  # the oldest go
    assert seen.claim(["a"])


def test_a_local_hooks_notice_is_read_from_a_form_or_json(tmp_path: Path) -> None:
    form = read_notify(headers_of({}), f"repo={tmp_path}&branch=main&commit={SHA_A}".encode())
    assert (form.repos, form.branch, form.after, form.source) == ((str(tmp_path),), "main", SHA_A, "notify")
    h = headers_of({"Content-Type": "application/json"})
    assert read_notify(h, json.dumps({"repo": str(tmp_path), "branch": "dev"}).encode()).after == ""
    assert read_notify(headers_of({}), f"repo={tmp_path}".encode()).branch == ""  # every branch watched
    for bad, why in [
        (b"branch=main", "give repo"),
        (f"repo={tmp_path}&branch=main~1".encode(), "not a branch name"),
        (f"repo={tmp_path}&branch=main&commit=HEAD".encode(), "not a commit id"),
    ]:
        with pytest.raises(Refused, match=why):
            read_notify(headers_of({}), bad)


# -- the receiver over HTTP -------------------------------------------------------


class Served:
    """A receiver on 127.0.0.1 whose `submit` records each push it is handed."""

    def __init__(self, secret: bytes | None = SECRET) -> None:
        self.pushes: list[Push] = []
        self.answer = Outcome(202, "queued")
        self.receiver = Receiver("127.0.0.1", 0, secret, self.submit)
        self.receiver.start()
        self.base = f"http://{self.receiver.address}"

    def submit(self, push: Push) -> Outcome:
        self.pushes.append(push)
        return self.answer

    def post(self, path: str, headers: dict[str, str], body: bytes) -> tuple[int, str]:
        return forges.post(self.base, path, headers, body)


@pytest.fixture
def served() -> Iterator[Served]:
    s = Served()
    yield s
    s.receiver.close()


def test_a_signed_push_is_handed_over_and_a_replay_of_it_is_not(served: Served, caplog: Any) -> None:
    headers, body = forges.github(CLONE, "main", SHA_A, SHA_B, [SHA_B], SECRET, delivery="d-42")
    with caplog.at_level(logging.INFO, logger="observer.webhook"):
        assert served.post("/webhook", headers, body) == (202, "queued")
        status, message = served.post("/webhook", headers, body)
        assert (status, message) == (409, "a replay of delivery d-42: already taken")
        # A new delivery id on the same body is a replay too: the id is not signed.
        again = dict(headers, **{"X-GitHub-Delivery": "d-43"})
        assert served.post("/webhook", again, body)[0] == 409
    assert [p.delivery for p in served.pushes] == ["d-42"]
    assert [m for m in caplog.messages if "409" in m] == [
        "POST /webhook from 127.0.0.1: 409 a replay of delivery d-42: already taken",
        "POST /webhook from 127.0.0.1: 409 a replay of delivery d-43: already taken",
    ]


def test_a_push_the_observer_could_not_take_may_be_sent_again(served: Served) -> None:
    headers, body = forges.gitea(CLONE, "main", SHA_A, SHA_B, [SHA_B], SECRET)
    served.answer = Outcome(404, "not watched")
    assert served.post("/webhook", headers, body)[0] == 404
    served.answer = Outcome(202, "queued")
    assert served.post("/webhook", headers, body)[0] == 202


def test_refused_requests_say_why_in_one_line_without_the_body(served: Served, caplog: Any) -> None:
    headers, body = forges.github(CLONE, "main", SHA_A, SHA_B, [SHA_B], b"wrong", delivery="d-1")
    body = body.replace(b"Ada Dev", b"BODY-MARKER")
    with caplog.at_level(logging.INFO, logger="observer.webhook"):
        assert served.post("/webhook", headers, body) == (401, "bad X-Hub-Signature-256 signature")
        assert served.post("/webhook", {"Content-Type": "application/json"}, b"{}")[0] == 400
        assert served.post("/elsewhere", headers, body)[0] == 404
    assert served.pushes == []
    lines = [r for r in caplog.records if r.name == "observer.webhook"]
    assert len(lines) == 3 and all(r.levelno == logging.WARNING for r in lines)
    assert not any("BODY-MARKER" in r.getMessage() for r in caplog.records)


def test_a_body_over_5_mb_is_refused_before_anything_is_read_into_memory(served: Served) -> None:
    headers, body = forges.github(CLONE, "main", SHA_A, SHA_B, [SHA_B], SECRET)
    payload = json.loads(body)
    payload["padding"] = "x" * (6 * 1024 * 1024)
    big = json.dumps(payload).encode()
    signed = dict(headers, **{"X-Hub-Signature-256": "sha256=" + forges.sign(SECRET, big)})
    status, message = served.post("/webhook", signed, big)
    assert status == 413 and "over 5 MB" in message
    assert served.pushes == []
    # curl asks first (Expect: 100-continue) and is told before it sends a byte of it.
    out = subprocess.run(
        ["curl", "-sS", "-o", "/dev/null", "-w", "%{http_code}", "-H", "Expect: 100-continue",
         "--data-binary", "@-", f"{served.base}/webhook"],
        input=big, capture_output=True, timeout=30,
    )  # fmt: skip
    assert out.stdout == b"413", out.stderr
    assert served.pushes == []
    just_under = dict(headers, **{"X-Hub-Signature-256": "sha256=" + forges.sign(SECRET, body + b" " * 10)})
    assert len(body) + 10 <= MAX_BODY
    assert served.post("/webhook", just_under, body + b" " * 10)[0] == 202


def test_others_are_served_while_a_sender_stalls(served: Served) -> None:
    with socket.create_connection(("127.0.0.1", int(served.receiver.address.rsplit(":", 1)[1]))) as slow:
        slow.sendall(b"POST /webhook HTTP/1.1\r\nHost: x\r\nContent-Length: 1000\r\n\r\n{")
        headers, body = forges.gitlab(CLONE, "main", SHA_A, SHA_B, [SHA_B], SECRET)
        assert served.post("/webhook", headers, body)[0] == 202


def test_a_request_the_observer_fails_on_is_a_500_and_one_line_and_the_next_is_served(
    served: Served, tmp_path: Path, caplog: Any
) -> None:
    def broken(push: Push) -> Outcome:
        raise RuntimeError("nobody planned for this")

    served.receiver.submit = broken
    kind = {"X-Volt-Token": SECRET.decode()}
    with caplog.at_level(logging.ERROR, logger="observer.webhook"):
        assert served.post("/notify", kind, f"repo={tmp_path}".encode())[0] == 500
    (line,) = caplog.messages
    assert line == "POST /notify from 127.0.0.1 failed: RuntimeError: nobody planned for this"
    served.receiver.submit = Served.submit.__get__(served)
    assert served.post("/notify", kind, f"repo={tmp_path}".encode())[0] == 202


def test_a_github_ping_is_answered_once_its_signature_holds(served: Served) -> None:
    body = json.dumps({"zen": "Keep it logically awesome.", "hook_id": 1}).encode()
    headers = {"X-GitHub-Event": "ping", "X-GitHub-Delivery": "p-1", "Content-Type": "application/json"}
    assert served.post("/webhook", dict(headers, **{"X-Hub-Signature-256": "sha256=" + "0" * 64}), body)[0] == 401
    signed = dict(headers, **{"X-Hub-Signature-256": "sha256=" + forges.sign(SECRET, body)})
    assert served.post("/webhook", signed, body)[0] == 200
    assert served.pushes == []


def test_notify_needs_the_token_when_there_is_a_secret(served: Served, tmp_path: Path) -> None:
    form = f"repo={tmp_path}&branch=main".encode()
    kind = {"Content-Type": "application/x-www-form-urlencoded"}
    assert served.post("/notify", kind, form) == (401, "no X-Volt-Token header")
    assert served.post("/notify", dict(kind, **{"X-Volt-Token": "guess"}), form) == (401, "wrong X-Volt-Token")
    assert served.post("/notify", dict(kind, **{"X-Volt-Token": SECRET.decode()}), form)[0] == 202
    assert [p.repos for p in served.pushes] == [(str(tmp_path),)]


def test_without_a_secret_notify_is_open_and_webhooks_are_refused(tmp_path: Path) -> None:
    s = Served(secret=None)
    try:
        assert s.post("/notify", {}, f"repo={tmp_path}&branch=main".encode())[0] == 202
        headers, body = forges.github(CLONE, "main", SHA_A, SHA_B, [SHA_B], SECRET)
        status, message = s.post("/webhook", headers, body)
        assert status == 401 and "no --webhook-secret-file" in message
        assert len(s.pushes) == 1
    finally:
        s.receiver.close()


def test_the_lean_client_posts_and_reads_the_answer(served: Served, tmp_path: Path, monkeypatch: Any) -> None:
    secret_file = tmp_path / "secret"
    secret_file.write_text(SECRET.decode() + "\n")
    monkeypatch.chdir(tmp_path)
    (tmp_path / "repo").mkdir()
    code = notify.fast_main(
        ["--repo", "repo", "--branch=main", "--commit", SHA_A, "--url", served.base,
         "--webhook-secret-file", str(secret_file), "--namespace", "ignored"]
    )  # fmt: skip
    assert code == 0
    (push,) = served.pushes
    assert push.repos == (str(tmp_path / "repo"),) and push.after == SHA_A  # made absolute where the hook runs
    monkeypatch.delenv(notify.URL_VARIABLE, raising=False)
    assert notify.fast_main(["--repo", "repo", "--branch", "main"]) is None  # no receiver: the full command
    assert notify.fast_main(["--repo", "repo", "--branch", "main", "--url", served.base, "--help"]) is None
    assert notify.fast_main(["--branch", "main", "--url", served.base]) is None  # the full parser says why
    assert notify.fast_main(["--repo", "repo", "--br", "main", "--url", served.base]) is None  # argparse's prefixes
    assert notify.fast_main(["--repo", "repo", "--branch", "--url", served.base]) is None


def test_the_lean_path_imports_neither_pika_nor_the_settings_nor_argparse(tmp_path: Path) -> None:
    open_receiver = Served(secret=None)
    code = (
        "import sys\n"
        "before = set(sys.modules)  # what the interpreter (and an editable install) loaded already\n"
        "from common.cli import main\n"
        f"code = main(['notify', '--repo', {str(tmp_path)!r}, '--branch', 'main', '--url', {open_receiver.base!r}])\n"
        "heavy = ('pika', 'git', 'common.settings', 'common.logs', 'common.messages', 'argparse', 'typing',"
        " 'urllib.parse', 'http.client', 'logging', 'dataclasses')\n"
        "print(code, sorted(m for m in heavy if m in sys.modules and m not in before))\n"
    )
    try:
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True)
    finally:
        open_receiver.receiver.close()
    assert out.stdout.strip().splitlines()[-1] == "0 []", out.stdout + out.stderr
    assert len(open_receiver.pushes) == 1


def test_the_lean_client_gives_up_on_a_silent_receiver_within_its_timeout(tmp_path: Path, capsys: Any) -> None:
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen()  # accepts into its backlog and never answers
        url = f"http://127.0.0.1:{silent.getsockname()[1]}"
        code = notify.fast_main(["--repo", str(tmp_path), "--branch", "main", "--url", url, "--timeout", "0.3"])
    assert code == 3
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [
        f"volt notify: cannot reach the observer at {url} (no answer in time); its next poll finds the commit"
    ]


def test_the_lean_client_refuses_what_it_cannot_send(tmp_path: Path, capsys: Any) -> None:
    base = ["--repo", str(tmp_path), "--branch", "main"]
    missing = str(tmp_path / "nope")
    cases = [
        (["--url", "ftp://x/"], "--url ftp://x/: must be an http:// or https:// URL"),
        (["--url", "http://127.0.0.1:9/", "--timeout", "soon"], "--timeout: must be a positive number"),
        (
            ["--url", "http://127.0.0.1:9/", "--webhook-secret-file", missing],
            f"--webhook-secret-file {missing}: cannot",
        ),
    ]
    for extra, why in cases:
        assert notify.fast_main([*base, *extra]) == 2, extra
        (line,) = capsys.readouterr().err.strip().splitlines()
        assert line.startswith(f"volt notify: {why}"), line
    # What the lean path does not read, the full command does, and answers alike.
    assert notify.fast_main([*base, "--url", "http://127.0.0.1:9/", "--label", "gpu"]) is None
    assert cli_main(["notify", *base, "--url", "http://127.0.0.1:9/", "--label", "gpu"]) == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert line == "volt notify: --label does not go with --url: the observer reads the labels from .volt.toml"


# -- the observer's side: submit on the receiver's thread, handle on the loop's ---


class RecordingBroker:
    """What the observer needs of a Broker: publish (confirmed at once, or not), and a wake-up."""

    def __init__(self) -> None:
        self.ns = "t"
        self.published: list[CommitSeen] = []
        self.wakes = 0
        self.connected = True

    def publish(self, exchange: str, routing_key: str, message: CommitSeen) -> None:
        self.published.append(message)

    def call_threadsafe(self, fn: Any) -> None:
        if not self.connected:
            raise BrokerUnavailable("not connected")
        self.wakes += 1
        fn()


class Loop:
    def __init__(self, tmp_path: Path, repos: list[str], branches: tuple[str, ...] = ()) -> None:
        self.broker = RecordingBroker()
        settings = ObserverSettings(
            broker=BrokerSettings(), repos=tuple(repos), branches=branches, state_dir=tmp_path / "observer"
        )
        self.observer = Observer(settings, broker=self.broker)  # type: ignore[arg-type]
        self.observer.open_repos()

    def commits(self) -> list[str]:
        return [m.commit for m in self.broker.published]

    def tell(self, repo: str, branch: str = "main", source: str = "github") -> Outcome:
        return self.observer.submit(Push(source=source, repos=(repo,), branch=branch, after=SHA_A))


@pytest.fixture
def loop(repo: GitRepo, tmp_path: Path) -> Iterator[Loop]:
    repo.commit({"f.txt": "0"})
    loop = Loop(tmp_path, [str(repo.path)])
    loop.observer.poll_once()
    yield loop
    loop.observer.cursor.close()


def test_a_push_publishes_every_new_commit_oldest_first_and_a_poll_then_nothing(loop: Loop, repo: GitRepo) -> None:
    first = loop.commits()
    new = [repo.commit({"f.txt": str(i)}) for i in range(3)]
    outcome = loop.tell(f"file://{repo.path}")
    assert outcome.status == 202 and outcome.message.startswith(f"queued: github push to branch main of {repo.path}")
    assert loop.broker.wakes == 1
    assert loop.commits() == first  # nothing on the receiver's thread
    assert loop.observer.handle_pushes() == 3
    assert loop.commits() == first + new
    assert [m.source for m in loop.broker.published[1:]] == ["github"] * 3
    assert loop.observer.poll_once() == 0 and loop.observer.handle_pushes() == 0


def test_a_pushed_commit_is_published_with_its_subject_and_author_as_git_has_them(loop: Loop, repo: GitRepo) -> None:
    # From git, not the payload: the payload lists 20 commits at most, and git is what the runner checks out.
    sha = repo.commit({"f.txt": "new"}, "Teach the parser <b>tags</b>\n\nbody")
    assert loop.tell(f"file://{repo.path}").status == 202
    assert loop.observer.handle_pushes() == 1
    (seen,) = [m for m in loop.broker.published if m.commit == sha]
    assert (seen.subject, seen.author) == ("Teach the parser <b>tags</b>", "Volt Test")


def test_a_push_of_more_than_a_payload_lists_and_a_merge_publish_all_in_gits_order(loop: Loop, repo: GitRepo) -> None:
    many = many_commits(repo, 25)  # a forge lists 20 at most
    repo.git("checkout", "-q", "-b", "side", many[9])
    side = [repo.commit({"side.txt": str(i)}) for i in range(2)]
    repo.git("checkout", "-q", "main")
    repo.git("-c", "user.name=t", "-c", "user.email=t@t", "merge", "-q", "--no-ff", "-m", "merge", "side")
    merge = repo.git("rev-parse", "HEAD")
    loop.tell(str(repo.path))
    assert loop.observer.handle_pushes() == 28
    published = loop.commits()[1:]
    assert sorted(published) == sorted([*many, *side, merge]) and published[-1] == merge
    order = {c: i for i, c in enumerate(published)}
    for child in published:  # parents before children, whatever a payload listed
        for parent in repo.git("rev-list", "--parents", "-n", "1", child).split()[1:]:
            assert order.get(parent, -1) < order[child]


def test_a_force_push_publishes_the_rewritten_commits(loop: Loop, repo: GitRepo) -> None:
    base = loop.commits()[0]
    kept = repo.commit({"f.txt": "1"})
    loop.tell(str(repo.path))
    loop.observer.handle_pushes()
    repo.git("reset", "-q", "--hard", base)
    rewritten = [repo.commit({"f.txt": f"r{i}"}) for i in range(2)]
    loop.tell(str(repo.path))
    assert loop.observer.handle_pushes() == 2
    assert loop.commits() == [base, kept, *rewritten]


def test_pushes_for_one_branch_wait_as_one_and_others_are_refused(loop: Loop, repo: GitRepo) -> None:
    new = repo.commit({"f.txt": "x"})
    for _ in range(5):
        assert loop.tell(str(repo.path)).status == 202
    assert loop.tell("https://git.example.com/acme/app.git").status == 404
    assert loop.tell(str(repo.path), branch="feature").message.endswith("a branch not watched")
    assert loop.observer.handle_pushes() == 1
    assert loop.commits()[-1] == new and len(loop.commits()) == 2


def test_a_push_while_the_broker_is_away_waits_for_the_loop(loop: Loop, repo: GitRepo) -> None:
    loop.broker.connected = False
    new = repo.commit({"f.txt": "x"})
    assert loop.tell(str(repo.path)).status == 202  # queued; the wake-up had nobody to wake
    loop.broker.connected = True
    assert loop.observer.handle_pushes() == 1 and loop.commits()[-1] == new


def test_pushes_from_many_threads_and_polls_publish_each_commit_once(loop: Loop, repo: GitRepo) -> None:
    made = []
    for round_ in range(5):
        made += [repo.commit({"f.txt": f"{round_}.{i}"}) for i in range(3)]
        threads = [threading.Thread(target=loop.tell, args=(str(repo.path),)) for _ in range(8)]
        for t in threads:
            t.start()
        if round_ % 2:
            loop.observer.poll_once()
        for t in threads:
            t.join()
        loop.observer.handle_pushes()
    assert loop.commits()[1:] == made


def test_a_branch_moved_back_to_a_published_commit_publishes_nothing(loop: Loop, repo: GitRepo) -> None:
    base = loop.commits()[0]
    later = [repo.commit({"f.txt": str(i)}) for i in range(2)]
    loop.tell(str(repo.path))
    loop.observer.handle_pushes()
    repo.git("reset", "-q", "--hard", later[0])  # published already, and so is its parent
    loop.tell(str(repo.path))
    assert loop.observer.handle_pushes() == 0
    assert loop.commits() == [base, *later]


def test_a_hook_that_names_no_branch_has_every_watched_branch_looked_at(repo: GitRepo, tmp_path: Path) -> None:
    repo.commit({"f.txt": "0"})
    repo.git("branch", "dev")
    loop = Loop(tmp_path, [str(repo.path)], ("main", "dev"))
    try:
        loop.observer.poll_once()
        on_main = repo.commit({"f.txt": "main"})
        repo.git("checkout", "-q", "dev")
        on_dev = repo.commit({"f.txt": "dev"})
        outcome = loop.observer.submit(Push(source="notify", repos=(str(repo.path),), branch=""))
        assert outcome.message == f"queued: a hook on every branch watched of {repo.path}"
        assert loop.observer.handle_pushes() == 2
        assert {m.branch: m.commit for m in loop.broker.published[-2:]} == {"main": on_main, "dev": on_dev}
    finally:
        loop.observer.cursor.close()
