"""Cloud Hypervisor driver: the VM is described on the command line, controlled over REST.

Boot: ``cloud-hypervisor --api-socket path=<workdir>/ch.sock --kernel K --initramfs I
--cmdline "..." --cpus boot=N --memory size=<M>M --disk path=<root>,readonly=on,id=root
path=<work>,id=work --vsock cid=3,socket=<agent socket> --serial file=<workdir>/console.log
--console off``, then the agent is reached through the hybrid vsock socket (the same
``CONNECT <port>`` / ``OK <n>`` protocol as Firecracker). Snapshot: ``PUT
/api/v1/vm.pause`` then ``PUT /api/v1/vm.snapshot {"destination_url": "file://DIR"}``
(the VM stays paused). Restore: a bare ``cloud-hypervisor --api-socket ...``, ``PUT
/api/v1/vm.restore {"source_url": "file://DIR"}`` and ``PUT /api/v1/vm.resume``. The
snapshot records host paths (the vsock socket, the console file), so a restore in another
VM directory restores from a copy whose ``config.json`` names the new ones (the memory and
state files are hard-linked, not copied).

Cloud Hypervisor uses virtio-pci devices and needs hardware KVM. It has no ``-no-reboot``:
a guest reboot (or a panic, with ``panic=-1``) restarts the guest rather than ending the
process, which the backend sees as the agent channel closing.
"""

from __future__ import annotations

import functools
import json
import os
import shutil
from pathlib import Path
from typing import Any, ClassVar

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
    check_resources,
    option_value,
    prepare_workdir,
    probe_kvm_vmm,
    reach_agent,
    remove_stale_socket,
)
from stockade.backends.microvm.driver import DriverCapabilities, VmSpec

__all__ = [
    "CH_CMDLINE",
    "CLOUD_HYPERVISOR",
    "CloudHypervisorApi",
    "CloudHypervisorApiError",
    "CloudHypervisorDriver",
    "CloudHypervisorVm",
    "boot_argv",
    "probe_cloud_hypervisor",
    "rebase_snapshot",
    "restore_and_resume",
    "restore_argv",
    "restore_body",
    "snapshot_body",
    "take_snapshot",
]

#: Appended to the backend's command line: serial console on ttyS0 (to the console file).
CH_CMDLINE = "console=ttyS0 panic=-1"

INSTALL_FIX = (
    "on a Linux host with hardware KVM, download the static 'cloud-hypervisor' binary from "
    "https://github.com/cloud-hypervisor/cloud-hypervisor/releases, put it on PATH (or set "
    "STOCKADE_CLOUD_HYPERVISOR to its path) and make /dev/kvm readable and writable for your "
    "user"
)

CLOUD_HYPERVISOR = VmmBinary(
    "Cloud Hypervisor", "cloud-hypervisor", "STOCKADE_CLOUD_HYPERVISOR", INSTALL_FIX
)

API_SOCKET = "ch.sock"
SERIAL_FILE = "console.log"
VMM_LOG = "vmm.log"


#: Cloud Hypervisor splits option lists at commas; refuse values it would misread.
_option_value = functools.partial(option_value, vmm="Cloud Hypervisor", forbidden=',"[]')


def boot_argv(binary: Path, spec: VmSpec) -> list[str]:
    """The full command line of one VM."""
    if spec.agent.kind != "vsock":
        raise ValueError(
            "the Cloud Hypervisor driver reaches the agent over vsock; the agent transport "
            f"must be vsock, not {spec.agent.kind!r}"
        )
    check_resources(spec)
    if spec.agent.cid < 3:
        raise ValueError(f"a guest vsock CID is 3 or more, not {spec.agent.cid}")
    workdir = spec.workdir
    argv = [
        str(binary),
        "--api-socket",
        f"path={_option_value(str(workdir / API_SOCKET), 'the API socket path')}",
        "--kernel",
        str(spec.kernel),
        "--initramfs",
        str(spec.initrd),
        "--cmdline",
        f"{spec.cmdline} {CH_CMDLINE}".strip(),
        "--cpus",
        f"boot={spec.vcpus}",
        "--memory",
        f"size={spec.memory_mib}M",
    ]
    if spec.disks:
        argv.append("--disk")
        for disk in spec.disks:
            value = f"path={_option_value(str(disk.path), 'the disk path')}"
            if disk.read_only:
                value += ",readonly=on"
            argv.append(value + f",id={_option_value(disk.drive_id, 'the drive id')}")
    socket = _option_value(str(spec.agent.socket_path), "the vsock socket path")
    argv += ["--vsock", f"cid={spec.agent.cid},socket={socket}"]
    argv += ["--serial", f"file={_option_value(str(workdir / SERIAL_FILE), 'the console path')}"]
    argv += ["--console", "off"]
    return argv


def restore_argv(binary: Path, workdir: Path) -> list[str]:
    """A VMM with only its API socket: the VM comes from ``vm.restore``."""
    return [str(binary), "--api-socket", f"path={workdir / API_SOCKET}"]


def snapshot_body(directory: Path) -> dict[str, Any]:
    return {"destination_url": f"file://{directory}"}


def restore_body(directory: Path) -> dict[str, Any]:
    return {"source_url": f"file://{directory}", "prefault": False}


def rebase_snapshot(snapshot: Path, target: Path, spec: VmSpec) -> Path:
    """A copy of ``snapshot`` in ``target`` whose host paths are those of ``spec``'s VM.

    Only ``config.json`` is rewritten (vsock socket, serial file); the other files (memory,
    device state) are hard-linked, or copied across file systems.
    """
    config_path = snapshot / "config.json"
    try:
        config = json.loads(config_path.read_text())
    except (OSError, ValueError) as exc:
        raise SandboxStartError(
            f"{config_path} is not a readable Cloud Hypervisor snapshot config ({exc}); "
            "take the snapshot again"
        ) from exc
    if not isinstance(config, dict) or not isinstance(config.get("vsock"), dict):
        raise SandboxStartError(
            f"{config_path} has no vsock device; it was not taken by this driver"
        )
    config["vsock"]["socket"] = str(spec.agent.socket_path)
    serial = config.get("serial")
    if isinstance(serial, dict) and serial.get("file") is not None:
        serial["file"] = str(spec.workdir / SERIAL_FILE)
    if target.exists():
        shutil.rmtree(target)
    target.mkdir(mode=0o700, parents=True)
    for entry in snapshot.iterdir():
        if entry.name == "config.json":
            continue
        try:
            os.link(entry, target / entry.name)
        except OSError:
            shutil.copy2(entry, target / entry.name)
    (target / "config.json").write_text(json.dumps(config))
    return target


class CloudHypervisorApiError(VmmApiError):
    """Cloud Hypervisor refused an API call or its API socket did not answer."""


class CloudHypervisorApi(VmmApi):
    """HTTP over the ``--api-socket`` unix socket (endpoints under ``/api/v1``)."""

    vmm = CLOUD_HYPERVISOR
    error = CloudHypervisorApiError

    def __init__(self, socket_path: Path, *, timeout: float = 10.0) -> None:
        super().__init__(socket_path, base_url="http://localhost/api/v1", timeout=timeout)

    async def ping(self) -> None:
        await self.call("GET", "vmm.ping")

    async def call(self, method: str, endpoint: str, body: dict[str, Any] | None = None) -> Any:
        import httpx

        try:
            response = await self._client.request(method, f"/{endpoint}", json=body)
        except httpx.HTTPError as exc:
            raise CloudHypervisorApiError(
                f"Cloud Hypervisor's API socket {self.socket_path} failed on {method} "
                f"{endpoint}: {exc!r}"
            ) from exc
        if not response.is_success:
            raise CloudHypervisorApiError(
                f"Cloud Hypervisor refused {method} {endpoint} with HTTP "
                f"{response.status_code}: {response.text[:500]!r}",
                status=response.status_code,
            )
        return response.json() if response.content else None


async def take_snapshot(api: CloudHypervisorApi, directory: Path) -> None:
    directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    await api.call("PUT", "vm.pause")
    await api.call("PUT", "vm.snapshot", snapshot_body(directory))


async def restore_and_resume(api: CloudHypervisorApi, directory: Path) -> None:
    await api.call("PUT", "vm.restore", restore_body(directory))
    await api.call("PUT", "vm.resume")


class CloudHypervisorVm(VmmVm):
    api: CloudHypervisorApi

    def __init__(self, process: VmmProcess, api: CloudHypervisorApi, channel: ByteStream):
        super().__init__(process, channel, api)

    async def snapshot(self, path: Path) -> None:
        """``path`` is a directory (Cloud Hypervisor writes config, state and memory files)."""
        await take_snapshot(self.api, path)

    async def _shutdown(self) -> None:
        await self.api.call("PUT", "vmm.shutdown")


class CloudHypervisorDriver(KvmApiVmmDriver):
    """Cloud Hypervisor (Linux, hardware KVM)."""

    name: ClassVar[str] = "cloud-hypervisor"
    capabilities: ClassVar[DriverCapabilities] = DriverCapabilities(
        snapshot=True, vsock=True, virtio_serial=False
    )
    vmm = CLOUD_HYPERVISOR

    async def boot(self, spec: VmSpec) -> CloudHypervisorVm:
        argv = boot_argv(self._binary(), spec)
        return await self._launch(spec, argv, snapshot=None)

    async def restore(self, spec: VmSpec, snapshot: Path) -> CloudHypervisorVm:
        prepare_workdir(spec.workdir)
        rebased = await anyio.to_thread.run_sync(
            rebase_snapshot, snapshot, spec.workdir / "restore", spec
        )
        return await self._launch(spec, restore_argv(self._binary(), spec.workdir), rebased)

    async def _launch(
        self, spec: VmSpec, argv: list[str], snapshot: Path | None
    ) -> CloudHypervisorVm:
        prepare_workdir(spec.workdir)
        api_socket = spec.workdir / API_SOCKET
        remove_stale_socket(api_socket)
        remove_stale_socket(spec.agent.socket_path)
        process = await VmmProcess.start(
            "cloud-hypervisor",
            argv,
            spec.workdir / VMM_LOG,
            serial_path=spec.workdir / SERIAL_FILE,
        )
        api = CloudHypervisorApi(api_socket, timeout=self.api_timeout)

        async def restore() -> None:
            if snapshot is not None:
                await restore_and_resume(api, snapshot)

        channel = await reach_agent(
            process,
            api,
            what="Cloud Hypervisor VM",
            vsock_socket=spec.agent.socket_path,
            port=spec.agent.port,
            api_timeout=self.api_timeout,
            boot_timeout=self.boot_timeout,
            configure=restore,
        )
        return CloudHypervisorVm(process, api, channel)


def probe_cloud_hypervisor(configured: str | None = None) -> Availability:
    """Is Cloud Hypervisor usable here? Never raises."""
    return probe_kvm_vmm(CLOUD_HYPERVISOR, configured)
