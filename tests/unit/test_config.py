"""Configuration: schema, layered loading, precedence, profiles, refusals, units."""

from __future__ import annotations

import json
import re
import typing
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st
from pydantic import BaseModel

from config_helpers import World
from stockade._errors import ConfigError, PolicyError
from stockade.config import (
    CONFIG_KEYS,
    ENV_VAR_KEYS,
    StockadeConfig,
    format_duration,
    format_size,
    parse_duration,
    parse_size,
    user_config_path,
)
from stockade.config.units import MAX_SIZE

# ---------------------------------------------------------------------------------------------
# Fixtures and helpers


@pytest.fixture
def world(tmp_path: Path) -> World:
    return World(tmp_path)


def toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, list):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    return json.dumps(value)


def env_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, list):
        return ",".join(value)
    return str(value)


def dotted(config: StockadeConfig, key: str) -> Any:
    obj: Any = config
    for part in key.split("."):
        obj = getattr(obj, {"pass": "pass_", "set": "set_"}.get(part, part))
    return obj


# ---------------------------------------------------------------------------------------------
# Schema


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


def test_every_field_of_every_config_model_has_a_description() -> None:
    seen: set[type[BaseModel]] = set()
    _models(StockadeConfig, seen)
    assert len(seen) >= 6  # StockadeConfig, ProfileConfig and the four tables
    for model in seen:
        for name, field in model.model_fields.items():
            assert field.description and field.description.strip(), f"{model.__name__}.{name}"


def test_config_models_forbid_extra_keys() -> None:
    with pytest.raises(ValueError, match="limts"):
        StockadeConfig.model_validate({"limts": {}})


def test_env_var_table_is_derived_from_the_schema() -> None:
    assert ENV_VAR_KEYS["STOCKADE_BACKEND"] == "backend"
    assert ENV_VAR_KEYS["STOCKADE_PROFILE"] == "profile"
    assert ENV_VAR_KEYS["STOCKADE_WORKSPACE_MODE"] == "workspace.mode"
    assert ENV_VAR_KEYS["STOCKADE_LIMITS_MEMORY"] == "limits.memory"
    assert ENV_VAR_KEYS["STOCKADE_LIMITS_COMMAND_TIMEOUT"] == "limits.command_timeout"
    assert ENV_VAR_KEYS["STOCKADE_ENV_PASS"] == "env.pass"
    assert ENV_VAR_KEYS["STOCKADE_NETWORK_ALLOW"] == "network.allow"
    assert len(ENV_VAR_KEYS) == len(CONFIG_KEYS)
    assert "profiles" not in CONFIG_KEYS
    for key, spec in CONFIG_KEYS.items():
        assert spec.env_var == "STOCKADE_" + key.upper().replace(".", "_")
        assert spec.description


def test_defaults(world: World) -> None:
    loaded = world.load()
    config = loaded.config
    assert config.backend == "auto"
    assert config.unsafe_host is False
    assert config.profile is None
    assert config.hostname == "sandbox"
    assert config.workspace.mode == "cow"
    assert config.workspace.path == world.project.resolve()
    assert config.workspace.mount == "/workspace"
    assert config.limits.memory == 2 * 2**30
    assert config.limits.pids == 1024
    assert config.limits.cpus is None
    assert config.limits.disk is None
    assert config.limits.command_timeout is None
    assert config.limits.timeout is None
    assert config.env.pass_ == ("TERM", "LANG", "LC_ALL", "TZ", "COLORTERM")
    assert config.env.set_ == {}
    assert config.network.allow == ()
    assert config.network.deny == ()
    assert loaded.sources == ()
    assert loaded.project_root == world.project.resolve()
    assert loaded.origin("backend") == "default"


# ---------------------------------------------------------------------------------------------
# Precedence: call > flag > environment > project file > user file > defaults

LAYERS = ("default", "user", "project", "env", "flag", "call")

# key -> (values for user, project, env, flag, call; expected value for each of the 6 layers)
PRECEDENCE: dict[str, tuple[list[Any], list[Any]]] = {
    "backend": (
        ["microvm", "gvisor", "container", "namespace", "microvm"],
        ["auto", "microvm", "gvisor", "container", "namespace", "microvm"],
    ),
    "unsafe_host": ([True, False, True, False, True], [False, True, False, True, False, True]),
    "hostname": (["u", "p", "e", "f", "c"], ["sandbox", "u", "p", "e", "f", "c"]),
    # A project file may not choose 'rw' (nor pass new variables) unless trusted: test_trust.py.
    "workspace.mode": (["ro", "none", "rw", "ro", "rw"], ["cow", "ro", "none", "rw", "ro", "rw"]),
    "workspace.mount": (
        ["/w/u", "/w/p", "/w/e", "/w/f", "/w/c"],
        ["/workspace", "/w/u", "/w/p", "/w/e", "/w/f", "/w/c"],
    ),
    "limits.memory": (
        ["64MiB", "128M", "0.25GiB", "512MB", 2**30],
        [2 * 2**30, 64 * 2**20, 128 * 2**20, 256 * 2**20, 512 * 2**20, 2**30],
    ),
    "limits.pids": ([100, 200, 300, 400, 500], [1024, 100, 200, 300, 400, 500]),
    "limits.cpus": ([0.25, 0.5, 0.75, 1, 0.125], [None, 0.25, 0.5, 0.75, 1.0, 0.125]),
    "limits.disk": (
        ["1G", "2G", "3G", "4G", "5G"],
        [None, 2**30, 2 * 2**30, 3 * 2**30, 4 * 2**30, 5 * 2**30],
    ),
    "limits.command_timeout": (
        ["10s", "1m", "1h30m", 7200, "1.5s"],
        [None, 10.0, 60.0, 5400.0, 7200.0, 1.5],
    ),
    "limits.timeout": (["1d", "2h", "3m", "4s", "500ms"], [None, 86400.0, 7200.0, 180.0, 4.0, 0.5]),
    "env.pass": (
        [["A"], ["A", "TERM"], ["C", "D"], ["E"], ["F"]],
        [
            ("TERM", "LANG", "LC_ALL", "TZ", "COLORTERM"),
            ("A",),
            ("A", "TERM"),
            ("C", "D"),
            ("E",),
            ("F",),
        ],
    ),
    "network.deny": (
        [["u.org"], ["p.org"], ["e.org", "e2.org"], ["f.org"], ["c.org"]],
        [(), ("u.org",), ("p.org",), ("e.org", "e2.org"), ("f.org",), ("c.org",)],
    ),
}


@pytest.mark.parametrize("top", range(len(LAYERS)), ids=LAYERS)
@pytest.mark.parametrize("key", sorted(PRECEDENCE))
def test_precedence_of_each_key_from_each_layer(world: World, key: str, top: int) -> None:
    values, expected = PRECEDENCE[key]
    user, project, env, flag, call = values
    if top >= 1:
        world.write_user(f"{key} = {toml_value(user)}\n")
    if top >= 2:
        world.write_project(f"{key} = {toml_value(project)}\n")
    environ = dict(world.environ)
    if top >= 3:
        environ[CONFIG_KEYS[key].env_var] = env_value(env)
    loaded = world.load(
        environ=environ,
        flags={key: flag} if top >= 4 else None,
        overrides={key: call} if top >= 5 else None,
    )
    assert dotted(loaded.config, key) == expected[top]
    table = key.rpartition(".")[0] or "top level"
    assert (
        loaded.origin(key)
        == {
            0: "default",
            1: f"{world.user_file} [{table}]",
            2: f"{world.project / 'stockade.toml'} [{table}]",
            3: f"environment variable {CONFIG_KEYS[key].env_var}",
            4: f"command-line option '{key}'",
            5: f"argument overrides[{key!r}]",
        }[top]
    )


@pytest.mark.parametrize("top", range(len(LAYERS)), ids=LAYERS)
def test_precedence_of_workspace_path(world: World, top: int) -> None:
    for name in ("u", "p", "e", "f", "c"):
        (world.project / name).mkdir()
    if top >= 1:
        world.write_user('[workspace]\npath = "u"\n')
    if top >= 2:
        world.write_project('[workspace]\npath = "p"\n')
    environ = dict(world.environ)
    if top >= 3:
        environ["STOCKADE_WORKSPACE_PATH"] = "e"
    loaded = world.load(
        environ=environ,
        flags={"workspace.path": "f"} if top >= 4 else None,
        overrides={"workspace": {"path": world.project / "c"}} if top >= 5 else None,
    )
    expected = [".", "u", "p", "e", "f", "c"][top]
    assert loaded.config.workspace.path == (world.project / expected).resolve()


def test_env_set_merges_by_name_across_layers(world: World) -> None:
    world.write_user('[env.set]\nA = "user"\nB = "user"\n')
    world.write_project('[env.set]\nB = "project"\nC = "project"\n')
    loaded = world.load(
        environ={**world.environ, "STOCKADE_ENV_SET": "C=env,D=env"},
        flags={"env.set": {"D": "flag"}},
        overrides={"env.set.E": "call"},
    )
    assert loaded.config.env.set_ == {
        "A": "user",
        "B": "project",
        "C": "env",
        "D": "flag",
        "E": "call",
    }
    assert loaded.origin("env.set.D") == "command-line option 'env.set.D'"


def test_sources_lists_files_read_lowest_first(world: World) -> None:
    user = world.write_user("hostname = 'u'\n")
    project = world.write_project("hostname = 'p'\n")
    assert world.load().sources == (str(user), str(project))


def test_none_values_in_flags_mean_not_given(world: World) -> None:
    world.write_project("backend = 'namespace'\n")
    loaded = world.load(flags={"backend": None, "limits.memory": None})
    assert loaded.config.backend == "namespace"


def test_word_none_lifts_a_limit_set_lower(world: World) -> None:
    world.write_user("[limits]\ncpus = 1\ncommand_timeout = '10m'\ndisk = '1G'\n")
    loaded = world.load(
        environ={**world.environ, "STOCKADE_LIMITS_CPUS": "none"},
        flags={"limits.command_timeout": "none", "limits.disk": "None"},
    )
    assert loaded.config.limits.cpus is None
    assert loaded.config.limits.command_timeout is None
    assert loaded.config.limits.disk is None


def test_environ_is_read_at_call_time_not_cached(world: World) -> None:
    first = world.load(environ={**world.environ, "STOCKADE_HOSTNAME": "one"})
    second = world.load(environ={**world.environ, "STOCKADE_HOSTNAME": "two"})
    assert (first.config.hostname, second.config.hostname) == ("one", "two")


# ---------------------------------------------------------------------------------------------
# Files: user file location, pyproject, walking up


def test_user_config_path_follows_xdg_and_home(tmp_path: Path) -> None:
    assert user_config_path({"HOME": "/h", "XDG_CONFIG_HOME": "/x"}) == Path(
        "/x/stockade/config.toml"
    )
    assert user_config_path({"HOME": "/h"}) == Path("/h/.config/stockade/config.toml")
    # A relative XDG_CONFIG_HOME is invalid per the XDG spec and ignored.
    assert user_config_path({"HOME": "/h", "XDG_CONFIG_HOME": "rel"}) == Path(
        "/h/.config/stockade/config.toml"
    )


def test_explicit_user_config(world: World, tmp_path: Path) -> None:
    other = tmp_path / "other.toml"
    other.write_text("hostname = 'explicit'\n")
    world.write_user("hostname = 'xdg'\n")
    assert world.load(user_config=other).config.hostname == "explicit"
    with pytest.raises(ConfigError, match="does not exist"):
        world.load(user_config=tmp_path / "missing.toml")


def test_pyproject_tool_stockade(world: World) -> None:
    world.write_project(
        "[project]\nname = 'x'\n[tool.stockade]\nbackend = 'gvisor'\n"
        "[tool.stockade.limits]\npids = 99\n[tool.stockade.profiles.ci]\nhostname = 'ci'\n",
        name="pyproject.toml",
    )
    loaded = world.load(profile="ci")
    assert loaded.config.backend == "gvisor"
    assert loaded.config.limits.pids == 99
    assert loaded.config.hostname == "ci"
    assert loaded.sources == (str(world.project / "pyproject.toml"),)


def test_pyproject_errors_name_the_tool_section(world: World) -> None:
    path = world.write_project("[tool.stockade.limits]\nmemroy = '1G'\n", name="pyproject.toml")
    with pytest.raises(ConfigError) as info:
        world.load()
    assert str(info.value) == (
        f"unknown key 'memroy' in {path} [tool.stockade.limits]; did you mean 'memory'?"
    )


def test_pyproject_without_section_is_not_a_project_file(world: World) -> None:
    world.write_project("[project]\nname = 'x'\n", name="pyproject.toml")
    sub = world.project / "sub"
    sub.mkdir()
    loaded = world.load(start=sub)
    assert loaded.project_root == sub.resolve()
    assert loaded.sources == ()


def test_stockade_toml_wins_over_pyproject(world: World) -> None:
    world.write_project("[tool.stockade]\nhostname = 'py'\n", name="pyproject.toml")
    world.write_project("hostname = 'toml'\n")
    assert world.load().config.hostname == "toml"


def test_walks_up_to_the_nearest_project_root(world: World) -> None:
    world.write_project("hostname = 'root'\n")
    deep = world.project / "a" / "b" / "c"
    deep.mkdir(parents=True)
    loaded = world.load(start=deep)
    assert loaded.project_root == world.project.resolve()
    assert loaded.config.hostname == "root"
    # The workspace is the project root, not the start directory.
    assert loaded.config.workspace.path == world.project.resolve()


def test_walk_finds_pyproject_section_too(world: World) -> None:
    world.write_project("[tool.stockade]\nhostname = 'py'\n", name="pyproject.toml")
    deep = world.project / "src" / "pkg"
    deep.mkdir(parents=True)
    assert world.load(start=deep).project_root == world.project.resolve()


def test_walk_stops_below_home(world: World) -> None:
    (world.home / "stockade.toml").write_text("hostname = 'home'\n")
    loaded = world.load()
    assert loaded.project_root == world.project.resolve()
    assert loaded.config.hostname == "sandbox"


def test_walk_outside_home_goes_up(world: World, tmp_path: Path) -> None:
    outside = tmp_path / "srv" / "app"
    (outside / "deep").mkdir(parents=True)
    (outside / "stockade.toml").write_text("hostname = 'srv'\n")
    loaded = world.load(start=outside / "deep")
    assert loaded.project_root == outside.resolve()
    assert loaded.config.hostname == "srv"


def test_relative_workspace_path_is_relative_to_the_file(world: World) -> None:
    (world.project / "sub" / "deeper").mkdir(parents=True)
    (world.project / "data").mkdir()
    world.write_project("[workspace]\npath = 'data'\n")
    loaded = world.load(start=world.project / "sub" / "deeper")
    assert loaded.config.workspace.path == (world.project / "data").resolve()
    # Flags resolve against the start directory.
    loaded = world.load(start=world.project / "sub", flags={"workspace.path": "deeper"})
    assert loaded.config.workspace.path == (world.project / "sub" / "deeper").resolve()


def test_tilde_in_workspace_path_uses_home_from_environ(world: World) -> None:
    loaded = world.load(flags={"workspace.path": "~/proj"})
    assert loaded.config.workspace.path == world.project.resolve()


def test_toml_syntax_error_names_file_and_line(world: World) -> None:
    path = world.write_project("backend = 'auto'\nhostname = \n")
    with pytest.raises(ConfigError) as info:
        world.load()
    message = str(info.value)
    assert message.startswith(f"{path}:2: invalid TOML")
    assert "line 2" in message


def test_broken_user_file_is_reported_even_when_overridden(world: World) -> None:
    path = world.write_user("[limits]\nmemory = 'lots'\n")
    world.write_project("[limits]\nmemory = '1G'\n")
    with pytest.raises(ConfigError, match=re.escape(f"{path} [limits]")):
        world.load()


# ---------------------------------------------------------------------------------------------
# Profiles


PROFILES = """
backend = "namespace"
hostname = "base"
[limits]
memory = "1G"
[profiles.test]
backend = "microvm"
[profiles.test.limits]
pids = 64
[profiles.staging]
backend = "container"
hostname = "staging"
"""


def test_profile_applies_over_files(world: World) -> None:
    world.write_project(PROFILES)
    loaded = world.load(profile="test")
    config = loaded.config
    assert (config.backend, config.hostname, config.profile) == ("microvm", "base", "test")
    assert (config.limits.memory, config.limits.pids) == (2**30, 64)
    assert loaded.origin("limits.pids").endswith("[profiles.test.limits]")
    assert set(config.profiles) == {"test", "staging"}
    test_limits = config.profiles["test"].limits
    assert test_limits is not None and test_limits.model_fields_set == {"pids"}


def test_profile_is_below_environment_flags_and_arguments(world: World) -> None:
    world.write_project(PROFILES)
    environ = {**world.environ, "STOCKADE_PROFILE": "test", "STOCKADE_LIMITS_PIDS": "77"}
    loaded = world.load(environ=environ, flags={"backend": "gvisor"})
    assert loaded.config.profile == "test"
    assert loaded.config.limits.pids == 77
    assert loaded.config.backend == "gvisor"


@pytest.mark.parametrize("layer", ["project", "env", "flag", "overrides", "argument"])
def test_profile_can_be_selected_from_any_layer(world: World, layer: str) -> None:
    # "profile" must sit at the top level, before the first table.
    world.write_project(("profile = 'test'\n" if layer == "project" else "") + PROFILES)
    environ = dict(world.environ)
    if layer == "env":
        environ["STOCKADE_PROFILE"] = "test"
    loaded = world.load(
        environ=environ,
        flags={"profile": "test"} if layer == "flag" else None,
        overrides={"profile": "test"} if layer == "overrides" else None,
        profile="test" if layer == "argument" else None,
    )
    assert loaded.config.backend == "microvm"


def test_highest_profile_selection_wins(world: World) -> None:
    world.write_project("profile = 'staging'\n" + PROFILES)
    environ = {**world.environ, "STOCKADE_PROFILE": "staging"}
    assert world.load(environ=environ).config.backend == "container"
    assert world.load(environ=environ, flags={"profile": "test"}).config.backend == "microvm"
    loaded = world.load(environ=environ, overrides={"profile": "staging"}, profile="test")
    assert loaded.config.backend == "microvm"


def test_unknown_profile_lists_defined_ones(world: World) -> None:
    world.write_project(PROFILES)
    with pytest.raises(ConfigError) as info:
        world.load(profile="tset")
    message = str(info.value)
    assert "unknown profile 'tset'" in message
    assert "defined profiles: staging, test" in message
    assert "argument profile=" in message


def test_unknown_profile_without_any_defined(world: World) -> None:
    with pytest.raises(ConfigError, match="defined profiles: none"):
        world.load(environ={**world.environ, "STOCKADE_PROFILE": "ci"})


def test_profiles_from_user_and_project_merge(world: World) -> None:
    world.write_user("[profiles.ci]\nbackend = 'gvisor'\nhostname = 'user-ci'\n")
    world.write_project("[profiles.ci]\nhostname = 'project-ci'\n")
    config = world.load(profile="ci").config
    assert (config.backend, config.hostname) == ("gvisor", "project-ci")


def test_profile_may_not_select_a_profile(world: World) -> None:
    path = world.write_project("[profiles.a]\nprofile = 'b'\n")
    with pytest.raises(ConfigError, match=re.escape(f"'profile' is not allowed in {path}")):
        world.load()


def test_profiles_only_in_files(world: World) -> None:
    with pytest.raises(ConfigError, match="profiles can only be defined in a config file"):
        world.load(overrides={"profiles": {"x": {}}})


def test_profile_unknown_key_suggestion(world: World) -> None:
    path = world.write_project("[profiles.ci]\nbakend = 'gvisor'\n")
    with pytest.raises(ConfigError) as info:
        world.load()
    assert str(info.value) == (
        f"unknown key 'bakend' in {path} [profiles.ci]; did you mean 'backend'?"
    )


# ---------------------------------------------------------------------------------------------
# Unknown keys and invalid values


def test_unknown_top_level_key_suggestion(world: World) -> None:
    path = world.write_project("[limts]\nmemory = '1G'\n")
    with pytest.raises(ConfigError) as info:
        world.load()
    assert str(info.value) == f"unknown key 'limts' in {path} [top level]; did you mean 'limits'?"


def test_unknown_nested_key_suggestion(world: World) -> None:
    path = world.write_user("[limits]\ncommand_timout = '1m'\n")
    with pytest.raises(ConfigError) as info:
        world.load()
    assert str(info.value) == (
        f"unknown key 'command_timout' in {path} [limits]; did you mean 'command_timeout'?"
    )


def test_unknown_key_without_close_match_lists_valid_keys(world: World) -> None:
    world.write_project("[network]\nzzz = 1\n")
    with pytest.raises(ConfigError, match="valid keys here: allow, deny"):
        world.load()


def test_table_written_as_value_is_refused(world: World) -> None:
    world.write_project("limits = 5\n")
    with pytest.raises(ConfigError, match=r"'limits' in .* must be a table: write \[limits\]"):
        world.load()


def test_unknown_flag_and_override_keys(world: World) -> None:
    with pytest.raises(ConfigError) as info:
        world.load(flags={"limits.memroy": "1G"})
    assert str(info.value) == (
        "unknown key 'limits.memroy' in command-line option 'limits.memroy'; "
        "did you mean 'limits.memory'?"
    )
    with pytest.raises(ConfigError, match=r"argument overrides\['bakend'\]; did you mean"):
        world.load(overrides={"bakend": "auto"})


def test_unknown_environment_variable_is_an_error(world: World) -> None:
    with pytest.raises(ConfigError) as info:
        world.load(environ={**world.environ, "STOCKADE_LIMITS_MEMROY": "1G"})
    message = str(info.value)
    assert "STOCKADE_LIMITS_MEMROY" in message
    assert "did you mean STOCKADE_LIMITS_MEMORY?" in message


@pytest.mark.parametrize(
    "name",
    [
        "STOCKADE_STATE_DIR",
        "STOCKADE_CONFIG",
        "STOCKADE_LOG",
        "STOCKADE_SECRET_OPENAI",
        "STOCKADE_INTERNAL_FD",
        "NOT_STOCKADE_X",
    ],
)
def test_runtime_environment_variables_are_ignored(world: World, name: str) -> None:
    world.load(environ={**world.environ, name: "whatever"})


@pytest.mark.parametrize(
    ("key", "value", "fragment"),
    [
        ("backend", "kvm", "'auto'"),
        ("workspace.mode", "copy", "'cow'"),
        ("limits.memory", "lots", "not a size"),
        ("limits.memory", -5, "negative"),
        ("limits.pids", "many", "integer"),
        ("limits.command_timeout", "soon", "not a duration"),
        ("limits.timeout", 0, "greater than 0"),
        ("hostname", "bad_host!", "not a valid hostname"),
        ("env.pass", ["1BAD"], "not an environment variable name"),
        ("network.deny", ["a b"], "whitespace"),
        ("unsafe_host", "perhaps", "boolean"),
    ],
)
def test_invalid_values_name_key_and_origin(
    world: World, key: str, value: Any, fragment: str
) -> None:
    path = world.write_project(f"{key} = {toml_value(value)}\n")
    with pytest.raises(ConfigError) as info:
        world.load()
    message = str(info.value)
    assert not isinstance(info.value, PolicyError)
    table = key.rpartition(".")[0] or "top level"
    assert f"for '{key}' in {path} [{table}]" in message
    assert fragment in message


def test_env_values_are_not_echoed_in_errors(world: World) -> None:
    with pytest.raises(ConfigError) as info:
        world.load(overrides={"env.set": {"1X": "hunter2"}})
    assert "hunter2" not in str(info.value)


# ---------------------------------------------------------------------------------------------
# Environment variable parsing


def test_environment_parsing_of_each_kind(world: World) -> None:
    environ = {
        **world.environ,
        "STOCKADE_ENV_PASS": " TERM , EDITOR,,",
        "STOCKADE_NETWORK_DENY": "a.org,b.org",
        "STOCKADE_LIMITS_PIDS": "2048",
        "STOCKADE_LIMITS_CPUS": "1.5",
        "STOCKADE_LIMITS_MEMORY": "1.5G",
        "STOCKADE_LIMITS_COMMAND_TIMEOUT": "1h30m",
        "STOCKADE_LIMITS_TIMEOUT": "45",
        "STOCKADE_UNSAFE_HOST": "true",
        "STOCKADE_ENV_SET": "A=1,B=x=y,C=",
    }
    config = world.load(environ=environ).config
    assert config.env.pass_ == ("TERM", "EDITOR")
    assert config.network.deny == ("a.org", "b.org")
    assert config.limits.pids == 2048
    assert config.limits.cpus == 1.5
    assert config.limits.memory == 3 * 2**29
    assert config.limits.command_timeout == 5400.0
    assert config.limits.timeout == 45.0
    assert config.unsafe_host is True
    assert config.env.set_ == {"A": "1", "B": "x=y", "C": ""}


def test_empty_environment_values(world: World) -> None:
    world.write_project("backend = 'namespace'\n[env]\npass = ['TERM']\n")
    environ = {**world.environ, "STOCKADE_BACKEND": "", "STOCKADE_ENV_PASS": ""}
    config = world.load(environ=environ).config
    assert config.backend == "namespace"  # empty scalar: not set
    assert config.env.pass_ == ()  # empty list: the empty list


def test_environment_assignment_without_equals(world: World) -> None:
    with pytest.raises(ConfigError, match="STOCKADE_ENV_SET: expected comma-separated"):
        world.load(environ={**world.environ, "STOCKADE_ENV_SET": "A=1,B"})


def test_flag_list_given_as_string_is_split(world: World) -> None:
    assert world.load(flags={"network.deny": "a.org, b.org"}).config.network.deny == (
        "a.org",
        "b.org",
    )


# ---------------------------------------------------------------------------------------------
# Dangerous values: PolicyError naming the key, its origin and the fix


def refused(world: World, key: str, **kwargs: Any) -> str:
    with pytest.raises(PolicyError) as info:
        world.load(**kwargs)
    message = str(info.value)
    assert key in message
    assert "(from " in message
    return message


def test_host_backend_needs_unsafe_host(world: World) -> None:
    message = refused(world, "backend", flags={"backend": "host"})
    assert "runs commands without any isolation" in message
    assert "--unsafe-host" in message
    assert "command-line option 'backend'" in message
    config = world.load(flags={"backend": "host", "unsafe_host": True}).config
    assert config.backend == "host"


@pytest.mark.parametrize("path", ["/", "/usr", "/etc", "/etc/nginx", "/proc/self", "/var", "/bin"])
def test_system_workspace_paths_are_refused(world: World, path: str) -> None:
    message = refused(world, "workspace.path", overrides={"workspace.path": path})
    assert "workspace.mode = 'none'" in message


def test_home_and_its_parents_are_refused(world: World) -> None:
    assert "home directory" in refused(world, "workspace.path", flags={"workspace.path": "~"})
    message = refused(world, "workspace.path", flags={"workspace.path": str(world.tmp)})
    assert "contains your home directory" in message
    # Credentials, programs and sockets are judged when the policy compiles (test_mounts.py).


def test_home_is_refused_when_it_is_the_project(world: World) -> None:
    message = refused(world, "workspace.path", start=world.home)
    assert "(from default)" in message


def test_refused_workspace_path_names_the_file(world: World) -> None:
    path = world.write_project("[workspace]\npath = '..'\n")
    message = refused(world, "workspace.path")
    assert f"{path} [workspace]" in message


def test_dangerous_path_is_fine_without_a_workspace(world: World) -> None:
    loaded = world.load(flags={"workspace.path": "/", "workspace.mode": "none"})
    assert loaded.config.workspace.mode == "none"


@pytest.mark.parametrize(
    "mount",
    [
        "workspace",
        "./w",
        "/",
        "/usr",
        "/usr/",
        "/etc",
        "/proc",
        "/dev",
        "/sys",
        "/tmp",
        "/proc/x",
        "/w/../usr",
    ],
)
def test_bad_mounts_are_refused(world: World, mount: str) -> None:
    refused(world, "workspace.mount", flags={"workspace.mount": mount})


@pytest.mark.parametrize(
    "name",
    [
        "SSH_AUTH_SOCK",
        "AWS_ACCESS_KEY_ID",
        "AWS_PROFILE",
        "AZURE_CLIENT_ID",
        "GOOGLE_APPLICATION_CREDENTIALS",
        "GITHUB_TOKEN",
        "NPM_TOKEN",
        "HF_TOKEN",
        "MY_SECRET_THING",
        "DB_PASSWORD",
        "MYSQL_PASSWD",
        "OPENAI_API_KEY",
        "SOME_APIKEY",
        "GIT_CREDENTIALS",
        "STRIPE_KEY",
        "DOCKER_HOST",
        "KUBECONFIG",
        "LD_PRELOAD",
        "LD_LIBRARY_PATH",
        "github_token",
    ],
)
def test_credential_variables_are_refused(world: World, name: str) -> None:
    message = refused(world, "env.pass", flags={"env.pass": ["TERM", name]})
    assert name in message
    assert "[secrets]" in message or "host path" in message
    message = refused(world, f"env.set.{name}", overrides={"env.set": {name: "x"}})
    assert "x'" not in message


@pytest.mark.parametrize("name", ["TERM", "EDITOR", "PYTHONPATH", "GIT_AUTHOR_NAME", "KEYBOARD"])
def test_ordinary_variables_are_allowed(world: World, name: str) -> None:
    world.load(flags={"env.pass": [name], "env.set": {name: "v"}})


def test_limits_below_minimum_are_refused(world: World) -> None:
    assert "32MiB" in refused(world, "limits.memory", flags={"limits.memory": "16MiB"})
    world.load(flags={"limits.memory": "32MiB"})
    refused(world, "limits.pids", flags={"limits.pids": 15})
    world.load(flags={"limits.pids": 16})
    assert "8MiB" in refused(world, "limits.disk", flags={"limits.disk": "4MiB"})
    world.load(flags={"limits.disk": "8MiB"})


@pytest.mark.parametrize("cpus", [0, -1, 10**6])
def test_absurd_cpus_are_refused(world: World, cpus: float) -> None:
    refused(world, "limits.cpus", flags={"limits.cpus": cpus})


@pytest.mark.parametrize(
    "entry", ["*", "*:443", "*.com", "*.co.uk", "*.github.io", "0.0.0.0/0", "::/0", "0.0.0.0/7"]
)
def test_too_broad_network_entries_are_refused(world: World, entry: str) -> None:
    message = refused(world, "network.allow", flags={"network.allow": [entry]})
    assert "too broad" in message
    assert repr(entry) in message
    assert "command-line option 'network.allow'" in message


@pytest.mark.parametrize("key", ["network.deny", "network.tcp"])
def test_too_broad_entries_are_refused_in_every_list(world: World, key: str) -> None:
    path = world.write_project(f"[network]\n{key.split('.')[1]} = ['*.com:22']\n")
    message = refused(world, key)
    assert "too broad" in message
    assert f"{path} [network]" in message


@pytest.mark.parametrize(
    ("key", "entry", "fragment"),
    [
        ("network.allow", "*.*", "whole first label"),
        ("network.allow", "**.org", "whole first label"),
        ("network.allow", "a.*.org", "whole first label"),
        ("network.allow", "", "empty"),
        ("network.allow", "pypi.org:0", "1 to 65535"),
        ("network.allow", "https://pypi.org/simple", "URL"),
        ("network.deny", "10.0.0.1/8", "did you mean '10.0.0.0/8'"),
        ("network.tcp", "github.com", "needs a port"),
        ("network.presets", "pythn-packages", "did you mean 'python-packages'"),
    ],
)
def test_malformed_network_entries_name_key_entry_and_reason(
    world: World, key: str, entry: str, fragment: str
) -> None:
    path = world.write_project(f"[network]\n{key.split('.')[1]} = [{entry!r}]\n")
    with pytest.raises(ConfigError) as info:
        world.load()
    message = str(info.value)
    assert not isinstance(info.value, PolicyError)
    assert f"for '{key}' in {path} [network]" in message
    assert repr(entry) in message
    assert fragment in message


def test_network_entries_are_accepted_as_written(world: World) -> None:
    world.write_project(
        "[network]\ndeny = ['Evil.ORG.', '*.example.com:443', '10.0.0.0/8', '[::1]:80']\n"
    )
    config = world.load().config
    assert config.network.deny == ("Evil.ORG.", "*.example.com:443", "10.0.0.0/8", "[::1]:80")


def test_tcp_and_presets_keys_exist(world: World) -> None:
    assert ENV_VAR_KEYS["STOCKADE_NETWORK_TCP"] == "network.tcp"
    assert ENV_VAR_KEYS["STOCKADE_NETWORK_PRESETS"] == "network.presets"
    config = world.load().config
    assert config.network.tcp == ()
    assert config.network.presets == ()


def test_egress_lists_are_accepted(world: World) -> None:
    config = world.load(
        flags={
            "network.allow": ["pypi.org"],
            "network.tcp": ["github.com:22"],
            "network.presets": ["github"],
        }
    ).config
    assert config.network.presets == ("github",)


def test_overridden_dangerous_value_is_fine(world: World) -> None:
    world.write_user("backend = 'host'\n")
    assert world.load(flags={"backend": "namespace"}).config.backend == "namespace"


# ---------------------------------------------------------------------------------------------
# Units


@pytest.mark.parametrize(
    ("text", "size"),
    [
        ("512", 512),
        (512, 512),
        ("512B", 512),
        ("1K", 1024),
        ("1kib", 1024),
        ("512M", 512 * 2**20),
        ("512MB", 512 * 2**20),
        ("2GiB", 2 * 2**30),
        ("1.5G", 3 * 2**29),
        (" 3 T ", 3 * 2**40),
        ("1P", 2**50),
    ],
)
def test_parse_size_examples(text: str | int, size: int) -> None:
    assert parse_size(text) == size


@pytest.mark.parametrize(
    "bad", ["", "M", "1.5.5G", "-1G", "1X", "1GiBB", "1 2", "1e9", "0x10", "inf", True, 1.5, None]
)
def test_parse_size_rejects(bad: Any) -> None:
    with pytest.raises(ValueError):
        parse_size(bad)


def test_parse_size_rejects_overflow() -> None:
    with pytest.raises(ValueError, match="too large"):
        parse_size("9999999P")
    with pytest.raises(ValueError, match="too large"):
        parse_size(MAX_SIZE + 1)


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        ("30s", 30.0),
        ("10m", 600.0),
        ("1h30m", 5400.0),
        ("1h 30m 5s", 5405.0),
        ("2d", 172800.0),
        ("500ms", 0.5),
        ("1.5h", 5400.0),
        ("90", 90.0),
        ("0.25", 0.25),
        (45, 45.0),
        (2.5, 2.5),
        ("1M", 60.0),
    ],
)
def test_parse_duration_examples(text: str | float, seconds: float) -> None:
    assert parse_duration(text) == seconds


@pytest.mark.parametrize(
    "bad", ["", "s", "1x", "1m1m", "30s1m", "-5s", "1h-5m", "1e3s", "nan", True, float("inf"), -1]
)
def test_parse_duration_rejects(bad: Any) -> None:
    with pytest.raises(ValueError):
        parse_duration(bad)


@given(st.integers(min_value=0, max_value=MAX_SIZE))
def test_size_format_parse_round_trip(size: int) -> None:
    text = format_size(size)
    assert parse_size(text) == size
    assert parse_size(text.lower()) == size


@given(
    st.integers(min_value=0, max_value=2**20),
    st.sampled_from(["", "B", "K", "KiB", "kb", "M", "MiB", "G", "GiB", "T", "TiB"]),
)
def test_size_with_unit_is_multiplied_out(number: int, unit: str) -> None:
    factor = {"": 1, "b": 1, "k": 2**10, "m": 2**20, "g": 2**30, "t": 2**40}[unit[:1].lower()]
    assert parse_size(f"{number}{unit}") == number * factor


@given(st.floats(min_value=0, allow_nan=False, allow_infinity=False))
def test_duration_format_parse_round_trip(seconds: float) -> None:
    assert parse_duration(format_duration(seconds)) == seconds


@given(
    st.integers(min_value=0, max_value=99),
    st.integers(min_value=0, max_value=23),
    st.integers(min_value=0, max_value=59),
    st.integers(min_value=0, max_value=59),
)
def test_duration_components_add_up(d: int, h: int, m: int, s: int) -> None:
    text = f"{d}d{h}h{m}m{s}s"
    assert parse_duration(text) == d * 86400 + h * 3600 + m * 60 + s


@given(st.text().map(lambda t: t + "x"))
def test_garbage_is_rejected(garbage: str) -> None:
    # 'x' is no unit of either kind, so no string containing it is valid.
    with pytest.raises(ValueError):
        parse_size(garbage)
    with pytest.raises(ValueError):
        parse_duration(garbage)
