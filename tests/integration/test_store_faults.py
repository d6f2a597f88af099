"""The dispatcher's store breaks under it: a full disk is waited out, a deleted file stops it.

A write the disk refuses is not the message's fault: nothing is
dead-lettered, nothing of the round is acked, and the round is retried
until the disk has room again; `recorded` is only said of what is on disk.
"""

from __future__ import annotations

import errno
import re
import subprocess
import threading
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest
from support import all_overlaps, commit_suite, many_commits, runs_per_commit

from common import naming
from common.broker import Broker
from observer.publish import publish_commit

COMMITS = 60
TROUBLE = ("database or disk is full", "disk I/O error")


def store_failures(log: str) -> list[str]:
    """The lines that tell of the store's trouble: one per failed round or set-up."""
    return [line for line in log.splitlines() if any(t in line for t in TROUBLE)]


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A 4 MiB tmpfs of the test's own (the tests run as root)."""
    mount = tmp_path / "disk"
    mount.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(mount)], check=True, capture_output=True)
    try:
        yield mount
    finally:
        # Lazily: a process the test failed to stop must not leave the mount behind.
        subprocess.run(["umount", "-l", str(mount)], check=False, capture_output=True)


def fill(disk: Path) -> Path:
    """Write a file until the disk has no room left; returns it."""
    filler = disk / "filler"
    with open(filler, "wb", buffering=0) as f:
        chunk = b"\0" * 65536
        while True:
            try:
                f.write(chunk)
            except OSError as exc:
                assert exc.errno == errno.ENOSPC, exc
                if len(chunk) == 1:
                    break
                chunk = chunk[: len(chunk) // 16] or b"\0"
    return filler


def test_a_full_disk_under_the_dispatcher_is_waited_out_and_every_commit_gets_one_result(
    volt, repo, tmp_path, small_disk
):
    runs = tmp_path / "runs"
    repo.commit(commit_suite(runs, sleep=0.05))
    shas = many_commits(repo, COMMITS)
    try:
        dispatcher = volt.start("dispatcher", "dispatcher", "--db", str(small_disk / "dispatcher.db"))
        volt.runner("disk-a")
        volt.runner("disk-b")
        volt.wait_for("two runners", lambda: len(volt.ask("status")["runners"]) == 2)
        broker = volt.broker

        # Commits keep coming, one every 50 ms, through the whole outage, on a
        # connection of the feeder's own.
        def feed() -> None:
            b = Broker(volt.settings, "volt-test-feeder")
            b.connect(give_up_after=10)
            for sha in shas:
                publish_commit(b, str(repo.path), "main", sha, source="disk")
                time.sleep(0.05)
            b.close()

        feeder = threading.Thread(target=feed, daemon=True)
        feeder.start()
        volt.wait_results(10, timeout=60)
        filler = fill(small_disk)
        full_at = time.monotonic()
        volt.wait_for(
            "the dispatcher to fail three rounds on the full disk",
            lambda: len(store_failures(volt.log_of("dispatcher"))) >= 3,
            timeout=60,
        )
        assert dispatcher.poll() is None, "the dispatcher died of a full disk"
        # The dispatcher does not answer while it backs off; the broker says what waits.
        waiting = broker.queue_depth(naming.dispatcher_results_queue(volt.ns))
        filler.unlink()
        freed_at = time.monotonic()
        feeder.join(timeout=60)
        rows = volt.wait_results(COMMITS, timeout=120)
        back_after = time.monotonic() - freed_at
        assert dispatcher.poll() is None
    finally:
        volt.stop_all()

    log = volt.log_of("dispatcher")
    store_lines = store_failures(log)
    failures = len(store_lines)
    print(
        f"\nfull disk: {failures} failed rounds in {freed_at - full_at:.1f}s full; "
        f"{waiting} results waiting when it was freed; all {len(rows)} {back_after:.1f}s after"
    )
    assert sorted(r["commit"] for r in rows) == sorted(shas)
    assert Counter(sum(e["kind"] == "result" for e in r["history"]) for r in rows) == {1: COMMITS}
    assert Counter(r["status"] for r in rows) == {"passed": COMMITS}
    assert all_overlaps(runs) == {}
    assert sum(runs_per_commit(runs).values()) == COMMITS
    # Nothing was taken for a bad message.
    dead = broker.queue_depth(naming.dead_letter_queue(volt.ns))
    assert dead is not None and dead[0] == 0, dead
    assert "dead-lettering" not in log
    # One line per failure, and it says it is retried: each failure is one reconnect.
    assert all("; reconnecting in" in line for line in store_lines), "\n".join(store_lines)
    assert log.count("as volt-dispatcher") == 1 + failures, "\n".join(store_lines)
    # `recorded` only after the commit: a rolled-back write would be said twice.
    recorded = Counter(re.findall(r"job=(\w+) attempt=\d+ recorded", log))
    assert len(recorded) == COMMITS and set(recorded.values()) == {1}, recorded.most_common(3)
    assert "Traceback" not in log and "no transaction is active" not in log
    assert "stalled" not in log  # its own back-off is no stall


def test_the_store_file_deleted_under_a_running_dispatcher_stops_it_with_one_line(volt, repo, tmp_path):
    repo.commit({".volt.toml": "[test]\ncommand = ['true']\n"})
    (sha,) = many_commits(repo, 1)
    dispatcher = volt.dispatcher()
    volt.runner("gone-a")
    volt.wait_for("the runner", lambda: volt.ask("status")["runners"])
    publish_commit(volt.broker, str(repo.path), "main", sha, source="gone")
    volt.wait_results(1)
    (tmp_path / "dispatcher.db").unlink()
    assert dispatcher.wait(timeout=10) != 0
    log = volt.log_of("dispatcher").strip().splitlines()
    assert log[-1] == (
        f"volt dispatcher: the store {tmp_path / 'dispatcher.db'} was deleted or replaced while the dispatcher ran; "
        "stopping"
    ), log[-5:]
    assert "Traceback" not in volt.log_of("dispatcher")
