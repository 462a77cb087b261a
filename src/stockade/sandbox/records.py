"""What the state directory says about sandboxes: ``SandboxInfo``, finding a record by name
or id, and where a sandbox's audit log lives."""

from __future__ import annotations

import dataclasses
from pathlib import Path

from stockade._errors import SandboxNotFoundError
from stockade.state import SandboxRecord, SandboxStatus, StateStore

__all__ = ["SandboxInfo", "audit_path", "find_record"]


def audit_path(store: StateStore, name: str, sandbox_id: str) -> Path:
    """Audit logs live apart from sandbox directories so they outlive ``rm``."""
    directory = store.root / "audit"
    directory.mkdir(mode=0o700, exist_ok=True)
    return directory / f"{name}.{sandbox_id}.jsonl"


@dataclasses.dataclass(frozen=True)
class SandboxInfo:
    """What ``AsyncSandbox.list()`` / ``Sandbox.list()`` say about one sandbox."""

    name: str
    id: str
    backend: str
    #: created, starting, running, stopping, stopped or failed
    status: str
    #: When it was created (seconds since the epoch).
    created_at: float
    #: The host project directory it sees as its workspace (None without one).
    workspace: Path | None
    #: Its directory under the state directory (layers, disk, sockets).
    state_dir: Path | None
    #: Why it failed, when it did.
    error: str | None
    #: Whether another process can drive it: ``connect()`` gives its commands and files
    #: (a stopped sandbox kept for review gives only its workspace).
    connectable: bool

    @classmethod
    def from_record(cls, record: SandboxRecord) -> SandboxInfo:
        return cls(
            name=record.name,
            id=record.id,
            backend=record.backend,
            status=str(record.status),
            created_at=record.created_at,
            workspace=Path(record.workspace) if record.workspace else None,
            state_dir=Path(record.dir) if record.dir else None,
            error=record.error,
            connectable=record.status == SandboxStatus.RUNNING and bool(record.control_socket),
        )


def find_record(store: StateStore, name_or_id: str) -> SandboxRecord:
    """The record of the sandbox named ``name_or_id``, else the one with that id (reconciled:
    a sandbox whose supervisor died is reported failed)."""
    try:
        return store.reconcile(store.get(name_or_id))
    except SandboxNotFoundError as exc:
        for record in store.list():
            if record.id == name_or_id:
                return store.reconcile(record)
        raise exc from None
