"""Copy-on-write workspace, host side: the layers on disk, the diff of what the sandbox
changed, and applying that diff to the project (conflict-checked) or resetting it."""

from __future__ import annotations

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
