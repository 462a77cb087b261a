"""Daemonless engines of the container backend: ``runc`` or ``crun`` running our OCI bundle.

The same bundle as the gvisor backend (``backends/oci_bundle.py``) plus the namespace backend's
seccomp deny list and Landlock, since here the host kernel serves every syscall. crun
refuses this kind of host's hybrid cgroups (v1 controllers plus a cgroup2 tree holding only
hugetlb) unless ``/sys/fs/cgroup/unified`` is hidden, which is done in the sandbox's own
mount namespace: the host's mounts are never touched.
"""

from __future__ import annotations

import functools
import json
import os
import subprocess
import tempfile
from pathlib import Path

from stockade._errors import SandboxStartError
from stockade.backends.base import Availability, LaunchSpec
from stockade.backends.oci_bundle import host_rootfs
from stockade.backends.oci_runtime import (
    OciContainerSandbox,
    OciRuntime,
    launch_container,
    reap_container,
    runtime_state_root,
    unshare_prefix,
    which,
)

__all__ = ["OCI_ENGINES", "launch_oci", "probe_oci", "reap_oci"]

OCI_ENGINES = ("runc", "crun")
_UNIFIED = Path("/sys/fs/cgroup/unified")
_FIX = {
    "runc": "install the 'runc' package (apt-get install runc)",
    "crun": "install the 'crun' package (apt-get install crun)",
}


def _hybrid_cgroups() -> bool:
    """True when a cgroup2 tree is mounted beside v1 controllers (crun refuses that)."""
    try:
        mounts = Path("/proc/self/mounts").read_text()
    except OSError:
        return False
    return f" {_UNIFIED} cgroup2 " in mounts


def _crun_fix() -> str:
    """Shell run in the sandbox's private mount namespace before crun, on hybrid hosts."""
    if not _hybrid_cgroups():
        return ""
    if os.getuid() == 0:
        return f"umount {_UNIFIED}"
    # A mount inherited into a user namespace is locked: cover it instead.
    return f"mount -t tmpfs none {_UNIFIED}"


def runtime_for(engine: str) -> OciRuntime:
    binary = which(engine)
    if binary is None:
        raise FileNotFoundError(engine)
    flags: tuple[str, ...] = ()
    if os.getuid() != 0:
        flags = ("--rootless=true",) if engine == "runc" else ()
    return OciRuntime(engine, binary, runtime_state_root(engine), flags)


@functools.lru_cache(maxsize=4)
def probe_oci(engine: str) -> Availability:
    """Run ``true`` in a minimal bundle of this engine (cached per process)."""
    try:
        runtime = runtime_for(engine)
    except FileNotFoundError:
        return Availability(False, f"{engine} not found on PATH", _FIX[engine])
    if not Path("/usr/bin/python3").exists():
        return Availability(False, "/usr/bin/python3 not found (the guest agent needs it)",
                            "install the 'python3' package")  # fmt: skip
    with tempfile.TemporaryDirectory(prefix=f"stockade-{engine}-probe-") as tmp:
        state = Path(tmp)
        rootfs = host_rootfs(state)
        config = {
            "ociVersion": "1.0.2",
            "process": {
                "terminal": False,
                "user": {"uid": 0, "gid": 0},
                "args": ["/usr/bin/true"],
                "cwd": "/",
                "env": ["PATH=/usr/bin"],
                "noNewPrivileges": True,
                "capabilities": {},
            },
            "root": {"path": str(rootfs.path), "readonly": True},
            "mounts": [
                {
                    "destination": "/usr",
                    "type": "bind",
                    "source": "/usr",
                    "options": ["rbind", "ro"],
                },
                {"destination": "/proc", "type": "proc", "source": "proc"},
            ],
            "linux": {
                "namespaces": [{"type": t} for t in ("pid", "mount", "network", "user", "ipc")],
                # Root: map to ourselves; unprivileged: we are 0 in the prefix's namespace.
                "uidMappings": [{"containerID": 0, "hostID": 0, "size": 1}],
                "gidMappings": [{"containerID": 0, "hostID": 0, "size": 1}],
            },
        }
        bundle = state / "bundle"
        bundle.mkdir()
        (bundle / "config.json").write_text(json.dumps(config))
        fix = _crun_fix() if engine == "crun" else ""
        # The same namespaces as a launch (see unshare_prefix): what is probed is what runs.
        prefix = (
            [*unshare_prefix(), "/bin/sh", "-c", f'{fix or ":"}; exec "$@"', "sh"]
            if fix or os.getuid() != 0
            else []
        )
        root = state / "root"
        argv = [*prefix, runtime.binary, "--root", str(root), *runtime.global_flags,
                "run", "--bundle", str(bundle), f"stockade-probe-{os.getpid()}"]  # fmt: skip
        try:
            proc = subprocess.run(argv, capture_output=True, timeout=30, check=False, cwd="/")
        except (OSError, subprocess.TimeoutExpired) as exc:
            return Availability(False, f"{engine} failed to run: {exc}", _FIX[engine])
    if proc.returncode != 0:
        err = proc.stderr.decode(errors="replace").strip()[-400:]
        return Availability(
            False,
            f"`{engine} run` of a minimal bundle failed: {err}",
            "check the runtime with `" + engine + " spec && " + engine + " run ID`",
        )
    return Availability(True, f"{engine} at {runtime.binary} (daemonless, stockade's bundle)")


def reap_oci(sandbox_id: str) -> None:
    for engine in OCI_ENGINES:
        try:
            runtime = runtime_for(engine)
        except FileNotFoundError:
            continue
        reap_container(runtime, sandbox_id)


async def launch_oci(spec: LaunchSpec, engine: str) -> OciContainerSandbox:
    try:
        runtime = runtime_for(engine)
    except FileNotFoundError as exc:
        raise SandboxStartError(f"{engine} not found on PATH; {_FIX[engine]}") from exc
    return await launch_container(
        spec,
        runtime,
        image=spec.policy.container.image,
        rootless=os.getuid() != 0,
        seccomp=True,
        landlock=True,
        overlay_extra=_crun_fix() if engine == "crun" else "",
    )
