"""The OCI bundle shared by the gvisor and container backends: one ``config.json`` builder.

It serves runsc, runc and crun: the host's ``/usr`` read-only with a curated ``/etc`` (like
the namespace backend) or an image's root filesystem, a user namespace in which the sandbox
user 1000 is the caller on the host, no capabilities, ``no_new_privs``, masked ``/proc``
paths, the seccomp deny list of the namespace backend, a fresh network namespace, and
memory/pids/cpu limits in a cgroup named ``stockade-<sandbox id>`` nested under the
caller's own. Running it is ``oci_runtime.py``.
"""

from __future__ import annotations

import errno
import json
import os
import posixpath
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from stockade._errors import SandboxStartError
from stockade.backends.base import AGENT_GUEST_PATH, LaunchSpec

__all__ = [
    "CONTAINER_PREFIX",
    "GUEST_UID",
    "RootfsView",
    "agent_argv",
    "agent_binds",
    "agent_dir",
    "build_config",
    "guest_agent_path",
    "host_rootfs",
    "image_rootfs",
    "oci_seccomp",
    "sandbox_cgroup_path",
    "system_binds",
    "write_bundle",
]


#: The unprivileged user commands run as inside (mapped to the caller's uid on the host).
GUEST_UID = 1000
#: Container ids are ``stockade-<sandbox id>``; the cgroup has the same name.
CONTAINER_PREFIX = "stockade-"
#: Host ids for the container's other users (0-999, 1001-65535) when run as root: far above
#: any real account, so a process that escaped its namespaces owns nothing on the host.
_SUBID_BASE = 2_000_000_000
_SUBID_SIZE = 65536

#: Headroom in the cgroup for gVisor's own Sentry and gofer (threads, page tables, caches).
_KERNEL_MEMORY = 256 * 2**20
_KERNEL_PIDS = 512

_MASKED_PATHS = (
    "/proc/acpi",
    "/proc/asound",
    "/proc/kcore",
    "/proc/keys",
    "/proc/latency_stats",
    "/proc/timer_list",
    "/proc/timer_stats",
    "/proc/sched_debug",
    "/proc/scsi",
    "/sys/firmware",
    "/sys/devices/virtual/powercap",
)
_READONLY_PATHS = (
    "/proc/bus",
    "/proc/fs",
    "/proc/irq",
    "/proc/sys",
    "/proc/sysrq-trigger",
)


@dataclass(frozen=True)
class RootfsView:
    """The root filesystem of a bundle and how the guest agent runs from it."""

    path: Path  # absolute, no symlink (runc insists)
    host_usr: bool  # True: the host's /usr and a curated /etc are bound in
    python: str = "/usr/bin/python3"
    label: str = "host"  # 'host', an image profile or a directory, for messages
    #: A shared image tree mounted read-only under ``path`` with a private upper layer
    #: (mount points the runtime creates land there, never in the shared tree).
    lower: Path | None = None


def host_rootfs(state_dir: Path) -> RootfsView:
    """An empty root with the mount points and the merged-/usr symlinks of the host.

    Made per sandbox (a handful of inodes): the root is mounted read-only, so every mount
    point must exist before the runtime starts.
    """
    root = (state_dir / "rootfs").resolve()
    root.mkdir(exist_ok=True, mode=0o755)
    for name in ("usr", "etc", "proc", "dev", "tmp", "run", "sys"):
        (root / name).mkdir(exist_ok=True)
    # runc gives a tmpfs the mode of the directory it covers.
    (root / "tmp").chmod(0o1777)
    for top in ("bin", "sbin", "lib", "lib32", "lib64", "libx32"):
        host = Path("/") / top
        target = root / top
        if os.path.lexists(target):
            continue
        if host.is_symlink():
            target.symlink_to(os.readlink(host))
        elif host.is_dir():
            target.mkdir()
    return RootfsView(root, host_usr=True)


def image_rootfs(image: str, state_dir: Path) -> RootfsView:
    """An image-builder profile's tree (built on first use) or a rootfs directory, overlaid.

    The tree is shared by every sandbox of that image and never written: the sandbox's root
    is an overlay of it with an upper layer in the sandbox's state directory, mounted (like
    the workspace) in the sandbox's private mount namespace by ``overlay_prefix``.
    """
    if image.startswith("/"):
        tree = Path(image).resolve()
    else:
        from stockade.images import ensure_rootfs

        tree = Path(ensure_rootfs(image).tree).resolve()
    if not (tree / "usr" / "bin" / "python3").exists():
        raise SandboxStartError(
            f"root filesystem {str(tree)!r} (image {image!r}) has no /usr/bin/python3, which "
            "the guest agent needs; use an image profile such as 'base' or install python3"
        )
    root = (state_dir / "rootfs").resolve()
    root.mkdir(exist_ok=True, mode=0o755)
    for name in ("root-upper", "root-work"):
        (state_dir / name).mkdir(exist_ok=True, mode=0o755)
    return RootfsView(root, host_usr=False, label=image, lower=tree)


def sandbox_cgroup_path(sandbox_id: str) -> str:
    """``cgroupsPath``: ``stockade-<id>`` under the caller's own cgroup (memory's on v1).

    Nested, so the host's accounting of the caller still covers the sandbox, and named like
    the namespace backend's groups so ``remove_stale_cgroups`` finds leftovers.
    """
    own = "/"
    try:
        lines = Path("/proc/self/cgroup").read_text().splitlines()
    except OSError:
        lines = []
    for line in lines:
        _id, controllers, path = line.split(":", 2)
        if "memory" in controllers.split(","):
            own = path
            break
        if _id == "0" and controllers == "":
            own = path
    return f"{own.rstrip('/')}/{CONTAINER_PREFIX}{sandbox_id}"


def oci_seccomp() -> dict[str, Any]:
    """The namespace backend's deny list as an OCI seccomp profile (allow by default)."""
    from stockade.backends._seccomp import (
        _CLONE_NAMESPACE_FLAGS,
        _DENIED,
        _PTRACE,
        _TIOCLINUX,
        _TIOCSTI,
    )

    names = sorted({name for _why, group in (*_DENIED, _PTRACE) for name in group})
    rules: list[dict[str, Any]] = [
        {"names": names, "action": "SCMP_ACT_ERRNO", "errnoRet": errno.EPERM},
        {"names": ["clone3"], "action": "SCMP_ACT_ERRNO", "errnoRet": errno.ENOSYS},
    ]
    for _flag_name, flag in _CLONE_NAMESPACE_FLAGS:
        rules.append(
            {
                "names": ["clone"],
                "action": "SCMP_ACT_ERRNO",
                "errnoRet": errno.EPERM,
                "args": [{"index": 0, "value": flag, "valueTwo": flag, "op": "SCMP_CMP_MASKED_EQ"}],
            }
        )
    for request in (_TIOCSTI, _TIOCLINUX):
        rules.append(
            {
                "names": ["ioctl"],
                "action": "SCMP_ACT_ERRNO",
                "errnoRet": errno.EPERM,
                "args": [
                    {
                        "index": 1,
                        "value": 0xFFFFFFFF,
                        "valueTwo": request,
                        "op": "SCMP_CMP_MASKED_EQ",
                    }
                ],
            }
        )
    return {
        "defaultAction": "SCMP_ACT_ALLOW",
        "architectures": ["SCMP_ARCH_X86_64", "SCMP_ARCH_X86"],
        "syscalls": rules,
    }


def agent_argv(
    spec: LaunchSpec,
    *,
    python: str,
    guest_agent: str,
    cwd: str,
    landlock: bool,
    rlimits: bool = False,
) -> list[str]:
    """The guest agent's command line inside a bundle (stdio is the channel)."""
    ws = spec.policy.workspace
    argv = [python, "-S", "-I", guest_agent, "--workspace", cwd]
    if landlock:
        argv += ["--landlock", "best-effort", "--landlock-scope"]
        for path in ("/usr", "/bin", "/sbin", "/lib", "/lib64", "/etc", "/proc", "/run/stockade"):
            argv += ["--landlock-ro", path]
        rw = ["/tmp", "/dev"]
        if ws.mode in ("cow", "rw") and ws.host_path is not None:
            rw.append(ws.guest_path)
        elif ws.mode == "ro" and ws.host_path is not None:
            argv += ["--landlock-ro", ws.guest_path]
        for path in rw:
            argv += ["--landlock-rw", path]
    if spec.egress is not None:
        argv += spec.egress.agent_args()
    argv += ["--rlimit", "core=0"]
    limits = spec.policy.limits
    if rlimits and limits.pids:
        argv += ["--rlimit", f"nproc={limits.pids}"]
    if rlimits and limits.memory_bytes:
        argv += ["--rlimit", f"as={limits.memory_bytes}"]
    return argv


def agent_dir(state_dir: Path, agent: Path, guest_agent: str) -> Path:
    """A directory holding only the agent under its guest name (a hard link when possible)."""
    directory = state_dir / "agent"
    directory.mkdir(exist_ok=True, mode=0o755)
    target = directory / posixpath.basename(guest_agent)
    if not target.exists():
        try:
            os.link(agent, target)
        except OSError:
            shutil.copyfile(agent, target)
            target.chmod(0o644)
    return directory


def system_binds(spec: LaunchSpec, *, host_usr: bool) -> list[tuple[str | Path, str]]:
    """Read-only (source, destination) binds of the system view: with ``host_usr`` the
    host's /usr, top-level library dirs and allowlisted /etc files; always the synthetic
    /etc files (passwd, hosts, ...) of ``spec``."""
    from stockade.backends.bubblewrap import _SYNTHETIC_ETC, ETC_ALLOWLIST, _etc_dir

    binds: list[tuple[str | Path, str]] = []
    if host_usr:
        binds.append(("/usr", "/usr"))
        for top in ("bin", "sbin", "lib", "lib32", "lib64", "libx32"):
            host = Path("/") / top
            if host.is_dir() and not host.is_symlink():
                binds.append((host, f"/{top}"))
        for name in ETC_ALLOWLIST:
            if os.path.lexists(f"/etc/{name}"):
                binds.append((f"/etc/{name}", f"/etc/{name}"))
    etc = _etc_dir(spec)
    for name in _SYNTHETIC_ETC:
        binds.append((etc / name, f"/etc/{name}"))
    return binds


def guest_agent_path(agent: Path) -> str:
    """Where the agent ``agent`` (source or compiled ``.pyc``) stands inside the sandbox."""
    return AGENT_GUEST_PATH + ("c" if agent.suffix == ".pyc" else "")


def agent_binds(spec: LaunchSpec, agent: Path) -> list[tuple[str | Path, str]]:
    """Read-only (source, destination) binds of the agent's directory and egress files.

    The agent's whole directory: a mount point made inside a writable /run would belong to
    whoever the runtime creates it as (the sandbox user, under gVisor).
    """
    guest_agent = guest_agent_path(agent)
    binds: list[tuple[str | Path, str]] = [
        (agent_dir(spec.state_dir, agent, guest_agent), posixpath.dirname(guest_agent))
    ]
    if spec.egress is not None:
        binds.extend(spec.egress.files)
    return binds


def _bind(source: str | Path, dest: str, *, ro: bool = True) -> dict[str, Any]:
    options = ["rbind", "nosuid", "nodev", "ro" if ro else "rw"]
    return {"destination": dest, "type": "bind", "source": str(source), "options": options}


def _tmpfs(dest: str, *options: str) -> dict[str, Any]:
    return {"destination": dest, "type": "tmpfs", "source": "tmpfs", "options": list(options)}


def _id_mappings(caller: int) -> list[dict[str, int]]:
    if os.getuid() != 0:
        # Unprivileged: only ourselves, who are root in the user namespace the runtime
        # runs in (see unshare_prefix).
        # The runtime insists on a mapped root, so the one id is 0 (no capabilities).
        return [{"containerID": 0, "hostID": 0, "size": 1}]
    return [
        {"containerID": 0, "hostID": _SUBID_BASE, "size": GUEST_UID},
        {"containerID": GUEST_UID, "hostID": caller, "size": 1},
        {
            "containerID": GUEST_UID + 1,
            "hostID": _SUBID_BASE + GUEST_UID + 1,
            "size": _SUBID_SIZE - GUEST_UID - 1,
        },
    ]


def build_config(
    spec: LaunchSpec,
    *,
    rootfs: RootfsView,
    workspace_source: Path | None,
    agent: Path,
    cgroups_path: str | None,
    seccomp: bool,
    landlock: bool,
    user_space_kernel: bool = False,
) -> dict[str, Any]:
    """The OCI ``config.json`` of one sandbox (runtime-neutral).

    ``user_space_kernel`` (gVisor): the cgroup holds the Sentry and gofer too, whose threads
    and memory count against it; it gets headroom, and the sandbox's own processes are held
    to the policy's numbers by rlimits that the Sentry enforces.
    """

    policy = spec.policy
    limits = policy.limits
    ws = policy.workspace
    # Unprivileged, only one id can be mapped (see _id_mappings): the sandbox runs as it.
    uid = GUEST_UID if os.getuid() == 0 else 0
    mounts: list[dict[str, Any]] = [
        {"destination": "/proc", "type": "proc", "source": "proc"},
        _tmpfs("/dev", "nosuid", "strictatime", "mode=755", "size=65536k"),
        {
            "destination": "/dev/pts",
            "type": "devpts",
            "source": "devpts",
            "options": ["nosuid", "noexec", "newinstance", "ptmxmode=0666", "mode=0620"],
        },
        _tmpfs("/dev/shm", "nosuid", "noexec", "nodev", "mode=1777", "size=65536k"),
    ]
    mounts.extend(_bind(src, dest) for src, dest in system_binds(spec, host_usr=rootfs.host_usr))
    from stockade.workspace.disk import fresh_tmp

    # The sandbox user is the caller on the host (see _id_mappings), who owns its home.
    tmp_dir = fresh_tmp(spec.state_dir, os.getuid())
    if tmp_dir is not None:
        # On the sandbox's own disk: /tmp and home share limits.disk with the workspace.
        mounts.append(_bind(tmp_dir, "/tmp", ro=False))
    else:
        tmp_size = limits.disk_bytes or limits.memory_bytes
        size = [f"size={tmp_size}"] if tmp_size else []
        mounts.append(_tmpfs("/tmp", "nosuid", "nodev", "mode=1777", *size))
        mounts.append(
            _tmpfs("/tmp/home", "nosuid", "nodev", "mode=700", f"uid={uid}", f"gid={uid}")
        )
    mounts.append(_tmpfs("/run", "nosuid", "nodev", "mode=755", "uid=0", "gid=0", "size=16m"))
    mounts.extend(_bind(src, dest) for src, dest in agent_binds(spec, agent))

    if ws.mode == "none" or ws.host_path is None:
        cwd = "/tmp/home"
    else:
        source = workspace_source if workspace_source is not None else ws.host_path
        mounts.append(_bind(source, ws.guest_path, ro=ws.mode == "ro"))
        for rel in ws.protected:
            host_rel = ws.host_path / rel
            if os.path.lexists(host_rel) and not host_rel.is_symlink():
                mounts.append(_bind(source / rel, f"{ws.guest_path}/{rel}"))
        cwd = ws.guest_path

    env = dict(policy.env)
    if spec.egress is not None:
        env.update(spec.egress.env)
    caps: dict[str, list[str]] = {
        k: [] for k in ("bounding", "effective", "permitted", "inheritable", "ambient")
    }
    resources: dict[str, Any] = {}
    memory_headroom, pids_headroom = (_KERNEL_MEMORY, _KERNEL_PIDS) if user_space_kernel else (0, 0)
    if limits.memory_bytes:
        resources["memory"] = {"limit": limits.memory_bytes + memory_headroom}
    if limits.pids:
        resources["pids"] = {"limit": limits.pids + pids_headroom}
    if limits.cpus:
        period = 100_000
        resources["cpu"] = {"quota": max(1000, int(limits.cpus * period)), "period": period}
    caller = os.getuid()
    linux: dict[str, Any] = {
        "namespaces": [
            {"type": t} for t in ("pid", "ipc", "uts", "mount", "network", "user", "cgroup")
        ],
        "uidMappings": _id_mappings(caller),
        "gidMappings": _id_mappings(os.getgid()),
        # The sandbox user is the caller on the host, root when stockade runs as root: a
        # root-only directory inside a bound /etc entry (private TLS keys) must not show.
        "maskedPaths": list(_MASKED_PATHS) + (["/etc/ssl/private"] if rootfs.host_usr else []),
        "readonlyPaths": list(_READONLY_PATHS),
    }
    if cgroups_path is not None:
        linux["cgroupsPath"] = cgroups_path
        linux["resources"] = resources
    if seccomp:
        linux["seccomp"] = oci_seccomp()
    return {
        "ociVersion": "1.0.2",
        "process": {
            "terminal": False,
            "user": {"uid": uid, "gid": uid},
            "args": agent_argv(
                spec,
                python=rootfs.python,
                guest_agent=guest_agent_path(agent),
                cwd=cwd,
                landlock=landlock,
                # No cgroup (unprivileged on cgroup v1): per-process rlimits instead.
                rlimits=user_space_kernel or cgroups_path is None,
            ),
            "env": [f"{k}={v}" for k, v in sorted(env.items())],
            "cwd": cwd,
            "capabilities": caps,
            "rlimits": [{"type": "RLIMIT_CORE", "hard": 0, "soft": 0}],
            "noNewPrivileges": True,
        },
        "root": {"path": str(rootfs.path), "readonly": True},
        "hostname": policy.hostname,
        "mounts": mounts,
        "linux": linux,
    }


def write_bundle(state_dir: Path, config: dict[str, Any]) -> Path:
    bundle = state_dir / "bundle"
    bundle.mkdir(exist_ok=True, mode=0o700)
    (bundle / "config.json").write_text(json.dumps(config, separators=(",", ":")))
    return bundle
