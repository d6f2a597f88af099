"""The results page, its JSON and /metrics, on a real store and a made-up snapshot (no broker)."""

from __future__ import annotations

import base64
import json
import socket
import threading
import time
import tracemalloc
import urllib.error
import urllib.request
import zlib
from collections.abc import Iterator
from pathlib import Path
from types import MappingProxyType, SimpleNamespace
from typing import Any

import pytest
from support import finished_job, runner_info

from common.messages import CommitSeen, JobResult
from dispatcher import chart, web
from dispatcher.metrics import Metrics
from dispatcher.registry import RunnerInfo
from dispatcher.snapshot import Snapshot
from dispatcher.store import MAX_NODE_ID, JobRow, Store

REPO = "/srv/git/app"
SHA_PASS = "a1" * 20
SHA_FAIL = "b2" * 20
SHA_LONG = "c3" * 20
SHA_WAIT = "d4" * 20
NOW = 1_700_000_000.0


def runner(runner_id: str, state: str = "idle", last_seen: float = 50.0) -> RunnerInfo:
    return runner_info(runner_id, state, last_seen=last_seen)


def add_done(store: Store, commit: str, branch: str, status: str, runner_id: str = "r1", **result: Any) -> JobRow:
    row = store.add_job(CommitSeen(repo=REPO, branch=branch, commit=commit, seen_at=NOW))
    store.mark_queued(row.job_id, 1, NOW + 1)
    lease = store.assign(row.job_id, 1, runner_id, NOW + 2)
    assert lease
    assert store.start(row.job_id, lease, runner_id, "s", started_at=NOW + 3, now=NOW + 3)
    done = JobResult(job_id=row.job_id, attempt=1, runner_id=runner_id, status=status, lease=lease, **result)
    assert store.finish(done, NOW + 10)
    got = store.get(row.job_id)
    assert got is not None
    return got


@pytest.fixture
def db(tmp_path: Path) -> Iterator[tuple[Path, Store, dict[str, JobRow]]]:
    """A store with a passed job (whole log kept), a failed one on a hostile branch name,
    one whose log only has head and tail, one still running and one waiting."""
    path = tmp_path / "dispatcher.db"
    store = Store(path, durable=False)
    full = "collected 1 item\n" + "".join(f"line {i}\n" for i in range(100)) + "1 passed\n"
    jobs = {
        "passed": add_done(
            store,
            SHA_PASS,
            "main",
            "passed",
            passed=1,
            duration_s=1.25,
            log_head=full[:40],
            log_tail=full[-20:],
            log_bytes=len(full),
            log_full=base64.b64encode(zlib.compress(full.encode())).decode(),
        ),
        "failed": add_done(
            store,
            SHA_FAIL,
            "<script>alert(1)</script>",
            "failed",
            passed=1,
            failed=1,
            duration_s=2.5,
            reason="1 test failed",
            log_head="E   assert '<b>' == \"&amp;\"\n",
            log_bytes=26,
        ),
        "long": add_done(
            store,
            SHA_LONG,
            "main",
            "passed",
            runner_id="r2",
            passed=3,
            log_head="HEAD-START\n",
            log_tail="TAIL-END\n",
            log_bytes=5000,
        ),
    }
    running = store.add_job(CommitSeen(repo=REPO, branch="main", commit="e5" * 20, seen_at=NOW + 20))
    store.mark_queued(running.job_id, 1, NOW + 21)
    lease = store.assign(running.job_id, 1, "r1", NOW + 22)
    assert lease
    store.start(running.job_id, lease, "r1", "s", started_at=NOW + 23, now=NOW + 23)
    store.add_job(CommitSeen(repo=REPO, branch="main", commit=SHA_WAIT, seen_at=NOW + 30))
    yield path, store, jobs
    store.close()


@pytest.fixture
def site(db: tuple[Path, Store, dict[str, JobRow]]) -> web.Web:
    path, _, _ = db
    snap = Snapshot(
        runners=(runner("r1", "busy", last_seen=48.0), runner("r2", "paused", last_seen=49.5)),
        queues=MappingProxyType({"ns.jobs.backlog": (2, 0), "ns.dead-letter": (1, 0)}),
        queues_at=49.0,
        clock_at=50.0,
        wall_at=NOW,
    )
    return web.Web(path, "ns", Metrics(), lambda: snap, wall=lambda: NOW + 1)


def text(resp: web.Response) -> str:
    return resp.content().decode()


def test_results_page_shows_jobs_per_branch_runners_and_queues(site: web.Web) -> None:
    resp = site.get("/")
    assert resp.status == 200
    assert resp.content_type.startswith("text/html")
    page = text(resp)
    for sha in (SHA_PASS, SHA_FAIL, SHA_LONG):
        assert f">{sha[:12]}</a>" in page
    assert 'class="badge s-passed"' in page and 'class="badge s-failed"' in page
    assert 'class="badge s-running"' in page  # unfinished jobs are on the page too
    assert "1 passed, 1 failed" in page and "2.5 s" in page
    # Runners from the snapshot, the busy one with its job; heartbeat aged to the reader's now.
    assert 'class="badge r-busy"' in page and 'class="badge r-paused"' in page
    assert "3.0 s ago" in page
    assert "ns.dead-letter" in page
    assert "<script>alert(1)</script>" not in page
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in page
    assert 'data-refresh="1"' in page
    assert "script-src 'sha256-" in resp.headers["Content-Security-Policy"]


def test_waiting_jobs_say_what_they_wait_for(site: web.Web) -> None:
    page = text(site.get("/"))
    waiting = page[page.index('<table id="waiting">') :]
    waiting = waiting[: waiting.index("</table>")]
    assert f'data-commit="{SHA_WAIT}"' in waiting
    # r1 is busy and r2 paused: the pending commit waits for a free runner.
    assert "waiting for a free runner (1 busy)" in waiting


def test_fragment_is_the_live_part_only(site: web.Web) -> None:
    frag = text(site.get("/?fragment=1"))
    assert frag.startswith('<div id="live"') and "<html" not in frag
    assert SHA_PASS[:12] in frag


def test_job_page_escapes_the_log_and_shows_history(site: web.Web, db: tuple[Path, Store, dict[str, JobRow]]) -> None:
    job = db[2]["failed"]
    resp = site.get(f"/jobs/{job.job_id}")
    assert resp.status == 200
    page = text(resp)
    assert "E   assert &#x27;&lt;b&gt;&#x27; == &quot;&amp;amp;&quot;" in page
    assert "'<b>'" not in page
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in page and "<script>alert(1)" not in page
    assert "1 test failed" in page
    for kind in ("assigned", "started", "result"):
        assert f"<td>{kind}</td>" in page
    assert f'href="/jobs/{job.job_id}/log.txt"' in page
    assert 'data-refresh="0"' in page  # done: the page stops polling


def test_job_page_marks_what_was_not_kept(site: web.Web, db: tuple[Path, Store, dict[str, JobRow]]) -> None:
    page = text(site.get(f"/jobs/{db[2]['long'].job_id}"))
    assert "HEAD-START" in page and "TAIL-END" in page
    assert "[... 4980 bytes not kept ...]" in page
    assert "only its head and tail were kept" in page


def test_unknown_or_malformed_job_is_404(site: web.Web) -> None:
    assert site.get("/jobs/0123456789abcdef").status == 404
    assert site.get("/jobs/0123456789abcdef/log.txt").status == 404
    assert site.get("/api/jobs/0123456789abcdef").status == 404
    assert site.get("/jobs/../../etc/passwd").status == 404
    assert site.get("/jobs/XYZ").status == 404
    assert site.get("/nowhere").status == 404


def test_log_download_whole_or_head_marker_tail(site: web.Web, db: tuple[Path, Store, dict[str, JobRow]]) -> None:
    jobs = db[2]
    whole = site.get(f"/jobs/{jobs['passed'].job_id}/log.txt")
    assert whole.status == 200 and whole.content_type == "text/plain; charset=utf-8"
    assert "attachment" in whole.headers["Content-Disposition"]
    body = text(whole)
    assert body.startswith("collected 1 item\n") and "line 57\n" in body and body.endswith("1 passed\n")
    cut = text(site.get(f"/jobs/{jobs['long'].job_id}/log.txt"))
    assert cut == "HEAD-START\n\n[... 4980 bytes not kept ...]\nTAIL-END\n"
    raw = text(site.get(f"/jobs/{jobs['failed'].job_id}/log.txt"))
    assert raw == "E   assert '<b>' == \"&amp;\"\n"  # plain text: not escaped


def test_json_has_the_rpc_shapes(site: web.Web, db: tuple[Path, Store, dict[str, JobRow]]) -> None:
    status = json.loads(site.get("/api/status").body)
    assert status["namespace"] == "ns"
    assert [r["runner_id"] for r in status["runners"]] == ["r1", "r2"]
    assert [r["state"] for r in status["runners"]] == ["busy", "paused"]
    assert status["results"] == {"passed": 2, "failed": 1}
    assert status["queues"]["ns.jobs.backlog"] == {"ready": 2, "consumers": 0}
    assert status["waiting_count"] == 1

    results = json.loads(site.get("/api/results").body)
    assert {r["commit"] for r in results} == {SHA_PASS, SHA_FAIL, SHA_LONG}  # finished only, as `volt results`
    assert all("history" in r for r in results)
    everything = json.loads(site.get("/api/results?done_only=0&limit=2").body)
    assert len(everything) == 2
    only = json.loads(site.get(f"/api/results?commit={SHA_FAIL[:8]}").body)
    assert [r["status"] for r in only] == ["failed"]
    bad = site.get("/api/results?limit=lots")
    assert bad.status == 400 and "limit" in json.loads(bad.body)["error"]
    assert site.get("/api/results?commit=zzzz").status == 400

    job = json.loads(site.get(f"/api/jobs/{db[2]['passed'].job_id}").body)
    assert job["job"]["status"] == "passed" and job["job"]["history"]
    assert job["log"]["full_kept"] is True and job["log"]["url"].endswith("/log.txt")


def test_metrics_read_the_store_and_the_snapshot(site: web.Web) -> None:
    site.metrics.redeliveries.inc()
    site.metrics.dead_letters.inc(2)
    site.metrics.job_finished(1.5)
    resp = site.get("/metrics")
    assert resp.status == 200 and resp.content_type.startswith("text/plain; version=0.0.4")
    body = text(resp)
    assert 'volt_jobs_by_status{status="passed"} 2.0' in body
    assert 'volt_jobs_by_status{status="timeout"} 0.0' in body
    assert 'volt_jobs_by_state{state="done"} 3.0' in body and 'volt_jobs_by_state{state="running"} 1.0' in body
    assert 'volt_runners{state="busy"} 1.0' in body and 'volt_runners{state="paused"} 1.0' in body
    assert 'volt_runners{state="idle"} 0.0' in body
    assert 'volt_runner_heartbeat_age_seconds{runner="r1"} 3.0' in body
    assert "volt_redeliveries_total 1.0" in body and "volt_dead_lettered_total 2.0" in body
    assert "volt_job_duration_seconds_count 1.0" in body
    assert 'volt_queue_ready_messages{queue="ns.dead-letter"} 1.0' in body


def test_queue_wait_is_observed_from_the_stored_times(db: tuple[Path, Store, dict[str, JobRow]]) -> None:
    metrics = Metrics()
    metrics.job_started(db[2]["passed"], NOW + 100)  # queued at NOW + 1, started at NOW + 3
    metrics.job_started(None, NOW)
    assert metrics.registry.get_sample_value("volt_queue_wait_seconds_count") == 1
    assert metrics.registry.get_sample_value("volt_queue_wait_seconds_sum") == 2.0


def test_reader_cannot_change_the_store(db: tuple[Path, Store, dict[str, JobRow]]) -> None:
    reader = Store(db[0], readonly=True)
    try:
        assert reader.get(db[2]["passed"].job_id) is not None
        with pytest.raises(Exception, match="readonly"):
            reader.add_job(CommitSeen(repo=REPO, branch="x", commit="f" * 40, seen_at=NOW))
    finally:
        reader.close()


def test_served_over_http_on_its_own_thread(db: tuple[Path, Store, dict[str, JobRow]]) -> None:
    """The real server: a dispatcher-shaped object, a free port, the pages over a socket,
    and the store read from the server's threads while this one holds its own connection."""
    path, _, jobs = db
    fake = SimpleNamespace(
        s=SimpleNamespace(db=path, http_host="127.0.0.1", http_port=0),
        ns="ns",
        metrics=Metrics(),
        snapshot=Snapshot(),
    )
    server = web.serve(fake)  # type: ignore[arg-type]
    try:
        base = f"http://127.0.0.1:{server.server_address[1]}"
        with urllib.request.urlopen(f"{base}/") as resp:
            assert resp.headers["Cache-Control"] == "no-store"
            assert SHA_PASS[:12] in resp.read().decode()
        with urllib.request.urlopen(f"{base}/jobs/{jobs['passed'].job_id}/log.txt") as resp:
            assert resp.read().decode().endswith("1 passed\n")
        with pytest.raises(urllib.error.HTTPError) as err:
            urllib.request.urlopen(f"{base}/jobs/0123456789abcdef")
        assert err.value.code == 404
        assert threading.active_count() >= 2
    finally:
        server.shutdown()
        server.server_close()


def test_port_in_use_is_one_clear_line(db: tuple[Path, Store, dict[str, JobRow]]) -> None:
    from common.settings import SettingsError

    fake = SimpleNamespace(
        s=SimpleNamespace(db=db[0], http_host="127.0.0.1", http_port=0), ns="ns", metrics=Metrics(), snapshot=Snapshot()
    )
    first = web.serve(fake)  # type: ignore[arg-type]
    try:
        fake.s.http_port = first.server_address[1]
        with pytest.raises(SettingsError, match="cannot serve HTTP on 127.0.0.1"):
            web.serve(fake)  # type: ignore[arg-type]
    finally:
        first.shutdown()
        first.server_close()


def test_snapshot_copies_the_registry_and_looks_at_queues_only_every_few_seconds() -> None:
    from dispatcher.snapshot import QUEUE_LOOK_EVERY, take_snapshot

    looked: list[str] = []

    def depth(name: str) -> tuple[int, int]:
        looked.append(name)
        return (len(looked), 1)

    clock = [100.0]
    live = runner("r1")
    d = SimpleNamespace(
        ns="ns",
        registry=SimpleNamespace(runners={"r1": live}),
        broker=SimpleNamespace(queue_depth=depth),
        clock=lambda: clock[0],
        wall=lambda: NOW,
    )
    first = take_snapshot(d, Snapshot())  # type: ignore[arg-type]
    looks = len(looked)
    assert looks > 0 and first.depth("ns.jobs.backlog") is not None
    live.labels.append("changed")
    live.state = "draining"
    assert first.runners[0].labels == ["linux"] and first.runners[0].state == "idle"  # a copy, not the live object
    clock[0] += 1.0
    second = take_snapshot(d, first)  # type: ignore[arg-type]
    assert len(looked) == looks and second.queues is first.queues
    assert second.runners[0].state == "draining"
    clock[0] += QUEUE_LOOK_EVERY
    take_snapshot(d, second)  # type: ignore[arg-type]
    assert len(looked) == 2 * looks
    assert second.now(NOW + 2.5) == 103.5


def test_the_whole_log_is_streamed_in_chunks(site: web.Web, db: tuple[Path, Store, dict[str, JobRow]]) -> None:
    resp = site.get(f"/jobs/{db[2]['passed'].job_id}/log.txt")
    assert resp.stream is not None and resp.body == b""
    chunks = list(resp.stream)
    assert b"".join(chunks).decode().endswith("1 passed\n")


def put_log(store: Store, commit: str, text: bytes, tail: str = "TAIL\n") -> JobRow:
    return add_done(
        store,
        commit,
        "big",
        "passed",
        log_head=text[:100].decode(errors="replace"),
        log_tail=tail,
        log_bytes=len(text),
        log_full=base64.b64encode(zlib.compress(text, 6)).decode(),
    )


def test_a_log_that_inflates_past_the_limit_is_cut_with_its_tail(
    site: web.Web, db: tuple[Path, Store, dict[str, JobRow]], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(web, "LOG_FULL_MAX_BYTES", 3 * web.LOG_CHUNK + 5)
    row = put_log(db[1], "f1" * 20, b"\0" * (10 * web.LOG_CHUNK), tail="LAST LINE\n")
    resp = site.get(f"/jobs/{row.job_id}/log.txt")
    assert resp.stream is not None
    chunks = list(resp.stream)
    assert all(len(c) <= web.LOG_CHUNK for c in chunks[:-1])
    body = b"".join(chunks)
    assert body.startswith(b"\0" * (3 * web.LOG_CHUNK + 5) + b"\n[... cut at")
    assert body.endswith(b"its last part follows ...]\nLAST LINE\n")


def test_a_corrupt_stored_log_says_so_instead_of_failing(db: tuple[Path, Store, dict[str, JobRow]]) -> None:
    blob = zlib.compress(b"".join(b"line %d\n" % i for i in range(100_000)))
    unreadable = b"\n[... the rest of the stored log is unreadable ...]\n"
    cut_short = b"".join(web._inflated(blob[: len(blob) // 2], ""))
    assert cut_short.startswith(b"line 0\nline 1\n") and cut_short.endswith(unreadable)
    assert b"".join(web._inflated(b"not zlib at all", "")) == unreadable


def serve_fake(path: Path, max_requests: int = web.MAX_REQUESTS) -> Any:
    fake = SimpleNamespace(
        s=SimpleNamespace(db=path, http_host="127.0.0.1", http_port=0), ns="ns", metrics=Metrics(), snapshot=Snapshot()
    )
    return web.serve(fake, max_requests=max_requests)  # type: ignore[arg-type]


def test_a_big_log_downloads_in_flat_memory(db: tuple[Path, Store, dict[str, JobRow]]) -> None:
    text = b"".join(b"line %09d of a long test log with some words in it\n" % i for i in range(600_000))
    size = len(text)
    assert size > 30_000_000
    row = put_log(db[1], "f2" * 20, text)
    del text
    server = serve_fake(db[0])
    got = 0
    try:
        tracemalloc.start()
        url = f"http://127.0.0.1:{server.server_address[1]}/jobs/{row.job_id}/log.txt"
        with urllib.request.urlopen(url, timeout=30) as resp:
            assert resp.headers["Content-Length"] is None
            while chunk := resp.read(1024 * 1024):
                if got == 0:
                    assert chunk.startswith(b"line 000000000 of")
                got += len(chunk)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
        server.shutdown()
        server.server_close()
    assert got == size
    # The compressed blob and a few chunks, not the 31 MB log (nor its text and bytes copies).
    assert peak < 12 * 1024 * 1024, peak


def test_requests_past_the_limit_are_told_503_at_once(db: tuple[Path, Store, dict[str, JobRow]]) -> None:
    server = serve_fake(db[0], max_requests=2)
    port = server.server_address[1]
    idle = [socket.create_connection(("127.0.0.1", port)) for _ in range(2)]  # each holds a slot, sending nothing
    try:
        # Both idle connections have been taken by a handler thread before the next one.
        deadline = time.monotonic() + 10
        while server.slots._value > 0 and time.monotonic() < deadline:  # noqa: SLF001 - what the test watches
            time.sleep(0.01)
        assert server.slots._value == 0
        started = time.monotonic()
        with pytest.raises(urllib.error.HTTPError) as err:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=10)
        assert err.value.code == 503 and err.value.headers["Retry-After"] == "2"
        assert time.monotonic() - started < 2
    finally:
        for s in idle:
            s.close()
    # Once they go, the page answers again.
    deadline = time.monotonic() + 10
    while True:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=10) as resp:
                assert resp.status == 200
                break
        except urllib.error.HTTPError as exc:
            assert exc.code == 503 and time.monotonic() < deadline
            time.sleep(0.05)
    server.shutdown()
    server.server_close()


# -- tests, shards and charts -------------------------------------------------------

HOSTILE_NODE = 'tests/test_x.py::test_y["><script>alert(2)</script>]'
HOSTILE_SUBJECT = '<img src=x onerror=alert(3)> & "more"'
NODE = "tests/test_cart.py::test_total"


@pytest.fixture
def runs(tmp_path: Path) -> Iterator[tuple[web.Web, list[JobRow]]]:
    """main: NODE passes in jobs 0-2 and fails from job 3 on; HOSTILE_NODE fails in the
    last job, whose subject and author are hostile too; t::flaky flakes in the last.
    Jobs 2 and 5 are split runs of two shards."""
    path = tmp_path / "dispatcher.db"
    store = Store(path, durable=False)
    rows = []
    for i in range(6):
        last = i == 5
        tests = [(NODE, "failed" if i >= 3 else "passed", 0.5 + i), ("t::flaky", "flaky" if last else "passed", 0.1)]
        tests += [(HOSTILE_NODE, "failed", 0.1)] if last else []
        status = "failed" if i >= 3 else "passed"
        rows.append(
            finished_job(
                store,
                REPO,
                "main",
                f"{i + 1:040x}",
                NOW + 100 * i,
                status,
                tests,
                HOSTILE_SUBJECT if last else f"change {i}",
                "<b>Mallory</b>" if last else "Ada",
                split=2 if i in (2, 5) else 1,
                duration_s=10.0 + i,
                wait_s=1.0 + i,
            )
        )
    store.close()
    snap = Snapshot(runners=(), queues=MappingProxyType({}), queues_at=0.0, clock_at=50.0, wall_at=NOW)
    yield web.Web(path, "ns", Metrics(), lambda: snap, wall=lambda: NOW), rows


def test_the_jobs_list_shows_subjects_and_authors_escaped(runs: tuple[web.Web, list[JobRow]]) -> None:
    site, rows = runs
    page = text(site.get("/"))
    assert "change 1" in page and "Ada" in page
    assert "<img src=x" not in page and "&lt;img src=x onerror=alert(3)&gt; &amp; &quot;more&quot;" in page
    assert "<b>Mallory</b>" not in page and "&lt;b&gt;Mallory&lt;/b&gt;" in page
    assert 'href="/tests?repo=%2Fsrv%2Fgit%2Fapp&amp;branch=main"' in page


def test_each_branch_has_a_chart_of_duration_and_queue_wait_with_failed_jobs_in_red(
    runs: tuple[web.Web, list[JobRow]],
) -> None:
    site, rows = runs
    page = text(site.get("/"))
    svg = page[page.index('<svg class="chart"') : page.index("</svg>")]
    assert svg.count('<circle class="failed"') == 3 and svg.count('<circle class="job"') == 3
    assert svg.count('<circle class="wait"') == 6
    assert ">0 s</text>" in svg and ">10 s</text>" in svg and ">20 s</text>" in svg  # durations 10 to 15 s
    assert "last 6 finished jobs, oldest to newest" in svg and ">queue wait</text>" in svg
    for row in rows:
        assert f'<a href="/jobs/{row.job_id}">' in svg
    assert "<img" not in svg and "&lt;img src=x" in svg  # a point's title names the subject, escaped
    # Oldest on the left: the first point is the first job's.
    first = svg.index(f'<a href="/jobs/{rows[0].job_id}">')
    assert all(first < svg.index(f'<a href="/jobs/{r.job_id}">') for r in rows[1:])


def test_a_chart_reads_at_a_glance(db: tuple[Path, Store, dict[str, JobRow]]) -> None:
    assert [chart.nice_top(s) for s in (0, 7, 45, 55, 100, 3599, 4000)] == [1.0, 10, 50, 60, 120, 3600, 7200]
    assert [chart.seconds_label(s) for s in (0, 2.5, 60, 90, 7200)] == ["0 s", "2.5 s", "1 min", "1.5 min", "2 h"]
    _, store, jobs = db
    assert chart.chart([jobs["passed"]], "one") == ""  # one point says nothing


def test_a_job_page_names_its_failing_tests_since_when_and_its_flaky_ones(runs: tuple[web.Web, list[JobRow]]) -> None:
    site, rows = runs
    page = text(site.get(f"/jobs/{rows[5].job_id}"))
    failing = page[page.index('<table id="failing-tests">') : page.index("</table>", page.index("failing-tests"))]
    assert "Failing tests (2)" in page
    link = 'href="/tests?repo=%2Fsrv%2Fgit%2Fapp&amp;branch=main&amp;test=tests%2Ftest_cart.py%3A%3Atest_total"'
    assert link in failing
    assert f'failing since <a class="sha" href="/jobs/{rows[3].job_id}">{rows[3].commit_sha[:12]}</a>' in failing
    assert f'passed before on <a class="sha" href="/jobs/{rows[2].job_id}">' in failing
    assert '(<span class="subject">change 3</span>)' in failing
    # The hostile node id: escaped in the text and in its link, which stays one attribute.
    assert "<script>alert(2)" not in page and "&lt;script&gt;alert(2)&lt;/script&gt;" in failing
    assert "test=tests%2Ftest_x.py%3A%3Atest_y%5B%22%3E%3Cscript%3Ealert%282%29%3C%2Fscript%3E%5D" in failing
    flaky = page[page.index('<ul id="flaky-tests">') :]
    assert "t::flaky" in flaky[: flaky.index("</ul>")]
    assert "flaky in 1 of the last 6 runs" in flaky[: flaky.index("</ul>")]  # how often, lately
    # As of an older job: the streak counts only the runs up to it.
    older = text(site.get(f"/jobs/{rows[4].job_id}"))
    assert f'failing since <a class="sha" href="/jobs/{rows[3].job_id}">' in older and "Failing tests (1)" in older
    assert "Failing tests" not in text(site.get(f"/jobs/{rows[1].job_id}"))


def test_a_split_runs_page_lists_its_shards_with_their_logs(runs: tuple[web.Web, list[JobRow]]) -> None:
    site, rows = runs
    run = rows[5]
    page = text(site.get(f"/jobs/{run.job_id}"))
    shards = page[page.index('<table id="shards">') :]
    shards = shards[: shards.index("</table>")]
    for k in (1, 2):
        assert f'href="/jobs/{run.job_id}.{k}/log.txt"' in shards and f'href="/jobs/{run.job_id}.{k}"' in shards
    assert "<td>r1</td>" in shards and "s-passed" in shards and "s-cancelled" in shards
    # A shard's id has a dot: its page, its log and its JSON are found.
    shard = text(site.get(f"/jobs/{run.job_id}.1"))
    assert f'a shard of the split run <a class="sha" href="/jobs/{run.job_id}">' in shard
    assert "Failing tests" not in shard  # a run's tests are the run's
    assert site.get(f"/jobs/{run.job_id}.1/log.txt").status == 200
    assert json.loads(site.get(f"/api/jobs/{run.job_id}.1").body)["job"]["run"] == run.job_id
    assert site.get(f"/jobs/{run.job_id}.x").status == 404 and site.get(f"/jobs/{run.job_id}.1234").status == 404
    assert '<table id="shards">' not in text(site.get(f"/jobs/{rows[4].job_id}"))


def test_a_tests_history_page_says_since_when_it_fails(runs: tuple[web.Web, list[JobRow]]) -> None:
    site, rows = runs
    resp = site.get("/tests?repo=%2Fsrv%2Fgit%2Fapp&branch=main&test=tests%2Ftest_cart.py%3A%3Atest_total")
    assert resp.status == 200 and "script-src 'sha256-" in resp.headers["Content-Security-Policy"]
    page = text(resp)
    streak = page[page.index('<p id="streak">') :]
    streak = streak[: streak.index("</p>")]
    assert f'failing since <a class="sha" href="/jobs/{rows[3].job_id}">{rows[3].commit_sha[:12]}</a>' in streak
    assert f'passed before on <a class="sha" href="/jobs/{rows[2].job_id}">{rows[2].commit_sha[:12]}</a>' in streak
    assert "duration: median 3.00 s over the last 6 runs" in page
    table = page[page.index('<table id="runs">') :]
    assert [table.index(f'data-commit="{r.commit_sha}"') for r in reversed(rows)] == sorted(
        table.index(f'data-commit="{r.commit_sha}"') for r in rows
    )  # newest first
    assert "5.50 s" in table and "s-failed" in table and "s-passed" in table


def test_the_tests_page_of_a_branch_and_its_flaky_tests(runs: tuple[web.Web, list[JobRow]]) -> None:
    site, rows = runs
    page = text(site.get("/tests?repo=%2Fsrv%2Fgit%2Fapp&branch=main"))
    assert "Failing tests (2)" in page and f"/jobs/{rows[5].job_id}" in page
    assert "&lt;script&gt;alert(2)" in page and "<script>alert(2)" not in page
    assert 'href="/tests?repo=%2Fsrv%2Fgit%2Fapp&amp;branch=main&amp;flaky=1"' in page
    flaky = text(site.get("/tests?repo=%2Fsrv%2Fgit%2Fapp&flaky=1"))
    table = flaky[flaky.index('<table id="flaky">') :]
    assert "t::flaky" in table and ">1 run</td>" in table and "last 6 finished jobs" in flaky
    hostile = text(site.get("/tests?repo=%3Cscript%3E&test=%3Cb%3E"))
    assert "<script>" not in hostile.replace("<script>" + web.SCRIPT, "") and "&lt;b&gt;" in hostile
    assert site.get("/tests").status == 400 and site.get("/tests?repo=r&test=" + "x" * (MAX_NODE_ID + 1)).status == 400
