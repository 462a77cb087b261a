"""Pack the guest's workspace upper layer as a tar for the host (stdlib only, run in the VM).

``python3 -S -I wsync.py UPPER OUT [LOWER MERGED]`` (OUT ``-``: standard output, streamed, so
nothing is materialised in the guest's tmpfs): regular files, directories and symlinks as
they are; a file with holes (found with SEEK_DATA/SEEK_HOLE) as a GNU pax sparse member
(format 1.0: only its data travels, and it comes back sparse); overlay whiteouts (character
devices 0/0) as character-device members; opaque directories with the pax record
``STOCKADE.opaque=y``. A file that shrinks while it is read is padded with zeros, so the
archive stays well-formed (the next sync brings the file as it is then).

An unprivileged packer cannot read ``trusted.overlay.opaque``, so with LOWER and MERGED it
infers it: an upper directory is opaque when a name of its lower counterpart is missing
from the merged view without a whiteout hiding it (where no such name exists, opaque or
not reads the same in a diff). Everything else (fifos, sockets, other devices) is left
out, as the namespace backend's diff ignores it.
The host validates every member again: this program runs in the untrusted guest.
"""

from __future__ import annotations

import errno
import os
import stat
import sys
import tarfile

#: Past this many data regions a file is sent densely (its map would outgrow its data).
MAX_REGIONS = 4096
#: Largest member size tarfile writes in the ustar header (beyond it the pax ``size``
#: record would stand for the sparse file's real size, which readers take for the data's).
_USTAR_MAX = 8 * 1024**3 - 1
_BLOCK = 512


def _opaque(path: str, rel: str, lower: str | None, merged: str | None) -> bool:
    for name in ("trusted.overlay.opaque", "user.overlay.opaque"):
        try:
            if os.getxattr(path, name, follow_symlinks=False) == b"y":
                return True
        except OSError:
            pass
    if lower is None or merged is None:
        return False
    lower_dir = os.path.join(lower, rel)
    if os.path.islink(lower_dir) or not os.path.isdir(lower_dir):
        return False
    try:
        hidden = set(os.listdir(lower_dir)) - set(os.listdir(os.path.join(merged, rel)))
        return bool(hidden - set(os.listdir(path)))
    except OSError:
        return False


class _Ranges:
    """``read(n)`` over ``head`` then ranges of an open file, zero-filled past its end."""

    def __init__(self, head: bytes, fd: int, ranges: list[tuple[int, int]]) -> None:
        self.head = head
        self.fd = fd
        self.ranges = list(reversed(ranges))

    def read(self, n: int) -> bytes:
        out = bytearray()
        if self.head:
            out += self.head[:n]
            self.head = self.head[len(out) :]
        while len(out) < n and self.ranges:
            offset, length = self.ranges.pop()
            take = min(length, n - len(out))
            data = os.pread(self.fd, take, offset) if take else b""
            data += bytes(take - len(data))  # the file shrank meanwhile
            out += data
            if take < length:
                self.ranges.append((offset + take, length - take))
        return bytes(out)


def data_regions(fd: int, size: int) -> list[tuple[int, int]] | None:
    """(offset, length) of the data in a file with holes; None when it has none (or the
    file system cannot say, or it is too fragmented): then it is sent densely."""
    regions: list[tuple[int, int]] = []
    offset = 0
    while offset < size:
        try:
            start = os.lseek(fd, offset, os.SEEK_DATA)
        except OSError as exc:
            if exc.errno == errno.ENXIO:
                break  # nothing but a hole up to the end
            return None
        if start >= size:
            break
        end = min(os.lseek(fd, start, os.SEEK_HOLE), size)
        regions.append((start, end - start))
        if len(regions) > MAX_REGIONS:
            return None
        offset = end
    if sum(length for _, length in regions) >= size:
        return None
    return regions


def _add_file(tar: tarfile.TarFile, info: tarfile.TarInfo, path: str, size: int) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    try:
        regions = data_regions(fd, size) if size else None
        stored = 0
        if regions is not None:
            if not regions or regions[-1][0] + regions[-1][1] < size:
                regions.append((size, 0))  # GNU tar's mark of a file that ends in a hole
            text = f"{len(regions)}\n" + "".join(f"{o}\n{n}\n" for o, n in regions)
            head = text.encode() + bytes(-len(text) % _BLOCK)
            stored = len(head) + sum(n for _, n in regions)
        if regions is not None and stored <= _USTAR_MAX:
            real_name = info.name
            info.name = "GNUSparseFile.0/sparse"  # what a reader without sparse support sees
            info.size = stored
            info.pax_headers = {
                "GNU.sparse.major": "1",
                "GNU.sparse.minor": "0",
                "GNU.sparse.name": real_name,
                "GNU.sparse.realsize": str(size),
            }
            tar.addfile(info, _Ranges(head, fd, regions))  # type: ignore[arg-type]
        else:
            info.size = size
            tar.addfile(info, _Ranges(b"", fd, [(0, size)]))  # type: ignore[arg-type]
    finally:
        os.close(fd)


def pack(upper: str, out: str, lower: str | None = None, merged: str | None = None) -> int:
    count = 0
    if out == "-":
        opened = tarfile.open(fileobj=sys.stdout.buffer, mode="w|", format=tarfile.PAX_FORMAT)  # noqa: SIM115
    else:
        opened = tarfile.open(out, "w", format=tarfile.PAX_FORMAT)  # noqa: SIM115 - closed below
    with opened as tar:
        for top, dirs, files in os.walk(upper):
            dirs.sort()
            rel_top = os.path.relpath(top, upper)
            for name in sorted(dirs) + sorted(files):
                path = os.path.join(top, name)
                rel = name if rel_top == "." else f"{rel_top}/{name}"
                st = os.lstat(path)
                info = tarfile.TarInfo(rel)
                info.mode = stat.S_IMODE(st.st_mode)
                info.mtime = int(st.st_mtime)
                if stat.S_ISDIR(st.st_mode):
                    info.type = tarfile.DIRTYPE
                    if _opaque(path, rel, lower, merged):
                        info.pax_headers = {"STOCKADE.opaque": "y"}
                    tar.addfile(info)
                elif stat.S_ISLNK(st.st_mode):
                    info.type = tarfile.SYMTYPE
                    info.linkname = os.readlink(path)
                    tar.addfile(info)
                elif stat.S_ISREG(st.st_mode):
                    _add_file(tar, info, path, st.st_size)
                elif stat.S_ISCHR(st.st_mode) and st.st_rdev == 0:
                    info.type = tarfile.CHRTYPE
                    info.devmajor = info.devminor = 0
                    tar.addfile(info)
                else:
                    continue
                count += 1
    return count


if __name__ == "__main__":
    packed = pack(*sys.argv[1:5])
    if sys.argv[2] != "-":
        print(packed)
