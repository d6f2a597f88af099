"""Settings: default < VOLT_* < flag for every setting, one line for a bad value;
and the broker's URL checks, password redaction, namespace rules."""

from __future__ import annotations

import dataclasses
import fnmatch
import socket
from pathlib import Path

import pytest

from common.cli import ONE_SHOT, build_parser
from common.naming import normalize_repo
from common.settings import (
    DEFAULT_AMQP_URL,
    BrokerSettings,
    SettingsError,
    check_amqp_url,
    redact_url,
    resolve_common,
    writable_dir,
)
from common.up import UpSettings, commands, options
from dispatcher.cli import OPTIONS as DISPATCHER_OPTIONS
from dispatcher.service import DispatcherSettings
from observer.cli import OPTIONS as OBSERVER_OPTIONS
from observer.service import ObserverSettings
from runner.cli import OPTIONS as RUNNER_OPTIONS
from runner.service import RunnerSettings


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        ("amqp://guest:guest@localhost:5672/%2F", "amqp://guest:***@localhost:5672/%2F"),
        ("amqps://volt:s3cret@mq.example.com/ci", "amqps://volt:***@mq.example.com/ci"),
        ("amqp://volt:p%40ss%3Aword@mq:5671/v", "amqp://volt:***@mq:5671/v"),
        ("amqp://volt:p@ss@mq/v", "amqp://volt:***@mq/v"),  # an unescaped '@' in the password
        ("amqp://volt:pw@[::1]:5672/%2F", "amqp://volt:***@[::1]:5672/%2F"),
        ("amqp://volt:pw@MQ.Example.com/", "amqp://volt:***@MQ.Example.com/"),
        ("amqp://volt:pw@mq:notaport/", "amqp://volt:***@mq:notaport/"),
        ("amqp://volt:@mq/", "amqp://volt:***@mq/"),
    ],
)
def test_redact_url_hides_the_password(url: str, shown: str) -> None:
    assert redact_url(url) == shown


@pytest.mark.parametrize("url", ["amqp://localhost/", "amqp://volt@mq:5672/%2F", "not a url at all"])
def test_redact_url_leaves_urls_without_a_password_alone(url: str) -> None:
    assert redact_url(url) == url


def test_redact_url_never_echoes_what_it_cannot_parse() -> None:
    assert "s3cret" not in redact_url("amqp://volt:s3cret@[::1/")


def test_default_settings_are_valid() -> None:
    settings = BrokerSettings()
    assert settings.amqp_url == DEFAULT_AMQP_URL
    assert settings.namespace == "volt"


@pytest.mark.parametrize(
    "url",
    [
        "",
        "localhost:5672",
        "http://guest:guest@localhost:5672/",
        "amqp://",
        "amqp:///%2F",
        "amqp://guest:guest@:5672/",
        "amqp://guest:guest@localhost:notaport/",
        "amqp://guest:guest@localhost:99999/",
        "amqp://guest:guest@[::1/",
    ],
)
def test_bad_amqp_url_raises_settings_error(url: str) -> None:
    with pytest.raises(SettingsError, match="not an AMQP URL"):
        BrokerSettings(amqp_url=url)


def test_bad_amqp_url_error_does_not_leak_the_password() -> None:
    with pytest.raises(SettingsError) as info:
        check_amqp_url("amqp://volt:hunter2@mq:http/")
    assert "hunter2" not in str(info.value)
    assert "volt:***@mq" in str(info.value)


@pytest.mark.parametrize("url", ["amqps://u:p@mq.example.com:5671/ci", "amqp://[::1]/", "amqp://mq"])
def test_good_amqp_urls(url: str) -> None:
    assert BrokerSettings(amqp_url=url).amqp_url == url


@pytest.mark.parametrize("namespace", ["volt", "ci-2", "t_0123abcd", "A"])
def test_good_namespaces(namespace: str) -> None:
    assert BrokerSettings(namespace=namespace).namespace == namespace


@pytest.mark.parametrize("namespace", ["", "a.b", "a b", "a/b", "volt#", "x*", "ns\n"])
def test_bad_namespace_raises_settings_error(namespace: str) -> None:
    with pytest.raises(SettingsError, match="namespace"):
        BrokerSettings(namespace=namespace)


def parse(*argv: str):
    """`volt ARGV` parsed by the real parser."""
    return build_parser(argv[0]).parse_args(list(argv))


def runner(*flags: str, **env: str) -> RunnerSettings:
    return RunnerSettings.from_args(parse("runner", *flags), {f"VOLT_{k}": v for k, v in env.items()})


def test_a_flag_beats_its_variable_which_beats_the_default() -> None:
    assert runner(RUNNER_ID="r1").job_timeout == 600.0
    assert runner(RUNNER_ID="r1", JOB_TIMEOUT="30").job_timeout == 30.0
    assert runner("--job-timeout", "5", RUNNER_ID="r1", JOB_TIMEOUT="30").job_timeout == 5.0
    assert runner("--id", "r2", RUNNER_ID="r1").runner_id == "r2"
    # An empty variable is no value at all.
    assert runner(RUNNER_ID="r1", JOB_TIMEOUT="  ").job_timeout == 600.0


def test_a_repeatable_flag_replaces_its_variable_and_never_adds_to_it() -> None:
    has = runner(RUNNER_ID="r1").labels  # what the runner has (python3.11, ...) follows what it is given
    assert runner(RUNNER_ID="r1", LABELS="gpu, big").labels == ("gpu", "big", *has)
    assert runner("--label", "linux", RUNNER_ID="r1", LABELS="gpu,big").labels == ("linux", *has)
    assert runner("--label", "a", "--label", "b", RUNNER_ID="r1", LABELS="gpu").labels == ("a", "b", *has)
    hidden = runner("--sandbox-hide", "/srv/keys", RUNNER_ID="r1", SANDBOX_HIDE="/a:/b")
    assert hidden.sandbox_hide == (Path("/srv/keys"),)
    assert runner(RUNNER_ID="r1", SANDBOX_HIDE="/a:/b").sandbox_hide == (Path("/a"), Path("/b"))
    allowed = runner("--allow-repo", "/srv/one", RUNNER_ID="r1", ALLOW_REPOS="/srv/two /srv/three")
    assert allowed.allow_repos == ("/srv/one",)

    env = {"VOLT_OPERATORS": "alice,bob", "VOLT_DB": "/tmp/x.db"}
    assert DispatcherSettings.from_args(parse("dispatcher"), env).operators == ("alice", "bob")
    assert DispatcherSettings.from_args(parse("dispatcher", "--operator", "carol"), env).operators == ("carol",)

    env = {"VOLT_REPOS": "/srv/a /srv/b", "VOLT_BRANCHES": "main,release"}
    watching = ObserverSettings.from_args(parse("observer", "--repo", "/srv/c", "--branch", "dev"), env)
    assert (watching.repos, watching.branches) == (("/srv/c",), ("dev",))
    watching = ObserverSettings.from_args(parse("observer"), env)
    assert (watching.repos, watching.branches) == (("/srv/a", "/srv/b"), ("main", "release"))


def test_repositories_in_a_variable_are_one_per_line_when_a_path_holds_a_space() -> None:
    env = {"VOLT_REPOS": "/srv/my repo\n  https://ci:tok@git.example.com/app.git\n\n"}
    assert ObserverSettings.from_env(env).repos == ("/srv/my repo", "https://ci:tok@git.example.com/app.git")


def test_a_switch_reads_yes_or_no_and_its_flag_can_say_either() -> None:
    assert runner(RUNNER_ID="r1").allow_network is False
    assert runner(RUNNER_ID="r1", ALLOW_NETWORK="true").allow_network is True
    assert runner("--no-allow-network", RUNNER_ID="r1", ALLOW_NETWORK="1").allow_network is False
    assert runner("--allow-network", RUNNER_ID="r1", ALLOW_NETWORK="off").allow_network is True


def test_the_sandbox_settings_and_their_defaults(tmp_path: Path) -> None:
    settings = runner(RUNNER_ID="r1")
    assert (settings.sandbox, settings.sandbox_hide, settings.git_timeout, settings.git_credentials) == (
        "bwrap",
        (),
        300.0,
        None,
    )
    store = tmp_path / "credentials"
    store.write_text("https://ci:token@git.example.com\n")
    env = {"SANDBOX": "none", "GIT_TIMEOUT": "12.5", "GIT_CREDENTIALS": str(store)}
    settings = runner(RUNNER_ID="r1", **env)
    assert (settings.sandbox, settings.git_timeout, settings.git_credentials) == ("none", 12.5, store)
    assert runner("--sandbox", "bwrap", "--git-timeout", "1", RUNNER_ID="r1", **env).sandbox == "bwrap"


@pytest.mark.parametrize(
    ("argv", "env", "said"),
    [
        (("runner", "--job-timeout", "-1"), {}, "--job-timeout: must be a positive number of seconds, got '-1'"),
        (("runner",), {"JOB_TIMEOUT": "soon"}, "VOLT_JOB_TIMEOUT: must be a positive number of seconds, got 'soon'"),
        (("runner",), {"HEARTBEAT_INTERVAL": "nan"}, "VOLT_HEARTBEAT_INTERVAL: must be a positive number"),
        (("runner", "--sandbox", "docker"), {}, "--sandbox: must be one of bwrap, none, got 'docker'"),
        (("runner",), {"ALLOW_NETWORK": "maybe"}, "VOLT_ALLOW_NETWORK: must be 1 or 0"),
        (("runner", "--git-credentials", "/no/such/file"), {}, "--git-credentials: no such file: /no/such/file"),
        (("runner", "--id", "bad id!"), {}, "--id: runner id must be letters"),
        (("runner",), {"LABELS": "gpu,no way!"}, "VOLT_LABELS: not a label"),
        (("runner", "--allow-repo", "https://host:port/*"), {}, "--allow-repo: not a repository URL"),
        (("dispatcher", "--http-port", "70000"), {}, "--http-port: must be a port from 0 (off) to 65535"),
        (("dispatcher",), {"MAX_ATTEMPTS": "0"}, "VOLT_MAX_ATTEMPTS: must be a whole number of at least 1"),
        (("observer",), {}, "no repository to watch: give --repo (or VOLT_REPOS)"),
        (("observer", "--repo", "/srv/a", "--branch", "main~3"), {}, "--branch: not a branch name"),
        (("observer", "--repo", "/srv/a"), {"POLL": "0"}, "VOLT_POLL: must be a positive number"),
        (("up", "--repo", "/srv/a", "--runners", "0"), {}, "--runners: must be a whole number of at least 1"),
        (("status",), {"AMQP_URL": "http://guest:hunter2@mq/"}, "VOLT_AMQP_URL: not an AMQP URL: http://guest:***@mq/"),
        (("status", "--namespace", "a.b"), {}, "--namespace: must be letters, digits"),
        (("status",), {"LOG_LEVEL": "loud"}, "VOLT_LOG_LEVEL: must be one of DEBUG, INFO, WARNING, ERROR"),
    ],
)
def test_a_bad_value_is_one_line_that_names_where_it_came_from(argv, env, said) -> None:
    args = parse(*argv)
    environ = {"VOLT_RUNNER_ID": "r1", **{f"VOLT_{k}": v for k, v in env.items()}}
    build = {
        "runner": RunnerSettings.from_args,
        "dispatcher": DispatcherSettings.from_args,
        "observer": ObserverSettings.from_args,
        "up": UpSettings.from_args,
    }.get(argv[0], lambda a, e: resolve_common(a, environ=e))
    with pytest.raises(SettingsError) as info:
        build(args, environ)
    assert str(info.value).startswith(said), str(info.value)
    assert "\n" not in str(info.value) and "hunter2" not in str(info.value)


def test_commands_that_answer_and_end_log_only_warnings_unless_told() -> None:
    args = parse("status")
    resolve_common(args, quiet=True, environ={})
    assert args.log_level == "WARNING"
    args = parse("status")
    resolve_common(args, quiet=True, environ={"VOLT_LOG_LEVEL": "debug"})
    assert args.log_level == "DEBUG"
    args = parse("runner", "--log-level", "error", "--amqp-url", "amqp://mq/")
    resolve_common(args, environ={"VOLT_LOG_LEVEL": "DEBUG", "VOLT_AMQP_URL": "amqp://other/"})
    assert (args.log_level, args.amqp_url) == ("ERROR", "amqp://mq/")
    assert BrokerSettings.from_env({"VOLT_AMQP_URL": "amqp://other/", "VOLT_NAMESPACE": "ci"}) == BrokerSettings(
        amqp_url="amqp://other/", namespace="ci"
    )


def test_from_env_is_from_args_without_flags() -> None:
    env = {"VOLT_RUNNER_ID": "r7", "VOLT_LABELS": "gpu", "VOLT_NAMESPACE": "ci"}
    assert RunnerSettings.from_env(env) == RunnerSettings.from_args(parse("runner"), env)
    settings = RunnerSettings.from_env(env)
    assert settings.broker.namespace == "ci"
    assert settings.workdir == (Path(".volt") / "runner-r7").resolve()
    assert DispatcherSettings.from_env({}).db == Path(".volt/dispatcher.db").resolve()
    assert RunnerSettings.from_env({}).runner_id == socket.gethostname().split(".")[0]


@pytest.mark.parametrize(
    ("pattern", "repo"),
    [
        ("file:///srv/*", "/srv/x"),
        ("file:///srv/x/", "/srv/x"),
        ("/srv/x/../y", "/srv/y"),
        ("https://ci:token@Git.Example.com/team/*", "https://git.example.com/team/app.git"),
        ("https://git.example.com:443/app.git/", "https://git.example.com/app.git"),
        ("*", "https://anywhere.example/x"),
        ("*example.com/*", "https://git.example.com/app"),
    ],
)
def test_allow_repo_patterns_match_every_spelling_of_a_repository(pattern: str, repo: str) -> None:
    (allowed,) = runner("--allow-repo", pattern, RUNNER_ID="r1").allow_repos
    assert fnmatch.fnmatchcase(normalize_repo(repo), allowed), (pattern, allowed)


def test_allow_repo_patterns_follow_links_as_identities_do(tmp_path: Path) -> None:
    (tmp_path / "real").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "real")
    (allowed,) = runner("--allow-repo", str(tmp_path / "link" / "*"), RUNNER_ID="r1").allow_repos
    assert fnmatch.fnmatchcase(normalize_repo(str(tmp_path / "link" / "app")), allowed)
    assert not fnmatch.fnmatchcase(normalize_repo(str(tmp_path / "other")), allowed)


OPTION_TABLES = [
    (RUNNER_OPTIONS, RunnerSettings),
    (DISPATCHER_OPTIONS, DispatcherSettings),
    (OBSERVER_OPTIONS, ObserverSettings),
    (options(), UpSettings),
]


@pytest.mark.parametrize(("options", "cls"), OPTION_TABLES)
def test_each_option_is_a_field_with_the_same_default(options, cls) -> None:
    fields = {f.name: f for f in dataclasses.fields(cls)}
    for o in options:
        field = fields[o.field]
        # A field without a default (the runner's id, the store) gets its default from from_args.
        if field.default is not dataclasses.MISSING:
            assert field.default == o.default, (cls.__name__, o.field)
    assert len({o.env for o in options}) == len(options)


def test_every_flag_says_its_default_and_every_setting_its_variable() -> None:
    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "command")
    for name, command in sub.choices.items():
        for action in command._actions:  # type: ignore[union-attr]
            if not action.option_strings or action.dest == "help":
                continue
            text = action.help or ""
            assert "default" in text or "required" in text, (name, action.option_strings)
            if name not in ("notify", "demo", *ONE_SHOT) or action.dest in ("amqp_url", "namespace"):
                assert "env VOLT_" in text, (name, action.option_strings)


def test_volt_up_gives_secrets_to_its_children_through_their_environment_only(tmp_path: Path) -> None:
    odd = tmp_path / "a [b] *c"
    repos = (str(odd), "https://ci:s3cret@Git.Example.com/app.git/")
    settings = UpSettings(
        broker=BrokerSettings(amqp_url="amqp://volt:hunter2@mq/%2F", namespace="ci"), repos=repos, runners=2
    )
    procs = commands(settings)
    assert [name for name, _, _ in procs] == ["dispatcher", "runner-1", "runner-2", "observer"]
    for name, argv, env in procs:
        assert not any("hunter2" in a or "s3cret" in a for a in argv), (name, argv)
        assert env["VOLT_AMQP_URL"] == "amqp://volt:hunter2@mq/%2F"
        assert ("VOLT_REPOS" in env) == (name == "observer")
    _, observer_argv, observer_env = procs[-1]
    assert observer_env["VOLT_REPOS"].splitlines() == list(repos)  # as given: the observer needs the password
    assert "--repo" not in observer_argv
    _, argv, _ = procs[1]
    patterns = [argv[i + 1] for i, a in enumerate(argv) if a == "--allow-repo"]
    assert len(patterns) == 2
    # What the runner makes of them matches the identities the jobs carry, and nothing else.
    allowed = runner(*(f for p in patterns for f in ("--allow-repo", p)), RUNNER_ID="r1").allow_repos
    for repo in repos:
        assert any(fnmatch.fnmatchcase(normalize_repo(repo), p) for p in allowed), repo
    assert not any(fnmatch.fnmatchcase(str(tmp_path / "a b c"), p) for p in allowed)


def test_a_folder_that_cannot_be_made_or_written_is_one_line(tmp_path: Path) -> None:
    assert writable_dir(tmp_path / "new" / "deeper", "--workdir").is_dir()
    (tmp_path / "file").write_text("")
    with pytest.raises(SettingsError, match=r"^--workdir .*/file/x: cannot create it: Not a directory$"):
        writable_dir(tmp_path / "file" / "x", "--workdir")


def test_amqp_url_takes_a_comma_separated_list_of_nodes() -> None:
    from common.settings import BrokerSettings

    env = {"VOLT_AMQP_URL": "amqp://ci:s3cret@mq-1:5672/%2F, amqp://mq-2:5672/%2F,amqp://other:pw@mq-3/%2F"}
    s = BrokerSettings.from_env(env)
    # Later nodes without a login take the first one's.
    assert s.amqp_urls == [
        "amqp://ci:s3cret@mq-1:5672/%2F",
        "amqp://ci:s3cret@mq-2:5672/%2F",
        "amqp://other:pw@mq-3/%2F",
    ]
    assert redact_url(s.amqp_url) == "amqp://ci:***@mq-1:5672/%2F,amqp://mq-2:5672/%2F,amqp://other:***@mq-3/%2F"
    assert BrokerSettings.from_env({}).amqp_urls == ["amqp://guest:guest@localhost:5672/%2F"]


def test_a_bad_url_in_a_list_is_named_by_its_place_and_not_echoed() -> None:
    from common.settings import BrokerSettings

    with pytest.raises(SettingsError, match=r"^VOLT_AMQP_URL: URL 2 of 3 is not an AMQP URL") as caught:
        BrokerSettings.from_env({"VOLT_AMQP_URL": "amqp://u:pw@mq-1/%2F,amqp://u:half,pass@mq-2/"})
    assert "half" not in str(caught.value)


def test_queue_type_is_quorum_unless_told_otherwise() -> None:
    from common.settings import BrokerSettings

    assert BrokerSettings.from_env({}).queue_type == "quorum"
    assert BrokerSettings.from_env({"VOLT_QUEUE_TYPE": "classic"}).queue_type == "classic"
    with pytest.raises(SettingsError, match="VOLT_QUEUE_TYPE: must be one of quorum, classic"):
        BrokerSettings.from_env({"VOLT_QUEUE_TYPE": "stream"})
