"""Which host directories must not be shared with a sandbox, whoever asks, and why.

A shared directory is dangerous when it holds credentials (read access is enough), programs
or libraries the host runs later (when the sandbox may write it), or unix sockets of host
services (a socket answers through a read-only bind too: the Docker API is root on the host).
Each danger is refused unless the user names it in ``allow_dangerous_mounts``. The checks
look at the directory itself, at every directory it lies inside, and at what it contains
(an ancestor of ``~/.ssh`` exposes ``~/.ssh``).

Sockets below a directory shared by a bind (``ro``, ``rw``) are found with a bounded,
breadth-first walk, so a socket buried deeper than the walk goes is not seen. A ``cow``
workspace is not walked: through overlayfs (and gVisor's gofer, and the microVM's copy) a
socket of the host answers no connection (the conformance suite checks it on every backend);
the well-known socket directories (``/run/user``, the Docker socket's) are refused in every
mode all the same.
"""

from __future__ import annotations

import logging
import os
import stat
from collections import deque
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from stockade.config.models import DangerousMount

__all__ = [
    "SOCKET_WALK_DEPTH",
    "SOCKET_WALK_ENTRIES",
    "MountDanger",
    "force_hint",
    "mount_dangers",
]

logger = logging.getLogger(__name__)

#: Directories below a shared directory the socket walk descends into, at most.
SOCKET_WALK_DEPTH = 4
#: Directory entries the socket walk looks at, at most (a few milliseconds).
SOCKET_WALK_ENTRIES = 5000

#: Home-relative places that hold credentials, or configuration that carries them.
_HOME_CREDENTIALS = (
    ".ssh",
    ".gnupg",
    ".aws",
    ".azure",
    ".kube",
    ".docker",
    ".config",  # gh, gcloud, git credentials, rclone, stockade's own trust records ...
    ".netrc",
    ".git-credentials",
    ".password-store",
    ".local/share/keyrings",
    ".local/share/kwalletd",
    ".pki",
    ".npmrc",
    ".pypirc",
    ".cargo/credentials",
    ".cargo/credentials.toml",
    ".m2/settings.xml",
    ".gradle/gradle.properties",
    ".terraform.d",
    ".vault-token",
    ".boto",
    ".s3cfg",
    ".oci",
    ".authinfo",
    ".authinfo.gpg",
    ".mozilla",
    "Library/Keychains",
)
#: Environment variables naming a credential file or directory (lists split on ':').
_CREDENTIAL_VARIABLES = (
    "GNUPGHOME",
    "KUBECONFIG",
    "DOCKER_CONFIG",
    "AWS_SHARED_CREDENTIALS_FILE",
    "AWS_CONFIG_FILE",
    "GOOGLE_APPLICATION_CREDENTIALS",
    "CLOUDSDK_CONFIG",
    "AZURE_CONFIG_DIR",
    "GH_CONFIG_DIR",
    "NETRC",
    "PASSWORD_STORE_DIR",
    "XDG_CONFIG_HOME",
)
#: Home-relative directories of programs and libraries, whether on PATH right now or not.
_HOME_EXECUTABLES = (
    ".local/bin",
    ".local/lib",  # the user site-packages of every Python: a .pth file there runs code
    "bin",
    ".cargo/bin",
    "go/bin",
    ".pyenv",
    ".rbenv",
    ".nvm",
    ".volta",
    ".deno/bin",
    ".bun/bin",
    ".npm-global",
    ".asdf",
    ".local/share/mise",
    ".nix-profile",
)
_SYSTEM_EXECUTABLES = (
    "/usr/local/bin",
    "/usr/local/sbin",
    "/usr/local/lib",
    "/opt/homebrew",
    "/snap/bin",
)
#: Directories of host service sockets (systemd, D-Bus, Docker, Podman, X11, SSH agents).
_SYSTEM_SOCKETS = (
    "/run",
    "/var/run",
    "/private/var/run",
    "/tmp/.X11-unix",
)
_HOME_SOCKETS = (
    ".docker/run",
    ".colima",
    ".lima",
    ".rd",
    ".local/share/containers",
    ".gnupg",
)
#: Environment variables naming a socket (``unix://`` URLs or paths).
_SOCKET_VARIABLES = (
    "XDG_RUNTIME_DIR",
    "DOCKER_HOST",
    "CONTAINER_HOST",
    "SSH_AUTH_SOCK",
    "DBUS_SESSION_BUS_ADDRESS",
)
_FORCE_HINT = {
    "credentials": "it holds credentials",
    "executables": "it holds programs the host runs",
    "sockets": "it holds sockets of host services",
}


@dataclass(frozen=True)
class MountDanger:
    """One reason a host directory must not be shared."""

    kind: DangerousMount
    #: What was found, for a human: "/home/u/.ssh holds credentials".
    reason: str


def mount_dangers(
    path: Path,
    *,
    mode: Literal["cow", "ro", "rw"],
    environ: Mapping[str, str],
    homes: Sequence[Path],
    walk_depth: int = SOCKET_WALK_DEPTH,
    walk_entries: int = SOCKET_WALK_ENTRIES,
) -> list[MountDanger]:
    """Every danger of sharing host directory ``path`` with a sandbox, one per kind.

    ``mode`` is how the sandbox sees it: directories of programs are dangerous only when it
    may write them in place (``rw``), sockets found below it only through a bind (not
    ``cow``). ``environ`` gives PATH and the variables that name credential files and
    sockets; ``homes`` are the user's home directories (``$HOME`` and the passwd entry's).
    """
    forms = _forms(path)
    found: dict[DangerousMount, str] = {}

    credentials = [(h / rel, "holds credentials") for h in homes for rel in _HOME_CREDENTIALS]
    credentials += [(p, "holds credentials") for p in _paths_from(environ, _CREDENTIAL_VARIABLES)]
    credentials += [
        (_stockade_state_dir(environ, h), "holds stockade's own state (audit logs, sandboxes)")
        for h in homes
    ]
    reason = _related(forms, credentials)
    if reason:
        found["credentials"] = reason

    if mode == "rw":
        programs = [Path(entry) for entry in environ.get("PATH", "").split(os.pathsep)]
        programs = [p for p in programs if p.is_absolute()]
        programs += [h / rel for h in homes for rel in _HOME_EXECUTABLES]
        programs += [Path(p) for p in _SYSTEM_EXECUTABLES]
        reason = _related(
            forms, [(p, "holds programs or libraries the host runs") for p in programs]
        )
        if reason:
            found["executables"] = reason

    sockets = [Path(p) for p in _SYSTEM_SOCKETS] + [h / rel for h in homes for rel in _HOME_SOCKETS]
    for name in _SOCKET_VARIABLES:
        value = environ.get(name, "")
        if name == "DBUS_SESSION_BUS_ADDRESS":
            value = value.partition("unix:path=")[2].partition(",")[0]
        value = value.removeprefix("unix://")
        if value.startswith("/"):
            where = Path(value)
            sockets.append(where if name == "XDG_RUNTIME_DIR" else where.parent)
    reason = _related(forms, [(p, "holds sockets of host services") for p in sockets])
    if reason is None and mode != "cow":
        socket = _find_socket(forms[-1], walk_depth, walk_entries)
        if socket is not None:
            reason = f"{socket} is a unix socket: the sandbox could talk to the service behind it"
    if reason:
        found["sockets"] = reason

    return [MountDanger(kind, why) for kind, why in found.items()]


def force_hint(kinds: Iterable[str]) -> str:
    """The words that allow ``kinds`` on purpose, as a config value and as CLI options."""
    names = sorted(set(kinds))
    value = "[" + ", ".join(f"'{name}'" for name in names) + "]"
    flags = " ".join(f"--allow-dangerous-mount {name}" for name in names)
    return f"allow_dangerous_mounts = {value} (command line: {flags})"


def _forms(path: Path) -> list[Path]:
    """``path`` as written (normalised) and with symlinks resolved, the resolved one last."""
    normal = Path(os.path.normpath(path))
    resolved = path.resolve()
    return [normal, resolved] if normal != resolved else [resolved]


def _paths_from(environ: Mapping[str, str], names: Iterable[str]) -> list[Path]:
    out = []
    for name in names:
        for item in environ.get(name, "").split(os.pathsep):
            if item and os.path.isabs(item):
                out.append(Path(item))
    return out


def _stockade_state_dir(environ: Mapping[str, str], home: Path) -> Path:
    # The rule of stockade.state.default_state_dir, with this environment and home.
    explicit = environ.get("STOCKADE_STATE_DIR", "")
    if explicit:
        return Path(explicit).expanduser()
    xdg = environ.get("XDG_STATE_HOME", "")
    if xdg and os.path.isabs(xdg):
        return Path(xdg) / "stockade"
    return home / ".local" / "state" / "stockade"


def _related(forms: list[Path], places: list[tuple[Path, str]]) -> str | None:
    """Say how ``forms`` (one directory) meets any of ``places``, or None if it does not.

    The directory is dangerous if it is a place, lies inside one, or contains one that
    exists (a place that does not exist yet cannot be exposed by an ancestor).
    """
    for place, what in places:
        place_forms = {Path(os.path.normpath(place))}
        if os.path.lexists(place):
            place_forms.add(place.resolve())
        for candidate in forms:
            for spot in place_forms:
                if candidate == spot:
                    return f"{spot} {what}"
                if spot in candidate.parents:
                    return f"it lies inside {spot}, which {what}"
                if candidate in spot.parents and os.path.lexists(spot):
                    return f"it contains {spot}, which {what}"
    return None


def _find_socket(root: Path, max_depth: int, max_entries: int) -> Path | None:
    """A unix socket at most ``max_depth`` directories below ``root``, or None.

    Breadth-first, symlinks not followed, at most ``max_entries`` entries looked at.
    ``scandir`` tells files, directories and symlinks apart without a stat, so only the
    other entries (sockets, fifos, devices) cost a system call.
    """
    queue: deque[tuple[Path, int]] = deque([(root, 0)])
    seen = 0
    while queue:
        directory, depth = queue.popleft()
        try:
            with os.scandir(directory) as entries:
                for entry in entries:
                    seen += 1
                    if seen > max_entries:
                        logger.debug("socket walk of %s stopped after %d entries", root, seen)
                        return None
                    try:
                        if entry.is_dir(follow_symlinks=False):
                            if depth < max_depth:
                                queue.append((Path(entry.path), depth + 1))
                            continue
                        if entry.is_file(follow_symlinks=False) or entry.is_symlink():
                            continue
                        if stat.S_ISSOCK(entry.stat(follow_symlinks=False).st_mode):
                            return Path(entry.path)
                    except OSError:
                        continue
        except OSError:
            continue  # unreadable: the sandbox (same user) cannot list it either
    return None
