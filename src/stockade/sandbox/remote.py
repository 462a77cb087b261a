"""A sandbox another process runs, reached over its supervisor's control socket.

``AsyncSandbox.connect(name)`` returns a ``RemoteSandbox``: the same ``commands``, ``files``,
``pty``, ``workspace`` and ``network`` as a sandbox run in this process, because those
namespaces reach their sandbox only through a few methods, which this class implements
with calls to the supervisor (the supervisor serves them with its own ``AsyncSandbox``).
The workspace is reviewed on the host layers, as for a local sandbox, after the supervisor
brought a guest-held upper layer home (``workspace.sync``).
"""

from __future__ import annotations

import builtins
import contextlib
import json
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Literal

import anyio
from anyio.abc import ByteStream

from stockade._errors import (
    AgentError,
    ConfigError,
    PolicyError,
    SandboxNotFoundError,
    SandboxStartError,
    SandboxStateError,
    StockadeError,
    WorkspaceError,
)
from stockade.agent.client import AgentClient
from stockade.audit import AuditLog
from stockade.policy import EffectivePolicy
from stockade.protocol.messages import (
    CONTROL_METHODS,
    Empty,
    NetChangeParams,
    NetLogResult,
    SnapshotListResult,
    SnapshotPathResult,
    SnapshotTagParams,
)
from stockade.sandbox.core import AsyncSandbox
from stockade.sandbox.records import audit_path, find_record
from stockade.state import SandboxRecord, SandboxStatus, StateStore
from stockade.workspace import WorkspaceLayers

__all__ = [
    "ControlClient",
    "RemoteSandbox",
    "connect_control",
    "spawn_supervisor",
    "stop_supervised",
]

logger = logging.getLogger(__name__)

#: Seconds a supervisor has to answer ``sandbox.stop`` before it is killed.
STOP_ANSWER_TIMEOUT = 5.0
#: Seconds a supervisor has to answer a new connection.
HELLO_TIMEOUT = 10.0
#: Seconds to wait for a supervisor to report its sandbox ready.
SPAWN_TIMEOUT = 60.0


#: Errors of the supervisor's sandbox re-raised here as the same kind (by this fixed table,
#: never by a name the peer chose freely); any other is an ``AgentError``.
_CONTROL_ERRORS: dict[str, type[StockadeError]] = {
    cls.__name__: cls
    for cls in (
        ConfigError,
        PolicyError,
        SandboxNotFoundError,
        SandboxStartError,
        SandboxStateError,
        WorkspaceError,
    )
}


class ControlClient:
    """A client of a supervisor's control socket: the agent protocol (relayed to the
    sandbox's agent) plus the supervisor's own typed control methods."""

    def __init__(self, agent: AgentClient) -> None:
        #: Relays ``process.*``, ``fs.*`` and ``transfer.*`` to the sandbox's agent.
        self.agent = agent

    async def control(self, method: str, params: Any) -> Any:
        """Call a control method with its params model; returns its validated result."""
        params_model, result_model = CONTROL_METHODS[method]
        if not isinstance(params, params_model):
            raise TypeError(f"{method} takes {params_model.__name__}, not {type(params).__name__}")
        try:
            raw = await self.agent.call_raw(
                method, params.model_dump(mode="json", exclude_none=True)
            )
        except AgentError as exc:
            kind = _CONTROL_ERRORS.get(str((exc.data or {}).get("error")))
            if kind is None:
                raise
            raise kind(str(exc).removeprefix(f"{method}: ")) from exc
        return result_model.model_validate(raw)

    async def aclose(self) -> None:
        await self.agent.aclose()


async def connect_control(socket_path: str | Path) -> ControlClient:
    """Open a client to a supervisor's control socket (same framing as the agent)."""
    stream: ByteStream = await anyio.connect_unix(str(socket_path))
    return ControlClient(AgentClient(stream, peer="sandbox supervisor", validate_methods=False))


class RemoteSandbox(AsyncSandbox):
    """A sandbox run by another process (its supervisor), driven from this one.

    Closing it detaches: the sandbox goes on running. ``kill()`` stops it.
    """

    # Not AsyncSandbox.__init__: this process launches nothing and owns no backend.
    def __init__(
        self,
        *,
        record: SandboxRecord,
        store: StateStore,
        layers: WorkspaceLayers | None,
        audit: AuditLog,
        actor: str,
        control: ControlClient | None,
    ) -> None:
        if not record.policy_json or not record.dir:
            raise SandboxStateError(f"sandbox {record.name!r} has no recorded policy to attach to")
        self._record = record
        self._dir = Path(record.dir)
        self.policy = EffectivePolicy.from_json(record.policy_json)
        self._store = store
        self._layers = layers
        self._audit_log = audit
        self._actor = actor
        self._control = control
        self._closed = False
        self.agent_info = control.agent.hello_result if control is not None else None
        self._make_namespaces()

    @classmethod
    async def open(
        cls, name_or_id: str, *, state_dir: str | Path | None, actor: str
    ) -> RemoteSandbox:
        """Find the sandbox and, when it runs, connect to its supervisor."""
        store = StateStore(Path(state_dir) if state_dir is not None else None)
        record = await anyio.to_thread.run_sync(find_record, store, name_or_id)
        layers = await anyio.to_thread.run_sync(_layers_of, record)
        control = None
        if record.status == SandboxStatus.RUNNING and record.control_socket:
            try:
                control = await connect_control(record.control_socket)
            except OSError as exc:
                raise SandboxStateError(
                    f"sandbox {record.name!r} is not reachable: its supervisor's control "
                    f"socket {record.control_socket} refused the connection ({exc})"
                ) from exc
            try:
                with anyio.fail_after(HELLO_TIMEOUT):
                    await control.agent.hello(client=f"stockade-{actor}")
            except TimeoutError:
                with anyio.CancelScope(shield=True):
                    await control.aclose()
                raise SandboxStateError(
                    f"sandbox {record.name!r} is not answering: its supervisor (pid "
                    f"{record.supervisor_pid}) did not answer in {HELLO_TIMEOUT:g} s"
                ) from None
            except BaseException:
                with anyio.CancelScope(shield=True):
                    await control.aclose()
                raise
        audit = AuditLog(audit_path(store, record.name, record.id), record.name)
        return cls(
            record=record, store=store, layers=layers, audit=audit, actor=actor, control=control
        )

    # --- what differs from a sandbox run here ---------------------------------------------

    @property
    def backend(self) -> str:
        return self._record.backend

    def is_running(self) -> bool:
        return not self._closed and self._control is not None and not self._control.agent.closed

    def resource_events(self) -> dict[str, bool]:
        return {}  # known to the supervisor only; its record's error says what was hit

    def _require_control(self) -> ControlClient:
        if self._closed:
            raise SandboxStateError(f"this handle of sandbox {self.name!r} is closed")
        if self._control is None:
            record = self._record
            raise SandboxStateError(
                f"sandbox {self.name!r} is {record.status}"
                + (f" ({record.error})" if record.error else "")
                + "; only a running sandbox runs commands (its workspace can still be reviewed)"
            )
        return self._control

    def _require_client(self) -> AgentClient:
        return self._require_control().agent

    @contextlib.contextmanager
    def _explained(self) -> Iterator[None]:
        """A lost connection says what became of the sandbox, from its record."""
        try:
            yield
        except SandboxStateError as exc:
            try:
                record = self._store.reconcile(self._store.get(self.name))
            except StockadeError:
                raise exc from None
            if record.id != self.id or record.status == SandboxStatus.RUNNING:
                raise
            why = record.error or str(record.status)
            raise SandboxStateError(f"sandbox {self.name!r} ended: {why} ({exc})") from exc

    async def _control_call(self, method: str, params: Any) -> Any:
        control = self._require_control()
        with self._explained():
            return await control.control(method, params)

    async def _sync_workspace(self) -> None:
        if self.is_running():
            await self._control_call("workspace.sync", Empty())

    async def _reset_workspace(self) -> None:
        if self.is_running():
            await self._control_call("workspace.reset", Empty())
            return
        layers = self._layers
        if layers is None:
            raise SandboxStateError(f"sandbox {self.name!r} has no copy-on-write workspace")
        await anyio.to_thread.run_sync(layers.reset)
        self._audit("workspace.reset")

    async def _net_change(self, verb: Literal["allow", "deny"], entry: str) -> None:
        await self._control_call(f"net.{verb}", NetChangeParams(entry=entry))

    async def _net_log(self) -> builtins.list[dict[str, Any]]:
        result: NetLogResult = await self._control_call("net.log", Empty())
        return list(result.connections)

    def _audit(
        self,
        action: str,
        *,
        target: str | None = None,
        details: dict[str, Any] | None = None,
        decision: str | None = None,
        rule: str | None = None,
    ) -> None:
        if action in ("process.started", "process.exited"):
            return  # the supervisor records every process started through it, and its end
        super()._audit(action, target=target, details=details, decision=decision, rule=rule)

    # --- snapshots --------------------------------------------------------------------------

    async def snapshot(self, tag: str) -> Path:
        result: SnapshotPathResult = await self._control_call(
            "snapshot.take", SnapshotTagParams(tag=tag)
        )
        return Path(result.path)

    async def restore(self, tag: str) -> None:
        await self._control_call("snapshot.restore", SnapshotTagParams(tag=tag))

    async def snapshots(self) -> builtins.list[dict[str, Any]]:
        result: SnapshotListResult = await self._control_call("snapshot.list", Empty())
        return list(result.snapshots)

    async def fork(self, *, name: str | None = None) -> AsyncSandbox:
        """A new sandbox from a snapshot of this one taken now, run by a supervisor of its
        own like this one; returns it connected."""
        from stockade.backends.microvm.snapshots import policy_of

        tag = f"fork-{time.strftime('%Y%m%d-%H%M%S')}-{os.urandom(2).hex()}"
        path = await self.snapshot(tag)
        policy = await anyio.to_thread.run_sync(policy_of, path)
        started = await anyio.to_thread.run_sync(
            lambda: spawn_supervisor(policy, name, resume=path, state_dir=self._store.root)
        )
        return await RemoteSandbox.open(
            started["name"], state_dir=self._store.root, actor=self._actor
        )

    # --- lifecycle --------------------------------------------------------------------------

    async def aclose(self) -> None:
        """Detach: the sandbox goes on running in its supervisor. Repeatable."""
        self._closed = True
        control, self._control = self._control, None
        if control is not None:
            with anyio.CancelScope(shield=True):
                await control.aclose()

    async def kill(self) -> None:
        """Stop the sandbox (its supervisor saves the workspace first), then detach."""
        if self._closed:
            raise SandboxStateError(f"this handle of sandbox {self.name!r} is closed")
        await self.aclose()
        record = await anyio.to_thread.run_sync(find_record, self._store, self.name)
        if record.id == self.id:
            await anyio.to_thread.run_sync(stop_supervised, self._store, record)

    def __repr__(self) -> str:
        state = "closed" if self._closed else "attached" if self._control else "not running"
        return f"<AsyncSandbox {self.name} backend={self.backend} {state} (connected)>"


def spawn_supervisor(
    policy: EffectivePolicy,
    name: str | None,
    *,
    resume: Path | None = None,
    state_dir: str | Path | None = None,
) -> dict[str, Any]:
    """Start ``python -m stockade.supervisor`` detached with a new sandbox of ``policy``;
    return once the sandbox is ready (``{"ok": True, "name": ..., "id": ...}``). Blocking.

    ``resume``: a snapshot directory to start from (a fork)."""
    store = StateStore(Path(state_dir) if state_dir is not None else None)
    if name is not None:
        # Before the name makes a log path, and so a taken name fails before anything runs.
        store.check_name_free(name)
    store.check_writable()
    name = name or store.new_name()
    logs = store.root / "logs"
    logs.mkdir(mode=0o700, exist_ok=True)
    log_path = logs / f"{name}.supervisor.log"
    spec = {"name": name, "policy": policy.to_json(), "state_dir": str(store.root)}
    if resume is not None:
        spec["resume"] = str(resume)
    with log_path.open("ab") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "stockade.supervisor"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=log,
            start_new_session=True,
            close_fds=True,
            cwd="/",
        )
    assert proc.stdin is not None and proc.stdout is not None
    proc.stdin.write(json.dumps(spec).encode())
    proc.stdin.close()
    line = proc.stdout.readline()
    proc.stdout.close()
    if not line:
        proc.wait(timeout=SPAWN_TIMEOUT)
        tail = log_path.read_text(errors="replace")[-3000:]
        raise SandboxStartError(f"the supervisor exited before the sandbox was ready:\n{tail}")
    result: dict[str, Any] = json.loads(line)
    if not result.get("ok"):
        proc.wait(timeout=SPAWN_TIMEOUT)
        raise SandboxStartError(result.get("error", "the sandbox failed to start"))
    # The supervisor outlives this call; when it exits before this process does (an SDK
    # that forks sandboxes and removes them), reap it so no zombie is left behind.
    threading.Thread(target=proc.wait, name=f"reap-supervisor-{name}", daemon=True).start()
    return result


def _layers_of(record: SandboxRecord) -> WorkspaceLayers | None:
    """The host layers of a sandbox's copy-on-write workspace (None without one)."""
    if not record.workspace or not record.dir:
        return None
    layers = WorkspaceLayers.at(record.dir, record.workspace)
    return layers if layers.upper.is_dir() else None


def _pid_alive(pid: int | None) -> bool:
    """Whether ``pid`` still runs: an exited process its parent has not reaped yet (a
    zombie) has stopped, although signal 0 still reaches it."""
    if not pid:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        stat_line = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return True  # no procfs: signal 0 is all we know
    # "pid (comm) S ...": the state follows the last ')' (comm may hold one).
    return stat_line.rpartition(")")[2].split()[:1] != ["Z"]


def stop_supervised(
    store: StateStore, record: SandboxRecord, *, timeout: float | None = None
) -> None:
    """Ask a sandbox's supervisor to stop it; kill the supervisor if it does not answer (its
    sandbox dies with it). Blocking, idempotent.

    It is given the time to save the workspace (``SAVE_TIMEOUT``) before it is killed."""
    if timeout is None:
        from stockade.workspace.save import SAVE_TIMEOUT

        timeout = SAVE_TIMEOUT + 10.0
    if record.status not in (SandboxStatus.RUNNING, SandboxStatus.STARTING):
        return
    pid = record.supervisor_pid
    socket_path = record.control_socket
    if socket_path and Path(socket_path).exists():

        async def ask() -> None:
            control = await connect_control(socket_path)
            try:
                with anyio.fail_after(STOP_ANSWER_TIMEOUT):
                    await control.control("sandbox.stop", Empty())
            finally:
                await control.aclose()

        try:
            anyio.run(ask)
        except Exception as exc:  # an unresponsive supervisor is killed below
            logger.info("supervisor of %s did not answer sandbox.stop: %s", record.name, exc)
    deadline = time.monotonic() + timeout
    while _pid_alive(pid) and time.monotonic() < deadline:
        time.sleep(0.02)
    if _pid_alive(pid) and store.reconcile(store.get(record.name)).status in (
        SandboxStatus.RUNNING,
        SandboxStatus.STARTING,
    ):
        assert pid is not None
        # Unresponsive: killing the supervisor takes its sandbox with it (die-with-parent).
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
        while _pid_alive(pid) and time.monotonic() < deadline + 5:
            time.sleep(0.02)
        _mark_stopped(store, record.name)
    current = store.get(record.name)
    if current.status in (SandboxStatus.RUNNING, SandboxStatus.STARTING):
        _mark_stopped(store, record.name)


def _mark_stopped(store: StateStore, name: str) -> None:
    from stockade._errors import DiskFullError

    try:
        store.update(name, status=SandboxStatus.STOPPED)
    except DiskFullError:
        # The sandbox is stopped all the same; `ls` will call it failed (its supervisor is
        # gone), and `rm` must go on to free the space.
        logger.warning("could not record that sandbox %s stopped: the disk is full", name)
