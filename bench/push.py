"""The push path: commit-to-result through the observer's receiver, and what a hook costs.

Measured on the product as a developer's machine has it: a virtual
environment with a plain `pip install .` (no test extras), built once per
version of the code under bench/out/push-venv/. The observer is that
install's `volt observer --listen` (with a webhook secret, --poll 3600, so
only the push path publishes); a dispatcher and one runner (its sandbox on,
the default) run a one-test pytest suite in a warm clone. Per commit:

  receiver  result recorded - the moment a post-commit hook starts that posts
            the repository with `curl -fsS` to POST /notify; beyond the test time
  webhook   result recorded - the moment a forge's signed push event (GitHub's
            shape) is posted to POST /webhook; beyond the test time
  notify    result recorded - the moment a post-commit hook starts that runs
            `volt notify` with VOLT_NOTIFY_URL set; beyond the test time
  notify wall time  `volt notify`, process start to exit: told to the receiver
            (the hook's case), straight to RabbitMQ (no receiver), and with the
            receiver down (it gives up at once and says so)

The three kinds of commit take turns, so drift on a shared machine touches
them alike. Prints medians; asserts nothing.
"""

from __future__ import annotations

import argparse
import hashlib
import hmac
import http.client
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

from harness import OUT, ROOT, Repo, System, median, progress, report

ONE_TEST = "def test_one():\n    assert True\n"
SECRET = "bench-webhook-secret"
TARGET_RECEIVER = 0.060  # s beyond the test process, hook start to recorded
TARGET_NOTIFY = 0.150  # s beyond the test process, hook start to recorded
TARGET_WALL = 0.100  # s, `volt notify` start to exit
PACKAGES = ("common", "observer", "dispatcher", "runner")

# The two post-commit hooks of the README. Git runs a hook at the top of the
# work tree, so $PWD is the repository; the curl one names no branch (the
# observer looks at every branch it watches there) and starts no git at all.
CURL_HOOK = """#!/bin/sh
exec curl -fsS -m 2 -o /dev/null -H @"$VOLT_TOKEN_HEADER_FILE" --data-urlencode "repo=$PWD" "$VOLT_NOTIFY_URL/notify"
"""
NOTIFY_HOOK = """#!/bin/sh
exec volt notify --repo "$PWD" --branch "$(git branch --show-current)"
"""


def plain_install() -> Path:
    """A venv with `pip install .` of this code and nothing else; its bin folder.
    Kept per hash of the code, so a run after a change builds a fresh one."""
    digest = hashlib.sha256((ROOT / "pyproject.toml").read_bytes())
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            digest.update(str(path.relative_to(ROOT)).encode() + b"\0" + path.read_bytes())
    home = OUT / "push-venv"
    venv = home / digest.hexdigest()[:16]
    if (venv / ".ready").exists():
        return venv / "bin"
    shutil.rmtree(home, ignore_errors=True)  # older versions' venvs
    progress(f"building a plain install in {venv} (python -m venv, pip install .)")
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    subprocess.run(
        [str(venv / "bin" / "python"), "-m", "pip", "install", "-q", "--disable-pip-version-check", str(ROOT)],
        check=True,
        stdout=subprocess.DEVNULL,
    )
    shutil.rmtree(ROOT / "build", ignore_errors=True)  # pip's build leftovers in the tree
    (venv / ".ready").touch()
    return venv / "bin"


def github_push(repo: Path, before: str, after: str) -> tuple[dict[str, str], bytes]:
    """A GitHub push event for one commit, signed as GitHub signs it."""
    page = f"file://{repo}"
    commit = {"id": after, "message": "change", "url": f"{page}/commit/{after}", "distinct": True}
    payload = {
        "ref": "refs/heads/main",
        "before": before,
        "after": after,
        "created": False,
        "deleted": False,
        "forced": False,
        "commits": [commit],
        "head_commit": commit,
        "repository": {"name": repo.name, "full_name": f"bench/{repo.name}", "clone_url": page, "html_url": page},
        "pusher": {"name": "bench", "email": "bench@volt.invalid"},
    }
    body = json.dumps(payload).encode()
    signature = hmac.new(SECRET.encode(), body, hashlib.sha256).hexdigest()
    headers = {
        "Content-Type": "application/json",
        "X-GitHub-Event": "push",
        "X-GitHub-Delivery": hashlib.sha1(after.encode()).hexdigest(),
        "X-Hub-Signature-256": f"sha256={signature}",
    }
    return headers, body


def post(port: int, headers: dict[str, str], body: bytes) -> int:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        conn.request("POST", "/webhook", body=body, headers=headers)
        reply = conn.getresponse()
        reply.read()
        return reply.status
    finally:
        conn.close()


def wall(argv: list[str], env: dict[str, str], cwd: Path) -> float:
    started = time.perf_counter()
    subprocess.run(argv, env=env, cwd=cwd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=False)
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="5 rounds instead of 15")
    parser.add_argument("--runs", type=int, help="rounds (each: one commit per way, and the wall times)")
    args = parser.parse_args()
    args.runs = args.runs or (5 if args.quick else 15)
    bin_dir = plain_install()
    system = System(tag="bench-push")
    try:
        repo = Repo(system.tmp / "repo")
        repo.commit({"tests/test_one.py": ONE_TEST})
        secret = system.tmp / "webhook-secret"
        secret.write_text(SECRET + "\n")
        token_header = system.tmp / "token-header"
        token_header.write_text(f"X-Volt-Token: {SECRET}\n")
        hooks = system.tmp / "hooks"
        hooks.mkdir()
        for name, text in (("curl", CURL_HOOK), ("notify", NOTIFY_HOOK)):
            (hooks / name).write_text(text)
            (hooks / name).chmod(0o755)

        system.dispatcher()
        system.runners(1)
        port = _free_port()
        argv = [str(bin_dir / "volt"), "observer", "--repo", str(repo.path), "--poll", "3600"]
        argv += ["--state-dir", str(system.tmp / "obs"), "--listen", f"127.0.0.1:{port}"]
        argv += ["--webhook-secret-file", str(secret), "--amqp-url", system.amqp_url, "--namespace", system.ns]
        log = open(system.tmp / "observer.log", "ab")  # noqa: SIM115 - closed with the process
        system.procs["observer"] = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, cwd=system.tmp)
        # Its first sight of the branch publishes the head: that warms the runner's clone too.
        system.result_for(repo.head())
        progress(f"runner warm; {args.runs} rounds of curl hook, volt notify hook and GitHub webhook")

        url = f"http://127.0.0.1:{port}"
        env = {
            **os.environ,
            "PATH": f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}",
            "VOLT_NOTIFY_URL": url,
            "VOLT_WEBHOOK_SECRET_FILE": str(secret),
            "VOLT_TOKEN_HEADER_FILE": str(token_header),
        }
        extra: dict[str, list[float]] = {"receiver": [], "notify": [], "webhook": []}
        seen: dict[str, list[float]] = {"receiver": [], "notify": [], "webhook": []}
        tests: list[float] = []
        for i in range(args.runs):
            for way in ("receiver", "notify", "webhook"):
                before = repo.head()
                sha = repo.commit()
                started = time.time()
                if way == "webhook":
                    status = post(port, *github_push(repo.path, before, sha))
                    if status != 202:
                        raise RuntimeError(f"the receiver answered {status} to a signed push")
                else:
                    hook = hooks / ("curl" if way == "receiver" else "notify")
                    subprocess.run([str(hook)], cwd=repo.path, env=env, check=True, capture_output=True)
                row = system.result_for(sha)
                tests.append(row["duration_s"])
                extra[way].append(row["finished_at"] - started - row["duration_s"])
                seen[way].append(row["seen_at"] - started)  # seen_at: when the observer built the message
            progress(
                f"round {i + 1}/{args.runs}: " + ", ".join(f"{w} +{v[-1] * 1000:.0f} ms" for w, v in extra.items())
            )

        # What a hook costs the developer: `volt notify` from start to exit.
        progress(f"volt notify wall time, {args.runs * 2} runs each way")
        sha = repo.head()
        command = [str(bin_dir / "volt"), "notify", "--repo", str(repo.path), "--branch", "main", "--commit", sha]
        straight = {k: v for k, v in env.items() if k not in ("VOLT_NOTIFY_URL", "VOLT_WEBHOOK_SECRET_FILE")}
        straight.update(VOLT_AMQP_URL=system.amqp_url, VOLT_NAMESPACE=system.ns)
        down = dict(env, VOLT_NOTIFY_URL=f"http://127.0.0.1:{_free_port()}")
        python = [str(bin_dir / "python"), "-c", "pass"]
        walls: dict[str, list[float]] = {"url": [], "broker": [], "down": [], "python": []}
        for _ in range(args.runs * 2):  # taking turns, as above
            walls["url"].append(wall(command, env, system.tmp))
            walls["broker"].append(wall(command, straight, system.tmp))
            walls["down"].append(wall(command, down, system.tmp))
            walls["python"].append(wall(python, env, system.tmp))

        t = median(tests)
        ms = {k: median(v) * 1000 for k, v in extra.items()}
        seen_ms = {k: median(v) * 1000 for k, v in seen.items()}
        wall_ms = {k: median(v) * 1000 for k, v in walls.items()}
        print(f"rounds: {args.runs}; test process median {t * 1000:.0f} ms; plain install in {bin_dir.parent}")
        for way, what in (
            ("receiver", "curl -fsS hook to POST /notify"),
            ("notify", "volt notify hook, VOLT_NOTIFY_URL"),
            ("webhook", "GitHub push to POST /webhook"),
        ):
            print(
                f"commit-to-result, {what}: median {ms[way]:.0f} ms beyond the test process "
                f"(of which hook start to the observer's publish: {seen_ms[way]:.0f} ms)"
            )
        print(
            f"volt notify wall time: {wall_ms['url']:.0f} ms told to the receiver, {wall_ms['broker']:.0f} ms "
            f"straight to RabbitMQ, {wall_ms['down']:.0f} ms with the receiver down; "
            f"python -c pass from the same install: {wall_ms['python']:.0f} ms"
        )
        report(
            "push_receiver",
            "commit-to-result via the receiver (curl hook), beyond test time",
            f"+{ms['receiver']:.0f} ms",
            f"< +{TARGET_RECEIVER * 1000:.0f} ms",
            ms["receiver"] < TARGET_RECEIVER * 1000,
            median_s=ms["receiver"] / 1000,
            seen_s=seen_ms["receiver"] / 1000,
            test_s=t,
            runs=args.runs,
        )
        report(
            "push_webhook",
            "commit-to-result via a forge webhook (GitHub push), beyond test time",
            f"+{ms['webhook']:.0f} ms",
            f"< +{TARGET_RECEIVER * 1000:.0f} ms",
            ms["webhook"] < TARGET_RECEIVER * 1000,
            median_s=ms["webhook"] / 1000,
            seen_s=seen_ms["webhook"] / 1000,
        )
        report(
            "push_notify",
            "commit-to-result via volt notify to the receiver, beyond test time",
            f"+{ms['notify']:.0f} ms",
            f"< +{TARGET_NOTIFY * 1000:.0f} ms",
            ms["notify"] < TARGET_NOTIFY * 1000,
            median_s=ms["notify"] / 1000,
            seen_s=seen_ms["notify"] / 1000,
        )
        report(
            "notify_wall",
            "volt notify wall time (plain install, to the receiver)",
            f"{wall_ms['url']:.0f} ms (straight to RabbitMQ {wall_ms['broker']:.0f} ms; "
            f"receiver down {wall_ms['down']:.0f} ms; python -c pass {wall_ms['python']:.0f} ms)",
            f"< {TARGET_WALL * 1000:.0f} ms",
            wall_ms["url"] < TARGET_WALL * 1000,
            median_s=wall_ms["url"] / 1000,
            broker_s=wall_ms["broker"] / 1000,
            down_s=wall_ms["down"] / 1000,
            python_s=wall_ms["python"] / 1000,
        )
    finally:
        system.close()


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


if __name__ == "__main__":
    main()
