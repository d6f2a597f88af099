"""What the observer reads from .volt.toml: the labels a job needs."""

from __future__ import annotations

import pytest

from common.voltfile import ConfigError, labels_of, parse, required_labels


@pytest.mark.parametrize(
    ("text", "labels"),
    [
        (None, []),
        ("", []),
        ('[test]\ncommand = "make test"\n', []),
        ('[test]\nlabels = ["linux", "gpu", "linux"]\n', ["gpu", "linux"]),
        ('[test]\nlabels = "python3.12"\n', ["python3.12"]),
        # Broken files need no labels here; the runner reports them as the job's error.
        ("[test\nlabels = [", []),
        ("test = 3\n", []),
        ("[test]\nlabels = [1, 2]\n", []),
        ('[test]\nlabels = ["has space"]\n', []),
    ],
)
def test_required_labels(text: str | None, labels: list[str]) -> None:
    assert required_labels(text) == labels


def test_broken_labels_say_what_is_wrong() -> None:
    with pytest.raises(ConfigError, match="test.labels must be a list of strings"):
        labels_of(parse("[test]\nlabels = [1]\n"))
    with pytest.raises(ConfigError, match="test.labels: not a label"):
        labels_of(parse('[test]\nlabels = ["$(touch /tmp/x)"]\n'))
    with pytest.raises(ConfigError, match="not valid TOML"):
        parse("[test")
