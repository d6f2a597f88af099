"""The observer as a real process on a real broker: nothing in a repository
stops or misleads it, every new commit is published once, oldest first, and a
repository has one identity whatever it is called."""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path

from support import CommitTap, GitHttpServer, GitRepo, many_commits

PASS = "def test_one():\n    assert True\n"
DEEP = "[test]\nlabels = " + "[" * 3000 + "]" * 3000 + "\n"
PASSWORD = "pa55-w0rd-s3cret"


class Commits(CommitTap):
    def wait(self, count: int, timeout: float = 60) -> list[str]:
        self.volt.wait_for(f"{count} commits published", lambda: len(self.take()) >= count, timeout=timeout)
        return self.commits()

    def commits(self) -> list[str]:
        return [m.commit for m in self.seen]


def bare_remote(work: GitRepo, path: Path) -> Path:
    """A bare repository that `work` pushes to, as a server's would be."""
    subprocess.run(["git", "init", "-q", "--bare", "-b", "main", str(path)], check=True)
    work.git("remote", "add", "origin", str(path))
    return path


def polled_since(volt, state: Path, since: float, polls: int = 3) -> bool:
    """True once the observer noted `polls` more polls after `since` (its health file)."""
    try:
        at = json.loads((state / "health.json").read_text())["at"]
    except (OSError, ValueError, KeyError):
        return False
    return at > since + polls * 0.2


def test_a_broken_config_is_published_and_ends_as_error_and_the_observer_goes_on(volt, repo):
    repo.commit({"tests/test_main.py": PASS})
    volt.dispatcher()
    volt.runner("obs-1")
    volt.observer(repo.path)
    volt.wait_results(1)
    deep = repo.commit({".volt.toml": DEEP}, "nested 3,000 levels")
    string = repo.commit({".volt.toml": '[test]\nlabels = "linux"\n'}, "labels as a string")
    good = repo.commit({".volt.toml": None}, "fixed")
    rows = {r["commit"]: r for r in volt.wait_results(4, timeout=90)}
    assert rows[deep]["status"] == "error" and "nested too deeply" in rows[deep]["reason"], rows[deep]
    assert rows[string]["status"] == "error" and "must be a list of strings" in rows[string]["reason"]
    assert rows[good]["status"] == "passed"
    assert volt.procs["observer"].poll() is None
    log = volt.log_of("observer")
    assert "Traceback" not in log
    assert f"commit={deep[:12]} published without labels: .volt.toml is nested too deeply" in log
    # A restart goes on past them: the cursor moved.
    volt.kill("observer")
    volt.observer(repo.path)
    after = repo.commit({"tests/test_main.py": PASS}, "after the restart")
    volt.wait_results(5, timeout=60)
    assert {r["commit"] for r in volt.results()} == {*rows, after}


def test_branches_come_and_go_without_stopping_the_observer(volt, repo, tmp_path):
    feature = repo.commit({"f.txt": "0"})
    repo.git("branch", "feature")
    main = repo.commit({"f.txt": "main"})
    remote = bare_remote(repo, tmp_path / "remote.git")
    repo.git("push", "-q", "origin", "main", "feature")
    commits = Commits(volt)
    state = tmp_path / "observer"
    proc = volt.observer(remote, "--branch", "main", "--branch", "feature", "--branch", "later")
    assert sorted(commits.wait(2)) == sorted([main, feature])
    # Deleted on the server: the other branches are still polled.
    repo.git("push", "-q", "origin", ":feature")
    on_main = [repo.commit({"f.txt": str(i)}) for i in range(2)]
    repo.git("push", "-q", "origin", "main")
    assert commits.wait(4)[2:] == on_main
    since = time.time()
    volt.wait_for("more polls", lambda: polled_since(volt, state, since, polls=5))
    # A branch that did not exist at start shows up: its head, like a first sight.
    repo.git("checkout", "-q", "-b", "later")
    later = [repo.commit({"l.txt": str(i)}) for i in range(3)]
    repo.git("push", "-q", "origin", "later")
    assert commits.wait(5)[4] == later[-1]
    assert proc.poll() is None
    log = volt.log_of("observer")
    assert log.count("branch=feature not found") == 1  # a warning once, not every poll
    assert log.count("branch=later not found") == 1
    assert "Traceback" not in log


def test_a_push_of_1500_commits_is_published_whole_and_oldest_first(volt, repo, tmp_path):
    repo.commit({"f.txt": "0"})
    remote = bare_remote(repo, tmp_path / "remote.git")
    repo.git("push", "-q", "origin", "main")
    commits = Commits(volt)
    volt.observer(remote)
    commits.wait(1)
    pushed = many_commits(repo, 1500)
    started = time.monotonic()
    repo.git("push", "-q", "origin", "main")
    published = commits.wait(1501, timeout=120)[1:]
    took = time.monotonic() - started
    print(f"1500 commits pushed at once: all on the broker {took:.1f}s after the push")
    assert published == pushed
    since = time.time()
    volt.wait_for("more polls", lambda: polled_since(volt, tmp_path / "observer", since))
    assert len(commits.take()) == 1501  # none twice


def test_a_force_push_after_gc_publishes_every_new_commit_once(volt, repo, tmp_path):
    base = repo.commit({"f.txt": "base"})
    remote = bare_remote(repo, tmp_path / "remote.git")
    repo.git("push", "-q", "origin", "main")
    commits = Commits(volt)
    volt.observer(remote)
    commits.wait(1)
    old = [repo.commit({"f.txt": f"old {i}"}) for i in range(3)]
    repo.git("push", "-q", "origin", "main")
    assert commits.wait(4)[1:] == old
    # While the observer is down, the branch is rewritten from `base` and the old
    # commits are garbage-collected on the server: the last one published is gone.
    volt.kill("observer")
    repo.git("reset", "-q", "--hard", base)
    new = [repo.commit({"f.txt": f"new {i}"}) for i in range(4)]
    repo.git("push", "-q", "--force", "origin", "main")
    subprocess.run(["git", "--git-dir", str(remote), "gc", "-q", "--prune=now"], check=True)
    gone = subprocess.run(["git", "--git-dir", str(remote), "cat-file", "-e", old[-1]], capture_output=True)
    assert gone.returncode != 0
    volt.observer(remote)
    assert commits.wait(8)[4:] == new
    since = time.time()
    volt.wait_for("more polls", lambda: polled_since(volt, tmp_path / "observer", since))
    assert len(commits.take()) == 8
    assert len(set(commits.commits())) == 8  # every new commit once, none twice


def test_two_names_of_one_repository_make_one_job(volt, repo, tmp_path):
    sha = repo.commit({"tests/test_main.py": PASS})
    volt.dispatcher()
    winding = f"{repo.path.parent}/x/../{repo.path.name}"
    for name in (winding, f"file://{repo.path}"):
        done = volt.run("notify", "--repo", name, "--branch", "main")
        assert done.returncode == 0, done.stderr
        assert done.stdout.strip() == f"published {sha[:12]} on main of {repo.path}"
    barrier = repo.commit({"tests/test_main.py": PASS}, "barrier")
    assert volt.run("notify", "--repo", str(repo.path), "--branch", "main").returncode == 0
    # Commits are taken in order: once the barrier's job is there, so is the other.
    volt.wait_for("the barrier's job", lambda: any(r["commit"] == barrier for r in volt.results(done_only=False)))
    jobs = volt.results(done_only=False)
    assert sorted((r["repo"], r["commit"]) for r in jobs) == sorted([(str(repo.path), sha), (str(repo.path), barrier)])


def test_a_password_in_the_url_reaches_git_and_nothing_else(volt, repo, tmp_path):
    first = repo.commit({"f.txt": "0"})
    root = tmp_path / "srv"
    bare_remote(repo, root / "app.git")
    repo.git("push", "-q", "origin", "main")
    server = GitHttpServer(root, "ci", PASSWORD)
    try:
        commits = Commits(volt)
        state = tmp_path / "observer"
        volt.start(
            "observer",
            "observer",
            "--repo",
            server.url("app.git", "ci", PASSWORD),
            "--poll",
            "0.2",
            "--state-dir",
            str(state),
        )
        assert commits.wait(1) == [first]
        second = repo.commit({"f.txt": "1"})
        repo.git("push", "-q", "origin", "main")
        assert commits.wait(2) == [first, second]  # fetched again with the password
        assert {m.repo for m in commits.seen} == {server.url("app.git")}
        assert any(ok for _, ok in server.requests) and any(not ok for _, ok in server.requests)
        volt.kill("observer")  # the cursor's journal and the mirror as they are
        found = [p for p in state.rglob("*") if p.is_file() and PASSWORD.encode() in p.read_bytes()]
        assert found == []
        assert PASSWORD not in volt.log_of("observer")
        assert all(PASSWORD not in m.to_json().decode() for m in commits.seen)
        assert server.url("app.git") in volt.log_of("observer")
    finally:
        server.close()


def test_bad_branch_names_are_one_clear_line(volt, repo):
    repo.commit({"f.txt": "0"})
    for command in ("observer", "notify"):
        for bad in ("main~3", "main@{1}", "a..b", "-x", "main\nINFO forged"):
            done = volt.run(command, "--repo", str(repo.path), f"--branch={bad}")
            assert done.returncode == 2, (command, bad, done.stderr)
            lines = done.stderr.strip().splitlines()
            assert len(lines) == 1 and "not a branch name" in lines[0] and "Traceback" not in done.stderr


def test_notify_publishes_a_commit_with_a_broken_config_and_refuses_a_missing_branch(volt, repo):
    deep = repo.commit({".volt.toml": DEEP})
    commits = Commits(volt)
    done = volt.run("notify", "--repo", str(repo.path), "--branch", "main")
    assert done.returncode == 0, done.stderr
    assert commits.wait(1) == [deep]
    assert commits.seen[0].labels == []
    missing = volt.run("notify", "--repo", str(repo.path), "--branch", "gone")
    assert missing.returncode == 2
    assert missing.stderr.strip() == f"volt notify: branch 'gone' not found in {repo.path}"


def test_a_server_without_the_repository_at_start_is_tried_again_every_poll(volt, repo, tmp_path):
    head = repo.commit({"f.txt": "0"})
    root = tmp_path / "srv"
    root.mkdir()
    server = GitHttpServer(root)
    try:
        commits = Commits(volt)
        state = tmp_path / "observer"
        proc = volt.start("observer", "observer", "--repo", server.url("app.git"), "--poll", "0.2",
                          "--state-dir", str(state))  # fmt: skip
        since = time.time()
        volt.wait_for("a few polls", lambda: polled_since(volt, state, since, polls=5))
        assert proc.poll() is None and commits.take() == []
        check = volt.run("check", "--observer", str(state))
        assert check.returncode == 1 and f"repo {server.url('app.git')}: cannot clone" in check.stdout
        bare_remote(repo, root / "app.git")
        repo.git("push", "-q", "origin", "main")
        assert commits.wait(1) == [head]
        volt.wait_for("the check to pass", lambda: volt.run("check", "--observer", str(state)).returncode == 0)
        log = volt.log_of("observer")
        assert log.count("cannot be read (tried again every poll)") == 1 and "Traceback" not in log
    finally:
        server.close()


def test_a_second_observer_on_one_state_folder_is_refused(volt, repo):
    repo.commit({"f.txt": "0"})
    commits = Commits(volt)
    volt.observer(repo.path)
    commits.wait(1)
    second = volt.run("observer", "--repo", str(repo.path), "--state-dir", str(volt.tmp / "observer"))
    assert second.returncode == 2
    assert second.stderr.strip() == f"volt observer: another observer is using {volt.tmp / 'observer'}"
