"""A sandbox that is one host process tree talking over its stdio (namespace and host modes).

The agent's stdin/stdout are either two pipes or, with ``socket_channel``, one end of an
AF_UNIX socketpair: a channel that can also carry descriptors (the egress fast path).
"""

from __future__ import annotations

import contextlib
import logging
import os
import select
import signal
import socket
from pathlib import Path
from typing import TYPE_CHECKING

import anyio
from anyio.abc import ByteStream, Process, UNIXSocketStream
from anyio.streams.stapled import StapledByteStream

from stockade._errors import SandboxStateError
from stockade.backends.base import LaunchedSandbox

if TYPE_CHECKING:
    from stockade.agent.client import AgentClient
    from stockade.backends._cgroups import SandboxCgroup

__all__ = [
    "ProcessSandbox",
    "kill_process",
    "socket_channel",
    "stop_process",
    "tail",
    "term_process",
]

logger = logging.getLogger(__name__)


async def term_process(process: Process, grace: float) -> None:
    """SIGTERM ``process`` if it still runs and wait for it up to ``grace`` seconds."""
    if process.returncode is None:
        with contextlib.suppress(ProcessLookupError):
            process.send_signal(signal.SIGTERM)
        with anyio.move_on_after(grace):
            await process.wait()


async def kill_process(process: Process) -> None:
    """SIGKILL ``process`` if it still runs, and reap it."""
    if process.returncode is None:
        with contextlib.suppress(ProcessLookupError):
            process.kill()
        await process.wait()


async def stop_process(process: Process, grace: float) -> None:
    """SIGTERM, up to ``grace`` seconds, then SIGKILL; returns once it is reaped."""
    await term_process(process, grace)
    await kill_process(process)


def tail(path: Path, limit: int = 4000) -> str:
    """Last ``limit`` bytes of a log file, decoded for an error message."""
    try:
        with path.open("rb") as f:
            f.seek(0, os.SEEK_END)
            size = f.tell()
            f.seek(max(0, size - limit))
            return f.read().decode("utf-8", "replace").strip()
    except OSError:
        return ""


def socket_channel() -> tuple[socket.socket, socket.socket]:
    """(host end, agent end) of a stream socketpair; pass the agent end as stdin and stdout
    of the launcher, close it in the host after the launch, and give the host end to
    ``ProcessSandbox`` as ``channel_socket``."""
    host, agent = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    # Room for whole tunnel frames, as _grow_pipe gives a pipe channel (best effort).
    for sock in (host, agent):
        for option in (socket.SO_SNDBUF, socket.SO_RCVBUF):
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.SOL_SOCKET, option, 1 << 20)
    return host, agent


class ProcessSandbox(LaunchedSandbox):
    """Owns the launcher process, its cgroup and (when known) the pid-namespace init."""

    def __init__(
        self,
        process: Process,
        log_path: Path,
        *,
        cgroup: SandboxCgroup | None = None,
        info_fd: int | None = None,
        channel: UNIXSocketStream | None = None,
    ) -> None:
        self.process = process
        self.channel: ByteStream
        if channel is not None:
            self.channel = channel
        else:
            assert process.stdin is not None and process.stdout is not None
            self.channel = StapledByteStream(process.stdin, process.stdout)
        self.log_path = log_path
        self.cgroup = cgroup
        self._info_fd = info_fd
        self._init_pidfd: int | None = None
        self._terminated = False

    def alive(self) -> bool:
        return self.process.returncode is None

    def failure_details(self) -> str:
        return tail(self.log_path)

    def resource_events(self) -> dict[str, bool]:
        if self.cgroup is None:
            return {}
        return {
            "oom_killed": self.cgroup.oom_killed(),
            "pids_limit_hit": self.cgroup.pids_limit_hit(),
        }

    def kill_now(self) -> None:
        """SIGKILL the launcher: the pid namespace, the cgroup or the runtime's lifeline
        take the rest; ``terminate`` verifies it."""
        if self.process.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.process.pid, signal.SIGKILL)

    async def after_connect(self, client: AgentClient) -> None:
        self._capture_namespace_init()

    def _capture_namespace_init(self) -> None:
        """Read bwrap's info fd (written before the agent starts) and pin the ns init pid."""
        if self._info_fd is None or self._init_pidfd is not None:
            return
        data = b""
        with contextlib.suppress(BlockingIOError, OSError):
            data = os.read(self._info_fd, 4096)
        os.close(self._info_fd)
        self._info_fd = None
        import json

        try:
            child = int(json.loads(data.decode())["child-pid"])
        except (ValueError, KeyError, TypeError):
            logger.debug("no child pid on the info fd")
            return
        with contextlib.suppress(OSError):
            self._init_pidfd = os.pidfd_open(child)

    async def terminate(self, grace: float = 1.0) -> None:
        if self._terminated:
            return
        self._terminated = True
        with anyio.CancelScope(shield=True):
            self._capture_namespace_init()
            await self._term_process(grace)
            await self._kill_process_and_close()
            survivors = await anyio.to_thread.run_sync(self._reap_everything)
            if survivors:
                raise SandboxStateError(
                    f"processes of the sandbox survived teardown: {sorted(survivors)}"
                )

    async def _term_process(self, grace: float) -> None:
        """SIGTERM the process if it still runs and wait for it up to ``grace`` seconds."""
        await term_process(self.process, grace)

    async def _kill_process_and_close(self) -> None:
        """SIGKILL the process if it still runs, reap it, and close the channel."""
        await kill_process(self.process)
        with contextlib.suppress(Exception):
            await self.channel.aclose()

    def _reap_everything(self) -> set[int]:
        """Kill whatever is left in the cgroup / namespace and verify nothing survives."""
        survivors: set[int] = set()
        if self._init_pidfd is not None:
            # The namespace init dying means the kernel has killed every process in it.
            ready, _, _ = select.select([self._init_pidfd], [], [], 5.0)
            if not ready:
                with contextlib.suppress(OSError):
                    signal.pidfd_send_signal(self._init_pidfd, signal.SIGKILL)
                ready, _, _ = select.select([self._init_pidfd], [], [], 5.0)
            if not ready:
                survivors.add(-1)
            os.close(self._init_pidfd)
            self._init_pidfd = None
        if self.cgroup is not None:
            self.cgroup.kill_all()
            survivors |= self.cgroup.pids()
            if not survivors:
                self.cgroup.destroy()
        return survivors
