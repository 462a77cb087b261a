"""Attach the user's terminal (or pipes) to a command in a sandbox, locally or via a supervisor."""

from __future__ import annotations

import contextlib
import os
import signal
import stat
import sys
from collections.abc import Iterator

import anyio
import click

from stockade import AgentError, AsyncCommandHandle, AsyncSandbox, ExecTimeoutError, StockadeError
from stockade.protocol.messages import PtySize

__all__ = ["attach", "attach_local", "attach_remote"]


def _terminal_size(fd: int) -> tuple[int, int]:
    """(rows, cols) of a terminal; 24x80 when it reports none (a fresh pty says 0x0)."""
    try:
        size = os.get_terminal_size(fd)
    except OSError:
        return 24, 80
    return (size.lines or 24), (size.columns or 80)


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        try:
            written = os.write(fd, view)
        except BlockingIOError:
            continue
        except BrokenPipeError:
            return
        view = view[written:]


@contextlib.contextmanager
def _raw_terminal(fd: int) -> Iterator[None]:
    import termios
    import tty

    saved = termios.tcgetattr(fd)
    try:
        # TCSANOW, not setraw's default TCSAFLUSH: keep what the user typed ahead.
        tty.setraw(fd, termios.TCSANOW)
        yield
    finally:
        termios.tcsetattr(fd, termios.TCSADRAIN, saved)


async def _pump_stdin(handle: AsyncCommandHandle) -> None:
    """Forward our stdin to the process; send EOF when ours ends."""
    fd = sys.stdin.fileno()
    # Regular files and some devices (/dev/null) cannot be polled; read them in a thread
    # (they never block for long). Pipes, sockets and terminals are polled.
    pollable = not stat.S_ISREG(os.fstat(fd).st_mode)
    if pollable:
        os.set_blocking(fd, False)
    try:
        while True:
            if not pollable:
                data = await anyio.to_thread.run_sync(os.read, fd, 65536)
            else:
                try:
                    await anyio.wait_readable(fd)
                except PermissionError:
                    pollable = False
                    os.set_blocking(fd, True)
                    continue
                try:
                    data = os.read(fd, 65536)
                except BlockingIOError:
                    continue
            try:
                await handle.send_stdin(data, eof=not data)
            except AgentError:
                return  # the process has finished or closed its stdin
            if not data:
                return
    finally:
        if pollable:
            os.set_blocking(fd, True)


async def _pump_resize(handle: AsyncCommandHandle) -> None:
    with anyio.open_signal_receiver(signal.SIGWINCH) as signals:
        async for _ in signals:
            rows, cols = _terminal_size(sys.stdout.fileno())
            await handle.resize(rows, cols)


async def attach(
    sandbox: AsyncSandbox,
    command: list[str] | None,
    tty: bool | None,
    *,
    env: dict[str, str] | None = None,
    cwd: str | None = None,
    timeout: float | None = None,
) -> int:
    """Run ``command`` (None: the guest's shell) with our stdio attached; return the exit
    code to pass through."""
    if command is None:
        command = await sandbox.pty.default_shell()
    stdin_fd = sys.stdin.fileno() if sys.stdin is not None else -1
    if tty is None:
        tty = stdin_fd >= 0 and os.isatty(stdin_fd) and os.isatty(sys.stdout.fileno())
    stdin_usable = stdin_fd >= 0 and (tty or not os.isatty(stdin_fd))
    pty = None
    env = dict(env or {})
    if tty:
        rows, cols = _terminal_size(sys.stdout.fileno())
        pty = PtySize(rows=rows, cols=cols)
        env.setdefault("TERM", os.environ.get("TERM", "xterm-256color"))
    out_fd, err_fd = sys.stdout.fileno(), sys.stderr.fileno()
    sys.stdout.flush()

    handle = await sandbox.commands.start(
        command,
        env=env,
        cwd=cwd,
        timeout=timeout,
        keep_stdin=stdin_usable,
        on_stdout=lambda chunk: _write_all(out_fd, chunk),
        on_stderr=lambda chunk: _write_all(err_fd, chunk),
        pty=pty,
    )
    timed_out = False
    code = 0
    raw = _raw_terminal(stdin_fd) if tty else contextlib.nullcontext()
    try:
        with raw:
            async with anyio.create_task_group() as tg:
                if stdin_usable:
                    tg.start_soon(_pump_stdin, handle)
                if tty:
                    tg.start_soon(_pump_resize, handle)
                try:
                    code = (await handle.wait()).exit_code
                except ExecTimeoutError:
                    timed_out = True
                tg.cancel_scope.cancel()
    except ExceptionGroup as group:  # the task group wraps a lost connection
        if len(group.exceptions) == 1 and isinstance(group.exceptions[0], StockadeError):
            raise group.exceptions[0] from None
        raise
    if timed_out:
        click.secho("stockade: command timed out and was killed", fg="red", err=True)
        return 124
    return code


async def attach_local(sandbox: AsyncSandbox, command: list[str], tty: bool | None) -> int:
    """Attach to a command in an in-process sandbox (``stockade run``)."""
    return await attach(sandbox, command, tty)


async def attach_remote(
    name: str,
    command: list[str] | None,
    tty: bool | None,
    env: dict[str, str],
    cwd: str | None,
    timeout: float | None,
) -> int:
    """Attach to a command in a sandbox another process runs (``stockade exec``)."""
    sandbox = await AsyncSandbox.connect(name, actor="cli")
    try:
        return await attach(sandbox, command, tty, env=env, cwd=cwd, timeout=timeout)
    finally:
        await sandbox.aclose()  # detach: the sandbox goes on running
