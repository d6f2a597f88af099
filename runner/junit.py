"""Test counts and per-test outcomes from a JUnit XML file, read safely.

The file is written by the code under test, so it is hostile until read:
expat is fed in chunks and builds no tree (memory stays flat whatever the
size), the file may be at most MAX_BYTES, a DOCTYPE is refused (so no entity
is ever declared or expanded, and no external one fetched), and at most
MAX_CASES test cases are kept (all of them are counted).

Counts come from the <testcase> elements, wherever they are (suites nest),
not from the suites' own `tests=`/`failures=` attributes: nested suites
repeat their children's numbers, and a test writes what it likes there. Only
a file with no test case at all falls back on its outermost suites' attributes.
"""

from __future__ import annotations

import logging
import math
import os
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from xml.parsers import expat

log = logging.getLogger(__name__)

MAX_BYTES = 64 * 1024 * 1024
MAX_CASES = 10_000
MAX_NODE_ID = 1000  # characters of a node id kept
_CHUNK = 256 * 1024

OUTCOMES = ("passed", "failed", "error", "skipped")


@dataclass(frozen=True)
class Counts:
    tests: int = 0
    failures: int = 0
    errors: int = 0
    skipped: int = 0

    @property
    def passed(self) -> int:
        return max(0, self.tests - self.failures - self.errors - self.skipped)


@dataclass(frozen=True)
class Case:
    """One test: its node id as pytest prints it (`tests/test_x.py::TestA::test_b[1]`),
    one of OUTCOMES, and how long it took."""

    node_id: str
    outcome: str
    duration_s: float


@dataclass(frozen=True)
class Junit:
    counts: Counts
    cases: tuple[Case, ...] = ()
    cases_dropped: int = 0  # counted, but past MAX_CASES and not kept


class _Refused(Exception):
    """Why a file is not read; one line for the log."""


def read_junit(path: Path) -> Junit | None:
    """The counts and cases of a JUnit XML file; None if there is none, or (with a
    warning that says why) if it is too big, not JUnit XML, or hostile."""
    try:
        return _read(path)
    except FileNotFoundError:
        return None
    except _Refused as exc:
        log.warning("JUnit XML %s ignored: %s", path, exc)
        return None
    except OSError as exc:
        log.warning("JUnit XML %s ignored: %s", path, exc.strerror or exc)
        return None


def _read(path: Path) -> Junit:
    # O_NONBLOCK: a FIFO put there by the test must not hang the runner; only
    # a regular file is read.
    # O_NOFOLLOW: nor a link to a file of the runner's (/proc/self/environ).
    with os.fdopen(os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOFOLLOW), "rb") as f:
        info = os.fstat(f.fileno())
        if not stat.S_ISREG(info.st_mode):
            raise _Refused("not a regular file")
        if info.st_size > MAX_BYTES:
            raise _Refused(f"{info.st_size} bytes, more than the {MAX_BYTES} read")
        reader = _Reader()
        parser = reader.parser()
        seen = 0
        try:
            while chunk := f.read(_CHUNK):
                seen += len(chunk)
                if seen > MAX_BYTES:
                    raise _Refused(f"grew past the {MAX_BYTES} bytes read")
                parser.Parse(chunk, False)
            parser.Parse(b"", True)
        except expat.ExpatError as exc:
            raise _Refused(f"not well-formed XML: {exc}") from None
    return reader.result()


class _Reader:
    """expat callbacks that count test cases as they stream past."""

    def __init__(self) -> None:
        self.depth = 0
        self.root = ""
        self.case: dict[str, Any] | None = None
        self.case_depth = -1
        self.totals = dict.fromkeys(OUTCOMES, 0)
        self.cases: list[Case] = []
        self.dropped = 0
        self.suite_attrs: list[dict[str, str]] = []  # the outermost suites', for files without cases

    def parser(self) -> Any:
        p = expat.ParserCreate()
        p.SetParamEntityParsing(expat.XML_PARAM_ENTITY_PARSING_NEVER)
        p.StartDoctypeDeclHandler = self._doctype
        p.EntityDeclHandler = self._entity
        p.ExternalEntityRefHandler = self._external
        p.StartElementHandler = self._start
        p.EndElementHandler = self._end
        return p

    @staticmethod
    def _doctype(*_: Any) -> None:
        raise _Refused("it has a DOCTYPE (entities are not expanded here)")

    @staticmethod
    def _entity(*_: Any) -> None:
        raise _Refused("it declares an entity")

    @staticmethod
    def _external(*_: Any) -> int:
        raise _Refused("it refers to an external entity")

    def _start(self, tag: str, attrs: dict[str, str]) -> None:
        if self.depth == 0:
            if tag not in ("testsuite", "testsuites"):
                raise _Refused(f"the root element is <{tag[:40]}>, not <testsuites> or <testsuite>")
            self.root = tag
        if tag == "testsuite" and (self.depth == 0 or (self.depth == 1 and self.root == "testsuites")):
            self.suite_attrs.append(dict(attrs))
        self.depth += 1
        if tag == "testcase" and self.case is None:
            self.case = {"attrs": attrs, "failure": False, "error": False, "skipped": False}
            self.case_depth = self.depth
        elif self.case is not None and self.depth == self.case_depth + 1 and tag in ("failure", "error", "skipped"):
            self.case[tag] = True

    def _end(self, tag: str) -> None:
        if self.case is not None and self.depth == self.case_depth:
            self._finish(self.case)
            self.case = None
        self.depth -= 1

    def _finish(self, case: dict[str, Any]) -> None:
        # One outcome per case: a test that failed and then errored in its
        # teardown counts as failed.
        outcome = (
            "failed" if case["failure"] else "error" if case["error"] else "skipped" if case["skipped"] else "passed"
        )
        self.totals[outcome] += 1
        if len(self.cases) >= MAX_CASES:
            self.dropped += 1
            return
        attrs = case["attrs"]
        node = node_id(attrs.get("classname", ""), attrs.get("name", ""), attrs.get("file"))
        self.cases.append(Case(node[:MAX_NODE_ID], outcome, _seconds(attrs.get("time"))))

    def result(self) -> Junit:
        t = self.totals
        if sum(t.values()):
            counts = Counts(tests=sum(t.values()), failures=t["failed"], errors=t["error"], skipped=t["skipped"])
            return Junit(counts, tuple(self.cases), self.dropped)
        return Junit(_summed(self.suite_attrs))


def _summed(suites: list[dict[str, str]]) -> Counts:
    """The outermost suites' own counts, for a file that lists no test case."""
    total = [0, 0, 0, 0]
    for attrs in suites:
        for i, key in enumerate(("tests", "failures", "errors", "skipped")):
            raw = attrs.get(key, "0")
            try:
                value = int(raw)
            except ValueError:
                raise _Refused(f"testsuite {key}={raw[:40]!r} is not a count") from None
            if not 0 <= value < 2**31:
                raise _Refused(f"testsuite {key}={value} is not a count")
            total[i] += value
    return Counts(*total)


def _seconds(raw: str | None) -> float:
    try:
        value = float(raw or 0)
    except ValueError:
        return 0.0
    return value if math.isfinite(value) and value >= 0 else 0.0


def node_id(classname: str, name: str, file: str | None = None) -> str:
    """pytest's node id from JUnit's classname and name.

    pytest writes `tests/test_x.py::TestA::test_b` as classname
    `tests.test_x.TestA` and name `test_b`; the trailing parts that start
    with a capital are taken for classes, the rest for the module path (the
    `file` attribute, when written, settles it). Other tools' classnames come
    back as `classname::name`, which is as good an id.
    """
    if not classname:
        return name
    parts = classname.split(".")
    if file and file.endswith(".py"):
        module = file[: -len(".py")].replace("\\", "/").split("/")
        if parts[: len(module)] == module:
            return "::".join([file, *parts[len(module) :], name])
    first_class = len(parts)
    while first_class > 0 and parts[first_class - 1][:1].isupper():
        first_class -= 1
    if first_class == 0:  # no module part at all: not pytest's
        return f"{classname}::{name}"
    path = "/".join(parts[:first_class]) + ".py"
    return "::".join([path, *parts[first_class:], name])
