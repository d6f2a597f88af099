"""Health files, as `volt check --observer` and `--runner-workdir` read them."""

from __future__ import annotations

import json
from pathlib import Path

from common.health import HEALTH_FILE, read_health, write_health


def noted_at(folder: Path) -> float:
    return float(json.loads((folder / HEALTH_FILE).read_text())["at"])


def test_a_recent_clean_run_is_healthy(tmp_path: Path) -> None:
    write_health(tmp_path / "state", 1.0)
    assert read_health(tmp_path / "state", noted_at(tmp_path / "state") + 5, "poll") is None


def test_a_stale_note_says_how_stale(tmp_path: Path) -> None:
    write_health(tmp_path, 5.0)
    at = noted_at(tmp_path)
    assert read_health(tmp_path, at + 29, "poll") is None  # 3 intervals or 30 s, whichever is longer
    assert read_health(tmp_path, at + 31, "poll") == "the last poll was 31s ago (every 5s)"
    write_health(tmp_path, 20.0)
    assert read_health(tmp_path, noted_at(tmp_path) + 59, "heartbeat") is None


def test_what_failed_is_named(tmp_path: Path) -> None:
    write_health(tmp_path, 1.0, {"repo https://git.example/a.git": "cannot fetch: timeout", "repo /srv/b": "gone"})
    assert read_health(tmp_path, noted_at(tmp_path), "poll") == (
        "repo https://git.example/a.git: cannot fetch: timeout (and 1 more)"
    )


def test_no_or_broken_file_is_unhealthy(tmp_path: Path) -> None:
    assert read_health(tmp_path, 0.0, "heartbeat") == f"no heartbeat noted in {tmp_path} yet"
    (tmp_path / HEALTH_FILE).write_text("{not json")
    problem = read_health(tmp_path, 0.0, "poll")
    assert problem is not None and problem.startswith("unreadable")
