"""Policy: compiling a loaded config, the protected paths, hashing and JSON round trips."""

from __future__ import annotations

import json
import os
import typing
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st
from pydantic import BaseModel

from stockade._errors import ConfigError, PolicyError
from stockade.config import LoadedConfig, StockadeConfig, load_config
from stockade.policy import (
    BASE_ENV,
    PROTECTED_PATHS,
    EffectivePolicy,
    compile_policy,
    is_protected,
)


@pytest.fixture
def home(tmp_path: Path) -> Path:
    path = tmp_path / "home"
    path.mkdir()
    return path


@pytest.fixture
def project(home: Path) -> Path:
    path = home / "proj"
    path.mkdir()
    return path


@pytest.fixture
def environ(home: Path, tmp_path: Path) -> dict[str, str]:
    return {"HOME": str(home), "XDG_CONFIG_HOME": str(tmp_path / "xdg")}


def compile_with(project: Path, environ: dict[str, str], **overrides: Any) -> EffectivePolicy:
    loaded = load_config(project, environ=environ, overrides=overrides)
    return compile_policy(loaded, environ=environ)


def test_compile_defaults(project: Path, environ: dict[str, str]) -> None:
    policy = compile_with(project, environ)
    assert policy.backend == "auto"
    assert policy.unsafe_host is False
    assert policy.hostname == "sandbox"
    assert policy.workspace.mode == "cow"
    assert policy.workspace.host_path == project.resolve()
    assert policy.workspace.guest_path == "/workspace"
    assert policy.workspace.protected == PROTECTED_PATHS
    assert policy.limits.memory_bytes == 2 * 2**30
    assert policy.limits.pids == 1024
    assert policy.limits.cpus is None
    assert policy.limits.disk_bytes is None
    assert policy.limits.command_timeout is None
    assert policy.limits.timeout is None
    assert policy.env == dict(BASE_ENV)
    assert policy.network.allow == ()
    assert policy.network.deny == ()


def test_compile_resolves_limits(project: Path, environ: dict[str, str]) -> None:
    policy = compile_with(
        project,
        environ,
        limits={
            "memory": "512M",
            "pids": 64,
            "disk": "1G",
            "command_timeout": "1m",
            "timeout": "2h",
        },
    )
    assert policy.limits.memory_bytes == 512 * 2**20
    assert policy.limits.pids == 64
    assert policy.limits.disk_bytes == 2**30
    assert policy.limits.command_timeout == 60.0
    assert policy.limits.timeout == 7200.0


def test_cpus_are_capped_at_the_host_cores(project: Path, environ: dict[str, str]) -> None:
    cores = os.cpu_count() or 1
    assert compile_with(project, environ, **{"limits.cpus": 0.5}).limits.cpus == min(0.5, cores)
    assert compile_with(project, environ, **{"limits.cpus": cores * 2}).limits.cpus == cores


def test_environment_composition(project: Path, environ: dict[str, str]) -> None:
    host = {
        **environ,
        "TERM": "xterm-256color",
        "TZ": "UTC",
        "EDITOR": "vi",
        "SECRET_STUFF": "nope",
        "PATH": "/host/bin",
    }
    loaded = load_config(
        project,
        environ=environ,
        overrides={"env.pass": ["TERM", "TZ", "LANG", "EDITOR"], "env.set": {"FOO": "bar"}},
    )
    env = compile_policy(loaded, environ=host).env
    assert env == {
        "PATH": "/usr/local/bin:/usr/bin:/bin",
        "HOME": "/tmp/home",
        "USER": "user",
        "LANG": "C.UTF-8",  # not set on the host: the default stays
        "TERM": "xterm-256color",
        "TZ": "UTC",
        "EDITOR": "vi",
        "FOO": "bar",
    }


def test_passed_lang_and_set_override(project: Path, environ: dict[str, str]) -> None:
    host = {**environ, "LANG": "de_DE.UTF-8", "TERM": "dumb"}
    loaded = load_config(
        project, environ=environ, overrides={"env.set": {"TERM": "xterm", "PATH": "/opt/bin"}}
    )
    env = compile_policy(loaded, environ=host).env
    assert env["LANG"] == "de_DE.UTF-8"
    assert env["TERM"] == "xterm"  # env.set wins over pass-through
    assert env["PATH"] == "/opt/bin"


def test_pass_values_are_read_at_compile_time(project: Path, environ: dict[str, str]) -> None:
    loaded = load_config(project, environ=environ)
    first = compile_policy(loaded, environ={**environ, "TERM": "a"})
    second = compile_policy(loaded, environ={**environ, "TERM": "b"})
    assert (first.env["TERM"], second.env["TERM"]) == ("a", "b")


def test_no_workspace(project: Path, environ: dict[str, str]) -> None:
    policy = compile_with(project, environ, **{"workspace.mode": "none"})
    assert policy.workspace.host_path is None
    assert policy.workspace.mode == "none"


def test_missing_workspace_is_a_config_error(project: Path, environ: dict[str, str]) -> None:
    (project / "stockade.toml").write_text("[workspace]\npath = 'gone'\n")
    loaded = load_config(project, environ=environ)
    with pytest.raises(ConfigError) as info:
        compile_policy(loaded, environ=environ)
    message = str(info.value)
    assert not isinstance(info.value, PolicyError)
    assert str(project / "gone") in message
    assert "workspace.path" in message
    assert "stockade.toml [workspace]" in message


def test_workspace_that_is_a_file_is_refused(project: Path, environ: dict[str, str]) -> None:
    (project / "file").write_text("x")
    loaded = load_config(project, environ=environ, flags={"workspace.path": "file"})
    with pytest.raises(ConfigError, match="is not a directory"):
        compile_policy(loaded, environ=environ)


def test_workspace_symlink_is_resolved(project: Path, environ: dict[str, str]) -> None:
    (project / "real").mkdir()
    (project / "link").symlink_to(project / "real")
    policy = compile_with(project, environ, **{"workspace.path": project / "link"})
    assert policy.workspace.host_path == (project / "real").resolve()


def test_symlink_to_home_is_refused(project: Path, home: Path, environ: dict[str, str]) -> None:
    (project / "sneaky").symlink_to(home)
    with pytest.raises(PolicyError, match=r"workspace\.path"):
        load_config(project, environ=environ, flags={"workspace.path": "sneaky"})


def test_hand_built_dangerous_config_is_refused_at_compile(
    project: Path, environ: dict[str, str]
) -> None:
    for config in (
        StockadeConfig(backend="host"),
        StockadeConfig.model_validate({"workspace": {"path": "/"}}),
        StockadeConfig.model_validate({"env": {"pass": ["AWS_SECRET_ACCESS_KEY"]}}),
        StockadeConfig.model_validate({"limits": {"memory": "1M"}}),
        StockadeConfig.model_validate({"network": {"allow": ["*"]}}),
    ):
        loaded = LoadedConfig(config=config, project_root=project, sources=())
        with pytest.raises(PolicyError):
            compile_policy(loaded, environ=environ)


def test_hand_built_relative_workspace_resolves_against_project_root(
    project: Path, environ: dict[str, str]
) -> None:
    (project / "sub").mkdir()
    config = StockadeConfig.model_validate({"workspace": {"path": "sub"}})
    loaded = LoadedConfig(config=config, project_root=project, sources=())
    assert compile_policy(loaded, environ=environ).workspace.host_path == project / "sub"


# ---------------------------------------------------------------------------------------------
# Protected paths


@pytest.mark.parametrize(
    "path",
    [
        ".git/hooks",
        ".git/hooks/pre-commit",
        ".git/config",
        "./.git/config",
        "src/../.git/hooks/post-checkout",
        ".git//hooks/x",
        "/.git/config",
        ".bashrc",
        ".zshrc",
        ".profile",
        ".envrc",
        ".git/modules/sub/hooks/pre-commit",
    ],
)
def test_protected(path: str) -> None:
    assert is_protected(path)


@pytest.mark.parametrize(
    "path",
    [
        ".git",
        ".git/objects/ab/cdef",
        ".git/hooksy",
        ".git/configs",
        "src/.bashrc",
        "bashrc",
        "README.md",
        ".GIT/hooks",
        ".Bashrc",
        "",
        ".",
    ],
)
def test_not_protected(path: str) -> None:
    assert not is_protected(path)


def test_protected_case_insensitive_on_request() -> None:
    assert is_protected(".GIT/Hooks/pre-commit", case_sensitive=False)
    assert is_protected(".Bashrc", case_sensitive=False)
    assert not is_protected("README", case_sensitive=False)


@given(
    st.sampled_from(PROTECTED_PATHS),
    st.text(alphabet="abc-_.", min_size=1, max_size=10).filter(lambda s: s not in (".", "..")),
)
def test_anything_under_a_protected_path_is_protected(base: str, leaf: str) -> None:
    assert is_protected(f"{base}/{leaf}")


# ---------------------------------------------------------------------------------------------
# Hash and JSON


def test_hash_is_stable(project: Path, environ: dict[str, str]) -> None:
    first = compile_with(project, environ, **{"limits.memory": "1G"})
    second = compile_with(project, environ, **{"limits.memory": "1024MiB"})
    assert first == second
    assert first.policy_hash == second.policy_hash
    assert len(first.policy_hash) == 64
    int(first.policy_hash, 16)


def test_hash_ignores_env_insertion_order(project: Path, environ: dict[str, str]) -> None:
    a = compile_with(project, environ, **{"env.set": {"A": "1", "B": "2"}})
    b = compile_with(project, environ, **{"env.set": {"B": "2", "A": "1"}})
    assert a.policy_hash == b.policy_hash


CHANGES: list[dict[str, Any]] = [
    {"backend": "namespace"},
    {"backend": "host", "unsafe_host": True},
    {"hostname": "other"},
    {"workspace.mode": "ro"},
    {"workspace.mode": "none"},
    {"workspace.mount": "/src"},
    {"workspace.path": "sub"},
    {"limits.memory": "1G"},
    {"limits.pids": 100},
    {"limits.cpus": 0.5},
    {"limits.disk": "1G"},
    {"limits.command_timeout": 10},
    {"limits.timeout": 10},
    {"env.pass": []},
    {"env.set": {"A": "1"}},
    {"network.deny": ["x.org"]},
]


def test_any_change_changes_the_hash(project: Path, environ: dict[str, str]) -> None:
    (project / "sub").mkdir()
    host = {**environ, "TERM": "xterm"}
    hashes = set()
    for change in [{}, *CHANGES]:
        loaded = load_config(project, environ=environ, overrides=change)
        hashes.add(compile_policy(loaded, environ=host).policy_hash)
    # And a passed value changing on the host changes it too.
    hashes.add(compile_with(project, {**environ, "TERM": "vt100"}).policy_hash)
    assert len(hashes) == len(CHANGES) + 2


def test_json_round_trip(project: Path, environ: dict[str, str]) -> None:
    (project / "sub").mkdir()
    for change in [{}, *CHANGES]:
        loaded = load_config(project, environ=environ, overrides=change)
        policy = compile_policy(loaded, environ={**environ, "TERM": "xterm"})
        again = EffectivePolicy.from_json(policy.to_json())
        assert again == policy
        assert again.policy_hash == policy.policy_hash
        assert EffectivePolicy.from_json(policy.to_json().encode()) == policy


def _tampered(policy: EffectivePolicy, path: str, value: Any) -> str:
    data = json.loads(policy.to_json())
    target = data
    *parents, leaf = path.split(".")
    for part in parents:
        target = target[part]
    target[leaf] = value
    return json.dumps(data)


@pytest.mark.parametrize(
    ("path", "value"),
    [
        ("backend", "host"),
        ("backend", "chroot"),
        ("hostname", "bad host"),
        ("workspace.protected", [".bashrc"]),
        ("workspace.host_path", "relative/dir"),
        ("workspace.host_path", None),
        ("workspace.guest_path", "/usr"),
        ("workspace.guest_path", "relative"),
        ("limits.memory_bytes", 1024),
        ("limits.pids", 1),
        ("limits.cpus", 0),
        ("limits.command_timeout", -1),
        ("env", {"GITHUB_TOKEN": "x"}),
        ("extra", 1),
    ],
)
def test_from_json_revalidates(
    project: Path, environ: dict[str, str], path: str, value: Any
) -> None:
    policy = compile_with(project, environ)
    with pytest.raises(PolicyError, match="invalid policy JSON"):
        EffectivePolicy.from_json(_tampered(policy, path, value))


def test_from_json_rejects_garbage() -> None:
    with pytest.raises(PolicyError):
        EffectivePolicy.from_json("{not json")


def test_policy_is_frozen(project: Path, environ: dict[str, str]) -> None:
    policy = compile_with(project, environ)
    with pytest.raises(ValueError, match="frozen"):
        policy.hostname = "x"


def _models(model: type[BaseModel], seen: set[type[BaseModel]]) -> None:
    if model in seen:
        return
    seen.add(model)
    for field in model.model_fields.values():
        stack = [field.annotation]
        while stack:
            tp = stack.pop()
            if isinstance(tp, type) and issubclass(tp, BaseModel):
                _models(tp, seen)
            stack.extend(typing.get_args(tp))


def test_every_field_of_every_policy_model_has_a_description() -> None:
    seen: set[type[BaseModel]] = set()
    _models(EffectivePolicy, seen)
    # EffectivePolicy, workspace, limits, network, secrets, container, gvisor, microvm
    assert len(seen) == 8
    for model in seen:
        for name, field in model.model_fields.items():
            assert field.description and field.description.strip(), f"{model.__name__}.{name}"


# ---------------------------------------------------------------------------------------------
# Network


def test_compile_merges_presets_after_the_users_rules(
    project: Path, environ: dict[str, str]
) -> None:
    policy = compile_with(
        project,
        environ,
        network={
            "allow": ["pypi.org", "github.com:443"],
            "deny": ["evil.org"],
            "tcp": ["db.internal:5432"],
            "presets": ["github", "anthropic"],
        },
    )
    network = policy.network
    assert network.allow[:2] == ("pypi.org", "github.com:443")
    assert network.allow.count("github.com:443") == 1
    assert "api.anthropic.com:443" in network.allow
    assert network.tcp == ("db.internal:5432", "github.com:22")
    assert network.presets == ("github", "anthropic")
    assert network.sources["api.github.com:443"] == "preset github"
    assert network.sources["github.com:22"] == "preset github"
    assert "github.com:443" not in network.sources  # the user's own rule
    assert "pypi.org" not in network.sources
    rules = network.rules()
    assert len(rules.allow) == len(network.allow)
    assert EffectivePolicy.from_json(policy.to_json()) == policy


def test_compile_reads_pip_configuration_of_the_host(
    project: Path, environ: dict[str, str]
) -> None:
    # /dev/null: pip's own switch to read no config file, so the test machine's cannot leak in.
    host = {
        **environ,
        "PIP_CONFIG_FILE": "/dev/null",
        "PIP_INDEX_URL": "https://mirror.corp.example/simple",
    }
    loaded = load_config(project, environ=host, overrides={"network.presets": ["python-packages"]})
    network = compile_policy(loaded, environ=host).network
    assert network.allow == ("mirror.corp.example:443",)
    assert network.sources == {"mirror.corp.example:443": "preset python-packages: PIP_INDEX_URL"}


def test_presets_change_the_hash(project: Path, environ: dict[str, str]) -> None:
    plain = compile_with(project, environ)
    with_github = compile_with(project, environ, network={"presets": ["github"]})
    assert plain.policy_hash != with_github.policy_hash


@pytest.mark.parametrize(
    "network",
    [
        {"allow": ["*"]},
        {"allow": ["pypi.org"], "deny": ["*.com"]},
        {"tcp": ["github.com"]},
        {"presets": ["nope"]},
        {"allow": ["pypi.org"], "sources": {"other.org": "preset x"}},
    ],
)
def test_network_policy_read_back_is_revalidated(
    project: Path, environ: dict[str, str], network: dict[str, Any]
) -> None:
    data = json.loads(compile_with(project, environ).to_json())
    data["network"] = network
    with pytest.raises(PolicyError):
        EffectivePolicy.from_json(json.dumps(data))
