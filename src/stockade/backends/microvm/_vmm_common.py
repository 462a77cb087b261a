"""Plumbing shared by the Firecracker, Cloud Hypervisor and vfkit drivers.

Finding a VMM binary, checking that KVM can run a standard guest, and ``VmmProcess``: one
VMM child process with its console log, a pidfd (Linux) and a stop that verifies nothing of
it survives.
"""

from __future__ import annotations

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
from dataclasses import dataclass
from pathlib import Path

import anyio
from anyio.abc import Process

from stockade._errors import SandboxStartError, SandboxStateError
from stockade.backends._process import tail

__all__ = [
    "MAX_SOCKET_PATH",
    "KvmStatus",
    "VmmProcess",
    "find_binary",
    "kvm_status",
    "prepare_workdir",
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
            if self.process.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    self.process.send_signal(signal.SIGTERM)
                with anyio.move_on_after(grace):
                    await self.process.wait()
            if self.process.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    self.process.kill()
                await self.process.wait()
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
