"""The bwrap argv the runner builds, and what it makes of the box, with real bwrap."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from runner import sandbox

# The interpreter itself, not the virtual environment's link to it: the box
# shows the interpreter's prefix again wherever it lives; not so the venv.
PYTHON = os.path.realpath(sys._base_executable)


@pytest.fixture
def work(tmp_path: Path) -> Path:
    path = tmp_path / "work"
    (path / "trees" / "app").mkdir(parents=True)
    return path


@pytest.fixture
def tree(work: Path) -> Path:
    return work / "trees" / "app"


def run(argv: list[str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=60)


def boxed(code: str, tree: Path, work: Path, **kwargs: Any) -> subprocess.CompletedProcess[str]:
    """Run Python `code` in the box (env: PATH only) and return what it did."""
    return run(sandbox.wrap([PYTHON, "-c", code], tree, {"PATH": "/usr/bin:/bin"}, workdir=work, **kwargs))


def pairs(argv: list[str], option: str) -> list[str]:
    """The argument after each `option` in argv, before the command."""
    head = argv[: argv.index("--")]
    return [head[i + 1] for i, arg in enumerate(head) if arg == option]


def test_the_command_comes_last_verbatim(tree: Path, work: Path) -> None:
    command = ["pytest", "--", "-x", "--sandbox", "none"]
    argv = sandbox.wrap(command, tree, {}, workdir=work)
    assert argv[0] == "bwrap"
    assert argv[-len(command) - 1 :] == ["--", *command]


def test_the_box_has_its_own_namespaces_and_no_privileges(tree: Path, work: Path) -> None:
    argv = sandbox.wrap(["true"], tree, {}, workdir=work)
    head = argv[: argv.index("--")]
    for flag in ("--unshare-user", "--unshare-pid", "--unshare-ipc", "--unshare-net", "--die-with-parent"):
        assert flag in head, flag
    assert "--new-session" in head and "--disable-userns" in head
    assert pairs(argv, "--cap-drop") == ["ALL"]
    status = boxed("print(open('/proc/self/status').read())", tree, work).stdout
    fields = dict(line.split(":\t", 1) for line in status.splitlines() if ":\t" in line)
    assert fields["CapEff"].strip() == "0" * 16
    assert fields["CapBnd"].strip() == "0" * 16
    assert fields["NoNewPrivs"].strip() == "1"
    # Its session is led from inside the box (outside, getsid would say 0):
    # it has no controlling terminal of the runner's to push input into (TIOCSTI).
    assert boxed("import os; print(os.getsid(0))", tree, work).stdout.strip() == "1"
    assert boxed("import os; os.unshare(os.CLONE_NEWUSER)", tree, work).returncode != 0


def test_the_environment_is_only_what_the_caller_gives(tree: Path, work: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("VOLT_AMQP_URL", "amqp://user:SECRET@broker/")
    argv = sandbox.wrap(["/usr/bin/env"], tree, {"PATH": "/usr/bin:/bin", "CI": "true"}, workdir=work)
    head = argv[: argv.index("--")]
    assert head.index("--clearenv") < head.index("--setenv")
    done = run(argv)
    assert done.returncode == 0, done.stderr
    env = dict(line.split("=", 1) for line in done.stdout.splitlines())
    # bwrap adds PWD, for --chdir.
    assert env == {"PATH": "/usr/bin:/bin", "CI": "true", "HOME": sandbox.HOME, "TMPDIR": "/tmp", "PWD": str(tree)}


def test_the_caller_cannot_move_home_or_tmpdir(tree: Path, work: Path) -> None:
    argv = sandbox.wrap(["/usr/bin/env"], tree, {"HOME": "/root", "TMPDIR": str(work)}, workdir=work)
    env = dict(line.split("=", 1) for line in run(argv).stdout.splitlines())
    assert env["HOME"] == sandbox.HOME and env["TMPDIR"] == "/tmp"


def test_the_network_is_loopback_only_unless_allowed(tree: Path, work: Path) -> None:
    for network in (False, True):
        argv = sandbox.wrap(["true"], tree, {}, workdir=work, network=network)
        assert "--unshare-net" in argv[: argv.index("--")]  # never the host's namespace
    links = "print(sorted(l.split(':')[0].strip() for l in open('/proc/net/dev').readlines()[2:]))"
    assert boxed(links, tree, work).stdout.strip() == "['lo']"
    done = boxed(links + "; print(open('/etc/resolv.conf').read())", tree, work, network=True)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split("\n")[:2] == ["['lo', 'tap0']", "nameserver 10.0.2.3"]


@pytest.fixture
def host_services() -> Iterator[dict[str, tuple[str, int]]]:
    """Two listening sockets of the host's: one on its loopback (as RabbitMQ's
    guest login, PostgreSQL's trust and the results page are), one on its
    outward address (as a server elsewhere would be)."""
    outward = _outward_address()
    servers = {}
    for name, host in (("loopback", "127.0.0.1"), ("outward", outward)):
        server = socket.create_server((host, 0))
        servers[name] = server
    yield {name: server.getsockname()[:2] for name, server in servers.items()}
    for server in servers.values():
        server.close()


def _outward_address() -> str:
    probe = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        probe.connect(("10.255.255.255", 9))  # no packet is sent; it picks the outward interface
        return str(probe.getsockname()[0])
    finally:
        probe.close()


def test_a_box_with_network_reaches_the_world_but_not_the_hosts_own_services(
    tree: Path, work: Path, host_services: dict[str, tuple[str, int]]
) -> None:
    loopback_port = host_services["loopback"][1]
    code = (
        "import socket\n"
        "def reach(h, p):\n"
        "    try:\n"
        "        socket.create_connection((h, p), timeout=5).close(); return 'open'\n"
        "    except OSError: return 'no'\n"
        f"print(reach({host_services['outward'][0]!r}, {host_services['outward'][1]}),"
        f" reach('127.0.0.1', {loopback_port}), reach('10.0.2.2', {loopback_port}))\n"
    )
    done = boxed(code, tree, work, network=True)
    assert done.returncode == 0, done.stderr
    # Out to the world: yes. The host's loopback, by its own name or by slirp's alias for the host: no.
    assert done.stdout.split() == ["open", "no", "no"]
    assert boxed(code, tree, work).stdout.split() == ["no", "no", "no"]  # without network: nothing


def test_a_box_with_network_exits_as_its_command_did(tree: Path, work: Path) -> None:
    assert boxed("raise SystemExit(3)", tree, work, network=True).returncode == 3
    killed = boxed("import os, signal; os.kill(os.getpid(), signal.SIGKILL)", tree, work, network=True)
    assert killed.returncode in (-signal.SIGKILL, 128 + signal.SIGKILL)


def test_a_network_box_that_fails_before_its_command_is_tried_again_but_a_failing_command_is_not(
    tree: Path, work: Path
) -> None:
    # bwrap can fail to set a box up (here: a mount of nothing): nothing ran,
    # so it is tried again; a command's own exit 1 is its result.
    argv = sandbox.wrap([PYTHON, "-c", "pass"], tree, {}, workdir=work, network=True)
    cut = argv.index("--")
    broken = run([*argv[:cut], "--ro-bind", str(tree / "no-such-folder"), "/x", *argv[cut:]])
    assert broken.returncode == 1
    assert broken.stderr.count("did not come up") == 2 and broken.stderr.count("Can't find source path") == 3
    runs = tree / "runs"
    failing = boxed(f"open({str(runs)!r}, 'a').write('1'); raise SystemExit(1)", tree, work, network=True)
    assert failing.returncode == 1 and "did not come up" not in failing.stderr
    assert runs.read_text() == "1"
    missing = run(sandbox.wrap([str(tree / "no-such-program")], tree, {}, workdir=work, network=True))
    assert missing.returncode == 1 and missing.stderr.count("cannot run") == 1, missing.stderr


def test_a_network_box_given_up_before_its_command_began_runs_nothing(tree: Path, work: Path, tmp_path: Path) -> None:
    # No slirp4netns: the box is given up while its first process waits. That
    # one must not go on to run the command on its own, with no network and
    # outside the job's process group.
    only_bwrap = tmp_path / "bin"
    only_bwrap.mkdir()
    (only_bwrap / "bwrap").symlink_to(shutil.which("bwrap") or "/usr/bin/bwrap")
    runs = tree / "runs"
    argv = sandbox.wrap([PYTHON, "-c", f"open({str(runs)!r}, 'a').write('1')"], tree, {}, workdir=work, network=True)
    done = subprocess.run(argv, capture_output=True, text=True, env={"PATH": str(only_bwrap)}, timeout=60)
    assert done.returncode == 125 and "cannot start slirp4netns" in done.stderr
    time.sleep(1.0)  # time enough for a box left behind to run it
    assert not runs.exists()


def test_hidden_paths_are_covered_whole(tree: Path, work: Path, tmp_path: Path) -> None:
    (tmp_path / "secrets" / "inner").mkdir(parents=True)
    link = tmp_path / "link-to-secrets"
    link.symlink_to(tmp_path / "secrets")
    hide = [tmp_path / "secrets", tmp_path / "secrets" / "inner", link, tmp_path / "does-not-exist"]
    argv = sandbox.wrap(["true"], tree, {}, workdir=work, hide=hide)
    covered = pairs(argv, "--tmpfs")
    for path in ("/root", "/home", "/run", "/tmp", "/var/tmp", str(Path.home())):
        if os.path.exists(path):
            assert os.path.realpath(path) in covered, path
    assert "/var/run" not in covered  # a link to /run: bwrap mounts onto what it points at
    # Everything here is under the host's /tmp, hidden whole: nothing more to mount.
    assert not any(p.startswith(str(tmp_path)) for p in covered)
    assert len(covered) == len(set(covered))


def test_the_interpreter_works_inside_even_when_it_lives_in_a_hidden_place(tree: Path, work: Path) -> None:
    prefix = os.path.realpath(sys.base_prefix)
    # Hide the interpreter's own folder's parent, as a home (~/.pyenv) would be.
    argv = sandbox.wrap(
        [PYTHON, "-c", "import sys, json; print(sys.base_prefix)"], tree, {}, workdir=work, hide=[Path(prefix).parent]
    )
    assert prefix in pairs(argv, "--ro-bind")
    done = run(argv)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == sys.base_prefix


def test_the_runners_own_environment_works_inside_when_it_lives_in_a_hidden_place(tree: Path, work: Path) -> None:
    # A runner installed under /tmp (a CI checkout's .venv): a command run with its
    # interpreter (`[env] system = true`, or a test's own sys.executable) must start.
    venv = os.path.realpath(sys.prefix)
    argv = sandbox.wrap(
        [sys.executable, "-c", "import sys; print(sys.prefix)"], tree, {}, workdir=work, hide=[Path(venv).parent]
    )
    assert venv in pairs(argv, "--ro-bind")
    done = run(argv)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == sys.prefix


def test_a_hidden_path_inside_an_exposed_one_stays_hidden(tree: Path, work: Path) -> None:
    # A folder shown to the job again (its virtual environment, say) holding one it must not see.
    shown = work / "venv"
    (shown / "secret").mkdir(parents=True)
    (shown / "secret" / "key").write_text("SECRET")
    (shown / "lib.py").write_text("X = 1\n")
    argv = sandbox.wrap(["true"], tree, {}, workdir=work, expose=[shown], hide=[shown / "secret"])
    head = argv[: argv.index("--")]
    hidden_again = max(i for i, arg in enumerate(head) if arg == str(shown / "secret"))
    assert head.index(str(shown)) < hidden_again
    code = f"import os; print(open({str(shown / 'lib.py')!r}).read().strip(), os.listdir({str(shown / 'secret')!r}))"
    done = boxed(code, tree, work, expose=[shown], hide=[shown / "secret"])
    assert done.stdout.strip() == "X = 1 []", done.stderr


def test_a_workdir_in_a_state_folder_hides_the_whole_folder(tmp_path: Path) -> None:
    # ./.volt/runner-a beside ./.volt/runner-b and ./.volt/dispatcher.db: a job
    # of one runner sees nothing of the others, nor the store.
    state = tmp_path / "project" / ".volt"
    assert state in sandbox.hidden_paths(state / "runner-a")
    elsewhere = tmp_path / "srv" / "runner-a"
    assert elsewhere.parent not in sandbox.hidden_paths(elsewhere)


def test_a_hidden_file_reads_empty_and_the_box_still_starts(tree: Path, work: Path) -> None:
    # --git-credentials in a folder the box can see (/etc/volt, say): hidden as a file.
    shown = work / "etc"
    shown.mkdir()
    (shown / "git-credentials").write_text("https://ci:SECRET@git.example.com\n")
    (shown / "other").write_text("ok")
    code = f"print(repr(open({str(shown / 'git-credentials')!r}).read()), open({str(shown / 'other')!r}).read())"
    done = boxed(code, tree, work, expose=[shown], hide=[shown / "git-credentials"])
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "'' ok"


def test_the_tree_and_home_are_writable_the_rest_read_only(tree: Path, work: Path, tmp_path: Path) -> None:
    extra = tmp_path / "reports"
    extra.mkdir()
    code = (
        "import os, sys\n"
        "open('in-tree.txt', 'w').write('ok')\n"
        "open(os.path.join(os.environ['HOME'], 'h'), 'w').write('ok')\n"
        f"open({str(extra / 'junit.xml')!r}, 'w').write('ok')\n"
        "print(sorted(os.listdir(os.environ['HOME'])))\n"
        f"for path in ('/etc/volt-box-test', '/usr/volt-box-test', {sys.base_prefix!r} + '/volt-box-test'):\n"
        "    try:\n"
        "        open(path, 'w')\n"
        "        print('WROTE', path)\n"
        "    except OSError as exc:\n"
        "        print(exc.strerror)\n"
    )
    done = boxed(code, tree, work, writable=[extra])
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == ["['h']", *["Read-only file system"] * 3]
    assert (tree / "in-tree.txt").read_text() == "ok"
    assert (extra / "junit.xml").read_text() == "ok"
    assert str(tree) == boxed("import os; print(os.getcwd())", tree, work).stdout.strip()


def test_probe_says_yes_where_bwrap_works() -> None:
    assert sandbox.probe() is None


def test_probe_names_the_opt_out_when_bwrap_is_missing(tmp_path: Path) -> None:
    why = sandbox.probe(str(tmp_path / "no-such-bwrap"))
    assert why is not None and "\n" not in why
    assert "--sandbox none" in why and "bubblewrap" in why


def test_probe_says_why_bwrap_cannot_make_its_box(tmp_path: Path) -> None:
    fake = tmp_path / "bwrap"
    fake.write_text(
        "#!/bin/sh\necho 'bwrap: No permissions to create new namespace, likely because the kernel\ndoes not allow it' >&2\nexit 1\n"
    )
    fake.chmod(0o755)
    why = sandbox.probe(str(fake))
    assert why is not None and "\n" not in why
    assert "No permissions to create new namespace" in why
    assert "--sandbox none" in why


def test_the_runner_users_home_is_hidden_wherever_it_is(
    tree: Path, work: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HOME", "/usr/share")  # a home outside every other hidden path
    assert "/usr/share" in pairs(sandbox.wrap(["true"], tree, {}, workdir=work), "--tmpfs")


def test_a_home_of_slash_hides_nothing_else(tree: Path, work: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HOME", "/")  # some service users have it
    assert "/" not in pairs(sandbox.wrap(["true"], tree, {}, workdir=work), "--tmpfs")
    assert boxed("print('ran')", tree, work).stdout.strip() == "ran"
