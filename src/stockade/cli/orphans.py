"""What sandboxes left behind without a record, found (``ls --all``, ``doctor``) and removed
(``doctor --fix``).

Kinds of leftover, each tied to one state directory unless said otherwise:

- ``directory``: ``sandboxes/<id>/`` with no record (a start that failed in an older stockade,
  a crash between removing the record and the directory);
- ``record``: a stopped or failed sandbox whose directory is gone (``ls`` shows it, nothing
  is left to review);
- ``mount``: a mount point inside a sandbox's directory in this mount namespace, while the
  sandbox does not run (a directory with one is never deleted: that could reach through it);
- ``container``: what a backend's engine keeps of a sandbox this state directory has no
  record of (``Backend.orphans``: a runsc/runc/crun/Docker/Podman container). Engines are
  shared by every state directory on the machine, so such a container is removed only when
  its id is also a leftover directory or record here; otherwise it may be another state
  directory's live sandbox, and is shown with the command that removes it.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import subprocess
from dataclasses import dataclass
from pathlib import Path

from stockade.state import SandboxStatus, StateStore

__all__ = ["Orphan", "find_orphans", "reap_backend", "remove_orphan"]

logger = logging.getLogger(__name__)

_ID_RE = re.compile(r"^[a-z0-9]{8,64}$")


@dataclass(frozen=True)
class Orphan:
    """One leftover: what it is, and whether ``remove_orphan`` may remove it."""

    kind: str  # "directory", "record", "mount" or "container"
    sandbox: str  # the sandbox id it belongs to
    what: str  # for a human: "directory /…/sandboxes/<id>", "docker container 1a2b…"
    removable: bool = True
    why_not: str = ""  # when not removable: why, and how to remove it by hand
    backend: str = ""  # the backend whose ``Backend.reap`` removes it (containers, records)
    name: str = ""  # the record's name (records)
    path: str = ""  # the directory or mount point

    def to_dict(self) -> dict[str, object]:
        return {
            "kind": self.kind,
            "sandbox": self.sandbox,
            "what": self.what,
            "removable": self.removable,
            "why_not": self.why_not,
        }


def _mount_points() -> list[str]:
    """Mount points of this mount namespace (octal escapes of mountinfo decoded)."""
    try:
        text = Path("/proc/self/mountinfo").read_text(errors="surrogateescape")
    except OSError:
        return []
    points = []
    for line in text.splitlines():
        fields = line.split(" ")
        if len(fields) > 4:
            points.append(re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), fields[4]))
    return points


def _mounts_under(directory: Path, points: list[str]) -> list[str]:
    """Mount points in ``directory``, but a sandbox's own disk (``limits.disk``): that one
    stays mounted while the sandbox has a record, and removing the directory unmounts it."""
    from stockade.workspace.disk import DISK_DIR, has_disk

    top = str(directory)
    own = str(directory / DISK_DIR) if has_disk(directory) else None
    return [p for p in points if (p == top or p.startswith(top + "/")) and p != own]


def find_orphans(store: StateStore, *, containers: bool = True) -> list[Orphan]:
    """Every leftover of this state directory (and, with ``containers``, of the engines)."""
    records = [store.reconcile(r) for r in store.list()]
    by_id = {r.id: r for r in records}
    points = _mount_points()
    found: list[Orphan] = []
    sandboxes = store.root / "sandboxes"
    try:
        entries = sorted(os.listdir(sandboxes))
    except OSError:
        entries = []
    for entry in entries:
        path = sandboxes / entry
        if entry in by_id or not path.is_dir() or path.is_symlink():
            continue
        mounted = _mounts_under(path, points)
        found.append(
            Orphan(
                kind="directory",
                sandbox=entry,
                what=f"directory {path} (no sandbox record)",
                removable=not mounted and bool(_ID_RE.match(entry)),
                why_not=(
                    f"something is mounted in it ({', '.join(mounted)}); unmount it with "
                    f"`umount -l {mounted[0]}` first"
                    if mounted
                    else ""
                    if _ID_RE.match(entry)
                    else "not a sandbox id; remove it by hand"
                ),
                path=str(path),
            )
        )
    for record in records:
        alive = record.status in (SandboxStatus.STARTING, SandboxStatus.RUNNING)
        if alive:
            continue
        if record.dir and not Path(record.dir).exists():
            found.append(
                Orphan(
                    kind="record",
                    sandbox=record.id,
                    what=f"record of sandbox {record.name} ({record.status}; its directory "
                    f"{record.dir} is gone)",
                    backend=record.backend,
                    name=record.name,
                )
            )
        elif record.dir:
            for point in _mounts_under(Path(record.dir), points):
                found.append(
                    Orphan(
                        kind="mount",
                        sandbox=record.id,
                        what=f"mount {point} of {record.status} sandbox {record.name}",
                        path=point,
                    )
                )
    if containers:
        ours = {o.sandbox for o in found if o.kind in ("directory", "record")}
        found += _containers(set(by_id), ours)
    return found


def _containers(known: set[str], ours: set[str]) -> list[Orphan]:
    """What every backend's engines keep of sandboxes this state directory has no record of
    (``Backend.orphans``)."""
    from stockade import StockadeError
    from stockade.backends.registry import BACKENDS, get_backend_class

    found: list[Orphan] = []
    for entry in BACKENDS:
        try:
            cls = get_backend_class(entry.name)
        except (StockadeError, ImportError):
            continue
        for leftover in cls.orphans():
            if leftover.sandbox_id not in known:
                found.append(
                    _container(
                        leftover.sandbox_id,
                        ours,
                        cls.name,
                        what=leftover.what,
                        by_hand=leftover.by_hand,
                    )
                )
    return found


def _container(sandbox: str, ours: set[str], backend: str, *, what: str, by_hand: str) -> Orphan:
    mine = sandbox in ours
    return Orphan(
        kind="container",
        sandbox=sandbox,
        what=what,
        removable=mine,
        why_not=""
        if mine
        else "no sandbox of this state directory had it (another STOCKADE_STATE_DIR's may); "
        f"if it is a leftover, remove it with `{by_hand}`",
        backend=backend,
    )


def remove_orphan(store: StateStore, orphan: Orphan) -> None:
    """Remove one removable leftover; StockadeError (or OSError) if it cannot be."""
    from stockade import SandboxNotFoundError, SandboxStateError

    if not orphan.removable:
        raise SandboxStateError(f"{orphan.what} is not removed: {orphan.why_not}")
    if orphan.kind == "mount":
        subprocess.run(["umount", "-l", orphan.path], check=True, capture_output=True)
        return
    if orphan.kind == "container":
        reap_backend(orphan.backend, orphan.sandbox)
        return
    from stockade.backends.registry import kill_leftover_processes

    survivors = kill_leftover_processes(orphan.sandbox)
    if survivors:
        raise SandboxStateError(
            f"processes {sorted(survivors)} of sandbox {orphan.sandbox} survived; "
            f"{orphan.what} is kept"
        )
    if orphan.kind == "directory":
        if _mounts_under(Path(orphan.path), _mount_points()):
            raise SandboxStateError(f"{orphan.what} is not removed: something is mounted in it")
        from stockade.workspace.disk import remove_state_dir

        with contextlib.suppress(FileNotFoundError):
            remove_state_dir(Path(orphan.path))  # its own disk (limits.disk) unmounted first
    elif orphan.kind == "record":
        reap_backend(orphan.backend, orphan.sandbox)
        with contextlib.suppress(SandboxNotFoundError):
            store.delete(orphan.name, sandbox_id=orphan.sandbox)


def reap_backend(backend: str, sandbox_id: str) -> None:
    """Delete what a backend may have left of a sandbox outside its state directory when
    its supervisor died (``Backend.reap``); quiet for a backend this stockade lacks."""
    from stockade import StockadeError
    from stockade.backends.registry import get_backend_class

    try:
        cls = get_backend_class(backend)
    except StockadeError:
        return
    cls.reap(sandbox_id)
