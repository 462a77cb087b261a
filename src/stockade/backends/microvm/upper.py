"""Bring a guest's workspace upper layer back into the host's ``WorkspaceLayers.upper``.

The guest packs its overlay upper (``images/guest/wsync.py``): files, directories,
symlinks, whiteouts as character devices 0/0, opaque directories marked with the pax
record ``STOCKADE.opaque=y``, and files with holes as GNU pax sparse members (written back
with the same holes). The archive comes from an untrusted guest, so every member is
checked before anything is written (relative, normalised, no ``..``, only those types, no
path through a symlink), then the tree is built in a fresh directory next to ``upper`` and
swapped in. On the host, whiteouts and opaque markers take the same form the namespace
backend's overlayfs gives them (``userxattr``), so ``compute_diff`` and ``apply_diff`` read
the layer exactly as they read a namespace sandbox's.
"""

from __future__ import annotations

import os
import secrets
import stat
import tarfile
from pathlib import Path
from typing import IO

from stockade._errors import WorkspaceError
from stockade.workspace.removal import remove_tree

__all__ = ["OPAQUE_PAX", "OPAQUE_XATTR", "import_upper"]

OPAQUE_PAX = "STOCKADE.opaque"
OPAQUE_XATTR = "user.overlay.opaque"
_MAX_MEMBERS = 1_000_000
#: Most data regions of one sparse member (the guest sends a file densely past 4,096).
_MAX_REGIONS = 65_536


def _parts(name: str) -> tuple[str, ...]:
    if not name or name.startswith("/") or "\0" in name:
        raise WorkspaceError(f"guest workspace archive has an unsafe member name {name!r}")
    parts = tuple(p for p in name.split("/") if p not in ("", "."))
    if not parts or any(p == ".." for p in parts):
        raise WorkspaceError(f"guest workspace archive has an unsafe member name {name!r}")
    return parts


def _regions(member: tarfile.TarInfo) -> list[tuple[int, int]]:
    """A sparse member's (offset, length) data regions (tarfile parsed them)."""
    regions: list[tuple[int, int]] = member.sparse or []  # type: ignore[assignment]
    return regions


def _check_sparse(member: tarfile.TarInfo) -> None:
    """A sparse member's map must be ordered, disjoint and inside the file."""
    regions = _regions(member)
    if len(regions) > _MAX_REGIONS:
        raise WorkspaceError(f"guest workspace archive member {member.name!r} has too many regions")
    end = 0
    for offset, length in regions:
        if offset < end or length < 0 or offset + length > member.size:
            raise WorkspaceError(
                f"guest workspace archive member {member.name!r} has an invalid sparse map"
            )
        end = offset + length


def _copy_sparse(source: IO[bytes], out: IO[bytes], member: tarfile.TarInfo) -> None:
    """Write only the data regions; the rest stays a hole."""
    for offset, length in _regions(member):
        source.seek(offset)
        out.seek(offset)
        remaining = length
        while remaining:
            block = source.read(min(remaining, 1 << 20))
            if not block:
                raise WorkspaceError(f"guest workspace archive member {member.name!r} is cut short")
            out.write(block)
            remaining -= len(block)
    out.truncate(member.size)


def import_upper(archive: IO[bytes], upper: Path) -> int:
    """Replace the contents of ``upper`` with the guest's layer; returns the entry count."""
    try:
        return _import_upper(archive, upper)
    except (tarfile.TarError, ValueError, EOFError) as exc:
        # tarfile's own parsing of what the guest sent (headers, pax records, sparse maps).
        raise WorkspaceError(f"the guest's workspace archive is malformed: {exc}") from exc


def _import_upper(archive: IO[bytes], upper: Path) -> int:
    with tarfile.open(fileobj=archive, mode="r:") as tar:
        plan: list[tuple[tuple[str, ...], tarfile.TarInfo]] = []
        seen: dict[tuple[str, ...], str] = {}
        for member in tar:
            if len(plan) >= _MAX_MEMBERS:
                raise WorkspaceError("guest workspace archive has too many members")
            parts = _parts(member.name)
            if member.isdir():
                kind = "dir"
            elif member.isreg():
                kind = "file"
                if member.sparse is not None:
                    _check_sparse(member)
            elif member.issym():
                kind = "symlink"
            elif member.ischr() and member.devmajor == 0 and member.devminor == 0:
                kind = "whiteout"
            else:
                raise WorkspaceError(
                    f"guest workspace archive member {member.name!r} has an unsupported type"
                )
            for depth in range(1, len(parts)):
                if seen.get(parts[:depth], "dir") != "dir":
                    raise WorkspaceError(
                        f"guest workspace archive member {member.name!r} lies beneath a "
                        "non-directory"
                    )
            if parts in seen:
                raise WorkspaceError(f"guest workspace archive repeats {member.name!r}")
            seen[parts] = kind
            plan.append((parts, member))

        fresh = upper.with_name(f".{upper.name}.import-{secrets.token_hex(6)}")
        os.mkdir(fresh, 0o700)
        try:
            dirs: list[tuple[Path, int]] = []
            for parts, member in plan:
                path = fresh.joinpath(*parts)
                for depth in range(1, len(parts)):
                    parent = fresh.joinpath(*parts[:depth])
                    if not parent.is_dir():
                        os.mkdir(parent, 0o700)
                if member.isdir():
                    if not path.is_dir():
                        os.mkdir(path, 0o700)
                    if member.pax_headers.get(OPAQUE_PAX) == "y":
                        os.setxattr(path, OPAQUE_XATTR, b"y", follow_symlinks=False)
                    dirs.append((path, member.mode & 0o7777))
                elif member.issym():
                    os.symlink(member.linkname, path)
                elif member.ischr():
                    os.mknod(path, stat.S_IFCHR | 0o600, os.makedev(0, 0))
                else:
                    source = tar.extractfile(member)
                    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
                    with os.fdopen(fd, "wb") as out:
                        if source is not None and member.sparse is not None:
                            _copy_sparse(source, out, member)
                        elif source is not None:
                            while block := source.read(1 << 20):
                                out.write(block)
                        # Never setuid/setgid on the host, whatever the guest says.
                        os.fchmod(out.fileno(), member.mode & 0o1777)
                    os.utime(path, (member.mtime, member.mtime), follow_symlinks=False)
            for path, mode in reversed(dirs):
                os.chmod(path, mode & 0o1777)
        except BaseException:
            remove_tree(fresh)
            raise
    aside = upper.with_name(f".{upper.name}.old-{secrets.token_hex(6)}")
    os.rename(upper, aside)
    os.rename(fresh, upper)
    remove_tree(aside)
    return len(plan)
