"""`volt up` and the workers' settings as a user meets them: real processes, a real broker.

A terminal's Ctrl-C reaches volt up's whole process group; each child gets
exactly one SIGTERM per Ctrl-C, so running jobs finish and are recorded. No
secret is on a command line. A folder a worker cannot write is one line.
Every spelling of a repository is the same one to --allow-repo and results.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from support import GitHttpServer, GitRepo, Volt, alive

from common.naming import normalize_repo
from dispatcher.store import Store

HOST = socket.gethostname().split(".")[0]


def sleeping_suite(seconds: float) -> dict[str, str]:
    """A .volt.toml whose test command sleeps, then passes."""
    code = f"import time; time.sleep({seconds}); print('slept')"
    return {".volt.toml": f"[test]\ncommand = [{sys.executable!r}, '-c', {code!r}]\n"}


class Up:
    """`volt up` started as a terminal starts a foreground job: its own process group."""

    def __init__(self, volt: Volt, *args: str, runners: int = 2) -> None:
        self.volt = volt
        self.state = volt.tmp / "state"
        self.log = volt.tmp / "up.log"
        volt.runner_ids.update(f"{HOST}-{i}" for i in range(1, runners + 1))
        argv = [sys.executable, "-m", "common.cli", "up", *args, "--runners", str(runners)]
        argv += ["--poll", "0.2", "--heartbeat-interval", "0.5", "--state-dir", str(self.state)]
        argv += ["--namespace", volt.ns, "--log-level", "INFO"]
        with open(self.log, "ab") as out:
            self.proc = subprocess.Popen(
                argv,
                env={**os.environ, "VOLT_AMQP_URL": volt.amqp_url},
                stdout=out,
                stderr=subprocess.STDOUT,
                cwd=volt.tmp,
                start_new_session=True,
            )
        volt.procs["up"] = self.proc  # its log (up.log) is shown when a wait_for fails

    def ctrl_c(self) -> None:
        os.killpg(self.proc.pid, signal.SIGINT)

    def children(self) -> dict[int, list[str]]:
        """Each child's pid and command line."""
        found = {}
        for entry in Path("/proc").iterdir():
            try:
                stat = (entry / "stat").read_text()
                if entry.name.isdigit() and int(stat.rsplit(")", 1)[1].split()[1]) == self.proc.pid:
                    found[int(entry.name)] = (entry / "cmdline").read_bytes().decode().split("\0")
            except (OSError, IndexError, ValueError):
                continue
        return found

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def wait(self, timeout: float) -> int:
        try:
            return self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            pytest.fail(f"volt up did not stop within {timeout}s:\n{self.output()[-4000:]}")

    def kill(self) -> None:
        """Children first: killed alone, volt up would leave them to drain their jobs."""
        for pid in self.children():
            os.kill(pid, signal.SIGKILL)
        self.proc.kill()
        self.proc.wait(timeout=30)

    def recorded(self, commit: str) -> list[str]:
        store = Store(self.state / "dispatcher.db", readonly=True)
        try:
            return [row.status or row.state for row in store.find(commit=commit, limit=10)]
        finally:
            store.close()


@pytest.fixture
def start_up(volt: Volt) -> Iterator[Callable[..., Up]]:
    started: list[Up] = []

    def start(*args: str, runners: int = 2) -> Up:
        started.append(Up(volt, *args, runners=runners))
        return started[-1]

    yield start
    for up in started:
        up.kill()


def running(volt: Volt) -> list[dict]:
    return [job for job in volt.ask("status")["running"] if job["state"] == "running"]


def test_ctrl_c_lets_running_jobs_finish_and_be_recorded(
    volt: Volt, repo: GitRepo, start_up: Callable[..., Up]
) -> None:
    sha = repo.commit(sleeping_suite(4))
    # The repository as a file:// URL with a trailing slash: its jobs carry the
    # plain path, and the runners allow exactly that.
    up = start_up("--repo", f"file://{repo.path}/")
    (job,) = volt.wait_for("the job to run", lambda: running(volt), timeout=60)
    assert job["commit"] == sha and job["repo"] == str(repo.path)

    children = up.children()
    assert len(children) == 4  # dispatcher, two runners, observer
    for pid, argv in children.items():
        # Each in a session of its own, out of reach of the terminal's Ctrl-C ...
        assert os.getsid(pid) == pid != os.getsid(up.proc.pid)
        # ... and with no password on its command line, which every user can read.
        assert "--amqp-url" not in argv and not any(volt.amqp_url in a for a in argv), argv
        assert "--repo" not in argv, argv

    up.ctrl_c()  # the whole foreground group, as a terminal does
    assert up.wait(timeout=60) == 0, up.output()[-4000:]
    assert up.recorded(sha) == ["passed"]
    out = up.output()
    assert out.count("draining: finishing the current job") == 2, out[-4000:]  # one SIGTERM each
    assert "abandoning" not in out
    assert "dispatcher stopped" in out
    assert not up.children()


def test_a_second_ctrl_c_stops_the_running_jobs(volt: Volt, repo: GitRepo, start_up: Callable[..., Up]) -> None:
    sha = repo.commit(sleeping_suite(120))
    up = start_up("--repo", str(repo.path), runners=1)
    volt.wait_for("the job to run", lambda: running(volt), timeout=60)
    up.ctrl_c()
    volt.wait_for("the runner to drain", lambda: "draining:" in up.output(), timeout=30)
    assert up.proc.poll() is None  # it waits for the job
    started = time.monotonic()
    up.ctrl_c()
    assert up.wait(timeout=30) == 0, up.output()[-4000:]
    assert time.monotonic() - started < 30
    out = up.output()
    assert out.count("draining:") == 1 and out.count("abandoning the current job") == 1, out[-4000:]
    assert "passed" not in up.recorded(sha)


def test_children_stop_when_volt_up_is_killed(volt: Volt, repo: GitRepo, start_up: Callable[..., Up]) -> None:
    repo.commit({"tests/test_one.py": "def test_one():\n    pass\n"})
    up = start_up("--repo", str(repo.path), runners=1)
    volt.wait_for("the runner", lambda: volt.ask("status")["runners"], timeout=60)
    pids = list(up.children())
    assert len(pids) == 3
    up.proc.kill()  # no Ctrl-C to forward: the kernel tells each child (SIGTERM)
    up.wait(timeout=10)
    volt.wait_for("every child to stop", lambda: not any(alive(pid) for pid in pids), timeout=30)


@pytest.fixture
def served(tmp_path: Path, repo: GitRepo) -> Iterator[tuple[GitHttpServer, str]]:
    repo.commit({"tests/test_one.py": "def test_one():\n    pass\n"})
    root = tmp_path / "served"
    root.mkdir()
    subprocess.run(["git", "clone", "-q", "--bare", str(repo.path), str(root / "app.git")], check=True)
    server = GitHttpServer(root, user="ci", password="s3cret-t0ken")
    try:
        yield server, repo.git("rev-parse", "HEAD")
    finally:
        server.close()


def test_up_gives_the_observer_the_url_as_given_and_puts_no_password_on_a_command_line(
    volt: Volt, served: tuple[GitHttpServer, str], start_up: Callable[..., Up]
) -> None:
    server, sha = served
    url = server.url("app.git", "ci", "s3cret-t0ken")
    up = start_up("--repo", url)
    identity = normalize_repo(url)
    # The observer fetched with the password (a 401 otherwise): the commit became a job.
    (row,) = volt.wait_for("the commit's job", lambda: volt.results(commit=sha, done_only=False), timeout=60)
    assert row["repo"] == identity and "s3cret" not in identity
    assert any(ok for _, ok in server.requests)
    # The runners allow the identity the job carries (they had a pattern for it),
    # whatever they then make of a repository they have no password for.
    (row,) = volt.wait_for("the job's end", lambda: volt.results(commit=sha), timeout=60)
    assert "not allowed" not in row["reason"], row

    children = up.children()
    assert len(children) == 4
    for pid, argv in children.items():
        assert not any("s3cret" in a for a in argv), argv
        environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        has_repos = any(v.startswith(b"VOLT_REPOS=") for v in environ)
        assert has_repos == ("observer" in argv), argv  # only the observer needs the password
    up.ctrl_c()
    assert up.wait(timeout=60) == 0, up.output()[-4000:]
    assert "s3cret" not in up.output()


# -- folders a worker cannot write -----------------------------------------------------


def locked_in(locked: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """`volt ARGS` with `locked` read-only to it (a read-only bind mount: root,
    who ignores permissions, cannot write there either)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("VOLT_")}
    bwrap = ["bwrap", "--dev-bind", "/", "/", "--ro-bind", str(locked), str(locked), "--"]
    return subprocess.run(
        [*bwrap, sys.executable, "-m", "common.cli", *args, "--amqp-url", "amqp://guest:guest@127.0.0.1:1/%2F"],
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
    )


def test_a_folder_that_cannot_be_made_or_written_is_one_line_and_exit_2(tmp_path: Path) -> None:
    locked = tmp_path / "locked"
    locked.mkdir()
    afile = tmp_path / "a-file"
    afile.write_text("")
    cases = [
        (("dispatcher", "--db", f"{locked}/d.db"), f"--db {locked}: cannot write in it: Read-only file system"),
        (("dispatcher", "--db", f"{afile}/sub/d.db"), f"--db {afile}/sub: cannot create it: Not a directory"),
        (("runner", "--id", "r1", "--workdir", f"{locked}/w"), f"--workdir {locked}/w: cannot create it"),
        (("runner", "--id", "r1", "--workdir", str(locked)), f"--workdir {locked}: cannot write in it"),
        (("observer", "--repo", "/srv/app", "--state-dir", f"{locked}/s"), f"--state-dir {locked}/s: cannot"),
        (("up", "--repo", "/srv/app", "--state-dir", f"{locked}/s"), f"--state-dir {locked}/s: cannot create"),
    ]
    for args, said in cases:
        done = locked_in(locked, *args)
        assert done.returncode == 2, (args, done.stderr)
        assert done.stdout == "" and done.stderr.count("\n") == 1, (args, done.stderr)
        assert done.stderr.startswith(f"volt {args[0]}: {said}"), (args, done.stderr)
    assert os.listdir(locked) == []


# -- --allow-repo, --label and results: flags, variables and spellings ----------------


def test_every_spelling_of_a_repository_is_allowed_and_found(
    volt: Volt, repo: GitRepo, monkeypatch: pytest.MonkeyPatch
) -> None:
    sha = repo.commit({"tests/test_one.py": "def test_one():\n    pass\n"})
    # What the environment says is replaced by the flags, list and all.
    monkeypatch.setenv("VOLT_ALLOW_REPOS", "/nowhere/*")
    monkeypatch.setenv("VOLT_LABELS", "gpu,big")
    volt.dispatcher()
    volt.runner("spell-1", "--allow-repo", f"file://{repo.path.parent}/*", "--label", "linux")
    (runner,) = volt.wait_for("the runner", lambda: volt.ask("status")["runners"])
    # The flag's labels, not the variable's; then those of what it has (python3.11, ...).
    assert [label for label in runner["labels"] if not label.startswith("python3.")] == ["linux"]
    notify = volt.run("notify", "--repo", f"file://{repo.path}/", "--branch", "main", "--commit", sha)
    assert notify.returncode == 0, notify.stderr
    (row,) = volt.wait_results(1)
    assert row["status"] == "passed" and row["repo"] == str(repo.path), row
    for spelling in (str(repo.path), f"{repo.path}/", f"file://{repo.path}", f"{repo.path}/../{repo.path.name}"):
        done = volt.run("results", "--repo", spelling, "--json")
        assert done.returncode == 0, done.stderr
        assert sha in done.stdout, spelling
    other = volt.run("results", "--repo", f"{repo.path}-other")
    assert other.stdout.strip() == "no results yet"
