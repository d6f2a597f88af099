"""The `volt` query commands as a user meets them: real processes on a real broker.

Quiet on success, one line on failure and at once, ended quietly by a closed
pipe, honest about how many results there are, within their timeout while
the broker blocks publishers; and `volt dead-letters`.
"""

from __future__ import annotations

import base64
import json
import os
import subprocess
import sys
import time
import zlib
from pathlib import Path

from support import GitRepo, Volt, finished_job, free_port, rabbit_node

from common import naming
from common.broker import Broker, shared_queue_arguments
from common.cli import ONE_SHOT, build_parser
from common.messages import MAX_MESSAGE_BYTES, CommitSeen, Job, JobResult
from dispatcher.store import Store

REPO = "/srv/git/app"


def argv(volt: Volt, *args: str, url: str | None = None, ns: str | None = None) -> list[str]:
    """A `volt` command line as a user types it: no --log-level."""
    return [
        sys.executable,
        "-m",
        "common.cli",
        *args,
        "--amqp-url",
        url or volt.amqp_url,
        "--namespace",
        ns or volt.ns,
    ]


def env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if not k.startswith("VOLT_")}


def run(volt: Volt, *args: str, url: str | None = None, ns: str | None = None, timeout: float = 60):
    started = time.monotonic()
    done = subprocess.run(
        argv(volt, *args, url=url, ns=ns), capture_output=True, text=True, timeout=timeout, env=env(), cwd=volt.tmp
    )
    return done, time.monotonic() - started


def finished_jobs(db: Path, count: int, log: bytes | None = None) -> list[str]:
    """`count` finished jobs written straight into a dispatcher's store, newest last."""
    store = Store(db)
    ids = []
    for i in range(count):
        row = store.add_job(CommitSeen(repo=REPO, branch="main", commit=f"{i:08x}" + "e" * 32, seen_at=1000.0 + i))
        store.mark_queued(row.job_id, 1, 1001.0 + i)
        lease = store.assign(row.job_id, 1, "r1", 1002.0 + i)
        assert lease
        assert store.start(row.job_id, lease, "r1", "s", started_at=1003.0 + i, now=1003.0 + i)
        extra = {}
        if log is not None:
            extra = {
                "log_head": log[:65536].decode(errors="replace"),
                "log_tail": log[-65536:].decode(errors="replace"),
                "log_bytes": len(log),
                "log_full": base64.b64encode(zlib.compress(log, 9)).decode(),
            }
        assert store.finish(
            JobResult(job_id=row.job_id, attempt=1, runner_id="r1", status="passed", passed=1, lease=lease, **extra),
            1004.0 + i,
        )
        ids.append(row.job_id)
    store.close()
    return ids


def test_query_commands_print_only_their_answer(volt: Volt) -> None:
    finished_jobs(volt.tmp / "dispatcher.db", 3)
    volt.dispatcher()
    volt.wait_for("the dispatcher", lambda: volt.ask("ping"))
    for args in (("status",), ("results",), ("check",), ("results", "--json"), ("dead-letters", "list")):
        done, _ = run(volt, *args)
        assert done.returncode == 0, done.stderr
        assert done.stderr == "", (args, done.stderr)  # no "INFO ... connected to" line
        assert done.stdout
    # --log-level still asks for more.
    loud = subprocess.run([*argv(volt, "status"), "--log-level", "INFO"], capture_output=True, text=True, env=env())
    assert "INFO" in loud.stderr and "connected to" in loud.stderr


def one_line(done: subprocess.CompletedProcess[str]) -> str:
    assert done.stdout == "" and done.stderr.count("\n") == 1, (done.stdout, done.stderr)
    assert "Traceback" not in done.stderr
    return done.stderr.strip()


def test_a_refused_login_a_refused_connection_and_no_dispatcher_fail_at_once(volt: Volt) -> None:
    bad_login = volt.amqp_url.replace("guest:guest@", "guest:wrong@")
    done, took = run(volt, "status", url=bad_login)
    assert done.returncode == 1 and took < 4, took
    assert "authentication refused" in one_line(done) and "wrong" not in done.stderr

    closed = f"amqp://guest:guest@127.0.0.1:{free_port()}/%2F"
    done, took = run(volt, "results", url=closed)
    assert done.returncode == 1 and took < 4, took
    assert "Connection refused" in one_line(done)

    # A namespace nobody ever ran a dispatcher in, and one whose dispatcher is gone.
    for args in (("status",), ("results",), ("log", "abcd1234"), ("runner-ctl", "pause", "r1")):
        done, took = run(volt, *args, ns=f"{volt.ns}x")
        assert done.returncode == 1 and took < 4, (args, took)
        line = one_line(done)
        assert f"no dispatcher is running in namespace '{volt.ns}x'" in line and "NOT_FOUND" not in line
    volt.dispatcher()
    volt.wait_for("the dispatcher", lambda: volt.ask("ping"))
    volt.kill("dispatcher")
    done, took = run(volt, "status")
    assert done.returncode == 1 and took < 4, took
    assert f"no dispatcher is running in namespace '{volt.ns}'" in one_line(done)
    check, took = run(volt, "check", "--timeout", "30")
    assert check.returncode == 1 and took < 4, took
    assert check.stdout.startswith("unhealthy: no dispatcher is running") and check.stderr == ""


def test_a_script_can_ask_a_dispatcher_it_has_just_started(volt: Volt) -> None:
    volt.dispatcher()
    # No wait_for around it: ask() waits (up to its timeout) for the dispatcher to listen.
    assert volt.ask("ping", timeout=30)["runners"] == 0


def test_a_closed_pipe_ends_results_quietly(volt: Volt) -> None:
    finished_jobs(volt.tmp / "dispatcher.db", 5)
    volt.dispatcher()
    volt.wait_for("the dispatcher", lambda: volt.ask("ping"))
    # `volt results | head -1` with head gone before the first line: the pipe is closed.
    reader, writer = os.pipe()
    proc = subprocess.Popen(argv(volt, "results"), stdout=writer, stderr=subprocess.PIPE, env=env(), cwd=volt.tmp)
    os.close(writer)
    os.close(reader)
    _, err = proc.communicate(timeout=60)
    assert err == b"", err.decode()
    assert proc.returncode == 141


def test_results_say_when_they_show_fewer_than_there_are(volt: Volt) -> None:
    finished_jobs(volt.tmp / "dispatcher.db", 60)
    volt.dispatcher()
    volt.wait_for("the dispatcher", lambda: volt.ask("ping"))
    done, _ = run(volt, "results")
    lines = done.stdout.splitlines()
    assert len(lines) == 51 and lines[-1] == "showing 50 of 60; --limit N shows more"
    done, _ = run(volt, "results", "--limit", "60")
    assert len(done.stdout.splitlines()) == 60 and "showing" not in done.stdout
    listed, _ = run(volt, "results", "--json", "--limit", "10")
    assert len(json.loads(listed.stdout)) == 10
    assert listed.stderr == "volt results: showing 10 of 60; --limit N shows more\n"
    bad, _ = run(volt, "results", "--limit", "0")
    assert bad.returncode == 2 and "must be from 1 to 10000" in bad.stderr


def test_volt_tests_tells_since_when_a_test_fails_and_which_tests_flake(volt: Volt) -> None:
    hostile = "tests/test_a.py::test_x[\x1b[2J\x1b]0;pwned\x07]"
    store = Store(volt.tmp / "dispatcher.db")
    plan = [("passed", "passed"), ("passed", "flaky"), ("failed", "flaky"), ("failed", "passed")]
    shas = [f"{i + 1:040x}" for i in range(len(plan))]
    for i, (outcome, other) in enumerate(plan):
        tests = [(hostile, outcome, 1.0 + i), ("t::flaky", other, 0.5)]
        finished_job(store, REPO, "main", shas[i], 1000.0 + i, outcome, tests, f"change {i}\x1b[31m", "Ada", split=2)
    store.close()
    volt.dispatcher()
    volt.wait_for("the dispatcher", lambda: volt.ask("ping"))

    done, _ = run(volt, "tests", "--repo", REPO, "--branch", "main")
    assert done.returncode == 0 and done.stderr == "", done.stderr
    assert "\x1b" not in done.stdout and "\x07" not in done.stdout  # nothing for the terminal to act on
    lines = done.stdout.splitlines()
    assert (
        lines[0]
        == f"latest finished job on main of {REPO}: {shas[3][:12]} (change 3 [31m) failed, job "
        + (lines[0].rsplit(" ", 1)[-1])
    )
    assert lines[1:] == [
        "1 failing:",
        "  tests/test_a.py::test_x[ [2J ]0;pwned ]",
        f"      failing since {shas[2][:12]} (change 2 [31m); passed before on {shas[1][:12]} (change 1 [31m)",
    ]

    done, _ = run(volt, "tests", "--repo", REPO, "--test", hostile, "--limit", "3")
    lines = done.stdout.splitlines()
    assert lines[1].startswith(f"failing since {shas[2][:12]}")
    assert lines[2] == "duration: median 2.50 s over the last 4 runs"  # fewer than 10: no "before" yet
    assert [line.split()[:2] for line in lines[3:6]] == [
        [shas[3][:12], "failed"],
        [shas[2][:12], "failed"],
        [shas[1][:12], "passed"],
    ]
    assert lines[6] == "showing 3 of 4; --limit N shows more"

    done, _ = run(volt, "tests", "--repo", REPO, "--flaky", "--json")
    assert json.loads(done.stdout)["flaky"] == [{"test": "t::flaky", "flaky_runs": 2}]
    done, _ = run(volt, "tests", "--repo", REPO, "--flaky")
    assert done.stdout.splitlines() == [f"flaky tests in the last 4 finished jobs in {REPO}:", "     2  t::flaky"]
    bad, _ = run(volt, "tests", "--repo", REPO, "--flaky", "--test", "t::x")
    assert bad.returncode != 0 and bad.stderr.strip() == "volt tests: --flaky and --test do not go together"


def test_a_log_of_wide_characters_comes_back_cut_to_fit(volt: Volt) -> None:
    log = ("\U0001d11e" * 1023 + "\n").encode() * 5 * 1024  # 20 MiB in 5 Mi characters
    assert len(log) > MAX_MESSAGE_BYTES
    (job,) = finished_jobs(volt.tmp / "dispatcher.db", 1, log=log)
    volt.dispatcher()
    volt.wait_for("the dispatcher", lambda: volt.ask("ping"))
    done, _ = run(volt, "log", job)
    assert done.returncode == 0, done.stderr
    assert "is more than one reply holds" in done.stderr and f"/jobs/{job}/log.txt" in done.stderr
    assert done.stdout.startswith("\U0001d11e" * 100) and "bytes not in this reply ...]" in done.stdout
    assert len(done.stdout.encode()) < 200_000


def test_every_flag_of_the_query_commands_says_its_default() -> None:
    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "command")
    for name in sorted(ONE_SHOT):
        for action in sub.choices[name]._actions:  # type: ignore[union-attr]
            if not action.option_strings or action.dest == "help":
                continue
            assert action.help and "default" in action.help, (name, action.option_strings)


def test_one_shot_commands_keep_their_timeout_while_the_broker_blocks_publishers(tmp_path: Path) -> None:
    with rabbit_node() as node:
        volt = Volt(node.url, "blocked", tmp_path)
        try:
            volt.dispatcher()
            volt.wait_for("the dispatcher", lambda: volt.ask("ping"))
            alarm = ["rabbitmqctl", "-n", node.name, "set_vm_memory_high_watermark"]
            subprocess.run([*alarm, "absolute", "1"], check=True, capture_output=True, timeout=60)
            try:
                for args, code in ((("status", "--timeout", "3"), 1), (("check", "--timeout", "3"), 1)):
                    done, took = run(volt, *args, url=node.url, ns="blocked", timeout=60)
                    assert took < 3 + 2, (args, took, done.stdout, done.stderr)
                    assert done.returncode == code, (done.stdout, done.stderr)
                    said = done.stdout + done.stderr
                    assert said.count("\n") == 1 and "blocking publishers" in said, said
                    assert "memory or disk alarm" in said
            finally:
                subprocess.run([*alarm, "0.4"], check=True, capture_output=True, timeout=60)
            done, _ = run(volt, "status", url=node.url, ns="blocked")
            assert done.returncode == 0, done.stderr
        finally:
            volt.stop_all()


def test_runner_state_shows_in_status_without_its_queue_depth(volt: Volt, repo: GitRepo) -> None:
    volt.dispatcher()
    volt.runner("st-q", "--allow-repo", str(repo.path))
    volt.wait_for("the runner", lambda: volt.ask("status")["runners"])
    (runner,) = volt.ask("status")["runners"]
    assert runner["queue"] == {"name": f"{volt.ns}.runner.st-q"} and runner["state"] == "idle"


# -- volt dead-letters -----------------------------------------------------------


def letters(volt: Volt) -> dict:
    done, _ = run(volt, "dead-letters", "list", "--json", "--limit", "100")
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def redeclare_refused(volt: Volt, queue: str, arguments: dict | None) -> bool:
    """Whether RabbitMQ refuses to declare `queue` with these arguments (it refuses other ones)."""
    broker = Broker(volt.settings, "volt-test-args")
    broker.connect(give_up_after=10)
    try:
        broker._channel().queue_declare(queue, durable=True, arguments=arguments)
        return False
    except Exception as exc:  # pika's ChannelClosedByBroker: pika stays inside common/broker.py
        assert "PRECONDITION_FAILED" in str(exc), exc
        return True
    finally:
        broker.close()


def test_dead_letters_are_listed_replayed_where_they_came_from_and_purged(volt: Volt, repo: GitRepo) -> None:
    ns = volt.ns
    dead = naming.dead_letter_queue(ns)
    volt.dispatcher()
    volt.wait_for("the dispatcher", lambda: volt.ask("ping"))
    b = volt.broker
    # One no worker can use: the dispatcher moves it to the dead letters itself.
    b.publish(naming.commits_exchange(ns), "", b"\xff not json")
    # A good commit dead-lettered by a failure since mended (a full disk, once).
    sha = repo.commit({"tests/test_one.py": "def test_one():\n    pass\n"})
    seen = CommitSeen(repo=str(repo.path), branch="main", commit=sha, seen_at=time.time())
    why = {
        "x-volt-reason": "dispatcher error: database or disk is full",
        "x-volt-queue": naming.dispatcher_commits_queue(ns),
    }
    b.publish(naming.dead_letter_exchange(ns), "", seen, headers=why)
    # Two jobs the broker dead-lettered (rejected) from runner queues: x-death names their route.
    volt.runner_ids.update({"dl-here", "dl-gone"})
    for rid in ("dl-here", "dl-gone"):
        queue = b.declare_runner_queue(rid)
        job = Job(job_id=f"job-{rid}", attempt=1, repo=str(repo.path), branch="main", commit=sha)
        b.publish(naming.jobs_exchange(ns), naming.runner_routing_key(rid), job)
        got = volt.wait_for("the job", lambda q=queue: b.get(q))
        got.reject()
    b.delete_queue(naming.runner_queue(ns, "dl-gone"))
    volt.wait_for("four dead letters", lambda: b.queue_depth(dead) == (4, 0))

    done, _ = run(volt, "dead-letters", "list")
    assert done.returncode == 0 and done.stderr == "", done.stderr
    out = done.stdout
    assert out.startswith(f"4 dead letter(s) in {dead}, the oldest 4:")
    assert f"from {naming.dispatcher_commits_queue(ns)}: not UTF-8 JSON" in out
    assert "database or disk is full" in out and f'"commit":"{sha[:8]}' in out  # reason, preview
    assert f"from {naming.runner_queue(ns, 'dl-here')}: rejected by the broker (x-death)" in out
    assert "\\xff not json" in out  # a preview cannot put raw bytes on the terminal
    listed = letters(volt)["letters"]
    assert [x["exchange"] for x in listed] == [naming.commits_exchange(ns)] * 2 + [naming.jobs_exchange(ns)] * 2
    assert listed[2]["routing_key"] == naming.runner_routing_key("dl-here")
    assert b.queue_depth(dead) == (4, 0)  # listing takes nothing away
    first, _ = run(volt, "dead-letters", "list", "--limit", "1")
    assert first.stdout.count(". from ") == 1

    done, _ = run(volt, "dead-letters", "replay")
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith(f"replayed 3 of 4 dead letter(s) from {dead}\n")
    assert f"kept one from {naming.runner_queue(ns, 'dl-gone')}" in done.stdout
    assert f"no queue takes it any more from {naming.jobs_exchange(ns)}" in done.stdout
    # Each went back where it came from: the commit became a job, the job is in its runner's
    # queue, and the message nobody can read came back once more, marked as replayed.
    volt.wait_for("the replayed commit's job", lambda: volt.results(commit=sha, done_only=False))
    assert b.queue_depth(naming.runner_queue(ns, "dl-here")) == (1, 0)
    volt.wait_for("the unreadable one back", lambda: b.queue_depth(dead) == (2, 0))
    again = letters(volt)["letters"]
    assert sorted((x["queue"], x["replayed"]) for x in again) == [
        (naming.dispatcher_commits_queue(ns), 1),
        (naming.runner_queue(ns, "dl-gone"), 0),
    ]

    done, _ = run(volt, "dead-letters", "purge", "--json")
    assert json.loads(done.stdout) == {"queue": dead, "purged": 2}
    assert b.queue_depth(dead) == (0, 0)
    assert volt.procs["dispatcher"].poll() is None

    # The queue holds at most DEAD_LETTER_MAX_LENGTH: RabbitMQ refuses the same queue without it.
    arguments = shared_queue_arguments(ns, volt.settings.queue_type)[dead]
    assert not redeclare_refused(volt, dead, arguments)
    assert redeclare_refused(volt, dead, {k: v for k, v in arguments.items() if k != "x-max-length"})


def test_a_dead_letter_queue_from_before_the_max_length_keeps_working(volt: Volt) -> None:
    dead = naming.dead_letter_queue(volt.ns)
    assert not redeclare_refused(volt, dead, None)  # as an older Volt CI declared it
    volt.dispatcher()
    volt.wait_for("the dispatcher", lambda: volt.ask("ping"))
    volt.broker.publish(naming.commits_exchange(volt.ns), "", b"\xff not json")
    volt.wait_for("the dead letter", lambda: volt.broker.queue_depth(dead) == (1, 0))
    assert letters(volt)["count"] == 1
    warned = [line for line in volt.log_of("dispatcher").splitlines() if "without this version's max length" in line]
    assert len(warned) == 1 and "WARNING" in warned[0], warned
    assert volt.procs["dispatcher"].poll() is None
