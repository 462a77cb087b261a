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
