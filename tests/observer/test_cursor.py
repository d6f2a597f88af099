"""The observer's durable memory of what it published."""

from __future__ import annotations

import json
import os
import shutil
import stat
import time
from pathlib import Path

import pytest

from observer import cursor as cursor_module
from observer.cursor import Cursor, CursorBusy

A = "a" * 40
B = "b" * 40
C = "c" * 40


def sha(i: int) -> str:
    return f"{i:040x}"


@pytest.fixture
def path(tmp_path: Path) -> Path:
    return tmp_path / "state" / "cursor.json"


def reopen(cursor: Cursor) -> Cursor:
    cursor.close()
    return Cursor(cursor.path)


def crash_copy(cursor: Cursor, tmp_path: Path) -> Cursor:
    """What a new observer finds if this one is killed now (no close, no sync)."""
    copy = tmp_path / "after-crash"
    shutil.copytree(cursor.path.parent, copy, ignore=shutil.ignore_patterns("*.lock"))
    return Cursor(copy / cursor.path.name, keep=cursor.keep)


def test_an_empty_cursor_knows_nothing(path: Path) -> None:
    cursor = Cursor(path)
    assert cursor.get("/srv/app", "main") is None
    assert cursor.published("/srv/app", "main") == []
    assert not path.exists()  # nothing is written until something is recorded


def test_record_set_and_get(path: Path) -> None:
    cursor = Cursor(path)
    cursor.record("/srv/app", "main", A)
    cursor.record("/srv/app", "dev", B)
    cursor.record("https://git.example.com/other.git", "main", C)
    cursor.record("/srv/app", "main", B)
    assert cursor.get("/srv/app", "main") == B
    assert cursor.published("/srv/app", "main") == [A, B]
    assert cursor.knows("/srv/app", "main", A) and not cursor.knows("/srv/app", "dev", A)
    assert cursor.get("https://git.example.com/other.git", "dev") is None
    # A head reached without a publish (a branch reset to a commit published before).
    cursor.set("/srv/app", "main", A)
    assert cursor.get("/srv/app", "main") == A
    assert cursor.published("/srv/app", "main") == [A, B]


def test_it_persists_across_instances(path: Path) -> None:
    cursor = Cursor(path)
    cursor.record("/srv/app", "main", A)
    cursor.set("/srv/app", "main", B)
    again = reopen(cursor)
    assert again.get("/srv/app", "main") == B
    assert again.published("/srv/app", "main") == [A]
    again.record("/srv/app", "dev", C)
    again.compact()
    third = reopen(again)
    assert (third.get("/srv/app", "main"), third.get("/srv/app", "dev")) == (B, C)
    assert third.published("/srv/app", "dev") == [C]


def test_every_record_survives_the_observer_being_killed(path: Path, tmp_path: Path) -> None:
    cursor = Cursor(path)
    for i, commit in enumerate((A, B, C)):
        cursor.record("/srv/app", "main", commit)
        found = crash_copy(cursor, tmp_path / str(i))
        assert found.get("/srv/app", "main") == commit
        found.close()


def test_a_page_of_records_costs_one_fsync(path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    synced: list[int] = []
    real_fsync = os.fsync
    monkeypatch.setattr(cursor_module.os, "fsync", lambda fd: (synced.append(fd), real_fsync(fd)))
    cursor = Cursor(path)
    started = time.perf_counter()
    for i in range(1000):
        cursor.record("/srv/app", "main", sha(i))
    cursor.sync()
    elapsed = time.perf_counter() - started
    assert len(synced) == 1
    assert elapsed < 2.0, f"1000 records took {elapsed:.2f}s"
    assert reopen(cursor).published("/srv/app", "main") == [sha(i) for i in range(1000)]


def test_the_memory_is_bounded_oldest_out(path: Path) -> None:
    cursor = Cursor(path, keep=3)
    for i in range(5):
        cursor.record("/srv/app", "main", sha(i))
    assert cursor.published("/srv/app", "main") == [sha(2), sha(3), sha(4)]
    cursor.record("/srv/app", "main", sha(2))  # published again: now the newest
    cursor.record("/srv/app", "main", sha(5))
    assert cursor.published("/srv/app", "main") == [sha(4), sha(2), sha(5)]
    cursor.close()
    assert Cursor(path, keep=3).published("/srv/app", "main") == [sha(4), sha(2), sha(5)]


def test_a_torn_last_line_is_dropped_and_the_next_starts_clean(path: Path) -> None:
    cursor = Cursor(path)
    cursor.record("/srv/app", "main", A)
    cursor.close()
    with open(cursor.journal_path, "a") as f:
        f.write('{"repo":"/srv/app","branch":"main","publi')  # killed mid-write
    again = Cursor(path)
    assert again.get("/srv/app", "main") == A
    again.record("/srv/app", "main", B)
    assert reopen(again).published("/srv/app", "main") == [A, B]


def test_unreadable_journal_lines_are_skipped(path: Path) -> None:
    path.parent.mkdir(parents=True)
    path.with_suffix(".journal").write_text(
        "\n".join(
            [
                json.dumps({"repo": "/srv/app", "branch": "main", "published": A}),
                "\x00\x00\x00",
                json.dumps({"repo": "/srv/app", "branch": "main", "published": "not-a-commit"}),
                json.dumps(["a", "list"]),
                json.dumps({"repo": "/srv/app", "branch": "main", "head": B}),
            ]
        )
        + "\n"
    )
    cursor = Cursor(path)
    assert cursor.get("/srv/app", "main") == B
    assert cursor.published("/srv/app", "main") == [A]


def test_compaction_makes_a_snapshot_and_empties_the_journal(path: Path) -> None:
    cursor = Cursor(path)
    cursor.record("/srv/app", "main", A)
    cursor.set("/srv/app", "main", B)
    cursor.compact()
    assert cursor.journal_path.read_text() == ""
    data = json.loads(path.read_text())
    assert data == {"version": 2, "repos": {"/srv/app": {"main": {"last": B, "published": [A]}}}}
    assert reopen(cursor).get("/srv/app", "main") == B


def test_a_crash_between_snapshot_and_journal_truncation_changes_nothing(
    path: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cursor = Cursor(path, keep=3)
    for i in range(5):
        cursor.record("/srv/app", "main", sha(i))
    cursor.set("/srv/app", "main", sha(1))
    journal = cursor.journal_path.read_text()
    cursor.compact()
    cursor.journal_path.write_text(journal)  # as if the truncation never happened
    again = crash_copy(cursor, tmp_path)
    assert again.published("/srv/app", "main") == [sha(2), sha(3), sha(4)]
    assert again.get("/srv/app", "main") == sha(1)


def test_a_long_journal_is_compacted_on_sync(path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(cursor_module, "COMPACT_AFTER", 10)
    cursor = Cursor(path)
    for i in range(9):
        cursor.record("/srv/app", "main", sha(i))
    cursor.sync()
    assert not path.exists()
    cursor.record("/srv/app", "main", sha(9))
    cursor.sync()
    assert len(json.loads(path.read_text())["repos"]["/srv/app"]["main"]["published"]) == 10
    assert cursor.journal_path.read_text() == ""


def test_a_snapshot_that_dies_midway_leaves_the_old_state(path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cursor = Cursor(path)
    cursor.record("/srv/app", "main", A)
    cursor.compact()
    before = path.read_bytes()
    cursor.record("/srv/app", "main", B)

    def die(*args: object, **kwargs: object) -> None:
        raise OSError("disk full")

    monkeypatch.setattr(cursor_module.os, "replace", die)
    with pytest.raises(OSError, match="disk full"):
        cursor.compact()
    monkeypatch.undo()
    assert path.read_bytes() == before
    assert reopen(cursor).get("/srv/app", "main") == B  # the journal still has it


def test_the_snapshot_and_its_folder_are_synced_before_the_journal_goes(
    path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    synced: list[str] = []
    real_fsync = os.fsync
    cursor = Cursor(path)
    cursor.record("/srv/app", "main", A)

    def fsync(fd: int) -> None:
        mode = os.fstat(fd).st_mode
        synced.append("dir" if stat.S_ISDIR(mode) else "empty" if os.fstat(fd).st_size == 0 else "file")
        real_fsync(fd)

    monkeypatch.setattr(cursor_module.os, "fsync", fsync)
    cursor.compact()
    # The data before the rename, the rename itself, and only then the emptied journal.
    assert synced == ["file", "dir", "empty"]


def test_the_first_version_still_reads(path: Path, tmp_path: Path) -> None:
    path.parent.mkdir(parents=True)
    (tmp_path / "app").mkdir()
    path.write_text(json.dumps({str(tmp_path / "app"): {"main": A, "dev": B}}))
    cursor = Cursor(path)
    assert cursor.get(str(tmp_path / "app"), "main") == A
    assert cursor.published(str(tmp_path / "app"), "dev") == [B]


def test_old_names_become_identities_and_lose_their_passwords(path: Path, tmp_path: Path) -> None:
    (tmp_path / "app").mkdir()
    path.parent.mkdir(parents=True)
    path.write_text(
        json.dumps(
            {
                "https://ci:s3cret@git.example.com/app.git": {"main": A},
                f"file://{tmp_path}/app/": {"main": B},
            }
        )
    )
    cursor = Cursor(path)
    assert cursor.get("https://git.example.com/app.git", "main") == A
    assert cursor.get(str(tmp_path / "app"), "main") == B
    assert "s3cret" not in path.read_text()  # rewritten at once


def test_an_unreadable_state_file_is_an_error(path: Path) -> None:
    path.parent.mkdir(parents=True)
    path.write_text("{not json")
    with pytest.raises(ValueError, match="unreadable"):
        Cursor(path)


def test_a_deeply_nested_state_file_is_an_error_not_a_crash(path: Path) -> None:
    path.parent.mkdir(parents=True)
    path.write_text("[" * 100_000 + "]" * 100_000)
    with pytest.raises(ValueError, match="unreadable"):
        Cursor(path)


def test_unexpected_shapes_are_ignored(path: Path) -> None:
    path.parent.mkdir(parents=True)
    path.write_text(json.dumps({"/srv/app": {"main": A}, "/srv/bad": ["x"], "/srv/worse": {"main": 7}}))
    cursor = Cursor(path)
    assert cursor.get("/srv/app", "main") == A
    assert cursor.get("/srv/bad", "main") is None
    assert cursor.get("/srv/worse", "main") is None
    cursor.close()
    path.write_text("[1, 2]")
    assert Cursor(path).get("/srv/app", "main") is None


def test_two_observers_cannot_share_a_state_folder(path: Path) -> None:
    first = Cursor(path)
    with pytest.raises(CursorBusy, match="another observer"):
        Cursor(path)
    first.close()
    Cursor(path).close()
