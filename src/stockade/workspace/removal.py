"""Deleting a directory tree that the sandbox wrote: never following a symlink, making
mode-000 directories (overlayfs work/, read-only files of the sandbox) removable first."""

from __future__ import annotations

import os
import stat
from pathlib import Path

__all__ = ["remove_tree", "remove_tree_at"]

_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_OWNER_RWX = 0o700


def remove_tree(path: Path) -> None:
    """Delete ``path`` recursively without following symlinks.

    Directories are made writable first (overlayfs leaves mode-000 dirs in work/, and the
    sandbox may have made files read-only).
    """
    st = os.lstat(path)
    parent_fd = os.open(path.parent, _DIR_FLAGS)
    try:
        if stat.S_ISDIR(st.st_mode):
            remove_tree_at(parent_fd, path.name)
        else:
            os.unlink(path.name, dir_fd=parent_fd)
    finally:
        os.close(parent_fd)


def remove_tree_at(parent_fd: int, name: str) -> None:
    """Delete directory ``name`` of ``parent_fd`` recursively, never following a symlink,
    making mode-000 directories accessible first."""
    fd = _open_dir_for_removal(parent_fd, name)
    try:
        for child in os.listdir(fd):
            child_st = os.stat(child, dir_fd=fd, follow_symlinks=False)
            if stat.S_ISDIR(child_st.st_mode):
                remove_tree_at(fd, child)
            else:
                os.unlink(child, dir_fd=fd)
    finally:
        os.close(fd)
    os.rmdir(name, dir_fd=parent_fd)


def _open_dir_for_removal(parent_fd: int, name: str) -> int:
    try:
        fd = os.open(name, _DIR_FLAGS, dir_fd=parent_fd)
    except PermissionError:
        # A mode-000 directory: chmod it through an O_PATH fd, which cannot be a symlink
        # because of O_NOFOLLOW | O_DIRECTORY, so the chmod cannot land outside the tree.
        path_fd = os.open(
            name, os.O_PATH | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=parent_fd
        )
        try:
            os.chmod(f"/proc/self/fd/{path_fd}", _OWNER_RWX)
        finally:
            os.close(path_fd)
        fd = os.open(name, _DIR_FLAGS, dir_fd=parent_fd)
    try:
        if stat.S_IMODE(os.fstat(fd).st_mode) & 0o700 != 0o700:
            os.fchmod(fd, _OWNER_RWX)
    except BaseException:
        os.close(fd)
        raise
    return fd
