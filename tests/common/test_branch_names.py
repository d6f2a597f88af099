"""Branch names are checked like `git check-ref-format --branch` wherever they enter."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from common.messages import CommitSeen, DecodeError, Job, check_branch, decode

GOOD = ["main", "feature/x", "release-1.2", "ü-branch", "a@b", "@x", "x.lock.y", "dependabot/npm/a-1.0", "refs/heads/x"]
BAD = [
    "main~3",
    "main^",
    "main@{1}",
    "@{-1}",
    "a..b",
    "-x",
    "--upload-pack=evil",
    "a/.b",
    ".a",
    "a.lock",
    "a/b.lock/c",
    "a/",
    "/a",
    "a//b",
    "a.",
    "a b",
    "a:b",
    "a?b",
    "a*b",
    "a[b",
    "a\\b",
    "a\nb",
    "main\n2024-01-01 INFO forged line",
    "a\tb",
    "a\x7fb",
    "HEAD",
]
# Stricter than git: a name that means HEAD to rev-parse, and characters that
# hide or reorder text in a log (format and separator characters).
STRICTER = ["@", "a\u202eb", "a\u2028b", "a\u200bb", "x" * 256]


@pytest.mark.parametrize("name", GOOD)
def test_good_names_pass(name: str) -> None:
    assert check_branch(name) == name


@pytest.mark.parametrize("name", BAD + STRICTER + [""])
def test_bad_names_say_why_in_one_line(name: str) -> None:
    with pytest.raises(ValueError) as info:
        check_branch(name)
    assert "\n" not in str(info.value)


def test_we_agree_with_git(tmp_path: Path) -> None:
    subprocess.run(["git", "init", "-q", str(tmp_path)], check=True)

    def git_accepts(name: str) -> bool:
        done = subprocess.run(["git", "check-ref-format", "--branch", name], cwd=tmp_path, capture_output=True)
        return done.returncode == 0

    assert all(git_accepts(name) for name in GOOD)
    assert not any(git_accepts(name) for name in BAD if "\n" not in name)


def _commit_seen(branch: object) -> bytes:
    return json.dumps(
        {
            "type": "commit_seen",
            "schema_version": 1,
            "repo": "/srv/app",
            "branch": branch,
            "commit": "a" * 40,
            "seen_at": 1.0,
        }  # fmt: skip
    ).encode()


@pytest.mark.parametrize("name", ["main~3", "main@{1}", "a\nb", "-x", ""])
def test_a_commit_seen_with_a_bad_branch_does_not_decode(name: str) -> None:
    with pytest.raises(DecodeError, match="commit_seen: "):
        decode(_commit_seen(name))
    with pytest.raises(ValueError):
        CommitSeen(repo="/srv/app", branch=name, commit="a" * 40, seen_at=1.0)


def test_a_job_with_a_bad_branch_does_not_decode() -> None:
    body = json.dumps(
        {
            "type": "job",
            "schema_version": 1,
            "job_id": "j",
            "attempt": 1,
            "repo": "/srv/app",
            "branch": "main..evil",
            "commit": "a" * 40,
        }  # fmt: skip
    ).encode()
    with pytest.raises(DecodeError, match="job: not a branch name"):
        decode(body)
    assert decode(body.replace(b"main..evil", b"main")) == Job(
        job_id="j", attempt=1, repo="/srv/app", branch="main", commit="a" * 40
    )
