"""The observer's durable memory of what it published."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import pytest

from observer import cursor as cursor_module
from observer.cursor import Cursor

A = "a" * 40
B = "b" * 40
C = "c" * 40


@pytest.fixture
def path(tmp_path: Path) -> Path:
    return tmp_path / "state" / "cursor.json"


def test_an_empty_cursor_knows_nothing(path: Path) -> None:
    cursor = Cursor(path)
    assert cursor.get("/srv/app", "main") is None
    assert not path.exists()  # nothing is written until something is set


def test_set_and_get(path: Path) -> None:
    cursor = Cursor(path)
    cursor.set("/srv/app", "main", A)
    cursor.set("/srv/app", "dev", B)
    cursor.set("file:///srv/other", "main", C)
    cursor.set("/srv/app", "main", B)
    assert cursor.get("/srv/app", "main") == B
    assert cursor.get("/srv/app", "dev") == B
    assert cursor.get("file:///srv/other", "main") == C
    assert cursor.get("file:///srv/other", "dev") is None


def test_it_persists_across_instances(path: Path) -> None:
    Cursor(path).set("/srv/app", "main", A)
    again = Cursor(path)
    assert again.get("/srv/app", "main") == A
    again.set("/srv/app", "dev", B)
    third = Cursor(path)
    assert (third.get("/srv/app", "main"), third.get("/srv/app", "dev")) == (A, B)
    assert json.loads(path.read_text()) == {"/srv/app": {"dev": B, "main": A}}


def test_every_set_is_on_disk_at_once(path: Path) -> None:
    cursor = Cursor(path)
    for commit in (A, B, C):
        cursor.set("/srv/app", "main", commit)
        assert Cursor(path).get("/srv/app", "main") == commit


def test_a_write_that_dies_midway_leaves_the_old_state(path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cursor = Cursor(path)
    cursor.set("/srv/app", "main", A)
    before = path.read_bytes()

    def die(*args: object, **kwargs: object) -> None:
        raise OSError("disk full")

    monkeypatch.setattr(cursor_module.os, "replace", die)
    with pytest.raises(OSError, match="disk full"):
        cursor.set("/srv/app", "main", B)
    assert path.read_bytes() == before
    assert Cursor(path).get("/srv/app", "main") == A


def test_a_half_written_temporary_file_is_never_read(path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cursor = Cursor(path)
    cursor.set("/srv/app", "main", A)

    def half_dump(data: object, f: object, **kwargs: object) -> None:
        f.write('{"/srv/app": {"main": "')  # type: ignore[attr-defined]
        raise OSError("killed")

    monkeypatch.setattr(cursor_module.json, "dump", half_dump)
    with pytest.raises(OSError):
        cursor.set("/srv/app", "main", B)
    monkeypatch.undo()
    assert Cursor(path).get("/srv/app", "main") == A
    cursor = Cursor(path)
    cursor.set("/srv/app", "main", C)  # and the next write replaces the leftover
    assert Cursor(path).get("/srv/app", "main") == C
    assert sorted(p.name for p in path.parent.iterdir()) == ["cursor.json"]


def test_the_file_and_its_directory_are_synced(path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    synced: list[str] = []
    real_fsync = os.fsync

    def fsync(fd: int) -> None:
        synced.append("dir" if stat.S_ISDIR(os.fstat(fd).st_mode) else "file")
        real_fsync(fd)

    monkeypatch.setattr(cursor_module.os, "fsync", fsync)
    Cursor(path).set("/srv/app", "main", A)
    # The data before the rename, and the rename itself after it.
    assert synced == ["file", "dir"]


def test_an_unreadable_state_file_is_an_error(path: Path) -> None:
    path.parent.mkdir(parents=True)
    path.write_text("{not json")
    with pytest.raises(ValueError, match="unreadable"):
        Cursor(path)


def test_unexpected_shapes_are_ignored(path: Path) -> None:
    path.parent.mkdir(parents=True)
    path.write_text(json.dumps({"/srv/app": {"main": A}, "/srv/bad": ["x"]}))
    cursor = Cursor(path)
    assert cursor.get("/srv/app", "main") == A
    assert cursor.get("/srv/bad", "main") is None
    path.write_text("[1, 2]")
    assert Cursor(path).get("/srv/app", "main") is None
