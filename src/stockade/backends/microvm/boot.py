"""Booting a microVM's guest up to a serving agent, and the image snapshot that skips it.

The handshake with the guest launcher (its ready message, then raw JSON-RPC requests before
the host's ``AgentClient`` takes the channel), and the per-image snapshot: a VM whose RAM is
a shared file boots, its agent starts and runs one command, its device state is saved; each
restore maps that RAM file copy-on-write.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import logging
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

import anyio
from anyio.abc import ByteStream

from stockade._errors import AgentProtocolError, SandboxStartError
from stockade.backends.microvm.driver import Driver, VmHandle, VmSpec
from stockade.protocol.framing import HEADER, FrameDecoder, encode_frame

if TYPE_CHECKING:
    from stockade.images.vm import VmImage

__all__ = [
    "MAX_HANDSHAKE_FRAME",
    "MAX_REQUEST_FRAME",
    "READY_TIMEOUT",
    "LauncherReader",
    "ensure_snapshot",
    "make_snapshot",
    "remove_snapshot",
    "request",
    "restored_spec",
    "snapshot_dir",
    "snapshot_key",
    "snapshot_memory",
    "snapshot_path",
    "snapshot_ready",
    "start_agent",
    "warm_exec",
]

logger = logging.getLogger(__name__)

#: Seconds from VM start to the guest launcher's ready message.
READY_TIMEOUT = 60.0
MAX_HANDSHAKE_FRAME = 64 * 1024
#: What the guest accepts in one request: ``sandbox.configure`` carries a streamed workspace
#: (``MAX_FRAME`` of images/guest/launcher.py).
MAX_REQUEST_FRAME = 32 * 1024 * 1024


# --- the launcher handshake ---------------------------------------------------------------


class LauncherReader:
    """Reads the launcher's frames before the host's ``AgentClient`` takes the channel over.

    It never reads past the frame it returns (a length word, then exactly that body), so
    whatever the guest sends next stays in the channel for the client.
    """

    def __init__(self, stream: ByteStream) -> None:
        self.stream = stream

    async def frame(self) -> dict[str, Any]:
        decoder = FrameDecoder(MAX_HANDSHAKE_FRAME)
        try:
            header = await self._exactly(HEADER.size)
            decoder.feed(header)  # refuses an oversized length before its body is read
            (size,) = HEADER.unpack(header)
            messages = decoder.feed(await self._exactly(size))
        except AgentProtocolError as exc:
            raise SandboxStartError(f"the guest launcher sent a bad frame: {exc}") from exc
        return messages[0]

    async def _exactly(self, count: int) -> bytes:
        data = bytearray()
        while len(data) < count:
            try:
                data += await self.stream.receive(count - len(data))
            except (anyio.EndOfStream, anyio.BrokenResourceError, OSError) as exc:
                raise SandboxStartError("the VM closed the agent channel during start-up") from exc
        return bytes(data)


async def start_agent(vm: VmHandle, reader: LauncherReader, *, warmup: bool) -> dict[str, Any]:
    """Wait for a booted guest's launcher, then have it start serving (unconfigured)."""
    with anyio.fail_after(READY_TIMEOUT):
        hello = await reader.frame()
    if hello.get("launcher") != 1:
        raise SandboxStartError(f"unexpected first message from the guest: {hello}")
    await vm.channel.send(encode_frame({"warmup": True} if warmup else {}))
    with anyio.fail_after(READY_TIMEOUT):
        answer = await reader.frame()
    if not answer.get("serving"):
        raise SandboxStartError(f"the guest agent did not start: {answer.get('error', answer)}")
    logger.debug("microvm guest start-up (uptime seconds): %s; %s", hello, answer)
    return answer


async def request(
    vm: VmHandle, reader: LauncherReader, method: str, params: dict[str, Any]
) -> dict[str, Any]:
    """One JSON-RPC request on the raw channel (before the host's AgentClient takes it over);
    notifications before the answer are skipped."""
    request_id = f"launch-{method}"
    await vm.channel.send(
        encode_frame(
            {"jsonrpc": "2.0", "id": request_id, "method": method, "params": params},
            MAX_REQUEST_FRAME,
        )
    )
    while True:
        message = await reader.frame()
        if message.get("id") != request_id:
            continue
        if "error" in message:
            error = message["error"]
            detail = error.get("message", error) if isinstance(error, dict) else error
            raise SandboxStartError(f"the guest refused {method}: {detail}")
        result = message.get("result")
        return result if isinstance(result, dict) else {}


async def warm_exec(vm: VmHandle, reader: LauncherReader) -> None:
    """Run one command through the agent and wait for its exit (code paths warm for a
    snapshot, or the emulator's translations warm for a pool VM)."""
    started = await request(vm, reader, "process.start", {"argv": ["/bin/true"], "cwd": "/"})
    handle = started.get("proc")
    while True:
        message = await reader.frame()
        if (
            message.get("method") == "process.exit"
            and message.get("params", {}).get("proc") == handle
        ):
            return


# --- the image snapshot ----------------------------------------------------------------


def snapshot_dir() -> Path:
    from stockade.images.rootfs import image_cache_dir

    return image_cache_dir() / "vm" / "snapshots"


def snapshot_key(image: VmImage, accel: str, vcpus: int, memory_mib: int, disks: int) -> str:
    """Everything a restore must match: image, VMM and its version, machine size, devices."""
    from stockade.backends.microvm.accel import qemu_version
    from stockade.backends.microvm.qemu import tcg_cpu

    blob = json.dumps(
        [image.key, accel, qemu_version(), vcpus, memory_mib, disks, _host_tsc(), tcg_cpu()],
        separators=(",", ":"),
    )
    return hashlib.sha256(blob.encode()).hexdigest()[:20]


def _host_tsc() -> int | None:
    from stockade.backends.microvm.qemu import host_tsc_khz

    return host_tsc_khz()


def snapshot_path(image: VmImage, key: str) -> Path:
    """Snapshots live per image (``stockade image build`` prunes the other images' ones)."""
    return snapshot_dir() / image.key / f"{key}.mig"


def snapshot_memory(snapshot: Path) -> Path:
    """The guest RAM of an image snapshot: mapped copy-on-write by each restore. It is only
    ever replaced (a new file), never rewritten: a running VM's private mapping of the old
    one must not change under it."""
    return snapshot.with_suffix(".mem")


def snapshot_ready(snapshot: Path) -> bool:
    # The device state is renamed into place last: with it, the memory file is complete.
    return snapshot.is_file() and snapshot_memory(snapshot).is_file()


def remove_snapshot(snapshot: Path) -> None:
    for path in (snapshot, snapshot_memory(snapshot)):
        with contextlib.suppress(OSError):
            path.unlink()


def restored_spec(vm: VmSpec, snapshot: Path) -> VmSpec:
    """``vm`` restored from an image snapshot: its RAM maps the snapshot's memory file
    privately (nothing is copied; pages a guest writes become its own)."""
    options = {**vm.options, "memory_file": str(snapshot_memory(snapshot)), "ignore_shared": "on"}
    return dataclasses.replace(vm, options=options)


async def ensure_snapshot(driver: Driver, vm_spec: VmSpec, snapshot: Path) -> None:
    """Make the image snapshot unless it exists, one maker at a time (a lock file next to
    it): sandboxes started together wait for the first one's snapshot instead of each
    booting its own and replacing the other's RAM file under a restore."""
    import fcntl

    if snapshot_ready(snapshot):
        return
    snapshot.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(snapshot.with_suffix(".lock"), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        await anyio.to_thread.run_sync(fcntl.flock, fd, fcntl.LOCK_EX)
        if not snapshot_ready(snapshot):
            await make_snapshot(driver, vm_spec, snapshot)
    finally:
        os.close(fd)  # and with it the lock


async def make_snapshot(driver: Driver, vm_spec: VmSpec, snapshot: Path) -> None:
    """Boot a VM whose RAM is a shared file, start its agent, run one command, then save its
    device state (the RAM file is the rest of the snapshot) and stop it."""
    from stockade.backends.microvm.qemu import QemuVm

    snapshot.parent.mkdir(parents=True, exist_ok=True)
    tag = f"tmp-{os.getpid()}-{os.urandom(4).hex()}"
    memory = snapshot.with_name(f".{snapshot.stem}.{tag}.mem")
    devices = snapshot.with_name(f".{snapshot.stem}.{tag}.mig")
    options = {**vm_spec.options, "memory_file": str(memory), "memory_share": "on"}
    try:
        vm = await driver.boot(dataclasses.replace(vm_spec, options=options))
        try:
            if not isinstance(vm, QemuVm):
                raise SandboxStartError(f"the {driver.name} driver keeps no image snapshots")
            reader = LauncherReader(vm.channel)
            await start_agent(vm, reader, warmup=True)
            with anyio.fail_after(READY_TIMEOUT):
                await warm_exec(vm, reader)
            await vm.snapshot_devices(devices)
        finally:
            await vm.stop(0)
        os.replace(memory, snapshot_memory(snapshot))
        os.replace(devices, snapshot)
    finally:
        for path in (memory, devices):
            with contextlib.suppress(OSError):
                path.unlink()
