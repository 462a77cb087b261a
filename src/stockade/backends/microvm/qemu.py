"""QEMU ``-M microvm`` driver: KVM when a probe boot under KVM reaches the guest, else TCG.

Measured pitfalls it handles (see the lab notes): ``tsc_early_khz`` under TCG (microvm has
no HPET or PM timer, and TSC calibration otherwise hangs about one boot in five); the host
listens on the agent socket before QEMU starts (the virtio-serial chardev connects as a
client; data sent before the guest opens its port is lost, so the guest speaks first);
no ``acpi=off`` (virtio-mmio devices are found through ACPI); an uncompressed PVH vmlinux;
snapshots through QMP migration to a file with the bandwidth cap lifted, restores with
``-incoming`` and ``cont``.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shlex
import shutil
import subprocess
import time
from pathlib import Path

import anyio
from anyio.abc import Process, SocketListener

from stockade._errors import SandboxStartError
from stockade.backends._process import stop_process, tail
from stockade.backends.base import Availability
from stockade.backends.microvm.driver import (
    Driver,
    DriverCapabilities,
    VmHandle,
    VmSpec,
)
from stockade.backends.microvm.qmp import QmpClient

__all__ = ["QemuDriver", "QemuVm", "build_qemu_argv", "host_tsc_khz", "qemu_binary"]

logger = logging.getLogger(__name__)

#: Kernel arguments that make the generic Debian kernel boot faster under emulation.
FAST_ARGS = (
    "quiet",
    "panic=-1",
    "8250.nr_uarts=1",
    "no_timer_check",
    "tsc=reliable",
    "mitigations=off",
    "cryptomgr.notests",
    "random.trust_cpu=on",
    "i8042.noaux",
    "i8042.nomux",
    "i8042.nopnp",
    "i8042.dumbkbd",
    "rcupdate.rcu_expedited=1",
    "nowatchdog",
)
#: QEMU's name for microvm's RAM block (what ``-m`` alone creates): kept for a memory file.
RAM_ID = "microvm.ram"
#: Seconds QEMU gets to connect its chardev to our agent socket.
CONNECT_TIMEOUT = 10.0


def qemu_binary() -> str | None:
    return os.environ.get("STOCKADE_MICROVM_QEMU") or shutil.which("qemu-system-x86_64")


def host_tsc_khz(cpuinfo: str | None = None) -> int | None:
    """The host's TSC rate in kHz from /proc/cpuinfo (under TCG the guest sees this TSC)."""
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text()
        except OSError:
            return None
    for line in cpuinfo.splitlines():
        key, _, value = line.partition(":")
        if key.strip() == "cpu MHz":
            try:
                return int(float(value) * 1000)
            except ValueError:
                return None
    return None


def tcg_cpu() -> str:
    """The CPU model emulated under TCG (``$STOCKADE_MICROVM_TCG_CPU``, else ``max``)."""
    return os.environ.get("STOCKADE_MICROVM_TCG_CPU") or "max"


def build_qemu_argv(
    spec: VmSpec,
    *,
    qemu: str,
    accel: str,
    tsc_khz: int | None,
    incoming: bool = False,
) -> list[str]:
    """The QEMU command line for ``spec``; a restore uses the same one plus ``-incoming``."""
    workdir = spec.workdir
    cmdline = [*FAST_ARGS, "console=ttyS0"]
    if accel == "tcg" and tsc_khz:
        cmdline.append(f"tsc_early_khz={tsc_khz}")
    cmdline.append(spec.cmdline)
    machine = f"microvm,accel={accel}"
    memory_file = spec.options.get("memory_file")
    if memory_file:
        # Guest RAM in a file: shared (the snapshot source writes its memory there) or
        # private (a restore maps the snapshot's memory copy-on-write instead of copying it).
        # The id is the one ``-m`` alone gives the RAM block, so migration streams match.
        machine += f",memory-backend={RAM_ID}"
    argv = [
        qemu,
        "-M",
        machine,
        "-cpu",
        "host" if accel == "kvm" else tcg_cpu(),
        "-smp",
        str(spec.vcpus),
        "-m",
        f"{spec.memory_mib}M",
        "-nodefaults",
        "-no-user-config",
        "-display",
        "none",
        "-no-reboot",
        "-serial",
        f"file:{workdir / 'console.log'}",
        "-kernel",
        str(spec.kernel),
        "-initrd",
        str(spec.initrd),
        "-append",
        " ".join(c for c in cmdline if c),
    ]
    if memory_file:
        share = "on" if spec.options.get("memory_share") == "on" else "off"
        argv += [
            "-object",
            f"memory-backend-file,id={RAM_ID},size={spec.memory_mib}M,"
            f"mem-path={memory_file},share={share}",
        ]
    if spec.agent.kind == "virtio-serial":
        argv += [
            "-device",
            "virtio-serial-device",
            "-chardev",
            f"socket,path={spec.agent.socket_path},id=agent0",
            "-device",
            "virtserialport,chardev=agent0,name=agent",
        ]
    else:
        argv += ["-device", f"vhost-vsock-device,guest-cid={spec.agent.cid}"]
    for disk in spec.disks:
        drive = f"file={disk.path},if=none,id={disk.drive_id},format=raw"
        drive += ",readonly=on" if disk.read_only else ",cache=unsafe"
        argv += ["-drive", drive, "-device", f"virtio-blk-device,drive={disk.drive_id}"]
    argv += ["-qmp", f"unix:{workdir / 'qmp.sock'},server=on,wait=off"]
    if incoming:
        argv += ["-incoming", "defer"]
    return argv


class QemuVm(VmHandle):
    """One QEMU process, its QMP connection and the agent channel."""

    def __init__(self, process: Process, spec: VmSpec, qmp: QmpClient) -> None:
        self.process = process
        self.spec = spec
        self.qmp = qmp
        self._stopped = False
        self._reason: str | None = None

    @property
    def pid(self) -> int:
        return self.process.pid

    def alive(self) -> bool:
        return self.process.returncode is None

    def console(self) -> str:
        parts = [
            tail(self.spec.workdir / "console.log", 3000),
            tail(self.spec.workdir / "qemu.log"),
        ]
        return "\n".join(p for p in parts if p)

    def exit_reason(self) -> str | None:
        if self._reason is not None:
            return self._reason
        if self.process.returncode is None and not self._stopped:
            # The channel may report EOF a moment before QEMU has exited: its SHUTDOWN
            # event comes first, so wait briefly for it.
            self.qmp.drain(0.3)
            if not any(e.get("event") == "SHUTDOWN" for e in self.qmp.events):
                return None
        self._reason = self._decide_reason()
        return self._reason

    def _decide_reason(self) -> str:
        self.qmp.drain(0.05)
        console = tail(self.spec.workdir / "console.log", 20000)
        if "Kernel panic" in console:
            line = next((ln for ln in console.splitlines() if "Kernel panic" in ln), "Kernel panic")
            return f"kernel panic ({line.strip()[:200]})"
        reasons = [
            e.get("data", {}).get("reason") for e in self.qmp.events if e.get("event") == "SHUTDOWN"
        ]
        if "guest-shutdown" in reasons:
            return "guest poweroff"
        if "guest-reset" in reasons:
            return "guest reboot"
        if "guest-panic" in reasons:
            return "kernel panic"
        if self._stopped:
            return "stopped by the host"
        code = self.process.returncode
        if code is not None and code < 0:
            return f"QEMU was killed by signal {-code}"
        return f"QEMU exited with status {code}"

    async def stop(self, grace: float = 1.0) -> None:
        with anyio.CancelScope(shield=True):
            if self.process.returncode is None:
                self._stopped = True
            await stop_process(self.process, grace)
            if self._reason is None:
                self._reason = self._decide_reason()
            with contextlib.suppress(Exception):
                await self.channel.aclose()
            self.qmp.close()
            for name in ("qmp.sock",):
                with contextlib.suppress(OSError):
                    (self.spec.workdir / name).unlink()
            with contextlib.suppress(OSError):
                self.spec.agent.socket_path.unlink()

    async def snapshot(self, path: Path) -> None:
        await anyio.to_thread.run_sync(self._snapshot_blocking, path)

    async def snapshot_devices(self, path: Path) -> None:
        """Save the device state only (``x-ignore-shared``): the guest RAM is the VM's shared
        memory file (``memory_share=on``), which becomes the snapshot's memory as it is. The
        VM must not run on afterwards (it would write into that file): stop it."""
        if self.spec.options.get("memory_share") != "on":
            raise SandboxStartError("snapshot_devices needs a VM with a shared memory file")
        await anyio.to_thread.run_sync(self._snapshot_blocking, path, True)

    async def resume(self) -> None:
        await anyio.to_thread.run_sync(self.qmp.command, "cont")

    def _snapshot_blocking(self, path: Path, ignore_shared: bool = False) -> None:
        tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
        qmp = self.qmp
        # The default 128 MiB/s cap makes a snapshot take ~0.5 s instead of ~60 ms.
        qmp.command("migrate-set-parameters", **{"max-bandwidth": 1 << 34})
        _set_ignore_shared(qmp, ignore_shared)
        qmp.command("stop")
        qmp.command("migrate", uri=f"exec:cat > {shlex.quote(str(tmp))}")
        deadline = time.monotonic() + 120
        while True:
            info = qmp.command("query-migrate") or {}
            status = info.get("status")
            if status == "completed":
                break
            if status in ("failed", "cancelled") or time.monotonic() > deadline:
                tmp.unlink(missing_ok=True)
                raise SandboxStartError(
                    f"QEMU could not save the VM state to {path}: migration {status} "
                    f"({info.get('error-desc', 'no details')})"
                )
            time.sleep(0.005)
        os.replace(tmp, path)


class QemuDriver(Driver):
    """QEMU ``-M microvm``; ``accel`` is ``kvm`` or ``tcg`` (decided by the backend's probe)."""

    name = "qemu"
    capabilities = DriverCapabilities(snapshot=True, vsock=True, virtio_serial=True)

    def __init__(self, accel: str = "tcg") -> None:
        self.accel = accel

    @classmethod
    def probe(cls) -> Availability:
        qemu = qemu_binary()
        if qemu is None:
            return Availability(
                False,
                "qemu-system-x86_64 not found on PATH",
                "install QEMU: apt-get install qemu-system-x86",
            )
        return Availability(True, f"QEMU at {qemu}")

    async def boot(self, spec: VmSpec) -> QemuVm:
        return await self._start(spec, snapshot=None)

    async def restore(self, spec: VmSpec, snapshot: Path) -> QemuVm:
        return await self._start(spec, snapshot=snapshot)

    async def _start(self, spec: VmSpec, *, snapshot: Path | None) -> QemuVm:
        qemu = qemu_binary()
        if qemu is None:
            raise SandboxStartError("qemu-system-x86_64 not found on PATH")
        argv = build_qemu_argv(
            spec,
            qemu=qemu,
            accel=self.accel,
            tsc_khz=host_tsc_khz(),
            incoming=snapshot is not None,
        )
        spec.workdir.mkdir(parents=True, exist_ok=True, mode=0o700)
        (spec.workdir / "argv.json").write_text(json.dumps(argv))
        listener: SocketListener | None = None
        if spec.agent.kind == "virtio-serial":
            with contextlib.suppress(FileNotFoundError):
                spec.agent.socket_path.unlink()
            # Listen first: QEMU connects its chardev to us as it starts.
            listener = await anyio.create_unix_listener(spec.agent.socket_path)
        setpriv = shutil.which("setpriv")
        if setpriv is not None:
            # QEMU dies with us even if we are killed outright: no VM outlives its owner.
            argv = [setpriv, "--pdeathsig", "KILL", "--", *argv]
        log = (spec.workdir / "qemu.log").open("ab")
        try:
            process = await anyio.open_process(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=log,
                start_new_session=True,
            )
        except OSError as exc:
            if listener is not None:
                await listener.aclose()
            raise SandboxStartError(f"could not start QEMU ({qemu}): {exc}") from exc
        finally:
            log.close()
        qmp = QmpClient(spec.workdir / "qmp.sock")
        vm = QemuVm(process, spec, qmp)
        try:
            if listener is not None:
                with anyio.fail_after(CONNECT_TIMEOUT):
                    vm.channel = await self._accept(listener, process)
            await anyio.to_thread.run_sync(qmp.connect, time.monotonic() + CONNECT_TIMEOUT)
            if snapshot is not None:
                await anyio.to_thread.run_sync(
                    self._incoming, qmp, snapshot, spec.options.get("ignore_shared") == "on"
                )
        except BaseException as exc:
            if not hasattr(vm, "channel"):
                vm.channel = _Closed()
            await vm.stop(0)
            if isinstance(exc, (TimeoutError, OSError)):
                raise SandboxStartError(
                    f"QEMU did not start the VM: {exc or type(exc).__name__}\n{vm.console()}"
                ) from exc
            raise
        finally:
            if listener is not None:
                await listener.aclose()
                with contextlib.suppress(OSError):
                    spec.agent.socket_path.unlink()
        return vm

    @staticmethod
    async def _accept(listener: SocketListener, process: Process) -> anyio.abc.SocketStream:
        async with anyio.create_task_group() as tg:
            result: list[anyio.abc.SocketStream] = []

            async def accept() -> None:
                result.append(await listener.accept())
                tg.cancel_scope.cancel()

            async def watch() -> None:
                await process.wait()
                raise SandboxStartError(
                    f"QEMU exited (status {process.returncode}) before connecting to the agent "
                    "socket"
                )

            tg.start_soon(accept)
            tg.start_soon(watch)
        return result[0]

    @staticmethod
    def _incoming(qmp: QmpClient, snapshot: Path, ignore_shared: bool = False) -> None:
        qmp.command("migrate-set-parameters", **{"max-bandwidth": 1 << 34})
        _set_ignore_shared(qmp, ignore_shared)
        qmp.command("migrate-incoming", uri=f"exec:cat {shlex.quote(str(snapshot))}")
        deadline = time.monotonic() + 60
        while True:
            status = (qmp.command("query-status") or {}).get("status")
            if status not in ("inmigrate", "restore-vm"):
                break
            if time.monotonic() > deadline:
                raise SandboxStartError(f"restoring {snapshot} did not finish in 60 s")
            time.sleep(0.002)
        if status != "paused":
            info = qmp.command("query-migrate") or {}
            raise SandboxStartError(
                f"restoring the VM from {snapshot} failed: status {status!r}, "
                f"migration {info.get('status')!r} {info.get('error-desc', '')}"
            )
        qmp.command("cont")


def _set_ignore_shared(qmp: QmpClient, on: bool) -> None:
    """Both ends of a migration must agree: with it, shared RAM blocks are not in the stream
    (set both ways: a restored QEMU keeps the capability for its later named snapshots)."""
    qmp.command(
        "migrate-set-capabilities",
        capabilities=[{"capability": "x-ignore-shared", "state": on}],
    )


class _Closed(anyio.abc.ByteStream):
    """Placeholder channel of a VM that never connected."""

    async def receive(self, max_bytes: int = 65536) -> bytes:
        raise anyio.EndOfStream

    async def send(self, item: bytes) -> None:
        raise anyio.BrokenResourceError

    async def send_eof(self) -> None:
        return None

    async def aclose(self) -> None:
        return None
