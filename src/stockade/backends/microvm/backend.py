"""The microVM backend (tier 1): every sandbox is a VM with its own guest kernel.

Launch: find the built image (``stockade image build``), restore the VM from the snapshot
of this image and size when there is one (else make that snapshot first: a VM whose RAM is
a shared file boots, its agent starts and runs one command, its device state is saved and
it stops), then configure this sandbox in one ``sandbox.configure`` request to the guest's
running agent: clock, entropy, hostname, files, environment, workspace and the agent's
options (egress listeners included). A restore maps the snapshot's RAM file copy-on-write
(``x-ignore-shared``): nothing is copied and no guest can write into it. The guest has no
NIC: its only way out is the agent channel, so the egress tunnel is its only network.

Workspace: a small project is streamed in as a tar inside the configuration; a large
one becomes a second virtio-blk disk (``mke2fs -d``, no loop mounts). Either way it is the
lower layer of an overlay inside the guest, whose upper layer is a guest tmpfs. Before a
diff or an apply, and before the sandbox ends, the guest's upper layer is streamed back into
the host's ``WorkspaceLayers.upper`` (``sync_workspace``), so diff/apply/reset are the
namespace backend's own code.
"""

from __future__ import annotations

import base64
import contextlib
import logging
import math
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import anyio

from stockade._errors import (
    BackendUnavailableError,
    PolicyError,
    SandboxStartError,
    SandboxStateError,
)
from stockade.backends.base import (
    Availability,
    Backend,
    Capabilities,
    LaunchedSandbox,
    LaunchSpec,
)
from stockade.backends.microvm.boot import (
    READY_TIMEOUT,
    LauncherReader,
    ensure_snapshot,
    remove_snapshot,
    request,
    restored_spec,
    snapshot_key,
    snapshot_path,
    snapshot_ready,
    start_agent,
)
from stockade.backends.microvm.driver import AgentTransport, DiskSpec, Driver, VmHandle, VmSpec
from stockade.backends.microvm.guest_config import (
    GUEST_LOWER,
    GUEST_STATE,
    GUEST_UPPER,
    STREAM_LIMIT,
    build_guest_config,
    copy_sparse,
    disk_bucket,
    make_disk,
    tree_entries,
    tree_size,
)

if TYPE_CHECKING:
    from stockade.agent.client import AgentClient
    from stockade.images.vm import VmImage

__all__ = [
    "MicrovmBackend",
    "MicrovmSandbox",
    "VmPool",
    "vm_size",
]

logger = logging.getLogger(__name__)

DEFAULT_MEMORY_MIB = 512
#: A ``docker = true`` VM also runs dockerd, containerd and the containers themselves.
DOCKER_MEMORY_MIB = 1536
#: The image profile with a Docker engine (``images/rootfs.py`` PROFILES).
DOCKER_PROFILE = "docker"
MIN_MEMORY_MIB = 128


def _image_profile() -> str:
    return os.environ.get("STOCKADE_MICROVM_PROFILE", "base")


def vm_size(policy: Any) -> tuple[int, int]:
    """(vCPUs, memory MiB) for a policy: the VM is the resource limit."""
    limits = policy.limits
    vcpus = max(1, math.ceil(limits.cpus)) if limits.cpus else 1
    memory = DOCKER_MEMORY_MIB if getattr(policy, "docker", False) else DEFAULT_MEMORY_MIB
    if limits.memory_bytes:
        memory = max(MIN_MEMORY_MIB, limits.memory_bytes // (1024 * 1024))
    return vcpus, int(memory)


def image_profile(policy: Any) -> str:
    """The image profile a sandbox boots: ``docker = true`` needs the one with dockerd."""
    profile = str(policy.microvm.image)
    if not getattr(policy, "docker", False) or profile == DOCKER_PROFILE:
        return profile
    if profile == "base":  # the default: switch to the Docker profile
        return DOCKER_PROFILE
    raise PolicyError(
        f"docker = true needs the microVM image profile {DOCKER_PROFILE!r} (it has the Docker "
        f"engine), but microvm.image = {profile!r}; set microvm.image = {DOCKER_PROFILE!r} "
        "(or leave it unset), or set docker = false"
    )


# --- the sandbox -----------------------------------------------------------------------


class MicrovmSandbox(LaunchedSandbox):
    """One VM, whose VMM process is the unit ``kill_now`` ends."""

    def __init__(self, vm: VmHandle, spec: LaunchSpec, *, extra_files: tuple[Path, ...] = ()):
        self.vm = vm
        self.channel = vm.channel
        self.spec = spec
        self.extra_files = extra_files
        self.restored = False
        #: Resumed from a named snapshot: the agent was already configured and running.
        self.resumed = False
        self.boot_seconds = 0.0
        self._terminated = False

    def alive(self) -> bool:
        return self.vm.alive()

    def kill_now(self) -> None:
        self.vm.kill_now()

    def failure_details(self) -> str:
        return self.vm.console()

    def exit_reason(self) -> str | None:
        return self.vm.exit_reason()

    async def terminate(self, grace: float = 1.0) -> None:
        if self._terminated:
            return
        self._terminated = True
        with anyio.CancelScope(shield=True):
            await self.vm.stop(grace)
            pid = self.vm.pid
            if self.vm.alive() or _pid_alive(pid):
                raise SandboxStateError(f"the VMM process {pid} survived teardown")
            for path in self.extra_files:
                with contextlib.suppress(OSError):
                    path.unlink()

    def resume_info(self) -> dict[str, Any]:
        """What a later restore of this VM's state needs (same machine, same files)."""
        spec: VmSpec = self.vm.spec  # type: ignore[attr-defined]
        return {
            "vm": {
                "kernel": str(spec.kernel),
                "initrd": str(spec.initrd),
                "rootfs": str(spec.disks[0].path),
                "vcpus": spec.vcpus,
                "memory_mib": spec.memory_mib,
                "cmdline": spec.cmdline,
                "accel": spec.options.get("accel", "tcg"),
                "driver": spec.options.get("driver", "qemu"),
                "workspace_disk": len(spec.disks) > 1,
            }
        }

    async def save_state(self, dest: Path) -> None:
        """Write the VM's memory and devices (and a copy of its workspace disk) to ``dest``;
        the VM runs on afterwards."""
        spec: VmSpec = self.vm.spec  # type: ignore[attr-defined]
        try:
            await self.vm.snapshot(dest / "vm.mig")
            if len(spec.disks) > 1:
                await anyio.to_thread.run_sync(
                    copy_sparse, spec.disks[1].path, dest / "workspace.ext4"
                )
        finally:
            await self.vm.resume()

    async def after_connect(self, client: AgentClient) -> None:
        if not self.resumed:
            return
        # A resumed named snapshot's agent is configured and running: it sets the clock and
        # reseeds entropy itself (no new process in the guest), so forks share no state.
        seed = base64.b64encode(os.urandom(64)).decode()
        try:
            await client.call_raw("sandbox.reseed", {"time_ns": time.time_ns(), "seed": seed})
        except Exception as exc:
            raise SandboxStartError(
                f"could not set the clock and reseed entropy in the resumed VM: {exc}"
            ) from exc

    async def sync_workspace(self, client: AgentClient) -> None:
        """Copy the guest's overlay upper layer into the host's ``WorkspaceLayers.upper``.

        The guest packs it straight to its standard output (nothing is written in its tmpfs,
        holes stay holes), the host spools it next to the layer and imports it."""
        layers = self.spec.workspace
        if layers is None or self.spec.policy.workspace.mode != "cow":
            return
        from stockade.backends.microvm.upper import import_upper

        # Spooled beside the layers, not on a disk-limited layer of the sandbox.
        with tempfile.TemporaryFile(dir=self.spec.state_dir) as spool:
            stderr = bytearray()
            failed: list[OSError] = []

            def on_output(stream: str, chunk: bytes) -> None:
                # Runs in the client's reader: an error here must not end the connection.
                if stream == "stdout" and not failed:
                    try:
                        spool.write(chunk)
                    except OSError as exc:  # the host's disk is full
                        failed.append(exc)
                elif stream == "stderr" and len(stderr) < 8192:
                    stderr.extend(chunk[: 8192 - len(stderr)])

            _, events = await client.start_process(
                _process_params(
                    ["/usr/bin/python3", "-S", "-I", f"{GUEST_STATE}/wsync.py", GUEST_UPPER, "-",
                     GUEST_LOWER, self.spec.policy.workspace.guest_path]
                ),
                on_output=on_output,
            )  # fmt: skip
            try:
                exit_info = await client.wait_process(events)
            finally:
                client.forget_process(events.proc)
            if failed:
                raise SandboxStateError(
                    f"could not store the VM's workspace on the host in {self.spec.state_dir}: "
                    f"{failed[0].strerror or failed[0]}"
                )
            if exit_info.exit_code != 0:
                raise SandboxStateError(
                    "could not read the workspace back from the VM (the packer exited with "
                    f"{exit_info.exit_code}): {stderr.decode(errors='replace')[-1000:]}"
                )
            try:
                spool.flush()
                spool.seek(0)
                await anyio.to_thread.run_sync(import_upper, spool, layers.upper)
            except OSError as exc:  # the host's disk is full (nothing was replaced)
                raise SandboxStateError(
                    f"could not write the VM's workspace into {layers.upper}: {exc.strerror or exc}"
                ) from exc


def _process_params(argv: list[str]) -> Any:
    from stockade.protocol.messages import ProcessStartParams

    return ProcessStartParams(argv=argv, cwd="/")


def _pid_alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            state = f.read().rpartition(")")[2].split()[0]
    except (OSError, IndexError):
        return False
    return state != "Z"


# --- the backend ---------------------------------------------------------------------------


def choose_driver() -> str:
    """``STOCKADE_MICROVM_DRIVER``, else Firecracker or Cloud Hypervisor when they can run
    here (hardware KVM), else QEMU (KVM or TCG)."""
    forced = os.environ.get("STOCKADE_MICROVM_DRIVER")
    if forced:
        return forced
    from stockade.backends.microvm.driver_registry import probe_drivers

    for name, availability in probe_drivers(["firecracker", "cloud-hypervisor"]):
        if availability.ok:
            return name
    return "qemu"


def make_driver(name: str, accel: str) -> Driver:
    if name == "qemu":
        from stockade.backends.microvm.qemu import QemuDriver

        return QemuDriver(accel)
    from stockade.backends.microvm.driver_registry import load_driver

    return load_driver(name)()


def agent_transport(name: str, workdir: Path) -> tuple[AgentTransport, str]:
    """The agent channel for a driver and the guest's matching ``stockade.agent=`` value."""
    from stockade.backends.microvm.driver_registry import load_driver

    if name == "qemu" or load_driver(name).capabilities.virtio_serial:
        return AgentTransport("virtio-serial", workdir / "agent.sock"), "serial"
    transport = AgentTransport("vsock", workdir / "vsock.sock")
    return transport, f"vsock:{transport.port}"


class VmPool(Protocol):
    """Restored, warmed VMs to take instead of starting one (``pool.WarmPool``)."""

    def matches(self, image_key: str, accel: str, vcpus: int, memory_mib: int) -> bool: ...

    async def take(self, wait: float = ...) -> VmHandle | None: ...


@dataclass(frozen=True)
class _Plan:
    image: VmImage
    driver: str
    accel: str
    vm: VmSpec
    workspace: dict[str, Any] | None
    disk: Path | None
    snapshot: Path | None


class MicrovmBackend(Backend):
    """Tier 1: a VM per sandbox (QEMU microvm here; KVM when it works, else TCG)."""

    name = "microvm"
    # The guest's upper layer and root writes share one tmpfs of limits.disk; the host copy
    # of the upper layer is never larger than that.
    disk_limit_inside = True
    capabilities = Capabilities(
        tier=1,
        isolation="own guest kernel in a microVM (QEMU -M microvm; KVM, or TCG emulation)",
        snapshot=True,
        fork=True,
        docker_inside=True,
        workspace_in_guest=True,
        enforces=(
            "a separate guest kernel: root in the VM (modules, mounts, /dev) touches no host state",
            "no network device: the agent channel (virtio-serial) is the only way out, so "
            "egress goes through the policy proxy",
            "memory and vCPUs are the VM's size",
            "workspace copy-on-write inside the guest; the host tree changes only on apply",
        ),
        does_not_enforce=(
            "per-process pids limits (root in the guest can change anything inside it)",
            "speed under TCG emulation (no usable KVM): several seconds per cold boot",
        ),
    )

    def __init__(
        self,
        *,
        resume: Path | None = None,
        resume_meta: dict[str, Any] | None = None,
        pool: VmPool | None = None,
    ) -> None:
        #: A named snapshot (``snapshots.py``) to resume instead of booting or configuring.
        self.resume = resume
        self.resume_meta = resume_meta or {}
        #: Restored, warmed VMs to take instead of starting one (``pool.py``).
        self.pool = pool

    @classmethod
    def probe(cls) -> Availability:
        from stockade.backends.microvm.accel import probe_microvm

        return probe_microvm(_image_profile())

    @classmethod
    def probe_inputs(cls) -> tuple[str, ...]:
        """QEMU, KVM, the image cache (an image build adds entries), the host kernels the
        guest kernel comes from, the guest agent (part of the initramfs), the other VMMs."""
        from stockade.backends.microvm.qemu import qemu_binary
        from stockade.images.rootfs import image_cache_dir

        cache = image_cache_dir()
        package = Path(__file__).resolve().parents[2]
        guest = [package / "agent" / "guest.py", *sorted((package / "images" / "guest").iterdir())]
        binaries = ("firecracker", "jailer", "cloud-hypervisor", "vfkit")
        return (
            qemu_binary() or "(no qemu-system-x86_64)",
            "/dev/kvm",
            "/dev/vhost-vsock",
            str(cache),
            str(cache / "vm"),
            "/boot",
            "/lib/modules",
            *(str(path) for path in guest),
            *(shutil.which(name) or f"(no {name} on PATH)" for name in binaries),
        )

    def check_policy(self, policy: Any) -> None:
        if policy.workspace.mode == "rw" and policy.workspace.host_path is not None:
            raise PolicyError(
                "workspace mode 'rw' (a live bind of the host project) is not possible in a "
                "microVM here; use workspace.mode = 'cow' and apply the changes, or choose "
                "backend='namespace'"
            )
        image_profile(policy)  # docker = true with a non-Docker image: refused here

    def _plan(self, spec: LaunchSpec) -> _Plan:
        from stockade.backends.microvm.accel import chosen_accel
        from stockade.images.vm import find_vm_image

        profile = image_profile(spec.policy)
        image = find_vm_image(profile)
        if image is None:
            raise BackendUnavailableError(
                f"the microVM image {profile!r} is not built; run `stockade image build "
                f"--profile {profile}` (about a minute, once)",
                backend="microvm",
                fix=f"stockade image build --profile {profile}",
            )
        driver = choose_driver()
        accel = chosen_accel(image) if driver == "qemu" else "kvm"
        vcpus, memory = vm_size(spec.policy)
        workdir = spec.state_dir / "vm"
        workdir.mkdir(parents=True, exist_ok=True, mode=0o700)
        disks = [DiskSpec(image.rootfs, True, "root")]
        transport, guest_agent = agent_transport(driver, workdir)
        ws = spec.policy.workspace
        workspace: dict[str, Any] | None = None
        disk: Path | None = None
        source_dir: Path | None = None
        if ws.mode in ("cow", "ro") and ws.host_path is not None:
            source_dir = spec.workspace.lower if spec.workspace is not None else ws.host_path
        if source_dir is not None:
            root_mode = os.stat(source_dir).st_mode & 0o7777
            size = tree_size(source_dir, STREAM_LIMIT)
            protected = [
                rel
                for rel in ws.protected
                if os.path.lexists(source_dir / rel) and not (source_dir / rel).is_symlink()
            ]
            workspace = {
                "mode": ws.mode,
                "path": ws.guest_path,
                "root_mode": root_mode,
                "protected": protected,
            }
            if size <= STREAM_LIMIT:
                workspace.update(source="stream", entries=tree_entries(source_dir))
            else:
                total = tree_size(source_dir, 1 << 62)
                disk = workdir / "workspace.ext4"
                make_disk(source_dir, disk, disk_bucket(total))
                disks.append(DiskSpec(disk, False, "workspace"))
                workspace.update(source="disk", device="vdb")
        vm = VmSpec(
            kernel=image.kernel,
            initrd=image.initrd,
            disks=tuple(disks),
            vcpus=vcpus,
            memory_mib=memory,
            cmdline=f"stockade.root=vda stockade.agent={guest_agent}",
            workdir=workdir,
            agent=transport,
            options={"accel": accel, "driver": driver},
        )
        disk_size = disk.stat().st_size if disk is not None else 0
        snap: Path | None = snapshot_path(
            image, snapshot_key(image, f"{driver}/{accel}", vcpus, memory, disk_size)
        )
        if os.environ.get("STOCKADE_MICROVM_SNAPSHOTS", "1") == "0":
            snap = None  # always boot cold, take no snapshot (benchmarks, debugging)
        return _Plan(image, driver, accel, vm, workspace, disk, snap)

    def _resume_spec(self, spec: LaunchSpec) -> tuple[VmSpec, tuple[Path, ...]]:
        assert self.resume is not None
        meta = self.resume_meta["vm"]
        workdir = spec.state_dir / "vm"
        workdir.mkdir(parents=True, exist_ok=True, mode=0o700)
        for key in ("kernel", "initrd", "rootfs"):
            if not Path(meta[key]).is_file():
                raise SandboxStartError(
                    f"snapshot {self.resume} needs {meta[key]}, which is gone (the image was "
                    "rebuilt since); snapshots restore only on the image they were taken on"
                )
        disks = [DiskSpec(Path(meta["rootfs"]), True, "root")]
        extra: tuple[Path, ...] = ()
        if meta.get("workspace_disk"):
            disk = workdir / "workspace.ext4"
            copy_sparse(self.resume / "workspace.ext4", disk)
            disks.append(DiskSpec(disk, False, "workspace"))
            extra = (disk,)
        vm = VmSpec(
            kernel=Path(meta["kernel"]),
            initrd=Path(meta["initrd"]),
            disks=tuple(disks),
            vcpus=int(meta["vcpus"]),
            memory_mib=int(meta["memory_mib"]),
            cmdline=str(meta["cmdline"]),
            workdir=workdir,
            agent=agent_transport(str(meta.get("driver", "qemu")), workdir)[0],
            options={"accel": str(meta["accel"]), "driver": str(meta.get("driver", "qemu"))},
        )
        return vm, extra

    async def _launch_resumed(self, spec: LaunchSpec) -> MicrovmSandbox:
        assert self.resume is not None
        vm_spec, extra = await anyio.to_thread.run_sync(self._resume_spec, spec)
        started = time.monotonic()
        driver = make_driver(vm_spec.options.get("driver", "qemu"), vm_spec.options["accel"])
        vm = await driver.restore(vm_spec, self.resume / "vm.mig")
        sandbox = MicrovmSandbox(vm, spec, extra_files=extra)
        sandbox.restored = sandbox.resumed = True
        sandbox.boot_seconds = time.monotonic() - started
        return sandbox

    async def launch(self, spec: LaunchSpec) -> MicrovmSandbox:
        if self.resume is not None:
            return await self._launch_resumed(spec)
        started = time.monotonic()
        plan = await anyio.to_thread.run_sync(self._plan, spec)
        planned = time.monotonic()
        driver = make_driver(plan.driver, plan.accel)
        restored = False
        vm: VmHandle | None = None
        if (
            self.pool is not None
            and plan.disk is None
            and plan.driver == "qemu"
            and self.pool.matches(plan.image.key, plan.accel, plan.vm.vcpus, plan.vm.memory_mib)
        ):
            vm = await self.pool.take()
            restored = vm is not None
        snap = plan.snapshot if plan.driver == "qemu" else None
        if vm is None and snap is not None:
            if not snapshot_ready(snap):
                try:
                    await ensure_snapshot(driver, plan.vm, snap)
                except SandboxStartError as exc:
                    logger.warning("could not make the VM snapshot %s, booting cold: %s", snap, exc)
            if snapshot_ready(snap):
                try:
                    vm = await driver.restore(restored_spec(plan.vm, snap), snap)
                    restored = True
                except SandboxStartError as exc:
                    logger.warning("restore from %s failed, booting cold: %s", snap, exc)
                    remove_snapshot(snap)
        reader: LauncherReader | None = None
        if vm is None:
            vm = await driver.boot(plan.vm)
            reader = LauncherReader(vm.channel)
        vm_ready = time.monotonic()
        extra = (plan.disk,) if plan.disk is not None else ()
        sandbox = MicrovmSandbox(vm, spec, extra_files=extra)
        sandbox.restored = restored
        try:
            if reader is None:
                reader = LauncherReader(vm.channel)
            else:
                await start_agent(vm, reader, warmup=False)
            config = build_guest_config(
                spec, workspace=plan.workspace, now_ns=time.time_ns(), seed=os.urandom(64)
            )
            with anyio.fail_after(READY_TIMEOUT):
                answer = await request(vm, reader, "sandbox.configure", config)
            logger.debug(
                "microvm %s: plan %.0f ms, %s %.0f ms, configured %.0f ms; guest: %s",
                spec.name,
                (planned - started) * 1000,
                "restore" if restored else "boot",
                (vm_ready - planned) * 1000,
                (time.monotonic() - vm_ready) * 1000,
                answer,
            )
        except BaseException as exc:
            console = vm.console()
            await sandbox.terminate(0)
            if isinstance(exc, TimeoutError):
                raise SandboxStartError(
                    f"the microVM did not become ready within {READY_TIMEOUT:g} s "
                    f"(accel={plan.accel})\n--- console ---\n{console}"
                ) from exc
            if isinstance(exc, SandboxStartError) and console:
                raise SandboxStartError(f"{exc}\n--- console ---\n{console}") from exc
            raise
        sandbox.boot_seconds = time.monotonic() - started
        return sandbox
