"""``sandbox.commands`` and ``sandbox.pty``: start processes in the sandbox and drive them
through their handles."""

from __future__ import annotations

import os
import shlex
import signal
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Literal, overload

from stockade._errors import CommandFailedError, ExecTimeoutError
from stockade._results import CommandResult
from stockade.agent.client import ProcessEvents, guest_shell
from stockade.protocol.messages import (
    ProcessExitParams,
    ProcessResizeParams,
    ProcessSignalParams,
    ProcessStartParams,
    ProcessWriteStdinParams,
    PtySize,
)
from stockade.sandbox.ports import FILE_CHUNK, CommandsPort, b64

__all__ = ["AsyncCommandHandle", "AsyncCommands", "AsyncPty", "OutputHandler"]

OutputHandler = Callable[[bytes], None]


def _command_text(cmd: str | Sequence[str]) -> str:
    text = cmd if isinstance(cmd, str) else shlex.join(cmd)
    return text if len(text) <= 1000 else text[:1000] + "..."


class AsyncCommandHandle:
    """A running command: wait for it, feed its stdin, signal it."""

    def __init__(self, sandbox: CommandsPort, pid: int, events: ProcessEvents, command: str):
        self._sandbox = sandbox
        self.pid = pid
        self._events = events
        self._command = command
        self._started = time.monotonic()

    @property
    def proc(self) -> int:
        """The agent's handle for this process."""
        return self._events.proc

    @property
    def exit_code(self) -> int | None:
        """Exit status once finished, else None."""
        ev = self._events.exit
        return None if ev is None else _exit_code(ev)

    async def wait(self, *, check: bool = False) -> CommandResult:
        """Wait for the command to end and return its result."""
        client = self._sandbox._require_client()
        with self._sandbox._explained():
            exit_params = await client.wait_process(self._events)
        client.forget_process(self.proc)
        result = CommandResult(
            stdout_bytes=bytes(self._events.stdout),
            stderr_bytes=bytes(self._events.stderr),
            exit_code=_exit_code(exit_params),
            signal=exit_params.signal,
            timed_out=exit_params.timed_out,
            duration=time.monotonic() - self._started,
        )
        self._sandbox._audit(
            "process.exited",
            target=self._command,
            details={"pid": self.pid, "exit_code": result.exit_code, "timed_out": result.timed_out},
        )
        if result.timed_out:
            raise ExecTimeoutError(
                f"command {self._command!r} exceeded its timeout and was killed; "
                "pass timeout=... (CLI: --timeout) to allow longer",
                result=result,
            )
        if check and result.exit_code != 0:
            raise CommandFailedError(
                f"command {self._command!r} exited with {result.exit_code}: "
                f"{result.stderr.strip()[-500:]}",
                result=result,
            )
        return result

    async def send_stdin(self, data: bytes | str, *, eof: bool = False) -> None:
        """Write to the command's stdin (it must have been started with stdin=True)."""
        raw = data.encode() if isinstance(data, str) else data
        await self._sandbox._call(
            "process.write_stdin", ProcessWriteStdinParams(proc=self.proc, data=b64(raw), eof=eof)
        )

    async def close_stdin(self) -> None:
        """Signal end of input."""
        await self.send_stdin(b"", eof=True)

    async def signal(self, signum: int = signal.SIGTERM, *, group: bool = True) -> None:
        """Send a signal to the command (by default to its whole process group)."""
        await self._sandbox._call(
            "process.signal", ProcessSignalParams(proc=self.proc, signal=int(signum), group=group)
        )

    async def kill(self) -> None:
        """SIGKILL the command's process group."""
        await self.signal(signal.SIGKILL)

    async def resize(self, rows: int, cols: int) -> None:
        """Resize the PTY of a PTY command."""
        await self._sandbox._call(
            "process.resize", ProcessResizeParams(proc=self.proc, rows=rows, cols=cols)
        )


def _exit_code(ev: ProcessExitParams) -> int:
    if ev.exit_code is not None:
        return ev.exit_code
    return 128 + (ev.signal or 0)


class AsyncCommands:
    """``sandbox.commands``: run commands in the sandbox."""

    def __init__(self, sandbox: CommandsPort) -> None:
        self._sandbox = sandbox

    @overload
    async def run(
        self,
        cmd: str | Sequence[str],
        *,
        background: Literal[False] = False,
        env: Mapping[str, str] | None = None,
        cwd: str | None = None,
        timeout: float | None = None,
        stdin: bytes | str | None = None,
        on_stdout: OutputHandler | None = None,
        on_stderr: OutputHandler | None = None,
        check: bool = False,
        pty: PtySize | None = None,
    ) -> CommandResult: ...

    @overload
    async def run(
        self,
        cmd: str | Sequence[str],
        *,
        background: Literal[True],
        env: Mapping[str, str] | None = None,
        cwd: str | None = None,
        timeout: float | None = None,
        stdin: bytes | str | None = None,
        on_stdout: OutputHandler | None = None,
        on_stderr: OutputHandler | None = None,
        check: bool = False,
        pty: PtySize | None = None,
    ) -> AsyncCommandHandle: ...

    async def run(
        self,
        cmd: str | Sequence[str],
        *,
        background: bool = False,
        env: Mapping[str, str] | None = None,
        cwd: str | None = None,
        timeout: float | None = None,
        stdin: bytes | str | None = None,
        on_stdout: OutputHandler | None = None,
        on_stderr: OutputHandler | None = None,
        check: bool = False,
        pty: PtySize | None = None,
    ) -> CommandResult | AsyncCommandHandle:
        """Run a command: a string goes to ``/bin/sh -c``, a sequence is an argv.

        Waits and returns a ``CommandResult`` (non-zero exit is a result unless
        ``check=True``), or with ``background=True`` returns a handle at once. ``stdin``
        bytes are written and closed; pass ``stdin=b""`` with ``background=True`` to keep
        stdin open for ``handle.send_stdin``.
        """
        handle = await self.start(
            cmd,
            env=env,
            cwd=cwd,
            timeout=timeout,
            keep_stdin=background and stdin is not None,
            on_stdout=on_stdout,
            on_stderr=on_stderr,
            pty=pty,
            stdin_data=stdin,
        )
        if background:
            return handle
        return await handle.wait(check=check)

    async def start(
        self,
        cmd: str | Sequence[str],
        *,
        env: Mapping[str, str] | None = None,
        cwd: str | None = None,
        timeout: float | None = None,
        keep_stdin: bool = False,
        on_stdout: OutputHandler | None = None,
        on_stderr: OutputHandler | None = None,
        pty: PtySize | None = None,
        stdin_data: bytes | str | None = None,
    ) -> AsyncCommandHandle:
        """Start a command and return its handle (the primitive behind ``run``)."""
        sandbox = self._sandbox
        client = sandbox._require_client()
        if timeout is None:
            timeout = sandbox.policy.limits.command_timeout
        if isinstance(cmd, str):
            argv, shell = None, cmd
        else:
            argv, shell = list(cmd), None
            if not argv:
                raise ValueError("cmd must not be an empty sequence")
        params = ProcessStartParams(
            argv=argv,
            shell=shell,
            env=dict(env or {}),
            cwd=cwd,
            stdin=keep_stdin or stdin_data is not None,
            pty=pty,
            timeout=timeout,
        )

        on_output = None
        if on_stdout is not None or on_stderr is not None:

            def on_output(stream: str, chunk: bytes) -> None:
                handler = on_stdout if stream == "stdout" else on_stderr
                if handler is not None:
                    handler(chunk)

        with sandbox._explained():
            started, events = await client.start_process(params, on_output=on_output)
        text = _command_text(cmd)
        sandbox._audit("process.started", target=text, details={"pid": started.pid})
        handle = AsyncCommandHandle(sandbox, started.pid, events, text)
        if stdin_data is not None:
            raw = stdin_data.encode() if isinstance(stdin_data, str) else stdin_data
            for i in range(0, len(raw), FILE_CHUNK):
                await handle.send_stdin(raw[i : i + FILE_CHUNK])
            if not keep_stdin:
                await handle.close_stdin()
        return handle


class AsyncPty:
    """``sandbox.pty``: interactive terminals."""

    def __init__(self, sandbox: CommandsPort, commands: AsyncCommands) -> None:
        self._sandbox = sandbox
        self._commands = commands

    async def default_shell(self) -> list[str]:
        """The guest's interactive shell: ``/bin/bash -i``, or ``/bin/sh -i`` where the
        sandbox's root has no bash (asked of the guest, never assumed from the host)."""
        with self._sandbox._explained():
            return await guest_shell(self._sandbox._require_client())

    async def create(
        self,
        cmd: str | Sequence[str] | None = None,
        *,
        rows: int = 24,
        cols: int = 80,
        on_data: OutputHandler | None = None,
        env: Mapping[str, str] | None = None,
        cwd: str | None = None,
        timeout: float | None = None,
    ) -> AsyncCommandHandle:
        """Start ``cmd`` (default: an interactive shell) on a new pseudo-terminal."""
        if cmd is None:
            cmd = await self.default_shell()
        return await self._commands.start(
            cmd,
            env={"TERM": os.environ.get("TERM", "xterm-256color"), **(env or {})},
            cwd=cwd,
            timeout=timeout,
            keep_stdin=True,
            on_stdout=on_data,
            pty=PtySize(rows=rows, cols=cols),
        )
