"""OCI bundles shared by the gvisor and container backends, and the daemonless runtime driver.

One ``config.json`` builder serves runsc, runc and crun: the host's ``/usr`` read-only with a
curated ``/etc`` (like the namespace backend) or an image's root filesystem, a user namespace
in which the sandbox user 1000 is the caller on the host, no capabilities, ``no_new_privs``,
masked ``/proc`` paths, the seccomp deny list of the namespace backend, a fresh network
namespace, and memory/pids/cpu limits in a cgroup named ``stockade-<sandbox id>`` nested
under the caller's own. The workspace overlay is mounted in a private mount namespace just
before the runtime starts, so it never appears on the host and vanishes with the sandbox.

``OciContainerSandbox`` owns the foreground ``<runtime> run`` process (the agent talks over
its stdio), a watchdog that deletes the container if the owning process dies, and a teardown
that is verified: the runtime no longer knows the container and its cgroup holds no process.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import posixpath
import select
import shutil
import subprocess
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anyio
from anyio.abc import Process

from stockade._errors import SandboxStartError, SandboxStateError
from stockade.backends._process import ProcessSandbox
from stockade.backends.base import AGENT_GUEST_PATH, LaunchSpec, Leftover

__all__ = [
    "CONTAINER_PREFIX",
    "GUEST_UID",
    "OciContainerSandbox",
    "OciRuntime",
    "RootfsView",
    "agent_argv",
    "build_config",
    "host_rootfs",
    "image_rootfs",
    "oci_seccomp",
    "overlay_prefix",
    "runtime_leftovers",
    "runtime_state_root",
    "sandbox_cgroup_path",
    "unshare_prefix",
]

logger = logging.getLogger(__name__)

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


def runtime_state_root(runtime: str) -> Path:
    """The runtime's ``--root`` for stockade's containers: one per user, shared by sandboxes.

    Shared (not per sandbox) so that ``<runtime> --root DIR list`` shows every container of
    stockade on this machine, and a leftover can be found by its id.
    """
    uid = os.getuid()
    if uid == 0:
        base = Path("/run/stockade")
    elif os.environ.get("XDG_RUNTIME_DIR"):
        base = Path(os.environ["XDG_RUNTIME_DIR"]) / "stockade"
    else:
        base = Path(f"/tmp/stockade-{uid}")
    root = base / runtime
    root.mkdir(parents=True, exist_ok=True, mode=0o700)
    return root


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


def unshare_prefix() -> list[str]:
    """A private mount namespace; unprivileged, inside a user namespace where we are root.

    The runtime then runs "rootless" in that namespace, and the bundle's id mappings are
    relative to it (the caller is 0 there).
    """
    if os.getuid() == 0:
        return ["unshare", "--mount", "--propagation", "private"]
    return ["unshare", "--user", "--map-root-user", "--mount", "--propagation", "private"]


def overlay_prefix(
    spec: LaunchSpec, *, extra: str = "", rootfs: RootfsView | None = None
) -> tuple[list[str], Path | None]:
    """``unshare -m sh -c 'mount overlays; exec "$@"'`` and the merged workspace, or ([], None).

    Mounts, in a private mount namespace, the image root's overlay (when ``rootfs`` has a
    shared tree) and the workspace's (mode cow). ``extra`` is shell run there first (crun's
    cgroup fix). The overlays use ``userxattr`` so whiteouts look like the namespace
    backend's (and so it works inside an unprivileged user namespace).
    """
    steps = [extra] if extra else []
    if rootfs is not None and rootfs.lower is not None:
        state = rootfs.path.parent
        steps.append(
            _mount_overlay(rootfs.lower, state / "root-upper", state / "root-work", rootfs.path)
        )
    merged: Path | None = None
    if spec.policy.workspace.mode == "cow" and spec.workspace is not None:
        merged = spec.state_dir / "merged"
        merged.mkdir(exist_ok=True)
        lower_link = spec.state_dir / "lower"
        if not lower_link.is_symlink():
            lower_link.symlink_to(spec.workspace.lower)
        steps.append(_mount_overlay(lower_link, spec.workspace.upper, spec.workspace.work, merged))
        merged = merged.resolve()
    if not steps and os.getuid() == 0:
        return [], None
    script = " && ".join([*steps, 'exec "$@"']) if steps else 'exec "$@"'
    return [*unshare_prefix(), "/bin/sh", "-c", script, "sh"], merged


def _mount_overlay(lower: Path, upper: Path, work: Path, target: Path) -> str:
    import shlex

    # Paths with ',' or ':' would split the option string: the lower is a symlink we made
    # where it matters (the project directory), the others live in our state directory.
    options = f"lowerdir={lower},upperdir={upper},workdir={work},userxattr"
    return f"mount -t overlay stockade -o {shlex.quote(options)} {shlex.quote(str(target))}"


@dataclass(frozen=True)
class OciRuntime:
    """A daemonless OCI runtime binary with its global flags and private state root."""

    name: str  # "runsc", "runc" or "crun"
    binary: str
    root: Path
    global_flags: tuple[str, ...] = ()

    def argv(self, *args: str) -> list[str]:
        return [self.binary, "--root", str(self.root), *self.global_flags, *args]

    def run(self, *args: str, timeout: float = 30) -> subprocess.CompletedProcess[bytes]:
        return subprocess.run(
            self.argv(*args), capture_output=True, timeout=timeout, check=False, cwd="/"
        )

    def container_ids(self) -> list[str]:
        """Every container this runtime knows under our root."""
        proc = self.run("list", "--format", "json")
        if proc.returncode != 0:
            return []
        try:
            data = json.loads(proc.stdout or b"null") or []
        except ValueError:
            return []
        return [str(c.get("id")) for c in data if isinstance(c, dict)]

    def exists(self, container_id: str) -> bool:
        """Whether the runtime still keeps state for the container under our root.

        Read from the root directory (runc/crun: a directory per container; runsc: files
        prefixed with the id) instead of spawning ``<runtime> state``: teardown asks this
        for every sandbox, and the answer is the runtime's own record either way.
        """
        try:
            names = os.listdir(self.root)
        except FileNotFoundError:
            return False
        return any(
            name == container_id
            or name.startswith(f"{container_id}_")
            or name == f"runsc-{container_id}.sock"
            for name in names
        )

    def delete(self, container_id: str) -> bool:
        """Kill and delete a container; False (and quiet) when it does not exist."""
        if not self.exists(container_id):
            return False
        self.run("kill", container_id, "KILL")
        proc = self.run("delete", "--force", container_id)
        if proc.returncode != 0 and self.exists(container_id):
            raise SandboxStateError(
                f"{self.name} could not delete container {container_id}: "
                f"{proc.stderr.decode(errors='replace').strip()}; remove it with "
                f"`{' '.join(self.argv('delete', '--force', container_id))}`"
            )
        return True

    def watchdog_argv(self, container_id: str) -> list[str]:
        """A shell that deletes the container when its stdin ends without a 'done' line.

        Its stdin is a pipe held only by the process that owns the sandbox: if that process
        dies (even ``kill -9``), the pipe ends and the container goes with it.
        """
        kill = " ".join(_quote(a) for a in self.argv("kill", container_id, "KILL"))
        delete = " ".join(_quote(a) for a in self.argv("delete", "--force", container_id))
        script = (
            'read line; [ "$line" = done ] && exit 0; '
            f"{kill} >/dev/null 2>&1; sleep 0.2; {delete} >/dev/null 2>&1; exit 0"
        )
        return ["/bin/sh", "-c", script]


def _quote(arg: str) -> str:
    import shlex

    return shlex.quote(arg)


def stop_watchdog(watchdog: subprocess.Popen[bytes] | None) -> None:
    """Tell a watchdog its sandbox ended in order ("done") and wait for it to exit."""
    if watchdog is None or watchdog.stdin is None:
        return
    with contextlib.suppress(OSError):
        watchdog.stdin.write(b"done\n")
        watchdog.stdin.close()
    try:
        watchdog.wait(timeout=2)
    except subprocess.TimeoutExpired:
        watchdog.kill()
        watchdog.wait()


def start_watchdog(runtime: OciRuntime, container_id: str) -> subprocess.Popen[bytes]:
    """Start the watchdog of ``container_id`` in its own session (see ``watchdog_argv``)."""
    return subprocess.Popen(
        runtime.watchdog_argv(container_id),
        stdin=subprocess.PIPE,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
        close_fds=True,
        cwd="/",
    )


async def open_runtime_process(
    argv: Sequence[str], log_path: Path, *, env: dict[str, str] | None = None
) -> Process:
    """Start the foreground runtime process; its stdio pipes are the agent's channel."""
    try:
        with log_path.open("ab") as log:
            return await anyio.open_process(
                list(argv),
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=log,
                env=env or {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "LANG": "C.UTF-8"},
                cwd="/",
            )
    except OSError as exc:
        raise SandboxStartError(f"could not start {argv[0]}: {exc}") from exc


class OciContainerSandbox(ProcessSandbox):
    """A sandbox run by ``<runtime> run`` in the foreground; deleted and verified on teardown."""

    def __init__(
        self,
        process: Process,
        log_path: Path,
        *,
        runtime: OciRuntime,
        container_id: str,
        sandbox_id: str,
        watchdog: subprocess.Popen[bytes] | None,
        cgroups_path: str | None = None,
    ) -> None:
        super().__init__(process, log_path)
        self.cgroups_path = cgroups_path
        with contextlib.suppress(OSError):
            # If the runtime process dies (the sandbox's wall-clock timer kills it, or it
            # crashes), the container must not live on without it.
            pidfd = os.pidfd_open(process.pid)
            threading.Thread(target=self._lifeline, args=(pidfd,), daemon=True).start()
        self.runtime = runtime
        self.container_id = container_id
        self.sandbox_id = sandbox_id
        self._watchdog = watchdog
        self._cgroup_cache: Any = None

    def _lifeline(self, pidfd: int) -> None:
        try:
            select.select([pidfd], [], [])
        finally:
            os.close(pidfd)
        if not self._terminated and self.runtime.exists(self.container_id):
            self.runtime.run("kill", self.container_id, "KILL")

    def _cgroup(self) -> Any:
        """The container's cgroup, looked up at the path we gave the runtime (no search)."""
        from stockade.backends._cgroups import SandboxCgroup, _discover

        if self._cgroup_cache is None and self.cgroups_path is not None:
            dirs: list[Path] = []
            controllers: dict[str, Path] = {}
            unified = None
            for hierarchy in _discover():
                path = hierarchy.mount / self.cgroups_path.lstrip("/")
                if not path.is_dir():
                    continue
                dirs.append(path)
                if hierarchy.version == "v2":
                    unified = path
                for controller in hierarchy.controllers:
                    controllers.setdefault(controller, path)
            if dirs:
                self._cgroup_cache = SandboxCgroup(self.sandbox_id, dirs, controllers, unified)
        return self._cgroup_cache

    def resource_events(self) -> dict[str, bool]:
        group = self._cgroup()
        if group is None:
            return {}
        return {"oom_killed": group.oom_killed(), "pids_limit_hit": group.pids_limit_hit()}

    async def terminate(self, grace: float = 1.0) -> None:
        if self._terminated:
            return
        self._terminated = True
        with anyio.CancelScope(shield=True):
            # Look the cgroup up while it exists: its events explain a death afterwards.
            with contextlib.suppress(Exception):
                self._cgroup()
            # After agent.shutdown the runtime exits by itself and deletes the container;
            # a signal now would cut its own cleanup short.
            with anyio.move_on_after(grace):
                await self.process.wait()
            # The runtime forwards SIGTERM to the agent, which takes its children down.
            await self._term_process(grace)
            if self.process.returncode is None:
                await anyio.to_thread.run_sync(
                    lambda: self.runtime.run("kill", self.container_id, "KILL")
                )
                with anyio.move_on_after(5):
                    await self.process.wait()
            await self._kill_process_and_close()
            survivors = await anyio.to_thread.run_sync(self._delete_and_verify)
            if survivors:
                raise SandboxStateError(
                    f"the {self.runtime.name} container {self.container_id} survived teardown: "
                    f"{survivors}"
                )

    def _delete_and_verify(self) -> str:
        from stockade.backends._cgroups import remove_stale_cgroups

        problems: list[str] = []
        deleted = False
        try:
            deleted = self.runtime.delete(self.container_id)
        except SandboxStateError as exc:
            problems.append(str(exc))
        if deleted and self.runtime.exists(self.container_id):
            problems.append(f"`{self.runtime.name} state {self.container_id}` still finds it")
        group = self._cgroup()
        if group is not None:
            # The runtime removes the cgroup when the container goes; anything still in it
            # is killed and reported.
            left = group.pids()
            group.destroy()
            if left:
                problems.append(f"processes {sorted(left)} were still in its cgroup")
        elif self.cgroups_path is None:
            left = remove_stale_cgroups(self.sandbox_id)
            if left:
                problems.append(f"processes {sorted(left)} are still in its cgroup")
        self._stop_watchdog()
        return "; ".join(problems)

    def _stop_watchdog(self) -> None:
        watchdog, self._watchdog = self._watchdog, None
        stop_watchdog(watchdog)


def reap_container(runtime: OciRuntime, sandbox_id: str) -> None:
    """Delete the container of a sandbox whose owner died (``stockade rm``); quiet if none."""
    runtime.delete(CONTAINER_PREFIX + sandbox_id)


def stockade_containers(runtime: str) -> list[str]:
    """Sandbox ids of the containers ``runtime`` knows under stockade's root."""
    binary = which(runtime)
    if binary is None:
        return []
    listed = OciRuntime(runtime, binary, runtime_state_root(runtime)).container_ids()
    return [c.removeprefix(CONTAINER_PREFIX) for c in listed if c.startswith(CONTAINER_PREFIX)]


def runtime_leftovers(runtime: str) -> tuple[Leftover, ...]:
    """The containers ``runtime`` keeps under stockade's root, as ``Backend.orphans`` says."""
    root = runtime_state_root(runtime)
    return tuple(
        Leftover(
            sandbox,
            f"{runtime} container {CONTAINER_PREFIX}{sandbox}",
            f"{runtime} --root {root} delete --force {CONTAINER_PREFIX}{sandbox}",
        )
        for sandbox in stockade_containers(runtime)
    )


def write_bundle(state_dir: Path, config: dict[str, Any]) -> Path:
    bundle = state_dir / "bundle"
    bundle.mkdir(exist_ok=True, mode=0o700)
    (bundle / "config.json").write_text(json.dumps(config, separators=(",", ":")))
    return bundle


def which(name: str) -> str | None:
    found = shutil.which(name)
    if found is None:
        for directory in ("/usr/sbin", "/usr/bin", "/sbin", "/usr/local/bin", "/usr/local/sbin"):
            candidate = Path(directory) / name
            if candidate.is_file() and os.access(candidate, os.X_OK):
                return str(candidate)
    return found


def wait_gone(pid: int, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        time.sleep(0.01)
    return False


async def launch_container(
    spec: LaunchSpec,
    runtime: OciRuntime,
    *,
    image: str,
    rootless: bool,
    seccomp: bool,
    landlock: bool,
    user_space_kernel: bool = False,
    overlay_extra: str = "",
) -> OciContainerSandbox:
    """Write the bundle of ``spec`` and start it with ``<runtime> run`` (runc, crun, runsc).

    ``image`` is ``"host"`` (the host's /usr read-only) or an image name; ``overlay_extra``
    is shell run in the workspace overlay's mount namespace before the runtime starts.
    """
    from stockade.backends.bubblewrap import compiled_agent

    rootfs = host_rootfs(spec.state_dir) if image == "host" else image_rootfs(image, spec.state_dir)
    # The agent compiled by the host's Python only runs on the same interpreter.
    agent = (
        compiled_agent(spec.agent_source, spec.cache_dir) if rootfs.host_usr else spec.agent_source
    )
    prefix, merged = overlay_prefix(spec, extra=overlay_extra, rootfs=rootfs)
    cgroups_path = None if rootless else sandbox_cgroup_path(spec.sandbox_id)
    config = build_config(
        spec,
        rootfs=rootfs,
        workspace_source=merged,
        agent=agent,
        cgroups_path=cgroups_path,
        seccomp=seccomp,
        landlock=landlock,
        user_space_kernel=user_space_kernel,
    )
    bundle = write_bundle(spec.state_dir, config)
    container_id = CONTAINER_PREFIX + spec.sandbox_id
    log_path = spec.state_dir / "sandbox.log"
    argv = [*prefix, *runtime.argv("run", "--bundle", str(bundle), container_id)]
    watchdog = start_watchdog(runtime, container_id)
    try:
        process = await open_runtime_process(argv, log_path)
    except SandboxStartError:
        if watchdog.stdin is not None:
            watchdog.stdin.close()
        raise
    return OciContainerSandbox(
        process,
        log_path,
        runtime=runtime,
        container_id=container_id,
        sandbox_id=spec.sandbox_id,
        watchdog=watchdog,
        cgroups_path=cgroups_path,
    )
