"""Soak: 200 commits through 3 runners on a RabbitMQ node of the test's own, while
everything is broken on a schedule: runners killed and frozen, the dispatcher
killed during bursts, every connection closed by the broker, and a 20 s
memory alarm. What ran is counted as well as what was recorded."""

from __future__ import annotations

import random
import signal
import subprocess
import time
from collections import Counter
from collections.abc import Callable
from datetime import datetime

from support import GitRepo, Node, Volt, all_overlaps, commit_suite, many_commits, rabbit_node, runs_per_commit

from common.broker import Broker, BrokerError
from observer.publish import publish_commit

COMMITS = 200
BURSTS = 5
RUNNERS = ["soak-a", "soak-b", "soak-c"]
ALARM_AT, ALARM_FOR = 23.0, 20.0
# After the alarm ends, runners get a fresh grace: a loss this soon after it is the alarm's.
AFTER_ALARM = 5.0
DEADLINE = 200.0


class Feeder:
    """Publishes commits, confirmed, reconnecting when the broker closes its connection."""

    def __init__(self, volt: Volt) -> None:
        self.volt = volt
        self.broker: Broker | None = None
        self.retries = 0

    def publish(self, repo: str, sha: str) -> None:
        for _ in range(20):
            try:
                if self.broker is None:
                    self.broker = Broker(self.volt.settings, "volt-soak-feeder")
                    self.broker.connect(give_up_after=10)
                publish_commit(self.broker, repo, "main", sha, source="soak")
                return
            except BrokerError:
                # It may have arrived all the same: a second copy makes no second job.
                self.retries += 1
                if self.broker is not None:
                    self.broker.close()
                self.broker = None
        raise AssertionError(f"could not publish {sha} in 20 tries")


def lines_between(log: str, text: str, start: float, end: float) -> list[str]:
    """The lines of a log that hold `text` and were logged between two wall times."""
    found = []
    for line in log.splitlines():
        if text not in line:
            continue
        at = datetime.strptime(line[:23], "%Y-%m-%d %H:%M:%S,%f").timestamp()
        if start <= at <= end:
            found.append(line)
    return found


def ctl(node: Node, *args: str) -> None:
    done = subprocess.run(["rabbitmqctl", "-n", node.name, *args], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr


def test_200_commits_under_chaos_each_run_never_twice_at_once_and_recorded_once(tmp_path):
    repo = GitRepo(tmp_path / "repo")
    runs = tmp_path / "runs"
    # About one commit in ten runs long enough to be caught running by a freeze or a kill.
    repo.commit(commit_suite(runs, sleep=0.2, slow=2.0, slow_share=0.1))
    shas = many_commits(repo, COMMITS)
    bursts = [shas[i::BURSTS] for i in range(BURSTS)]
    rng = random.Random(7)
    counts = Counter[str]()
    with rabbit_node() as node:
        volt = Volt(node.url, "soak", tmp_path)
        feeder = Feeder(volt)
        try:
            volt.dispatcher("--max-attempts", "10")
            for rid in RUNNERS:
                volt.runner(rid, heartbeat=0.5)
            volt.wait_for("three runners", lambda: len(volt.ask("status")["runners"]) == 3)

            alarm: dict[str, float] = {}
            stopped: dict[str, float] = {}  # runner -> when to SIGCONT it

            def burst(i: int) -> Callable[[], None]:
                def go() -> None:
                    for sha in bursts[i]:
                        feeder.publish(str(repo.path), sha)
                    counts["bursts"] += 1

                return go

            def kill_dispatcher() -> None:
                volt.kill("dispatcher")
                counts["dispatcher kills"] += 1
                volt.dispatcher("--max-attempts", "10")

            def kill_runner(rid: str) -> Callable[[], None]:
                def go() -> None:
                    volt.kill(rid)
                    counts["runner kills"] += 1
                    volt.runner(rid, heartbeat=0.5)

                return go

            def freeze(rid: str) -> Callable[[], None]:
                def go() -> None:
                    volt.procs[rid].send_signal(signal.SIGSTOP)
                    stopped[rid] = time.monotonic() + rng.uniform(2.0, 4.0)
                    counts["runner freezes"] += 1

                return go

            def flap() -> None:
                ctl(node, "close_all_connections", "test")
                counts["connection flaps"] += 1

            def alarm_on() -> None:
                ctl(node, "set_vm_memory_high_watermark", "absolute", "1")
                alarm["start"] = time.time()

            def alarm_off() -> None:
                ctl(node, "set_vm_memory_high_watermark", "0.4")
                alarm["end"] = time.time()

            # What breaks when: busy until the alarm, quiet just before and after
            # it (so a runner lost then could only be the alarm's doing), then busy again.
            schedule: list[tuple[float, Callable[[], None]]] = [
                (0.0, burst(0)),
                (0.3, kill_dispatcher),
                (2.0, kill_runner("soak-a")),
                (4.0, flap),
                (5.0, freeze("soak-b")),
                (8.0, burst(1)),
                (10.0, flap),
                (12.0, kill_runner("soak-c")),
                (14.0, burst(2)),
                (14.3, kill_dispatcher),
                (16.0, freeze("soak-a")),
                (20.0, burst(3)),
                (ALARM_AT, alarm_on),
                (ALARM_AT + ALARM_FOR, alarm_off),
                (ALARM_AT + ALARM_FOR + AFTER_ALARM, burst(4)),
                (ALARM_AT + ALARM_FOR + AFTER_ALARM + 0.3, kill_dispatcher),
                (ALARM_AT + ALARM_FOR + AFTER_ALARM + 2.0, kill_runner("soak-b")),
                (ALARM_AT + ALARM_FOR + AFTER_ALARM + 3.0, flap),
                (ALARM_AT + ALARM_FOR + AFTER_ALARM + 4.0, freeze("soak-c")),
                (ALARM_AT + ALARM_FOR + AFTER_ALARM + 9.0, flap),
            ]
            started = time.monotonic()
            done = 0
            next_look = 0.0
            while done < COMMITS or schedule or stopped:
                now = time.monotonic() - started
                assert now < DEADLINE, f"only {done} of {COMMITS} results after {DEADLINE:.0f}s"
                while schedule and schedule[0][0] <= now:
                    schedule.pop(0)[1]()
                for rid, until in list(stopped.items()):
                    if time.monotonic() >= until:
                        volt.procs[rid].send_signal(signal.SIGCONT)
                        del stopped[rid]
                in_alarm = "start" in alarm and "end" not in alarm
                if not in_alarm and now >= next_look:  # a question would wait out the alarm
                    try:
                        done = len(volt.results())
                    except Exception:  # noqa: BLE001 - the dispatcher may be down or reconnecting
                        pass
                    next_look = now + 0.5
                time.sleep(0.05)  # the schedule's tick
            elapsed = time.monotonic() - started
            rows = volt.results()
            every_job = volt.results(done_only=False)
        finally:
            volt.stop_all()

    log = volt.log_of("dispatcher")
    per_commit = runs_per_commit(runs)
    window = (alarm["start"], alarm["end"] + AFTER_ALARM)
    lost_in_alarm = lines_between(log, "lost (no heartbeat", *window)
    # Nor did a runner stop its own run for want of renewals the broker held back:
    # the dispatcher took nothing away meanwhile (reported once the alarm is over).
    given_up_in_alarm = lines_between(log, "gave it up: lease lost", *window)
    results_per_job = Counter(sum(e["kind"] == "result" for e in r["history"]) for r in rows)
    retried = sum(r["attempts"] > 1 for r in rows)
    late = sum(e["kind"] in ("late_result", "late_abandoned") for r in rows for e in r["history"])
    print(
        f"\nsoak: {COMMITS} commits, {len(rows)} results, {sum(per_commit.values())} runs "
        f"({sum(n > 1 for n in per_commit.values())} commits ran more than once, {retried} retried), "
        f"{len(all_overlaps(runs))} overlaps; {counts['runner kills']} runner kills, "
        f"{counts['runner freezes']} freezes, {counts['dispatcher kills']} dispatcher kills, "
        f"{counts['connection flaps']} flaps, one {ALARM_FOR:.0f}s alarm with {len(lost_in_alarm)} runners lost "
        f"and {len(given_up_in_alarm)} runs stopped in it; "
        f"{late} late reports kept as history; {feeder.retries} publishes retried; {elapsed:.1f}s"
    )
    assert len(every_job) == COMMITS and sorted(r["commit"] for r in rows) == sorted(shas)  # 0 lost
    assert results_per_job == {1: COMMITS}  # 0 doubled
    assert Counter(r["status"] for r in rows) == {"passed": COMMITS}
    assert all_overlaps(runs) == {}  # no job ran twice at the same time
    assert set(per_commit) == set(shas)
    assert lost_in_alarm == [], "\n".join(lost_in_alarm)
    assert given_up_in_alarm == [], "\n".join(given_up_in_alarm)
    assert counts == {
        "bursts": BURSTS,
        "dispatcher kills": 3,
        "runner kills": 3,
        "runner freezes": 3,
        "connection flaps": 4,
    }
    for name in volt.procs:
        assert "PRECONDITION_FAILED" not in volt.log_of(name), name
