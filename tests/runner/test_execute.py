"""Running a test command: config, bounded logs, outcomes, and real processes."""

from __future__ import annotations

import json
import os
import signal
import sys
import threading
import time
import tracemalloc
import zlib
from collections.abc import Iterator
from pathlib import Path

import pytest

from runner.execute import (
    LOG_FULL_MAX_COMPRESSED,
    LOG_HEAD_BYTES,
    LOG_TAIL_BYTES,
    ConfigError,
    Counts,
    LogCollector,
    Outcome,
    classify,
    load_config,
    run_command,
)

# Renamed so that pytest does not take them for tests.
from runner.execute import TestConfig as Config
from runner.execute import test_env as child_env

PY = sys.executable
CHUNK = 64 * 1024  # what the reader thread reads at a time


# -- .volt.toml -------------------------------------------------------------


def config_in(tmp_path: Path, text: str | bytes | None, default_timeout: float = 600.0) -> Config:
    if isinstance(text, str):
        (tmp_path / ".volt.toml").write_text(text)
    elif isinstance(text, bytes):
        (tmp_path / ".volt.toml").write_bytes(text)
    return load_config(tmp_path, tmp_path / "junit.xml", default_timeout)


def test_no_config_runs_pytest_with_junit(tmp_path: Path) -> None:
    config = config_in(tmp_path, None, default_timeout=123.0)
    assert config.uses_default
    assert config.timeout == 123.0
    assert config.command[:3] == [PY, "-m", "pytest"]
    assert f"--junitxml={tmp_path / 'junit.xml'}" in config.command


def test_config_without_a_command_keeps_the_default(tmp_path: Path) -> None:
    config = config_in(tmp_path, "[test]\ntimeout = 30\n")
    assert config.uses_default
    assert config.command[:3] == [PY, "-m", "pytest"]
    assert config.timeout == 30.0


@pytest.mark.parametrize("asked", ["1e9", "601", "601.5"])
def test_a_commit_cannot_ask_for_more_time_than_the_runner_allows(tmp_path: Path, asked: str) -> None:
    # Else one commit that never ends would hold a runner for good.
    config = config_in(tmp_path, f"[test]\ncommand = 'sleep 5'\ntimeout = {asked}\n", default_timeout=600.0)
    assert config.timeout == 600.0
    assert config.notes == (f"test.timeout {float(asked):g}s is more than this runner allows (--job-timeout): 600s",)
    assert config_in(tmp_path, "[test]\ntimeout = 599\n", default_timeout=600.0).notes == ()


def test_string_command_is_split_like_a_shell(tmp_path: Path) -> None:
    config = config_in(tmp_path, "[test]\ncommand = 'make test ARGS=\"-k slow\"  V=1'\n")
    assert config.command == ["make", "test", "ARGS=-k slow", "V=1"]
    assert not config.uses_default


def test_list_command_is_taken_as_is(tmp_path: Path) -> None:
    config = config_in(tmp_path, '[test]\ncommand = ["tox", "-e", "py 3"]\ntimeout = 2.5\n')
    assert config.command == ["tox", "-e", "py 3"]
    assert config.timeout == 2.5


@pytest.mark.parametrize(
    ("text", "says"),
    [
        ("[test\ncommand = 'x'", "not valid TOML"),
        (b"[test]\ncommand = '\xff'\n", "not valid TOML"),
        ("test = 3\n", "[test] must be a table"),
        ("[test]\ntimeout = 0\n", "timeout must be a positive number"),
        ("[test]\ntimeout = -1\n", "timeout must be a positive number"),
        ("[test]\ntimeout = '10'\n", "timeout must be a positive number"),
        ("[test]\ntimeout = true\n", "timeout must be a positive number"),
        ("[test]\ntimeout = nan\n", "timeout must be a positive number"),
        ("[test]\ntimeout = inf\n", "timeout must be a positive number"),
        ("[test]\ncommand = ''\n", "test.command is empty"),
        ("[test]\ncommand = '   '\n", "test.command is empty"),
        ("[test]\ncommand = []\n", "test.command is empty"),
        ("[test]\ncommand = [1, 2]\n", "must be a string or a list of strings"),
        ("[test]\ncommand = 5\n", "must be a string or a list of strings"),
        ("[test]\ncommand = 'pytest \"unclosed'\n", "cannot be split"),
    ],
)
def test_bad_config_raises_config_error(tmp_path: Path, text: str | bytes, says: str) -> None:
    with pytest.raises(ConfigError, match="^.volt.toml") as info:
        config_in(tmp_path, text)
    assert says in str(info.value)


# -- LogCollector -----------------------------------------------------------


def feed_all(collector: LogCollector, data: bytes, chunk: int = CHUNK) -> None:
    for at in range(0, len(data), chunk):
        collector.feed(data[at : at + chunk])


def test_small_log_is_kept_whole() -> None:
    data = "".join(f"line {i}: ✓\n" for i in range(100)).encode()
    collector = LogCollector()
    feed_all(collector, data, chunk=7)
    assert collector.total == len(data)
    assert collector.head_text() == data.decode()
    assert collector.tail_text() == ""
    assert not collector.full_dropped
    assert zlib.decompress(collector.full_compressed()) == data


def test_head_and_tail_split_a_medium_log_exactly() -> None:
    data = bytes(i % 251 for i in range(LOG_HEAD_BYTES + LOG_TAIL_BYTES + 12345))
    collector = LogCollector()
    feed_all(collector, data, chunk=10_000)  # chunks that straddle the head's end
    assert bytes(collector.head) == data[:LOG_HEAD_BYTES]
    tail = b"".join(collector.tail)[-LOG_TAIL_BYTES:]
    assert tail == data[-LOG_TAIL_BYTES:]
    assert zlib.decompress(collector.full_compressed()) == data


def test_fifty_megabytes_of_text_stay_bounded_and_are_kept_compressed() -> None:
    line = b"collected 1 item; tests/test_x.py::test_y PASSED [100%] and some more words\n"
    block = line * (1024 * 1024 // len(line))
    collector = LogCollector()
    fed = 0
    while fed < 50 * 1024 * 1024:
        feed_all(collector, block)
        fed += len(block)
        assert collector.tail_size <= LOG_TAIL_BYTES + CHUNK
    assert collector.total == fed
    assert len(collector.head) == LOG_HEAD_BYTES
    assert len(collector.tail_text().encode()) <= LOG_TAIL_BYTES
    assert collector.tail_text().endswith(line.decode())
    full = collector.full_compressed()
    assert 0 < len(full) <= LOG_FULL_MAX_COMPRESSED
    assert len(zlib.decompress(full)) == fed


def test_fifty_megabytes_of_noise_keep_memory_flat_and_drop_the_full_log() -> None:
    noise = os.urandom(1024 * 1024)  # repeats every MB: far beyond zlib's window, so incompressible
    collector = LogCollector()
    tracemalloc.start()
    try:
        for _ in range(50):
            feed_all(collector, noise)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert collector.total == 50 * 1024 * 1024
    assert collector.full_dropped
    assert collector.full_compressed() == b""
    assert len(collector.head) == LOG_HEAD_BYTES
    assert bytes(collector.head) == noise[:LOG_HEAD_BYTES]
    assert b"".join(collector.tail)[-LOG_TAIL_BYTES:] == noise[-LOG_TAIL_BYTES:]
    assert len(collector.tail_text()) <= LOG_TAIL_BYTES  # each undecodable byte becomes one U+FFFD
    # Never more than the compressed cap, head and tail, and some room for the
    # chunks in flight: nowhere near the 50 MB that went through.
    assert peak < LOG_FULL_MAX_COMPRESSED + LOG_HEAD_BYTES + LOG_TAIL_BYTES + 4 * 1024 * 1024


def test_tail_text_is_at_most_tail_bytes_of_input() -> None:
    collector = LogCollector()
    feed_all(collector, b"a" * (LOG_HEAD_BYTES + 3 * LOG_TAIL_BYTES + 17), chunk=CHUNK - 1)
    assert collector.tail_text() == "a" * LOG_TAIL_BYTES


# JUnit parsing: tests/runner/test_junit.py


# -- classify -----------------------------------------------------------------


def test_classify() -> None:
    log = LogCollector()
    ok = classify(0, Counts(tests=4, skipped=1), 1.5, log)
    assert (ok.status, ok.exit_code, ok.passed, ok.skipped, ok.duration_s, ok.reason) == ("passed", 0, 3, 1, 1.5, "")
    assert ok.log is log
    assert classify(0, None, 0.1, log).status == "passed"

    failed = classify(1, Counts(tests=5, failures=2), 1.0, log)
    assert (failed.status, failed.failed, failed.passed, failed.reason) == ("failed", 2, 3, "2 failing test(s)")

    no_tests = classify(2, None, 1.0, log)
    assert (no_tests.status, no_tests.reason) == ("error", "exit code 2 and no failing test (collection error?)")

    errors = classify(1, Counts(tests=3, errors=1), 1.0, log)
    assert (errors.status, errors.errors) == ("error", 1)
    assert errors.reason == "exit code 1 with 1 error(s) and no failing test"

    killed = classify(-9, Counts(tests=3, failures=1), 1.0, log)
    assert killed.status == "failed"
    killed = classify(-9, None, 1.0, log)
    assert (killed.status, killed.reason) == ("error", "test command killed by signal 9")


# -- run_command with real processes --------------------------------------------


@pytest.fixture
def pgids() -> Iterator[list[int]]:
    """Process groups the test started; whatever a failing test leaves behind is killed."""
    groups: list[int] = []
    yield groups
    for pgid in groups:
        try:
            os.killpg(pgid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def python(code: str, timeout: float = 30.0) -> Config:
    return Config([PY, "-c", code], timeout)


def run(
    config: Config,
    tmp_path: Path,
    cancel: threading.Event | None = None,
    grace: float = 5.0,
    env: dict[str, str] | None = None,
    pgids: list[int] | None = None,
) -> Outcome:
    return run_command(
        config,
        tmp_path,
        env if env is not None else child_env({}),
        tmp_path / "junit.xml",
        cancel or threading.Event(),
        grace=grace,
        on_start=pgids.append if pgids is not None else None,
    )


def group_is_gone(pgid: int, within: float = 5.0) -> bool:
    """True once no process is left in the group.

    Killed grandchildren stay in the group as zombies until init reaps them,
    which some container inits do only every second or so; a zombie runs no
    code, so one that is all that is left counts as gone.
    """
    deadline = time.monotonic() + within
    while True:
        try:
            os.killpg(pgid, 0)
        except ProcessLookupError:
            return True
        if all(state == "Z" for state in member_states(pgid)):
            return True
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)


def member_states(pgid: int) -> list[str]:
    """The states (R, S, Z, ...) of the processes in a process group, from /proc."""
    states = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue  # gone meanwhile
        # pid (comm) state ppid pgrp ...: comm may hold spaces and parentheses.
        fields = stat[stat.rindex(")") + 2 :].split()
        if int(fields[2]) == pgid:
            states.append(fields[0])
    return states


def test_exit_zero_passes_and_keeps_the_output(tmp_path: Path) -> None:
    out = run(python("print('hello from the tests'); import sys; print('err', file=sys.stderr)"), tmp_path)
    assert (out.status, out.exit_code, out.reason) == ("passed", 0, "")
    text = out.log.head_text()
    assert "hello from the tests" in text
    assert "err" in text  # stderr goes to the same log
    assert zlib.decompress(out.log.full_compressed()).decode() == text


def test_runs_in_the_given_directory_in_its_own_process_group(tmp_path: Path, pgids: list[int]) -> None:
    code = "import os; print(os.getcwd()); print(os.getpgid(0) == os.getpid(), os.getsid(0) == os.getpid())"
    out = run(python(code), tmp_path, pgids=pgids)
    assert out.log.head_text().split() == [str(tmp_path), "True", "True"]
    assert len(pgids) == 1


def test_a_nonzero_exit_without_junit_is_an_error(tmp_path: Path) -> None:
    out = run(python("raise SystemExit(3)"), tmp_path)
    assert (out.status, out.exit_code) == ("error", 3)
    assert "exit code 3" in out.reason


def test_counts_come_from_the_junit_file(tmp_path: Path) -> None:
    junit = tmp_path / "junit.xml"
    code = f'open({str(junit)!r}, \'w\').write(\'<testsuite tests="6" failures="2" skipped="1"/>\'); exit(1)'
    out = run(python(code), tmp_path)
    assert (out.status, out.passed, out.failed, out.skipped) == ("failed", 3, 2, 1)
    assert out.reason == "2 failing test(s)"


def test_the_default_command_runs_pytest_and_counts_its_tests(tmp_path: Path) -> None:
    (tmp_path / "test_sample.py").write_text(
        "import pytest\n"
        "def test_ok(): assert True\n"
        "def test_also_ok(): assert 1 + 1 == 2\n"
        "def test_bad(): assert 1 == 2\n"
        "@pytest.mark.skip\n"
        "def test_skipped(): pass\n"
    )
    config = load_config(tmp_path, tmp_path / "junit.xml", 60.0)
    out = run(config, tmp_path)
    assert (out.status, out.passed, out.failed, out.skipped, out.exit_code) == ("failed", 2, 1, 1, 1)
    assert "test_bad" in out.log.head_text() + out.log.tail_text()


def test_the_default_command_ignores_pytest_settings_of_a_project_around_the_workdir(tmp_path: Path) -> None:
    # The runner's default workdir is ./.volt/...: maybe inside a project of its own.
    (tmp_path / "pyproject.toml").write_text('[tool.pytest.ini_options]\naddopts = "--no-such-pytest-flag"\n')
    tree = tmp_path / ".volt" / "runner-1" / "repos" / "app"
    tree.mkdir(parents=True)
    (tree / "test_one.py").write_text("def test_ok(): pass\n")
    out = run(load_config(tree, tree / "junit.xml", 60.0), tree)
    assert (out.status, out.passed) == ("passed", 1), out.log.head_text()


def test_the_default_command_keeps_the_repositorys_own_pytest_settings(tmp_path: Path) -> None:
    (tmp_path / "pyproject.toml").write_text('[tool.pytest.ini_options]\naddopts = "--no-such-pytest-flag"\n')
    tree = tmp_path / "app"
    tree.mkdir()
    (tree / "pyproject.toml").write_text('[project]\nname = "app"\n\n[tool.pytest.ini_options]\nmarkers = ["slow"]\n')
    (tree / "test_one.py").write_text("import pytest\n@pytest.mark.slow\ndef test_ok(): pass\n")
    config = load_config(tree, tree / "junit.xml", 60.0)
    assert "-c" not in config.command  # its own settings are found before the outer ones
    out = run(config, tree)
    assert (out.status, out.passed) == ("passed", 1), out.log.head_text()
    (tree / "pyproject.toml").write_text('[project]\nname = "app"\n')  # settings elsewhere: not its own
    assert "-c" in load_config(tree, tmp_path / "junit.xml", 60.0).command


def test_a_command_that_does_not_exist_is_an_error(tmp_path: Path) -> None:
    out = run(Config(["volt-no-such-command-here", "--x"], 10.0), tmp_path)
    assert (out.status, out.exit_code) == ("error", None)
    assert "not found" in out.reason
    assert "volt-no-such-command-here" in out.reason


def test_a_command_that_is_not_executable_is_an_error(tmp_path: Path) -> None:
    script = tmp_path / "run-tests.sh"
    script.write_text("#!/bin/sh\nexit 0\n")
    script.chmod(0o644)
    out = run(Config([str(script)], 10.0), tmp_path)
    assert out.status == "error"
    assert "not executable" in out.reason


def test_timeout_stops_a_sleeping_command_quickly(tmp_path: Path, pgids: list[int]) -> None:
    started = time.monotonic()
    out = run(python("import time; print('sleeping', flush=True); time.sleep(600)", timeout=0.5), tmp_path, pgids=pgids)
    took = time.monotonic() - started
    assert out.status == "timeout"
    assert out.reason == "stopped after 0.5s time limit"
    assert 0.5 <= out.duration_s < 3.0
    assert took < 3.0  # SIGTERM was enough: no wait for the 5 s grace
    assert "sleeping" in out.log.head_text()
    assert group_is_gone(pgids[0])


# The leader starts two children that ignore SIGTERM (and ignores it itself),
# waits until they are ready, then sleeps: only SIGKILL to the whole group ends it.
STUBBORN = f"""
import signal, subprocess, sys, time
signal.signal(signal.SIGTERM, signal.SIG_IGN)
child = "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); print('child ready', flush=True); time.sleep(600)"
kids = [subprocess.Popen([{PY!r}, "-c", child], stdout=subprocess.PIPE) for _ in range(2)]
for kid in kids:
    kid.stdout.readline()
print("all ready", flush=True)
time.sleep(600)
"""


def test_timeout_kills_a_group_whose_processes_ignore_sigterm(tmp_path: Path, pgids: list[int]) -> None:
    started = time.monotonic()
    out = run(python(STUBBORN, timeout=1.5), tmp_path, grace=0.3, pgids=pgids)
    assert out.status == "timeout"
    assert "all ready" in out.log.head_text()  # the children really were running
    assert out.exit_code == -9  # SIGTERM was ignored; SIGKILL ended it
    assert time.monotonic() - started < 5.0
    assert group_is_gone(pgids[0]), "a process of the test's group survived"


def test_children_left_behind_after_a_normal_exit_are_killed(tmp_path: Path, pgids: list[int]) -> None:
    # The leader exits at once; its child holds the log pipe open and would hang the reader.
    code = (
        "import subprocess, sys; "
        f"subprocess.Popen([{PY!r}, '-c', 'import time; time.sleep(600)']); print('leader done')"
    )
    started = time.monotonic()
    out = run(python(code), tmp_path, pgids=pgids)
    assert (out.status, out.exit_code) == ("passed", 0)
    assert time.monotonic() - started < 4.0
    assert group_is_gone(pgids[0])


def test_a_hundred_megabytes_of_output_complete_with_a_bounded_log(tmp_path: Path) -> None:
    code = "import sys\nblock = (b'0123456789abcdef' * 65536)\nfor _ in range(100): sys.stdout.buffer.write(block)\n"
    out = run(python(code, timeout=60), tmp_path)
    assert (out.status, out.exit_code) == ("passed", 0)
    assert out.log.total == 100 * 1024 * 1024
    assert len(out.log.head) == LOG_HEAD_BYTES
    assert len(out.log.tail_text().encode()) == LOG_TAIL_BYTES
    assert out.log.tail_size <= LOG_TAIL_BYTES + CHUNK
    assert len(out.log.full_compressed()) <= LOG_FULL_MAX_COMPRESSED


def test_cancel_stops_the_command(tmp_path: Path, pgids: list[int]) -> None:
    cancel = threading.Event()
    timer = threading.Timer(0.3, cancel.set)
    timer.start()
    try:
        out = run(python("import time; time.sleep(600)"), tmp_path, cancel=cancel, pgids=pgids)
    finally:
        timer.cancel()
    assert (out.status, out.reason) == ("cancelled", "cancelled")
    assert out.duration_s < 3.0
    assert group_is_gone(pgids[0])


def test_test_env_is_built_from_scratch(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("VOLT_AMQP_URL", "amqp://volt:hunter2@mq/%2F")
    monkeypatch.setenv("VOLT_NAMESPACE", "prod")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "s3cr3t")  # whatever else the runner was given
    monkeypatch.setenv("LANG", "C.UTF-8")
    env = child_env({"VOLT_JUNIT_XML": str(tmp_path / "junit.xml"), "EXTRA": "1"})
    assert "VOLT_AMQP_URL" not in env
    out = run(python("import json, os; print(json.dumps(dict(os.environ)))"), tmp_path, env=env)
    seen = json.loads(out.log.head_text())
    assert "VOLT_AMQP_URL" not in seen
    assert "VOLT_NAMESPACE" not in seen
    assert "hunter2" not in out.log.head_text() and "s3cr3t" not in out.log.head_text()
    assert "AWS_SECRET_ACCESS_KEY" not in seen
    assert (seen["LANG"], seen["PATH"], seen["CI"]) == ("C.UTF-8", os.environ["PATH"], "true")
    assert seen["VOLT_JUNIT_XML"] == str(tmp_path / "junit.xml")  # what the runner itself passes on
    assert (seen["EXTRA"], seen["CI"]) == ("1", "true")


def test_string_commands_are_not_run_through_a_shell(tmp_path: Path) -> None:
    (tmp_path / ".volt.toml").write_text(
        f"[test]\ncommand = '{PY} -c \"import sys; print(sys.argv[1:])\" ; touch pwned'\n"
    )
    config = load_config(tmp_path, tmp_path / "junit.xml", 10.0)
    out = run(config, tmp_path)
    assert out.status == "passed"
    assert "[';', 'touch', 'pwned']" in out.log.head_text()
    assert not (tmp_path / "pwned").exists()
