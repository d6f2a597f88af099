"""Checkouts from real git repositories made in tmp_path."""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest
from support import GitRepo

from runner.workspace import CheckoutError, Workspace


def git(path: Path, *args: str) -> str:
    out = subprocess.run(["git", *args], cwd=path, check=True, capture_output=True, text=True)
    return out.stdout.strip()


def status(tree: Path) -> str:
    """Everything git sees as changed, untracked or ignored; empty when the tree is clean."""
    return git(tree, "status", "--porcelain", "--ignored", "--untracked-files=all")


@pytest.fixture
def ws(tmp_path: Path) -> Workspace:
    return Workspace(tmp_path / "work")


@pytest.fixture
def source(repo: GitRepo) -> GitRepo:
    """`repo` (tests/conftest.py) with one commit on main."""
    repo.commit({"app.py": "print('v1')\n", ".gitignore": "*.pyc\nbuild/\n", "pkg/mod.py": "X = 1\n"}, "one")
    return repo


def test_checkout_gives_the_tree_at_the_commit(ws: Workspace, source: GitRepo) -> None:
    first = source.git("rev-parse", "HEAD")
    second = source.commit({"app.py": "print('v2')\n", "new.txt": "new\n"}, "two")
    tree = ws.checkout(str(source.path), first)
    assert tree == ws.path_for(str(source.path))
    assert git(tree, "rev-parse", "HEAD") == first
    assert (tree / "app.py").read_text() == "print('v1')\n"
    assert not (tree / "new.txt").exists()
    assert status(tree) == ""
    assert ws.checkout(str(source.path), second) == tree
    assert git(tree, "rev-parse", "HEAD") == second
    assert (tree / "new.txt").read_text() == "new\n"


def test_what_a_previous_job_left_behind_is_gone(ws: Workspace, source: GitRepo) -> None:
    commit = source.git("rev-parse", "HEAD")
    tree = ws.checkout(str(source.path), commit)
    (tree / "app.py").write_text("tampered\n")
    (tree / "pkg" / "mod.py").unlink()
    (tree / "untracked.txt").write_text("x")
    (tree / "cache.pyc").write_bytes(b"\0")  # ignored files go too
    (tree / "build" / "deep").mkdir(parents=True)
    (tree / "build" / "deep" / "out.o").write_bytes(b"\0")
    (tree / "scratch" / "nested").mkdir(parents=True)
    (tree / "scratch" / "nested" / "f").write_text("x")
    git(tree, "-c", "user.name=t", "-c", "user.email=t@t", "checkout", "-q", "-b", "local-branch")
    assert status(tree) != ""

    assert ws.checkout(str(source.path), commit) == tree
    assert status(tree) == ""
    assert (tree / "app.py").read_text() == "print('v1')\n"
    assert (tree / "pkg" / "mod.py").read_text() == "X = 1\n"
    for leftover in ("untracked.txt", "cache.pyc", "build", "scratch"):
        assert not (tree / leftover).exists(), leftover
    assert git(tree, "rev-parse", "HEAD") == commit


def test_a_second_checkout_reuses_the_clone(ws: Workspace, source: GitRepo) -> None:
    commit = source.git("rev-parse", "HEAD")
    tree = ws.checkout(str(source.path), commit)
    inode = (tree / ".git").stat().st_ino
    (tree / ".git" / "volt-marker").write_text("same clone")
    ws.checkout(str(source.path), commit)
    assert (tree / ".git").stat().st_ino == inode
    assert (tree / ".git" / "volt-marker").read_text() == "same clone"


def test_a_commit_it_already_has_needs_no_fetch(ws: Workspace, source: GitRepo, tmp_path: Path) -> None:
    url = f"file://{source.path}"  # a URL: cloned by copy, like a remote repository
    old = source.git("rev-parse", "HEAD")
    new = source.commit({"app.py": "print('v2')\n"})
    tree = ws.checkout(url, new)
    source.path.rename(tmp_path / "moved-away")  # any fetch would now fail
    assert ws.checkout(url, old) == tree
    assert git(tree, "rev-parse", "HEAD") == old


def test_a_repository_on_this_machine_is_shared_not_fetched(ws: Workspace, source: GitRepo) -> None:
    tree = ws.checkout(str(source.path), source.git("rev-parse", "HEAD"))
    assert (tree / ".git" / "objects" / "info" / "alternates").read_text().strip() == str(
        source.path / ".git" / "objects"
    )
    git(tree, "remote", "set-url", "origin", "/nonexistent")  # any fetch would now fail
    later = source.commit({"app.py": "print('later')\n"}, "later")
    assert ws.checkout(str(source.path), later) == tree
    assert (tree / "app.py").read_text() == "print('later')\n"


@pytest.mark.parametrize("as_url", [False, True], ids=["path", "url"])
def test_a_commit_pushed_later_is_checked_out(ws: Workspace, source: GitRepo, as_url: bool) -> None:
    repo = f"file://{source.path}" if as_url else str(source.path)  # a URL is fetched from
    tree = ws.checkout(repo, source.git("rev-parse", "HEAD"))
    later = source.commit({"app.py": "print('later')\n"}, "later")
    assert ws.checkout(repo, later) == tree
    assert (tree / "app.py").read_text() == "print('later')\n"
    source.git("checkout", "-q", "-b", "feature")
    on_branch = source.commit({"feature.txt": "f\n"}, "on a new branch")
    source.git("checkout", "-q", "main")
    ws.checkout(repo, on_branch)
    assert (tree / "feature.txt").read_text() == "f\n"


def test_a_commit_that_exists_nowhere(ws: Workspace, source: GitRepo) -> None:
    missing = "0123456789abcdef0123456789abcdef01234567"
    with pytest.raises(CheckoutError) as info:
        ws.checkout(str(source.path), missing)
    assert missing in str(info.value)
    assert "\n" not in str(info.value)


def test_a_repository_that_does_not_exist(ws: Workspace, tmp_path: Path) -> None:
    absent = str(tmp_path / "no-such-repo")
    with pytest.raises(CheckoutError) as info:
        ws.checkout(absent, "a" * 40)
    message = str(info.value)
    assert "\n" not in message
    assert absent in message
    assert len(message) < 400
    assert list((tmp_path / "work" / "repos").iterdir()) == []  # no half-made clone left


@pytest.mark.parametrize("name", ["-uhelp", "--upload-pack=touch pwned", "--config=core.sshCommand=touch pwned"])
def test_a_repository_name_that_looks_like_an_option_is_refused(ws: Workspace, tmp_path: Path, name: str) -> None:
    with pytest.raises(CheckoutError, match="looks like an option"):
        ws.checkout(name, "a" * 40)
    assert not (tmp_path / "pwned").exists()
    assert list((tmp_path / "work" / "repos").iterdir()) == []


@pytest.mark.parametrize("commit", ["HEAD", "main", "--help", "$(touch pwned)", "a" * 39, "A" * 40, "a" * 40 + "\n"])
def test_only_full_commit_ids_reach_git(ws: Workspace, source: GitRepo, commit: str) -> None:
    with pytest.raises(CheckoutError, match="not a commit id"):
        ws.checkout(str(source.path), commit)


def test_different_repositories_get_different_clones(ws: Workspace, source: GitRepo, tmp_path: Path) -> None:
    other = tmp_path / "other" / "repo"  # same last path component as the source
    shutil.copytree(source.path, other)
    commit = source.git("rev-parse", "HEAD")
    assert ws.checkout(str(source.path), commit) != ws.checkout(str(other), commit)


def _delete_git(tree: Path) -> None:
    shutil.rmtree(tree / ".git")


def _git_is_a_file(tree: Path) -> None:
    shutil.rmtree(tree / ".git")
    (tree / ".git").write_text("gitdir: /nonexistent\n")


def _garbage_head(tree: Path) -> None:
    (tree / ".git" / "HEAD").write_text("garbage\n")


def _garbage_config(tree: Path) -> None:
    (tree / ".git" / "config").write_text("[[[ not a config\n")


def _no_objects(tree: Path) -> None:
    shutil.rmtree(tree / ".git" / "objects")
    (tree / ".git" / "objects").mkdir()


def _stale_index_lock(tree: Path) -> None:
    (tree / ".git" / "index.lock").write_text("")  # a git killed in the middle of a command


def _remote_points_nowhere(tree: Path) -> None:
    git(tree, "remote", "set-url", "origin", "/nonexistent/repo")


def _delete_everything(tree: Path) -> None:
    shutil.rmtree(tree)


def _empty_directory(tree: Path) -> None:
    shutil.rmtree(tree)
    tree.mkdir()


CORRUPTIONS: list[Callable[[Path], None]] = [
    _delete_git,
    _git_is_a_file,
    _garbage_head,
    _garbage_config,
    _no_objects,
    _stale_index_lock,
    _remote_points_nowhere,
    _delete_everything,
    _empty_directory,
]


@pytest.mark.parametrize("corrupt", CORRUPTIONS, ids=lambda f: f.__name__.strip("_"))
def test_a_broken_cache_is_repaired(ws: Workspace, source: GitRepo, corrupt: Callable[[Path], None]) -> None:
    tree = ws.checkout(str(source.path), source.git("rev-parse", "HEAD"))
    # A test suite wrecks its own checkout; the next job needs a commit the cache lacks.
    corrupt(tree)
    later = source.commit({"app.py": "print('after the damage')\n"})
    assert ws.checkout(str(source.path), later) == tree
    assert git(tree, "rev-parse", "HEAD") == later
    assert (tree / "app.py").read_text() == "print('after the damage')\n"
    assert status(tree) == ""
