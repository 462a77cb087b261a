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
import dataclasses
import hashlib
import json
import logging
import math
import os
import shutil
import stat
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import anyio
from anyio.abc import ByteStream

from stockade._errors import (
    BackendUnavailableError,
    PolicyError,
    SandboxStartError,
    SandboxStateError,
)
from stockade._streams import PrefixedStream as _Prefixed
from stockade.backends.base import (
    Availability,
    Backend,
    Capabilities,
    LaunchedSandbox,
    LaunchSpec,
)
from stockade.backends.microvm.driver import AgentTransport, DiskSpec, Driver, VmHandle, VmSpec

if TYPE_CHECKING:
    from stockade.agent.client import AgentClient
    from stockade.backends.microvm.pool import WarmPool
    from stockade.images.vm import VmImage

__all__ = [
    "MicrovmBackend",
    "MicrovmSandbox",
    "build_guest_config",
    "ensure_snapshot",
    "make_snapshot",
    "restored_spec",
    "snapshot_path",
    "snapshot_ready",
    "vm_size",
]

logger = logging.getLogger(__name__)

DEFAULT_MEMORY_MIB = 512
#: A ``docker = true`` VM also runs dockerd, containerd and the containers themselves.
DOCKER_MEMORY_MIB = 1536
#: The image profile with a Docker engine (``images/rootfs.py`` PROFILES).
DOCKER_PROFILE = "docker"
#: The guest's private Docker daemon socket (``images/guest/launcher.py`` starts dockerd).
GUEST_DOCKER_SOCKET = "/run/docker.sock"
MIN_MEMORY_MIB = 128
#: Trees up to this size are streamed over the channel; larger ones get a disk image.
STREAM_LIMIT = 8 * 1024 * 1024
#: Seconds from VM start to the guest launcher's ready message.
READY_TIMEOUT = 60.0
MAX_HANDSHAKE_FRAME = 64 * 1024
GUEST_STATE = "/run/stockade"
GUEST_UPPER = "/run/stockade/ws/upper"
GUEST_LOWER = "/run/stockade/ws/lower"


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


# --- the guest configuration ----------------------------------------------------------


#: Commands run as this uid/gid inside the VM unless ``microvm.user = "root"``.
GUEST_UID = 1000


def _etc_files(spec: LaunchSpec) -> list[tuple[str, bytes, int]]:
    hostname = spec.policy.hostname
    home = spec.policy.env.get("HOME", "/tmp/home")
    passwd = (
        "root:x:0:0:root:/root:/bin/sh\n"
        f"user:x:{GUEST_UID}:{GUEST_UID}:sandbox user:{home}:/bin/sh\n"
        "nobody:x:65534:65534:nobody:/nonexistent:/usr/sbin/nologin\n"
    )
    group = f"root:x:0:\nuser:x:{GUEST_UID}:\nnogroup:x:65534:\n"
    local_names = spec.egress.local_names if spec.egress is not None else ()
    hosts = f"127.0.0.1\tlocalhost {hostname}\n::1\tlocalhost ip6-localhost\n" + "".join(
        f"127.0.0.1\t{name}\n" for name in local_names
    )
    return [
        ("/etc/hosts", hosts.encode(), 0o644),
        ("/etc/hostname", f"{hostname}\n".encode(), 0o644),
        ("/etc/passwd", passwd.encode(), 0o644),
        ("/etc/group", group.encode(), 0o644),
    ]


def build_guest_config(
    spec: LaunchSpec, *, workspace: dict[str, Any] | None, now_ns: int, seed: bytes
) -> dict[str, Any]:
    """The launcher's configuration frame for one sandbox (see images/guest/launcher.py)."""
    policy = spec.policy
    ws = policy.workspace
    files = _etc_files(spec)
    env = dict(policy.env)
    if spec.egress is not None:
        env.update(spec.egress.env)
        for host_file, guest_file in spec.egress.files:
            files.append((guest_file, Path(host_file).read_bytes(), 0o444))
    home = env.get("HOME")
    cwd = ws.guest_path if workspace is not None else (home or "/")
    args = ["--workspace", cwd]
    if spec.egress is not None:
        args += spec.egress.agent_args()
    args += ["--rlimit", "core=0"]
    as_user = policy.microvm.user == "user"
    if policy.limits.pids and as_user:
        # The VM's size bounds memory; processes are bounded per user (root is exempt).
        args += ["--rlimit", f"nproc={policy.limits.pids}"]
    config: dict[str, Any] = {
        "time_ns": now_ns,
        "seed": base64.b64encode(seed).decode(),
        "hostname": policy.hostname,
        "files": [[path, base64.b64encode(data).decode(), mode] for path, data, mode in files],
        "env": env,
        "args": args,
        "dirs": [home] if home else [],
    }
    if policy.limits.disk_bytes:
        config["disk_bytes"] = int(policy.limits.disk_bytes)
    if as_user:
        config["user"] = [GUEST_UID, GUEST_UID]
    if policy.docker:
        # A private dockerd in this VM; the sandbox user reaches it through its socket's group.
        env["DOCKER_HOST"] = f"unix://{GUEST_DOCKER_SOCKET}"
        config["docker"] = {"socket": GUEST_DOCKER_SOCKET, "group": "user" if as_user else "root"}
        if policy.limits.disk_bytes:
            config["docker"]["size"] = int(policy.limits.disk_bytes)
    if workspace is not None:
        config["workspace"] = workspace
    return config


def _tree_entries(root: Path) -> list[list[Any]]:
    """A project tree for the guest, streamed inside its configuration: ``[kind, path, mode,
    mtime, payload]`` per entry, parents first; kinds ``d`` (directory), ``f`` (file, base64
    content), ``l`` (symlink, target) and ``h`` (hard link to an earlier path). Special
    files are left out. The guest extracts them with the agent's checked tar extraction,
    without importing ``tarfile`` (under emulation, that import chain alone costs about a
    second of a cold boot)."""
    entries: list[list[Any]] = []
    seen: dict[tuple[int, int], str] = {}
    for top, dirs, files in os.walk(root):
        dirs.sort()
        rel_top = os.path.relpath(top, root)
        prefix = "" if rel_top == "." else rel_top + "/"
        for name in sorted(dirs + files):
            path = os.path.join(top, name)
            info = os.lstat(path)
            mode, mtime, rel = stat.S_IMODE(info.st_mode), int(info.st_mtime), prefix + name
            if stat.S_ISDIR(info.st_mode):
                entries.append(["d", rel, mode, mtime, ""])
            elif stat.S_ISLNK(info.st_mode):
                entries.append(["l", rel, mode, mtime, os.readlink(path)])
            elif stat.S_ISREG(info.st_mode):
                key = (info.st_dev, info.st_ino)
                if info.st_nlink > 1 and key in seen:
                    entries.append(["h", rel, mode, mtime, seen[key]])
                    continue
                seen[key] = rel
                data = base64.b64encode(Path(path).read_bytes()).decode()
                entries.append(["f", rel, mode, mtime, data])
    return entries


def _tree_size(root: Path, limit: int) -> int:
    """Bytes of regular files under ``root``, counting stops once past ``limit``."""
    total = 0
    for top, _dirs, files in os.walk(root):
        for name in files:
            with contextlib.suppress(OSError):
                st = os.lstat(os.path.join(top, name))
                total += st.st_size
        if total > limit:
            return total
    return total


def _disk_bucket(size: int) -> int:
    """Workspace disk size: a power of two >= 2x the tree (>= 256 MiB), sparse."""
    want = max(256 * 1024 * 1024, 2 * size + 64 * 1024 * 1024)
    return 1 << (want - 1).bit_length()


def _make_disk(tree: Path, image: Path, size: int) -> None:
    mke2fs = shutil.which("mke2fs") or "/usr/sbin/mke2fs"
    # In a user namespace that maps the caller to the guest user, mke2fs records the
    # caller's files as that user's: the sandbox owns its workspace, as on every backend.
    owner = f"{GUEST_UID}:{GUEST_UID}"
    proc = subprocess.run(
        ["unshare", "--user", f"--map-user={GUEST_UID}", f"--map-group={GUEST_UID}",
         mke2fs, "-q", "-F", "-t", "ext4", "-O", "^has_journal", "-E", f"root_owner={owner}",
         "-d", str(tree), str(image), f"{size // 1024}k"],
        capture_output=True,
        check=False,
        timeout=600,
    )  # fmt: skip
    if proc.returncode != 0:
        raise SandboxStartError(
            f"mke2fs could not build the workspace disk from {tree}: "
            f"{proc.stderr.decode(errors='replace')[-500:]}; install e2fsprogs or use a "
            "smaller workspace"
        )


# --- handshake -----------------------------------------------------------------------


class _FrameReader:
    """Reads the launcher's length-prefixed frames without reading past them."""

    def __init__(self, stream: ByteStream) -> None:
        self.stream = stream
        self.buffer = bytearray()

    async def frame(self) -> dict[str, Any]:
        while len(self.buffer) < 4:
            await self._fill()
        size = int.from_bytes(self.buffer[:4], "big")
        if size > MAX_HANDSHAKE_FRAME:
            raise SandboxStartError(f"the guest launcher sent a {size}-byte frame (too large)")
        while len(self.buffer) < 4 + size:
            await self._fill()
        body = bytes(self.buffer[4 : 4 + size])
        del self.buffer[: 4 + size]
        try:
            message = json.loads(body)
        except ValueError as exc:
            raise SandboxStartError(f"the guest launcher sent malformed JSON: {exc}") from exc
        if not isinstance(message, dict):
            raise SandboxStartError("the guest launcher sent a non-object frame")
        return message

    async def _fill(self) -> None:
        try:
            self.buffer += await self.stream.receive(65536)
        except (anyio.EndOfStream, anyio.BrokenResourceError, OSError) as exc:
            raise SandboxStartError("the VM closed the agent channel during start-up") from exc


def _frame(obj: dict[str, Any]) -> bytes:
    body = json.dumps(obj, separators=(",", ":")).encode()
    return len(body).to_bytes(4, "big") + body


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
        from stockade.backends.microvm.snapshots import copy_sparse

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
    from stockade.backends.microvm.drivers import probe_drivers

    for name, availability in probe_drivers(["firecracker", "cloud-hypervisor"]):
        if availability.ok:
            return name
    return "qemu"


def make_driver(name: str, accel: str) -> Driver:
    if name == "qemu":
        from stockade.backends.microvm.qemu import QemuDriver

        return QemuDriver(accel)
    from stockade.backends.microvm.drivers import load_driver

    return load_driver(name)()


def agent_transport(name: str, workdir: Path) -> tuple[AgentTransport, str]:
    """The agent channel for a driver and the guest's matching ``stockade.agent=`` value."""
    from stockade.backends.microvm.drivers import load_driver

    if name == "qemu" or load_driver(name).capabilities.virtio_serial:
        return AgentTransport("virtio-serial", workdir / "agent.sock"), "serial"
    transport = AgentTransport("vsock", workdir / "vsock.sock")
    return transport, f"vsock:{transport.port}"


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
        pool: WarmPool | None = None,
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
            size = _tree_size(source_dir, STREAM_LIMIT)
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
                workspace.update(source="stream", entries=_tree_entries(source_dir))
            else:
                total = _tree_size(source_dir, 1 << 62)
                disk = workdir / "workspace.ext4"
                _make_disk(source_dir, disk, _disk_bucket(total))
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
            from stockade.backends.microvm.snapshots import copy_sparse

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
        reader: _FrameReader | None = None
        if vm is None:
            vm = await driver.boot(plan.vm)
            reader = _FrameReader(vm.channel)
        vm_ready = time.monotonic()
        extra = (plan.disk,) if plan.disk is not None else ()
        sandbox = MicrovmSandbox(vm, spec, extra_files=extra)
        sandbox.restored = restored
        try:
            if reader is None:
                reader = _FrameReader(vm.channel)
            else:
                await start_agent(vm, reader, warmup=False)
            config = build_guest_config(
                spec, workspace=plan.workspace, now_ns=time.time_ns(), seed=os.urandom(64)
            )
            with anyio.fail_after(READY_TIMEOUT):
                answer = await _request(vm, reader, "sandbox.configure", config)
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
        if reader.buffer:
            sandbox.channel = _Prefixed(vm.channel, bytes(reader.buffer))
        sandbox.boot_seconds = time.monotonic() - started
        return sandbox


# --- start-up and the image's snapshot ----------------------------------------------------


async def start_agent(vm: VmHandle, reader: _FrameReader, *, warmup: bool) -> dict[str, Any]:
    """Wait for a booted guest's launcher, then have it start serving (unconfigured)."""
    with anyio.fail_after(READY_TIMEOUT):
        hello = await reader.frame()
    if hello.get("launcher") != 1:
        raise SandboxStartError(f"unexpected first message from the guest: {hello}")
    await vm.channel.send(_frame({"warmup": True} if warmup else {}))
    with anyio.fail_after(READY_TIMEOUT):
        answer = await reader.frame()
    if not answer.get("serving"):
        raise SandboxStartError(f"the guest agent did not start: {answer.get('error', answer)}")
    logger.debug("microvm guest start-up (uptime seconds): %s; %s", hello, answer)
    return answer


async def _request(
    vm: VmHandle, reader: _FrameReader, method: str, params: dict[str, Any]
) -> dict[str, Any]:
    """One JSON-RPC request on the raw channel (before the host's AgentClient takes it over);
    notifications before the answer are skipped."""
    request_id = f"launch-{method}"
    await vm.channel.send(
        _frame({"jsonrpc": "2.0", "id": request_id, "method": method, "params": params})
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


async def warm_exec(vm: VmHandle, reader: _FrameReader) -> None:
    """Run one command through the agent and wait for its exit (code paths warm for a
    snapshot, or the emulator's translations warm for a pool VM)."""
    started = await _request(vm, reader, "process.start", {"argv": ["/bin/true"], "cwd": "/"})
    handle = started.get("proc")
    while True:
        message = await reader.frame()
        if (
            message.get("method") == "process.exit"
            and message.get("params", {}).get("proc") == handle
        ):
            return


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
            reader = _FrameReader(vm.channel)
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
