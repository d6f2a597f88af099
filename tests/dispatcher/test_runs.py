"""The planning of a split run's work queue, and its verdict: pure logic."""

from __future__ import annotations

from dataclasses import dataclass

from dispatcher.runs import plan, verdict


def suite(files: int, tests: int) -> list[str]:
    return [f"tests/test_{f:02d}.py::test_{t}" for f in range(files) for t in range(tests)]


def test_every_test_is_in_exactly_one_chunk():
    tests = suite(24, 5)
    chunks = plan(tests, {}, 4)
    handed = [n for nodes, _ in chunks for n in nodes]
    assert sorted(handed) == sorted(tests)


def test_a_file_stays_whole_and_chunks_shrink_toward_the_end():
    chunks = plan(suite(24, 5), {}, 4)
    for nodes, _ in chunks:
        files = {n.split("::")[0] for n in nodes}
        assert all(sum(n.startswith(f + "::") for n in nodes) == 5 for f in files)
    sizes = [len(nodes) for nodes, _ in chunks]
    assert sizes == sorted(sizes, reverse=True) and sizes[0] > sizes[-1] == 5


def test_longest_files_go_first_by_past_durations_and_unknown_tests_count_as_the_mean():
    tests = suite(4, 2)
    past = {n: 0.1 for n in tests}
    past["tests/test_02.py::test_0"] = past["tests/test_02.py::test_1"] = 3.0
    del past["tests/test_03.py::test_0"], past["tests/test_03.py::test_1"]  # never seen: the mean (0.8)
    chunks = plan(tests, past, 1)
    order = [nodes[0].split("::")[0] for nodes, _ in chunks]
    assert order[:2] == ["tests/test_02.py", "tests/test_03.py"]


def test_a_file_longer_than_a_fair_share_is_handed_out_test_by_test():
    tests = suite(1, 8) + suite(2, 1)[1:]
    chunks = plan(tests, {}, 4)
    assert max(len(nodes) for nodes, _ in chunks) < 8
    assert sorted(n for nodes, _ in chunks for n in nodes) == sorted(tests)


def test_an_empty_suite_has_no_chunks():
    assert plan([], {}, 3) == []


@dataclass
class T:
    node_id: str
    outcome: str


def test_verdict_flaky_does_not_fail_and_failing_wins_over_errors():
    assert verdict([T("a", "passed"), T("b", "flaky")]) == ("passed", "1 flaky")
    assert verdict([T("a", "failed"), T("b", "error")])[0] == "failed"
    assert verdict([T("a", "error"), T("b", "passed")])[0] == "error"
    assert verdict([]) == ("error", "the suite has no tests")
