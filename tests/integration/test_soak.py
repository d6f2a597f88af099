"""Soak: 200 commits through 3 runners while runners and the dispatcher keep getting killed."""

from __future__ import annotations

import random
import time
from collections import Counter

from support import pids

from common.broker import Broker
from observer.publish import publish_commit

COMMITS = 200


def test_200_commits_under_chaos_end_with_exactly_200_results(volt, repo, tmp_path):
    runs = tmp_path / "runs"
    code = f"import os; open({str(runs)!r}, 'a').write(str(os.getpid()) + chr(10))"
    repo.commit({".volt.toml": f"[test]\ncommand = ['python3', '-c', {code!r}]\n"})
    shas = [repo.commit({"n.txt": str(i)}, f"soak {i}") for i in range(COMMITS)]
    volt.dispatcher("--max-attempts", "10")
    runners = ["soak-a", "soak-b", "soak-c"]
    for rid in runners:
        volt.runner(rid, heartbeat=0.5)
    volt.wait_for("three runners", lambda: len(volt.ask("status")["runners"]) == 3)

    broker: Broker = volt.broker
    for sha in shas:
        publish_commit(broker, str(repo.path), "main", sha, source="soak")
    started = time.monotonic()
    rng = random.Random(7)
    kills = Counter[str]()
    dispatcher_kills_at = [COMMITS * 3 // 10, COMMITS * 65 // 100]
    next_chaos = time.monotonic() + 1.0
    done = 0
    while done < COMMITS:
        assert time.monotonic() - started < 300, f"only {done} of {COMMITS} results after 300s"
        if time.monotonic() >= next_chaos:
            victim = rng.choice(runners)
            volt.kill(victim)
            volt.runner(victim, heartbeat=0.5)
            kills["runner"] += 1
            next_chaos = time.monotonic() + rng.uniform(1.0, 3.0)
        if dispatcher_kills_at and done >= dispatcher_kills_at[0]:
            dispatcher_kills_at.pop(0)
            volt.kill("dispatcher")
            kills["dispatcher"] += 1
            time.sleep(1.0)  # the fault: a second with no dispatcher, while runners finish jobs
            volt.dispatcher("--max-attempts", "10")
        try:
            done = len(volt.results())
        except Exception:  # noqa: BLE001 - the dispatcher may be down right now
            pass
        time.sleep(0.3)
    elapsed = time.monotonic() - started

    rows = volt.results()
    assert len(rows) == COMMITS
    assert sorted(r["commit"] for r in rows) == sorted(shas)
    results_per_job = Counter(sum(e["kind"] == "result" for e in r["history"]) for r in rows)
    assert results_per_job == {1: COMMITS}  # 0 lost, 0 doubled
    statuses = Counter(r["status"] for r in rows)
    retried = sum(r["attempts"] > 1 for r in rows)
    late = sum(e["kind"] == "late_result" for r in rows for e in r["history"])
    print(
        f"\nsoak: {COMMITS} commits, {len(rows)} terminal results in {elapsed:.1f}s; statuses {dict(statuses)}; "
        f"{kills['runner']} runner kills, {kills['dispatcher']} dispatcher kills; {retried} jobs retried; "
        f"{late} late results kept as history; {len(pids(runs))} test runs"
    )
    assert statuses["passed"] == COMMITS
    assert kills["dispatcher"] == 2 and kills["runner"] >= 3
