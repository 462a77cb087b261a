"""The on-disk layers of a copy-on-write workspace: the host project (lower), the sandbox's
writes (upper), overlayfs scratch (work) and the baseline (a git tree of the project as the
sandbox first saw it, see ``baseline.py``).

Everything here works on plain directories, so backends that copy an upper layer back from a
guest share it with the overlayfs backends. Paths inside upper are written by the untrusted
sandbox: they are walked with directory fds and ``O_NOFOLLOW`` so a symlink planted there can
never redirect a read, a chmod or a delete to the host.
"""

from __future__ import annotations

import errno
import logging
import os
import secrets
import stat
from dataclasses import dataclass
from pathlib import Path

from stockade._errors import WorkspaceError
from stockade.workspace.baseline import BASELINE_DIR, WorkspaceBaseline
from stockade.workspace.removal import remove_tree

__all__ = ["WorkspaceLayers"]

logger = logging.getLogger(__name__)

_STATE_MODE = 0o700
_LEGACY_BASELINE_NAME = "workspace-baseline"  # ctime file of stockade before git baselines

_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC


@dataclass(frozen=True)
class WorkspaceLayers:
    """Where one sandbox's workspace lives on the host.

    ``lower`` is the user's project (read-only to the sandbox), ``upper`` receives the
    sandbox's writes, ``work`` is overlayfs scratch space, and ``baseline_path`` is the
    private git repository holding the baseline (``baseline``).
    """

    lower: Path
    upper: Path
    work: Path
    baseline_path: Path

    @property
    def state_dir(self) -> Path:
        return self.baseline_path.parent  # not upper.parent: that may be the sandbox's own disk

    @property
    def baseline(self) -> WorkspaceBaseline:
        """The project as the sandbox first saw it; WorkspaceError when missing.

        A sandbox made by an older stockade (a ctime baseline file, no git baseline) gets
        one recorded from the project as it is now, with a warning: host edits made before
        this moment can no longer be told from the sandbox's baseline.
        """
        try:
            return WorkspaceBaseline.open(self.state_dir, self.lower)
        except WorkspaceError:
            if not os.path.isfile(self.state_dir / _LEGACY_BASELINE_NAME):
                raise
        logger.warning(
            "sandbox workspace in %s predates git baselines; recording one from the project "
            "as it is now",
            self.state_dir,
        )
        return WorkspaceBaseline.record(self.state_dir, self.lower)

    @classmethod
    def at(
        cls, state_dir: str | os.PathLike[str], lower: str | os.PathLike[str]
    ) -> WorkspaceLayers:
        """The layers of ``state_dir`` (to reopen existing state). A sandbox with a disk of its
        own (``limits.disk``) keeps upper and work on it, mounted here if it is not yet."""
        from stockade.workspace.disk import layer_root

        state = Path(state_dir)
        root = layer_root(state)
        return cls(
            lower=Path(lower).resolve(),
            upper=root / "upper",
            work=root / "work",
            baseline_path=state / BASELINE_DIR,
        )

    @classmethod
    def create(
        cls,
        state_dir: str | os.PathLike[str],
        lower: str | os.PathLike[str],
        *,
        record_baseline: bool = True,
    ) -> WorkspaceLayers:
        """Make empty upper/work directories (mode 0700) and record the baseline (unless
        ``record_baseline`` is false: then the caller calls ``record_baseline()`` itself)."""
        layers = cls.at(state_dir, lower)
        try:
            lower_st = os.stat(layers.lower)
        except OSError as exc:
            raise WorkspaceError(
                f"project directory {str(lower)!r} is not accessible: {exc.strerror}"
            ) from exc
        if not stat.S_ISDIR(lower_st.st_mode):
            raise WorkspaceError(f"project path {str(lower)!r} is not a directory")
        state = layers.upper.parent
        state.mkdir(mode=_STATE_MODE, parents=True, exist_ok=True)
        for path in (layers.upper, layers.work):
            if os.path.lexists(path):
                raise WorkspaceError(
                    f"workspace layer {str(path)!r} already exists; reopen it with "
                    "WorkspaceLayers.at() or discard it with reset()"
                )
        for path in (layers.upper, layers.work):
            _make_private_dir(path)
        if record_baseline:
            layers.record_baseline()
        return layers

    def exists(self) -> bool:
        """True when upper, work and the baseline are all in place."""
        return (
            _is_real_dir(self.upper)
            and _is_real_dir(self.work)
            and _is_real_dir(self.baseline_path)
        )

    def reset(self) -> None:
        """Discard everything the sandbox wrote: recreate empty upper and work, new baseline.

        Each layer is first renamed aside, so a reset interrupted half-way never leaves a
        half-deleted upper in use. Must not run while the overlay is mounted.
        """
        state = self.upper.parent
        if not _is_real_dir(state):
            raise WorkspaceError(f"workspace state directory {str(state)!r} does not exist")
        discarded: list[Path] = []
        for path in (self.upper, self.work):
            if os.path.lexists(path):
                aside = path.with_name(f".{path.name}.discard-{secrets.token_hex(6)}")
                os.rename(path, aside)
                discarded.append(aside)
            _make_private_dir(path)
        for aside in discarded:
            try:
                remove_tree(aside)
            except OSError as exc:
                raise WorkspaceError(
                    f"could not remove the discarded layer {str(aside)!r}: {exc}; the "
                    "workspace is already empty, remove that directory as root or from "
                    "inside the sandbox's user namespace"
                ) from exc
        # The sandbox now sees the host as it is, so host edits before now are not conflicts.
        self.record_baseline()

    def record_baseline(self) -> None:
        """Record the project as it is now as what the sandbox starts from (git tree)."""
        WorkspaceBaseline.record(self.state_dir, self.lower)


def _make_private_dir(path: Path) -> None:
    os.mkdir(path, _STATE_MODE)
    os.chmod(path, _STATE_MODE)  # mkdir's mode is filtered by the umask


def _is_real_dir(path: Path) -> bool:
    try:
        return stat.S_ISDIR(os.lstat(path).st_mode)
    except OSError:
        return False


#: (fd, mode) pairs: entries made accessible by ``open_at``, to put back with ``restore_modes``.
ModeRestore = list[tuple[int, int]]


def open_dir_beneath(
    root: Path, parts: tuple[str, ...], *, restore: ModeRestore | None = None
) -> int:
    """Open directory ``root/parts...`` without following a symlink in any component.

    Raises OSError (ELOOP / ENOTDIR / ENOENT) when a component is a symlink, not a
    directory, or missing. Pass ``restore`` for the upper layer: directories the sandbox made
    inaccessible are opened anyway (see ``open_at``) and stay usable until
    ``restore_modes(restore)``. The caller closes the returned fd.
    """
    fd = os.open(root, _DIR_FLAGS)
    try:
        for part in parts:
            if restore is None:
                child = os.open(part, _DIR_FLAGS, dir_fd=fd)
            else:
                child = open_at(fd, part, _DIR_FLAGS, restore)
            os.close(fd)
            fd = child
    except BaseException:
        os.close(fd)
        raise
    return fd


def open_file_beneath(root: Path, parts: tuple[str, ...], *, owned: bool = False) -> int:
    """Open regular file ``root/parts...`` read-only, never following a symlink.

    ``owned`` is for the upper layer: entries the sandbox chmodded to 000 are read anyway.
    """
    if not parts:
        raise IsADirectoryError(errno.EISDIR, "workspace root is a directory", str(root))
    restore: ModeRestore | None = [] if owned else None
    flags = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
    try:
        dir_fd = open_dir_beneath(root, parts[:-1], restore=restore)
        try:
            if restore is None:
                fd = os.open(parts[-1], flags, dir_fd=dir_fd)
            else:
                fd = open_at(dir_fd, parts[-1], flags, restore)
        finally:
            os.close(dir_fd)
    finally:
        if restore:
            restore_modes(restore)
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise OSError(errno.EINVAL, "not a regular file", str(root.joinpath(*parts)))
    return fd


def open_at(dir_fd: int, name: str, flags: int, restore: ModeRestore) -> int:
    """``os.open(name, flags, dir_fd=dir_fd)`` for an entry of a layer the host owns.

    The sandbox may chmod its files and directories to 000; the host side, which owns the
    upper layer, still has to read them. On EACCES the entry is pinned with an
    ``O_PATH | O_NOFOLLOW`` fd (so it is never a symlink), given owner read and search
    permission, and reopened through that fd; its mode is recorded in ``restore``.
    """
    try:
        return os.open(name, flags, dir_fd=dir_fd)
    except PermissionError:
        pass
    path_fd = os.open(name, os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dir_fd)
    try:
        mode = os.fstat(path_fd).st_mode
        if stat.S_ISDIR(mode):
            needed = 0o500
        elif stat.S_ISREG(mode):
            needed = 0o400
        else:
            raise PermissionError(errno.EACCES, "not readable", name)
        proc = f"/proc/self/fd/{path_fd}"
        os.chmod(proc, stat.S_IMODE(mode) | needed)
        restore.append((os.dup(path_fd), stat.S_IMODE(mode)))
        return os.open(proc, flags & ~os.O_NOFOLLOW)
    finally:
        os.close(path_fd)


def restore_modes(restore: ModeRestore) -> None:
    """Put back the modes ``open_at`` changed, innermost first."""
    while restore:
        fd, mode = restore.pop()
        try:
            os.chmod(f"/proc/self/fd/{fd}", mode)
        finally:
            os.close(fd)
