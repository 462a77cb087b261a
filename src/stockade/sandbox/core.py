"""The lifecycle core: one sandbox, whatever the backend, in this process.

``AsyncSandbox.create()`` compiles the policy, picks a backend, prepares the workspace,
launches the sandbox and shakes hands with its guest agent. Its namespaces (``commands``,
``files``, ``pty``, ``workspace``, ``network``: modules of their own) reach it through the
narrow ports of ``ports.py``: the one ``AgentClient``, the host layers, the egress runtime.
Teardown is ordered (agent shutdown -> terminate -> verify no survivor), shielded from
cancellation, and repeatable.
"""

from __future__ import annotations

import builtins
import contextlib
import dataclasses
import logging
import os
import threading
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any, Literal

import anyio
import anyio.from_thread
import anyio.lowlevel
from pydantic import BaseModel

from stockade._errors import (
    SandboxNotFoundError,
    SandboxStartError,
    SandboxStateError,
    StockadeError,
)
from stockade.agent.client import AgentClient
from stockade.audit import AuditLog
from stockade.backends.base import Backend, LaunchedSandbox, LaunchSpec
from stockade.policy import EffectivePolicy
from stockade.protocol.messages import AgentHelloResult, Empty
from stockade.sandbox.commands import AsyncCommands, AsyncPty
from stockade.sandbox.files import AsyncFiles
from stockade.sandbox.network import AsyncNetwork
from stockade.sandbox.records import SandboxInfo, audit_path
from stockade.sandbox.workspace import AsyncWorkspace
from stockade.state import (
    SandboxRecord,
    SandboxStatus,
    StateStore,
    disk_full_error,
    is_disk_full,
    process_start_time,
    validate_name,
)
from stockade.workspace import WorkspaceLayers

if TYPE_CHECKING:
    from stockade._background import BackgroundTasks
    from stockade.egress.log import ConnectionRecord
    from stockade.egress.runtime import EgressRuntime

__all__ = ["AsyncSandbox"]

logger = logging.getLogger(__name__)
#: Events that could not be written to a sandbox's audit log (the CLI shows them).
audit_logger = logging.getLogger("stockade.sandbox.audit")

#: Seconds allowed from launch to the agent's handshake.
START_TIMEOUT = 30.0


async def _launch_recording_baseline(sandbox: AsyncSandbox, layers: WorkspaceLayers | None) -> None:
    """Launch ``sandbox`` while its workspace baseline is recorded in a thread: the baseline
    is the host project, which nothing in the sandbox can change, so recording it need not
    wait for the backend (it takes git tens of ms). Both are done when this returns; the
    first failure is raised as itself, not wrapped in an exception group."""
    if layers is None:
        await sandbox._launch()
        return
    try:
        async with anyio.create_task_group() as tg:
            tg.start_soon(anyio.to_thread.run_sync, layers.record_baseline)
            await sandbox._launch()
    except BaseExceptionGroup as group:
        if len(group.exceptions) == 1:
            raise group.exceptions[0] from None
        raise


def _forget_failed_start(store: StateStore, record: SandboxRecord, *, owns_dir: bool) -> None:
    """Remove what a failed start made: its directory (if this start made it) and its
    record (only if still this sandbox's: the name may be another's by now)."""
    from stockade.workspace.disk import remove_state_dir

    if owns_dir and record.dir:
        try:
            remove_state_dir(Path(record.dir))  # its disk (limits.disk) unmounted first
        except FileNotFoundError:
            pass
        except OSError:
            logger.warning("could not remove %s of failed sandbox %s", record.dir, record.name,
                           exc_info=True)  # fmt: skip
    try:
        store.delete(record.name, sandbox_id=record.id)
    except SandboxNotFoundError:
        pass
    except StockadeError:
        logger.warning("could not remove the record of failed sandbox %s", record.name,
                       exc_info=True)  # fmt: skip


class AsyncSandbox:
    """A sandbox running in this process. Create with ``await AsyncSandbox.create(...)``;
    reach one another process runs with ``await AsyncSandbox.connect(name)``."""

    def __init__(
        self,
        *,
        record: SandboxRecord,
        policy: EffectivePolicy,
        backend: Backend,
        store: StateStore,
        layers: WorkspaceLayers | None,
        audit: AuditLog,
        keep: bool,
        actor: str,
    ) -> None:
        self._record = record
        assert record.dir is not None
        self._dir = Path(record.dir)
        self.policy = policy
        self._backend = backend
        self._store = store
        self._layers = layers
        self._audit_log = audit
        self._keep = keep
        self._actor = actor
        self._launched: LaunchedSandbox | None = None
        self._client: AgentClient | None = None
        self._closed = False
        self._timer: threading.Timer | None = None
        self._expired: float | None = None
        self._died: str | None = None  # why it ended by itself (``wait_until_ended``)
        self._egress: EgressRuntime | None = None
        self._background: BackgroundTasks | None = None
        # Workspace saving where the writes stay inside the sandbox (see _save_at_end).
        self._save_lock = anyio.Lock()
        self._saved_at = time.time()
        self._end_save: tuple[str | None] | None = None
        self.agent_info: AgentHelloResult | None = None
        self._make_namespaces()

    def _make_namespaces(self) -> None:
        """``commands``, ``files``, ``pty``, ``workspace`` and ``network``: each reaches this
        sandbox through its port, whether it runs here or behind a supervisor (``remote``)."""
        self.commands = AsyncCommands(self)
        self.files = AsyncFiles(self)
        self.pty = AsyncPty(self, self.commands)
        self.workspace = AsyncWorkspace(self)
        self.network = AsyncNetwork(self)

    # --- construction ------------------------------------------------------------------

    @classmethod
    async def create(
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
    ) -> AsyncSandbox:
        """Compile the policy, pick the backend, and start a sandbox.

        Arguments override every configuration layer (DESIGN.md §8). ``config`` takes
        dotted keys for anything without its own argument (``{"hostname": "box"}``).
        ``keep=True`` leaves the sandbox's workspace layer and record after ``aclose()``
        so ``stockade diff/apply NAME`` can review it later.
        """
        from stockade.backends.registry import select_backend
        from stockade.config import load_config
        from stockade.policy import compile_policy

        overrides: dict[str, Any] = dict(config or {})
        for key, value in (
            ("backend", backend),
            ("workspace.mode", workspace_mode),
            ("limits.memory", memory),
            ("limits.pids", pids),
            ("limits.cpus", cpus),
            ("limits.timeout", timeout),
            ("limits.command_timeout", command_timeout),
            ("unsafe_host", unsafe_host),
        ):
            if value is not None:
                overrides[key] = value
        if env:
            overrides["env.set"] = dict(env)
        loaded = load_config(
            Path(project_dir) if project_dir is not None else None,
            profile=profile,
            overrides=overrides,
        )
        policy = compile_policy(loaded)
        chosen = select_backend(policy)
        return await cls._start_new(
            policy, chosen, name=name, keep=keep, state_dir=state_dir, actor=actor
        )

    @classmethod
    async def start(
        cls,
        policy: EffectivePolicy,
        *,
        backend: Backend | None = None,
        name: str | None = None,
        keep: bool = False,
        state_dir: str | Path | None = None,
        actor: str = "sdk",
    ) -> AsyncSandbox:
        """Start a sandbox from a compiled policy (``stockade.policy.compile_policy``), on
        ``backend`` or the one the policy selects; ``create()`` is this after loading the
        configuration layers."""
        if backend is None:
            from stockade.backends.registry import select_backend

            backend = select_backend(policy)
        return await cls._start_new(
            policy, backend, name=name, keep=keep, state_dir=state_dir, actor=actor
        )

    @classmethod
    async def connect(
        cls, name_or_id: str, *, state_dir: str | Path | None = None, actor: str = "sdk"
    ) -> AsyncSandbox:
        """Attach to a sandbox another process runs (``stockade create``, a server): same
        ``commands``, ``files``, ``pty``, ``workspace`` and ``network``, over its
        supervisor's control socket. A stopped sandbox kept for review gives its
        ``workspace`` only. ``aclose()`` detaches and leaves the sandbox running;
        ``kill()`` stops it."""
        from stockade.sandbox.remote import RemoteSandbox

        return await RemoteSandbox.open(name_or_id, state_dir=state_dir, actor=actor)

    @classmethod
    async def list(cls, *, state_dir: str | Path | None = None) -> builtins.list[SandboxInfo]:
        """Every sandbox of the state directory (running or kept), oldest first."""

        def read() -> builtins.list[SandboxInfo]:
            store = StateStore(Path(state_dir) if state_dir is not None else None)
            try:
                return [SandboxInfo.from_record(store.reconcile(r)) for r in store.list()]
            finally:
                store.close()

        return await anyio.to_thread.run_sync(read)

    @classmethod
    async def _start_new(
        cls,
        policy: EffectivePolicy,
        backend: Backend,
        *,
        name: str | None,
        keep: bool,
        state_dir: str | Path | None,
        actor: str,
    ) -> AsyncSandbox:
        store = StateStore(Path(state_dir) if state_dir is not None else None)
        if name is not None:
            validate_name(name)  # before anything is made: a bad name leaves nothing
        store.check_writable()
        sandbox_id = store.new_id()
        name = name or store.new_name()
        directory = store.root / "sandboxes" / sandbox_id
        # Not for the host backend (no isolation to bound) nor a VM (bounded inside it).
        disk = (
            bool(policy.limits.disk_bytes)
            and backend.capabilities.cow_workspace
            and not backend.disk_limit_inside
        )
        now = time.time()
        record = SandboxRecord(
            name=name,
            id=sandbox_id,
            backend=backend.name,
            status=SandboxStatus.STARTING,
            created_at=now,
            updated_at=now,
            policy_hash=policy.policy_hash,
            policy_json=policy.to_json(),
            workspace=str(policy.workspace.host_path or ""),
            dir=str(directory),
            supervisor_pid=os.getpid(),
            supervisor_start=process_start_time(os.getpid()),
            control_socket=None,
            error=None,
        )
        # The record first: it claims the name (a collision fails here, before anything of
        # this sandbox exists) and tells `doctor` the directory made next is not an orphan.
        store.insert(record)
        try:
            directory.mkdir(mode=0o700)  # never an existing one: the id is new
            layers = None
            if disk:
                from stockade.workspace.disk import create_disk

                # Upper, work and /tmp on a filesystem of exactly limits.disk (where possible).
                create_disk(directory, policy.limits.disk_bytes or 0)
            if policy.workspace.mode == "cow" and policy.workspace.host_path is not None:
                layers = WorkspaceLayers.create(
                    directory, policy.workspace.host_path, record_baseline=False
                )
        except BaseException as exc:
            _forget_failed_start(store, record, owns_dir=not isinstance(exc, FileExistsError))
            if isinstance(exc, OSError) and is_disk_full(exc, store.root):
                raise disk_full_error(store.root) from exc
            raise
        audit = AuditLog(audit_path(store, name, sandbox_id), name)
        sandbox = cls(
            record=record,
            policy=policy,
            backend=backend,
            store=store,
            layers=layers,
            audit=audit,
            keep=keep,
            actor=actor,
        )
        sandbox._audit(
            "sandbox.created",
            details={
                "policy_hash": policy.policy_hash,
                "backend": backend.name,
                "workspace": str(policy.workspace.host_path or ""),
                "mode": policy.workspace.mode,
            },
        )
        try:
            await _launch_recording_baseline(sandbox, layers)
        except BaseException as exc:
            try:
                await sandbox._teardown(status=SandboxStatus.FAILED, error=str(exc))
            finally:
                # A sandbox that never started has nothing to review: leave no trace but
                # its audit log (which says it failed), whether or not it was to be kept.
                with anyio.CancelScope(shield=True):
                    await anyio.to_thread.run_sync(
                        lambda: _forget_failed_start(store, record, owns_dir=True)
                    )
            if isinstance(exc, OSError) and is_disk_full(exc, store.root):
                raise disk_full_error(store.root) from exc
            raise
        return sandbox

    async def _launch(self) -> None:
        try:
            await self._launch_backend()
        except StockadeError:
            from stockade.backends.probe_cache import forget

            forget(self._backend.name)  # a failed start: the next auto choice probes it again
            raise

    async def _launch_backend(self) -> None:
        if self._egress is None and self._backend.capabilities.network_policy:
            from stockade.egress.runtime import EgressRuntime

            self._egress = EgressRuntime(
                self.policy,
                sandbox=self.name,
                state_dir=self._dir,
                sandbox_id=self.id,
                on_event=self._on_egress_event,
            )
        spec = LaunchSpec(
            sandbox_id=self._record.id,
            name=self._record.name,
            policy=self.policy,
            state_dir=self._dir,
            workspace=self._layers,
            cache_dir=self._store.root / "cache",
            egress=self._egress.launch if self._egress is not None else None,
        )
        self._launched = await self._backend.launch(spec)
        self._client = AgentClient(self._launched.channel)
        if self._egress is not None:
            from stockade._background import BackgroundTasks

            self._background = BackgroundTasks(f"sandbox {self.name}")
            self._egress.attach(self._client, self._background)
        try:
            with anyio.fail_after(START_TIMEOUT):
                self.agent_info = await self._client.hello()
        except (StockadeError, TimeoutError) as exc:
            details = self._launched.failure_details()
            raise SandboxStartError(
                f"the {self._backend.name} sandbox did not start: {exc}"
                + (f"\n--- sandbox log ---\n{details}" if details else "")
            ) from exc
        await self._launched.after_connect(self._client)
        if self._background is not None:
            # Tunnelled connections must flow between calls: keep reading the agent.
            self._background.start(self._client.serve_forever)
        if self.policy.limits.timeout:
            self._arm_timer(self.policy.limits.timeout)
        self._set_status(SandboxStatus.RUNNING)
        self._record_save(None, final=False)
        self._audit(
            "sandbox.started",
            details={
                "backend": self._backend.name,
                "kernel": self.agent_info.kernel,
                "landlock_abi": self.agent_info.landlock_abi,
            },
        )

    def _arm_timer(self, seconds: float) -> None:
        launched = self._launched
        if launched is None:
            return
        # A workspace kept inside the sandbox is saved before the kill (bounded: the kill
        # happens even if the event loop never runs the save).
        token = anyio.lowlevel.current_token() if self._must_save(launched) else None

        def save() -> None:
            try:
                anyio.from_thread.run(self._save_at_end, token=token)
            except Exception:  # the loop is gone: the teardown reports the loss
                logger.exception("sandbox %s: no workspace save at its timeout", self.name)

        def expire() -> None:
            self._expired = seconds
            logger.warning("sandbox %s reached its timeout of %ss", self.name, seconds)
            if token is not None:
                from stockade.workspace.save import SAVE_TIMEOUT

                saver = threading.Thread(target=save, daemon=True)
                saver.start()
                saver.join(SAVE_TIMEOUT + 10)
            launched.kill_now()

        self._timer = threading.Timer(seconds, expire)
        self._timer.daemon = True
        self._timer.start()

    # --- properties ---------------------------------------------------------------------

    @property
    def name(self) -> str:
        return self._record.name

    @property
    def id(self) -> str:
        return self._record.id

    @property
    def backend(self) -> str:
        return self._backend.name

    @property
    def state_dir(self) -> Path:
        return self._dir

    @property
    def audit_path(self) -> Path:
        return self._audit_log.path

    def is_running(self) -> bool:
        return (
            not self._closed
            and self._launched is not None
            and self._launched.alive()
            and self._client is not None
            and not self._client.closed
        )

    def resource_events(self) -> dict[str, bool]:
        """Limits the sandbox hit so far (memory OOM kill, pids limit)."""
        return self._launched.resource_events() if self._launched is not None else {}

    # --- internals used by the namespaces ------------------------------------------------
    # The namespaces reach their sandbox only through these methods (and ``policy``,
    # ``name``, ``_layers``), their ports (``ports.py``): a connected sandbox
    # (``remote.RemoteSandbox``) overrides them.

    def _egress_runtime(self) -> EgressRuntime:
        runtime = self._egress
        if runtime is None:
            raise SandboxStateError(
                f"sandbox {self.name!r} runs on the {self.backend} backend, "
                "which has no network policy"
            )
        return runtime

    async def _net_change(self, verb: Literal["allow", "deny"], entry: str) -> None:
        runtime = self._egress_runtime()
        if verb == "allow":
            runtime.allow(entry)
            self._audit("network.allowed", target=entry)
        else:
            runtime.deny(entry)
            self._audit("network.denied", target=entry)

    async def _net_log(self) -> builtins.list[dict[str, Any]]:
        return [record.to_dict() for record in self._egress_runtime().log()]

    def _require_client(self) -> AgentClient:
        if self._closed or self._client is None:
            raise SandboxStateError(f"sandbox {self.name!r} is closed")
        return self._client

    async def _call(self, method: str, params: BaseModel) -> Any:
        with self._explained():
            return await self._require_client().call(method, params)

    @contextlib.contextmanager
    def _explained(self) -> Iterator[None]:
        """Re-raise a lost-connection error with the reason the sandbox died, if known."""
        try:
            yield
        except SandboxStateError as exc:
            better = self._explain_death(exc)
            if better is exc:
                raise
            raise better from exc

    async def _sync_workspace(self) -> None:
        """Bring a running sandbox's workspace writes into the host upper layer (microVMs)."""
        launched = self._launched
        if launched is not None and self._client is not None and self.is_running():
            async with self._save_lock:
                with self._explained():
                    await launched.sync_workspace(self._client)
            self._record_save(None, final=False)
        elif launched is not None and self._holds_workspace(launched) and self._end_save is None:
            from stockade.workspace.save import WorkspaceSave, lost_message

            reason = f"it ended ({launched.exit_reason() or 'stopped'}) before they were saved"
            raise SandboxStateError(
                lost_message(self.name, WorkspaceSave("lost", self._saved_at, reason))
            )

    def _holds_workspace(self, launched: LaunchedSandbox) -> bool:
        """Whether the sandbox's copy-on-write writes live inside it (e.g. a microVM's)."""
        return self._backend.capabilities.workspace_in_guest and self._layers is not None

    def _must_save(self, launched: LaunchedSandbox) -> bool:
        """Whether they must be brought home before it ends (its layer is kept)."""
        return self._holds_workspace(launched) and self._keep

    async def _save_at_end(self) -> str | None:
        """Save a workspace kept inside the sandbox before it ends (once; shielded, bounded
        by ``SAVE_TIMEOUT``): None when saved (or nothing to save), else why it was lost."""
        from stockade.workspace.save import SAVE_TIMEOUT

        launched = self._launched
        if launched is None or not self._must_save(launched):
            return None
        with anyio.CancelScope(shield=True):
            async with self._save_lock:
                if self._end_save is not None:
                    return self._end_save[0]
                reason: str | None = None
                client = self._client
                if client is None or not self.is_running():
                    why = self._launched.exit_reason() if self._launched is not None else None
                    reason = f"the sandbox had already ended ({why or 'its process was gone'})"
                else:
                    try:
                        with anyio.fail_after(SAVE_TIMEOUT):
                            await launched.sync_workspace(client)
                    except TimeoutError:
                        reason = f"saving them took longer than {SAVE_TIMEOUT:g} s"
                    except (StockadeError, OSError) as exc:
                        reason = str(exc)
                    except Exception as exc:  # teardown goes on; the loss is reported
                        logger.exception("sandbox %s: saving the workspace failed", self.name)
                        reason = f"{type(exc).__name__}: {exc}"
                self._end_save = (reason,)
                self._record_save(reason, final=True)
        return reason

    def _record_save(self, lost: str | None, *, final: bool) -> None:
        """Note how fresh the host's copy of a guest-held workspace is (``workspace/save``)."""
        from stockade.workspace.save import WorkspaceSave, write_save

        if self._launched is None or not self._must_save(self._launched):
            return
        if lost is None:
            self._saved_at = time.time()
            save = WorkspaceSave("saved" if final else "pending", self._saved_at)
            if final:
                self._audit("workspace.saved")
        else:
            save = WorkspaceSave("lost", self._saved_at, lost)
            logger.warning("sandbox %s: workspace changes lost: %s", self.name, lost)
            self._audit("workspace.lost", details={"reason": lost, "saved_at": self._saved_at})
        try:
            write_save(self._dir, save)
        except OSError:
            logger.exception("could not record the workspace save of sandbox %s", self.name)

    def _explain_death(self, exc: SandboxStateError) -> SandboxStateError:
        """Say why the sandbox went away, when we know (its timeout, a limit).

        Returns ``exc`` itself when there is nothing to add; callers re-raise it as is.
        """
        if self._expired is not None:
            return SandboxStateError(
                f"sandbox {self.name!r} was stopped when its timeout of {self._expired:g}s "
                "expired; pass timeout=... (CLI: --timeout) to allow longer"
            )
        reason = self._launched.exit_reason() if self._launched is not None else None
        if reason:
            return SandboxStateError(f"sandbox {self.name!r} ended: {reason} ({exc})")
        events = {k: v for k, v in self.resource_events().items() if v}
        if events:
            return SandboxStateError(f"sandbox {self.name!r} stopped ({exc}); limits hit: {events}")
        return exc

    def _audit(
        self,
        action: str,
        *,
        target: str | None = None,
        details: dict[str, Any] | None = None,
        decision: str | None = None,
        rule: str | None = None,
    ) -> None:
        try:
            self._audit_log.append(
                action,
                actor=self._actor,
                target=target,
                details=details,
                decision=decision,
                rule=rule,
            )
        except OSError as exc:
            if is_disk_full(exc, self._audit_log.path):  # expected: no traceback
                audit_logger.warning(
                    "%s not recorded in the audit log %s: %s",
                    action,
                    self._audit_log.path,
                    exc.strerror,
                )
            else:
                logger.exception("could not write the audit log of sandbox %s", self.name)

    def _on_egress_event(self, record: ConnectionRecord) -> None:
        self._audit(
            f"egress.{record.decision}",
            target=f"{record.host}:{record.port}",
            decision=record.decision,
            rule=record.rule,
            details={
                "kind": record.kind,
                "reason": record.reason,
                "bytes_up": record.bytes_up,
                "bytes_down": record.bytes_down,
            },
        )

    def _set_status(self, status: SandboxStatus, error: str | None = None) -> None:
        fields: dict[str, Any] = {"status": status}
        if error is not None:
            fields["error"] = error[:2000]
        self._store.update(self.name, **fields)
        self._record = dataclasses.replace(self._record, **fields)

    async def _reset_workspace(self) -> None:
        layers = self._layers
        if layers is None:
            raise SandboxStateError(f"sandbox {self.name!r} has no copy-on-write workspace")
        running = self.is_running()
        if running:
            await self._stop_backend()
        await anyio.to_thread.run_sync(layers.reset)
        self._audit("workspace.reset")
        if running:
            self._set_status(SandboxStatus.STARTING)
            await self._launch()

    async def _stop_backend(self) -> None:
        with anyio.CancelScope(shield=True):
            if self._timer is not None:
                self._timer.cancel()
                self._timer = None
            client, self._client = self._client, None
            if client is not None and not client.closed:
                client.expect_close()
                with anyio.move_on_after(1.0):
                    with contextlib.suppress(StockadeError):
                        await client.call("agent.shutdown", Empty())
                await client.aclose()
            background, self._background = self._background, None
            if background is not None:
                await background.aclose()
            launched, self._launched = self._launched, None
            if launched is not None:
                await launched.terminate()

    async def _teardown(self, *, status: SandboxStatus, error: str | None = None) -> None:
        with anyio.CancelScope(shield=True):
            if self._record.status == SandboxStatus.RUNNING:
                lost = await self._save_at_end()
                if lost is not None:
                    from stockade.workspace.save import WorkspaceSave, lost_message

                    note = lost_message(self.name, WorkspaceSave("lost", self._saved_at, lost))
                    status, error = SandboxStatus.FAILED, f"{error}; {note}" if error else note
            try:
                await self._stop_backend()
            finally:
                self._closed = True
                self._audit("sandbox.stopped", details={"status": str(status)})
                if self._keep or status == SandboxStatus.FAILED:
                    self._set_status(status, error)
                else:
                    self._store.delete(self.name)
                    await anyio.to_thread.run_sync(self._discard_dir)

    def _discard_dir(self) -> None:
        from stockade.workspace.disk import remove_state_dir

        with contextlib.suppress(FileNotFoundError):
            remove_state_dir(self._dir)  # its disk (limits.disk) unmounted first

    # --- lifecycle ------------------------------------------------------------------------

    async def aclose(self) -> None:
        """Stop the sandbox: agent shutdown, terminate, verify nothing survives.

        Repeatable. With ``keep=True`` the workspace layer and record stay for review.
        """
        if self._closed:
            return
        if self._died is not None:
            await self._teardown(status=SandboxStatus.FAILED, error=self._died)
        else:
            await self._teardown(status=SandboxStatus.STOPPED)

    async def kill(self) -> None:
        """Stop the sandbox, whichever process runs it (for this one: ``aclose()``)."""
        await self.aclose()

    async def wait_until_ended(self) -> str:
        """Read the sandbox's agent until the sandbox ends by itself (its process died, its
        timeout expired), so its notifications flow meanwhile; return why it ended. After
        that, ``aclose()`` records it as failed, with that reason."""
        while True:
            current = self._client
            if current is None or self._closed:
                if self._closed:
                    raise SandboxStateError(f"sandbox {self.name!r} is closed")
                await anyio.sleep(0.05)  # a workspace reset or restore is restarting it
                continue
            await current.serve_forever()
            if self._client is current:
                break  # not a reset's or restore's restart: the sandbox is gone
        reason = "the sandbox stopped unexpectedly"
        if self.policy.limits.timeout:
            reason += f" (its timeout is {self.policy.limits.timeout:g}s)"
        events = {k: v for k, v in self.resource_events().items() if v}
        if events:
            reason += f"; limits hit: {events}"
        self._died = reason
        return reason

    async def call_agent(self, method: str, params: BaseModel) -> BaseModel:
        """Call a method of the sandbox's guest agent (``protocol.messages.METHODS``) and
        return its validated result: for relays like the supervisor's control socket. The
        namespaces are the API for everything else."""
        from stockade.protocol.messages import METHODS

        if method not in METHODS or method.startswith("agent."):
            raise SandboxStateError(f"{method!r} is not an agent method that can be called")
        if not isinstance(params, METHODS[method][0]):
            raise TypeError(f"{method} takes {METHODS[method][0].__name__}")
        result: BaseModel = await self._call(method, params)
        return result

    # --- snapshots (full VM state: backends that can, microvm today) ----------------------

    async def snapshot(self, tag: str) -> Path:
        """Save the running sandbox's whole state (memory, devices, workspace) as ``tag``;
        it keeps running. Returns the snapshot's directory. A backend that cannot raises
        ``SandboxStateError`` naming the one that can."""
        from stockade.backends.microvm.snapshots import (
            save_snapshot,
            snapshot_dir_for,
            snapshottable,
        )

        launched = snapshottable(self._launched, self.name, self.backend)
        dest = snapshot_dir_for(self._store.root, self.name, tag)
        started = time.monotonic()
        with self._explained():
            await save_snapshot(launched, dest, sandbox=self.name, tag=tag, policy=self.policy)
        self._audit(
            "snapshot.taken",
            target=tag,
            details={"seconds": round(time.monotonic() - started, 3), "path": str(dest)},
        )
        return dest

    async def restore(self, tag: str) -> None:
        """Put the running sandbox back into its snapshot ``tag`` (its VM is replaced)."""
        from stockade.backends.microvm.snapshots import (
            resuming_backend,
            snapshot_dir_for,
            snapshottable,
        )

        snapshottable(self._launched, self.name, self.backend)
        backend = resuming_backend(snapshot_dir_for(self._store.root, self.name, tag))
        await self._stop_backend()
        self._backend = backend
        await self._launch()
        self._audit("snapshot.restored", target=tag)

    async def snapshots(self) -> builtins.list[dict[str, Any]]:
        """The sandbox's snapshots (tag, creation time, ...), oldest tag first."""
        from stockade.backends.microvm.snapshots import list_snapshots

        return list_snapshots(self._store.root, self.name)

    async def fork(self, *, name: str | None = None) -> AsyncSandbox:
        """A new sandbox started from a snapshot of this one taken now (same policy,
        workspace included), run in this process."""
        from stockade.backends.microvm.snapshots import resuming_backend

        tag = f"fork-{time.strftime('%Y%m%d-%H%M%S')}-{os.urandom(2).hex()}"
        path = await self.snapshot(tag)
        return await AsyncSandbox._start_new(
            self.policy,
            resuming_backend(path),
            name=name,
            keep=self._keep,
            state_dir=self._store.root,
            actor=self._actor,
        )

    async def __aenter__(self) -> AsyncSandbox:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    def __repr__(self) -> str:
        state = "closed" if self._closed else "open"
        return f"<AsyncSandbox {self.name} backend={self.backend} {state}>"
