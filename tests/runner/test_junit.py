"""JUnit XML: counts from the test cases, per-test outcomes, and hostile files read safely."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import threading
import time
import tracemalloc
from pathlib import Path

import pytest

from runner import junit
from runner.junit import Case, Counts, node_id, read_junit

SAMPLE = """
import pytest

@pytest.fixture
def broken():
    raise RuntimeError("fixture broke")

def test_ok():
    pass

def test_fails():
    assert 1 == 2

def test_skipped():
    pytest.skip("the sample suite's own skip: what a skipped case looks like in JUnit")

@pytest.mark.xfail
def test_expected_to_fail():
    assert False

def test_errors(broken):
    pass

@pytest.mark.parametrize("n", [1, 2])
def test_param(n):
    assert n

class TestGroup:
    def test_in_class(self):
        pass

    class TestInner:
        def test_nested(self):
            pass
"""


def pytest_junit(tmp_path: Path) -> tuple[Path, list[str]]:
    """Run real pytest on SAMPLE: its JUnit file, and the node ids it collects."""
    tests = tmp_path / "tests"
    tests.mkdir()
    (tests / "test_sample.py").write_text(SAMPLE)
    xml = tmp_path / "junit.xml"
    base = [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-c", os.devnull, f"--rootdir={tmp_path}"]
    subprocess.run([*base, "-q", f"--junitxml={xml}", "tests"], cwd=tmp_path, capture_output=True, check=False)
    collected = subprocess.run(
        [*base, "-q", "--collect-only", "tests"], cwd=tmp_path, capture_output=True, text=True, check=False
    ).stdout
    return xml, [line for line in collected.splitlines() if "::" in line]


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "junit.xml"
    path.write_text(text)
    return path


def test_pytests_own_file_gives_counts_and_its_node_ids(tmp_path: Path) -> None:
    xml, collected = pytest_junit(tmp_path)
    found = read_junit(xml)
    assert found is not None
    # ok, 2 params, 2 in classes: passed; fails: failed; broken fixture: error; skip and xfail: skipped.
    assert found.counts == Counts(tests=9, failures=1, errors=1, skipped=2)
    assert found.counts.passed == 5
    by_id = {c.node_id: c for c in found.cases}
    assert sorted(by_id) == sorted(collected)  # the ids pytest itself prints
    assert by_id["tests/test_sample.py::test_fails"].outcome == "failed"
    assert by_id["tests/test_sample.py::test_errors"].outcome == "error"
    assert by_id["tests/test_sample.py::test_param[2]"].outcome == "passed"
    assert by_id["tests/test_sample.py::TestGroup::TestInner::test_nested"].outcome == "passed"
    assert by_id["tests/test_sample.py::test_expected_to_fail"].outcome == "skipped"
    assert all(c.duration_s >= 0 for c in found.cases)


def test_nested_suites_count_their_cases_once(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        '<testsuites tests="99" failures="99"><testsuite name="outer" tests="50" failures="7">'
        '<testcase classname="a.b" name="t1" time="0.5"/>'
        '<testsuite name="inner" tests="50" failures="7">'
        '<testcase classname="a.c" name="t2"><failure message="x"/></testcase>'
        '<testcase classname="a.c" name="t3"><skipped/></testcase>'
        '<testcase classname="a.c" name="t4"><error/></testcase>'
        "</testsuite></testsuite>"
        '<testsuite name="second"><testcase classname="a.d" name="t5"><failure/><error/></testcase></testsuite>'
        "</testsuites>",
    )
    found = read_junit(path)
    assert found is not None
    assert found.counts == Counts(tests=5, failures=2, errors=1, skipped=1)
    assert found.cases[0] == Case("a/b.py::t1", "passed", 0.5)
    assert [c.outcome for c in found.cases] == ["passed", "failed", "skipped", "error", "failed"]


def test_a_failure_inside_a_nested_element_is_not_the_cases(tmp_path: Path) -> None:
    path = write(tmp_path, '<testsuite><testcase name="t"><properties><failure/></properties></testcase></testsuite>')
    found = read_junit(path)
    assert found is not None and found.counts == Counts(tests=1)


def test_a_file_without_cases_falls_back_on_its_outermost_suites(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        '<testsuites><testsuite tests="3" failures="1"><testsuite tests="3" failures="1"/></testsuite>'
        '<testsuite tests="4" errors="2" skipped="1"/></testsuites>',
    )
    found = read_junit(path)
    assert found is not None and found.counts == Counts(tests=7, failures=1, errors=2, skipped=1)
    assert found.cases == ()
    single = read_junit(write(tmp_path, '<testsuite tests="6" failures="2" skipped="1"/>'))
    assert single is not None and single.counts == Counts(tests=6, failures=2, skipped=1)


@pytest.mark.parametrize(
    ("content", "says"),
    [
        ("not xml at all <<<", "not well-formed"),
        ("<testsuites><testsuite tests='3'>", "not well-formed"),
        ('<testsuite tests="many"/>', "is not a count"),
        ('<testsuite tests="-5"/>', "is not a count"),
        ("", "not well-formed"),
        ("<html><testcase/></html>", "root element is <html>"),
        ('<testsuite><testcase name="&nope;"/></testsuite>', "not well-formed"),
    ],
)
def test_garbage_is_none_with_the_reason(
    tmp_path: Path, content: str, says: str, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.WARNING, logger="runner.junit"):
        assert read_junit(write(tmp_path, content)) is None
    assert says in caplog.text


def test_missing_file_or_directory_is_none(tmp_path: Path) -> None:
    assert read_junit(tmp_path / "absent.xml") is None
    assert read_junit(tmp_path) is None


BILLION_LAUGHS = (
    '<?xml version="1.0"?><!DOCTYPE lolz [<!ENTITY lol "lol">'
    + "".join(f'<!ENTITY lol{i} "{("&lol" + (str(i - 1) if i > 1 else "") + ";") * 10}">' for i in range(1, 10))
    + ']><testsuite><testcase name="&lol9;"/></testsuite>'
)


def test_entity_expansion_is_refused_at_once(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    started = time.monotonic()
    with caplog.at_level(logging.WARNING, logger="runner.junit"):
        assert read_junit(write(tmp_path, BILLION_LAUGHS)) is None
    assert time.monotonic() - started < 1
    assert "DOCTYPE" in caplog.text


def test_external_entities_are_never_read(tmp_path: Path) -> None:
    secret = tmp_path / "secret.txt"
    secret.write_text("runner-password")
    xml = (
        f'<?xml version="1.0"?><!DOCTYPE t [<!ENTITY s SYSTEM "file://{secret}">]>'
        '<testsuite><testcase classname="x" name="&s;"/></testsuite>'
    )
    assert read_junit(write(tmp_path, xml)) is None
    no_dtd = write(tmp_path, f'<testsuite><testcase name="a"/><?xml-stylesheet href="file://{secret}"?></testsuite>')
    found = read_junit(no_dtd)
    assert found is not None and all("password" not in c.node_id for c in found.cases)


def test_a_file_over_the_size_cap_is_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(junit, "MAX_BYTES", 100_000)
    path = write(tmp_path, "<testsuite>" + '<testcase name="t"/>' * 10_000 + "</testsuite>")
    with caplog.at_level(logging.WARNING, logger="runner.junit"):
        assert read_junit(path) is None
    assert "more than the 100000 read" in caplog.text


def test_a_fifo_does_not_hang_the_reader(tmp_path: Path) -> None:
    fifo = tmp_path / "junit.xml"
    os.mkfifo(fifo)
    done: list[object] = []
    reader = threading.Thread(target=lambda: done.append(read_junit(fifo)), daemon=True)
    reader.start()
    reader.join(timeout=5)
    assert done == [None]


def test_many_cases_are_all_counted_in_flat_memory_and_kept_up_to_the_cap(tmp_path: Path) -> None:
    count = 50_000
    path = tmp_path / "junit.xml"
    with path.open("w") as f:
        f.write("<testsuites><testsuite>")
        for i in range(count):
            f.write(f'<testcase classname="tests.test_big" name="test_{i}" time="0.001">')
            f.write("<skipped/>" if i % 10 == 0 else "")
            f.write("<system-out>" + "x" * 400 + "</system-out></testcase>")
        f.write("</testsuite></testsuites>")
    assert path.stat().st_size > 20_000_000
    tracemalloc.start()
    try:
        found = read_junit(path)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert found is not None
    assert found.counts == Counts(tests=count, skipped=count // 10)
    assert len(found.cases) == junit.MAX_CASES and found.cases_dropped == count - junit.MAX_CASES
    assert found.cases[1] == Case("tests/test_big.py::test_1", "passed", 0.001)
    assert peak < 12 * 1024 * 1024, peak  # the cases kept, not the file


def test_a_huge_node_id_is_cut(tmp_path: Path) -> None:
    found = read_junit(write(tmp_path, f'<testsuite><testcase classname="m" name="{"n" * 50_000}"/></testsuite>'))
    assert found is not None and len(found.cases[0].node_id) == junit.MAX_NODE_ID


@pytest.mark.parametrize(
    ("classname", "name", "file", "expected"),
    [
        ("tests.test_x", "test_a", None, "tests/test_x.py::test_a"),
        ("tests.test_x.TestA", "test_b[1-2]", None, "tests/test_x.py::TestA::test_b[1-2]"),
        ("tests.test_x.TestA.TestB", "test_c", None, "tests/test_x.py::TestA::TestB::test_c"),
        ("pkg.Tests.test_x.TestA", "t", "pkg/Tests/test_x.py", "pkg/Tests/test_x.py::TestA::t"),
        ("MySuite", "does_it", None, "MySuite::does_it"),
        ("", "bare", None, "bare"),
    ],
)
def test_node_id(classname: str, name: str, file: str | None, expected: str) -> None:
    assert node_id(classname, name, file) == expected
