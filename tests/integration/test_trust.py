"""The trust boundary: hostile commits on a real sandboxed runner cannot change a
result, read a secret, touch anything outside their tree, or outlive their job."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import sys
import time
import urllib.request
import uuid
from pathlib import Path

from envsupport import project
from support import GitHttpServer, GitRepo, Volt, free_port

from runner.workspace import _slug

FAILING = {".volt.toml": None, "tests/test_fail.py": "def test_fail():\n    assert 1 == 2\n"}


def suite(code: str) -> dict[str, str | None]:
    return {".volt.toml": f"[test]\ncommand = [{sys.executable!r}, '-c', {code!r}]\n", "tests/test_fail.py": None}


def processes_with(token: str) -> list[int]:
    """Host pids whose command line holds `token` (sandboxed ones included: the
    host sees into every PID namespace it made)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            if token.encode() in (entry / "cmdline").read_bytes():
                state = (entry / "stat").read_text().rsplit(")", 1)[1].split()[0]
                if state != "Z":
                    found.append(int(entry.name))
        except (OSError, IndexError):
            continue
    return found


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest() if path.exists() else "missing"


def attacks(workdir: Path, own: str, other: str, sentinel: Path, token: str) -> dict[str, str]:
    """Each attack's code; `token` is in every process it starts, so a survivor shows."""
    own_git = workdir / "repos" / f"{_slug(own)}.git"
    other_git = workdir / "repos" / f"{_slug(other)}.git"
    tests = "tests/test_fail.py"
    passing = "def test_fail():\n    assert True\n"
    # A filter that would check the failing test out as a passing one.
    smudge = f"printf {passing!r}"
    plant_filter = f'[filter "pass"]\n\tsmudge = sh -c "{smudge}"\n\trequired = true\n'

    def append(path: Path, text: str) -> str:
        return f"open({str(path)!r}, 'a').write({text!r})\n"

    hook = own_git / "hooks" / "post-checkout"
    loop = f"import time\nwhile True:\n    open({tests!r}, 'w').write({passing!r}); time.sleep(0.02)  # {token}\n"
    return {
        # Filters, worktree, fsmonitor and hooks planted where the runner's git would read them.
        "smudge-own": append(own_git / "config", plant_filter)
        + append(own_git / "info" / "attributes", "* filter=pass\n"),
        "smudge-other": append(other_git / "config", plant_filter),
        "worktree": append(own_git / "config", f"[core]\n\tworktree = {sentinel.parent}\n"),
        "fsmonitor": append(own_git / "config", f"[core]\n\tfsmonitor = touch {sentinel}\n"),
        "hook": f"import os\nos.makedirs({str(hook.parent)!r}, exist_ok=True)\n"
        + append(hook, f"#!/bin/sh\ntouch {sentinel}\n")
        + f"os.chmod({str(hook)!r}, 0o755)\n",
        # Secrets: every environment it can see, and the network.
        "environ": "import glob, socket\n"
        "for p in glob.glob('/proc/*/environ'):\n"
        "    try:\n        print(p, open(p, 'rb').read())\n"
        "    except OSError as e:\n        print(p, e)\n"
        "for port in (5672, 15672, 5432):\n"
        "    try:\n        socket.create_connection(('127.0.0.1', port), timeout=1); print('CONNECTED', port)\n"
        "    except OSError as e:\n        print('refused', port, e)\n",
        # Writing outside its tree: the host, the runner's outbox, another repository's tree.
        "write": f"for p in ({str(sentinel)!r}, {str(workdir / 'outbox' / 'forged.json')!r},"
        f" {str(workdir / 'trees' / _slug(other) / tests)!r}, '/etc/volt-pwned'):\n"
        "    try:\n        open(p, 'w').write('{}'); print('WROTE', p)\n"
        "    except OSError as e:\n        print('refused', p, e)\n",
        # Processes that outlive the job and rewrite the next job's tests to pass.
        "daemons": "import os, sys, time\n"
        "if os.fork() == 0:\n"
        "    os.setsid()\n"
        "    if os.fork() == 0:\n"
        f"        os.execv(sys.executable, [sys.executable, '-c', {loop!r}])\n"
        "    os._exit(0)\n"
        "time.sleep(0.5)\n",
    }


def test_hostile_commits_change_no_result_read_no_secret_and_leave_nothing(volt: Volt, tmp_path: Path) -> None:
    secret = f"s3cr3t-{uuid.uuid4().hex}"
    token = f"volt-token-{uuid.uuid4().hex}"
    repo, other = GitRepo(tmp_path / "repo"), GitRepo(tmp_path / "other")
    sentinel = tmp_path / "sentinel"
    sentinel.write_text("untouched")
    volt.dispatcher()
    workdir = tmp_path / "trusted"
    # One runner, so every job shares its caches; a secret in its environment.
    volt.runner("trusted", sandbox="bwrap", env={"AWS_SECRET_ACCESS_KEY": secret})
    volt.wait_for("the runner", lambda: volt.ask("status")["runners"])
    other_sha = other.commit({"tests/test_ok.py": "def test_ok():\n    pass\n"})
    volt.run("notify", "--repo", str(other.path), "--branch", "main", "--commit", other_sha)
    volt.wait_results(1)
    own_git = workdir / "repos" / f"{_slug(str(repo.path))}.git"
    cases = attacks(workdir, str(repo.path), str(other.path), sentinel, token)
    expected = 1
    for name, code in cases.items():
        attack = repo.commit(suite(code), name)
        victim = repo.commit(FAILING, f"after {name}")
        for sha in (attack, victim):
            volt.run("notify", "--repo", str(repo.path), "--branch", "main", "--commit", sha)
        expected += 2
        rows = {r["commit"]: r for r in volt.wait_results(expected, timeout=60)}
        assert rows[victim]["status"] == "failed" and rows[victim]["failed"] == 1, (name, rows[victim])
        assert sentinel.read_text() == "untouched", name
        assert not Path("/etc/volt-pwned").exists()
        assert not (workdir / "outbox" / "forged.json").exists(), name
        if own_git.exists():  # the runner rewrote its config: what the attack wrote there is gone
            assert (
                b"filter" not in (own_git / "config").read_bytes()
                and b"worktree" not in (own_git / "config").read_bytes()
            )
        log = volt.ask("log", {"id": rows[attack]["job_id"]})
        text = log["full"] or log["head"] + log["tail"]
        assert secret not in text and "guest:guest" not in text, name
        # (A write may "succeed" inside the box, into its own tmpfs: what counts is the host, above.)
        assert "CONNECTED" not in text, (name, text[-2000:])
        assert processes_with(token) == [], name
    other_tree = workdir / "trees" / _slug(str(other.path)) / "tests" / "test_ok.py"
    assert not other_tree.exists() or other_tree.read_text() == "def test_ok():\n    pass\n"
    assert volt.procs["trusted"].poll() is None


def test_a_frozen_sandboxed_runner_has_its_whole_box_killed_before_the_job_moves(
    volt: Volt, repo: GitRepo, tmp_path: Path
) -> None:
    token = f"volt-token-{uuid.uuid4().hex}"
    # The job starts a daemon; both live only inside the runner's box.
    code = (
        "import os, sys, time\n"
        f"if os.fork() == 0:\n    os.setsid(); os.execv(sys.executable, [sys.executable, '-c', 'import time; time.sleep(600)  # {token}'])\n"
        f"time.sleep(600)  # {token}\n"
    )
    sha = repo.commit(suite(code))
    volt.dispatcher()
    volt.runner("frozen", heartbeat=0.5, sandbox="bwrap")
    volt.wait_for("the runner", lambda: volt.ask("status")["runners"])
    volt.run("notify", "--repo", str(repo.path), "--branch", "main", "--commit", sha)
    volt.wait_for("the sandboxed run and its daemon", lambda: len(processes_with(token)) >= 2, timeout=30)
    volt.procs["frozen"].send_signal(signal.SIGSTOP)
    frozen_at = time.monotonic()
    volt.wait_for("the watchdog to kill the box", lambda: not processes_with(token), timeout=10)
    killed_after = time.monotonic() - frozen_at
    # Killed within the runner's lease (3 heartbeats), before the dispatcher can give it away.
    assert killed_after < 1.5, killed_after
    volt.procs["frozen"].send_signal(signal.SIGCONT)


def test_a_password_in_a_repository_url_appears_nowhere(volt: Volt, repo: GitRepo, tmp_path: Path) -> None:
    password = f"pw-{uuid.uuid4().hex}"
    root = tmp_path / "srv"
    root.mkdir()
    repo.commit(suite("import os; print(dict(os.environ))"))  # the job shows all it was given
    repo.git("clone", "-q", "--bare", str(repo.path), str(root / "app.git"))
    server = GitHttpServer(root, "ci", password)
    try:
        secret_url = server.url("app.git", "ci", password)
        plain_url = server.url("app.git")
        creds = tmp_path / "git-credentials"
        creds.write_text(f"{server.url('', 'ci', password).rstrip('/')}\n")
        creds.chmod(0o600)
        port = free_port()
        volt.dispatcher("--http-port", str(port))
        volt.runner("cred", "--git-credentials", str(creds), sandbox="bwrap")
        volt.start("observer", "observer", "--repo", secret_url, "--poll", "0.2", "--state-dir", str(tmp_path / "obs"))
        (row,) = volt.wait_results(1, timeout=60)
        assert row["status"] == "passed", row
        assert volt.results(repo=plain_url)  # found by the URL without the password
        outputs = [
            volt.run("status", "--json").stdout,
            volt.run("results", "--json", "--repo", plain_url).stdout,
            volt.run("log", row["job_id"]).stdout,
            json.dumps(volt.ask("status")),
        ]
        for path in (
            "/",
            "/api/status",
            "/api/results",
            f"/api/jobs/{row['job_id']}",
            f"/jobs/{row['job_id']}",
            f"/jobs/{row['job_id']}/log.txt",
            "/metrics",
        ):
            with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=10) as reply:
                outputs.append(reply.read().decode())
        log = volt.ask("log", {"id": row["job_id"]})
        assert "VOLT_JOB_ID" in (log["full"] or "")  # the job printed its environment: no password in it
        for name in volt.procs:
            outputs.append(volt.log_of(name))
        assert all(password not in text for text in outputs)
        volt.stop_all()
        leaked = [p for p in tmp_path.rglob("*") if p.is_file() and p != creds and password.encode() in p.read_bytes()]
        assert leaked == []
    finally:
        server.close()


def test_an_environment_build_reaches_no_host_service_and_no_other_environment(volt: Volt, tmp_path: Path) -> None:
    # The build runs the commit's own build backend, with network: it must not
    # reach the broker, the store or any other service on the host's loopback
    # (the broker's guest login forges results), nor write another environment
    # of its repository (another branch's commit, another key, poisoning main's).
    repo = GitRepo(tmp_path / "repo")
    workdir = tmp_path / "builder"
    volt.dispatcher()
    volt.runner("builder", sandbox="bwrap", env={"UV_OFFLINE": "1"})
    volt.wait_for("the runner", lambda: volt.ask("status")["runners"])
    failing = project(code="VALUE = 41\n")  # its test asserts VALUE == 42
    first = repo.commit(failing, "main: a failing test")
    volt.run("notify", "--repo", str(repo.path), "--branch", "main", "--commit", first)
    (row,) = volt.wait_results(1, timeout=120)
    assert row["status"] == "failed", row
    mains = list((workdir / "envs").glob("*/*/lib/python*/site-packages"))
    assert len(mains) == 1, mains
    attack = (
        "import glob, os, socket\n"
        "found = []\n"
        "for port in (5672, 15672, 5432):\n"
        "    try:\n"
        "        socket.create_connection(('127.0.0.1', port), timeout=2).close(); found.append('CONNECTED %d' % port)\n"
        "    except OSError as e:\n"
        "        found.append('refused %d' % port)\n"
        f"for site in glob.glob({str(workdir)!r} + '/envs/*/*/lib/python*/site-packages'):\n"
        "    try:\n"
        "        open(os.path.join(site, 'zz_volt_pwn.pth'), 'w').write('import os; os._exit(0)\\n')\n"
        "        found.append('PLANTED ' + site)\n"
        "    except OSError as e:\n"
        "        found.append('refused ' + site)\n"
        "raise SystemExit('ATTACK ' + ' | '.join(found))\n"
    )
    hostile = project(name="app", dependencies=(), code="VALUE = 41\n")
    hostile["pyproject.toml"] += "\n[tool.voltbuild]\nflavour = 'another key'\n"
    hostile["_build/voltbuild.py"] = attack + hostile["_build/voltbuild.py"]
    second = repo.commit(hostile, "a branch's commit whose build attacks")
    volt.run("notify", "--repo", str(repo.path), "--branch", "feature", "--commit", second)
    rows = {r["commit"]: r for r in volt.wait_results(2, timeout=120)}
    log = volt.ask("log", {"id": rows[second]["job_id"]})
    text = log["full"] or log["head"] + log["tail"]
    assert "ATTACK" in text, text[-3000:]
    assert "CONNECTED" not in text and text.count("refused 5") >= 2, text[-3000:]
    # It may write the environment it builds (which, failed, is never used), and no other.
    assert f"PLANTED {mains[0]}" not in text and text.count("PLANTED") <= 1, text[-3000:]
    assert not (mains[0] / "zz_volt_pwn.pth").exists()
    third = repo.commit({**failing, "notes.txt": "main again"}, "main again: the same project, so its environment")
    volt.run("notify", "--repo", str(repo.path), "--branch", "main", "--commit", third)
    rows = {r["commit"]: r for r in volt.wait_results(3, timeout=120)}
    assert rows[third]["status"] == "failed", rows[third]
    log = volt.ask("log", {"id": rows[third]["job_id"]})
    assert ": reused" in (log["full"] or log["head"])  # main's environment, as the first commit left it
