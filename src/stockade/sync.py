"""Blocking facade over the async core: same names, same arguments, ``close`` for ``aclose``.

Each ``Sandbox`` runs its ``AsyncSandbox`` on a private event loop thread (an anyio
blocking portal), so two sandboxes with different policies live side by side in one process.
"""

from __future__ import annotations

import builtins
import contextlib
import signal
from collections.abc import Awaitable, Callable, Mapping, Sequence
from contextlib import AbstractContextManager
from pathlib import Path
from types import TracebackType
from typing import Any, Literal, ParamSpec, TypeVar, overload

import anyio
from anyio.from_thread import BlockingPortal, start_blocking_portal
from pydantic import BaseModel

from stockade._results import CommandResult
from stockade.backends.base import Backend
from stockade.policy import EffectivePolicy
from stockade.protocol.messages import AgentHelloResult, FsEntry, PtySize
from stockade.sandbox import (
    AsyncCommandHandle,
    AsyncCommands,
    AsyncFiles,
    AsyncNetwork,
    AsyncPty,
    AsyncSandbox,
    AsyncWorkspace,
    OutputHandler,
    SandboxInfo,
)
from stockade.workspace import ApplyResult, ConflictMode, WorkspaceDiff

__all__ = [
    "CommandHandle",
    "Commands",
    "Files",
    "Network",
    "Pty",
    "Sandbox",
    "SandboxInfo",
    "Workspace",
]


P = ParamSpec("P")
T = TypeVar("T")


class _PortalBound:
    def __init__(self, portal: BlockingPortal) -> None:
        self._portal = portal

    def _run(self, fn: Callable[P, Awaitable[T]], /, *args: P.args, **kwargs: P.kwargs) -> T:
        return self._portal.call(lambda: fn(*args, **kwargs))


class CommandHandle(_PortalBound):
    """A running command (blocking twin of ``AsyncCommandHandle``)."""

    def __init__(self, portal: BlockingPortal, handle: AsyncCommandHandle) -> None:
        super().__init__(portal)
        self._handle = handle
        self.pid = handle.pid

    @property
    def proc(self) -> int:
        return self._handle.proc

    @property
    def exit_code(self) -> int | None:
        return self._handle.exit_code

    def wait(self, *, check: bool = False) -> CommandResult:
        return self._run(self._handle.wait, check=check)

    def send_stdin(self, data: bytes | str, *, eof: bool = False) -> None:
        self._run(self._handle.send_stdin, data, eof=eof)

    def close_stdin(self) -> None:
        self._run(self._handle.close_stdin)

    def signal(self, signum: int = signal.SIGTERM, *, group: bool = True) -> None:
        self._run(self._handle.signal, signum, group=group)

    def kill(self) -> None:
        self._run(self._handle.kill)

    def resize(self, rows: int, cols: int) -> None:
        self._run(self._handle.resize, rows, cols)


class Commands(_PortalBound):
    """``sandbox.commands`` (blocking)."""

    def __init__(self, portal: BlockingPortal, commands: AsyncCommands) -> None:
        super().__init__(portal)
        self._commands = commands

    @overload
    def run(
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
    def run(
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
    ) -> CommandHandle: ...

    def run(
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
    ) -> CommandResult | CommandHandle:
        """Run a command; see ``AsyncCommands.run``."""
        # The overloads narrow the result by ``background``, a plain bool here.
        run: Callable[..., Awaitable[CommandResult | AsyncCommandHandle]] = self._commands.run
        out = self._run(
            run,
            cmd,
            background=background,
            env=env,
            cwd=cwd,
            timeout=timeout,
            stdin=stdin,
            on_stdout=on_stdout,
            on_stderr=on_stderr,
            check=check,
            pty=pty,
        )
        if isinstance(out, AsyncCommandHandle):
            return CommandHandle(self._portal, out)
        return out

    def start(
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
    ) -> CommandHandle:
        handle = self._run(
            self._commands.start,
            cmd,
            env=env,
            cwd=cwd,
            timeout=timeout,
            keep_stdin=keep_stdin,
            on_stdout=on_stdout,
            on_stderr=on_stderr,
            pty=pty,
            stdin_data=stdin_data,
        )
        return CommandHandle(self._portal, handle)


class Pty(_PortalBound):
    """``sandbox.pty`` (blocking)."""

    def __init__(self, portal: BlockingPortal, pty: AsyncPty) -> None:
        super().__init__(portal)
        self._pty = pty

    def default_shell(self) -> list[str]:
        return self._run(self._pty.default_shell)

    def create(
        self,
        cmd: str | Sequence[str] | None = None,
        *,
        rows: int = 24,
        cols: int = 80,
        on_data: OutputHandler | None = None,
        env: Mapping[str, str] | None = None,
        cwd: str | None = None,
        timeout: float | None = None,
    ) -> CommandHandle:
        handle = self._run(
            self._pty.create,
            cmd,
            rows=rows,
            cols=cols,
            on_data=on_data,
            env=env,
            cwd=cwd,
            timeout=timeout,
        )
        return CommandHandle(self._portal, handle)


class Files(_PortalBound):
    """``sandbox.files`` (blocking)."""

    def __init__(self, portal: BlockingPortal, files: AsyncFiles) -> None:
        super().__init__(portal)
        self._files = files

    @overload
    def read(self, path: str, *, format: Literal["text"] = "text") -> str: ...

    @overload
    def read(self, path: str, *, format: Literal["bytes"]) -> bytes: ...

    def read(self, path: str, *, format: Literal["text", "bytes"] = "text") -> str | bytes:
        # The overloads narrow the result by ``format``, a plain Literal union here.
        read: Callable[..., Awaitable[str | bytes]] = self._files.read
        return self._run(read, path, format=format)

    def write(self, path: str, data: str | bytes, *, mode: int | None = None) -> int:
        return self._run(self._files.write, path, data, mode=mode)

    def stat(self, path: str) -> FsEntry:
        return self._run(self._files.stat, path)

    def exists(self, path: str) -> bool:
        return self._run(self._files.exists, path)

    def list(self, path: str = ".", *, depth: int = 1) -> list[FsEntry]:
        return self._run(self._files.list, path, depth=depth)

    def remove(self, path: str, *, recursive: bool = False) -> None:
        self._run(self._files.remove, path, recursive=recursive)

    def make_dir(self, path: str, *, mode: int = 0o755) -> None:
        self._run(self._files.make_dir, path, mode=mode)

    def upload(self, source: str | Path, dest: str = ".") -> int:
        return self._run(self._files.upload, source, dest)

    def download(self, path: str, dest: str | Path) -> builtins.list[Path]:
        return self._run(self._files.download, path, dest)


class Workspace(_PortalBound):
    """``sandbox.workspace`` (blocking)."""

    def __init__(self, portal: BlockingPortal, workspace: AsyncWorkspace) -> None:
        super().__init__(portal)
        self._workspace = workspace

    def diff(
        self, paths: Sequence[str] | None = None, *, include_ignored: bool = False
    ) -> WorkspaceDiff:
        return self._run(self._workspace.diff, paths, include_ignored=include_ignored)

    def apply(
        self,
        paths: Sequence[str] | None = None,
        *,
        force: bool = False,
        conflicts: ConflictMode = "skip",
        include_ignored: bool = False,
    ) -> ApplyResult:
        return self._run(
            self._workspace.apply,
            paths,
            force=force,
            conflicts=conflicts,
            include_ignored=include_ignored,
        )

    def reset(self) -> None:
        self._run(self._workspace.reset)

    def sync(self) -> None:
        self._run(self._workspace.sync)


class Network(_PortalBound):
    """``sandbox.network`` (blocking)."""

    def __init__(self, portal: BlockingPortal, network: AsyncNetwork) -> None:
        super().__init__(portal)
        self._network = network

    def allow(self, entry: str) -> None:
        self._run(self._network.allow, entry)

    def deny(self, entry: str) -> None:
        self._run(self._network.deny, entry)

    def log(self) -> list[dict[str, Any]]:
        return self._run(self._network.log)


class Sandbox:
    """A sandbox with a blocking API. Create with ``Sandbox.create(...)``; ``close()`` it."""

    def __init__(
        self,
        inner: AsyncSandbox,
        portal: BlockingPortal,
        portal_cm: AbstractContextManager[BlockingPortal],
    ) -> None:
        self._inner = inner
        self._portal = portal
        self._portal_cm = portal_cm
        self._forks: builtins.list[Sandbox] = []  # on this one's event-loop thread
        self.commands = Commands(portal, inner.commands)
        self.files = Files(portal, inner.files)
        self.pty = Pty(portal, inner.pty)
        self.workspace = Workspace(portal, inner.workspace)
        self.network = Network(portal, inner.network)

    @classmethod
    def create(
        cls,
        *,
        name: str | None = None,
        project_dir: str | Path | None = None,
        backend: str | None = None,
        profile: str | None = None,
        workspace_mode: str | None = None,
        memory: str | int | None = None,
        pids: int | None = None,
        cpus: float | None = None,
        timeout: str | float | None = None,
        command_timeout: str | float | None = None,
        env: Mapping[str, str] | None = None,
        unsafe_host: bool | None = None,
        config: Mapping[str, Any] | None = None,
        keep: bool = False,
        state_dir: str | Path | None = None,
        actor: str = "sdk",
    ) -> Sandbox:
        """Start a sandbox; see ``AsyncSandbox.create``."""
        portal_cm = start_blocking_portal()
        portal = portal_cm.__enter__()
        try:
            inner = portal.call(
                lambda: AsyncSandbox.create(
                    name=name,
                    project_dir=project_dir,
                    backend=backend,
                    profile=profile,
                    workspace_mode=workspace_mode,
                    memory=memory,
                    pids=pids,
                    cpus=cpus,
                    timeout=timeout,
                    command_timeout=command_timeout,
                    env=env,
                    unsafe_host=unsafe_host,
                    config=config,
                    keep=keep,
                    state_dir=state_dir,
                    actor=actor,
                )
            )
        except BaseException:
            portal_cm.__exit__(None, None, None)
            raise
        return cls(inner, portal, portal_cm)

    @classmethod
    def start(
        cls,
        policy: EffectivePolicy,
        *,
        backend: Backend | None = None,
        name: str | None = None,
        keep: bool = False,
        state_dir: str | Path | None = None,
        actor: str = "sdk",
    ) -> Sandbox:
        """Start a sandbox from a compiled policy; see ``AsyncSandbox.start``."""
        return cls._open(
            lambda: AsyncSandbox.start(
                policy,
                backend=backend,
                name=name,
                keep=keep,
                state_dir=state_dir,
                actor=actor,
            )
        )

    @classmethod
    def _open(cls, make: Callable[[], Awaitable[AsyncSandbox]]) -> Sandbox:
        portal_cm = start_blocking_portal()
        portal = portal_cm.__enter__()
        try:
            inner = portal.call(make)
        except BaseException:
            portal_cm.__exit__(None, None, None)
            raise
        return cls(inner, portal, portal_cm)

    @classmethod
    def connect(
        cls, name_or_id: str, *, state_dir: str | Path | None = None, actor: str = "sdk"
    ) -> Sandbox:
        """Attach to a sandbox another process runs; see ``AsyncSandbox.connect``.
        ``close()`` detaches, ``kill()`` stops it."""
        return cls._open(lambda: AsyncSandbox.connect(name_or_id, state_dir=state_dir, actor=actor))

    @property
    def name(self) -> str:
        return self._inner.name

    @property
    def id(self) -> str:
        return self._inner.id

    @property
    def backend(self) -> str:
        return self._inner.backend

    @property
    def state_dir(self) -> Path:
        return self._inner.state_dir

    @property
    def audit_path(self) -> Path:
        return self._inner.audit_path

    @property
    def policy(self) -> EffectivePolicy:
        return self._inner.policy

    @property
    def agent_info(self) -> AgentHelloResult | None:
        return self._inner.agent_info

    def is_running(self) -> bool:
        return self._inner.is_running()

    def resource_events(self) -> dict[str, bool]:
        return self._inner.resource_events()

    def wait_until_ended(self) -> str:
        """Block until the sandbox ends by itself; see ``AsyncSandbox.wait_until_ended``."""
        reason: str = self._portal.call(self._inner.wait_until_ended)
        return reason

    def call_agent(self, method: str, params: BaseModel) -> BaseModel:
        """Call a guest agent method; see ``AsyncSandbox.call_agent``."""
        result: BaseModel = self._portal.call(self._inner.call_agent, method, params)
        return result

    def snapshot(self, tag: str) -> Path:
        """Save the sandbox's whole state as ``tag``; see ``AsyncSandbox.snapshot``."""
        path: Path = self._portal.call(self._inner.snapshot, tag)
        return path

    def restore(self, tag: str) -> None:
        """Put the sandbox back into its snapshot ``tag``; see ``AsyncSandbox.restore``."""
        self._portal.call(self._inner.restore, tag)

    def snapshots(self) -> builtins.list[dict[str, Any]]:
        """The sandbox's snapshots; see ``AsyncSandbox.snapshots``."""
        found: builtins.list[dict[str, Any]] = self._portal.call(self._inner.snapshots)
        return found

    def fork(self, *, name: str | None = None) -> Sandbox:
        """A new sandbox from a snapshot of this one; see ``AsyncSandbox.fork``. It shares
        this sandbox's event-loop thread: closing this one closes it too."""
        inner: AsyncSandbox = self._portal.call(lambda: self._inner.fork(name=name))
        forked = Sandbox(inner, self._portal, contextlib.nullcontext(self._portal))
        self._forks.append(forked)
        return forked

    def kill(self) -> None:
        """Stop the sandbox, whichever process runs it; see ``AsyncSandbox.kill``."""
        self._portal.call(self._inner.kill)

    def close(self) -> None:
        """Stop the sandbox (detach from a connected one) and end its event-loop thread.
        Repeatable."""
        if self._portal_cm is None:
            return
        try:
            for forked in self._forks:
                forked.close()
            self._portal.call(self._inner.aclose)
        finally:
            cm, self._portal_cm = self._portal_cm, None  # type: ignore[assignment]
            cm.__exit__(None, None, None)

    def __enter__(self) -> Sandbox:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        return repr(self._inner).replace("AsyncSandbox", "Sandbox")

    # Defined last: inside the class body, later annotations would see this method.
    @classmethod
    def list(cls, *, state_dir: str | Path | None = None) -> builtins.list[SandboxInfo]:
        """Every sandbox of the state directory; see ``AsyncSandbox.list``."""
        infos: builtins.list[SandboxInfo] = anyio.run(
            lambda: AsyncSandbox.list(state_dir=state_dir)
        )
        return infos
