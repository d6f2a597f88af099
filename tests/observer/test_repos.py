"""Reading branch heads and new commits from real repositories, local and mirrored over HTTP."""

from __future__ import annotations

import logging
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from support import GitHttpServer, GitRepo, many_commits

from observer.publish import MAX_COMMIT_BYTES, AboutRead
from observer.repos import BranchMissing, RepoError, WatchedRepo

# `repo` (tests/conftest.py) is a GitRepo at tmp_path/repo on branch main.
USER, PASSWORD = "ci", "pa55-w0rd-s3cret"


@pytest.fixture
def state(tmp_path: Path) -> Path:
    return tmp_path / "state"


@pytest.fixture
def history(repo: GitRepo) -> list[str]:
    """Three commits on main, oldest first."""
    return [repo.commit({"f.txt": str(i)}, f"commit {i}") for i in range(3)]


class Served:
    """`repo`, pushed to a bare repository that an HTTP server with a password serves."""

    def __init__(self, repo: GitRepo, root: Path) -> None:
        self.repo = repo
        self.bare = root / "app.git"
        subprocess.run(["git", "init", "-q", "--bare", "-b", "main", str(self.bare)], check=True)
        self.server = GitHttpServer(root, USER, PASSWORD)
        self.push()

    def push(self) -> None:
        self.repo.git("push", "-q", "--mirror", str(self.bare))

    def url(self, password: str = PASSWORD) -> str:
        return self.server.url("app.git", USER, password)


@pytest.fixture
def served(repo: GitRepo, history: list[str], tmp_path: Path) -> Iterator[Served]:
    served = Served(repo, tmp_path / "srv")
    yield served
    served.server.close()


def walk(watched: WatchedRepo, head: str, known: list[str]) -> list[str]:
    with watched.walk(head, known) as commits:
        return list(commits)


# -- a local repository, read in place --------------------------------------


def test_local_repo_is_read_in_place(repo: GitRepo, history: list[str], state: Path) -> None:
    watched = WatchedRepo(str(repo.path), state)
    assert watched.local
    assert watched.url == str(repo.path.resolve())
    assert watched.default_branch() == "main"
    assert watched.head("main") == history[-1]
    assert not (state / "mirrors").exists()


@pytest.mark.parametrize("spelling", ["{p}/", "file://{p}", "file://{p}/", "{p}/../repo", "file://localhost{p}"])
def test_every_spelling_of_a_local_repository_is_one_identity(
    repo: GitRepo, history: list[str], state: Path, spelling: str
) -> None:
    watched = WatchedRepo(spelling.format(p=repo.path), state)
    assert watched.url == str(repo.path.resolve())
    assert watched.local  # read in place, not mirrored
    assert watched.head("main") == history[-1]


def test_a_relative_path_is_made_absolute(
    repo: GitRepo, history: list[str], state: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(repo.path.parent)
    watched = WatchedRepo(repo.path.name, state)
    assert watched.url == str(repo.path.resolve())
    assert watched.head("main") == history[-1]


def test_head_sees_new_commits_at_once(repo: GitRepo, history: list[str], state: Path) -> None:
    watched = WatchedRepo(str(repo.path), state)
    assert watched.head("main") == history[-1]
    newer = repo.commit({"f.txt": "newer"})
    watched.fetch()  # only checks that the repository is still there
    assert watched.head("main") == newer


def test_a_local_repository_that_vanishes_and_comes_back(
    repo: GitRepo, history: list[str], state: Path, tmp_path: Path
) -> None:
    watched = WatchedRepo(str(repo.path), state)
    watched.fetch()
    (repo.path / ".git").rename(tmp_path / "moved")
    with pytest.raises(RepoError, match="not a git repository"):
        watched.fetch()
    (tmp_path / "moved").rename(repo.path / ".git")
    watched.fetch()
    assert watched.head("main") == history[-1]


def test_default_branch_follows_head(repo: GitRepo, history: list[str], state: Path) -> None:
    repo.git("checkout", "-q", "-b", "develop")
    assert WatchedRepo(str(repo.path), state).default_branch() == "develop"


def test_detached_head_has_no_default_branch(repo: GitRepo, history: list[str], state: Path) -> None:
    repo.git("checkout", "-q", "--detach", history[0])
    with pytest.raises(RepoError, match="detached HEAD"):
        WatchedRepo(str(repo.path), state).default_branch()


# -- what is new: rev-list from the head, down to what is known -------------


def test_new_commits_are_oldest_first(repo: GitRepo, history: list[str], state: Path) -> None:
    watched = WatchedRepo(str(repo.path), state)
    more = [repo.commit({"f.txt": f"more {i}"}) for i in range(4)]
    assert walk(watched, more[-1], [history[-1]]) == more
    assert walk(watched, more[-1], [history[0]]) == history[1:] + more
    assert walk(watched, more[-1], [more[-1]]) == []
    assert walk(watched, more[-1], [history[0], more[1]]) == more[2:]


def test_new_commits_after_a_merge_put_parents_first(repo: GitRepo, history: list[str], state: Path) -> None:
    repo.git("checkout", "-q", "-b", "side")
    side = [repo.commit({"side.txt": str(i)}, "on side") for i in range(2)]
    repo.git("checkout", "-q", "main")
    main = repo.commit({"main.txt": "m"}, "on main")
    repo.git("merge", "-q", "--no-ff", "-m", "merge", "side")
    merge = repo.git("rev-parse", "HEAD")
    found = walk(WatchedRepo(str(repo.path), state), merge, [history[-1]])
    assert sorted(found) == sorted([*side, main, merge])
    assert found.index(side[0]) < found.index(side[1]) < found.index(merge)
    assert found[-1] == merge


def test_there_is_no_cap_on_new_commits(repo: GitRepo, history: list[str], state: Path) -> None:
    pushed = many_commits(repo, 3000)
    assert walk(WatchedRepo(str(repo.path), state), pushed[-1], [history[-1]]) == pushed


def test_a_walk_stopped_early_leaves_nothing_behind(repo: GitRepo, history: list[str], state: Path) -> None:
    pushed = many_commits(repo, 2000)
    watched = WatchedRepo(str(repo.path), state)
    with watched.walk(pushed[-1], [history[-1]]) as commits:
        assert [next(commits) for _ in range(3)] == pushed[:3]
    # No error for stopping, and the walk can start over.
    assert walk(watched, pushed[-1], [pushed[-2]]) == [pushed[-1]]


def test_new_commits_after_a_force_push(repo: GitRepo, history: list[str], state: Path) -> None:
    repo.git("reset", "-q", "--hard", history[0])
    rewritten = [repo.commit({"f.txt": f"rewritten {i}"}) for i in range(2)]
    assert walk(WatchedRepo(str(repo.path), state), rewritten[-1], history) == rewritten


def test_existing_drops_commits_that_were_pruned(repo: GitRepo, history: list[str], state: Path) -> None:
    repo.git("reset", "-q", "--hard", history[0])
    repo.git("reflog", "expire", "--expire=now", "--all")
    repo.git("gc", "-q", "--prune=now")
    watched = WatchedRepo(str(repo.path), state)
    tree = repo.git("rev-parse", "HEAD^{tree}")
    assert watched.existing([*history, "0" * 40, tree]) == [history[0]]
    assert watched.existing([]) == []


def test_a_walk_from_a_missing_commit_is_one_line(repo: GitRepo, history: list[str], state: Path) -> None:
    with pytest.raises(RepoError, match="cannot list the new commits") as info:
        walk(WatchedRepo(str(repo.path), state), history[-1], ["0" * 40])
    assert "\n" not in str(info.value)


# -- labels -----------------------------------------------------------------


@pytest.mark.parametrize(
    ("content", "labels", "why"),
    [
        ('[test]\nlabels = ["gpu", "linux"]\n', ["gpu", "linux"], None),
        ("[test]\nlabels = " + "[" * 3000 + "]" * 3000 + "\n", [], "nested too deeply"),
        ('[test]\nlabels = "linux"\n', [], "must be a list of strings"),
        ("[test\n", [], "not valid TOML"),
        ("# " + "x" * 200_000 + "\n", [], "larger than 64 KiB"),
        (b"\xff\xfe[test]\x00".decode("latin-1"), [], None),
    ],
)
def test_labels_of_a_commit(
    repo: GitRepo,
    state: Path,
    content: str,
    labels: list[str],
    why: str | None,
    caplog: pytest.LogCaptureFixture,
) -> None:
    sha = repo.commit({".volt.toml": content})
    with caplog.at_level(logging.WARNING, logger="observer.repos"):
        assert WatchedRepo(str(repo.path), state).labels_at(sha) == labels
    if why:
        (line,) = caplog.messages
        assert why in line and sha[:12] in line and "published without labels" in line


def test_a_commit_without_a_config_file_needs_no_labels(repo: GitRepo, history: list[str], state: Path) -> None:
    assert WatchedRepo(str(repo.path), state).labels_at(history[-1]) == []
    sha = repo.commit({".volt.toml/inner": "a folder, not a file"})
    assert WatchedRepo(str(repo.path), state).labels_at(sha) == []


# -- subject and author -------------------------------------------------------

HOSTILE = "<img src=x onerror=alert(1)>\x1b[31mred\x07 \u202eevil\u202c\n\nand a body line\n"


@pytest.mark.parametrize("reader", ["poll", "notify"])
def test_a_commits_subject_and_author_are_its_first_line_cleaned_and_bounded(
    repo: GitRepo, state: Path, reader: str
) -> None:
    def about(sha: str) -> tuple[str, str]:
        if reader == "poll":
            return WatchedRepo(str(repo.path), state).about_at(sha)
        return AboutRead(str(repo.path), sha).result()

    sha = repo.commit({"f.txt": "1"}, "Fix the parser\n\nLonger text the page never shows.")
    assert about(sha) == ("Fix the parser", "Volt Test")
    sha = repo.commit({"f.txt": "2"}, HOSTILE)
    assert about(sha) == ("<img src=x onerror=alert(1)> [31mred evil", "Volt Test")
    repo.git("-c", "user.name=" + "N" * 300, "commit", "-q", "--allow-empty", "-m", "x" * 500)
    subject, author = about(repo.git("rev-parse", "HEAD"))
    assert subject == "x" * 200 and author == "N" * 200


@pytest.mark.parametrize("reader", ["poll", "notify"])
def test_a_commit_too_big_to_read_or_missing_has_no_subject(repo: GitRepo, state: Path, reader: str) -> None:
    message = state.parent / "message.txt"
    message.write_text("y" * (MAX_COMMIT_BYTES + 10))
    repo.git("commit", "-q", "--allow-empty", "-F", str(message))
    sha = repo.git("rev-parse", "HEAD")
    missing = "f" * 40
    for commit in (sha, missing):
        if reader == "poll":
            assert WatchedRepo(str(repo.path), state).about_at(commit) == ("", "")
        else:
            assert AboutRead(str(repo.path), commit).result() == ("", "")


# -- bad names ----------------------------------------------------------------


def test_a_missing_branch(repo: GitRepo, history: list[str], state: Path) -> None:
    watched = WatchedRepo(str(repo.path), state)
    with pytest.raises(BranchMissing, match="not found"):
        watched.head("no-such-branch")


def test_a_missing_repository(tmp_path: Path, state: Path) -> None:
    watched = WatchedRepo(str(tmp_path / "absent"), state)
    with pytest.raises(RepoError, match="repository not found") as info:
        watched.head("main")
    assert "\n" not in str(info.value)


def test_a_directory_that_is_not_a_repository(tmp_path: Path, state: Path) -> None:
    (tmp_path / "plain").mkdir()
    with pytest.raises(RepoError, match="not a git repository"):
        WatchedRepo(str(tmp_path / "plain"), state).open()


def test_a_name_that_looks_like_an_option_is_refused(state: Path) -> None:
    with pytest.raises(RepoError):
        WatchedRepo("--upload-pack=touch pwned", state)


def test_a_url_with_a_bad_port_is_one_line_without_its_password(state: Path) -> None:
    with pytest.raises(RepoError, match="not a repository URL") as info:
        WatchedRepo(f"https://{USER}:{PASSWORD}@example.com:99999x/a.git", state)
    assert PASSWORD not in str(info.value)


# -- any other URL: mirrored, then fetched, credentials never written ---------


def test_a_url_is_mirrored_and_fetched(served: Served, history: list[str], state: Path) -> None:
    watched = WatchedRepo(served.url(), state)
    assert not watched.local
    assert watched.url == served.server.url("app.git")  # the identity: no user, no password
    assert watched.head("main") == history[-1]
    assert watched.default_branch() == "main"
    assert (watched.mirror_path / "HEAD").is_file()
    assert watched.mirror_path.is_relative_to(state)

    newer = [served.repo.commit({"f.txt": f"newer {i}"}) for i in range(2)]
    served.push()
    assert watched.head("main") == history[-1]  # not seen until fetched
    watched.fetch()
    assert watched.head("main") == newer[-1]
    assert walk(watched, newer[-1], [history[-1]]) == newer
    # The password went to git in its environment only: nothing in the mirror has it.
    assert not any(PASSWORD.encode() in f.read_bytes() for f in state.rglob("*") if f.is_file())
    assert any(authorized for _, authorized in served.server.requests)


def test_a_wrong_password_fails_at_once_and_says_so_once(served: Served, state: Path) -> None:
    started = time.monotonic()
    with pytest.raises(RepoError, match="cannot clone") as info:
        WatchedRepo(served.url(password="wrong-password"), state).open()
    assert time.monotonic() - started < 20
    assert "\n" not in str(info.value) and "wrong-password" not in str(info.value)
    with pytest.raises(RepoError, match="cannot clone"):
        WatchedRepo(served.server.url("app.git"), state).open()  # no password: no prompt either


def test_a_mirror_sees_new_and_deleted_branches(served: Served, history: list[str], state: Path) -> None:
    served.repo.git("branch", "old-feature")
    served.push()
    watched = WatchedRepo(served.url(), state)
    assert watched.head("old-feature") == history[-1]
    served.repo.git("branch", "-D", "old-feature")
    served.repo.git("checkout", "-q", "-b", "new-feature")
    feature = served.repo.commit({"feature.txt": "x"})
    served.push()
    watched.fetch()
    assert watched.head("new-feature") == feature
    with pytest.raises(BranchMissing, match="not found"):
        watched.head("old-feature")


def test_a_mirror_is_reused_by_a_new_instance(served: Served, history: list[str], state: Path) -> None:
    first = WatchedRepo(served.url(), state)
    first.open()
    marker = first.mirror_path / "volt-marker"
    marker.write_text("kept")
    second = WatchedRepo(served.server.url("app.git"), state)  # the same repository without its login
    assert second.mirror_path == first.mirror_path
    assert second.head("main") == history[-1]
    assert marker.read_text() == "kept"


def test_a_mirror_named_after_a_url_with_a_password_is_taken_over(
    served: Served, history: list[str], state: Path
) -> None:
    # Earlier versions named the mirror after the URL as given and kept it in its config.
    url = served.url()
    old = WatchedRepo(url, state)._old_mirror
    assert old is not None
    subprocess.run(["git", "clone", "-q", "--mirror", url, str(old)], check=True, capture_output=True)
    assert PASSWORD in (old / "config").read_text()
    watched = WatchedRepo(url, state)
    assert watched.head("main") == history[-1]
    assert not old.exists()
    assert PASSWORD not in (watched.mirror_path / "config").read_text()


def test_a_half_made_mirror_is_cleaned_up(served: Served, history: list[str], state: Path) -> None:
    watched = WatchedRepo(served.url(), state)
    leftover = watched.mirror_path.with_name(watched.mirror_path.name + ".tmp")
    leftover.mkdir(parents=True)
    (leftover / "junk").write_text("from a crash")
    assert watched.head("main") == history[-1]
    assert not leftover.exists()


def test_a_url_that_does_not_exist(served: Served, state: Path) -> None:
    watched = WatchedRepo(served.server.url("absent.git", USER, PASSWORD), state)
    with pytest.raises(RepoError, match="cannot clone") as info:
        watched.open()
    assert "\n" not in str(info.value)
    assert not watched.mirror_path.exists()
    assert not watched.mirror_path.with_name(watched.mirror_path.name + ".tmp").exists()


def test_a_fetch_that_fails_is_a_repo_error(served: Served, history: list[str], state: Path, tmp_path: Path) -> None:
    watched = WatchedRepo(served.url(), state)
    watched.open()
    served.bare.rename(tmp_path / "gone")
    with pytest.raises(RepoError, match="cannot fetch") as info:
        watched.fetch()
    assert "\n" not in str(info.value)
    assert watched.head("main") == history[-1]  # what was fetched before is still there


def test_a_server_that_never_answers_is_given_up_on(state: Path) -> None:
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen()
    accepted: list[socket.socket] = []
    threading.Thread(target=lambda: accepted.append(listener.accept()[0]), daemon=True).start()
    started = time.monotonic()
    watched = WatchedRepo(f"http://127.0.0.1:{listener.getsockname()[1]}/app.git", state, git_timeout=1.5)
    with pytest.raises(RepoError, match="took longer than 1.5s"):
        watched.open()
    assert time.monotonic() - started < 10
    listener.close()


def test_mirrors_of_different_urls_do_not_collide(served: Served, state: Path) -> None:
    one = WatchedRepo(served.server.url("app.git"), state)
    two = WatchedRepo(served.server.url("other.git"), state)
    assert one.mirror_path != two.mirror_path
