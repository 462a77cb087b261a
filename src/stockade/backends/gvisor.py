"""gVisor backend: the sandbox runs on runsc's user-space kernel, never the host's.

Our own OCI bundle (``backends/oci_bundle.py``): the host's ``/usr`` read-only or an image's
root filesystem, ``--network=none`` (loopback only; egress goes through the agent's tunnel), the
systrap platform (ptrace where this runsc lacks it; never kvm), a shared private ``--root``
state directory, and the guest agent as the container's init over ``runsc run``'s stdio.
The workspace overlay is mounted in a private mount namespace that runsc's gofer inherits,
with the host's upper layer, so diff/apply/reset work as for the namespace backend.
"""

from __future__ import annotations

import functools
import os
import re
import subprocess
import tempfile
from pathlib import Path

from stockade._errors import PolicyError
from stockade.backends.base import Availability, Backend, Capabilities, LaunchSpec, Leftover
from stockade.backends.oci_runtime import (
    OciContainerSandbox,
    OciRuntime,
    launch_container,
    reap_container,
    runtime_leftovers,
    runtime_state_root,
    unshare_prefix,
    which,
)

__all__ = ["GvisorBackend", "runsc_platforms"]

_FIX_INSTALL = (
    "install runsc from bookworm-backports: add 'bookworm-backports' to the apt sources, then "
    "`apt-get install -t bookworm-backports runsc` (or a release from gvisor.dev)"
)


@functools.lru_cache(maxsize=1)
def runsc_platforms() -> tuple[str, str]:
    """(runsc path, version line); raises FileNotFoundError when runsc is missing."""
    runsc = which("runsc")
    if runsc is None:
        raise FileNotFoundError("runsc")
    proc = subprocess.run([runsc, "--version"], capture_output=True, timeout=10, check=False)
    first = proc.stdout.decode(errors="replace").splitlines()
    return runsc, first[0] if first else ""


def _release_date(version: str) -> int:
    match = re.search(r"(20\d{6})", version)
    return int(match.group(1)) if match else 0


def choose_platform(requested: str, version: str) -> str:
    """systrap when asked or when this runsc has it (releases from mid-2023 on); else ptrace.

    kvm is never chosen: on a host without full hardware virtualisation it spins forever.
    """
    has_systrap = _release_date(version) >= 20230601
    if requested == "systrap" and not has_systrap:
        raise PolicyError(
            f"gvisor.platform = 'systrap' needs a newer runsc than {version!r}; "
            + _FIX_INSTALL
            + ", or set gvisor.platform = 'ptrace'"
        )
    if requested == "ptrace":
        return "ptrace"
    return "systrap" if has_systrap else "ptrace"


def _runtime(platform: str, *, rootless: bool) -> OciRuntime:
    runsc, _version = runsc_platforms()
    flags = ["--network=none", f"--platform={platform}"]
    if rootless:
        # Run inside our own user namespace (see oci_runtime.unshare_prefix), where we are root.
        flags += ["--ignore-cgroups"]
    return OciRuntime("runsc", runsc, runtime_state_root("runsc"), tuple(flags))


@functools.lru_cache(maxsize=1)
def _probe_cached() -> Availability:
    try:
        runsc, version = runsc_platforms()
    except (FileNotFoundError, OSError, subprocess.TimeoutExpired) as exc:
        return Availability(False, f"runsc not found or not runnable ({exc})", _FIX_INSTALL)
    if _release_date(version) < 20230601:
        # The bookworm build (2022) has no systrap and its statx breaks ls and stat.
        return Availability(
            False,
            f"{runsc} is {version!r}: too old (no systrap platform; statx with "
            "AT_NO_AUTOMOUNT fails, which breaks ls and stat)",
            _FIX_INSTALL,
        )
    if Path("/proc/self/ns/user").exists() and not Path("/proc/sys/kernel").exists():
        return Availability(False, "/proc is not mounted", "run on a normal Linux host")
    platform = choose_platform("auto", version)
    rootless = os.getuid() != 0
    runtime = _runtime(platform, rootless=rootless)
    with tempfile.TemporaryDirectory(prefix="stockade-runsc-probe-") as tmp:
        try:
            proc = subprocess.run(
                # The same namespaces as a launch (see oci_runtime.unshare_prefix), so auto
                # never picks gvisor where a start would fail.
                [
                    *unshare_prefix(),
                    runtime.binary,
                    "--root",
                    tmp,
                    *runtime.global_flags,
                    "do",
                    "true",
                ],
                capture_output=True,
                timeout=30,
                check=False,
                cwd="/",
            )
        except (OSError, subprocess.TimeoutExpired) as exc:
            return Availability(False, f"`runsc do true` failed: {exc}", _FIX_INSTALL)
    if proc.returncode != 0:
        err = proc.stderr.decode(errors="replace").strip()[-400:]
        return Availability(
            False,
            f"`runsc --platform={platform} do true` failed: {err}",
            "check that runsc runs here (`runsc --network=none do true`); on a VM without "
            "nested virtualisation use platform systrap or ptrace",
        )
    return Availability(True, f"{version} at {runsc}, platform {platform}")


class GvisorBackend(Backend):
    """Tier 1.5: a user-space kernel (runsc) between the sandbox and the host kernel."""

    name = "gvisor"
    capabilities = Capabilities(
        tier=1.5,
        isolation="gVisor user-space kernel (runsc, systrap/ptrace platform) + namespaces",
        enforces=(
            "a separate kernel: sandbox syscalls are served by gVisor's Sentry, not the host",
            "no network device but loopback (runsc --network=none)",
            "host files invisible except read-only /usr and a curated /etc (or an image)",
            "workspace copy-on-write through overlayfs, served by runsc's gofer",
            "no capabilities, no_new_privs, a user namespace (user 1000 as root, the caller's "
            "own uid as 0 when unprivileged)",
            "memory, pids and cpu limits through the sandbox's cgroup (root)",
        ),
        does_not_enforce=(
            "hardware isolation: a bug in gVisor itself or in the ~70 host syscalls it uses "
            "could escape (use microvm for that)",
            "cgroup limits when unprivileged (runsc --ignore-cgroups in a user namespace; "
            "rlimits instead)",
        ),
    )

    @classmethod
    def probe(cls) -> Availability:
        return _probe_cached()

    @classmethod
    def probe_inputs(cls) -> tuple[str, ...]:
        return (which("runsc") or "(no runsc on PATH)", which("unshare") or "(no unshare)")

    @classmethod
    def reap(cls, sandbox_id: str) -> None:
        """Delete the runsc container of a sandbox whose owner died (``stockade rm``)."""
        try:
            _runsc, version = runsc_platforms()
        except (FileNotFoundError, OSError, subprocess.TimeoutExpired):
            return
        reap_container(
            _runtime(choose_platform("auto", version), rootless=os.getuid() != 0), sandbox_id
        )

    @classmethod
    def orphans(cls) -> tuple[Leftover, ...]:
        return runtime_leftovers("runsc")

    async def launch(self, spec: LaunchSpec) -> OciContainerSandbox:
        _runsc, version = runsc_platforms()
        platform = choose_platform(spec.policy.gvisor.platform, version)
        rootless = os.getuid() != 0
        return await launch_container(
            spec,
            _runtime(platform, rootless=rootless),
            image=spec.policy.gvisor.image,
            rootless=rootless,
            seccomp=False,  # the Sentry is the kernel; the host side is filtered by runsc
            landlock=False,  # gVisor has no Landlock; its own kernel is the boundary
            user_space_kernel=True,
        )
