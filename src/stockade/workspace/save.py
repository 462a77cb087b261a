"""Whether a sandbox's workspace changes reached the host, and what was lost when not.

Where a backend keeps the sandbox's upper layer inside the sandbox (a microVM's guest
tmpfs), the host's ``WorkspaceLayers.upper`` is only as fresh as the last sync. A small
JSON file next to the layers records how fresh it is: ``pending`` while the sandbox runs,
``saved`` once its end saved everything, ``lost`` (with the reason) when it could not. A
``pending`` file whose sandbox no longer runs means it ended without a save (its process
was killed): those changes are lost too. ``stockade diff`` and ``ls`` read it so they never
say "no changes" where changes were lost. Backends whose upper layer is the host directory
itself write no file: nothing of theirs can be lost.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal

__all__ = [
    "SAVE_FILE",
    "SAVE_TIMEOUT",
    "WorkspaceSave",
    "lost_message",
    "lost_save",
    "read_save",
    "write_save",
]

#: The record's name inside the sandbox's state directory.
SAVE_FILE = "workspace-save.json"
#: Seconds a sandbox's end may spend bringing its workspace home (then it is lost).
SAVE_TIMEOUT = 120.0

SaveState = Literal["pending", "saved", "lost"]


@dataclass(frozen=True)
class WorkspaceSave:
    """How fresh the host's copy of a sandbox's workspace is."""

    state: SaveState
    #: When the host's copy last equalled the sandbox's (start, a diff's sync, its end).
    saved_at: float
    #: Why the changes since ``saved_at`` were lost (state ``lost``).
    reason: str | None = None


def read_save(sandbox_dir: str | Path) -> WorkspaceSave | None:
    """The record in ``sandbox_dir``, or None (no record: nothing could be lost)."""
    try:
        data = json.loads((Path(sandbox_dir) / SAVE_FILE).read_text())
        state = data["state"]
        if state not in ("pending", "saved", "lost"):
            return None
        reason = data.get("reason")
        return WorkspaceSave(state, float(data["saved_at"]), str(reason) if reason else None)
    except (OSError, ValueError, KeyError, TypeError):
        return None


def write_save(sandbox_dir: str | Path, save: WorkspaceSave) -> None:
    """Replace the record atomically (write, fsync, rename); raises OSError (disk full)."""
    path = Path(sandbox_dir) / SAVE_FILE
    tmp = path.with_name(f".{SAVE_FILE}.tmp")
    try:
        with open(tmp, "w") as f:
            json.dump(asdict(save), f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise


def lost_save(sandbox_dir: str | Path, *, running: bool) -> WorkspaceSave | None:
    """The record when changes were lost, else None. ``running``: whether the sandbox still
    runs (a pending record of a running sandbox is just not synced yet)."""
    save = read_save(sandbox_dir)
    if save is None or save.state == "saved" or (save.state == "pending" and running):
        return None
    if save.state == "pending":
        reason = "the sandbox ended without saving them (its process was killed)"
        return WorkspaceSave("lost", save.saved_at, reason)
    return save


def lost_message(name: str, save: WorkspaceSave) -> str:
    """What a user reads about the lost changes of sandbox ``name``."""
    when = dt.datetime.fromtimestamp(save.saved_at).strftime("%Y-%m-%d %H:%M:%S")
    return (
        f"the workspace changes of {_printable(name)} could not be saved when it stopped: "
        f"{_printable(save.reason or 'unknown reason')}; what is shown is the last saved "
        f"state, from {when}"
    )


def _printable(text: str) -> str:
    """``text`` with control characters and undecodable bytes escaped (a reason can quote
    what the guest wrote)."""
    return "".join(
        ch if ch.isprintable() else ch.encode("unicode_escape", "backslashreplace").decode()
        for ch in text
    )
