"""Plumbing shared by the Firecracker, Cloud Hypervisor and vfkit drivers.

Finding a VMM binary (``VmmBinary``: configured path, ``STOCKADE_<NAME>``, PATH) and probing
for it, checking that KVM can run a standard guest, refusing option values a VMM's
comma-separated option parser would split, and ``VmmProcess``: one VMM child process with its
console log, a pidfd (Linux) and a stop that verifies nothing of it survives. On top of
those: ``VmmDriver`` (constructor, binary lookup, probe), ``VmmVm`` (a VM handle that is one
``VmmProcess``), ``VmmApi`` (HTTP over a VMM's unix API socket) and ``reach_agent`` (wait for
that API, configure the VM, reach the agent over hybrid vsock, clean up on failure).
"""

from __future__ import annotations

import abc
import contextlib
import logging
import os
import re
import select
import shutil
import signal
import stat
import subprocess
import sys
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar, Self

import anyio
from anyio.abc import ByteStream, Process, SocketStream

from stockade._errors import SandboxStartError, SandboxStateError
from stockade.backends._process import stop_process, tail
from stockade.backends.base import Availability
from stockade.backends.microvm.driver import Driver, VmHandle, VmSpec
from stockade.backends.microvm.hybrid_vsock import HybridVsockError, wait_hybrid_vsock

__all__ = [
    "MAX_SOCKET_PATH",
    "KvmApiVmmDriver",
    "KvmStatus",
    "VmmApi",
    "VmmApiError",
    "VmmBinary",
    "VmmDriver",
    "VmmProcess",
    "VmmVm",
    "check_resources",
    "find_binary",
    "kvm_status",
    "option_value",
    "prepare_workdir",
    "probe_kvm_vmm",
    "reach_agent",
    "remove_stale_socket",
]

logger = logging.getLogger(__name__)


def find_binary(name: str, configured: Path | str | None = None) -> Path | None:
    """The configured path if it is an executable file, else ``name`` on PATH."""
    if configured is not None:
        path = Path(configured).expanduser()
        return path if path.is_file() and os.access(path, os.X_OK) else None
    found = shutil.which(name)
    return Path(found) if found else None


@dataclass(frozen=True)
class VmmBinary:
    """One VMM executable: how it is named, found and installed."""

    #: How messages name the VMM ("Cloud Hypervisor").
    title: str
    #: The executable's name on PATH ("cloud-hypervisor").
    name: str
    #: The environment variable that may hold its path ("STOCKADE_CLOUD_HYPERVISOR").
    env_var: str
    #: How to install it, for errors and probe results.
    install_fix: str

    def from_env(self) -> str | None:
        """The path configured in ``env_var``, if any."""
        return os.environ.get(self.env_var) or None

    def not_found(self, configured: Path | str | None) -> str:
        """The probe's reason when ``configured`` (from ``env_var``) or PATH has no binary."""
        where = f"at {configured} ({self.env_var})" if configured else "on PATH"
        return f"{self.name} not found {where}"

    def require(self, configured: Path | None = None) -> Path:
        """The binary at ``configured``, else at ``env_var``'s path, else on PATH; or an
        error that says where it looked and how to install it."""
        where_from = configured or self.from_env()
        found = find_binary(self.name, where_from)
        if found is None:
            where = f"at {where_from}" if where_from else "on PATH"
            raise SandboxStartError(f"{self.name} not found {where}; {self.install_fix}")
        return found


def option_value(value: str, what: str, *, vmm: str, forbidden: str) -> str:
    """``value``, unless it holds a character of ``forbidden`` that ``vmm``'s option parser
    (which splits option lists at commas) would split or misread."""
    bad = sorted(set(value) & set(forbidden))
    if bad:
        raise ValueError(
            f"{what} {value!r} contains {''.join(bad)!r}, which {vmm}'s option parser would "
            "split or misread; rename the file"
        )
    return value


def check_resources(spec: VmSpec) -> None:
    """Refuse a spec with no vCPU or no memory."""
    if spec.vcpus < 1 or spec.memory_mib < 1:
        raise ValueError(f"need at least 1 vCPU and 1 MiB, not {spec.vcpus} / {spec.memory_mib}")


@dataclass(frozen=True)
class KvmStatus:
    """Whether /dev/kvm can run a standard (non-PVM) guest, and if not, why."""

    ok: bool
    reason: str = ""


def kvm_status(dev: Path = Path("/dev/kvm"), sys_module: Path = Path("/sys/module")) -> KvmStatus:
    """Check /dev/kvm the way Firecracker and Cloud Hypervisor need it: hardware KVM, rw."""
    if not dev.exists():
        return KvmStatus(False, f"{dev} does not exist (no KVM on this host)")
    if not os.access(dev, os.R_OK | os.W_OK):
        return KvmStatus(False, f"{dev} is not readable and writable by uid {os.getuid()}")
    hardware = [m for m in ("kvm_intel", "kvm_amd") if (sys_module / m).exists()]
    if not hardware and (sys_module / "kvm_pvm").exists():
        # PVM (kvm_pvm) answers the KVM ioctls but runs only PVM-enabled guest kernels.
        return KvmStatus(
            False,
            f"{dev} is provided by kvm_pvm (PVM), which runs only PVM-enabled guest kernels; "
            "a standard guest needs hardware KVM (kvm_intel or kvm_amd)",
        )
    return KvmStatus(True)


def probe_kvm_vmm(vmm: VmmBinary, configured: str | None = None) -> Availability:
    """Is a Linux VMM that needs hardware KVM usable here? Never raises."""
    if not sys.platform.startswith("linux"):
        return Availability(
            False,
            f"{vmm.title} runs only on Linux with KVM; this host is {sys.platform}",
            "use the vfkit driver on macOS, or the qemu driver",
        )
    problems: list[str] = []
    binary = find_binary(vmm.name, configured)
    if binary is None:
        problems.append(vmm.not_found(configured))
    kvm = kvm_status()
    if not kvm.ok:
        problems.append(kvm.reason)
    if problems:
        return Availability(False, "; ".join(problems), vmm.install_fix, details=tuple(problems))
    return Availability(True, details=(f"binary: {binary}",))


def prepare_workdir(workdir: Path) -> None:
    """Create the VM's private directory (0700) if it is missing."""
    workdir.mkdir(mode=0o700, parents=True, exist_ok=True)
    os.chmod(workdir, 0o700)


#: sun_path is 108 bytes on Linux (104 on macOS) including the terminating NUL.
MAX_SOCKET_PATH = 103 if sys.platform == "darwin" else 107


def remove_stale_socket(path: Path) -> None:
    """Check that ``path`` can be a unix socket and remove a leftover socket there.

    VMMs refuse to bind a path that exists; anything but a socket is left alone.
    """
    if len(os.fsencode(path)) > MAX_SOCKET_PATH:
        raise SandboxStartError(
            f"the socket path {path} is {len(os.fsencode(path))} bytes, longer than the "
            f"{MAX_SOCKET_PATH} a unix socket address holds; use a shorter VM directory"
        )
    try:
        mode = path.lstat().st_mode
    except FileNotFoundError:
        return
    if stat.S_ISSOCK(mode):
        path.unlink()
    else:
        raise SandboxStartError(
            f"{path} exists and is not a socket; the VMM needs that path for its socket. "
            "Remove it or use a fresh VM directory"
        )


_PANIC = re.compile(rb"Kernel panic - not syncing")
_POWEROFF = re.compile(rb"reboot: (Power down|System halted)")
_REBOOT = re.compile(rb"reboot: Restarting system")


class VmmProcess:
    """One VMM child process (its own session), its console log and a verified stop."""

    def __init__(
        self, name: str, process: Process, console_path: Path, serial_path: Path | None = None
    ) -> None:
        self.name = name
        self.process = process
        #: The VMM's stdout and stderr (for Firecracker also the guest's serial console).
        self.console_path = console_path
        #: The guest's serial console when the VMM writes it to a file of its own.
        self.serial_path = serial_path
        self._pidfd: int | None = None
        self._stopped_by_us = False
        self._gone = False
        if hasattr(os, "pidfd_open"):
            # We have not reaped the child yet, so the pid cannot have been reused.
            with contextlib.suppress(OSError):
                self._pidfd = os.pidfd_open(process.pid)

    @classmethod
    async def start(
        cls, name: str, argv: list[str], console_path: Path, serial_path: Path | None = None
    ) -> VmmProcess:
        """Start ``argv`` in a new session with stdout+stderr appended to ``console_path``."""
        fd = os.open(console_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o600)
        try:
            process = await anyio.open_process(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=fd,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        except OSError as exc:
            raise SandboxStartError(
                f"could not start {name} ({argv[0]}): {exc}; check the binary and its permissions"
            ) from exc
        finally:
            os.close(fd)
        logger.debug("started %s pid %d: %s", name, process.pid, argv)
        return cls(name, process, console_path, serial_path)

    @property
    def pid(self) -> int:
        return self.process.pid

    def alive(self) -> bool:
        if self._gone:
            return False
        if self._pidfd is not None:
            ready, _, _ = select.select([self._pidfd], [], [], 0)
            return not ready
        return self.process.returncode is None

    def console(self, limit: int = 4000) -> str:
        """Tail of the guest console, then of the VMM's own output when that is separate."""
        if self.serial_path is None:
            return tail(self.console_path, limit)
        parts = [tail(self.serial_path, limit), tail(self.console_path, limit // 2)]
        return f"\n--- {self.name} ---\n".join(p for p in parts if p)

    def exit_reason(self) -> str | None:
        """Why the VMM ended, from the guest console and its exit status."""
        if self.alive():
            return None
        if self._stopped_by_us:
            return "stopped"
        log = self.console(16000).encode()
        if _PANIC.search(log):
            return "kernel panic"
        if _POWEROFF.search(log):
            return "guest poweroff"
        if _REBOOT.search(log):
            return "guest reboot"
        code = self.process.returncode
        return f"{self.name} exited" + (f" with status {code}" if code is not None else "")

    async def stop(self, grace: float = 1.0) -> None:
        """SIGTERM, ``grace`` seconds, SIGKILL; then verify no process of its session survives."""
        if self._gone:
            return
        self._stopped_by_us = self._stopped_by_us or self.alive()
        with anyio.CancelScope(shield=True):
            await stop_process(self.process, grace)
            survivors = await anyio.to_thread.run_sync(self._reap_session)
            self._gone = True
            if self._pidfd is not None:
                os.close(self._pidfd)
                self._pidfd = None
            if survivors:
                raise SandboxStateError(
                    f"{self.name} (pid {self.pid}) left processes behind after SIGKILL: "
                    f"{survivors}; kill them by hand"
                )

    def _reap_session(self) -> list[int]:
        """Kill whatever else runs in the VMM's process group and check that it is empty."""
        if self._pidfd is not None:
            ready, _, _ = select.select([self._pidfd], [], [], 5.0)
            if not ready:
                return [self.pid]
        pgid = self.pid  # start_new_session: the VMM leads its own group
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(pgid, signal.SIGKILL)
        members: list[int] | None = None
        for _ in range(100):
            try:
                os.killpg(pgid, 0)
            except ProcessLookupError:
                return []
            except PermissionError:
                break
            # Killed members linger as zombies until their new parent reaps them.
            members = _group_members(pgid)
            if members == []:
                return []
            select.select([], [], [], 0.05)
        return members or [pgid]


def _group_members(pgid: int) -> list[int] | None:
    """Live (non-zombie) pids in process group ``pgid``; None where /proc cannot tell."""
    if not sys.platform.startswith("linux"):
        return None
    members: list[int] = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            text = (entry / "stat").read_text()
        except OSError:
            continue
        fields = text.rsplit(")", 1)[-1].split()
        if len(fields) > 2 and fields[2] == str(pgid) and fields[0] != "Z":
            members.append(int(entry.name))
    return members


# --------------------------------------------------------------------------- API, handle, driver


class VmmApiError(SandboxStartError):
    """A VMM refused an API call (HTTP 4xx/5xx) or its API socket did not answer."""

    def __init__(self, message: str, *, status: int = 0) -> None:
        super().__init__(message)
        self.status = status


class VmmApi(abc.ABC):
    """HTTP over a VMM's unix API socket, and a wait until that socket answers."""

    vmm: ClassVar[VmmBinary]
    #: What this API raises.
    error: ClassVar[type[VmmApiError]] = VmmApiError

    def __init__(
        self,
        socket_path: Path,
        *,
        base_url: str,
        timeout: float,
        headers: dict[str, str] | None = None,
    ) -> None:
        import httpx  # lazy: importing it costs ~0.3 s, paid only when a VMM is driven

        self.socket_path = socket_path
        self._client = httpx.AsyncClient(
            transport=httpx.AsyncHTTPTransport(uds=str(socket_path)),
            base_url=base_url,
            timeout=timeout,
            headers=headers,
        )

    async def aclose(self) -> None:
        await self._client.aclose()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    @abc.abstractmethod
    async def ping(self) -> None:
        """One request that succeeds once the API serves; else raises ``httpx.TransportError``
        or ``VmmApiError`` (``wait_ready`` retries on those)."""

    async def wait_ready(self, *, timeout: float, alive: Callable[[], bool] = lambda: True) -> None:
        """Poll ``ping`` until the API answers, the process dies, or ``timeout`` passes."""
        deadline = anyio.current_time() + timeout
        import httpx

        last: BaseException | None = None
        while anyio.current_time() < deadline:
            if not alive():
                raise self.error(
                    f"{self.vmm.name} exited before its API socket {self.socket_path} answered"
                )
            try:
                await self.ping()
                return
            except (httpx.TransportError, VmmApiError) as exc:
                last = exc
            await anyio.sleep(0.01)
        # Our own errors say what failed; a transport error is clearer with its type.
        why = last if isinstance(last, VmmApiError) else repr(last)
        raise self.error(
            f"{self.vmm.title}'s API socket {self.socket_path} did not answer within "
            f"{timeout:g} s (last error: {why})"
        )


async def reach_agent(
    process: VmmProcess,
    api: VmmApi,
    *,
    what: str,
    vsock_socket: Path,
    port: int,
    api_timeout: float,
    boot_timeout: float,
    configure: Callable[[], Awaitable[None]] | None = None,
) -> SocketStream:
    """Wait for the VMM's API, ``configure`` the VM through it, then reach the guest agent
    over the hybrid vsock socket. On any failure the API is closed and the process stopped;
    a start error then names ``what`` (e.g. "Firecracker VM x") and carries the console."""
    try:
        await api.wait_ready(timeout=api_timeout, alive=process.alive)
        if configure is not None:
            await configure()
        return await wait_hybrid_vsock(
            vsock_socket,
            port,
            timeout=boot_timeout,
            alive=process.alive,
            describe=process.console,
        )
    except BaseException as exc:
        with anyio.CancelScope(shield=True):
            await api.aclose()
            await process.stop(0.2)
        if isinstance(exc, SandboxStartError) and not isinstance(exc, HybridVsockError):
            raise SandboxStartError(
                f"{what} did not start: {exc}\n--- console ---\n{process.console()}"
            ) from exc
        raise  # a HybridVsockError carries the console already


class VmmVm(VmHandle):
    """A VM that is one ``VmmProcess``: it is alive, has a console and an exit reason as that
    process does. ``stop`` closes the agent channel, asks the VMM to end the VM
    (``_shutdown``, at most ``grace`` seconds), closes the API client, then stops the process."""

    def __init__(self, process: VmmProcess, channel: ByteStream, api: VmmApi | None = None) -> None:
        self.process = process
        self.channel = channel
        self.api = api

    @property
    def pid(self) -> int:
        return self.process.pid

    def alive(self) -> bool:
        return self.process.alive()

    def console(self) -> str:
        return self.process.console()

    def exit_reason(self) -> str | None:
        return self.process.exit_reason()

    async def _shutdown(self) -> None:
        """Ask the VMM to end the VM before it is signalled; by default nothing is asked."""

    async def stop(self, grace: float = 1.0) -> None:
        with anyio.CancelScope(shield=True):
            with contextlib.suppress(Exception):
                await self.channel.aclose()
            if self.process.alive():
                with contextlib.suppress(Exception), anyio.move_on_after(grace):
                    await self._shutdown()
            if self.api is not None:
                with contextlib.suppress(Exception):
                    await self.api.aclose()
            await self.process.stop(grace)


class VmmDriver(Driver):
    """A driver that runs one ``vmm`` process per VM: the binary given to the constructor,
    else the one at ``$STOCKADE_<NAME>``, else the one on PATH."""

    vmm: ClassVar[VmmBinary]

    def __init__(self, binary: Path | str | None = None, *, boot_timeout: float = 30.0) -> None:
        self.binary = Path(binary) if binary is not None else None
        self.boot_timeout = boot_timeout

    def _binary(self) -> Path:
        return self.vmm.require(self.binary)


class KvmApiVmmDriver(VmmDriver):
    """A Linux VMM that needs hardware KVM and is controlled over a REST API socket."""

    def __init__(
        self,
        binary: Path | str | None = None,
        *,
        api_timeout: float = 10.0,
        boot_timeout: float = 30.0,
    ) -> None:
        super().__init__(binary, boot_timeout=boot_timeout)
        self.api_timeout = api_timeout

    @classmethod
    def probe(cls) -> Availability:
        return probe_kvm_vmm(cls.vmm, cls.vmm.from_env())
