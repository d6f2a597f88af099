"""Reading branch heads and new commits from real repositories, local and mirrored."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
from support import GitRepo

from observer import repos as repos_module
from observer.repos import RepoError, WatchedRepo

# `repo` (tests/conftest.py) is a GitRepo at tmp_path/repo on branch main.


@pytest.fixture
def state(tmp_path: Path) -> Path:
    return tmp_path / "state"


@pytest.fixture
def history(repo: GitRepo) -> list[str]:
    """Three commits on main, oldest first."""
    return [repo.commit({"f.txt": str(i)}, f"commit {i}") for i in range(3)]


# -- a local repository, read in place --------------------------------------


def test_local_repo_is_read_in_place(repo: GitRepo, history: list[str], state: Path) -> None:
    watched = WatchedRepo(str(repo.path), state)
    assert watched.local
    assert watched.url == str(repo.path.resolve())
    assert watched.default_branch() == "main"
    assert watched.head("main") == history[-1]
    assert not (state / "mirrors").exists()


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
    watched.fetch()  # a no-op for a local repository
    assert watched.head("main") == newer


def test_default_branch_follows_head(repo: GitRepo, history: list[str], state: Path) -> None:
    repo.git("checkout", "-q", "-b", "develop")
    assert WatchedRepo(str(repo.path), state).default_branch() == "develop"


def test_detached_head_has_no_default_branch(repo: GitRepo, history: list[str], state: Path) -> None:
    repo.git("checkout", "-q", "--detach", history[0])
    with pytest.raises(RepoError, match="detached HEAD"):
        WatchedRepo(str(repo.path), state).default_branch()


def test_new_commits_are_oldest_first(repo: GitRepo, history: list[str], state: Path) -> None:
    watched = WatchedRepo(str(repo.path), state)
    more = [repo.commit({"f.txt": f"more {i}"}) for i in range(4)]
    assert watched.new_commits(more[-1], history[-1]) == more
    assert watched.new_commits(more[-1], history[0]) == history[1:] + more
    assert watched.new_commits(more[-1], more[-1]) == []


def test_new_commits_after_a_merge_put_parents_first(repo: GitRepo, history: list[str], state: Path) -> None:
    repo.git("checkout", "-q", "-b", "side")
    side = repo.commit({"side.txt": "s"}, "on side")
    repo.git("checkout", "-q", "main")
    main = repo.commit({"main.txt": "m"}, "on main")
    repo.git("merge", "-q", "--no-ff", "-m", "merge", "side")
    merge = repo.git("rev-parse", "HEAD")
    found = WatchedRepo(str(repo.path), state).new_commits(merge, history[-1])
    assert sorted(found) == sorted([side, main, merge])
    assert found[-1] == merge


def test_new_commits_are_capped_to_the_newest(
    repo: GitRepo, history: list[str], state: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(repos_module, "MAX_NEW_COMMITS", 2)
    more = [repo.commit({"f.txt": f"more {i}"}) for i in range(5)]
    assert WatchedRepo(str(repo.path), state).new_commits(more[-1], history[-1]) == more[-2:]


def test_new_commits_from_an_unknown_commit_give_the_head(repo: GitRepo, history: list[str], state: Path) -> None:
    # The remembered commit vanished (history rewritten): start again from the head.
    watched = WatchedRepo(str(repo.path), state)
    assert watched.new_commits(history[-1], "0" * 40) == [history[-1]]


def test_new_commits_after_a_force_push(repo: GitRepo, history: list[str], state: Path) -> None:
    repo.git("reset", "-q", "--hard", history[0])
    rewritten = [repo.commit({"f.txt": f"rewritten {i}"}) for i in range(2)]
    assert WatchedRepo(str(repo.path), state).new_commits(rewritten[-1], history[-1]) == rewritten


def test_a_missing_branch(repo: GitRepo, history: list[str], state: Path) -> None:
    watched = WatchedRepo(str(repo.path), state)
    for branch in ("no-such-branch", "", "main^{tree}"):
        with pytest.raises(RepoError, match="not found"):
            watched.head(branch)


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


# -- any other URL: mirrored, then fetched ------------------------------------


def test_a_url_is_mirrored_and_fetched(repo: GitRepo, history: list[str], state: Path) -> None:
    watched = WatchedRepo(f"file://{repo.path}", state)
    assert not watched.local
    assert watched.url == f"file://{repo.path}"
    assert watched.head("main") == history[-1]
    assert watched.default_branch() == "main"
    assert (watched.mirror_path / "HEAD").is_file()
    assert watched.mirror_path.is_relative_to(state)

    newer = [repo.commit({"f.txt": f"newer {i}"}) for i in range(2)]
    assert watched.head("main") == history[-1]  # not seen until fetched
    watched.fetch()
    assert watched.head("main") == newer[-1]
    assert watched.new_commits(newer[-1], history[-1]) == newer


def test_a_mirror_sees_new_and_deleted_branches(repo: GitRepo, history: list[str], state: Path) -> None:
    repo.git("branch", "old-feature")
    watched = WatchedRepo(f"file://{repo.path}", state)
    assert watched.head("old-feature") == history[-1]
    repo.git("branch", "-D", "old-feature")
    repo.git("checkout", "-q", "-b", "new-feature")
    feature = repo.commit({"feature.txt": "x"})
    watched.fetch()
    assert watched.head("new-feature") == feature
    with pytest.raises(RepoError, match="not found"):
        watched.head("old-feature")


def test_a_mirror_is_reused_by_a_new_instance(repo: GitRepo, history: list[str], state: Path) -> None:
    first = WatchedRepo(f"file://{repo.path}", state)
    first.open()
    marker = first.mirror_path / "volt-marker"
    marker.write_text("kept")
    second = WatchedRepo(f"file://{repo.path}", state)
    assert second.mirror_path == first.mirror_path
    assert second.head("main") == history[-1]
    assert marker.read_text() == "kept"


def test_a_half_made_mirror_is_cleaned_up(repo: GitRepo, history: list[str], state: Path) -> None:
    watched = WatchedRepo(f"file://{repo.path}", state)
    leftover = watched.mirror_path.with_name(watched.mirror_path.name + ".tmp")
    leftover.mkdir(parents=True)
    (leftover / "junk").write_text("from a crash")
    assert watched.head("main") == history[-1]
    assert not leftover.exists()


def test_a_url_that_does_not_exist(tmp_path: Path, state: Path) -> None:
    watched = WatchedRepo(f"file://{tmp_path}/absent", state)
    with pytest.raises(RepoError, match="cannot fetch") as info:
        watched.open()
    assert "\n" not in str(info.value)
    assert not watched.mirror_path.exists()
    assert not watched.mirror_path.with_name(watched.mirror_path.name + ".tmp").exists()


def test_a_fetch_that_fails_is_a_repo_error(repo: GitRepo, history: list[str], state: Path, tmp_path: Path) -> None:
    watched = WatchedRepo(f"file://{repo.path}", state)
    watched.open()
    repo.path.rename(tmp_path / "gone")
    with pytest.raises(RepoError, match="cannot fetch") as info:
        watched.fetch()
    assert "\n" not in str(info.value)
    assert watched.head("main") == history[-1]  # what was fetched before is still there


def test_mirrors_of_different_urls_do_not_collide(
    repo: GitRepo, history: list[str], state: Path, tmp_path: Path
) -> None:
    other = tmp_path / "elsewhere" / "repo"
    subprocess.run(["git", "clone", "-q", str(repo.path), str(other)], check=True)
    one = WatchedRepo(f"file://{repo.path}", state)
    two = WatchedRepo(f"file://{other}", state)
    assert one.mirror_path != two.mirror_path
