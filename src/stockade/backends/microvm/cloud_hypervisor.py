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

import contextlib
import json
import os
import shutil
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, ClassVar

import anyio
import httpx
from anyio.abc import ByteStream

from stockade._errors import SandboxStartError
from stockade.backends.base import Availability
from stockade.backends.microvm._vmm_common import (
    VmmProcess,
    find_binary,
    kvm_status,
    prepare_workdir,
    remove_stale_socket,
)
from stockade.backends.microvm.driver import Driver, DriverCapabilities, VmHandle, VmSpec
from stockade.backends.microvm.hybrid_vsock import HybridVsockError, wait_hybrid_vsock

__all__ = [
    "CH_CMDLINE",
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

API_SOCKET = "ch.sock"
SERIAL_FILE = "console.log"
VMM_LOG = "vmm.log"


def _option_value(value: str, what: str) -> str:
    """Cloud Hypervisor splits option lists at commas; refuse values it would misread."""
    bad = sorted(set(value) & set(',"[]'))
    if bad:
        raise ValueError(
            f"{what} {value!r} contains {''.join(bad)!r}, which Cloud Hypervisor's option "
            "parser would split or misread; rename the file"
        )
    return value


def boot_argv(binary: Path, spec: VmSpec) -> list[str]:
    """The full command line of one VM."""
    if spec.agent.kind != "vsock":
        raise ValueError(
            "the Cloud Hypervisor driver reaches the agent over vsock; the agent transport "
            f"must be vsock, not {spec.agent.kind!r}"
        )
    if spec.vcpus < 1 or spec.memory_mib < 1:
        raise ValueError(f"need at least 1 vCPU and 1 MiB, not {spec.vcpus} / {spec.memory_mib}")
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


class CloudHypervisorApiError(SandboxStartError):
    """Cloud Hypervisor refused an API call or its API socket did not answer."""

    def __init__(self, message: str, *, status: int = 0) -> None:
        super().__init__(message)
        self.status = status


class CloudHypervisorApi:
    """HTTP over the ``--api-socket`` unix socket (endpoints under ``/api/v1``)."""

    def __init__(self, socket_path: Path, *, timeout: float = 10.0) -> None:
        self.socket_path = socket_path
        self._client = httpx.AsyncClient(
            transport=httpx.AsyncHTTPTransport(uds=str(socket_path)),
            base_url="http://localhost/api/v1",
            timeout=timeout,
        )

    async def aclose(self) -> None:
        await self._client.aclose()

    async def call(self, method: str, endpoint: str, body: dict[str, Any] | None = None) -> Any:
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

    async def wait_ready(self, *, timeout: float, alive: Callable[[], bool] = lambda: True) -> None:
        deadline = anyio.current_time() + timeout
        last: BaseException | None = None
        while anyio.current_time() < deadline:
            if not alive():
                raise CloudHypervisorApiError(
                    f"cloud-hypervisor exited before its API socket {self.socket_path} answered"
                )
            try:
                await self.call("GET", "vmm.ping")
                return
            except CloudHypervisorApiError as exc:
                last = exc
            await anyio.sleep(0.01)
        raise CloudHypervisorApiError(
            f"Cloud Hypervisor's API socket {self.socket_path} did not answer within "
            f"{timeout:g} s (last error: {last})"
        )


async def take_snapshot(api: CloudHypervisorApi, directory: Path) -> None:
    directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    await api.call("PUT", "vm.pause")
    await api.call("PUT", "vm.snapshot", snapshot_body(directory))


async def restore_and_resume(api: CloudHypervisorApi, directory: Path) -> None:
    await api.call("PUT", "vm.restore", restore_body(directory))
    await api.call("PUT", "vm.resume")


class CloudHypervisorVm(VmHandle):
    def __init__(self, process: VmmProcess, api: CloudHypervisorApi, channel: ByteStream):
        self.process = process
        self.api = api
        self.channel = channel

    def alive(self) -> bool:
        return self.process.alive()

    def console(self) -> str:
        return self.process.console()

    def exit_reason(self) -> str | None:
        return self.process.exit_reason()

    async def snapshot(self, path: Path) -> None:
        """``path`` is a directory (Cloud Hypervisor writes config, state and memory files)."""
        await take_snapshot(self.api, path)

    async def stop(self, grace: float = 1.0) -> None:
        with anyio.CancelScope(shield=True):
            with contextlib.suppress(Exception):
                await self.channel.aclose()
            if self.process.alive():
                with contextlib.suppress(Exception), anyio.move_on_after(grace):
                    await self.api.call("PUT", "vmm.shutdown")
            with contextlib.suppress(Exception):
                await self.api.aclose()
            await self.process.stop(grace)


class CloudHypervisorDriver(Driver):
    """Cloud Hypervisor (Linux, hardware KVM)."""

    name: ClassVar[str] = "cloud-hypervisor"
    capabilities: ClassVar[DriverCapabilities] = DriverCapabilities(
        snapshot=True, vsock=True, virtio_serial=False
    )

    def __init__(
        self,
        binary: Path | str | None = None,
        *,
        api_timeout: float = 10.0,
        boot_timeout: float = 30.0,
    ) -> None:
        self.binary = Path(binary) if binary is not None else None
        self.api_timeout = api_timeout
        self.boot_timeout = boot_timeout

    @classmethod
    def probe(cls) -> Availability:
        return probe_cloud_hypervisor(os.environ.get("STOCKADE_CLOUD_HYPERVISOR") or None)

    def _binary(self) -> Path:
        configured = self.binary or os.environ.get("STOCKADE_CLOUD_HYPERVISOR") or None
        found = find_binary("cloud-hypervisor", configured)
        if found is None:
            where = f"at {configured}" if configured else "on PATH"
            raise SandboxStartError(f"cloud-hypervisor not found {where}; {INSTALL_FIX}")
        return found

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
        try:
            await api.wait_ready(timeout=self.api_timeout, alive=process.alive)
            if snapshot is not None:
                await restore_and_resume(api, snapshot)
            channel = await wait_hybrid_vsock(
                spec.agent.socket_path,
                spec.agent.port,
                timeout=self.boot_timeout,
                alive=process.alive,
                describe=process.console,
            )
        except SandboxStartError as exc:
            with anyio.CancelScope(shield=True):
                await api.aclose()
                await process.stop(0.2)
            if isinstance(exc, HybridVsockError):
                raise
            raise SandboxStartError(
                f"Cloud Hypervisor VM did not start: {exc}\n--- console ---\n{process.console()}"
            ) from exc
        except BaseException:
            with anyio.CancelScope(shield=True):
                await api.aclose()
                await process.stop(0.2)
            raise
        return CloudHypervisorVm(process, api, channel)


def probe_cloud_hypervisor(configured: str | None = None) -> Availability:
    """Is Cloud Hypervisor usable here? Never raises."""
    if not sys.platform.startswith("linux"):
        return Availability(
            False,
            f"Cloud Hypervisor runs only on Linux with KVM; this host is {sys.platform}",
            "use the vfkit driver on macOS, or the qemu driver",
        )
    problems: list[str] = []
    binary = find_binary("cloud-hypervisor", configured)
    if binary is None:
        where = f"at {configured} (STOCKADE_CLOUD_HYPERVISOR)" if configured else "on PATH"
        problems.append(f"cloud-hypervisor not found {where}")
    kvm = kvm_status()
    if not kvm.ok:
        problems.append(kvm.reason)
    if problems:
        return Availability(False, "; ".join(problems), INSTALL_FIX, details=tuple(problems))
    return Availability(True, details=(f"binary: {binary}",))
