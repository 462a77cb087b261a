"""Find, read, merge and check the configuration layers (DESIGN.md section 8).

Precedence, highest first: call argument > CLI flag > environment (``STOCKADE_*``) > selected
profile > project file > user file > defaults. Each layer is flattened to dotted keys, every
value is validated where it was written (so an error names its file and table, variable or
flag), then the layers are merged key by key and the result is checked for dangerous values
(``safety.py``). Nothing is cached: every call reads the files and the environment afresh.
"""

from __future__ import annotations

import difflib
import logging
import os
import re
import tomllib
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ValidationError

from stockade._errors import ConfigError
from stockade.config.models import (
    CONFIG_KEYS,
    ENV_VAR_KEYS,
    ContainerConfig,
    EnvConfig,
    GvisorConfig,
    LimitsConfig,
    MicrovmConfig,
    NetworkConfig,
    StockadeConfig,
    WorkspaceConfig,
)
from stockade.config.safety import check_safety, home_dir
from stockade.config.trust import (
    TRUST_FILE,
    TrustStore,
    UntrustedConfigError,
    Weakening,
    file_digest,
    secret_weakening,
    weakening_reason,
)

__all__ = [
    "PROJECT_FILE",
    "RUNTIME_ENV_PREFIXES",
    "RUNTIME_ENV_VARS",
    "LoadedConfig",
    "find_project_root",
    "load_config",
    "project_file_weakenings",
    "trust_store",
    "user_config_path",
]

logger = logging.getLogger(__name__)

PROJECT_FILE = "stockade.toml"
PYPROJECT_FILE = "pyproject.toml"
#: ``STOCKADE_*`` variables the runtime reads itself; they are not configuration keys.
RUNTIME_ENV_VARS = frozenset(
    {
        "STOCKADE_STATE_DIR",
        "STOCKADE_CONFIG",
        "STOCKADE_LOG",
        "STOCKADE_IMAGE_DIR",
        "STOCKADE_DEBIAN_MIRROR",
        "STOCKADE_PROBE_CACHE",  # 0 turns the on-disk probe cache off (backends/probe_cache.py)
        # VMM binaries the microVM drivers look for (see each driver's install hint).
        "STOCKADE_FIRECRACKER",
        "STOCKADE_CLOUD_HYPERVISOR",
        "STOCKADE_VFKIT",
    }
)
RUNTIME_ENV_PREFIXES = (
    "STOCKADE_SECRET_",
    "STOCKADE_INTERNAL_",
    "STOCKADE_TEST_",
    "STOCKADE_MICROVM_",
)
_TABLES: dict[str, type[BaseModel]] = {
    "workspace": WorkspaceConfig,
    "limits": LimitsConfig,
    "env": EnvConfig,
    "network": NetworkConfig,
    "container": ContainerConfig,
    "gvisor": GvisorConfig,
    "microvm": MicrovmConfig,
}
_ENV_SET = "env.set"
_TOP_LEVEL = "top level"


@dataclass(frozen=True)
class LoadedConfig:
    """A validated configuration, the project root it belongs to, and where it came from."""

    config: StockadeConfig
    project_root: Path
    #: Config files read, lowest precedence first.
    sources: tuple[str, ...]
    #: (dotted key, where its value came from) for every key not left at its default;
    #: ``env.set`` entries appear as ``env.set.NAME``.
    origins: tuple[tuple[str, str], ...] = ()

    def origin(self, key: str) -> str:
        """Say where the value of dotted ``key`` came from (``"default"`` if nowhere)."""
        return dict(self.origins).get(key, "default")


@dataclass(frozen=True)
class _Setting:
    value: Any
    where: str  # "/p/stockade.toml [limits]", "environment variable STOCKADE_X", ...
    base_dir: Path  # a relative workspace.path resolves against this
    source: Path | None = None  # the config file it was read from, if any


_Layer = dict[str, _Setting]


# ---------------------------------------------------------------------------------------------
# Entry point


def load_config(
    start_dir: Path | None = None,
    *,
    profile: str | None = None,
    flags: Mapping[str, Any] | None = None,
    overrides: Mapping[str, Any] | None = None,
    environ: Mapping[str, str] | None = None,
    user_config: Path | None = None,
) -> LoadedConfig:
    """Load the configuration for the project containing ``start_dir`` (default: the cwd).

    ``flags`` (CLI) and ``overrides`` (call arguments) map dotted keys to values, e.g.
    ``{"limits.memory": "512M"}``; a ``None`` value means "not given". ``profile`` is a call
    argument too and wins over ``overrides["profile"]``. ``environ`` defaults to
    ``os.environ``; ``user_config`` to ``$XDG_CONFIG_HOME/stockade/config.toml``.

    Raises ConfigError for anything invalid and PolicyError for anything dangerous; the
    message names the key, where it was set, and how to fix it.
    """
    env = os.environ if environ is None else environ
    start = (Path.cwd() if start_dir is None else Path(start_dir)).resolve()
    home = home_dir(env)
    project_root, project_file = find_project_root(start, home=home)

    sources: list[str] = []
    user_settings: _Layer = {}
    user_profiles: dict[str, _Layer] = {}
    user_path = user_config if user_config is not None else user_config_path(env)
    if user_config is not None and not user_path.is_file():
        raise ConfigError(
            f"user config file {user_path} does not exist; create it or pass another path"
        )
    secrets: dict[str, Any] = {}
    if user_path.is_file():
        # The user file serves every project: "." in it can only mean "this project".
        user_data = _take_secrets(_read_toml(user_path), user_path, "", secrets)
        user_settings, user_profiles = _file_layer(
            user_data, file=user_path, section="", base_dir=project_root, home=home
        )
        sources.append(str(user_path))

    project_settings: _Layer = {}
    project_profiles: dict[str, _Layer] = {}
    project_secrets: dict[str, Any] = {}
    digest = ""
    if project_file is not None:
        project_settings, project_profiles, project_secrets, digest = _project_layer(
            project_file, project_root, home
        )
        secrets.update(project_secrets)
        sources.append(str(project_file))

    env_settings = _environment_layer(env, base_dir=start, home=home)
    flag_settings = _mapping_layer(
        flags or {}, lambda key: f"command-line option '{key}'", base_dir=start, home=home
    )
    call_settings = _mapping_layer(
        overrides or {}, lambda key: f"argument overrides[{key!r}]", base_dir=start, home=home
    )
    if profile is not None:
        call_settings["profile"] = _validated(
            "profile", _Setting(profile, "argument profile=", start), home
        )

    profiles = _merge_profiles(user_profiles, project_profiles)
    merged: _Layer = {**user_settings, **project_settings}
    chosen = _chosen_profile(
        [user_settings, project_settings, env_settings, flag_settings, call_settings]
    )
    if chosen is not None:
        name = chosen.value
        if name not in profiles:
            defined = ", ".join(sorted(profiles)) or "none"
            raise ConfigError(
                f"unknown profile {name!r} (from {chosen.where}); defined profiles: {defined}; "
                f"define [profiles.{name}] in {PROJECT_FILE} or choose a defined one"
            )
        merged.update(profiles[name])
    for layer in (env_settings, flag_settings, call_settings):
        merged.update(layer)

    config = _build(merged, profiles, project_root, secrets)
    origins = {key: setting.where for key, setting in merged.items()}
    check_safety(
        config,
        environ=env,
        base_dir=project_root,
        origin=lambda key: origins.get(key, "default"),
    )
    if project_file is not None:
        untrusted = _from_project(merged, chosen, profiles, project_file)
        user_pass = user_settings["env.pass"].value if "env.pass" in user_settings else ()
        weakenings = _weakenings(untrusted, config, project_root, user_pass)
        for name, secret in project_secrets.items():  # the project's win over the user's
            where = _table_where(project_file, _section(project_file), f"secrets.{name}")
            weakenings.append(secret_weakening(name, secret, where))
        if weakenings:
            _require_trust(project_file, digest, weakenings, env)
    return LoadedConfig(
        config=config,
        project_root=project_root,
        sources=tuple(sources),
        origins=tuple(origins.items()),
    )


def _project_layer(
    project_file: Path, project_root: Path, home: Path
) -> tuple[_Layer, dict[str, _Layer], dict[str, Any], str]:
    """(settings, profiles, secrets, sha256) of a project file, all from one read of it."""
    try:
        raw = project_file.read_bytes()
        text = raw.decode("utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"cannot read config file {project_file}: {exc}") from exc
    data: Any = _parse_toml(text, project_file)
    section = _section(project_file)
    if section:
        tool = data.get("tool", {})
        data = tool.get("stockade") if isinstance(tool, dict) else None
        if not isinstance(data, dict):
            raise ConfigError(
                f"{project_file} has no [tool.stockade] table; write one, or use {PROJECT_FILE}"
            )
    secrets: dict[str, Any] = {}
    data = _take_secrets(data, project_file, section, secrets)
    settings, profiles = _file_layer(
        data, file=project_file, section=section, base_dir=project_root, home=home
    )
    return settings, profiles, secrets, file_digest(raw)


def _section(project_file: Path) -> str:
    return "tool.stockade" if project_file.name == PYPROJECT_FILE else ""


def _from_project(
    merged: _Layer, chosen: _Setting | None, profiles: dict[str, _Layer], project_file: Path
) -> _Layer:
    """The merged settings the project file decided: written in it, or in a profile it chose."""
    chosen_profile = (
        profiles.get(chosen.value, {})
        if chosen is not None and chosen.source == project_file
        else {}
    )
    out: _Layer = {}
    for key, setting in merged.items():
        if setting.source == project_file:
            out[key] = setting
        elif chosen is not None and chosen_profile.get(key) is setting:
            where = f"{setting.where}, the profile chosen by {chosen.where}"
            out[key] = _Setting(setting.value, where, setting.base_dir, project_file)
    return out


_FIXES = {
    "backend": ("--backend auto", "backend='auto'"),
    "workspace.mode": ("--workspace-mode cow", "workspace_mode='cow'"),
}


def _weakenings(
    settings: _Layer, config: StockadeConfig, project_root: Path, user_pass: Any
) -> list[Weakening]:
    out = []
    for key, setting in settings.items():
        reason = weakening_reason(
            key, setting.value, config=config, project_root=project_root, user_pass=user_pass
        )
        if reason is None:
            continue
        fix = _FIXES.get(key, ("", ""))
        if key == "unsafe_host":
            # The project asked for the host backend too: refuse it; else the user did, and
            # only the consent is missing.
            fix = (
                _FIXES["backend"]
                if "backend" in settings
                else ("--unsafe-host", "unsafe_host=True")
            )
        out.append(Weakening(key, _shown(setting.value), reason, setting.where, fix[0], fix[1]))
    return out


def _shown(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, Path):
        return repr(str(value))
    if isinstance(value, tuple):
        return repr(list(value))
    return repr(value)


def _require_trust(
    file: Path, digest: str, weakenings: list[Weakening], env: Mapping[str, str]
) -> None:
    store = trust_store(env)
    record = store.get(file)
    if record is not None and record.sha256 == digest:
        logger.info("%s is trusted: honouring %s", file, ", ".join(w.key for w in weakenings))
        return
    raise UntrustedConfigError(file, weakenings, previous=record, user_file=user_config_path(env))


def trust_store(environ: Mapping[str, str] | None = None) -> TrustStore:
    """The user's trust records: ``trusted.json`` next to the user config file."""
    return TrustStore(user_config_path(environ).parent / TRUST_FILE)


def project_file_weakenings(
    project_file: Path, environ: Mapping[str, str] | None = None
) -> tuple[str, list[Weakening]]:
    """(sha256, what it sets that needs trust) of a project file, read once.

    Every setting the file makes is judged, its profiles' too, as if no other layer
    overrode it: this is what trusting the file allows.
    """
    env = os.environ if environ is None else environ
    home = home_dir(env)
    project_root = project_file.parent.resolve()
    settings, profiles, secrets, digest = _project_layer(project_file, project_root, home)
    found: dict[tuple[str, str], Weakening] = {}
    for layer in [settings, *({**settings, **p} for p in profiles.values())]:
        config = _build(layer, {}, project_root, secrets)
        for weakening in _weakenings(layer, config, project_root, ()):
            found.setdefault((weakening.key, weakening.where), weakening)
    for name, secret in secrets.items():
        where = _table_where(project_file, _section(project_file), f"secrets.{name}")
        found.setdefault((f"secrets.{name}.hosts", where), secret_weakening(name, secret, where))
    return digest, list(found.values())


def user_config_path(environ: Mapping[str, str] | None = None) -> Path:
    """``$XDG_CONFIG_HOME/stockade/config.toml``, defaulting to ``~/.config/stockade/...``."""
    env = os.environ if environ is None else environ
    xdg = env.get("XDG_CONFIG_HOME", "")
    # The XDG spec says a relative value is invalid and must be ignored.
    base = Path(xdg) if xdg and Path(xdg).is_absolute() else home_dir(env) / ".config"
    return base / "stockade" / "config.toml"


def find_project_root(start: Path, *, home: Path) -> tuple[Path, Path | None]:
    """Walk up from ``start`` to the nearest directory with a stockade config.

    Returns (project root, config file or None). The walk stops below ``home`` and at the
    filesystem root; when nothing is found, ``start`` is the project root.
    """
    start = start.resolve()
    homes = {home, home.resolve()}
    for directory in (start, *start.parents):
        if directory != start and directory in homes:
            break
        try:
            found = _project_file_in(directory)
        except PermissionError:
            break  # a directory we may not look into ends the walk, like $HOME does
        if found is not None:
            return directory, found
    return start, None


def _project_file_in(directory: Path) -> Path | None:
    stockade_toml = directory / PROJECT_FILE
    pyproject = directory / PYPROJECT_FILE
    has_pyproject_section = pyproject.is_file() and _pyproject_has_section(pyproject)
    if stockade_toml.is_file():
        if has_pyproject_section:
            logger.warning(
                "ignoring [tool.stockade] in %s because %s exists next to it",
                pyproject,
                stockade_toml,
            )
        return stockade_toml
    return pyproject if has_pyproject_section else None


def _pyproject_has_section(pyproject: Path) -> bool:
    try:
        text = pyproject.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError):
        return False  # not ours to judge; a broken pyproject without our section is fine
    if "stockade" not in text:
        return False  # cheap path: most pyproject files have no stockade section
    tool = _parse_toml(text, pyproject).get("tool", {})
    section = tool.get("stockade") if isinstance(tool, dict) else None
    if section is None:
        return False
    if not isinstance(section, dict):
        raise ConfigError(f"'tool.stockade' in {pyproject} must be a table: write [tool.stockade]")
    return True


# ---------------------------------------------------------------------------------------------
# Layers


def _read_toml(path: Path) -> dict[str, Any]:
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"cannot read config file {path}: {exc}") from exc
    return _parse_toml(text, path)


def _parse_toml(text: str, path: Path) -> dict[str, Any]:
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        match = re.search(r"line (\d+)", str(exc))
        line = f":{match.group(1)}" if match else ""
        raise ConfigError(
            f"{path}{line}: invalid TOML: {exc}; fix the syntax (https://toml.io)"
        ) from exc


def _file_layer(
    data: Mapping[str, Any], *, file: Path, section: str, base_dir: Path, home: Path
) -> tuple[_Layer, dict[str, _Layer]]:
    """Flatten one config file into (settings, {profile name: settings})."""
    profiles: dict[str, _Layer] = {}
    raw_profiles = data.get("profiles")
    if raw_profiles is not None:
        where = _table_where(file, section, "")
        if not isinstance(raw_profiles, dict):
            raise ConfigError(
                f"'profiles' in {where} must be a table of tables: write [profiles.NAME]"
            )
        for name, table in raw_profiles.items():
            if not isinstance(table, dict):
                raise ConfigError(
                    f"profile {name!r} in {_table_where(file, section, 'profiles')} must be a "
                    f"table: write [profiles.{name}]"
                )
            profiles[name] = _file_settings(
                table,
                file=file,
                section=_join(section, f"profiles.{name}"),
                in_profile=True,
                base_dir=base_dir,
                home=home,
            )
    settings = _file_settings(
        {k: v for k, v in data.items() if k != "profiles"},
        file=file,
        section=section,
        in_profile=False,
        base_dir=base_dir,
        home=home,
    )
    return settings, profiles


def _file_settings(
    data: Mapping[str, Any],
    *,
    file: Path,
    section: str,
    in_profile: bool,
    base_dir: Path,
    home: Path,
) -> _Layer:
    out: _Layer = {}
    top_keys = [k for k in CONFIG_KEYS if "." not in k] + list(_TABLES)
    if in_profile:
        top_keys.remove("profile")
    else:
        top_keys.append("profiles")
    where = _table_where(file, section, "")
    for name, value in data.items():
        if name in _TABLES:
            if not isinstance(value, dict):
                raise ConfigError(f"'{name}' in {where} must be a table: write [{name}]")
            out.update(
                _table_settings(
                    name, value, file=file, section=section, base_dir=base_dir, home=home
                )
            )
        elif name in top_keys:
            out[name] = _validated(name, _Setting(value, where, base_dir, file), home)
        elif in_profile and name in ("profile", "profiles"):
            raise ConfigError(
                f"'{name}' is not allowed in {where}: a profile cannot select or define "
                "profiles; move it to the top level of the file"
            )
        else:
            raise ConfigError(_unknown_key(name, where, top_keys))
    return out


def _table_settings(
    table: str, data: Mapping[str, Any], *, file: Path, section: str, base_dir: Path, home: Path
) -> _Layer:
    out: _Layer = {}
    where = _table_where(file, section, table)
    fields = [k.split(".", 1)[1] for k in CONFIG_KEYS if k.startswith(f"{table}.")]
    for name, value in data.items():
        key = f"{table}.{name}"
        if key == _ENV_SET:
            if not isinstance(value, dict):
                raise ConfigError(
                    f"'set' in {where} must be a table of NAME = \"value\": write [env.set]"
                )
            set_where = _table_where(file, section, _ENV_SET)
            for var, var_value in value.items():
                out[f"{_ENV_SET}.{var}"] = _validated(
                    f"{_ENV_SET}.{var}", _Setting(var_value, set_where, base_dir, file), home
                )
        elif name in fields:
            out[key] = _validated(key, _Setting(value, where, base_dir, file), home)
        else:
            raise ConfigError(_unknown_key(name, where, fields))
    return out


def _environment_layer(environ: Mapping[str, str], *, base_dir: Path, home: Path) -> _Layer:
    out: _Layer = {}
    for name in sorted(environ):
        if not name.startswith("STOCKADE_") or name in RUNTIME_ENV_VARS:
            continue
        if name.startswith(RUNTIME_ENV_PREFIXES):
            continue
        raw = environ[name]
        where = f"environment variable {name}"
        key = ENV_VAR_KEYS.get(name)
        if key is None:
            close = difflib.get_close_matches(name, list(ENV_VAR_KEYS), n=1)
            hint = f"did you mean {close[0]}?" if close else "unset it"
            raise ConfigError(
                f"unknown configuration variable {name} in the environment; {hint} "
                f"(known: {', '.join(ENV_VAR_KEYS)})"
            )
        kind = CONFIG_KEYS[key].kind
        if kind == "map":
            for var, var_value in _parse_assignments(raw, where).items():
                out[f"{_ENV_SET}.{var}"] = _validated(
                    f"{_ENV_SET}.{var}", _Setting(var_value, where, base_dir), home
                )
        elif kind == "list":
            out[key] = _validated(key, _Setting(_split_list(raw), where, base_dir), home)
        elif raw.strip():  # an empty variable means "not set", as the shell idiom VAR= cmd
            out[key] = _validated(key, _Setting(raw.strip(), where, base_dir), home)
    return out


def _mapping_layer(
    mapping: Mapping[str, Any], describe: Callable[[str], str], *, base_dir: Path, home: Path
) -> _Layer:
    out: _Layer = {}
    for key, value in _flatten_mapping(mapping).items():
        if value is None:
            continue  # click passes None for options left out
        where = describe(key)
        if key.startswith(f"{_ENV_SET}."):
            out[key] = _validated(key, _Setting(value, where, base_dir), home)
        elif key in CONFIG_KEYS:
            if CONFIG_KEYS[key].kind == "list" and isinstance(value, str):
                out[key] = _validated(key, _Setting(_split_list(value), where, base_dir), home)
            else:
                out[key] = _validated(key, _Setting(value, where, base_dir), home)
        elif key == "profiles" or key.startswith("profiles."):
            raise ConfigError(f"{where}: profiles can only be defined in a config file")
        else:
            raise ConfigError(_unknown_key(key, where, list(CONFIG_KEYS)))
    return out


def _flatten_mapping(mapping: Mapping[str, Any]) -> dict[str, Any]:
    """Accept both ``{"limits.memory": v}`` and ``{"limits": {"memory": v}}``."""
    flat: dict[str, Any] = {}
    for key, value in mapping.items():
        if (key in _TABLES or key == _ENV_SET) and isinstance(value, Mapping):
            for sub_key, sub_value in _flatten_mapping(value).items():
                flat[f"{key}.{sub_key}"] = sub_value
        else:
            flat[key] = value
    return flat


def _split_list(raw: str) -> list[str]:
    return [item.strip() for item in raw.split(",") if item.strip()]


def _parse_assignments(raw: str, where: str) -> dict[str, str]:
    items: dict[str, str] = {}
    for item in _split_list(raw):
        name, sep, value = item.partition("=")
        if not sep:
            raise ConfigError(
                f"{where}: expected comma-separated NAME=value pairs, got an item without '='; "
                "values containing commas can only be set in a config file"
            )
        items[name.strip()] = value
    return items


# ---------------------------------------------------------------------------------------------
# Validation of one value where it was written


def _validated(key: str, setting: _Setting, home: Path) -> _Setting:
    """Validate one value against its field, so that the error can say where it was written."""
    table, _, rest = key.partition(".")
    if key.startswith(f"{_ENV_SET}."):
        model: type[BaseModel] = EnvConfig
        data: dict[str, Any] = {"set": {rest.split(".", 1)[1]: setting.value}}
    elif rest:
        model, data = _TABLES[table], {rest: setting.value}
    else:
        model, data = StockadeConfig, {key: setting.value}
    try:
        validated = model.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(_invalid_value(key, setting, exc)) from exc
    if key.startswith(f"{_ENV_SET}."):
        value: Any = validated.model_dump(by_alias=True)["set"][rest.split(".", 1)[1]]
    else:
        value = getattr(validated, _attr(model, rest or key))
    if key == "workspace.path":
        value = _resolve_path(value, setting.base_dir, home)
    return _Setting(value, setting.where, setting.base_dir, setting.source)


def _attr(model: type[BaseModel], name: str) -> str:
    for attr, field in model.model_fields.items():
        if name in (attr, field.alias):
            return attr
    raise KeyError(name)  # pragma: no cover - callers pass known keys


def _resolve_path(path: Path, base_dir: Path, home: Path) -> Path:
    if path.parts and path.parts[0] == "~":
        path = home.joinpath(*path.parts[1:])
    return (base_dir / path).resolve()


def _invalid_value(key: str, setting: _Setting, exc: ValidationError) -> str:
    problems = "; ".join(str(error["msg"]).removeprefix("Value error, ") for error in exc.errors())
    # Values of env.* may be secrets someone pasted by mistake: never echo them.
    shown = "" if key.startswith("env.") else f" {setting.value!r}"
    spec = CONFIG_KEYS.get(key)
    expected = f"; expected: {spec.description}" if spec else ""
    return f"invalid value{shown} for '{key}' in {setting.where}: {problems}{expected}"


def _unknown_key(name: str, where: str, choices: list[str]) -> str:
    close = difflib.get_close_matches(name, choices, n=1)
    hint = f"did you mean '{close[0]}'?" if close else f"valid keys here: {', '.join(choices)}"
    return f"unknown key '{name}' in {where}; {hint}"


def _table_where(file: Path, section: str, table: str) -> str:
    return f"{file} [{_join(section, table) or _TOP_LEVEL}]"


def _join(*parts: str) -> str:
    return ".".join(p for p in parts if p)


# ---------------------------------------------------------------------------------------------
# Merge


def _merge_profiles(*layers: dict[str, _Layer]) -> dict[str, _Layer]:
    merged: dict[str, _Layer] = {}
    for layer in layers:
        for name, settings in layer.items():
            merged.setdefault(name, {}).update(settings)
    return merged


def _chosen_profile(layers: list[_Layer]) -> _Setting | None:
    chosen = None
    for layer in layers:
        if "profile" in layer:
            chosen = layer["profile"]
    if chosen is None or chosen.value is None:
        return None
    return chosen


def _nest(settings: _Layer) -> dict[str, Any]:
    nested: dict[str, Any] = {}
    for key, setting in settings.items():
        if key.startswith(f"{_ENV_SET}."):
            name = key.split(".", 2)[2]
            nested.setdefault("env", {}).setdefault("set", {})[name] = setting.value
        elif "." in key:
            table, field = key.split(".", 1)
            nested.setdefault(table, {})[field] = setting.value
        else:
            nested[key] = setting.value
    return nested


def _take_secrets(
    data: Mapping[str, Any], file: Path, section: str, into: dict[str, Any]
) -> dict[str, Any]:
    """Validate a file's [secrets.NAME] tables into ``into`` (later files win per name).

    Secrets are declarations (where the value lives on the host, which hosts may get it);
    their values are read only when a sandbox starts, never here.
    """
    from stockade.policy.secret_config import SECRET_NAME_RE, SecretConfig

    rest = {k: v for k, v in data.items() if k != "secrets"}
    raw = data.get("secrets")
    if raw is None:
        return rest
    where = _table_where(file, section, "")
    if not isinstance(raw, dict):
        raise ConfigError(f"'secrets' in {where} must be a table of tables: write [secrets.NAME]")
    for name, table in raw.items():
        if not SECRET_NAME_RE.match(name):
            raise ConfigError(
                f"secret name {name!r} in {where} is invalid: use upper-case letters, digits "
                "and '_', starting with a letter (e.g. [secrets.GITHUB_TOKEN])"
            )
        try:
            into[name] = SecretConfig.model_validate(table)
        except ValidationError as exc:
            problems = "; ".join(
                f"{'.'.join(str(p) for p in e['loc']) or 'table'}: {e['msg']}" for e in exc.errors()
            )
            raise ConfigError(
                f"[secrets.{name}] in {where} is invalid: {problems}; give exactly one of "
                "env / file / keyring, and hosts = [...]"
            ) from None
    return rest


def _build(
    merged: _Layer,
    profiles: dict[str, _Layer],
    project_root: Path,
    secrets: dict[str, Any] | None = None,
) -> StockadeConfig:
    data = _nest(merged)
    data.setdefault("workspace", {}).setdefault("path", project_root)
    data["profiles"] = {name: _nest(settings) for name, settings in profiles.items()}
    data["secrets"] = dict(secrets or {})
    try:
        return StockadeConfig.model_validate(data)
    except ValidationError as exc:  # pragma: no cover - every value was validated already
        raise ConfigError(f"invalid configuration: {exc}") from exc
