"""What the observer reads from .volt.toml: the labels a job needs."""

from __future__ import annotations

import pytest

from common.voltfile import MAX_CONFIG_BYTES, ConfigError, labels_of, parse, required_labels

DEEP_ARRAY = "[test]\nlabels = " + "[" * 3000 + "]" * 3000 + "\n"
DEEP_TABLE = "x = " + "{a = " * 3000 + "1" + "}" * 3000 + "\n"


@pytest.mark.parametrize(
    ("text", "labels"),
    [
        (None, []),
        ("", []),
        ('[test]\ncommand = "make test"\n', []),
        ('[test]\nlabels = ["linux", "gpu", "linux"]\n', ["gpu", "linux"]),
        # Broken files need no labels here; the runner reports them as the job's error.
        ('[test]\nlabels = "python3.12"\n', []),
        ("[test\nlabels = [", []),
        ("test = 3\n", []),
        ("[test]\nlabels = [1, 2]\n", []),
        ('[test]\nlabels = ["has space"]\n', []),
        (DEEP_ARRAY, []),
        (DEEP_TABLE, []),
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


def test_a_lone_string_is_not_a_list_of_labels() -> None:
    # Read as one label, it would wait forever for a runner with a label nobody meant.
    with pytest.raises(ConfigError, match="test.labels must be a list of strings"):
        labels_of(parse('[test]\nlabels = "linux"\n'))


@pytest.mark.parametrize("text", [DEEP_ARRAY, DEEP_TABLE])
def test_deep_nesting_is_a_config_error_not_a_crash(text: str) -> None:
    with pytest.raises(ConfigError, match="nested too deeply"):
        parse(text)


def test_any_other_failure_of_the_parser_is_a_config_error(monkeypatch: pytest.MonkeyPatch) -> None:
    import common.voltfile as voltfile

    def explode(text: str) -> None:
        raise MemoryError("no more")

    monkeypatch.setattr(voltfile.tomllib, "loads", explode)
    with pytest.raises(ConfigError, match="cannot be read: MemoryError: no more"):
        parse("[test]\n")


def test_a_huge_file_is_not_parsed() -> None:
    with pytest.raises(ConfigError, match="larger than 64 KiB"):
        parse("#" * (MAX_CONFIG_BYTES + 1))
    assert parse("#" * (MAX_CONFIG_BYTES - 1)) == {}


@pytest.mark.parametrize(
    ("text", "labels"),
    [
        ('[env]\npython = "3.12"\n', ["python3.12"]),
        ('[test]\nlabels = ["gpu"]\n[env]\npython = "3.13"\n', ["gpu", "python3.13"]),
        ("[env]\nsystem = true\n", ["system-python"]),
        ('[env]\nextras = ["test"]\n', []),
        ('[env]\npython = "3"\n', []),  # broken: the runner says so
    ],
)
def test_an_env_table_asks_for_the_runners_that_have_its_python(text: str, labels: list[str]) -> None:
    assert required_labels(text) == labels


@pytest.mark.parametrize(
    ("text", "why"),
    [
        ("[env]\npython = 3.12\n", "env.python must be a version"),
        ('[env]\ninstall = "pytest-xdist"\n', "env.install must be a list of strings"),
        ('[env]\nrequirements = ["../outside.txt"]\n', "not a path inside the repository"),
        ('[env]\nrequirements = ["/etc/passwd"]\n', "not a path inside the repository"),
        ('[env]\nextras = ["a b"]\n', "not an extra or group name"),
        ('[env]\nsystem = true\ninstall = ["x"]\n', "nothing to install"),
        ("[env]\npyhton = '3.12'\n", "has no setting 'pyhton'"),
        ("[checkout]\nsubmodules = 'no'\n", "checkout.submodules must be true or false"),
        ("env = 1\n", r"\[env\] must be a table"),
    ],
)
def test_a_broken_env_or_checkout_table_says_what_is_wrong(text: str, why: str) -> None:
    from common.voltfile import checkout_of, env_of, tables

    with pytest.raises(ConfigError, match=why):
        data = tables(text)
        env_of(data)
        checkout_of(data)


def test_env_and_checkout_tables_are_read_whole() -> None:
    from common.voltfile import CheckoutSpec, EnvSpec, checkout_of, env_of, tables

    data = tables(
        '[env]\npython = "3.12"\ninstall = ["--pre", "x>=1"]\nrequirements = ["ci/r.txt"]\n'
        'extras = ["test"]\ngroups = ["lint"]\neditable = false\n[checkout]\nsubmodules = false\n'
    )
    assert env_of(data) == EnvSpec("3.12", ("--pre", "x>=1"), ("ci/r.txt",), ("test",), ("lint",), False, False)
    assert checkout_of(data) == CheckoutSpec(submodules=False)
    assert env_of({}) == EnvSpec() and checkout_of({}).submodules
