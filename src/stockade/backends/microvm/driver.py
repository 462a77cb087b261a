"""The seam between the microVM backend and one virtual machine monitor (VMM).

A ``Driver`` boots a kernel, an initramfs and a read-only root image with the resources of
a ``VmSpec`` and hands back a ``VmHandle`` whose ``channel`` reaches the guest agent. It
knows nothing of exec, files or policy: the backend builds the spec, the one
``AgentClient`` talks over the channel. Drivers: QEMU ``-M microvm`` (KVM or TCG),
Firecracker and Cloud Hypervisor (Linux, KVM), vfkit (macOS).
"""

from __future__ import annotations

import abc
import contextlib
import os
import signal
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar, Literal

from anyio.abc import ByteStream

from stockade.backends.base import Availability

__all__ = [
    "AgentTransport",
    "DiskSpec",
    "Driver",
    "DriverCapabilities",
    "VmHandle",
    "VmSpec",
]

#: vsock port the guest agent listens on when the transport is vsock.
AGENT_VSOCK_PORT = 1024


@dataclass(frozen=True)
class DiskSpec:
    """One virtio-blk disk, in command-line order (the first is ``vda`` in the guest)."""

    path: Path
    read_only: bool
    #: Stable name for the drive (Firecracker ``drive_id``, QEMU ``id=``).
    drive_id: str


@dataclass(frozen=True)
class AgentTransport:
    """How the host reaches the guest agent.

    ``virtio-serial``: a virtserialport named ``agent`` whose chardev connects to
    ``socket_path``, on which the host listens *before* starting the VMM.
    ``vsock``: the agent listens on vsock ``port``; the host reaches it through
    ``/dev/vhost-vsock`` (QEMU, guest ``cid``) or the VMM's hybrid-vsock unix socket at
    ``socket_path`` (Firecracker / Cloud Hypervisor: ``CONNECT <port>\\n`` -> ``OK <n>\\n``).
    """

    kind: Literal["virtio-serial", "vsock"]
    socket_path: Path
    cid: int = 3
    port: int = AGENT_VSOCK_PORT


@dataclass(frozen=True)
class VmSpec:
    """Everything one VM boot needs; the same spec (same argv) is needed to restore."""

    kernel: Path
    initrd: Path
    disks: tuple[DiskSpec, ...]
    vcpus: int
    memory_mib: int
    #: Kernel command line from the backend (root, agent, workspace args); drivers append
    #: only what their machine model needs (console, timer fixes).
    cmdline: str
    #: Per-VM directory for sockets, logs and the console file (private, 0700).
    workdir: Path
    agent: AgentTransport
    #: Extra, driver-specific settings (e.g. {"accel": "tcg"}).
    options: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class DriverCapabilities:
    snapshot: bool = False
    vsock: bool = False
    virtio_serial: bool = False


class VmHandle(abc.ABC):
    """A running VM. ``channel`` is connected to the agent once ``boot``/``restore`` return."""

    channel: ByteStream

    @property
    @abc.abstractmethod
    def pid(self) -> int:
        """The VMM process's id."""

    @abc.abstractmethod
    def alive(self) -> bool:
        """True while the VMM process runs."""

    def kill_now(self) -> None:
        """SIGKILL the VMM process, synchronously, from any thread (a sandbox's timer)."""
        if self.alive():
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, signal.SIGKILL)

    @abc.abstractmethod
    async def stop(self, grace: float = 1.0) -> None:
        """End the VM; return only when the VMM process (and any helper) is gone. Repeatable."""

    @abc.abstractmethod
    def console(self) -> str:
        """Tail of the guest console / VMM log, for error messages and failed tests."""

    async def snapshot(self, path: Path) -> None:
        """Save the full VM state (memory + devices) to ``path``; the VM is left paused."""
        raise NotImplementedError(f"{type(self).__name__} cannot snapshot")

    async def resume(self) -> None:
        """Let a VM paused by ``snapshot`` run on (the backend snapshots live sandboxes)."""
        raise NotImplementedError(f"{type(self).__name__} cannot resume after a snapshot")

    def exit_reason(self) -> str | None:
        """Why the VM ended (e.g. 'guest poweroff', 'kernel panic'), once it has."""
        return None


class Driver(abc.ABC):
    """One VMM. Registered by name in ``stockade.backends.microvm`` (lazy imports)."""

    name: ClassVar[str]
    capabilities: ClassVar[DriverCapabilities]

    @classmethod
    @abc.abstractmethod
    def probe(cls) -> Availability:
        """Whether this VMM can run here (binary found, acceleration works); never raises."""

    @abc.abstractmethod
    async def boot(self, spec: VmSpec) -> VmHandle:
        """Start a VM and wait until the guest agent is reachable on the channel."""

    async def restore(self, spec: VmSpec, snapshot: Path) -> VmHandle:
        """Start a VM from a snapshot taken with the same spec."""
        raise NotImplementedError(f"the {self.name} driver cannot restore snapshots")
