"""Turning GitPython's errors into one line a user can read."""

from __future__ import annotations

import re

import git


def git_reason(exc: git.GitCommandError) -> str:
    """git's own `fatal:` line, without GitPython's wrapping."""
    match = re.search(r"fatal: (.*?)'?\s*$", str(exc.stderr or ""), re.MULTILINE)
    return match.group(1).strip() if match else one_line(exc)


def one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split())[:300]
