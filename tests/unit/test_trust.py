"""Project files are untrusted: what weakens the sandbox needs `stockade trust` (issue 10)."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path
from typing import Any

import pytest

from config_helpers import World as ConfigWorld
from stockade._errors import ConfigError, PolicyError
from stockade.config import load_config
from stockade.config.load import project_file_weakenings, trust_store
from stockade.config.trust import TrustStore, UntrustedConfigError, trust_key

ISSUE_FILE = 'backend = "host"\nunsafe_host = true\n[workspace]\nmode = "rw"\n'


class World(ConfigWorld):
    """``ConfigWorld`` with the trust records (in its XDG config dir) at hand."""

    def untrusted(self, **kwargs: Any) -> UntrustedConfigError:
        with pytest.raises(UntrustedConfigError) as info:
            self.load(**kwargs)
        return info.value

    def trust(self, file: Path) -> None:
        digest, _ = project_file_weakenings(file, self.environ)
        trust_store(self.environ).trust(file, digest)


@pytest.fixture
def world(tmp_path: Path) -> World:
    return World(tmp_path)


# ---------------------------------------------------------------------------------------------
# The issue's file


def test_issue_file_is_refused_until_trusted_and_again_after_a_change(world: World) -> None:
    file = world.write_project(ISSUE_FILE)
    error = world.untrusted()
    assert isinstance(error, ConfigError) and not isinstance(error, PolicyError)
    assert error.file == file
    assert [w.key for w in error.weakenings] == ["backend", "unsafe_host", "workspace.mode"]
    message = str(error)
    assert f"{file} is not trusted" in message
    assert "backend = 'host' (in [top level]): the host backend runs commands without" in message
    assert "workspace.mode = 'rw' (in [workspace])" in message
    assert f"run `stockade trust {file}`" in message
    # SDK wording in str(), CLI wording for the CLI.
    assert "pass backend='auto', workspace_mode='cow' to Sandbox.create" in message
    assert "pass --backend auto --workspace-mode cow on the command line" in error.cli_message()
    assert "--backend" not in message

    world.trust(file)
    config = world.load().config
    assert (config.backend, config.unsafe_host, config.workspace.mode) == ("host", True, "rw")

    file.write_text(ISSUE_FILE + "# an innocent comment\n")
    error = world.untrusted()
    assert "was trusted on" in str(error) and "has changed since" in str(error)
    assert error.previous is not None


def test_overriding_the_weakening_keys_needs_no_trust(world: World) -> None:
    world.write_project(ISSUE_FILE)
    config = world.load(flags={"backend": "namespace", "workspace.mode": "cow"}).config
    assert config.backend == "namespace"  # unsafe_host from the file is inert without 'host'
    config = world.load(overrides={"backend": "auto", "workspace.mode": "ro"}).config
    assert config.workspace.mode == "ro"
    environ = {**world.environ, "STOCKADE_BACKEND": "gvisor", "STOCKADE_WORKSPACE_MODE": "cow"}
    assert world.load(environ=environ).config.backend == "gvisor"


def test_the_user_asking_for_host_still_needs_to_consent_himself(world: World) -> None:
    world.write_project("unsafe_host = true\n")
    assert world.load().config.unsafe_host is True  # inert: the backend is not 'host'
    error = world.untrusted(flags={"backend": "host"})
    assert [w.key for w in error.weakenings] == ["unsafe_host"]
    assert "--unsafe-host" in error.cli_message()
    assert world.load(flags={"backend": "host", "unsafe_host": True}).config.backend == "host"


# ---------------------------------------------------------------------------------------------
# What weakens, what does not

WEAKENING = [
    ("backend", 'backend = "host"\nunsafe_host = true\n'),
    ("workspace.mode", '[workspace]\nmode = "rw"\n'),
    ("workspace.path", "[workspace]\npath = '{outside}'\n"),
    ("env.pass", '[env]\npass = ["TERM", "DATABASE_URL"]\n'),
    ("network.allow", '[network]\nallow = ["pypi.org", "127.0.0.1:2375"]\n'),
    ("network.allow", '[network]\nallow = ["169.254.169.254"]\n'),
    ("network.allow", '[network]\nallow = ["192.168.0.0/16"]\n'),
    ("network.tcp", '[network]\ntcp = ["[::1]:5432"]\n'),
    ("container.image", "[container]\nimage = '{outside}'\n"),
    ("gvisor.image", "[gvisor]\nimage = '{outside}'\n"),
    ("container.runtime", '[container]\nruntime = "nvidia"\n'),
    ("allow_dangerous_mounts", 'allow_dangerous_mounts = ["sockets"]\n'),
    ("secrets.TOKEN.hosts", '[secrets.TOKEN]\nenv = "GITHUB_TOKEN"\nhosts = ["evil.example"]\n'),
]


@pytest.mark.parametrize(
    ("key", "text"), WEAKENING, ids=[f"{k}-{i}" for i, (k, _) in enumerate(WEAKENING)]
)
def test_weakening_settings_need_trust(world: World, key: str, text: str) -> None:
    outside = world.tmp / "elsewhere"
    outside.mkdir()
    file = world.write_project(text.format(outside=outside))
    error = world.untrusted()
    assert [w.key for w in error.weakenings] == [key] + (
        ["unsafe_host"] if key == "backend" else []
    )
    assert key in str(error) and f"stockade trust {file}" in str(error)
    world.trust(file)
    world.load()


@pytest.mark.parametrize(
    "text",
    [
        'backend = "namespace"\n',
        'backend = "container"\n[container]\nengine = "docker"\nruntime = "runsc"\n',
        '[workspace]\nmode = "ro"\npath = "sub"\nmount = "/src"\n',
        '[workspace]\nmode = "none"\npath = "/srv"\n',
        '[env]\npass = ["TERM", "LANG"]\n[env.set]\nCI = "1"\n',
        '[network]\nallow = ["pypi.org", "*.github.com", "8.8.8.8", "2001:db8::/32"]\n'
        'deny = ["10.0.0.0/8"]\ntcp = ["github.com:22"]\npresets = ["github"]\n',
        '[container]\nimage = "debian:bookworm"\n[gvisor]\nimage = "base"\n',
        '[limits]\nmemory = "8GiB"\ntimeout = "none"\n[microvm]\nuser = "root"\n',
        "docker = true\nhostname = 'box'\n",
        '[profiles.unsafe]\nbackend = "host"\nunsafe_host = true\n',  # defined, not chosen
    ],
)
def test_ordinary_project_settings_need_no_trust(world: World, text: str) -> None:
    (world.project / "sub").mkdir()
    world.write_project(text)
    world.load()


def test_the_same_values_from_the_users_side_need_no_trust(world: World) -> None:
    outside = world.tmp / "elsewhere"
    outside.mkdir()
    world.write_user(
        f'backend = "host"\nunsafe_host = true\n[workspace]\nmode = "rw"\npath = "{outside}"\n'
        '[env]\npass = ["DATABASE_URL"]\n[secrets.TOKEN]\nenv = "T"\nhosts = ["api.example"]\n'
    )
    world.write_project("hostname = 'p'\n")
    config = world.load().config
    assert (config.backend, config.workspace.mode, config.workspace.path) == ("host", "rw", outside)
    world.load(
        flags={"backend": "host", "unsafe_host": True, "workspace.mode": "rw"},
        overrides={"network.allow": ["127.0.0.1:8080"], "allow_dangerous_mounts": ["sockets"]},
        environ={**world.environ, "STOCKADE_ENV_PASS": "DATABASE_URL"},
    )


def test_names_the_users_own_file_passes_may_be_repeated(world: World) -> None:
    world.write_user('[env]\npass = ["DATABASE_URL"]\n')
    world.write_project('[env]\npass = ["TERM", "DATABASE_URL"]\n')
    assert world.load().config.env.pass_ == ("TERM", "DATABASE_URL")
    world.write_project('[env]\npass = ["DATABASE_URL", "EDITOR"]\n')
    assert "EDITOR" in str(world.untrusted())


def test_a_project_choosing_a_users_unsafe_profile_needs_trust(world: World) -> None:
    world.write_user('[profiles.yolo]\nbackend = "host"\nunsafe_host = true\n')
    file = world.write_project('profile = "yolo"\n')
    error = world.untrusted()
    assert [w.key for w in error.weakenings] == ["backend", "unsafe_host"]
    assert f"the profile chosen by {file} [top level]" in str(error)
    # The user choosing his own profile is his word.
    file.write_text("hostname = 'p'\n")
    assert world.load(profile="yolo").config.backend == "host"


def test_the_user_choosing_a_projects_unsafe_profile_still_needs_trust(world: World) -> None:
    world.write_project('[profiles.fast]\nbackend = "host"\nunsafe_host = true\n')
    assert [w.key for w in world.untrusted(profile="fast").weakenings] == [
        "backend",
        "unsafe_host",
    ]


def test_project_secret_overriding_the_users_needs_trust(world: World) -> None:
    world.write_user('[secrets.TOKEN]\nenv = "GITHUB_TOKEN"\nhosts = ["api.github.com"]\n')
    world.write_project('[secrets.TOKEN]\nenv = "GITHUB_TOKEN"\nhosts = ["evil.example"]\n')
    error = world.untrusted()
    assert "environment variable GITHUB_TOKEN to these hosts" in str(error)
    assert "['evil.example']" in str(error)


def test_pyproject_section_needs_trust_the_same_way(world: World) -> None:
    file = world.write_project(
        '[project]\nname = "x"\n[tool.stockade]\nbackend = "host"\nunsafe_host = true\n',
        name="pyproject.toml",
    )
    error = world.untrusted()
    assert f"{file} [tool.stockade]" in error.weakenings[0].where
    world.trust(file)
    assert world.load().config.backend == "host"
    file.write_text(file.read_text().replace('"x"', '"y"'))  # any change: trusted no more
    world.untrusted()


def test_trust_is_per_path_not_per_content(world: World) -> None:
    file = world.write_project(ISSUE_FILE)
    world.trust(file)
    other = world.home / "other"
    other.mkdir()
    (other / "stockade.toml").write_text(ISSUE_FILE)
    with pytest.raises(UntrustedConfigError):
        load_config(other, environ=world.environ)


def test_project_file_weakenings_lists_profiles_and_secrets(world: World) -> None:
    file = world.write_project(
        'hostname = "p"\n[profiles.a]\nbackend = "host"\nunsafe_host = true\n'
        '[secrets.T]\nfile = "~/.token"\nhosts = ["x.example"]\n'
    )
    digest, weakenings = project_file_weakenings(file, world.environ)
    assert len(digest) == 64
    assert [w.key for w in weakenings] == ["backend", "unsafe_host", "secrets.T.hosts"]
    assert "[profiles.a]" in weakenings[0].where


# ---------------------------------------------------------------------------------------------
# The trust records


def test_trust_records_are_private_and_keyed_by_absolute_path(world: World) -> None:
    file = world.write_project(ISSUE_FILE)
    world.trust(file)
    store = trust_store(world.environ)
    assert store.path == world.xdg / "stockade" / "trusted.json"
    assert stat.S_IMODE(store.path.stat().st_mode) == 0o600
    assert stat.S_IMODE(store.path.parent.stat().st_mode) == 0o700
    data = json.loads(store.path.read_text())
    assert list(data["files"]) == [str(file.resolve())]
    assert data["files"][str(file.resolve())]["sha256"] == project_file_weakenings(file)[0]

    link = world.tmp / "link"
    link.symlink_to(world.project)
    assert trust_key(link / "stockade.toml") == str(file.resolve())
    assert load_config(link, environ=world.environ).config.backend == "host"

    assert store.revoke(file) is not None
    assert store.revoke(file) is None
    world.untrusted()


def test_trust_records_writable_by_others_are_not_honoured(world: World) -> None:
    file = world.write_project(ISSUE_FILE)
    world.trust(file)
    store = trust_store(world.environ)
    os.chmod(store.path, 0o666)
    with pytest.raises(ConfigError, match="may be written by others") as info:
        world.load()
    assert not isinstance(info.value, UntrustedConfigError)
    os.chmod(store.path, 0o600)
    world.load()


def test_damaged_trust_records_say_how_to_recover(world: World, tmp_path: Path) -> None:
    store = TrustStore(tmp_path / "t" / "trusted.json")
    store.path.parent.mkdir()
    store.path.write_text("{not json")
    store.path.chmod(0o600)
    with pytest.raises(ConfigError, match=r"damaged.*delete the file"):
        store.records()


def test_untrusted_file_without_weakening_values_never_reads_the_records(world: World) -> None:
    world.write_project("hostname = 'p'\n")
    store = trust_store(world.environ)
    store.path.parent.mkdir(parents=True)
    store.path.write_text("{not json")
    assert world.load().config.hostname == "p"
