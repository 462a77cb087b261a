"""Building blocks for hand-made overlayfs layers in the workspace tests."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

needs_root = pytest.mark.skipif(
    os.geteuid() != 0, reason="whiteouts are made with mknod(S_IFCHR 0/0), which needs root"
)


def write(path: Path, data: str | bytes = "", mode: int = 0o644) -> Path:
    """Create ``path`` (and its parents) with ``data`` and permission bits ``mode``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(data, str):
        data = data.encode()
    path.write_bytes(data)
    os.chmod(path, mode)
    return path


def whiteout(path: Path) -> None:
    """An overlayfs whiteout: a 0/0 character device."""
    path.parent.mkdir(parents=True, exist_ok=True)
    os.mknod(path, stat.S_IFCHR | 0o000, os.makedev(0, 0))


Tree = dict[str, tuple[str, int, bytes | str | None]]


def snapshot(root: Path) -> Tree:
    """Every entry under root: type, permission bits, content or link target."""
    out: Tree = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            path = Path(dirpath) / name
            rel = path.relative_to(root).as_posix()
            st = os.lstat(path)
            if stat.S_ISLNK(st.st_mode):
                out[rel] = ("symlink", 0, os.readlink(path))
            elif stat.S_ISDIR(st.st_mode):
                out[rel] = ("dir", stat.S_IMODE(st.st_mode), None)
            else:
                out[rel] = ("file", stat.S_IMODE(st.st_mode), path.read_bytes())
    return out
