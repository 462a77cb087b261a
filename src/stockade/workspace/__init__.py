"""Copy-on-write workspace, host side: the layers on disk, the diff of what the sandbox
changed, and applying that diff to the project (conflict-checked) or resetting it."""

from __future__ import annotations

TYPE_CHECKING = False
if TYPE_CHECKING:
    from stockade.workspace.apply import ApplyConflict, ApplyResult, ConflictMode, apply_diff
    from stockade.workspace.diff import (
        TEXT_PATCH_LIMIT,
        ChangeKind,
        EntryType,
        FileChange,
        WorkspaceDiff,
        compute_diff,
    )
    from stockade.workspace.layers import WorkspaceLayers

# Diff and apply pull in git plumbing and the transaction engine (~40 ms); load them on
# first use, so that importing a leaf module (display, save, disk) stays cheap for the CLI.
_LAZY = {
    "ApplyConflict": "stockade.workspace.apply",
    "ApplyResult": "stockade.workspace.apply",
    "ConflictMode": "stockade.workspace.apply",
    "apply_diff": "stockade.workspace.apply",
    "TEXT_PATCH_LIMIT": "stockade.workspace.diff",
    "ChangeKind": "stockade.workspace.diff",
    "EntryType": "stockade.workspace.diff",
    "FileChange": "stockade.workspace.diff",
    "WorkspaceDiff": "stockade.workspace.diff",
    "compute_diff": "stockade.workspace.diff",
    "WorkspaceLayers": "stockade.workspace.layers",
}


def __getattr__(name: str) -> object:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'stockade.workspace' has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


__all__ = [
    "TEXT_PATCH_LIMIT",
    "ApplyConflict",
    "ApplyResult",
    "ChangeKind",
    "ConflictMode",
    "EntryType",
    "FileChange",
    "WorkspaceDiff",
    "WorkspaceLayers",
    "apply_diff",
    "compute_diff",
]
