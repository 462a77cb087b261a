"""Safety checks of a merged configuration: values refused as dangerous, with the key, where
it was set and the fix (DESIGN.md section 8). ``load_config`` runs them on every load;
``compile_policy`` runs them again on a configuration built by hand.
"""

from __future__ import annotations

import os
import posixpath
import pwd
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from stockade._errors import PolicyError
from stockade.config.models import StockadeConfig
from stockade.config.units import format_size
from stockade.policy.rules import RuleError, parse_rule

__all__ = [
    "MIN_MEMORY",
    "MIN_PIDS",
    "check_safety",
    "credential_reason",
    "home_dir",
    "mount_problem",
    "passwd_home",
]

MIN_MEMORY = 32 * 2**20
MIN_PIDS = 16
#: A cpus value above this many times the host's cores is a typo (a percentage, say).
_CPUS_FACTOR = 4


# ---------------------------------------------------------------------------------------------
# Dangerous values


_ROOT_DIRS = (
    "/",
    "/usr",
    "/etc",
    "/bin",
    "/sbin",
    "/boot",
    "/dev",
    "/proc",
    "/sys",
    "/var",
    "/lib",
    "/lib32",
    "/lib64",
    "/libx32",
    "/opt",
    "/root",
    "/run",
    "/srv",
    "/snap",
    "/tmp",
    "/var/tmp",
    "/var/lib",
    "/var/log",
    "/home",
    "/mnt",
    "/media",
    "/usr/bin",
    "/usr/lib",
    "/usr/local",
    "/usr/share",
    "/usr/sbin",
    # macOS
    "/System",
    "/Library",
    "/Applications",
    "/Users",
    "/Volumes",
    "/private",
    "/private/etc",
    "/private/var",
    "/private/tmp",
    "/cores",
    "/nix",
    "/nix/store",
)
#: Host trees nothing under which may be a workspace: kernel interfaces and configuration.
_FORBIDDEN_TREES = ("/proc", "/sys", "/dev", "/etc", "/boot", "/System", "/private/etc")
#: Directories inside the sandbox the workspace must not hide.
_MOUNT_FORBIDDEN = frozenset(
    {
        "/",
        "/usr",
        "/etc",
        "/proc",
        "/dev",
        "/sys",
        "/tmp",
        "/bin",
        "/sbin",
        "/lib",
        "/lib64",
        "/boot",
        "/var",
        "/run",
        "/usr/bin",
        "/usr/lib",
        "/usr/local",
        "/usr/local/bin",
        "/usr/sbin",
    }
)
_MOUNT_FORBIDDEN_TREES = ("/proc", "/sys", "/dev")

_CREDENTIAL_NAMES = frozenset(
    {
        "SSH_AUTH_SOCK",
        "SSH_AGENT_PID",
        "SSH_ASKPASS",
        "GIT_ASKPASS",
        "GOOGLE_APPLICATION_CREDENTIALS",
        "DOCKER_HOST",
        "DOCKER_CONFIG",
        "DOCKER_CERT_PATH",
        "KUBECONFIG",
        "GNUPGHOME",
        "GPG_AGENT_INFO",
        "NETRC",
        "GITHUB_TOKEN",
        "NPM_TOKEN",
    }
)
_CREDENTIAL_PREFIXES = ("AWS_", "AZURE_")
_CREDENTIAL_PARTS = (
    "TOKEN",
    "SECRET",
    "PASSWORD",
    "PASSWD",
    "API_KEY",
    "APIKEY",
    "CREDENTIAL",
    "PRIVATE_KEY",
)
_CREDENTIAL_SUFFIXES = ("_KEY",)
#: Make every process in the sandbox, the guest agent included, load host libraries.
_LOADER_NAMES = frozenset(
    {
        "LD_PRELOAD",
        "LD_LIBRARY_PATH",
        "LD_AUDIT",
        "DYLD_INSERT_LIBRARIES",
        "DYLD_LIBRARY_PATH",
        "DYLD_FRAMEWORK_PATH",
    }
)


def credential_reason(name: str) -> str | None:
    """Why environment variable ``name`` must not enter the sandbox, or None if it may."""
    upper = name.upper()
    if upper in _LOADER_NAMES:
        return "it makes every process in the sandbox load libraries from a host path"
    if (
        upper in _CREDENTIAL_NAMES
        or upper.startswith(_CREDENTIAL_PREFIXES)
        or any(part in upper for part in _CREDENTIAL_PARTS)
        or upper.endswith(_CREDENTIAL_SUFFIXES)
    ):
        return "it carries credentials or access to them"
    return None


def check_safety(
    config: StockadeConfig,
    *,
    environ: Mapping[str, str] | None = None,
    base_dir: Path | None = None,
    origin: Callable[[str], str] | None = None,
    cpu_count: int | None = None,
) -> None:
    """Raise PolicyError naming the key, its origin and the fix if ``config`` is dangerous.

    The user's home is ``$HOME`` from ``environ`` (default ``os.environ``) and the passwd
    entry's; a relative workspace path resolves against ``base_dir`` (default: the cwd);
    ``cpu_count`` defaults to the host's.
    """
    homes = (home_dir(os.environ if environ is None else environ), passwd_home())
    where = origin or (lambda _key: "the configuration")

    def refuse(key: str, value: Any, reason: str, fix: str) -> PolicyError:
        return PolicyError(f"{key} = {value!r} (from {where(key)}) is refused: {reason}; {fix}")

    if config.backend == "host" and not config.unsafe_host:
        raise refuse(
            "backend",
            "host",
            "the host backend runs commands without any isolation",
            "pass --unsafe-host / set unsafe_host = true if you really mean it, "
            "or choose backend = 'auto'",
        )

    workspace = config.workspace
    if workspace.mode != "none":
        path = (
            workspace.path
            if workspace.path.is_absolute()
            else (base_dir or Path.cwd()) / workspace.path
        )
        reason = _dangerous_workspace(path, homes)
        if reason:
            raise refuse(
                "workspace.path",
                str(path),
                f"sharing it with the sandbox would expose too much ({reason})",
                "point workspace.path at the project directory, or set workspace.mode = 'none'",
            )
        reason = mount_problem(workspace.mount)
        if reason:
            raise refuse(
                "workspace.mount",
                workspace.mount,
                reason,
                "use an absolute directory of its own inside the sandbox, e.g. '/workspace'",
            )

    secrets_fix = (
        "remove it; secrets will come through the [secrets] table of the egress feature, "
        "which keeps them out of the sandbox"
    )
    for name in config.env.pass_:
        reason = credential_reason(name)
        if reason:
            raise refuse("env.pass", name, f"{name}: {reason}", secrets_fix)
    for name in config.env.set_:
        reason = credential_reason(name)
        if reason:
            key = f"env.set.{name}"
            raise PolicyError(
                f"{key} (from {where(key)}) is refused: {name}: {reason}; {secrets_fix}"
            )

    limits = config.limits
    if limits.memory < MIN_MEMORY:
        raise refuse(
            "limits.memory",
            format_size(limits.memory),
            "below the 32MiB the sandbox needs to start",
            "set limits.memory to at least '32MiB', e.g. '512MiB'",
        )
    if limits.pids < MIN_PIDS:
        raise refuse(
            "limits.pids",
            limits.pids,
            f"below the {MIN_PIDS} processes the sandbox needs to start",
            f"set limits.pids to at least {MIN_PIDS}, e.g. 1024",
        )
    if limits.cpus is not None:
        cores = cpu_count or os.cpu_count() or 1
        if limits.cpus <= 0:
            raise refuse(
                "limits.cpus",
                limits.cpus,
                "a CPU limit must be positive",
                "set a number of cores such as 2 or 0.5, or 'none' for no limit",
            )
        if limits.cpus > cores * _CPUS_FACTOR:
            raise refuse(
                "limits.cpus",
                limits.cpus,
                f"this host has {cores} cores (is it a percentage?)",
                f"set a number of cores, at most {cores}",
            )
    from stockade.workspace.disk import MIN_DISK_BYTES

    if limits.disk is not None and limits.disk < MIN_DISK_BYTES:
        raise refuse(
            "limits.disk",
            format_size(limits.disk),
            "below the 8MiB a sandbox's own filesystem needs",
            "set limits.disk to at least '8MiB', e.g. '10GiB', or 'none' for no limit",
        )

    network = config.network
    network_fix = (
        "list the exact destinations the sandbox needs, e.g. 'pypi.org', '*.github.com' "
        "or '10.1.2.0/24'"
    )
    for key, entries in (
        ("network.allow", network.allow),
        ("network.deny", network.deny),
        ("network.tcp", network.tcp),
    ):
        for entry in entries:
            try:
                parse_rule(entry, port_required=key == "network.tcp")
            except RuleError as exc:
                raise refuse(key, entry, exc.reason, network_fix) from exc


def _dangerous_workspace(path: Path, homes: tuple[Path, ...]) -> str | None:
    candidates = {Path(os.path.normpath(path)), path.resolve()}
    home_set = {Path(os.path.normpath(h)) for h in homes} | {h.resolve() for h in homes}
    for candidate in candidates:
        if candidate == Path(candidate.anchor):
            return "it is the filesystem root"
        for home in home_set:
            if candidate == home:
                return "it is your home directory"
            if candidate in home.parents:
                return f"it contains your home directory {home}"
        text = candidate.as_posix()
        if text in _ROOT_DIRS:
            return f"{text} is a system directory"
        for tree in _FORBIDDEN_TREES:
            if text.startswith(tree + "/"):
                return f"it is inside the system directory {tree}"
    return None


def mount_problem(mount: str) -> str | None:
    """Why ``mount`` cannot hold the workspace inside the sandbox, or None if it can."""
    if not mount.startswith("/"):
        return "it must be an absolute path inside the sandbox"
    normal = posixpath.normpath(mount)
    if normal.startswith("//"):
        normal = "/" + normal.lstrip("/")
    if normal in _MOUNT_FORBIDDEN:
        return f"mounting the workspace over {normal} would hide a system directory"
    for tree in _MOUNT_FORBIDDEN_TREES:
        if normal.startswith(tree + "/"):
            return f"{tree} is a kernel interface, not a place for the workspace"
    return None


# ---------------------------------------------------------------------------------------------
# Home


def home_dir(environ: Mapping[str, str]) -> Path:
    """The user's home: ``$HOME`` of ``environ`` if absolute, else the passwd entry's."""
    home = environ.get("HOME", "")
    return Path(home) if home and Path(home).is_absolute() else passwd_home()


def passwd_home() -> Path:
    """The home directory of the passwd entry of this process's user."""
    try:
        return Path(pwd.getpwuid(os.getuid()).pw_dir)
    except KeyError:  # no passwd entry (some containers): fall back to the root, refused anyway
        return Path("/")
