"""vfkit driver (macOS 13+, Apple's Virtualization.framework).

Boot: ``vfkit --cpus N --memory M --bootloader linux,kernel=K,initrd=I,cmdline="..."
--device virtio-blk,path=<disk>[,readonly] ... --device virtio-vsock,port=P,socketURL=<agent
socket>,listen --device virtio-serial,logFilePath=<workdir>/console.log --restful-uri
unix://<workdir>/vfkit.sock``. With ``listen`` the host listens on the agent socket *before*
vfkit starts and the guest connects out to the host (CID 2) on port P; vfkit forwards that
connection to the socket, so the accepted connection is the agent channel and its arrival
means the agent is up (as with QEMU's virtio-serial, there is no handshake to poll). The
guest side must therefore dial out on vsock rather than listen. The REST socket is used
for a graceful ``Stop`` before the process is signalled.

macOS has no KVM, so this is the only hardware-accelerated tier there; the guest image
must match the Mac's architecture (arm64 on Apple silicon) and the kernel must be an
uncompressed image. vfkit cannot snapshot VMs.
"""

from __future__ import annotations

import functools
import platform
import sys
from pathlib import Path
from typing import Any, ClassVar

import anyio
from anyio.abc import ByteStream, SocketListener

from stockade._errors import SandboxStartError
from stockade.backends.base import Availability
from stockade.backends.microvm._vmm_common import (
    VmmBinary,
    VmmDriver,
    VmmProcess,
    VmmVm,
    check_resources,
    find_binary,
    option_value,
    prepare_workdir,
    remove_stale_socket,
)
from stockade.backends.microvm.driver import DriverCapabilities, VmSpec

__all__ = [
    "VFKIT",
    "VFKIT_CMDLINE",
    "VfkitDriver",
    "VfkitVm",
    "boot_argv",
    "probe_vfkit",
    "vm_state_body",
]

#: Appended to the backend's command line: the virtio console is hvc0 on Virtualization.framework.
VFKIT_CMDLINE = "console=hvc0"

INSTALL_FIX = (
    "on macOS 13 or later: 'brew install vfkit' (or a release from "
    "https://github.com/crc-org/vfkit/releases), or set STOCKADE_VFKIT to its path"
)

VFKIT = VmmBinary("vfkit", "vfkit", "STOCKADE_VFKIT", INSTALL_FIX)

REST_SOCKET = "vfkit.sock"
SERIAL_FILE = "console.log"
VMM_LOG = "vmm.log"

MIN_MACOS = (13, 0)


#: vfkit splits ``--device`` options at every comma; refuse values it would misread.
_value = functools.partial(option_value, vmm="vfkit", forbidden=',"')


def boot_argv(binary: Path, spec: VmSpec) -> list[str]:
    if spec.agent.kind != "vsock":
        raise ValueError(f"the vfkit driver reaches the agent over vsock, not {spec.agent.kind!r}")
    check_resources(spec)
    cmdline = f"{spec.cmdline} {VFKIT_CMDLINE}".strip()
    if '"' in cmdline or "," in cmdline:
        raise ValueError(
            f"the kernel command line {cmdline!r} contains a comma or a double quote, which "
            "vfkit's --bootloader option cannot carry"
        )
    bootloader = (
        f"linux,kernel={_value(str(spec.kernel), 'the kernel path')},"
        f"initrd={_value(str(spec.initrd), 'the initrd path')},"
        f'cmdline="{cmdline}"'
    )
    argv = [
        str(binary),
        "--cpus",
        str(spec.vcpus),
        "--memory",
        str(spec.memory_mib),
        "--bootloader",
        bootloader,
    ]
    for disk in spec.disks:
        device = f"virtio-blk,path={_value(str(disk.path), 'the disk path')}"
        argv += ["--device", device + (",readonly" if disk.read_only else "")]
    socket = _value(str(spec.agent.socket_path), "the vsock socket path")
    argv += ["--device", f"virtio-vsock,port={spec.agent.port},socketURL={socket},listen"]
    console = _value(str(spec.workdir / SERIAL_FILE), "the console path")
    argv += ["--device", f"virtio-serial,logFilePath={console}"]
    argv += ["--restful-uri", f"unix://{spec.workdir / REST_SOCKET}"]
    return argv


def vm_state_body(state: str) -> dict[str, Any]:
    """Body of ``POST /vm/state`` on vfkit's REST socket."""
    if state not in {"Running", "Stop", "HardStop", "Pause", "Resume"}:
        raise ValueError(f"vfkit knows no VM state {state!r}")
    return {"state": state}


class VfkitVm(VmmVm):
    def __init__(self, process: VmmProcess, channel: ByteStream, rest_socket: Path) -> None:
        super().__init__(process, channel)
        self.rest_socket = rest_socket

    async def _shutdown(self) -> None:
        """A graceful ``Stop`` over the REST socket; wait for vfkit to exit."""
        import httpx

        async with httpx.AsyncClient(
            transport=httpx.AsyncHTTPTransport(uds=str(self.rest_socket)),
            base_url="http://localhost",
        ) as client:
            await client.post("/vm/state", json=vm_state_body("Stop"))
        while self.process.alive():
            await anyio.sleep(0.05)


class VfkitDriver(VmmDriver):
    """vfkit on macOS 13+."""

    name: ClassVar[str] = "vfkit"
    capabilities: ClassVar[DriverCapabilities] = DriverCapabilities(
        snapshot=False, vsock=True, virtio_serial=False
    )
    vmm = VFKIT

    @classmethod
    def probe(cls) -> Availability:
        return probe_vfkit(cls.vmm.from_env())

    async def boot(self, spec: VmSpec) -> VfkitVm:
        argv = boot_argv(self._binary(), spec)
        prepare_workdir(spec.workdir)
        remove_stale_socket(spec.agent.socket_path)
        remove_stale_socket(spec.workdir / REST_SOCKET)
        listener = await anyio.create_unix_listener(spec.agent.socket_path)
        try:
            process = await VmmProcess.start(
                "vfkit", argv, spec.workdir / VMM_LOG, serial_path=spec.workdir / SERIAL_FILE
            )
            try:
                channel = await _accept_agent(listener, process, self.boot_timeout)
            except BaseException:
                with anyio.CancelScope(shield=True):
                    await process.stop(0.2)
                raise
        finally:
            await listener.aclose()
        return VfkitVm(process, channel, spec.workdir / REST_SOCKET)


async def _accept_agent(
    listener: SocketListener, process: VmmProcess, timeout: float
) -> ByteStream:
    """The guest's first connection, or an error once vfkit exits or ``timeout`` passes."""
    result: list[ByteStream] = []

    async def accept(scope: anyio.CancelScope) -> None:
        result.append(await listener.accept())
        scope.cancel()

    with anyio.move_on_after(timeout):
        async with anyio.create_task_group() as tg:
            tg.start_soon(accept, tg.cancel_scope)
            while process.alive():
                await anyio.sleep(0.05)
            tg.cancel_scope.cancel()
    if result:
        return result[0]
    why = "vfkit exited" if not process.alive() else f"no connection within {timeout:g} s"
    raise SandboxStartError(
        f"the guest agent never connected to {process.name}'s vsock socket ({why})"
        f"\n--- console ---\n{process.console()}"
    )


def probe_vfkit(configured: str | None = None) -> Availability:
    """Is vfkit usable here? Never raises."""
    if sys.platform != "darwin":
        return Availability(
            False,
            f"vfkit runs only on macOS 13 or later (Virtualization.framework); this host is "
            f"{platform.system() or sys.platform}",
            "on Linux use the firecracker, cloud-hypervisor or qemu driver; " + INSTALL_FIX,
        )
    release = platform.mac_ver()[0]
    try:
        version = tuple(int(p) for p in release.split(".")[:2])
    except ValueError:
        version = ()
    if version and version < MIN_MACOS:
        return Availability(
            False,
            f"vfkit needs macOS 13 or later; this is macOS {release}",
            "upgrade macOS, or use the qemu driver",
        )
    binary = find_binary(VFKIT.name, configured)
    if binary is None:
        return Availability(False, VFKIT.not_found(configured), INSTALL_FIX)
    return Availability(True, details=(f"binary: {binary}", f"macOS {release}"))
