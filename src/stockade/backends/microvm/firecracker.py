"""Firecracker driver: one ``firecracker`` process per VM, configured over its REST API.

Boot: start ``firecracker --api-sock <workdir>/firecracker.sock --id <vm id>`` (its stdout,
which carries the guest's serial console, goes to ``<workdir>/console.log``), then on that
unix socket ``PUT /boot-source`` (kernel, initrd, boot args), ``PUT /drives/<id>`` per disk
(the read-only erofs root, then an optional workspace disk), ``PUT /machine-config`` (vCPUs,
memory), ``PUT /vsock`` (the agent transport: Firecracker has no virtio-serial) and
``PUT /actions {"action_type": "InstanceStart"}``; then reach the agent through the hybrid
vsock socket (``CONNECT <port>`` / ``OK <n>``). Snapshot: ``PATCH /vm Paused`` and
``PUT /snapshot/create``; restore: a fresh process and ``PUT /snapshot/load`` (resumed,
with the vsock socket moved to the new VM's directory). Every request is built by a pure
function below and validated against Firecracker's OpenAPI spec in the tests.

Under the jailer (``JailerConfig``), ``jailer`` sets up the process before it execs
Firecracker: a chroot that holds only the files the VM needs (hard links made here), fresh
mount (and optionally network) namespaces, a cgroup for the VM, a fixed unprivileged
uid/gid, and cleaned-up file descriptors and environment. Firecracker applies its own
seccomp filters with or without it. The jailer needs root and, without ``--new-pid-ns``
(not used, so the pid we watch stays the VMM's), execs Firecracker in place.

Firecracker needs hardware KVM (``/dev/kvm`` from kvm_intel / kvm_amd) and an uncompressed
ELF kernel. The guest kernel must find virtio-mmio devices: on x86 either a Firecracker that
describes them in ACPI or a kernel with ``CONFIG_VIRTIO_MMIO_CMDLINE_DEVICES``.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import re
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Literal

import anyio
from anyio.abc import ByteStream

from stockade._errors import SandboxStartError
from stockade.backends.base import Availability
from stockade.backends.microvm._vmm_common import (
    KvmApiVmmDriver,
    VmmApi,
    VmmApiError,
    VmmBinary,
    VmmProcess,
    VmmVm,
    prepare_workdir,
    probe_kvm_vmm,
    reach_agent,
    remove_stale_socket,
)
from stockade.backends.microvm.driver import DiskSpec, DriverCapabilities, VmSpec

__all__ = [
    "FIRECRACKER",
    "FIRECRACKER_BOOT_ARGS",
    "ApiRequest",
    "FirecrackerApi",
    "FirecrackerApiError",
    "FirecrackerDriver",
    "FirecrackerVm",
    "JailerConfig",
    "VmLayout",
    "boot_requests",
    "boot_source_request",
    "configure_and_start",
    "drive_request",
    "instance_start_request",
    "load_snapshot",
    "machine_config_request",
    "memory_file_for",
    "pause_request",
    "plan_layout",
    "probe_firecracker",
    "resume_request",
    "snapshot_create_request",
    "snapshot_load_request",
    "take_snapshot",
    "vsock_request",
]

logger = logging.getLogger(__name__)

#: Appended to the backend's command line: serial console on ttyS0 (Firecracker's stdout),
#: a guest reboot or panic ends the Firecracker process (``reboot=k``: keyboard-controller
#: reset, which Firecracker handles by exiting), no PCI probing on the MMIO machine.
FIRECRACKER_BOOT_ARGS = "console=ttyS0 reboot=k panic=-1 pci=off"

INSTALL_FIX = (
    "on a Linux host with hardware KVM, download a release binary from "
    "https://github.com/firecracker-microvm/firecracker/releases (firecracker-vX.Y.Z-"
    "<arch>.tgz), put 'firecracker' (and optionally 'jailer') on PATH or set "
    "STOCKADE_FIRECRACKER to its path, and make /dev/kvm readable and writable for your user"
)

FIRECRACKER = VmmBinary("Firecracker", "firecracker", "STOCKADE_FIRECRACKER", INSTALL_FIX)

_DRIVE_ID = re.compile(r"[A-Za-z0-9_]{1,64}")
_VM_ID = re.compile(r"[A-Za-z0-9-]{1,64}")


# --------------------------------------------------------------------------- requests


@dataclass(frozen=True)
class ApiRequest:
    """One call on Firecracker's API: method, path and JSON body (None: no body)."""

    method: Literal["GET", "PUT", "PATCH"]
    path: str
    body: dict[str, Any] | None = None


def boot_source_request(kernel: str, initrd: str, boot_args: str) -> ApiRequest:
    return ApiRequest(
        "PUT",
        "/boot-source",
        {"kernel_image_path": kernel, "initrd_path": initrd, "boot_args": boot_args},
    )


def drive_request(disk: DiskSpec, path_on_host: str) -> ApiRequest:
    """A virtio-blk drive. Never the root device: the initramfs mounts the root image itself
    (``is_root_device`` would make Firecracker append ``root=/dev/vda`` to the boot args)."""
    if not _DRIVE_ID.fullmatch(disk.drive_id):
        raise ValueError(
            f"Firecracker drive ids are 1-64 letters, digits or '_', not {disk.drive_id!r}"
        )
    return ApiRequest(
        "PUT",
        f"/drives/{disk.drive_id}",
        {
            "drive_id": disk.drive_id,
            "path_on_host": path_on_host,
            "is_root_device": False,
            "is_read_only": disk.read_only,
            "cache_type": "Unsafe",
        },
    )


def machine_config_request(vcpus: int, memory_mib: int) -> ApiRequest:
    if not 1 <= vcpus <= 32:
        raise ValueError(f"Firecracker runs 1 to 32 vCPUs, not {vcpus}")
    if memory_mib < 1:
        raise ValueError(f"memory must be at least 1 MiB, not {memory_mib}")
    return ApiRequest(
        "PUT",
        "/machine-config",
        {"vcpu_count": vcpus, "mem_size_mib": memory_mib, "smt": False},
    )


def vsock_request(guest_cid: int, uds_path: str) -> ApiRequest:
    if guest_cid < 3:
        raise ValueError(f"a guest vsock CID is 3 or more (0-2 are reserved), not {guest_cid}")
    return ApiRequest("PUT", "/vsock", {"guest_cid": guest_cid, "uds_path": uds_path})


def instance_start_request() -> ApiRequest:
    return ApiRequest("PUT", "/actions", {"action_type": "InstanceStart"})


def pause_request() -> ApiRequest:
    return ApiRequest("PATCH", "/vm", {"state": "Paused"})


def resume_request() -> ApiRequest:
    return ApiRequest("PATCH", "/vm", {"state": "Resumed"})


def snapshot_create_request(snapshot_path: str, mem_file_path: str) -> ApiRequest:
    return ApiRequest(
        "PUT",
        "/snapshot/create",
        {"snapshot_type": "Full", "snapshot_path": snapshot_path, "mem_file_path": mem_file_path},
    )


def snapshot_load_request(snapshot_path: str, mem_file_path: str, uds_path: str) -> ApiRequest:
    """Load and resume; the vsock socket moves to this VM's directory (``vsock_override``)."""
    return ApiRequest(
        "PUT",
        "/snapshot/load",
        {
            "snapshot_path": snapshot_path,
            "mem_backend": {"backend_type": "File", "backend_path": mem_file_path},
            "resume_vm": True,
            "vsock_override": {"uds_path": uds_path},
        },
    )


def memory_file_for(snapshot: Path) -> Path:
    """Firecracker writes VM state and guest memory to two files; memory goes next to it."""
    return snapshot.with_name(snapshot.name + ".mem")


# --------------------------------------------------------------------------- layout


@dataclass(frozen=True)
class JailerConfig:
    """Run Firecracker under ``jailer`` (see the module docstring for what it adds)."""

    binary: Path
    uid: int
    gid: int
    #: Where the jailer builds ``<base>/<exec name>/<id>/root``; default ``<workdir>/jail``.
    chroot_base: Path | None = None
    cgroup_version: Literal[1, 2] = 2
    #: Join this network namespace (a path such as /var/run/netns/NAME); None: none given.
    netns: Path | None = None


@dataclass(frozen=True)
class VmLayout:
    """Where one VM's files live on the host and how Firecracker names them."""

    vm_id: str
    workdir: Path
    #: The API socket as the host reaches it.
    api_socket: Path
    #: The hybrid vsock socket as the host reaches it.
    vsock_socket: Path
    console: Path
    argv: tuple[str, ...]
    #: Chroot root under the jailer; None without it.
    chroot: Path | None = None
    #: Host files to hard-link into the chroot (host path -> path inside the chroot).
    links: tuple[tuple[Path, str], ...] = ()
    #: Host path -> the path to write in API requests.
    _names: dict[str, str] = field(default_factory=dict)

    def name(self, host_path: Path) -> str:
        """The path Firecracker must be given for ``host_path`` (chroot-relative when jailed)."""
        return self._names.get(str(host_path), str(host_path))


def plan_layout(
    spec: VmSpec, firecracker: Path, jailer: JailerConfig | None = None, vm_id: str = ""
) -> VmLayout:
    """Paths and argv for one VM, without touching the file system."""
    vm_id = vm_id or f"stockade-{uuid.uuid4().hex[:16]}"
    if not _VM_ID.fullmatch(vm_id):
        raise ValueError(f"Firecracker VM ids are 1-64 letters, digits or '-', not {vm_id!r}")
    console = spec.workdir / "console.log"
    if jailer is None:
        api = spec.workdir / "firecracker.sock"
        argv = (str(firecracker), "--api-sock", str(api), "--id", vm_id)
        return VmLayout(vm_id, spec.workdir, api, spec.agent.socket_path, console, argv)
    base = jailer.chroot_base or spec.workdir / "jail"
    root = base / firecracker.name / vm_id / "root"
    names: dict[str, str] = {}
    links: list[tuple[Path, str]] = []
    for index, host in enumerate([spec.kernel, spec.initrd, *(d.path for d in spec.disks)]):
        inside = f"/f{index}-{host.name}"
        names[str(host)] = inside
        links.append((host, inside))
    vsock_inside = "/v.sock"
    names[str(spec.agent.socket_path)] = vsock_inside
    argv_list = [
        str(jailer.binary),
        "--id",
        vm_id,
        "--exec-file",
        str(firecracker),
        "--uid",
        str(jailer.uid),
        "--gid",
        str(jailer.gid),
        "--chroot-base-dir",
        str(base),
        "--cgroup-version",
        str(jailer.cgroup_version),
    ]
    if jailer.netns is not None:
        argv_list += ["--netns", str(jailer.netns)]
    argv_list += ["--", "--api-sock", "/api.sock", "--id", vm_id]
    return VmLayout(
        vm_id,
        spec.workdir,
        root / "api.sock",
        root / vsock_inside.lstrip("/"),
        console,
        tuple(argv_list),
        chroot=root,
        links=tuple(links),
        _names=names,
    )


def boot_requests(spec: VmSpec, layout: VmLayout) -> list[ApiRequest]:
    """Everything before InstanceStart, in the order it is sent."""
    if spec.agent.kind != "vsock":
        raise ValueError(
            f"Firecracker has no virtio-serial; the agent transport must be vsock, not "
            f"{spec.agent.kind!r}"
        )
    boot_args = f"{spec.cmdline} {FIRECRACKER_BOOT_ARGS}".strip()
    requests = [boot_source_request(layout.name(spec.kernel), layout.name(spec.initrd), boot_args)]
    requests += [drive_request(d, layout.name(d.path)) for d in spec.disks]
    requests.append(machine_config_request(spec.vcpus, spec.memory_mib))
    requests.append(vsock_request(spec.agent.cid, layout.name(spec.agent.socket_path)))
    return requests


# --------------------------------------------------------------------------- API client


class FirecrackerApiError(VmmApiError):
    """Firecracker refused an API call (HTTP 4xx/5xx) or its API socket did not answer."""

    def __init__(self, message: str, *, status: int = 0, fault: str = "") -> None:
        super().__init__(message, status=status)
        self.fault = fault


class FirecrackerApi(VmmApi):
    """HTTP over Firecracker's unix API socket."""

    vmm = FIRECRACKER
    error = FirecrackerApiError

    def __init__(self, socket_path: Path, *, timeout: float = 10.0) -> None:
        super().__init__(
            socket_path,
            base_url="http://localhost",
            timeout=timeout,
            headers={"Accept": "application/json"},
        )

    async def ping(self) -> None:
        await self._client.get("/")

    async def send(self, request: ApiRequest) -> Any:
        """Send one request; return the decoded JSON answer (None for 204)."""
        import httpx

        try:
            response = await self._client.request(request.method, request.path, json=request.body)
        except httpx.HTTPError as exc:
            raise FirecrackerApiError(
                f"Firecracker's API socket {self.socket_path} failed on {request.method} "
                f"{request.path}: {exc!r}; see the VM console for why the process stopped"
            ) from exc
        if response.is_success:
            return response.json() if response.content else None
        fault = ""
        with contextlib.suppress(ValueError, AttributeError):
            fault = str(response.json().get("fault_message", ""))
        raise FirecrackerApiError(
            f"Firecracker refused {request.method} {request.path} with HTTP "
            f"{response.status_code}: {fault or response.text[:500]!r}",
            status=response.status_code,
            fault=fault,
        )


async def configure_and_start(api: FirecrackerApi, spec: VmSpec, layout: VmLayout) -> None:
    """Send the boot configuration and ``InstanceStart``."""
    for request in boot_requests(spec, layout):
        await api.send(request)
    await api.send(instance_start_request())


async def take_snapshot(api: FirecrackerApi, layout: VmLayout, snapshot: Path) -> None:
    """Pause the VM and write its state to ``snapshot`` (memory: ``memory_file_for``)."""
    await api.send(pause_request())
    await api.send(
        snapshot_create_request(layout.name(snapshot), layout.name(memory_file_for(snapshot)))
    )


async def load_snapshot(
    api: FirecrackerApi, spec: VmSpec, layout: VmLayout, snapshot: Path
) -> None:
    """On a fresh process: load ``snapshot`` and resume, the vsock socket at this VM's path."""
    await api.send(
        snapshot_load_request(
            layout.name(snapshot),
            layout.name(memory_file_for(snapshot)),
            layout.name(spec.agent.socket_path),
        )
    )


# --------------------------------------------------------------------------- handle, driver


class FirecrackerVm(VmmVm):
    """A running Firecracker VM."""

    api: FirecrackerApi

    def __init__(
        self, process: VmmProcess, api: FirecrackerApi, layout: VmLayout, channel: ByteStream
    ) -> None:
        super().__init__(process, channel, api)
        self.layout = layout

    async def snapshot(self, path: Path) -> None:
        if self.layout.chroot is not None:
            raise NotImplementedError(
                "snapshots of a jailed Firecracker VM would be written inside its chroot; "
                "run without the jailer to take snapshots"
            )
        await take_snapshot(self.api, self.layout, path)

    async def stop(self, grace: float = 1.0) -> None:
        await super().stop(grace)
        for path in (self.layout.api_socket, self.layout.vsock_socket):
            with contextlib.suppress(OSError):
                if path.is_socket():
                    path.unlink()


class FirecrackerDriver(KvmApiVmmDriver):
    """Firecracker (Linux, hardware KVM); optionally under its jailer."""

    name: ClassVar[str] = "firecracker"
    capabilities: ClassVar[DriverCapabilities] = DriverCapabilities(
        snapshot=True, vsock=True, virtio_serial=False
    )
    vmm = FIRECRACKER

    def __init__(
        self,
        binary: Path | str | None = None,
        *,
        jailer: JailerConfig | None = None,
        api_timeout: float = 10.0,
        boot_timeout: float = 30.0,
    ) -> None:
        super().__init__(binary, api_timeout=api_timeout, boot_timeout=boot_timeout)
        self.jailer = jailer

    async def boot(self, spec: VmSpec) -> FirecrackerVm:
        return await self._launch(spec, snapshot=None)

    async def restore(self, spec: VmSpec, snapshot: Path) -> FirecrackerVm:
        if self.jailer is not None:
            raise NotImplementedError("restoring under the jailer is not supported yet")
        for path in (snapshot, memory_file_for(snapshot)):
            if not path.is_file():
                raise SandboxStartError(f"snapshot file {path} is missing; take the snapshot again")
        return await self._launch(spec, snapshot=snapshot)

    async def _launch(self, spec: VmSpec, snapshot: Path | None) -> FirecrackerVm:
        layout = plan_layout(spec, self._binary(), self.jailer)
        prepare_workdir(spec.workdir)
        remove_stale_socket(layout.api_socket)
        remove_stale_socket(layout.vsock_socket)
        if self.jailer is not None:
            await anyio.to_thread.run_sync(_populate_chroot, layout, spec, self.jailer)
        process = await VmmProcess.start("firecracker", list(layout.argv), layout.console)
        api = FirecrackerApi(layout.api_socket, timeout=self.api_timeout)

        async def configure() -> None:
            if snapshot is None:
                await configure_and_start(api, spec, layout)
            else:
                await load_snapshot(api, spec, layout, snapshot)

        channel = await reach_agent(
            process,
            api,
            what=f"Firecracker VM {layout.vm_id}",
            vsock_socket=layout.vsock_socket,
            port=spec.agent.port,
            api_timeout=self.api_timeout,
            boot_timeout=self.boot_timeout,
            configure=configure,
        )
        return FirecrackerVm(process, api, layout, channel)


def _populate_chroot(layout: VmLayout, spec: VmSpec, jailer: JailerConfig) -> None:
    """Hard-link the VM's files into the jailer's chroot (the jailer copies only its binary).

    Writable disks are handed to the jail's uid/gid (a hard link shares the inode, so the
    per-sandbox disk file itself changes owner); read-only images must be world-readable.
    """
    assert layout.chroot is not None
    layout.chroot.mkdir(parents=True, exist_ok=True)
    writable = {str(d.path) for d in spec.disks if not d.read_only}
    for host, inside in layout.links:
        target = layout.chroot / inside.lstrip("/")
        with contextlib.suppress(FileNotFoundError):
            target.unlink()
        try:
            os.link(host, target)
        except OSError as exc:
            if exc.errno == errno.EXDEV:
                raise SandboxStartError(
                    f"cannot hard-link {host} into the jailer's chroot {layout.chroot}: they are "
                    "on different file systems; put the VM directory on the same file system "
                    "as the image cache"
                ) from exc
            raise
        if str(host) in writable:
            os.chown(target, jailer.uid, jailer.gid)


def probe_firecracker(configured: str | None = None) -> Availability:
    """Is Firecracker usable here? Never raises."""
    return probe_kvm_vmm(FIRECRACKER, configured)
