"""The results page in a real headless Chromium, against real processes, and /metrics.

Needs /usr/bin/chromium and /usr/bin/chromedriver (Debian's chromium and
chromium-driver; `./dev test` installs them). Without them this test fails and
says so: it is never skipped.
"""

from __future__ import annotations

import shutil
import signal
import socket
import tempfile
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from support import pids, suite

from common import naming

CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"
ARTIFACTS = Path(__file__).resolve().parents[1] / "artifacts"
PASS = "def test_web_page_ok():\n    print('hello from the suite')\n    assert True\n"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture
def browser() -> Iterator[object]:
    missing = [p for p in (CHROMIUM, CHROMEDRIVER) if not Path(p).exists()]
    if missing:
        pytest.fail(
            f"the results-page test needs a headless browser: {', '.join(missing)} missing; "
            "run ./dev test (it installs them) or `apt-get install chromium chromium-driver`"
        )
    try:
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service
    except ImportError:
        pytest.fail("the results-page test needs selenium: pip install -e '.[test]'")
    profile = tempfile.mkdtemp(prefix="volt-chromium-")
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in (
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        f"--user-data-dir={profile}",
        "--window-size=1280,1000",
    ):
        options.add_argument(flag)
    # An explicit driver path: Selenium Manager never goes looking on the network.
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    driver.set_page_load_timeout(30)
    try:
        yield driver
    finally:
        driver.quit()
        shutil.rmtree(profile, ignore_errors=True)


def fetch(url: str) -> str:
    with urllib.request.urlopen(url, timeout=10) as resp:
        return resp.read().decode()


def test_results_page_in_a_browser_and_metrics(volt, repo, browser) -> None:
    from selenium.common.exceptions import StaleElementReferenceException
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as ec
    from selenium.webdriver.support.ui import WebDriverWait

    def settled(read: Callable[[], Any], timeout: float = 10) -> Any:
        """read() once the live part is not being swapped under it (it refreshes every 2 s)."""
        return WebDriverWait(browser, timeout, ignored_exceptions=(StaleElementReferenceException,)).until(
            lambda _: read()
        )

    port = free_port()
    base = f"http://127.0.0.1:{port}"
    volt.dispatcher("--http-port", str(port))
    volt.runner("web-1", "--allow-repo", str(repo.path))
    volt.wait_for("the runner to register", lambda: volt.ask("status")["runners"])
    volt.wait_for("the results page", lambda: "web-1" in fetch(f"{base}/"))

    # Open the page before the commit exists: it must pick the result up by itself.
    browser.get(f"{base}/")
    assert "Volt CI" in browser.title
    sha = repo.commit({"tests/test_web.py": PASS}, "a commit for the page")
    notify = volt.run("notify", "--repo", str(repo.path), "--branch", "main", "--commit", sha)
    assert notify.returncode == 0, notify.stderr
    (result,) = volt.wait_results(1, commit=sha)
    assert result["status"] == "passed"

    row = f'tr[data-commit="{sha}"][data-status="passed"]'
    WebDriverWait(browser, 30).until(ec.presence_of_element_located((By.CSS_SELECTOR, row)))
    line = settled(lambda: browser.find_element(By.CSS_SELECTOR, row).text)
    assert sha[:12] in line and "passed" in line and "web-1" in line and "1 passed" in line
    assert "a commit for the page" in line and "Volt Test" in line  # its subject and author, read by volt notify
    runners = settled(lambda: browser.find_element(By.ID, "runners").text)
    assert "web-1" in runners and "idle" in runners
    ARTIFACTS.mkdir(exist_ok=True)
    page_shot = ARTIFACTS / "results-page.png"
    browser.save_screenshot(str(page_shot))

    # Follow the commit's link to the job page: status, history and the log.
    settled(lambda: browser.find_element(By.CSS_SELECTOR, f"{row} a.sha").click() or True)
    WebDriverWait(browser, 15).until(ec.presence_of_element_located((By.ID, "log-head")))
    assert browser.current_url == f"{base}/jobs/{result['job_id']}"
    body = browser.find_element(By.TAG_NAME, "body").text
    assert sha in body and "passed" in body
    history = browser.find_element(By.ID, "history").text
    assert "assigned" in history and "started" in history and "result" in history
    logged = browser.find_element(By.ID, "log-head").text
    assert "test_web_page_ok" in logged or "1 passed" in logged, logged
    job_shot = ARTIFACTS / "job-page.png"
    browser.save_screenshot(str(job_shot))
    print(f"\nscreenshots: {page_shot} {job_shot}")

    link = browser.find_element(By.ID, "log-link").get_attribute("href")
    assert link == f"{base}/jobs/{result['job_id']}/log.txt"
    # The whole log is streamed as it inflates: no length up front, the end of the body ends the connection.
    with urllib.request.urlopen(link, timeout=10) as resp:
        assert resp.headers["Content-Length"] is None and resp.headers["Connection"] == "close"
        whole = resp.read().decode()
    assert "1 passed" in whole

    metrics = fetch(f"{base}/metrics")
    assert 'volt_jobs_by_status{status="passed"} 1.0' in metrics
    assert 'volt_jobs_by_state{state="done"} 1.0' in metrics
    assert 'volt_runners{state="idle"} 1.0' in metrics
    assert 'volt_runner_heartbeat_age_seconds{runner="web-1"}' in metrics
    assert "volt_job_duration_seconds_count 1.0" in metrics
    assert "volt_queue_wait_seconds_count 1.0" in metrics
    assert "volt_redeliveries_total 0.0" in metrics
    assert f'volt_queue_ready_messages{{queue="{volt.ns}.jobs.backlog"}} 0.0' in metrics

    # A message the dispatcher cannot read is dead-lettered, and counted.
    assert "volt_dead_lettered_total 0.0" in metrics
    volt.broker.publish(naming.commits_exchange(volt.ns), "", b"\xff not json")
    volt.wait_for("the dead letter to be counted", lambda: "volt_dead_lettered_total 1.0" in fetch(f"{base}/metrics"))


HOSTILE_SUBJECT = '<img src=x onerror="document.title=1"> Round <b>totals</b> half even'
TOTAL = "tests/test_cart.py::test_total"
SOMETIMES = "tests/test_cart.py::test_sometimes"


def cart_suite(counter: Path, total_ok: bool) -> dict[str, str]:
    """A split suite (2 shards, failures run once more): test_total passes or fails,
    test_sometimes fails every other run (flaky), and a test whose id is markup fails
    when test_total does."""
    suite = (
        "import os\n\nimport pytest\n\n\n"
        f"def test_total():\n    assert {total_ok}\n\n\n"
        "def test_sometimes():\n"
        f"    n = len(open({str(counter)!r}).read()) if os.path.exists({str(counter)!r}) else 0\n"
        f"    open({str(counter)!r}, 'a').write('x')\n"
        "    assert n % 2 == 1\n\n\n"
        "@pytest.mark.parametrize('v', [1], ids=['<script>document.title=2</script>'])\n"
        f"def test_markup(v):\n    assert {total_ok}\n"
    )
    return {"tests/test_cart.py": suite, ".volt.toml": "[test]\nsplit = 2\nrerun_failures = 1\n"}


def test_a_split_run_with_a_failing_and_a_flaky_test_in_a_browser(volt, repo, browser, tmp_path) -> None:
    from selenium.webdriver.common.by import By

    port = free_port()
    base = f"http://127.0.0.1:{port}"
    volt.dispatcher("--http-port", str(port))
    volt.runner("cart-1", "--allow-repo", str(repo.path))
    volt.runner("cart-2", "--allow-repo", str(repo.path))
    volt.wait_for("2 runners", lambda: len(volt.ask("status")["runners"]) == 2)
    shas = []
    for ok, subject in ((True, "Add the cart total"), (False, HOSTILE_SUBJECT)):
        sha = repo.commit(cart_suite(tmp_path / f"count-{ok}", ok), subject)
        notify = volt.run("notify", "--repo", str(repo.path), "--branch", "main", "--commit", sha)
        assert notify.returncode == 0, notify.stderr
        volt.wait_results(1, commit=sha, timeout=180)
        shas.append(sha)
    first, (second,) = volt.results(commit=shas[0])[0], volt.results(commit=shas[1])
    assert first["status"] == "passed" and first["flaky"] == [SOMETIMES]
    assert second["status"] == "failed" and TOTAL in second["failing_tests"] and second["flaky"] == [SOMETIMES]
    # volt notify read the subject and author from git.
    assert (second["subject"], second["author"]) == (HOSTILE_SUBJECT, "Volt Test")

    browser.get(f"{base}/")
    row = f'tr[data-commit="{shas[1]}"]'
    line = browser.find_element(By.CSS_SELECTOR, row).text
    assert HOSTILE_SUBJECT in line and "Volt Test" in line  # shown as text, not markup
    assert browser.title.startswith("Volt CI") and not browser.find_elements(By.TAG_NAME, "img")
    svg = browser.find_element(By.CSS_SELECTOR, "svg.chart")
    assert len(svg.find_elements(By.CSS_SELECTOR, "circle.failed")) == 1
    assert len(svg.find_elements(By.CSS_SELECTOR, "circle.job")) == 1
    assert "last 2 finished jobs" in svg.text and "queue wait" in svg.text
    ARTIFACTS.mkdir(exist_ok=True)
    browser.save_screenshot(str(ARTIFACTS / "results-page-split.png"))

    browser.find_element(By.CSS_SELECTOR, f"{row} a.sha").click()
    failing = browser.find_element(By.ID, "failing-tests")
    assert "<script>document.title=2</script>" in failing.text  # the markup id, as text
    assert browser.title.startswith("failed") and len(browser.find_elements(By.TAG_NAME, "script")) == 1
    assert f"failing since {shas[1][:12]}" in failing.text and f"passed before on {shas[0][:12]}" in failing.text
    assert SOMETIMES in browser.find_element(By.ID, "flaky-tests").text
    shards = browser.find_element(By.ID, "shards")
    assert {"cart-1", "cart-2"} & set(shards.text.split())
    logs = [a.get_attribute("href") for a in shards.find_elements(By.CSS_SELECTOR, "a.shard-log")]
    assert logs == [f"{base}/jobs/{second['job_id']}.{k}/log.txt" for k in (1, 2)]
    assert any("passed" in fetch(link) or "failed" in fetch(link) for link in logs)
    browser.save_screenshot(str(ARTIFACTS / "job-page-split.png"))

    # The failing test's history: since which commit it fails, when it passed before.
    failing.find_element(By.LINK_TEXT, TOTAL).click()
    assert browser.current_url.startswith(f"{base}/tests?") and browser.find_element(By.ID, "test-name").text == TOTAL
    streak = browser.find_element(By.ID, "streak").text
    assert streak.startswith(f"failing since {shas[1][:12]}") and f"passed before on {shas[0][:12]}" in streak
    runs = browser.find_element(By.ID, "runs").text
    assert runs.index(shas[1][:12]) < runs.index(shas[0][:12])  # newest first
    browser.save_screenshot(str(ARTIFACTS / "test-history.png"))


def test_metrics_count_a_job_taken_back_from_a_lost_runner(volt, repo, tmp_path) -> None:
    marker = tmp_path / "runs"
    sha = repo.commit(suite(marker, first_sleep=120))
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    volt.dispatcher("--http-port", str(port))
    volt.runner("lost-a", heartbeat=0.5)
    volt.wait_for("the runner to register", lambda: volt.ask("status")["runners"])
    volt.run("notify", "--repo", str(repo.path), "--branch", "main", "--commit", sha)
    volt.wait_for("the run to start", lambda: len(pids(marker)) == 1)
    volt.wait_for("a busy runner on /metrics", lambda: 'volt_runners{state="busy"} 1.0' in fetch(f"{base}/metrics"))

    volt.kill("lost-a", signal.SIGKILL)
    volt.runner("lost-b", heartbeat=0.5)
    (row,) = volt.wait_results(1, timeout=60)
    assert row["status"] == "passed" and row["attempts"] == 2

    metrics = fetch(f"{base}/metrics")
    assert "volt_redeliveries_total 1.0" in metrics
    assert "volt_queue_wait_seconds_count 2.0" in metrics  # each attempt waited once
    assert 'volt_runner_heartbeat_age_seconds{runner="lost-a"}' not in metrics  # lost runners leave the gauge
    assert 'volt_runner_heartbeat_age_seconds{runner="lost-b"}' in metrics
    page = fetch(f"{base}/jobs/{row['job_id']}")
    assert "<td>lost</td>" in page and "runner lost-a lost (no heartbeat" in page
