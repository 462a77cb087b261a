"""The VMM drivers' process plumbing with real processes: start, reach the agent socket,
snapshot, restore, and a stop that verifies nothing survives.

No Firecracker or Cloud Hypervisor can run here (no binary, KVM is PVM-only), so the VMM
processes are stand-ins that serve the same control API (Firecracker's checked against its
OpenAPI spec) and a hybrid vsock socket. They test how the drivers drive a VMM process, not
isolation: no guest runs and no boundary is claimed.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import AsyncIterator
from pathlib import Path
from typing import TypeVar

import anyio
import pytest

from microvm_fakes import (
    ROOT_DISK,
    asyncio_only,  # noqa: F401 (fixture)
    socket_tmp,  # noqa: F401 (fixture)
    vm_spec,
    write_exiting_vmm,
    write_fake_vmm,
)
from stockade._errors import SandboxStartError
from stockade.backends.microvm._vmm_common import VmmProcess, VmmVm
from stockade.backends.microvm.cloud_hypervisor import CloudHypervisorDriver
from stockade.backends.microvm.driver import AgentTransport, VmSpec
from stockade.backends.microvm.firecracker import FirecrackerDriver, memory_file_for
from stockade.backends.microvm.vfkit import VfkitDriver

pytestmark = [pytest.mark.anyio, pytest.mark.timeout(60)]


def make_spec(base: Path, workdir: str = "vm") -> VmSpec:
    return vm_spec(
        base,
        base / workdir,
        disks=(ROOT_DISK,),
        vcpus=1,
        memory_mib=256,
        cmdline="quiet",
        create_files=True,
    )


def gone(pid: int) -> bool:
    """No such process, or only its zombie (it cannot run again)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return True
    return stat.rsplit(")", 1)[-1].split()[0] == "Z"


async def echo(channel: anyio.abc.ByteStream, data: bytes) -> bytes:
    await channel.send(data)
    return await channel.receive()


Vm = TypeVar("Vm", bound=VmmVm)


@contextlib.asynccontextmanager
async def stopped_after(vm: Vm, grace: float = 1.0) -> AsyncIterator[Vm]:
    """Use ``vm``, then stop it and check that its VMM process is gone."""
    try:
        yield vm
    finally:
        await vm.stop(grace)
    assert not vm.alive() and gone(vm.process.pid)


# --------------------------------------------------------------------------- VmmProcess


async def test_stop_kills_a_vmm_that_ignores_sigterm_and_its_children(tmp: Path) -> None:
    pidfile = tmp / "child.pid"
    script = f'trap "" TERM; sleep 300 & echo $! > {pidfile}; echo started; wait'
    process = await VmmProcess.start("stubborn", ["sh", "-c", script], tmp / "log")
    while not pidfile.exists() or not pidfile.read_text().strip():
        await anyio.sleep(0.01)
    child = int(pidfile.read_text())
    assert process.alive() and not gone(child)
    await process.stop(grace=0.2)
    assert not process.alive()
    assert gone(process.pid) and gone(child)
    assert process.exit_reason() == "stopped"
    await process.stop()  # repeatable


async def test_exit_reason_reads_the_console(tmp: Path) -> None:
    script = 'echo "[ 1.0] Kernel panic - not syncing: Attempted to kill init!"; exit 1'
    process = await VmmProcess.start("vmm", ["sh", "-c", script], tmp / "log")
    while process.alive():
        await anyio.sleep(0.01)
    assert process.exit_reason() == "kernel panic"
    assert "Attempted to kill init" in process.console()
    await process.stop()

    plain = await VmmProcess.start("vmm", ["sh", "-c", "exit 7"], tmp / "log2")
    await plain.process.wait()
    assert plain.exit_reason() == "vmm exited with status 7"
    await plain.stop()


async def test_a_missing_binary_is_a_start_error(tmp: Path) -> None:
    with pytest.raises(SandboxStartError, match="could not start vmm"):
        await VmmProcess.start("vmm", [str(tmp / "nope")], tmp / "log")


# --------------------------------------------------------------------------- Firecracker


async def test_firecracker_boot_snapshot_restore_stop(tmp: Path) -> None:
    binary = write_fake_vmm(tmp, "firecracker", "fake_firecracker_main")
    driver = FirecrackerDriver(binary, boot_timeout=20)
    spec = make_spec(tmp)
    async with stopped_after(await driver.boot(spec)) as vm:
        assert vm.alive()
        assert await echo(vm.channel, b"agent?") == b"agent?"
        assert "fake firecracker" in vm.console()
        assert oct(spec.workdir.stat().st_mode & 0o777) == "0o700"
        snap = tmp / "vm.snap"
        await vm.snapshot(snap)
        assert snap.is_file() and memory_file_for(snap).is_file()
    assert vm.exit_reason() == "stopped"
    assert not vm.layout.api_socket.exists()

    spec2 = make_spec(tmp, "vm2")
    async with stopped_after(await driver.restore(spec2, snap)) as restored:
        assert await echo(restored.channel, b"restored?") == b"restored?"
        assert spec2.agent.socket_path.is_socket()


async def test_firecracker_that_dies_during_boot_leaves_nothing(tmp: Path) -> None:
    binary = write_exiting_vmm(tmp, "firecracker", "Error: no KVM (fake)")
    with pytest.raises(SandboxStartError, match=r"exited before its API socket[\s\S]*no KVM"):
        await FirecrackerDriver(binary).boot(make_spec(tmp))


async def test_firecracker_whose_guest_never_listens_times_out_and_is_stopped(
    tmp: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    binary = write_fake_vmm(tmp, "firecracker", "fake_firecracker_main")
    started: list[int] = []
    original = VmmProcess.start

    async def spy(*args: object, **kwargs: object) -> VmmProcess:
        process = await original(*args, **kwargs)  # type: ignore[arg-type]
        started.append(process.pid)
        return process

    monkeypatch.setattr(VmmProcess, "start", spy)
    spec = make_spec(tmp)
    spec = dataclasses.replace(spec, agent=AgentTransport("vsock", spec.agent.socket_path, port=7))
    with pytest.raises(SandboxStartError, match="did not listen on vsock port 7"):
        await FirecrackerDriver(binary, boot_timeout=0.5).boot(spec)
    assert started and all(gone(pid) for pid in started)


# --------------------------------------------------------------------------- Cloud Hypervisor


async def test_cloud_hypervisor_boot_snapshot_restore_stop(tmp: Path) -> None:
    binary = write_fake_vmm(tmp, "cloud-hypervisor", "fake_cloud_hypervisor_main")
    driver = CloudHypervisorDriver(binary, boot_timeout=20)
    spec = make_spec(tmp)
    async with stopped_after(await driver.boot(spec)) as vm:
        assert await echo(vm.channel, b"agent?") == b"agent?"
        assert "fake cloud-hypervisor" in vm.console()
        await vm.snapshot(tmp / "snap")
        assert (tmp / "snap" / "config.json").is_file()

    spec2 = make_spec(tmp, "vm2")
    async with stopped_after(await driver.restore(spec2, tmp / "snap")) as restored:
        assert await echo(restored.channel, b"restored?") == b"restored?"


# --------------------------------------------------------------------------- vfkit


async def test_vfkit_listens_first_and_the_guest_connection_is_the_channel(tmp: Path) -> None:
    binary = write_fake_vmm(tmp, "vfkit", "fake_vfkit_main")
    spec = make_spec(tmp)
    async with stopped_after(await VfkitDriver(binary, boot_timeout=20).boot(spec), 0.5) as vm:
        assert await echo(vm.channel, b"agent?") == b"agent?"
        assert "virtio-vsock,port=1024" in vm.console()
    assert vm.exit_reason() == "stopped"


async def test_vfkit_that_exits_before_the_guest_connects(tmp: Path) -> None:
    binary = write_exiting_vmm(tmp, "vfkit", "VZErrorDomain: not supported (fake)")
    with pytest.raises(SandboxStartError, match=r"vfkit exited[\s\S]*not supported"):
        await VfkitDriver(binary).boot(make_spec(tmp))
