"""Submodules: checked out at the recorded commits, from the runner's own git directories, only where allowed."""

from __future__ import annotations

import fnmatch
from collections.abc import Iterator
from pathlib import Path

import pytest
from support import GitRepo

from runner.execute import load_config
from runner.workspace import CheckoutError, Workspace, _resolve_url


@pytest.fixture
def ws(tmp_path: Path) -> Iterator[Workspace]:
    workspace = Workspace(tmp_path / "work")
    yield workspace
    workspace.close()


def add_submodule(superproject: GitRepo, url: str, path: str, commit: str) -> None:
    """Record `commit` of `url` at `path`, as `git submodule add` would, without cloning it."""
    superproject.git("update-index", "--add", "--cacheinfo", f"160000,{commit},{path}")
    gitmodules = superproject.path / ".gitmodules"
    old = gitmodules.read_text() if gitmodules.exists() else ""
    gitmodules.write_text(f'{old}[submodule "{path}"]\n\tpath = {path}\n\turl = {url}\n')
    superproject.git("add", ".gitmodules")


def commit(repo: GitRepo, files: dict[str, str], message: str = "change") -> str:
    """Commit what the index holds plus `files` (GitRepo.commit's `add -A` would drop the
    submodules, which have no folder in these repositories)."""
    for name, text in files.items():
        (repo.path / name).parent.mkdir(parents=True, exist_ok=True)
        (repo.path / name).write_text(text)
        repo.git("add", name)
    repo.git("commit", "-q", "--allow-empty", "-m", message)
    return repo.git("rev-parse", "HEAD")


@pytest.fixture
def repos(tmp_path: Path) -> tuple[GitRepo, GitRepo, GitRepo]:
    """A superproject `app` with `lib` at libs/lib (by a relative url), and `lib` with `inner` at deep/inner."""
    inner, lib, app = (GitRepo(tmp_path / name) for name in ("inner", "lib", "app"))
    inner.commit({"inner.py": "INNER = 1\n"})
    lib.commit({"lib.py": "LIB = 1\n"})
    add_submodule(lib, str(inner.path), "deep/inner", inner.git("rev-parse", "HEAD"))
    commit(lib, {"lib.py": "LIB = 2\n"}, "lib with inner")
    add_submodule(app, "../lib", "libs/lib", lib.git("rev-parse", "HEAD"))
    commit(app, {"app.py": "import lib\n"}, "app with lib")
    return app, lib, inner


def test_submodules_are_checked_out_at_the_recorded_commits_theirs_too(
    ws: Workspace, repos: tuple[GitRepo, GitRepo, GitRepo]
) -> None:
    app, lib, inner = repos
    recorded = lib.git("rev-parse", "HEAD")
    commit(lib, {"lib.py": "LIB = 3\n"}, "a later lib the superproject does not record")
    sha = app.git("rev-parse", "HEAD")
    tree = ws.checkout(str(app.path), sha)
    assert ws.submodules(str(app.path), sha, tree) == ["libs/lib", "libs/lib/deep/inner"]
    assert (tree / "libs/lib/lib.py").read_text() == "LIB = 2\n"  # the recorded commit, not lib's head
    assert (tree / "libs/lib/deep/inner/inner.py").read_text() == "INNER = 1\n"
    assert [p for p in tree.rglob(".git")] == []  # no git directory for the tests to write through
    assert recorded != lib.git("rev-parse", "HEAD")


def test_a_later_commit_moves_or_drops_its_submodules(ws: Workspace, repos: tuple[GitRepo, GitRepo, GitRepo]) -> None:
    app, lib, _ = repos
    repo = str(app.path)
    first = app.git("rev-parse", "HEAD")
    tree = ws.checkout(repo, first)
    ws.submodules(repo, first, tree)
    (tree / "libs/lib/leftover.txt").write_text("from the last job")
    newer = commit(lib, {"lib.py": "LIB = 4\n"}, "newer lib")
    app.git("update-index", "--cacheinfo", f"160000,{newer},libs/lib")
    moved = commit(app, {}, "move lib")
    tree = ws.checkout(repo, moved)
    ws.submodules(repo, moved, tree)
    assert (tree / "libs/lib/lib.py").read_text() == "LIB = 4\n"
    assert not (tree / "libs/lib/leftover.txt").exists()
    app.git("rm", "-q", "--cached", "libs/lib", ".gitmodules")
    dropped = commit(app, {}, "drop lib")
    tree = ws.checkout(repo, dropped)
    assert ws.submodules(repo, dropped, tree) == []
    assert not (tree / "libs").exists()


def test_without_submodules_their_folders_are_left_empty(
    ws: Workspace, repos: tuple[GitRepo, GitRepo, GitRepo]
) -> None:
    app, _, _ = repos
    repo, sha = str(app.path), app.git("rev-parse", "HEAD")
    tree = ws.checkout(repo, sha)
    ws.submodules(repo, sha, tree)
    tree = ws.checkout(repo, sha)  # the next job, which says [checkout] submodules = false
    assert (tree / "libs/lib/lib.py").exists()  # what the last job checked out is still there...
    assert ws.submodules(repo, sha, tree, check_out=False) == []
    assert (tree / "libs/lib").is_dir() and list((tree / "libs/lib").iterdir()) == []  # ...until now
    assert (tree / "app.py").exists()


def test_a_submodule_from_a_repository_the_runner_does_not_allow_is_refused(
    ws: Workspace, repos: tuple[GitRepo, GitRepo, GitRepo]
) -> None:
    app, lib, inner = repos
    sha = app.git("rev-parse", "HEAD")
    tree = ws.checkout(str(app.path), sha)
    allowed = [str(app.path), str(lib.path)]  # not inner

    def allow(repo: str) -> bool:
        return any(fnmatch.fnmatchcase(repo, p) for p in allowed)

    with pytest.raises(
        CheckoutError, match=f"submodule libs/lib/deep/inner: repository not allowed on this runner: {inner.path}"
    ):
        ws.submodules(str(app.path), sha, tree, allowed=allow)


def test_a_submodule_with_no_url_or_a_commit_its_repository_lacks_is_named(ws: Workspace, tmp_path: Path) -> None:
    app, lib = GitRepo(tmp_path / "app2"), GitRepo(tmp_path / "lib2")
    commit(lib, {"lib.py": ""})
    app.git("update-index", "--add", "--cacheinfo", f"160000,{'1' * 40},vendor/x")
    add_submodule(app, str(lib.path), "vendor/lib", "2" * 40)
    sha = commit(app, {}, "broken submodules")
    tree = ws.checkout(str(app.path), sha)
    with pytest.raises(CheckoutError, match=r"submodule vendor/lib: commit 2{40} not found|submodule vendor/x: no url"):
        ws.submodules(str(app.path), sha, tree)


def test_nothing_of_gitmodules_runs_a_program(ws: Workspace, tmp_path: Path) -> None:
    """git submodule would obey `update = !cmd` in a config, and an ext:: url runs a command; the runner uses neither."""
    sentinel = tmp_path / "pwned"
    app, lib = GitRepo(tmp_path / "app3"), GitRepo(tmp_path / "lib3")
    lib_sha = commit(lib, {"lib.py": ""})
    add_submodule(app, str(lib.path), "alib", lib_sha)  # before "evil", in the order git lists them
    (app.path / ".gitmodules").write_text(
        (app.path / ".gitmodules").read_text() + f"\tupdate = !touch {sentinel}\n"
        f'[submodule "evil"]\n\tpath = evil\n\turl = ext::sh -c touch% {sentinel}\n'
    )
    app.git("update-index", "--add", "--cacheinfo", f"160000,{lib_sha},evil")
    app.git("add", ".gitmodules")
    sha = commit(app, {}, "hostile gitmodules")
    tree = ws.checkout(str(app.path), sha)
    with pytest.raises(CheckoutError, match="submodule evil"):
        ws.submodules(str(app.path), sha, tree)
    assert not sentinel.exists()
    assert (tree / "alib" / "lib.py").exists()  # the plain one was checked out as usual


@pytest.mark.parametrize(
    ("base", "url", "resolved"),
    [
        ("/srv/git/app", "../lib", "/srv/git/lib"),
        ("/srv/git/app", "./sub", "/srv/git/app/sub"),
        ("https://git.example.com/org/app.git", "../lib.git", "https://git.example.com/org/lib.git"),
        ("https://git.example.com/org/app.git", "../../other/lib.git", "https://git.example.com/other/lib.git"),
        ("git@git.example.com:org/app.git", "../lib.git", "git@git.example.com:org/lib.git"),
        ("git@git.example.com:app.git", "../lib.git", "git@git.example.com:lib.git"),
        ("/srv/git/app", "https://elsewhere.example.com/lib.git", "https://elsewhere.example.com/lib.git"),
    ],
)
def test_relative_urls_are_taken_from_the_superprojects_as_git_does(base: str, url: str, resolved: str) -> None:
    assert _resolve_url(base, url) == resolved


def test_a_relative_url_above_the_host_is_an_error() -> None:
    with pytest.raises(ValueError, match="goes above"):
        _resolve_url("https://git.example.com/app.git", "../../lib.git")


def test_checkout_submodules_false_is_read_from_volt_toml(tmp_path: Path) -> None:
    assert load_config(tmp_path, tmp_path / "j.xml", 60).submodules
    (tmp_path / ".volt.toml").write_text("[checkout]\nsubmodules = false\n")
    assert not load_config(tmp_path, tmp_path / "j.xml", 60).submodules
