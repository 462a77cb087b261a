"""The CLI's way to a running sandbox: its record, checked, and a connected handle."""

from __future__ import annotations

from typing import TYPE_CHECKING

from stockade import SandboxStateError

if TYPE_CHECKING:
    from stockade import Sandbox
    from stockade.state import SandboxRecord

__all__ = ["connect_running", "running_record"]


def running_record(name: str) -> SandboxRecord:
    """The record of sandbox ``name``, which must be running (under a supervisor)."""
    from stockade.state import StateStore

    store = StateStore()
    record = store.reconcile(store.get(name))
    if record.status != "running" or not record.control_socket:
        raise SandboxStateError(
            f"sandbox {name!r} is {record.status}"
            + (f" ({record.error})" if record.error else "")
            + "; only sandboxes made with `stockade create` keep running"
        )
    return record


def connect_running(name: str) -> Sandbox:
    """A running sandbox another process (its supervisor) runs; closing it detaches."""
    from stockade import Sandbox

    record = running_record(name)
    return Sandbox.connect(record.id, actor="cli")
