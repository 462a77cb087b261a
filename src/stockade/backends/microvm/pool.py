"""A warm pool of microVMs: N VMs restored from the image's snapshot and warmed up, so a
sandbox created from the pool skips the VMM start and the restore.

Under emulation a restored VM has no translated code yet, so the pool also has each VM's
agent run one command before it is handed out. The pool owns its VMs; one taken by a
sandbox becomes that sandbox's, and the pool starts another in its place::

    async with WarmPool(size=2) as pool:
        sandbox = await pool.create(project_dir=".")
"""

from __future__ import annotations

import logging
import secrets
import tempfile
from collections.abc import Mapping
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any

import anyio
from anyio.abc import TaskGroup

from stockade._errors import SandboxStartError
from stockade.backends.microvm.driver import AgentTransport, DiskSpec, VmHandle, VmSpec

if TYPE_CHECKING:
    from stockade.images.vm import VmImage
    from stockade.sandbox import AsyncSandbox

__all__ = ["WarmPool"]

logger = logging.getLogger(__name__)


class WarmPool:
    """Keeps ``size`` restored, warmed VMs of one machine size ready (``async with`` it)."""

    def __init__(
        self, size: int = 2, *, memory_mib: int = 2048, vcpus: int = 1, profile: str = "base"
    ) -> None:
        if size < 1:
            raise ValueError("a warm pool needs size >= 1")
        self.size = size
        self.memory_mib = memory_mib
        self.vcpus = vcpus
        self.profile = profile
        self._ready: list[VmHandle] = []
        #: Every VM started and not handed out yet, ready or not: all stopped on exit.
        self._owned: set[VmHandle] = set()
        self._wanted = anyio.Event()
        self._changed = anyio.Event()
        self._tg: TaskGroup | None = None
        self._dir: Path | None = None
        self._image: VmImage | None = None
        self._accel = "tcg"
        self._snapshot: Path | None = None
        self._failure: BaseException | None = None

    # --- lifecycle ------------------------------------------------------------------------

    async def __aenter__(self) -> WarmPool:
        from stockade.backends.microvm.accel import chosen_accel
        from stockade.backends.microvm.boot import snapshot_key, snapshot_path, snapshot_ready
        from stockade.images.vm import find_vm_image

        image = await anyio.to_thread.run_sync(find_vm_image, self.profile)
        if image is None:
            raise SandboxStartError(
                f"the microVM image {self.profile!r} is not built; run `stockade image build`"
            )
        self._image = image
        self._accel = await anyio.to_thread.run_sync(chosen_accel, image)
        key = snapshot_key(image, f"qemu/{self._accel}", self.vcpus, self.memory_mib, 0)
        self._snapshot = snapshot_path(image, key)
        self._dir = Path(tempfile.mkdtemp(prefix="stockade-pool-"))
        try:
            if not snapshot_ready(self._snapshot):
                await self._make_snapshot()
            self._tg = anyio.create_task_group()
            await self._tg.__aenter__()
            self._tg.start_soon(self._fill)
        except BaseException:
            await self.__aexit__(None, None, None)
            raise
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._tg is not None:
            # Exited in this task's own scope (not inside the shield below).
            self._tg.cancel_scope.cancel()
            await self._tg.__aexit__(None, None, None)
            self._tg = None
        with anyio.CancelScope(shield=True):
            self._ready = []
            owned, self._owned = self._owned, set()
            for vm in owned:
                await vm.stop(0)
            if self._dir is not None:
                import shutil

                shutil.rmtree(self._dir, ignore_errors=True)

    # --- VMs ------------------------------------------------------------------------------

    def _spec(self) -> VmSpec:
        assert self._image is not None and self._dir is not None
        workdir = self._dir / secrets.token_hex(4)
        workdir.mkdir(mode=0o700)
        return VmSpec(
            kernel=self._image.kernel,
            initrd=self._image.initrd,
            disks=(DiskSpec(self._image.rootfs, True, "root"),),
            vcpus=self.vcpus,
            memory_mib=self.memory_mib,
            cmdline="stockade.root=vda stockade.agent=serial",
            workdir=workdir,
            agent=AgentTransport("virtio-serial", workdir / "agent.sock"),
            options={"accel": self._accel, "driver": "qemu"},
        )

    async def _make_snapshot(self) -> None:
        from stockade.backends.microvm.boot import ensure_snapshot
        from stockade.backends.microvm.qemu import QemuDriver

        assert self._snapshot is not None
        await ensure_snapshot(QemuDriver(self._accel), self._spec(), self._snapshot)

    async def _one(self) -> VmHandle:
        from stockade.backends.microvm.boot import (
            LauncherReader,
            request,
            restored_spec,
            warm_exec,
        )
        from stockade.backends.microvm.qemu import QemuDriver

        assert self._snapshot is not None
        vm = await QemuDriver(self._accel).restore(
            restored_spec(self._spec(), self._snapshot), self._snapshot
        )
        self._owned.add(vm)
        try:
            # A rehearsal of configuring and one command now: the emulator translates those
            # paths before a sandbox takes this VM, not during its start and first command.
            with anyio.fail_after(60):
                reader = LauncherReader(vm.channel)
                await request(vm, reader, "sandbox.warm", {})
                await warm_exec(vm, reader)
        except BaseException:
            self._owned.discard(vm)
            await vm.stop(0)
            raise
        return vm

    async def _fill(self) -> None:
        while True:
            while len(self._ready) < self.size:
                try:
                    vm = await self._one()
                except Exception as exc:
                    logger.warning("warm pool could not start a VM: %s", exc)
                    self._failure = exc
                    await anyio.sleep(1)
                    continue
                self._ready.append(vm)
                self._changed.set()
                self._changed = anyio.Event()
            await self._wanted.wait()
            self._wanted = anyio.Event()

    def matches(self, image_key: str, accel: str, vcpus: int, memory_mib: int) -> bool:
        return (
            self._image is not None
            and image_key == self._image.key
            and accel == self._accel
            and (vcpus, memory_mib) == (self.vcpus, self.memory_mib)
        )

    async def take(self, wait: float = 30.0) -> VmHandle | None:
        """A ready VM (waits up to ``wait`` seconds for one), or None."""
        with anyio.move_on_after(wait):
            while not self._ready:
                await self._changed.wait()
        if not self._ready:
            return None
        vm = self._ready.pop(0)
        self._owned.discard(vm)
        self._wanted.set()
        if not vm.alive():
            await vm.stop(0)
            return await self.take(wait)
        return vm

    def ready_count(self) -> int:
        return len(self._ready)

    # --- sandboxes ------------------------------------------------------------------------

    async def create(
        self,
        *,
        name: str | None = None,
        project_dir: str | Path | None = None,
        workspace_mode: str | None = None,
        env: Mapping[str, str] | None = None,
        config: Mapping[str, Any] | None = None,
        keep: bool = False,
        state_dir: str | Path | None = None,
    ) -> AsyncSandbox:
        """``AsyncSandbox.create(backend='microvm', ...)`` served from the pool when it can."""
        from stockade.backends.microvm.backend import MicrovmBackend
        from stockade.config import load_config
        from stockade.policy import compile_policy
        from stockade.sandbox import AsyncSandbox

        overrides: dict[str, Any] = dict(config or {})
        overrides["backend"] = "microvm"
        overrides.setdefault("limits.memory", self.memory_mib * 1024 * 1024)
        if workspace_mode is not None:
            overrides["workspace.mode"] = workspace_mode
        if env:
            overrides["env.set"] = dict(env)
        loaded = load_config(
            Path(project_dir) if project_dir is not None else None, overrides=overrides
        )
        policy = compile_policy(loaded)
        backend = MicrovmBackend(pool=self)
        backend.check_policy(policy)
        return await AsyncSandbox.start(
            policy, backend=backend, name=name, keep=keep, state_dir=state_dir, actor="sdk"
        )
