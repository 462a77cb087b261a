"""Start, stop and remove supervised sandboxes (the ones that outlive a CLI call)."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from stockade import SandboxStateError
from stockade.state import StateStore

__all__ = ["remove_sandbox", "spawn_supervisor", "stop_sandbox"]

logger = logging.getLogger(__name__)


def spawn_supervisor(
    policy: Any, name: str | None, *, resume: Path | None = None
) -> dict[str, Any]:
    """Start a supervisor for a new sandbox; see ``stockade.sandbox.remote.spawn_supervisor``."""
    from stockade.sandbox.remote import spawn_supervisor as spawn

    return spawn(policy, name, resume=resume)


def stop_sandbox(store: StateStore, record: Any, *, timeout: float | None = None) -> None:
    """Ask the supervisor to stop; kill it if it does not answer. Idempotent.

    It is given the time to save the workspace (``SAVE_TIMEOUT``) before it is killed."""
    from stockade.sandbox.remote import stop_supervised

    stop_supervised(store, record, timeout=timeout)


def remove_sandbox(store: StateStore, record: Any) -> None:
    """Stop the sandbox if needed, then delete its processes, cgroups, layers and record."""
    record = store.reconcile(record)
    stop_sandbox(store, record)
    from stockade.backends.registry import kill_leftover_processes

    survivors = kill_leftover_processes(record.id)
    if survivors:
        raise SandboxStateError(
            f"processes of sandbox {record.name!r} survived removal: {sorted(survivors)}"
        )
    if record.dir and Path(record.dir).exists():
        from stockade.workspace.disk import remove_state_dir

        remove_state_dir(Path(record.dir))  # its disk (limits.disk) unmounted first
    store.delete(record.name)
