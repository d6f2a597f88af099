"""Job environments: what goes in, the cache key, and real builds with uv from local wheels (no index)."""

from __future__ import annotations

import contextlib
import importlib.metadata
import os
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from envsupport import BACKEND, dependency_wheels, project

from common.voltfile import EnvSpec, env_of, tables
from runner import environments, pythons, sandbox
from runner.environments import Environments, Stopped, for_job
from runner.envplan import EnvError, plan
from runner.execute import LogCollector, runner_free_path
from runner.execute import test_env as child_env

OWN = pythons.own_interpreter()
PYTHONS = {OWN.version: OWN}


def write(tree: Path, files: dict[str, str | None]) -> Path:
    for name, text in files.items():
        path = tree / name
        if text is None:
            path.unlink(missing_ok=True)
            continue
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return tree


def spec(text: str) -> EnvSpec:
    return env_of(tables(text))


@pytest.fixture
def offline(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """uv takes packages from a local wheelhouse only, as an operator's UV_* settings would say."""
    wheels = dependency_wheels(tmp_path / "wheels")
    monkeypatch.setenv("UV_FIND_LINKS", str(wheels))
    monkeypatch.setenv("UV_OFFLINE", "1")
    return wheels


@pytest.fixture
def work(tmp_path: Path) -> Path:
    """A runner workdir with one repository's tree."""
    (tmp_path / "work" / "trees" / "app").mkdir(parents=True)
    (tmp_path / "work" / "outbox").mkdir()
    return tmp_path / "work"


@pytest.fixture
def tree(work: Path) -> Path:
    return work / "trees" / "app"


class Job:
    """One job's use of the cache, as the runner makes it (boxed builds by default)."""

    def __init__(self, work: Path, tree: Path, size: int = 10, timeout: float = 300.0, boxed: bool = True) -> None:
        self.work, self.tree, self.boxed = work, tree, boxed
        self.cache = Environments(work / "envs", size=size, timeout=timeout)
        (work / "home").mkdir(exist_ok=True)

    def box(self, argv: list[str], env: dict[str, str], writable: list[Path], shown: list[Path]) -> list[str]:
        return sandbox.wrap(argv, self.tree, env, workdir=self.work, expose=shown, writable=writable, network=True)

    @contextlib.contextmanager
    def env(
        self,
        env_spec: EnvSpec | None = None,
        repo: str = "/srv/app",
        uses_default: bool = True,
        stop: Callable[[], str | None] = lambda: None,
        allow_system: bool = False,
    ) -> Iterator[tuple[environments.JobEnv, str]]:
        log = LogCollector()
        self.log = log
        with for_job(
            env_spec or EnvSpec(),
            self.tree,
            repo=repo,
            uses_default=uses_default,
            cache=self.cache,
            pythons=PYTHONS,
            allow_system=allow_system,
            log=log,
            stop=stop,
            box=self.box if self.boxed else None,
            home=self.work / "home",
        ) as job_env:
            yield job_env, log.head_text()

    def python(self, job_env: environments.JobEnv, code: str) -> subprocess.CompletedProcess[str]:
        """Run `code` with the environment's Python in the tree, as a test command would be."""
        return subprocess.run(
            [str(job_env.python), "-c", code], cwd=self.tree, capture_output=True, text=True, timeout=60, env={}
        )


# -- what goes in ------------------------------------------------------------


@pytest.mark.parametrize(
    ("files", "groups", "extras", "requirements"),
    [
        # A dependency group comes first, then an extra, then a requirements file.
        (project(groups={"dev": ["a"], "test": ["b"]}, extras={"test": ["c"]}), ("test",), (), ()),
        (project(groups={"dev": ["a"]}, extras={"testing": ["c"]}), ("dev",), (), ()),
        (project(extras={"testing": ["c"], "docs": ["d"]}) | {"requirements-dev.txt": "e\n"}, (), ("testing",), ()),
        (
            project() | {"requirements-dev.txt": "e\n", "test-requirements.txt": "f\n"},
            (),
            (),
            ("requirements-dev.txt",),
        ),
        ({"requirements/test.txt": "x\n", "tests/test_a.py": ""}, (), (), ("requirements/test.txt",)),
        # requirements.txt always goes in, with whatever else matched.
        (
            {"requirements.txt": "x\n", "requirements-test.txt": "y\n"},
            (),
            (),
            ("requirements.txt", "requirements-test.txt"),
        ),
        ({"setup.py": "", "setup.cfg": "[options.extras_require]\ntests = pytest-mock\n"}, (), ("tests",), ()),
        (project(extras={"docs": ["d"]}), (), (), ()),  # optional extras are not installed unless asked
    ],
)
def test_the_test_dependencies_are_the_first_of_the_usual_places(
    tree: Path, files: dict[str, str], groups: tuple[str, ...], extras: tuple[str, ...], requirements: tuple[str, ...]
) -> None:
    got = plan(write(tree, files), EnvSpec(), repo="/srv/app", python=OWN)
    assert (got.groups, got.extras, got.requirements) == (groups, extras, requirements)


def test_what_env_names_replaces_what_would_be_found(tree: Path) -> None:
    write(tree, project(groups={"test": ["b"]}, extras={"test": ["c"], "fast": ["d"]}) | {"ci/reqs.txt": "x\n"})
    got = plan(tree, spec('[env]\nextras = ["fast"]\nrequirements = ["ci/reqs.txt"]\n'), repo="/srv/app", python=OWN)
    assert (got.groups, got.extras, got.requirements) == ((), ("fast",), ("ci/reqs.txt",))
    assert got.project and got.editable
    assert not plan(tree, spec("[env]\neditable = false\n"), repo="/srv/app", python=OWN).editable


def test_only_a_project_is_installed_as_one(tree: Path) -> None:
    write(tree, {"pyproject.toml": "[tool.pytest.ini_options]\naddopts = '-q'\n", "requirements.txt": "x\n"})
    assert not plan(tree, EnvSpec(), repo="/srv/app", python=OWN).project
    write(tree, {"setup.py": "from setuptools import setup\nsetup()\n"})
    assert plan(tree, EnvSpec(), repo="/srv/app", python=OWN).project


def test_the_key_changes_with_what_defines_the_environment_and_nothing_else(tree: Path) -> None:
    write(tree, project(extras={"test": ["deptwo"]}) | {"requirements.txt": "-r base.txt\n", "base.txt": "x\n"})

    def key(env_spec: EnvSpec | None = None, repo: str = "/srv/app", python: pythons.Interpreter = OWN) -> str:
        return plan(tree, env_spec or EnvSpec(), repo=repo, python=python).key

    first = key()
    write(tree, {"src/app/__init__.py": "VALUE = 1\n", "tests/test_new.py": "", "README": "x"})
    assert key() == first  # code and tests are not what an environment is made of
    changed = {key(repo="/srv/other"), key(spec('[env]\ninstall = ["deptwo"]\n'))}
    changed.add(key(python=pythons.Interpreter("3.11", "3.11.99", OWN.executable, OWN.prefix)))
    write(tree, {"base.txt": "y\n"})  # a file that requirements.txt includes
    changed.add(key())
    write(tree, {"base.txt": "x\n", "uv.lock": "version = 1\n"})
    changed.add(key())
    assert first not in changed and len(changed) == 5


@pytest.mark.parametrize(
    ("files", "env_text", "why"),
    [
        ({}, '[env]\nrequirements = ["ci/missing.txt"]\n', "ci/missing.txt is not in the repository"),
        (project(), '[env]\ngroups = ["lint"]\n', "dependency group lint is not in pyproject.toml"),
        (project(), '[env]\ninstall = ["--target", "/srv"]\n', "option --target is not allowed"),
        (project(), '[env]\ninstall = ["--python=/usr/bin/python3"]\n', "option --python is not allowed"),
        ({"pyproject.toml": "[project\n"}, "", "pyproject.toml is not valid TOML"),
        ({"requirements.txt": "x\n"}, '[env]\nextras = ["test"]\n', "no project to install"),
    ],
)
def test_an_impossible_environment_says_why(tree: Path, files: dict[str, str], env_text: str, why: str) -> None:
    write(tree, files)
    with pytest.raises(EnvError, match=why):
        plan(tree, spec(env_text), repo="/srv/app", python=OWN)


def test_a_defining_file_that_links_out_of_the_tree_is_refused(tree: Path, tmp_path: Path) -> None:
    (tmp_path / "secret.txt").write_text("token\n")
    (tree / "requirements.txt").symlink_to(tmp_path / "secret.txt")
    with pytest.raises(EnvError, match="requirements.txt is not a file inside the repository"):
        plan(tree, EnvSpec(), repo="/srv/app", python=OWN)
    (tree / "requirements.txt").unlink()
    write(tree, {"reqs/all.txt": "x\n"})
    (tree / "requirements.txt").symlink_to("reqs/all.txt")  # inside the tree: read through
    assert plan(tree, EnvSpec(), repo="/srv/app", python=OWN).requirements == ("requirements.txt",)


# -- interpreters ------------------------------------------------------------


def test_the_runner_offers_the_pythons_on_path_that_start_and_says_no_to_the_rest(tmp_path: Path) -> None:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / f"python{OWN.version}").symlink_to(OWN.executable)
    (bin_dir / "python3.98").symlink_to(OWN.executable)  # says it is another version: not 3.98
    shim = bin_dir / "python3.97"  # a pyenv-style shim for a version that is not active
    shim.write_text("#!/bin/sh\necho 'pyenv: python3.97: command not found' >&2\nexit 127\n")
    shim.chmod(0o755)
    found = pythons.find_pythons((), str(bin_dir))
    assert list(found) == [OWN.version]
    assert found[OWN.version].executable == OWN.executable
    with pytest.raises(ValueError, match="no working python3.97 on PATH"):
        pythons.find_pythons(("3.97",), str(bin_dir))
    with pytest.raises(ValueError, match="is not a Python interpreter that starts"):
        pythons.find_pythons((str(shim),), str(bin_dir))
    assert list(pythons.find_pythons((str(bin_dir / "python3.98"),), str(bin_dir))) == [OWN.version]


def test_a_python_the_runner_lacks_is_named_with_what_it_has(work: Path, tree: Path) -> None:
    with pytest.raises(EnvError, match=rf"this runner has no Python 3.99 \(it has {OWN.version}"):
        with Job(work, tree).env(spec('[env]\npython = "3.99"\n')):
            pass


def test_system_python_only_where_the_runner_allows_it(work: Path, tree: Path) -> None:
    job = Job(work, tree)
    with pytest.raises(EnvError, match="--allow-system-python"):
        with job.env(spec("[env]\nsystem = true\n")):
            pass
    with job.env(spec("[env]\nsystem = true\n"), allow_system=True) as (job_env, _):
        assert job_env.venv is None and job_env.python == Path(sys.executable)
    assert not (work / "envs").exists() or not list((work / "envs").glob("*/*/.volt-env.json"))


def test_a_command_of_its_own_in_a_tree_that_is_no_project_gets_no_environment(work: Path, tree: Path) -> None:
    write(tree, {"Makefile": "test:\n\ttrue\n"})
    with Job(work, tree).env(uses_default=False) as (job_env, _):
        assert job_env.venv is None
    assert not list((work / "envs").glob("*/*"))


# -- real builds ---------------------------------------------------------------


def test_an_environment_holds_the_project_its_dependencies_and_pytest_and_nothing_of_the_runner(
    offline: Path, work: Path, tree: Path
) -> None:
    write(tree, project(dependencies=("depone>=1",), extras={"test": ["deptwo"]}))
    job = Job(work, tree)
    with job.env() as (job_env, log):
        assert job_env.venv is not None and not job_env.reused
        assert "building" in log and "the project (editable), extra test" in log
        done = job.python(
            job_env,
            "import app, depone, deptwo, pytest, importlib.util as u; print(app.VALUE, pytest.__version__); "
            "print([m for m in ('pika', 'git', 'common', 'runner', 'dispatcher') if u.find_spec(m)])",
        )
    assert done.returncode == 0, done.stderr
    assert done.stdout.split("\n")[:2] == [f"42 {importlib.metadata.version('pytest')}", "[]"]
    # pytest came from the runner, and also runs as a command.
    assert (job_env.venv / "bin" / "pytest").exists()


def test_a_commit_that_changes_no_defining_file_reuses_the_environment_and_sees_its_own_code(
    offline: Path, work: Path, tree: Path
) -> None:
    write(tree, project(dependencies=("depone>=1",)))
    job = Job(work, tree)
    with job.env() as (first, _):
        pass
    write(tree, {"src/app/__init__.py": "VALUE = 43\n"})  # the next commit, in the same tree
    started = time.monotonic()
    with job.env() as (second, log):
        took = time.monotonic() - started
        assert second.venv == first.venv and second.reused
        assert f"environment {second.venv.name[:12]}: reused" in log
        assert job.python(second, "import app; print(app.VALUE)").stdout.strip() == "43"
    assert took < 0.5, took  # editable: nothing to install again
    write(tree, {"pyproject.toml": project(dependencies=("depone>=1", "deptwo"))["pyproject.toml"]})
    with job.env() as (third, log):
        assert third.venv != first.venv and not third.reused


def test_a_backend_without_editable_installs_gets_the_project_whole_and_again_for_each_commit(
    offline: Path, work: Path, tree: Path
) -> None:
    write(tree, project(dependencies=("depone>=1",), code="VALUE = 1\n", editable_backend=False))
    job = Job(work, tree)
    with job.env() as (first, log):
        assert "cannot install it editable; installing it whole" in log
        assert job.python(first, "import app; print(app.VALUE)").stdout.strip() == "1"
    write(tree, {"src/app/__init__.py": "VALUE = 2\n"})
    with job.env() as (second, log):
        assert second.reused and "--no-deps --reinstall-package=app ." in log
        assert job.python(second, "import app; print(app.VALUE)").stdout.strip() == "2"


def test_a_dependency_that_cannot_be_had_is_an_environment_error_with_uvs_words(
    offline: Path, work: Path, tree: Path
) -> None:
    write(tree, project(dependencies=("no-such-dist-volt>=1",)))
    job = Job(work, tree)
    with pytest.raises(EnvError, match=r"uv pip install failed: .*no-such-dist-volt") as caught:
        with job.env():
            pass
    assert "no-such-dist-volt" in job.log.head_text() and "error:" in job.log.head_text()
    assert "\n" not in str(caught.value)
    # Nothing half-made is taken for an environment later.
    assert not list((work / "envs").glob("*/*/.volt-env.json"))


def test_a_build_past_its_time_limit_is_stopped_with_everything_it_started(work: Path, tree: Path) -> None:
    token = f"volt-slow-{uuid.uuid4().hex}"
    files = project()
    files["_build/voltbuild.py"] = f"import time\ntime.sleep(120)  # {token}\n" + BACKEND
    write(tree, files)
    started = time.monotonic()
    with pytest.raises(EnvError, match="ran past its 1s limit"):
        with Job(work, tree, timeout=1.0).env():
            pass
    assert time.monotonic() - started < 15
    assert not processes_with(token)


def test_a_cancelled_build_stops(work: Path, tree: Path) -> None:
    files = project()
    files["_build/voltbuild.py"] = "import time\ntime.sleep(120)\n" + BACKEND
    write(tree, files)
    cancel_at = time.monotonic() + 1.0
    with pytest.raises(Stopped) as caught:
        with Job(work, tree).env(stop=lambda: "cancelled" if time.monotonic() > cancel_at else None):
            pass
    assert caught.value.reason == "cancelled"
    assert time.monotonic() - cancel_at < 10


def test_an_environment_without_its_marker_is_never_used(offline: Path, work: Path, tree: Path) -> None:
    write(tree, {"tests/test_a.py": "def test(): pass\n"})
    job = Job(work, tree)
    with job.env() as (first, _):
        assert first.venv is not None
    venv = first.venv
    (venv / ".volt-env.json").unlink()  # as a crash mid-build leaves it
    (venv / "half-written").write_text("")
    with job.env() as (second, log):
        assert second.venv == venv and not second.reused and "building" in log
        assert not (venv / "half-written").exists()


def test_the_least_recently_used_environments_are_evicted_past_the_cache_size(
    offline: Path, work: Path, tree: Path
) -> None:
    write(tree, {"tests/test_a.py": "def test(): pass\n"})
    job = Job(work, tree, size=2)
    made = []
    for repo in ("/srv/a", "/srv/b", "/srv/a", "/srv/c"):  # a is used again: b is the oldest when c comes
        with job.env(repo=repo) as (job_env, _):
            made.append(job_env.venv)
    a, b, again, c = made
    assert again == a
    assert a.exists() and c.exists() and not b.exists()
    assert not b.parent.exists()  # a repository with no environment left keeps no uv cache either


def test_two_jobs_that_need_one_environment_build_it_once(offline: Path, work: Path, tree: Path) -> None:
    write(tree, project(dependencies=("depone>=1",)))
    logs: list[str] = []

    def one() -> None:
        job = Job(work, tree)
        with job.env() as (_, log):
            logs.append(log)

    threads = [threading.Thread(target=one) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    assert sorted(": building" in log for log in logs) == [False, True]


def test_a_uv_lock_is_honoured_and_a_stale_one_is_an_error(offline: Path, work: Path, tree: Path) -> None:
    write(tree, project(dependencies=("depone",), groups={"test": ["deptwo"]}))
    locked = subprocess.run(
        [environments.find_uv(), "lock", "--offline", "--python", str(OWN.executable)],
        cwd=tree,
        capture_output=True,
        text=True,
        env={**os.environ, "UV_FIND_LINKS": str(offline)},
    )
    assert locked.returncode == 0, locked.stderr
    job = Job(work, tree)
    with job.env() as (job_env, log):
        assert "uv sync --locked" in log and "--group=test" in log
        assert job.python(job_env, "import app, deptwo; print(app.VALUE)").stdout.strip() == "42"
    write(tree, {"pyproject.toml": project(dependencies=("depone", "deptwo"))["pyproject.toml"]})
    with pytest.raises(EnvError, match="uv sync --locked failed: The lockfile .* needs to be updated"):
        with job.env():
            pass


def test_the_build_runs_in_a_box_that_hides_the_runners_workdir(offline: Path, work: Path, tree: Path) -> None:
    (work / "secret").write_text("runner's token")
    outbox, secret, seen = work / "outbox" / "forged.json", work / "secret", tree / "seen.txt"
    files = project()
    # The project's build backend runs its own code: it tries the runner's outbox and secrets,
    # and notes in its tree (writable, and the host's to read) what it got.
    files["_build/voltbuild.py"] = (
        f"notes = open({str(seen)!r}, 'a')\n"
        f"try:\n    open({str(outbox)!r}, 'w').write('{{}}'); notes.write('WROTE ')\nexcept OSError:\n    notes.write('refused ')\n"
        f"try:\n    notes.write(open({str(secret)!r}).read())\nexcept OSError:\n    notes.write('hidden ')\n"
        "notes.close()\n" + BACKEND
    )
    write(tree, files)
    job = Job(work, tree)
    with job.env() as (job_env, _):
        assert job_env.venv is not None
    assert not outbox.exists()
    assert set(seen.read_text().split()) == {"refused", "hidden"}


def processes_with(token: str) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if token.encode() in (entry / "cmdline").read_bytes():
                    found.append(int(entry.name))
            except OSError:
                continue
    return found


def test_the_runners_own_venv_is_off_the_path_and_the_jobs_goes_first(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    own_bin = str(Path(sys.prefix) / "bin")
    assert sys.prefix != sys.base_prefix  # these tests run in a venv, as a runner installed with pip does
    path = os.pathsep.join([own_bin, "/usr/local/bin", "/usr/bin"])
    assert runner_free_path(path) == ["/usr/local/bin", "/usr/bin"]
    venv = tmp_path / "env"
    monkeypatch.setenv("PATH", path)
    env = child_env({}, venv=venv)
    assert env["PATH"].split(os.pathsep) == [str(venv / "bin"), "/usr/local/bin", "/usr/bin"]
    assert env["VIRTUAL_ENV"] == str(venv)


def test_the_runner_advertises_its_pythons_and_refuses_one_that_does_not_start(tmp_path: Path) -> None:
    from common.cli import build_parser
    from common.settings import SettingsError
    from runner.service import RunnerSettings

    def settings(*flags: str) -> RunnerSettings:
        args = build_parser("runner").parse_args(["runner", "--id", "r1", *flags])
        return RunnerSettings.from_args(args, {"PATH": os.environ.get("PATH", "")})

    plain = settings("--label", "gpu")
    assert plain.labels[0] == "gpu" and f"python{OWN.version}" in plain.labels
    assert "system-python" not in plain.labels
    granted = settings("--python", str(OWN.executable), "--allow-system-python")
    assert granted.labels == (f"python{OWN.version}", "system-python") and granted.pythons == (str(OWN.executable),)
    with pytest.raises(SettingsError, match="--python: .*not-python is not a Python interpreter that starts"):
        settings("--python", str(tmp_path / "not-python"))
    with pytest.raises(SettingsError, match="--python: must be a version such as 3.12"):
        settings("--python", "python3")


def test_byte_code_is_compiled_at_build_time_when_there_is_enough_to_pay(offline: Path, work: Path, tree: Path) -> None:
    from envsupport import wheel

    modules = {f"depbig/m{i}.py": f"X = {i}\n" for i in range(environments.COMPILE_ABOVE + 10)}
    wheel(offline, "depbig", "1.0", {"depbig/__init__.py": "", **modules})
    job = Job(work, tree)
    write(tree, project(dependencies=("depone>=1",)))
    with job.env() as (small, log):
        assert "byte code compiled" not in log  # a handful of modules: compiled by each job, in a few ms
    write(tree, project(dependencies=("depone>=1", "depbig")))
    with job.env() as (big, log):
        assert "byte code compiled" in log
    site = environments._site_packages(big.venv)
    assert list((site / "depbig" / "__pycache__").glob("m0.*.pyc"))
    # pytest's came compiled with it, in both: the tests cannot write byte code.
    for job_env in (small, big):
        assert list((environments._site_packages(job_env.venv) / "_pytest" / "__pycache__").glob("main.*.pyc"))
