"""Compile a loaded configuration into the EffectivePolicy a sandbox is started with.

The policy holds only resolved values (absolute paths, bytes, seconds, the final environment),
is frozen, hashes canonically, and re-validates its invariants whenever it is read back from
JSON, so that a policy handed over by another process is never trusted blindly.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import posixpath
import pwd
from collections.abc import Mapping
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from stockade._errors import ConfigError, PolicyError
from stockade.config import LoadedConfig, check_safety, credential_reason
from stockade.config.models import ContainerConfig, DangerousMount, GvisorConfig, MicrovmConfig
from stockade.config.safety import MIN_MEMORY, MIN_PIDS, mount_problem
from stockade.policy.decide import NetworkRules, compile_rules
from stockade.policy.mounts import MountDanger, force_hint, mount_dangers
from stockade.policy.presets import preset_problem, resolve_presets
from stockade.policy.secret_config import SecretConfig

__all__ = [
    "BASE_ENV",
    "PROTECTED_PATHS",
    "EffectivePolicy",
    "LimitsPolicy",
    "NetworkPolicy",
    "WorkspacePolicy",
    "compile_policy",
    "is_protected",
]

logger = logging.getLogger(__name__)

#: Workspace-relative paths the sandbox may never write, whatever the workspace mode: each
#: makes a host tool run code later (git hooks and config, shell start-up files, direnv and
#: mise files that run on ``cd``). Left out on purpose: ``.gitmodules`` (git no longer
#: honours commands from it) and ``.gitattributes`` (it can only select drivers defined in
#: git config, which is protected).
PROTECTED_PATHS: tuple[str, ...] = (
    ".git/hooks",
    ".git/config",
    ".git/config.worktree",
    ".git/commondir",
    ".git/modules",
    ".git/worktrees",
    ".bashrc",
    ".bash_profile",
    ".bash_login",
    ".bash_logout",
    ".profile",
    ".zshrc",
    ".zshenv",
    ".zprofile",
    ".zlogin",
    ".zlogout",
    ".envrc",
    ".mise.toml",
    "mise.toml",
)

#: The environment every sandbox command starts from, before pass-through and ``env.set``.
BASE_ENV: Mapping[str, str] = {
    "PATH": "/usr/local/bin:/usr/bin:/bin",
    "HOME": "/tmp/home",
    "USER": "user",
    "LANG": "C.UTF-8",
}


def is_protected(relpath: str, *, case_sensitive: bool = True) -> bool:
    """True if workspace-relative ``relpath`` is a protected path or lies under one.

    The path is normalised first (``a/../.git/hooks`` is ``.git/hooks``). Pass
    ``case_sensitive=False`` for a case-insensitive host filesystem (macOS by default),
    where ``.GIT/Hooks`` is the same directory as ``.git/hooks``.
    """
    normal = posixpath.normpath("/" + relpath).lstrip("/")
    if not case_sensitive:
        normal = normal.lower()
    for protected in PROTECTED_PATHS:
        candidate = protected if case_sensitive else protected.lower()
        if normal == candidate or normal.startswith(candidate + "/"):
            return True
    return False


_LABEL = r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
_HOSTNAME_PATTERN = rf"^{_LABEL}(?:\.{_LABEL})*$"


class _Policy(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class WorkspacePolicy(_Policy):
    """Which host directory the sandbox sees, where, and what it may never write."""

    mode: Literal["cow", "ro", "rw", "none"] = Field(
        description="'cow' (copy-on-write), 'ro', 'rw' (live) or 'none'."
    )
    host_path: Path | None = Field(
        description="Absolute, symlink-resolved host directory; None when mode is 'none'."
    )
    guest_path: str = Field(description="Absolute path of the workspace inside the sandbox.")
    protected: tuple[str, ...] = Field(
        description="Workspace-relative paths the sandbox may never write (and all below them)."
    )

    @model_validator(mode="after")
    def _check(self) -> WorkspacePolicy:
        if (self.mode == "none") != (self.host_path is None):
            raise ValueError("host_path must be None exactly when mode is 'none'")
        if self.host_path is not None and not self.host_path.is_absolute():
            raise ValueError(f"host_path {self.host_path} must be absolute")
        problem = mount_problem(self.guest_path)
        if problem:
            raise ValueError(f"guest_path {self.guest_path!r}: {problem}")
        missing = set(PROTECTED_PATHS) - set(self.protected)
        if missing:
            raise ValueError(f"protected must include {sorted(missing)}")
        return self


class LimitsPolicy(_Policy):
    """Resource limits; None means no limit."""

    memory_bytes: int | None = Field(
        description="Memory limit in bytes.", ge=MIN_MEMORY, default=None
    )
    pids: int | None = Field(description="Most processes alive at once.", ge=MIN_PIDS, default=None)
    cpus: float | None = Field(description="CPU limit in cores.", gt=0, default=None)
    disk_bytes: int | None = Field(
        description="Size limit of the writable layer in bytes.", gt=0, default=None
    )
    command_timeout: float | None = Field(
        description="Default timeout of one command, in seconds.", gt=0, default=None
    )
    timeout: float | None = Field(
        description="Wall-clock lifetime of the sandbox, in seconds.", gt=0, default=None
    )


class NetworkPolicy(_Policy):
    """Egress rules, presets resolved; with no allow or tcp rule the network is closed."""

    allow: tuple[str, ...] = Field(
        default=(),
        description="Allow rules: [network] allow, then the rules the presets added.",
    )
    deny: tuple[str, ...] = Field(default=(), description="Deny rules; they win over allow.")
    tcp: tuple[str, ...] = Field(
        default=(),
        description="HOST:PORT rules forwarded as raw TCP: [network] tcp, then the presets'.",
    )
    presets: tuple[str, ...] = Field(
        default=(), description="Names of the presets whose rules were merged in."
    )
    sources: dict[str, str] = Field(
        default_factory=dict,
        description="Where each rule added by a preset came from, by rule: 'preset github'.",
    )

    @model_validator(mode="after")
    def _check(self) -> NetworkPolicy:
        try:
            compile_rules(self.allow, self.deny, self.tcp)
        except PolicyError as exc:
            raise ValueError(str(exc)) from None
        for name in self.presets:
            problem = preset_problem(name)
            if problem:
                raise ValueError(problem)
        stray = set(self.sources) - set(self.allow) - set(self.tcp)
        if stray:
            raise ValueError(f"sources names rules that are not in allow or tcp: {sorted(stray)}")
        return self

    def rules(self) -> NetworkRules:
        """The parsed rules the egress proxy decides with."""
        return compile_rules(self.allow, self.deny, self.tcp)


class EffectivePolicy(_Policy):
    """Everything a backend needs to start one sandbox, fully resolved."""

    backend: Literal["auto", "microvm", "gvisor", "container", "namespace", "host"] = Field(
        description="Requested backend; 'auto' is resolved by backend selection."
    )
    unsafe_host: bool = Field(description="The user accepted the unisolated 'host' backend.")
    hostname: str = Field(
        description="Hostname inside the sandbox.", pattern=_HOSTNAME_PATTERN, max_length=253
    )
    workspace: WorkspacePolicy = Field(description="The workspace view.")
    limits: LimitsPolicy = Field(description="Resource limits.")
    env: dict[str, str] = Field(description="Environment every command in the sandbox starts with.")
    network: NetworkPolicy = Field(description="Egress rules.")
    secrets: dict[str, SecretConfig] = Field(
        default_factory=dict,
        description="Secret declarations (source and allowed hosts, never values).",
    )
    docker: bool = Field(
        default=False, description="A private Docker daemon inside the sandbox is required."
    )
    container: ContainerConfig = Field(
        default_factory=ContainerConfig, description="Engine, runtime and image of 'container'."
    )
    microvm: MicrovmConfig = Field(
        default_factory=MicrovmConfig, description="User and image of 'microvm'."
    )
    gvisor: GvisorConfig = Field(
        default_factory=GvisorConfig, description="Platform and image of 'gvisor'."
    )
    allow_dangerous_mounts: tuple[DangerousMount, ...] = Field(
        default=(),
        description="Dangers of the shared host directories the user accepted by name.",
    )

    @model_validator(mode="after")
    def _check(self) -> EffectivePolicy:
        # Re-checked here because from_json accepts policies built elsewhere.
        if self.backend == "host" and not self.unsafe_host:
            raise ValueError("backend 'host' requires unsafe_host = true")
        for name in self.env:
            reason = credential_reason(name)
            if reason:
                raise ValueError(f"env {name} is refused: {reason}")
        return self

    @property
    def policy_hash(self) -> str:
        """SHA-256 (hex) of the canonical JSON of the policy: equal policies, equal hashes."""
        canonical = json.dumps(
            self.model_dump(mode="json"), sort_keys=True, separators=(",", ":"), ensure_ascii=True
        )
        return hashlib.sha256(canonical.encode("ascii")).hexdigest()

    def to_json(self) -> str:
        """Serialise the policy (the hash is derived, not stored)."""
        return self.model_dump_json()

    @classmethod
    def from_json(cls, data: str | bytes) -> EffectivePolicy:
        """Parse and re-validate a policy; raises PolicyError if it is malformed or unsafe."""
        try:
            return cls.model_validate_json(data)
        except ValidationError as exc:
            raise PolicyError(f"invalid policy JSON: {exc}") from exc


def compile_policy(
    loaded: LoadedConfig, *, environ: Mapping[str, str] | None = None
) -> EffectivePolicy:
    """Resolve ``loaded`` against this host: workspace path, limits, final environment.

    ``environ`` (default ``os.environ``, read now) supplies the ``env.pass`` values.
    Raises PolicyError for a dangerous configuration, ConfigError for a missing workspace.
    """
    env_source = os.environ if environ is None else environ
    config = loaded.config
    # LoadedConfig may have been built by hand: the checks of load_config run again.
    check_safety(
        config,
        environ=env_source,
        base_dir=loaded.project_root,
        origin=loaded.origin,
    )

    host_path: Path | None = None
    if config.workspace.mode != "none":
        host_path = _workspace_dir(loaded)
        _check_shared_dir(loaded, "workspace.path", host_path, config.workspace.mode, env_source)
    for key, image in (
        ("container.image", config.container.image),
        ("gvisor.image", config.gvisor.image),
    ):
        if image.startswith("/") and os.path.isdir(image):  # a host directory as the root
            _check_shared_dir(loaded, key, Path(image), "ro", env_source)

    cores = os.cpu_count() or 1
    limits = config.limits
    env = dict(BASE_ENV)
    for name in config.env.pass_:
        if name in env_source:
            env[name] = env_source[name]
    env.update(config.env.set_)

    try:
        return EffectivePolicy(
            backend=config.backend,
            unsafe_host=config.unsafe_host,
            hostname=config.hostname,
            workspace=WorkspacePolicy(
                mode=config.workspace.mode,
                host_path=host_path,
                guest_path=posixpath.normpath(config.workspace.mount),
                protected=PROTECTED_PATHS,
            ),
            limits=LimitsPolicy(
                memory_bytes=limits.memory,
                pids=limits.pids,
                # More cores than the host has would only be a fiction: cap at what exists.
                cpus=None if limits.cpus is None else min(limits.cpus, float(cores)),
                disk_bytes=limits.disk,
                command_timeout=limits.command_timeout,
                timeout=limits.timeout,
            ),
            env=env,
            network=_network_policy(loaded, env_source),
            secrets=dict(config.secrets),
            docker=config.docker,
            container=config.container,
            gvisor=config.gvisor,
            microvm=config.microvm,
            allow_dangerous_mounts=config.allow_dangerous_mounts,
        )
    except ValidationError as exc:
        raise PolicyError(f"the configuration compiles to an invalid policy: {exc}") from exc


def _network_policy(loaded: LoadedConfig, environ: Mapping[str, str]) -> NetworkPolicy:
    """The [network] rules with the presets' rules merged in (after the user's own)."""
    network = loaded.config.network
    if not network.presets:
        return NetworkPolicy(allow=network.allow, deny=network.deny, tcp=network.tcp)
    home = environ.get("HOME", "")
    found = resolve_presets(
        network.presets,
        environ=environ,
        home=Path(home) if home and Path(home).is_absolute() else Path.home(),
        project_dir=loaded.project_root,
    )
    allow = tuple(dict.fromkeys((*network.allow, *found.allow)))
    tcp = tuple(dict.fromkeys((*network.tcp, *found.tcp)))
    own = set(network.allow) | set(network.tcp)
    return NetworkPolicy(
        allow=allow,
        deny=network.deny,
        tcp=tcp,
        presets=network.presets,
        sources={rule: where for rule, where in found.sources.items() if rule not in own},
    )


_CONSEQUENCE = {
    "credentials": "read them",
    "executables": "plant programs the host runs later",
    "sockets": "drive the host services behind them (the Docker socket is root on the host)",
}


def _check_shared_dir(
    loaded: LoadedConfig,
    key: str,
    path: Path,
    mode: Literal["cow", "ro", "rw"],
    environ: Mapping[str, str],
) -> None:
    """Refuse sharing host directory ``path`` if it exposes a danger the user did not accept.

    Whoever set ``key`` (the user's own file, a flag, the SDK call) gets the same answer:
    only ``allow_dangerous_mounts`` naming the danger lets it through.
    """
    dangers = mount_dangers(path, mode=mode, environ=environ, homes=_homes(environ))
    accepted = set(loaded.config.allow_dangerous_mounts)
    refused = [d for d in dangers if d.kind not in accepted]
    for danger in dangers:
        if danger.kind in accepted:
            logger.warning(
                "%s = %r shares a dangerous directory, accepted by allow_dangerous_mounts: %s",
                key,
                str(path),
                danger.reason,
            )
    if refused:
        raise PolicyError(_dangerous_message(loaded, key, path, mode, refused))


def _dangerous_message(
    loaded: LoadedConfig, key: str, path: Path, mode: str, dangers: list[MountDanger]
) -> str:
    reasons = "; ".join(d.reason for d in dangers)
    consequences = ", ".join(_CONSEQUENCE[d.kind] for d in dangers)
    fix = (
        "point workspace.path at the project directory"
        if key == "workspace.path"
        else f"point {key} at an image built for it"
    )
    return (
        f"{key} = {str(path)!r} (from {loaded.origin(key)}) is refused: {reasons}. Shared "
        f"with the sandbox (mode {mode!r}), whatever runs inside could {consequences}; "
        f"{fix}, or if you really mean it, accept the danger by name: "
        f"{force_hint(d.kind for d in dangers)}"
    )


def _homes(environ: Mapping[str, str]) -> tuple[Path, ...]:
    homes = []
    home = environ.get("HOME", "")
    if home and os.path.isabs(home):
        homes.append(Path(home))
    with contextlib.suppress(KeyError):  # no passwd entry (some containers)
        homes.append(Path(pwd.getpwuid(os.getuid()).pw_dir))
    return tuple(dict.fromkeys(homes))


def _workspace_dir(loaded: LoadedConfig) -> Path:
    path = loaded.config.workspace.path
    if not path.is_absolute():
        path = loaded.project_root / path
    where = loaded.origin("workspace.path")
    fix = "create it, point workspace.path at an existing directory, or set workspace.mode = 'none'"
    try:
        resolved = path.resolve(strict=True)
    except (FileNotFoundError, RuntimeError) as exc:
        raise ConfigError(
            f"workspace.path {str(path)!r} (from {where}) does not exist; {fix}"
        ) from exc
    if not resolved.is_dir():
        raise ConfigError(f"workspace.path {str(path)!r} (from {where}) is not a directory; {fix}")
    return resolved
