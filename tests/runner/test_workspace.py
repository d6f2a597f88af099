"""Checkouts from real git repositories made in tmp_path, hostile caches included."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from support import GitRepo

from runner.workspace import CheckoutError, Workspace


def git(path: Path, *args: str) -> str:
    out = subprocess.run(["git", *args], cwd=path, check=True, capture_output=True, text=True)
    return out.stdout.strip()


def cache_git(ws: Workspace, repo: str, *args: str) -> str:
    """Plain git on the runner's git directory and tree for `repo`."""
    tree = ws.tree_for(repo)
    return git(tree, f"--git-dir={ws.git_dir_for(repo)}", f"--work-tree={tree}", *args)


def status(ws: Workspace, repo: str) -> str:
    """Everything git sees as changed, untracked or ignored; empty when the tree is clean."""
    return cache_git(ws, repo, "status", "--porcelain", "--ignored", "--untracked-files=all")


def head(ws: Workspace, repo: str) -> str:
    return cache_git(ws, repo, "rev-parse", "HEAD")


def git_entries(tree: Path) -> list[Path]:
    return [p for p in tree.rglob("*") if p.name == ".git"]


@pytest.fixture
def ws(tmp_path: Path) -> Iterator[Workspace]:
    workspace = Workspace(tmp_path / "work")
    yield workspace
    workspace.close()


@pytest.fixture
def source(repo: GitRepo) -> GitRepo:
    """`repo` (tests/conftest.py) with one commit on main."""
    repo.commit({"app.py": "print('v1')\n", ".gitignore": "*.pyc\nbuild/\n", "pkg/mod.py": "X = 1\n"}, "one")
    return repo


def test_checkout_gives_the_tree_at_the_commit_with_no_git_inside(ws: Workspace, source: GitRepo) -> None:
    repo = str(source.path)
    first = source.git("rev-parse", "HEAD")
    second = source.commit({"app.py": "print('v2')\n", "new.txt": "new\n"}, "two")
    tree = ws.checkout(repo, first)
    assert tree == ws.tree_for(repo)
    assert not ws.git_dir_for(repo).is_relative_to(tree)
    assert git_entries(tree) == []
    assert head(ws, repo) == first
    assert (tree / "app.py").read_text() == "print('v1')\n"
    assert not (tree / "new.txt").exists()
    assert status(ws, repo) == ""
    assert ws.checkout(repo, second) == tree
    assert head(ws, repo) == second
    assert (tree / "new.txt").read_text() == "new\n"
    # The tree's own git finds no repository (the tmp_path above it is none).
    found = subprocess.run(["git", "rev-parse", "--git-dir"], cwd=tree, capture_output=True, text=True)
    assert found.returncode != 0, found.stdout


def test_what_a_previous_job_left_behind_is_gone(ws: Workspace, source: GitRepo) -> None:
    repo = str(source.path)
    commit = source.git("rev-parse", "HEAD")
    tree = ws.checkout(repo, commit)
    (tree / "app.py").write_text("tampered\n")
    (tree / "pkg" / "mod.py").unlink()
    (tree / "untracked.txt").write_text("x")
    (tree / "cache.pyc").write_bytes(b"\0")  # ignored files go too
    (tree / "build" / "deep").mkdir(parents=True)
    (tree / "build" / "deep" / "out.o").write_bytes(b"\0")
    (tree / "scratch" / "nested").mkdir(parents=True)
    (tree / "scratch" / "nested" / "f").write_text("x")
    # git clean never touches a `.git`: a later job's own git would obey these.
    subprocess.run(["git", "init", "-q", str(tree)], check=True)
    (tree / "pkg" / ".git").write_text(f"gitdir: {tree / '.git'}\n")
    os.mkfifo(tree / "pkg" / "pipe")
    assert status(ws, repo) != ""

    assert ws.checkout(repo, commit) == tree
    assert status(ws, repo) == ""
    assert (tree / "app.py").read_text() == "print('v1')\n"
    assert (tree / "pkg" / "mod.py").read_text() == "X = 1\n"
    for leftover in ("untracked.txt", "cache.pyc", "build", "scratch", ".git", "pkg/.git", "pkg/pipe"):
        assert not os.path.lexists(tree / leftover), leftover
    assert head(ws, repo) == commit


def test_a_second_checkout_reuses_the_git_directory(ws: Workspace, source: GitRepo) -> None:
    repo = str(source.path)
    commit = source.git("rev-parse", "HEAD")
    ws.checkout(repo, commit)
    git_dir = ws.git_dir_for(repo)
    inode = git_dir.stat().st_ino
    (git_dir / "volt-marker").write_text("same cache")
    ws.checkout(repo, commit)
    assert git_dir.stat().st_ino == inode
    assert (git_dir / "volt-marker").read_text() == "same cache"


def test_a_commit_it_already_has_needs_no_fetch(ws: Workspace, source: GitRepo, tmp_path: Path) -> None:
    url = f"file://{source.path}"  # a URL: fetched from, like a remote repository
    old = source.git("rev-parse", "HEAD")
    new = source.commit({"app.py": "print('v2')\n"})
    tree = ws.checkout(url, new)
    source.path.rename(tmp_path / "moved-away")  # any fetch would now fail
    assert ws.checkout(url, old) == tree
    assert head(ws, url) == old
    assert (tree / "app.py").read_text() == "print('v1')\n"


def test_a_repository_on_this_machine_is_read_in_place(ws: Workspace, source: GitRepo) -> None:
    repo = str(source.path)
    ws.checkout(repo, source.git("rev-parse", "HEAD"))
    git_dir = ws.git_dir_for(repo)
    alternates = (git_dir / "objects" / "info" / "alternates").read_text().strip()
    assert alternates == str(source.path / ".git" / "objects")
    later = source.commit({"app.py": "print('later')\n"}, "later")
    assert (ws.checkout(repo, later) / "app.py").read_text() == "print('later')\n"
    # Nothing was fetched: the cache holds no object and no ref of its own.
    own_objects = [p for p in (git_dir / "objects").rglob("*") if p.is_file() and p.parent.name != "info"]
    assert own_objects == []
    assert cache_git(ws, repo, "for-each-ref") == ""


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


@pytest.mark.parametrize("as_url", [False, True], ids=["path", "url"])
def test_a_sha256_repository(ws: Workspace, tmp_path: Path, as_url: bool) -> None:
    source = tmp_path / "sha256"
    subprocess.run(["git", "init", "-q", "--object-format=sha256", "-b", "main", str(source)], check=True)
    (source / "app.py").write_text("print('sha256')\n")
    git(source, "add", "-A")
    git(source, "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "one")
    commit = git(source, "rev-parse", "HEAD")
    assert len(commit) == 64
    repo = f"file://{source}" if as_url else str(source)
    assert (ws.checkout(repo, commit) / "app.py").read_text() == "print('sha256')\n"
    assert head(ws, repo) == commit


@pytest.mark.parametrize("as_url", [False, True], ids=["path", "url"])
def test_a_commit_that_exists_nowhere(ws: Workspace, source: GitRepo, as_url: bool) -> None:
    repo = f"file://{source.path}" if as_url else str(source.path)
    missing = "0123456789abcdef0123456789abcdef01234567"
    with pytest.raises(CheckoutError) as info:
        ws.checkout(repo, missing)
    assert missing in str(info.value)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("as_url", [False, True], ids=["path", "url"])
def test_a_repository_that_does_not_exist(ws: Workspace, tmp_path: Path, as_url: bool) -> None:
    absent = f"file://{tmp_path}/no-such-repo" if as_url else str(tmp_path / "no-such-repo")
    with pytest.raises(CheckoutError) as info:
        ws.checkout(absent, "a" * 40)
    message = str(info.value)
    assert "\n" not in message
    assert absent in message
    assert len(message) < 400
    assert list((tmp_path / "work" / "repos").iterdir()) == []  # no half-made cache left


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


def test_different_repositories_get_different_trees(ws: Workspace, source: GitRepo, tmp_path: Path) -> None:
    other = tmp_path / "other" / "repo"  # same last path component as the source
    shutil.copytree(source.path, other)
    commit = source.git("rev-parse", "HEAD")
    assert ws.checkout(str(source.path), commit) != ws.checkout(str(other), commit)
    assert ws.git_dir_for(str(source.path)) != ws.git_dir_for(str(other))


# --- What a repository or a test may plant: nothing of it runs, the tree is right.


@pytest.fixture
def markers(tmp_path: Path) -> Path:
    """A folder outside every tree; a planted program that runs leaves a file here."""
    path = tmp_path / "markers"
    path.mkdir()
    return path


def ran(markers: Path) -> list[str]:
    return sorted(p.name for p in markers.iterdir())


def plant_config(git_dir: Path, text: str) -> None:
    with open(git_dir / "config", "a") as config:
        config.write(text)


def hook_script(path: Path, marker: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(f"#!/bin/sh\ntouch {marker}\n")
    path.chmod(0o755)


def _smudge_filter(git_dir: Path, markers: Path) -> None:
    plant_config(
        git_dir,
        f'[filter "x"]\n\tsmudge = "touch {markers}/smudge; cat"\n\tclean = "touch {markers}/clean; cat"\n'
        "\trequired = true\n",
    )


def _process_filter(git_dir: Path, markers: Path) -> None:
    plant_config(git_dir, f'[filter "x"]\n\tprocess = "touch {markers}/process"\n\trequired = true\n')


def _fsmonitor(git_dir: Path, markers: Path) -> None:
    hook_script(markers.parent / "fsmonitor.sh", markers / "fsmonitor")
    plant_config(git_dir, f"[core]\n\tfsmonitor = {markers.parent / 'fsmonitor.sh'}\n")


def _worktree_outside(git_dir: Path, markers: Path) -> None:
    plant_config(git_dir, f"[core]\n\tworktree = {markers}\n\tbare = false\n")


def _hook_in_git_dir(git_dir: Path, markers: Path) -> None:
    for name in ("post-checkout", "reference-transaction", "post-index-change"):
        hook_script(git_dir / "hooks" / name, markers / name)


def _hooks_path(git_dir: Path, markers: Path) -> None:
    hook_script(markers.parent / "hooks" / "post-checkout", markers / "hooks-path")
    plant_config(git_dir, f"[core]\n\thooksPath = {markers.parent / 'hooks'}\n")


def _include_path(git_dir: Path, markers: Path) -> None:
    hook_script(markers.parent / "fsmonitor.sh", markers / "included")
    included = markers.parent / "included.config"
    included.write_text(f'[core]\n\tfsmonitor = {markers.parent / "fsmonitor.sh"}\n[filter "x"]\n\tprocess = false\n')
    plant_config(git_dir, f'[include]\n\tpath = {included}\n[includeIf "gitdir:/"]\n\tpath = {included}\n')


def _commondir(git_dir: Path, markers: Path) -> None:
    # A git directory that sends git to another one, whose config runs a filter.
    other = markers.parent / "other.git"
    subprocess.run(["git", "init", "-q", "--bare", str(other)], check=True)
    (other / "config").write_text(f'[core]\n\tbare = false\n[filter "x"]\n\tsmudge = "touch {markers}/commondir"\n')
    (git_dir / "commondir").write_text(f"{other}\n")


def _attributes_in_git_dir(git_dir: Path, markers: Path) -> None:
    (git_dir / "info").mkdir(exist_ok=True)
    (git_dir / "info" / "attributes").write_text("* filter=y\n")
    plant_config(git_dir, f'[filter "y"]\n\tsmudge = "touch {markers}/attributes"\n')


PLANTS: list[Callable[[Path, Path], None]] = [
    _smudge_filter,
    _process_filter,
    _fsmonitor,
    _worktree_outside,
    _hook_in_git_dir,
    _hooks_path,
    _include_path,
    _commondir,
    _attributes_in_git_dir,
]


@pytest.mark.parametrize("as_url", [False, True], ids=["path", "url"])
@pytest.mark.parametrize("plant", PLANTS, ids=lambda f: f.__name__.strip("_"))
def test_what_is_planted_in_the_cache_runs_nothing(
    ws: Workspace, source: GitRepo, markers: Path, tmp_path: Path, plant: Callable[[Path, Path], None], as_url: bool
) -> None:
    repo = f"file://{source.path}" if as_url else str(source.path)
    # The repository's own .gitattributes names the filter the planted config defines.
    source.commit({".gitattributes": "* filter=x\n", "data.txt": "raw\n"}, "attributes")
    ws.checkout(repo, source.git("rev-parse", "HEAD"))
    plant(ws.git_dir_for(repo), markers)
    later = source.commit({"data.txt": "raw, later\n", "pkg/mod.py": "X = 2\n"}, "later")
    tree = ws.checkout(repo, later)
    assert ran(markers) == []
    assert (tree / "data.txt").read_text() == "raw, later\n"
    assert (tree / "pkg" / "mod.py").read_text() == "X = 2\n"
    assert head(ws, repo) == later
    assert status(ws, repo) == ""
    config = ws.git_dir_for(repo) / "config"
    assert not config.is_symlink()
    assert "filter" not in config.read_text() and "include" not in config.read_text()


def test_a_config_replaced_by_a_link_is_replaced_not_written_through(
    ws: Workspace, source: GitRepo, tmp_path: Path
) -> None:
    repo = str(source.path)
    ws.checkout(repo, source.git("rev-parse", "HEAD"))
    config = ws.git_dir_for(repo) / "config"
    target = tmp_path / "somebody-elses-file"
    target.write_text("# not the runner's\n")
    config.unlink()
    config.symlink_to(target)
    ws.checkout(repo, source.commit({"app.py": "print('v2')\n"}))
    assert target.read_text() == "# not the runner's\n"
    assert not config.is_symlink()
    assert "hooksPath = /dev/null" in config.read_text()


def test_alternates_planted_in_a_fetched_cache_are_dropped(ws: Workspace, source: GitRepo, tmp_path: Path) -> None:
    url = f"file://{source.path}"
    ws.checkout(url, source.git("rev-parse", "HEAD"))
    elsewhere = tmp_path / "elsewhere"
    shutil.copytree(source.path, elsewhere)
    unknown = GitRepo(elsewhere).commit({"only-there.txt": "x\n"}, "only in the planted object store")
    alternates = ws.git_dir_for(url) / "objects" / "info" / "alternates"
    alternates.write_text(f"{elsewhere / '.git' / 'objects'}\n")
    # The planted store would hand over a commit the repository never had.
    with pytest.raises(CheckoutError, match="not found"):
        ws.checkout(url, unknown)
    assert not alternates.exists()


def test_the_runner_users_git_config_and_git_variables_are_ignored(
    ws: Workspace, source: GitRepo, markers: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    source.commit({".gitattributes": "* filter=x\n", "data.txt": "raw\n"}, "attributes")
    later = source.commit({"data.txt": "raw 2\n"})
    home = tmp_path / "home"
    hook_script(home / "fsmonitor.sh", markers / "global-fsmonitor")
    (home / ".config" / "git").mkdir(parents=True)
    for config in (home / ".gitconfig", home / ".config" / "git" / "config"):
        config.write_text(
            f'[core]\n\tfsmonitor = {home / "fsmonitor.sh"}\n[filter "x"]\n\tsmudge = "touch {markers}/global"\n'
        )
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.setenv("XDG_CONFIG_HOME", str(home / ".config"))
    decoy = tmp_path / "decoy"
    decoy.mkdir()
    for name in ("GIT_DIR", "GIT_WORK_TREE", "GIT_INDEX_FILE", "GIT_OBJECT_DIRECTORY"):
        monkeypatch.setenv(name, str(decoy / name))
    monkeypatch.setenv("GIT_CONFIG_COUNT", "1")
    monkeypatch.setenv("GIT_CONFIG_KEY_0", "core.fsmonitor")
    monkeypatch.setenv("GIT_CONFIG_VALUE_0", str(home / "fsmonitor.sh"))
    for repo in (str(source.path), f"file://{source.path}"):
        assert (ws.checkout(repo, later) / "data.txt").read_text() == "raw 2\n"
    assert ran(markers) == []
    assert list(decoy.iterdir()) == []


def test_git_env_reaches_every_git_call_of_its_repository(source: GitRepo, tmp_path: Path) -> None:
    asked: list[str] = []
    trace = tmp_path / "trace"

    def git_env(repo: str) -> dict[str, str]:
        asked.append(repo)
        return {"GIT_TRACE": str(trace)}

    url = f"file://{source.path}"
    ws = Workspace(tmp_path / "work", git_env=git_env)
    try:
        ws.checkout(url, source.git("rev-parse", "HEAD"))
    finally:
        ws.close()
    assert set(asked) == {url}
    traced = trace.read_text()
    for command in ("init", "fetch", "checkout", "clean"):
        assert f"built-in: git {command} " in traced, command


# --- Time limits and cancellation: a git that hangs ends the checkout with the reason.


class SilentServer:
    """Accepts TCP connections on 127.0.0.1 and never answers; notes when a client goes."""

    def __init__(self) -> None:
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen()
        self.port = self.sock.getsockname()[1]
        self.accepted = threading.Event()
        self.client_gone = threading.Event()
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        conn, _ = self.sock.accept()
        self.accepted.set()
        while conn.recv(4096):  # the client's request; then it waits for an answer forever
            pass
        self.client_gone.set()  # EOF: the git that held the connection is dead
        conn.close()

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def silent() -> Iterator[SilentServer]:
    server = SilentServer()
    yield server
    server.close()


def test_a_hung_git_is_stopped_at_the_time_limit(silent: SilentServer, tmp_path: Path) -> None:
    url = f"git://127.0.0.1:{silent.port}/app.git"
    ws = Workspace(tmp_path / "work", git_timeout=1.0)
    began = time.monotonic()
    with pytest.raises(CheckoutError) as info:
        ws.checkout(url, "a" * 40)
    took = time.monotonic() - began
    assert silent.accepted.is_set()
    assert "did not finish within 1s" in str(info.value)
    assert url in str(info.value) and "\n" not in str(info.value)
    assert 1.0 <= took < 4.0
    assert silent.client_gone.wait(5)
    assert list((tmp_path / "work" / "repos").iterdir()) == []


def test_a_cancelled_checkout_stops_its_git_at_once(silent: SilentServer, tmp_path: Path) -> None:
    url = f"git://127.0.0.1:{silent.port}/app.git"
    ws = Workspace(tmp_path / "work")  # the default time limit: only the cancel can end it
    cancel = threading.Event()
    errors: list[CheckoutError] = []

    def checkout() -> None:
        try:
            ws.checkout(url, "a" * 40, cancel=cancel)
        except CheckoutError as exc:
            errors.append(exc)

    worker = threading.Thread(target=checkout)
    worker.start()
    assert silent.accepted.wait(10)
    cancelled_at = time.monotonic()
    cancel.set()
    worker.join(5)
    assert not worker.is_alive()
    assert time.monotonic() - cancelled_at < 1.0
    assert len(errors) == 1 and "cancelled" in str(errors[0])
    assert silent.client_gone.wait(5)


# --- A cache or tree broken by accident (a killed git, a full disk) or on purpose.


def _delete_git_dir(ws: Workspace, repo: str) -> None:
    shutil.rmtree(ws.git_dir_for(repo))


def _garbage_head(ws: Workspace, repo: str) -> None:
    (ws.git_dir_for(repo) / "HEAD").write_text("garbage\n")


def _garbage_config(ws: Workspace, repo: str) -> None:
    (ws.git_dir_for(repo) / "config").write_text("[[[ not a config\n")


def _no_alternates(ws: Workspace, repo: str) -> None:
    (ws.git_dir_for(repo) / "objects" / "info" / "alternates").unlink()


def _no_objects(ws: Workspace, repo: str) -> None:
    shutil.rmtree(ws.git_dir_for(repo) / "objects")
    (ws.git_dir_for(repo) / "objects").mkdir()


def _stale_index_lock(ws: Workspace, repo: str) -> None:
    (ws.git_dir_for(repo) / "index.lock").write_text("")  # a git killed in the middle of a command


def _garbage_index(ws: Workspace, repo: str) -> None:
    (ws.git_dir_for(repo) / "index").write_bytes(b"junk")


def _delete_tree(ws: Workspace, repo: str) -> None:
    shutil.rmtree(ws.tree_for(repo))


def _empty_tree(ws: Workspace, repo: str) -> None:
    shutil.rmtree(ws.tree_for(repo))
    ws.tree_for(repo).mkdir()


def _tree_is_a_file(ws: Workspace, repo: str) -> None:
    shutil.rmtree(ws.tree_for(repo))
    ws.tree_for(repo).write_text("not a folder\n")


def _locked_folders(ws: Workspace, repo: str) -> None:
    tree = ws.tree_for(repo)
    (tree / "junk" / "deeper").mkdir(parents=True)
    (tree / "junk" / "deeper" / "f").write_text("x")
    (tree / "junk" / "deeper").chmod(0)
    (tree / "junk").chmod(0o500)
    (tree / "pkg").chmod(0o500)


CORRUPTIONS: list[Callable[[Workspace, str], None]] = [
    _delete_git_dir,
    _garbage_head,
    _garbage_config,
    _no_alternates,
    _no_objects,
    _stale_index_lock,
    _garbage_index,
    _delete_tree,
    _empty_tree,
    _tree_is_a_file,
    _locked_folders,
]


@pytest.mark.parametrize("corrupt", CORRUPTIONS, ids=lambda f: f.__name__.strip("_"))
def test_a_broken_cache_is_repaired(ws: Workspace, source: GitRepo, corrupt: Callable[[Workspace, str], None]) -> None:
    repo = str(source.path)
    tree = ws.checkout(repo, source.git("rev-parse", "HEAD"))
    corrupt(ws, repo)
    later = source.commit({"app.py": "print('after the damage')\n"})
    assert ws.checkout(repo, later) == tree
    assert head(ws, repo) == later
    assert (tree / "app.py").read_text() == "print('after the damage')\n"
    assert status(ws, repo) == ""
    assert git_entries(tree) == []


def test_a_tree_replaced_by_a_link_is_not_followed(ws: Workspace, source: GitRepo, tmp_path: Path) -> None:
    repo = str(source.path)
    tree = ws.checkout(repo, source.git("rev-parse", "HEAD"))
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "precious.txt").write_text("keep me\n")
    shutil.rmtree(tree)
    tree.symlink_to(elsewhere)
    ws.checkout(repo, source.commit({"app.py": "print('v2')\n"}))
    assert sorted(p.name for p in elsewhere.iterdir()) == ["precious.txt"]
    assert not tree.is_symlink()
    assert (tree / "app.py").read_text() == "print('v2')\n"
