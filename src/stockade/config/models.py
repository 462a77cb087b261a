"""The schema of ``stockade.toml``: pydantic models, and the table of dotted keys derived from it.

Every field carries a description; it is the help text of the key and the hint shown when a
value is invalid. ``CONFIG_KEYS`` maps each settable dotted key (``limits.memory``) to its
environment variable (``STOCKADE_LIMITS_MEMORY``) so that no name is guessed anywhere else.
"""

from __future__ import annotations

import re
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, field_validator

from stockade.config.units import parse_duration, parse_size
from stockade.policy.presets import PRESETS, preset_problem
from stockade.policy.rules import RuleError, parse_rule
from stockade.policy.secret_config import SecretConfig

__all__ = [
    "BACKENDS",
    "CONFIG_KEYS",
    "CONTAINER_ENGINES",
    "DANGEROUS_MOUNTS",
    "ENV_VAR_KEYS",
    "WORKSPACE_MODES",
    "Backend",
    "ConfigKey",
    "ContainerConfig",
    "DangerousMount",
    "EnvConfig",
    "GvisorConfig",
    "LimitsConfig",
    "MicrovmConfig",
    "NetworkConfig",
    "ProfileConfig",
    "StockadeConfig",
    "WorkspaceConfig",
    "WorkspaceMode",
]

Backend = Literal["auto", "microvm", "gvisor", "container", "namespace", "host"]
WorkspaceMode = Literal["cow", "ro", "rw", "none"]
BACKENDS: tuple[str, ...] = typing.get_args(Backend)
WORKSPACE_MODES: tuple[str, ...] = typing.get_args(WorkspaceMode)
#: What a host directory shared with the sandbox may expose, each refused unless named in
#: ``allow_dangerous_mounts`` (see ``stockade.policy.mounts``).
DangerousMount = Literal["credentials", "executables", "sockets"]
DANGEROUS_MOUNTS: tuple[str, ...] = typing.get_args(DangerousMount)
ContainerEngine = Literal["auto", "runc", "crun", "docker", "podman"]
CONTAINER_ENGINES: tuple[str, ...] = typing.get_args(ContainerEngine)

_ENV_NAME_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_HOSTNAME_LABEL_RE = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?")


def _none_word(value: Any) -> Any:
    # TOML has no null: the word "none" lets a higher layer lift a limit a lower layer set.
    if isinstance(value, str) and value.strip().lower() == "none":
        return None
    return value


def _size(value: Any) -> Any:
    return (
        parse_size(value) if isinstance(value, str | int) and not isinstance(value, bool) else value
    )


def _duration(value: Any) -> Any:
    if isinstance(value, str | int | float) and not isinstance(value, bool):
        return parse_duration(value)
    return value


Size = Annotated[int, BeforeValidator(_size)]
OptionalSize = Annotated[int | None, BeforeValidator(_size), BeforeValidator(_none_word)]
OptionalDuration = Annotated[
    float | None, Field(gt=0), BeforeValidator(_duration), BeforeValidator(_none_word)
]
OptionalCpus = Annotated[float | None, BeforeValidator(_none_word)]


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)


class WorkspaceConfig(_Model):
    """``[workspace]``: which host directory the sandbox sees, and how."""

    mode: WorkspaceMode = Field(
        default="cow",
        description=(
            "How the sandbox sees the project: 'cow' (copy-on-write, reviewed with diff/apply), "
            "'ro' (read-only), 'rw' (live read-write bind) or 'none' (no workspace)."
        ),
    )
    path: Path = Field(
        default=Path("."),
        description=(
            "Host directory shared with the sandbox, relative to the directory of the config "
            "file that sets it (flags and the environment: relative to the start directory)."
        ),
    )
    mount: str = Field(
        default="/workspace",
        description="Absolute path inside the sandbox where the workspace appears: '/workspace'.",
    )


class LimitsConfig(_Model):
    """``[limits]``: resources and wall-clock time the sandbox may use."""

    memory: Size = Field(
        default=2 * 2**30,
        description="Memory limit: a size such as '512MiB', '2GiB', '1.5G' or bytes; >= 32MiB.",
    )
    pids: int = Field(
        default=1024,
        description="Most processes and threads alive at once inside the sandbox; at least 16.",
    )
    cpus: OptionalCpus = Field(
        default=None,
        description="CPU limit in cores, e.g. 2 or 0.5; unset or 'none' for no limit.",
    )
    disk: OptionalSize = Field(
        default=None,
        description=(
            "Size limit of everything the sandbox writes (workspace layer, /tmp, home), "
            "e.g. '10GiB', at least 8MiB; unset or 'none' for no limit."
        ),
    )
    command_timeout: OptionalDuration = Field(
        default=None,
        description=(
            "Default timeout of one command: '30s', '10m', '1h30m' or seconds; "
            "unset or 'none' for no limit."
        ),
    )
    timeout: OptionalDuration = Field(
        default=None,
        description=(
            "Wall-clock lifetime of the whole sandbox: '30s', '10m', '1h30m' or seconds; "
            "unset or 'none' for no limit."
        ),
    )


class EnvConfig(_Model):
    """``[env]``: the environment variables commands in the sandbox start with."""

    pass_: tuple[str, ...] = Field(
        default=("TERM", "LANG", "LC_ALL", "TZ", "COLORTERM"),
        alias="pass",
        description=(
            "Names of host environment variables copied into the sandbox when set on the host; "
            "credentials are refused (they will come through the [secrets] table)."
        ),
    )
    set_: dict[str, str] = Field(
        default_factory=dict,
        alias="set",
        description='Variables set in the sandbox, NAME = "value"; they win over passed ones.',
    )

    @field_validator("pass_")
    @classmethod
    def _check_pass_names(cls, names: tuple[str, ...]) -> tuple[str, ...]:
        for name in names:
            _check_env_name(name)
        return names

    @field_validator("set_")
    @classmethod
    def _check_set_items(cls, items: dict[str, str]) -> dict[str, str]:
        for name, value in items.items():
            _check_env_name(name)
            if "\0" in value:
                raise ValueError(f"the value of {name} contains a NUL byte")
        return items


def _check_env_name(name: str) -> None:
    if not _ENV_NAME_RE.fullmatch(name):
        raise ValueError(
            f"{name!r} is not an environment variable name (letters, digits and '_', "
            "not starting with a digit)"
        )


class NetworkConfig(_Model):
    """``[network]``: which destinations the sandbox may reach; closed by default.

    Every entry is a rule of ``stockade.policy.rules``: ``pypi.org``, ``*.example.com``,
    ``10.0.0.0/8``, ``[::1]:8080``, optionally with ``:PORT``.
    """

    allow: tuple[str, ...] = Field(
        default=(),
        description=(
            "Destinations the sandbox may connect to: names ('pypi.org'), wildcards "
            "('*.github.com'), addresses or networks ('10.1.2.3', '10.0.0.0/8'), each with an "
            "optional ':PORT'."
        ),
    )
    deny: tuple[str, ...] = Field(
        default=(),
        description=(
            "Destinations always refused, even when an allow entry matches them; same forms "
            "as allow."
        ),
    )
    tcp: tuple[str, ...] = Field(
        default=(),
        description=(
            "Raw TCP destinations forwarded into the sandbox, each HOST:PORT with the port "
            "required, e.g. 'github.com:22' or 'db.internal:5432'."
        ),
    )
    presets: tuple[str, ...] = Field(
        default=(),
        description=(
            "Named sets of allow rules: " + ", ".join(f"'{name}'" for name in PRESETS) + "."
        ),
    )

    @field_validator("allow", "deny")
    @classmethod
    def _check_entries(cls, entries: tuple[str, ...]) -> tuple[str, ...]:
        for entry in entries:
            _check_rule(entry, port_required=False)
        return entries

    @field_validator("tcp")
    @classmethod
    def _check_tcp_entries(cls, entries: tuple[str, ...]) -> tuple[str, ...]:
        for entry in entries:
            _check_rule(entry, port_required=True)
        return entries

    @field_validator("presets")
    @classmethod
    def _check_presets(cls, names: tuple[str, ...]) -> tuple[str, ...]:
        for name in names:
            problem = preset_problem(name)
            if problem:
                raise ValueError(problem)
        return names


def _check_rule(entry: str, *, port_required: bool) -> None:
    try:
        parse_rule(entry, port_required=port_required)
    except RuleError as exc:
        # Too broad is a dangerous value, not a malformed one: check_safety refuses it with a
        # PolicyError naming where it was set (and a hand-built config gets the same).
        if not exc.too_broad:
            raise


_IMAGE_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._/:@+-]{0,254}")


def _check_image(value: str) -> str:
    if value.startswith("/") or value in ("host",) or _IMAGE_RE.fullmatch(value):
        return value
    raise ValueError(
        f"{value!r} is not 'host', an image profile such as 'base', an absolute rootfs "
        "directory or an image reference such as 'debian:bookworm'"
    )


class ContainerConfig(_Model):
    """``[container]``: which engine runs a ``backend = "container"`` sandbox, and from what."""

    engine: ContainerEngine = Field(
        default="auto",
        description=(
            "Container engine: 'runc' or 'crun' (daemonless, stockade's own OCI bundle), "
            "'docker' or 'podman' (through their API), or 'auto' (the first that works, in "
            "that order)."
        ),
    )
    runtime: str | None = Field(
        default=None,
        description=(
            "OCI runtime a docker/podman engine runs the container with, e.g. 'runsc' or "
            "'sysbox-runc'; unset for the engine's default."
        ),
    )
    image: str = Field(
        default="host",
        description=(
            "Root filesystem: 'host' (the host's /usr read-only, no build), an image profile "
            "of `stockade image build` such as 'base', an absolute rootfs directory, or for "
            "docker/podman any local image such as 'debian:bookworm'."
        ),
    )

    @field_validator("image")
    @classmethod
    def _check_image(cls, value: str) -> str:
        return _check_image(value)

    @field_validator("runtime")
    @classmethod
    def _check_runtime(cls, value: str | None) -> str | None:
        if value is not None and not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]{0,62}", value):
            raise ValueError(f"{value!r} is not a runtime name such as 'runsc'")
        return value


class MicrovmConfig(_Model):
    """``[microvm]``: how a ``backend = "microvm"`` sandbox runs."""

    user: Literal["user", "root"] = Field(
        default="user",
        description=(
            "Who commands run as inside the VM: 'user' (uid 1000, no privileges, as on every "
            "backend) or 'root' (load modules, mount, write /dev: all inside the guest "
            "kernel, none of it reaches the host)."
        ),
    )
    image: str = Field(
        default="base",
        description="Image profile of `stockade image build` the VM boots, e.g. 'base'.",
    )


class GvisorConfig(_Model):
    """``[gvisor]``: how a ``backend = "gvisor"`` sandbox runs."""

    platform: Literal["auto", "systrap", "ptrace"] = Field(
        default="auto",
        description=(
            "gVisor platform: 'systrap' (fast, needs runsc >= 2023), 'ptrace', or 'auto' "
            "(systrap when this runsc has it). 'kvm' is never used."
        ),
    )
    image: str = Field(
        default="host",
        description=(
            "Root filesystem: 'host' (the host's /usr read-only, no build), an image profile "
            "of `stockade image build` such as 'base', or an absolute rootfs directory."
        ),
    )

    @field_validator("image")
    @classmethod
    def _check_image(cls, value: str) -> str:
        if value != "host" and not value.startswith("/") and not value.isidentifier():
            raise ValueError(f"{value!r} is not 'host', an image profile or an absolute path")
        return value


def _check_hostname(name: str) -> str:
    if len(name) > 253 or not all(_HOSTNAME_LABEL_RE.fullmatch(p) for p in name.split(".")):
        raise ValueError(
            f"{name!r} is not a valid hostname (labels of letters, digits and '-', "
            "separated by dots)"
        )
    return name


class ProfileConfig(_Model):
    """``[profiles.NAME]``: keys applied over the files' values when the profile is selected.

    A field left out is not changed by the profile; ``model_fields_set`` of each table tells
    which keys the profile sets.
    """

    backend: Backend | None = Field(default=None, description="Isolation backend of the profile.")
    unsafe_host: bool | None = Field(
        default=None, description="Allow backend 'host' (no isolation) in this profile."
    )
    hostname: str | None = Field(default=None, description="Hostname inside the sandbox.")
    workspace: WorkspaceConfig | None = Field(
        default=None, description="[workspace] keys the profile sets."
    )
    limits: LimitsConfig | None = Field(default=None, description="[limits] keys the profile sets.")
    env: EnvConfig | None = Field(default=None, description="[env] keys the profile sets.")
    network: NetworkConfig | None = Field(
        default=None, description="[network] keys the profile sets."
    )
    docker: bool | None = Field(
        default=None, description="Whether the profile needs Docker inside the sandbox."
    )
    container: ContainerConfig | None = Field(
        default=None, description="[container] keys the profile sets."
    )
    gvisor: GvisorConfig | None = Field(default=None, description="[gvisor] keys the profile sets.")
    microvm: MicrovmConfig | None = Field(
        default=None, description="[microvm] keys the profile sets."
    )
    allow_dangerous_mounts: tuple[DangerousMount, ...] | None = Field(
        default=None, description="Dangers of a shared host directory the profile accepts."
    )

    @field_validator("hostname")
    @classmethod
    def _check_hostname(cls, name: str | None) -> str | None:
        return None if name is None else _check_hostname(name)


class StockadeConfig(_Model):
    """The whole configuration, after merging every layer and applying the profile."""

    backend: Backend = Field(
        default="auto",
        description=(
            "Isolation backend: 'auto' (strongest that runs fast here), 'microvm', 'gvisor', "
            "'container', 'namespace', or 'host' (no isolation; needs unsafe_host = true)."
        ),
    )
    unsafe_host: bool = Field(
        default=False,
        description="Must be true to use backend 'host', which runs commands without isolation.",
    )
    profile: str | None = Field(
        default=None, description="Name of the [profiles.NAME] table to apply, if any."
    )
    hostname: str = Field(
        default="sandbox", description="Hostname inside the sandbox, e.g. 'sandbox'."
    )
    workspace: WorkspaceConfig = Field(
        default_factory=WorkspaceConfig, description="The [workspace] table."
    )
    limits: LimitsConfig = Field(default_factory=LimitsConfig, description="The [limits] table.")
    env: EnvConfig = Field(default_factory=EnvConfig, description="The [env] table.")
    network: NetworkConfig = Field(
        default_factory=NetworkConfig, description="The [network] table."
    )
    docker: bool = Field(
        default=False,
        description=(
            "Give the sandbox its own private Docker daemon (docker build / docker run inside, "
            "never the host's socket); needs backend 'microvm' (or 'container' with "
            "runtime 'sysbox-runc')."
        ),
    )
    container: ContainerConfig = Field(
        default_factory=ContainerConfig, description="The [container] table."
    )
    gvisor: GvisorConfig = Field(default_factory=GvisorConfig, description="The [gvisor] table.")
    microvm: MicrovmConfig = Field(
        default_factory=MicrovmConfig, description="The [microvm] table."
    )
    allow_dangerous_mounts: tuple[DangerousMount, ...] = Field(
        default=(),
        description=(
            "Dangers of a shared host directory you accept on purpose: 'credentials' (it "
            "holds keys or tokens, e.g. ~/.ssh, ~/.config), 'executables' (writable, it holds "
            "programs the host runs, e.g. a directory on PATH), 'sockets' (it holds unix "
            "sockets of host services, e.g. /run/user, the Docker socket). Empty: all refused."
        ),
    )
    profiles: dict[str, ProfileConfig] = Field(
        default_factory=dict,
        description="Named profiles, [profiles.NAME], each a partial configuration.",
    )
    secrets: dict[str, SecretConfig] = Field(
        default_factory=dict,
        description=(
            "Credentials, [secrets.NAME]: where the value lives on the host and which hosts "
            "may receive it. The sandbox only ever sees a placeholder."
        ),
    )

    @field_validator("hostname")
    @classmethod
    def _check_hostname(cls, name: str) -> str:
        return _check_hostname(name)


@dataclass(frozen=True)
class ConfigKey:
    """One settable dotted key of the configuration."""

    key: str  #: dotted key as written in files, flags and arguments: ``limits.memory``
    env_var: str  #: the environment variable that sets it: ``STOCKADE_LIMITS_MEMORY``
    kind: Literal["scalar", "list", "map"]  #: lists are comma-separated in the environment
    description: str


def _kind(annotation: Any) -> Literal["scalar", "list", "map"]:
    origin = typing.get_origin(annotation)
    if origin in (tuple, list):
        return "list"
    if origin is dict:
        return "map"
    return "scalar"


def _config_keys() -> dict[str, ConfigKey]:
    keys: dict[str, ConfigKey] = {}
    for name, field in StockadeConfig.model_fields.items():
        if name == "profiles":
            continue
        annotation = field.annotation
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            for sub_name, sub_field in annotation.model_fields.items():
                dotted = f"{name}.{sub_field.alias or sub_name}"
                keys[dotted] = ConfigKey(
                    dotted,
                    "STOCKADE_" + dotted.upper().replace(".", "_"),
                    _kind(sub_field.annotation),
                    sub_field.description or "",
                )
        else:
            keys[name] = ConfigKey(
                name, "STOCKADE_" + name.upper(), _kind(annotation), field.description or ""
            )
    env_vars = [k.env_var for k in keys.values()]
    if len(set(env_vars)) != len(env_vars):  # pragma: no cover - guards future fields
        raise RuntimeError("two config keys map to the same environment variable")
    return keys


#: Every settable dotted key (``profiles`` excluded), in schema order.
CONFIG_KEYS: dict[str, ConfigKey] = _config_keys()
#: Environment variable name -> dotted key.
ENV_VAR_KEYS: dict[str, str] = {k.env_var: k.key for k in CONFIG_KEYS.values()}
