"""Broker settings: URL checks, password redaction, namespace rules."""

from __future__ import annotations

import pytest

from common.settings import DEFAULT_AMQP_URL, BrokerSettings, SettingsError, check_amqp_url, env_float, redact_url


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


def test_env_float(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("VOLT_SOME_TIMEOUT", raising=False)
    assert env_float("SOME_TIMEOUT", 2.5) == 2.5
    monkeypatch.setenv("VOLT_SOME_TIMEOUT", "")
    assert env_float("SOME_TIMEOUT", 2.5) == 2.5
    monkeypatch.setenv("VOLT_SOME_TIMEOUT", "7")
    assert env_float("SOME_TIMEOUT", 2.5) == 7.0
    monkeypatch.setenv("VOLT_SOME_TIMEOUT", "soon")
    with pytest.raises(SettingsError, match="VOLT_SOME_TIMEOUT must be a number"):
        env_float("SOME_TIMEOUT", 2.5)
