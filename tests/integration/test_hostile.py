"""Hostile repository content and forged jobs: a recorded error or timeout, never a dead runner."""

from __future__ import annotations

import json
import sys
import uuid

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from common import naming
from common.messages import TYPES, Job
from observer.publish import publish_commit


def command(code: str, timeout: float | None = None) -> dict[str, str]:
    toml = f"[test]\ncommand = [{sys.executable!r}, '-c', {code!r}]\n"
    if timeout is not None:
        toml += f"timeout = {timeout}\n"
    return {".volt.toml": toml}


def vm_hwm_kib(pid: int) -> int:
    for line in open(f"/proc/{pid}/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    raise AssertionError("no VmHWM")


def test_hostile_suites_end_as_results_and_the_runner_lives(volt, repo, tmp_path):
    noisy = "import sys\nline = b'x' * 1023 + b'\\n'\nfor i in range(100 * 1024):\n    sys.stdout.buffer.write(line)\nprint('THE END')\n"
    stubborn = (
        "import os, signal, time\n"
        "for _ in range(3):\n"
        "    if os.fork() == 0:\n"
        "        signal.signal(signal.SIGTERM, signal.SIG_IGN)\n"
        f"        open({str(tmp_path / 'children')!r}, 'a').write(str(os.getpid()) + chr(10))\n"
        "        time.sleep(600)\n"
        "signal.signal(signal.SIGTERM, signal.SIG_IGN)\n"
        "time.sleep(600)\n"
    )
    # The tree has no .git of the cache's: what a suite plants there is its own, and goes.
    vandal = "import shutil, os; os.path.isdir('.git') and shutil.rmtree('.git'); raise SystemExit(1)"
    corrupt = (
        "import os; os.makedirs('.git', exist_ok=True)\n"
        "open('.git/HEAD', 'w').write('garbage'); open('.git/index', 'wb').write(b'junk')"
    )
    hooked = tmp_path / "hook-ran"
    plant = (
        "import os\n"
        "os.makedirs('.git/hooks', exist_ok=True)\n"
        f"open('.git/hooks/post-checkout', 'w').write('#!/bin/sh\\ntouch {hooked}\\n')\n"
        "os.chmod('.git/hooks/post-checkout', 0o755)\n"
    )
    volt.dispatcher()
    runner = volt.runner("hostile-a", "--kill-grace", "1", "--allow-repo", str(repo.path))
    volt.wait_for("runner", lambda: volt.ask("status")["runners"])
    cases = [
        ("noisy", command(noisy), "passed"),
        ("stubborn", command(stubborn, timeout=2), "timeout"),
        ("vandal", command(vandal), "error"),
        ("after-vandal", command("print('fine')"), "passed"),
        ("corrupt", command(corrupt), "passed"),
        ("after-corrupt", command("print('fine again')"), "passed"),
        ("plant-hook", command(plant), "passed"),
        ("after-hook", command("print('no hook ran')"), "passed"),
    ]
    shas = {}
    for name, files, _ in cases:
        shas[name] = repo.commit(files, name)
        publish_commit(volt.broker, str(repo.path), "main", shas[name], source="test")
        volt.wait_results(len(shas), timeout=60)
    nowhere = uuid.uuid4().hex + uuid.uuid4().hex[:8]
    publish_commit(volt.broker, str(repo.path), "main", nowhere, source="test")
    elsewhere = tmp_path / "not-allowed"
    publish_commit(volt.broker, str(elsewhere), "main", shas["noisy"], source="test")
    rows = {r["commit"] + r["repo"]: r for r in volt.wait_results(len(cases) + 2, timeout=60)}

    for name, _, status in cases:
        row = rows[shas[name] + str(repo.path)]
        assert row["status"] == status, (name, row)
    noisy_log = volt.ask("log", {"id": rows[shas["noisy"] + str(repo.path)]["job_id"]})
    assert noisy_log["bytes"] == 100 * 1024 * 1024 + len("THE END\n")
    assert noisy_log["full"] is None  # too big to keep whole: head and tail only
    assert len(noisy_log["head"]) <= 64 * 1024 and noisy_log["tail"].endswith("THE END\n")
    # The runner's peak memory stayed flat through 100 MB of output.
    assert vm_hwm_kib(runner.pid) < 150 * 1024
    # The stubborn suite's whole process group is gone, children included.
    children = [int(p) for p in (tmp_path / "children").read_text().split()]
    assert children and not any(_alive(p) for p in children)
    missing = rows[nowhere + str(repo.path)]
    assert missing["status"] == "error" and f"commit {nowhere} not found" in missing["reason"]
    refused = rows[shas["noisy"] + str(elsewhere)]
    assert refused["status"] == "error" and "not allowed" in refused["reason"]
    assert not any(p.name.startswith("not-allowed") for p in (tmp_path / "hostile-a" / "repos").iterdir())
    assert not hooked.exists()  # a hook planted by a suite never runs as the runner
    assert runner.poll() is None
    for name in ("dispatcher", "hostile-a"):
        assert ":guest@" not in volt.log_of(name)  # passwords never reach a log


def _alive(pid: int) -> bool:
    try:
        state = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, IndexError):
        return False
    return state != "Z"


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner, max_size=4),
    max_leaves=10,
)
bodies = st.one_of(
    st.binary(max_size=200),
    json_values.map(lambda v: json.dumps(v).encode()),
    st.builds(
        lambda kind, fields: json.dumps({**fields, "type": kind, "schema_version": 1}).encode(),
        st.sampled_from(sorted(TYPES)),
        st.dictionaries(
            st.sampled_from(["job_id", "attempt", "commit", "repo", "runner_id", "status", "params"]), json_values
        ),
    ),
)


def test_fuzzed_bodies_never_stop_a_running_dispatcher(volt, repo):
    volt.dispatcher()
    volt.runner("fuzz-a")
    volt.wait_for("runner", lambda: volt.ask("status")["runners"])
    ns, broker = volt.ns, volt.broker
    targets = [
        naming.commits_exchange(ns),
        naming.control_exchange(ns),
        naming.results_exchange(ns),
        naming.rpc_exchange(ns),
    ]
    sent = 0

    @settings(max_examples=1500, deadline=None, suppress_health_check=list(HealthCheck), database=None)
    @given(body=bodies, target=st.sampled_from(targets))
    def throw(body: bytes, target: str) -> None:
        nonlocal sent
        broker.publish(target, "", body)
        sent += 1

    throw()
    assert sent >= 1500
    # Everything thrown has been consumed, and the dispatcher still does its job.
    volt.wait_for(
        "the dispatcher to drain its queues",
        lambda: all(broker.queue_depth(q)[0] == 0 for q in naming.shared_queues(ns)[:4]),  # type: ignore[index]
        timeout=120,
    )
    assert volt.procs["dispatcher"].poll() is None
    sha = repo.commit({".volt.toml": "[test]\ncommand = ['true']\n"})
    publish_commit(broker, str(repo.path), "main", sha, source="test")
    volt.wait_for("a real job after the fuzz", lambda: any(r["commit"] == sha for r in volt.results()), timeout=60)
    dead = broker.queue_depth(naming.dead_letter_queue(ns))
    assert dead is not None and dead[0] > sent * 0.9
    print(f"\nfuzz: {sent} random bodies, {dead[0]} dead-lettered, dispatcher alive")
    assert Job  # the strategy draws types from the same table the decoder uses
