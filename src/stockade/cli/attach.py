"""Attach the user's terminal (or pipes) to a command in a sandbox, locally or via a supervisor."""

from __future__ import annotations

import base64
import contextlib
import os
import signal
import stat
import sys
from collections.abc import Iterator
from typing import Any

import anyio
import click

from stockade._errors import AgentError, StockadeError
from stockade.agent.client import AgentClient, guest_shell
from stockade.protocol.messages import (
    ProcessResizeParams,
    ProcessStartParams,
    ProcessWriteStdinParams,
    PtySize,
)

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


async def _pump_stdin(client: AgentClient, proc: int) -> None:
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
                await client.call_raw(
                    "process.write_stdin",
                    ProcessWriteStdinParams(
                        proc=proc, data=base64.b64encode(data).decode(), eof=not data
                    ).model_dump(),
                )
            except AgentError:
                return  # the process has finished or closed its stdin
            if not data:
                return
    finally:
        if pollable:
            os.set_blocking(fd, True)


async def _pump_resize(client: AgentClient, proc: int) -> None:
    with anyio.open_signal_receiver(signal.SIGWINCH) as signals:
        async for _ in signals:
            rows, cols = _terminal_size(sys.stdout.fileno())
            await client.call_raw(
                "process.resize",
                ProcessResizeParams(proc=proc, rows=rows, cols=cols).model_dump(),
            )


async def attach(
    client: AgentClient,
    command: list[str] | None,
    tty: bool | None,
    *,
    env: dict[str, str] | None = None,
    cwd: str | None = None,
    timeout: float | None = None,
    on_started: Any = None,
) -> int:
    """Run ``command`` (None: the guest's shell) with our stdio attached; return the exit
    code to pass through."""
    if command is None:
        command = await guest_shell(client)
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
    params = ProcessStartParams(
        argv=command, env=env, cwd=cwd, stdin=stdin_usable, pty=pty, timeout=timeout
    )
    out_fd, err_fd = sys.stdout.fileno(), sys.stderr.fileno()
    sys.stdout.flush()

    def on_output(stream: str, chunk: bytes) -> None:
        _write_all(out_fd if stream == "stdout" else err_fd, chunk)

    started, events = await client.start_process(params, on_output=on_output)
    if on_started is not None:
        on_started(started)
    raw = _raw_terminal(stdin_fd) if tty else contextlib.nullcontext()
    with raw:
        async with anyio.create_task_group() as tg:
            if stdin_usable:
                tg.start_soon(_pump_stdin, client, started.proc)
            if tty:
                tg.start_soon(_pump_resize, client, started.proc)
            exit_params = await client.wait_process(events)
            tg.cancel_scope.cancel()
    if exit_params.timed_out:
        click.secho("stockade: command timed out and was killed", fg="red", err=True)
        return 124
    if exit_params.exit_code is not None:
        return exit_params.exit_code
    return 128 + (exit_params.signal or 0)


async def attach_local(sandbox: Any, command: list[str], tty: bool | None) -> int:
    """Attach to a command in an in-process sandbox (``stockade run``)."""
    client = sandbox._require_client()

    def audit(started: Any) -> None:
        sandbox._audit(
            "process.started", target=" ".join(command)[:1000], details={"pid": started.pid}
        )

    with sandbox._explained():  # a lost sandbox says why (e.g. its timeout expired)
        try:
            code = await attach(
                client,
                command,
                tty,
                timeout=sandbox.policy.limits.command_timeout,
                on_started=audit,
            )
        except ExceptionGroup as group:  # attach's task group wraps the lost connection
            if len(group.exceptions) == 1 and isinstance(group.exceptions[0], StockadeError):
                raise group.exceptions[0] from None
            raise
    sandbox._audit("process.exited", target=" ".join(command)[:1000], details={"exit_code": code})
    return code


async def attach_remote(
    record: Any,
    command: list[str] | None,
    tty: bool | None,
    env: dict[str, str],
    cwd: str | None,
    timeout: float | None,
) -> int:
    """Attach to a command in a supervised sandbox over its control socket."""
    from stockade.supervisor import connect_control

    client = await connect_control(record.control_socket)
    try:
        return await attach(client, command, tty, env=env, cwd=cwd, timeout=timeout)
    finally:
        await client.aclose()
