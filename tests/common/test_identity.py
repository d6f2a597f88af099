"""One repository, one identity; credentials go to git and nowhere else."""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from support import GitHttpServer, GitRepo

from common.gitauth import Credentials, git_env, scrub, split_url
from common.naming import is_local, normalize_repo

PASSWORD = "t0k3n/with:odd@chars"
QUOTED = "t0k3n%2Fwith%3Aodd%40chars"


# -- identity ------------------------------------------------------------------


def test_local_spellings_are_one_repository(tmp_path: Path) -> None:
    repo = tmp_path / "p" / "repo"
    repo.mkdir(parents=True)
    same = [
        str(repo),
        f"{repo}/",
        f"{repo}//",
        f"file://{repo}",
        f"file://{repo}/",
        f"file://localhost{repo}",
        f"{tmp_path}/p/x/../repo",
        f"file://{tmp_path}/p/x/../repo",
    ]
    assert {normalize_repo(s) for s in same} == {str(repo)}
    assert is_local(normalize_repo(f"file://{repo}"))
    (tmp_path / "link").symlink_to(repo)
    assert normalize_repo(str(tmp_path / "link")) == str(repo)
    assert normalize_repo(f"file://{tmp_path}/my%20repo") == str(tmp_path / "my repo")


@pytest.mark.parametrize(
    "spelling",
    [
        "https://git.example.com/team/app.git",
        "https://git.example.com/team/app.git/",
        "HTTPS://Git.Example.COM/team/app.git",
        "https://ci:tok@git.example.com/team/app.git",
        "https://other:another-token@git.example.com/team/app.git",
        "https://ci@git.example.com/team/app.git",
        "https://git.example.com:443/team/app.git",
    ],
)
def test_urls_that_differ_in_credentials_case_port_or_slash_are_one_repository(spelling: str) -> None:
    assert normalize_repo(spelling) == "https://git.example.com/team/app.git"


def test_what_still_tells_repositories_apart() -> None:
    assert normalize_repo("https://host/Team/App.git") != normalize_repo("https://host/team/app.git")
    assert normalize_repo("https://host:8443/a.git") == "https://host:8443/a.git"
    assert normalize_repo("http://host/a.git") != normalize_repo("https://host/a.git")
    # Over ssh the user is the account, not a secret; a password is dropped.
    assert normalize_repo("ssh://git:pw@Host:22/a.git") == "ssh://git@host/a.git"
    assert normalize_repo("git@GitHub.com:team/app.git/") == "git@github.com:team/app.git"
    assert normalize_repo("https://[::1]:8080/a.git/") == "https://[::1]:8080/a.git"


@pytest.mark.parametrize("bad", ["", "https://host:port/a.git", "https://u:secret@:443/a", "a\nb"])
def test_unusable_repositories_are_a_value_error_without_secrets(bad: str) -> None:
    with pytest.raises(ValueError) as info:
        normalize_repo(bad)
    assert "secret" not in str(info.value) and "\n" not in str(info.value)


# -- credentials ------------------------------------------------------------------


def test_split_url_keeps_the_credentials_apart() -> None:
    identity, creds = split_url(f"https://ci:{QUOTED}@Git.Example.com:8443/app.git/")
    assert identity == "https://git.example.com:8443/app.git"
    assert creds == Credentials(username="ci", password=PASSWORD, protocol="https", host="git.example.com:8443")
    assert PASSWORD not in repr(creds) and QUOTED not in repr(creds)
    assert split_url("https://git.example.com/app.git") == ("https://git.example.com/app.git", None)
    assert split_url("ssh://git@host/app.git") == ("ssh://git@host/app.git", None)
    assert split_url("/srv/app")[1] is None
    with pytest.raises(ValueError, match="line breaks"):
        split_url("https://ci:a%0Ab@host/app.git")


def test_git_env_holds_no_secret_in_its_config_and_turns_prompts_off() -> None:
    _, creds = split_url(f"https://ci:{QUOTED}@host/app.git")
    env = git_env(creds, base={"PATH": "/usr/bin", "GIT_CONFIG_COUNT": "1", "GIT_CONFIG_KEY_0": "a.b",
                               "GIT_CONFIG_VALUE_0": "c"})  # fmt: skip
    assert env["GIT_TERMINAL_PROMPT"] == "0"
    assert env["GIT_CONFIG_COUNT"] == "3" and env["GIT_CONFIG_KEY_0"] == "a.b"  # an operator's own entries stay
    assert (env["GIT_CONFIG_KEY_1"], env["GIT_CONFIG_VALUE_1"]) == ("credential.helper", "")
    assert PASSWORD not in env["GIT_CONFIG_VALUE_2"]
    assert git_env(None, base={})["GIT_TERMINAL_PROMPT"] == "0"
    assert "GIT_CONFIG_COUNT" not in git_env(None, base={})


def test_scrub() -> None:
    _, creds = split_url(f"https://ci:{QUOTED}@host/app.git")
    assert scrub(f"fatal: {PASSWORD} and {QUOTED}", creds) == "fatal: *** and ***"
    assert scrub("nothing", None) == "nothing"


def _fill(env: dict[str, str], host: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["git", "credential", "fill"], input=f"protocol=https\nhost={host}\n\n", env=env, capture_output=True, text=True
    )


def test_the_helper_answers_only_for_its_own_host(tmp_path: Path) -> None:
    _, creds = split_url(f"https://ci:{QUOTED}@git.example.com/app.git")
    env = git_env(creds, base={"PATH": "/usr/bin:/bin", "HOME": str(tmp_path)})
    mine = _fill(env, "git.example.com")
    assert mine.returncode == 0 and f"username=ci\npassword={PASSWORD}\n" in mine.stdout
    other = _fill(env, "attacker.example.com")  # say, where a redirect points
    assert other.returncode != 0 and PASSWORD not in other.stdout + other.stderr
    assert "terminal prompts disabled" in other.stderr


@pytest.fixture
def server(tmp_path: Path) -> Iterator[tuple[GitHttpServer, str]]:
    source = GitRepo(tmp_path / "source")
    head = source.commit({"f.txt": "1"})
    subprocess.run(["git", "clone", "-q", "--bare", str(source.path), str(tmp_path / "srv" / "app.git")], check=True)
    served = GitHttpServer(tmp_path / "srv", "ci", PASSWORD)
    yield served, head
    served.close()


def test_a_clone_with_credentials_writes_them_nowhere(server: tuple[GitHttpServer, str], tmp_path: Path) -> None:
    served, head = server
    home = tmp_path / "home"
    home.mkdir()
    store = tmp_path / "store"
    # The user's own helper would keep any password git tells it worked.
    (home / ".gitconfig").write_text(f"[credential]\n\thelper = store --file {store}\n")
    base = {"PATH": "/usr/bin:/bin", "HOME": str(home)}
    identity, creds = split_url(served.url("app.git", "ci", QUOTED))
    mirror = tmp_path / "mirror"
    done = subprocess.run(
        ["git", "clone", "-q", "--mirror", identity, str(mirror)], env=git_env(creds, base), capture_output=True
    )
    assert done.returncode == 0, done.stderr
    assert subprocess.run(["git", "--git-dir", str(mirror), "rev-parse", "main"], capture_output=True,
                          text=True).stdout.strip() == head  # fmt: skip
    for path in mirror.rglob("*"):
        if path.is_file():
            data = path.read_bytes().lower()
            assert PASSWORD.lower().encode() not in data and QUOTED.lower().encode() not in data, path
    assert not store.exists()
    # The control: told the password in the URL, git does hand it to that helper.
    subprocess.run(
        ["git", "clone", "-q", "--mirror", served.url("app.git", "ci", QUOTED), str(tmp_path / "control")],
        env=git_env(None, base),
        check=True,
        capture_output=True,
    )
    assert QUOTED.lower() in store.read_text().lower()


def test_a_wrong_password_fails_without_a_prompt(server: tuple[GitHttpServer, str], tmp_path: Path) -> None:
    served, _ = server
    identity, creds = split_url(served.url("app.git", "ci", "wrong"))
    done = subprocess.run(
        ["git", "ls-remote", identity],
        env=git_env(creds, {"PATH": "/usr/bin:/bin", "HOME": str(tmp_path)}),
        capture_output=True,
        text=True,
        stdin=subprocess.DEVNULL,
        timeout=30,
    )
    assert done.returncode != 0
    assert "Authentication failed" in done.stderr or "401" in done.stderr
