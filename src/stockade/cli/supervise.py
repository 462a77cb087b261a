"""Start, stop and remove supervised sandboxes (the ones that outlive a CLI call)."""

from __future__ import annotations

import json
import logging
import subprocess
import sys
from pathlib import Path
from typing import Any

from stockade._errors import SandboxStartError, SandboxStateError
from stockade.state import StateStore

__all__ = ["remove_sandbox", "spawn_supervisor", "stop_sandbox"]

logger = logging.getLogger(__name__)

#: Seconds to wait for a supervisor to report its sandbox ready.
SPAWN_TIMEOUT = 60.0


def spawn_supervisor(
    policy: Any, name: str | None, *, resume: Path | None = None
) -> dict[str, Any]:
    """Start ``python -m stockade.supervisor`` detached; return once the sandbox is ready.

    ``resume``: a microVM snapshot directory to start from (``stockade fork``)."""
    store = StateStore()
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
    return result


def stop_sandbox(store: StateStore, record: Any, *, timeout: float | None = None) -> None:
    """Ask the supervisor to stop; kill it if it does not answer. Idempotent.

    It is given the time to save the workspace (``SAVE_TIMEOUT``) before it is killed."""
    from stockade.remote import stop_supervised

    stop_supervised(store, record, timeout=timeout)


def remove_sandbox(store: StateStore, record: Any) -> None:
    """Stop the sandbox if needed, then delete its processes, cgroups, layers and record."""
    record = store.reconcile(record)
    stop_sandbox(store, record)
    from stockade.backends._cgroups import remove_stale_cgroups

    survivors = remove_stale_cgroups(record.id)
    if survivors:
        raise SandboxStateError(
            f"processes of sandbox {record.name!r} survived removal: {sorted(survivors)}"
        )
    if record.dir and Path(record.dir).exists():
        from stockade.workspace.disk import remove_state_dir

        remove_state_dir(Path(record.dir))  # its disk (limits.disk) unmounted first
    store.delete(record.name)
