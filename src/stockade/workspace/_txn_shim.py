"""Stand-in for workspace/txn.py (ws-txn) until it lands: same names, not atomic.

Removed when ``stockade.workspace.txn`` is merged; apply.py imports from there then.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import secrets
import stat
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from stockade._errors import WorkspaceConflictError, WorkspaceError
from stockade.workspace.layers import open_dir_beneath

__all__ = ["HostState", "Op", "apply_ops"]


@dataclass(frozen=True)
class HostState:
    kind: Literal["file", "symlink", "dir"]
    oid: str | None = None


@dataclass(frozen=True)
class Op:
    path: str
    kind: Literal["file", "symlink", "dir", "delete"]
    mode: int | None = None
    data: bytes | None = None
    source: Callable[[], int] | None = None
    sha256: str | None = None
    target: str | None = None
    expect: HostState | None = None


def _now(project: Path, path: str) -> HostState | None:
    from stockade.workspace.baseline import git_blob_id, git_blob_id_fd

    parts = path.split("/")
    try:
        dfd = open_dir_beneath(project, tuple(parts[:-1]))
    except OSError:
        return None
    try:
        try:
            st = os.stat(parts[-1], dir_fd=dfd, follow_symlinks=False)
        except FileNotFoundError:
            return None
        if stat.S_ISDIR(st.st_mode):
            return HostState("dir")
        if stat.S_ISLNK(st.st_mode):
            return HostState(
                "symlink", git_blob_id(os.fsencode(os.readlink(parts[-1], dir_fd=dfd)))
            )
        fd = os.open(parts[-1], os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dfd)
        try:
            return HostState("file", git_blob_id_fd(fd))
        finally:
            os.close(fd)
    finally:
        os.close(dfd)


def apply_ops(project: Path, journal_dir: Path, ops: Sequence[Op]) -> list[str]:
    for op in ops:
        if _now(project, op.path) != op.expect:
            raise WorkspaceConflictError(
                f"{op.path!r} changed on the host during the apply", paths=[op.path]
            )
    done: list[str] = []
    for op in ops:
        parts = op.path.split("/")
        dfd = open_dir_beneath(project, tuple(parts[:-1]))
        name = parts[-1]
        try:
            _one(dfd, name, op)
        finally:
            os.close(dfd)
        done.append(op.path)
    return done


def _one(dfd: int, name: str, op: Op) -> None:
    try:
        st: os.stat_result | None = os.stat(name, dir_fd=dfd, follow_symlinks=False)
    except FileNotFoundError:
        st = None
    if op.kind == "delete":
        if st is not None and stat.S_ISDIR(st.st_mode):
            os.rmdir(name, dir_fd=dfd)
        elif st is not None:
            os.unlink(name, dir_fd=dfd)
        return
    if op.kind == "dir":
        if st is not None and not stat.S_ISDIR(st.st_mode):
            os.unlink(name, dir_fd=dfd)
            st = None
        if st is None:
            os.mkdir(name, 0o700, dir_fd=dfd)
        fd = os.open(name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW, dir_fd=dfd)
        try:
            os.fchmod(fd, op.mode if op.mode is not None else 0o755)
        finally:
            os.close(fd)
        return
    if st is not None and stat.S_ISDIR(st.st_mode):
        os.rmdir(name, dir_fd=dfd)
    tmp = f".stockade-apply-{secrets.token_hex(8)}.tmp"
    try:
        if op.kind == "symlink":
            os.symlink(op.target or "", tmp, dir_fd=dfd)
        else:
            out = os.open(
                tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600, dir_fd=dfd
            )
            try:
                digest = hashlib.sha256()
                if op.data is not None:
                    digest.update(op.data)
                    os.write(out, op.data)
                elif op.source is not None:
                    src = op.source()
                    try:
                        while chunk := os.read(src, 1 << 20):
                            digest.update(chunk)
                            os.write(out, chunk)
                    finally:
                        os.close(src)
                if op.sha256 is not None and digest.hexdigest() != op.sha256:
                    raise WorkspaceError(f"{op.path!r} changed in the sandbox while applying")
                os.fchmod(out, op.mode if op.mode is not None else 0o644)
                os.fsync(out)
            finally:
                os.close(out)
        os.replace(tmp, name, src_dir_fd=dfd, dst_dir_fd=dfd)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp, dir_fd=dfd)
        raise
